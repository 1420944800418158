//! What a newcomer meets in the first hour, kept true: both README scripts answer `--help` without
//! running anything; every binary's `--help` is free of source-doc markup; a test process's guard
//! ends everything it started, even across a PID namespace and a uid change; the demo exits 0
//! leaving nothing behind; and the leak check of `scripts/test.sh` catches what a run leaves while
//! ignoring what is not the run's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trellis_tests::{
    Proc, Workdir, bin, can_run_privileged, check, eventually, run, workspace_root,
};

fn script(name: &str, args: &[&str]) -> std::process::Output {
    run(Command::new("bash")
        .arg(workspace_root().join("scripts").join(name))
        .args(args))
}

#[test]
fn both_readme_scripts_answer_help_and_refuse_unknown_arguments_without_running_anything() {
    for name in ["demo.sh", "test.sh"] {
        let help = script(name, &["--help"]);
        let out = String::from_utf8_lossy(&help.stdout);
        assert!(help.status.success(), "{name} --help: {}", help.status);
        assert!(
            out.starts_with(&format!("Usage: bash scripts/{name}")),
            "{name} --help: {out}"
        );
        // Nothing ran: setup.sh would have printed its lines.
        let all = format!("{out}{}", String::from_utf8_lossy(&help.stderr));
        assert!(!all.contains("setup:"), "{name} --help ran setup:\n{all}");

        let wrong = script(name, &["--no-such-flag"]);
        assert_eq!(wrong.status.code(), Some(2), "{name} --no-such-flag");
        assert!(String::from_utf8_lossy(&wrong.stderr).contains("unknown argument --no-such-flag"));
    }
}

#[test]
fn no_help_text_shows_rustdoc_markup() {
    let commands: &[&[&str]] = &[
        &["trellis-agent"],
        &["trellis-agent", "serve"],
        &["trellis-agent", "export"],
        &["trellis-agent", "init-store"],
        &["trellis-agent", "bootstrap"],
        &["trellis-agent", "envoy"],
        &["trellis-agent", "health"],
        &["trellis-proxy-route-manager"],
        &["trellis-rewrite"],
    ];
    for argv in commands {
        let help = check(Command::new(bin(argv[0])).args(&argv[1..]).arg("--help"));
        for markup in ["[`", "crate::", "super::", "self::"] {
            assert!(
                !help.contains(markup),
                "{} --help shows {markup:?} (a doc comment written for rustdoc):\n{help}",
                argv.join(" ")
            );
        }
    }
}

/// Pids of the processes whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    let want: String = argv.iter().map(|a| format!("{a}\0")).collect();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == want.as_bytes()).then_some(pid)
        })
        .collect()
}

/// Starts `cmd` as a Proc, waits until `argv` (a grandchild) runs, drops the Proc, and checks
/// that the grandchild is gone.
fn dropping_ends_the_grandchild(work: &Workdir, cmd: &mut Command, argv: &[&str]) {
    let proc = Proc::spawn("tree", cmd, work.join("tree.log"));
    let pids = eventually(
        "the grandchild runs",
        Duration::from_secs(10),
        || match pids_running(argv) {
            pids if pids.is_empty() => Err("not yet".to_string()),
            pids => Ok(pids),
        },
    );
    drop(proc);
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| {
                    !s.lines()
                        .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        left.is_empty(),
        "{argv:?} still running after the drop: {left:?}"
    );
}

#[test]
fn a_dropped_proc_ends_its_grandchildren() {
    let work = Workdir::new("reap-tree");
    // A unique argument tells this test's sleep from any other.
    let tag = format!(
        "{}.{}",
        3000 + std::process::id() % 1000,
        std::process::id()
    );
    dropping_ends_the_grandchild(
        &work,
        Command::new("sh").args(["-c", &format!("sleep {tag} & wait")]),
        &["sleep", &tag],
    );
}

#[test]
fn a_dropped_proc_ends_a_program_in_its_own_pid_namespace_under_another_uid() {
    if !can_run_privileged("a_dropped_proc_ends_a_program_in_its_own_pid_namespace") {
        return;
    }
    // What images.rs does: the uid change clears the parent-death signal --kill-child sets.
    let work = Workdir::new("reap-pidns");
    let tag = format!(
        "{}.{}",
        4000 + std::process::id() % 1000,
        std::process::id()
    );
    dropping_ends_the_grandchild(
        &work,
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .args(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"])
            .args(["sleep", &tag]),
        &["sleep", &tag],
    );
}

#[test]
fn the_demo_exits_0_and_leaves_no_working_directory() {
    if !can_run_privileged("the demo") {
        return;
    }
    // The demo's own TMPDIR, reachable by uid 1337 as /tmp is.
    let work = Workdir::new("demo-run");
    let tmp = work.join("tmp");
    std::fs::create_dir(&tmp).expect("demo TMPDIR");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .expect("chmod demo TMPDIR");
    let out = run(Command::new(bin("trellis-demo")).env("TMPDIR", &tmp));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{text}");
    assert!(
        text.contains("front got: \"hello from back\"") && text.contains("refused, as expected"),
        "{text}"
    );
    assert!(
        text.contains("how DROP_ALL refuses"),
        "the refusal is not explained:\n{text}"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read demo TMPDIR")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
}

/// `bash -c SCRIPT` with scripts/leaks.sh sourced, from the workspace root.
fn leaks(script: &str) -> (Option<i32>, String) {
    let out = run(Command::new("bash")
        .arg("-c")
        .arg(format!("source scripts/leaks.sh\n{script}"))
        .current_dir(workspace_root()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A network namespace of this test process, deleted on drop.
struct Netns(String);

impl Netns {
    fn add(name: String) -> Self {
        check(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }

    fn exists(&self) -> bool {
        Path::new("/var/run/netns").join(&self.0).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

#[test]
fn the_leak_check_names_and_removes_what_a_run_left_and_nothing_of_anyone_else() {
    if !can_run_privileged("the leak check") {
        return;
    }
    let work = Workdir::new("leak-check");
    // Not the run's: a process and a namespace of this test process, outside the probed run.
    let tag = format!(
        "{}.{}",
        5000 + std::process::id() % 1000,
        std::process::id()
    );
    let mut outsider = Proc::spawn(
        "outsider",
        Command::new("sleep").arg(&tag),
        work.join("outsider.log"),
    );
    let foreign = Netns::add(format!("trforeign{}-9", std::process::id()));

    // A run whose test process (recorded as cargo's runner records one) leaves a daemon that
    // escaped its process group, a namespace named with its pid, /etc/netns for it, and a file.
    let (code, text) = leaks(
        r#"leaks_begin probe
leaks_run scripts/leaks.sh record bash -c '
  ip netns add trprobe$$-1 && mkdir -p /etc/netns/trprobe$$-1 && touch "$TMPDIR/left-behind"
  setsid sleep 6001 </dev/null >/dev/null 2>&1 &'
leaks_end 0"#,
    );
    assert_eq!(
        code,
        Some(1),
        "the leak check passed a leaking run:\n{text}"
    );
    for what in [
        "sleep 6001",
        "network namespace trprobe",
        "/etc/netns/trprobe",
        "left-behind",
    ] {
        assert!(text.contains(what), "{what:?} not named:\n{text}");
    }
    assert!(
        !text.contains(&tag) && !text.contains(&foreign.0),
        "the leak check counted what is not the run's:\n{text}"
    );
    // And removed what it named, leaving the rest alone.
    assert!(pids_running(&["sleep", "6001"]).is_empty(), "{text}");
    let probe_ns: Vec<String> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("trprobe"))
        .collect();
    assert!(
        probe_ns.iter().all(|n| !text.contains(n.as_str())),
        "{probe_ns:?} named but not removed"
    );
    assert!(
        outsider.is_running(),
        "the leak check ended a process not of its run"
    );
    assert!(foreign.exists(), "the leak check removed {}", foreign.0);

    // A run that cleans up after itself passes.
    let (code, text) = leaks(
        r#"leaks_begin probe
leaks_run scripts/leaks.sh record bash -c 'ip netns add trprobe$$-2 && ip netns del trprobe$$-2 && touch "$TMPDIR/f" && rm "$TMPDIR/f"'
leaks_end 0"#,
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("leak check passed"), "{text}");
}
