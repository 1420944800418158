//! What every ADS stream shares, whatever its protocol variant: the session (identity, connection
//! quota, the snapshot it serves, metrics), what its Envoy has of the clusters ([`Warmth`]: a
//! listener or route goes only once the clusters it may use are warm), and the driver that feeds
//! a [`Protocol`] its requests, the agent's publications and its wake-ups until either side ends
//! the stream.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::snapshot::{CLUSTER, Snapshot};
use super::{Ads, Published, Slot};
use crate::attest::Peer;
use trellis_model::{ProxyIdentity, State};

/// What every stream holds while open, whatever its protocol variant: the proxy's identity and
/// connection slot, and the snapshot it serves. Dropping it gives the slot back.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) who: ProxyIdentity,
    who_text: String,
    pub(super) snap: Arc<Snapshot>,
    /// Whether the stream's peer proved its node (ECS attestation of a Unix socket peer, or a
    /// client certificate on TCP): only then are secrets (ACM keys) in what it is served.
    attested: bool,
    pub(super) published: watch::Receiver<Published>,
    metrics: Arc<super::Metrics>,
    _slot: Slot,
}

impl Session {
    /// Checks the first request's node and that the peer may claim it, takes a connection slot
    /// and builds the first snapshot.
    pub(super) async fn open(
        ads: &Arc<Ads>,
        id: u64,
        variant: &'static str,
        peer: &Peer,
        node: Option<&Node>,
    ) -> Result<Self, Status> {
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first request on a stream must carry node")
        })?;
        let who = ProxyIdentity::parse(&node.id)
            .map_err(|e| Status::invalid_argument(format!("node.id: {e}")))?;
        tracing::Span::current().record("node", node.id.as_str());
        if let Err(refusal) = ads.attestor.verify(peer, &who).await {
            ads.metrics.refused(refusal.reason());
            warn!(node = %who, peer = ?peer, reason = refusal.reason(), error = %refusal, "stream refused: the caller may not claim this node");
            return Err(Status::permission_denied(refusal.to_string()));
        }
        let attested = match peer {
            Peer::Tls { .. } => true,
            Peer::Unix { .. } => ads.attestor.mode() == crate::attest::Mode::Ecs,
            Peer::Plain => false,
        };
        let slot = ads.admit(&who, attested).ok_or_else(|| {
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
        let snap = if attested {
            snap
        } else {
            snap.without_secrets()
        };
        info!(node = %who, "envoy connected");
        let who_text = who.to_string();
        ads.metrics.stream_opened(id, &who_text, variant);
        Ok(Session {
            id,
            who,
            who_text,
            snap,
            attested,
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
            Ok(s) if self.attested => s,
            Ok(s) => s.without_secrets(),
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

/// Says (debug, names only) which secrets a stream asked for that it is not served: not this
/// node's, not exported, or the stream is not attested. It gets nothing for them.
pub(super) fn secrets_withheld<'n>(snap: &Snapshot, names: impl Iterator<Item = &'n String>) {
    let have = snap.get(super::snapshot::SECRET);
    let withheld: Vec<&String> = names
        .filter(|n| !have.is_some_and(|t| t.resources.contains_key(*n)))
        .collect();
    if !withheld.is_empty() {
        debug!(names = ?withheld, "secrets withheld from this stream");
    }
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
    /// When the stream wants [`Protocol::on_wake`] called even if nothing else happens.
    fn wake_at(&self) -> Option<Instant>;
    /// The time asked for by [`Protocol::wake_at`] has come.
    async fn on_wake(&mut self, snap: &Snapshot) -> Result<(), Status>;
}

/// Opens the session on the first request, serves it, then each request and each publication,
/// until Envoy or the agent ends the stream.
pub(super) async fn serve<P: Protocol>(
    ads: &Arc<Ads>,
    id: u64,
    peer: Peer,
    mut inbound: Streaming<P::Request>,
    mut stream: P,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    // The handlers' futures are boxed: a task's future is as large as the largest state it
    // awaits in, and theirs (nested sends, attestation) would be most of every idle stream's
    // memory; boxed, they cost memory only while they run.
    let mut session = Box::pin(Session::open(ads, id, P::NAME, &peer, P::node(&first))).await?;
    Box::pin(stream.on_request(first, &session.snap)).await?;
    loop {
        tokio::select! {
            req = inbound.message() => match req {
                Ok(Some(req)) => Box::pin(stream.on_request(req, &session.snap)).await?,
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
                    Box::pin(stream.on_change(changed_at, &before, &session.snap)).await?;
                }
            }
            () = sleep_until_opt(stream.wake_at()) => Box::pin(stream.on_wake(&session.snap)).await?,
            () = ads.cancel.cancelled() => break,
        }
    }
    Ok(())
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What a protocol machine knows its client has, from the state it keeps anyway.
pub(super) trait Holds {
    /// The cluster is in a CDS response the client ACKed, or it held it when it connected.
    fn has_cluster(&self, name: &str) -> bool;
    /// The client ACKed an assignment for the cluster, or held one when it connected.
    fn has_endpoints(&self, name: &str) -> bool;
}

/// Whether listeners and routes may go to what a stream's Envoy has. Envoy keeps a new cluster
/// warming (not routable: a request to it fails with 503) until its endpoints arrive, so
/// listeners and routes go only once every cluster of the snapshot is in a CDS response Envoy has
/// ACKed and, for an EDS cluster, has an assignment Envoy has ACKed ([`Holds`]). A cluster whose
/// endpoints do not come within the hold (Cloud Map has not answered) is waited on no longer: the
/// listener or route goes, and Envoy's own warming takes over.
#[derive(Debug, Default)]
pub(super) struct Warmth {
    /// Not waited on any more: the hold ran out, Envoy went ahead without them, or rejected them.
    given_up: BTreeSet<String>,
    /// When the current wait ends, while one is on.
    until: Option<Instant>,
}

impl Warmth {
    /// The snapshot's clusters the client does not have warm yet (and that are still waited on).
    fn cold<'s>(
        &'s self,
        snap: &'s Snapshot,
        holds: &'s impl Holds,
    ) -> impl Iterator<Item = &'s String> + 's {
        snap.get(CLUSTER)
            .into_iter()
            .flat_map(|t| t.resources.keys())
            .filter(move |n| {
                !self.given_up.contains(*n)
                    && (!holds.has_cluster(n) || (snap.is_eds(n) && !holds.has_endpoints(n)))
            })
    }

    /// Whether listeners and routes may go now; if not, the hold starts (once) and
    /// [`Warmth::wake_at`] says when it ends.
    pub(super) fn ready(&mut self, snap: &Snapshot, holds: &impl Holds, hold: Duration) -> bool {
        if self.cold(snap, holds).next().is_none() {
            self.until = None;
            return true;
        }
        let now = Instant::now();
        let until = *self.until.get_or_insert(now + hold);
        if now < until {
            return false;
        }
        debug!(
            clusters = ?self.cold(snap, holds).collect::<Vec<_>>(),
            "clusters still warming after the hold; listeners and routes go anyway"
        );
        self.give_up(snap, holds);
        true
    }

    /// The clusters still cold are not waited on any more (the hold ran out, or the client
    /// rejected what would warm them).
    pub(super) fn give_up(&mut self, snap: &Snapshot, holds: &impl Holds) {
        let cold: Vec<String> = self.cold(snap, holds).cloned().collect();
        self.given_up.extend(cold);
        self.until = None;
    }

    /// The client went ahead without the endpoints of clusters it has (a starting Envoy asks
    /// for listeners once its clusters are initialised, endpoints or not): those are not waited
    /// on any more.
    pub(super) fn went_ahead(&mut self, snap: &Snapshot, holds: &impl Holds) {
        let without: Vec<String> = self
            .cold(snap, holds)
            .filter(|n| holds.has_cluster(n))
            .cloned()
            .collect();
        self.given_up.extend(without);
    }

    /// These will not warm through this stream (the client rejected them).
    pub(super) fn give_up_on(&mut self, names: impl IntoIterator<Item = String>) {
        self.given_up.extend(names);
    }

    /// The client no longer has these clusters: added again, they are waited on again.
    pub(super) fn forget<'n>(&mut self, names: impl IntoIterator<Item = &'n String>) {
        for n in names {
            self.given_up.remove(n);
        }
    }

    /// Nothing waits for warm clusters any more: the hold, if one is on, ends.
    pub(super) fn stand_down(&mut self) {
        self.until = None;
    }

    /// When the current hold ends, if one is on.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.until
    }
}

pub(super) fn build(
    ads: &Ads,
    state: &State,
    who: &ProxyIdentity,
) -> Result<Arc<Snapshot>, trellis_translate::Error> {
    let start = Instant::now();
    let (snap, built) = ads.snapshots.get(state, who)?;
    if built {
        ads.metrics.built(start.elapsed());
    }
    Ok(snap)
}

pub(super) fn unknown_proxy(e: trellis_translate::Error) -> Status {
    Status::not_found(format!(
        "{e}: create it with the App Mesh API before starting its Envoy, or fix APPMESH_RESOURCE_ARN"
    ))
}
