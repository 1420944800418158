//! `cargo bench -p trellis-agent --features testing --bench discovery [-- ENVOYS...]`: Cloud Map
//! change → EDS delivered, against moto server (the venv's `moto_server`) and an in-process
//! agent. For each count of simulated Envoys (default 1, 10, 100) sharing 20 Cloud Map services,
//! it registers a new instance in one service per round and times until each Envoy has received
//! an EDS response carrying it (p50/p99/max), and counts the agent's Cloud Map calls per minute.
//! The poll interval (`--poll-ms`, default 1000) bounds the latency: target within 2× of it.
//! Figures depend on the machine: report them with it.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use aws_sdk_servicediscovery::Client;
use aws_sdk_servicediscovery::config::{BehaviorVersion, Credentials, Region};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use trellis_agent::api::Place;
use trellis_agent::api::kinds::{VirtualNodes, VirtualServices};
use trellis_agent::config::{CloudMapArgs, ServeConfig};
use trellis_agent::test_helpers::{self, TempDir, serve_config};

const SERVICES: usize = 20;
const CALLER_NODES: usize = 10;
const ROUNDS: usize = 12;
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// What the current round's new instance looks like in an assignment, and where to report it.
type Marker = Arc<Mutex<Option<(usize, String, mpsc::UnboundedSender<Instant>)>>>;

fn request(type_url: &str, names: Vec<String>, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// One simulated Envoy: CDS, then EDS for every cluster, ACKing all; reports each round's marker once.
async fn envoy(
    addr: std::net::SocketAddr,
    node: String,
    marker: Marker,
    ready: mpsc::UnboundedSender<()>,
) {
    let Ok(mut client) = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await
    else {
        return;
    };
    let (tx, rx) = mpsc::channel(16);
    let mut first = request(CLUSTER, vec![], "", "");
    first.node = Some(Node {
        id: node,
        ..Default::default()
    });
    let _ = tx.send(first).await;
    let Ok(resp) = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let names: Vec<String> = (0..SERVICES)
        .map(|i| format!("cds_egress_m_back{i}_http_8080"))
        .collect();
    let (mut subscribed, mut reported, mut is_ready) = (false, None, false);
    while let Ok(Some(r)) = inbound.message().await {
        if r.type_url == CLUSTER {
            let _ = tx
                .send(request(CLUSTER, vec![], &r.version_info, &r.nonce))
                .await;
            if !subscribed {
                subscribed = true;
                let _ = tx.send(request(ENDPOINT, names.clone(), "", "")).await;
            }
            continue;
        }
        let _ = tx
            .send(request(ENDPOINT, names.clone(), &r.version_info, &r.nonce))
            .await;
        if !is_ready {
            is_ready = true;
            let _ = ready.send(());
        }
        let m = marker.lock().await;
        if let Some((round, text, done)) = m.as_ref()
            && reported != Some(*round)
            && r.resources
                .iter()
                .any(|a| a.value.windows(text.len()).any(|w| w == text.as_bytes()))
        {
            reported = Some(*round);
            let _ = done.send(Instant::now());
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The agent's total Cloud Map calls, from its `/metrics`.
async fn calls(api: std::net::SocketAddr) -> u64 {
    let Ok(mut s) = tokio::net::TcpStream::connect(api).await else {
        return 0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.lines()
        .filter(|l| l.starts_with("trellis_cloudmap_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn cloud_map(url: &str) -> Client {
    let conf = aws_sdk_servicediscovery::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
        .endpoint_url(url)
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    Client::from_conf(conf)
}

async fn register(cm: &Client, service_id: &str, id: &str, ip: &str) {
    cm.register_instance()
        .service_id(service_id)
        .instance_id(id)
        .attributes("AWS_INSTANCE_IPV4", ip)
        .send()
        .await
        .expect("register instance");
}

async fn run(envoys: usize, moto: &str, poll_ms: u64) {
    let cm = cloud_map(moto);
    let ns_name = format!("bench{envoys}");
    cm.create_http_namespace()
        .name(&ns_name)
        .send()
        .await
        .expect("namespace");
    let ns_id = cm
        .list_namespaces()
        .send()
        .await
        .expect("namespaces")
        .namespaces()
        .iter()
        .find(|n| n.name() == Some(ns_name.as_str()))
        .and_then(|n| n.id().map(str::to_string))
        .expect("namespace id");
    let mut service_ids = Vec::new();
    for i in 0..SERVICES {
        let s = cm
            .create_service()
            .name(format!("s{i}"))
            .namespace_id(&ns_id)
            .send()
            .await
            .expect("service");
        let id = s.service().and_then(|s| s.id()).expect("id").to_string();
        register(&cm, &id, "base", &format!("10.66.0.{}", i + 1)).await;
        service_ids.push(id);
    }

    let dir = TempDir::new("bench-discovery");
    let cfg = ServeConfig {
        region: "us-west-2".into(),
        max_connections_per_proxy: 1000,
        cloudmap: CloudMapArgs {
            endpoint: Some(moto.to_string()),
            poll_ms,
            refresh_ms: poll_ms * 10,
            ..CloudMapArgs::default()
        },
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
    let mut backends = Vec::new();
    for i in 0..SERVICES {
        let node = json!({"virtualNodeName": format!("back{i}"), "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {"awsCloudMap": {"namespaceName": ns_name, "serviceName": format!("s{i}")}}}});
        ops.create::<VirtualNodes>(&store, m, serde_json::from_value(node).expect("vn"))
            .expect("vn");
        let svc = json!({"virtualServiceName": format!("svc{i}.local"), "spec": {
            "provider": {"virtualNode": {"virtualNodeName": format!("back{i}")}}}});
        ops.create::<VirtualServices>(&store, m, serde_json::from_value(svc).expect("vs"))
            .expect("vs");
        backends.push(json!({"virtualService": {"virtualServiceName": format!("svc{i}.local")}}));
    }
    let callers = CALLER_NODES.min(envoys);
    for c in 0..callers {
        let node = json!({"virtualNodeName": format!("front{c}"), "spec": {"backends": backends}});
        ops.create::<VirtualNodes>(&store, m, serde_json::from_value(node).expect("vn"))
            .expect("vn");
    }

    let addr = bound.xds_addr.expect("xds tcp address");
    let marker: Marker = Arc::new(Mutex::new(None));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    for e in 0..envoys {
        tokio::spawn(envoy(
            addr,
            format!("mesh/m/virtualNode/front{}", e % callers),
            marker.clone(),
            ready_tx.clone(),
        ));
    }
    for _ in 0..envoys {
        ready_rx.recv().await.expect("envoy ready");
    }
    // Every Envoy has endpoints: discovery is running for all 20 services.
    let calls0 = calls(bound.api_addr).await;
    let t0 = Instant::now();
    let mut lat = Vec::new();
    let mut missed = 0;
    for round in 0..ROUNDS {
        let ip = format!("10.77.{round}.200");
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        *marker.lock().await = Some((round, ip.clone(), done_tx));
        let svc = &service_ids[round % SERVICES];
        register(&cm, svc, &format!("r{round}"), &ip).await;
        let start = Instant::now();
        let mut got = 0;
        while got < envoys {
            match tokio::time::timeout(Duration::from_millis(poll_ms * 10), done_rx.recv()).await {
                Ok(Some(t)) => {
                    lat.push(t.duration_since(start));
                    got += 1;
                }
                _ => break,
            }
        }
        missed += envoys - got;
    }
    let elapsed = t0.elapsed();
    let calls1 = calls(bound.api_addr).await;
    lat.sort();
    let per_minute = (calls1 - calls0) as f64 * 60.0 / elapsed.as_secs_f64();
    println!(
        "envoys={envoys:>4} services={SERVICES} poll={poll_ms}ms change->EDS p50={:?} p99={:?} max={:?} (missed {missed}) | Cloud Map calls {per_minute:.0}/min ({:.1}/min per service)",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        per_minute / SERVICES as f64,
    );
    let _ = bound.shutdown(Duration::from_secs(5)).await;
}

fn moto_server() -> std::path::PathBuf {
    let venv = std::env::var("TRELLIS_VENV").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"),
        std::path::PathBuf::from,
    );
    venv.join("bin/moto_server")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // The agent takes credentials from the environment, as in production; this process is
    // re-run with moto's test credentials rather than changing its own environment.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        let status = Command::new(std::env::current_exe().expect("own path"))
            .args(std::env::args().skip(1))
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-west-2")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .status()
            .expect("re-run with credentials");
        std::process::exit(status.code().unwrap_or(1));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let poll_ms = args
        .iter()
        .position(|a| a == "--poll-ms")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1000);
    let counts: BTreeSet<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--poll-ms")
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let counts: Vec<usize> = if counts.is_empty() {
        vec![1, 10, 100]
    } else {
        counts.into_iter().collect()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let _moto = Killed(
        Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server (scripts/setup.sh installs it in .venv)"),
    );
    let moto = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!(
        "Cloud Map change -> EDS: one agent, moto server, simulated Envoys in the same process; \
         {SERVICES} services, {ROUNDS} changes per run"
    );
    for n in counts {
        rt.block_on(run(n, &moto, poll_ms));
    }
}
