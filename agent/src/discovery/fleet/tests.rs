//! Shared pollers against an in-memory table and a scripted Cloud Map (paused clock): one poller
//! for many agents, takeover of a dead holder within two poll intervals, every agent polling for
//! itself while the table fails and following it again after, and no endpoint ever withdrawn.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::discovery::{CallError, Discovered, FailureKind};

// === the table ===

#[derive(Default)]
struct Table {
    leases: HashMap<CloudMapKey, Lease>,
    answers: HashMap<CloudMapKey, Answer>,
    /// Every call fails (the table is unreachable).
    down: bool,
    /// Agents whose calls never arrive (they died).
    dead: HashSet<String>,
    /// (who, when) of every successful claim that changed the holder.
    claims: Vec<(String, Instant)>,
}

#[derive(Default)]
struct MemBoard(Mutex<Table>);

impl MemBoard {
    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }

    fn holder(&self, k: &CloudMapKey) -> Option<String> {
        self.with(|t| t.leases.get(k).map(|l| l.holder.clone()))
    }

    /// Fails like an unreachable table, or never returns for a dead agent.
    async fn gate(&self, me: Option<&str>) -> Result<(), BoardError> {
        let (down, dead) = self.with(|t| (t.down, me.is_some_and(|m| t.dead.contains(m))));
        if dead {
            std::future::pending::<()>().await;
        }
        if down {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(BoardError {
                busy: false,
                message: "the table is down".into(),
            });
        }
        Ok(())
    }
}

impl Board for MemBoard {
    fn leases<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Lease>>, BoardError>> {
        Box::pin(async move {
            self.gate(None).await?;
            Ok(self.with(|t| keys.iter().map(|k| t.leases.get(k).cloned()).collect()))
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        now_ms: u64,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Claim, BoardError>> {
        Box::pin(async move {
            self.gate(Some(me)).await?;
            Ok(self.with(|t| {
                let lease = t.leases.entry(key.clone()).or_insert(Lease {
                    holder: String::new(),
                    until_ms: 0,
                    version: 0,
                });
                if !lease.holder.is_empty() && lease.until_ms >= now_ms && lease.holder != me {
                    return Claim::Taken;
                }
                if lease.holder != me {
                    t.claims.push((me.to_string(), Instant::now()));
                }
                lease.holder = me.to_string();
                lease.until_ms = until_ms;
                Claim::Mine(lease.clone())
            }))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
    ) -> BoxFuture<'a, Result<(), BoardError>> {
        Box::pin(async move {
            self.gate(Some(me)).await?;
            self.with(|t| {
                if let Some(l) = t.leases.get_mut(key)
                    && l.holder == me
                {
                    l.until_ms = 0;
                }
            });
            Ok(())
        })
    }

    fn publish<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        prev: u64,
        answer: &'a Answer,
    ) -> BoxFuture<'a, Result<Published, BoardError>> {
        Box::pin(async move {
            self.gate(Some(me)).await?;
            Ok(self.with(|t| match t.leases.get_mut(key) {
                Some(l) if l.holder == me && l.version == prev => {
                    l.version = answer.version;
                    t.answers.insert(key.clone(), answer.clone());
                    Published::Done
                }
                _ => Published::Lost,
            }))
        })
    }

    fn answers<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Answer>>, BoardError>> {
        Box::pin(async move {
            self.gate(None).await?;
            Ok(self.with(|t| keys.iter().map(|k| t.answers.get(k).cloned()).collect()))
        })
    }
}

// === Cloud Map ===

#[derive(Default)]
struct Script {
    revision: i64,
    instances: Vec<Instance>,
    fail: bool,
}

/// One agent's Cloud Map client over a shared script, counting its own calls.
struct Client {
    script: Arc<Mutex<Script>>,
    calls: AtomicU32,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl Client {
    async fn call<T>(&self, f: impl FnOnce(&Script) -> T) -> Result<T, CallError> {
        if self.dead.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let s = self.script.lock().unwrap();
        if s.fail {
            return Err(CallError {
                kind: FailureKind::Unreachable,
                message: "scripted".into(),
            });
        }
        Ok(f(&s))
    }
}

impl CloudMap for Client {
    fn discover<'a>(&'a self, _: &'a CloudMapKey) -> BoxFuture<'a, Result<Discovered, CallError>> {
        Box::pin(self.call(|s| Discovered {
            instances: s.instances.clone(),
        }))
    }

    fn revision<'a>(&'a self, _: &'a CloudMapKey) -> BoxFuture<'a, Result<i64, CallError>> {
        Box::pin(self.call(|s| s.revision))
    }
}

// === agents ===

const POLL: Duration = Duration::from_secs(1);

fn cfg() -> Config {
    Config {
        poll: POLL,
        refresh: Duration::from_secs(10),
        jitter: 0.1,
        backoff_max: Duration::from_secs(8),
        linger: Duration::from_secs(3),
        // Polls at `poll` throughout: the lease timings are what is measured here.
        churn_poll: POLL,
        churn_window: Duration::ZERO,
    }
}

fn key() -> CloudMapKey {
    CloudMapKey {
        namespace: "ns".into(),
        service: "s".into(),
        attributes: Default::default(),
    }
}

fn inst(id: &str, last: u8) -> Instance {
    Instance {
        id: id.into(),
        ipv4: Some(Ipv4Addr::new(10, 0, 0, last)),
        ipv6: None,
    }
}

fn proxy(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).unwrap()
}

/// `front` calls `back` (Cloud Map ns/s).
fn state() -> Arc<State> {
    Arc::new(crate::test_helpers::mesh_state(
        json!({}),
        &[
            (
                "back",
                json!({
                    "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                    "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "s"}}
                }),
            ),
            (
                "front",
                json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}),
            ),
        ],
        &[("back.local", "back")],
    ))
}

struct Agent {
    me: String,
    client: Arc<Client>,
    found: watch::Receiver<Found>,
    metrics: Arc<Metrics>,
    proxies: watch::Sender<BTreeSet<ProxyIdentity>>,
    _state: watch::Sender<Arc<State>>,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn instances(&self) -> Vec<String> {
        self.found
            .borrow()
            .endpoints
            .get(&key())
            .iter()
            .map(|i| i.id.clone())
            .collect()
    }

    fn calls(&self) -> u32 {
        self.client.calls.load(Ordering::SeqCst)
    }
}

/// An agent named `name` whose `front` Envoy is connected, on `board` and `script`.
fn agent(name: &str, board: &Arc<MemBoard>, script: &Arc<Mutex<Script>>) -> Agent {
    let client = Arc::new(Client {
        script: script.clone(),
        calls: AtomicU32::new(0),
        dead: Arc::default(),
    });
    let (state_tx, state_rx) = watch::channel(state());
    let (proxies_tx, proxies_rx) = watch::channel([proxy("front")].into());
    let (out_tx, found) = watch::channel(Found::default());
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    let base = Instant::now();
    let fleet = Fleet {
        board: board.clone(),
        me: name.to_string(),
        // Wall-clock time that the paused clock drives.
        clock: Arc::new(move || 1_700_000_000_000 + base.elapsed().as_millis() as u64),
    };
    let handle = tokio::spawn(run(
        fleet,
        client.clone(),
        state_rx,
        proxies_rx,
        Arc::new(out_tx),
        metrics.clone(),
        cfg(),
        cancel.clone(),
    ));
    Agent {
        me: name.to_string(),
        client,
        found,
        metrics,
        proxies: proxies_tx,
        _state: state_tx,
        cancel,
        handle,
    }
}

fn script(instances: Vec<Instance>) -> Arc<Mutex<Script>> {
    Arc::new(Mutex::new(Script {
        revision: 1,
        instances,
        fail: false,
    }))
}

/// Sleeps `total` in steps of 100 ms, checking `ok` on every agent after each step.
async fn watching(total: Duration, agents: &[&Agent], ok: impl Fn(&Agent) -> bool, what: &str) {
    let end = Instant::now() + total;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for a in agents {
            assert!(ok(a), "{}: {what}: has {:?}", a.me, a.instances());
        }
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn five_agents_cost_what_one_costs_in_cloud_map_calls_and_all_serve_the_answer() {
    let alone = {
        let board = Arc::new(MemBoard::default());
        let a = agent("alone", &board, &script(vec![inst("a", 1)]));
        tokio::time::sleep(Duration::from_secs(60)).await;
        a.cancel.cancel();
        a.calls()
    };
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let agents: Vec<Agent> = (0..5)
        .map(|i| agent(&format!("agent{i}"), &board, &cm))
        .collect();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls: u32 = agents.iter().map(Agent::calls).sum();
    assert!(
        f64::from(calls) <= 1.3 * f64::from(alone),
        "five agents made {calls} Cloud Map calls, one alone {alone}"
    );
    let pollers = agents.iter().filter(|a| a.calls() > 0).count();
    assert_eq!(pollers, 1, "one agent polls for all");
    for a in &agents {
        assert_eq!(a.instances(), vec!["a"], "{} serves the answer", a.me);
    }
    // A change reaches every agent through the table.
    {
        let mut s = cm.lock().unwrap();
        s.revision = 2;
        s.instances = vec![inst("a", 1), inst("b", 2)];
    }
    tokio::time::sleep(POLL * 2).await;
    for a in &agents {
        assert_eq!(a.instances(), vec!["a", "b"], "{} has the change", a.me);
    }
    let follower = agents.iter().find(|a| a.calls() == 0).unwrap();
    assert!(
        follower
            .metrics
            .render()
            .contains("trellis_cloudmap_answers_applied_total 2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_replaced_within_two_poll_intervals_and_no_endpoint_is_dropped() {
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let agents: Vec<Agent> = (0..3)
        .map(|i| agent(&format!("agent{i}"), &board, &cm))
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let holder = board.holder(&key()).expect("a holder");
    let dead = agents.iter().find(|a| a.me == holder).unwrap();
    // It dies: no call of it arrives anywhere any more.
    dead.client.dead.store(true, Ordering::SeqCst);
    board.with(|t| t.dead.insert(holder.clone()));
    let died = Instant::now();
    let living: Vec<&Agent> = agents.iter().filter(|a| a.me != holder).collect();
    watching(
        POLL * 2,
        &living,
        |a| a.instances() == vec!["a"],
        "the endpoints stay through the takeover",
    )
    .await;
    let (next, at) = board.with(|t| t.claims.last().cloned()).unwrap();
    assert_ne!(next, holder, "another agent holds the lease");
    let took = at.duration_since(died);
    assert!(
        took <= POLL * 2,
        "taken over {took:?} after the holder died"
    );
    // And the new holder polls: a change reaches the living agents.
    {
        let mut s = cm.lock().unwrap();
        s.revision = 2;
        s.instances = vec![inst("b", 2)];
    }
    tokio::time::sleep(POLL * 3).await;
    for a in &living {
        assert_eq!(a.instances(), vec!["b"], "{}", a.me);
    }
}

#[tokio::test(start_paused = true)]
async fn while_the_table_fails_every_agent_polls_its_own_demand_then_follows_again() {
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let agents: Vec<Agent> = (0..3)
        .map(|i| agent(&format!("agent{i}"), &board, &cm))
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<u32> = agents.iter().map(Agent::calls).collect();
    board.with(|t| t.down = true);
    let all: Vec<&Agent> = agents.iter().collect();
    watching(
        POLL * 5,
        &all,
        |a| a.instances() == vec!["a"],
        "the endpoints stay while the table fails",
    )
    .await;
    for (a, b) in agents.iter().zip(&before) {
        assert!(a.calls() > *b + 1, "{} polls for itself", a.me);
        // The holder polls anyway; the others poll for their own Envoys.
        let (held, fallback) = a.metrics.fleet_state().unwrap();
        assert!(held == 1 || fallback, "{} is in fallback", a.me);
    }
    // Cloud Map changes while the table is down: every agent sees it by itself.
    {
        let mut s = cm.lock().unwrap();
        s.revision = 2;
        s.instances = vec![inst("a", 1), inst("c", 3)];
    }
    tokio::time::sleep(POLL * 3).await;
    for a in &agents {
        assert_eq!(a.instances(), vec!["a", "c"], "{}", a.me);
    }
    // The table answers again: after the grace, one poller for all, and nothing dropped.
    board.with(|t| t.down = false);
    watching(
        POLL * 20,
        &all,
        |a| a.instances() == vec!["a", "c"],
        "the endpoints stay as the table comes back",
    )
    .await;
    let after: Vec<u32> = agents.iter().map(Agent::calls).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let polling = agents
        .iter()
        .zip(&after)
        .filter(|(a, n)| a.calls() > **n)
        .count();
    assert_eq!(polling, 1, "one poller again");
    for a in &agents {
        assert!(
            !a.metrics.fleet_state().unwrap().1,
            "{} follows the table",
            a.me
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_takes_the_lease_over_in_a_fallback_leaves_the_fallback() {
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let agents: Vec<Agent> = (0..2)
        .map(|i| agent(&format!("agent{i}"), &board, &cm))
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let holder = board.holder(&key()).expect("a holder");
    board.with(|t| t.down = true);
    tokio::time::sleep(POLL * 5).await;
    let other = agents.iter().find(|a| a.me != holder).unwrap();
    assert!(other.metrics.fleet_state().unwrap().1, "in fallback");
    // The holder dies while the table fails; once it answers, the other agent takes over.
    let dead = agents.iter().find(|a| a.me == holder).unwrap();
    dead.client.dead.store(true, Ordering::SeqCst);
    board.with(|t| {
        t.dead.insert(holder.clone());
        t.down = false;
    });
    watching(
        POLL * 10,
        &[other],
        |a| a.instances() == vec!["a"],
        "the endpoints stay through the takeover",
    )
    .await;
    assert_eq!(board.holder(&key()).as_deref(), Some(other.me.as_str()));
    assert_eq!(
        other.metrics.fleet_state().unwrap(),
        (1, false),
        "holds the lease and follows the table"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_holder_starts_from_the_tables_answer_and_never_publishes_a_failure_over_it() {
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let first = agent("first", &board, &cm);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = board.with(|t| t.answers[&key()].version);
    // The holder leaves (its lease given back), Cloud Map starts failing, another agent comes.
    cm.lock().unwrap().fail = true;
    first.cancel.cancel();
    let _ = first.handle.await;
    let second = agent("second", &board, &cm);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(board.holder(&key()).as_deref(), Some("second"));
    assert_eq!(
        second.instances(),
        vec!["a"],
        "served from the table's answer"
    );
    assert!(second.found.borrow().unanswered.is_empty());
    let a = board.with(|t| t.answers[&key()].clone());
    assert_eq!(
        (a.version, a.instances.map(|i| i.len())),
        (published, Some(1)),
        "no failure was published over the answer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_nobody_needs_any_more_is_given_back_and_taken_by_an_agent_that_does() {
    let board = Arc::new(MemBoard::default());
    let cm = script(vec![inst("a", 1)]);
    let a = agent("a", &board, &cm);
    settle().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = agent("b", &board, &cm);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(board.holder(&key()).as_deref(), Some("a"));
    // a's Envoy leaves; after the linger a gives the lease back and b takes it at once.
    a.proxies.send_replace(BTreeSet::new());
    tokio::time::sleep(cfg().linger + POLL).await;
    assert_eq!(board.holder(&key()).as_deref(), Some("b"));
    assert!(a.instances().is_empty(), "a withdrew what nobody needs");
    assert_eq!(b.instances(), vec!["a"]);
    assert_eq!(a.metrics.fleet_state(), Some((0, false)));
}
