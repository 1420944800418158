//! Twenty real Envoys of one virtual node on one agent converge on a route change.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::mesh::{Agent, Vpc, start_proxy_envoy};
use trellis_tests::scenario::resources_file;
use trellis_tests::{Workdir, can_run_privileged, check, eventually, run};

const ENVOYS: u8 = 20;
const ADMIN: u16 = 9901;

#[test]
fn twenty_envoys_of_one_node_converge_on_a_route_change() {
    if !can_run_privileged("ADS fan-out") {
        return;
    }
    let work = Workdir::new("fanout");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            {"meshName": "m", "virtualNodeName": "backend", "spec": {
                "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "backend.internal"}}}},
            {"meshName": "m", "virtualRouterName": "r", "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}},
            {"meshName": "m", "virtualRouterName": "r", "routeName": "rt", "spec": {"httpRoute": {
                "match": {"prefix": "/v0"}, "action": {"weightedTargets": [{"virtualNode": "backend", "weight": 1}]}}}},
            {"meshName": "m", "virtualServiceName": "svc.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "r"}}}},
            {"meshName": "m", "virtualNodeName": "client", "spec": {"backends": [{"virtualService": {"virtualServiceName": "svc.local"}}]}}
        ]),
    );
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 41);
    let tasks: Vec<_> = (0..ENVOYS)
        .map(|i| vpc.task(&format!("e{i}"), 2 + i))
        .collect();
    let _envoys: Vec<_> = tasks
        .iter()
        .map(|t| start_proxy_envoy(&work, t, &agent, "mesh/m/virtualNode/client", ADMIN))
        .collect();

    let has = |t: &trellis_tests::mesh::Task, needle: &str| {
        let out = run(&mut t.cmd(&[
            "curl",
            "-s",
            &format!("http://127.0.0.1:{ADMIN}/config_dump?resource=dynamic_route_configs"),
        ]));
        String::from_utf8_lossy(&out.stdout).contains(needle)
    };
    assert!(
        tasks.iter().all(|t| has(t, "/v0")),
        "every Envoy starts with the first route"
    );

    let start = Instant::now();
    check(Command::new("curl").args([
        "-sf", "-X", "PUT", "-H", "content-type: application/json",
        &format!("{}/v20190125/meshes/m/virtualRouter/r/routes/rt", agent.api),
        "--data-binary",
        r#"{"spec":{"httpRoute":{"match":{"prefix":"/v1-changed"},"action":{"weightedTargets":[{"virtualNode":"backend","weight":1}]}}}}"#,
    ]));
    // How fast is the ADS bench's business; here every Envoy must get there (a deadline that
    // only a broken fan-out misses, not a timing assert).
    let mut pending: Vec<usize> = (0..tasks.len()).collect();
    eventually(
        "every Envoy on the new route",
        Duration::from_secs(60),
        || {
            pending.retain(|i| !has(&tasks[*i], "/v1-changed"));
            if pending.is_empty() {
                Ok(())
            } else {
                Err(format!("{} Envoys still on the old route", pending.len()))
            }
        },
    );
    eprintln!(
        "{ENVOYS} Envoys converged {:?} after the API write (polling included)",
        start.elapsed()
    );

    let debug: serde_json::Value = serde_json::from_str(&check(
        Command::new("curl").args(["-sf", &format!("{}/debug/xds", agent.api)]),
    ))
    .unwrap();
    let streams = debug.as_object().unwrap();
    assert_eq!(streams.len(), ENVOYS as usize);
    for s in streams.values() {
        let route = &s["types"]["RouteConfiguration"];
        assert_eq!(route["sent_version"], route["acked_version"], "{s}");
        assert!(route["last_nack"].is_null());
    }
}
