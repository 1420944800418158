//! The pollers' rules against a scripted Cloud Map (paused clock): revision gating, refresh,
//! backoff, last-known-good, one poller per key whatever the number of proxies, linger.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::poller::{Outcome, PollState};
use super::*;
use trellis_model::ProxyIdentity;

#[derive(Default)]
struct Script {
    revision: i64,
    instances: Vec<Instance>,
    fail: Option<FailureKind>,
    revision_calls: u32,
    discover_calls: u32,
}

#[derive(Default)]
struct Fake(Mutex<Script>);

impl Fake {
    fn with<R>(&self, f: impl FnOnce(&mut Script) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
    fn calls(&self) -> (u32, u32) {
        self.with(|s| (s.revision_calls, s.discover_calls))
    }
}

fn err(kind: FailureKind) -> CallError {
    CallError {
        kind,
        message: format!("scripted {}", kind.label()),
    }
}

impl CloudMap for Fake {
    fn discover<'a>(&'a self, _: &'a CloudMapKey) -> BoxFuture<'a, Result<Discovered, CallError>> {
        let r = self.with(|s| {
            s.discover_calls += 1;
            match s.fail {
                Some(k) => Err(err(k)),
                None => Ok(Discovered {
                    instances: s.instances.clone(),
                }),
            }
        });
        Box::pin(async move { r })
    }

    fn revision<'a>(&'a self, _: &'a CloudMapKey) -> BoxFuture<'a, Result<i64, CallError>> {
        let r = self.with(|s| {
            s.revision_calls += 1;
            match s.fail {
                Some(k) => Err(err(k)),
                None => Ok(s.revision),
            }
        });
        Box::pin(async move { r })
    }
}

fn inst(id: &str, last: u8) -> Instance {
    Instance {
        id: id.into(),
        ipv4: Some(Ipv4Addr::new(10, 0, 0, last)),
        ipv6: None,
    }
}

fn key(service: &str) -> CloudMapKey {
    CloudMapKey {
        namespace: "ns".into(),
        service: service.into(),
        attributes: Default::default(),
    }
}

fn cfg() -> Config {
    Config {
        poll: Duration::from_secs(1),
        refresh: Duration::from_secs(10),
        jitter: 0.0,
        backoff_max: Duration::from_secs(8),
        linger: Duration::from_secs(5),
        churn_poll: Duration::from_secs(1),
        churn_window: Duration::ZERO,
    }
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_revision_costs_one_call_and_the_refresh_fetches_anyway() {
    let fake = Fake::default();
    fake.with(|s| s.instances = vec![inst("a", 1)]);
    let (m, c, k) = (Metrics::default(), cfg(), key("s"));
    let mut st = PollState::default();
    assert!(matches!(st.tick(&k, &fake, &m, &c).await, Outcome::Changed(i) if i.len() == 1));
    assert_eq!(fake.calls(), (1, 1));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(
        st.tick(&k, &fake, &m, &c).await,
        Outcome::Unchanged
    ));
    assert_eq!(fake.calls(), (2, 1), "same revision: no DiscoverInstances");
    // Health changed: the instance set moves, the revision does not; the refresh finds it.
    fake.with(|s| s.instances = vec![inst("a", 1), inst("b", 2)]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(
        st.tick(&k, &fake, &m, &c).await,
        Outcome::Unchanged
    ));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(matches!(st.tick(&k, &fake, &m, &c).await, Outcome::Changed(i) if i.len() == 2));
    assert_eq!(fake.calls(), (4, 2));
}

#[tokio::test(start_paused = true)]
async fn a_moved_revision_fetches_even_when_it_went_down() {
    let fake = Fake::default();
    fake.with(|s| {
        s.revision = 5;
        s.instances = vec![inst("a", 1)];
    });
    let (m, c, k) = (Metrics::default(), cfg(), key("s"));
    let mut st = PollState::default();
    st.tick(&k, &fake, &m, &c).await;
    // moto's revision is not monotonic: any difference means "look again".
    fake.with(|s| {
        s.revision = 3;
        s.instances = vec![inst("b", 2)];
    });
    assert!(matches!(st.tick(&k, &fake, &m, &c).await, Outcome::Changed(i) if i[0].id == "b"));
}

#[tokio::test(start_paused = true)]
async fn the_order_cloud_map_answers_in_is_not_a_change() {
    let fake = Fake::default();
    fake.with(|s| s.instances = vec![inst("a", 1), inst("b", 2)]);
    let (m, c, k) = (Metrics::default(), cfg(), key("s"));
    let mut st = PollState::default();
    st.tick(&k, &fake, &m, &c).await;
    fake.with(|s| {
        s.instances.reverse();
        s.revision = 9;
    });
    assert!(matches!(
        st.tick(&k, &fake, &m, &c).await,
        Outcome::Unchanged
    ));
}

#[test]
fn failures_back_off_exponentially_up_to_the_maximum_and_success_resets() {
    let c = cfg();
    let mut st = PollState::default();
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(1));
    let waits: Vec<u64> = (1..=5)
        .map(|n| {
            st.failures = n;
            st.delay(&c, 0.0).as_secs()
        })
        .collect();
    assert_eq!(waits, vec![2, 4, 8, 8, 8]);
    st.failures = 0;
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(1));
    let jittered = Config { jitter: 0.1, ..c };
    assert_eq!(st.delay(&jittered, 1.0), Duration::from_millis(1100));
    assert_eq!(st.delay(&jittered, -1.0), Duration::from_millis(900));
}

#[tokio::test(start_paused = true)]
async fn a_changed_service_is_checked_at_the_churn_interval_until_the_window_passes() {
    let fake = Fake::default();
    fake.with(|s| s.instances = vec![inst("a", 1)]);
    let (m, k) = (Metrics::default(), key("s"));
    let c = Config {
        poll: Duration::from_secs(5),
        churn_poll: Duration::from_secs(1),
        churn_window: Duration::from_secs(30),
        ..cfg()
    };
    let mut st = PollState::default();
    st.tick(&k, &fake, &m, &c).await;
    assert_eq!(
        st.delay(&c, 0.0),
        Duration::from_secs(5),
        "the first answer is no churn"
    );
    fake.with(|s| {
        s.revision = 2;
        s.instances = vec![inst("a", 1), inst("b", 2)];
    });
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(matches!(
        st.tick(&k, &fake, &m, &c).await,
        Outcome::Changed(_)
    ));
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(5), "window over");
    // Failures still back off from the normal interval.
    st.failures = 1;
    assert_eq!(st.delay(&c, 0.0), Duration::from_secs(8));
}

/// A poller publishing into a channel, with the fake behind it.
async fn poller(fake: Arc<Fake>) -> (watch::Receiver<Found>, Arc<Metrics>, CancellationToken) {
    let (tx, rx) = watch::channel(Found::default());
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    tokio::spawn(poller::run(
        key("s"),
        fake,
        Arc::new(tx),
        metrics.clone(),
        cfg(),
        cancel.clone(),
    ));
    (rx, metrics, cancel)
}

#[tokio::test(start_paused = true)]
async fn failures_keep_the_last_known_endpoints_and_recovery_picks_up_changes() {
    let fake = Arc::new(Fake::default());
    fake.with(|s| s.instances = vec![inst("a", 1)]);
    let (mut rx, metrics, cancel) = poller(fake.clone()).await;
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow().endpoints.get(&key("s")).len(), 1);
    let published = rx.borrow().endpoints.generation;

    fake.with(|s| s.fail = Some(FailureKind::Throttled));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (revisions_while_failing, _) = fake.calls();
    assert_eq!(
        rx.borrow().endpoints.generation,
        published,
        "nothing published while failing"
    );
    assert_eq!(
        rx.borrow().endpoints.get(&key("s")).len(),
        1,
        "last known endpoints kept"
    );
    assert!(metrics.render().contains(
        "trellis_cloudmap_failures_total{op=\"DiscoverInstancesRevision\",reason=\"throttled\"}"
    ));
    // Backed off: 30 s at 1 s polls would be ~30 calls; 2+4+8+8+8 s waits fit 5 or 6.
    assert!(
        revisions_while_failing <= 8,
        "{revisions_while_failing} calls in 30 s"
    );

    fake.with(|s| {
        s.fail = None;
        s.revision = 2;
        s.instances = vec![inst("a", 1), inst("b", 2)];
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rx.borrow().endpoints.get(&key("s")).len(), 2);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_key_whose_first_call_fails_is_known_empty_and_unanswered_until_an_answer() {
    let fake = Arc::new(Fake::default());
    fake.with(|s| s.fail = Some(FailureKind::Unreachable));
    let (rx, _metrics, cancel) = poller(fake.clone()).await;
    assert!(
        !rx.borrow().endpoints.cloud_map.contains_key(&key("s")),
        "before any call the key is undiscovered (no assignment is sent)"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        rx.borrow()
            .endpoints
            .cloud_map
            .get(&key("s"))
            .map(|i| i.len()),
        Some(0),
        "after a failed first call: known empty, so no Envoy waits on it"
    );
    assert!(
        rx.borrow().unanswered.contains(&key("s")),
        "and unanswered, so an Envoy that has its endpoints keeps them"
    );
    fake.with(|s| {
        s.fail = None;
        s.instances = vec![inst("a", 1)];
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(rx.borrow().endpoints.get(&key("s")).len(), 1);
    assert!(rx.borrow().unanswered.is_empty());
    // A failure after an answer changes nothing: the key stays answered.
    fake.with(|s| s.fail = Some(FailureKind::Throttled));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(rx.borrow().endpoints.get(&key("s")).len(), 1);
    assert!(rx.borrow().unanswered.is_empty());
    cancel.cancel();
}

fn proxy(name: &str) -> ProxyIdentity {
    ProxyIdentity::parse(&format!("mesh/m/virtualNode/{name}")).unwrap()
}

/// `a` and `b` both call `back` (Cloud Map ns/s); `c` calls nothing.
fn state() -> Arc<State> {
    let backend = json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]});
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
            ("a", backend.clone()),
            ("b", backend),
            ("c", json!({})),
        ],
        &[("back.local", "back")],
    ))
}

#[tokio::test(start_paused = true)]
async fn proxies_sharing_a_service_share_one_poller_which_lingers_then_stops() {
    let fake = Arc::new(Fake::default());
    fake.with(|s| s.instances = vec![inst("a", 1)]);
    let (_state_tx, state_rx) = watch::channel(state());
    let (proxies_tx, proxies_rx) = watch::channel(BTreeSet::new());
    let (out_tx, mut out) = watch::channel(Found::default());
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    tokio::spawn(run(
        fake.clone(),
        state_rx,
        proxies_rx,
        Arc::new(out_tx),
        metrics.clone(),
        cfg(),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.calls(), (0, 0), "nobody connected, nothing polled");

    proxies_tx.send_replace([proxy("a"), proxy("b"), proxy("c")].into());
    out.changed().await.unwrap();
    assert_eq!(out.borrow().endpoints.get(&key("s")).len(), 1);
    assert_eq!(metrics.pollers(), 1);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (revisions, _) = fake.calls();
    assert!(
        (4..=6).contains(&revisions),
        "one poller at 1 s, not one per proxy: {revisions} calls"
    );

    // The last proxy needing it leaves: kept for the linger period, then stopped and withdrawn.
    proxies_tx.send_replace([proxy("c")].into());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metrics.pollers(), 1, "still lingering");
    assert!(out.borrow().endpoints.cloud_map.contains_key(&key("s")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metrics.pollers(), 0);
    assert!(!out.borrow().endpoints.cloud_map.contains_key(&key("s")));
    let calls = fake.calls();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.calls(), calls, "a stopped poller makes no calls");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_proxy_back_within_the_linger_keeps_its_poller_and_endpoints() {
    let fake = Arc::new(Fake::default());
    fake.with(|s| s.instances = vec![inst("a", 1)]);
    let (_state_tx, state_rx) = watch::channel(state());
    let (proxies_tx, proxies_rx) = watch::channel([proxy("a")].into());
    let (out_tx, mut out) = watch::channel(Found::default());
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    tokio::spawn(run(
        fake,
        state_rx,
        proxies_rx,
        Arc::new(out_tx),
        metrics.clone(),
        cfg(),
        cancel.clone(),
    ));
    out.changed().await.unwrap();
    proxies_tx.send_replace(BTreeSet::new());
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxies_tx.send_replace([proxy("a")].into());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(metrics.pollers(), 1);
    assert!(
        metrics
            .render()
            .contains("trellis_cloudmap_pollers_started_total 1")
    );
    assert_eq!(out.borrow().endpoints.get(&key("s")).len(), 1);
    cancel.cancel();
}
