//! Gateway translation pinned down without a network: names, order, matches, rewrites, targets.

use serde_json::{Value, json};
use trellis_envoy_api::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, header_matcher, query_parameter_matcher,
    route, route_action, route_match,
};
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;

use super::*;
use crate::Resources;
use crate::{Endpoints, translate};
use trellis_model::testing::{mesh_resource, resource};
use trellis_model::{ProxyIdentity, State};

fn node(port: i64) -> Value {
    json!({
        "listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": "x.internal"}}
    })
}

/// Nodes a-vn, b-vn, c-vn (http 8080); services a.local → a-vn, b.local → b-vn, r.local →
/// router vr (http 8080) with `router_routes`; gateway gw with `listeners` and `gateway_routes`.
fn state(
    listeners: Value,
    gateway_routes: &[(&str, Value)],
    router_routes: &[(&str, Value)],
) -> State {
    let mut m = mesh_resource("m");
    for n in ["a-vn", "b-vn", "c-vn"] {
        m.virtual_nodes.insert(
            n.into(),
            resource(n, serde_json::from_value(node(8080)).unwrap()),
        );
    }
    let services = [
        (
            "a.local",
            json!({"virtualNode": {"virtualNodeName": "a-vn"}}),
        ),
        (
            "b.local",
            json!({"virtualNode": {"virtualNodeName": "b-vn"}}),
        ),
        (
            "r.local",
            json!({"virtualRouter": {"virtualRouterName": "vr"}}),
        ),
        (
            "gone.local",
            json!({"virtualNode": {"virtualNodeName": "no-such-vn"}}),
        ),
    ];
    for (name, provider) in services {
        m.virtual_services.insert(
            name.into(),
            resource(
                name,
                serde_json::from_value(json!({ "provider": provider })).unwrap(),
            ),
        );
    }
    m.virtual_routers.insert(
        "vr".into(),
        resource(
            "vr",
            serde_json::from_value(
                json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}),
            )
            .unwrap(),
        ),
    );
    for (name, spec) in router_routes {
        m.routes.entry("vr".into()).or_default().insert(
            name.to_string(),
            resource(name, serde_json::from_value(spec.clone()).unwrap()),
        );
    }
    // `listeners` is the listener array, or a whole gateway spec.
    let spec = if listeners.is_array() {
        json!({ "listeners": listeners })
    } else {
        listeners
    };
    m.virtual_gateways.insert(
        "gw".into(),
        resource("gw", serde_json::from_value(spec).unwrap()),
    );
    for (name, spec) in gateway_routes {
        m.gateway_routes.entry("gw".into()).or_default().insert(
            name.to_string(),
            resource(name, serde_json::from_value(spec.clone()).unwrap()),
        );
    }
    let mut s = State::default();
    s.meshes.insert("m".into(), m);
    s
}

fn http_listener(port: i64) -> Value {
    json!([{"portMapping": {"port": port, "protocol": "http"}}])
}

fn http_to(service: &str, r#match: Value) -> Value {
    json!({"httpRoute": {"match": r#match, "action": {"target": {"virtualService": {"virtualServiceName": service}}}}})
}

fn gateway(s: &State) -> Resources {
    let who = ProxyIdentity::parse("mesh/m/virtualGateway/gw").unwrap();
    translate(s, &who, &Endpoints::new()).unwrap()
}

fn routes_of<'a>(r: &'a Resources, name: &str) -> &'a [Route] {
    let rc: &RouteConfiguration = r.routes.iter().find(|rc| rc.name == name).unwrap();
    assert_eq!(rc.virtual_hosts.len(), 1);
    assert_eq!(rc.virtual_hosts[0].name, "ingress");
    assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
    &rc.virtual_hosts[0].routes
}

fn names(routes: &[Route]) -> Vec<&str> {
    routes.iter().map(|r| r.name.as_str()).collect()
}

fn action(r: &Route) -> &RouteAction {
    match &r.action {
        Some(route::Action::Route(a)) => a,
        other => panic!("{} is not a route action: {other:?}", r.name),
    }
}

fn cluster(r: &Route) -> &str {
    match &action(r).cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => c,
        other => panic!("{} has no single cluster: {other:?}", r.name),
    }
}

fn host_rewrite(r: &Route) -> Option<&str> {
    match &action(r).host_rewrite_specifier {
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h),
        _ => None,
    }
}

fn whole_path_rewrite(r: &Route) -> Option<&str> {
    action(r).regex_rewrite.as_ref().map(|rr| {
        assert_eq!(rr.pattern.as_ref().unwrap().regex, "^.*$");
        rr.substitution.as_str()
    })
}

fn path(r: &Route) -> &route_match::PathSpecifier {
    r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap()
}

fn prefix(p: &str) -> route_match::PathSpecifier {
    route_match::PathSpecifier::Prefix(p.into())
}

fn string_pattern(h: &HeaderMatcher) -> &MatchPattern {
    match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => {
            s.match_pattern.as_ref().unwrap()
        }
        other => panic!("{} is not a string match: {other:?}", h.name),
    }
}

fn headers(r: &Route) -> &[HeaderMatcher] {
    &r.r#match.as_ref().unwrap().headers
}

#[test]
fn each_gateway_listener_gets_lds_ingress_on_its_port_and_an_rds_named_after_protocol_and_port() {
    let s = state(
        json!([
            {"portMapping": {"port": 8080, "protocol": "http"}},
            {"portMapping": {"port": 9090, "protocol": "grpc"}}
        ]),
        &[],
        &[],
    );
    let r = gateway(&s);
    let listeners: Vec<&str> = r.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        listeners,
        ["lds_ingress_0.0.0.0_8080", "lds_ingress_0.0.0.0_9090"]
    );
    for (l, port) in r.listeners.iter().zip([8080, 9090]) {
        assert_eq!(
            crate::testing::chain_ports(l),
            [None],
            "one chain, any port"
        );
        assert!(
            l.listener_filters.is_empty(),
            "no original_dst: a gateway has no iptables redirect"
        );
        let addr = format!("{:?}", l.address);
        assert!(addr.contains("0.0.0.0") && addr.contains(&format!("PortValue({port})")));
    }
    let rds: Vec<&str> = r.routes.iter().map(|rc| rc.name.as_str()).collect();
    assert_eq!(rds, ["rds_ingress_grpc_9090", "rds_ingress_http_8080"]);
    assert!(
        routes_of(&r, "rds_ingress_http_8080").is_empty(),
        "no gateway routes: the listener still listens and answers 404"
    );
    assert!(r.clusters.is_empty());
}

#[test]
fn a_node_provided_target_uses_the_egress_cluster_with_app_mesh_default_rewrites() {
    let s = state(
        http_listener(8080),
        &[("to-a", http_to("a.local", json!({"prefix": "/a/"})))],
        &[],
    );
    let r = gateway(&s);
    let names_of: Vec<&str> = r.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names_of, ["cds_egress_m_a-vn_http_8080"]);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    assert_eq!(names(routes), ["to-a"]);
    assert_eq!(*path(&routes[0]), prefix("/a/"));
    assert_eq!(cluster(&routes[0]), "cds_egress_m_a-vn_http_8080");
    assert_eq!(
        action(&routes[0]).prefix_rewrite,
        "/",
        "the matched prefix becomes /"
    );
    assert_eq!(
        host_rewrite(&routes[0]),
        Some("a.local"),
        "Host becomes the target service's name"
    );
}

/// virtual_gateways.md: "if you have configured the Gateway route match prefix to `/chapter`,
/// and, if the incoming request is `/chapter/1`, the request would be rewritten to `/1`"; and
/// `/chapter1` to `/1` (aws-app-mesh-roadmap#247). Envoy's verbatim prefix rewrite needs the
/// `/chapter/` form first for that.
#[test]
fn a_prefix_without_a_trailing_slash_is_rewritten_as_app_mesh_did() {
    let s = state(
        http_listener(8080),
        &[
            ("chapter", http_to("a.local", json!({"prefix": "/chapter"}))),
            (
                "book",
                json!({"httpRoute": {"match": {"prefix": "/book"}, "action": {
                    "target": {"virtualService": {"virtualServiceName": "b.local"}},
                    "rewrite": {"prefix": {"value": "/library/"}}}}}),
            ),
            (
                "kept",
                json!({"httpRoute": {"match": {"prefix": "/kept"}, "action": {
                    "target": {"virtualService": {"virtualServiceName": "b.local"}},
                    "rewrite": {"prefix": {"defaultPrefix": "DISABLED"}}}}}),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    let seen: Vec<(&str, route_match::PathSpecifier, &str)> = routes
        .iter()
        .map(|rt| {
            (
                rt.name.as_str(),
                path(rt).clone(),
                action(rt).prefix_rewrite.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("chapter", prefix("/chapter/"), "/"),
            ("chapter", prefix("/chapter"), "/"),
            ("book", prefix("/book/"), "/library/"),
            ("book", prefix("/book"), "/library/"),
            ("kept", prefix("/kept"), ""),
        ]
    );
}

/// howto-match-and-rewrite-at-ingress: gateway route `/red` to a router whose route matches
/// `/tell`; `GET /red/tell` reaches red (forwarded as `/tell`).
#[test]
fn a_prefix_without_a_trailing_slash_composes_with_the_router_routes() {
    let s = state(
        http_listener(8080),
        &[("red", http_to("r.local", json!({"prefix": "/red"})))],
        &[(
            "tell",
            json!({"httpRoute": {"match": {"prefix": "/tell"},
                "action": {"weightedTargets": [{"virtualNode": "a-vn", "weight": 1}]}}}),
        )],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    let seen: Vec<(&str, route_match::PathSpecifier)> = routes
        .iter()
        .map(|rt| (rt.name.as_str(), path(rt).clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("red/tell", prefix("/red/tell")),
            ("red/no-route", prefix("/red/")),
            ("red/tell", prefix("/redtell")),
            ("red/no-route", prefix("/red")),
        ]
    );
    assert_eq!(action(&routes[0]).prefix_rewrite, "/tell");
    assert_eq!(action(&routes[2]).prefix_rewrite, "/tell");
}

/// envoy-defaults.md: the default retry policy applies wherever no retry policy is defined,
/// gateway routes included; the gateway's listener stats carry App Mesh's `ingress.PROTO.PORT`.
#[test]
fn gateway_routes_without_their_own_policy_take_app_mesh_default_retries() {
    let s = state(
        http_listener(8080),
        &[
            ("to-a", http_to("a.local", json!({"prefix": "/a/"}))),
            ("to-r", http_to("r.local", json!({"prefix": "/r/"}))),
        ],
        &[
            (
                "plain",
                json!({"httpRoute": {"match": {"prefix": "/"},
                    "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
            ),
            (
                "own",
                json!({"httpRoute": {"match": {"prefix": "/own"},
                    "retryPolicy": {"maxRetries": 4, "perRetryTimeout": {"unit": "ms", "value": 250},
                                    "httpRetryEvents": ["server-error"]},
                    "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
            ),
        ],
    );
    let r = gateway(&s);
    let rc = r
        .routes
        .iter()
        .find(|rc| rc.name == "rds_ingress_http_8080")
        .unwrap();
    crate::tests::assert_app_mesh_default_retry(rc.virtual_hosts[0].retry_policy.as_ref().unwrap());
    let routes = &rc.virtual_hosts[0].routes;
    let by = |n: &str| routes.iter().find(|rt| rt.name == n).unwrap();
    assert!(
        action(by("to-a")).retry_policy.is_none(),
        "the virtual host's"
    );
    assert_eq!(action(by("to-a")).timeout.as_ref().unwrap().seconds, 15);
    assert_eq!(
        action(by("to-a")).idle_timeout.as_ref().unwrap().seconds,
        300
    );
    assert!(
        action(by("to-r/plain")).retry_policy.is_none(),
        "the virtual host's"
    );
    assert_eq!(
        action(by("to-r/own"))
            .retry_policy
            .as_ref()
            .unwrap()
            .num_retries
            .as_ref()
            .unwrap()
            .value,
        4
    );
}

#[test]
fn prefix_rewrite_value_and_disabled_defaults_are_honoured() {
    let with_rewrite = |rewrite: Value| {
        json!({"httpRoute": {"match": {"prefix": "/old/"}, "action": {
            "target": {"virtualService": {"virtualServiceName": "a.local"}}, "rewrite": rewrite}}})
    };
    let s = state(
        http_listener(8080),
        &[
            ("value", with_rewrite(json!({"prefix": {"value": "/new/"}}))),
            (
                "disabled",
                with_rewrite(json!({
                    "prefix": {"defaultPrefix": "DISABLED"},
                    "hostname": {"defaultTargetHostname": "DISABLED"}
                })),
            ),
            (
                "enabled",
                with_rewrite(json!({"prefix": {"defaultPrefix": "ENABLED"},
                    "hostname": {"defaultTargetHostname": "ENABLED"}})),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    let by = |n: &str| routes.iter().find(|r| r.name == n).unwrap();
    assert_eq!(action(by("value")).prefix_rewrite, "/new/");
    assert_eq!(host_rewrite(by("value")), Some("a.local"));
    assert_eq!(
        action(by("disabled")).prefix_rewrite,
        "",
        "no prefix rewrite"
    );
    assert_eq!(host_rewrite(by("disabled")), None, "Host kept");
    assert_eq!(action(by("enabled")).prefix_rewrite, "/");
    assert_eq!(host_rewrite(by("enabled")), Some("a.local"));
}

#[test]
fn exact_and_regex_paths_match_and_a_path_rewrite_replaces_the_whole_path() {
    let s = state(
        http_listener(8080),
        &[
            (
                "exact",
                json!({"httpRoute": {"match": {"path": {"exact": "/health"}}, "action": {
                    "target": {"virtualService": {"virtualServiceName": "b.local"}},
                    "rewrite": {"path": {"exact": "/status"}}}}}),
            ),
            (
                "regex",
                http_to("a.local", json!({"path": {"regex": "/v[0-9]+/.*"}})),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    let exact = routes.iter().find(|r| r.name == "exact").unwrap();
    assert_eq!(
        *path(exact),
        route_match::PathSpecifier::Path("/health".into())
    );
    assert_eq!(whole_path_rewrite(exact), Some("/status"));
    assert_eq!(action(exact).prefix_rewrite, "");
    let regex = routes.iter().find(|r| r.name == "regex").unwrap();
    match path(regex) {
        route_match::PathSpecifier::SafeRegex(re) => assert_eq!(re.regex, "/v[0-9]+/.*"),
        other => panic!("not a regex: {other:?}"),
    }
    assert_eq!(
        whole_path_rewrite(regex),
        None,
        "no path rewrite by default"
    );
    assert_eq!(
        action(regex).prefix_rewrite,
        "",
        "no prefix rewrite on regex"
    );
}

#[test]
fn hostname_matches_become_case_insensitive_authority_matchers_ordered_before_any_host() {
    let s = state(
        http_listener(8080),
        &[
            (
                "any",
                http_to("a.local", json!({"prefix": "/long/prefix/"})),
            ),
            (
                "suffix",
                http_to(
                    "b.local",
                    json!({"prefix": "/", "hostname": {"suffix": ".example.com"}}),
                ),
            ),
            (
                "exact",
                http_to(
                    "b.local",
                    json!({"prefix": "/", "hostname": {"exact": "www.example.com"}}),
                ),
            ),
            (
                "first",
                json!({"priority": 0, "httpRoute": {"match": {"prefix": "/"},
                    "action": {"target": {"virtualService": {"virtualServiceName": "a.local"}}}}}),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    assert_eq!(names(routes), ["first", "exact", "suffix", "any"]);
    let exact = &headers(&routes[1])[0];
    assert_eq!(exact.name, ":authority");
    assert_eq!(
        *string_pattern(exact),
        MatchPattern::Exact("www.example.com".into())
    );
    let suffix = &headers(&routes[2])[0];
    assert_eq!(
        *string_pattern(suffix),
        MatchPattern::Suffix(".example.com".into())
    );
    for h in [exact, suffix] {
        match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => {
                assert!(s.ignore_case)
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn routes_are_ordered_by_priority_then_longest_match_then_name() {
    let s = state(
        http_listener(8080),
        &[
            ("b-short", http_to("a.local", json!({"prefix": "/"}))),
            ("a-short", http_to("a.local", json!({"prefix": "/"}))),
            ("long", http_to("a.local", json!({"prefix": "/api/v2/"}))),
            (
                "with-header",
                http_to(
                    "a.local",
                    json!({"prefix": "/", "headers": [{"name": "x-a", "match": {"exact": "1"}}]}),
                ),
            ),
            (
                "prio-5",
                json!({"priority": 5, "httpRoute": {"match": {"prefix": "/"},
                    "action": {"target": {"virtualService": {"virtualServiceName": "a.local"}}}}}),
            ),
            (
                "prio-1",
                json!({"priority": 1, "httpRoute": {"match": {"prefix": "/"},
                    "action": {"target": {"virtualService": {"virtualServiceName": "a.local"}}}}}),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    assert_eq!(
        names(routes_of(&r, "rds_ingress_http_8080")),
        [
            "prio-1",
            "prio-5",
            "long",
            "with-header",
            "a-short",
            "b-short"
        ]
    );
}

#[test]
fn headers_query_parameters_and_method_are_all_required() {
    let s = state(
        http_listener(8080),
        &[(
            "m",
            http_to(
                "a.local",
                json!({
                    "prefix": "/",
                    "method": "POST",
                    "headers": [
                        {"name": "x-exact", "match": {"exact": "1"}},
                        {"name": "x-not", "invert": true, "match": {"prefix": "no"}},
                        {"name": "x-range", "match": {"range": {"start": 1, "end": 5}}}
                    ],
                    "queryParameters": [{"name": "v", "match": {"exact": "2"}}, {"name": "flag"}]
                }),
            ),
        )],
        &[],
    );
    let r = gateway(&s);
    let route = &routes_of(&r, "rds_ingress_http_8080")[0];
    let hs = headers(route);
    let hnames: Vec<&str> = hs.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(hnames, ["x-exact", "x-not", "x-range", ":method"]);
    assert!(hs[1].invert_match);
    assert_eq!(*string_pattern(&hs[3]), MatchPattern::Exact("POST".into()));
    assert!(matches!(
        hs[2].header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::RangeMatch(_))
    ));
    let q = &route.r#match.as_ref().unwrap().query_parameters;
    assert_eq!(q.len(), 2);
    assert!(matches!(
        q[1].query_parameter_match_specifier,
        Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true))
    ));
}

#[test]
fn grpc_gateway_routes_match_service_and_metadata_on_the_grpc_listener() {
    let s = state(
        json!([
            {"portMapping": {"port": 8080, "protocol": "http"}},
            {"portMapping": {"port": 9090, "protocol": "grpc"}}
        ]),
        &[
            (
                "g",
                json!({"grpcRoute": {
                    "match": {"port": 9090, "serviceName": "pkg.Svc",
                              "metadata": [{"name": "tenant", "match": {"exact": "t1"}}]},
                    "action": {"target": {"virtualService": {"virtualServiceName": "a.local"}},
                               "rewrite": {"hostname": {"defaultTargetHostname": "DISABLED"}}}}}),
            ),
            (
                "h",
                http_to("b.local", json!({"prefix": "/", "port": 8080})),
            ),
        ],
        &[],
    );
    let r = gateway(&s);
    let grpc = routes_of(&r, "rds_ingress_grpc_9090");
    assert_eq!(names(grpc), ["g"]);
    assert_eq!(*path(&grpc[0]), prefix("/pkg.Svc/"));
    assert!(grpc[0].r#match.as_ref().unwrap().grpc.is_some());
    assert_eq!(headers(&grpc[0])[0].name, "tenant");
    assert_eq!(host_rewrite(&grpc[0]), None);
    assert_eq!(
        action(&grpc[0]).prefix_rewrite,
        "",
        "gRPC paths are never rewritten"
    );
    assert_eq!(names(routes_of(&r, "rds_ingress_http_8080")), ["h"]);
}

#[test]
fn the_target_port_picks_the_provider_listener_and_unreachable_targets_give_no_route() {
    let mut s = state(
        http_listener(8080),
        &[
            (
                "port",
                json!({"httpRoute": {"match": {"prefix": "/p/"}, "action": {
                    "target": {"virtualService": {"virtualServiceName": "a.local"}, "port": 9000}}}}),
            ),
            (
                "no-service",
                http_to("nope.local", json!({"prefix": "/x/"})),
            ),
            ("no-node", http_to("gone.local", json!({"prefix": "/y/"}))),
            (
                "bad-port",
                json!({"httpRoute": {"match": {"prefix": "/z/"}, "action": {
                    "target": {"virtualService": {"virtualServiceName": "b.local"}, "port": 1234}}}}),
            ),
        ],
        &[],
    );
    let m = s.meshes.get_mut("m").unwrap();
    m.virtual_nodes.get_mut("a-vn").unwrap().spec = serde_json::from_value(json!({
        "listeners": [
            {"portMapping": {"port": 8080, "protocol": "http"}},
            {"portMapping": {"port": 9000, "protocol": "http2"}}
        ],
        "serviceDiscovery": {"dns": {"hostname": "a.internal"}}
    }))
    .unwrap();
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    assert_eq!(names(routes), ["port"]);
    assert_eq!(cluster(&routes[0]), "cds_egress_m_a-vn_http2_9000");
}

#[test]
fn a_router_provided_target_applies_the_router_routes_after_the_gateway_rewrite() {
    let s = state(
        http_listener(8080),
        &[("to-r", http_to("r.local", json!({"prefix": "/r/"})))],
        &[
            (
                "v2",
                json!({"httpRoute": {"match": {"prefix": "/v2"},
                    "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
            ),
            (
                "split",
                json!({"httpRoute": {"match": {"prefix": "/"},
                    "retryPolicy": {"maxRetries": 4, "perRetryTimeout": {"unit": "ms", "value": 250},
                                    "httpRetryEvents": ["server-error"]},
                    "action": {"weightedTargets": [{"virtualNode": "a-vn", "weight": 80},
                                                   {"virtualNode": "b-vn", "weight": 20}]}}}),
            ),
            (
                "exact",
                json!({"priority": 0, "httpRoute": {"match": {"path": {"exact": "/ping"}, "method": "GET"},
                    "action": {"weightedTargets": [{"virtualNode": "b-vn", "weight": 1}]}}}),
            ),
        ],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    assert_eq!(
        names(routes),
        ["to-r/exact", "to-r/v2", "to-r/split", "to-r/no-route"]
    );
    // /r/ping → /ping: the router's exact route, restated on the client's path.
    assert_eq!(
        *path(&routes[0]),
        route_match::PathSpecifier::Path("/r/ping".into())
    );
    assert_eq!(whole_path_rewrite(&routes[0]), Some("/ping"));
    assert_eq!(headers(&routes[0])[0].name, ":method");
    assert_eq!(cluster(&routes[0]), "cds_egress_m_b-vn_http_8080");
    // /r/v2… → /v2…
    assert_eq!(*path(&routes[1]), prefix("/r/v2"));
    assert_eq!(action(&routes[1]).prefix_rewrite, "/v2");
    assert_eq!(cluster(&routes[1]), "cds_egress_m_c-vn_http_8080");
    assert_eq!(host_rewrite(&routes[1]), Some("r.local"));
    // /r/… → /…, split 80/20 with the router route's own retry policy.
    assert_eq!(*path(&routes[2]), prefix("/r/"));
    assert_eq!(action(&routes[2]).prefix_rewrite, "/");
    match &action(&routes[2]).cluster_specifier {
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let got: Vec<(&str, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
                .collect();
            assert_eq!(
                got,
                [
                    ("cds_egress_m_a-vn_http_8080", 80),
                    ("cds_egress_m_b-vn_http_8080", 20)
                ]
            );
        }
        other => panic!("not weighted: {other:?}"),
    }
    let retry = action(&routes[2]).retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "5xx");
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 4);
    // Matched /r/ but no router route: the router's answer, 404, not a later gateway route.
    assert_eq!(*path(&routes[3]), prefix("/r/"));
    match &routes[3].action {
        Some(route::Action::DirectResponse(d)) => assert_eq!(d.status, 404),
        other => panic!("not a 404: {other:?}"),
    }
    let clusters: Vec<&str> = r.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        clusters,
        [
            "cds_egress_m_a-vn_http_8080",
            "cds_egress_m_b-vn_http_8080",
            "cds_egress_m_c-vn_http_8080"
        ]
    );
}

#[test]
fn router_prefixes_that_cannot_follow_the_gateway_rewrite_are_left_out() {
    let s = state(
        http_listener(8080),
        &[(
            "keep",
            json!({"httpRoute": {"match": {"prefix": "/api/"}, "action": {
                "target": {"virtualService": {"virtualServiceName": "r.local"}},
                "rewrite": {"prefix": {"defaultPrefix": "DISABLED"}}}}}),
        )],
        &[
            (
                "other",
                json!({"httpRoute": {"match": {"prefix": "/web"},
                    "action": {"weightedTargets": [{"virtualNode": "a-vn", "weight": 1}]}}}),
            ),
            (
                "deeper",
                json!({"httpRoute": {"match": {"prefix": "/api/v1/"},
                    "action": {"weightedTargets": [{"virtualNode": "b-vn", "weight": 1}]}}}),
            ),
            (
                "re",
                json!({"httpRoute": {"match": {"path": {"regex": "/api/[a-z]+"}},
                    "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
            ),
        ],
    );
    let r = gateway(&s);
    let routes = routes_of(&r, "rds_ingress_http_8080");
    assert_eq!(
        names(routes),
        ["keep/re", "keep/deeper", "keep/no-route"],
        "/web can never follow /api/; the router's order (longest match) is kept"
    );
    assert_eq!(*path(&routes[1]), prefix("/api/v1/"));
    assert_eq!(action(&routes[1]).prefix_rewrite, "", "nothing to rewrite");
    // A router regex on an unrewritten prefix: the regex is the path matcher, the prefix a
    // `:path` condition.
    assert!(matches!(
        path(&routes[0]),
        route_match::PathSpecifier::SafeRegex(re) if re.regex == "/api/[a-z]+"
    ));
    let extra = &headers(&routes[0])[0];
    assert_eq!(extra.name, ":path");
    assert_eq!(*string_pattern(extra), MatchPattern::Prefix("/api/".into()));
}

#[test]
fn path_composition_covers_exact_and_regex_gateway_matches() {
    use route_match::PathSpecifier as P;
    let exact = Forward::Exact {
        matched: "/health".into(),
        to: "/status".into(),
    };
    assert_eq!(
        compose(&exact, &P::Prefix("/st".into())).map(|p| p.rewrite),
        Some(PathRewrite::Whole("/status".into()))
    );
    assert_eq!(compose(&exact, &P::Prefix("/x".into())), None);
    assert_eq!(
        compose(&exact, &P::Path("/status".into())).map(|p| p.spec),
        Some(P::Path("/health".into()))
    );
    assert_eq!(
        compose(&exact, &P::SafeRegex(routes::regex(".*"))),
        None,
        "a regex against a rewritten path is not evaluated by the agent"
    );
    let same = Forward::Exact {
        matched: "/a".into(),
        to: "/a".into(),
    };
    let p = compose(&same, &P::SafeRegex(routes::regex("/[a-z]"))).unwrap();
    assert_eq!(p.spec, P::Path("/a".into()));
    assert_eq!(p.extra.unwrap().name, ":path");

    let regex = Forward::Regex {
        matched: "/v[0-9]/.*".into(),
        to: None,
    };
    let p = compose(&regex, &P::Prefix("/v1/".into())).unwrap();
    assert!(matches!(p.spec, P::SafeRegex(ref re) if re.regex == "/v[0-9]/.*"));
    assert_eq!(
        *string_pattern(p.extra.as_ref().unwrap()),
        MatchPattern::Prefix("/v1/".into())
    );
    let p = compose(&regex, &P::Path("/v1/x".into())).unwrap();
    assert_eq!(p.spec, P::Path("/v1/x".into()));
    match string_pattern(p.extra.as_ref().unwrap()) {
        MatchPattern::SafeRegex(re) => assert_eq!(re.regex, "(?:/v[0-9]/.*)(?:\\?.*)?"),
        other => panic!("{other:?}"),
    }

    let rewritten = Forward::Prefix {
        matched: "/api/".into(),
        to: "/".into(),
    };
    assert_eq!(
        compose(&rewritten, &P::SafeRegex(routes::regex("/x"))),
        None,
        "a router regex behind a changing prefix rewrite is not expressible"
    );
    let p = compose(&rewritten, &P::Path("/x".into())).unwrap();
    assert_eq!(p.spec, P::Path("/api/x".into()));
    assert_eq!(p.rewrite, PathRewrite::Whole("/x".into()));
}

#[test]
fn a_missing_router_gives_no_route_and_a_missing_gateway_is_an_error() {
    let mut s = state(
        http_listener(8080),
        &[("to-r", http_to("r.local", json!({"prefix": "/r/"})))],
        &[],
    );
    s.meshes.get_mut("m").unwrap().virtual_routers.remove("vr");
    let r = gateway(&s);
    assert!(routes_of(&r, "rds_ingress_http_8080").is_empty());

    let who = ProxyIdentity::parse("mesh/m/virtualGateway/nope").unwrap();
    assert_eq!(
        translate(&s, &who, &Endpoints::new()),
        Err(crate::Error::VirtualGatewayNotFound {
            mesh: "m".into(),
            name: "nope".into()
        })
    );
}

#[test]
fn gateway_translation_is_deterministic() {
    let s = state(
        http_listener(8080),
        &[
            ("to-r", http_to("r.local", json!({"prefix": "/r/"}))),
            ("to-a", http_to("a.local", json!({"prefix": "/a/"}))),
        ],
        &[(
            "all",
            json!({"httpRoute": {"match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
        )],
    );
    assert_eq!(gateway(&s), gateway(&s));
}

// === Gateway policies ===

mod policies {
    use prost::Message;
    use trellis_envoy_api::pb::envoy::config::cluster::v3::Cluster;
    use trellis_envoy_api::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
    use trellis_envoy_api::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
    use trellis_envoy_api::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck;
    use trellis_envoy_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_filter,
    };
    use trellis_envoy_api::pb::envoy::extensions::transport_sockets::tls::v3::{
        DownstreamTlsContext, UpstreamTlsContext, common_tls_context,
    };
    use trellis_envoy_api::pb::google::protobuf::Any;

    use super::*;

    const LISTENER: &str = "lds_ingress_0.0.0.0_8088";
    const A_CLUSTER: &str = "cds_egress_m_a-vn_http_8080";

    fn unpack<T: Message + Default>(any: &Any) -> T {
        T::decode(any.value.as_slice()).unwrap()
    }

    fn hcm(chain: &FilterChain) -> HttpConnectionManager {
        match &chain.filters[0].config_type {
            Some(filter::ConfigType::TypedConfig(a)) => unpack(a),
            other => panic!("{other:?}"),
        }
    }

    fn tls_of(t: &TransportSocket) -> &Any {
        match &t.config_type {
            Some(transport_socket::ConfigType::TypedConfig(a)) => a,
            None => panic!("untyped transport socket"),
        }
    }

    fn listener<'a>(r: &'a Resources, name: &str) -> Option<&'a Listener> {
        r.listeners.iter().find(|l| l.name == name)
    }

    fn cluster<'a>(r: &'a Resources, name: &str) -> &'a Cluster {
        r.clusters.iter().find(|c| c.name == name).unwrap()
    }

    fn with_tls(tls: Value) -> Value {
        json!([{"portMapping": {"port": 8088, "protocol": "http"}, "tls": tls}])
    }

    fn to_a() -> [(&'static str, Value); 1] {
        [("to-a", http_to("a.local", json!({"prefix": "/"})))]
    }

    fn file_cert() -> Value {
        json!({"file": {"certificateChain": "/c/gw.pem", "privateKey": "/c/gw.key"}})
    }

    #[test]
    fn gateway_listener_tls_strict_permissive_disabled_with_file_or_sds_certificates() {
        let strict = gateway(&state(
            with_tls(json!({"mode": "STRICT", "certificate": file_cert(),
                "validation": {"trust": {"file": {"certificateChain": "/c/ca.pem"}},
                    "subjectAlternativeNames": {"match": {"exact": ["client.example.com"]}}}})),
            &to_a(),
            &[],
        ));
        let l = listener(&strict, LISTENER).unwrap();
        assert_eq!(l.filter_chains.len(), 1);
        assert!(l.listener_filters.is_empty(), "nothing to tell apart");
        let ctx: DownstreamTlsContext = unpack(tls_of(
            l.filter_chains[0].transport_socket.as_ref().unwrap(),
        ));
        assert!(ctx.require_client_certificate.unwrap().value, "mTLS");
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(common.tls_certificates.len(), 1);
        assert_eq!(common.alpn_protocols, ["http/1.1"]);

        let permissive = gateway(&state(
            with_tls(json!({"mode": "PERMISSIVE",
                "certificate": {"sds": {"secretName": "spiffe://x/gw"}}})),
            &to_a(),
            &[],
        ));
        let l = listener(&permissive, LISTENER).unwrap();
        let protocols: Vec<_> = l
            .filter_chains
            .iter()
            .map(|c| {
                c.filter_chain_match
                    .as_ref()
                    .unwrap()
                    .transport_protocol
                    .as_str()
            })
            .collect();
        assert_eq!(protocols, ["tls", "raw_buffer"]);
        assert!(l.filter_chains[0].transport_socket.is_some());
        assert!(l.filter_chains[1].transport_socket.is_none());
        assert_eq!(
            l.listener_filters[0].name,
            "envoy.filters.listener.tls_inspector"
        );
        let ctx: DownstreamTlsContext = unpack(tls_of(
            l.filter_chains[0].transport_socket.as_ref().unwrap(),
        ));
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(
            common.tls_certificate_sds_secret_configs[0].name,
            "spiffe://x/gw"
        );

        let disabled = gateway(&state(
            with_tls(json!({"mode": "DISABLED", "certificate": file_cert()})),
            &to_a(),
            &[],
        ));
        let l = listener(&disabled, LISTENER).unwrap();
        assert_eq!(l.filter_chains.len(), 1);
        assert!(l.filter_chains[0].transport_socket.is_none());
    }

    #[test]
    fn an_acm_certificate_refuses_a_strict_gateway_listener_and_says_why() {
        let acm =
            json!({"acm": {"certificateArn": "arn:aws:acm:us-west-2:111122223333:certificate/x"}});
        let r = gateway(&state(
            with_tls(json!({"mode": "STRICT", "certificate": acm})),
            &to_a(),
            &[],
        ));
        assert!(listener(&r, LISTENER).is_none(), "never plaintext");
        assert!(
            r.routes.is_empty() && r.clusters.is_empty(),
            "nothing behind it"
        );
        assert!(r.unserved[0].contains("ACM"), "{:?}", r.unserved);
        let r = gateway(&state(
            with_tls(json!({"mode": "PERMISSIVE", "certificate": acm})),
            &to_a(),
            &[],
        ));
        let l = listener(&r, LISTENER).unwrap();
        assert_eq!(l.filter_chains.len(), 1);
        assert!(l.filter_chains[0].transport_socket.is_none());
    }

    #[test]
    fn a_held_acm_certificate_terminates_tls_on_a_gateway_listener_from_an_ads_secret() {
        let arn = "arn:aws:acm:us-west-2:111122223333:certificate/x";
        let s = state(
            with_tls(json!({"mode": "STRICT", "certificate": {"acm": {"certificateArn": arn}}})),
            &to_a(),
            &[],
        );
        let who = ProxyIdentity::parse("mesh/m/virtualGateway/gw").unwrap();
        let endpoints = Endpoints {
            acm: Some(std::sync::Arc::new([arn.to_string()].into())),
            ..Endpoints::new()
        };
        let r = translate(&s, &who, &endpoints).unwrap();
        assert!(r.unserved.is_empty(), "{:?}", r.unserved);
        let l = listener(&r, LISTENER).unwrap();
        let socket = l.filter_chains[0].transport_socket.as_ref().unwrap();
        let any = match &socket.config_type {
            Some(trellis_envoy_api::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => a,
            None => panic!("untyped"),
        };
        let ctx = <trellis_envoy_api::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext as prost::Message>::decode(any.value.as_slice()).unwrap();
        let sds = &ctx
            .common_tls_context
            .unwrap()
            .tls_certificate_sds_secret_configs;
        assert_eq!(sds[0].name, format!("acm:{arn}"));
        let names: Vec<String> = crate::acm_secrets(&s, &who)
            .iter()
            .map(crate::AcmSecret::name)
            .collect();
        assert_eq!(names, [format!("acm:{arn}")]);
    }

    /// (connections, pending, requests, retries) of a cluster's breakers.
    fn limits(c: &Cluster) -> (u32, u32, u32, u32) {
        let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
        let v = |x: &Option<trellis_envoy_api::pb::google::protobuf::UInt32Value>| {
            x.as_ref().unwrap().value
        };
        (
            v(&t.max_connections),
            v(&t.max_pending_requests),
            v(&t.max_requests),
            v(&t.max_retries),
        )
    }

    const U: u32 = 2_147_483_647;

    /// howto-circuit-breakers: a gateway listener's pool is one limit for every service behind
    /// it, seen on `cds_ingress_MESH_GATEWAY_self_redirect_http_15001`; the gateway's clusters to
    /// the services keep App Mesh's unlimited defaults.
    #[test]
    fn a_gateway_connection_pool_limits_all_its_listeners_services_together() {
        let listeners = json!([
            {"portMapping": {"port": 8088, "protocol": "http"},
             "connectionPool": {"http": {"maxConnections": 3, "maxPendingRequests": 2}}},
            {"portMapping": {"port": 15002, "protocol": "http2"},
             "connectionPool": {"http2": {"maxRequests": 7}}},
            {"portMapping": {"port": 8090, "protocol": "http"}}
        ]);
        let h2_to = |service: &str, port: i64| {
            json!({"http2Route": {"match": {"prefix": "/", "port": port},
                "action": {"target": {"virtualService": {"virtualServiceName": service}}}}})
        };
        let r = gateway(&state(
            listeners,
            &[
                (
                    "to-a",
                    http_to("a.local", json!({"prefix": "/a/", "port": 8088})),
                ),
                (
                    "to-b",
                    http_to("b.local", json!({"prefix": "/", "port": 8088})),
                ),
                ("h2-to-b", h2_to("b.local", 15002)),
                (
                    "to-r",
                    http_to("r.local", json!({"prefix": "/", "port": 8090})),
                ),
            ],
            &[(
                "all",
                json!({"httpRoute": {"match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}),
            )],
        ));
        // The http listener: everything through one cluster carrying its pool, to a loopback
        // listener (15001; the next free one for the second, past its own port 15002).
        let outer = routes_of(&r, "rds_ingress_http_8088");
        assert_eq!(outer.len(), 1);
        assert_eq!(*path(&outer[0]), prefix("/"));
        let redirect = "cds_ingress_m_gw_self_redirect_http_15001";
        assert_eq!(super::cluster(&outer[0]), redirect);
        assert_eq!(action(&outer[0]).timeout.as_ref().unwrap().seconds, 0);
        assert_eq!(limits(cluster(&r, redirect)), (3, 2, U, U));
        assert_eq!(
            hcm(&listener(&r, LISTENER).unwrap().filter_chains[0]).stat_prefix,
            "ingress.http.8088",
            "App Mesh's stat prefix"
        );
        let inner = listener(&r, "lds_egress_127.0.0.1_15001").unwrap();
        assert!(format!("{:?}", inner.address).contains("\"127.0.0.1\""));
        assert_eq!(hcm(&inner.filter_chains[0]).stat_prefix, "egress");
        assert_eq!(
            names(routes_of(&r, "rds_egress_http_15001")),
            ["to-a", "to-b"],
            "the listener's routes, behind the pool"
        );
        let h2 = "cds_ingress_m_gw_self_redirect_http2_15003";
        assert_eq!(
            super::cluster(&routes_of(&r, "rds_ingress_http2_15002")[0]),
            h2
        );
        assert_eq!(limits(cluster(&r, h2)), (U, U, 7, U));
        assert!(
            cluster(&r, h2)
                .typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
            "HTTP/2 to the second hop: the pool counts streams"
        );
        assert_eq!(names(routes_of(&r, "rds_egress_http2_15003")), ["h2-to-b"]);
        // A listener without a pool routes directly; every service cluster is unlimited.
        assert_eq!(
            names(routes_of(&r, "rds_ingress_http_8090")),
            ["to-r/all", "to-r/no-route"]
        );
        for c in [
            "cds_egress_m_a-vn_http_8080",
            "cds_egress_m_b-vn_http_8080",
            "cds_egress_m_c-vn_http_8080",
        ] {
            assert_eq!(limits(cluster(&r, c)), (U, U, U, U), "{c}");
        }
    }

    #[test]
    fn a_gateway_health_check_is_answered_by_the_gateway_on_its_path() {
        let listeners = json!([{"portMapping": {"port": 8088, "protocol": "http"},
            "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                "unhealthyThreshold": 2, "intervalMillis": 5000, "timeoutMillis": 2000}}]);
        let r = gateway(&state(listeners, &to_a(), &[]));
        let m = hcm(&listener(&r, LISTENER).unwrap().filter_chains[0]);
        let names: Vec<_> = m.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.health_check",
                "envoy.filters.http.router"
            ]
        );
        let hc: HealthCheck = match &m.http_filters[0].config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => unpack(a),
            other => panic!("{other:?}"),
        };
        assert!(!hc.pass_through_mode.unwrap().value);
        assert_eq!(hc.headers[0].name, ":path");
        assert_eq!(
            string_pattern(&hc.headers[0]),
            &MatchPattern::Exact("/ping".into())
        );

        let grpc = json!([{"portMapping": {"port": 8088, "protocol": "grpc"},
            "healthCheck": {"protocol": "grpc", "healthyThreshold": 2,
                "unhealthyThreshold": 2, "intervalMillis": 5000, "timeoutMillis": 2000}}]);
        let r = gateway(&state(grpc, &[], &[]));
        let m = hcm(&listener(&r, LISTENER).unwrap().filter_chains[0]);
        assert_eq!(m.http_filters.len(), 1, "only the router");
        assert!(
            r.unserved[0].contains("grpc health check"),
            "{:?}",
            r.unserved
        );
    }

    #[test]
    fn gateway_backend_defaults_client_tls_and_access_logs_apply_to_every_target() {
        let spec = json!({
            "listeners": [{"portMapping": {"port": 8088, "protocol": "http"}}],
            "backendDefaults": {"clientPolicy": {"tls": {
                "certificate": {"sds": {"secretName": "spiffe://x/gw"}},
                "validation": {"trust": {"file": {"certificateChain": "/c/ca.pem"}},
                    "subjectAlternativeNames": {"match": {"exact": ["a.local"]}}}}}},
            "logging": {"accessLog": {"file": {"path": "/dev/stdout",
                "format": {"text": "%REQ(:PATH)% %RESPONSE_CODE%"}}}}
        });
        let r = gateway(&state(spec, &to_a(), &[]));
        let ctx: UpstreamTlsContext = unpack(tls_of(
            cluster(&r, A_CLUSTER).transport_socket.as_ref().unwrap(),
        ));
        assert_eq!(ctx.sni, "a.local");
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(
            common.tls_certificate_sds_secret_configs[0].name,
            "spiffe://x/gw"
        );
        assert!(matches!(
            common.validation_context_type,
            Some(common_tls_context::ValidationContextType::ValidationContext(_))
        ));
        let m = hcm(&listener(&r, LISTENER).unwrap().filter_chains[0]);
        assert_eq!(m.access_log.len(), 1);
        assert_eq!(m.access_log[0].name, "envoy.access_loggers.file");
        assert!(r.unserved.is_empty(), "{:?}", r.unserved);
    }
}
