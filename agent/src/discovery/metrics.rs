//! Discovery's metrics, in Prometheus text beside the xDS ones: pollers running, Cloud Map calls
//! and failures by operation and reason, the instances each key last had, and with pollers
//! shared through the table: leases held and claimed, answers published and read, the table's
//! calls and failures, and whether this agent polls for itself because the table fails.

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
    /// Pollers shared through the table (`None` when they are not).
    fleet: Option<Fleet>,
}

#[derive(Debug, Default)]
struct Fleet {
    held: usize,
    fallback: bool,
    claims: u64,
    takeovers: u64,
    published: u64,
    applied: u64,
    table_failures: u64,
    table_calls: BTreeMap<&'static str, u64>,
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

    fn with_fleet(&self, f: impl FnOnce(&mut Fleet)) {
        f(self.lock().fleet.get_or_insert_with(Fleet::default));
    }

    pub(super) fn set_fleet(&self, held: usize, fallback: bool) {
        self.with_fleet(|f| {
            f.held = held;
            f.fallback = fallback;
        });
    }

    pub(super) fn lease_claimed(&self, takeover: bool) {
        self.with_fleet(|f| {
            f.claims += 1;
            if takeover {
                f.takeovers += 1;
            }
        });
    }

    pub(super) fn answer_published(&self) {
        self.with_fleet(|f| f.published += 1);
    }

    pub(super) fn answer_applied(&self) {
        self.with_fleet(|f| f.applied += 1);
    }

    pub(super) fn table_failed(&self) {
        self.with_fleet(|f| f.table_failures += 1);
    }

    /// A DynamoDB call made for the shared pollers (`BatchGetItem`, `UpdateItem`, …).
    pub fn table_call(&self, op: &'static str) {
        self.with_fleet(|f| *f.table_calls.entry(op).or_default() += 1);
    }

    /// Pollers running now.
    pub fn pollers(&self) -> usize {
        self.lock().pollers
    }

    /// Leases this agent holds, and whether it polls for itself because the table fails.
    pub fn fleet_state(&self) -> Option<(usize, bool)> {
        self.lock().fleet.as_ref().map(|f| (f.held, f.fallback))
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
        if let Some(f) = &m.fleet {
            render_fleet(f, &mut out);
        }
        out
    }
}

fn render_fleet(f: &Fleet, out: &mut String) {
    for (name, kind, help, v) in [
        (
            "trellis_cloudmap_leases_held",
            "gauge",
            "Cloud Map keys this agent polls for the whole fleet.",
            f.held as u64,
        ),
        (
            "trellis_cloudmap_fallback",
            "gauge",
            "1 while the table fails and this agent polls Cloud Map for its own Envoys.",
            u64::from(f.fallback),
        ),
        (
            "trellis_cloudmap_lease_claims_total",
            "counter",
            "Leases this agent took (free, expired or given back).",
            f.claims,
        ),
        (
            "trellis_cloudmap_lease_takeovers_total",
            "counter",
            "Leases this agent took after another agent's expired.",
            f.takeovers,
        ),
        (
            "trellis_cloudmap_answers_published_total",
            "counter",
            "Answers this agent published to the table as a lease holder.",
            f.published,
        ),
        (
            "trellis_cloudmap_answers_applied_total",
            "counter",
            "Answers this agent read from the table and served.",
            f.applied,
        ),
        (
            "trellis_cloudmap_table_failures_total",
            "counter",
            "Calls to the table for shared pollers that failed.",
            f.table_failures,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP trellis_cloudmap_table_requests_total DynamoDB calls made for shared pollers."
    );
    let _ = writeln!(out, "# TYPE trellis_cloudmap_table_requests_total counter");
    for (op, n) in &f.table_calls {
        let _ = writeln!(
            out,
            "trellis_cloudmap_table_requests_total{{operation=\"{op}\"}} {n}"
        );
    }
}
