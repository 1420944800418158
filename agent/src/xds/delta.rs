//! One Envoy stream on incremental ADS (`DeltaAggregatedResources`): per-resource versions (the
//! snapshot's content hashes), wildcard and named subscriptions, `initial_resource_versions` on
//! reconnect, `removed_resources` (only once the updates that stop using them are ACKed), and the
//! SotW stream's NACK rule: a rejected resource is not sent again until its content changes.
//! Identity, quota, snapshot lookup and metrics are the shared `Session`'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::Ads;
use super::session::{self, Protocol};
use super::snapshot::{ENDPOINT, PUSH_ORDER, Snapshot, TypeSnapshot, is_wildcard_type};

/// The explicit wildcard subscription of the xDS protocol.
const WILDCARD: &str = "*";
/// Version of the empty assignment answered for endpoint names Trellis does not manage.
const UNMANAGED_VERSION: &str = "unmanaged";
/// Unanswered responses remembered per type: Envoy answers each in turn, so a few suffice, and a
/// client that never answers cannot grow the stream's memory.
const MAX_PENDING: usize = 16;

/// A response not yet ACKed or NACKed.
#[derive(Debug)]
struct Pending {
    /// The type's version in the snapshot it was cut from (`system_version_info`).
    version: String,
    /// When the change behind it was committed (none for answers to requests).
    change: Option<Instant>,
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
    tx: &'a mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    /// The commit time of the publication being pushed, while it is new to this stream.
    change: Option<Instant>,
    /// Updates pushed after input changes and not yet answered: removals wait for them, so
    /// nothing is removed while the configuration that stops using it may still be rejected.
    updates_unacked: BTreeSet<u64>,
    /// Types whose last answer was a NACK: the client still runs their previous resources, which
    /// may use what a removal would take away. Removals wait until those types are ACKed again.
    nacked_types: BTreeSet<String>,
    /// Removals may be due since the last input change.
    removals_due: bool,
}

pub(super) async fn run_stream(
    ads: &Arc<Ads>,
    id: u64,
    inbound: Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let stream = Stream {
        ads,
        id,
        next_nonce: 0,
        types: HashMap::new(),
        tx,
        change: None,
        updates_unacked: BTreeSet::new(),
        nacked_types: BTreeSet::new(),
        removals_due: false,
    };
    session::serve(ads, id, inbound, stream).await
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
        let empty = TypeSnapshot::default();
        let t = snap.get(&req.type_url).unwrap_or(&empty);
        let first = !self.types.contains_key(&req.type_url);
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if first {
            // Legacy wildcard: a first request naming nothing asks for everything (LDS, CDS).
            if req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty()
                && is_wildcard_type(&req.type_url)
            {
                ts.subscribed.insert(WILDCARD.to_string());
            }
            // A reconnecting Envoy says what it holds: unchanged resources are not resent.
            ts.have = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let reply = if req.response_nonce.is_empty() {
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
        // While an input change's removals wait (see `remove_when_safe`), none goes out here.
        let held =
            self.removals_due || !self.updates_unacked.is_empty() || !self.nacked_types.is_empty();
        let delta = Delta {
            resources: updates(&req.type_url, ts, t),
            removed: if held {
                vec![]
            } else {
                removals(&req.type_url, ts, t)
            },
        };
        if let Some(settled) = reply {
            for nonce in &settled {
                self.updates_unacked.remove(nonce);
            }
            if req.error_detail.is_some() {
                self.nacked_types.insert(req.type_url.clone());
            } else {
                self.nacked_types.remove(&req.type_url);
            }
        }
        // A first request is always answered (Envoy waits for it), unless the Envoy already
        // holds exactly what it asked for.
        let answer_anyway = first && req.initial_resource_versions.is_empty();
        if answer_anyway || !delta.is_empty() {
            self.send(&req.type_url, t, delta).await?;
        }
        self.remove_when_safe(snap).await
    }

    /// After an input change: what moved, in make-before-break order (clusters, endpoints,
    /// listeners, routes); what is gone follows once every update is ACKed.
    async fn push_changes(&mut self, snap: &Snapshot) -> Result<(), Status> {
        let empty = TypeSnapshot::default();
        for type_url in PUSH_ORDER {
            let Some(ts) = self.types.get_mut(type_url) else {
                continue;
            };
            let t = snap.get(type_url).unwrap_or(&empty);
            let resources = updates(type_url, ts, t);
            if !resources.is_empty() {
                let delta = Delta {
                    resources,
                    removed: vec![],
                };
                let nonce = self.send(type_url, t, delta).await?;
                self.updates_unacked.insert(nonce);
            }
        }
        self.change = None;
        self.removals_due = true;
        self.remove_when_safe(snap).await
    }

    /// Sends what is gone, in push order, once no update is unanswered or rejected.
    async fn remove_when_safe(&mut self, snap: &Snapshot) -> Result<(), Status> {
        if !self.removals_due || !self.updates_unacked.is_empty() || !self.nacked_types.is_empty() {
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
        let ts = self.types.entry(type_url.to_string()).or_default();
        ts.pending.insert(
            nonce,
            Pending {
                version: t.version.clone(),
                change: self.change,
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
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Status::cancelled("envoy went away"))?;
        Ok(nonce)
    }
}

/// An ACK or NACK; returns the nonces it settles. One whose nonce is not an unanswered response
/// of this type is stale and ignored; a NACK is recorded and never answered by sending the same
/// versions again.
fn on_reply(
    ads: &Ads,
    id: u64,
    ts: &mut TypeState,
    req: &DeltaDiscoveryRequest,
) -> Option<Vec<u64>> {
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
    // Envoy answers responses in order: this reply also settles the older unanswered ones.
    let newer = ts.pending.split_off(&(nonce + 1));
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
    Some(settled.into_keys().collect())
}

/// The new or changed resources the subscription needs; records them as held.
fn updates(type_url: &str, ts: &mut TypeState, t: &TypeSnapshot) -> Vec<Resource> {
    let wildcard = ts.subscribed.contains(WILDCARD);
    let mut out = Vec::new();
    if wildcard {
        for (name, any) in &t.resources {
            offer(ts, &mut out, name, version_of(t, name), || any.any());
        }
    }
    for name in named(ts) {
        if let Some(any) = t.resources.get(&name) {
            ts.absent.remove(&name);
            if !wildcard {
                offer(ts, &mut out, &name, version_of(t, &name), || any.any());
            }
        } else if type_url == ENDPOINT && !t.pending.contains(&name) {
            // Endpoints asked for that we do not manage (the App Mesh Envoy image's
            // `local_cluster`) get an empty assignment, as on SotW, so Envoy does not wait on them.
            offer(ts, &mut out, &name, UNMANAGED_VERSION, || {
                pack_any(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    ..Default::default()
                })
            });
        }
    }
    out
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

/// Adds the resource to the delta unless the client already holds this version.
fn offer(
    ts: &mut TypeState,
    out: &mut Vec<Resource>,
    name: &str,
    version: &str,
    any: impl FnOnce() -> Any,
) {
    if ts.have.get(name).map(String::as_str) == Some(version) {
        return;
    }
    ts.have.insert(name.to_string(), version.to_string());
    out.push(Resource {
        name: name.to_string(),
        version: version.to_string(),
        resource: Some(any()),
        ..Default::default()
    });
}

fn version_of<'t>(t: &'t TypeSnapshot, name: &str) -> &'t str {
    t.versions.get(name).map(String::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests;
