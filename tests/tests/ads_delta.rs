//! Real Envoys on incremental ADS (`TRELLIS_XDS_API_TYPE=DELTA_GRPC` in their container): they
//! converge on a route change and traffic follows.

use serde_json::json;
use trellis_tests::scenario::{color_route, colors};
use trellis_tests::{Workdir, can_run_privileged};

#[test]
fn an_envoy_on_delta_ads_converges_on_a_route_change_and_traffic_follows() {
    if !can_run_privileged("delta ADS") {
        return;
    }
    let work = Workdir::new("delta");
    let mesh = colors(&work, 61, &[("TRELLIS_XDS_API_TYPE", "DELTA_GRPC")]);
    mesh.front_answered_by("blue");

    let debug = mesh.agent.debug_xds();
    let streams = debug.as_object().unwrap();
    assert_eq!(streams.len(), 3, "front, blue and red: {debug}");
    assert!(
        streams.values().all(|s| s["variant"] == "delta"),
        "every Envoy speaks delta ADS: {debug}"
    );

    mesh.set_route(&color_route(json!({"prefix": "/"}), "red"));
    mesh.front_answered_by("red");
    let front = mesh.front_route_acked("front ACKed the new route configuration");
    assert!(
        front["types"]["RouteConfiguration"]["last_nack"].is_null(),
        "nothing was rejected: {front}"
    );
}
