//! Discovery's metrics, in Prometheus text beside the xDS ones: pollers running, Cloud Map calls
//! and failures by operation and reason, and the instances each key last had.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::FailureKind;
use trellis_translate::CloudMapKey;

#[derive(Debug, Default)]
struct Inner {
    pollers: usize,
    started: u64,
    calls: BTreeMap<&'static str, u64>,
    failures: BTreeMap<(&'static str, FailureKind), u64>,
    updates: u64,
    instances: BTreeMap<String, usize>,
}

/// Shared by the registry and every poller; each update takes the lock briefly.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn poller_started(&self) {
        self.lock().started += 1;
    }

    pub(super) fn set_pollers(&self, n: usize) {
        self.lock().pollers = n;
    }

    pub(super) fn called(&self, op: &'static str) {
        *self.lock().calls.entry(op).or_default() += 1;
    }

    pub(super) fn failed(&self, op: &'static str, kind: FailureKind) {
        *self.lock().failures.entry((op, kind)).or_default() += 1;
    }

    pub(super) fn updated(&self, key: &CloudMapKey, instances: usize) {
        let mut m = self.lock();
        m.updates += 1;
        m.instances.insert(key.to_string(), instances);
    }

    pub(super) fn forget(&self, key: &CloudMapKey) {
        self.lock().instances.remove(&key.to_string());
    }

    /// Pollers running now.
    pub fn pollers(&self) -> usize {
        self.lock().pollers
    }

    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE trellis_cloudmap_pollers gauge");
        let _ = writeln!(out, "trellis_cloudmap_pollers {}", m.pollers);
        let _ = writeln!(out, "# TYPE trellis_cloudmap_pollers_started_total counter");
        let _ = writeln!(out, "trellis_cloudmap_pollers_started_total {}", m.started);
        let _ = writeln!(out, "# TYPE trellis_cloudmap_calls_total counter");
        for (op, n) in &m.calls {
            let _ = writeln!(out, "trellis_cloudmap_calls_total{{op=\"{op}\"}} {n}");
        }
        let _ = writeln!(out, "# TYPE trellis_cloudmap_failures_total counter");
        for ((op, kind), n) in &m.failures {
            let _ = writeln!(
                out,
                "trellis_cloudmap_failures_total{{op=\"{op}\",reason=\"{}\"}} {n}",
                kind.label()
            );
        }
        let _ = writeln!(out, "# TYPE trellis_cloudmap_updates_total counter");
        let _ = writeln!(out, "trellis_cloudmap_updates_total {}", m.updates);
        let _ = writeln!(out, "# TYPE trellis_cloudmap_instances gauge");
        for (key, n) in &m.instances {
            let key = key.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "trellis_cloudmap_instances{{key=\"{key}\"}} {n}");
        }
        out
    }
}
