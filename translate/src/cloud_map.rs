//! What translation consumes from Cloud Map discovery, and which discoveries a proxy needs.
//!
//! One key per (namespace, service, attributes): the IP preference and the port are the
//! caller's business, applied here when a key's instances become a `ClusterLoadAssignment`, so
//! one poll serves every node and listener that names the same service and filter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use trellis_envoy_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

use super::envoy;
use trellis_model::{
    AwsCloudMapServiceDiscovery, IpPreference, MeshState, PortProtocol, ProxyIdentity, ProxyKind,
    State,
};

/// A Cloud Map query: `DiscoverInstances(namespace, service, QueryParameters = attributes)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CloudMapKey {
    pub namespace: String,
    pub service: String,
    /// The node's `attributes` filter, sorted by key (App Mesh's list order does not matter).
    pub attributes: BTreeMap<String, String>,
}

impl CloudMapKey {
    pub fn of(sd: &AwsCloudMapServiceDiscovery) -> Self {
        CloudMapKey {
            namespace: sd.namespace_name.clone(),
            service: sd.service_name.clone(),
            attributes: sd
                .attributes
                .iter()
                .flatten()
                .map(|a| (a.key.clone(), a.value.clone()))
                .collect(),
        }
    }
}

impl fmt::Display for CloudMapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)?;
        if !self.attributes.is_empty() {
            let pairs: Vec<String> = self
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "{{{}}}", pairs.join(","))?;
        }
        Ok(())
    }
}

/// One registered instance, as discovery parsed it from `AWS_INSTANCE_IPV4`/`AWS_INSTANCE_IPV6`.
/// `AWS_INSTANCE_PORT` is not used: the port is the target listener's, as App Mesh did.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    pub id: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// Endpoints found by discovery. `generation` moves whenever any key's instances change; a key
/// that is absent has not been discovered (yet), a key with no instances was answered empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Endpoints {
    pub generation: u64,
    /// Instances sorted by id, so equal answers compare (and hash) equal whatever Cloud Map's order.
    pub cloud_map: BTreeMap<CloudMapKey, Arc<[Instance]>>,
    /// What virtual service names resolve to (sorted), for TCP services that share a port: the
    /// app connects to that address, so it tells them apart. See [`shared_tcp_services`].
    pub addresses: BTreeMap<String, Arc<[IpAddr]>>,
    /// The ACM certificate and ACM PCA authority ARNs the agent holds and serves as secrets
    /// ([`crate::acm`]); `None` when it serves no ACM at all (no attestation): ACM then fails
    /// closed everywhere.
    pub acm: Option<Arc<BTreeSet<String>>>,
}

impl Endpoints {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &CloudMapKey) -> &[Instance] {
        self.cloud_map.get(key).map_or(&[], |i| i)
    }
}

/// The address an instance is reached at under an IP preference. No preference is IPv4 when the
/// instance has one, else IPv6 (virtual_nodes.md, "Default": "We use the IPv4 address returned by
/// AWS Cloud Map if available and falls back to using the IPv6 address").
pub(super) fn address(i: &Instance, pref: Option<IpPreference>) -> Option<String> {
    let v4 = i.ipv4.map(|a| a.to_string());
    let v6 = i.ipv6.map(|a| a.to_string());
    match pref {
        Some(IpPreference::Ipv4Only) => v4,
        Some(IpPreference::Ipv6Only) => v6,
        None | Some(IpPreference::Ipv4Preferred) => v4.or(v6),
        Some(IpPreference::Ipv6Preferred) => v6.or(v4),
    }
}

/// The assignment of cluster `name`: every instance with an address of the preferred family, on
/// the target listener's `port`, each address once (a re-registered id can appear twice).
pub(super) fn assignment(
    name: &str,
    instances: &[Instance],
    pref: Option<IpPreference>,
    port: u32,
) -> ClusterLoadAssignment {
    let hosts: BTreeSet<String> = instances.iter().filter_map(|i| address(i, pref)).collect();
    let hosts: Vec<String> = hosts.into_iter().collect();
    envoy::eds_assignment(name, &hosts, port)
}

/// Every Cloud Map query the proxy `who` needs: the keys of the nodes its clusters lead to
/// (backends' providers for a node, gateway routes' targets for a gateway, through routers).
/// A superset is harmless (a poll nobody reads); a missing key would leave a cluster empty.
pub fn cloud_map_keys(state: &State, who: &ProxyIdentity) -> BTreeSet<CloudMapKey> {
    let mut keys = BTreeSet::new();
    let Some(mesh) = state.meshes.get(&who.mesh) else {
        return keys;
    };
    let services: Vec<&str> = match who.kind {
        ProxyKind::VirtualNode => mesh
            .virtual_nodes
            .get(&who.name)
            .into_iter()
            .flat_map(|n| n.spec.backends.iter().flatten())
            .filter_map(|b| b.virtual_service.as_ref())
            .map(|vs| vs.virtual_service_name.as_str())
            .collect(),
        ProxyKind::VirtualGateway => mesh
            .gateway_routes
            .get(&who.name)
            .into_iter()
            .flat_map(|routes| routes.values())
            .filter_map(|r| r.spec.target())
            .map(|t| t.virtual_service.virtual_service_name.as_str())
            .collect(),
    };
    for service in services {
        for node in provider_nodes(mesh, service) {
            let sd = mesh
                .virtual_nodes
                .get(node)
                .and_then(|n| n.spec.service_discovery.as_ref())
                .and_then(|sd| sd.aws_cloud_map.as_ref());
            if let Some(sd) = sd {
                keys.insert(CloudMapKey::of(sd));
            }
        }
    }
    keys
}

/// The virtual nodes a virtual service sends to: its provider node, or every route target of
/// its provider router.
fn provider_nodes<'m>(mesh: &'m MeshState, service: &str) -> Vec<&'m str> {
    let Some(provider) = mesh
        .virtual_services
        .get(service)
        .and_then(|vs| vs.spec.provider.as_ref())
    else {
        return Vec::new();
    };
    if let Some(p) = &provider.virtual_node {
        return vec![p.virtual_node_name.as_str()];
    }
    let Some(router) = &provider.virtual_router else {
        return Vec::new();
    };
    mesh.routes
        .get(&router.virtual_router_name)
        .into_iter()
        .flat_map(|routes| routes.values())
        .flat_map(|r| r.spec.weighted_targets())
        .map(|t| t.virtual_node.as_str())
        .collect()
}

/// The backends of node `who` that share a TCP destination port with another of its backends:
/// only the address the app connects to tells them apart, so discovery resolves their names.
/// A superset is harmless (a name resolved for nothing).
pub fn shared_tcp_services(state: &State, who: &ProxyIdentity) -> BTreeSet<String> {
    let Some(mesh) = state.meshes.get(&who.mesh) else {
        return BTreeSet::new();
    };
    let Some(node) = mesh.virtual_nodes.get(&who.name) else {
        return BTreeSet::new();
    };
    if who.kind != ProxyKind::VirtualNode {
        return BTreeSet::new();
    }
    let mut by_port: BTreeMap<i64, BTreeSet<&str>> = BTreeMap::new();
    for b in node.spec.backends.iter().flatten() {
        let Some(vs) = &b.virtual_service else {
            continue;
        };
        let service = vs.virtual_service_name.as_str();
        let Some(provider) = mesh
            .virtual_services
            .get(service)
            .and_then(|s| s.spec.provider.as_ref())
        else {
            continue;
        };
        let tcp_ports: Vec<i64> = if let Some(p) = &provider.virtual_node {
            mesh.virtual_nodes
                .get(&p.virtual_node_name)
                .into_iter()
                .flat_map(|n| n.spec.listeners.iter().flatten())
                .filter(|l| l.port_mapping.protocol == PortProtocol::Tcp)
                .map(|l| l.port_mapping.port)
                .collect()
        } else if let Some(p) = &provider.virtual_router {
            mesh.virtual_routers
                .get(&p.virtual_router_name)
                .into_iter()
                .flat_map(|r| r.spec.listeners.iter().flatten())
                .filter(|l| l.port_mapping.protocol == PortProtocol::Tcp)
                .map(|l| l.port_mapping.port)
                .collect()
        } else {
            Vec::new()
        };
        for port in tcp_ports {
            by_port.entry(port).or_default().insert(service);
        }
    }
    by_port
        .into_values()
        .filter(|services| services.len() > 1)
        .flatten()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests;
