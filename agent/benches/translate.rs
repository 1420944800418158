//! `cargo bench -p trellis-agent --bench translate`: translation at App Mesh quota scale
//! (200 nodes, 200 services, 200 routers × 50 routes), time and allocated memory.
//!
//! A plain harness (no criterion): it prints medians of repeated runs. Figures depend on the
//! machine; compare them as ratios or with the machine named.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_agent::model::{MeshState, ProxyIdentity, State};
use trellis_agent::test_helpers::{mesh_resource, resource};
use trellis_agent::translate::{Endpoints, translate};
use trellis_agent::xds::snapshot::Snapshot;

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
            "serviceDiscovery": {"dns": {"hostname": format!("n{i}.internal")}},
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

fn main() {
    let state = quota_mesh();
    let ids: Vec<ProxyIdentity> = (0..NODES)
        .map(|i| ProxyIdentity::parse(&format!("mesh/m/virtualNode/n{i}")).expect("identity"))
        .collect();
    let endpoints = Endpoints::new();

    // One proxy: 50 backends, each a router with 50 routes.
    let mut one = Vec::new();
    let mut encoded = 0;
    let rss_before = peak_rss_kib();
    for _ in 0..20 {
        let t = Instant::now();
        let r = translate(&state, &ids[0], &endpoints).expect("translate");
        let snap = Snapshot::from_resources(1, r);
        one.push(t.elapsed());
        encoded = snap
            .types
            .values()
            .flat_map(|t| t.resources.values())
            .map(|a| a.value.len())
            .sum::<usize>();
        std::hint::black_box(snap);
    }
    let mut only = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        std::hint::black_box(translate(&state, &ids[0], &endpoints).expect("translate"));
        only.push(t.elapsed());
    }
    println!(
        "translate_one_proxy   (translation alone, no snapshot): median {:?}",
        median(only)
    );
    // Every proxy of the mesh.
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for id in &ids {
            let r = translate(&state, id, &endpoints).expect("translate");
            std::hint::black_box(Snapshot::from_resources(1, r));
        }
        all.push(t.elapsed());
    }
    println!(
        "translate_one_proxy   (50 backends x 50 routes, with snapshot hashing): median {:?}, snapshot {} KiB encoded",
        median(one),
        encoded / 1024
    );
    println!(
        "translate_all_proxies ({NODES} proxies): median {:?}",
        median(all)
    );
    println!(
        "peak RSS: {} KiB before the runs, {} KiB after (mesh state included)",
        rss_before,
        peak_rss_kib()
    );
    println!(
        "note: a change rebuilds only the proxies whose streams are connected, each once per store generation"
    );
}
