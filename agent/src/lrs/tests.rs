use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_model::ProxyIdentity;
use trellis_model::testing::mesh_state;

use super::{EdgeKey, Lrs};
use crate::xds::Published;

fn node(port: u16) -> serde_json::Value {
    json!({"listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
           "serviceDiscovery": {"dns": {"hostname": "back.test"}}})
}

/// front calls back.local (provided by back); back serves 8080.
fn lrs() -> std::sync::Arc<Lrs> {
    let state = mesh_state(
        json!({}),
        &[
            ("back", node(8080)),
            (
                "front",
                json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}),
            ),
        ],
        &[("back.local", "back")],
    );
    let published = Published {
        state: std::sync::Arc::new(state),
        endpoints: Default::default(),
        unanswered: Default::default(),
        secrets: Default::default(),
        changed_at: Instant::now(),
    };
    let (_tx, rx) = watch::channel(published);
    Lrs::new(Duration::from_secs(1), rx, CancellationToken::new())
}

fn stats(cluster: &str, issued: u64, errors: u64) -> ClusterStats {
    ClusterStats {
        cluster_name: cluster.into(),
        upstream_locality_stats: vec![UpstreamLocalityStats {
            total_issued_requests: issued,
            total_successful_requests: issued - errors,
            total_error_requests: errors,
            ..Default::default()
        }],
        load_report_interval: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn who(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).unwrap()
}

#[tokio::test]
async fn reports_add_up_per_edge_named_after_the_callers_own_configuration() {
    let lrs = lrs();
    let front = who("front");
    lrs.opened(&front);
    lrs.report(
        &front,
        1,
        &[
            stats("cds_egress_m_back_http_8080", 10, 2),
            stats("no_such_cluster", 5, 0),
        ],
    );
    lrs.report(&front, 1, &[stats("cds_egress_m_back_http_8080", 5, 1)]);
    let view = lrs.view();
    let edge = view
        .edges
        .iter()
        .find(|e| e.key.target == "back")
        .expect("an edge to back");
    assert_eq!(
        edge.key,
        EdgeKey {
            mesh: "m".into(),
            caller: "virtualNode/front".into(),
            service: "back.local".into(),
            target: "back".into(),
        }
    );
    assert_eq!((edge.requests, edge.errors, edge.success), (15, 3, 12));
    let text = lrs.metrics_text();
    assert!(
        text.contains(
            "trellis_edge_requests_total{mesh=\"m\",caller=\"virtualNode/front\",service=\"back.local\",target=\"back\"} 15"
        ),
        "{text}"
    );
    assert!(
        text.contains("trellis_lrs_unknown_clusters_total 1"),
        "{text}"
    );

    // back's ingress cluster is its inbound traffic.
    let back = who("back");
    lrs.opened(&back);
    lrs.report(&back, 2, &[stats("cds_ingress_m_back_http_8080", 7, 0)]);
    let view = lrs.view();
    assert_eq!(view.inbound.len(), 1);
    assert_eq!(
        (view.inbound[0].node.as_str(), view.inbound[0].requests),
        ("back", 7)
    );
    lrs.closed(&front, 1);
    lrs.closed(&back, 2);
}

#[tokio::test(start_paused = true)]
async fn rates_come_from_the_last_reports_and_decay_when_they_stop() {
    let lrs = lrs();
    let front = who("front");
    lrs.opened(&front);
    // A report every 2 s, each covering the 2 s before it.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(2)).await;
        lrs.report(&front, 1, &[stats("cds_egress_m_back_http_8080", 20, 4)]);
    }
    let edge = lrs
        .view()
        .edges
        .into_iter()
        .find(|e| e.key.target == "back")
        .unwrap();
    // 20 requests every 2 s, over the last window.
    assert!((edge.rps - 10.0).abs() < 1.5, "rps {}", edge.rps);
    assert!(
        (edge.errors_per_second - 2.0).abs() < 0.5,
        "{}",
        edge.errors_per_second
    );
    tokio::time::advance(Duration::from_secs(120)).await;
    let edge = lrs
        .view()
        .edges
        .into_iter()
        .find(|e| e.key.target == "back")
        .unwrap();
    assert!(edge.rps < 1.0, "a silent edge decays: {}", edge.rps);
    assert_eq!(edge.requests, 100, "totals stay");
}
