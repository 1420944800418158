//! Several agents sharing one mesh through the DynamoDB store (moto server's DynamoDB): writes
//! through any agent reach every agent and a real Envoy on another, concurrent conflicting writes
//! resolve exactly as on one agent, a late agent converges, a DynamoDB outage leaves Envoy's
//! config and traffic alone while writes fail with a retryable error, and `export`/`--resources`
//! carry a mesh between the embedded store and DynamoDB.
//!
//! With the fault-injecting stand-in in front of moto (`trellis_tests::dynamo::standin`), the same
//! holds under what DynamoDB allows and moto never shows: a load in the middle of a transaction,
//! a change log whose missed part expired, an import during an outage, a recreated table, names
//! the table cannot hold, and every transaction applied item by item in random order.

use std::fs;
use std::process::Command;
use std::sync::Barrier;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::dynamo::standin::{Fault, StandIn};
use trellis_tests::dynamo::{Moto, aws_env, create_table};
use trellis_tests::mesh::Vpc;
use trellis_tests::mesh::{Agent, AgentOpts, Task, start_proxy_envoy};
use trellis_tests::scenario::resources_file;
use trellis_tests::{Proc, Workdir, bin, can_run_privileged, check, eventually};

const NODE_SPEC: &str = r#"{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}],"serviceDiscovery":{"dns":{"hostname":"a.internal"}}}"#;

/// `n` agents on `table`, named agent1…agentN, with extra `args`.
fn agents(work: &Workdir, moto: &Moto, table: &str, n: usize, args: &[&str]) -> Vec<Agent> {
    let store = moto.store_args(table);
    (1..=n)
        .map(|i| agent_on(work, &store, &format!("agent{i}"), args))
        .collect()
}

/// An agent with the `--store …` flags `store` and extra `args`.
fn agent_on(work: &Workdir, store: &[String], name: &str, args: &[&str]) -> Agent {
    let mut all = store.to_vec();
    all.extend(args.iter().map(|a| a.to_string()));
    Agent::start_with(
        work,
        &AgentOpts {
            name,
            args: all,
            env: aws_env(),
            ..AgentOpts::default()
        },
    )
}

/// Runs one request per (agent, method, path, body) at the same moment; (status, error type).
fn race(requests: &[(&Agent, &str, String, Option<String>)]) -> Vec<(u16, Option<String>, String)> {
    let barrier = Barrier::new(requests.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(agent, method, path, body)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    agent.raw(method, path, body.as_deref())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    })
}

fn count(results: &[(u16, Option<String>, String)], status: u16) -> usize {
    results.iter().filter(|r| r.0 == status).count()
}

/// What every agent must agree on: the nodes and services of `mesh` as listed (names, versions).
fn listing(agent: &Agent, mesh: &str) -> String {
    let nodes = agent.raw(
        "GET",
        &format!("/v20190125/meshes/{mesh}/virtualNodes"),
        None,
    );
    let services = agent.raw(
        "GET",
        &format!("/v20190125/meshes/{mesh}/virtualServices"),
        None,
    );
    format!("{}\n{}", nodes.2, services.2)
}

#[test]
fn concurrent_writes_through_different_agents_resolve_exactly_as_on_one_agent() {
    three_agents_race("dynamo-race", None);
}

/// The same races with every transaction applied item by item, in random order, with pauses of
/// up to 20 ms between items that other agents' reads and polls fall into (and transactions on
/// an item not applied yet cancelled, as DynamoDB's are).
#[test]
fn concurrent_writes_resolve_exactly_as_on_one_agent_when_transactions_apply_item_by_item() {
    three_agents_race("dynamo-race-reordered", Some(Duration::from_millis(20)));
}

fn three_agents_race(name: &str, reorder: Option<Duration>) {
    let work = Workdir::new(name);
    let moto = Moto::start(&work, "moto");
    let standin = reorder.map(|pause| {
        let s = StandIn::start(&moto);
        s.reorder(pause);
        s
    });
    let endpoint = standin.as_ref().map_or(&moto.endpoint, |s| &s.endpoint);
    let created = create_table(endpoint, "mesh");
    assert!(created.contains("created"), "{created}");
    let again = create_table(endpoint, "mesh");
    assert!(again.contains("already exists"), "{again}");
    let store = trellis_tests::dynamo::store_args(endpoint, "mesh");
    let all: Vec<Agent> = (1..=3)
        .map(|i| {
            agent_on(
                &work,
                &store,
                &format!("agent{i}"),
                &["--quota-meshes", "2"],
            )
        })
        .collect();
    let (a1, a2, a3) = (&all[0], &all[1], &all[2]);
    let meshes = "/v20190125/meshes".to_string();
    assert_eq!(a1.raw("PUT", &meshes, Some(r#"{"meshName":"m"}"#)).0, 200);

    // The mesh quota spans meshes, so it spans agents: one of three new meshes fits.
    let results = race(&[(a1, "q1"), (a2, "q2"), (a3, "q3")].map(|(a, m)| {
        (
            a,
            "PUT",
            meshes.clone(),
            Some(format!(r#"{{"meshName":"{m}"}}"#)),
        )
    }));
    assert_eq!(count(&results, 200), 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|r| r.0 != 200)
            .all(|r| r.1.as_deref() == Some("LimitExceededException")),
        "{results:?}"
    );

    // The same name through three agents at once: one create, two ConflictExceptions.
    let nodes = "/v20190125/meshes/m/virtualNodes".to_string();
    for round in 0..4 {
        let body = format!(r#"{{"virtualNodeName":"n{round}","spec":{NODE_SPEC}}}"#);
        let results = race(&[a1, a2, a3].map(|a| (a, "PUT", nodes.clone(), Some(body.clone()))));
        assert_eq!(count(&results, 200), 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .filter(|r| r.0 != 200)
                .all(|r| r.0 == 409 && r.1.as_deref() == Some("ConflictException")),
            "round {round}: {results:?}"
        );
    }

    // The same clientToken through three agents: one resource, every answer the same.
    let body = format!(r#"{{"virtualNodeName":"tok","clientToken":"t-1","spec":{NODE_SPEC}}}"#);
    let results = race(&[a1, a2, a3].map(|a| (a, "PUT", nodes.clone(), Some(body.clone()))));
    assert_eq!(count(&results, 200), 3, "{results:?}");
    let uids: Vec<Value> = results
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.2).expect("JSON")["metadata"]["uid"].clone())
        .collect();
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");

    // Deleting a node while another agent makes a service that references it: never both.
    for round in 0..4 {
        let node = format!("p{round}");
        let body = format!(r#"{{"virtualNodeName":"{node}","spec":{NODE_SPEC}}}"#);
        assert_eq!(a1.raw("PUT", &nodes, Some(&body)).0, 200);
        let service = json!({"virtualServiceName": format!("s{round}.local"),
            "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}});
        let results = race(&[
            (a2, "DELETE", format!("{nodes}/{node}"), None),
            (
                a3,
                "PUT",
                "/v20190125/meshes/m/virtualServices".to_string(),
                Some(service.to_string()),
            ),
        ]);
        let (deleted, made) = (results[0].0 == 200, results[1].0 == 200);
        assert!(deleted != made, "round {round}: {results:?}");
        if deleted {
            assert_eq!(results[1].1.as_deref(), Some("BadRequestException"));
        } else {
            assert_eq!(results[0].1.as_deref(), Some("ResourceInUseException"));
        }
    }

    // Two updates of one node through two agents: both apply, one after the other.
    let u = format!("{nodes}/n0");
    let spec = |port: u16| {
        Some(
            json!({"spec": {"listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "a.internal"}}}})
            .to_string(),
        )
    };
    let results = race(&[
        (a1, "PUT", u.clone(), spec(9001)),
        (a2, "PUT", u.clone(), spec(9002)),
    ]);
    assert_eq!(count(&results, 200), 2, "{results:?}");
    let versions: Vec<i64> = results
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(&r.2).expect("JSON")["metadata"]["version"]
                .as_i64()
                .unwrap_or(0)
        })
        .collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![2, 3], "no update lost: {versions:?}");

    // The races went through DynamoDB's condition, not around it.
    let conflicts: f64 = all
        .iter()
        .map(|a| a.metric("trellis_store_write_conflicts_total"))
        .sum();
    assert!(conflicts > 0.0, "no write ever lost a race");

    // The table never lost a committed write (an agent would have had to reload backwards).
    for a in &all {
        assert!(
            !a.proc.log_text().contains("went backwards"),
            "{} saw the table lose a write",
            a.api
        );
    }

    // Every agent, and one started now, publishes the same state. No write is in flight, so the
    // agents must settle on one generation and one listing; each view is read live (a listing
    // taken from one agent before it replayed the last write would compare stale with fresh).
    let late = agent_on(&work, &store, "late", &["--quota-meshes", "2"]);
    let everyone: Vec<&Agent> = all.iter().chain([&late]).collect();
    eventually("agents agree", Duration::from_secs(20), || {
        let views: Vec<(f64, String)> = everyone
            .iter()
            .map(|a| (a.metric("trellis_store_generation"), listing(a, "m")))
            .collect();
        if views.iter().all(|v| *v == views[0]) {
            Ok(())
        } else {
            let generations: Vec<f64> = views.iter().map(|v| v.0).collect();
            Err(format!(
                "generations {generations:?}; listings differ: {views:?}"
            ))
        }
    });
    if let Some(s) = &standin {
        // The writes really went through the stand-in's item-by-item path, and met its locks.
        assert!(s.calls("TransactWriteItems") > 20, "{s:?}");
        assert!(
            s.conflicts() > 0,
            "no transaction ever met an item in flight"
        );
    }
}

#[test]
fn export_and_resources_carry_a_mesh_between_the_embedded_store_and_dynamodb() {
    let work = Workdir::new("dynamo-roundtrip");
    let moto = Moto::start(&work, "moto");
    moto.create_table("grow");
    let items = json!([
        {"meshName": "m", "spec": {"egressFilter": {"type": "ALLOW_ALL"}}},
        {"meshName": "m", "virtualNodeName": "a", "spec": serde_json::from_str::<Value>(NODE_SPEC).unwrap(),
         "tags": [{"key": "team", "value": "x"}]},
        {"meshName": "m", "virtualRouterName": "r",
         "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}},
        {"meshName": "m", "virtualRouterName": "r", "routeName": "all", "spec": {"httpRoute": {
            "match": {"prefix": "/"},
            "action": {"weightedTargets": [{"virtualNode": "a", "weight": 1}]}}}},
        {"meshName": "m", "virtualServiceName": "a.local",
         "spec": {"provider": {"virtualRouter": {"virtualRouterName": "r"}}}}
    ]);
    let single = Agent::start_with(
        &work,
        &AgentOpts {
            name: "single",
            resources: Some(&resources_file(&work, &items)),
            ..AgentOpts::default()
        },
    );
    let export = |args: &[String]| -> Value {
        let mut cmd = Command::new(bin("trellis-agent"));
        cmd.arg("export").args(args);
        for (k, v) in aws_env() {
            cmd.env(k, v);
        }
        serde_json::from_str(&check(&mut cmd)).expect("export is JSON")
    };
    let from_embedded = export(&[
        "--data-dir".into(),
        work.join("single-data").display().to_string(),
    ]);
    assert_eq!(from_embedded.as_array().map(Vec::len), Some(5));
    drop(single);

    // Grow into a cluster: the export seeds the table through one agent's --resources.
    let file = work.join("export.json");
    fs::write(&file, from_embedded.to_string()).expect("write export");
    let mut args = moto.store_args("grow");
    let shared = Agent::start_with(
        &work,
        &AgentOpts {
            name: "shared",
            resources: Some(&file),
            args: args.clone(),
            env: aws_env(),
            ..AgentOpts::default()
        },
    );
    let from_dynamodb = export(&args);
    assert_eq!(from_dynamodb, from_embedded);
    // A second agent given the same file at start changes nothing.
    let generation = shared.metric("trellis_store_generation");
    args.extend(["--resources".into(), file.display().to_string()]);
    let second = Agent::start_with(
        &work,
        &AgentOpts {
            name: "second",
            args: args.clone(),
            env: aws_env(),
            ..AgentOpts::default()
        },
    );
    // Its own view follows its own confirmed writes, so a write it made would show here.
    assert_eq!(second.metric("trellis_store_generation"), generation);
    assert_eq!(shared.metric("trellis_store_generation"), generation);

    // And back: the DynamoDB export makes the same embedded store.
    let back = work.join("back.json");
    fs::write(&back, from_dynamodb.to_string()).expect("write export");
    let _embedded = Agent::start_with(
        &work,
        &AgentOpts {
            name: "back",
            resources: Some(&back),
            ..AgentOpts::default()
        },
    );
    let again = export(&[
        "--data-dir".into(),
        work.join("back-data").display().to_string(),
    ]);
    assert_eq!(again, from_embedded);
}

const GATEWAY_PORT: u16 = 8088;
const GATEWAY_ADMIN_PORT: u16 = 9901;
const APP_PORT: u16 = 8080;

fn start_app(work: &Workdir, task: &Task, name: &str) -> Proc {
    task.start_http_app(work, APP_PORT, &format!("hello from {name}"))
}

/// One request from `client` through the gateway: (status, body).
fn call(client: &Task, gateway_ip: &str, path: &str) -> (u16, String) {
    let url = format!("http://{gateway_ip}:{GATEWAY_PORT}{path}");
    let out = check(&mut client.cmd(&["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", &url]));
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn gateway_route(
    agent: &Agent,
    name: &str,
    prefix: &str,
    service: &str,
) -> (u16, Option<String>, String) {
    let body = json!({"gatewayRouteName": name, "spec": {"httpRoute": {
        "match": {"prefix": prefix},
        "action": {"target": {"virtualService": {"virtualServiceName": service}}}}}});
    agent.raw(
        "PUT",
        "/v20190125/meshes/m/virtualGateway/gw/gatewayRoutes",
        Some(&body.to_string()),
    )
}

#[test]
fn a_write_on_one_agent_reaches_envoy_on_another_and_an_outage_keeps_config_and_traffic() {
    if !can_run_privileged("DynamoDB store with Envoy") {
        return;
    }
    let work = Workdir::new("dynamo-envoy");
    let moto = Moto::start(&work, "moto");
    moto.create_table("mesh");
    let mut all = agents(&work, &moto, "mesh", 3, &[]);
    let mut third = all.pop().expect("three agents");
    let (a1, a2, a3) = (&all[0], &all[1], &third);

    // Written through agent 1 only.
    let node = |name: &str| {
        json!({"meshName": "m", "virtualNodeName": name, "spec": {
            "listeners": [{"portMapping": {"port": APP_PORT, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
    };
    let service = |name: &str, node: &str| {
        json!({"virtualServiceName": name,
               "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
    };
    a1.appmesh(&["create-mesh", "--mesh-name", "m"]);
    for (n, s) in [("a", "a.local"), ("b", "b.local")] {
        let body = node(n);
        assert_eq!(
            a1.raw(
                "PUT",
                "/v20190125/meshes/m/virtualNodes",
                Some(&body.to_string())
            )
            .0,
            200
        );
        let body = service(s, n);
        assert_eq!(
            a1.raw(
                "PUT",
                "/v20190125/meshes/m/virtualServices",
                Some(&body.to_string())
            )
            .0,
            200
        );
    }
    let gw = json!({"virtualGatewayName": "gw", "spec": {
        "listeners": [{"portMapping": {"port": GATEWAY_PORT, "protocol": "http"}}]}});
    assert_eq!(
        a1.raw(
            "PUT",
            "/v20190125/meshes/m/virtualGateways",
            Some(&gw.to_string())
        )
        .0,
        200
    );
    assert_eq!(gateway_route(a1, "to-a", "/a/", "a.local").0, 200);

    let mut vpc = Vpc::new(&work, 41);
    let gw_task = vpc.task("gw", 2);
    let client = vpc.task("client", 3);
    let a_task = vpc.task("a", 4);
    let b_task = vpc.task("b", 5);
    let (a_ip, b_ip) = (a_task.ip.clone(), b_task.ip.clone());
    vpc.start_dns(
        &work,
        &[(&a_ip, "a.trellis.test"), (&b_ip, "b.trellis.test")],
    );
    let _apps = [
        start_app(&work, &a_task, "a"),
        start_app(&work, &b_task, "b"),
    ];

    // The gateway's Envoy talks to agent 3, which never saw a request.
    eventually(
        "agent 3 has the gateway",
        Duration::from_secs(20),
        || match a3
            .raw("GET", "/v20190125/meshes/m/virtualGateways/gw", None)
            .0
        {
            200 => Ok(()),
            s => Err(format!("status {s}")),
        },
    );
    let _envoy = start_proxy_envoy(
        &work,
        &gw_task,
        a3,
        "mesh/m/virtualGateway/gw",
        GATEWAY_ADMIN_PORT,
    );
    let through = |path: &str| call(&client, &gw_task.ip, path);
    eventually(
        "the gateway reaches a",
        Duration::from_secs(20),
        || match through("/a/x") {
            (200, body) if body == "hello from a" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // A new route through agent 2 reaches agent 3's Envoy.
    assert_eq!(gateway_route(a2, "to-b", "/b/", "b.local").0, 200);
    eventually(
        "the route written on agent 2 works through agent 3",
        Duration::from_secs(20),
        || match through("/b/x") {
            (200, body) if body == "hello from b" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // DynamoDB stops answering.
    let updates =
        |what: &str| gw_task.envoy_stat(GATEWAY_ADMIN_PORT, &format!("{what}.update_success"));
    let before = (
        updates("listener_manager.lds"),
        updates("cluster_manager.cds"),
    );
    moto.pause();
    let refused = a3.raw(
        "DELETE",
        "/v20190125/meshes/m/virtualGateway/gw/gatewayRoutes/to-a",
        None,
    );
    assert_eq!(refused.0, 503, "{refused:?}");
    assert_eq!(
        refused.1.as_deref(),
        Some("ServiceUnavailableException"),
        "{refused:?}"
    );
    assert!(
        refused.2.contains("DynamoDB table mesh is unavailable"),
        "{refused:?}"
    );
    // Give the pollers time to fail a few times, then check nothing moved.
    eventually(
        "agents notice the outage",
        Duration::from_secs(30),
        || match all
            .iter()
            .chain([a3])
            .all(|a| a.metric("trellis_store_dynamodb_up") == 0.0)
        {
            true => Ok(()),
            false => Err("still up".into()),
        },
    );
    assert_eq!(through("/a/x"), (200, "hello from a".to_string()));
    assert_eq!(through("/b/x"), (200, "hello from b".to_string()));
    assert_eq!(
        a1.raw(
            "GET",
            "/v20190125/meshes/m/virtualGateway/gw/gatewayRoutes/to-a",
            None
        )
        .0,
        200
    );
    assert_eq!(
        (
            updates("listener_manager.lds"),
            updates("cluster_manager.cds")
        ),
        before
    );

    // An agent restarted during the outage serves the last good state it kept on disk, and the
    // Envoy that lost it reconnects to the same configuration.
    third = third.restart(&work);
    let a3 = &third;
    assert!(
        a3.proc
            .log_text()
            .contains("serving the last good state kept on disk"),
        "{}",
        a3.proc.log_text()
    );
    eventually(
        "Envoy reconnected",
        Duration::from_secs(30),
        || match gw_task.envoy_stat(GATEWAY_ADMIN_PORT, "control_plane.connected_state") {
            1 => Ok(()),
            s => Err(format!("connected_state {s}")),
        },
    );
    assert_eq!(through("/a/x"), (200, "hello from a".to_string()));
    assert_eq!(through("/b/x"), (200, "hello from b".to_string()));

    // It answers again: agents recover by themselves and writes go through.
    moto.resume();
    // The refused request may still land once the table answers (its outcome was unknown, as
    // with any timeout); retrying it is what the 503 asks for, and the retry is safe.
    eventually(
        "a write succeeds again",
        Duration::from_secs(60),
        || match a3.raw(
            "DELETE",
            "/v20190125/meshes/m/virtualGateway/gw/gatewayRoutes/to-a",
            None,
        ) {
            (200, ..) => Ok(()),
            (404, Some(t), _) if t == "NotFoundException" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    eventually(
        "the deletion reaches Envoy",
        Duration::from_secs(20),
        || match through("/a/x") {
            (404, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(through("/b/x"), (200, "hello from b".to_string()));
    eventually("agents in step again", Duration::from_secs(30), || {
        let g: Vec<f64> = all
            .iter()
            .chain([a3])
            .map(|a| a.metric("trellis_store_generation"))
            .collect();
        let up = all
            .iter()
            .chain([a3])
            .all(|a| a.metric("trellis_store_dynamodb_up") == 1.0);
        if up && g.iter().all(|x| *x == g[0]) {
            Ok(())
        } else {
            Err(format!("generations {g:?}, up {up}"))
        }
    });
}
// === Under DynamoDB's real guarantees (the stand-in) ===

/// A raw request that gives up after `secs` (status 0 then): a store that loops shows as a
/// timeout instead of a hung test.
fn raw_within(
    agent: &Agent,
    secs: u32,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        &secs.to_string(),
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ])
    .arg(format!("{}{path}", agent.api));
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = String::from_utf8_lossy(&trellis_tests::run(&mut cmd).stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// A name as one URL path segment.
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn create_node(agent: &Agent, mesh: &str, node: &str) -> (u16, Option<String>, String) {
    let body = format!(r#"{{"virtualNodeName":"{node}","spec":{NODE_SPEC}}}"#);
    agent.raw(
        "PUT",
        &format!("/v20190125/meshes/{}/virtualNodes", segment(mesh)),
        Some(&body),
    )
}

/// The tag keys of `arn` as `agent` lists them.
fn tag_keys(agent: &Agent, arn: &str) -> Vec<String> {
    let (status, _, body) = agent.raw(
        "GET",
        &format!("/v20190125/tags?resourceArn={}", segment(arn)),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let mut keys: Vec<String> = v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str().map(String::from))
        .collect();
    keys.sort();
    keys
}

fn tag(agent: &Agent, arn: &str, key: &str) -> u16 {
    let body = json!({"tags": [{"key": key, "value": "v"}]}).to_string();
    agent
        .raw(
            "PUT",
            &format!("/v20190125/tag?resourceArn={}", segment(arn)),
            Some(&body),
        )
        .0
}

/// Waits until every agent publishes the same generation and the same listing of `mesh`.
fn agree(what: &str, agents: &[&Agent], mesh: &str) {
    eventually(what, Duration::from_secs(30), || {
        let views: Vec<(f64, String)> = agents
            .iter()
            .map(|a| (a.metric("trellis_store_generation"), listing(a, mesh)))
            .collect();
        if views.iter().all(|v| *v == views[0]) {
            Ok(())
        } else {
            Err(format!("views differ: {views:?}"))
        }
    });
}

/// Sequence 1 of issue 21: agent A commits generation G (a tag on node x) and answers; agent B
/// loads the table while x's item is not yet applied (DynamoDB's Query is only read-committed
/// against a transaction). B must still hold the tag: otherwise B serves and caches G without
/// it, and B's next write of x drops it for every agent (and a create B's load missed succeeds
/// instead of a ConflictException).
#[test]
fn an_agent_that_loads_while_a_transaction_is_half_applied_still_has_every_write_of_its_generation()
{
    let work = Workdir::new("dynamo-halfway");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let store = standin.store_args("mesh");
    let a = agent_on(&work, &store, "a", &[]);
    a.appmesh(&["create-mesh", "--mesh-name", "m"]);
    let created = create_node(&a, "m", "x");
    assert_eq!(created.0, 200, "{created:?}");
    let arn = serde_json::from_str::<Value>(&created.2).expect("JSON")["metadata"]["arn"]
        .as_str()
        .expect("arn")
        .to_string();

    // T(G): tag k on x, whose resource item the stand-in applies only when released.
    standin.hold(|pk, sk| pk == "resource" && sk == "mesh/m/virtualNode/x");
    assert_eq!(tag(&a, &arn, "k"), 200);
    assert_eq!(standin.held(), 1, "the transaction's item is held back");
    let b = agent_on(&work, &store, "b", &[]);
    standin.release();
    eventually(
        "x's item applied",
        Duration::from_secs(10),
        || match standin.held() {
            0 => Ok(()),
            n => Err(format!("{n} held")),
        },
    );
    assert_eq!(
        tag_keys(&b, &arn),
        ["k"],
        "B's load has all of generation G"
    );
    // A write of x through B keeps k, on every agent.
    assert_eq!(tag(&b, &arn, "j"), 200);
    agree("A and B agree", &[&a, &b], "m");
    assert_eq!(tag_keys(&a, &arn), ["j", "k"]);
    assert_eq!(tag_keys(&b, &arn), ["j", "k"]);

    // A create whose item a load missed: the same name through the new agent is a conflict.
    standin.hold(|pk, sk| pk == "resource" && sk == "mesh/m/virtualNode/y");
    assert_eq!(create_node(&a, "m", "y").0, 200);
    let c = agent_on(&work, &store, "c", &[]);
    standin.release();
    let again = create_node(&c, "m", "y");
    assert_eq!(
        (again.0, again.1.as_deref()),
        (409, Some("ConflictException")),
        "{again:?}"
    );
    drop((b, c));

    // Only the generation applied: the change item and z's item are still on their way, so a
    // loading agent cannot use the log yet. It waits for them (its serializable reads of the
    // missing change item are cancelled meanwhile) and then has z.
    standin.hold(|pk, sk| pk == "change" || sk == "mesh/m/virtualNode/z");
    assert_eq!(create_node(&a, "m", "z").0, 200);
    let conflicts = standin.conflicts();
    let d = std::thread::scope(|s| {
        let starting = s.spawn(|| agent_on(&work, &store, "d", &[]));
        eventually(
            "the loading agent meets the transaction in flight",
            Duration::from_secs(30),
            || match standin.conflicts() > conflicts {
                true => Ok(()),
                false => Err("no conflict yet".to_string()),
            },
        );
        standin.release();
        starting.join().expect("agent d starts")
    });
    assert_eq!(
        d.raw("GET", "/v20190125/meshes/m/virtualNodes/z", None).0,
        200,
        "the load includes the generation's create"
    );
    agree("A and D agree", &[&a, &d], "m");
}

/// What makes a full load cheap: a write commits only once the write before it is applied in
/// full (it checks that write's items), so a load need only lay over its query the writes that
/// committed while it ran. Without that, agent B's write could commit while A's is still being
/// applied, and an agent loading just then would miss A's change for good.
#[test]
fn a_write_commits_only_once_the_write_before_it_is_applied_in_full() {
    let work = Workdir::new("dynamo-in-order");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let store = standin.store_args("mesh");
    let a = agent_on(&work, &store, "a", &[]);
    let b = agent_on(&work, &store, "b", &[]);
    a.appmesh(&["create-mesh", "--mesh-name", "m"]);
    let created = create_node(&a, "m", "x");
    assert_eq!(created.0, 200, "{created:?}");
    let arn = serde_json::from_str::<Value>(&created.2).expect("JSON")["metadata"]["arn"]
        .as_str()
        .expect("arn")
        .to_string();
    agree("B follows A", &[&a, &b], "m");

    // A's tag on x is committed; x's item is not applied yet.
    standin.hold(|pk, sk| pk == "resource" && sk == "mesh/m/virtualNode/x");
    assert_eq!(tag(&a, &arn, "k"), 200);
    agree("B has A's write", &[&a, &b], "m");
    let conflicts = standin.conflicts();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // B writes another node meanwhile: it must wait for x.
        let writing = s.spawn(|| {
            let out = raw_within(
                &b,
                60,
                "PUT",
                "/v20190125/meshes/m/virtualNodes",
                Some(&format!(r#"{{"virtualNodeName":"w","spec":{NODE_SPEC}}}"#)),
            );
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            out
        });
        eventually("B's write waits or ends", Duration::from_secs(30), || {
            if standin.conflicts() > conflicts || done.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err("neither".to_string())
            }
        });
        // An agent loading now sees x as it was, and lays A's change over it (had B's write
        // committed ahead of x, the load would lay only B's).
        let c = agent_on(&work, &store, "c", &[]);
        assert_eq!(tag_keys(&c, &arn), ["k"], "C's load has A's write");
        standin.release();
        let (status, body) = writing.join().expect("B's write");
        // Retried within its bound, or a retryable answer.
        assert!(status == 200 || status == 503, "{status} {body}");
        agree("all agree", &[&a, &b, &c], "m");
        assert_eq!(tag_keys(&c, &arn), ["k"]);
    });
}

/// Sequence 2 of issue 21: an agent stopped at G over a quiet weekend (every change after G has
/// expired from the log) boots from its cache during a short outage. When DynamoDB answers, it
/// must notice the log ends before the table's generation and reload, rather than serve G
/// forever, and its writes (rejected ones too) must answer promptly rather than loop.
#[test]
fn an_agent_whose_missed_changes_expired_reloads_instead_of_serving_stale_state() {
    let work = Workdir::new("dynamo-expired");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let store = standin.store_args("mesh");
    let a = agent_on(&work, &store, "a", &[]);
    let c = agent_on(&work, &store, "c", &[]);
    a.appmesh(&["create-mesh", "--mesh-name", "m"]);
    assert_eq!(create_node(&a, "m", "n1").0, 200);
    agree("C has n1", &[&a, &c], "m");
    drop(c);
    for n in ["n2", "n3"] {
        assert_eq!(create_node(&a, "m", n).0, 200);
    }
    assert!(standin.expire_changes("mesh") >= 2);

    standin.fail(Fault::Outage);
    let c = agent_on(&work, &store, "c", &[]);
    assert!(
        c.proc
            .log_text()
            .contains("serving the last good state kept on disk"),
        "{}",
        c.proc.log_text()
    );
    standin.heal();
    // A rejected write is answered from the newest state, promptly.
    let (status, body) = raw_within(
        &c,
        30,
        "PUT",
        "/v20190125/meshes/m/virtualNodes",
        Some(&format!(r#"{{"virtualNodeName":"n1","spec":{NODE_SPEC}}}"#)),
    );
    assert_eq!(status, 409, "{body}");
    agree("C reloaded past the gap", &[&a, &c], "m");
    assert_eq!(
        c.raw("GET", "/v20190125/meshes/m/virtualNodes/n3", None).0,
        200
    );
    let (status, body) = raw_within(
        &c,
        30,
        "PUT",
        "/v20190125/meshes/m/virtualNodes",
        Some(&format!(r#"{{"virtualNodeName":"n4","spec":{NODE_SPEC}}}"#)),
    );
    assert_eq!(status, 200, "{body}");
    agree("A has C's write", &[&a, &c], "m");
}

/// Sequence 3 of issue 21: an agent started with `--resources` during an outage serves its last
/// good state and applies the file once DynamoDB answers, instead of exiting (ECS would restart
/// it in a loop).
#[test]
fn an_import_that_cannot_be_confirmed_waits_while_the_agent_serves_its_last_good_state() {
    let work = Workdir::new("dynamo-import-outage");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let mut items = vec![
        json!({"meshName": "m"}),
        json!({"meshName": "m", "virtualNodeName": "a",
            "spec": serde_json::from_str::<Value>(NODE_SPEC).unwrap()}),
    ];
    let file = resources_file(&work, &Value::Array(items.clone()));
    let opts = |name| AgentOpts {
        name,
        resources: Some(&file),
        args: standin.store_args("mesh"),
        env: aws_env(),
        ..AgentOpts::default()
    };
    let agent = Agent::start_with(&work, &opts("s"));
    assert_eq!(
        agent
            .raw("GET", "/v20190125/meshes/m/virtualNodes/a", None)
            .0,
        200
    );
    drop(agent);
    // While the agent is down the file gains a node.
    items.push(json!({"meshName": "m", "virtualNodeName": "b",
        "spec": serde_json::from_str::<Value>(NODE_SPEC).unwrap()}));
    fs::write(&file, Value::Array(items).to_string()).expect("write resources");

    standin.fail(Fault::Outage);
    let mut agent = Agent::start_with(&work, &opts("s"));
    assert_eq!(
        agent
            .raw("GET", "/v20190125/meshes/m/virtualNodes/a", None)
            .0,
        200,
        "serves its last good state"
    );
    assert_eq!(
        agent
            .raw("GET", "/v20190125/meshes/m/virtualNodes/b", None)
            .0,
        404,
        "the import waits for DynamoDB"
    );
    standin.heal();
    eventually("the import lands", Duration::from_secs(60), || match agent
        .raw("GET", "/v20190125/meshes/m/virtualNodes/b", None)
        .0
    {
        200 => Ok(()),
        s => Err(format!("status {s}")),
    });
    assert!(agent.proc.is_running(), "{}", agent.proc.log_text());
}

/// Sequence 4 of issue 21: the table is deleted and created again, and reseeded to the very
/// generation an agent (away meanwhile) had. The agent must reload because the table's id
/// changed, not replay the new table's changes onto the old state or keep it.
#[test]
fn a_recreated_table_is_noticed_by_its_id_whatever_its_generation() {
    let work = Workdir::new("dynamo-recreated");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let store = standin.store_args("mesh");
    let old = agent_on(&work, &store, "old", &[]);
    old.appmesh(&["create-mesh", "--mesh-name", "m"]);
    for n in ["n1", "n2"] {
        assert_eq!(create_node(&old, "m", n).0, 200);
    }
    let generation = old.metric("trellis_store_generation");
    drop(old);

    standin.delete_table("mesh");
    create_table(&standin.endpoint, "mesh");
    let new = agent_on(&work, &store, "new", &[]);
    new.appmesh(&["create-mesh", "--mesh-name", "m"]);
    for n in ["x1", "x2"] {
        assert_eq!(create_node(&new, "m", n).0, 200);
    }
    assert_eq!(new.metric("trellis_store_generation"), generation);

    // The old agent comes back from its cache (the table does not answer at first).
    standin.fail(Fault::Outage);
    let old = agent_on(&work, &store, "old", &[]);
    assert_eq!(
        old.raw("GET", "/v20190125/meshes/m/virtualNodes/n1", None)
            .0,
        200,
        "serves its cache"
    );
    standin.heal();
    agree("the old agent reloads the new table", &[&old, &new], "m");
    assert_eq!(
        old.raw("GET", "/v20190125/meshes/m/virtualNodes/n1", None)
            .0,
        404
    );
    assert_eq!(create_node(&new, "m", "x3").0, 200);
    agree("and follows it", &[&old, &new], "m");
}

/// Sequence 5 of issue 21: names whose item key is over DynamoDB's 1,024-byte sort key limit
/// are a 400 naming the field (they can never be stored), not a 503 "retry"; and an error
/// DynamoDB gives for a request that can never succeed is not answered as retryable.
#[test]
fn what_the_table_cannot_hold_is_a_400_naming_the_field_and_permanent_errors_are_not_retryable() {
    let work = Workdir::new("dynamo-limits");
    let moto = Moto::start(&work, "moto");
    let standin = StandIn::start(&moto);
    create_table(&standin.endpoint, "mesh");
    let a = agent_on(&work, &standin.store_args("mesh"), "a", &[]);
    // 255 characters of 2 bytes each: a mesh fits (515 bytes with its prefix)…
    let wide = "é".repeat(255);
    let made = a.raw(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({ "meshName": wide }).to_string()),
    );
    assert_eq!(made.0, 200, "{made:?}");
    let generation = a.metric("trellis_store_generation");
    // …but not with a node of such a name (1,038 bytes).
    let refused = create_node(&a, &wide, &wide);
    assert_eq!(
        (refused.0, refused.1.as_deref()),
        (400, Some("BadRequestException")),
        "{refused:?}"
    );
    assert!(refused.2.contains("virtualNodeName"), "{refused:?}");
    assert!(refused.2.contains("1024"), "{refused:?}");
    // 255 characters of 4 bytes: not even the mesh (1,025 bytes).
    let refused = a.raw(
        "PUT",
        "/v20190125/meshes",
        Some(&json!({ "meshName": "𝄞".repeat(255) }).to_string()),
    );
    assert_eq!(
        (refused.0, refused.1.as_deref()),
        (400, Some("BadRequestException")),
        "{refused:?}"
    );
    assert!(refused.2.contains("meshName"), "{refused:?}");
    assert_eq!(
        a.metric("trellis_store_generation"),
        generation,
        "nothing written"
    );

    // DynamoDB refusing the request itself: an error, but not "retry".
    standin.fail(Fault::Error {
        op: "TransactWriteItems".into(),
        status: 400,
        code: "ValidationException".into(),
        message: "Item size has exceeded the maximum allowed size".into(),
    });
    let failed = create_node(&a, &wide, "n");
    assert_eq!(
        (failed.0, failed.1.as_deref()),
        (500, Some("InternalServerErrorException")),
        "{failed:?}"
    );
    assert!(failed.2.contains("ValidationException"), "{failed:?}");
    standin.heal();
    assert_eq!(create_node(&a, &wide, "n").0, 200);
}
