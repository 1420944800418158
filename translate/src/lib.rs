//! Pure translation: (App Mesh state, endpoints) → the Envoy resources one proxy needs.
//!
//! No I/O, no clocks, no randomness: the same input always yields the same output, which is what
//! lets the xDS layer version resources by content hash. Names follow App Mesh's
//! (`lds_ingress_0.0.0.0_15000`, `cds_egress_MESH_NODE_PROTO_PORT`, …) so dashboards carry over.
//! Output is encoded ([`output`]); what every caller of a generation shares is built once
//! ([`memo`]).
//!
//! This file is the public API and the inputs a cached translation is keyed by. Inside: a node's
//! listeners ([`node`]), planning a virtual service ([`plan`]), caller-side clusters
//! ([`cluster`]), router routes ([`routes`]), gateways ([`gateway`]), App Mesh policies
//! ([`policy`]) and the Envoy protos themselves ([`envoy`]).

mod acm;
mod cloud_map;
mod cluster;
mod envoy;
mod gateway;
mod memo;
mod node;
mod output;
mod plan;
mod policy;
mod routes;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use acm::{
    AcmSecret, acm_secrets, certificate_item, certificate_secret, trust_item, trust_secret,
};
pub use envoy::SDS_CLUSTER;
pub use memo::Memo;
pub use output::{Blob, Encoded, Hash, Item};

use std::sync::Arc;

use cluster::Ctx;
use output::Output;
use plan::{PortEntry, ServicePlan, shared_plan};

use trellis_envoy_api::pb::envoy::config::cluster::v3::Cluster;
use trellis_envoy_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use trellis_envoy_api::pb::envoy::config::listener::v3::Listener;
use trellis_envoy_api::pb::envoy::config::route::v3::RouteConfiguration;

use trellis_model::{ProxyIdentity, ProxyKind, State};

/// Envoy's ingress and egress ports in a meshed task (fixed by the App Mesh contract).
pub const INGRESS_PORT: u32 = 15000;
pub const EGRESS_PORT: u32 = 15001;

pub use cloud_map::{CloudMapKey, Endpoints, Instance, cloud_map_keys, shared_tcp_services};

/// Everything one Envoy is sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
    /// App Mesh settings this translation could not serve, each with why (e.g. an SDS
    /// certificate): what was done instead is the safe side (a STRICT port refused, not plain).
    pub unserved: Vec<String>,
    /// EDS clusters whose Cloud Map key discovery has not answered yet: no assignment is sent
    /// for them (not even an empty one), so an Envoy reconnecting to a restarted agent keeps the
    /// endpoints it has.
    pub pending: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("mesh {0} not found")]
    MeshNotFound(String),
    #[error("virtual node {name} not found in mesh {mesh}")]
    VirtualNodeNotFound { mesh: String, name: String },
    #[error("virtual gateway {name} not found in mesh {mesh}")]
    VirtualGatewayNotFound { mesh: String, name: String },
    /// Decoding what this module encoded (only [`translate`] decodes, for tests and debugging).
    #[error("translated configuration does not decode: {0}")]
    Encoding(#[from] prost::DecodeError),
}

/// The configuration of the proxy `who`, as messages.
pub fn translate(
    state: &State,
    who: &ProxyIdentity,
    endpoints: &Endpoints,
) -> Result<Resources, Error> {
    let memo = Memo::new(state.generation, endpoints.generation);
    build(state, who, endpoints, &memo)?.decode()
}

/// The configuration of the proxy `who`, encoded, sharing with other proxies' translations
/// what `memo` (of this state and these endpoints) holds.
pub fn translate_encoded(
    state: &State,
    who: &ProxyIdentity,
    endpoints: &Endpoints,
    memo: &Memo,
) -> Result<Encoded, Error> {
    Ok(build(state, who, endpoints, memo)?.encode())
}

/// What a virtual node's translation reads, in a form cheap to compare: the mesh and the node at
/// their versions, each backend's shared plan (carried over a state change only while the
/// resources it read keep their versions), and the discovered endpoints those plans use (Cloud
/// Map instances of the nodes they reach, addresses of their TCP services). Equal inputs, equal
/// output: a proxy a change leaves alone keeps its snapshot instead of being translated again.
#[derive(Debug)]
pub struct Inputs {
    resources: [(String, i64); 2],
    instances: Vec<Option<Arc<[Instance]>>>,
    addresses: Vec<Option<Arc<[std::net::IpAddr]>>>,
    plans: Vec<Arc<ServicePlan>>,
    /// The ACM ARNs held (any change re-translates: ACM secrets come and go rarely).
    acm: Option<Arc<std::collections::BTreeSet<String>>>,
}

impl PartialEq for Inputs {
    /// Plans compare by identity: each side holds its plans, so an address is never reused.
    fn eq(&self, other: &Self) -> bool {
        self.resources == other.resources
            && self.instances == other.instances
            && self.addresses == other.addresses
            && self.acm == other.acm
            && self.plans.len() == other.plans.len()
            && self
                .plans
                .iter()
                .zip(&other.plans)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The inputs of `who`'s translation; `None` for a gateway (always translated again: gateways
/// are few, and they read gateway routes too) or a proxy whose resource does not exist.
pub fn inputs(
    state: &State,
    who: &ProxyIdentity,
    endpoints: &Endpoints,
    memo: &Memo,
) -> Option<Inputs> {
    if who.kind != ProxyKind::VirtualNode {
        return None;
    }
    let mesh = state.meshes.get(&who.mesh)?;
    let node = mesh.virtual_nodes.get(&who.name)?;
    let version = |m: &trellis_model::Metadata| (m.uid.clone(), m.version);
    let services = node::backend_names(&node.spec);
    let plans: Vec<_> = services
        .iter()
        .map(|service| shared_plan(memo, &who.mesh, mesh, service))
        .collect();
    let instances = plans
        .iter()
        .flat_map(|p| &p.keys)
        .map(|k| endpoints.cloud_map.get(k).cloned())
        .collect();
    let addresses = services
        .iter()
        .zip(&plans)
        .filter(|(_, p)| p.ports.iter().any(|(_, e)| matches!(e, PortEntry::Tcp(_))))
        .map(|(service, _)| endpoints.addresses.get(*service).cloned())
        .collect();
    Some(Inputs {
        resources: [version(&mesh.mesh.metadata), version(&node.metadata)],
        instances,
        addresses,
        plans,
        acm: endpoints.acm.clone(),
    })
}

fn build(
    state: &State,
    who: &ProxyIdentity,
    endpoints: &Endpoints,
    memo: &Memo,
) -> Result<Output, Error> {
    let mesh = state
        .meshes
        .get(&who.mesh)
        .ok_or_else(|| Error::MeshNotFound(who.mesh.clone()))?;
    match who.kind {
        ProxyKind::VirtualNode => {
            let node =
                mesh.virtual_nodes
                    .get(&who.name)
                    .ok_or_else(|| Error::VirtualNodeNotFound {
                        mesh: who.mesh.clone(),
                        name: who.name.clone(),
                    })?;
            let ctx = Ctx::new(&who.mesh, mesh, endpoints).with_memo(memo);
            Ok(node::virtual_node(&ctx, &who.name, &node.spec))
        }
        ProxyKind::VirtualGateway => {
            let gw = mesh.virtual_gateways.get(&who.name).ok_or_else(|| {
                Error::VirtualGatewayNotFound {
                    mesh: who.mesh.clone(),
                    name: who.name.clone(),
                }
            })?;
            Ok(gateway::virtual_gateway(
                &who.mesh, mesh, &who.name, &gw.spec, endpoints,
            ))
        }
    }
}

#[cfg(test)]
mod tests;
