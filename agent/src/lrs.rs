//! Load reports: Envoy's LoadReportingService (`envoy.service.load_stats.v3`) on the agent's xDS
//! socket (and TCP address), beside ADS but apart from its protocol machines.
//!
//! Envoy's bootstrap names the agent's xDS cluster in `cluster_manager.load_stats_config`; Envoy
//! opens one stream, the agent answers once with "every cluster, every interval", and Envoy then
//! sends, per cluster, the requests it issued, completed, failed (5xx, gRPC errors, resets) and
//! has in flight since its last report. Each cluster is turned into an edge — caller proxy →
//! virtual service → target virtual node — by what the caller's own translated configuration
//! says the cluster stands for ([`trellis_explain::cluster_uses`]); a node's ingress cluster is
//! its inbound traffic. Totals are counters since the agent started, on `/metrics`
//! (`trellis_edge_*`) and as JSON (`/trellis/v1/load`), with rates over the last few reports for
//! the topology page. Envoy's load reports carry no latency (only ORCA metrics a backend sends
//! back): latency stays in Envoy's own `upstream_rq_time` histograms.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::{
    LoadReportingService, LoadReportingServiceServer,
};
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};
use trellis_explain::{ClusterTarget, ClusterUse};
use trellis_model::{ProxyIdentity, ProxyKind};

use crate::xds::Published;

/// How often Envoy reports unless told otherwise (`--load-report-interval-ms`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Rates are taken over at least this long (and at least three reports).
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Samples kept per edge for rates.
const MAX_SAMPLES: usize = 64;

/// One edge of the mesh as load reports see it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeKey {
    pub mesh: String,
    /// `virtualNode/NAME` or `virtualGateway/NAME`.
    pub caller: String,
    /// The virtual service(s) the caller reaches the target through (comma-separated when
    /// several share one cluster: Envoy counts per cluster); `(external)` outside the mesh.
    pub service: String,
    /// The target virtual node; `(outside the mesh)` for pass-through.
    pub target: String,
}

#[derive(Debug, Default)]
struct Counts {
    issued: u64,
    success: u64,
    errors: u64,
    dropped: u64,
    /// In flight at each reporting stream's last report.
    in_progress: HashMap<u64, u64>,
    /// (time, issued, errors) after each report, for rates.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Counts {
    fn rates(&self, now: Instant) -> (f64, f64) {
        let Some(&(t1, i1, e1)) = self.samples.back() else {
            return (0.0, 0.0);
        };
        // The newest sample at least a window before now, else the oldest.
        let start = self
            .samples
            .iter()
            .rev()
            .find(|(t, _, _)| now.duration_since(*t) >= RATE_WINDOW)
            .or(self.samples.front())
            .copied();
        let Some((t0, i0, e0)) = start else {
            return (0.0, 0.0);
        };
        // Up to now, so an edge whose caller stopped reporting decays to zero.
        let span = now
            .duration_since(t0)
            .max(t1.duration_since(t0))
            .as_secs_f64();
        if span <= 0.0 {
            return (0.0, 0.0);
        }
        ((i1 - i0) as f64 / span, (e1 - e0) as f64 / span)
    }
}

/// A metric family: name suffix, type, help, and its figure.
type Series = (&'static str, &'static str, &'static str, fn(&Counts) -> u64);

#[derive(Debug, Default)]
struct Table {
    edges: BTreeMap<EdgeKey, Counts>,
    /// (mesh, node): requests a node's Envoy passed to its own app.
    inbound: BTreeMap<(String, String), Counts>,
}

/// An edge's figures, as `/trellis/v1/load` and the topology page show them.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeView {
    #[serde(flatten)]
    pub key: EdgeKey,
    pub requests: u64,
    pub success: u64,
    pub errors: u64,
    pub dropped: u64,
    pub in_progress: u64,
    /// Requests per second over the last reports.
    pub rps: f64,
    pub errors_per_second: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InboundView {
    pub mesh: String,
    pub node: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub errors_per_second: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadView {
    pub interval_ms: u128,
    pub edges: Vec<EdgeView>,
    pub inbound: Vec<InboundView>,
}

/// The load reporting service and what it has heard.
#[derive(Debug)]
pub struct Lrs {
    interval: Duration,
    published: watch::Receiver<Published>,
    /// Per proxy with a stream: its clusters' meaning at a state generation, and its streams.
    uses: Mutex<HashMap<ProxyIdentity, Uses>>,
    table: Mutex<Table>,
    streams: AtomicU64,
    reports: AtomicU64,
    unknown_clusters: AtomicU64,
    next_stream: AtomicU64,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Uses {
    generation: u64,
    clusters: Arc<BTreeMap<String, ClusterUse>>,
    streams: usize,
}

impl Lrs {
    /// `interval` zero: streams are accepted but never asked to report.
    pub fn new(
        interval: Duration,
        published: watch::Receiver<Published>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Lrs {
            interval,
            published,
            uses: Mutex::new(HashMap::new()),
            table: Mutex::new(Table::default()),
            streams: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            unknown_clusters: AtomicU64::new(0),
            next_stream: AtomicU64::new(1),
            cancel,
        })
    }

    /// The gRPC service; each stream's node is attested by `attestor` as an ADS stream's is,
    /// so no caller can pass its reports off as another node's.
    pub fn service(
        self: &Arc<Self>,
        attestor: Arc<crate::attest::Attestor>,
    ) -> LoadReportingServiceServer<LrsService> {
        LoadReportingServiceServer::new(LrsService(self.clone(), attestor))
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// What `who`'s clusters stand for now, translated again only when the state moved.
    fn uses_of(&self, who: &ProxyIdentity) -> Arc<BTreeMap<String, ClusterUse>> {
        let published = self.published.borrow().clone();
        let generation = published.state.generation;
        if let Some(u) = self.lock_uses().get(who)
            && u.generation == generation
        {
            return u.clusters.clone();
        }
        let clusters =
            match trellis_translate::translate(&published.state, who, &published.endpoints) {
                Ok(res) => trellis_explain::cluster_uses(&published.state, who, &res),
                Err(_) => BTreeMap::new(),
            };
        let clusters = Arc::new(clusters);
        if let Some(u) = self.lock_uses().get_mut(who) {
            u.generation = generation;
            u.clusters = clusters.clone();
        }
        clusters
    }

    fn lock_uses(&self) -> std::sync::MutexGuard<'_, HashMap<ProxyIdentity, Uses>> {
        self.uses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn opened(&self, who: &ProxyIdentity) {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.lock_uses()
            .entry(who.clone())
            .or_insert_with(|| Uses {
                generation: u64::MAX,
                clusters: Arc::default(),
                streams: 0,
            })
            .streams += 1;
    }

    fn closed(&self, who: &ProxyIdentity, stream: u64) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        {
            let mut uses = self.lock_uses();
            if let Some(u) = uses.get_mut(who) {
                u.streams = u.streams.saturating_sub(1);
                if u.streams == 0 {
                    uses.remove(who);
                }
            }
        }
        let mut t = self.lock_table();
        let t = &mut *t;
        for c in t.edges.values_mut().chain(t.inbound.values_mut()) {
            c.in_progress.remove(&stream);
        }
    }

    /// Adds one report of `who`'s stream `stream`.
    pub fn report(&self, who: &ProxyIdentity, stream: u64, stats: &[ClusterStats]) {
        self.reports.fetch_add(1, Ordering::Relaxed);
        let uses = self.uses_of(who);
        let caller = caller_of(who);
        let now = Instant::now();
        // Several clusters may make one edge (a node's two ports): summed per report first.
        let mut edges: BTreeMap<EdgeKey, Report> = BTreeMap::new();
        let mut inbound: BTreeMap<(String, String), Report> = BTreeMap::new();
        for cs in stats {
            let Some(u) = uses.get(&cs.cluster_name) else {
                self.unknown_clusters.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let r = Report::of(cs);
            match &u.target {
                ClusterTarget::VirtualNode { name, .. } => {
                    let service = if u.services.is_empty() {
                        "(unknown)".to_string()
                    } else {
                        u.services.join(",")
                    };
                    let key = EdgeKey {
                        mesh: who.mesh.clone(),
                        caller: caller.clone(),
                        service,
                        target: name.clone(),
                    };
                    edges.entry(key).or_default().add(&r);
                }
                ClusterTarget::External => {
                    let key = EdgeKey {
                        mesh: who.mesh.clone(),
                        caller: caller.clone(),
                        service: "(external)".into(),
                        target: "(outside the mesh)".into(),
                    };
                    edges.entry(key).or_default().add(&r);
                }
                ClusterTarget::LocalApp { .. } => {
                    inbound
                        .entry((who.mesh.clone(), who.name.clone()))
                        .or_default()
                        .add(&r);
                }
                ClusterTarget::Other => {}
            }
        }
        let mut t = self.lock_table();
        for (key, r) in edges {
            t.edges.entry(key).or_default().apply(&r, stream, now);
        }
        for (key, r) in inbound {
            t.inbound.entry(key).or_default().apply(&r, stream, now);
        }
    }

    /// Every edge and node's inbound traffic, with rates as of now.
    pub fn view(&self) -> LoadView {
        let now = Instant::now();
        let t = self.lock_table();
        LoadView {
            interval_ms: self.interval.as_millis(),
            edges: t
                .edges
                .iter()
                .map(|(k, c)| {
                    let (rps, eps) = c.rates(now);
                    EdgeView {
                        key: k.clone(),
                        requests: c.issued,
                        success: c.success,
                        errors: c.errors,
                        dropped: c.dropped,
                        in_progress: c.in_progress.values().sum(),
                        rps,
                        errors_per_second: eps,
                    }
                })
                .collect(),
            inbound: t
                .inbound
                .iter()
                .map(|((mesh, node), c)| {
                    let (rps, eps) = c.rates(now);
                    InboundView {
                        mesh: mesh.clone(),
                        node: node.clone(),
                        requests: c.issued,
                        errors: c.errors,
                        rps,
                        errors_per_second: eps,
                    }
                })
                .collect(),
        }
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP trellis_lrs_streams Envoy load reporting streams open."
        );
        let _ = writeln!(out, "# TYPE trellis_lrs_streams gauge");
        let _ = writeln!(
            out,
            "trellis_lrs_streams {}",
            self.streams.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE trellis_lrs_reports_total counter");
        let _ = writeln!(
            out,
            "trellis_lrs_reports_total {}",
            self.reports.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP trellis_lrs_unknown_clusters_total Cluster reports for clusters the caller's configuration does not hold (yet)."
        );
        let _ = writeln!(out, "# TYPE trellis_lrs_unknown_clusters_total counter");
        let _ = writeln!(
            out,
            "trellis_lrs_unknown_clusters_total {}",
            self.unknown_clusters.load(Ordering::Relaxed)
        );
        let t = self.lock_table();
        let series: [Series; 5] = [
            (
                "requests_total",
                "counter",
                "Requests the caller's Envoy issued on the edge (every try), from its load reports.",
                |c| c.issued,
            ),
            (
                "success_total",
                "counter",
                "Requests completed without a 5xx, gRPC error or reset.",
                |c| c.success,
            ),
            (
                "errors_total",
                "counter",
                "Requests that failed: 5xx, gRPC errors, connection failures and resets.",
                |c| c.errors,
            ),
            (
                "dropped_total",
                "counter",
                "Requests Envoy dropped before sending them (overload, circuit breakers).",
                |c| c.dropped,
            ),
            (
                "in_progress",
                "gauge",
                "Requests in flight at the callers' last reports.",
                |c| c.in_progress.values().sum(),
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP trellis_edge_{name} {help}");
            let _ = writeln!(out, "# TYPE trellis_edge_{name} {kind}");
            for (k, c) in &t.edges {
                let _ = writeln!(
                    out,
                    "trellis_edge_{name}{{mesh=\"{}\",caller=\"{}\",service=\"{}\",target=\"{}\"}} {}",
                    label(&k.mesh),
                    label(&k.caller),
                    label(&k.service),
                    label(&k.target),
                    get(c)
                );
            }
        }
        for (name, get) in [
            (
                "requests_total",
                (|c: &Counts| c.issued) as fn(&Counts) -> u64,
            ),
            ("errors_total", |c: &Counts| c.errors),
        ] {
            let _ = writeln!(
                out,
                "# HELP trellis_node_inbound_{name} Requests a virtual node's Envoy passed to its own app, from its load reports."
            );
            let _ = writeln!(out, "# TYPE trellis_node_inbound_{name} counter");
            for ((mesh, node), c) in &t.inbound {
                let _ = writeln!(
                    out,
                    "trellis_node_inbound_{name}{{mesh=\"{}\",node=\"{}\"}} {}",
                    label(mesh),
                    label(node),
                    get(c)
                );
            }
        }
        out
    }
}

/// One cluster's figures in one report.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    issued: u64,
    success: u64,
    errors: u64,
    in_progress: u64,
    dropped: u64,
    /// What the report covers (Envoy's measured interval).
    span: Duration,
}

impl Report {
    fn of(cs: &ClusterStats) -> Self {
        let mut r = Report {
            dropped: cs.total_dropped_requests,
            span: cs
                .load_report_interval
                .as_ref()
                .map(|d| {
                    Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
                        + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
                })
                .unwrap_or_default(),
            ..Report::default()
        };
        for l in &cs.upstream_locality_stats {
            r.issued += l.total_issued_requests;
            r.success += l.total_successful_requests;
            r.errors += l.total_error_requests;
            r.in_progress += l.total_requests_in_progress;
        }
        r
    }

    fn add(&mut self, o: &Report) {
        self.issued += o.issued;
        self.success += o.success;
        self.errors += o.errors;
        self.in_progress += o.in_progress;
        self.dropped += o.dropped;
        self.span = self.span.max(o.span);
    }
}

impl Counts {
    fn apply(&mut self, r: &Report, stream: u64, now: Instant) {
        if self.samples.is_empty() {
            // The first report covers the interval before it: start the rate there at zero.
            let start = now.checked_sub(r.span).unwrap_or(now);
            self.samples.push_back((start, self.issued, self.errors));
        }
        self.issued += r.issued;
        self.success += r.success;
        self.errors += r.errors;
        self.dropped += r.dropped;
        self.in_progress.insert(stream, r.in_progress);
        self.samples.push_back((now, self.issued, self.errors));
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn caller_of(who: &ProxyIdentity) -> String {
    match who.kind {
        ProxyKind::VirtualNode => format!("virtualNode/{}", who.name),
        ProxyKind::VirtualGateway => format!("virtualGateway/{}", who.name),
    }
}

/// The gRPC entry: one task per stream, stopped by the agent's cancellation token.
#[derive(Debug)]
pub struct LrsService(Arc<Lrs>, Arc<crate::attest::Attestor>);

#[tonic::async_trait]
impl LoadReportingService for LrsService {
    type StreamLoadStatsStream = ReceiverStream<Result<LoadStatsResponse, Status>>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let lrs = self.0.clone();
        let peer = crate::attest::Peer::of(request.extensions());
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first report"))?;
        let node = first
            .node
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("the first load report must carry node"))?;
        let who =
            ProxyIdentity::parse(&node.id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Err(refusal) = self.1.verify(&peer, &who).await {
            warn!(node = %who, peer = ?peer, reason = refusal.reason(), error = %refusal, "load reports refused: the caller may not claim this node");
            return Err(Status::permission_denied(refusal.to_string()));
        }
        let id = lrs.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1);
        if !lrs.interval.is_zero() {
            let interval = envoy_types::pb::google::protobuf::Duration {
                seconds: i64::try_from(lrs.interval.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(lrs.interval.subsec_nanos()).unwrap_or(0),
            };
            // Every cluster, every interval (Envoy advertises envoy.lrs.supports_send_all_clusters).
            let ask = LoadStatsResponse {
                send_all_clusters: true,
                load_reporting_interval: Some(interval),
                ..Default::default()
            };
            tx.send(Ok(ask))
                .await
                .map_err(|_| Status::cancelled("the stream closed"))?;
        }
        lrs.opened(&who);
        lrs.report(&who, id, &first.cluster_stats);
        let span = info_span!("lrs", stream = id, node = %who);
        tokio::spawn(
            async move {
                debug!("load report stream open");
                loop {
                    tokio::select! {
                        () = lrs.cancel.cancelled() => break,
                        msg = inbound.message() => match msg {
                            Ok(Some(req)) => lrs.report(&who, id, &req.cluster_stats),
                            Ok(None) => break,
                            Err(status) => {
                                // Also how an Envoy that exits ends its stream: not worth a warning.
                                debug!(code = ?status.code(), message = status.message(), "load report stream failed");
                                break;
                            }
                        },
                    }
                }
                lrs.closed(&who, id);
                // Held until here: the response stream stays open as long as the reports come.
                drop(tx);
                debug!("load report stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests;
