//! The binary as ECS runs it: exit codes and the one line an operator sees for each kind of failure.
//! Tests that create namespaces need root; without it they are skipped with a message, unless `CI`
//! is set, in which case they fail.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy-route-manager");

const ENABLED: &[(&str, &str)] = &[
    ("APPMESH_START_ENABLED", "1"),
    ("APPMESH_IGNORE_UID", "1337"),
    ("APPMESH_APP_PORTS", "8080"),
];

/// Runs the binary with only `vars` (and PATH) in its environment.
fn route_manager(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars.iter().copied());
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run the route manager")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The log lines at error level: there must be exactly one, and it is what the operator acts on.
fn error_line(output: &Output) -> String {
    let text = stderr(output);
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    errors[0].to_owned()
}

fn can_run_privileged_test(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI is set: run the route manager tests as root in CI"
    );
    eprintln!("skipping {test}: needs root (it creates network namespaces and runs iptables)");
    false
}

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
    path: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "trellis-prm-cli-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "ip netns add {name}");
        Netns {
            path: format!("/var/run/netns/{name}"),
            name,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[test]
fn invalid_configuration_exits_2_naming_the_variable_before_touching_anything() {
    let mut vars = ENABLED.to_vec();
    vars.push(("APPMESH_ENVOY_EGRESS_PORT", "70000"));
    let output = run(&mut route_manager(
        &["--netns", "/var/run/netns/trellis-prm-none"],
        &vars,
    ));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        error_line(&output)
            .contains(r#"APPMESH_ENVOY_EGRESS_PORT (--proxy-egress-port): "70000" is not a port"#),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unknown_flag_exits_2() {
    let output = run(&mut route_manager(&["--no-such-flag"], ENABLED));
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn disabled_exits_0_without_needing_root_or_the_namespace() {
    let output = run(&mut route_manager(
        &["--netns", "/var/run/netns/trellis-prm-none"],
        &[
            ("APPMESH_START_ENABLED", "0"),
            ("APPMESH_APP_PORTS", "8080"),
        ],
    ));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("route manager disabled"));
    assert!(!stderr(&output).contains("WARN"), "{}", stderr(&output));
}

#[test]
fn disabled_with_an_invalid_setting_still_exits_2_naming_it() {
    for switch in ["0", "", "true"] {
        let output = run(&mut route_manager(
            &["--netns", "/var/run/netns/trellis-prm-none"],
            &[
                ("APPMESH_START_ENABLED", switch),
                ("APPMESH_APP_PORTS", "x"),
            ],
        ));
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            error_line(&output).contains(r#"APPMESH_APP_PORTS (--app-ports): "x" is not a port"#),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn a_start_switch_that_is_neither_0_nor_1_is_a_warning_and_installs_nothing() {
    let output = run(&mut route_manager(
        &["--netns", "/var/run/netns/trellis-prm-none"],
        &[
            ("APPMESH_START_ENABLED", "true"),
            ("APPMESH_IGNORE_UID", "1337"),
        ],
    ));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stderr(&output);
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains(r#"APPMESH_START_ENABLED (--start-enabled) is "true", which is neither "1" (install) nor "0" or empty (do not): nothing is installed"#),
        "{text}"
    );
    assert!(text.contains("route manager disabled"), "{text}");
}

#[test]
fn dry_run_prints_the_rules_and_exits_0_without_root() {
    let output = run(&mut route_manager(&["--dry-run"], ENABLED));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("# ipv4: iptables-restore --noflush\n*nat\n"),
        "{stdout}"
    );
    assert!(stdout.contains("-A APPMESH_EGRESS -p tcp -j REDIRECT --to-ports 15001\n"));
}

#[test]
fn ports_past_ecss_fifteen_are_all_installed_and_the_difference_is_a_warning() {
    if !can_run_privileged_test("ports_past_ecss_fifteen_are_all_installed") {
        return;
    }
    let ns = Netns::new();
    let ignored: Vec<String> = (1000..1017).map(|p| p.to_string()).collect();
    let ignored = ignored.join(",");
    let mut vars = ENABLED.to_vec();
    vars.push(("APPMESH_EGRESS_IGNORED_PORTS", &ignored));
    let output = run(&mut route_manager(&["--netns", ns.path.as_str()], &vars));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stderr(&output);
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("APPMESH_EGRESS_IGNORED_PORTS (--egress-ignored-ports) lists 17 ports: ECS's App Mesh redirect applied only the first 15 and dropped the rest, Trellis applies them all, so outbound traffic bypasses the proxy where ECS sent it through the proxy for ports 1015,1016"),
        "{text}"
    );
    let saved = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-save", "-t", "nat"])
        .output()
        .expect("iptables-save");
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(
        saved.contains("-A APPMESH_EGRESS -p tcp -m multiport --dports 1015,1016,22 -j RETURN"),
        "{saved}"
    );
}

#[test]
fn status_exits_3_until_installed_then_0_and_3_again_after_cleanup() {
    if !can_run_privileged_test("status_exits_3_until_installed") {
        return;
    }
    let ns = Netns::new();
    let netns = ["--netns", ns.path.as_str()];
    let with = |extra: &str| {
        let mut args = netns.to_vec();
        if !extra.is_empty() {
            args.push(extra);
        }
        run(&mut route_manager(&args, ENABLED))
    };
    let status = with("--status");
    assert_eq!(status.status.code(), Some(3), "{}", stderr(&status));
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "ipv4: absent\nipv6: none configured, none present\n"
    );
    let install = with("");
    assert_eq!(install.status.code(), Some(0), "{}", stderr(&install));
    assert!(
        stderr(&install).contains("iptables backend chosen"),
        "{}",
        stderr(&install)
    );
    let status = with("--status");
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "ipv4: in place\nipv6: none configured, none present\n"
    );
    assert_eq!(with("--cleanup").status.code(), Some(0));
    assert_eq!(with("--status").status.code(), Some(3));
}

#[test]
fn environment_failures_exit_1_with_what_to_change() {
    if !can_run_privileged_test("environment_failures_exit_1") {
        return;
    }
    let ns = Netns::new();

    // No CAP_NET_ADMIN: a root parent dropping to another uid clears the effective capabilities.
    let output = run(route_manager(&["--netns", &ns.path], ENABLED)
        .uid(65534)
        .gid(65534));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        error_line(&output).contains(r#"CAP_NET_ADMIN is missing: add "linuxParameters""#),
        "{}",
        stderr(&output)
    );

    // A namespace that does not exist.
    let output = run(&mut route_manager(
        &["--netns", "/var/run/netns/trellis-prm-none"],
        ENABLED,
    ));
    assert_eq!(output.status.code(), Some(1));
    assert!(error_line(&output).contains("cannot open network namespace"));

    // No iptables programs at all, and an explicit backend whose programs are missing.
    let output = run(route_manager(&["--netns", &ns.path], ENABLED).env("PATH", "/nonexistent"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        error_line(&output).contains("no iptables backend can be used here"),
        "{}",
        stderr(&output)
    );
    let output = run(route_manager(
        &["--netns", &ns.path, "--iptables-backend", "legacy"],
        ENABLED,
    )
    .env("PATH", "/nonexistent"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        error_line(&output)
            .contains("the legacy iptables backend was chosen (named by --iptables-backend) but iptables-legacy-save is not on PATH"),
        "{}",
        stderr(&output)
    );
}
