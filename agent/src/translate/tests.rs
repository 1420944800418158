//! Translation pinned down without a network: names, chains, cluster kinds, egress filter.

use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use serde_json::json;

use super::*;
use crate::model::{MeshSpec, MeshState, State};
use crate::test_helpers::{mesh_resource, resource};

fn state(
    mesh_spec: serde_json::Value,
    nodes: &[(&str, serde_json::Value)],
    services: &[(&str, &str)],
) -> State {
    let mut m: MeshState = mesh_resource("m");
    m.mesh.spec = serde_json::from_value::<MeshSpec>(mesh_spec).unwrap();
    for (name, spec) in nodes {
        m.virtual_nodes.insert(
            name.to_string(),
            resource(name, serde_json::from_value(spec.clone()).unwrap()),
        );
    }
    for (name, provider) in services {
        let spec = json!({"provider": {"virtualNode": {"virtualNodeName": provider}}});
        m.virtual_services.insert(
            name.to_string(),
            resource(name, serde_json::from_value(spec).unwrap()),
        );
    }
    let mut s = State::default();
    s.meshes.insert("m".into(), m);
    s
}

fn node(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).unwrap()
}

fn two_tier(egress: &str) -> State {
    state(
        json!({"egressFilter": {"type": egress}}),
        &[
            (
                "back-vn",
                json!({
                    "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                    "serviceDiscovery": {"dns": {"hostname": "back.internal"}}
                }),
            ),
            (
                "front-vn",
                json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}),
            ),
        ],
        &[("back.local", "back-vn")],
    )
}

fn names<T>(items: &[T], f: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| f(i).to_string()).collect()
}

fn discovery(c: &Cluster) -> Option<DiscoveryType> {
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(t).ok(),
        _ => None,
    }
}

fn listener<'a>(r: &'a Resources, name: &str) -> &'a Listener {
    r.listeners.iter().find(|l| l.name == name).unwrap()
}

#[test]
fn a_node_with_an_http_listener_gets_the_app_mesh_ingress_listener_and_a_static_local_cluster() {
    let r = translate(&two_tier("DROP_ALL"), &node("back-vn"), &Endpoints::new()).unwrap();
    assert_eq!(
        names(&r.listeners, |l| &l.name),
        ["lds_ingress_0.0.0.0_15000"]
    );
    assert_eq!(
        chain_ports(listener(&r, "lds_ingress_0.0.0.0_15000")),
        [Some(8080)]
    );
    assert_eq!(
        names(&r.clusters, |c| &c.name),
        ["cds_ingress_m_back-vn_http_8080"]
    );
    assert_eq!(discovery(&r.clusters[0]), Some(DiscoveryType::Static));
    assert_eq!(names(&r.routes, |rc| &rc.name), ["rds_ingress_http_8080"]);
}

#[test]
fn a_backend_becomes_an_egress_virtual_host_with_both_domains_and_a_logical_dns_cluster() {
    let r = translate(&two_tier("DROP_ALL"), &node("front-vn"), &Endpoints::new()).unwrap();
    assert_eq!(
        names(&r.listeners, |l| &l.name),
        ["lds_egress_0.0.0.0_15001"]
    );
    let egress = listener(&r, "lds_egress_0.0.0.0_15001");
    assert_eq!(chain_ports(egress), [Some(8080)]);
    assert!(
        egress.default_filter_chain.is_none(),
        "DROP_ALL has no passthrough"
    );
    assert_eq!(
        names(&r.clusters, |c| &c.name),
        ["cds_egress_m_back-vn_http_8080"]
    );
    assert_eq!(discovery(&r.clusters[0]), Some(DiscoveryType::LogicalDns));
    assert_eq!(names(&r.routes, |rc| &rc.name), ["rds_egress_http_8080"]);
    let vhosts = &r.routes[0].virtual_hosts;
    assert_eq!(vhosts.len(), 1);
    assert_eq!(vhosts[0].domains, ["back.local", "back.local:8080"]);
}

#[test]
fn allow_all_adds_a_passthrough_chain_and_catch_all_virtual_host() {
    let r = translate(&two_tier("ALLOW_ALL"), &node("front-vn"), &Endpoints::new()).unwrap();
    let egress = listener(&r, "lds_egress_0.0.0.0_15001");
    assert!(egress.default_filter_chain.is_some());
    let passthrough = r
        .clusters
        .iter()
        .find(|c| c.name == "cds_egress_m_allow_all")
        .unwrap();
    assert_eq!(discovery(passthrough), Some(DiscoveryType::OriginalDst));
    let domains: Vec<_> = r.routes[0]
        .virtual_hosts
        .iter()
        .map(|v| v.domains.clone())
        .collect();
    assert_eq!(domains.last().unwrap(), &["*"]);
}

#[test]
fn drop_all_with_nothing_to_route_to_sends_no_egress_listener_rather_than_an_empty_one() {
    let mut s = two_tier("DROP_ALL");
    s.meshes
        .get_mut("m")
        .unwrap()
        .virtual_nodes
        .get_mut("front-vn")
        .unwrap()
        .spec
        .backends = None;
    let r = translate(&s, &node("front-vn"), &Endpoints::new()).unwrap();
    assert!(r.listeners.is_empty());
    assert!(r.clusters.is_empty());
}

#[test]
fn backends_to_missing_services_or_providers_are_skipped_not_errors() {
    let s = state(
        json!({}),
        &[(
            "front-vn",
            json!({"backends": [
            {"virtualService": {"virtualServiceName": "nowhere.local"}},
            {"virtualService": {"virtualServiceName": "orphan.local"}}]}),
        )],
        &[("orphan.local", "gone-vn")],
    );
    let r = translate(&s, &node("front-vn"), &Endpoints::new()).unwrap();
    assert!(r.listeners.is_empty());
}

#[test]
fn dns_endpoints_response_type_uses_strict_dns_and_tcp_uses_tcp_proxy_without_routes() {
    let s = state(
        json!({}),
        &[
            (
                "db-vn",
                json!({
                    "listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}],
                    "serviceDiscovery": {"dns": {"hostname": "db.internal", "responseType": "ENDPOINTS"}}
                }),
            ),
            (
                "app-vn",
                json!({"backends": [{"virtualService": {"virtualServiceName": "db.local"}}]}),
            ),
        ],
        &[("db.local", "db-vn")],
    );
    let r = translate(&s, &node("app-vn"), &Endpoints::new()).unwrap();
    assert_eq!(discovery(&r.clusters[0]), Some(DiscoveryType::StrictDns));
    assert_eq!(r.clusters[0].name, "cds_egress_m_db-vn_tcp_5432");
    assert!(r.routes.is_empty());
    assert_eq!(chain_ports(&r.listeners[0]), [Some(5432)]);
}

#[test]
fn unknown_proxies_are_errors_that_name_them() {
    let s = two_tier("DROP_ALL");
    let e = translate(&s, &node("ghost"), &Endpoints::new()).unwrap_err();
    assert_eq!(e.to_string(), "virtual node ghost not found in mesh m");
    let other_mesh = ProxyIdentity::parse("mesh/x/virtualNode/a").unwrap();
    assert_eq!(
        translate(&s, &other_mesh, &Endpoints::new())
            .unwrap_err()
            .to_string(),
        "mesh x not found"
    );
}

#[test]
fn translation_is_deterministic() {
    let s = two_tier("ALLOW_ALL");
    let a = translate(&s, &node("front-vn"), &Endpoints::new()).unwrap();
    let b = translate(&s, &node("front-vn"), &Endpoints::new()).unwrap();
    assert_eq!(a, b);
}
