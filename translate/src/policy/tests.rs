//! Virtual-node policies pinned down without a network: where each lands and with what values.

use prost::Message;
use serde_json::{Value, json};
use trellis_envoy_api::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use trellis_envoy_api::pb::envoy::config::cluster::v3::cluster::DnsLookupFamily;
use trellis_envoy_api::pb::envoy::config::core::v3::{
    TransportSocket, address, health_check, substitution_format_string, transport_socket,
};
use trellis_envoy_api::pb::envoy::config::endpoint::v3::lb_endpoint;
use trellis_envoy_api::pb::envoy::config::listener::v3::{Filter, FilterChain, filter};
use trellis_envoy_api::pb::envoy::config::route::v3::{RouteAction, route};
use trellis_envoy_api::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use trellis_envoy_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use trellis_envoy_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use trellis_envoy_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext, common_tls_context,
};
use trellis_envoy_api::pb::google::protobuf::{Any, value};

use crate::testing::chain_ports;
use crate::*;
use trellis_model::State;

fn state(mesh_spec: Value, nodes: &[(&str, Value)], services: &[(&str, &str)]) -> State {
    trellis_model::testing::mesh_state(mesh_spec, nodes, services)
}

fn of(s: &State, node: &str) -> Resources {
    let who = ProxyIdentity::parse(&format!("mesh/m/virtualNode/{node}")).unwrap();
    translate(s, &who, &Endpoints::new()).unwrap()
}

/// `back` (one listener, built from `listener` JSON) provides `back.local`; `front` calls it
/// with `front_extra` merged into its spec.
fn pair(mesh: Value, listener: Value, front_extra: Value) -> State {
    let mut front = json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]});
    if let (Some(f), Some(extra)) = (front.as_object_mut(), front_extra.as_object()) {
        for (k, v) in extra {
            f.insert(k.clone(), v.clone());
        }
    }
    state(
        mesh,
        &[
            (
                "back",
                json!({"listeners": [listener], "serviceDiscovery": {"dns": {"hostname": "back.internal"}}}),
            ),
            ("front", front),
        ],
        &[("back.local", "back")],
    )
}

fn http(port: u16) -> Value {
    json!({"portMapping": {"port": port, "protocol": "http"}})
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

fn cluster<'a>(r: &'a Resources, name: &str) -> &'a Cluster {
    r.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn listener<'a>(r: &'a Resources, name: &str) -> &'a Listener {
    r.listeners.iter().find(|l| l.name == name).unwrap()
}

fn unpack<T: Message + Default>(any: &Any) -> T {
    T::decode(any.value.as_slice()).unwrap()
}

fn typed(f: &Filter) -> &Any {
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(a)) => a,
        other => panic!("untyped filter {other:?}"),
    }
}

fn hcm(chain: &FilterChain) -> HttpConnectionManager {
    unpack(typed(&chain.filters[0]))
}

fn first_action(r: &Resources, route_config: &str) -> RouteAction {
    let rc = r.routes.iter().find(|rc| rc.name == route_config).unwrap();
    match &rc.virtual_hosts[0].routes[0].action {
        Some(route::Action::Route(a)) => a.clone(),
        other => panic!("not a route action: {other:?}"),
    }
}

fn secs(d: &Option<trellis_envoy_api::pb::google::protobuf::Duration>) -> f64 {
    let d = d.as_ref().unwrap();
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

fn socket_typed(t: &TransportSocket) -> &Any {
    match &t.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None => panic!("untyped transport socket"),
    }
}

const INGRESS: &str = "lds_ingress_0.0.0.0_15000";
const EGRESS: &str = "lds_egress_0.0.0.0_15001";
const BACK_EGRESS: &str = "cds_egress_m_back_http_8080";
const BACK_INGRESS: &str = "cds_ingress_m_back_http_8080";

#[test]
fn listener_timeouts_default_to_15s_and_300s_and_bound_both_the_ingress_and_the_callers_route() {
    let s = pair(json!({}), http(8080), json!({}));
    let back = of(&s, "back");
    let a = first_action(&back, "rds_ingress_http_8080");
    assert_eq!((secs(&a.timeout), secs(&a.idle_timeout)), (15.0, 300.0));

    let timed = with(
        http(8080),
        json!({"timeout": {"http": {"perRequest": {"unit": "ms", "value": 1500}, "idle": {"unit": "s", "value": 42}}}}),
    );
    let s = pair(json!({}), timed, json!({}));
    let a = first_action(&of(&s, "back"), "rds_ingress_http_8080");
    assert_eq!((secs(&a.timeout), secs(&a.idle_timeout)), (1.5, 42.0));
    // virtual_nodes.md: "If you specify a timeout greater than the default, make sure to set up
    // a virtual router and a route with a timeout greater than the default": the caller's side
    // of a node-provided service keeps App Mesh's route defaults.
    let a = first_action(&of(&s, "front"), "rds_egress_http_8080");
    assert_eq!((secs(&a.timeout), secs(&a.idle_timeout)), (15.0, 300.0));
    let longer = with(
        http(8080),
        json!({"timeout": {"http": {"perRequest": {"unit": "s", "value": 20}}}}),
    );
    let s = pair(json!({}), longer, json!({}));
    let a = first_action(&of(&s, "front"), "rds_egress_http_8080");
    assert_eq!(
        secs(&a.timeout),
        15.0,
        "a router's route is needed past 15 s"
    );
    assert_eq!(
        secs(&first_action(&of(&s, "back"), "rds_ingress_http_8080").timeout),
        20.0
    );
}

#[test]
fn grpc_and_tcp_listener_timeouts_land_on_the_route_and_the_tcp_proxy() {
    let grpc = json!({"portMapping": {"port": 9090, "protocol": "grpc"},
        "timeout": {"grpc": {"perRequest": {"unit": "s", "value": 60}}}});
    let s = pair(json!({}), grpc, json!({}));
    let a = first_action(&of(&s, "back"), "rds_ingress_grpc_9090");
    assert_eq!((secs(&a.timeout), secs(&a.idle_timeout)), (60.0, 300.0));

    for (tcp, want) in [
        (
            json!({"portMapping": {"port": 5432, "protocol": "tcp"}}),
            300.0,
        ),
        (
            json!({"portMapping": {"port": 5432, "protocol": "tcp"},
                "timeout": {"tcp": {"idle": {"unit": "s", "value": 7}}}}),
            7.0,
        ),
    ] {
        let s = pair(json!({}), tcp, json!({}));
        let back = of(&s, "back");
        let proxy: TcpProxy = unpack(typed(&listener(&back, INGRESS).filter_chains[0].filters[0]));
        assert_eq!(secs(&proxy.idle_timeout), want);
    }
}

/// (connections, pending, requests, retries) of a cluster's default-priority thresholds.
fn thresholds(c: &Cluster) -> (u32, u32, u32, u32) {
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    let v = |x: &Option<trellis_envoy_api::pb::google::protobuf::UInt32Value>| {
        x.as_ref().map(|v| v.value).unwrap()
    };
    (
        v(&t.max_connections),
        v(&t.max_pending_requests),
        v(&t.max_requests),
        v(&t.max_retries),
    )
}

const UNLIMITED: u32 = 2_147_483_647;

#[test]
fn connection_pools_lower_the_local_clusters_breakers_the_rest_stay_app_mesh_unlimited() {
    const U: u32 = UNLIMITED;
    let cases = [
        (
            "http",
            json!({"http": {"maxConnections": 10}}),
            (10, U, U, U),
        ),
        (
            "http",
            json!({"http": {"maxConnections": 10, "maxPendingRequests": 3}}),
            (10, 3, U, U),
        ),
        ("http2", json!({"http2": {"maxRequests": 7}}), (U, U, 7, U)),
        ("grpc", json!({"grpc": {"maxRequests": 8}}), (U, U, 8, U)),
        ("tcp", json!({"tcp": {"maxConnections": 4}}), (4, U, U, U)),
    ];
    for (proto, pool, want) in cases {
        let l = json!({"portMapping": {"port": 8080, "protocol": proto}, "connectionPool": pool});
        let s = pair(json!({}), l, json!({}));
        let back = of(&s, "back");
        let c = cluster(&back, &format!("cds_ingress_m_back_{proto}_8080"));
        assert_eq!(thresholds(c), want, "{proto}");
        let front = of(&s, "front");
        assert_eq!(
            thresholds(cluster(&front, &format!("cds_egress_m_back_{proto}_8080"))),
            (U, U, U, U),
            "pools are destination-side"
        );
    }
}

/// envoy-defaults.md, "Default circuit breaker": `max_requests`, `max_pending_requests`,
/// `max_connections` and `max_retries` are 2147483647 on every Envoy App Mesh configures.
#[test]
fn every_cluster_without_a_pool_has_app_mesh_unlimited_circuit_breakers() {
    let s = state(
        json!({"egressFilter": {"type": "ALLOW_ALL"}}),
        &[
            (
                "back",
                json!({"listeners": [http(8080)], "serviceDiscovery": {"dns": {"hostname": "back.internal"}}}),
            ),
            (
                "front",
                json!({"listeners": [http(9090)],
                    "backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}),
            ),
        ],
        &[("back.local", "back")],
    );
    let front = of(&s, "front");
    let names: Vec<&str> = front.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cds_egress_m_allow_all",
            "cds_egress_m_back_http_8080",
            "cds_ingress_m_front_http_9090"
        ]
    );
    for c in &front.clusters {
        assert_eq!(
            thresholds(c),
            (UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED),
            "{}",
            c.name
        );
    }
    let drop_all = pair(json!({}), http(8080), json!({}));
    let aws = of(&drop_all, "front");
    assert_eq!(
        thresholds(cluster(&aws, "cds_egress_m_amazonaws")),
        (UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED)
    );
}

fn hc(protocol: &str, extra: Value) -> Value {
    with(
        json!({"protocol": protocol, "healthyThreshold": 2, "unhealthyThreshold": 3,
            "intervalMillis": 5000, "timeoutMillis": 2000}),
        extra,
    )
}

#[test]
fn a_listener_health_check_runs_from_callers_clusters_with_its_thresholds_and_timings() {
    let l = with(
        http(8080),
        json!({"healthCheck": hc("http", json!({"path": "/health"}))}),
    );
    let s = pair(json!({}), l, json!({}));
    assert!(
        cluster(&of(&s, "back"), BACK_INGRESS)
            .health_checks
            .is_empty()
    );
    let front = of(&s, "front");
    let h = &cluster(&front, BACK_EGRESS).health_checks[0];
    assert_eq!((secs(&h.interval), secs(&h.timeout)), (5.0, 2.0));
    assert_eq!(
        (
            h.healthy_threshold.as_ref().unwrap().value,
            h.unhealthy_threshold.as_ref().unwrap().value
        ),
        (2, 3)
    );
    match &h.health_checker {
        Some(health_check::HealthChecker::HttpHealthCheck(x)) => assert_eq!(x.path, "/health"),
        other => panic!("not an HTTP check: {other:?}"),
    }
}

#[test]
fn health_check_protocols_and_port_map_to_envoy_checkers_and_the_endpoint_check_port() {
    let tcp = with(
        http(8080),
        json!({"healthCheck": hc("tcp", json!({"port": 8081}))}),
    );
    let s = pair(json!({}), tcp, json!({}));
    let front = of(&s, "front");
    let c = cluster(&front, BACK_EGRESS);
    assert!(matches!(
        c.health_checks[0].health_checker,
        Some(health_check::HealthChecker::TcpHealthCheck(_))
    ));
    let ep = &c.load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints[0];
    match &ep.host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
            assert_eq!(e.health_check_config.as_ref().unwrap().port_value, 8081);
        }
        other => panic!("{other:?}"),
    }

    let grpc = json!({"portMapping": {"port": 9090, "protocol": "grpc"}, "healthCheck": hc("grpc", json!({}))});
    let s = pair(json!({}), grpc, json!({}));
    let front = of(&s, "front");
    assert!(matches!(
        cluster(&front, "cds_egress_m_back_grpc_9090").health_checks[0].health_checker,
        Some(health_check::HealthChecker::GrpcHealthCheck(_))
    ));

    // Envoy would reject a gRPC check on an HTTP/1 cluster: a connect check, and a note.
    let mismatch = with(http(8080), json!({"healthCheck": hc("grpc", json!({}))}));
    let s = pair(json!({}), mismatch, json!({}));
    let front = of(&s, "front");
    assert!(matches!(
        cluster(&front, BACK_EGRESS).health_checks[0].health_checker,
        Some(health_check::HealthChecker::TcpHealthCheck(_))
    ));
    assert_eq!(front.unserved.len(), 1, "{:?}", front.unserved);
}

#[test]
fn outlier_detection_ejects_on_consecutive_server_errors_from_callers_clusters() {
    let l = with(
        http(8080),
        json!({"outlierDetection": {"maxServerErrors": 2, "interval": {"unit": "s", "value": 1},
            "baseEjectionDuration": {"unit": "s", "value": 30}, "maxEjectionPercent": 50}}),
    );
    let s = pair(json!({}), l, json!({}));
    let front = of(&s, "front");
    let o = cluster(&front, BACK_EGRESS)
        .outlier_detection
        .clone()
        .unwrap();
    assert_eq!(o.consecutive_5xx.unwrap().value, 2);
    assert_eq!(o.enforcing_consecutive_5xx.unwrap().value, 100);
    assert_eq!(
        o.enforcing_success_rate.unwrap().value,
        0,
        "App Mesh ejects on errors only"
    );
    assert_eq!(
        (secs(&o.interval), secs(&o.base_ejection_time)),
        (1.0, 30.0)
    );
    assert_eq!(o.max_ejection_percent.unwrap().value, 50);
    assert!(
        cluster(&of(&s, "back"), BACK_INGRESS)
            .outlier_detection
            .is_none()
    );
}

#[test]
fn without_outlier_detection_callers_eject_only_hosts_whose_connections_fail() {
    let s = pair(json!({}), http(8080), json!({}));
    let o = cluster(&of(&s, "front"), BACK_EGRESS)
        .outlier_detection
        .clone()
        .unwrap();
    assert!(o.split_external_local_origin_errors);
    assert_eq!(o.consecutive_local_origin_failure.unwrap().value, 5);
    assert_eq!(
        o.enforcing_consecutive_local_origin_failure.unwrap().value,
        100
    );
    assert_eq!(
        o.max_ejection_percent.unwrap().value,
        50,
        "one of three tasks"
    );
    // Answers never eject: no 5xx, gateway-error or success-rate ejection.
    assert_eq!(o.enforcing_consecutive_5xx.unwrap().value, 0);
    assert_eq!(o.enforcing_consecutive_gateway_failure.unwrap().value, 0);
    assert_eq!(o.enforcing_success_rate.unwrap().value, 0);
    assert_eq!(o.enforcing_local_origin_success_rate.unwrap().value, 0);
}

fn file_log(l: &AccessLog) -> FileAccessLog {
    assert_eq!(l.name, "envoy.access_loggers.file");
    match &l.config_type {
        Some(access_log::ConfigType::TypedConfig(a)) => unpack(a),
        other => panic!("{other:?}"),
    }
}

#[test]
fn access_logs_go_on_every_connection_manager_and_tcp_proxy_of_the_node() {
    let logging = json!({"logging": {"accessLog": {"file": {"path": "/dev/stdout"}}}});
    let mut s = pair(
        json!({"egressFilter": {"type": "ALLOW_ALL"}}),
        http(8080),
        logging.clone(),
    );
    let m = s.meshes.get_mut("m").unwrap();
    let back = &mut m.virtual_nodes.get_mut("back").unwrap().spec;
    back.logging = serde_json::from_value(logging["logging"].clone()).unwrap();
    back.listeners.as_mut().unwrap().push(
        serde_json::from_value(json!({"portMapping": {"port": 5432, "protocol": "tcp"}})).unwrap(),
    );

    let b = of(&s, "back");
    let ingress = listener(&b, INGRESS);
    let http_logs = hcm(&ingress.filter_chains[0]).access_log;
    let tcp_logs = unpack::<TcpProxy>(typed(&ingress.filter_chains[1].filters[0])).access_log;
    for logs in [http_logs, tcp_logs] {
        let f = file_log(&logs[0]);
        assert_eq!(f.path, "/dev/stdout");
        assert!(f.access_log_format.is_none(), "Envoy's default format");
    }
    let f = of(&s, "front");
    let egress = listener(&f, EGRESS);
    assert_eq!(chain_ports(egress), [Some(5432), Some(8080), Some(15001)]);
    assert_eq!(hcm(&egress.filter_chains[1]).access_log.len(), 1);
    assert_eq!(hcm(&egress.filter_chains[2]).access_log.len(), 1);
    let tcp: TcpProxy = unpack(typed(&egress.filter_chains[0].filters[0]));
    assert_eq!(tcp.access_log.len(), 1);
    let passthrough: TcpProxy = unpack(typed(
        &egress.default_filter_chain.as_ref().unwrap().filters[0],
    ));
    assert_eq!(passthrough.access_log.len(), 1);

    // No logging, no access log.
    let plain = of(&pair(json!({}), http(8080), json!({})), "front");
    assert!(
        hcm(&listener(&plain, EGRESS).filter_chains[0])
            .access_log
            .is_empty()
    );
}

#[test]
fn text_formats_get_a_newline_and_json_formats_keep_every_key_deterministically() {
    let text = json!({"logging": {"accessLog": {"file": {"path": "/tmp/a.log",
        "format": {"text": "%RESPONSE_CODE% %REQ(:PATH)%"}}}}});
    let f = of(&pair(json!({}), http(8080), text), "front");
    let log = file_log(&hcm(&listener(&f, EGRESS).filter_chains[0]).access_log[0]);
    match log.access_log_format {
        Some(file_access_log::AccessLogFormat::LogFormat(fmt)) => match fmt.format {
            Some(substitution_format_string::Format::TextFormatSource(src)) => {
                assert_eq!(
                    src.specifier,
                    Some(
                        trellis_envoy_api::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                            "%RESPONSE_CODE% %REQ(:PATH)%\n".into()
                        )
                    )
                );
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }

    let keys: Vec<Value> = (0..8)
        .map(|i| json!({"key": format!("k{i}"), "value": format!("%REQ(X-{i})%")}))
        .collect();
    let json_fmt = json!({"logging": {"accessLog": {"file": {"path": "/tmp/a.log", "format": {"json": keys}}}}});
    let s = pair(json!({}), http(8080), json_fmt);
    let one = of(&s, "front");
    let log = file_log(&hcm(&listener(&one, EGRESS).filter_chains[0]).access_log[0]);
    let Some(file_access_log::AccessLogFormat::LogFormat(fmt)) = log.access_log_format else {
        panic!("no format")
    };
    let Some(substitution_format_string::Format::JsonFormat(st)) = fmt.format else {
        panic!("not json")
    };
    assert_eq!(
        st.fields.len(),
        8,
        "every key survives the per-key encoding"
    );
    assert_eq!(
        st.fields["k3"].kind,
        Some(value::Kind::StringValue("%REQ(X-3)%".into()))
    );
    for _ in 0..5 {
        assert_eq!(
            of(&s, "front"),
            one,
            "same input, same bytes (no HashMap order)"
        );
    }
}

fn cert(dir: &str) -> Value {
    json!({"file": {"certificateChain": format!("{dir}/cert.pem"), "privateKey": format!("{dir}/key.pem")}})
}

#[test]
fn listener_tls_modes_shape_the_ingress_chains() {
    let tls = |mode: &str| {
        with(
            http(8080),
            json!({"tls": {"mode": mode, "certificate": cert("/c")}}),
        )
    };

    let strict = of(&pair(json!({}), tls("STRICT"), json!({})), "back");
    let l = listener(&strict, INGRESS);
    assert_eq!(l.filter_chains.len(), 1);
    let ts = l.filter_chains[0].transport_socket.as_ref().unwrap();
    let ctx: DownstreamTlsContext = unpack(socket_typed(ts));
    let common = ctx.common_tls_context.unwrap();
    assert_eq!(
        common.tls_certificates[0].certificate_chain,
        Some(trellis_envoy_api::pb::envoy::config::core::v3::DataSource {
            specifier: Some(
                trellis_envoy_api::pb::envoy::config::core::v3::data_source::Specifier::Filename(
                    "/c/cert.pem".into()
                )
            ),
            ..Default::default()
        })
    );
    assert!(ctx.require_client_certificate.is_none());
    assert_eq!(l.listener_filters.len(), 1, "no inspector needed");

    let permissive = of(&pair(json!({}), tls("PERMISSIVE"), json!({})), "back");
    let l = listener(&permissive, INGRESS);
    assert_eq!(l.filter_chains.len(), 2);
    let m = |c: &FilterChain| c.filter_chain_match.clone().unwrap();
    assert_eq!(m(&l.filter_chains[0]).transport_protocol, "tls");
    assert!(l.filter_chains[0].transport_socket.is_some());
    assert_eq!(m(&l.filter_chains[1]).transport_protocol, "");
    assert!(l.filter_chains[1].transport_socket.is_none());
    assert!(
        l.listener_filters
            .iter()
            .any(|f| f.name == "envoy.filters.listener.tls_inspector")
    );
    assert!(l.continue_on_listener_filters_timeout);

    let disabled = of(&pair(json!({}), tls("DISABLED"), json!({})), "back");
    assert!(
        listener(&disabled, INGRESS).filter_chains[0]
            .transport_socket
            .is_none()
    );
}

#[test]
fn listener_validation_requires_client_certificates_for_mtls() {
    let l = with(
        http(8080),
        json!({"tls": {"mode": "STRICT", "certificate": cert("/c"), "validation": {
            "trust": {"file": {"certificateChain": "/c/ca.pem"}},
            "subjectAlternativeNames": {"match": {"exact": ["front.local"]}}}}}),
    );
    let back = of(&pair(json!({}), l, json!({})), "back");
    let ts = listener(&back, INGRESS).filter_chains[0]
        .transport_socket
        .clone()
        .unwrap();
    let ctx: DownstreamTlsContext = unpack(socket_typed(&ts));
    assert!(ctx.require_client_certificate.unwrap().value);
    match ctx.common_tls_context.unwrap().validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
            assert!(v.trusted_ca.is_some());
            assert_eq!(v.match_typed_subject_alt_names.len(), 2, "DNS and URI SANs");
        }
        other => panic!("{other:?}"),
    }
}

/// The SDS secret `name` from the bootstrap's SDS cluster, not over ADS.
fn assert_sds(c: &SdsSecretConfig, name: &str) {
    use trellis_envoy_api::pb::envoy::config::core::v3::{
        ApiVersion, api_config_source, config_source, grpc_service,
    };
    assert_eq!(c.name, name);
    let source = c.sds_config.as_ref().unwrap();
    assert_eq!(source.resource_api_version, ApiVersion::V3 as i32);
    match &source.config_source_specifier {
        Some(config_source::ConfigSourceSpecifier::ApiConfigSource(api)) => {
            assert_eq!(api.api_type, api_config_source::ApiType::Grpc as i32);
            assert_eq!(api.transport_api_version, ApiVersion::V3 as i32);
            match &api.grpc_services[0].target_specifier {
                Some(grpc_service::TargetSpecifier::EnvoyGrpc(g)) => {
                    assert_eq!(g.cluster_name, "static_cluster_sds_unix_socket");
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("not an SDS gRPC source: {other:?}"),
    }
}

/// SDS trust: SAN matchers in the default context, the bundle from SDS merged into it.
fn assert_sds_trust(v: Option<common_tls_context::ValidationContextType>, name: &str, sans: usize) {
    match v {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            let default = c.default_validation_context.unwrap();
            assert!(default.trusted_ca.is_none(), "the CA comes from SDS");
            assert_eq!(default.match_typed_subject_alt_names.len(), sans);
            assert_sds(&c.validation_context_sds_secret_config.unwrap(), name);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sds_listener_certificates_and_trust_come_from_the_local_sds_server() {
    let sds = |mode: &str| {
        with(
            http(8080),
            json!({"tls": {"mode": mode, "certificate": {"sds": {"secretName": "spiffe://x/back"}},
                "validation": {"trust": {"sds": {"secretName": "spiffe://x"}},
                    "subjectAlternativeNames": {"match": {"exact": ["spiffe://x/front"]}}}}}),
        )
    };
    let strict = of(&pair(json!({}), sds("STRICT"), json!({})), "back");
    assert!(strict.unserved.is_empty(), "{:?}", strict.unserved);
    let l = listener(&strict, INGRESS);
    assert_eq!(l.filter_chains.len(), 1);
    let ctx: DownstreamTlsContext = unpack(socket_typed(
        l.filter_chains[0].transport_socket.as_ref().unwrap(),
    ));
    assert!(ctx.require_client_certificate.unwrap().value);
    let common = ctx.common_tls_context.unwrap();
    assert!(common.tls_certificates.is_empty());
    assert_sds(
        &common.tls_certificate_sds_secret_configs[0],
        "spiffe://x/back",
    );
    assert_sds_trust(common.validation_context_type, "spiffe://x", 2);

    let permissive = of(&pair(json!({}), sds("PERMISSIVE"), json!({})), "back");
    assert_eq!(listener(&permissive, INGRESS).filter_chains.len(), 2);
}

#[test]
fn unservable_acm_certificates_refuse_strict_ports_and_say_why() {
    let acm = |mode: &str| {
        with(
            http(8080),
            json!({"tls": {"mode": mode, "certificate": {"acm": {"certificateArn": "arn:aws:acm:us-west-2:111122223333:certificate/x"}}}}),
        )
    };
    let strict = of(&pair(json!({}), acm("STRICT"), json!({})), "back");
    assert!(
        strict
            .listeners
            .iter()
            .all(|l| l.name != "lds_ingress_0.0.0.0_15000"),
        "never plaintext on a STRICT port"
    );
    assert!(strict.unserved[0].contains("ACM"), "{:?}", strict.unserved);
    assert!(
        strict.unserved[0].contains("attested"),
        "says why: {:?}",
        strict.unserved
    );
    let permissive = of(&pair(json!({}), acm("PERMISSIVE"), json!({})), "back");
    let l = listener(&permissive, INGRESS);
    assert_eq!(l.filter_chains.len(), 1);
    assert!(l.filter_chains[0].transport_socket.is_none());
    assert_eq!(permissive.unserved.len(), 1);
}

fn client_policy(extra: Value) -> Value {
    json!({"tls": with(json!({"validation": {
        "trust": {"file": {"certificateChain": "/c/ca.pem"}},
        "subjectAlternativeNames": {"match": {"exact": ["back.local"]}}}}), extra)})
}

fn upstream(r: &Resources) -> Option<UpstreamTlsContext> {
    cluster(r, BACK_EGRESS)
        .transport_socket
        .as_ref()
        .map(|t| unpack(socket_typed(t)))
}

#[test]
fn backend_defaults_client_tls_originates_tls_with_sni_sans_and_a_client_certificate() {
    let front = json!({"backendDefaults": {"clientPolicy": client_policy(json!({"certificate": cert("/f")}))}});
    let r = of(&pair(json!({}), http(8080), front), "front");
    let ctx = upstream(&r).expect("TLS to back");
    assert_eq!(ctx.sni, "back.local");
    let common = ctx.common_tls_context.unwrap();
    assert_eq!(
        common.tls_certificates.len(),
        1,
        "client certificate for mTLS"
    );
    match common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
            let names: Vec<_> = v
                .match_typed_subject_alt_names
                .iter()
                .map(|m| m.san_type)
                .collect();
            assert_eq!(names.len(), 2);
            assert!(v.trusted_ca.is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_backend_client_policy_overrides_defaults_and_enforce_false_or_other_ports_mean_plaintext() {
    let defaults = json!({"clientPolicy": client_policy(json!({}))});
    let backend = |policy: Value| {
        json!({"backendDefaults": defaults,
            "backends": [{"virtualService": {"virtualServiceName": "back.local", "clientPolicy": policy}}]})
    };
    let off = of(
        &pair(
            json!({}),
            http(8080),
            backend(client_policy(json!({"enforce": false}))),
        ),
        "front",
    );
    assert!(
        upstream(&off).is_none(),
        "the backend's own policy wins over the defaults"
    );
    let other_port = of(
        &pair(
            json!({}),
            http(8080),
            backend(client_policy(json!({"ports": [9443]}))),
        ),
        "front",
    );
    assert!(upstream(&other_port).is_none());
    let this_port = of(
        &pair(
            json!({}),
            http(8080),
            backend(client_policy(json!({"ports": [8080]}))),
        ),
        "front",
    );
    assert!(upstream(&this_port).is_some());
}

/// `back` provides `a.local` and `z.local`; `front` calls both, each with `policies[i]` (JSON
/// null: none), listed in `order`.
fn two_services(policies: [Value; 2], order: [usize; 2]) -> Resources {
    let names = ["a.local", "z.local"];
    let backends: Vec<Value> = order
        .iter()
        .map(|&i| {
            let mut vs = json!({"virtualServiceName": names[i]});
            if !policies[i].is_null() {
                vs["clientPolicy"] = policies[i].clone();
            }
            json!({"virtualService": vs})
        })
        .collect();
    let s = state(
        json!({}),
        &[
            (
                "back",
                json!({"listeners": [http(8080)], "serviceDiscovery": {"dns": {"hostname": "back.internal"}}}),
            ),
            ("front", json!({"backends": backends})),
        ],
        &[("a.local", "back"), ("z.local", "back")],
    );
    of(&s, "front")
}

#[test]
fn a_node_reached_by_two_backends_takes_the_tls_of_the_first_by_name_whatever_their_order() {
    let tls = client_policy(json!({}));
    for order in [[0, 1], [1, 0]] {
        let z_only = two_services([Value::Null, tls.clone()], order);
        assert!(
            upstream(&z_only).is_none(),
            "a.local (no policy) owns the cluster to back: {order:?}"
        );
        let a_only = two_services([tls.clone(), Value::Null], order);
        assert_eq!(upstream(&a_only).expect("TLS").sni, "a.local", "{order:?}");
        let both = two_services([tls.clone(), tls.clone()], order);
        assert_eq!(upstream(&both).expect("TLS").sni, "a.local", "{order:?}");
    }
}

#[test]
fn sds_client_trust_and_certificate_come_from_the_local_sds_server() {
    let sds = json!({"backendDefaults": {"clientPolicy": {"tls": {
        "certificate": {"sds": {"secretName": "spiffe://x/front"}},
        "validation": {"trust": {"sds": {"secretName": "spiffe://x"}},
            "subjectAlternativeNames": {"match": {"exact": ["spiffe://x/back"]}}}}}}});
    let r = of(&pair(json!({}), http(8080), sds), "front");
    assert!(r.unserved.is_empty(), "{:?}", r.unserved);
    let ctx = upstream(&r).expect("TLS to back");
    assert_eq!(ctx.sni, "back.local");
    let common = ctx.common_tls_context.unwrap();
    assert_sds(
        &common.tls_certificate_sds_secret_configs[0],
        "spiffe://x/front",
    );
    assert_sds_trust(common.validation_context_type, "spiffe://x", 2);
}

#[test]
fn unservable_acm_client_trust_drops_the_cluster_rather_than_talk_plaintext() {
    let acm = json!({"backendDefaults": {"clientPolicy": {"tls": {"validation": {
        "trust": {"acm": {"certificateAuthorityArns": ["arn:aws:acm-pca:us-west-2:111122223333:certificate-authority/x"]}}}}}}});
    let r = of(&pair(json!({}), http(8080), acm), "front");
    assert!(r.clusters.iter().all(|c| c.name != BACK_EGRESS));
    assert!(r.unserved[0].contains("ACM PCA trust"), "{:?}", r.unserved);
}

const CERT_ARN: &str = "arn:aws:acm:us-west-2:111122223333:certificate/back";
const CA_B: &str = "arn:aws:acm-pca:us-west-2:111122223333:certificate-authority/b";
const CA_A: &str = "arn:aws:acm-pca:us-west-2:111122223333:certificate-authority/a";

/// `node`'s translation when the agent serves ACM and holds `held`.
fn of_acm(s: &State, node: &str, held: &[&str]) -> Resources {
    let who = ProxyIdentity::parse(&format!("mesh/m/virtualNode/{node}")).unwrap();
    let endpoints = Endpoints {
        acm: Some(std::sync::Arc::new(
            held.iter().map(|a| a.to_string()).collect(),
        )),
        ..Endpoints::new()
    };
    translate(s, &who, &endpoints).unwrap()
}

/// The secret's name, asserting it is fetched over ADS (the agent's own stream).
fn over_ads(sds: &SdsSecretConfig) -> &str {
    use trellis_envoy_api::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    let source = sds.sds_config.as_ref().unwrap();
    assert!(
        matches!(
            source.config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ),
        "{source:?}"
    );
    &sds.name
}

fn acm_pair(mode: &str, front_extra: Value) -> State {
    let l = with(
        http(8080),
        json!({"tls": {"mode": mode, "certificate": {"acm": {"certificateArn": CERT_ARN}}}}),
    );
    pair(json!({}), l, front_extra)
}

fn acm_trust() -> Value {
    json!({"backendDefaults": {"clientPolicy": {"tls": {"validation": {
        "subjectAlternativeNames": {"match": {"exact": ["back.internal"]}},
        "trust": {"acm": {"certificateAuthorityArns": [CA_B, CA_A]}}}}}}})
}

#[test]
fn held_acm_certificates_and_trust_become_secrets_served_on_the_ads_stream() {
    let s = acm_pair("STRICT", acm_trust());
    let back = of_acm(&s, "back", &[CERT_ARN, CA_A, CA_B]);
    assert!(back.unserved.is_empty(), "{:?}", back.unserved);
    let chain = &listener(&back, INGRESS).filter_chains[0];
    let ctx: DownstreamTlsContext = unpack(socket_typed(chain.transport_socket.as_ref().unwrap()));
    let common = ctx.common_tls_context.unwrap();
    assert!(common.tls_certificates.is_empty(), "no key inline");
    assert_eq!(
        over_ads(&common.tls_certificate_sds_secret_configs[0]),
        format!("acm:{CERT_ARN}")
    );

    let front = of_acm(&s, "front", &[CERT_ARN, CA_A, CA_B]);
    assert!(front.unserved.is_empty(), "{:?}", front.unserved);
    let c = cluster(&front, BACK_EGRESS);
    let ctx: UpstreamTlsContext = unpack(socket_typed(c.transport_socket.as_ref().unwrap()));
    match ctx.common_tls_context.unwrap().validation_context_type {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(v)) => {
            // One secret for the set of authorities, whatever their order in the policy.
            assert_eq!(
                over_ads(v.validation_context_sds_secret_config.as_ref().unwrap()),
                format!("acm-pca:{CA_A},{CA_B}")
            );
            let sans = &v
                .default_validation_context
                .unwrap()
                .match_typed_subject_alt_names;
            assert_eq!(sans.len(), 2, "the policy's SAN, as DNS and URI");
        }
        other => panic!("{other:?}"),
    }
    // The secrets each proxy's own spec entitles it to, by the names its config uses.
    let who = |n: &str| ProxyIdentity::parse(&format!("mesh/m/virtualNode/{n}")).unwrap();
    let names = |n: &str| -> Vec<String> {
        acm_secrets(&s, &who(n))
            .iter()
            .map(AcmSecret::name)
            .collect()
    };
    assert_eq!(names("back"), [format!("acm:{CERT_ARN}")]);
    assert_eq!(names("front"), [format!("acm-pca:{CA_A},{CA_B}")]);
}

#[test]
fn acm_not_yet_held_or_not_served_at_all_fails_closed_as_before() {
    let s = acm_pair("STRICT", acm_trust());
    for held in [&[CA_A, CA_B][..], &[]] {
        let back = of_acm(&s, "back", held);
        assert!(back.listeners.iter().all(|l| l.name != INGRESS));
        assert!(back.unserved[0].contains(CERT_ARN), "{:?}", back.unserved);
    }
    // One authority of two missing: the enforced cluster is dropped, never plaintext.
    let front = of_acm(&s, "front", &[CERT_ARN, CA_A]);
    assert!(front.clusters.iter().all(|c| c.name != BACK_EGRESS));
    assert!(front.unserved[0].contains(CA_B), "{:?}", front.unserved);
    // Attestation off: the same spec, the same refusal as before ACM was served.
    let off = of(&s, "front");
    assert!(off.clusters.iter().all(|c| c.name != BACK_EGRESS));
    assert!(off.unserved[0].contains("attested"), "{:?}", off.unserved);
}

#[test]
fn a_held_acm_listener_certificate_is_negotiated_by_callers_without_a_client_policy() {
    let s = acm_pair("STRICT", json!({}));
    let front = of_acm(&s, "front", &[CERT_ARN]);
    assert!(
        cluster(&front, BACK_EGRESS).transport_socket.is_some(),
        "TLS toward a served STRICT listener"
    );
    let off = of_acm(&s, "front", &[]);
    assert!(cluster(&off, BACK_EGRESS).transport_socket.is_none());
}

#[test]
fn acm_secret_names_round_trip_and_only_enforced_terminating_settings_count() {
    for s in [
        AcmSecret::Certificate(CERT_ARN.into()),
        AcmSecret::Trust(vec![CA_A.into(), CA_B.into()]),
    ] {
        assert_eq!(AcmSecret::parse(&s.name()), Some(s));
    }
    assert_eq!(AcmSecret::parse("spiffe://x"), None);
    let disabled = acm_pair(
        "DISABLED",
        json!({"backendDefaults": {"clientPolicy": {"tls": {
        "enforce": false,
        "validation": {"trust": {"acm": {"certificateAuthorityArns": [CA_A]}}}}}}}),
    );
    for n in ["back", "front"] {
        let who = ProxyIdentity::parse(&format!("mesh/m/virtualNode/{n}")).unwrap();
        assert!(acm_secrets(&disabled, &who).is_empty(), "{n}");
    }
}

fn family(c: &Cluster) -> DnsLookupFamily {
    DnsLookupFamily::try_from(c.dns_lookup_family).unwrap()
}

fn bound(l: &Listener) -> (String, bool) {
    match &l.address.as_ref().unwrap().address {
        Some(address::Address::SocketAddress(sa)) => (sa.address.clone(), sa.ipv4_compat),
        other => panic!("{other:?}"),
    }
}

fn local_host(c: &Cluster) -> String {
    let ep = &c.load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints[0];
    match &ep.host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
            match &e.address.as_ref().unwrap().address {
                Some(address::Address::SocketAddress(sa)) => sa.address.clone(),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ip_preference_sets_dns_lookup_family_listener_bind_and_local_address() {
    let mesh = |p: &str| json!({"serviceDiscovery": {"ipPreference": p}});
    for (pref, want) in [
        ("IPv4_ONLY", DnsLookupFamily::V4Only),
        ("IPv6_ONLY", DnsLookupFamily::V6Only),
        ("IPv4_PREFERRED", DnsLookupFamily::V4Preferred),
        ("IPv6_PREFERRED", DnsLookupFamily::Auto),
    ] {
        let s = pair(mesh(pref), http(8080), json!({}));
        assert_eq!(
            family(cluster(&of(&s, "front"), BACK_EGRESS)),
            want,
            "{pref}"
        );
        // virtual_nodes.md: with any preference "The Envoy listeners bind to all IPv4 and IPv6
        // addresses"; the local app is reached over the preferred family.
        let back = of(&s, "back");
        let v6 = pref.starts_with("IPv6");
        assert_eq!(
            bound(listener(&back, INGRESS)),
            ("::".into(), true),
            "{pref}"
        );
        assert_eq!(
            local_host(cluster(&back, BACK_INGRESS)),
            if v6 { "::1" } else { "127.0.0.1" }
        );
    }
    // No preference anywhere, virtual_nodes.md's "Default": "Envoy's DNS resolver prefers IPv6
    // and falls back to IPv4", "The endpoint created for the local app uses an IPv4 address",
    // "The Envoy listeners bind to all IPv4 addresses".
    let s = pair(json!({}), http(8080), json!({}));
    assert_eq!(
        family(cluster(&of(&s, "front"), BACK_EGRESS)),
        DnsLookupFamily::Auto
    );
    let back = of(&s, "back");
    assert_eq!(bound(listener(&back, INGRESS)), ("0.0.0.0".into(), false));
    assert_eq!(local_host(cluster(&back, BACK_INGRESS)), "127.0.0.1");
    // The target's own dns.ipPreference wins over the mesh's.
    let mut s = pair(mesh("IPv4_ONLY"), http(8080), json!({}));
    let m = s.meshes.get_mut("m").unwrap();
    let back = &mut m.virtual_nodes.get_mut("back").unwrap().spec;
    if let Some(d) = back
        .service_discovery
        .as_mut()
        .and_then(|sd| sd.dns.as_mut())
    {
        d.ip_preference = Some(trellis_model::IpPreference::Ipv6Only);
    }
    assert_eq!(
        family(cluster(&of(&s, "front"), BACK_EGRESS)),
        DnsLookupFamily::V6Only
    );
    assert_eq!(bound(listener(&of(&s, "back"), INGRESS)).0, "::");
}

/// The SAN values a cluster's TLS validation demands (each name once, DNS and URI matchers alike).
fn demanded_sans(ctx: &UpstreamTlsContext) -> Vec<String> {
    let mut names: Vec<String> = match &ctx.common_tls_context.as_ref().unwrap().validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => v
            .match_typed_subject_alt_names
            .iter()
            .filter_map(|m| match &m.matcher.as_ref()?.match_pattern {
                Some(trellis_envoy_api::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(e)) => Some(e.clone()),
                _ => None,
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    names.dedup();
    names
}

/// tls.md, "Without client policies": "If a client has not specified a matching client policy,
/// and a server has been configured with TLS modes STRICT or PERMISSIVE, the proxies will be
/// configured to negotiate TLS"; with a file certificate "the certificate of the server is not
/// validated".
#[test]
fn without_a_matching_client_policy_the_servers_tls_mode_decides_and_nothing_is_validated() {
    let tls = |mode: &str, certificate: Value| {
        with(
            http(8080),
            json!({"tls": {"mode": mode, "certificate": certificate}}),
        )
    };
    for mode in ["STRICT", "PERMISSIVE"] {
        for certificate in [
            cert("/b"),
            json!({"sds": {"secretName": "spiffe://x/back"}}),
        ] {
            let r = of(
                &pair(json!({}), tls(mode, certificate.clone()), json!({})),
                "front",
            );
            let ctx = upstream(&r).unwrap_or_else(|| panic!("{mode} {certificate}: TLS"));
            assert_eq!(
                ctx.sni, "back.internal",
                "the name back's certificate carries"
            );
            let common = ctx.common_tls_context.unwrap();
            assert!(common.validation_context_type.is_none(), "not validated");
            assert!(
                common.tls_certificates.is_empty()
                    && common.tls_certificate_sds_secret_configs.is_empty()
            );
            assert_eq!(common.alpn_protocols, ["http/1.1"]);
        }
    }
    // DISABLED, no TLS, or a certificate this control plane cannot serve (the listener is then
    // plaintext or refused): plaintext.
    let acm =
        json!({"acm": {"certificateArn": "arn:aws:acm:us-west-2:111122223333:certificate/x"}});
    for listener in [
        http(8080),
        tls("DISABLED", cert("/b")),
        tls("PERMISSIVE", acm),
    ] {
        let r = of(&pair(json!({}), listener.clone(), json!({})), "front");
        assert!(upstream(&r).is_none(), "{listener}");
    }
    // A client policy on other ports, or not enforced, does not match: the server decides.
    for policy in [json!({"ports": [9443]}), json!({"enforce": false})] {
        let front = json!({"backendDefaults": {"clientPolicy": client_policy(policy.clone())}});
        let r = of(&pair(json!({}), tls("STRICT", cert("/b")), front), "front");
        let ctx = upstream(&r).unwrap_or_else(|| panic!("{policy}"));
        assert!(
            ctx.common_tls_context
                .unwrap()
                .validation_context_type
                .is_none(),
            "{policy}"
        );
    }
    // A matching client policy validates as it says.
    let front = json!({"backendDefaults": {"clientPolicy": client_policy(json!({}))}});
    let r = of(&pair(json!({}), tls("STRICT", cert("/b")), front), "front");
    assert_eq!(demanded_sans(&upstream(&r).unwrap()), ["back.local"]);
}

/// tls.md: "If you don't specify SANs on the originating mesh endpoint, the SAN on the
/// certificate provided by the terminating endpoint must match the mesh endpoint service
/// discovery configuration": the DNS hostname, or `SERVICE.NAMESPACE` for Cloud Map
/// ("Certificate requirements").
#[test]
fn a_client_policy_without_sans_demands_the_targets_service_discovery_name() {
    let no_sans = json!({"backendDefaults": {"clientPolicy": {"tls": {"validation": {
        "trust": {"file": {"certificateChain": "/c/ca.pem"}}}}}}});
    let r = of(&pair(json!({}), http(8080), no_sans.clone()), "front");
    assert_eq!(demanded_sans(&upstream(&r).unwrap()), ["back.internal"]);

    let mut s = pair(json!({}), http(8080), no_sans);
    let back = &mut s
        .meshes
        .get_mut("m")
        .unwrap()
        .virtual_nodes
        .get_mut("back")
        .unwrap()
        .spec;
    back.service_discovery = serde_json::from_value(
        json!({"awsCloudMap": {"namespaceName": "apps.local", "serviceName": "back"}}),
    )
    .unwrap();
    let r = of(&s, "front");
    assert_eq!(demanded_sans(&upstream(&r).unwrap()), ["back.apps.local"]);
}

/// routes.md: "If you enable Path/Prefix based matching, App Mesh enables path normalization
/// (normalize_path and merge_slashes)": on the connection managers that route by path (egress,
/// explicit egress); the ingress sends everything to the app and leaves its paths alone.
#[test]
fn egress_connection_managers_normalize_paths_and_merge_slashes_the_ingress_does_not() {
    let s = pair(json!({}), http(8080), json!({"listeners": [http(9090)]}));
    let front = of(&s, "front");
    let egress = listener(&front, EGRESS);
    let http_chains: Vec<HttpConnectionManager> = egress
        .filter_chains
        .iter()
        .filter(|c| c.filters[0].name == "envoy.filters.network.http_connection_manager")
        .map(hcm)
        .collect();
    assert_eq!(http_chains.len(), 2, "8080 and the explicit 15001");
    for m in &http_chains {
        assert!(
            m.normalize_path.unwrap().value && m.merge_slashes,
            "{}",
            m.stat_prefix
        );
        assert_eq!(m.stat_prefix, "egress");
    }
    let ingress = hcm(&listener(&front, INGRESS).filter_chains[0]);
    assert!(ingress.normalize_path.is_none() && !ingress.merge_slashes);
}

/// App Mesh's ingress stat prefix, which its Envoy image's stats tags parse
/// (`appmesh.listener_protocol`, `appmesh.listener_port` from `.ingress.PROTOCOL.PORT.`).
#[test]
fn ingress_stat_prefixes_name_protocol_and_port() {
    let s = state(
        json!({}),
        &[(
            "back",
            json!({"listeners": [http(8080), {"portMapping": {"port": 5432, "protocol": "tcp"}}],
                "serviceDiscovery": {"dns": {"hostname": "back.internal"}}}),
        )],
        &[],
    );
    let back = of(&s, "back");
    let chains = &listener(&back, INGRESS).filter_chains;
    let prefixes: Vec<String> = chains
        .iter()
        .map(|c| match c.filters[0].name.as_str() {
            "envoy.filters.network.tcp_proxy" => {
                unpack::<TcpProxy>(typed(&c.filters[0])).stat_prefix
            }
            _ => hcm(c).stat_prefix,
        })
        .collect();
    assert_eq!(prefixes, ["ingress.http.8080", "ingress.tcp.5432"]);
}

/// routes.md, TCP: "Idle duration – The default is 300 seconds. A value of 0 disables the
/// timeout." On the caller's TCP proxy: the tcp route's, else 300 s; a node-provided service
/// gets the default.
#[test]
fn a_tcp_routes_idle_timeout_lands_on_the_callers_tcp_proxy() {
    let tcp = json!({"portMapping": {"port": 5432, "protocol": "tcp"}});
    let idle_of = |s: &State| {
        let front = of(s, "front");
        let chain = listener(&front, EGRESS)
            .filter_chains
            .iter()
            .find(|c| {
                c.filter_chain_match
                    .as_ref()
                    .and_then(|m| m.destination_port.as_ref())
                    .map(|p| p.value)
                    == Some(5432)
            })
            .unwrap();
        let proxy: TcpProxy = unpack(typed(&chain.filters[0]));
        secs(&proxy.idle_timeout)
    };
    assert_eq!(
        idle_of(&pair(json!({}), tcp.clone(), json!({}))),
        300.0,
        "node-provided"
    );
    for (timeout, want) in [
        (json!(null), 300.0),
        (json!({"idle": {"unit": "s", "value": 42}}), 42.0),
        (json!({"idle": {"unit": "ms", "value": 0}}), 0.0),
    ] {
        let mut route = json!({"tcpRoute": {"action": {"weightedTargets": [{"virtualNode": "back", "weight": 1}]}}});
        if !timeout.is_null() {
            route["tcpRoute"]["timeout"] = timeout;
        }
        let mut s = pair(json!({}), tcp.clone(), json!({}));
        let m = s.meshes.get_mut("m").unwrap();
        m.virtual_routers.insert(
            "vr".into(),
            crate::testing::resource(
                "vr",
                serde_json::from_value(json!({"listeners": [tcp.clone()]})).unwrap(),
            ),
        );
        m.routes.entry("vr".into()).or_default().insert(
            "t".into(),
            crate::testing::resource("t", serde_json::from_value(route).unwrap()),
        );
        m.virtual_services.get_mut("back.local").unwrap().spec = serde_json::from_value(
            json!({"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}),
        )
        .unwrap();
        assert_eq!(idle_of(&s), want);
    }
}
