//! The agent's xDS metrics, rendered in Prometheus text format by hand (a handful of counters and
//! two histograms do not justify a metrics framework), and the per-stream debug view.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Histogram buckets in seconds, from sub-millisecond pushes to slow builds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, name: &str, out: &mut String) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What one stream has sent and heard back, for the debug endpoint.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TypeView {
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct StreamView {
    pub node: String,
    /// `sotw` or `delta`.
    pub variant: &'static str,
    pub types: BTreeMap<&'static str, TypeView>,
}

/// What is kept of a stream for its [`StreamView`]: a slot per served type rather than a map (a
/// map's first node alone is about 1 KiB, for every stream).
#[derive(Debug, Default)]
struct Tracked {
    node: String,
    variant: &'static str,
    types: [TypeView; SHORT.len()],
}

impl Tracked {
    fn view(&self) -> StreamView {
        let types = SHORT
            .iter()
            .zip(&self.types)
            .filter(|(_, v)| {
                v.sent_version.is_some() || v.acked_version.is_some() || v.last_nack.is_some()
            })
            .map(|(name, v)| (*name, v.clone()))
            .collect();
        StreamView {
            node: self.node.clone(),
            variant: self.variant,
            types,
        }
    }

    /// The slot of a served type (the streams track no other).
    fn slot(&mut self, type_url: &str) -> Option<&mut TypeView> {
        let short = short(type_url);
        let i = SHORT.iter().position(|s| *s == short)?;
        self.types.get_mut(i)
    }
}

#[derive(Debug, Default)]
struct Inner {
    streams_by_node: BTreeMap<String, i64>,
    pushes: BTreeMap<&'static str, u64>,
    acks: BTreeMap<&'static str, u64>,
    nacks: BTreeMap<&'static str, u64>,
    stale: u64,
    unknown_type: u64,
    refused: BTreeMap<&'static str, u64>,
    push_to_ack: Histogram,
    build: Histogram,
    streams: BTreeMap<u64, Tracked>,
}

/// Shared by every stream; each update takes the lock briefly and never across an await.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// The served types' short names (the last part of their URLs; a test holds it to
/// `snapshot::PUSH_ORDER`).
const SHORT: [&str; 5] = [
    "Cluster",
    "ClusterLoadAssignment",
    "Listener",
    "RouteConfiguration",
    "Secret",
];

/// A served type's short name: a static label, so counting a push or an ACK allocates nothing.
/// Streams only count the types Trellis serves.
fn short(type_url: &str) -> &'static str {
    let last = type_url.rsplit('.').next().unwrap_or(type_url);
    SHORT.into_iter().find(|s| *s == last).unwrap_or("other")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stream_opened(&self, id: u64, node: &str, variant: &'static str) {
        let mut m = self.lock();
        *m.streams_by_node.entry(node.to_string()).or_default() += 1;
        m.streams.insert(
            id,
            Tracked {
                node: node.to_string(),
                variant,
                ..Tracked::default()
            },
        );
    }

    pub fn stream_closed(&self, id: u64, node: &str) {
        let mut m = self.lock();
        if let Some(n) = m.streams_by_node.get_mut(node) {
            *n -= 1;
            if *n <= 0 {
                m.streams_by_node.remove(node);
            }
        }
        m.streams.remove(&id);
    }

    pub fn refused(&self, reason: &'static str) {
        *self.lock().refused.entry(reason).or_default() += 1;
    }

    pub fn pushed(&self, id: u64, type_url: &str, version: &str) {
        let mut m = self.lock();
        *m.pushes.entry(short(type_url)).or_default() += 1;
        if let Some(s) = m.streams.get_mut(&id)
            && let Some(t) = s.slot(type_url)
        {
            t.sent_version = Some(version.to_string());
        }
    }

    /// An ACK; `since_change` is the time from the commit that caused the push, when known.
    pub fn acked(&self, id: u64, type_url: &str, version: &str, since_change: Option<Duration>) {
        let mut m = self.lock();
        *m.acks.entry(short(type_url)).or_default() += 1;
        if let Some(d) = since_change {
            m.push_to_ack.observe(d);
        }
        if let Some(s) = m.streams.get_mut(&id)
            && let Some(t) = s.slot(type_url)
        {
            t.acked_version = Some(version.to_string());
        }
    }

    pub fn nacked(&self, id: u64, type_url: &str, message: &str) {
        let mut m = self.lock();
        *m.nacks.entry(short(type_url)).or_default() += 1;
        if let Some(s) = m.streams.get_mut(&id)
            && let Some(t) = s.slot(type_url)
        {
            t.last_nack = Some(message.to_string());
        }
    }

    pub fn stale(&self) {
        self.lock().stale += 1;
    }

    /// A request for a type Trellis does not serve: counted without its name, so clients cannot
    /// grow the label set.
    pub fn unknown_type(&self) {
        self.lock().unknown_type += 1;
    }

    pub fn built(&self, d: Duration) {
        self.lock().build.observe(d);
    }

    /// Per connected Envoy: versions sent and acknowledged, and the last rejection.
    pub fn debug_view(&self) -> BTreeMap<u64, StreamView> {
        self.lock()
            .streams
            .iter()
            .map(|(id, t)| (*id, t.view()))
            .collect()
    }

    pub fn connected(&self) -> i64 {
        self.lock().streams_by_node.values().sum()
    }

    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE trellis_xds_connected_streams gauge");
        for (node, n) in &m.streams_by_node {
            let _ = writeln!(out, "trellis_xds_connected_streams{{node=\"{node}\"}} {n}");
        }
        for (name, map) in [
            ("pushes", &m.pushes),
            ("acks", &m.acks),
            ("nacks", &m.nacks),
        ] {
            let _ = writeln!(out, "# TYPE trellis_xds_{name}_total counter");
            for (t, n) in map {
                let _ = writeln!(out, "trellis_xds_{name}_total{{type=\"{t}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# TYPE trellis_xds_stale_requests_total counter");
        let _ = writeln!(out, "trellis_xds_stale_requests_total {}", m.stale);
        let _ = writeln!(
            out,
            "# TYPE trellis_xds_unknown_type_requests_total counter"
        );
        let _ = writeln!(
            out,
            "trellis_xds_unknown_type_requests_total {}",
            m.unknown_type
        );
        let _ = writeln!(out, "# TYPE trellis_xds_refused_streams_total counter");
        for (reason, n) in &m.refused {
            let _ = writeln!(
                out,
                "trellis_xds_refused_streams_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE trellis_xds_change_to_ack_seconds histogram");
        m.push_to_ack
            .render("trellis_xds_change_to_ack_seconds", &mut out);
        let _ = writeln!(out, "# TYPE trellis_xds_snapshot_build_seconds histogram");
        m.build
            .render("trellis_xds_snapshot_build_seconds", &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_type_has_a_label_and_a_slot_in_the_stream_view() {
        let m = Metrics::default();
        m.stream_opened(1, "mesh/m/virtualNode/n", "sotw");
        for t in super::super::snapshot::PUSH_ORDER {
            assert_ne!(short(t), "other", "{t}");
            m.pushed(1, t, "v1");
        }
        let view = m.debug_view();
        let names: Vec<&str> = view[&1].types.keys().copied().collect();
        assert_eq!(
            names.len(),
            super::super::snapshot::PUSH_ORDER.len(),
            "{names:?}"
        );
        assert!(
            view[&1]
                .types
                .values()
                .all(|v| v.sent_version.as_deref() == Some("v1"))
        );
    }
}
