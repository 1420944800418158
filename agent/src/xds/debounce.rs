//! Coalesces bursts of store commits and endpoint changes into one publication: wait for a quiet
//! period, but never longer than a maximum delay after the first change of the burst (istiod's
//! debounce shape). State and endpoints are published together, so a snapshot is built from one
//! consistent pair.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::discovery::Found;
use trellis_model::State;
use trellis_translate::{CloudMapKey, Endpoints};

/// A state and endpoints the ADS streams should serve, and when the first change it contains
/// happened.
#[derive(Clone, Debug)]
pub struct Published {
    pub state: Arc<State>,
    pub endpoints: Arc<Endpoints>,
    /// The Cloud Map keys in `endpoints` only as known empty, never answered (see [`Found`]).
    pub unanswered: Arc<std::collections::BTreeSet<CloudMapKey>>,
    /// ACM secrets by name (see [`Found`]).
    pub secrets: Arc<std::collections::BTreeMap<String, trellis_translate::Item>>,
    pub changed_at: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(500),
        }
    }
}

/// The channel the streams read, primed with the current state.
pub fn channel(initial: Arc<State>) -> (watch::Sender<Published>, watch::Receiver<Published>) {
    watch::channel(Published {
        state: initial,
        endpoints: Arc::new(Endpoints::new()),
        unanswered: Arc::default(),
        secrets: Arc::default(),
        changed_at: Instant::now(),
    })
}

/// Runs until `cancel`: every burst of store changes becomes one publication on `out` (no
/// discovered endpoints).
pub async fn run(
    store: watch::Receiver<Arc<State>>,
    out: watch::Sender<Published>,
    cfg: Debounce,
    cancel: CancellationToken,
) {
    let (_keep, endpoints) = watch::channel(Found::default());
    run_with_endpoints(store, endpoints, out, cfg, cancel).await;
}

/// Runs until `cancel` (or the store goes away): every burst of store or endpoint changes
/// becomes one publication on `out`.
pub async fn run_with_endpoints(
    mut store: watch::Receiver<Arc<State>>,
    mut endpoints: watch::Receiver<Found>,
    out: watch::Sender<Published>,
    cfg: Debounce,
    cancel: CancellationToken,
) {
    // Discovery stopping is not the end of the mesh: its last endpoints stay published.
    let mut discovery_open = true;
    loop {
        tokio::select! {
            changed = store.changed() => if changed.is_err() { return },
            changed = endpoints.changed(), if discovery_open => {
                if changed.is_err() {
                    discovery_open = false;
                    continue;
                }
            }
            () = cancel.cancelled() => return,
        }
        let first = Instant::now();
        let deadline = first + cfg.max_delay;
        let mut merged = 1u32;
        loop {
            let quiet_end = (Instant::now() + cfg.quiet).min(deadline);
            tokio::select! {
                changed = store.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    merged += 1;
                }
                changed = endpoints.changed(), if discovery_open => {
                    if changed.is_err() {
                        discovery_open = false;
                    }
                    merged += 1;
                }
                () = tokio::time::sleep_until(quiet_end) => break,
                () = cancel.cancelled() => return,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let state = store.borrow_and_update().clone();
        let found = endpoints.borrow_and_update().clone();
        debug!(
            generation = state.generation,
            endpoints_generation = found.endpoints.generation,
            merged,
            waited_ms = first.elapsed().as_millis() as u64,
            "publishing"
        );
        out.send_replace(Published {
            state,
            endpoints: found.endpoints,
            unanswered: found.unanswered,
            secrets: found.secrets,
            changed_at: first,
        });
    }
}

#[cfg(test)]
mod tests;
