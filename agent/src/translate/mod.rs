//! Pure translation: (App Mesh state, endpoints) → the Envoy resources one proxy needs.
//!
//! No I/O, no clocks, no randomness: the same input always yields the same output, which is what
//! lets the xDS layer version resources by content hash. Names follow App Mesh's
//! (`lds_ingress_0.0.0.0_15000`, `cds_egress_MESH_NODE_PROTO_PORT`, …) so dashboards carry over.

mod envoy;
mod routes;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};

use crate::model::{
    DnsResponseType, EgressFilterType, MeshState, PortProtocol, ProxyIdentity, ProxyKind,
    RouteSpec, State, VirtualNodeSpec,
};

/// Envoy's ingress and egress ports in a meshed task (fixed by the App Mesh contract).
pub const INGRESS_PORT: u32 = 15000;
pub const EGRESS_PORT: u32 = 15001;

/// Endpoints found by discovery, by Envoy cluster name. Empty until Cloud Map discovery lands.
pub type Endpoints = BTreeMap<String, ClusterLoadAssignment>;

/// Everything one Envoy is sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("mesh {0} not found")]
    MeshNotFound(String),
    #[error("virtual node {name} not found in mesh {mesh}")]
    VirtualNodeNotFound { mesh: String, name: String },
    #[error("virtual gateway {name} not found in mesh {mesh}")]
    VirtualGatewayNotFound { mesh: String, name: String },
}

/// Builds the configuration of the proxy `who` from the whole state.
pub fn translate(
    state: &State,
    who: &ProxyIdentity,
    endpoints: &Endpoints,
) -> Result<Resources, Error> {
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
            Ok(virtual_node(
                &who.mesh, mesh, &who.name, &node.spec, endpoints,
            ))
        }
        // Gateways arrive with their own issue; until then no gateway can exist.
        ProxyKind::VirtualGateway => Err(Error::VirtualGatewayNotFound {
            mesh: who.mesh.clone(),
            name: who.name.clone(),
        }),
    }
}

fn virtual_node(
    mesh_name: &str,
    mesh: &MeshState,
    node_name: &str,
    spec: &VirtualNodeSpec,
    endpoints: &Endpoints,
) -> Resources {
    let mut out = Resources::default();
    ingress(mesh_name, node_name, spec, &mut out);
    egress(mesh_name, mesh, spec, endpoints, &mut out);
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.clusters.dedup_by(|a, b| a.name == b.name);
    out.endpoints
        .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out.endpoints
        .dedup_by(|a, b| a.cluster_name == b.cluster_name);
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One filter chain per listener port on `lds_ingress_0.0.0.0_15000`, each to the local app.
fn ingress(mesh: &str, node: &str, spec: &VirtualNodeSpec, out: &mut Resources) {
    let mut chains = Vec::new();
    for l in spec.listeners.iter().flatten() {
        let Ok(port) = u32::try_from(l.port_mapping.port) else {
            continue;
        };
        let proto = l.port_mapping.protocol;
        let cluster = format!("cds_ingress_{mesh}_{node}_{}_{port}", proto.as_str());
        out.clusters
            .push(envoy::static_cluster(&cluster, "127.0.0.1", port, proto));
        let filter = if proto == PortProtocol::Tcp {
            envoy::tcp_proxy("ingress", &cluster)
        } else {
            let route_name = format!("rds_ingress_{}_{port}", proto.as_str());
            out.routes.push(envoy::route_config(
                &route_name,
                vec![envoy::virtual_host("ingress", vec!["*".into()], &cluster)],
            ));
            envoy::http_connection_manager("ingress", &route_name)
        };
        chains.push(envoy::filter_chain(Some(port), filter));
    }
    if !chains.is_empty() {
        out.listeners.push(envoy::listener(
            &format!("lds_ingress_0.0.0.0_{INGRESS_PORT}"),
            INGRESS_PORT,
            chains,
            None,
        ));
    }
}

/// What the egress listener serves on one destination port.
#[derive(Default)]
struct PortPlan {
    protocols: BTreeSet<PortProtocol>,
    hosts: Vec<VirtualHost>,
    /// A TCP port carries one service: the first (by name) wins, as only the port tells them apart.
    tcp: Option<Vec<(String, u32)>>,
}

/// The egress listener: one filter chain per destination port that some backend listens on; HTTP
/// ports route by Host to one virtual host per virtual service.
fn egress(
    mesh_name: &str,
    mesh: &MeshState,
    spec: &VirtualNodeSpec,
    endpoints: &Endpoints,
    out: &mut Resources,
) {
    let allow_all = mesh.mesh.spec.egress_filter_type() == EgressFilterType::AllowAll;
    let mut ports: BTreeMap<u32, PortPlan> = BTreeMap::new();
    let backends: BTreeSet<&str> = spec
        .backends
        .iter()
        .flatten()
        .filter_map(|b| b.virtual_service.as_ref())
        .map(|vs| vs.virtual_service_name.as_str())
        .collect();
    let ctx = Ctx {
        mesh_name,
        mesh,
        endpoints,
        built: RefCell::default(),
    };
    for service in backends {
        // A backend may name a service that does not exist (yet); it gets no route.
        let Some(provider) = mesh
            .virtual_services
            .get(service)
            .and_then(|vs| vs.spec.provider.as_ref())
        else {
            continue;
        };
        if let Some(p) = &provider.virtual_node {
            node_provided(&ctx, service, &p.virtual_node_name, &mut ports, out);
        } else if let Some(p) = &provider.virtual_router {
            router_provided(&ctx, service, &p.virtual_router_name, &mut ports, out);
        }
    }
    let passthrough = format!("cds_egress_{mesh_name}_allow_all");
    let mut chains = Vec::new();
    for (port, plan) in ports {
        if let Some(targets) = plan.tcp {
            chains.push(envoy::filter_chain(
                Some(port),
                envoy::tcp_proxy_weighted("egress", &targets),
            ));
            continue;
        }
        let mut hosts = plan.hosts;
        if allow_all {
            hosts.push(envoy::virtual_host(
                "allow_all",
                vec!["*".into()],
                &passthrough,
            ));
        }
        // One connection manager per port (codec AUTO serves HTTP/1.1 and HTTP/2 alike); the
        // route config is named after the port's protocol, or http when services mix them.
        let proto = match plan.protocols.iter().collect::<Vec<_>>().as_slice() {
            [only] => only.as_str(),
            _ => "http",
        };
        let route_name = format!("rds_egress_{proto}_{port}");
        out.routes.push(envoy::route_config(&route_name, hosts));
        chains.push(envoy::filter_chain(
            Some(port),
            envoy::http_connection_manager("egress", &route_name),
        ));
    }
    let default_chain = if allow_all {
        out.clusters.push(envoy::original_dst_cluster(&passthrough));
        Some(envoy::filter_chain(
            None,
            envoy::tcp_proxy("egress", &passthrough),
        ))
    } else {
        None
    };
    // Envoy rejects a listener with no filter chains; with nothing to route to there is no listener,
    // and DROP_ALL then means connections to the egress port are refused.
    if !chains.is_empty() || default_chain.is_some() {
        out.listeners.push(envoy::listener(
            &format!("lds_egress_0.0.0.0_{EGRESS_PORT}"),
            EGRESS_PORT,
            chains,
            default_chain,
        ));
    }
}

/// A cluster built for a (node, port): its name, port and protocol.
type Built = Option<(String, u32, PortProtocol)>;

struct Ctx<'a> {
    mesh_name: &'a str,
    mesh: &'a MeshState,
    endpoints: &'a Endpoints,
    /// Clusters already built in this translation: many routes target the same nodes.
    built: RefCell<BTreeMap<(String, Option<i64>), Built>>,
}

impl Ctx<'_> {
    /// The caller-side cluster for `node`'s listener on `port` (its only listener when `None`),
    /// built once per translation.
    fn node_cluster(&self, node: &str, port: Option<i64>, out: &mut Resources) -> Built {
        let key = (node.to_string(), port);
        if let Some(done) = self.built.borrow().get(&key) {
            return done.clone();
        }
        let made = self.build_node_cluster(node, port, out);
        self.built.borrow_mut().insert(key, made.clone());
        made
    }

    fn build_node_cluster(&self, node: &str, port: Option<i64>, out: &mut Resources) -> Built {
        let target = self.mesh.virtual_nodes.get(node)?;
        let listeners: Vec<_> = target.spec.listeners.iter().flatten().collect();
        let l = match port {
            Some(p) => listeners.iter().find(|l| l.port_mapping.port == p)?,
            None if listeners.len() == 1 => listeners.first()?,
            None => return None,
        };
        let port = u32::try_from(l.port_mapping.port).ok()?;
        let proto = l.port_mapping.protocol;
        let name = format!(
            "cds_egress_{}_{node}_{}_{port}",
            self.mesh_name,
            proto.as_str()
        );
        let c = upstream_cluster(&name, &target.spec, port, proto, self.endpoints, out)?;
        out.clusters.push(c);
        Some((name, port, proto))
    }
}

fn node_provided(
    ctx: &Ctx<'_>,
    service: &str,
    node: &str,
    ports: &mut BTreeMap<u32, PortPlan>,
    out: &mut Resources,
) {
    let Some(target) = ctx.mesh.virtual_nodes.get(node) else {
        return;
    };
    for l in target.spec.listeners.iter().flatten() {
        let Some((cluster, port, proto)) = ctx.node_cluster(node, Some(l.port_mapping.port), out)
        else {
            continue;
        };
        let plan = ports.entry(port).or_default();
        if proto == PortProtocol::Tcp {
            plan.tcp.get_or_insert_with(|| vec![(cluster, 1)]);
        } else {
            plan.protocols.insert(proto);
            plan.hosts.push(envoy::virtual_host(
                service,
                vec![service.to_string(), format!("{service}:{port}")],
                &cluster,
            ));
        }
    }
}

fn router_provided(
    ctx: &Ctx<'_>,
    service: &str,
    router: &str,
    ports: &mut BTreeMap<u32, PortPlan>,
    out: &mut Resources,
) {
    let Some(r) = ctx.mesh.virtual_routers.get(router) else {
        return;
    };
    let listeners: Vec<_> = r.spec.listeners.iter().flatten().collect();
    let routes = ctx.mesh.routes.get(router);
    for l in &listeners {
        let Ok(port) = u32::try_from(l.port_mapping.port) else {
            continue;
        };
        let proto = l.port_mapping.protocol;
        let mut attached: Vec<routes::Named<'_>> = routes
            .into_iter()
            .flatten()
            .filter(|(_, route)| {
                route_fits(&route.spec, proto, l.port_mapping.port, listeners.len())
            })
            .map(|(name, route)| routes::Named {
                name,
                spec: &route.spec,
                targets: route
                    .spec
                    .weighted_targets()
                    .filter_map(|t| {
                        let (cluster, _, _) = ctx.node_cluster(&t.virtual_node, t.port, out)?;
                        Some(routes::Target {
                            cluster,
                            weight: u32::try_from(t.weight).unwrap_or(0),
                        })
                    })
                    .collect(),
            })
            .collect();
        routes::order(&mut attached);
        let plan = ports.entry(port).or_default();
        if proto == PortProtocol::Tcp {
            if let Some(first) = attached
                .iter()
                .find(|n| n.targets.iter().any(|t| t.weight > 0))
            {
                let targets = first
                    .targets
                    .iter()
                    .map(|t| (t.cluster.clone(), t.weight))
                    .collect();
                plan.tcp.get_or_insert(targets);
            }
            continue;
        }
        let envoy_routes: Vec<_> = attached.iter().filter_map(routes::envoy_route).collect();
        if envoy_routes.is_empty() {
            continue;
        }
        plan.protocols.insert(proto);
        plan.hosts.push(envoy::virtual_host_with(
            service,
            vec![service.to_string(), format!("{service}:{port}")],
            envoy_routes,
        ));
    }
}

/// Whether a route attaches to the router listener (protocol, port).
fn route_fits(spec: &RouteSpec, proto: PortProtocol, port: i64, listeners: usize) -> bool {
    let (kind_proto, match_port) = if let Some(r) = &spec.http_route {
        (PortProtocol::Http, r.r#match.port)
    } else if let Some(r) = &spec.http2_route {
        (PortProtocol::Http2, r.r#match.port)
    } else if let Some(r) = &spec.grpc_route {
        (PortProtocol::Grpc, r.r#match.port)
    } else if let Some(r) = &spec.tcp_route {
        (PortProtocol::Tcp, r.r#match.as_ref().and_then(|m| m.port))
    } else {
        return false;
    };
    kind_proto == proto && match_port.map_or(listeners == 1, |p| p == port)
}

/// The caller-side cluster for one listener of a backend's provider node.
fn upstream_cluster(
    name: &str,
    target: &VirtualNodeSpec,
    port: u32,
    proto: PortProtocol,
    endpoints: &Endpoints,
    out: &mut Resources,
) -> Option<Cluster> {
    let sd = target.service_discovery.as_ref()?;
    if let Some(dns) = &sd.dns {
        let strict = dns.response_type == Some(DnsResponseType::Endpoints);
        return Some(envoy::dns_cluster(name, &dns.hostname, port, proto, strict));
    }
    sd.aws_cloud_map.as_ref()?;
    let assignment = endpoints
        .get(name)
        .cloned()
        .unwrap_or_else(|| ClusterLoadAssignment {
            cluster_name: name.to_string(),
            ..Default::default()
        });
    out.endpoints.push(assignment);
    Some(envoy::eds_cluster(name, proto))
}

/// Names of the filter chains of a listener, for tests and the debug endpoint.
pub fn chain_ports(l: &Listener) -> Vec<Option<u32>> {
    let port = |c: &FilterChain| {
        c.filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port.as_ref())
            .map(|p| p.value)
    };
    l.filter_chains.iter().map(port).collect()
}

#[cfg(test)]
mod tests;
