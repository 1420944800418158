//! Envoy's load reports (LRS, on the agent's xDS socket) against Envoy's own stats: traffic from
//! `front` through a router split to `blue` (answers 200) and `red` (answers 500); within one
//! report interval after the traffic stops, the agent's per-edge figures (`/metrics` and
//! `/trellis/v1/load`) equal the caller's `upstream_rq_total` and `upstream_rq_5xx` per
//! cluster, and each node's inbound figures its ingress cluster's.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_tests::apps::{Behaviour, start_app};
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Workdir, can_run_privileged, check, eventually};

const PORT: u16 = 9080;
const ADMIN: u16 = 9901;
const INTERVAL: Duration = Duration::from_millis(1000);
/// Time for a report to cross a busy machine after its interval ends.
const SLACK: Duration = Duration::from_secs(2);

fn node(name: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
}

fn edge_metric(agent: &Agent, series: &str, target: &str) -> u64 {
    agent.metric(&format!(
        "trellis_edge_{series}{{mesh=\"m\",caller=\"virtualNode/front\",service=\"color.local\",target=\"{target}\"}}"
    )) as u64
}

fn load(agent: &Agent) -> Value {
    let text = check(
        agent
            .curl()
            .args(["-sf", &format!("{}/trellis/v1/load", agent.api)]),
    );
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("/trellis/v1/load is not JSON ({e}): {text}"))
}

/// The requests `/trellis/v1/load` says node `n`'s Envoy passed to its app.
fn inbound_of(v: &Value, n: &str) -> u64 {
    v["inbound"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["node"] == n))
        .map_or(0, |e| e["requests"].as_u64().unwrap_or(0))
}

fn ingress_total(task: &Task, node: &str) -> u64 {
    task.envoy_stat(
        ADMIN,
        &format!("cluster.cds_ingress_m_{node}_http_{PORT}.upstream_rq_total"),
    )
}

/// What Envoy's own stats say: (requests, 5xx) of `front`'s cluster to `target`.
fn envoy_figures(front: &Task, target: &str) -> (u64, u64) {
    let c = format!("cluster.cds_egress_m_{target}_http_{PORT}");
    (
        front.envoy_stat(ADMIN, &format!("{c}.upstream_rq_total")),
        front.envoy_stat(ADMIN, &format!("{c}.upstream_rq_5xx")),
    )
}

#[test]
fn load_reports_match_envoys_own_stats_within_one_interval() {
    if !can_run_privileged("load reports") {
        return;
    }
    let work = Workdir::new("lrs");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            node("blue"),
            node("red"),
            {"meshName": "m", "virtualNodeName": "front", "spec": {
                "backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}},
            {"meshName": "m", "virtualRouterName": "vr",
             "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
            {"meshName": "m", "virtualServiceName": "color.local",
             "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "split", "spec": {"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [
                    {"virtualNode": "blue", "weight": 3}, {"virtualNode": "red", "weight": 1}]}}}},
        ]),
    );
    let interval_ms = INTERVAL.as_millis().to_string();
    let agent = Agent::start_with_env(
        &work,
        Some(&resources),
        &[("TRELLIS_LOAD_REPORT_INTERVAL_MS", &interval_ms)],
    );
    let mut vpc = Vpc::new(&work, 73);
    let front = vpc.task("front", 2);
    let blue = vpc.task("blue", 3);
    let red = vpc.task("red", 4);
    vpc.start_dns(
        &work,
        &[
            (&blue.ip, "blue.trellis.test color.local"),
            (&red.ip, "red.trellis.test"),
        ],
    );
    let spec = |n| TaskSpec {
        name: n,
        node: n,
        app: None,
    };
    let specs = [spec("blue"), spec("red"), spec("front")];
    let mut procs = start_tasks(
        &work,
        &agent,
        "m",
        &[(&blue, &specs[0]), (&red, &specs[1]), (&front, &specs[2])],
        &|_| {},
    );
    procs.push(start_app(&work, &blue, PORT, &Behaviour::ok("blue")));
    procs.push(start_app(
        &work,
        &red,
        PORT,
        &Behaviour {
            body: "red",
            status: 500,
            health_status: 200,
        },
    ));
    eventually("front reaches blue", Duration::from_secs(30), || {
        front.http_get(None, "http://color.local:9080/").map(|_| ())
    });

    // Envoy's reporter takes a cluster up at the first report period after the cluster is
    // active and never reports what went before (the warm-up request): wait until both edges
    // are reported, then one report more, and take the difference as the baseline.
    eventually("both edges reported", Duration::from_secs(10), || {
        let v = load(&agent);
        let n = v["edges"].as_array().map_or(0, |e| {
            e.iter().filter(|e| e["service"] == "color.local").count()
        });
        if n == 2 { Ok(()) } else { Err(format!("{v}")) }
    });
    let reports = agent.metric("trellis_lrs_reports_total");
    eventually("a report more", Duration::from_secs(10), || {
        if agent.metric("trellis_lrs_reports_total") >= reports + 3.0 {
            Ok(())
        } else {
            Err("none".into())
        }
    });
    let unreported = |target: &str| {
        let (rq, e) = envoy_figures(&front, target);
        (
            rq - edge_metric(&agent, "requests_total", target),
            e - edge_metric(&agent, "errors_total", target),
        )
    };
    let (blue_before, red_before) = (unreported("blue"), unreported("red"));
    let v = load(&agent);
    let blue_in_before = ingress_total(&blue, "blue") - inbound_of(&v, "blue");
    let red_in_before = ingress_total(&red, "red") - inbound_of(&v, "red");
    // Traffic: 400 requests in one curl.
    let url = "http://color.local:9080/";
    let mut args = vec!["curl", "-s", "-w", " %{http_code}\\n"];
    args.extend(std::iter::repeat_n(url, 400));
    let out = trellis_tests::run(&mut front.cmd(&args));
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        codes.lines().any(|c| c.ends_with(" 500")),
        "red answered some: {codes}"
    );
    let stopped = Instant::now();

    let (blue_rq, blue_5xx) = envoy_figures(&front, "blue");
    let (red_rq, red_5xx) = envoy_figures(&front, "red");
    assert!(
        blue_rq > 200 && red_rq > 0 && red_5xx > 0,
        "blue {blue_rq}, red {red_rq}/{red_5xx}"
    );
    assert_eq!(blue_5xx, 0);
    let blue_in = ingress_total(&blue, "blue") - blue_in_before;
    let red_in = ingress_total(&red, "red") - red_in_before;

    let deadline = INTERVAL + SLACK;
    let agreed = eventually(
        "the agent's edges equal Envoy's stats",
        deadline + SLACK,
        || {
            let got = (
                edge_metric(&agent, "requests_total", "blue"),
                edge_metric(&agent, "errors_total", "blue"),
                edge_metric(&agent, "requests_total", "red"),
                edge_metric(&agent, "errors_total", "red"),
            );
            let want = (
                blue_rq - blue_before.0,
                blue_5xx - blue_before.1,
                red_rq - red_before.0,
                red_5xx - red_before.1,
            );
            if got == want {
                Ok(stopped.elapsed())
            } else {
                let hosts = front
                    .http_get(None, &format!("http://127.0.0.1:{ADMIN}/clusters"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("cds_egress") && l.contains("::rq_"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                Err(format!(
                    "agent {got:?}, Envoy less what it reported before the traffic {want:?}; \
                     Envoy's hosts:\n{hosts}"
                ))
            }
        },
    );
    assert!(
        agreed <= deadline,
        "the figures took {agreed:?} to agree; one report interval is {INTERVAL:?} (+{SLACK:?})"
    );

    // The same figures as JSON, and each node's inbound figures against its ingress cluster.
    eventually("inbound figures equal Envoy's", deadline, || {
        let v = load(&agent);
        let edge = |target: &str| {
            v["edges"]
                .as_array()
                .and_then(|es| {
                    es.iter().find(|e| {
                        e["caller"] == "virtualNode/front"
                            && e["service"] == "color.local"
                            && e["target"] == target
                    })
                })
                .cloned()
                .unwrap_or_default()
        };
        let inbound = |n: &str| inbound_of(&v, n);
        let got = (
            edge("blue")["requests"].as_u64(),
            edge("red")["errors"].as_u64(),
            inbound("blue"),
            inbound("red"),
        );
        if got
            == (
                Some(blue_rq - blue_before.0),
                Some(red_5xx - red_before.1),
                blue_in,
                red_in,
            )
        {
            Ok(())
        } else {
            Err(format!(
                "{got:?} against Envoy's {blue_rq} {red_5xx} {blue_in} {red_in}: {v}"
            ))
        }
    });
    drop(procs);
}
