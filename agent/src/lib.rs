//! trellis-agent: the App Mesh API, the store, translation to Envoy, and the ADS server.
//!
//! Data flows one way: `api` → `store` → `translate` → `xds`; `discovery` feeds translate's
//! endpoints. See ARCHITECTURE.md.

pub mod acm;
pub mod admin;
pub mod api;
pub mod app;
pub mod attest;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod discovery;
pub mod entrypoint;
pub mod explain;
pub mod lrs;
pub mod probe;
pub mod sdk;
pub mod store;
pub mod tls;
pub mod ui;
pub mod xds;

#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
