//! Sharing changes nothing: every proxy translated with one memo equals it translated alone.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::node::virtual_node;
use crate::*;
use trellis_model::testing::resource;

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("spec")
}

fn http(port: u16) -> Value {
    json!({"portMapping": {"port": port, "protocol": "http"}})
}

fn backends(names: &[&str]) -> Value {
    names
        .iter()
        .map(|n| json!({"virtualService": {"virtualServiceName": n}}))
        .collect()
}

fn tls_policy(trust: Value) -> Value {
    json!({"tls": {"validation": {"trust": trust}}})
}

/// Services on routers, on nodes (DNS, Cloud Map answered and not yet answered, TCP), with
/// health checks and outlier detection; callers with no policy, with per-backend and default
/// TLS, and with an unservable (ACM) trust that refuses some of the shared clusters.
fn varied_mesh() -> State {
    let file = json!({"file": {"certificateChain": "/c/ca.pem"}});
    let acm = json!({"acm": {"certificateAuthorityArns": ["arn:aws:acm-pca:us-west-2:111122223333:certificate-authority/x"]}});
    let all = [
        "r0.local",
        "r1.local",
        "n4.local",
        "cm.local",
        "cm-new.local",
        "db.local",
        "none.local",
    ];
    let mut s = trellis_model::testing::mesh_state(
        json!({}),
        &[
            (
                "n0",
                json!({"listeners": [http(8080)], "serviceDiscovery": {"dns": {"hostname": "n0.internal"}}}),
            ),
            (
                "n1",
                json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2, "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}],
                "serviceDiscovery": {"dns": {"hostname": "n1.internal"}}}),
            ),
            (
                "n2",
                json!({"listeners": [{"portMapping": {"port": 9090, "protocol": "http2"},
                "outlierDetection": {"maxServerErrors": 5, "interval": {"unit": "s", "value": 10}, "baseEjectionDuration": {"unit": "s", "value": 30}, "maxEjectionPercent": 50}}],
                "serviceDiscovery": {"dns": {"hostname": "n2.internal"}}}),
            ),
            (
                "n4",
                json!({"listeners": [http(8080), {"portMapping": {"port": 8443, "protocol": "http"}, "timeout": {"http": {"perRequest": {"unit": "s", "value": 60}}}}],
                "serviceDiscovery": {"dns": {"hostname": "n4.internal"}}}),
            ),
            (
                "cm",
                json!({"listeners": [http(8080)], "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "cm"}}}),
            ),
            (
                "cm-new",
                json!({"listeners": [http(8080)], "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "new"}}}),
            ),
            (
                "db",
                json!({"listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}], "serviceDiscovery": {"dns": {"hostname": "db.internal"}}}),
            ),
            ("plain", json!({"backends": backends(&all)})),
            ("plain-too", json!({"backends": backends(&all[1..])})),
            (
                "tls-one",
                json!({"backends": [
                {"virtualService": {"virtualServiceName": "r0.local", "clientPolicy": tls_policy(file.clone())}},
                {"virtualService": {"virtualServiceName": "r1.local"}},
                {"virtualService": {"virtualServiceName": "n4.local"}}]}),
            ),
            (
                "tls-all",
                json!({"backends": backends(&all), "backendDefaults": {"clientPolicy": {"tls": {"ports": [8080], "validation": {"trust": file}}}}}),
            ),
            (
                "acm",
                json!({"backends": [
                {"virtualService": {"virtualServiceName": "r1.local", "clientPolicy": tls_policy(acm)}},
                {"virtualService": {"virtualServiceName": "r0.local"}},
                {"virtualService": {"virtualServiceName": "cm.local"}}]}),
            ),
        ],
        &[
            ("n4.local", "n4"),
            ("cm.local", "cm"),
            ("cm-new.local", "cm-new"),
            ("db.local", "db"),
        ],
    );
    let m = s.meshes.get_mut("m").expect("mesh m");
    for (router, targets) in [("r0", ["n0", "n1"]), ("r1", ["n1", "n2"])] {
        let port = if router == "r1" { 9090 } else { 8080 };
        let kind = if router == "r1" {
            "http2Route"
        } else {
            "httpRoute"
        };
        let proto = if router == "r1" { "http2" } else { "http" };
        m.virtual_routers.insert(
            router.into(),
            resource(
                router,
                from_json(
                    json!({"listeners": [{"portMapping": {"port": port, "protocol": proto}}]}),
                ),
            ),
        );
        let table = m.routes.entry(router.into()).or_default();
        for (j, prefix) in ["/a", "/b", "/"].iter().enumerate() {
            let route = json!({kind: {"match": {"prefix": prefix},
                "action": {"weightedTargets": [
                    {"virtualNode": targets[0], "weight": 70},
                    {"virtualNode": targets[1], "weight": 30}]}}});
            table.insert(format!("rt{j}"), resource("rt", from_json(route)));
        }
        let svc = json!({"provider": {"virtualRouter": {"virtualRouterName": router}}});
        m.virtual_services
            .insert(format!("{router}.local"), resource("s", from_json(svc)));
    }
    s
}

fn answered_cloud_map() -> Endpoints {
    let mut e = Endpoints::new();
    let key = CloudMapKey {
        namespace: "ns".into(),
        service: "cm".into(),
        attributes: Default::default(),
    };
    let one = Instance {
        id: "i-1".into(),
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 7)),
        ipv6: None,
    };
    e.cloud_map.insert(key, vec![one].into());
    e.generation = 3;
    e
}

/// The proxy's translation with nothing shared.
fn alone(s: &State, node: &str, e: &Endpoints) -> Encoded {
    let mesh = &s.meshes["m"];
    let ctx = Ctx::new("m", mesh, e);
    virtual_node(&ctx, node, &mesh.virtual_nodes[node].spec)
        .finish()
        .encode()
}

const CALLERS: [&str; 5] = ["plain", "plain-too", "tls-one", "tls-all", "acm"];

#[test]
fn every_proxy_translated_with_one_memo_equals_it_translated_alone() {
    let s = varied_mesh();
    let e = answered_cloud_map();
    for order in [CALLERS.to_vec(), CALLERS.iter().rev().copied().collect()] {
        let memo = Memo::new(s.generation, e.generation);
        for caller in order {
            let who = ProxyIdentity::parse(&format!("mesh/m/virtualNode/{caller}")).expect("id");
            let shared = translate_encoded(&s, &who, &e, &memo).expect("translate");
            assert_eq!(shared, alone(&s, caller, &e), "{caller}");
        }
    }
}

#[test]
fn the_fixture_exercises_shared_and_caller_own_parts() {
    let s = varied_mesh();
    let e = answered_cloud_map();
    let plain = translate(
        &s,
        &ProxyIdentity::parse("mesh/m/virtualNode/plain").expect("id"),
        &e,
    )
    .expect("translate");
    let acm = translate(
        &s,
        &ProxyIdentity::parse("mesh/m/virtualNode/acm").expect("id"),
        &e,
    )
    .expect("translate");
    // The ACM caller refuses r1's clusters, so its r1 host differs from the shared one.
    let hosts = |r: &Resources, rc: &str| {
        r.routes
            .iter()
            .find(|c| c.name == rc)
            .map(|c| c.virtual_hosts.clone())
    };
    assert_ne!(
        hosts(&plain, "rds_egress_http2_9090"),
        hosts(&acm, "rds_egress_http2_9090")
    );
    assert!(
        acm.unserved.iter().any(|u| u.contains("r1.local")),
        "{:?}",
        acm.unserved
    );
    // Cloud Map: one key answered (an assignment), one not yet (pending).
    assert!(
        plain
            .endpoints
            .iter()
            .any(|a| a.cluster_name == "cds_egress_m_cm_http_8080")
    );
    assert_eq!(plain.pending, ["cds_egress_m_cm-new_http_8080"]);
}

/// As the API does: a spec change bumps the resource's version.
fn update_route(s: &mut State, router: &str, route: &str, prefix: &str) {
    let r = s
        .meshes
        .get_mut("m")
        .expect("mesh m")
        .routes
        .get_mut(router)
        .expect("router")
        .get_mut(route)
        .expect("route");
    if let Some(http) = r.spec.http_route.as_mut().or(r.spec.http2_route.as_mut()) {
        http.r#match.prefix = Some(prefix.to_string());
    }
    r.metadata.version += 1;
}

#[test]
fn after_a_state_change_kept_plans_and_rebuilt_ones_equal_translating_alone() {
    let mut s = varied_mesh();
    let e = answered_cloud_map();
    let ids: Vec<ProxyIdentity> = CALLERS
        .iter()
        .map(|c| ProxyIdentity::parse(&format!("mesh/m/virtualNode/{c}")).expect("id"))
        .collect();
    let mut memo = Memo::new(s.generation, e.generation);
    let changes: [&dyn Fn(&mut State); 3] = [
        &|s| update_route(s, "r0", "rt0", "/changed"),
        &|s| {
            // A node the r1 routes reach goes away.
            s.meshes
                .get_mut("m")
                .expect("mesh m")
                .virtual_nodes
                .remove("n2");
        },
        &|s| update_route(s, "r1", "rt1", "/other"),
    ];
    for change in changes {
        for id in &ids {
            translate_encoded(&s, id, &e, &memo).expect("translate");
        }
        let before = translate(&s, &ids[0], &e).expect("translate");
        change(&mut s);
        s.generation += 1;
        memo = memo.next(s.generation, e.generation);
        for (id, caller) in ids.iter().zip(CALLERS) {
            let kept = translate_encoded(&s, id, &e, &memo).expect("translate");
            assert_eq!(kept, alone(&s, caller, &e), "{caller}");
        }
        assert_ne!(
            before,
            translate(&s, &ids[0], &e).expect("translate"),
            "the change shows"
        );
    }
}

/// This crate's Envoy types are generated apart from envoy-types, which the xDS layer and Envoy's
/// own API share: every resource of the varied mesh must read back in envoy-types with no field
/// unknown to it (re-encoding gives the same bytes), so both are the same schema.
#[test]
fn every_resource_reads_back_unchanged_in_envoy_types() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::Message;

    fn same<M: Message + Default>(items: &[Item]) -> usize {
        for item in items {
            let bytes = item.encode();
            let theirs = M::decode(bytes.as_slice()).expect("decodes in envoy-types");
            assert_eq!(theirs.encode_to_vec(), bytes, "{}", item.name);
        }
        items.len()
    }
    let s = varied_mesh();
    let e = answered_cloud_map();
    let mut checked = 0;
    for caller in CALLERS {
        let r = alone(&s, caller, &e);
        checked += same::<Cluster>(&r.clusters)
            + same::<ClusterLoadAssignment>(&r.endpoints)
            + same::<Listener>(&r.listeners)
            + same::<RouteConfiguration>(&r.routes);
    }
    assert!(
        checked > 40,
        "the fixture has resources of every kind: {checked}"
    );
}
