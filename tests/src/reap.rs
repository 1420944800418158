//! Ending everything a test started, whatever happens to the test.
//!
//! Killing the one child a test spawned is not enough: `ip netns exec … unshare --pid --fork
//! --kill-child … chroot --userspec=UID …` leaves the image's program running when `unshare` dies
//! (changing the uid clears the parent-death signal `--kill-child` set), and an Envoy entrypoint's
//! Envoy outlives a killed entrypoint. [`kill_tree`] therefore freezes the child and every
//! descendant before killing them all; killing the init of a PID namespace takes the whole
//! namespace with it. Things that must outlive every test of a process (the image layout built
//! once) are removed by [`remove_at_exit`], which does not depend on any destructor running.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (pid, parent pid) of every process, from `/proc/PID/stat`.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name may hold spaces and parentheses: the fields follow the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// True while `pid` exists and is not a zombie (a zombie has ended; only its parent's wait is due).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    // Some may have ended meanwhile: kill still signals the others, and its complaint is moot.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kills `root` and all its descendants, and waits (up to 10 s) until they have ended.
///
/// `root` must be a child of this process not yet waited for, so its pid cannot have been reused.
/// Each round stops the processes found so far and then looks for their children: a stopped
/// process forks no more, so when a round finds nothing new the tree is complete, and nothing can
/// escape by forking or by being reparented between the look and the kill.
pub fn kill_tree(root: u32) {
    let mut tree = vec![root];
    let mut stopped = 0;
    loop {
        signal("STOP", &tree[stopped..]);
        stopped = tree.len();
        let known: HashSet<u32> = tree.iter().copied().collect();
        let new: Vec<u32> = process_table()
            .into_iter()
            .filter(|(pid, ppid)| known.contains(ppid) && !known.contains(pid))
            .map(|(pid, _)| pid)
            .collect();
        if new.is_empty() {
            break;
        }
        tree.extend(new);
    }
    signal("KILL", &tree);
    // The root is reaped by its owner; the others by their parents or by init.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left: Vec<u32> = tree[1..].to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|pid| alive(*pid));
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if !left.is_empty() {
        eprintln!("processes {left:?} (descendants of {root}) still running 10 s after SIGKILL");
    }
}

/// Removes `path` once this process has ended, however it ends (return, panic, SIGKILL): a shell
/// in its own process group (so Ctrl-C in the terminal does not stop it first) waits for end of
/// file on a pipe whose only writer is this process, then removes the path.
pub fn remove_at_exit(path: &Path) {
    let spawned = Command::new("sh")
        .args(["-c", r#"cat >/dev/null; exec rm -rf -- "$0""#])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        // The pipe's write end is close-on-exec, so no other child holds it open: it closes when
        // this process ends, not before. The shell, never waited for, is reaped by init.
        Ok(mut child) => {
            std::mem::forget(child.stdin.take());
            std::mem::forget(child);
        }
        Err(e) => eprintln!("cannot arrange removal of {}: {e}", path.display()),
    }
}

/// Where tests put their working directories: the temporary directory (`TMPDIR`, which
/// `scripts/test.sh` points at its run's own directory, so the leak check sees what is left),
/// unless another uid (Envoy's 1337) could not reach into it; then `/tmp`.
pub fn scratch_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    let reachable = tmp.ancestors().all(|dir| {
        fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    });
    if reachable {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}
