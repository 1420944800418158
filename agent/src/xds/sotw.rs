//! The state-of-the-world ADS machine: stale nonces ignored, NACKs never answered with the same
//! version, named vs wildcard subscriptions, and pushes in make-before-break order (a cluster a
//! push drops stays until what used it is ACKed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::Ads;
use super::session::{Protocol, serve};
use super::snapshot::{
    CLUSTER, ENDPOINT, PUSH_ORDER, Packed, Snapshot, TypeSnapshot, is_wildcard_type,
};

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

pub(super) async fn run_stream(
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
