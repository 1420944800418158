//! Tests that install the rules for real in throwaway network namespaces and push TCP connections
//! through them: the iptables text the kernel ends up with, convergence, cleanup, rollback, and that
//! every redirect and every exemption holds on actual packets. They need root (see `test_support`).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use crate::config::{Cli, Config};
use crate::detect;
use crate::error::Error;
use crate::iptables::{Backend, BackendChoice, Family, Iptables};
use crate::plan::Plan;
use crate::run::{Outcome, install, run};
use crate::state::{Jump, NatState, converge};
use crate::test_support::{TestNetns, can_run_privileged_test, on_new_thread};

/// What the lead's end-to-end test passes.
const E2E_ENV: &[(&str, &str)] = &[
    ("APPMESH_START_ENABLED", "1"),
    ("APPMESH_IGNORE_UID", "1337"),
    ("APPMESH_APP_PORTS", "8080"),
    ("APPMESH_ENVOY_INGRESS_PORT", "15000"),
    ("APPMESH_ENVOY_EGRESS_PORT", "15001"),
    ("APPMESH_EGRESS_IGNORED_IP", "169.254.170.2,169.254.169.254"),
];

const BASE_CHAINS: [&str; 4] = [
    ":PREROUTING ACCEPT [0:0]",
    ":INPUT ACCEPT [0:0]",
    ":OUTPUT ACCEPT [0:0]",
    ":POSTROUTING ACCEPT [0:0]",
];

fn env_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Runs the binary's logic with `--netns` pointing at `ns`, on a thread of its own.
fn run_in(ns: &TestNetns, cli: Cli, pairs: &[(&str, &str)]) -> crate::Result<Outcome> {
    let cli = Cli {
        netns: Some(ns.path.clone()),
        ..cli
    };
    let env = env_map(pairs);
    on_new_thread(|| run(&cli, &env))
}

fn cleanup_cli() -> Cli {
    Cli {
        cleanup: true,
        ..Cli::default()
    }
}

fn status_cli() -> Cli {
    Cli {
        status: true,
        ..Cli::default()
    }
}

fn plan(pairs: &[(&str, &str)]) -> Plan {
    let (config, _) = Config::from_sources(&Cli::default(), &env_map(pairs)).unwrap();
    Plan::new(&config)
}

fn ours(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("APPMESH"))
        .cloned()
        .collect()
}

#[test]
fn e2e_configuration_installs_exactly_app_mesh_rules_reapply_converges_and_cleanup_removes_them() {
    if !can_run_privileged_test("e2e_configuration_installs_exactly_app_mesh_rules") {
        return;
    }
    let ns = TestNetns::new();
    assert_eq!(
        run_in(&ns, Cli::default(), E2E_ENV).unwrap(),
        Outcome::Installed
    );
    let installed = ns.nat(Family::V4);
    let expected: Vec<String> = BASE_CHAINS
        .iter()
        .copied()
        .chain([
            ":APPMESH_EGRESS - [0:0]",
            ":APPMESH_INGRESS - [0:0]",
            "-A PREROUTING -p tcp -m addrtype ! --src-type LOCAL -j APPMESH_INGRESS",
            "-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS",
            "-A APPMESH_EGRESS -m owner --uid-owner 1337 -j RETURN",
            "-A APPMESH_EGRESS -p tcp -m multiport --dports 22 -j RETURN",
            "-A APPMESH_EGRESS -d 169.254.170.2/32 -p tcp -j RETURN",
            "-A APPMESH_EGRESS -d 169.254.169.254/32 -p tcp -j RETURN",
            "-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 15001",
            "-A APPMESH_INGRESS -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15000",
        ])
        .map(str::to_owned)
        .collect();
    assert_eq!(installed, expected);
    assert!(ours(&ns.nat(Family::V6)).is_empty(), "IPv6 is off");
    assert_eq!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status {
            in_place: true,
            report: "ipv4: in place\nipv6: none configured, none present\n".into()
        }
    );

    assert_eq!(
        run_in(&ns, Cli::default(), E2E_ENV).unwrap(),
        Outcome::Installed
    );
    assert_eq!(ns.nat(Family::V4), expected, "re-running changes nothing");

    assert_eq!(run_in(&ns, cleanup_cli(), &[]).unwrap(), Outcome::CleanedUp);
    assert_eq!(ns.nat(Family::V4), BASE_CHAINS);
    assert_eq!(
        run_in(&ns, cleanup_cli(), &[]).unwrap(),
        Outcome::CleanedUp,
        "cleanup of nothing"
    );
    assert_eq!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status {
            in_place: false,
            report: "ipv4: absent\nipv6: none configured, none present\n".into()
        }
    );
}

#[test]
fn cleanup_in_a_namespace_that_never_had_rules_succeeds() {
    if !can_run_privileged_test("cleanup_in_a_namespace_that_never_had_rules_succeeds") {
        return;
    }
    let ns = TestNetns::new();
    assert_eq!(run_in(&ns, cleanup_cli(), &[]).unwrap(), Outcome::CleanedUp);
    assert!(ours(&ns.nat(Family::V4)).is_empty());
}

#[test]
fn apply_twice_then_cleanup_leaves_other_rules_exactly_as_they_were() {
    if !can_run_privileged_test("apply_twice_then_cleanup_leaves_other_rules_exactly_as_they_were")
    {
        return;
    }
    let ns = TestNetns::new();
    ns.exec("iptables", &["-t", "nat", "-N", "OTHER"]);
    ns.exec(
        "iptables",
        &["-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN"],
    );
    ns.exec(
        "iptables",
        &["-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9", "-j", "OTHER"],
    );
    ns.exec(
        "iptables",
        &["-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "OTHER"],
    );
    let before = ns.nat(Family::V4);

    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    let installed = ns.nat(Family::V4);
    assert!(
        before.iter().all(|line| installed.contains(line)),
        "other rules kept: {installed:#?}"
    );
    assert_eq!(
        installed
            .iter()
            .filter(|l| l.ends_with("-j APPMESH_EGRESS"))
            .count(),
        1
    );
    assert_eq!(
        installed
            .iter()
            .filter(|l| l.ends_with("-j APPMESH_INGRESS"))
            .count(),
        1
    );

    run_in(&ns, cleanup_cli(), &[]).unwrap();
    assert_eq!(ns.nat(Family::V4), before);
}

#[test]
fn duplicate_jumps_added_by_someone_else_are_collapsed_to_one() {
    if !can_run_privileged_test("duplicate_jumps_added_by_someone_else_are_collapsed_to_one") {
        return;
    }
    let ns = TestNetns::new();
    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    let jump = "-p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS";
    let mut args = vec!["-t", "nat", "-A", "OUTPUT"];
    args.extend(jump.split(' '));
    ns.exec("iptables", &args);
    let count = |ns: &TestNetns| {
        ns.nat(Family::V4)
            .iter()
            .filter(|l| l.ends_with(jump))
            .count()
    };
    assert_eq!(count(&ns), 2);
    assert!(matches!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status {
            in_place: false,
            ..
        }
    ));

    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    assert_eq!(count(&ns), 1);
}

#[test]
fn changed_configuration_replaces_the_rules_and_drops_ingress_when_no_app_ports() {
    if !can_run_privileged_test("changed_configuration_replaces_the_rules") {
        return;
    }
    let ns = TestNetns::new();
    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    let egress_only = [
        ("APPMESH_START_ENABLED", "1"),
        ("APPMESH_IGNORE_GID", "1338"),
        ("APPMESH_ENVOY_EGRESS_PORT", "16001"),
    ];
    run_in(&ns, Cli::default(), &egress_only).unwrap();
    assert_eq!(
        ours(&ns.nat(Family::V4)),
        [
            ":APPMESH_EGRESS - [0:0]",
            "-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS",
            "-A APPMESH_EGRESS -m owner --gid-owner 1338 -j RETURN",
            "-A APPMESH_EGRESS -p tcp -m multiport --dports 22 -j RETURN",
            "-A APPMESH_EGRESS -d 169.254.169.254/32 -p tcp -j RETURN",
            "-A APPMESH_EGRESS -d 169.254.170.2/32 -p tcp -j RETURN",
            "-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 16001",
        ]
    );
}

#[test]
fn ipv6_rules_hold_only_ipv6_addresses_and_are_removed_when_ipv6_is_turned_off() {
    if !can_run_privileged_test("ipv6_rules_hold_only_ipv6_addresses") {
        return;
    }
    let ns = TestNetns::new();
    let mut with_v6 = E2E_ENV.to_vec();
    with_v6.push(("APPMESH_ENABLE_IPV6", "1"));
    with_v6.retain(|(k, _)| *k != "APPMESH_EGRESS_IGNORED_IP");
    with_v6.push(("APPMESH_EGRESS_IGNORED_IP", "fd00:ec2::254,10.0.0.0/8"));
    run_in(&ns, Cli::default(), &with_v6).unwrap();

    let v6 = ours(&ns.nat(Family::V6));
    assert!(
        v6.contains(&"-A APPMESH_EGRESS -d fd00:ec2::254/128 -p tcp -j RETURN".to_owned()),
        "{v6:#?}"
    );
    assert!(
        v6.iter()
            .all(|l| !l.contains("10.0.0.0") && !l.contains("169.254")),
        "{v6:#?}"
    );
    let v4 = ours(&ns.nat(Family::V4));
    assert!(
        v4.contains(&"-A APPMESH_EGRESS -d 10.0.0.0/8 -p tcp -j RETURN".to_owned()),
        "{v4:#?}"
    );
    assert!(v4.iter().all(|l| !l.contains("fd00")), "{v4:#?}");

    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    assert!(
        ours(&ns.nat(Family::V6)).is_empty(),
        "IPv6 leftovers removed"
    );
    run_in(&ns, Cli::default(), &with_v6).unwrap();
    run_in(&ns, cleanup_cli(), &[]).unwrap();
    assert!(ours(&ns.nat(Family::V4)).is_empty() && ours(&ns.nat(Family::V6)).is_empty());
}

/// `plan` with one more rule at the very end of its `family` transaction that the kernel refuses when
/// the table is committed: an owner match in PREROUTING (owner matches only work on locally generated
/// packets). Everything before it in the same `iptables-restore` input is valid.
fn with_rejected_last_rule(mut plan: Plan, family: Family) -> Plan {
    let state = match family {
        Family::V4 => &mut plan.ipv4,
        Family::V6 => &mut plan.ipv6,
    };
    state.jumps.push(Jump {
        chain: "PREROUTING".into(),
        spec: "-m owner --uid-owner 4242 -j RETURN".into(),
    });
    plan
}

/// Foreign rules (ours must not disturb them) plus an older configuration of ours, in both families.
fn populate_for_failure(ns: &TestNetns, backend: Backend) {
    for family in [Family::V4, Family::V6] {
        let program = Iptables::new(backend)
            .program(family, "save")
            .replace("-save", "");
        ns.exec(&program, &["-t", "nat", "-N", "OTHER"]);
        ns.exec(
            &program,
            &["-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN"],
        );
        ns.exec(
            &program,
            &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "OTHER"],
        );
    }
    let mut old = E2E_ENV[1..].to_vec();
    old.push(("APPMESH_ENABLE_IPV6", "1"));
    ns.run_in(|| install(&plan(&old), Iptables::new(backend)))
        .unwrap();
}

/// A configuration that differs from the old one in every chain and jump.
const NEW_CONFIG: &[(&str, &str)] = &[
    ("APPMESH_IGNORE_GID", "7"),
    ("APPMESH_APP_PORTS", "9000,9001"),
    ("APPMESH_EGRESS_IGNORED_PORTS", "22"),
    ("APPMESH_ENVOY_EGRESS_PORT", "16001"),
    ("APPMESH_ENABLE_IPV6", "1"),
];

#[test]
fn failing_ipv4_apply_leaves_the_nat_tables_byte_for_byte_as_they_were() {
    if !can_run_privileged_test("failing_ipv4_apply_leaves_the_nat_tables_byte_for_byte") {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = TestNetns::new();
        populate_for_failure(&ns, backend);
        let before_v4 = ns.saved_nat(backend, Family::V4);
        let before_v6 = ns.saved_nat(backend, Family::V6);
        assert!(before_v4.contains("-j APPMESH_INGRESS") && before_v4.contains("-j OTHER"));

        let broken = with_rejected_last_rule(plan(NEW_CONFIG), Family::V4);
        // The rejected rule comes last, after deletions, chain flushes and new rules.
        let input = converge(&broken.ipv4, &NatState::from_save(&before_v4)).unwrap();
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(
            lines[lines.len() - 2..],
            [
                "-A PREROUTING -m owner --uid-owner 4242 -j RETURN",
                "COMMIT"
            ]
        );
        assert!(input.contains("-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 16001\n"));

        let err = ns
            .run_in(|| install(&broken, Iptables::new(backend)))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Rejected {
                    family: Family::V4,
                    ..
                }
            ),
            "{backend}: {err}"
        );
        assert!(
            err.to_string().contains("none of them were applied"),
            "{err}"
        );
        assert_eq!(ns.saved_nat(backend, Family::V4), before_v4, "{backend}");
        assert_eq!(ns.saved_nat(backend, Family::V6), before_v6, "{backend}");
    }
}

#[test]
fn failing_ipv6_apply_rolls_ipv4_back_byte_for_byte() {
    if !can_run_privileged_test("failing_ipv6_apply_rolls_ipv4_back_byte_for_byte") {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        let iptables = Iptables::new(backend);
        let broken = with_rejected_last_rule(plan(NEW_CONFIG), Family::V6);

        // From nothing: nothing is left.
        let ns = TestNetns::new();
        let empty_v4 = ns.saved_nat(backend, Family::V4);
        let err = ns.run_in(|| install(&broken, iptables)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Rejected {
                    family: Family::V6,
                    ..
                }
            ),
            "{backend}: {err}"
        );
        assert_eq!(ns.saved_nat(backend, Family::V4), empty_v4, "{backend}");
        assert!(!ns.saved_nat(backend, Family::V6).contains("APPMESH"));

        // From an older configuration: that configuration is back, exactly.
        let ns = TestNetns::new();
        populate_for_failure(&ns, backend);
        let before_v4 = ns.saved_nat(backend, Family::V4);
        let before_v6 = ns.saved_nat(backend, Family::V6);
        ns.run_in(|| install(&broken, iptables)).unwrap_err();
        assert_eq!(ns.saved_nat(backend, Family::V4), before_v4, "{backend}");
        assert_eq!(ns.saved_nat(backend, Family::V6), before_v6, "{backend}");
    }
}

#[test]
fn missing_netns_is_reported_before_any_iptables_call() {
    if !can_run_privileged_test("missing_netns_is_reported_before_any_iptables_call") {
        return;
    }
    let cli = Cli {
        netns: Some("/var/run/netns/trellis-prm-missing".into()),
        ..Cli::default()
    };
    let env = env_map(E2E_ENV);
    let err = on_new_thread(|| run(&cli, &env)).unwrap_err();
    assert!(matches!(err, Error::NetnsOpen { .. }), "{err}");
}

// ---- traffic ----

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(3);

/// A namespace whose default routes lead into a veth pair whose other end answers nothing (no address,
/// no forwarding): remote addresses are routable but silent, so a connection either reaches a local
/// listener via REDIRECT or times out.
fn routed_namespace() -> TestNetns {
    let ns = TestNetns::new();
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["addr", "add", "10.200.0.1/24", "dev", "d0"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:1::1/64",
        "dev",
        "d0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["link", "set", "d1", "up"]);
    ns.ip(&["route", "add", "default", "dev", "d0"]);
    ns.ip(&["-6", "route", "add", "default", "dev", "d0"]);
    ns
}

fn listen(addr: &str) -> TcpListener {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    listener
}

fn accept_within(listener: &TcpListener, within: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Some(stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The destination the client asked for, as the kernel kept it across the REDIRECT.
fn original_dst(stream: &TcpStream) -> SocketAddr {
    match stream.local_addr().unwrap() {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).unwrap();
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).unwrap();
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                u16::from_be(sa.sin6_port),
            )
        }
    }
}

/// Connecting to `addr` lands on `proxy`, which sees `addr` as the original destination.
fn assert_redirected(proxy: &TcpListener, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let _client = TcpStream::connect_timeout(&addr, LONG)
        .unwrap_or_else(|e| panic!("{addr} should have been redirected to the proxy: {e}"));
    let accepted = accept_within(proxy, LONG).unwrap_or_else(|| panic!("proxy did not get {addr}"));
    assert_eq!(original_dst(&accepted), addr);
}

/// Connecting to `addr` does not reach the proxy: the packet went to the real (silent) destination.
fn assert_bypassed(proxy: &TcpListener, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let result = TcpStream::connect_timeout(&addr, SHORT);
    assert!(
        result.is_err(),
        "{addr} should have bypassed the proxy but connected"
    );
    assert!(
        accept_within(proxy, Duration::ZERO).is_none(),
        "proxy got a connection to {addr}"
    );
}

/// Whether a shell running as `uid`/`gid` manages to open a TCP connection to `ip:port` within a second.
fn connects_as(uid: u32, gid: u32, ip: &str, port: u16) -> bool {
    let mut child = Command::new("bash")
        .args(["-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .uid(uid)
        .gid(gid)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    false
}

#[test]
fn outbound_tcp_reaches_the_egress_port_with_its_original_destination_and_every_exemption_holds() {
    if !can_run_privileged_test("outbound_tcp_reaches_the_egress_port") {
        return;
    }
    let ns = routed_namespace();
    let ignored_ports: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
    let ignored_ports = format!("22,{}", ignored_ports.join(","));
    let env = [
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_IGNORE_GID", "1338"),
        ("APPMESH_EGRESS_IGNORED_IP", "198.51.100.0/24"),
        ("APPMESH_EGRESS_IGNORED_PORTS", ignored_ports.as_str()),
    ];
    ns.run_in(|| {
        let proxy = listen("0.0.0.0:15001");
        install(&plan(&env), Iptables::default()).unwrap();

        assert_redirected(&proxy, "203.0.113.7:80");
        assert_redirected(&proxy, "10.200.0.99:8080");
        // Ignored addresses, including the metadata endpoints that are always ignored.
        for addr in ["198.51.100.9:80", "169.254.169.254:80", "169.254.170.2:80"] {
            assert_bypassed(&proxy, addr);
        }
        // Ignored ports, including ones past the first 15 (a second multiport rule).
        for port in [22, 1000, 1014, 1015, 1019] {
            assert_bypassed(&proxy, &format!("203.0.113.7:{port}"));
        }
        assert_redirected(&proxy, "203.0.113.7:1020");
        // A local destination is never redirected: nothing listens on 10.200.0.1:9, so it is refused.
        let err = TcpStream::connect_timeout(&"10.200.0.1:9".parse().unwrap(), LONG).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

        // The proxy's own uid and gid bypass; anyone else is redirected.
        assert!(
            !connects_as(1337, 1337, "203.0.113.7", 80),
            "ignored uid was redirected"
        );
        assert!(
            !connects_as(4242, 1338, "203.0.113.7", 80),
            "ignored gid was redirected"
        );
        assert!(accept_within(&proxy, Duration::ZERO).is_none());
        assert!(
            connects_as(4242, 4242, "203.0.113.7", 80),
            "other uid was not redirected"
        );
        assert!(accept_within(&proxy, LONG).is_some());
    });
}

#[test]
fn outbound_ipv6_reaches_the_egress_port_and_ignored_ipv6_ranges_bypass() {
    if !can_run_privileged_test("outbound_ipv6_reaches_the_egress_port") {
        return;
    }
    let ns = routed_namespace();
    let env = [
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_ENABLE_IPV6", "1"),
        ("APPMESH_EGRESS_IGNORED_IP", "2001:db8:3::/48"),
        ("APPMESH_EGRESS_IGNORED_PORTS", "22"),
    ];
    ns.run_in(|| {
        let proxy6 = listen("[::]:15001");
        install(&plan(&env), Iptables::default()).unwrap();
        assert_redirected(&proxy6, "[2001:db8:2::7]:80");
        assert_bypassed(&proxy6, "[2001:db8:3::9]:80");
        assert_bypassed(&proxy6, "[2001:db8:2::7]:22");
        assert!(
            !connects_as(1337, 1337, "2001:db8:2::7", 80),
            "ignored uid was redirected"
        );
        assert!(accept_within(&proxy6, Duration::ZERO).is_none());
    });
}

#[test]
fn inbound_tcp_to_an_app_port_reaches_the_ingress_port_and_other_ports_do_not() {
    if !can_run_privileged_test("inbound_tcp_to_an_app_port_reaches_the_ingress_port") {
        return;
    }
    let app = TestNetns::new();
    let client = TestNetns::new();
    app.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vc",
        "netns",
        &client.name,
    ]);
    app.ip(&["addr", "add", "10.201.0.2/24", "dev", "va"]);
    app.ip(&["link", "set", "va", "up"]);
    client.ip(&["addr", "add", "10.201.0.1/24", "dev", "vc"]);
    client.ip(&["link", "set", "vc", "up"]);

    let (ingress, other) = app.run_in(|| {
        let listeners = (listen("0.0.0.0:15000"), listen("0.0.0.0:9090"));
        let env = [
            ("APPMESH_IGNORE_UID", "1337"),
            ("APPMESH_APP_PORTS", "8080"),
        ];
        install(&plan(&env), Iptables::default()).unwrap();
        // From inside the task (a local source) the app port is not redirected.
        let err =
            TcpStream::connect_timeout(&"10.201.0.2:8080".parse().unwrap(), LONG).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        listeners
    });

    client.run_in(|| {
        assert_redirected(&ingress, "10.201.0.2:8080");
        let _direct =
            TcpStream::connect_timeout(&"10.201.0.2:9090".parse().unwrap(), LONG).unwrap();
        assert!(
            accept_within(&other, LONG).is_some(),
            "port 9090 reached its own listener"
        );
        assert!(
            accept_within(&ingress, Duration::ZERO).is_none(),
            "port 9090 was redirected"
        );
    });
}

// ---- backend detection ----

/// Which legacy tables exist in the namespace: merely looking with `iptables-legacy-save -t nat`
/// would create one, so an empty list means legacy was never touched.
fn legacy_table_names(ns: &TestNetns) -> String {
    ns.exec(
        "cat",
        &["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"],
    )
}

#[test]
fn auto_detection_picks_legacy_when_it_has_more_rules_and_leaves_nft_untouched() {
    if !can_run_privileged_test("auto_detection_picks_legacy_when_it_has_more_rules") {
        return;
    }
    let ns = TestNetns::new();
    // Two legacy rules against one nft rule: legacy is what this namespace uses.
    for port in ["9", "10"] {
        ns.exec(
            "iptables-legacy",
            &["-A", "INPUT", "-p", "udp", "--dport", port, "-j", "ACCEPT"],
        );
    }
    ns.exec(
        "iptables-nft",
        &["-A", "INPUT", "-p", "udp", "--dport", "11", "-j", "ACCEPT"],
    );
    let nft_before = ns.exec("nft", &["list", "ruleset"]);
    assert_eq!(
        ns.run_in(|| detect::resolve(BackendChoice::Auto))
            .unwrap()
            .backend(),
        Backend::Legacy
    );

    assert_eq!(
        run_in(&ns, Cli::default(), E2E_ENV).unwrap(),
        Outcome::Installed
    );
    let legacy_nat = ns.saved_nat(Backend::Legacy, Family::V4);
    assert!(
        legacy_nat.contains("-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS\n"),
        "{legacy_nat}"
    );
    assert!(matches!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status { in_place: true, .. }
    ));
    run_in(&ns, Cli::default(), E2E_ENV).unwrap();
    assert_eq!(
        ns.saved_nat(Backend::Legacy, Family::V4),
        legacy_nat,
        "re-running changes nothing"
    );
    assert_eq!(ns.exec("nft", &["list", "ruleset"]), nft_before);

    assert_eq!(run_in(&ns, cleanup_cli(), &[]).unwrap(), Outcome::CleanedUp);
    assert!(
        !ns.saved_nat(Backend::Legacy, Family::V4)
            .contains("APPMESH")
    );
    assert_eq!(
        ns.exec("nft", &["list", "ruleset"]),
        nft_before,
        "nft untouched throughout"
    );
}

#[test]
fn auto_detection_picks_nft_when_it_has_rules_and_never_creates_a_legacy_table() {
    if !can_run_privileged_test("auto_detection_picks_nft_when_it_has_rules") {
        return;
    }
    let ns = TestNetns::new();
    ns.exec(
        "iptables-nft",
        &["-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"],
    );
    assert_eq!(legacy_table_names(&ns), "");
    assert_eq!(
        ns.run_in(|| detect::resolve(BackendChoice::Auto))
            .unwrap()
            .backend(),
        Backend::Nft
    );

    let mut with_v6 = E2E_ENV.to_vec();
    with_v6.push(("APPMESH_ENABLE_IPV6", "1"));
    run_in(&ns, Cli::default(), &with_v6).unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(
            ns.saved_nat(Backend::Nft, family)
                .contains("-j APPMESH_EGRESS\n"),
            "{family}"
        );
    }
    assert!(matches!(
        run_in(&ns, status_cli(), &with_v6).unwrap(),
        Outcome::Status { in_place: true, .. }
    ));
    run_in(&ns, cleanup_cli(), &[]).unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(!ns.saved_nat(Backend::Nft, family).contains("APPMESH"));
    }
    assert_eq!(legacy_table_names(&ns), "", "legacy untouched throughout");
}

#[test]
fn auto_detection_in_a_fresh_namespace_follows_the_iptables_on_path() {
    if !can_run_privileged_test("auto_detection_in_a_fresh_namespace_follows_the_iptables_on_path")
    {
        return;
    }
    let ns = TestNetns::new();
    let version = crate::test_support::sh("iptables", &["--version"]);
    let expected = detect::parse_version(&version).unwrap_or(Backend::Nft);
    let chosen = ns
        .run_in(|| detect::resolve(BackendChoice::Auto))
        .unwrap()
        .backend();
    assert_eq!(chosen, expected, "{version}");
    assert_eq!(
        legacy_table_names(&ns),
        "",
        "looking created no legacy table"
    );
    assert_eq!(
        ns.exec("nft", &["list", "ruleset"]),
        "",
        "looking created no nft table"
    );
}

#[test]
fn port_22_bypasses_the_proxy_when_no_ports_are_listed() {
    if !can_run_privileged_test("port_22_bypasses_the_proxy_when_no_ports_are_listed") {
        return;
    }
    let ns = routed_namespace();
    // What a task definition without APPMESH_EGRESS_IGNORED_PORTS gives the route manager.
    let env = [
        ("APPMESH_START_ENABLED", "1"),
        ("APPMESH_IGNORE_UID", "1337"),
    ];
    let proxy = ns.run_in(|| listen("0.0.0.0:15001"));
    assert_eq!(
        run_in(&ns, Cli::default(), &env).unwrap(),
        Outcome::Installed
    );
    ns.run_in(|| {
        assert_bypassed(&proxy, "203.0.113.7:22");
        assert_redirected(&proxy, "203.0.113.7:23");
        assert_redirected(&proxy, "203.0.113.7:2222");
    });
}

/// A dozen rules of someone else's on `backend`, in the filter table: enough to outnumber ours.
fn unrelated_rules(ns: &TestNetns, backend: Backend) {
    let program = Iptables::new(backend)
        .program(Family::V4, "save")
        .replace("-save", "");
    for port in 9000..9012 {
        ns.exec(
            &program,
            &[
                "-A",
                "INPUT",
                "-p",
                "udp",
                "--dport",
                &port.to_string(),
                "-j",
                "ACCEPT",
            ],
        );
    }
}

fn has_ours(ns: &TestNetns, backend: Backend) -> bool {
    [Family::V4, Family::V6]
        .into_iter()
        .any(|family| ns.saved_nat(backend, family).contains("APPMESH"))
}

#[test]
fn auto_detection_follows_our_own_chains_whatever_the_other_backend_gained() {
    if !can_run_privileged_test("auto_detection_follows_our_own_chains") {
        return;
    }
    for (ours, other) in [
        (Backend::Nft, Backend::Legacy),
        (Backend::Legacy, Backend::Nft),
    ] {
        let ns = TestNetns::new();
        let pinned = Cli {
            iptables_backend: match ours {
                Backend::Legacy => BackendChoice::Legacy,
                _ => BackendChoice::Nft,
            },
            ..Cli::default()
        };
        run_in(&ns, pinned, E2E_ENV).unwrap();
        // Afterwards the other backend gets more rules than ours has (an agent, a CNI plugin).
        unrelated_rules(&ns, other);
        assert_eq!(
            ns.run_in(|| detect::resolve(BackendChoice::Auto))
                .unwrap()
                .backend(),
            ours,
            "{ours}"
        );
        assert_eq!(
            run_in(&ns, status_cli(), E2E_ENV).unwrap(),
            Outcome::Status {
                in_place: true,
                report: "ipv4: in place\nipv6: none configured, none present\n".into()
            },
            "{ours}"
        );
        // A new configuration converges where the rules are; no copy appears on the other backend.
        let mut changed = E2E_ENV.to_vec();
        changed.retain(|(k, _)| *k != "APPMESH_APP_PORTS");
        changed.push(("APPMESH_APP_PORTS", "9090"));
        run_in(&ns, Cli::default(), &changed).unwrap();
        let nat = ns.saved_nat(ours, Family::V4);
        assert!(nat.contains("--dports 9090 -j REDIRECT"), "{ours}: {nat}");
        assert!(!nat.contains("--dports 8080"), "{ours}: {nat}");
        assert!(!has_ours(&ns, other), "{ours}: a copy appeared on {other}");
        // Cleanup finds them too.
        assert_eq!(run_in(&ns, cleanup_cli(), &[]).unwrap(), Outcome::CleanedUp);
        assert!(!has_ours(&ns, ours), "{ours}: cleanup left rules");
        assert_eq!(
            run_in(&ns, status_cli(), &changed).unwrap(),
            Outcome::Status {
                in_place: false,
                report: "ipv4: absent\nipv6: none configured, none present\n".into()
            }
        );
    }
}

#[test]
fn a_second_copy_on_the_other_backend_is_reported_and_removed() {
    if !can_run_privileged_test("a_second_copy_on_the_other_backend_is_reported_and_removed") {
        return;
    }
    let ns = TestNetns::new();
    // What an older route manager could leave: the same rules on both backends.
    for backend in [Backend::Nft, Backend::Legacy] {
        ns.run_in(|| install(&plan(E2E_ENV), Iptables::new(backend)))
            .unwrap();
    }
    unrelated_rules(&ns, Backend::Legacy);
    assert!(matches!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status {
            in_place: false,
            ..
        }
    ));
    assert_eq!(
        run_in(&ns, Cli::default(), E2E_ENV).unwrap(),
        Outcome::Installed
    );
    // Legacy has more rules, so the copy there is kept and the nft one removed.
    assert!(has_ours(&ns, Backend::Legacy));
    assert!(!has_ours(&ns, Backend::Nft));
    assert!(matches!(
        run_in(&ns, status_cli(), E2E_ENV).unwrap(),
        Outcome::Status { in_place: true, .. }
    ));
    // Cleanup of two copies removes both.
    ns.run_in(|| install(&plan(E2E_ENV), Iptables::new(Backend::Nft)))
        .unwrap();
    run_in(&ns, cleanup_cli(), &[]).unwrap();
    assert!(!has_ours(&ns, Backend::Legacy) && !has_ours(&ns, Backend::Nft));
}

#[test]
fn a_users_rule_jumping_to_our_chain_survives_re_runs_and_cleanup() {
    if !can_run_privileged_test("a_users_rule_jumping_to_our_chain_survives") {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = TestNetns::new();
        // The other backend has rules too, as on a real instance; ours are pinned to `backend`.
        let other = match backend {
            Backend::Nft => Backend::Legacy,
            _ => Backend::Nft,
        };
        unrelated_rules(&ns, other);
        let pinned = Cli {
            iptables_backend: match backend {
                Backend::Legacy => BackendChoice::Legacy,
                _ => BackendChoice::Nft,
            },
            ..Cli::default()
        };
        let cli = |base: Cli| Cli {
            iptables_backend: pinned.iptables_backend,
            ..base
        };
        run_in(&ns, cli(Cli::default()), E2E_ENV).unwrap();
        let program = Iptables::new(backend)
            .program(Family::V4, "save")
            .replace("-save", "");
        ns.exec(&program, &["-t", "nat", "-N", "MINE"]);
        ns.exec(
            &program,
            &[
                "-t",
                "nat",
                "-A",
                "MINE",
                "-d",
                "10.1.0.0/16",
                "-j",
                "APPMESH_EGRESS",
            ],
        );
        ns.exec(
            &program,
            &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "MINE"],
        );
        let user_rule = "-A MINE -d 10.1.0.0/16 -j APPMESH_EGRESS\n";

        // Same configuration, then another one: the user's rule stays.
        run_in(&ns, cli(Cli::default()), E2E_ENV).unwrap();
        let mut changed = E2E_ENV.to_vec();
        changed.retain(|(k, _)| *k != "APPMESH_APP_PORTS");
        run_in(&ns, cli(Cli::default()), &changed).unwrap();
        let nat = ns.saved_nat(backend, Family::V4);
        assert!(nat.contains(user_rule), "{backend}: {nat}");
        assert!(!nat.contains("APPMESH_INGRESS"), "{backend}: {nat}");
        assert!(matches!(
            run_in(&ns, cli(status_cli()), &changed).unwrap(),
            Outcome::Status { in_place: true, .. }
        ));

        // Cleanup: our jumps and rules go; the chain the user's rule names stays, empty.
        run_in(&ns, cli(cleanup_cli()), &[]).unwrap();
        let nat = ns.saved_nat(backend, Family::V4);
        assert!(nat.contains(user_rule), "{backend}: {nat}");
        assert!(
            nat.contains("-A OUTPUT -p udp -j MINE\n"),
            "{backend}: {nat}"
        );
        assert!(nat.contains(":APPMESH_EGRESS"), "{backend}: {nat}");
        assert!(!nat.contains("-A APPMESH_EGRESS"), "{backend}: {nat}");
        assert!(
            !nat.contains("-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS"),
            "{backend}: {nat}"
        );
        assert!(matches!(
            run_in(&ns, cli(status_cli()), &[]).unwrap(),
            Outcome::Status { in_place: true, .. }
        ));
    }
}

mod enter {
    use std::path::Path;

    use crate::error::Error;
    use crate::netns::enter;

    #[test]
    fn missing_namespace_file_is_an_error_naming_the_path() {
        let err = enter(Path::new("/var/run/netns/trellis-does-not-exist")).unwrap_err();
        assert!(matches!(err, Error::NetnsOpen { .. }));
        assert!(
            err.to_string()
                .contains("/var/run/netns/trellis-does-not-exist"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_namespace_cannot_be_entered() {
        let err = enter(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, Error::NetnsEnter { .. }), "{err}");
    }
}
