//! One key's poller: `DiscoverInstancesRevision` every poll interval, `DiscoverInstances` when
//! the revision moved or the slower refresh is due (health changes do not move the revision).
//! For a while after the instances change the revision is checked more often (a deployment
//! moves one task after another). A failed call never changes what is published: the last known instances stay. A key whose
//! first calls fail is published empty and marked unanswered (see [`super::Found`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{CallError, CloudMap, Config, Found, Metrics};
use trellis_translate::{CloudMapKey, Instance};

pub(super) const REVISION: &str = "DiscoverInstancesRevision";
pub(super) const DISCOVER: &str = "DiscoverInstances";

/// What one round of calls found.
#[derive(Debug)]
pub(super) enum Outcome {
    Unchanged,
    Changed(Arc<[Instance]>),
    Failed(&'static str, CallError),
}

/// What a poller remembers between rounds.
#[derive(Debug, Default)]
pub(super) struct PollState {
    /// The revision the current instances were fetched under (read before fetching them, so a
    /// change racing the fetch shows as a new revision next round).
    revision: Option<i64>,
    pub(super) instances: Option<Arc<[Instance]>>,
    next_refresh: Option<Instant>,
    /// When the instances last changed after the first answer (a service churning).
    changed_at: Option<Instant>,
    /// Consecutive failed rounds.
    pub(super) failures: u32,
}

impl PollState {
    /// A poller taking over a key whose last answer it already has (from the table): the same
    /// answer again is no change.
    pub(super) fn seeded(instances: Option<Arc<[Instance]>>) -> Self {
        PollState {
            instances,
            ..PollState::default()
        }
    }

    pub(super) async fn tick(
        &mut self,
        key: &CloudMapKey,
        client: &dyn CloudMap,
        metrics: &Metrics,
        cfg: &Config,
    ) -> Outcome {
        let now = Instant::now();
        metrics.called(REVISION);
        let revision = match client.revision(key).await {
            Ok(r) => r,
            Err(e) => return self.failed(REVISION, e),
        };
        let refresh_due = self.next_refresh.is_none_or(|t| now >= t);
        if !refresh_due && self.revision == Some(revision) {
            self.failures = 0;
            return Outcome::Unchanged;
        }
        metrics.called(DISCOVER);
        let found = match client.discover(key).await {
            Ok(d) => d,
            Err(e) => return self.failed(DISCOVER, e),
        };
        self.failures = 0;
        self.revision = Some(revision);
        self.next_refresh = Some(now + cfg.refresh);
        let mut instances = found.instances;
        // Cloud Map answers in random order; sorted, equal sets compare (and hash) equal.
        instances.sort();
        let instances: Arc<[Instance]> = instances.into();
        if self.instances.as_deref() == Some(&*instances) {
            return Outcome::Unchanged;
        }
        if self.instances.is_some() {
            self.changed_at = Some(now);
        }
        self.instances = Some(instances.clone());
        Outcome::Changed(instances)
    }

    fn failed(&mut self, op: &'static str, e: CallError) -> Outcome {
        self.failures = self.failures.saturating_add(1);
        Outcome::Failed(op, e)
    }

    /// The wait before the next round: the poll interval (the churn interval within the churn
    /// window of the last change), doubled per consecutive failure up to the maximum, stretched
    /// by `spread` (in -1..=1) times the jitter fraction.
    pub(super) fn delay(&self, cfg: &Config, spread: f64) -> Duration {
        let churning = self
            .changed_at
            .is_some_and(|t| Instant::now() < t + cfg.churn_window);
        let base = if self.failures == 0 && churning {
            cfg.poll.min(cfg.churn_poll)
        } else if self.failures == 0 {
            cfg.poll
        } else {
            let factor = 2u32.saturating_pow(self.failures.min(16));
            cfg.poll.saturating_mul(factor).min(cfg.backoff_max)
        };
        base.mul_f64((1.0 + cfg.jitter * spread.clamp(-1.0, 1.0)).max(0.0))
    }
}

/// Publishes `key`'s answer (unless `cancel`: a stopped poller's late answer must not resurrect
/// its key). Returns whether it changed what was published.
pub(super) fn answered(
    out: &watch::Sender<Found>,
    key: &CloudMapKey,
    instances: Arc<[Instance]>,
    cancel: &CancellationToken,
    metrics: &Metrics,
) -> bool {
    let n = instances.len();
    let published = out.send_if_modified(|f| {
        if cancel.is_cancelled()
            || (f.endpoints.cloud_map.get(key) == Some(&instances) && !f.unanswered.contains(key))
        {
            return false;
        }
        let m = Arc::make_mut(&mut f.endpoints);
        m.cloud_map.insert(key.clone(), instances);
        m.generation += 1;
        if f.unanswered.contains(key) {
            Arc::make_mut(&mut f.unanswered).remove(key);
        }
        true
    });
    if published {
        metrics.updated(key, n);
        debug!(key = %key, instances = n, "endpoints published");
    }
    published
}

/// Every call for `key` failed. A key never answered is sent as no assignment (so a reconnecting
/// Envoy keeps its endpoints); once its first call fails, it is known empty instead, so a new
/// Envoy's initialisation is not held waiting on it, and marked unanswered, so an Envoy that has
/// its endpoints from before keeps them (the xDS layer's rule). A key with endpoints keeps them.
pub(super) fn unanswered(
    out: &watch::Sender<Found>,
    key: &CloudMapKey,
    cancel: &CancellationToken,
) {
    out.send_if_modified(|f| {
        if cancel.is_cancelled() || f.endpoints.cloud_map.contains_key(key) {
            return false;
        }
        let m = Arc::make_mut(&mut f.endpoints);
        m.cloud_map.insert(key.clone(), Vec::new().into());
        m.generation += 1;
        Arc::make_mut(&mut f.unanswered).insert(key.clone());
        true
    });
}

/// Runs until `cancel`: rounds of calls, each answer that changed published on `out`.
pub(super) async fn run(
    key: CloudMapKey,
    client: Arc<dyn CloudMap>,
    out: Arc<watch::Sender<Found>>,
    metrics: Arc<Metrics>,
    cfg: Config,
    cancel: CancellationToken,
) {
    let mut st = PollState::default();
    loop {
        let outcome = tokio::select! {
            o = st.tick(&key, client.as_ref(), &metrics, &cfg) => o,
            () = cancel.cancelled() => return,
        };
        match outcome {
            Outcome::Unchanged => debug!("unchanged"),
            Outcome::Changed(instances) => {
                let n = instances.len();
                if answered(&out, &key, instances, &cancel, &metrics) {
                    info!(instances = n, "cloud map endpoints changed");
                }
            }
            Outcome::Failed(op, e) => {
                metrics.failed(op, e.kind);
                unanswered(&out, &key, &cancel);
                warn!(
                    op,
                    reason = e.kind.label(),
                    error = %e,
                    failures = st.failures,
                    kept = st.instances.as_ref().map_or(0, |i| i.len()),
                    hint = e.kind.hint(),
                    "cloud map call failed; keeping the last known endpoints"
                );
            }
        }
        let wait = st.delay(&cfg, fastrand::f64() * 2.0 - 1.0);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}
