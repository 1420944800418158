//! Stand-in collectors for tracing and metrics (`py/collector.py`): started where App Mesh users
//! ran the real ones (a sidecar in the task, on the default port), they record what Envoy sends,
//! decoded, for the test to assert on.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::mesh::Task;
use crate::{Proc, Workdir, eventually, workspace_root};

/// One running collector and the file it records into.
#[derive(Debug)]
pub struct Collector {
    proc: Proc,
    out: PathBuf,
}

impl Collector {
    /// UDP datagrams on 127.0.0.1:`port` inside `task` (the X-Ray daemon, DogStatsD).
    pub fn udp(work: &Workdir, task: &Task, port: u16) -> Self {
        Self::start(work, Some(task), "udp", &port.to_string())
    }

    /// HTTP requests on `port` inside `task` (the Datadog agent, a Zipkin/Jaeger collector).
    pub fn http(work: &Workdir, task: &Task, port: u16) -> Self {
        Self::start(work, Some(task), "http", &port.to_string())
    }

    /// Datagrams on a Unix socket at `path` (DogStatsD over `STATSD_SOCKET_PATH`), bound in
    /// `task`. Envoy sends a flush as a burst of datagrams; the kernel's default queue of ten
    /// per socket would drop most of them while Python reads, so the task's queue is longer
    /// (as a real DogStatsD daemon's deployment tunes `net.unix.max_dgram_qlen`).
    pub fn unix(work: &Workdir, task: &Task, path: &std::path::Path) -> Self {
        task.exec(&["sysctl", "-qw", "net.unix.max_dgram_qlen=4096"]);
        Self::start(work, Some(task), "unix", &path.display().to_string())
    }

    fn start(work: &Workdir, task: Option<&Task>, mode: &str, where_: &str) -> Self {
        let tag = format!(
            "{mode}-{}-{}",
            task.map(|t| t.ns.as_str()).unwrap_or("host"),
            where_.replace('/', "_")
        );
        let out = work.join(&format!("collected-{tag}.jsonl"));
        let script = workspace_root().join("tests/py/collector.py");
        let python = crate::venv().join("bin/python");
        let args = [
            python.display().to_string(),
            script.display().to_string(),
            mode.to_string(),
            where_.to_string(),
            out.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = match task {
            Some(t) => t.cmd(&args),
            None => {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let mut proc = Proc::spawn(
            &format!("collector {tag}"),
            &mut cmd,
            work.join(&format!("collector-{tag}.log")),
        );
        proc.wait_for_log("collector listening", Duration::from_secs(20));
        Collector { proc, out }
    }

    /// Everything recorded so far, oldest first.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The datagrams' texts.
    pub fn datagrams(&self) -> Vec<String> {
        self.records()
            .iter()
            .filter_map(|r| r["data"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until `pick` finds what it wants in the records.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&[Value]) -> Option<T>,
    ) -> T {
        eventually(what, timeout, || {
            if !self.proc.is_running() {
                panic!("{} exited:\n{}", self.proc.name, self.proc.log_text());
            }
            let records = self.records();
            pick(&records).ok_or_else(|| format!("{} records: {:?}", records.len(), records.last()))
        })
    }
}
