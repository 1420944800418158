//! Endpoint discovery (I/O): one Cloud Map poller per key that this agent's connected proxies
//! need, started when the first proxy needs it and stopped a linger period after the last one
//! leaves; their answers are published together as [`Found`] (`translate::Endpoints` and which
//! keys were never answered) on a `watch`.
//!
//! Demand = `translate::cloud_map_keys` of every connected proxy against the committed state, so
//! Cloud Map calls grow with the services in use on this agent, never with the number of Envoys.
//! With the DynamoDB store, [`fleet`] shares one poller per key across every agent of the table,
//! so they do not grow with the number of agents either.

pub mod addresses;
pub mod fleet;
mod metrics;
mod poller;
pub mod sdk;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use metrics::Metrics;
pub use sdk::SdkCloudMap;
use trellis_model::{ProxyIdentity, State};
use trellis_translate::{CloudMapKey, Endpoints, Instance, cloud_map_keys};

/// Why a Cloud Map call failed, as far as the operator's next step is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    Throttled,
    NotFound,
    Denied,
    Invalid,
    Unreachable,
    Other,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Throttled => "throttled",
            FailureKind::NotFound => "not_found",
            FailureKind::Denied => "denied",
            FailureKind::Invalid => "invalid",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Other => "other",
        }
    }

    /// What the operator can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            FailureKind::Throttled => {
                "Cloud Map is throttling this account: the agent backs off; raise \
                 --cloudmap-poll-interval-ms or the account's DiscoverInstances quota"
            }
            FailureKind::NotFound => {
                "check serviceDiscovery.awsCloudMap namespaceName (the namespace's HttpName) and \
                 serviceName of the virtual node, and the agent's region"
            }
            FailureKind::Denied => {
                "check that the agent's credentials (instance profile or task role) allow \
                 servicediscovery:DiscoverInstances and servicediscovery:DiscoverInstancesRevision"
            }
            FailureKind::Invalid => "check the virtual node's awsCloudMap attributes filter",
            FailureKind::Unreachable => {
                "check network access to Cloud Map (data-servicediscovery.REGION.amazonaws.com) \
                 or --cloudmap-endpoint"
            }
            FailureKind::Other => "see the error; the last known endpoints stay in use",
        }
    }
}

/// What discovery publishes: the endpoints translation reads, and the Cloud Map keys that are
/// in them only because every call for them has failed so far. Both change together, in one
/// publication, so a snapshot never pairs endpoints with another moment's failures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Found {
    pub endpoints: Arc<Endpoints>,
    /// Published empty (a new Envoy is not held waiting on them) but never answered on this
    /// agent: an Envoy that already has their endpoints keeps them, because a failed Cloud Map
    /// call never changes what Envoy has.
    pub unanswered: Arc<BTreeSet<CloudMapKey>>,
    /// ACM secrets by name ([`crate::acm`]), published with the ARNs they are made of
    /// (`endpoints.acm`) so a snapshot never pairs one with another moment's other.
    pub secrets: Arc<BTreeMap<String, trellis_translate::Item>>,
}

/// A failed Cloud Map call.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub kind: FailureKind,
    pub message: String,
}

/// One `DiscoverInstances` answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Discovered {
    pub instances: Vec<Instance>,
}

/// The two Cloud Map calls discovery makes; the SDK in production, fakes in unit tests.
pub trait CloudMap: Send + Sync + 'static {
    fn discover<'a>(&'a self, key: &'a CloudMapKey)
    -> BoxFuture<'a, Result<Discovered, CallError>>;
    /// `DiscoverInstancesRevision`: changes when instances are (de)registered or their attributes
    /// change, not when only their health does.
    fn revision<'a>(&'a self, key: &'a CloudMapKey) -> BoxFuture<'a, Result<i64, CallError>>;
}

/// Timing of the pollers.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How often each key's revision is checked.
    pub poll: Duration,
    /// How often instances are fetched whatever the revision says (health changes).
    pub refresh: Duration,
    /// Each wait is stretched or shrunk by up to this fraction, so pollers do not beat in step.
    pub jitter: f64,
    /// The longest wait after repeated failures.
    pub backoff_max: Duration,
    /// How long a key nobody needs any more keeps being polled (an Envoy reconnecting finds its
    /// endpoints still there).
    pub linger: Duration,
    /// The poll interval while a service churns: for `churn_window` after its instances last
    /// changed, so the next step of a deployment (the old task deregistered right after its
    /// replacement registered) reaches callers within this rather than `poll`.
    pub churn_poll: Duration,
    /// How long after a change the faster `churn_poll` applies (zero: never).
    pub churn_window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            poll: Duration::from_secs(5),
            refresh: Duration::from_secs(30),
            jitter: 0.1,
            backoff_max: Duration::from_secs(60),
            linger: Duration::from_secs(60),
            churn_poll: Duration::from_secs(1),
            churn_window: Duration::from_secs(60),
        }
    }
}

/// The running pollers, by key.
struct Poller {
    cancel: CancellationToken,
    /// When the last proxy needing this key went away.
    idle_since: Option<Instant>,
}

/// Every key some connected proxy needs in this state.
pub fn demand(state: &State, proxies: &BTreeSet<ProxyIdentity>) -> BTreeSet<CloudMapKey> {
    proxies
        .iter()
        .flat_map(|p| cloud_map_keys(state, p))
        .collect()
}

/// Runs until `cancel`: keeps one poller per demanded key and publishes their answers on `out`.
pub async fn run(
    client: Arc<dyn CloudMap>,
    mut state: watch::Receiver<Arc<State>>,
    mut proxies: watch::Receiver<BTreeSet<ProxyIdentity>>,
    out: Arc<watch::Sender<Found>>,
    metrics: Arc<Metrics>,
    cfg: Config,
    cancel: CancellationToken,
) {
    let mut pollers: HashMap<CloudMapKey, Poller> = HashMap::new();
    loop {
        let wanted = {
            let s = state.borrow_and_update().clone();
            let p = proxies.borrow_and_update().clone();
            demand(&s, &p)
        };
        let now = Instant::now();
        for key in &wanted {
            match pollers.get_mut(key) {
                Some(p) => p.idle_since = None,
                None => {
                    let token = cancel.child_token();
                    info!(key = %key, "cloud map poller started");
                    metrics.poller_started();
                    tokio::spawn(
                        poller::run(
                            key.clone(),
                            client.clone(),
                            out.clone(),
                            metrics.clone(),
                            cfg,
                            token.clone(),
                        )
                        .instrument(info_span!("cloudmap_poller", key = %key)),
                    );
                    pollers.insert(
                        key.clone(),
                        Poller {
                            cancel: token,
                            idle_since: None,
                        },
                    );
                }
            }
        }
        for (key, p) in &mut pollers {
            if !wanted.contains(key) && p.idle_since.is_none() {
                p.idle_since = Some(now);
            }
        }
        let expired: Vec<CloudMapKey> = pollers
            .iter()
            .filter(|(_, p)| p.idle_since.is_some_and(|t| now >= t + cfg.linger))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(p) = pollers.remove(&key) {
                // Cancelled before the entry goes, so a poller mid-call cannot put it back.
                p.cancel.cancel();
                info!(key = %key, "cloud map poller stopped: no connected proxy needs it");
                metrics.forget(&key);
                out.send_if_modified(|f| {
                    if !f.endpoints.cloud_map.contains_key(&key) {
                        return false;
                    }
                    let m = Arc::make_mut(&mut f.endpoints);
                    m.cloud_map.remove(&key);
                    m.generation += 1;
                    if f.unanswered.contains(&key) {
                        Arc::make_mut(&mut f.unanswered).remove(&key);
                    }
                    true
                });
            }
        }
        metrics.set_pollers(pollers.len());
        let next_expiry = pollers
            .values()
            .filter_map(|p| p.idle_since)
            .min()
            .map(|t| t + cfg.linger);
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            changed = proxies.changed() => if changed.is_err() { break },
            () = sleep_until_opt(next_expiry) => {}
            () = cancel.cancelled() => break,
        }
    }
    for p in pollers.values() {
        p.cancel.cancel();
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests;
