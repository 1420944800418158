use super::*;

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_match_the_app_mesh_envoy_image() {
    let s = EnvoySettings::from_vars(&vars(&[(ENV_RESOURCE_ARN, "mesh/m/virtualNode/a")])).unwrap();
    assert_eq!(s.node_id, "mesh/m/virtualNode/a");
    assert_eq!(s.cluster, "mesh/m/virtualNode/a");
    assert_eq!(s.admin_port, 9901);
    assert_eq!(s.xds, XdsEndpoint::Unix("/var/run/trellis/xds.sock".into()));
    let b = s.bootstrap();
    assert_eq!(b["node"]["id"], "mesh/m/virtualNode/a");
    assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 9901);
    assert_eq!(
        b["dynamic_resources"]["ads_config"]["api_type"], "GRPC",
        "App Mesh's image spoke state-of-the-world ADS only"
    );
    assert_eq!(
        b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            ["endpoint"]["address"]["pipe"]["path"],
        "/var/run/trellis/xds.sock"
    );
}

#[test]
fn identity_falls_back_to_the_older_variables() {
    let s = EnvoySettings::from_vars(&vars(&[(ENV_VIRTUAL_NODE_NAME, "mesh/m/virtualNode/old")]))
        .unwrap();
    assert_eq!(s.node_id, "mesh/m/virtualNode/old");
    let s = EnvoySettings::from_vars(&vars(&[
        (ENV_RESOURCE_NAME, "mesh/m/virtualNode/n"),
        (ENV_VIRTUAL_NODE_NAME, "mesh/m/virtualNode/old"),
    ]))
    .unwrap();
    assert_eq!(s.node_id, "mesh/m/virtualNode/n");
}

#[test]
fn a_missing_or_malformed_identity_is_an_error_not_a_broken_file() {
    assert_eq!(
        EnvoySettings::from_vars(&vars(&[])),
        Err(Error::MissingIdentity)
    );
    let err = EnvoySettings::from_vars(&vars(&[(ENV_RESOURCE_ARN, "front")])).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("APPMESH_RESOURCE_ARN: \"front\""),
        "{err}"
    );
}

#[test]
fn tcp_endpoint_and_tunables_are_honoured() {
    let s = EnvoySettings::from_vars(&vars(&[
        (
            ENV_RESOURCE_ARN,
            "arn:aws:appmesh:us-west-2:111122223333:mesh/m/virtualNode/a",
        ),
        (ENV_XDS_ENDPOINT, "agent.local:15128"),
        (ENV_ADMIN_PORT, "9902"),
        (ENV_LOG_LEVEL, "debug"),
        (ENV_INITIAL_FETCH_TIMEOUT, "30"),
        (ENV_CONCURRENCY, "2"),
    ]))
    .unwrap();
    assert_eq!(
        s.xds,
        XdsEndpoint::Tcp {
            host: "agent.local".into(),
            port: 15128
        }
    );
    let b = s.bootstrap();
    assert_eq!(b["static_resources"]["clusters"][0]["type"], "STRICT_DNS");
    assert_eq!(
        b["dynamic_resources"]["cds_config"]["initial_fetch_timeout"],
        "30s"
    );
    assert_eq!(
        s.envoy_args("/b.json"),
        ["-c", "/b.json", "-l", "debug", "--concurrency", "2"]
    );
}

#[test]
fn delta_ads_is_an_opt_in() {
    let s = EnvoySettings::from_vars(&vars(&[
        (ENV_RESOURCE_ARN, "mesh/m/virtualNode/a"),
        (ENV_XDS_API_TYPE, "delta_grpc"),
    ]))
    .unwrap();
    assert_eq!(s.api_type, ApiType::Delta);
    let b = s.bootstrap();
    assert_eq!(
        b["dynamic_resources"]["ads_config"]["api_type"],
        "DELTA_GRPC"
    );
    assert_eq!(
        b["dynamic_resources"]["ads_config"]["transport_api_version"],
        "V3"
    );
    for source in ["cds_config", "lds_config"] {
        assert_eq!(b["dynamic_resources"][source]["ads"], serde_json::json!({}));
        assert_eq!(b["dynamic_resources"][source]["resource_api_version"], "V3");
    }
}

#[test]
fn bad_values_name_the_variable() {
    for (var, value) in [
        (ENV_XDS_ENDPOINT, "unix://relative"),
        (ENV_XDS_ENDPOINT, "nohostport"),
        (ENV_ADMIN_PORT, "0"),
        (ENV_LOG_LEVEL, "loud"),
        (ENV_INITIAL_FETCH_TIMEOUT, "soon"),
        (ENV_CONCURRENCY, "0"),
        (ENV_SDS_SOCKET_PATH, "run/spire/agent.sock"),
        (ENV_XDS_API_TYPE, "incremental"),
    ] {
        let err = EnvoySettings::from_vars(&vars(&[
            (ENV_RESOURCE_ARN, "mesh/m/virtualNode/a"),
            (var, value),
        ]))
        .unwrap_err();
        assert!(err.to_string().starts_with(var), "{err}");
    }
}

#[test]
fn an_sds_socket_adds_the_static_sds_cluster_app_mesh_named() {
    let base = [(ENV_RESOURCE_ARN, "mesh/m/virtualNode/a")];
    let without = EnvoySettings::from_vars(&vars(&base)).unwrap().bootstrap();
    assert_eq!(
        without["static_resources"]["clusters"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let s = EnvoySettings::from_vars(&vars(&[
        base[0],
        (ENV_SDS_SOCKET_PATH, "/run/spire/sockets/agent.sock"),
    ]))
    .unwrap();
    let b = s.bootstrap();
    let sds = &b["static_resources"]["clusters"][1];
    assert_eq!(sds["name"], "static_cluster_sds_unix_socket");
    assert_eq!(sds["type"], "STATIC");
    assert_eq!(
        sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"],
        "/run/spire/sockets/agent.sock"
    );
    assert!(
            sds["typed_extension_protocol_options"]
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
                .get("http2_protocol_options")
                .is_some(),
            "SDS is gRPC: the cluster speaks HTTP/2"
        );
}
