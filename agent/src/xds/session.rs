//! What every ADS stream shares, whatever its protocol variant: the session (identity, connection
//! quota, the snapshot it serves, metrics) and the driver that feeds a [`Protocol`] its requests
//! and the agent's publications until either side ends the stream.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::snapshot::Snapshot;
use super::{Ads, Published, Slot};
use trellis_model::{ProxyIdentity, State};

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
