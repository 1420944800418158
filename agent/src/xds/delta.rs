//! One Envoy stream on incremental ADS (`DeltaAggregatedResources`): per-resource versions (the
//! snapshot's content hashes), wildcard and named subscriptions, `initial_resource_versions` on
//! reconnect, and make before break: `removed_resources` only once every response that stops
//! using them is ACKed (also across a reconnect: what the client held waits for this stream's
//! listeners), listener and route updates only once the clusters they may use are warm
//! ([`Warmth`]). The SotW stream's NACK rule holds too: a rejected resource is not sent again
//! until its content changes, and it holds removals while it still exists. Identity, quota,
//! snapshot lookup and metrics are the shared `Session`'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::util::pack_any;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::Ads;
use super::service::{Outbox, frame};
use super::session::{self, Holds, Protocol, Warmth};
use super::snapshot::{
    CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SECRET, Snapshot, TypeSnapshot, is_served_type,
    is_wildcard_type,
};

/// The explicit wildcard subscription of the xDS protocol.
const WILDCARD: &str = "*";
/// Version of the empty assignment answered for endpoint names Trellis does not manage.
const UNMANAGED_VERSION: &str = "unmanaged";
/// Unanswered responses remembered per type: Envoy answers each in turn, so a few suffice, and a
/// client that never answers cannot grow the stream's memory. A forgotten one is settled by the
/// answer to any later one (answers come in order).
const MAX_PENDING: usize = 16;
/// The types whose resources point at clusters: their updates wait for the clusters to be warm.
const USERS: [&str; 2] = [LISTENER, ROUTE];

/// A response not yet ACKed or NACKed.
#[derive(Debug)]
struct Pending {
    /// The type's version in the snapshot it was cut from (`system_version_info`).
    version: String,
    /// When the change behind it was committed (none for answers to requests).
    change: Option<Instant>,
    /// The resources it carried, by name.
    names: Vec<String>,
}

/// What one stream knows of one type.
#[derive(Debug, Default)]
struct TypeState {
    /// Names subscribed to; `*` is the wildcard.
    subscribed: BTreeSet<String>,
    /// What the client holds as far as this stream knows: name → version, from what was sent and
    /// from `initial_resource_versions`. A NACKed version stays here, so only new content is sent.
    have: BTreeMap<String, String>,
    /// Subscribed names already reported as not existing.
    absent: BTreeSet<String>,
    /// Unanswered responses by nonce.
    pending: BTreeMap<u64, Pending>,
    /// Resources whose last version sent was rejected: the client runs an older one, which may
    /// use what a removal would take away. Cleared by an ACK of a newer version, and moot once
    /// the resource itself is gone.
    rejected: BTreeSet<String>,
}

/// What a type's subscription needs sent: new or changed resources, and names that are gone.
#[derive(Debug, Default)]
struct Delta {
    resources: Vec<Resource>,
    removed: Vec<String>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

struct Stream<'a> {
    ads: &'a Ads,
    id: u64,
    next_nonce: u64,
    types: HashMap<String, TypeState>,
    tx: &'a Outbox,
    /// The commit time of the publication being pushed, while it is new to this stream.
    change: Option<Instant>,
    /// Removals may be due since the last input change (or the reconnect).
    removals_due: bool,
    /// Listener or route updates may be due, waiting for warm clusters.
    updates_due: bool,
    /// A first request said what the client held (a reconnect): its listeners are older than
    /// this stream, so removals also wait until this stream has served listeners.
    resumed: bool,
    warmth: Warmth,
}

pub(super) async fn run_stream(
    ads: &Arc<Ads>,
    id: u64,
    peer: crate::attest::Peer,
    inbound: Streaming<DeltaDiscoveryRequest>,
    tx: &Outbox,
) -> Result<(), Status> {
    let stream = Stream {
        ads,
        id,
        next_nonce: 0,
        types: HashMap::new(),
        tx,
        change: None,
        removals_due: false,
        updates_due: false,
        resumed: false,
        warmth: Warmth::default(),
    };
    session::serve(ads, id, peer, inbound, stream).await
}

impl Protocol for Stream<'_> {
    type Request = DeltaDiscoveryRequest;
    const NAME: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<(), Status> {
        Stream::on_request(self, req, snap).await
    }

    async fn on_change(
        &mut self,
        changed_at: Instant,
        _before: &Snapshot,
        snap: &Snapshot,
    ) -> Result<(), Status> {
        self.change = Some(changed_at);
        self.push_changes(snap).await
    }

    fn wake_at(&self) -> Option<Instant> {
        self.warmth.wake_at()
    }

    async fn on_wake(&mut self, snap: &Snapshot) -> Result<(), Status> {
        self.flush(snap).await?;
        self.remove_when_safe(snap).await
    }
}

impl Stream<'_> {
    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<(), Status> {
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
        let type_url = req.type_url.as_str();
        if type_url == SECRET {
            session::secrets_withheld(snap, req.resource_names_subscribe.iter());
        }
        let empty = TypeSnapshot::default();
        let t = snap.get(type_url).unwrap_or(&empty);
        let first = !self.types.contains_key(type_url);
        let fresh = first && req.initial_resource_versions.is_empty();
        if first && !fresh {
            // A reconnecting Envoy says what it holds: unchanged resources are not resent, and
            // nothing it holds is removed before this stream's listeners are in.
            self.resumed = true;
            self.removals_due = true;
        }
        if fresh && USERS.contains(&type_url) {
            // A starting Envoy asks for listeners once its clusters are initialised, and for
            // routes once it has listeners: it went ahead without endpoints still missing.
            self.warmth.went_ahead(snap, &DeltaHolds(&self.types));
        }
        let gated = USERS.contains(&type_url) && !fresh && !self.clusters_warm(snap);
        let ts = self.types.entry(type_url.to_string()).or_default();
        if first {
            // Legacy wildcard: a first request naming nothing asks for everything (LDS, CDS).
            if req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty()
                && is_wildcard_type(type_url)
            {
                ts.subscribed.insert(WILDCARD.to_string());
            }
            ts.have = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        // A nonce on a first request is left from an earlier stream, not an answer.
        let reply = if req.response_nonce.is_empty() || first {
            None
        } else {
            on_reply(self.ads, self.id, ts, &req)
        };
        // Subscription changes count even on a stale nonce (the protocol says so for delta).
        for name in &req.resource_names_subscribe {
            ts.absent.remove(name);
            if !first {
                // The client may have forgotten it: a subscription is always answered in full.
                ts.have.remove(name);
            }
            ts.subscribed.insert(name.clone());
        }
        for name in &req.resource_names_unsubscribe {
            ts.subscribed.remove(name);
            ts.absent.remove(name);
            if name == WILDCARD {
                // The client drops what it held only through the wildcard.
                let subscribed = &ts.subscribed;
                ts.have.retain(|n, _| subscribed.contains(n));
            } else if ts.subscribed.contains(WILDCARD) {
                // Still covered by the wildcard or not: the client cannot tell, so say which.
                if t.resources.contains_key(name) {
                    ts.have.remove(name);
                } else {
                    ts.have.insert(name.clone(), String::new());
                }
            } else {
                ts.have.remove(name);
            }
        }
        if ts.subscribed.is_empty() {
            // Watching nothing of this type, the client answers nothing of it any more.
            ts.pending.clear();
            ts.rejected.clear();
        }
        if let Some((answered, settled)) = reply {
            let nack = req.error_detail.is_some();
            for (nonce, p) in &settled {
                if nack && *nonce == answered {
                    ts.rejected.extend(p.names.iter().cloned());
                    if type_url == CLUSTER || type_url == ENDPOINT {
                        // What it rejected will not warm through us: nothing to wait for.
                        self.warmth.give_up_on(p.names.iter().cloned());
                    }
                } else {
                    for n in &p.names {
                        ts.rejected.remove(n);
                    }
                }
            }
        }
        let resources = if gated {
            if !offers(type_url, ts, t, snap).is_empty() {
                self.updates_due = true;
            }
            vec![]
        } else {
            updates(type_url, ts, t, snap)
        };
        // While removals wait (see `remove_when_safe`), none goes out here.
        let held = self.removals_due || self.removals_held(snap);
        let ts = self.types.entry(type_url.to_string()).or_default();
        let delta = Delta {
            resources,
            removed: if held {
                vec![]
            } else {
                removals(type_url, ts, t)
            },
        };
        // A first request is always answered (Envoy waits for it), unless the Envoy already
        // holds exactly what it asked for.
        if fresh || !delta.is_empty() {
            self.send(type_url, t, delta).await?;
        }
        self.flush(snap).await?;
        self.remove_when_safe(snap).await
    }

    /// After an input change: what moved, in make-before-break order (clusters and endpoints at
    /// once, listeners and routes once what they use is warm); what is gone follows once every
    /// response is ACKed.
    async fn push_changes(&mut self, snap: &Snapshot) -> Result<(), Status> {
        let empty = TypeSnapshot::default();
        // Secrets first: a renewed certificate needs nothing else.
        for type_url in [SECRET, CLUSTER, ENDPOINT] {
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            let t = snap.get(type_url).unwrap_or(&empty);
            let resources = updates(type_url, ts, t, snap);
            if !resources.is_empty() {
                let delta = Delta {
                    resources,
                    removed: vec![],
                };
                self.send(type_url, t, delta).await?;
            }
        }
        self.updates_due = true;
        self.removals_due = true;
        self.flush(snap).await?;
        self.remove_when_safe(snap).await
    }

    /// Sends the listener and route updates that wait, once the clusters they may use are warm.
    async fn flush(&mut self, snap: &Snapshot) -> Result<(), Status> {
        if !self.updates_due {
            self.warmth.stand_down();
            return Ok(());
        }
        let empty = TypeSnapshot::default();
        let owed = USERS.iter().any(|type_url| {
            self.types.get(*type_url).is_some_and(|ts| {
                !offers(type_url, ts, snap.get(type_url).unwrap_or(&empty), snap).is_empty()
            })
        });
        if owed && !self.clusters_warm(snap) {
            return Ok(());
        }
        self.warmth.stand_down();
        self.updates_due = false;
        for type_url in USERS {
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            let t = snap.get(type_url).unwrap_or(&empty);
            let resources = updates(type_url, ts, t, snap);
            if !resources.is_empty() {
                let delta = Delta {
                    resources,
                    removed: vec![],
                };
                self.send(type_url, t, delta).await?;
            }
        }
        self.change = None;
        Ok(())
    }

    /// Whether listeners and routes may go: every cluster they may use is warm in Envoy (or
    /// waited on long enough). Without a cluster subscription there is nothing to wait for.
    fn clusters_warm(&mut self, snap: &Snapshot) -> bool {
        !self.types.contains_key(CLUSTER)
            || self
                .warmth
                .ready(snap, &DeltaHolds(&self.types), self.ads.warming_hold)
    }

    /// Removals wait while any response is unanswered (the configuration that stops using what
    /// goes may still be rejected), while a rejected resource still exists (the client runs its
    /// older version), while updates wait for warm clusters, and after a reconnect until this
    /// stream has served listeners.
    fn removals_held(&self, snap: &Snapshot) -> bool {
        self.updates_due
            || (self.resumed && !self.types.contains_key(LISTENER))
            || self.types.iter().any(|(type_url, ts)| {
                !ts.pending.is_empty()
                    || ts.rejected.iter().any(|n| {
                        snap.get(type_url)
                            .is_some_and(|t| t.resources.contains_key(n))
                    })
            })
    }

    /// Sends what is gone, in push order, once nothing holds removals.
    async fn remove_when_safe(&mut self, snap: &Snapshot) -> Result<(), Status> {
        if !self.removals_due || self.removals_held(snap) {
            return Ok(());
        }
        self.removals_due = false;
        let empty = TypeSnapshot::default();
        for type_url in PUSH_ORDER {
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            let t = snap.get(type_url).unwrap_or(&empty);
            let removed = removals(type_url, ts, t);
            if !removed.is_empty() {
                let delta = Delta {
                    resources: vec![],
                    removed,
                };
                self.send(type_url, t, delta).await?;
            }
        }
        Ok(())
    }

    /// Sends one response and returns its nonce.
    async fn send(
        &mut self,
        type_url: &str,
        t: &TypeSnapshot,
        delta: Delta,
    ) -> Result<u64, Status> {
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        if type_url == CLUSTER {
            // Gone from the client: one added again is waited on again.
            self.warmth.forget(&delta.removed);
        }
        let ts = self.types.entry(type_url.to_string()).or_default();
        ts.pending.insert(
            nonce,
            Pending {
                version: t.version.clone(),
                change: self.change,
                names: delta.resources.iter().map(|r| r.name.clone()).collect(),
            },
        );
        while ts.pending.len() > MAX_PENDING {
            ts.pending.pop_first();
        }
        debug!(
            type_url,
            version = %t.version,
            count = delta.resources.len(),
            removed = delta.removed.len(),
            "push"
        );
        self.ads.metrics.pushed(self.id, type_url, &t.version);
        let resp = DeltaDiscoveryResponse {
            system_version_info: t.version.clone(),
            resources: delta.resources,
            type_url: type_url.to_string(),
            removed_resources: delta.removed,
            nonce: nonce.to_string(),
            ..Default::default()
        };
        // Encoded here, so the stream holds only the bytes while it waits to queue them.
        let message = frame(&resp)?;
        drop(resp);
        self.tx
            .send(Ok(message))
            .await
            .map_err(|_| Status::cancelled("envoy went away"))?;
        Ok(nonce)
    }
}

/// What a delta client has: what was sent to it (or it held when it connected) and is not in a
/// response it has yet to answer.
struct DeltaHolds<'s>(&'s HashMap<String, TypeState>);

impl DeltaHolds<'_> {
    fn has(&self, type_url: &str, name: &str) -> bool {
        self.0.get(type_url).is_some_and(|ts| {
            ts.have.contains_key(name)
                && !ts
                    .pending
                    .values()
                    .any(|p| p.names.iter().any(|n| n == name))
        })
    }
}

impl Holds for DeltaHolds<'_> {
    fn has_cluster(&self, name: &str) -> bool {
        self.has(CLUSTER, name)
    }

    fn has_endpoints(&self, name: &str) -> bool {
        self.has(ENDPOINT, name)
    }
}

/// An ACK or NACK: the nonce it answers and the responses it settles (Envoy answers in order, so
/// the older unanswered ones with it). One whose nonce is not an unanswered response of this
/// type is stale and ignored; a NACK is recorded and never answered by sending the same
/// versions again.
fn on_reply(
    ads: &Ads,
    id: u64,
    ts: &mut TypeState,
    req: &DeltaDiscoveryRequest,
) -> Option<(u64, BTreeMap<u64, Pending>)> {
    let Some(nonce) = req
        .response_nonce
        .parse::<u64>()
        .ok()
        .filter(|n| ts.pending.contains_key(n))
    else {
        debug!(type_url = %req.type_url, nonce = %req.response_nonce, "stale reply ignored");
        ads.metrics.stale();
        return None;
    };
    let newer = ts.pending.split_off(&(nonce + 1));
    // All answered (the usual case): no empty node kept per type and stream.
    let newer = if newer.is_empty() {
        BTreeMap::new()
    } else {
        newer
    };
    let settled = std::mem::replace(&mut ts.pending, newer);
    let p = settled.get(&nonce)?;
    if let Some(err) = &req.error_detail {
        warn!(
            type_url = %req.type_url,
            nonce = %req.response_nonce,
            rejected = %p.version,
            message = %err.message,
            "envoy rejected configuration"
        );
        ads.metrics.nacked(id, &req.type_url, &err.message);
    } else {
        debug!(type_url = %req.type_url, version = %p.version, "ack");
        ads.metrics
            .acked(id, &req.type_url, &p.version, p.change.map(|c| c.elapsed()));
    }
    Some((nonce, settled))
}

/// What the subscription needs sent, as (name, version): new or changed resources, and an empty
/// assignment for endpoint names Trellis does not manage (the App Mesh Envoy image's
/// `local_cluster`, as on SotW). Never an assignment that is empty only because Cloud Map has
/// not answered over endpoints the client has, nor one for a name the client has endpoints for
/// that the snapshot no longer has (a cluster kept until what uses it is gone).
fn offers(
    type_url: &str,
    ts: &TypeState,
    t: &TypeSnapshot,
    snap: &Snapshot,
) -> Vec<(String, String)> {
    let keeps = |name: &str| {
        type_url == ENDPOINT && snap.unanswered.contains(name) && ts.have.contains_key(name)
    };
    let wildcard = ts.subscribed.contains(WILDCARD);
    let mut out = Vec::new();
    let mut offer = |name: &str, version: &str| {
        if ts.have.get(name).map(String::as_str) != Some(version) {
            out.push((name.to_string(), version.to_string()));
        }
    };
    if wildcard {
        for name in t.resources.keys() {
            if !keeps(name) {
                offer(name, version_of(t, name));
            }
        }
    }
    for name in named(ts) {
        if t.resources.contains_key(&name) {
            if !wildcard && !keeps(&name) {
                offer(&name, version_of(t, &name));
            }
        } else if type_url == ENDPOINT && !t.pending.contains(&name) && !ts.have.contains_key(&name)
        {
            offer(&name, UNMANAGED_VERSION);
        }
    }
    out
}

/// The new or changed resources the subscription needs ([`offers`]); records them as held.
fn updates(type_url: &str, ts: &mut TypeState, t: &TypeSnapshot, snap: &Snapshot) -> Vec<Resource> {
    for name in named(ts) {
        if t.resources.contains_key(&name) {
            ts.absent.remove(&name);
        }
    }
    offers(type_url, ts, t, snap)
        .into_iter()
        .map(|(name, version)| {
            let any = match t.resources.get(&name) {
                Some(r) => r.any(),
                None => pack_any(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    ..Default::default()
                }),
            };
            ts.have.insert(name.clone(), version.clone());
            Resource {
                name,
                version,
                resource: Some(any),
                ..Default::default()
            }
        })
        .collect()
}

/// The names the client must be told are gone or do not exist; records them as not held.
fn removals(type_url: &str, ts: &mut TypeState, t: &TypeSnapshot) -> Vec<String> {
    let wildcard = ts.subscribed.contains(WILDCARD);
    let mut out = Vec::new();
    for name in named(ts) {
        if !t.resources.contains_key(&name)
            && type_url != ENDPOINT
            && !ts.have.contains_key(&name)
            && ts.absent.insert(name.clone())
        {
            // Tells the client at once that the name does not exist, rather than by its timeout.
            out.push(name);
        }
    }
    let gone: Vec<String> = ts
        .have
        .keys()
        .filter(|n| {
            // Unmanaged endpoint names stay answered with their empty assignment.
            let unmanaged = type_url == ENDPOINT && ts.subscribed.contains(*n);
            !t.resources.contains_key(*n) && !unmanaged
        })
        .cloned()
        .collect();
    for name in gone {
        ts.have.remove(&name);
        let named = ts.subscribed.contains(&name);
        if named || wildcard {
            out.push(name.clone());
        }
        if named {
            ts.absent.insert(name);
        }
    }
    out
}

/// The names subscribed to explicitly.
fn named(ts: &TypeState) -> Vec<String> {
    ts.subscribed
        .iter()
        .filter(|n| *n != WILDCARD)
        .cloned()
        .collect()
}

fn version_of<'t>(t: &'t TypeSnapshot, name: &str) -> &'t str {
    t.versions.get(name).map(String::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests;
