//! Every translated snapshot is accepted by real Envoy 1.40: a mesh using every translated route
//! feature, SDS secrets and gateway policies, and a large generated mesh, each served to a real
//! Envoy that must ACK every type.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use trellis_tests::Workdir;
use trellis_tests::apps::{Pki, envoy_accepts, envoy_accepts_with};
use trellis_tests::mesh::Agent;
use trellis_tests::scenario::resources_file;
use trellis_tests::sds::{SdsSecret, SdsServer};

fn names_in(dump: &Value, kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in dump["configs"].as_array().into_iter().flatten() {
        for key in [
            "dynamic_active_clusters",
            "dynamic_listeners",
            "dynamic_route_configs",
        ] {
            for item in c[key].as_array().into_iter().flatten() {
                let name = item["cluster"]["name"]
                    .as_str()
                    .or(item["name"].as_str())
                    .or(item["route_config"]["name"].as_str());
                if let Some(n) = name
                    && key.contains(kind)
                {
                    out.push(n.to_string());
                }
            }
        }
    }
    out.sort();
    out
}

fn node(name: &str, port: u16, proto: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": port, "protocol": proto}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.internal")}}}})
}

#[test]
fn every_route_feature_is_accepted_by_real_envoy() {
    let work = Workdir::new("accept-features");
    let targets = |n: &[(&str, i64)]| json!({"weightedTargets": n.iter().map(|(v, w)| json!({"virtualNode": v, "weight": w})).collect::<Vec<_>>()});
    let retry = json!({"maxRetries": 2, "perRetryTimeout": {"unit": "ms", "value": 500},
        "httpRetryEvents": ["server-error", "gateway-error", "client-error", "stream-error"], "tcpRetryEvents": ["connection-error"]});
    let items = json!([
        {"meshName": "m", "spec": {"egressFilter": {"type": "ALLOW_ALL"}}},
        node("h1", 8080, "http"), node("h2", 8080, "http"), node("g1", 9090, "grpc"), node("t1", 5432, "tcp"), node("w2", 8443, "http2"),
        {"meshName": "m", "virtualRouterName": "http-vr", "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}},
        {"meshName": "m", "virtualRouterName": "grpc-vr", "spec": {"listeners": [{"portMapping": {"port": 9090, "protocol": "grpc"}}]}},
        {"meshName": "m", "virtualRouterName": "tcp-vr", "spec": {"listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}]}},
        {"meshName": "m", "virtualRouterName": "h2-vr", "spec": {"listeners": [{"portMapping": {"port": 8443, "protocol": "http2"}}]}},
        {"meshName": "m", "virtualRouterName": "http-vr", "routeName": "everything", "spec": {"priority": 5, "httpRoute": {
            "match": {"prefix": "/api", "method": "PUT", "scheme": "https",
                "headers": [{"name": "a", "match": {"exact": "1"}}, {"name": "b", "match": {"prefix": "x"}},
                            {"name": "c", "match": {"suffix": "y"}}, {"name": "d", "match": {"regex": "^v[0-9]+$"}},
                            {"name": "e", "match": {"range": {"start": 1, "end": 9}}}, {"name": "f", "invert": true}],
                "queryParameters": [{"name": "q", "match": {"exact": "1"}}, {"name": "p"}]},
            "action": targets(&[("h1", 3), ("h2", 0)]), "retryPolicy": retry,
            "timeout": {"perRequest": {"unit": "s", "value": 3}, "idle": {"unit": "ms", "value": 1500}}}}},
        {"meshName": "m", "virtualRouterName": "http-vr", "routeName": "by-path", "spec": {"httpRoute": {
            "match": {"path": {"exact": "/exact"}}, "action": targets(&[("h2", 1)])}}},
        {"meshName": "m", "virtualRouterName": "http-vr", "routeName": "by-regex", "spec": {"httpRoute": {
            "match": {"path": {"regex": "/items/[0-9]+"}}, "action": targets(&[("h1", 1)])}}},
        {"meshName": "m", "virtualRouterName": "http-vr", "routeName": "nothing", "spec": {"httpRoute": {
            "match": {"prefix": "/off"}, "action": targets(&[("h1", 0)])}}},
        {"meshName": "m", "virtualRouterName": "grpc-vr", "routeName": "g", "spec": {"grpcRoute": {
            "match": {"serviceName": "shop.Cart", "methodName": "Add", "metadata": [{"name": "t", "match": {"range": {"start": 1, "end": 2}}}]},
            "action": targets(&[("g1", 1)]),
            "retryPolicy": {"maxRetries": 1, "perRetryTimeout": {"unit": "s", "value": 1}, "grpcRetryEvents": ["unavailable", "deadline-exceeded"]}}}},
        {"meshName": "m", "virtualRouterName": "tcp-vr", "routeName": "t", "spec": {"tcpRoute": {"action": targets(&[("t1", 1)])}}},
        {"meshName": "m", "virtualRouterName": "h2-vr", "routeName": "w", "spec": {"http2Route": {"match": {"prefix": "/"}, "action": targets(&[("w2", 1)])}}},
        {"meshName": "m", "virtualServiceName": "http.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "http-vr"}}}},
        {"meshName": "m", "virtualServiceName": "grpc.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "grpc-vr"}}}},
        {"meshName": "m", "virtualServiceName": "tcp.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "tcp-vr"}}}},
        {"meshName": "m", "virtualServiceName": "h2.local", "spec": {"provider": {"virtualRouter": {"virtualRouterName": "h2-vr"}}}},
        {"meshName": "m", "virtualServiceName": "direct.local", "spec": {"provider": {"virtualNode": {"virtualNodeName": "h1"}}}},
        {"meshName": "m", "virtualNodeName": "client", "spec": {"backends": [
            {"virtualService": {"virtualServiceName": "http.local"}}, {"virtualService": {"virtualServiceName": "grpc.local"}},
            {"virtualService": {"virtualServiceName": "tcp.local"}}, {"virtualService": {"virtualServiceName": "h2.local"}},
            {"virtualService": {"virtualServiceName": "direct.local"}}]}}
    ]);
    let agent = Agent::start(&work, Some(&resources_file(&work, &items)));
    let dump = envoy_accepts(&work, &agent, "mesh/m/virtualNode/client");
    assert_eq!(
        names_in(&dump, "route"),
        [
            "rds_egress_grpc_9090",
            "rds_egress_http2_8443",
            "rds_egress_http_15001",
            "rds_egress_http_8080"
        ]
    );
    assert_eq!(names_in(&dump, "listener"), ["lds_egress_0.0.0.0_15001"]);
    let clusters = names_in(&dump, "cluster");
    for c in [
        "cds_egress_m_h1_http_8080",
        "cds_egress_m_g1_grpc_9090",
        "cds_egress_m_t1_tcp_5432",
        "cds_egress_m_allow_all",
    ] {
        assert!(
            clusters.contains(&c.to_string()),
            "{c} missing from {clusters:?}"
        );
    }
    // A gRPC provider node: its ingress, and (ALLOW_ALL) an egress passthrough.
    let dump = envoy_accepts(&work, &agent, "mesh/m/virtualNode/g1");
    assert_eq!(
        names_in(&dump, "listener"),
        ["lds_egress_0.0.0.0_15001", "lds_ingress_0.0.0.0_15000"]
    );
    assert_eq!(names_in(&dump, "route"), ["rds_ingress_grpc_9090"]);
}

#[test]
fn a_large_generated_mesh_is_accepted_by_real_envoy() {
    let work = Workdir::new("accept-large");
    let mut items = vec![json!({"meshName": "m"})];
    let mut backends = Vec::new();
    for i in 0..50 {
        items.push(node(&format!("n{i}"), 8000 + (i % 5) as u16, "http"));
        items.push(json!({"meshName": "m", "virtualRouterName": format!("r{i}"),
            "spec": {"listeners": [{"portMapping": {"port": 8000 + (i % 5), "protocol": "http"}}]}}));
        for j in 0..10 {
            items.push(json!({"meshName": "m", "virtualRouterName": format!("r{i}"), "routeName": format!("rt{j}"),
                "spec": {"httpRoute": {"match": {"prefix": format!("/p{j}")},
                    "action": {"weightedTargets": [{"virtualNode": format!("n{i}"), "weight": 1}, {"virtualNode": format!("n{}", (i + 1) % 50), "weight": 1}]}}}}));
        }
        items.push(
            json!({"meshName": "m", "virtualServiceName": format!("s{i}.local"),
            "spec": {"provider": {"virtualRouter": {"virtualRouterName": format!("r{i}")}}}}),
        );
        backends.push(json!({"virtualService": {"virtualServiceName": format!("s{i}.local")}}));
    }
    items.push(
        json!({"meshName": "m", "virtualNodeName": "client", "spec": {"backends": backends}}),
    );
    let agent = Agent::start(&work, Some(&resources_file(&work, &Value::Array(items))));
    let dump = envoy_accepts(&work, &agent, "mesh/m/virtualNode/client");
    assert_eq!(
        names_in(&dump, "route").len(),
        6,
        "one route config per port, and the explicit one"
    );
    // 50 node clusters and DROP_ALL's AWS API pass-through.
    assert_eq!(names_in(&dump, "cluster").len(), 51);
}

/// SDS certificates and trust (listener, client policy, gateway) and every gateway listener
/// policy, accepted by real Envoys bootstrapped with `APPMESH_SDS_SOCKET_PATH` and fetching the
/// secrets from a local SDS server.
#[test]
fn sds_and_gateway_policies_are_accepted_by_real_envoy() {
    let work = Workdir::new("accept-sds-gateway");
    let pki = Pki::new(&work, "accept");
    let (chain, key) = pki.issue("svc", &["svc.local", "gw.example.com"]);
    let ca = pki.ca();
    let sds = SdsServer::start(
        &work,
        BTreeMap::from([
            ("spiffe://t/svc".to_string(), SdsSecret::cert(&chain, &key)),
            ("spiffe://t".to_string(), SdsSecret::trust(&ca)),
        ]),
    );
    let socket = sds.socket.display().to_string();
    let sds_cert = json!({"sds": {"secretName": "spiffe://t/svc"}});
    let file_cert = json!({"file": {"certificateChain": chain, "privateKey": key}});
    let sds_trust = json!({"trust": {"sds": {"secretName": "spiffe://t"}},
        "subjectAlternativeNames": {"match": {"exact": ["svc.local"]}}});
    let hc = json!({"protocol": "http", "path": "/ping", "healthyThreshold": 2,
        "unhealthyThreshold": 2, "intervalMillis": 5000, "timeoutMillis": 2000});
    let mut web = node("web", 8080, "http");
    web["spec"]["listeners"][0]["tls"] =
        json!({"mode": "STRICT", "certificate": sds_cert, "validation": sds_trust});
    let mut rpc = node("rpc", 9090, "grpc");
    rpc["spec"]["listeners"][0]["tls"] = json!({"mode": "PERMISSIVE", "certificate": sds_cert});
    let items = json!([
        {"meshName": "m"},
        web, rpc, node("h2", 8443, "http2"),
        {"meshName": "m", "virtualServiceName": "web.local", "spec": {"provider": {"virtualNode": {"virtualNodeName": "web"}}}},
        {"meshName": "m", "virtualServiceName": "rpc.local", "spec": {"provider": {"virtualNode": {"virtualNodeName": "rpc"}}}},
        {"meshName": "m", "virtualServiceName": "h2.local", "spec": {"provider": {"virtualNode": {"virtualNodeName": "h2"}}}},
        {"meshName": "m", "virtualNodeName": "client", "spec": {
            "backendDefaults": {"clientPolicy": {"tls": {"certificate": sds_cert, "validation": sds_trust}}},
            "backends": [{"virtualService": {"virtualServiceName": "web.local"}}]}},
        {"meshName": "m", "virtualGatewayName": "gw", "spec": {
            "listeners": [
                {"portMapping": {"port": 8088, "protocol": "http"},
                 "tls": {"mode": "STRICT", "certificate": sds_cert, "validation": sds_trust},
                 "connectionPool": {"http": {"maxConnections": 10, "maxPendingRequests": 5}},
                 "healthCheck": hc},
                {"portMapping": {"port": 8089, "protocol": "http2"},
                 "tls": {"mode": "PERMISSIVE", "certificate": file_cert,
                     "validation": {"trust": {"file": {"certificateChain": ca}}}},
                 "connectionPool": {"http2": {"maxRequests": 10}}},
                {"portMapping": {"port": 8090, "protocol": "grpc"},
                 "tls": {"mode": "DISABLED", "certificate": file_cert},
                 "connectionPool": {"grpc": {"maxRequests": 10}}}],
            "backendDefaults": {"clientPolicy": {"tls": {"certificate": sds_cert, "validation": sds_trust}}},
            "logging": {"accessLog": {"file": {"path": "/dev/null", "format": {"json": [{"key": "p", "value": "%REQ(:PATH)%"}]}}}}}},
        {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "web", "spec": {"httpRoute": {
            "match": {"prefix": "/", "port": 8088}, "action": {"target": {"virtualService": {"virtualServiceName": "web.local"}}}}}},
        {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "h2", "spec": {"http2Route": {
            "match": {"prefix": "/", "port": 8089}, "action": {"target": {"virtualService": {"virtualServiceName": "h2.local"}}}}}},
        {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "rpc", "spec": {"grpcRoute": {
            "match": {"serviceName": "shop.Cart", "port": 8090}, "action": {"target": {"virtualService": {"virtualServiceName": "rpc.local"}}}}}}
    ]);
    let agent = Agent::start(&work, Some(&resources_file(&work, &items)));
    let env = [("APPMESH_SDS_SOCKET_PATH", socket.as_str())];
    for proxy in [
        "mesh/m/virtualNode/web",
        "mesh/m/virtualNode/rpc",
        "mesh/m/virtualNode/client",
    ] {
        envoy_accepts_with(&work, &agent, proxy, &env);
    }
    let dump = envoy_accepts_with(&work, &agent, "mesh/m/virtualGateway/gw", &env);
    // Each pooled listener's second hop, on loopback (its pool limits all its services at once).
    assert_eq!(
        names_in(&dump, "listener"),
        [
            "lds_egress_127.0.0.1_15001",
            "lds_egress_127.0.0.1_15002",
            "lds_egress_127.0.0.1_15003",
            "lds_ingress_0.0.0.0_8088",
            "lds_ingress_0.0.0.0_8089",
            "lds_ingress_0.0.0.0_8090"
        ]
    );
    let asked = sds.requested();
    for name in ["spiffe://t/svc", "spiffe://t"] {
        assert!(asked.iter().any(|n| n == name), "{name}: {asked:?}");
    }
}
