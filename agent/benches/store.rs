//! `AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
//! cargo bench -p trellis-agent --features testing --bench store [-- AGENTS...]`: the DynamoDB store
//! against moto server (from the venv). For each agent count (default 3 and 30) it runs two full
//! agents in process (writes go through agent 1; a scripted Envoy streams from agent 2) and the
//! rest as store pollers, then reports the time from a write on agent 1 until the Envoy on agent 2
//! has the new route (p50/p99/max), DynamoDB calls per write, per agent per idle minute and
//! per agent per minute under 10 writes/s, and the time and calls of a full load (an agent
//! joining). moto is not DynamoDB: latencies are moto's on this
//! machine; call counts are what DynamoDB would bill (each GetItem/Query page ≤ 4 KB: 1 read unit).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use trellis_agent::api::kinds::{Routes, VirtualNodes, VirtualRouters, VirtualServices};
use trellis_agent::api::{Account, Ops, Place, Quotas};
use trellis_agent::config::ServeConfig;
use trellis_agent::store::{Backend, Store, StoreArgs};
use trellis_agent::test_helpers::ads::{FakeEnvoy, request};
use trellis_agent::test_helpers::{self, TempDir};

const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const WRITES: usize = 40;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> (Moto, String) {
    let venv = std::env::var("TRELLIS_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../.venv")
                .to_path_buf()
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server from the venv (scripts/setup.sh)");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moto did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (Moto(child), format!("http://127.0.0.1:{port}"))
}

fn serve_config(dir: &TempDir, name: &str, store: StoreArgs) -> ServeConfig {
    ServeConfig {
        data_dir: dir.path().join(name),
        store,
        xds_socket: dir.path().join(format!("{name}.sock")),
        ..test_helpers::serve_config(dir.path())
    }
}

/// (GetItem, Query, TransactWriteItems, TransactGetItems) calls so far.
fn calls(store: &Store) -> [f64; 4] {
    let text = store.metrics_text();
    let get = |op: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "trellis_store_dynamodb_requests_total{{operation=\"{op}\"}} "
                ))?
                .parse()
                .ok()
            })
            .unwrap_or(0.0)
    };
    [
        get("GetItem"),
        get("Query"),
        get("TransactWriteItems"),
        get("TransactGetItems"),
    ]
}

fn sum(stores: &[Arc<Store>]) -> [f64; 4] {
    stores.iter().map(|s| calls(s)).fold([0.0; 4], |a, c| {
        [a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3]]
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn route(prefix: &str) -> serde_json::Value {
    json!({"routeName": "rt", "spec": {"httpRoute": {"match": {"prefix": prefix},
        "action": {"weightedTargets": [{"virtualNode": "backend", "weight": 1}]}}}})
}

/// Reads responses until the route config carries `marker`, ACKing everything.
async fn until_route(envoy: &mut FakeEnvoy, marker: &str) {
    loop {
        let r: DiscoveryResponse = envoy.recv().await.expect("ADS response");
        let names: Vec<&str> = if r.type_url == ROUTE {
            vec!["rds_egress_http_8080"]
        } else {
            vec![]
        };
        envoy.ack(&r, &names).await;
        if r.type_url == ROUTE
            && r.resources.iter().any(|a| {
                a.value
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
            })
        {
            return;
        }
    }
}

async fn run(agents: usize) {
    let (_moto, endpoint) = moto();
    let table = format!("bench{agents}");
    let args = StoreArgs {
        backend: Backend::Dynamodb,
        dynamodb_table: Some(table.clone()),
        dynamodb_endpoint: Some(endpoint),
        dynamodb_poll_ms: 500,
    };
    let dir = TempDir::new("bench-store");
    trellis_agent::store::init(dir.path(), &args, "us-east-1")
        .await
        .expect("create table");
    let one = trellis_agent::app::build(serve_config(&dir, "one", args.clone()))
        .await
        .expect("agent 1");
    let two = trellis_agent::app::build(serve_config(&dir, "two", args.clone()))
        .await
        .expect("agent 2");
    let cancel = CancellationToken::new();
    let mut stores = vec![one.store.clone(), two.store.clone()];
    for _ in 2..agents {
        let s = Arc::new(
            Store::connect(dir.path(), &args, "us-east-1")
                .await
                .expect("simulated agent"),
        );
        let (s2, c) = (s.clone(), cancel.clone());
        tokio::spawn(async move { s2.run(c).await });
        stores.push(s);
    }
    let ops = Ops {
        account: Account {
            account_id: "000000000000".into(),
            region: "us-east-1".into(),
        },
        quotas: Quotas::default(),
    };
    let store = one.store.clone();
    let m = Place {
        mesh: "m",
        parent: None,
        owner: None,
    };
    let rp = Place {
        parent: Some("r"),
        ..m
    };
    tokio::task::block_in_place(|| {
        ops.create_mesh(
            &store,
            serde_json::from_value(json!({"meshName": "m"})).expect("mesh"),
        )
        .expect("mesh");
        ops.create::<VirtualNodes>(
            &store,
            m,
            serde_json::from_value(json!({"virtualNodeName": "backend", "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": "b.internal"}}}}))
            .expect("vn"),
        )
        .expect("vn");
        ops.create::<VirtualRouters>(
            &store,
            m,
            serde_json::from_value(json!({"virtualRouterName": "r",
            "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}}))
            .expect("vr"),
        )
        .expect("vr");
        ops.create::<Routes>(
            &store,
            rp,
            serde_json::from_value(route("/v0")).expect("route"),
        )
        .expect("route");
        ops.create::<VirtualServices>(
            &store,
            m,
            serde_json::from_value(json!({"virtualServiceName": "svc.local",
            "spec": {"provider": {"virtualRouter": {"virtualRouterName": "r"}}}}))
            .expect("vs"),
        )
        .expect("vs");
        ops.create::<VirtualNodes>(
            &store,
            m,
            serde_json::from_value(json!({"virtualNodeName": "front",
            "spec": {"backends": [{"virtualService": {"virtualServiceName": "svc.local"}}]}}))
            .expect("vn"),
        )
        .expect("vn");
    });
    // Agent 2 learns of the node by polling; its Envoy connects once it has.
    while !two
        .store
        .current()
        .meshes
        .get("m")
        .is_some_and(|m| m.virtual_nodes.contains_key("front"))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let xds = two.xds_addr.expect("agent 2 ADS address");
    let mut envoy = FakeEnvoy::connect(
        xds,
        "mesh/m/virtualNode/front",
        request(CLUSTER, &[], "", ""),
    )
    .await
    .expect("ADS stream");
    envoy.send(request(LISTENER, &[], "", "")).await;
    envoy
        .send(request(ROUTE, &["rds_egress_http_8080"], "", ""))
        .await;
    until_route(&mut envoy, "/v0").await;

    // Propagation: write on agent 1, until agent 2's Envoy has the route.
    let before = sum(&stores);
    let mut times = Vec::with_capacity(WRITES);
    for i in 1..=WRITES {
        let marker = format!("/w{i}x");
        let start = Instant::now();
        tokio::task::block_in_place(|| {
            ops.update::<Routes>(
                &store,
                rp,
                "rt",
                serde_json::from_value(route(&marker)).expect("route"),
            )
            .expect("update")
        });
        until_route(&mut envoy, &marker).await;
        times.push(start.elapsed());
    }
    let after = sum(&stores);
    times.sort();

    // Idle: one minute's worth measured over 15 s.
    let idle = Duration::from_secs(15);
    let i0 = sum(&stores);
    tokio::time::sleep(idle).await;
    let i1 = sum(&stores);
    let per_agent_min = |a: [f64; 4], b: [f64; 4], span: Duration| {
        let k = 60.0 / span.as_secs_f64() / agents as f64;
        (
            (b[0] - a[0]) * k,
            (b[1] - a[1]) * k,
            (b[2] - a[2]) * k,
            (b[3] - a[3]) * k,
        )
    };

    // 10 writes per second for 10 s.
    let busy = Duration::from_secs(10);
    let b0 = sum(&stores);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < busy {
        n += 1;
        let marker = format!("/b{n}x");
        tokio::task::block_in_place(|| {
            ops.update::<Routes>(
                &store,
                rp,
                "rt",
                serde_json::from_value(route(&marker)).expect("route"),
            )
            .expect("update")
        });
        let next = Duration::from_millis(100 * n);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let b1 = sum(&stores);

    // An agent joining now reads the table whole (every change item is still retained).
    let mut loads = Vec::new();
    let mut load_calls = [0.0; 4];
    for _ in 0..5 {
        let start = Instant::now();
        let s = Store::connect(dir.path(), &args, "us-east-1")
            .await
            .expect("full load");
        loads.push(start.elapsed());
        for (total, c) in load_calls.iter_mut().zip(calls(&s)) {
            *total += c / 5.0;
        }
    }
    loads.sort();

    let w = WRITES as f64;
    println!(
        "agents={agents} write on agent 1 → route at agent 2's Envoy: p50={:?} p99={:?} max={:?} ({WRITES} writes)",
        pct(&times, 0.5),
        pct(&times, 0.99),
        times[times.len() - 1]
    );
    println!(
        "  DynamoDB calls per write, all agents: GetItem {:.1}, Query {:.1}, TransactWriteItems {:.1}, TransactGetItems {:.1}",
        (after[0] - before[0]) / w,
        (after[1] - before[1]) / w,
        (after[2] - before[2]) / w,
        (after[3] - before[3]) / w
    );
    let (g, q, t, tg) = per_agent_min(i0, i1, idle);
    println!(
        "  per agent per idle minute: GetItem {g:.0}, Query {q:.1}, TransactWriteItems {t:.1}, TransactGetItems {tg:.1}"
    );
    let (g, q, t, tg) = per_agent_min(b0, b1, busy);
    println!(
        "  per agent per minute at {:.1} writes/s: GetItem {g:.0}, Query {q:.0}, TransactWriteItems {t:.0}, TransactGetItems {tg:.0}",
        n as f64 / start.elapsed().as_secs_f64()
    );
    println!(
        "  full load at generation {} ({} resources): median {:?}; calls per load: GetItem {:.0}, Query pages {:.0}, TransactGetItems {:.0}",
        store.current().generation,
        store
            .current()
            .meshes
            .get("m")
            .map_or(0, |m| m.virtual_nodes.len()
                + m.virtual_routers.len()
                + m.virtual_services.len()
                + m.routes.values().map(|r| r.len()).sum::<usize>())
            + 1,
        pct(&loads, 0.5),
        load_calls[0],
        load_calls[1],
        load_calls[3]
    );
    cancel.cancel();
    let _ = one.shutdown(Duration::from_secs(5)).await;
    let _ = two.shutdown(Duration::from_secs(5)).await;
}

fn main() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        eprintln!(
            "set AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true (moto's credentials)"
        );
        std::process::exit(2);
    }
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![3, 30]
    } else {
        counts
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in counts {
        rt.block_on(run(n.max(2)));
    }
}
