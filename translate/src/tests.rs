//! Translation pinned down without a network: names, chains, cluster kinds, egress filter.

use serde_json::{Value, json};
use trellis_envoy_api::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType,
};
use trellis_envoy_api::pb::envoy::config::listener::v3::Listener;
use trellis_envoy_api::pb::envoy::config::route::v3::RetryPolicy;

use super::*;
use crate::testing::{chain_ports, resource};
use trellis_model::{PortProtocol, State};

fn state(mesh_spec: Value, nodes: &[(&str, Value)], services: &[(&str, &str)]) -> State {
    trellis_model::testing::mesh_state(mesh_spec, nodes, services)
}

/// The translation without DROP_ALL's AWS API pass-through (the `*.amazonaws.com:443` chain and its
/// cluster), which every DROP_ALL proxy carries and which its own test pins down.
fn mesh_part(mut r: Resources) -> Resources {
    r.clusters.retain(|c| !c.name.ends_with("_amazonaws"));
    for l in &mut r.listeners {
        l.filter_chains.retain(|c| {
            c.filter_chain_match
                .as_ref()
                .is_none_or(|m| m.server_names != ["*.amazonaws.com"])
        });
    }
    r.listeners
        .retain(|l| !l.filter_chains.is_empty() || l.default_filter_chain.is_some());
    r
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

fn route<'a>(r: &'a Resources, name: &str) -> &'a RouteConfiguration {
    r.routes.iter().find(|rc| rc.name == name).unwrap()
}

#[test]
fn a_node_with_an_http_listener_gets_the_app_mesh_ingress_listener_and_a_static_local_cluster() {
    let r =
        mesh_part(translate(&two_tier("DROP_ALL"), &node("back-vn"), &Endpoints::new()).unwrap());
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
    let r =
        mesh_part(translate(&two_tier("DROP_ALL"), &node("front-vn"), &Endpoints::new()).unwrap());
    assert_eq!(
        names(&r.listeners, |l| &l.name),
        ["lds_egress_0.0.0.0_15001"]
    );
    let egress = listener(&r, "lds_egress_0.0.0.0_15001");
    assert_eq!(chain_ports(egress), [Some(8080), Some(EGRESS_PORT)]);
    assert!(
        egress.default_filter_chain.is_none(),
        "DROP_ALL has no passthrough"
    );
    assert_eq!(
        names(&r.clusters, |c| &c.name),
        ["cds_egress_m_back-vn_http_8080"]
    );
    assert_eq!(discovery(&r.clusters[0]), Some(DiscoveryType::LogicalDns));
    assert_eq!(
        names(&r.routes, |rc| &rc.name),
        ["rds_egress_http_15001", "rds_egress_http_8080"]
    );
    let vhosts = &route(&r, "rds_egress_http_8080").virtual_hosts;
    assert_eq!(vhosts.len(), 1);
    assert_eq!(vhosts[0].domains, ["back.local", "back.local:8080"]);
}

#[test]
fn an_app_using_envoy_as_http_proxy_reaches_every_http_backend_by_host_and_port() {
    let mut s = two_tier("ALLOW_ALL");
    let m = s.meshes.get_mut("m").unwrap();
    let back = &mut m.virtual_nodes.get_mut("back-vn").unwrap().spec;
    back.listeners.as_mut().unwrap().push(
        serde_json::from_value(json!({"portMapping": {"port": 80, "protocol": "http2"}})).unwrap(),
    );
    let r = mesh_part(translate(&s, &node("front-vn"), &Endpoints::new()).unwrap());
    let egress = listener(&r, "lds_egress_0.0.0.0_15001");
    assert_eq!(
        chain_ports(egress),
        [Some(80), Some(8080), Some(EGRESS_PORT)]
    );
    let explicit = route(&r, "rds_egress_http_15001");
    let hosts: Vec<_> = explicit
        .virtual_hosts
        .iter()
        .map(|v| (v.name.as_str(), v.domains.clone()))
        .collect();
    // No catch-all: ALLOW_ALL's original-destination pass-through has no destination here.
    assert_eq!(
        hosts,
        [
            (
                "back.local:80",
                vec!["back.local".to_string(), "back.local:80".into()]
            ),
            ("back.local:8080", vec!["back.local:8080".to_string()]),
        ]
    );
}

#[test]
fn a_backend_on_the_egress_port_keeps_it_and_there_is_no_explicit_route_config() {
    let mut s = two_tier("DROP_ALL");
    let m = s.meshes.get_mut("m").unwrap();
    let back = &mut m.virtual_nodes.get_mut("back-vn").unwrap().spec;
    back.listeners.as_mut().unwrap()[0].port_mapping.port = i64::from(EGRESS_PORT);
    let r = mesh_part(translate(&s, &node("front-vn"), &Endpoints::new()).unwrap());
    assert_eq!(
        chain_ports(listener(&r, "lds_egress_0.0.0.0_15001")),
        [Some(EGRESS_PORT)]
    );
    assert_eq!(names(&r.routes, |rc| &rc.name), ["rds_egress_http_15001"]);
    assert_eq!(
        route(&r, "rds_egress_http_15001").virtual_hosts[0].domains,
        ["back.local", "back.local:15001"]
    );
}

#[test]
fn allow_all_adds_a_passthrough_chain_and_catch_all_virtual_host() {
    let r =
        mesh_part(translate(&two_tier("ALLOW_ALL"), &node("front-vn"), &Endpoints::new()).unwrap());
    let egress = listener(&r, "lds_egress_0.0.0.0_15001");
    assert!(egress.default_filter_chain.is_some());
    let passthrough = r
        .clusters
        .iter()
        .find(|c| c.name == "cds_egress_m_allow_all")
        .unwrap();
    assert_eq!(discovery(passthrough), Some(DiscoveryType::OriginalDst));
    let domains: Vec<_> = route(&r, "rds_egress_http_8080")
        .virtual_hosts
        .iter()
        .map(|v| v.domains.clone())
        .collect();
    assert_eq!(domains.last().unwrap(), &["*"]);
}

#[test]
fn drop_all_with_nothing_to_route_to_keeps_only_the_aws_api_pass_through() {
    let mut s = two_tier("DROP_ALL");
    s.meshes
        .get_mut("m")
        .unwrap()
        .virtual_nodes
        .get_mut("front-vn")
        .unwrap()
        .spec
        .backends = None;
    let r = mesh_part(translate(&s, &node("front-vn"), &Endpoints::new()).unwrap());
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
    let r = mesh_part(translate(&s, &node("front-vn"), &Endpoints::new()).unwrap());
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
    let r = mesh_part(translate(&s, &node("app-vn"), &Endpoints::new()).unwrap());
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

// === Routers and routes ===

use trellis_envoy_api::pb::envoy::config::route::v3::{
    Route, RouteConfiguration, route, route_action, route_match,
};

fn routed(routes: &[(&str, serde_json::Value)], router_listeners: serde_json::Value) -> State {
    let mut s = state(
        json!({}),
        &[
            (
                "blue",
                json!({
                "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "blue.internal"}}}),
            ),
            (
                "red",
                json!({
                "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "red.internal"}}}),
            ),
            (
                "front",
                json!({"backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}),
            ),
        ],
        &[],
    );
    let m = s.meshes.get_mut("m").unwrap();
    m.virtual_routers.insert(
        "vr".into(),
        resource(
            "vr",
            serde_json::from_value(json!({"listeners": router_listeners})).unwrap(),
        ),
    );
    m.virtual_services.insert(
        "color.local".into(),
        resource(
            "color.local",
            serde_json::from_value(
                json!({"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}),
            )
            .unwrap(),
        ),
    );
    let table = m.routes.entry("vr".into()).or_default();
    for (name, spec) in routes {
        table.insert(
            name.to_string(),
            resource(name, serde_json::from_value(spec.clone()).unwrap()),
        );
    }
    s
}

fn http_listener() -> serde_json::Value {
    json!([{"portMapping": {"port": 9080, "protocol": "http"}}])
}

fn weighted(targets: &[(&str, i64)]) -> serde_json::Value {
    json!({"weightedTargets": targets.iter().map(|(n, w)| json!({"virtualNode": n, "weight": w})).collect::<Vec<_>>()})
}

fn route_config<'a>(r: &'a Resources, name: &str) -> &'a RouteConfiguration {
    r.routes
        .iter()
        .find(|rc| rc.name == name)
        .unwrap_or_else(|| panic!("no route config {name}"))
}

fn action(r: &Route) -> &trellis_envoy_api::pb::envoy::config::route::v3::RouteAction {
    match &r.action {
        Some(route::Action::Route(a)) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

#[test]
fn a_router_route_becomes_weighted_clusters_over_the_target_nodes() {
    let s = routed(
        &[(
            "split",
            json!({"httpRoute": {"match": {"prefix": "/"}, "action": weighted(&[("blue", 80), ("red", 20)])}}),
        )],
        http_listener(),
    );
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    assert_eq!(
        names(&r.clusters, |c| &c.name),
        ["cds_egress_m_blue_http_9080", "cds_egress_m_red_http_9080"]
    );
    let vh = &route_config(&r, "rds_egress_http_9080").virtual_hosts[0];
    assert_eq!(vh.domains, ["color.local", "color.local:9080"]);
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) =
        &action(&vh.routes[0]).cluster_specifier
    else {
        panic!("expected weighted clusters");
    };
    let split: Vec<_> = wc
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
        .collect();
    assert_eq!(
        split,
        [
            ("cds_egress_m_blue_http_9080", 80),
            ("cds_egress_m_red_http_9080", 20)
        ]
    );
}

#[test]
fn weight_zero_targets_stay_and_an_all_zero_route_answers_503() {
    let s = routed(
        &[
            (
                "a",
                json!({"priority": 1, "httpRoute": {"match": {"prefix": "/a"}, "action": weighted(&[("blue", 1), ("red", 0)])}}),
            ),
            (
                "b",
                json!({"priority": 2, "httpRoute": {"match": {"prefix": "/b"}, "action": weighted(&[("blue", 0)])}}),
            ),
        ],
        http_listener(),
    );
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    let vh = &route_config(&r, "rds_egress_http_9080").virtual_hosts[0];
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) =
        &action(&vh.routes[0]).cluster_specifier
    else {
        panic!("expected weighted clusters");
    };
    assert_eq!(wc.clusters.len(), 2);
    assert!(
        matches!(&vh.routes[1].action, Some(route::Action::DirectResponse(d)) if d.status == 503)
    );
}

#[test]
fn routes_are_ordered_by_priority_then_longest_match_then_name() {
    let s = routed(
        &[
            (
                "short",
                json!({"httpRoute": {"match": {"prefix": "/"}, "action": weighted(&[("blue", 1)])}}),
            ),
            (
                "long",
                json!({"httpRoute": {"match": {"prefix": "/api/v2"}, "action": weighted(&[("red", 1)])}}),
            ),
            (
                "first",
                json!({"priority": 0, "httpRoute": {"match": {"prefix": "/"}, "action": weighted(&[("red", 1)])}}),
            ),
            (
                "mid",
                json!({"httpRoute": {"match": {"prefix": "/api"}, "action": weighted(&[("blue", 1)])}}),
            ),
        ],
        http_listener(),
    );
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    let order: Vec<_> = route_config(&r, "rds_egress_http_9080").virtual_hosts[0]
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(order, ["first", "long", "mid", "short"]);
}

#[test]
fn http_matches_retries_and_timeouts_map_to_envoy_as_app_mesh_did() {
    let s = routed(
        &[(
            "r",
            json!({"httpRoute": {
        "match": {"path": {"regex": "/items/[0-9]+"}, "method": "POST", "scheme": "https",
                  "headers": [{"name": "x-canary", "match": {"exact": "1"}},
                              {"name": "x-debug", "invert": true},
                              {"name": "x-version", "match": {"range": {"start": 2, "end": 5}}}],
                  "queryParameters": [{"name": "tenant", "match": {"exact": "acme"}}]},
        "action": weighted(&[("blue", 1)]),
        "retryPolicy": {"maxRetries": 3, "perRetryTimeout": {"unit": "ms", "value": 250},
                        "httpRetryEvents": ["server-error", "client-error"], "tcpRetryEvents": ["connection-error"]},
        "timeout": {"perRequest": {"unit": "s", "value": 2}, "idle": {"unit": "s", "value": 30}}}}),
        )],
        http_listener(),
    );
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    let route = &route_config(&r, "rds_egress_http_9080").virtual_hosts[0].routes[0];
    let m = route.r#match.as_ref().unwrap();
    assert!(
        matches!(&m.path_specifier, Some(route_match::PathSpecifier::SafeRegex(re)) if re.regex == "/items/[0-9]+")
    );
    let headers: Vec<_> = m
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.invert_match))
        .collect();
    assert_eq!(
        headers,
        [
            ("x-canary", false),
            ("x-debug", true),
            ("x-version", false),
            (":method", false),
            (":scheme", false)
        ]
    );
    assert_eq!(m.query_parameters[0].name, "tenant");
    let a = action(route);
    assert_eq!(a.timeout.as_ref().unwrap().seconds, 2);
    assert_eq!(a.idle_timeout.as_ref().unwrap().seconds, 30);
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "5xx,retriable-4xx,connect-failure");
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 3);
    assert_eq!(retry.per_try_timeout.as_ref().unwrap().nanos, 250_000_000);
    assert_eq!(
        retry.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
}

/// envoy-defaults.md, "Default route retry policy": max retries 2; gRPC UNAVAILABLE; HTTP 503;
/// connect-failure and refused-stream; reset. No per-try timeout (a try may take the request's
/// whole timeout), on another host than the one that failed.
pub(crate) fn assert_app_mesh_default_retry(retry: &RetryPolicy) {
    assert_eq!(
        retry.retry_on,
        "unavailable,connect-failure,refused-stream,retriable-status-codes,reset"
    );
    assert_eq!(retry.retriable_status_codes, [503]);
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 2);
    assert!(retry.per_try_timeout.is_none());
    assert_eq!(retry.host_selection_retry_max_attempts, 5);
    assert_eq!(
        retry.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
}

#[test]
fn a_route_without_retry_policy_gets_app_mesh_defaults_from_its_virtual_host() {
    let s = routed(
        &[
            (
                "r",
                json!({"httpRoute": {"match": {"prefix": "/"}, "action": weighted(&[("blue", 1)])}}),
            ),
            (
                "s",
                json!({"httpRoute": {"match": {"prefix": "/s"}, "action": weighted(&[("blue", 1)]),
                    "retryPolicy": {"maxRetries": 5, "perRetryTimeout": {"unit": "ms", "value": 100}, "httpRetryEvents": ["server-error"]}}}),
            ),
        ],
        http_listener(),
    );
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    let vh = &route_config(&r, "rds_egress_http_9080").virtual_hosts[0];
    // Envoy applies the virtual host's policy to routes without their own, so the default is
    // carried once per virtual host rather than once per route.
    assert_app_mesh_default_retry(vh.retry_policy.as_ref().unwrap());
    let by_name = |n: &str| action(vh.routes.iter().find(|rt| rt.name == n).unwrap());
    let a = by_name("r");
    assert!(a.retry_policy.is_none(), "inherits the virtual host's");
    assert_eq!(a.timeout.as_ref().unwrap().seconds, 15);
    assert_eq!(a.idle_timeout.as_ref().unwrap().seconds, 300);
    let own = by_name("s");
    assert_eq!(own.retry_policy.as_ref().unwrap().retry_on, "5xx");
    assert_eq!(
        own.retry_policy
            .as_ref()
            .unwrap()
            .num_retries
            .as_ref()
            .unwrap()
            .value,
        5
    );
}

#[test]
fn grpc_routes_match_service_and_method_paths_and_only_grpc_requests() {
    let mut s = routed(
        &[(
            "g",
            json!({"grpcRoute": {"match": {"serviceName": "shop.Cart", "methodName": "Add",
        "metadata": [{"name": "tenant", "match": {"prefix": "ac"}}]}, "action": weighted(&[("blue", 1)])}}),
        )],
        json!([{"portMapping": {"port": 9080, "protocol": "grpc"}}]),
    );
    for n in ["blue", "red"] {
        let vn = s
            .meshes
            .get_mut("m")
            .unwrap()
            .virtual_nodes
            .get_mut(n)
            .unwrap();
        vn.spec.listeners.as_mut().unwrap()[0].port_mapping.protocol = PortProtocol::Grpc;
    }
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    let route = &route_config(&r, "rds_egress_grpc_9080").virtual_hosts[0].routes[0];
    let m = route.r#match.as_ref().unwrap();
    assert!(
        matches!(&m.path_specifier, Some(route_match::PathSpecifier::Path(p)) if p == "/shop.Cart/Add")
    );
    assert!(m.grpc.is_some());
    assert_eq!(m.headers[0].name, "tenant");
    let host_retry = route_config(&r, "rds_egress_grpc_9080").virtual_hosts[0]
        .retry_policy
        .as_ref()
        .unwrap();
    assert_app_mesh_default_retry(host_retry);
    assert_eq!(r.clusters[0].name, "cds_egress_m_blue_grpc_9080");
    assert!(
        r.clusters[0]
            .typed_extension_protocol_options
            .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    );
}

/// `front` calling a TCP router on 9080 whose one tcpRoute splits between blue and red by
/// `weights`.
fn tcp_routed(weights: &[(&str, i64)]) -> State {
    let mut s = routed(
        &[("t", json!({"tcpRoute": {"action": weighted(weights)}}))],
        json!([{"portMapping": {"port": 9080, "protocol": "tcp"}}]),
    );
    for n in ["blue", "red"] {
        let vn = s
            .meshes
            .get_mut("m")
            .unwrap()
            .virtual_nodes
            .get_mut(n)
            .unwrap();
        vn.spec.listeners.as_mut().unwrap()[0].port_mapping.protocol = PortProtocol::Tcp;
    }
    s
}

#[test]
fn a_tcp_route_splits_connections_by_weight() {
    let s = tcp_routed(&[("blue", 3), ("red", 1)]);
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    assert!(r.routes.is_empty());
    assert_eq!(chain_ports(&r.listeners[0]), [Some(9080)]);
    assert_eq!(r.clusters.len(), 2);
}

#[test]
fn a_tcp_route_leaves_out_weight_0_targets_which_envoys_tcp_proxy_refuses() {
    let s = tcp_routed(&[("blue", 3), ("red", 0)]);
    let r = mesh_part(translate(&s, &node("front"), &Endpoints::new()).unwrap());
    assert_eq!(
        tcp_chains_on(&r, 9080),
        [(vec![], "cds_egress_m_blue_tcp_9080".to_string())],
        "blue alone, not a weighted pair with a 0"
    );
}

#[test]
fn drop_all_still_passes_tls_to_amazonaws_com_on_443_by_sni() {
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
    assert_eq!(
        names(&r.listeners, |l| &l.name),
        ["lds_egress_0.0.0.0_15001"]
    );
    let egress = &r.listeners[0];
    assert_eq!(chain_ports(egress), [Some(443)]);
    let m = egress.filter_chains[0].filter_chain_match.as_ref().unwrap();
    assert_eq!(m.server_names, ["*.amazonaws.com"]);
    assert_eq!(m.transport_protocol, "tls");
    assert!(egress.default_filter_chain.is_none(), "nothing else passes");
    // The TLS inspector looks only at 443: elsewhere a server-first protocol (MySQL, a banner)
    // would wait for client bytes that never come.
    use trellis_envoy_api::pb::envoy::config::listener::v3::listener_filter_chain_match_predicate::Rule;
    let inspector = egress
        .listener_filters
        .iter()
        .find(|f| f.name == "envoy.filters.listener.tls_inspector")
        .unwrap();
    let Some(Rule::NotMatch(only)) = inspector.filter_disabled.as_ref().unwrap().rule.as_ref()
    else {
        panic!("disabled unless: {:?}", inspector.filter_disabled);
    };
    let Some(Rule::DestinationPortRange(range)) = only.rule.as_ref() else {
        panic!("a port range: {only:?}");
    };
    assert_eq!((range.start, range.end), (443, 444));
    assert_eq!(names(&r.clusters, |c| &c.name), ["cds_egress_m_amazonaws"]);
    assert_eq!(discovery(&r.clusters[0]), Some(DiscoveryType::OriginalDst));
    // ALLOW_ALL needs no special case: everything passes.
    let r = translate(&two_tier("ALLOW_ALL"), &node("front-vn"), &Endpoints::new()).unwrap();
    assert!(r.clusters.iter().all(|c| !c.name.ends_with("_amazonaws")));
}

/// Two databases on 5432 (`pg-a.local`, `pg-b.local`) and an HTTP service, for `front`.
fn two_tcp_on_one_port() -> State {
    let tcp = |host: &str| {
        json!({
            "listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}],
            "serviceDiscovery": {"dns": {"hostname": host}}
        })
    };
    state(
        json!({}),
        &[
            ("pg-a", tcp("pg-a.internal")),
            ("pg-b", tcp("pg-b.internal")),
            (
                "web",
                json!({
                    "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                    "serviceDiscovery": {"dns": {"hostname": "web.internal"}}
                }),
            ),
            (
                "front",
                json!({"backends": [
                    {"virtualService": {"virtualServiceName": "pg-b.local"}},
                    {"virtualService": {"virtualServiceName": "pg-a.local"}},
                    {"virtualService": {"virtualServiceName": "web.local"}}
                ]}),
            ),
        ],
        &[
            ("pg-a.local", "pg-a"),
            ("pg-b.local", "pg-b"),
            ("web.local", "web"),
        ],
    )
}

/// The (prefix ranges, cluster) of each egress chain on `port`.
fn tcp_chains_on(r: &Resources, port: u32) -> Vec<(Vec<String>, String)> {
    use trellis_envoy_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier,
    };
    listener(r, "lds_egress_0.0.0.0_15001")
        .filter_chains
        .iter()
        .filter_map(|c| {
            let m = c.filter_chain_match.as_ref()?;
            (m.destination_port.as_ref()?.value == port).then_some(())?;
            let ranges = m
                .prefix_ranges
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.address_prefix,
                        p.prefix_len.map_or(0, |l| l.value)
                    )
                })
                .collect();
            let typed = match c.filters[0].config_type.as_ref()? {
                trellis_envoy_api::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                    t,
                ) => t,
                _ => return None,
            };
            let tcp = <TcpProxy as prost::Message>::decode(typed.value.as_slice()).ok()?;
            let Some(ClusterSpecifier::Cluster(cluster)) = tcp.cluster_specifier else {
                return None;
            };
            Some((ranges, cluster))
        })
        .collect()
}

#[test]
fn tcp_services_sharing_a_port_are_told_apart_by_the_addresses_their_names_resolve_to() {
    let s = two_tcp_on_one_port();
    assert_eq!(
        shared_tcp_services(&s, &node("front")),
        ["pg-a.local".to_string(), "pg-b.local".to_string()].into(),
        "the HTTP backend needs no address"
    );
    // Not resolved yet: the first by name takes the port, as App Mesh did.
    let r = translate(&s, &node("front"), &Endpoints::new()).unwrap();
    assert_eq!(
        tcp_chains_on(&r, 5432),
        [(vec![], "cds_egress_m_pg-a_tcp_5432".to_string())]
    );

    let mut e = Endpoints::new();
    e.addresses
        .insert("pg-a.local".into(), ["10.0.0.5".parse().unwrap()].into());
    e.addresses.insert(
        "pg-b.local".into(),
        ["10.0.0.6".parse().unwrap(), "fd00::6".parse().unwrap()].into(),
    );
    let r = translate(&s, &node("front"), &e).unwrap();
    assert_eq!(
        tcp_chains_on(&r, 5432),
        [
            (
                vec!["10.0.0.5/32".into()],
                "cds_egress_m_pg-a_tcp_5432".into()
            ),
            (
                vec!["10.0.0.6/32".into(), "fd00::6/128".into()],
                "cds_egress_m_pg-b_tcp_5432".into()
            ),
            (vec![], "cds_egress_m_pg-a_tcp_5432".to_string()),
        ]
    );
}

#[test]
fn an_address_two_tcp_names_share_goes_to_the_first_by_name_only() {
    let s = two_tcp_on_one_port();
    let mut e = Endpoints::new();
    for name in ["pg-a.local", "pg-b.local"] {
        e.addresses
            .insert(name.into(), ["10.0.0.5".parse().unwrap()].into());
    }
    let r = translate(&s, &node("front"), &e).unwrap();
    assert_eq!(
        tcp_chains_on(&r, 5432),
        [
            (
                vec!["10.0.0.5/32".into()],
                "cds_egress_m_pg-a_tcp_5432".into()
            ),
            (vec![], "cds_egress_m_pg-a_tcp_5432".to_string()),
        ],
        "Envoy refuses two chains with one match"
    );
    // A lone TCP service on its port needs no address.
    assert!(shared_tcp_services(&two_tier("DROP_ALL"), &node("front-vn")).is_empty());
}
