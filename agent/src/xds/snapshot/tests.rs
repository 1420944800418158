use serde_json::json;

use super::*;
use crate::test_helpers::publish_one_instance;

fn proxy(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).expect("identity")
}

/// `front-a` calls `a.local` (node `a`), `front-b` calls `b.local` (node `b`).
fn two_pairs() -> State {
    let back = |host: &str| {
        json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": host}}})
    };
    let front = |svc: &str| json!({"backends": [{"virtualService": {"virtualServiceName": svc}}]});
    let mut s = crate::test_helpers::mesh_state(
        json!({}),
        &[
            ("a", back("a.internal")),
            ("b", back("b.internal")),
            ("front-a", front("a.local")),
            ("front-b", front("b.local")),
        ],
        &[("a.local", "a"), ("b.local", "b")],
    );
    s.generation = 1;
    s
}

/// As the API does: the spec changes, the version moves, the state gets a new generation. b's
/// listener moves to another port, which its callers' routes name (a listener timeout would not
/// reach them: callers keep App Mesh's route defaults).
fn move_b(s: &State) -> State {
    let mut s = s.clone();
    let b = s
        .meshes
        .get_mut("m")
        .and_then(|m| m.virtual_nodes.get_mut("b"))
        .expect("node b");
    let listener = b.spec.listeners.as_mut().and_then(|l| l.first_mut());
    listener.expect("a listener").port_mapping.port = 8081;
    b.metadata.version += 1;
    s.generation += 1;
    s
}

#[test]
fn a_change_rebuilds_only_the_proxies_whose_inputs_it_touches_and_kept_ones_equal_fresh_ones() {
    let snapshots = Snapshots::default();
    let s1 = two_pairs();
    for p in ["front-a", "front-b"] {
        assert!(
            snapshots.get(&s1, &proxy(p)).expect("snapshot").1,
            "{p} built"
        );
    }
    let (a1, b1) = (
        snapshots.get(&s1, &proxy("front-a")).expect("snapshot").0,
        snapshots.get(&s1, &proxy("front-b")).expect("snapshot").0,
    );
    let s2 = move_b(&s1);
    let (a2, a_built) = snapshots.get(&s2, &proxy("front-a")).expect("snapshot");
    let (b2, b_built) = snapshots.get(&s2, &proxy("front-b")).expect("snapshot");
    assert!(!a_built, "front-a does not call b: kept");
    assert!(b_built, "front-b calls b: translated again");
    assert_eq!((a2.generation, a2.types.clone()), (2, a1.types.clone()));
    assert_ne!(
        b2.get(ROUTE),
        b1.get(ROUTE),
        "b's new port reaches front-b's route"
    );
    // What was kept is what a translation from nothing gives.
    for (p, kept) in [("front-a", &a2), ("front-b", &b2)] {
        let (fresh, _) = Snapshots::default().get(&s2, &proxy(p)).expect("snapshot");
        assert_eq!(kept.types, fresh.types, "{p}");
    }
    // A mesh change reaches every proxy.
    let mut s3 = s2.clone();
    let mesh = &mut s3.meshes.get_mut("m").expect("mesh").mesh;
    mesh.spec =
        serde_json::from_value(json!({"egressFilter": {"type": "ALLOW_ALL"}})).expect("spec");
    mesh.metadata.version += 1;
    s3.generation += 1;
    for p in ["front-a", "front-b"] {
        assert!(
            snapshots.get(&s3, &proxy(p)).expect("snapshot").1,
            "{p} rebuilt"
        );
    }
}

/// `front-a` calls `a.local` (DNS), `front-cm` calls `cm.local` (node `cm`, Cloud Map `ns/cm`).
fn dns_and_cloud_map() -> State {
    let listeners = json!([{"portMapping": {"port": 8080, "protocol": "http"}}]);
    let front = |svc: &str| json!({"backends": [{"virtualService": {"virtualServiceName": svc}}]});
    let mut s = crate::test_helpers::mesh_state(
        json!({}),
        &[
            (
                "a",
                json!({"listeners": listeners, "serviceDiscovery": {"dns": {"hostname": "a.internal"}}}),
            ),
            (
                "cm",
                json!({"listeners": listeners,
                    "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "cm"}}}),
            ),
            ("front-a", front("a.local")),
            ("front-cm", front("cm.local")),
        ],
        &[("a.local", "a"), ("cm.local", "cm")],
    );
    s.generation = 1;
    s
}

#[test]
fn an_endpoints_change_rebuilds_only_the_proxies_that_reach_its_cloud_map_service() {
    let state = Arc::new(dns_and_cloud_map());
    let (tx, rx) = debounce::channel(state.clone());
    let snapshots = Snapshots::new(rx);
    let get = |p: &str| snapshots.get(&state, &proxy(p)).expect("snapshot");
    assert!(get("front-a").1 && get("front-cm").1, "first built");
    publish_one_instance(&tx, &state, "cm", [10, 0, 0, 1].into(), 1);
    assert!(
        !get("front-a").1,
        "front-a reaches no Cloud Map service: kept"
    );
    let (cm, built) = get("front-cm");
    assert!(built, "front-cm's endpoints changed");
    assert!(
        cm.get(ENDPOINT)
            .is_some_and(|t| t.resources.contains_key("cds_egress_m_cm_http_8080"))
    );
    publish_one_instance(&tx, &state, "elsewhere", [10, 0, 0, 2].into(), 2);
    assert!(
        !get("front-a").1 && !get("front-cm").1,
        "a service nobody reaches: both kept"
    );
    publish_one_instance(&tx, &state, "cm", [10, 0, 0, 3].into(), 3);
    let (moved, built) = get("front-cm");
    assert!(built);
    assert_ne!(
        moved.get(ENDPOINT),
        cm.get(ENDPOINT),
        "the new instance is served"
    );
    // Kept or rebuilt, each equals a translation from nothing.
    let (fresh, _) = Snapshots::new(tx.subscribe())
        .get(&state, &proxy("front-cm"))
        .expect("snapshot");
    assert_eq!(fresh.types, moved.types);
}

#[test]
fn a_forgotten_proxy_is_translated_afresh() {
    let snapshots = Snapshots::default();
    let s = two_pairs();
    assert!(snapshots.get(&s, &proxy("front-a")).expect("snapshot").1);
    assert!(
        !snapshots.get(&s, &proxy("front-a")).expect("snapshot").1,
        "cached"
    );
    snapshots.forget(&proxy("front-a"));
    assert!(
        snapshots.get(&s, &proxy("front-a")).expect("snapshot").1,
        "built again"
    );
}
