//! Planning a virtual service: what it puts on each caller's egress listener, per port (its
//! virtual hosts, or a TCP proxy's weighted clusters), from its provider (a node, or a router
//! and its routes), and the stamp of what that plan read.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_envoy_api::pb::envoy::config::route::v3::VirtualHost;
use trellis_envoy_api::pb::google::protobuf::Duration as PbDuration;
use trellis_model::{MeshState, PortProtocol};

use super::cluster::{Built, cluster_identity};
use super::output::{Hash, Host};
use super::{CloudMapKey, Memo, envoy, routes};

/// A port's virtual host as the explicit egress route config carries it: a proxy request names
/// the port in its Host unless it is 80, so only those forms match (`NAME` alone would be ambiguous
/// between ports).
pub(super) fn explicit_host(vh: &Host, port: u32) -> Arc<Host> {
    let with_port = format!(":{port}");
    Host::with(
        format!("{}{with_port}", vh.name),
        vh.domains
            .iter()
            .filter(|d| d.ends_with(&with_port) || (port == 80 && !d.contains(':')))
            .cloned()
            .collect(),
        vh.body.clone(),
    )
}

/// A service's virtual host on `port` (named after it, for its name with and without the
/// port) and the same as the explicit egress chain names it.
fn http_entry(service: &str, port: u32, proto: PortProtocol, vh: VirtualHost) -> PortEntry {
    let body = Host::new(vh).body.clone();
    let host = Host::with(
        service.to_string(),
        vec![service.to_string(), format!("{service}:{port}")],
        body,
    );
    let explicit = explicit_host(&host, port);
    PortEntry::Http {
        proto,
        host,
        explicit,
    }
}

/// The service's plan as every caller with no refusing policy gets it, from the memo.
pub(super) fn shared_plan(
    memo: &Memo,
    mesh_name: &str,
    mesh: &MeshState,
    service: &str,
) -> Arc<ServicePlan> {
    memo.service(
        (mesh_name, service),
        |old| old.stamp == stamp(mesh, service, &old.lookups),
        || {
            service_plan(mesh, service, &mut |node, port| {
                cluster_identity(mesh_name, mesh, node, port)
            })
        },
    )
}

/// What one virtual service puts on a caller's egress listener, per port.
#[derive(Debug)]
pub(super) struct ServicePlan {
    /// The (node, port) clusters looked up while building, each once in the order first asked,
    /// and what each answered.
    pub lookups: Vec<((String, Option<i64>), Built)>,
    pub ports: Vec<(u32, PortEntry)>,
    /// The Cloud Map keys of the nodes it reaches: their instances are its callers' endpoints.
    pub keys: Vec<CloudMapKey>,
    /// What it was built from, as [`stamp`].
    pub stamp: Hash,
}

#[derive(Debug)]
pub(super) enum PortEntry {
    /// The service's virtual host, and the same for the explicit egress chain.
    Http {
        proto: PortProtocol,
        host: Arc<Host>,
        explicit: Arc<Host>,
    },
    /// A TCP proxy: its weighted clusters and idle timeout.
    Tcp(TcpTargets),
}

/// What a caller's TCP proxy to a service sends where, and when it closes an idle connection.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct TcpTargets {
    pub clusters: Vec<(String, u32)>,
    pub idle: Option<PbDuration>,
}

/// Builds a service's plan, finding clusters through `lookup`. A backend may name a service that
/// does not exist (yet); it gets no route.
pub(super) fn service_plan(
    mesh: &MeshState,
    service: &str,
    lookup: &mut dyn FnMut(&str, Option<i64>) -> Built,
) -> ServicePlan {
    // Each (node, port) once, in the order first asked (routes name the same nodes many times).
    let mut lookups: Vec<((String, Option<i64>), Built)> = Vec::new();
    let mut record = |node: &str, port: Option<i64>| {
        if let Some((_, found)) = lookups.iter().find(|((n, p), _)| n == node && *p == port) {
            return found.clone();
        }
        let found = lookup(node, port);
        lookups.push(((node.to_string(), port), found.clone()));
        found
    };
    let mut ports = Vec::new();
    let provider = mesh
        .virtual_services
        .get(service)
        .and_then(|vs| vs.spec.provider.as_ref());
    if let Some(p) = provider.and_then(|p| p.virtual_node.as_ref()) {
        node_provided(mesh, service, &p.virtual_node_name, &mut record, &mut ports);
    } else if let Some(p) = provider.and_then(|p| p.virtual_router.as_ref()) {
        router_provided(
            mesh,
            service,
            &p.virtual_router_name,
            &mut record,
            &mut ports,
        );
    }
    let stamp = stamp(mesh, service, &lookups);
    let keys = lookups
        .iter()
        .filter(|(_, found)| found.is_some())
        .filter_map(|((node, _), _)| {
            let sd = mesh
                .virtual_nodes
                .get(node)?
                .spec
                .service_discovery
                .as_ref()?;
            sd.aws_cloud_map.as_ref().map(CloudMapKey::of)
        })
        .collect();
    ServicePlan {
        lookups,
        ports,
        keys,
        stamp,
    }
}

/// Which resources, at which versions, a service's plan reads: the service, its provider (a
/// node, or a router and its routes) and the nodes its routes reach. Equal stamps, equal plans.
pub(super) fn stamp(
    mesh: &MeshState,
    service: &str,
    lookups: &[((String, Option<i64>), Built)],
) -> Hash {
    use sha2::{Digest, Sha256};
    fn add<S>(h: &mut Sha256, name: &str, r: Option<&trellis_model::Resource<S>>) {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        match r {
            Some(r) => {
                h.update([1]);
                h.update((r.metadata.uid.len() as u64).to_le_bytes());
                h.update(r.metadata.uid.as_bytes());
                h.update(r.metadata.version.to_le_bytes());
            }
            None => h.update([0]),
        }
    }
    let mut h = Sha256::new();
    let vs = mesh.virtual_services.get(service);
    add(&mut h, service, vs);
    let provider = vs.and_then(|vs| vs.spec.provider.as_ref());
    if let Some(p) = provider.and_then(|p| p.virtual_node.as_ref()) {
        let node = &p.virtual_node_name;
        add(&mut h, node, mesh.virtual_nodes.get(node));
    } else if let Some(p) = provider.and_then(|p| p.virtual_router.as_ref()) {
        let router = &p.virtual_router_name;
        add(&mut h, router, mesh.virtual_routers.get(router));
        let routes = mesh.routes.get(router);
        h.update((routes.map_or(0, BTreeMap::len) as u64).to_le_bytes());
        for (name, r) in routes.into_iter().flatten() {
            add(&mut h, name, Some(r));
        }
    }
    for ((node, _), _) in lookups {
        add(&mut h, node, mesh.virtual_nodes.get(node));
    }
    h.finalize().into()
}

fn node_provided(
    mesh: &MeshState,
    service: &str,
    node: &str,
    lookup: &mut dyn FnMut(&str, Option<i64>) -> Built,
    ports: &mut Vec<(u32, PortEntry)>,
) {
    let Some(target) = mesh.virtual_nodes.get(node) else {
        return;
    };
    for l in target.spec.listeners.iter().flatten() {
        let Some((cluster, port, proto)) = lookup(node, Some(l.port_mapping.port)) else {
            continue;
        };
        if proto == PortProtocol::Tcp {
            let targets = TcpTargets {
                clusters: vec![(cluster, 1)],
                idle: routes::tcp_idle(None),
            };
            ports.push((port, PortEntry::Tcp(targets)));
        } else {
            // The caller's side keeps App Mesh's route defaults (15 s per request, 300 s idle)
            // whatever the provider's listener says: "If you specify a timeout greater than the
            // default, make sure to set up a virtual router and a route with a timeout greater
            // than the default" (virtual_nodes.md). App Mesh's default retry policy, on the
            // virtual host, as for a router's routes: App Mesh "creates an Envoy route when you
            // [...] define a virtual node provider" (envoy-defaults.md).
            let mut vh = envoy::virtual_host_timed(
                "",
                vec![],
                &cluster,
                envoy::seconds(routes::DEFAULT_PER_REQUEST_S),
                envoy::seconds(routes::DEFAULT_IDLE_S),
            );
            vh.retry_policy = Some(routes::host_retry());
            ports.push((port, http_entry(service, port, proto, vh)));
        }
    }
}

fn router_provided(
    mesh: &MeshState,
    service: &str,
    router: &str,
    lookup: &mut dyn FnMut(&str, Option<i64>) -> Built,
    ports: &mut Vec<(u32, PortEntry)>,
) {
    let Some(r) = mesh.virtual_routers.get(router) else {
        return;
    };
    let listeners: Vec<_> = r.spec.listeners.iter().flatten().collect();
    let routes = mesh.routes.get(router);
    for l in &listeners {
        let Ok(port) = u32::try_from(l.port_mapping.port) else {
            continue;
        };
        let proto = l.port_mapping.protocol;
        let attached =
            routes::router_routes(lookup, routes, proto, l.port_mapping.port, listeners.len());
        if proto == PortProtocol::Tcp {
            if let Some(first) = attached
                .iter()
                .find(|n| n.targets.iter().any(|t| t.weight > 0))
            {
                // Envoy's TCP proxy takes weights of 1 and up (HTTP routes take 0): a target
                // that may not receive connections is left out.
                let clusters = first
                    .targets
                    .iter()
                    .filter(|t| t.weight > 0)
                    .map(|t| (t.cluster.clone(), t.weight))
                    .collect();
                let idle = routes::tcp_idle(first.spec.tcp_route.as_ref());
                ports.push((port, PortEntry::Tcp(TcpTargets { clusters, idle })));
            }
            continue;
        }
        let envoy_routes: Vec<_> = attached
            .iter()
            .filter_map(routes::envoy_route_in_host)
            .collect();
        if envoy_routes.is_empty() {
            continue;
        }
        let mut vh = envoy::virtual_host_with("", vec![], envoy_routes);
        vh.retry_policy = Some(routes::host_retry());
        ports.push((port, http_entry(service, port, proto, vh)));
    }
}
