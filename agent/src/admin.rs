//! Operator endpoints beside the App Mesh API: `/healthz`, `/readyz`, Prometheus `/metrics` (with
//! the load reports' per-edge figures), and
//! `/debug/xds` (per connected Envoy: versions sent and acknowledged, last rejection). With
//! `--api-auth`, the auth layer lets `/metrics` through for `trellis:ReadMetrics` and `/debug/xds`
//! for `trellis:ReadDebug`; the health endpoints stay open for health checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::auth::Auth;
use crate::discovery;
use crate::lrs::Lrs;
use crate::store::Store;
use crate::xds::Metrics;

/// Set once the store is loaded, the first state published and the ADS listeners bound.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
}

#[derive(Clone)]
struct Ctx {
    metrics: Arc<Metrics>,
    discovery: Arc<discovery::Metrics>,
    ready: Readiness,
    store: Arc<Store>,
    auth: Arc<Auth>,
    lrs: Arc<Lrs>,
}

pub fn router(
    metrics: Arc<Metrics>,
    discovery: Arc<discovery::Metrics>,
    ready: Readiness,
    store: Arc<Store>,
    auth: Arc<Auth>,
    lrs: Arc<Lrs>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/debug/xds", get(debug_xds))
        .with_state(Ctx {
            metrics,
            discovery,
            ready,
            store,
            auth,
            lrs,
        })
}

async fn readyz(State(c): State<Ctx>) -> impl IntoResponse {
    if c.ready.0.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics_text(State(c): State<Ctx>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.metrics.render()
            + &c.discovery.render()
            + &c.store.metrics_text()
            + &c.auth.metrics_text()
            + &c.lrs.metrics_text(),
    )
}

async fn debug_xds(State(c): State<Ctx>) -> impl IntoResponse {
    axum::Json(c.metrics.debug_view())
}
