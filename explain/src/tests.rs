//! Explanations of translation's real output for the cases an operator asks about: which route,
//! which targets, and, for refusals, the reason and the field to change.

use serde_json::{Value, json};
use trellis_model::testing::resource;
use trellis_model::{ProxyIdentity, State};
use trellis_translate::{Endpoints, translate};

use super::*;

/// Mesh `m` (with `mesh_spec`) holding `items`: (kind, name, spec), routes as
/// ("route", "ROUTER/NAME", spec) and gateway routes as ("gatewayRoute", "GATEWAY/NAME", spec).
fn state(mesh_spec: Value, items: &[(&str, &str, Value)]) -> State {
    let mut s = trellis_model::testing::mesh_state(mesh_spec, &[], &[]);
    let m = s.meshes.get_mut("m").unwrap();
    for (kind, name, spec) in items {
        let spec = spec.clone();
        match *kind {
            "node" => {
                m.virtual_nodes.insert(
                    name.to_string(),
                    resource(name, serde_json::from_value(spec).unwrap()),
                );
            }
            "service" => {
                m.virtual_services.insert(
                    name.to_string(),
                    resource(name, serde_json::from_value(spec).unwrap()),
                );
            }
            "router" => {
                m.virtual_routers.insert(
                    name.to_string(),
                    resource(name, serde_json::from_value(spec).unwrap()),
                );
            }
            "gateway" => {
                m.virtual_gateways.insert(
                    name.to_string(),
                    resource(name, serde_json::from_value(spec).unwrap()),
                );
            }
            "route" => {
                let (r, n) = name.split_once('/').unwrap();
                m.routes.entry(r.to_string()).or_default().insert(
                    n.to_string(),
                    resource(n, serde_json::from_value(spec).unwrap()),
                );
            }
            "gatewayRoute" => {
                let (g, n) = name.split_once('/').unwrap();
                m.gateway_routes.entry(g.to_string()).or_default().insert(
                    n.to_string(),
                    resource(n, serde_json::from_value(spec).unwrap()),
                );
            }
            other => panic!("kind {other}"),
        }
    }
    s
}

fn http_node(port: u16, host: &str) -> Value {
    json!({"listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
           "serviceDiscovery": {"dns": {"hostname": host}}})
}

/// `front` calls `back.local` (node `back`, 8080) and `color.local` (router `vr`, 9080: route
/// `canary` priority 0 on header x-canary=1 → red, `split` prefix / → blue 80 / red 20);
/// `other.local` (node `other`, 8080) exists but is not a backend of front.
fn mesh(egress: &str) -> State {
    state(
        json!({"egressFilter": {"type": egress}}),
        &[
            ("node", "back", http_node(8080, "back.internal")),
            ("node", "other", http_node(8080, "other.internal")),
            ("node", "blue", http_node(9080, "blue.internal")),
            ("node", "red", http_node(9080, "red.internal")),
            (
                "node",
                "front",
                json!({"backends": [
                {"virtualService": {"virtualServiceName": "back.local"}},
                {"virtualService": {"virtualServiceName": "color.local"}}]}),
            ),
            (
                "service",
                "back.local",
                json!({"provider": {"virtualNode": {"virtualNodeName": "back"}}}),
            ),
            (
                "service",
                "other.local",
                json!({"provider": {"virtualNode": {"virtualNodeName": "other"}}}),
            ),
            (
                "service",
                "color.local",
                json!({"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}),
            ),
            (
                "router",
                "vr",
                json!({"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}),
            ),
            (
                "route",
                "vr/canary",
                json!({"priority": 0, "httpRoute": {
                "match": {"prefix": "/", "headers": [{"name": "x-canary", "match": {"exact": "1"}}]},
                "action": {"weightedTargets": [{"virtualNode": "red", "weight": 1}]}}}),
            ),
            (
                "route",
                "vr/split",
                json!({"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 80}, {"virtualNode": "red", "weight": 20}]},
                "retryPolicy": {"maxRetries": 3, "perRetryTimeout": {"unit": "ms", "value": 500},
                                "httpRetryEvents": ["server-error"]}}}),
            ),
        ],
    )
}

fn run(s: &State, who: &str, url: &str, headers: &[&str], direction: Direction) -> Explanation {
    let who = ProxyIdentity::parse(who).unwrap();
    let res = translate(s, &who, &Endpoints::default()).unwrap();
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let req = Request::parse(url, None, &headers).unwrap();
    explain(s, &who, &res, &req, direction)
}

fn front(s: &State, url: &str, headers: &[&str]) -> Explanation {
    run(
        s,
        "mesh/m/virtualNode/front",
        url,
        headers,
        Direction::Outbound,
    )
}

fn targets(e: &Explanation) -> Vec<(String, u32)> {
    match &e.outcome {
        Outcome::Forwarded { targets, .. } | Outcome::Proxied { targets } => targets
            .iter()
            .map(|t| (t.virtual_node.clone().unwrap_or_default(), t.weight))
            .collect(),
        other => panic!("not forwarded: {other:?}\n{}", text(e)),
    }
}

fn step(e: &Explanation, stage: Stage) -> &Step {
    e.steps
        .iter()
        .find(|s| s.stage == stage)
        .unwrap_or_else(|| panic!("no {stage:?} step:\n{}", text(e)))
}

fn has_field(fields: &[Field], resource: &str, field: &str) -> bool {
    fields
        .iter()
        .any(|f| f.resource == resource && f.field == field)
}

#[test]
fn a_node_provided_service_goes_to_its_node_and_says_which_backend_declared_it() {
    let e = front(&mesh("DROP_ALL"), "http://back.local:8080/x", &[]);
    assert_eq!(targets(&e), vec![("back".into(), 1)]);
    assert_eq!(step(&e, Stage::Listener).envoy, "lds_egress_0.0.0.0_15001");
    let chain = step(&e, Stage::FilterChain);
    assert!(
        chain.decision.contains("destination port 8080"),
        "{}",
        chain.decision
    );
    assert!(has_field(
        &chain.from,
        "mesh/m/virtualNode/front",
        "spec.backends[0].virtualService.virtualServiceName"
    ));
    assert!(has_field(
        &chain.from,
        "mesh/m/virtualNode/back",
        "spec.listeners[0].portMapping"
    ));
    let vh = step(&e, Stage::VirtualHost);
    assert!(
        vh.decision.contains("\"back.local:8080\""),
        "{}",
        vh.decision
    );
    assert!(has_field(
        &vh.from,
        "mesh/m/virtualService/back.local",
        "spec.provider"
    ));
    let cluster = step(&e, Stage::Cluster);
    assert_eq!(cluster.envoy, "cds_egress_m_back_http_8080");
    assert!(has_field(
        &cluster.from,
        "mesh/m/virtualNode/back",
        "spec.serviceDiscovery"
    ));
    match &e.outcome {
        Outcome::Forwarded {
            authority,
            path,
            targets,
        } => {
            assert_eq!(
                (authority.as_str(), path.as_str()),
                ("back.local:8080", "/x")
            );
            assert_eq!(
                targets[0].endpoints,
                vec!["back.internal:8080 (DNS, resolved by Envoy)"]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn router_routes_are_tried_in_order_and_passed_over_ones_name_the_failing_field() {
    let s = mesh("DROP_ALL");
    let e = front(&s, "http://color.local:9080/", &[]);
    assert_eq!(targets(&e), vec![("blue".into(), 80), ("red".into(), 20)]);
    let route = step(&e, Stage::Route);
    assert_eq!(route.envoy, "split");
    assert_eq!(route.passed.len(), 1, "{route:?}");
    assert_eq!(route.passed[0].envoy, "canary");
    assert!(
        route.passed[0].reason.contains("no x-canary header"),
        "{:?}",
        route.passed[0]
    );
    assert!(has_field(
        &route.passed[0].from,
        "mesh/m/virtualRouter/vr/route/canary",
        "spec.httpRoute.match.headers[0]"
    ));
    let t = step(&e, Stage::Targets);
    assert!(has_field(
        &t.from,
        "mesh/m/virtualRouter/vr/route/split",
        "spec.httpRoute.action.weightedTargets[0]"
    ));
    let shares: Vec<f64> = match &e.outcome {
        Outcome::Forwarded { targets, .. } => targets.iter().map(|t| t.share).collect(),
        _ => unreachable!(),
    };
    assert_eq!(shares, vec![0.8, 0.2]);
    let retries = step(&e, Stage::Retries);
    assert!(
        retries.decision.starts_with("3 on 5xx"),
        "{}",
        retries.decision
    );
    assert!(
        retries.decision.contains("500 ms per try"),
        "{}",
        retries.decision
    );
    assert!(has_field(
        &retries.from,
        "mesh/m/virtualRouter/vr/route/split",
        "spec.httpRoute.retryPolicy"
    ));

    let e = front(&s, "http://color.local:9080/", &["x-canary: 1"]);
    assert_eq!(targets(&e), vec![("red".into(), 1)]);
    let retries = step(&e, Stage::Retries);
    assert!(
        retries.decision.contains("the virtual host's policy"),
        "{}",
        retries.decision
    );
    assert!(
        retries.from[0].value.contains("App Mesh's default"),
        "{:?}",
        retries.from
    );
}

#[test]
fn refusals_name_the_reason_and_the_field_to_change() {
    let s = mesh("DROP_ALL");
    // A virtual service on a port front routes, but not declared by front.
    let e = front(&s, "http://other.local:8080/", &[]);
    let Outcome::LocalReply {
        status,
        reason,
        fix,
    } = &e.outcome
    else {
        panic!("{:?}", e.outcome)
    };
    assert_eq!(*status, 404);
    assert!(
        reason.starts_with("backend not declared: other.local"),
        "{reason}"
    );
    assert_eq!(fix[0].resource, "mesh/m/virtualNode/front");
    assert_eq!(fix[0].field, "spec.backends");
    assert!(
        fix[0]
            .change
            .contains("\"virtualServiceName\": \"other.local\""),
        "{fix:?}"
    );
    // A port no backend listens on: DROP_ALL closes the connection.
    let e = front(&s, "http://back.local:7777/", &[]);
    let Outcome::Closed { reason, fix } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert!(
        reason.contains("back.local listens on ports [8080], not 7777"),
        "{reason}"
    );
    assert!(reason.contains("DROP_ALL"), "{reason}");
    assert!(
        fix.iter().any(|f| f.field == "spec.egressFilter.type"),
        "{fix:?}"
    );
    // An undeclared service on a port nothing else uses.
    let e = run(
        &s,
        "mesh/m/virtualNode/front",
        "http://nowhere.local:1234/",
        &[],
        Direction::Outbound,
    );
    assert!(
        matches!(e.outcome, Outcome::Closed { .. }),
        "{:?}",
        e.outcome
    );
    // A name that is no virtual service, on a routed port.
    let e = front(&s, "http://nope.local:8080/", &[]);
    let Outcome::LocalReply { reason, .. } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert!(
        reason.contains("\"nope.local\" is not a virtual service of mesh m"),
        "{reason}"
    );
}

#[test]
fn allow_all_passes_unknown_destinations_through_to_where_the_app_connected() {
    let s = mesh("ALLOW_ALL");
    let e = front(&s, "http://10.1.2.3:7777/", &[]);
    let Outcome::Proxied { targets } = &e.outcome else {
        panic!("{:?}\n{}", e.outcome, text(&e))
    };
    assert_eq!(targets[0].cluster, "cds_egress_m_allow_all");
    assert_eq!(targets[0].endpoints, vec!["10.1.2.3:7777"]);
    assert!(has_field(
        &step(&e, Stage::FilterChain).from,
        "mesh/m",
        "spec.egressFilter.type"
    ));
    // On a routed port, an unknown Host takes the allow_all virtual host.
    let e = front(&s, "http://example.com:8080/", &[]);
    assert_eq!(
        step(&e, Stage::VirtualHost).envoy,
        "rds_egress_http_8080/allow_all"
    );
}

#[test]
fn inbound_requests_reach_the_local_app_with_the_listeners_policies() {
    let s = mesh("DROP_ALL");
    let e = run(
        &s,
        "mesh/m/virtualNode/back",
        "http://back.local:8080/",
        &[],
        Direction::Inbound,
    );
    assert_eq!(step(&e, Stage::Listener).envoy, "lds_ingress_0.0.0.0_15000");
    let Outcome::Forwarded { targets, .. } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert_eq!(targets[0].cluster, "cds_ingress_m_back_http_8080");
    assert_eq!(targets[0].endpoints, vec!["127.0.0.1:8080"]);
    let e = run(
        &s,
        "mesh/m/virtualNode/back",
        "http://back.local:9999/",
        &[],
        Direction::Inbound,
    );
    let Outcome::Closed { reason, fix } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert!(reason.contains("does not listen on port 9999"), "{reason}");
    assert_eq!(fix[0].field, "spec.listeners[].portMapping.port");
}

fn gateway_mesh() -> State {
    state(
        json!({}),
        &[
            ("node", "web", http_node(8080, "web.internal")),
            ("node", "blue", http_node(9080, "blue.internal")),
            (
                "service",
                "web.local",
                json!({"provider": {"virtualNode": {"virtualNodeName": "web"}}}),
            ),
            (
                "service",
                "color.local",
                json!({"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}),
            ),
            (
                "router",
                "vr",
                json!({"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}),
            ),
            (
                "route",
                "vr/api",
                json!({"httpRoute": {"match": {"prefix": "/api"},
                "action": {"weightedTargets": [{"virtualNode": "blue", "weight": 1}]}}}),
            ),
            (
                "gateway",
                "gw",
                json!({"listeners": [{"portMapping": {"port": 8088, "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/healthz", "healthyThreshold": 2,
                    "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}]}),
            ),
            (
                "gatewayRoute",
                "gw/web",
                json!({"httpRoute": {"match": {"prefix": "/web/"},
                "action": {"target": {"virtualService": {"virtualServiceName": "web.local"}}}}}),
            ),
            (
                "gatewayRoute",
                "gw/color",
                json!({"httpRoute": {"match": {"prefix": "/color/"},
                "action": {"target": {"virtualService": {"virtualServiceName": "color.local"}}}}}),
            ),
        ],
    )
}

#[test]
fn a_gateway_rewrites_as_app_mesh_did_and_composes_router_routes() {
    let s = gateway_mesh();
    let gw = "mesh/m/virtualGateway/gw";
    let e = run(
        &s,
        gw,
        "http://gw.example:8088/web/page?q=1",
        &[],
        Direction::Outbound,
    );
    let Outcome::Forwarded {
        authority, path, ..
    } = &e.outcome
    else {
        panic!("{:?}\n{}", e.outcome, text(&e))
    };
    assert_eq!(authority, "web.local");
    assert_eq!(path, "/page?q=1");
    assert!(has_field(
        &step(&e, Stage::Rewrite).from,
        "mesh/m/virtualGateway/gw/gatewayRoute/web",
        "spec.httpRoute.action.rewrite"
    ));
    // Through the router: /color/api/x is forwarded as /api/x, which route api takes.
    let e = run(
        &s,
        gw,
        "http://gw.example:8088/color/api/x",
        &[],
        Direction::Outbound,
    );
    assert_eq!(targets(&e), vec![("blue".into(), 1)]);
    assert_eq!(step(&e, Stage::Route).envoy, "color/api");
    // The gateway route matches, but no router route takes the forwarded path.
    let e = run(
        &s,
        gw,
        "http://gw.example:8088/color/other",
        &[],
        Direction::Outbound,
    );
    let Outcome::LocalReply {
        status,
        reason,
        fix,
    } = &e.outcome
    else {
        panic!("{:?}", e.outcome)
    };
    assert_eq!(*status, 404);
    assert!(
        reason.contains("gateway route color matched, but no route of virtual router vr"),
        "{reason}"
    );
    assert_eq!(fix[0].resource, "mesh/m/virtualRouter/vr");
    // No gateway route at all.
    let e = run(
        &s,
        gw,
        "http://gw.example:8088/elsewhere",
        &[],
        Direction::Outbound,
    );
    let Outcome::LocalReply { status, reason, .. } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert_eq!(*status, 404);
    assert!(
        reason.contains("no gateway route of virtual gateway gw"),
        "{reason}"
    );
    let passed = &step(&e, Stage::Route).passed;
    assert!(
        passed.iter().any(|p| has_field(
            &p.from,
            "mesh/m/virtualGateway/gw/gatewayRoute/web",
            "spec.httpRoute.match.prefix"
        )),
        "{passed:?}"
    );
    // The health check path is answered by the gateway itself.
    let e = run(
        &s,
        gw,
        "http://gw.example:8088/healthz",
        &[],
        Direction::Outbound,
    );
    assert!(
        matches!(e.outcome, Outcome::LocalReply { status: 200, .. }),
        "{:?}",
        e.outcome
    );
    // A port the gateway does not listen on.
    let e = run(&s, gw, "http://gw.example:9999/", &[], Direction::Outbound);
    assert!(
        matches!(e.outcome, Outcome::Closed { .. }),
        "{:?}",
        e.outcome
    );
}

#[test]
fn a_route_whose_targets_all_weigh_zero_is_answered_503_with_the_weights_to_change() {
    let mut s = mesh("DROP_ALL");
    let m = s.meshes.get_mut("m").unwrap();
    m.routes.get_mut("vr").unwrap().remove("canary");
    let split = m.routes.get_mut("vr").unwrap().get_mut("split").unwrap();
    for t in &mut split
        .spec
        .http_route
        .as_mut()
        .unwrap()
        .action
        .weighted_targets
    {
        t.weight = 0;
    }
    let e = front(&s, "http://color.local:9080/", &[]);
    let Outcome::LocalReply { status, fix, .. } = &e.outcome else {
        panic!("{:?}", e.outcome)
    };
    assert_eq!(*status, 503);
    assert_eq!(
        fix[0].field,
        "spec.httpRoute.action.weightedTargets[].weight"
    );
}

#[test]
fn the_text_form_shows_each_decision_its_fields_and_the_outcome() {
    let e = front(&mesh("DROP_ALL"), "http://color.local:9080/", &[]);
    let t = text(&e);
    for want in [
        "GET http://color.local:9080/ through mesh/m/virtualNode/front",
        "listener            lds_egress_0.0.0.0_15001",
        "route               split",
        "passed over canary: the request has no x-canary header",
        "← virtualRouter/vr/route/canary spec.httpRoute.match.headers[0] = {",
        " 80.0% cds_egress_m_blue_http_9080 (virtual node blue) → blue.internal:9080",
        "outcome             forwarded as GET / with Host color.local:9080",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["outcome"]["kind"], "forwarded");
    assert_eq!(json["steps"][0]["stage"], "listener");
}
