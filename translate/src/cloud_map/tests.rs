//! Cloud Map instances → EDS: IP preference, listener port, keys a proxy needs.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};
use trellis_envoy_api::pb::envoy::config::core::v3::address;
use trellis_envoy_api::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use trellis_envoy_api::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;

use crate::*;

fn node(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).unwrap()
}

/// `back` discovered through Cloud Map (with `cloud_map` merged into its awsCloudMap), `front`
/// calling it; the mesh's spec is `mesh`.
fn mesh_with(cloud_map: Value, mesh: Value) -> State {
    let mut sd = json!({"namespaceName": "ns", "serviceName": "back"});
    if let (Some(sd), Some(extra)) = (sd.as_object_mut(), cloud_map.as_object()) {
        sd.extend(extra.clone());
    }
    trellis_model::testing::mesh_state(
        mesh,
        &[
            (
                "back-vn",
                json!({
                    "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                    "serviceDiscovery": {"awsCloudMap": sd}
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

fn key(attrs: &[(&str, &str)]) -> CloudMapKey {
    CloudMapKey {
        namespace: "ns".into(),
        service: "back".into(),
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn instance(id: &str, v4: Option<&str>, v6: Option<&str>) -> Instance {
    Instance {
        id: id.into(),
        ipv4: v4.map(|a| a.parse::<Ipv4Addr>().unwrap()),
        ipv6: v6.map(|a| a.parse::<Ipv6Addr>().unwrap()),
    }
}

fn endpoints(k: CloudMapKey, instances: Vec<Instance>) -> Endpoints {
    let mut e = Endpoints::new();
    e.cloud_map.insert(k, instances.into());
    e.generation = 1;
    e
}

/// (address, port) of every host in the front's assignment for back.
fn hosts(s: &State, e: &Endpoints) -> Vec<(String, u32)> {
    let r = translate(s, &node("front-vn"), e).unwrap();
    let cla = r
        .endpoints
        .iter()
        .find(|c| c.cluster_name == "cds_egress_m_back-vn_http_8080")
        .expect("an assignment for the Cloud Map cluster");
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => match &ep.address.as_ref()?.address {
                Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
                    Some(PortSpecifier::PortValue(p)) => Some((sa.address.clone(), p)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn two_stacks() -> Vec<Instance> {
    vec![
        instance("a", Some("10.0.0.1"), Some("fd00::1")),
        instance("b", Some("10.0.0.2"), None),
        instance("c", None, Some("fd00::3")),
    ]
}

/// virtual_nodes.md, "Default": "We use the IPv4 address returned by AWS Cloud Map if available
/// and falls back to using the IPv6 address".
#[test]
fn instances_become_endpoints_on_the_listener_port_ipv4_first_then_ipv6_by_default() {
    let s = mesh_with(json!({}), json!({}));
    let e = endpoints(key(&[]), two_stacks());
    assert_eq!(
        hosts(&s, &e),
        vec![
            ("10.0.0.1".into(), 8080),
            ("10.0.0.2".into(), 8080),
            ("fd00::3".into(), 8080)
        ]
    );
}

#[test]
fn ip_preference_picks_each_instance_address() {
    let cases = [
        ("IPv4_ONLY", vec!["10.0.0.1", "10.0.0.2"]),
        ("IPv6_ONLY", vec!["fd00::1", "fd00::3"]),
        ("IPv4_PREFERRED", vec!["10.0.0.1", "10.0.0.2", "fd00::3"]),
        ("IPv6_PREFERRED", vec!["10.0.0.2", "fd00::1", "fd00::3"]),
    ];
    for (pref, want) in cases {
        let s = mesh_with(json!({"ipPreference": pref}), json!({}));
        let got: Vec<String> = hosts(&s, &endpoints(key(&[]), two_stacks()))
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(got, want, "preference {pref}");
    }
}

#[test]
fn the_mesh_ip_preference_applies_when_the_node_has_none() {
    let s = mesh_with(
        json!({}),
        json!({"serviceDiscovery": {"ipPreference": "IPv6_ONLY"}}),
    );
    let got: Vec<String> = hosts(&s, &endpoints(key(&[]), two_stacks()))
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(got, vec!["fd00::1", "fd00::3"]);
}

#[test]
fn a_duplicated_instance_is_one_endpoint_and_cloud_map_order_does_not_matter() {
    let s = mesh_with(json!({}), json!({}));
    let a = endpoints(
        key(&[]),
        vec![
            instance("x", Some("10.0.0.9"), None),
            instance("x", Some("10.0.0.9"), None),
            instance("y", Some("10.0.0.1"), None),
        ],
    );
    let b = endpoints(
        key(&[]),
        vec![
            instance("y", Some("10.0.0.1"), None),
            instance("x", Some("10.0.0.9"), None),
        ],
    );
    assert_eq!(hosts(&s, &a), hosts(&s, &b));
    assert_eq!(hosts(&s, &a).len(), 2);
}

#[test]
fn attributes_are_part_of_the_key_in_any_order() {
    let s = mesh_with(
        json!({"attributes": [{"key": "zone", "value": "b"}, {"key": "stage", "value": "blue"}]}),
        json!({}),
    );
    let keys = cloud_map_keys(&s, &node("front-vn"));
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        vec![key(&[("stage", "blue"), ("zone", "b")])]
    );
    // Instances under the unfiltered key are not this cluster's: it is still waiting for its own.
    let r = translate(&s, &node("front-vn"), &endpoints(key(&[]), two_stacks())).unwrap();
    assert_eq!(r.pending, ["cds_egress_m_back-vn_http_8080"]);
    let filtered = endpoints(key(&[("zone", "b"), ("stage", "blue")]), two_stacks());
    assert_eq!(hosts(&s, &filtered).len(), 3);
}

#[test]
fn a_proxy_needs_the_keys_of_its_backends_only() {
    let s = mesh_with(json!({}), json!({}));
    assert_eq!(cloud_map_keys(&s, &node("front-vn")).len(), 1);
    assert!(
        cloud_map_keys(&s, &node("back-vn")).is_empty(),
        "back has no backends"
    );
}

#[test]
fn keys_are_found_through_routers() {
    let mut s = mesh_with(json!({}), json!({}));
    let m = s.meshes.get_mut("m").unwrap();
    m.virtual_services.insert(
        "back.local".into(),
        trellis_model::testing::resource(
            "back.local",
            serde_json::from_value(
                json!({"provider": {"virtualRouter": {"virtualRouterName": "r"}}}),
            )
            .unwrap(),
        ),
    );
    let route = serde_json::from_value(json!({"httpRoute": {
        "match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": "back-vn", "weight": 1}]}
    }}))
    .unwrap();
    m.routes
        .entry("r".into())
        .or_default()
        .insert("all".into(), trellis_model::testing::resource("all", route));
    assert_eq!(
        cloud_map_keys(&s, &node("front-vn"))
            .into_iter()
            .collect::<Vec<_>>(),
        vec![key(&[])]
    );
}

#[test]
fn an_undiscovered_key_sends_no_assignment_and_one_answered_empty_sends_an_empty_one() {
    let s = mesh_with(json!({}), json!({}));
    // Not answered yet (an agent just restarted): no assignment, so Envoy keeps its endpoints.
    let r = translate(&s, &node("front-vn"), &Endpoints::new()).unwrap();
    assert!(r.endpoints.is_empty());
    assert_eq!(r.pending, ["cds_egress_m_back-vn_http_8080"]);
    assert!(
        r.clusters
            .iter()
            .any(|c| c.name == "cds_egress_m_back-vn_http_8080"),
        "the cluster itself is there"
    );
    // Answered with no instances: an empty assignment.
    assert!(hosts(&s, &endpoints(key(&[]), vec![])).is_empty());
}

#[test]
fn a_gateway_needs_the_keys_behind_its_gateway_routes() {
    let mut s = mesh_with(json!({}), json!({}));
    let m = s.meshes.get_mut("m").unwrap();
    let route = serde_json::from_value(json!({"httpRoute": {
        "match": {"prefix": "/"},
        "action": {"target": {"virtualService": {"virtualServiceName": "back.local"}}}
    }}))
    .unwrap();
    m.gateway_routes.entry("gw".into()).or_default().insert(
        "to-back".into(),
        trellis_model::testing::resource("to-back", route),
    );
    let gw = ProxyIdentity::parse("mesh/m/virtualGateway/gw").unwrap();
    assert_eq!(
        cloud_map_keys(&s, &gw).into_iter().collect::<Vec<_>>(),
        vec![key(&[])]
    );
}
