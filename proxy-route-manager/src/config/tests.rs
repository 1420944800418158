use super::*;

fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
    pairs.iter().copied().collect()
}

fn config(pairs: &[(&'static str, &'static str)]) -> Result<(Config, Vec<Warning>)> {
    Config::from_sources(&Cli::default(), &env(pairs))
}

fn error_text(pairs: &[(&'static str, &'static str)]) -> String {
    match config(pairs) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).expect("valid cidr").0
}

#[test]
fn lead_e2e_variables_give_app_mesh_defaults() {
    let (c, warnings) = config(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", "8080"),
        ("APPMESH_ENVOY_INGRESS_PORT", "15000"),
        ("APPMESH_ENVOY_EGRESS_PORT", "15001"),
        ("APPMESH_EGRESS_IGNORED_IP", "169.254.170.2,169.254.169.254"),
    ])
    .unwrap();
    assert!(warnings.is_empty());
    assert_eq!(
        c,
        Config {
            ignore_uid: Some(1337),
            ignore_gid: None,
            app_ports: vec![8080],
            ingress_port: 15000,
            egress_port: 15001,
            egress_ignored_ips: vec![cidr("169.254.170.2"), cidr("169.254.169.254")],
            egress_ignored_ports: vec![22],
            enable_ipv6: false,
        }
    );
}

#[test]
fn ports_default_to_15000_and_15001_and_metadata_ips_are_always_ignored() {
    let (c, _) = config(&[("APPMESH_IGNORE_GID", "1337")]).unwrap();
    assert_eq!((c.ingress_port, c.egress_port), (15000, 15001));
    assert_eq!(c.ignore_gid, Some(1337));
    assert!(c.app_ports.is_empty());
    assert_eq!(
        c.egress_ignored_ips,
        vec![cidr("169.254.169.254"), cidr("169.254.170.2")]
    );
}

#[test]
fn flags_win_over_variables() {
    let cli = Cli {
        ignored_uid: Some("99".into()),
        app_ports: Some("9000, 9001".into()),
        proxy_egress_port: Some("16001".into()),
        egress_ignored_ports: Some("22".into()),
        ..Cli::default()
    };
    let vars = env(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", "8080"),
    ]);
    let (c, _) = Config::from_sources(&cli, &vars).unwrap();
    assert_eq!(c.ignore_uid, Some(99));
    assert_eq!(c.app_ports, vec![9000, 9001]);
    assert_eq!(c.egress_port, 16001);
    assert_eq!(c.egress_ignored_ports, vec![22]);
}

#[test]
fn blank_entries_are_skipped_and_repeats_dropped() {
    let (c, _) = config(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_APP_PORTS", " 80,,443, 80 ,"),
    ])
    .unwrap();
    assert_eq!(c.app_ports, vec![80, 443]);
}

#[test]
fn missing_uid_and_gid_is_an_error_naming_both_variables() {
    let text = error_text(&[("APPMESH_APP_PORTS", "8080")]);
    assert!(
        text.contains("APPMESH_IGNORE_UID") && text.contains("APPMESH_IGNORE_GID"),
        "{text}"
    );
}

#[test]
fn non_numeric_uid_is_an_error_naming_the_variable() {
    let text = error_text(&[("APPMESH_IGNORE_UID", "envoy")]);
    assert!(
        text.starts_with("APPMESH_IGNORE_UID (--ignored-uid): \"envoy\""),
        "{text}"
    );
}

#[test]
fn out_of_range_or_non_numeric_ports_are_errors_naming_the_variable() {
    for (var, value) in [
        ("APPMESH_APP_PORTS", "8080,70000"),
        ("APPMESH_APP_PORTS", "0"),
        ("APPMESH_APP_PORTS", "http"),
        ("APPMESH_ENVOY_INGRESS_PORT", "65536"),
        ("APPMESH_ENVOY_EGRESS_PORT", "-1"),
        ("APPMESH_EGRESS_IGNORED_PORTS", "22,x"),
    ] {
        let text = error_text(&[("APPMESH_IGNORE_UID", "1337"), (var, value)]);
        assert!(text.starts_with(var), "{var}={value}: {text}");
        assert!(text.contains("1 to 65535"), "{text}");
    }
}

#[test]
fn unparsable_ignored_ip_is_an_error_naming_the_variable() {
    for value in [
        "10.0.0.300",
        "10.0.0.0/33",
        "fd00::/129",
        "example.com",
        "10.0.0.0/",
    ] {
        let text = error_text(&[
            ("APPMESH_IGNORE_UID", "1"),
            ("APPMESH_EGRESS_IGNORED_IP", value),
        ]);
        assert!(
            text.starts_with("APPMESH_EGRESS_IGNORED_IP (--egress-ignored-ips)"),
            "{text}"
        );
        assert!(text.contains(value), "{text}");
    }
}

#[test]
fn same_ingress_and_egress_port_is_an_error() {
    let text = error_text(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_ENVOY_INGRESS_PORT", "15001"),
    ]);
    assert!(
        text.contains("APPMESH_ENVOY_INGRESS_PORT") && text.contains("15001"),
        "{text}"
    );
}

#[test]
fn bad_enable_ipv6_value_is_an_error_naming_the_variable() {
    let text = error_text(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_ENABLE_IPV6", "yes please"),
    ]);
    assert!(text.starts_with("APPMESH_ENABLE_IPV6"), "{text}");
}

#[test]
fn ipv6_entries_are_skipped_with_a_warning_when_ipv6_is_off() {
    let (c, warnings) = config(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_EGRESS_IGNORED_IP", "fd00:ec2::254,10.0.0.0/8"),
    ])
    .unwrap();
    assert_eq!(
        warnings,
        vec![Warning::Ipv6Skipped {
            value: "fd00:ec2::254".into()
        }]
    );
    assert!(warnings[0].to_string().contains("APPMESH_ENABLE_IPV6=1"));
    assert_eq!(c.egress_ignored_ips[0], cidr("10.0.0.0/8"));
    assert!(c.egress_ignored_ips.iter().all(|c| !c.is_ipv6()));
}

#[test]
fn ipv6_entries_are_kept_when_ipv6_is_on() {
    for on in ["1", "true", "TRUE"] {
        let (c, warnings) = config(&[
            ("APPMESH_IGNORE_UID", "1"),
            ("APPMESH_ENABLE_IPV6", on),
            ("APPMESH_EGRESS_IGNORED_IP", "fd00:ec2::254"),
        ])
        .unwrap();
        assert!(c.enable_ipv6 && warnings.is_empty());
        assert_eq!(c.egress_ignored_ips[0], cidr("fd00:ec2::254/128"));
    }
}

#[test]
fn cidr_with_host_bits_is_normalised_with_a_warning() {
    let (c, warnings) = config(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_EGRESS_IGNORED_IP", "10.1.2.3/8"),
    ])
    .unwrap();
    assert_eq!(c.egress_ignored_ips[0].to_string(), "10.0.0.0/8");
    assert!(matches!(warnings[..], [Warning::HostBitsCleared { .. }]));
}

#[test]
fn start_enabled_only_when_exactly_1() {
    for (value, expected) in [
        (Some("1"), true),
        (Some("0"), false),
        (Some("true"), false),
        (None, false),
    ] {
        let vars: HashMap<&str, &str> = value
            .map(|v| ("APPMESH_START_ENABLED", v))
            .into_iter()
            .collect();
        assert_eq!(
            start_enabled(&Cli::default(), &vars).0,
            expected,
            "{value:?}"
        );
    }
}

#[test]
fn disabled_still_refuses_invalid_settings_but_needs_no_uid() {
    for switch in ["0", "", "yes"] {
        let vars = env(&[
            ("APPMESH_START_ENABLED", switch),
            ("APPMESH_APP_PORTS", "not a port"),
        ]);
        let err = load(&Cli::default(), &vars).unwrap_err();
        assert!(
            err.is_config() && err.to_string().starts_with("APPMESH_APP_PORTS"),
            "{switch:?}: {err}"
        );
    }
    // Nothing to exempt matters only when rules are installed.
    let vars = env(&[("APPMESH_START_ENABLED", "0")]);
    assert_eq!(
        load(&Cli::default(), &vars).unwrap(),
        Loaded::Disabled {
            value: Some("0".into()),
            warnings: vec![]
        }
    );
    assert_eq!(
        load(&Cli::default(), &env(&[])).unwrap(),
        Loaded::Disabled {
            value: None,
            warnings: vec![]
        }
    );
}

#[test]
fn an_unrecognised_start_switch_is_a_warning_naming_the_value() {
    for value in ["true", "yes", "2"] {
        let vars = env(&[
            ("APPMESH_START_ENABLED", value),
            ("APPMESH_IGNORE_UID", "1337"),
        ]);
        let Loaded::Disabled { warnings, .. } = load(&Cli::default(), &vars).unwrap() else {
            panic!("{value} must not enable");
        };
        assert_eq!(
            warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "APPMESH_START_ENABLED (--start-enabled) is {value:?}, which is neither \"1\" (install) nor \"0\" or empty (do not): nothing is installed; set it to 1 to install the redirect"
            )]
        );
    }
}

#[test]
fn port_22_is_always_ignored() {
    let (c, _) = config(&[("APPMESH_IGNORE_UID", "1337")]).unwrap();
    assert_eq!(c.egress_ignored_ports, [22]);
    let (c, _) = config(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_EGRESS_IGNORED_PORTS", "5432"),
    ])
    .unwrap();
    assert_eq!(c.egress_ignored_ports, [5432, 22]);
    let (c, _) = config(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_EGRESS_IGNORED_PORTS", "22,5432"),
    ])
    .unwrap();
    assert_eq!(c.egress_ignored_ports, [22, 5432]);
}

#[test]
fn more_than_15_ports_are_all_applied_with_a_warning_naming_the_ports_past_ecss_limit() {
    let app: Vec<String> = (9000..9017).map(|p| p.to_string()).collect();
    let ignored: Vec<String> = (1000..1016).map(|p| p.to_string()).collect();
    // The helpers take static strings, as the other tests' literals are.
    let app: &'static str = Box::leak(app.join(",").into_boxed_str());
    let ignored: &'static str = Box::leak(ignored.join(",").into_boxed_str());
    let (c, warnings) = config(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", app),
        ("APPMESH_EGRESS_IGNORED_PORTS", ignored),
    ])
    .unwrap();
    assert_eq!(c.app_ports.len(), 17);
    assert_eq!(c.egress_ignored_ports.len(), 17, "16 listed and port 22");
    assert_eq!(
        warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "APPMESH_APP_PORTS (--app-ports) lists 17 ports: ECS's App Mesh redirect applied only the first 15 and dropped the rest, Trellis applies them all, so inbound traffic goes through the proxy where ECS sent it straight to the app for ports 9015,9016",
            "APPMESH_EGRESS_IGNORED_PORTS (--egress-ignored-ports) lists 16 ports: ECS's App Mesh redirect applied only the first 15 and dropped the rest, Trellis applies them all, so outbound traffic bypasses the proxy where ECS sent it through the proxy for ports 1015",
        ]
    );
    // Fifteen listed (port 22 added by default does not count): no warning.
    let fifteen: Vec<String> = (1000..1015).map(|p| p.to_string()).collect();
    let fifteen: &'static str = Box::leak(fifteen.join(",").into_boxed_str());
    let (_, warnings) = config(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_EGRESS_IGNORED_PORTS", fifteen),
    ])
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn cli_parses_ecs_property_flags() {
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "trellis-proxy-route-manager",
        "--netns",
        "/var/run/netns/x",
        "--ignored-uid",
        "1337",
        "--app-ports",
        "8080",
        "--enable-ipv6",
        "--iptables-backend",
        "legacy",
    ])
    .unwrap();
    assert_eq!(cli.ignored_uid.as_deref(), Some("1337"));
    assert!(cli.enable_ipv6);
    assert_eq!(cli.iptables_backend, BackendChoice::Legacy);
    assert_eq!(Cli::default().iptables_backend, BackendChoice::Auto);
    assert!(Cli::try_parse_from(["x", "--cleanup", "--dry-run"]).is_err());
}
