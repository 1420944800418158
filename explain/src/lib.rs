//! Where does this request go, and why: a request run through the very Envoy configuration
//! translation gives a proxy, the way Envoy runs it, each decision told with the App Mesh field it
//! came from.
//!
//! Pure, as translation is: (the translation's output, the App Mesh state it came from, one
//! request) → an [`Explanation`]. No I/O, clocks or randomness: weighted targets come out as
//! shares, never drawn. Because it reads Envoy's own resources rather than App Mesh's specs, it
//! explains what Envoy does with what it was sent, whatever translation did to get there; the
//! App Mesh side only annotates.
//!
//! Inside: the walk in Envoy's order — listener, filter chain (destination port, address, SNI,
//! transport), connection manager (Host port stripping, path normalization, HTTP filters),
//! virtual host (domains), route (in order: path, headers, query, gRPC), action (weighted
//! clusters, rewrites, retries, timeouts), cluster and endpoints, a loopback hop back into the
//! proxy's own listener — in [`walk`]; Envoy's matchers in [`matching`]; the App Mesh field behind
//! each Envoy decision, and what to change when a request is refused, in [`spec`]; the request
//! itself in [`request`]; the text form in [`render`]. [`edges`] says what a proxy's clusters stand
//! for, so its load reports can be told per edge (caller → virtual service → target node).

mod edges;
mod matching;
mod render;
mod request;
mod spec;
mod walk;

pub use edges::{ClusterTarget, ClusterUse, cluster_uses};
pub use render::text;
pub use request::{Request, Scheme};

use serde::{Deserialize, Serialize};
use trellis_model::{ProxyIdentity, State};
use trellis_translate::Resources;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("URL {url:?}: {rule}")]
    Url { url: String, rule: String },
    #[error("header {header:?}: {rule}")]
    Header { header: String, rule: String },
    #[error("method {0:?}: must be a word of letters (GET, POST, …)")]
    Method(String),
}

/// Which way the request crosses the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// A virtual node's app calls out (iptables sends it to Envoy's egress listener), or a client
    /// calls a virtual gateway's listener.
    Outbound,
    /// A caller reaches a virtual node's listener port (iptables sends it to Envoy's ingress).
    Inbound,
}

/// What happened to the request, step by step, and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `mesh/M/virtualNode/N` or `mesh/M/virtualGateway/G`.
    pub proxy: String,
    pub direction: Direction,
    pub request: Request,
    pub steps: Vec<Step>,
    pub outcome: Outcome,
}

/// One decision Envoy makes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub stage: Stage,
    /// The Envoy resource that decided (`lds_egress_0.0.0.0_15001`, a route's name, a cluster).
    pub envoy: String,
    /// What was chosen, and why.
    pub decision: String,
    /// The App Mesh fields it came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Field>,
    /// Candidates tried before it and why each was passed over (routes, in Envoy's order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<Passed>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    Listener,
    FilterChain,
    ConnectionManager,
    HttpFilter,
    VirtualHost,
    Route,
    Rewrite,
    Targets,
    Retries,
    Timeouts,
    Cluster,
    Endpoints,
    /// The proxy sends the request to one of its own listeners (a gateway's pool).
    Hop,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Listener => "listener",
            Stage::FilterChain => "filter chain",
            Stage::ConnectionManager => "connection manager",
            Stage::HttpFilter => "http filter",
            Stage::VirtualHost => "virtual host",
            Stage::Route => "route",
            Stage::Rewrite => "rewrite",
            Stage::Targets => "targets",
            Stage::Retries => "retries",
            Stage::Timeouts => "timeouts",
            Stage::Cluster => "cluster",
            Stage::Endpoints => "endpoints",
            Stage::Hop => "hop",
        }
    }
}

/// An App Mesh field: the resource (`mesh/M/virtualRouter/R/route/X`), the field's path in it
/// (`spec.httpRoute.match.prefix`) and its value as App Mesh's JSON shows it (`(unset)` when
/// absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub resource: String,
    pub field: String,
    pub value: String,
}

/// A candidate Envoy tried and passed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Passed {
    pub envoy: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Field>,
}

/// What to change, where, for the request to go through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fix {
    pub resource: String,
    pub field: String,
    pub change: String,
}

/// How the request ends at this proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Outcome {
    /// An HTTP request sent upstream, to one of `targets` by their shares, as `authority` and
    /// `path` (after rewrites).
    Forwarded {
        authority: String,
        path: String,
        targets: Vec<Target>,
    },
    /// A TCP connection proxied to one of `targets`.
    Proxied { targets: Vec<Target> },
    /// Envoy answers the request itself (no route: 404; a route to nothing: 503; a gateway's
    /// health check: 200).
    LocalReply {
        status: u16,
        reason: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fix: Vec<Fix>,
    },
    /// Envoy closes the connection (no listener or filter chain takes it).
    Closed {
        reason: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fix: Vec<Fix>,
    },
}

/// One cluster a request may go to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub cluster: String,
    pub weight: u32,
    /// Of all requests that take this route, the part sent here (0 to 1).
    pub share: f64,
    /// The virtual node behind the cluster, when it is one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// `IP:PORT` or `NAME:PORT (DNS)`, or the original destination.
    pub endpoints: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Runs `request` through `resources` (what translation gives `who` from `state`) and tells
/// each decision. For a virtual node, `direction` says whether the app calls out (outbound) or
/// a caller reaches the node (inbound); a gateway is always entered from outside.
pub fn explain(
    state: &State,
    who: &ProxyIdentity,
    resources: &Resources,
    request: &Request,
    direction: Direction,
) -> Explanation {
    let direction = match who.kind {
        trellis_model::ProxyKind::VirtualGateway => Direction::Outbound,
        trellis_model::ProxyKind::VirtualNode => direction,
    };
    let spec = spec::Spec::new(state, who);
    let (steps, outcome) = walk::run(resources, &spec, request, direction);
    Explanation {
        proxy: who.to_string(),
        direction,
        request: request.clone(),
        steps,
        outcome,
    }
}

#[cfg(test)]
mod tests;
