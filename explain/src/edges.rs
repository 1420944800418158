//! What a proxy's clusters stand for in App Mesh terms, for its load reports: Envoy counts
//! requests per cluster, and a cluster is a (target node, port); the virtual services through
//! which the proxy reaches it are read from its own route configurations (the virtual hosts,
//! named after services, whose routes send there; for a gateway, the target of the gateway
//! route each Envoy route came from) and TCP chains (the backends listening on the chain's port).

use std::collections::{BTreeMap, BTreeSet};

use trellis_envoy_api::pb::envoy::config::route::v3::{route, route_action};
use trellis_model::{ProxyIdentity, ProxyKind, State};
use trellis_translate::Resources;

use super::spec::Spec;

/// Where a cluster's requests go.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterTarget {
    /// A virtual node's listener.
    VirtualNode { name: String, port: u32 },
    /// The proxy's own app (a virtual node's ingress).
    LocalApp { port: u32 },
    /// Outside the mesh: ALLOW_ALL's pass-through or DROP_ALL's AWS API pass-through.
    External,
    /// Anything else (a gateway's pool hop back into itself).
    Other,
}

/// One cluster of a proxy: where it goes and the virtual services it is reached through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterUse {
    pub target: ClusterTarget,
    /// Sorted; empty for the local app, external and other clusters.
    pub services: Vec<String>,
}

/// Every cluster `resources` (what translation gives `who`) holds, by name.
pub fn cluster_uses(
    state: &State,
    who: &ProxyIdentity,
    resources: &Resources,
) -> BTreeMap<String, ClusterUse> {
    let spec = Spec::new(state, who);
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rc in &resources.routes {
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                let Some(route::Action::Route(a)) = &r.action else {
                    continue;
                };
                let clusters: Vec<&str> = match &a.cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(c)) => vec![c.as_str()],
                    Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.iter().map(|c| c.name.as_str()).collect()
                    }
                    _ => vec![],
                };
                let service = match who.kind {
                    ProxyKind::VirtualGateway => spec.gateway_route_service(&r.name),
                    ProxyKind::VirtualNode => spec.service_of_host(&vh.name),
                };
                for c in clusters {
                    let entry = services.entry(c.to_string()).or_default();
                    entry.extend(service.clone());
                }
            }
        }
    }
    for (port, cluster) in spec_tcp_chains(resources) {
        let entry = services.entry(cluster).or_default();
        entry.extend(spec.backends_on(port));
    }
    resources
        .clusters
        .iter()
        .map(|c| {
            let target = spec.cluster_target(&c.name);
            let services = match target {
                ClusterTarget::VirtualNode { .. } => services
                    .get(&c.name)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                _ => vec![],
            };
            (c.name.clone(), ClusterUse { target, services })
        })
        .collect()
}

/// The (destination port, cluster) pairs of the TCP proxies on the proxy's listeners.
fn spec_tcp_chains(resources: &Resources) -> Vec<(u32, String)> {
    use prost::{Message, Name};
    use trellis_envoy_api::pb::envoy::config::listener::v3::filter;
    use trellis_envoy_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy,
    };
    let mut out = Vec::new();
    for l in &resources.listeners {
        for chain in &l.filter_chains {
            let Some(port) = chain
                .filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port.as_ref())
                .map(|p| p.value)
            else {
                continue;
            };
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                    continue;
                };
                if a.type_url != TcpProxy::type_url() {
                    continue;
                }
                let Ok(t) = TcpProxy::decode(a.value.as_slice()) else {
                    continue;
                };
                match t.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => out.push((port, c)),
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        out.extend(w.clusters.into_iter().map(|c| (port, c.name)));
                    }
                    None => {}
                }
            }
        }
    }
    out
}
