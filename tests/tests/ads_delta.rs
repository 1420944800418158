//! Real Envoys on incremental ADS (`TRELLIS_XDS_API_TYPE=DELTA_GRPC` in their container): they
//! converge on a route change and traffic follows.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::scenario::{COLOR_URL, color_route, colors};
use trellis_tests::{Workdir, can_run_privileged, check, eventually};

/// Waits until front's requests are answered by `color`.
fn answered_by(front: &trellis_tests::mesh::Task, color: &str) {
    eventually(
        &format!("front's requests answered by {color}"),
        Duration::from_secs(20),
        || match front.http_get(None, COLOR_URL) {
            Ok(body) if body == color => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

#[test]
fn an_envoy_on_delta_ads_converges_on_a_route_change_and_traffic_follows() {
    if !can_run_privileged("delta ADS") {
        return;
    }
    let work = Workdir::new("delta");
    let mesh = colors(&work, 61, &[("TRELLIS_XDS_API_TYPE", "DELTA_GRPC")]);
    answered_by(&mesh.front, "blue");

    let debug: Value = serde_json::from_str(&check(
        Command::new("curl").args(["-sf", &format!("{}/debug/xds", mesh.agent.api)]),
    ))
    .unwrap();
    let streams = debug.as_object().unwrap();
    assert_eq!(streams.len(), 3, "front, blue and red: {debug}");
    assert!(
        streams.values().all(|s| s["variant"] == "delta"),
        "every Envoy speaks delta ADS: {debug}"
    );

    mesh.set_route(&color_route(json!({"prefix": "/"}), "red"));
    answered_by(&mesh.front, "red");
    eventually(
        "front ACKed the new route configuration",
        Duration::from_secs(10),
        || {
            let debug: Value = serde_json::from_str(&check(
                Command::new("curl").args(["-sf", &format!("{}/debug/xds", mesh.agent.api)]),
            ))
            .unwrap();
            let front = debug
                .as_object()
                .and_then(|s| s.values().find(|s| s["node"] == "mesh/m/virtualNode/front"))
                .cloned()
                .ok_or("no front stream")?;
            let route = &front["types"]["RouteConfiguration"];
            if route["sent_version"] == route["acked_version"] && route["last_nack"].is_null() {
                Ok(())
            } else {
                Err(format!("{front}"))
            }
        },
    );
}
