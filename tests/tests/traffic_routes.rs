//! Virtual routers and routes proven on real Envoy traffic: weighted splits and header routing.

use std::time::Duration;

use serde_json::json;
use trellis_tests::scenario::{COLOR_URL as URL, colors_with_routes};
use trellis_tests::{Workdir, can_run_privileged, eventually};

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
    let split = json!({"httpRoute": {
        "match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 80}, {"virtualNode": "red", "weight": 20}]}}});
    let canary = json!({"priority": 0, "httpRoute": {
        "match": {"prefix": "/", "headers": [{"name": "x-canary", "match": {"exact": "1"}}]},
        "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}]}}});
    let mesh = colors_with_routes(&work, 11, &[("split", split), ("canary", canary)], &[]);
    let front = &mesh.front;
    eventually("front reaches color.local", Duration::from_secs(20), || {
        front.http_get(None, URL)
    });

    let (b, r) = tally(front, 1000, None);
    // 80/20 of 1,000: the standard deviation is about 12.6, so ±50 is four of them.
    assert!(
        (750..=850).contains(&b),
        "blue got {b} of 1000 (red {r}); expected about 800"
    );

    let (b, r) = tally(front, 50, Some("x-canary: 1"));
    assert_eq!(
        (b, r),
        (0, 50),
        "the priority-0 header route sends every canary request to red"
    );
}
