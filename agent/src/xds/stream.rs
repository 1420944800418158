//! One Envoy stream: what every stream shares (`Session`: identity, connection quota, snapshot
//! lookup, metrics), and the SotW request rules (stale nonces ignored, NACKs never answered with the
//! same version, named vs wildcard subscriptions) with pushes in make-before-break order (a cluster
//! a push drops stays until what used it is ACKed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::snapshot::{
    CLUSTER, ENDPOINT, PUSH_ORDER, Packed, Snapshot, TypeSnapshot, is_wildcard_type,
};
use super::{Ads, Published, Slot};
use trellis_model::{ProxyIdentity, State};
use trellis_translate as translate;

/// Responses a stream may have queued before it waits for Envoy to read (HTTP/2 flow control).
const STREAM_QUEUE: usize = 8;

#[derive(Debug)]
pub struct AdsService(pub(super) Arc<Ads>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let ads = self.0.clone();
        let inbound = request.into_inner();
        Ok(Response::new(spawn_stream(
            &self.0,
            "sotw",
            move |id, tx| async move { run_stream(&ads, id, inbound, &tx).await },
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let ads = self.0.clone();
        let inbound = request.into_inner();
        Ok(Response::new(spawn_stream(
            &self.0,
            "delta",
            move |id, tx| async move { super::delta::run_stream(&ads, id, inbound, &tx).await },
        )))
    }
}

/// Runs one stream in its own task and span; a refusal reaches Envoy as the stream's status.
fn spawn_stream<R, F>(
    ads: &Ads,
    variant: &'static str,
    run: impl FnOnce(u64, mpsc::Sender<Result<R, Status>>) -> F,
) -> ReceiverStream<Result<R, Status>>
where
    R: Send + 'static,
    F: Future<Output = Result<(), Status>> + Send + 'static,
{
    let id = ads.next_stream.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let stream = run(id, tx.clone());
    tokio::spawn(
        async move {
            if let Err(status) = stream.await {
                warn!(code = ?status.code(), message = status.message(), "stream refused");
                // The stream may already be gone; nothing else to tell.
                let _ = tx.send(Err(status)).await;
            }
            debug!("stream closed");
        }
        .instrument(info_span!(
            "ads_stream",
            stream = id,
            variant,
            node = tracing::field::Empty
        )),
    );
    ReceiverStream::new(rx)
}

/// What every stream holds while open, whatever its protocol variant: the proxy's identity and
/// connection slot, and the snapshot it serves. Dropping it gives the slot back.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) who: ProxyIdentity,
    who_text: String,
    pub(super) snap: Arc<Snapshot>,
    pub(super) published: watch::Receiver<Published>,
    metrics: Arc<super::Metrics>,
    _slot: Slot,
}

impl Session {
    /// Checks the first request's node, takes a connection slot and builds the first snapshot.
    pub(super) fn open(
        ads: &Arc<Ads>,
        id: u64,
        variant: &'static str,
        node: Option<&Node>,
    ) -> Result<Self, Status> {
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first request on a stream must carry node")
        })?;
        let who = ProxyIdentity::parse(&node.id)
            .map_err(|e| Status::invalid_argument(format!("node.id: {e}")))?;
        tracing::Span::current().record("node", node.id.as_str());
        let slot = ads.admit(&who).ok_or_else(|| {
            ads.metrics.refused("connection_quota");
            Status::resource_exhausted(format!(
                "{who} already has {} Envoy connections, the limit per virtual node or gateway \
                 (raise it with --max-connections-per-proxy)",
                ads.max_per_proxy
            ))
        })?;
        let mut published = ads.published.clone();
        published.mark_unchanged();
        let state = ads.committed.borrow().clone();
        let snap = build(ads, &state, &who).map_err(|e| {
            ads.metrics.refused("unknown_proxy");
            unknown_proxy(e)
        })?;
        info!(node = %who, "envoy connected");
        let who_text = who.to_string();
        ads.metrics.stream_opened(id, &who_text, variant);
        Ok(Session {
            id,
            who,
            who_text,
            snap,
            published,
            metrics: ads.metrics.clone(),
            _slot: slot,
        })
    }

    /// After `published` changed: serves the newest publication's snapshot and returns when its
    /// change was committed, or `None` if it is older than what this stream already serves.
    pub(super) fn refresh(&mut self, ads: &Ads) -> Option<Instant> {
        let p = self.published.borrow_and_update().clone();
        if p.state.generation < self.snap.generation {
            // Published before the state this stream started from; a newer one follows.
            return None;
        }
        self.snap = match build(ads, &p.state, &self.who) {
            Ok(s) => s,
            Err(e) => {
                // The proxy's resource went away: it keeps its stream but gets nothing.
                warn!(node = %self.who, error = %e, "proxy no longer exists; sending empty configuration");
                Arc::new(Snapshot::from_resources(
                    p.state.generation,
                    Default::default(),
                ))
            }
        };
        Some(p.changed_at)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.metrics.stream_closed(self.id, &self.who_text);
        info!(node = %self.who_text, "envoy disconnected");
    }
}

/// What one stream has sent and heard back for one type.
#[derive(Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    /// When the change behind the last push was committed (none for the first push).
    sent_change: Option<Instant>,
    /// The last response is not answered yet.
    awaiting: bool,
    /// The last response was NACKed: the client still runs this type's previous resources.
    nacked: bool,
}

struct Stream<'a> {
    ads: &'a Ads,
    id: u64,
    next_nonce: u64,
    types: HashMap<String, TypeState>,
    tx: &'a mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// The commit time of the publication being served, while it is new to this stream.
    change: Option<Instant>,
    /// Clusters the client had that the newest snapshot drops: a state-of-the-world CDS push
    /// would remove them at once, so they stay in it until every listener, route and endpoint
    /// push that stops using them is ACKed (make before break).
    kept_clusters: BTreeMap<String, Any>,
}

async fn run_stream(
    ads: &Arc<Ads>,
    id: u64,
    inbound: Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let stream = Stream {
        ads,
        id,
        next_nonce: 0,
        types: HashMap::new(),
        tx,
        change: None,
        kept_clusters: BTreeMap::new(),
    };
    serve(ads, id, inbound, stream).await
}

/// One protocol's side of a stream (SotW here, delta in `delta.rs`), which [`drive`] feeds.
pub(super) trait Protocol {
    type Request;
    /// "sotw" or "delta", for logs and metrics.
    const NAME: &'static str;
    /// The node a request names (the first one identifies the proxy).
    fn node(req: &Self::Request) -> Option<&Node>;
    async fn on_request(&mut self, req: Self::Request, snap: &Snapshot) -> Result<(), Status>;
    /// After an input change committed at `changed_at`: `before` is what was served until now.
    async fn on_change(
        &mut self,
        changed_at: Instant,
        before: &Snapshot,
        snap: &Snapshot,
    ) -> Result<(), Status>;
}

/// Opens the session on the first request, serves it, then each request and each publication,
/// until Envoy or the agent ends the stream.
pub(super) async fn serve<P: Protocol>(
    ads: &Arc<Ads>,
    id: u64,
    mut inbound: Streaming<P::Request>,
    mut stream: P,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let mut session = Session::open(ads, id, P::NAME, P::node(&first))?;
    stream.on_request(first, &session.snap).await?;
    loop {
        tokio::select! {
            req = inbound.message() => match req {
                Ok(Some(req)) => stream.on_request(req, &session.snap).await?,
                Ok(None) => break,
                Err(status) => {
                    debug!(message = status.message(), "stream ended by envoy");
                    break;
                }
            },
            changed = session.published.changed() => {
                if changed.is_err() {
                    break;
                }
                let before = session.snap.clone();
                if let Some(changed_at) = session.refresh(ads) {
                    stream.on_change(changed_at, &before, &session.snap).await?;
                }
            }
            () = ads.cancel.cancelled() => break,
        }
    }
    Ok(())
}

impl Protocol for Stream<'_> {
    type Request = DiscoveryRequest;
    const NAME: &'static str = "sotw";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn on_request(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Result<(), Status> {
        Stream::on_request(self, req, snap).await
    }

    async fn on_change(
        &mut self,
        changed_at: Instant,
        before: &Snapshot,
        snap: &Snapshot,
    ) -> Result<(), Status> {
        self.change = Some(changed_at);
        self.push_changes(before, snap).await
    }
}

pub(super) fn build(
    ads: &Ads,
    state: &State,
    who: &ProxyIdentity,
) -> Result<Arc<Snapshot>, translate::Error> {
    let start = Instant::now();
    let (snap, built) = ads.snapshots.get(state, who)?;
    if built {
        ads.metrics.built(start.elapsed());
    }
    Ok(snap)
}

pub(super) fn unknown_proxy(e: translate::Error) -> Status {
    Status::not_found(format!(
        "{e}: create it with the App Mesh API before starting its Envoy, or fix APPMESH_RESOURCE_ARN"
    ))
}

impl Stream<'_> {
    async fn on_request(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Result<(), Status> {
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "type_url is required on an aggregated stream",
            ));
        }
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && Some(&req.response_nonce) != ts.sent_nonce.as_ref() {
            debug!(type_url = %req.type_url, nonce = %req.response_nonce, "stale request ignored");
            self.ads.metrics.stale();
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let names_changed = names != ts.names;
        ts.names = names;
        ts.awaiting = false;
        ts.nacked = req.error_detail.is_some();
        if let Some(err) = &req.error_detail {
            // A NACK: remember it and wait for new input; resending the same version would loop.
            warn!(
                type_url = %req.type_url,
                nonce = %req.response_nonce,
                rejected = ?ts.sent_version,
                message = %err.message,
                "envoy rejected configuration"
            );
            self.ads
                .metrics
                .nacked(self.id, &req.type_url, &err.message);
            return Ok(());
        }
        let current = snap.get(&req.type_url).map(|t| t.version.clone());
        if ts.sent_nonce.is_some() {
            debug!(type_url = %req.type_url, version = %req.version_info, "ack");
            let since = ts.sent_change.take().map(|t| t.elapsed());
            self.ads
                .metrics
                .acked(self.id, &req.type_url, &req.version_info, since);
            if names_changed {
                self.send(&req.type_url, snap).await?;
            }
            return self.release_kept_clusters(snap).await;
        }
        // The first request for this type on this stream.
        if !req.version_info.is_empty()
            && Some(&req.version_info) == current.as_ref()
            && !names_changed_from_empty(&req)
        {
            // A reconnecting Envoy that already has exactly this: nothing to resend.
            ts.sent_version = current;
            return Ok(());
        }
        self.send(&req.type_url, snap).await
    }

    /// After an input change: send every subscribed type whose version moved, in push order.
    async fn push_changes(&mut self, before: &Snapshot, snap: &Snapshot) -> Result<(), Status> {
        if self.types.contains_key(CLUSTER) {
            let (old, new) = (before.get(CLUSTER), snap.get(CLUSTER));
            for (name, any) in old.iter().flat_map(|t| &t.resources) {
                if !new.is_some_and(|t| t.resources.contains_key(name)) {
                    self.kept_clusters
                        .entry(name.clone())
                        .or_insert_with(|| any.any());
                }
            }
            // Back in the snapshot, or nothing left that could still use them.
            self.kept_clusters
                .retain(|n, _| !new.is_some_and(|t| t.resources.contains_key(n)));
            let later = PUSH_ORDER[1..].iter().any(|t| self.moved(t, snap));
            if !later && self.settled() {
                self.kept_clusters.clear();
            }
        }
        for type_url in PUSH_ORDER {
            if self.moved(type_url, snap) {
                self.send(type_url, snap).await?;
            }
        }
        self.change = None;
        self.release_kept_clusters(snap).await
    }

    /// Whether the type is subscribed and its version differs from the one last sent.
    fn moved(&self, type_url: &str, snap: &Snapshot) -> bool {
        let Some(ts) = self.types.get(type_url) else {
            return false;
        };
        ts.sent_version.as_deref() != Some(&self.version(type_url, snap))
    }

    /// No push of what uses clusters (endpoints, listeners, routes) is unanswered or rejected.
    fn settled(&self) -> bool {
        self.types
            .iter()
            .all(|(t, ts)| t == CLUSTER || (!ts.awaiting && !ts.nacked))
    }

    /// The version of what `send` sends for the type: the snapshot's, or for clusters with kept
    /// ones, a version of that union.
    fn version(&self, type_url: &str, snap: &Snapshot) -> String {
        let base = snap.get(type_url).map(|t| t.version.as_str()).unwrap_or("");
        if type_url != CLUSTER || self.kept_clusters.is_empty() {
            return base.to_string();
        }
        let mut h = Sha256::new();
        for (name, any) in &self.kept_clusters {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(&any.value);
        }
        let digest = h.finalize();
        let kept: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("{base}+{kept}")
    }

    /// Once everything that stopped using the kept clusters is ACKed, sends the exact clusters.
    async fn release_kept_clusters(&mut self, snap: &Snapshot) -> Result<(), Status> {
        if self.kept_clusters.is_empty() || !self.settled() {
            return Ok(());
        }
        self.kept_clusters.clear();
        if self.moved(CLUSTER, snap) {
            self.send(CLUSTER, snap).await?;
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str, snap: &Snapshot) -> Result<(), Status> {
        let empty = TypeSnapshot::default();
        let t = snap.get(type_url).unwrap_or(&empty);
        let version = self.version(type_url, snap);
        let kept = &self.kept_clusters;
        let ts = self.types.entry(type_url.to_string()).or_default();
        let resources = if ts.names.is_empty() && is_wildcard_type(type_url) {
            let mut all: Vec<Any> = t.resources.values().map(Packed::any).collect();
            if type_url == CLUSTER {
                all.extend(kept.values().cloned());
            }
            all
        } else {
            ts.names
                .iter()
                .filter_map(|n| match t.resources.get(n) {
                    Some(r) => Some(r.any()),
                    // Endpoints asked for by name that we do not manage (the App Mesh Envoy image's
                    // `local_cluster`) get an empty assignment, so Envoy does not wait on them.
                    None if type_url == ENDPOINT && !t.pending.contains(n) => {
                        Some(pack_any(ClusterLoadAssignment {
                            cluster_name: n.clone(),
                            ..Default::default()
                        }))
                    }
                    None => None,
                })
                .collect()
        };
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        ts.sent_version = Some(version.clone());
        ts.sent_nonce = Some(nonce.clone());
        ts.sent_change = self.change;
        ts.awaiting = true;
        let resp = DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        debug!(type_url, version = %resp.version_info, count = resp.resources.len(), kept = kept.len(), "push");
        self.ads
            .metrics
            .pushed(self.id, type_url, &resp.version_info);
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Status::cancelled("envoy went away"))
    }
}

/// Envoy names no resources on a first wildcard request; a named first request always needs an
/// answer for the names it lists.
fn names_changed_from_empty(req: &DiscoveryRequest) -> bool {
    !req.resource_names.is_empty() && !is_wildcard_type(&req.type_url)
}
