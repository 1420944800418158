//! A configuration Envoy rejects is reported and never loops, on both ADS variants: a route whose
//! path regex App Mesh accepts but Envoy's RE2 refuses (RE2 has no lookahead) is NACKed, shown in
//! `/debug/xds` and `/metrics`, not resent, traffic stays on the previous configuration, and the
//! fixed route is ACKed.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use trellis_tests::mesh::Agent;
use trellis_tests::scenario::{COLOR_URL, FRONT_NODE, color_route, colors};
use trellis_tests::{Workdir, can_run_privileged, check, eventually};

/// The sum of a counter's series in `/metrics`.
fn counter(agent: &Agent, name: &str) -> u64 {
    let text = check(Command::new("curl").args(["-sf", &format!("{}/metrics", agent.api)]));
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The rejected route would send traffic to red: that also changes the clusters Envoy needs
/// (blue's goes), so the old route keeps working only if blue's cluster is not removed before the
/// route that stops using it is accepted (make before break).
fn a_rejected_route_is_reported_not_resent_and_traffic_stays(api_type: &str, vpc_id: u8) {
    let work = Workdir::new(&format!("nack-{}", api_type.to_ascii_lowercase()));
    let mesh = colors(&work, vpc_id, &[("TRELLIS_XDS_API_TYPE", api_type)]);
    mesh.front_answered_by("blue");
    let variant = if api_type == "DELTA_GRPC" {
        "delta"
    } else {
        "sotw"
    };
    let front = mesh
        .agent
        .xds_stream(FRONT_NODE)
        .expect("front is connected");
    assert_eq!(front["variant"], variant);

    // Valid for App Mesh (a path regex of 1 to 255 characters), invalid for RE2.
    mesh.set_route(&color_route(json!({"path": {"regex": "/(?=x).*"}}), "red"));
    let message = eventually("front NACKs the route", Duration::from_secs(20), || {
        let front = mesh.agent.xds_stream(FRONT_NODE)?;
        front["types"]["RouteConfiguration"]["last_nack"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no NACK yet: {front}"))
    });
    // RE2 says "invalid perl operator: (?=".
    assert!(
        message.contains("(?="),
        "the NACK names the rejected operator: {message}"
    );
    let nacks = counter(&mesh.agent, "trellis_xds_nacks_total");
    let pushes = counter(&mesh.agent, "trellis_xds_pushes_total");
    assert!(nacks >= 1);
    // No loop: over several seconds nothing is resent and nothing more is rejected.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        counter(&mesh.agent, "trellis_xds_nacks_total"),
        nacks,
        "NACKs kept coming"
    );
    assert_eq!(
        counter(&mesh.agent, "trellis_xds_pushes_total"),
        pushes,
        "the agent resent"
    );
    // Traffic stays on the configuration Envoy had.
    for _ in 0..20 {
        assert_eq!(mesh.front.http_get(None, COLOR_URL).as_deref(), Ok("blue"));
    }

    // Fixing the route through the API is pushed, ACKed, and traffic follows.
    mesh.set_route(&color_route(json!({"prefix": "/"}), "red"));
    mesh.front_answered_by("red");
    mesh.front_route_acked("front ACKs the fixed route");
    assert_eq!(
        counter(&mesh.agent, "trellis_xds_nacks_total"),
        nacks,
        "the fix was not rejected"
    );
}

#[test]
fn state_of_the_world_a_rejected_route_is_reported_not_resent_and_traffic_stays() {
    if !can_run_privileged("NACK on SotW ADS") {
        return;
    }
    a_rejected_route_is_reported_not_resent_and_traffic_stays("GRPC", 62);
}

#[test]
fn delta_a_rejected_route_is_reported_not_resent_and_traffic_stays() {
    if !can_run_privileged("NACK on delta ADS") {
        return;
    }
    a_rejected_route_is_reported_not_resent_and_traffic_stays("DELTA_GRPC", 63);
}
