use super::*;
use crate::config::Cli;
use std::collections::HashMap;

fn plan(pairs: &[(&str, &str)]) -> Plan {
    let env: HashMap<&str, &str> = pairs.iter().copied().collect();
    let (config, _) = Config::from_sources(&Cli::default(), &env).unwrap();
    Plan::new(&config)
}

#[test]
fn typical_task_renders_app_mesh_rules_exactly() {
    let plan = plan(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_IGNORE_GID", "1338"),
        ("APPMESH_APP_PORTS", "8080,9090"),
        ("APPMESH_EGRESS_IGNORED_PORTS", "22"),
        ("APPMESH_EGRESS_IGNORED_IP", "10.0.0.0/8,169.254.170.2"),
    ]);
    assert_eq!(
        plan.fresh_install(Family::V4).unwrap(),
        "\
*nat
:APPMESH_INGRESS - [0:0]
:APPMESH_EGRESS - [0:0]
-A APPMESH_INGRESS -p tcp -m multiport --dports 8080,9090 -j REDIRECT --to-ports 15000
-A APPMESH_EGRESS -m owner --uid-owner 1337 -j RETURN
-A APPMESH_EGRESS -m owner --gid-owner 1338 -j RETURN
-A APPMESH_EGRESS -p tcp -m multiport --dports 22 -j RETURN
-A APPMESH_EGRESS -d 10.0.0.0/8 -p tcp -j RETURN
-A APPMESH_EGRESS -d 169.254.170.2/32 -p tcp -j RETURN
-A APPMESH_EGRESS -d 169.254.169.254/32 -p tcp -j RETURN
-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m addrtype ! --src-type LOCAL -j APPMESH_INGRESS
-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS
COMMIT
"
    );
    assert_eq!(plan.fresh_install(Family::V6), None, "IPv6 is off");
}

#[test]
fn no_app_ports_means_no_ingress_chain_or_jump() {
    let plan = plan(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_ENVOY_EGRESS_PORT", "16001"),
    ]);
    assert_eq!(
        plan.fresh_install(Family::V4).unwrap(),
        "\
*nat
:APPMESH_EGRESS - [0:0]
-A APPMESH_EGRESS -m owner --uid-owner 1337 -j RETURN
-A APPMESH_EGRESS -p tcp -m multiport --dports 22 -j RETURN
-A APPMESH_EGRESS -d 169.254.169.254/32 -p tcp -j RETURN
-A APPMESH_EGRESS -d 169.254.170.2/32 -p tcp -j RETURN
-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 16001
-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS
COMMIT
"
    );
}

#[test]
fn more_than_15_ports_are_split_into_rules_of_at_most_15_and_none_dropped() {
    let app: Vec<String> = (8000..8032).map(|p| p.to_string()).collect();
    let ignored: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
    let plan = plan(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", &app.join(",")),
        ("APPMESH_EGRESS_IGNORED_PORTS", &ignored.join(",")),
    ]);
    let ingress = plan.ipv4.ingress.as_ref().unwrap();
    assert_eq!(ingress.len(), 3);
    assert_eq!(
        ingress[0],
        "-p tcp -m multiport --dports 8000,8001,8002,8003,8004,8005,8006,8007,8008,8009,8010,8011,8012,8013,8014 -j REDIRECT --to-ports 15000"
    );
    assert_eq!(
        ingress[2],
        "-p tcp -m multiport --dports 8030,8031 -j REDIRECT --to-ports 15000"
    );
    let egress = plan.ipv4.egress.as_ref().unwrap();
    assert_eq!(
        egress[1..3],
        [
            "-p tcp -m multiport --dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014 -j RETURN",
            "-p tcp -m multiport --dports 1015,1016,1017,1018,1019,22 -j RETURN",
        ]
    );
    let rendered_ports: Vec<String> = ingress
        .iter()
        .chain(&egress[1..3])
        .flat_map(|rule| {
            rule.split_whitespace()
                .nth(5)
                .unwrap()
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(rendered_ports, [app, ignored, vec!["22".into()]].concat());
}

#[test]
fn ipv6_rules_get_only_ipv6_ignored_addresses_and_ipv4_only_ipv4() {
    let plan = plan(&[
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", "8080"),
        ("APPMESH_ENABLE_IPV6", "1"),
        (
            "APPMESH_EGRESS_IGNORED_IP",
            "fd00:ec2::254,10.0.0.0/8,2001:db8::/32",
        ),
    ]);
    assert!(plan.ipv6_required);
    assert_eq!(
        plan.fresh_install(Family::V6).unwrap(),
        "\
*nat
:APPMESH_INGRESS - [0:0]
:APPMESH_EGRESS - [0:0]
-A APPMESH_INGRESS -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15000
-A APPMESH_EGRESS -m owner --uid-owner 1337 -j RETURN
-A APPMESH_EGRESS -p tcp -m multiport --dports 22 -j RETURN
-A APPMESH_EGRESS -d fd00:ec2::254/128 -p tcp -j RETURN
-A APPMESH_EGRESS -d 2001:db8::/32 -p tcp -j RETURN
-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m addrtype ! --src-type LOCAL -j APPMESH_INGRESS
-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS
COMMIT
"
    );
    let v4 = plan.fresh_install(Family::V4).unwrap();
    assert!(v4.contains("-d 10.0.0.0/8 -p tcp -j RETURN\n"));
    assert!(v4.contains("-d 169.254.169.254/32 "));
    assert!(!v4.contains("fd00") && !v4.contains("2001:db8"));
}

#[test]
fn ignoring_everything_is_written_without_an_address_like_iptables_save() {
    let plan = plan(&[
        ("APPMESH_IGNORE_UID", "1"),
        ("APPMESH_EGRESS_IGNORED_IP", "0.0.0.0/0"),
    ]);
    assert_eq!(plan.ipv4.egress.as_ref().unwrap()[2], "-p tcp -j RETURN");
}
