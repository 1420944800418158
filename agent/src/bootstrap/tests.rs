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
    assert_eq!(
        s.admin,
        Admin::Tcp {
            port: 9901,
            ipv6: false
        }
    );
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
    let lrs = &b["cluster_manager"]["load_stats_config"];
    assert_eq!(
        lrs["grpc_services"][0]["envoy_grpc"]["cluster_name"],
        XDS_CLUSTER
    );
    assert_eq!(lrs["transport_api_version"], "V3");
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
    for (var, value, enabler) in [
        (ENV_XDS_ENDPOINT, "unix://relative", ""),
        (ENV_XDS_ENDPOINT, "nohostport", ""),
        (ENV_ADMIN_PORT, "0", ""),
        (ENV_LOG_LEVEL, "loud", ""),
        (ENV_ADMIN_IPV6, "yes", ""),
        (ENV_ADMIN_MODE, "http", ""),
        (ENV_MAX_REQUESTS_PER_IO_CYCLE, "0", ""),
        ("ENABLE_ENVOY_XRAY_TRACING", "on", ""),
        ("XRAY_SAMPLING_RATE", "1.5", "ENABLE_ENVOY_XRAY_TRACING"),
        ("XRAY_DAEMON_PORT", "70000", "ENABLE_ENVOY_XRAY_TRACING"),
        (
            "AWS_XRAY_DAEMON_ADDRESS",
            "xray.local:2000",
            "ENABLE_ENVOY_XRAY_TRACING",
        ),
        (
            "JAEGER_TRACER_ADDRESS",
            "jaeger host",
            "ENABLE_ENVOY_JAEGER_TRACING",
        ),
        ("ENABLE_ENVOY_STATS_TAGS", "2", ""),
        ("STATSD_ADDRESS", "statsd.local", "ENABLE_ENVOY_DOG_STATSD"),
        ("ENVOY_STATS_FLUSH_INTERVAL", "10", ""),
        ("ENVOY_STATS_FLUSH_INTERVAL", "600s", ""),
        ("APPMESH_METRIC_EXTENSION_VERSION", "2", ""),
        ("APPMESH_SET_TRACING_DECISION", "maybe", ""),
        ("ENVOY_TRACING_CFG_FILE", "/nonexistent/tracing.yaml", ""),
        (
            "XRAY_SAMPLING_RULE_MANIFEST",
            "/nonexistent/rules.json",
            "ENABLE_ENVOY_XRAY_TRACING",
        ),
        (ENV_INITIAL_FETCH_TIMEOUT, "soon", ""),
        (ENV_CONCURRENCY, "0", ""),
        (ENV_SDS_SOCKET_PATH, "run/spire/agent.sock", ""),
        (ENV_XDS_API_TYPE, "incremental", ""),
    ] {
        let mut pairs = vec![(ENV_RESOURCE_ARN, "mesh/m/virtualNode/a"), (var, value)];
        if !enabler.is_empty() {
            pairs.push((enabler, "1"));
        }
        let err = EnvoySettings::from_vars(&vars(&pairs)).unwrap_err();
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

fn settings(pairs: &[(&str, &str)]) -> EnvoySettings {
    let mut all = vec![(ENV_RESOURCE_ARN, "mesh/shop/virtualNode/web")];
    all.extend_from_slice(pairs);
    EnvoySettings::from_vars(&vars(&all)).unwrap()
}

#[test]
fn log_level_off_is_valid_as_in_app_mesh() {
    let s = settings(&[(ENV_LOG_LEVEL, "off")]);
    assert_eq!(s.envoy_args("/b.json")[3], "off");
}

#[test]
fn xray_tracing_as_app_mesh_wrote_it() {
    let b = settings(&[
        ("ENABLE_ENVOY_XRAY_TRACING", "1"),
        ("XRAY_DAEMON_PORT", "2001"),
        ("XRAY_SAMPLING_RATE", "1"),
    ])
    .bootstrap();
    let http = &b["tracing"]["http"];
    assert_eq!(http["name"], "envoy.tracers.xray");
    let cfg = &http["typed_config"];
    assert_eq!(cfg["segment_name"], "shop/web");
    assert_eq!(cfg["daemon_endpoint"]["port_value"], 2001);
    assert_eq!(cfg["daemon_endpoint"]["address"], "127.0.0.1");
    assert_eq!(cfg["segment_fields"]["origin"], "AWS::AppMesh::Proxy");
    assert_eq!(
        cfg["segment_fields"]["aws"]["app_mesh"]["mesh_name"],
        "shop"
    );
    let manifest: Value = serde_json::from_str(
        cfg["sampling_rule_manifest"]["inline_string"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["version"], 2);
    assert_eq!(manifest["default"]["rate"], 1.0);
    // X-Ray's own default rate writes no manifest; a segment name and daemon address override.
    let b = settings(&[
        ("ENABLE_ENVOY_XRAY_TRACING", "true"),
        ("XRAY_SAMPLING_RATE", "0.05"),
        ("XRAY_SEGMENT_NAME", "web-seg"),
        (
            "AWS_XRAY_DAEMON_ADDRESS",
            "tcp:10.0.0.9:2000 udp:10.0.0.9:2002",
        ),
    ])
    .bootstrap();
    let cfg = &b["tracing"]["http"]["typed_config"];
    assert!(cfg.get("sampling_rule_manifest").is_none());
    assert_eq!(cfg["segment_name"], "web-seg");
    assert_eq!(cfg["daemon_endpoint"]["address"], "10.0.0.9");
    assert_eq!(cfg["daemon_endpoint"]["port_value"], 2002);
}

#[test]
fn datadog_and_jaeger_tracing_with_their_collector_clusters() {
    let b = settings(&[("ENABLE_ENVOY_DATADOG_TRACING", "1")]).bootstrap();
    let cfg = &b["tracing"]["http"]["typed_config"];
    assert_eq!(cfg["service_name"], "envoy-shop/web");
    assert_eq!(cfg["collector_cluster"], "datadog_agent");
    let dd = &b["static_resources"]["clusters"][1];
    assert_eq!(dd["name"], "datadog_agent");
    assert_eq!(
        dd["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"],
        8126
    );
    let b = settings(&[
        ("ENABLE_ENVOY_JAEGER_TRACING", "1"),
        ("JAEGER_TRACER_ADDRESS", "jaeger.local"),
        ("JAEGER_TRACER_VERSION", "json"),
    ])
    .bootstrap();
    let cfg = &b["tracing"]["http"]["typed_config"];
    assert_eq!(b["tracing"]["http"]["name"], "envoy.tracers.zipkin");
    assert_eq!(cfg["collector_endpoint"], "/api/v2/spans");
    assert_eq!(cfg["collector_endpoint_version"], "HTTP_JSON");
    assert_eq!(cfg["shared_span_context"], false);
    assert_eq!(b["static_resources"]["clusters"][1]["type"], "STRICT_DNS");
    let err = EnvoySettings::from_vars(&vars(&[
        (ENV_RESOURCE_ARN, "mesh/shop/virtualNode/web"),
        ("ENABLE_ENVOY_JAEGER_TRACING", "1"),
        ("ENABLE_ENVOY_DATADOG_TRACING", "1"),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("only one tracer"), "{err}");
}

#[test]
fn stats_tags_dogstatsd_and_flush_interval() {
    let b = settings(&[
        ("ENABLE_ENVOY_STATS_TAGS", "1"),
        ("ENABLE_ENVOY_DOG_STATSD", "1"),
        ("STATSD_PORT", "8200"),
        ("ENVOY_STATS_FLUSH_INTERVAL", "1500ms"),
        ("APPMESH_METRIC_EXTENSION_VERSION", "1"),
    ])
    .bootstrap();
    let tags = b["stats_config"]["stats_tags"].as_array().unwrap();
    let fixed = |name: &str| {
        tags.iter()
            .find(|t| t["tag_name"] == name)
            .map(|t| t["fixed_value"].clone())
    };
    assert_eq!(fixed("appmesh.mesh"), Some(json!("shop")));
    assert_eq!(fixed("appmesh.virtual_node"), Some(json!("web")));
    assert_eq!(fixed("Mesh"), Some(json!("shop")));
    assert_eq!(fixed("VirtualNode"), Some(json!("web")));
    assert_eq!(
        b["node"]["metadata"]["aws.appmesh.metric_filter"]["level"],
        "1"
    );
    let sink = &b["stats_sinks"][0];
    assert_eq!(sink["name"], "envoy.stat_sinks.dog_statsd");
    assert_eq!(
        sink["typed_config"]["address"]["socket_address"]["port_value"],
        8200
    );
    assert_eq!(
        sink["typed_config"]["address"]["socket_address"]["protocol"],
        "UDP"
    );
    assert_eq!(b["stats_flush_interval"], "1.500000000s");
    // Without the variables: only the listener tags, no sink.
    let b = settings(&[]).bootstrap();
    let names: Vec<_> = b["stats_config"]["stats_tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "appmesh.listener_protocol",
            "appmesh.listener_port",
            "envoy_rds_route_config"
        ]
    );
    assert!(b.get("stats_sinks").is_none());
    let b = settings(&[
        ("ENABLE_ENVOY_DOG_STATSD", "1"),
        ("STATSD_SOCKET_PATH", "/var/run/datadog/dsd.socket"),
    ])
    .bootstrap();
    assert_eq!(
        b["stats_sinks"][0]["typed_config"]["address"]["pipe"]["path"],
        "/var/run/datadog/dsd.socket"
    );
}

#[test]
fn admin_ipv6_uds_and_runtime() {
    let b = settings(&[
        (ENV_ADMIN_IPV6, "true"),
        (ENV_MAX_REQUESTS_PER_IO_CYCLE, "1"),
    ])
    .bootstrap();
    assert_eq!(b["admin"]["address"]["socket_address"]["address"], "::");
    assert_eq!(b["admin"]["address"]["socket_address"]["ipv4_compat"], true);
    let layer = &b["layered_runtime"]["layers"][0]["static_layer"];
    assert_eq!(layer["http.max_requests_per_io_cycle"], 1);
    assert_eq!(layer["re2.max_program_size.error_level"], 1000);
    let b = settings(&[(ENV_ADMIN_MODE, "uds")]).bootstrap();
    assert_eq!(b["admin"]["address"]["pipe"]["path"], ADMIN_UDS_PATH);
}

#[test]
fn unknown_and_unserved_variables_are_named_never_dropped() {
    let s = settings(&[
        ("ENABLE_ENVOY_ZIPKIN_TRACING", "1"),
        ("APPMESH_PREVIEW", "1"),
        ("APPMESH_SET_TRACING_DECISION", "false"),
        ("ENVOY_ENABLE_TCP_POOL_IDLE_TIMEOUT", "false"),
        ("RELAY_STREAM_IDLE_TIMEOUT", "2000s"),
        ("DD_ENV", "prod"),
        ("PATH", "/usr/bin"),
    ]);
    let by = |var: &str| s.notes.iter().find(|n| n.var == var).cloned();
    let unknown = by("ENABLE_ENVOY_ZIPKIN_TRACING").unwrap();
    assert_eq!(unknown.level, Level::Warn);
    assert!(unknown.text.contains("unknown"), "{}", unknown.text);
    assert_eq!(by("APPMESH_PREVIEW").unwrap().level, Level::Info);
    assert_eq!(
        by("APPMESH_SET_TRACING_DECISION").unwrap().level,
        Level::Warn
    );
    assert_eq!(
        by("ENVOY_ENABLE_TCP_POOL_IDLE_TIMEOUT").unwrap().level,
        Level::Warn
    );
    assert_eq!(by("RELAY_STREAM_IDLE_TIMEOUT").unwrap().level, Level::Warn);
    // Envoy's Datadog tracer reads DD_* itself; other variables are not ours to judge.
    assert!(by("DD_ENV").is_none());
    assert!(by("PATH").is_none());
    assert!(
        settings(&[("ENABLE_ENVOY_XRAY_TRACING", "1")])
            .notes
            .is_empty()
    );
}

#[test]
fn operator_files_merge_as_app_mesh_merged_them() {
    let dir = std::env::temp_dir().join(format!("trellis-bootstrap-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let tracing = write(
        "tracing.yaml",
        "tracing:\n  http:\n    name: envoy.tracers.zipkin\nstaticResources:\n  clusters:\n  - name: zipkin\n",
    );
    let stats = write(
        "stats.json",
        r#"{"stats_config": {"use_all_default_tags": false}}"#,
    );
    let sinks = write(
        "sinks.yaml",
        "stats_sinks:\n- name: envoy.stat_sinks.statsd\n",
    );
    let b = settings(&[
        ("ENABLE_ENVOY_DOG_STATSD", "1"),
        ("ENVOY_TRACING_CFG_FILE", &tracing),
        ("ENVOY_STATS_CONFIG_FILE", &stats),
        ("ENVOY_STATS_SINKS_CFG_FILE", &sinks),
    ])
    .bootstrap();
    assert_eq!(b["tracing"]["http"]["name"], "envoy.tracers.zipkin");
    assert_eq!(b["stats_config"], json!({"use_all_default_tags": false}));
    // The sinks file replaces DogStatsD (App Mesh: it overrides all DogStatsD variables).
    assert_eq!(
        b["stats_sinks"],
        json!([{"name": "envoy.stat_sinks.statsd"}])
    );
    let names: Vec<_> = b["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, [json!("trellis_xds"), json!("zipkin")]);
    // A second tracing configuration, an empty file, or sinks without sinks are errors.
    for (var, file) in [
        ("ENVOY_RESOURCES_CONFIG_FILE", tracing.as_str()),
        ("ENVOY_STATS_SINKS_CFG_FILE", stats.as_str()),
        ("ENVOY_TRACING_CFG_FILE", write("empty.yaml", "").as_str()),
    ] {
        let err = EnvoySettings::from_vars(&vars(&[
            (ENV_RESOURCE_ARN, "mesh/shop/virtualNode/web"),
            ("ENVOY_TRACING_CFG_FILE", &tracing),
            (var, file),
        ]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.starts_with(var), "{var}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_ads_over_mutual_tls_takes_all_three_paths_and_checks_the_agents_name() {
    let node = (ENV_RESOURCE_ARN, "mesh/m/virtualNode/a");
    let tls = [
        (ENV_XDS_CLIENT_CERT, "/tls/envoy.pem"),
        (ENV_XDS_CLIENT_KEY, "/tls/envoy.key"),
        (ENV_XDS_SERVER_CA, "/tls/ca.pem"),
    ];
    let mut all = vec![node, (ENV_XDS_ENDPOINT, "trellis.internal:15128")];
    all.extend(tls);
    let b = EnvoySettings::from_vars(&vars(&all)).unwrap().bootstrap();
    let ts = &b["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
    assert_eq!(ts["sni"], "trellis.internal");
    let ctx = &ts["common_tls_context"];
    assert_eq!(
        ctx["tls_certificates"][0]["private_key"]["filename"],
        "/tls/envoy.key"
    );
    assert_eq!(
        ctx["validation_context"]["trusted_ca"]["filename"],
        "/tls/ca.pem"
    );
    assert_eq!(
        ctx["validation_context"]["match_typed_subject_alt_names"][0],
        json!({"san_type": "DNS", "matcher": {"exact": "trellis.internal"}})
    );
    // Two of three, or TLS on the Unix socket: refused by name.
    let err = EnvoySettings::from_vars(&vars(&[node, tls[0], tls[1]])).unwrap_err();
    assert!(err.to_string().contains(ENV_XDS_SERVER_CA), "{err}");
    let mut unix = vec![node];
    unix.extend(tls);
    let err = EnvoySettings::from_vars(&vars(&unix)).unwrap_err();
    assert!(err.to_string().contains(ENV_XDS_ENDPOINT), "{err}");
}
