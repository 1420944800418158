//! `cargo bench -p trellis-agent --features testing --bench ads [-- STREAMS... [sotw|delta]
//! [pin] [per-conn=N]]`: a load generator of lightweight ADS clients against an agent. For each
//! stream count (default 100, 1,000, 10,000) spread over 100 virtual nodes, and each ADS variant
//! (default both: state of the world, then delta), it reports the time from a route update until
//! each stream has ACKed the new route configuration (p50/p99/max), the agent's CPU time, resident
//! memory and memory per stream. The simulated Envoys run in a child process (this binary again,
//! `--clients`), so the CPU and memory figures are the agent's alone; times are wall-clock on one
//! machine. Each run gets an agent process of its own (memory an earlier run freed would hide a
//! later one's). The CPU of the update is also given for the clients, which share the machine's
//! cores with the agent; `pin` puts the agent on CPU 0 and the clients on CPU 1 (`taskset`) to
//! tell the two apart. Streams share HTTP/2 connections, 20 to one unless `per-conn=N` says
//! otherwise. Figures depend on the machine: report them with it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use serde_json::json;
use tokio::sync::mpsc;
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
/// What the update puts in the route configuration.
const MARKER: &[u8] = b"/v1-update";

/// Wall-clock microseconds: the agent and the clients are two processes on one machine.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn proc_stat() -> (u64, u64) {
    (cpu_ticks("self"), rss_kib())
}

/// A process's CPU time (utime + stime) in clock ticks; `pid` is a number or `self`. A child
/// that exited but is not reaped yet still has its figures.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

/// This process's resident memory (VmRSS, KiB).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
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
/// when it has ACKed a route config that contains [`MARKER`].
async fn envoy(channel: Channel, node: String, done: Done, ready: mpsc::UnboundedSender<()>) {
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
            if r.resources
                .iter()
                .any(|a| a.value.windows(MARKER.len()).any(|w| w == MARKER))
            {
                let _ = done.send(now_us());
            }
        }
    }
}

/// The same simulated Envoy on delta ADS: wildcard CDS and LDS, the route config by name.
async fn delta_envoy(channel: Channel, node: String, done: Done, ready: mpsc::UnboundedSender<()>) {
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
            if r.resources
                .iter()
                .filter_map(|x| x.resource.as_ref())
                .any(|a| a.value.windows(MARKER.len()).any(|w| w == MARKER))
            {
                let _ = done.send(now_us());
            }
        }
    }
}

/// Where a stream reports when it has ACKed the update (wall-clock microseconds).
type Done = mpsc::UnboundedSender<u64>;

fn read_line<R: BufRead>(mut r: R) -> (String, R) {
    let mut l = String::new();
    let _ = r.read_line(&mut l);
    (l, r)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
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
    let addr = bound.xds_addr.expect("xds tcp address");
    let exe = std::env::current_exe().expect("this binary");
    let variant = if delta { "delta" } else { "sotw" };
    let mut cmd = if pinned() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let mut child = cmd
        .args([
            "--clients",
            &addr.to_string(),
            &streams.to_string(),
            variant,
            &per_connection_arg(),
        ])
        // A heap profiler preloaded into this process (heaptrack) profiles the agent only.
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("clients");
    let mut to_child = child.stdin.take().expect("stdin");
    let mut from_child = BufReader::new(child.stdout.take().expect("stdout"));
    // Lines are read on a blocking thread: the agent runs on this runtime meanwhile.
    let (ready, back) = tokio::task::spawn_blocking(move || read_line(from_child))
        .await
        .expect("read");
    assert_eq!(ready.trim(), "ready", "clients: {ready}");
    from_child = back;
    let (ticks_connected, rss_connected) = proc_stat();
    let child_pid = child.id().to_string();
    let child_connected = cpu_ticks(&child_pid);
    let start = now_us();
    ops.update::<Routes>(
        &store,
        rp,
        "rt",
        serde_json::from_value(json!({"spec": route("/v1-update")["spec"]})).expect("upd"),
    )
    .expect("update");
    let _ = writeln!(to_child, "updated");
    let (done, _) = tokio::task::spawn_blocking(move || read_line(from_child))
        .await
        .expect("read");
    let child_ticks = cpu_ticks(&child_pid).saturating_sub(child_connected);
    let _ = child.wait();
    let mut lat: Vec<Duration> = done
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse::<u64>().ok())
        .map(|t| Duration::from_micros(t.saturating_sub(start)))
        .collect();
    lat.sort();
    let (ticks1, rss1) = proc_stat();
    let tick = 100.0; // USER_HZ on Linux
    // The update's CPU: from the update until every stream ACKed it (the clients' process idles
    // before and after), per stream pushed.
    let update_cpu = (ticks1 - ticks_connected) as f64 / tick;
    println!(
        "{variant:<5} streams={streams:>6} nodes={NODES} converged={}/{streams} update->ACK p50={:?} p99={:?} max={:?} | agent CPU {:.2}s (update {:.2}s, {:.0} µs per stream; clients {:.2}s) | agent RSS {} MiB (+{:.1} KiB per stream)",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        (ticks1 - ticks0) as f64 / tick,
        update_cpu,
        update_cpu * 1e6 / streams as f64,
        child_ticks as f64 / tick,
        rss1 / 1024,
        rss_connected.saturating_sub(rss0) as f64 / streams as f64,
    );
    let _ = bound.shutdown(Duration::from_secs(5)).await;
}

/// The child process: `streams` simulated Envoys on the agent at `addr`. Prints `ready` once
/// every stream has its routes, waits for a line (the update is made), then prints `done` and
/// the wall-clock time each stream ACKed the update at (or what arrived within a minute).
async fn clients(addr: String, streams: usize, delta: bool) {
    // Streams share a few HTTP/2 connections (`per-conn=N`, 20 by default), though Envoys share
    // none: this measures the agent's streams, not the clients' connection setup; `per-conn=1`
    // gives each stream its connection, as in a deployment.
    let conns = streams.div_ceil(per_connection()).max(1);
    let mut channels = Vec::new();
    for _ in 0..conns {
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        channels.push(ch);
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for s in 0..streams {
        let node = format!("mesh/m/virtualNode/n{}", s % NODES);
        let (ch, d, r) = (
            channels[s % conns].clone(),
            done_tx.clone(),
            ready_tx.clone(),
        );
        if delta {
            tokio::spawn(delta_envoy(ch, node, d, r));
        } else {
            tokio::spawn(envoy(ch, node, d, r));
        }
    }
    for _ in 0..streams {
        ready_rx.recv().await.expect("stream ready");
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let _ = tokio::task::spawn_blocking(|| {
        let mut l = String::new();
        let _ = std::io::stdin().read_line(&mut l);
    })
    .await;
    let mut times = Vec::with_capacity(streams);
    while times.len() < streams {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(t)) => times.push(t.to_string()),
            _ => break,
        }
    }
    println!("done {}", times.join(" "));
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// Whether `pin` was asked for: the agent on CPU 0, the clients on CPU 1.
fn pinned() -> bool {
    std::env::args().any(|a| a == "pin")
}

/// Streams per HTTP/2 connection (`per-conn=N`; 20 unless told).
fn per_connection() -> usize {
    std::env::args()
        .find_map(|a| a.strip_prefix("per-conn=")?.parse().ok())
        .unwrap_or(20)
        .max(1)
}

/// The `per-conn=N` argument as given, to hand on to a child process.
fn per_connection_arg() -> String {
    format!("per-conn={}", per_connection())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, addr, n, variant, ..] = args.as_slice()
        && flag == "--clients"
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let n = n.parse().expect("stream count");
        rt.block_on(clients(addr.clone(), n, variant == "delta"));
        return;
    }
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
    if counts.len() * variants.len() > 1 {
        // One agent process per run: memory freed by an earlier run would be reused by the
        // next and hide its cost.
        println!(
            "ADS fan-out: one agent, simulated Envoys in a child process (CPU and RSS are the agent's)"
        );
        let exe = std::env::current_exe().expect("this binary");
        for n in counts {
            for &d in &variants {
                let variant = if d { "delta" } else { "sotw" };
                let pin = if pinned() { "pin" } else { "" };
                let status = Command::new(&exe)
                    .args([n.to_string().as_str(), variant, pin, &per_connection_arg()])
                    .status()
                    .expect("run");
                assert!(status.success(), "{n} {variant}: {status}");
            }
        }
        return;
    }
    if pinned() {
        // Before the runtime starts: its threads inherit the affinity.
        let me = std::process::id().to_string();
        let ok = Command::new("taskset")
            .args(["-p", "-c", "0", &me])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "taskset -p -c 0 {me}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in counts {
        for &d in &variants {
            rt.block_on(run(n, d));
        }
    }
}
