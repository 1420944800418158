//! The state-of-the-world ADS machine: stale nonces ignored, NACKs never answered with the same
//! version, named vs wildcard subscriptions, and make before break: a cluster a push drops stays
//! until what used it is ACKed (also across a reconnect or an agent restart, from the sets of
//! [`Served`](super::Served)); listeners and routes wait until the clusters they may use are warm
//! ([`Warmth`]); endpoints Envoy has are never replaced by an empty assignment that only says a
//! cluster is on its way out or that Cloud Map has not answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::Ads;
use super::served::Clusters;
use super::service::{Outbox, frame};
use super::session::{Holds, Protocol, Warmth, serve};
use super::snapshot::{
    CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, Packed, ROUTE, SECRET, Snapshot, TypeSnapshot,
    is_served_type, is_wildcard_type,
};

/// The types whose resources point at clusters: they wait for the clusters to be warm.
const USERS: [&str; 2] = [LISTENER, ROUTE];

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
    /// The last full response was NACKed: the client still runs this type's previous resources.
    nacked: bool,
    /// The last response carried only names a NACK added: its ACK leaves `nacked` as it is.
    partial: bool,
    /// A response is owed (new names) but waits for the clusters to be warm.
    due: bool,
}

impl TypeState {
    /// The client watches no resource of this (named) type any more: it takes whatever is on
    /// its way without a word (Envoy sends no request for a type it does not watch), so nothing
    /// is awaited, owed or still rejected.
    fn unwatch(&mut self) {
        self.names.clear();
        self.awaiting = false;
        self.nacked = false;
        self.partial = false;
        self.due = false;
    }
}

struct Stream<'a> {
    ads: &'a Ads,
    id: u64,
    next_nonce: u64,
    types: HashMap<String, TypeState>,
    tx: &'a Outbox,
    /// The commit time of the publication being served, while it is new to this stream.
    change: Option<Instant>,
    /// Clusters the client has that the newest snapshot drops: a state-of-the-world CDS push
    /// would remove them at once, so they stay in it until every listener, route and endpoint
    /// push that stops using them is ACKed (make before break).
    kept_clusters: BTreeMap<String, Any>,
    /// The kept clusters are what the client held when it connected: they also wait for this
    /// stream's listeners (the client's listeners are older than the stream).
    kept_from_before: bool,
    warmth: Warmth,
    /// The clusters of the last CDS response, and of the last one the client ACKed (or held
    /// when it connected): sets shared with every stream sent the same ones.
    cds_sent: Option<Clusters>,
    cds_acked: Option<Clusters>,
    /// Endpoint names the client has an assignment for: sent on this stream, or held when it
    /// connected. Those are never replaced by an empty assignment that is not an answer.
    eds_held: BTreeSet<String>,
}

/// What a SotW client has, as its stream knows it.
struct SotwHolds<'s> {
    clusters: Option<&'s Clusters>,
    endpoints: &'s BTreeSet<String>,
    /// The last endpoint response is answered (its assignments are in).
    endpoints_settled: bool,
}

impl Holds for SotwHolds<'_> {
    fn has_cluster(&self, name: &str) -> bool {
        self.clusters.is_some_and(|c| c.contains_key(name))
    }

    fn has_endpoints(&self, name: &str) -> bool {
        self.endpoints_settled && self.endpoints.contains(name)
    }
}

pub(super) async fn run_stream(
    ads: &Arc<Ads>,
    id: u64,
    peer: crate::attest::Peer,
    inbound: Streaming<DiscoveryRequest>,
    tx: &Outbox,
) -> Result<(), Status> {
    let stream = Stream {
        ads,
        id,
        next_nonce: 0,
        types: HashMap::new(),
        tx,
        change: None,
        kept_clusters: BTreeMap::new(),
        kept_from_before: false,
        warmth: Warmth::default(),
        cds_sent: None,
        cds_acked: None,
        eds_held: BTreeSet::new(),
    };
    serve(ads, id, peer, inbound, stream).await
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

    fn wake_at(&self) -> Option<Instant> {
        self.warmth.wake_at()
    }

    async fn on_wake(&mut self, snap: &Snapshot) -> Result<(), Status> {
        self.settle(snap).await
    }
}

impl Stream<'_> {
    async fn on_request(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Result<(), Status> {
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "type_url is required on an aggregated stream",
            ));
        }
        if !is_served_type(&req.type_url) {
            debug!(type_url = %req.type_url, "request for a type Trellis does not serve ignored");
            self.ads.metrics.unknown_type();
            return Ok(());
        }
        let type_url = req.type_url.clone();
        if type_url == SECRET {
            super::session::secrets_withheld(snap, req.resource_names.iter());
        }
        let first = !self.types.contains_key(&type_url);
        let ts = self.types.entry(type_url.clone()).or_default();
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let unwatched = names.is_empty() && !is_wildcard_type(&type_url);
        // A nonce makes a request stale only once something was sent on this stream: a first
        // request may carry one left from an earlier stream.
        if !req.response_nonce.is_empty()
            && ts.sent_nonce.is_some()
            && Some(&req.response_nonce) != ts.sent_nonce.as_ref()
        {
            debug!(type_url = %req.type_url, nonce = %req.response_nonce, "stale request ignored");
            self.ads.metrics.stale();
            if unwatched && !ts.names.is_empty() {
                // Not an answer, but the last word on this type: Envoy watches nothing of it
                // any more and will not answer what is on its way.
                ts.unwatch();
                return self.settle(snap).await;
            }
            return Ok(());
        }
        let added: Vec<String> = names.difference(&ts.names).cloned().collect();
        let names_changed = names != ts.names;
        ts.names = names;
        if unwatched {
            ts.unwatch();
            return self.settle(snap).await;
        }
        ts.awaiting = false;
        if let Some(err) = &req.error_detail {
            // A NACK: remember it and wait for new input; resending the same version would loop.
            ts.nacked = true;
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
            if type_url == CLUSTER || type_url == ENDPOINT {
                // What it rejected will not warm through us: nothing to wait for.
                let holds = holds(&self.types, self.cds_acked.as_ref(), &self.eds_held);
                self.warmth.give_up(snap, &holds);
            }
            if !first && !added.is_empty() {
                // It asks for new names too (a listener it took since): answer those, or that
                // listener waits for them.
                self.send_names(&type_url, &added, snap).await?;
            }
            return Ok(());
        }
        if ts.sent_nonce.is_some() {
            debug!(type_url = %req.type_url, version = %req.version_info, "ack");
            if !ts.partial {
                ts.nacked = false;
            }
            let since = ts.sent_change.take().map(|t| t.elapsed());
            if type_url == CLUSTER {
                self.clusters_acked(self.cds_sent.clone());
            }
            self.ads
                .metrics
                .acked(self.id, &req.type_url, &req.version_info, since);
            if names_changed {
                self.send_or_defer(&type_url, snap).await?;
            }
            return self.settle(snap).await;
        }
        self.first_request(&req, snap).await?;
        self.settle(snap).await
    }

    /// The first request for a type on this stream. One that carries a version comes from an
    /// Envoy that already has configuration (a reconnect): what it holds is kept in mind.
    async fn first_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<(), Status> {
        let type_url = req.type_url.as_str();
        let held = (!req.version_info.is_empty()).then_some(req.version_info.as_str());
        match (type_url, held) {
            (CLUSTER, Some(version)) => return self.resume_clusters(version, snap).await,
            (ENDPOINT, Some(_)) => {
                self.eds_held.extend(req.resource_names.iter().cloned());
            }
            // A starting Envoy asks for listeners once its clusters are initialised, and for
            // routes once it has listeners: it went ahead without endpoints still missing.
            (LISTENER | ROUTE, None) => {
                let holds = holds(&self.types, self.cds_acked.as_ref(), &self.eds_held);
                self.warmth.went_ahead(snap, &holds);
            }
            _ => {}
        }
        let current = self.version(type_url, snap);
        if held == Some(current.as_str()) && is_wildcard_type(type_url) {
            // A reconnecting Envoy that already has exactly this: nothing to resend.
            self.types
                .entry(type_url.to_string())
                .or_default()
                .sent_version = Some(current);
            return Ok(());
        }
        if held.is_some() {
            self.send_or_defer(type_url, snap).await
        } else {
            self.send(type_url, snap).await
        }
    }

    /// A reconnecting Envoy holds the clusters this agent sent under `version`: those the
    /// snapshot drops are kept until this stream's listeners and routes no longer use them.
    async fn resume_clusters(&mut self, version: &str, snap: &Snapshot) -> Result<(), Status> {
        let t = snap.get(CLUSTER);
        let current: BTreeSet<&String> = t.into_iter().flat_map(|t| t.resources.keys()).collect();
        match self.ads.served.get(version) {
            Some(held) => {
                for (name, any) in held.iter() {
                    if !current.contains(name) {
                        self.kept_clusters.insert(name.clone(), any.clone());
                    }
                }
                self.kept_from_before = !self.kept_clusters.is_empty();
                self.clusters_acked(Some(held));
            }
            None if version == self.version(CLUSTER, snap) => {
                let held = self.ads.served.record(version, || {
                    t.into_iter()
                        .flat_map(|t| &t.resources)
                        .map(|(n, r)| (n.clone(), r.any()))
                        .collect()
                });
                self.clusters_acked(Some(held));
            }
            None => {
                info!(
                    version,
                    "envoy holds clusters this agent has no record of; the current ones replace them"
                );
            }
        }
        let now = self.version(CLUSTER, snap);
        if now == version {
            self.types
                .entry(CLUSTER.to_string())
                .or_default()
                .sent_version = Some(now);
            return Ok(());
        }
        self.send(CLUSTER, snap).await
    }

    /// After an input change: clusters and endpoints at once (make before break), then
    /// listeners and routes once what they use is warm.
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
            let later = PUSH_ORDER[1..]
                .iter()
                .any(|t| self.moved(t, snap) || self.due(t));
            if !later && self.settled(snap) {
                self.kept_clusters.clear();
                self.kept_from_before = false;
            }
        }
        // Secrets first: a renewed certificate needs nothing else, and a new one is in before
        // what uses it.
        for type_url in [SECRET, CLUSTER, ENDPOINT] {
            if self.moved(type_url, snap) {
                self.send(type_url, snap).await?;
            }
        }
        self.settle(snap).await
    }

    /// Sends the listener and route pushes waiting for warm clusters, then lets kept clusters
    /// go once nothing can still use them.
    async fn settle(&mut self, snap: &Snapshot) -> Result<(), Status> {
        let waiting: Vec<&str> = USERS
            .into_iter()
            .filter(|t| self.moved(t, snap) || self.due(t))
            .collect();
        if waiting.is_empty() {
            self.warmth.stand_down();
        } else if self.clusters_warm(snap) {
            for type_url in waiting {
                self.send(type_url, snap).await?;
            }
        }
        if !USERS.iter().any(|t| self.moved(t, snap) || self.due(t)) {
            self.change = None;
        }
        self.release_kept_clusters(snap).await
    }

    /// Sends `type_url` now, or once the clusters are warm if it is a listener or route.
    async fn send_or_defer(&mut self, type_url: &str, snap: &Snapshot) -> Result<(), Status> {
        if USERS.contains(&type_url) && !self.clusters_warm(snap) {
            self.types.entry(type_url.to_string()).or_default().due = true;
            return Ok(());
        }
        self.send(type_url, snap).await
    }

    /// Whether listeners and routes may go: every cluster they may use is warm in Envoy (or
    /// waited on long enough). Without a CDS subscription there is nothing to wait for.
    fn clusters_warm(&mut self, snap: &Snapshot) -> bool {
        if !self.types.contains_key(CLUSTER) {
            return true;
        }
        let holds = holds(&self.types, self.cds_acked.as_ref(), &self.eds_held);
        self.warmth.ready(snap, &holds, self.ads.warming_hold)
    }

    /// The client has these clusters now: endpoints of clusters it no longer has are gone with
    /// them (one added again warms afresh, and gets its assignment again).
    fn clusters_acked(&mut self, clusters: Option<Clusters>) {
        let Some(now) = clusters else {
            return;
        };
        if let Some(before) = &self.cds_acked {
            let gone: Vec<&String> = before.keys().filter(|n| !now.contains_key(*n)).collect();
            self.warmth.forget(gone.iter().copied());
            self.eds_held.retain(|n| !gone.contains(&n));
        }
        self.cds_acked = Some(now);
    }

    /// Whether the type is subscribed and its version differs from the one last sent.
    fn moved(&self, type_url: &str, snap: &Snapshot) -> bool {
        let Some(ts) = self.types.get(type_url) else {
            return false;
        };
        if ts.names.is_empty() && !is_wildcard_type(type_url) {
            return false;
        }
        let sent = ts.sent_version.as_deref();
        if type_url != CLUSTER || self.kept_clusters.is_empty() {
            // The snapshot's version as it is: no string built per check.
            return sent != Some(snap.get(type_url).map_or("", |t| t.version.as_str()));
        }
        sent != Some(&self.version(type_url, snap))
    }

    fn due(&self, type_url: &str) -> bool {
        self.types.get(type_url).is_some_and(|ts| ts.due)
    }

    /// No push of what uses clusters (endpoints, listeners, routes) is unsent, unanswered or
    /// rejected; kept clusters from before the stream also wait for its first listeners.
    fn settled(&self, snap: &Snapshot) -> bool {
        if self.kept_from_before && !self.types.contains_key(LISTENER) {
            return false;
        }
        self.types
            .iter()
            .all(|(t, ts)| t == CLUSTER || (!ts.awaiting && !ts.nacked && !ts.due))
            && !USERS.iter().any(|t| self.moved(t, snap))
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
        if self.kept_clusters.is_empty() || !self.settled(snap) {
            return Ok(());
        }
        self.kept_clusters.clear();
        self.kept_from_before = false;
        if self.moved(CLUSTER, snap) {
            self.send(CLUSTER, snap).await?;
        }
        Ok(())
    }

    /// The assignment sent for endpoint name `name`, if any: the snapshot's, except an empty
    /// one only meaning Cloud Map has not answered, over endpoints the client has; nothing for
    /// a cluster discovery has not answered, nor for one the client has endpoints for that the
    /// snapshot no longer has (kept, or held from before the stream); an empty one for names
    /// Trellis does not manage (the App Mesh Envoy image's `local_cluster`), so Envoy does not
    /// wait on them.
    fn assignment(&self, name: &str, t: &TypeSnapshot, snap: &Snapshot) -> Option<Any> {
        match t.resources.get(name) {
            Some(_) if snap.unanswered.contains(name) && self.eds_held.contains(name) => None,
            Some(r) => Some(r.any()),
            None if t.pending.contains(name) || self.eds_held.contains(name) => None,
            None => Some(pack_any(ClusterLoadAssignment {
                cluster_name: name.to_string(),
                ..Default::default()
            })),
        }
    }

    /// The resources `send` sends for the type, by name.
    fn resources(&self, type_url: &str, snap: &Snapshot) -> Vec<(String, Any)> {
        let empty = TypeSnapshot::default();
        let t = snap.get(type_url).unwrap_or(&empty);
        let Some(ts) = self.types.get(type_url) else {
            return Vec::new();
        };
        if ts.names.is_empty() && is_wildcard_type(type_url) {
            let mut all: Vec<(String, Any)> = t
                .resources
                .iter()
                .map(|(n, r)| (n.clone(), Packed::any(r)))
                .collect();
            if type_url == CLUSTER {
                all.extend(
                    self.kept_clusters
                        .iter()
                        .map(|(n, a)| (n.clone(), a.clone())),
                );
            }
            return all;
        }
        self.named(type_url, ts.names.iter(), t, snap)
    }

    /// The resources for these names that exist (assignments by [`Stream::assignment`]).
    fn named<'n>(
        &self,
        type_url: &str,
        names: impl Iterator<Item = &'n String>,
        t: &TypeSnapshot,
        snap: &Snapshot,
    ) -> Vec<(String, Any)> {
        names
            .filter_map(|n| {
                let any = if type_url == ENDPOINT {
                    self.assignment(n, t, snap)
                } else {
                    t.resources.get(n).map(Packed::any)
                };
                Some((n.clone(), any?))
            })
            .collect()
    }

    /// Sends the type in full.
    async fn send(&mut self, type_url: &str, snap: &Snapshot) -> Result<(), Status> {
        let version = self.version(type_url, snap);
        let resources = self.resources(type_url, snap);
        if type_url == CLUSTER {
            let sent = self.ads.served.record(&version, || resources.clone());
            self.cds_sent = Some(sent);
        }
        self.respond(type_url, version, resources, false).await
    }

    /// Answers only `names` (those a NACK added), under the version last sent.
    async fn send_names(
        &mut self,
        type_url: &str,
        names: &[String],
        snap: &Snapshot,
    ) -> Result<(), Status> {
        let empty = TypeSnapshot::default();
        let t = snap.get(type_url).unwrap_or(&empty);
        let resources = self.named(type_url, names.iter(), t, snap);
        if resources.is_empty() {
            return Ok(());
        }
        let version = self
            .types
            .get(type_url)
            .and_then(|ts| ts.sent_version.clone())
            .unwrap_or_default();
        self.respond(type_url, version, resources, true).await
    }

    async fn respond(
        &mut self,
        type_url: &str,
        version: String,
        resources: Vec<(String, Any)>,
        partial: bool,
    ) -> Result<(), Status> {
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        if type_url == ENDPOINT {
            self.eds_held
                .extend(resources.iter().map(|(n, _)| n.clone()));
        }
        let ts = self.types.entry(type_url.to_string()).or_default();
        ts.sent_version = Some(version.clone());
        ts.sent_nonce = Some(nonce.clone());
        ts.sent_change = self.change;
        ts.awaiting = true;
        ts.partial = partial;
        if !partial {
            ts.due = false;
        }
        let resp = DiscoveryResponse {
            version_info: version,
            resources: resources.into_iter().map(|(_, a)| a).collect(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        debug!(type_url, version = %resp.version_info, count = resp.resources.len(), kept = self.kept_clusters.len(), partial, "push");
        self.ads
            .metrics
            .pushed(self.id, type_url, &resp.version_info);
        // Encoded here, so the stream holds only the bytes while it waits to queue them.
        let message = frame(&resp)?;
        drop(resp);
        self.tx
            .send(Ok(message))
            .await
            .map_err(|_| Status::cancelled("envoy went away"))
    }
}

/// What the client has, from the stream's fields (borrowed apart from its `Warmth`).
fn holds<'s>(
    types: &'s HashMap<String, TypeState>,
    clusters: Option<&'s Clusters>,
    endpoints: &'s BTreeSet<String>,
) -> SotwHolds<'s> {
    SotwHolds {
        clusters,
        endpoints,
        endpoints_settled: types.get(ENDPOINT).is_none_or(|ts| !ts.awaiting),
    }
}

#[cfg(test)]
mod tests;
