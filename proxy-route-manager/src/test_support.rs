//! Helpers for the tests that need root: the gate that skips them locally but fails them in CI
//! (STYLE.md item 12), throwaway network namespaces, and running code inside one on its own thread so
//! the test harness's threads never change namespace.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::iptables::{Backend, Family, Iptables};
use crate::netns;

/// Whether a privileged test can run: true as root; otherwise prints why it is skipped, or panics
/// when `CI` is set, because CI must run these tests.
pub(crate) fn can_run_privileged_test(test: &str) -> bool {
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

/// Runs a command and returns its stdout, panicking with its stderr when it fails.
pub(crate) fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A named network namespace (`ip netns add`) with loopback up, deleted on drop.
pub(crate) struct TestNetns {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
}

impl TestNetns {
    pub(crate) fn new() -> TestNetns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "trellis-prm-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        let ns = TestNetns {
            path: PathBuf::from(format!("/var/run/netns/{name}")),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS…`
    pub(crate) fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// Runs a program inside the namespace.
    pub(crate) fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// The nat table's chain declarations and rules (comments and counters-free header lines dropped).
    pub(crate) fn nat(&self, family: Family) -> Vec<String> {
        let program = match family {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        };
        self.exec(program, &["-t", "nat"])
            .lines()
            .filter(|l| l.starts_with(':') || l.starts_with('-'))
            .map(str::to_owned)
            .collect()
    }

    /// `iptables-save -t nat` (or the ip6tables / nft / legacy twin) byte for byte, without the
    /// `#` comment lines, which carry the time.
    pub(crate) fn saved_nat(&self, backend: Backend, family: Family) -> String {
        let program = Iptables::new(backend).program(family, "save");
        self.exec(&program, &["-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it creates live there.
    pub(crate) fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                netns::enter(&self.path).expect("enter test namespace");
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Runs `f` on a fresh thread, so a namespace it enters (e.g. `run` with `--netns`) dies with it.
pub(crate) fn on_new_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
