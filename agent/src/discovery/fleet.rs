//! Discovery shared by the agents of one DynamoDB store: one Cloud Map poller per key across the
//! whole fleet, elected with a lease in the table, whose answers every agent serves.
//!
//! Per key (namespace, service, attributes) the table holds a lease (holder, expiry, the version
//! of the last answer) and an answer (the instances, the same version); see [`Board`]. Every half
//! poll interval an agent reads the leases of the keys its Envoys need: a key free or expired is
//! claimed (a conditional write: free, expired, or already this agent's), and its holder polls
//! Cloud Map for it as a lone agent would; a key held by another agent is followed: its answer
//! is read whenever the lease's version moved, and published here as a local poller would. The
//! holder renews every half poll interval for [`LEASE`] poll intervals, and publishes an answer
//! only with a transaction that checks it still holds the lease, so a deposed holder never
//! overwrites its successor. Cloud Map calls per minute are one agent's, whatever the fleet.
//!
//! Static stability:
//! - a holder that dies is replaced once its lease expires: within two poll intervals of its
//!   last renewal (expiry 1.25 + one read 0.5, with jitter);
//! - a table that does not answer for a lease duration makes each agent poll Cloud Map for its
//!   own demand (the local pollers, which back off when Cloud Map throttles), while it probes the
//!   table with backoff; once the table has answered for two poll intervals (the holder's time to
//!   publish what it found meanwhile), the agent follows the table again;
//! - no endpoint is ever withdrawn by either: what is published stays until a newer answer
//!   replaces it, and a holder never publishes a failure over an answer.
//!
//! A lease's expiry is wall-clock time (epoch milliseconds) written by its holder and compared by
//! the others, as the AWS DynamoDB lock client's lease is measured: agents' clocks must agree to
//! well within a lease (NTP, Amazon Time Sync). A clock ahead only makes a takeover early, which
//! the fenced publication makes harmless.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::poller::{self, Outcome, PollState};
use super::{CloudMap, Config, Found, Metrics, demand, sleep_until_opt};
use trellis_model::{ProxyIdentity, State};
use trellis_translate::{CloudMapKey, Instance};

/// A lease lasts this many poll intervals after its last renewal.
pub const LEASE: f64 = 1.25;
/// Leases are read and renewed every this many poll intervals.
pub const ROUND: f64 = 0.5;
/// Once the table answers again after a fallback, its pollers go on this many poll intervals.
const GRACE: u32 = 2;
/// A holder publishes its answer again at least this often, so the answer item outlives its
/// time to live (a day) while the key is in use.
const REPUBLISH: Duration = Duration::from_secs(3600);
/// How long a holder that stops waits for the table to take its lease back.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// One key's lease as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The agent holding it ([`Fleet::me`]).
    pub holder: String,
    /// Epoch milliseconds after which it may be taken over.
    pub until_ms: u64,
    /// The version of the key's last published answer (0: none yet).
    pub version: u64,
}

/// What a claim got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This agent holds the lease now.
    Mine(Lease),
    /// Another agent holds it and it has not expired.
    Taken,
}

/// What a publication got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Done,
    /// The lease is no longer this agent's (or another answer was published since): nothing
    /// was written.
    Lost,
}

/// One key's answer as the holder published it.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The lease version it was published under.
    pub version: u64,
    /// The instances, sorted; `None` when every call the holders made for it failed so far (the
    /// key is known empty and unanswered, see [`Found::unanswered`]).
    pub instances: Option<Arc<[Instance]>>,
    /// When the holder published it, after a Cloud Map round that confirmed it (epoch ms).
    pub fetched_ms: u64,
}

/// A table call that failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct BoardError {
    /// Another write was on the same item at the same moment (DynamoDB's transaction conflict):
    /// the table answers, try again next round.
    pub busy: bool,
    pub message: String,
}

/// Where leases and answers live: the DynamoDB table in production (`store::dynamodb::fleet`),
/// an in-memory one in unit tests.
pub trait Board: Send + Sync + 'static {
    /// The leases of `keys`, in order (`None`: no lease item).
    fn leases<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Lease>>, BoardError>>;
    /// Takes or renews `key`'s lease until `until_ms`: only if there is none, it expired before
    /// `now_ms`, or it is `me`'s already. Keeps its version.
    fn claim<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        now_ms: u64,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Claim, BoardError>>;
    /// Gives `me`'s lease up at once (nothing if it is not `me`'s).
    fn release<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
    ) -> BoxFuture<'a, Result<(), BoardError>>;
    /// Publishes `answer` (its version `prev + 1`) and moves the lease's version to it, in one
    /// transaction, only if `me` holds the lease at version `prev`.
    fn publish<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        prev: u64,
        answer: &'a Answer,
    ) -> BoxFuture<'a, Result<Published, BoardError>>;
    /// The answers of `keys`, in order (`None`: none published).
    fn answers<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Answer>>, BoardError>>;
}

/// Wall-clock epoch milliseconds (a function, so paused-time tests can drive it).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// This agent in the fleet.
#[derive(Clone)]
pub struct Fleet {
    pub board: Arc<dyn Board>,
    /// This agent's name in leases: random per process, so a restarted agent is another holder.
    pub me: String,
    pub clock: Clock,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("me", &self.me).finish()
    }
}

impl Fleet {
    /// A fleet member on `board` with a fresh random name and the system clock.
    pub fn new(board: Arc<dyn Board>) -> Self {
        Fleet {
            board,
            me: uuid::Uuid::new_v4().to_string(),
            clock: system_clock(),
        }
    }
}

fn lease_of(cfg: &Config) -> Duration {
    cfg.poll.mul_f64(LEASE)
}

fn round_of(cfg: &Config) -> Duration {
    cfg.poll.mul_f64(ROUND)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A task polling Cloud Map for one key on this agent.
struct Task {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

impl Task {
    fn spawn(
        cancel: CancellationToken,
        fut: impl Future<Output = ()> + Send + 'static,
        span: tracing::Span,
    ) -> Self {
        Task {
            handle: tokio::spawn(fut.instrument(span)),
            cancel,
        }
    }
}

/// Who polls Cloud Map for a key, as far as this agent is concerned.
enum Role {
    /// Another agent (or nobody yet): this agent reads the answers from the table.
    Follower,
    /// This agent holds the lease.
    Holder(Task),
    /// The table does not answer: this agent polls for its own Envoys.
    Fallback(Task),
}

struct Key {
    /// When the last proxy needing it went away.
    idle_since: Option<Instant>,
    /// The version of the table's answer published here.
    applied: Option<u64>,
    role: Role,
}

struct Coordinator {
    fleet: Fleet,
    client: Arc<dyn CloudMap>,
    out: Arc<watch::Sender<Found>>,
    metrics: Arc<Metrics>,
    cfg: Config,
    cancel: CancellationToken,
    keys: HashMap<CloudMapKey, Key>,
    /// When the table started failing, while it does.
    failing_since: Option<Instant>,
    /// Every key not held here is polled here: the table has not answered for a lease.
    fallback: bool,
    /// When the table answered again after a fallback.
    recovered_at: Option<Instant>,
    /// Consecutive failed rounds in fallback (the probes back off).
    probe_failures: u32,
}

/// Runs until `cancel`: follows the table for every key this agent's proxies need, polls Cloud
/// Map for the keys whose lease it holds (or all of them while the table fails), and publishes
/// the answers on `out`. Held leases are given back on the way out.
#[allow(clippy::too_many_arguments)] // The local `run`'s inputs and the fleet.
pub async fn run(
    fleet: Fleet,
    client: Arc<dyn CloudMap>,
    mut state: watch::Receiver<Arc<State>>,
    mut proxies: watch::Receiver<BTreeSet<ProxyIdentity>>,
    out: Arc<watch::Sender<Found>>,
    metrics: Arc<Metrics>,
    cfg: Config,
    cancel: CancellationToken,
) {
    info!(agent = %fleet.me, "cloud map pollers shared through the table");
    let mut c = Coordinator {
        fleet,
        client,
        out,
        metrics,
        cfg,
        cancel,
        keys: HashMap::new(),
        failing_since: None,
        fallback: false,
        recovered_at: None,
        probe_failures: 0,
    };
    let mut next_round = Instant::now();
    loop {
        let wanted = {
            let s = state.borrow_and_update().clone();
            let p = proxies.borrow_and_update().clone();
            demand(&s, &p)
        };
        let now = Instant::now();
        if c.update_demand(&wanted, now) {
            // New keys: their Envoys need endpoints now, not next round.
            next_round = now;
        }
        if Instant::now() >= next_round {
            c.round().await;
            next_round = Instant::now() + c.interval();
        }
        c.report();
        let next_expiry = c
            .keys
            .values()
            .filter_map(|k| k.idle_since)
            .min()
            .map(|t| t + c.cfg.linger);
        let wake = next_expiry.map_or(next_round, |t| t.min(next_round));
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            changed = proxies.changed() => if changed.is_err() { break },
            () = sleep_until_opt(Some(wake)) => {}
            () = c.cancel.cancelled() => break,
        }
    }
    c.shutdown().await;
}

impl Coordinator {
    /// Tracks the keys in demand; a key nobody needed for the linger period goes (its lease
    /// given back, its endpoints withdrawn). Returns whether a key is new.
    fn update_demand(&mut self, wanted: &BTreeSet<CloudMapKey>, now: Instant) -> bool {
        let mut new = false;
        for key in wanted {
            match self.keys.get_mut(key) {
                Some(k) => k.idle_since = None,
                None => {
                    new = true;
                    let role = if self.fallback {
                        Role::Fallback(self.local_poller(key))
                    } else {
                        Role::Follower
                    };
                    self.keys.insert(
                        key.clone(),
                        Key {
                            idle_since: None,
                            applied: None,
                            role,
                        },
                    );
                }
            }
        }
        for (key, k) in &mut self.keys {
            if !wanted.contains(key) && k.idle_since.is_none() {
                k.idle_since = Some(now);
            }
        }
        let linger = self.cfg.linger;
        let expired: Vec<CloudMapKey> = self
            .keys
            .iter()
            .filter(|(_, k)| k.idle_since.is_some_and(|t| now >= t + linger))
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            let Some(k) = self.keys.remove(&key) else {
                continue;
            };
            // Stopped before the endpoints go, so a poller mid-call cannot put them back.
            match k.role {
                Role::Holder(t) | Role::Fallback(t) => t.cancel.cancel(),
                Role::Follower => {}
            }
            info!(key = %key, "no connected proxy needs this cloud map key any more");
            self.metrics.forget(&key);
            self.out.send_if_modified(|f| {
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
        new
    }

    /// The wait until the next round: half a poll interval (jittered), backing off while the
    /// table fails in a fallback.
    fn interval(&self) -> Duration {
        let base = round_of(&self.cfg);
        let base = if self.fallback && self.probe_failures > 0 {
            let factor = 2u32.saturating_pow(self.probe_failures.min(16));
            base.saturating_mul(factor).min(self.cfg.backoff_max)
        } else {
            base
        };
        let spread = fastrand::f64() * 2.0 - 1.0;
        base.mul_f64((1.0 + self.cfg.jitter * spread).max(0.0))
    }

    /// One round: holders that lost their lease become followers; the leases of every other key
    /// are read; free or expired ones claimed; answers whose version moved read and published.
    async fn round(&mut self) {
        let now = Instant::now();
        for (key, k) in &mut self.keys {
            if let Role::Holder(t) = &k.role
                && t.handle.is_finished()
            {
                info!(key = %key, "lease lost to another agent; following the table");
                k.role = Role::Follower;
                k.applied = None;
            }
        }
        // In a fallback the held keys are read too: they are the probe that ends it when every
        // key this agent needs is (by now) its own.
        let probe = self.fallback;
        let ask: Vec<CloudMapKey> = self
            .keys
            .iter()
            .filter(|(_, k)| probe || !matches!(k.role, Role::Holder(_)))
            .map(|(key, _)| key.clone())
            .collect();
        if ask.is_empty() {
            return;
        }
        let leases = match self.fleet.board.leases(&ask).await {
            Ok(l) => l,
            Err(e) => return self.table_failed(&e, now),
        };
        self.table_answered(now);
        let now_ms = (self.fleet.clock)();
        let mut read = Vec::new();
        for (key, lease) in ask.iter().zip(leases) {
            let Some(k) = self.keys.get(key) else {
                continue;
            };
            if matches!(k.role, Role::Holder(_)) {
                continue;
            }
            let in_grace = matches!(k.role, Role::Fallback(_)) && self.fallback;
            let free = lease
                .as_ref()
                .is_none_or(|l| l.until_ms < now_ms || l.holder == self.fleet.me);
            if free && k.idle_since.is_none() {
                match self.claim(key, lease.as_ref(), now_ms).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => return self.table_failed(&e, now),
                }
            } else if in_grace {
                continue;
            }
            let Some(k) = self.keys.get(key) else {
                continue;
            };
            if let Some(l) = &lease
                && l.version > 0
                && k.applied.is_none_or(|a| l.version > a)
                && matches!(k.role, Role::Follower)
            {
                read.push(key.clone());
            }
        }
        if read.is_empty() {
            return;
        }
        match self.fleet.board.answers(&read).await {
            Ok(answers) => {
                for (key, answer) in read.iter().zip(answers) {
                    if let Some(a) = answer {
                        self.apply(key, &a);
                    }
                }
            }
            Err(e) => self.table_failed(&e, now),
        }
    }

    /// Claims `key`; whether this agent holds it now.
    async fn claim(
        &mut self,
        key: &CloudMapKey,
        seen: Option<&Lease>,
        now_ms: u64,
    ) -> Result<bool, BoardError> {
        let until = now_ms + ms(lease_of(&self.cfg));
        let me = self.fleet.me.clone();
        match self.fleet.board.claim(key, &me, now_ms, until).await {
            Ok(Claim::Mine(lease)) => {
                let takeover = seen.is_some_and(|l| l.holder != me);
                self.metrics.lease_claimed(takeover);
                info!(key = %key, version = lease.version, takeover, previous = seen.map(|l| l.holder.as_str()),
                    "holding the cloud map lease: polling for the fleet");
                let task = self.holder(key, lease.version);
                if let Some(k) = self.keys.get_mut(key) {
                    if let Role::Fallback(t) = std::mem::replace(&mut k.role, Role::Holder(task)) {
                        t.cancel.cancel();
                    }
                } else {
                    task.cancel.cancel();
                }
                Ok(true)
            }
            Ok(Claim::Taken) => {
                debug!(key = %key, "another agent claimed the lease first");
                Ok(false)
            }
            Err(e) if e.busy => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Publishes the table's answer for `key` here, as a local poller would have.
    fn apply(&mut self, key: &CloudMapKey, answer: &Answer) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if !matches!(k.role, Role::Follower) || k.applied.is_some_and(|a| answer.version <= a) {
            return;
        }
        k.applied = Some(answer.version);
        self.metrics.answer_applied();
        match &answer.instances {
            Some(i) => {
                if poller::answered(&self.out, key, i.clone(), &self.cancel, &self.metrics) {
                    info!(key = %key, instances = i.len(), version = answer.version,
                        "cloud map endpoints changed (from the table)");
                }
            }
            None => poller::unanswered(&self.out, key, &self.cancel),
        }
    }

    fn table_failed(&mut self, e: &BoardError, now: Instant) {
        self.metrics.table_failed();
        self.recovered_at = None;
        let since = *self.failing_since.get_or_insert(now);
        if self.fallback {
            self.probe_failures = self.probe_failures.saturating_add(1);
            if self.probe_failures.is_multiple_of(10) {
                warn!(error = %e, failures = self.probe_failures, "the table still does not answer");
            }
            return;
        }
        warn!(error = %e, "the table does not answer; the last endpoints stay");
        if now.duration_since(since) < lease_of(&self.cfg) {
            return;
        }
        warn!(
            "the table has not answered for a lease: polling Cloud Map for this agent's own \
             Envoys until it does"
        );
        self.fallback = true;
        self.probe_failures = 1;
        let followed: Vec<CloudMapKey> = self
            .keys
            .iter()
            .filter(|(_, k)| matches!(k.role, Role::Follower))
            .map(|(key, _)| key.clone())
            .collect();
        for key in followed {
            let task = self.local_poller(&key);
            if let Some(k) = self.keys.get_mut(&key) {
                k.role = Role::Fallback(task);
            }
        }
    }

    fn table_answered(&mut self, now: Instant) {
        self.failing_since = None;
        if !self.fallback {
            return;
        }
        self.probe_failures = 0;
        let since = *self.recovered_at.get_or_insert_with(|| {
            info!("the table answers again");
            now
        });
        if now.duration_since(since) < self.cfg.poll * GRACE {
            return;
        }
        info!("following the table again");
        self.fallback = false;
        self.recovered_at = None;
        for k in self.keys.values_mut() {
            if matches!(k.role, Role::Fallback(_))
                && let Role::Fallback(t) = std::mem::replace(&mut k.role, Role::Follower)
            {
                t.cancel.cancel();
                // Read afresh: the table's answer is at least as new as this agent's by now.
                k.applied = None;
            }
        }
    }

    fn local_poller(&self, key: &CloudMapKey) -> Task {
        let cancel = self.cancel.child_token();
        self.metrics.poller_started();
        Task::spawn(
            cancel.clone(),
            poller::run(
                key.clone(),
                self.client.clone(),
                self.out.clone(),
                self.metrics.clone(),
                self.cfg,
                cancel,
            ),
            info_span!("cloudmap_poller", key = %key, fallback = true),
        )
    }

    fn holder(&self, key: &CloudMapKey, version: u64) -> Task {
        let cancel = self.cancel.child_token();
        self.metrics.poller_started();
        let h = Holder {
            key: key.clone(),
            fleet: self.fleet.clone(),
            client: self.client.clone(),
            out: self.out.clone(),
            metrics: self.metrics.clone(),
            cfg: self.cfg,
            cancel: cancel.clone(),
        };
        Task::spawn(
            cancel,
            h.run(version),
            info_span!("cloudmap_poller", key = %key, lease = true),
        )
    }

    fn report(&self) {
        let held = self
            .keys
            .values()
            .filter(|k| matches!(k.role, Role::Holder(_)))
            .count();
        let fallback = self
            .keys
            .values()
            .filter(|k| matches!(k.role, Role::Fallback(_)))
            .count();
        self.metrics.set_pollers(held + fallback);
        self.metrics.set_fleet(held, self.fallback);
    }

    /// Stops every poller; holders give their leases back (bounded) so another agent takes over
    /// at once rather than after the lease runs out.
    async fn shutdown(self) {
        let handles: Vec<JoinHandle<()>> = self
            .keys
            .into_values()
            .filter_map(|k| match k.role {
                Role::Holder(t) | Role::Fallback(t) => {
                    t.cancel.cancel();
                    Some(t.handle)
                }
                Role::Follower => None,
            })
            .collect();
        let all = futures::future::join_all(handles);
        let _ = tokio::time::timeout(RELEASE_WAIT * 2, all).await;
    }
}

/// The poller of a key whose lease this agent holds.
struct Holder {
    key: CloudMapKey,
    fleet: Fleet,
    client: Arc<dyn CloudMap>,
    out: Arc<watch::Sender<Found>>,
    metrics: Arc<Metrics>,
    cfg: Config,
    cancel: CancellationToken,
}

impl Holder {
    /// Polls and renews until the lease is lost (then ends) or `cancel` (then gives it back).
    async fn run(self, version: u64) {
        tokio::select! {
            () = self.renew() => {}
            () = self.poll(version) => {}
            () = self.cancel.cancelled() => {
                let released = tokio::time::timeout(
                    RELEASE_WAIT,
                    self.fleet.board.release(&self.key, &self.fleet.me),
                )
                .await;
                match released {
                    Ok(Ok(())) => debug!("lease given back"),
                    Ok(Err(e)) => debug!(error = %e, "could not give the lease back; it expires"),
                    Err(_) => debug!("the table did not take the lease back in time; it expires"),
                }
            }
        }
    }

    /// Renews every round; returns when another agent holds the lease.
    async fn renew(&self) {
        let lease = lease_of(&self.cfg);
        loop {
            tokio::time::sleep(round_of(&self.cfg)).await;
            let now = (self.fleet.clock)();
            match self
                .fleet
                .board
                .claim(&self.key, &self.fleet.me, now, now + ms(lease))
                .await
            {
                Ok(Claim::Mine(_)) => {}
                Ok(Claim::Taken) => {
                    info!("another agent took the lease over");
                    return;
                }
                Err(e) => {
                    if !e.busy {
                        self.metrics.table_failed();
                    }
                    debug!(error = %e, "lease renewal failed; trying again next round");
                }
            }
        }
    }

    /// Polls Cloud Map as a local poller does, and publishes what changed to the table too;
    /// returns when the table says the lease is another agent's.
    async fn poll(&self, mut version: u64) {
        // What the table holds now: the previous holder's answer is this one's starting point,
        // so the same answer again is no new version, and a failure never replaces it.
        let (seed, mut board_has, published_ms_of_seed) = match self
            .fleet
            .board
            .answers(std::slice::from_ref(&self.key))
            .await
        {
            Ok(mut a) => match a.pop().flatten() {
                Some(a) => (a.instances.clone(), Some(a.instances), Some(a.fetched_ms)),
                None => (None, None, None),
            },
            Err(_) => (None, None, None),
        };
        // Served here as a follower would have: it is the fleet's newest answer.
        match &board_has {
            Some(Some(i)) => {
                poller::answered(&self.out, &self.key, i.clone(), &self.cancel, &self.metrics);
            }
            Some(None) => poller::unanswered(&self.out, &self.key, &self.cancel),
            None => {}
        }
        let mut st = PollState::seeded(seed);
        let mut published_ms = published_ms_of_seed;
        loop {
            match st
                .tick(&self.key, self.client.as_ref(), &self.metrics, &self.cfg)
                .await
            {
                Outcome::Unchanged => debug!("unchanged"),
                Outcome::Changed(instances) => {
                    let n = instances.len();
                    if poller::answered(
                        &self.out,
                        &self.key,
                        instances,
                        &self.cancel,
                        &self.metrics,
                    ) {
                        info!(instances = n, "cloud map endpoints changed");
                    }
                }
                Outcome::Failed(op, e) => {
                    self.metrics.failed(op, e.kind);
                    poller::unanswered(&self.out, &self.key, &self.cancel);
                    warn!(op, reason = e.kind.label(), error = %e, failures = st.failures,
                        hint = e.kind.hint(), "cloud map call failed; keeping the last known endpoints");
                }
            }
            let want = match &st.instances {
                Some(i) => Some(Some(i.clone())),
                None if st.failures > 0 => Some(None),
                None => None,
            };
            // Republished after a good round only: its time says when it was last confirmed.
            let now_ms = (self.fleet.clock)();
            let stale = st.failures == 0
                && published_ms.is_none_or(|t| now_ms.saturating_sub(t) >= ms(REPUBLISH));
            let due = match (&want, &board_has) {
                (None, _) => false,
                // Never a failure over an answer: the last known endpoints stay.
                (Some(None), Some(Some(_))) => false,
                (Some(w), Some(h)) => w != h || stale,
                (Some(_), None) => true,
            };
            if due && let Some(w) = want {
                let answer = Answer {
                    version: version + 1,
                    instances: w.clone(),
                    fetched_ms: now_ms,
                };
                match self
                    .fleet
                    .board
                    .publish(&self.key, &self.fleet.me, version, &answer)
                    .await
                {
                    Ok(Published::Done) => {
                        version += 1;
                        board_has = Some(w);
                        published_ms = Some(now_ms);
                        self.metrics.answer_published();
                        debug!(version, "answer published to the table");
                    }
                    Ok(Published::Lost) => {
                        info!("the lease is another agent's: not publishing");
                        return;
                    }
                    Err(e) => {
                        if !e.busy {
                            self.metrics.table_failed();
                        }
                        warn!(error = %e, "cannot publish the answer to the table; trying again next round");
                    }
                }
            }
            let wait = st.delay(&self.cfg, fastrand::f64() * 2.0 - 1.0);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests;
