//! Pure translation: (App Mesh state, endpoints) → the Envoy resources one proxy needs.
//!
//! No I/O, no clocks, no randomness: the same input always yields the same output, which is what
//! lets the xDS layer version resources by content hash. Names follow App Mesh's
//! (`lds_ingress_0.0.0.0_15000`, `cds_egress_MESH_NODE_PROTO_PORT`, …) so dashboards carry over.

mod cloud_map;
mod envoy;
mod gateway;
mod policy;
mod routes;

pub use envoy::SDS_CLUSTER;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};

use crate::model::{
    ClientPolicy, DnsResponseType, EgressFilterType, IpPreference, MeshState, PortProtocol,
    ProxyIdentity, ProxyKind, RouteSpec, State, VirtualNodeSpec,
};

/// Envoy's ingress and egress ports in a meshed task (fixed by the App Mesh contract).
pub const INGRESS_PORT: u32 = 15000;
pub const EGRESS_PORT: u32 = 15001;

/// What DROP_ALL still lets through: AWS API endpoints over TLS.
const AWS_API_PORT: u32 = 443;
const AWS_API_DOMAINS: &str = "*.amazonaws.com";

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

fn virtual_node(
    mesh_name: &str,
    mesh: &MeshState,
    node_name: &str,
    spec: &VirtualNodeSpec,
    endpoints: &Endpoints,
) -> Resources {
    let mut out = Resources::default();
    ingress(mesh_name, mesh, node_name, spec, &mut out);
    egress(mesh_name, mesh, spec, endpoints, &mut out);
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.clusters.dedup_by(|a, b| a.name == b.name);
    out.endpoints
        .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out.endpoints
        .dedup_by(|a, b| a.cluster_name == b.cluster_name);
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out.unserved.sort();
    out.unserved.dedup();
    out.pending.sort();
    out.pending.dedup();
    out
}

/// One filter chain per listener port on `lds_ingress_0.0.0.0_15000`, each to the local app,
/// with the listener's policies: timeouts on the route (or TCP proxy), its connection pool as
/// circuit breakers on the local cluster, its TLS on the chain, the node's access log.
fn ingress(
    mesh_name: &str,
    mesh: &MeshState,
    node: &str,
    spec: &VirtualNodeSpec,
    out: &mut Resources,
) {
    let (bind, local) = policy::bind(policy::own_ip_preference(mesh, spec));
    let logs = policy::access_logs(spec);
    let mut chains = Vec::new();
    let mut tls_ports = Vec::new();
    for l in spec.listeners.iter().flatten() {
        let Ok(port) = u32::try_from(l.port_mapping.port) else {
            continue;
        };
        let proto = l.port_mapping.protocol;
        let cluster = format!("cds_ingress_{mesh_name}_{node}_{}_{port}", proto.as_str());
        let mut local_cluster = envoy::static_cluster(&cluster, local, port, proto);
        if let Some(limits) = policy::limits(l) {
            envoy::set_circuit_breakers(&mut local_cluster, limits);
        }
        out.clusters.push(local_cluster);
        let filter = if proto == PortProtocol::Tcp {
            envoy::tcp_proxy("ingress", &[(cluster, 1)], policy::tcp_idle(l), &logs)
        } else {
            let route_name = format!("rds_ingress_{}_{port}", proto.as_str());
            let (per_request, idle) = policy::http_timeouts(l);
            out.routes.push(envoy::route_config(
                &route_name,
                vec![envoy::virtual_host_timed(
                    "ingress",
                    vec!["*".into()],
                    &cluster,
                    per_request,
                    idle,
                )],
            ));
            envoy::http_connection_manager("ingress", &route_name, &logs)
        };
        match policy::listener_tls(
            l.tls.as_ref(),
            l.port_mapping.port,
            proto,
            &mut out.unserved,
        ) {
            policy::ListenerTlsPlan::Plain => chains.push(envoy::filter_chain(Some(port), filter)),
            policy::ListenerTlsPlan::Strict(tls) => {
                chains.push(envoy::filter_chain_tls(Some(port), filter, tls, ""));
            }
            policy::ListenerTlsPlan::Permissive(tls) => {
                tls_ports.push(port);
                chains.push(envoy::filter_chain_tls(
                    Some(port),
                    filter.clone(),
                    tls,
                    "tls",
                ));
                chains.push(envoy::filter_chain(Some(port), filter));
            }
            policy::ListenerTlsPlan::Refuse => {}
        }
    }
    if !chains.is_empty() {
        out.listeners.push(envoy::listener(
            &format!("lds_ingress_0.0.0.0_{INGRESS_PORT}"),
            bind,
            INGRESS_PORT,
            chains,
            None,
            &tls_ports,
        ));
    }
}

/// What the egress listener serves on one destination port.
#[derive(Default)]
struct PortPlan {
    protocols: BTreeSet<PortProtocol>,
    hosts: Vec<VirtualHost>,
    /// The TCP services on this port (by name) and their weighted clusters. Only the address the
    /// app connects to tells them apart: each gets the addresses its name resolves to, and the
    /// first also takes whatever matches no address (App Mesh's one service per TCP port).
    tcp: Vec<(String, Vec<(String, u32)>)>,
}

impl PortPlan {
    fn add_tcp(&mut self, service: &str, targets: Vec<(String, u32)>) {
        if !self.tcp.iter().any(|(s, _)| s == service) {
            self.tcp.push((service.to_string(), targets));
        }
    }
}

/// The chains of one TCP port: one per service with known addresses (an address already taken
/// by a service earlier by name is not repeated: Envoy refuses two chains with one match), and
/// the port alone for the first service.
fn tcp_chains(
    port: u32,
    services: &[(String, Vec<(String, u32)>)],
    addresses: &BTreeMap<String, std::sync::Arc<[std::net::IpAddr]>>,
    logs: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
    chains: &mut Vec<FilterChain>,
) {
    if services.len() > 1 {
        let mut taken = BTreeSet::new();
        for (service, targets) in services {
            let own: Vec<std::net::IpAddr> = addresses
                .get(service)
                .into_iter()
                .flat_map(|a| a.iter().copied())
                .filter(|a| taken.insert(*a))
                .collect();
            if !own.is_empty() {
                chains.push(envoy::filter_chain_to(
                    port,
                    &own,
                    envoy::tcp_proxy("egress", targets, None, logs),
                ));
            }
        }
    }
    if let Some((_, targets)) = services.first() {
        chains.push(envoy::filter_chain(
            Some(port),
            envoy::tcp_proxy("egress", targets, None, logs),
        ));
    }
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
    let logs = policy::access_logs(spec);
    let (bind, _) = policy::bind(policy::own_ip_preference(mesh, spec));
    let ctx = Ctx::new(mesh_name, mesh, endpoints).with_client_policies(
        spec.backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref()),
        spec.backends
            .iter()
            .flatten()
            .filter_map(|b| b.virtual_service.as_ref())
            .filter_map(|vs| Some((vs.virtual_service_name.as_str(), vs.client_policy.as_ref()?)))
            .collect(),
    );
    for service in backends {
        ctx.serving(service);
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
    // Explicit egress: an app that names Envoy as its HTTP proxy connects to the egress port itself
    // (no redirect, e.g. bridge network mode), so every HTTP backend is routed by `Host: NAME:PORT`
    // on a chain for that port. Taken only when no backend itself listens on it.
    let explicit = !ports.contains_key(&EGRESS_PORT);
    let mut explicit_hosts = Vec::new();
    for (port, plan) in ports {
        if !plan.tcp.is_empty() {
            tcp_chains(port, &plan.tcp, &endpoints.addresses, &logs, &mut chains);
            continue;
        }
        if explicit {
            explicit_hosts.extend(plan.hosts.iter().map(|vh| explicit_host(vh, port)));
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
            envoy::http_connection_manager("egress", &route_name, &logs),
        ));
    }
    if !explicit_hosts.is_empty() {
        let route_name = format!("rds_egress_http_{EGRESS_PORT}");
        out.routes
            .push(envoy::route_config(&route_name, explicit_hosts));
        chains.push(envoy::filter_chain(
            Some(EGRESS_PORT),
            envoy::http_connection_manager("egress", &route_name, &logs),
        ));
    }
    let default_chain = if allow_all {
        out.clusters.push(envoy::original_dst_cluster(&passthrough));
        Some(envoy::filter_chain(
            None,
            envoy::tcp_proxy("egress", &[(passthrough, 1)], None, &logs),
        ))
    } else {
        // DROP_ALL still lets AWS API calls out, as App Mesh did: TLS to *.amazonaws.com on 443,
        // recognised by SNI and passed through untouched. So the egress listener always exists
        // (never empty), and anything else that reaches it is closed.
        let aws = format!("cds_egress_{mesh_name}_amazonaws");
        out.clusters.push(envoy::original_dst_cluster(&aws));
        chains.push(envoy::filter_chain_sni(
            AWS_API_PORT,
            &[AWS_API_DOMAINS],
            envoy::tcp_proxy("egress", &[(aws, 1)], None, &logs),
        ));
        None
    };
    out.listeners.push(envoy::listener(
        &format!("lds_egress_0.0.0.0_{EGRESS_PORT}"),
        bind,
        EGRESS_PORT,
        chains,
        default_chain,
        if allow_all { &[] } else { &[AWS_API_PORT] },
    ));
}

/// A port's virtual host as the explicit egress route config carries it: a proxy request names
/// the port in its Host unless it is 80, so only those forms match (`NAME` alone would be ambiguous
/// between ports).
fn explicit_host(vh: &VirtualHost, port: u32) -> VirtualHost {
    let with_port = format!(":{port}");
    let mut vh = vh.clone();
    vh.name = format!("{}{with_port}", vh.name);
    vh.domains
        .retain(|d| d.ends_with(&with_port) || (port == 80 && !d.contains(':')));
    vh
}

/// A cluster built for a (node, port): its name, port and protocol.
type Built = Option<(String, u32, PortProtocol)>;

pub(super) struct Ctx<'a> {
    mesh_name: &'a str,
    mesh: &'a MeshState,
    endpoints: &'a Endpoints,
    /// Clusters already built in this translation (many routes target the same nodes), and the
    /// caller they are built for. One `Default` field, so `Ctx { .., built: RefCell::default() }`
    /// stays a complete literal.
    built: RefCell<Cache<'a>>,
}

#[derive(Default)]
struct Cache<'a> {
    clusters: BTreeMap<(String, Option<i64>), Built>,
    /// The caller's `backendDefaults` client policy.
    default_policy: Option<&'a ClientPolicy>,
    /// The caller's per-backend client policies, by virtual service.
    backend_policies: BTreeMap<&'a str, &'a ClientPolicy>,
    /// The virtual service whose routes are being built: its client policy and name (SNI) go on
    /// the clusters it builds first. A cluster is per (node, port), so when several services
    /// reach one node, the first by name decides its TLS.
    service: String,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(mesh_name: &'a str, mesh: &'a MeshState, endpoints: &'a Endpoints) -> Self {
        Ctx {
            mesh_name,
            mesh,
            endpoints,
            built: RefCell::default(),
        }
    }

    /// The caller's client policies: `defaults` for every backend, `per_backend` overriding.
    pub(super) fn with_client_policies(
        self,
        defaults: Option<&'a ClientPolicy>,
        per_backend: BTreeMap<&'a str, &'a ClientPolicy>,
    ) -> Self {
        {
            let mut cache = self.built.borrow_mut();
            cache.default_policy = defaults;
            cache.backend_policies = per_backend;
        }
        self
    }

    /// Clusters built from now on serve the virtual service `service`.
    pub(super) fn serving(&self, service: &str) {
        service.clone_into(&mut self.built.borrow_mut().service);
    }
}

impl Ctx<'_> {
    /// The caller-side cluster for `node`'s listener on `port` (its only listener when `None`),
    /// built once per translation.
    pub(super) fn node_cluster(&self, node: &str, port: Option<i64>, out: &mut Resources) -> Built {
        let key = (node.to_string(), port);
        if let Some(done) = self.built.borrow().clusters.get(&key) {
            return done.clone();
        }
        let made = self.build_node_cluster(node, port, out);
        self.built.borrow_mut().clusters.insert(key, made.clone());
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
        let tls = {
            let cache = self.built.borrow();
            let policy = policy::client_policy(
                cache.backend_policies.get(cache.service.as_str()).copied(),
                cache.default_policy,
            );
            policy::client_tls(policy, &cache.service, port, proto, &mut out.unserved)
        };
        if matches!(tls, policy::ClientTls::Refuse) {
            return None;
        }
        let mesh_pref = policy::mesh_ip_preference(self.mesh);
        let mut c = upstream_cluster(
            &name,
            &target.spec,
            port,
            proto,
            (self.endpoints, mesh_pref),
            out,
        )?;
        // The target's DNS IP preference, when it has none, is the mesh's.
        let dns = target
            .spec
            .service_discovery
            .as_ref()
            .and_then(|sd| sd.dns.as_ref());
        if let Some(d) = dns
            && d.ip_preference.is_none()
        {
            envoy::set_dns_lookup(
                &mut c,
                policy::lookup(policy::mesh_ip_preference(self.mesh)),
            );
        }
        if let policy::ClientTls::Tls(socket) = tls {
            envoy::set_transport_socket(&mut c, socket);
        }
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
            plan.add_tcp(service, vec![(cluster, 1)]);
        } else {
            // The provider's listener timeouts hold on the caller's side too, or the caller's
            // 15 s default would cut a longer listener timeout short.
            let (per_request, idle) = policy::http_timeouts(l);
            plan.protocols.insert(proto);
            plan.hosts.push(envoy::virtual_host_timed(
                service,
                vec![service.to_string(), format!("{service}:{port}")],
                &cluster,
                per_request,
                idle,
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
        let attached = router_routes(
            ctx,
            routes,
            proto,
            l.port_mapping.port,
            listeners.len(),
            out,
        );
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
                plan.add_tcp(service, targets);
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

/// The router's routes that attach to its listener (protocol, port), with their targets resolved
/// to caller-side clusters, in App Mesh's order.
fn router_routes<'r>(
    ctx: &Ctx<'_>,
    routes: Option<&'r BTreeMap<String, crate::model::Resource<RouteSpec>>>,
    proto: PortProtocol,
    port: i64,
    listeners: usize,
    out: &mut Resources,
) -> Vec<routes::Named<'r>> {
    let mut attached: Vec<routes::Named<'r>> = routes
        .into_iter()
        .flatten()
        .filter(|(_, route)| route_fits(&route.spec, proto, port, listeners))
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
    attached
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

/// The caller-side cluster for one listener of a backend's provider node, with that listener's
/// health check and outlier detection, DNS resolved by the target's IP preference (IPv4 only
/// when it has none; `Ctx::node_cluster` falls back to the mesh's).
fn upstream_cluster(
    name: &str,
    target: &VirtualNodeSpec,
    port: u32,
    proto: PortProtocol,
    (endpoints, mesh_pref): (&Endpoints, Option<IpPreference>),
    out: &mut Resources,
) -> Option<Cluster> {
    let sd = target.service_discovery.as_ref()?;
    let listener = target
        .listeners
        .iter()
        .flatten()
        .find(|l| i64::from(port) == l.port_mapping.port);
    let check = listener.and_then(|l| policy::health_check(l, proto, &mut out.unserved));
    let outlier = listener.and_then(policy::outlier);
    let mut c = if let Some(dns) = &sd.dns {
        let strict = dns.response_type == Some(DnsResponseType::Endpoints);
        let mut c = envoy::dns_cluster(name, &dns.hostname, port, proto, strict);
        envoy::set_dns_lookup(&mut c, policy::lookup(dns.ip_preference));
        if let (Some((_, Some(hc_port))), Some(a)) = (&check, &mut c.load_assignment) {
            envoy::set_health_check_port(a, *hc_port);
        }
        c
    } else {
        // Endpoints from the key's instances, by the target's IP preference (else the mesh's),
        // on the listener's port: one discovery serves every preference and port.
        let cm = sd.aws_cloud_map.as_ref()?;
        let key = CloudMapKey::of(cm);
        let pref = cm.ip_preference.or(mesh_pref);
        match endpoints.cloud_map.get(&key) {
            Some(instances) => {
                let mut assignment = cloud_map::assignment(name, instances, pref, port);
                if let Some((_, Some(hc_port))) = &check {
                    envoy::set_health_check_port(&mut assignment, *hc_port);
                }
                out.endpoints.push(assignment);
            }
            None => out.pending.push(name.to_string()),
        }
        envoy::eds_cluster(name, proto)
    };
    if let Some((hc, _)) = check {
        envoy::set_health_check(&mut c, hc);
    }
    if let Some(o) = outlier {
        envoy::set_outlier_detection(&mut c, o);
    }
    Some(c)
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

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod cloud_map_tests;
