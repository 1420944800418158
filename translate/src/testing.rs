//! Helpers for the tests of this crate and the crates built on it (`testing` feature).

pub use trellis_model::testing::*;

use trellis_envoy_api::pb::envoy::config::listener::v3::{FilterChain, Listener};

/// The destination port each filter chain of `l` matches (`None`: any port), in order.
pub fn chain_ports(l: &Listener) -> Vec<Option<u32>> {
    let port = |c: &FilterChain| {
        c.filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port.as_ref())
            .map(|p| p.value)
    };
    l.filter_chains.iter().map(port).collect()
}
