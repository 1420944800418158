//! Virtual routers and routes proven on real Envoy traffic: weighted splits and header routing.

use std::time::Duration;

use serde_json::json;
use trellis_tests::mesh::{Agent, Vpc};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Workdir, can_run_privileged, eventually};

const URL: &str = "http://color.local:9080/";

fn color_node(name: &str) -> serde_json::Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
}

/// Counts the answers of `n` requests made by one curl (URL globbing keeps it one process).
fn tally(task: &trellis_tests::mesh::Task, n: usize, header: Option<&str>) -> (usize, usize) {
    let glob = format!("{URL}?i=[1-{n}]");
    let mut args = vec!["curl", "-sS", "-m", "60", "-w", "\n", &glob];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    let out = trellis_tests::check(&mut task.cmd(&args));
    let blue = out.lines().filter(|l| *l == "blue").count();
    let red = out.lines().filter(|l| *l == "red").count();
    assert_eq!(
        blue + red,
        n,
        "every request answered by blue or red:\n{out}"
    );
    (blue, red)
}

#[test]
fn weighted_routes_split_traffic_80_20_and_a_header_route_takes_precedence() {
    if !can_run_privileged("weighted routes") {
        return;
    }
    let work = Workdir::new("routes");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            color_node("blue"),
            color_node("red"),
            {"meshName": "m", "virtualNodeName": "front", "spec": {
                "backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}},
            {"meshName": "m", "virtualRouterName": "vr",
             "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}},
            {"meshName": "m", "virtualServiceName": "color.local",
             "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "split", "spec": {"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 80}, {"virtualNode": "red", "weight": 20}]}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "canary", "spec": {"priority": 0, "httpRoute": {
                "match": {"prefix": "/", "headers": [{"name": "x-canary", "match": {"exact": "1"}}]},
                "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}]}}}}
        ]),
    );
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 11);
    let front = vpc.task("front", 2);
    let blue = vpc.task("blue", 3);
    let red = vpc.task("red", 4);
    // The service name resolves to any address (as with App Mesh); Envoy routes by Host.
    vpc.start_dns(
        &work,
        &[
            (&blue.ip, "blue.trellis.test color.local"),
            (&red.ip, "red.trellis.test"),
        ],
    );
    let specs = [
        TaskSpec {
            name: "blue",
            node: "blue",
            app: Some((9080, "blue")),
        },
        TaskSpec {
            name: "red",
            node: "red",
            app: Some((9080, "red")),
        },
        TaskSpec {
            name: "front",
            node: "front",
            app: None,
        },
    ];
    let _procs = start_tasks(
        &work,
        &agent,
        "m",
        &[(&blue, &specs[0]), (&red, &specs[1]), (&front, &specs[2])],
        &|_| {},
    );
    eventually("front reaches color.local", Duration::from_secs(20), || {
        front.http_get(None, URL)
    });

    let (b, r) = tally(&front, 1000, None);
    // 80/20 of 1,000: the standard deviation is about 12.6, so ±50 is four of them.
    assert!(
        (750..=850).contains(&b),
        "blue got {b} of 1000 (red {r}); expected about 800"
    );

    let (b, r) = tally(&front, 50, Some("x-canary: 1"));
    assert_eq!(
        (b, r),
        (0, 50),
        "the priority-0 header route sends every canary request to red"
    );
}
