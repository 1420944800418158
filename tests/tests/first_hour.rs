//! What a newcomer meets in the first hour, kept true: a test process's guard ends everything it
//! started, even across a PID namespace and a uid change.

use std::process::Command;
use std::time::Duration;

use trellis_tests::{Proc, Workdir, can_run_privileged, eventually};

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
