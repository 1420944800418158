//! Cloud Map discovery end to end: instances registered in moto (with the real AWS CLI) reach real
//! Envoys as EDS endpoints, filtered by attributes and health, shared by one poller per service;
//! outages and throttling keep the last endpoints and the traffic.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::cloudmap::{AWS_ENV, FaultProxy, Moto};
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Workdir, can_run_privileged, check, eventually, free_port};

const ADMIN: u16 = 9901;
const BACK_CLUSTER: &str = "cds_egress_m_back-vn_http_8080";
const BLUE_CLUSTER: &str = "cds_egress_m_blue-vn_http_8080";
const WAIT: Duration = Duration::from_secs(30);

fn cloud_map_node(name: &str, attributes: Value) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
        "serviceDiscovery": {"awsCloudMap": {
            "namespaceName": "ns", "serviceName": "back", "attributes": attributes}}}})
}

fn caller(name: &str, service: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "backends": [{"virtualService": {"virtualServiceName": service}}]}})
}

fn service(name: &str, node: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": name,
        "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
}

/// The agent, pointed at `endpoint` for Cloud Map, polling fast so tests stay short.
fn agent(work: &Workdir, resources: &Value, endpoint: &str) -> Agent {
    let file = resources_file(work, resources);
    let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    env.extend([
        ("TRELLIS_CLOUDMAP_ENDPOINT", endpoint),
        ("TRELLIS_CLOUDMAP_POLL_INTERVAL_MS", "200"),
        ("TRELLIS_CLOUDMAP_REFRESH_INTERVAL_MS", "1000"),
        ("TRELLIS_CLOUDMAP_BACKOFF_MAX_MS", "2000"),
        ("TRELLIS_CLOUDMAP_LINGER_MS", "2000"),
    ]);
    Agent::start_with_env(work, Some(&file), &env)
}

/// The `ip:port` of every host Envoy has in `cluster` (admin `/clusters`).
fn hosts(task: &Task, cluster: &str) -> BTreeSet<String> {
    let text = task
        .http_get(None, &format!("http://127.0.0.1:{ADMIN}/clusters"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{cluster}::")))
        .filter_map(|rest| {
            rest.split_once("::health_flags::")
                .map(|(h, _)| h.to_string())
        })
        .collect()
}

fn expect_hosts(task: &Task, cluster: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|ip| format!("{ip}:8080")).collect();
    eventually(
        &format!("{cluster} in {} has {want:?}", task.ns),
        WAIT,
        || {
            let got = hosts(task, cluster);
            if got == want {
                Ok(())
            } else {
                Err(format!("has {got:?}"))
            }
        },
    );
}

/// The agent's metric `series` (name with labels, exactly as rendered); 0 when absent.
fn metric(agent: &Agent, series: &str) -> f64 {
    let text = check(Command::new("curl").args(["-s", &format!("{}/metrics", agent.api)]));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The bodies of `n` requests to `url` from the task's app side (through its Envoy).
fn answers(task: &Task, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            task.http_get(None, url)
                .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        })
        .collect()
}

#[test]
fn cloud_map_instances_reach_envoy_by_attributes_and_health_and_leave_when_deregistered() {
    if !can_run_privileged("cloud map discovery") {
        return;
    }
    let work = Workdir::new("cloudmap");
    let moto = Moto::start(&work, free_port());
    let svc = moto.create_service("ns", "back");

    let mut vpc = Vpc::new(&work, 31);
    let front_a = vpc.task("fa", 2);
    let front_b = vpc.task("fb", 3);
    let front_blue = vpc.task("fblue", 4);
    let back1 = vpc.task("b1", 5);
    let back2 = vpc.task("b2", 6);
    // The app resolves the service name to any address; Envoy routes by Host.
    vpc.start_dns(&work, &[(&back1.ip, "back.local blue.local")]);
    let _apps = [
        back1.start_http_app(&work, 8080, "one"),
        back2.start_http_app(&work, 8080, "two"),
    ];
    moto.register(
        &svc,
        "i-1",
        &[("AWS_INSTANCE_IPV4", &back1.ip), ("stage", "blue")],
    );
    moto.register(
        &svc,
        "i-2",
        &[("AWS_INSTANCE_IPV4", &back2.ip), ("stage", "green")],
    );

    let agent = agent(
        &work,
        &json!([
            {"meshName": "m"},
            cloud_map_node("back-vn", json!([])),
            cloud_map_node("blue-vn", json!([{"key": "stage", "value": "blue"}])),
            service("back.local", "back-vn"),
            service("blue.local", "blue-vn"),
            caller("front-a", "back.local"),
            caller("front-b", "back.local"),
            caller("front-blue", "blue.local"),
        ]),
        &moto.url,
    );
    let specs = [
        TaskSpec {
            name: "fa",
            node: "front-a",
            app: None,
        },
        TaskSpec {
            name: "fb",
            node: "front-b",
            app: None,
        },
        TaskSpec {
            name: "fblue",
            node: "front-blue",
            app: None,
        },
    ];
    let _procs = start_tasks(
        &work,
        &agent,
        "m",
        &[
            (&front_a, &specs[0]),
            (&front_b, &specs[1]),
            (&front_blue, &specs[2]),
        ],
        &|_| {},
    );

    // Every registered instance, on the listener's port; the attribute filter keeps blue only.
    expect_hosts(&front_a, BACK_CLUSTER, &[&back1.ip, &back2.ip]);
    expect_hosts(&front_b, BACK_CLUSTER, &[&back1.ip, &back2.ip]);
    expect_hosts(&front_blue, BLUE_CLUSTER, &[&back1.ip]);
    // Two Envoys of different nodes share ns/back: one poller for it, one for the blue filter.
    assert_eq!(metric(&agent, "trellis_cloudmap_pollers"), 2.0);
    assert_eq!(
        metric(&agent, "trellis_cloudmap_pollers_started_total"),
        2.0
    );
    // Real traffic reaches both instances through front-a's Envoy.
    let seen: BTreeSet<String> = answers(&front_a, "http://back.local:8080/", 20)
        .into_iter()
        .collect();
    assert_eq!(seen, BTreeSet::from(["one".to_string(), "two".to_string()]));
    assert_eq!(
        answers(&front_blue, "http://blue.local:8080/", 5),
        vec!["one"; 5]
    );

    // Health does not move the revision; the refresh still sees it (filter HEALTHY).
    moto.set_health(&svc, "i-2", "UNHEALTHY");
    expect_hosts(&front_a, BACK_CLUSTER, &[&back1.ip]);
    moto.set_health(&svc, "i-2", "HEALTHY");
    expect_hosts(&front_a, BACK_CLUSTER, &[&back1.ip, &back2.ip]);

    moto.deregister(&svc, "i-2");
    expect_hosts(&front_a, BACK_CLUSTER, &[&back1.ip]);
    expect_hosts(&front_b, BACK_CLUSTER, &[&back1.ip]);
    assert_eq!(
        answers(&front_a, "http://back.local:8080/", 5),
        vec!["one"; 5]
    );
    moto.register(
        &svc,
        "i-3",
        &[("AWS_INSTANCE_IPV4", &back2.ip), ("stage", "blue")],
    );
    expect_hosts(&front_blue, BLUE_CLUSTER, &[&back1.ip, &back2.ip]);
    assert_eq!(
        metric(
            &agent,
            "trellis_cloudmap_failures_total{op=\"DiscoverInstances\",reason=\"other\"}"
        ),
        0.0
    );
}

#[test]
fn cloud_map_outages_and_throttling_keep_the_last_endpoints_and_the_traffic() {
    if !can_run_privileged("cloud map faults") {
        return;
    }
    let work = Workdir::new("cloudmap-faults");
    let mut moto = Moto::start(&work, free_port());
    let proxy = FaultProxy::start(moto.port);
    let svc = moto.create_service("ns", "back");

    let mut vpc = Vpc::new(&work, 32);
    let front = vpc.task("front", 2);
    let back1 = vpc.task("b1", 5);
    let back2 = vpc.task("b2", 6);
    vpc.start_dns(&work, &[(&back1.ip, "back.local")]);
    let _apps = [
        back1.start_http_app(&work, 8080, "one"),
        back2.start_http_app(&work, 8080, "two"),
    ];
    moto.register(&svc, "i-1", &[("AWS_INSTANCE_IPV4", &back1.ip)]);
    let agent = agent(
        &work,
        &json!([
            {"meshName": "m"},
            cloud_map_node("back-vn", json!([])),
            service("back.local", "back-vn"),
            caller("front", "back.local"),
        ]),
        &proxy.url,
    );
    let spec = TaskSpec {
        name: "front",
        node: "front",
        app: None,
    };
    let _procs = start_tasks(&work, &agent, "m", &[(&front, &spec)], &|_| {});
    expect_hosts(&front, BACK_CLUSTER, &[&back1.ip]);
    assert_eq!(
        answers(&front, "http://back.local:8080/", 3),
        vec!["one"; 3]
    );

    // Throttled: backs off, keeps the endpoints, traffic flows; a change made meanwhile waits.
    proxy.set_throttling(true);
    let throttled =
        "trellis_cloudmap_failures_total{op=\"DiscoverInstancesRevision\",reason=\"throttled\"}";
    eventually("throttling counted", WAIT, || {
        (metric(&agent, throttled) >= 2.0)
            .then_some(())
            .ok_or("not yet".to_string())
    });
    moto.register(&svc, "i-2", &[("AWS_INSTANCE_IPV4", &back2.ip)]);
    let before = proxy.throttled();
    std::thread::sleep(Duration::from_secs(6));
    let during = proxy.throttled() - before;
    // At a 200 ms poll, 6 s is ~30 calls; backing off to 2 s allows a handful.
    assert!(
        during <= 12,
        "{during} calls in 6 s while throttled: no backoff"
    );
    assert_eq!(
        hosts(&front, BACK_CLUSTER).len(),
        1,
        "endpoints kept while throttled"
    );
    assert_eq!(
        answers(&front, "http://back.local:8080/", 3),
        vec!["one"; 3]
    );
    assert!(
        agent
            .proc
            .log_text()
            .contains("Cloud Map is throttling this account"),
        "a log line with the operator hint"
    );
    proxy.set_throttling(false);
    expect_hosts(&front, BACK_CLUSTER, &[&back1.ip, &back2.ip]);

    // Cloud Map gone: the endpoints and the traffic stay.
    moto.stop();
    let unreachable =
        "trellis_cloudmap_failures_total{op=\"DiscoverInstancesRevision\",reason=\"unreachable\"}";
    eventually("outage counted", WAIT, || {
        (metric(&agent, unreachable) >= 2.0)
            .then_some(())
            .ok_or("not yet".to_string())
    });
    std::thread::sleep(Duration::from_secs(3));
    expect_hosts(&front, BACK_CLUSTER, &[&back1.ip, &back2.ip]);
    let got: BTreeSet<String> = answers(&front, "http://back.local:8080/", 10)
        .into_iter()
        .collect();
    assert_eq!(got, BTreeSet::from(["one".to_string(), "two".to_string()]));

    // Back (moto restarts empty): what is registered now is what Envoy gets.
    moto.restart();
    let svc = moto.create_service("ns", "back");
    moto.register(&svc, "i-9", &[("AWS_INSTANCE_IPV4", &back2.ip)]);
    expect_hosts(&front, BACK_CLUSTER, &[&back2.ip]);
    assert_eq!(
        answers(&front, "http://back.local:8080/", 3),
        vec!["two"; 3]
    );
}
