//! Debouncing pinned down on paused time: bursts, the maximum delay, endpoint-only changes.

use super::*;

fn state(generation: u64) -> Arc<State> {
    Arc::new(State {
        generation,
        ..State::default()
    })
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_one_publication_after_the_quiet_period() {
    let (store_tx, store_rx) = watch::channel(state(0));
    let (out_tx, mut out_rx) = channel(state(0));
    let cancel = CancellationToken::new();
    let cfg = Debounce {
        quiet: Duration::from_millis(20),
        max_delay: Duration::from_millis(500),
    };
    tokio::spawn(run(store_rx, out_tx, cfg, cancel.clone()));
    out_rx.mark_unchanged();
    for g in 1..=5 {
        store_tx.send_replace(state(g));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !out_rx.has_changed().unwrap(),
            "published mid-burst at generation {g}"
        );
    }
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert!(out_rx.has_changed().unwrap());
    assert_eq!(
        out_rx.borrow_and_update().state.generation,
        5,
        "one publication with the last state"
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_never_ending_burst_is_still_published_within_the_maximum_delay() {
    let (store_tx, store_rx) = watch::channel(state(0));
    let (out_tx, mut out_rx) = channel(state(0));
    let cancel = CancellationToken::new();
    let cfg = Debounce {
        quiet: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    tokio::spawn(run(store_rx, out_tx, cfg, cancel.clone()));
    out_rx.mark_unchanged();
    let start = Instant::now();
    let mut g = 0;
    while !out_rx.has_changed().unwrap() {
        g += 1;
        store_tx.send_replace(state(g));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            start.elapsed() <= Duration::from_millis(120),
            "not published within the maximum delay"
        );
    }
    assert!(out_rx.borrow().state.generation >= 9);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_change_alone_is_published_with_the_same_state() {
    let (store_tx, store_rx) = watch::channel(state(3));
    let (ep_tx, ep_rx) = watch::channel(Found::default());
    let (out_tx, mut out_rx) = channel(state(3));
    let cancel = CancellationToken::new();
    tokio::spawn(run_with_endpoints(
        store_rx,
        ep_rx,
        out_tx,
        Debounce::default(),
        cancel.clone(),
    ));
    out_rx.mark_unchanged();
    ep_tx.send_replace(Found {
        endpoints: Arc::new(Endpoints {
            generation: 7,
            ..Endpoints::default()
        }),
        unanswered: Arc::default(),
        secrets: Arc::default(),
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(out_rx.has_changed().unwrap());
    let p = out_rx.borrow_and_update().clone();
    assert_eq!(p.state.generation, 3);
    assert_eq!(p.endpoints.generation, 7);
    // Discovery going away leaves the last endpoints published and the store still served.
    drop(ep_tx);
    store_tx.send_replace(state(4));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let p = out_rx.borrow_and_update().clone();
    assert_eq!((p.state.generation, p.endpoints.generation), (4, 7));
    cancel.cancel();
}
