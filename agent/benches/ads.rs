//! `cargo bench -p trellis-agent --features testing --bench ads [-- STREAMS... [sotw|delta]]`: a
//! load generator of lightweight ADS clients against an in-process agent. For each stream count
//! (default 100, 1,000, 10,000) spread over 100 virtual nodes, and each ADS variant (default both:
//! state of the world, then delta), it reports the time from a route update until each stream has
//! ACKed the new route configuration (p50/p99/max), the agent process's CPU time, peak memory and
//! memory per stream. Figures depend on the machine: report them with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use trellis_agent::api::Place;
use trellis_agent::api::kinds::{Routes, VirtualNodes, VirtualRouters, VirtualServices};
use trellis_agent::config::ServeConfig;
use trellis_agent::test_helpers::{self, TempDir, serve_config};

const NODES: usize = 100;
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

fn proc_stat() -> (u64, u64) {
    // (utime + stime in clock ticks, VmHWM KiB)
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    (ticks, hwm)
}

fn request(
    type_url: &str,
    names: Vec<String>,
    version: &str,
    nonce: &str,
    node: Option<Node>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        version_info: version.into(),
        response_nonce: nonce.into(),
        node,
        ..Default::default()
    }
}

/// One simulated Envoy: subscribes CDS, LDS and the route config, ACKs everything, and reports
/// when it has ACKed a route config that contains `marker`.
async fn envoy(channel: Channel, node: String, marker: Marker, ready: mpsc::UnboundedSender<()>) {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let n = Node {
        id: node,
        ..Default::default()
    };
    let _ = tx.send(request(CLUSTER, vec![], "", "", Some(n))).await;
    let _ = tx.send(request(LISTENER, vec![], "", "", None)).await;
    let _ = tx
        .send(request(
            ROUTE,
            vec!["rds_egress_http_8080".into()],
            "",
            "",
            None,
        ))
        .await;
    let Ok(resp) = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let mut got_routes = false;
    loop {
        let r = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                eprintln!("stream error: {e}");
                break;
            }
        };
        let r: DiscoveryResponse = r;
        let names = if r.type_url == ROUTE {
            vec!["rds_egress_http_8080".to_string()]
        } else {
            vec![]
        };
        let _ = tx
            .send(request(&r.type_url, names, &r.version_info, &r.nonce, None))
            .await;
        if r.type_url == ROUTE {
            if !got_routes {
                got_routes = true;
                let _ = ready.send(());
            }
            let m = marker.lock().await;
            if let Some((text, done)) = m.as_ref()
                && r.resources
                    .iter()
                    .any(|a| a.value.windows(text.len()).any(|w| w == text.as_bytes()))
            {
                let _ = done.send(Instant::now());
            }
        }
    }
}

/// The same simulated Envoy on delta ADS: wildcard CDS and LDS, the route config by name.
async fn delta_envoy(
    channel: Channel,
    node: String,
    marker: Marker,
    ready: mpsc::UnboundedSender<()>,
) {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let sub = |type_url: &str, names: &[&str]| DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let mut first = sub(CLUSTER, &[]);
    first.node = Some(Node {
        id: node,
        ..Default::default()
    });
    let _ = tx.send(first).await;
    let _ = tx.send(sub(LISTENER, &[])).await;
    let _ = tx.send(sub(ROUTE, &["rds_egress_http_8080"])).await;
    let Ok(resp) = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let mut got_routes = false;
    loop {
        let r: DeltaDiscoveryResponse = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                eprintln!("stream error: {e}");
                break;
            }
        };
        let _ = tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await;
        if r.type_url == ROUTE {
            if !got_routes {
                got_routes = true;
                let _ = ready.send(());
            }
            let m = marker.lock().await;
            if let Some((text, done)) = m.as_ref()
                && r.resources
                    .iter()
                    .filter_map(|x| x.resource.as_ref())
                    .any(|a| a.value.windows(text.len()).any(|w| w == text.as_bytes()))
            {
                let _ = done.send(Instant::now());
            }
        }
    }
}

/// What an update looks like in the route config, and where to report seeing it.
type Marker = Arc<Mutex<Option<(String, mpsc::UnboundedSender<Instant>)>>>;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(streams: usize, delta: bool) {
    let dir = TempDir::new("bench-ads");
    let cfg = ServeConfig {
        max_connections_per_proxy: streams,
        ..serve_config(dir.path())
    };
    let bound = trellis_agent::app::build(cfg).await.expect("agent");
    let store = bound.store.clone();
    let ops = test_helpers::ops_with_mesh(&store);
    let m = Place {
        mesh: "m",
        parent: None,
        owner: None,
    };
    ops.create::<VirtualNodes>(&store, m, serde_json::from_value(json!({"virtualNodeName": "backend", "spec": {
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}], "serviceDiscovery": {"dns": {"hostname": "b.internal"}}}})).expect("vn")).expect("vn");
    ops.create::<VirtualRouters>(
        &store,
        m,
        serde_json::from_value(json!({"virtualRouterName": "r", "spec": {
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}}))
        .expect("vr"),
    )
    .expect("vr");
    let route = |prefix: &str| {
        json!({"routeName": "rt", "spec": {"httpRoute": {"match": {"prefix": prefix},
        "action": {"weightedTargets": [{"virtualNode": "backend", "weight": 1}]}}}})
    };
    let rp = Place {
        parent: Some("r"),
        ..m
    };
    ops.create::<Routes>(
        &store,
        rp,
        serde_json::from_value(route("/v0")).expect("route"),
    )
    .expect("route");
    ops.create::<VirtualServices>(
        &store,
        m,
        serde_json::from_value(json!({"virtualServiceName": "svc.local", "spec": {
        "provider": {"virtualRouter": {"virtualRouterName": "r"}}}}))
        .expect("vs"),
    )
    .expect("vs");
    for i in 0..NODES {
        ops.create::<VirtualNodes>(
            &store,
            m,
            serde_json::from_value(json!({"virtualNodeName": format!("n{i}"), "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "svc.local"}}]}}))
            .expect("vn"),
        )
        .expect("vn");
    }
    let (ticks0, rss0) = proc_stat();
    // Streams share a few HTTP/2 connections, as many Envoys would share none: this measures the
    // agent, not the client's connection setup.
    let conns = streams.div_ceil(20).max(1);
    let addr = bound.xds_addr.expect("xds tcp address");
    let mut channels = Vec::new();
    for _ in 0..conns {
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        channels.push(ch);
    }
    let marker = Arc::new(Mutex::new(None));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    for s in 0..streams {
        let node = format!("mesh/m/virtualNode/n{}", s % NODES);
        let (ch, m, r) = (
            channels[s % conns].clone(),
            marker.clone(),
            ready_tx.clone(),
        );
        if delta {
            tokio::spawn(delta_envoy(ch, node, m, r));
        } else {
            tokio::spawn(envoy(ch, node, m, r));
        }
    }
    for _ in 0..streams {
        ready_rx.recv().await.expect("stream ready");
    }
    let (_, rss_connected) = proc_stat();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    *marker.lock().await = Some(("/v1-update".to_string(), done_tx));
    let start = Instant::now();
    ops.update::<Routes>(
        &store,
        rp,
        "rt",
        serde_json::from_value(json!({"spec": route("/v1-update")["spec"]})).expect("upd"),
    )
    .expect("update");
    let mut lat = Vec::with_capacity(streams);
    while lat.len() < streams {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(t)) => lat.push(t.duration_since(start)),
            _ => break,
        }
    }
    lat.sort();
    let (ticks1, rss1) = proc_stat();
    let tick = 100.0; // USER_HZ on Linux
    println!(
        "{:<5} streams={streams:>6} nodes={NODES} converged={}/{streams} update->ACK p50={:?} p99={:?} max={:?} | process CPU {:.2}s | RSS {} MiB (+{} KiB per stream)",
        if delta { "delta" } else { "sotw" },
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        (ticks1 - ticks0) as f64 / tick,
        rss1 / 1024,
        (rss_connected.saturating_sub(rss0)) / streams as u64,
    );
    let _ = bound.shutdown(Duration::from_secs(5)).await;
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() {
        vec![100, 1_000, 10_000]
    } else {
        counts
    };
    let sotw = args.iter().any(|a| a == "sotw");
    let delta = args.iter().any(|a| a == "delta");
    let variants: Vec<bool> = match (sotw, delta) {
        (true, false) => vec![false],
        (false, true) => vec![true],
        _ => vec![false, true],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "ADS fan-out: one agent, simulated Envoys in the same process (client work included in CPU and RSS)"
    );
    for n in counts {
        for &d in &variants {
            rt.block_on(run(n, d));
        }
    }
}
