//! `cargo bench -p trellis-agent --bench translate`: translation at App Mesh quota scale
//! (200 nodes, 200 services, 200 routers × 50 routes), time and allocated memory.
//!
//! A plain harness (no criterion): it prints medians of repeated runs. Figures depend on the
//! machine; compare them as ratios or with the machine named.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;
use trellis_agent::test_helpers::{mesh_resource, publish_one_instance, resource};
use trellis_agent::xds::debounce;
use trellis_agent::xds::snapshot::{ROUTE, Snapshot, Snapshots};
use trellis_model::{MeshState, ProxyIdentity, State};
use trellis_translate::{Endpoints, Memo, translate_encoded};

/// Resident memory high-water mark of this process, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

const NODES: usize = 200;
const ROUTES: usize = 50;
const BACKENDS: usize = 50;

fn quota_mesh() -> State {
    let mut m: MeshState = mesh_resource("m");
    for i in 0..NODES {
        let spec = json!({
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            // n0 is found through Cloud Map, the others through DNS.
            "serviceDiscovery": if i == 0 {
                json!({"awsCloudMap": {"namespaceName": "ns", "serviceName": "n0"}})
            } else {
                json!({"dns": {"hostname": format!("n{i}.internal")}})
            },
            "backends": (1..=BACKENDS).map(|k| json!({"virtualService": {"virtualServiceName": format!("s{}.local", (i + k) % NODES)}})).collect::<Vec<_>>()
        });
        m.virtual_nodes.insert(
            format!("n{i}"),
            resource("n", serde_json::from_value(spec).expect("node spec")),
        );
        let router = json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]});
        m.virtual_routers.insert(
            format!("r{i}"),
            resource("r", serde_json::from_value(router).expect("router spec")),
        );
        let table = m.routes.entry(format!("r{i}")).or_default();
        for j in 0..ROUTES {
            let route = json!({"httpRoute": {
                "match": {"prefix": format!("/p{j}"), "headers": [{"name": "x-v", "match": {"exact": format!("{j}")}}]},
                "action": {"weightedTargets": [
                    {"virtualNode": format!("n{i}"), "weight": 90},
                    {"virtualNode": format!("n{}", (i + 1) % NODES), "weight": 10}]}}});
            table.insert(
                format!("rt{j}"),
                resource("rt", serde_json::from_value(route).expect("route spec")),
            );
        }
        let svc = json!({"provider": {"virtualRouter": {"virtualRouterName": format!("r{i}")}}});
        m.virtual_services.insert(
            format!("s{i}.local"),
            resource("s", serde_json::from_value(svc).expect("service spec")),
        );
    }
    let mut s = State::default();
    s.meshes.insert("m".into(), m);
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Every proxy's snapshot, translated with `memo`.
fn all(state: &State, ids: &[ProxyIdentity], e: &Endpoints, memo: &Memo) -> Vec<Snapshot> {
    ids.iter()
        .map(|id| {
            let r = translate_encoded(state, id, e, memo).expect("translate");
            Snapshot::from_encoded(state.generation, r)
        })
        .collect()
}

/// Every proxy's snapshot as the agent serves it, and how many were translated (not kept).
fn served(
    snapshots: &Snapshots,
    state: &State,
    ids: &[ProxyIdentity],
) -> (Vec<Arc<Snapshot>>, usize) {
    let mut built = 0;
    let snaps = ids
        .iter()
        .map(|id| {
            let (snap, new) = snapshots.get(state, id).expect("snapshot");
            built += usize::from(new);
            snap
        })
        .collect();
    (snaps, built)
}

/// Runs `f` `n` times, returning the median time and the last result.
fn timed<T>(n: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let out = std::hint::black_box(f());
        times.push(t.elapsed());
        last = Some(out);
    }
    (median(times), last.expect("n > 0"))
}

/// How many snapshots' route versions differ between two sets.
fn moved(a: &[Arc<Snapshot>], b: &[Arc<Snapshot>]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.get(ROUTE).map(|t| &t.version) != y.get(ROUTE).map(|t| &t.version))
        .count()
}

/// `state` with one route of router `r0` changed as the API would (spec, version, generation).
fn one_route_changed(state: &State) -> State {
    let mut changed = state.clone();
    let m = changed.meshes.get_mut("m").expect("mesh");
    let route = m
        .routes
        .get_mut("r0")
        .and_then(|t| t.get_mut("rt7"))
        .expect("route");
    if let Some(http) = route.spec.http_route.as_mut() {
        http.r#match.prefix = Some("/changed".into());
    }
    route.metadata.version += 1;
    changed.generation += 1;
    changed
}

fn main() {
    let mut state = quota_mesh();
    state.generation = 1;
    let ids: Vec<ProxyIdentity> = (0..NODES)
        .map(|i| ProxyIdentity::parse(&format!("mesh/m/virtualNode/n{i}")).expect("identity"))
        .collect();
    let endpoints = Endpoints::new();
    let rss_before = peak_rss_kib();

    // Full: every proxy of the mesh from nothing, as the agent serves them.
    let (full, (snaps, _)) = timed(7, || served(&Snapshots::default(), &state, &ids));
    let bytes: usize = snaps
        .iter()
        .flat_map(|s| s.types.values())
        .flat_map(|t| t.resources.values())
        .map(|p| p.encoded_len())
        .sum();
    println!(
        "full         ({NODES} proxies x 50 backends x 50 routes): median {full:?}, {} KiB encoded per proxy",
        bytes / NODES / 1024
    );

    // One proxy alone, and one more once the others filled the memo.
    let (cold, _) = timed(20, || {
        let memo = Memo::new(state.generation, endpoints.generation);
        translate_encoded(&state, &ids[0], &endpoints, &memo).expect("translate")
    });
    let warm_memo = Memo::new(state.generation, endpoints.generation);
    all(&state, &ids[1..], &endpoints, &warm_memo);
    let (warm, _) = timed(20, || {
        translate_encoded(&state, &ids[0], &endpoints, &warm_memo).expect("translate")
    });
    println!("one proxy    alone: median {cold:?}; with the mesh's memo: median {warm:?}");

    // Incremental: one route of r0 changes; 50 proxies call s0, the r0 service.
    let changed = one_route_changed(&state);
    let mut times = Vec::new();
    let mut counts = (0, 0);
    for _ in 0..7 {
        let snapshots = Snapshots::default();
        let (before, _) = served(&snapshots, &state, &ids);
        let t = Instant::now();
        let (after, built) = std::hint::black_box(served(&snapshots, &changed, &ids));
        times.push(t.elapsed());
        counts = (built, moved(&before, &after));
    }
    println!(
        "incremental  one route: median {:?} for all {NODES} proxies; {} translated again, {} with new routes",
        median(times),
        counts.0,
        counts.1
    );
    // Incremental: n0's Cloud Map instances change (the callers of s0 and s199 reach n0).
    let state = Arc::new(state);
    let mut times = Vec::new();
    let mut counts = (0, 0);
    for round in 0..7u8 {
        let (tx, rx) = debounce::channel(state.clone());
        let snapshots = Snapshots::new(rx);
        publish_one_instance(&tx, &state, "n0", Ipv4Addr::new(10, 0, 0, round), 1);
        let (before, _) = served(&snapshots, &state, &ids);
        publish_one_instance(&tx, &state, "n0", Ipv4Addr::new(10, 0, 1, round), 2);
        let t = Instant::now();
        let (after, built) = std::hint::black_box(served(&snapshots, &state, &ids));
        times.push(t.elapsed());
        let endpoint = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| {
                x.get(endpoint).map(|t| &t.version) != y.get(endpoint).map(|t| &t.version)
            })
            .count();
        counts = (built, moved);
    }
    println!(
        "incremental  one Cloud Map service's instances: median {:?} for all {NODES} proxies; {} translated again, {} with new endpoints",
        median(times),
        counts.0,
        counts.1
    );
    println!(
        "peak RSS: {} KiB before the runs, {} KiB after (mesh state and {NODES} snapshots included)",
        rss_before,
        peak_rss_kib()
    );
}
