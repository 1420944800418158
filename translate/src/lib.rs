//! Pure translation: (App Mesh state, endpoints) → the Envoy resources one proxy needs.
//!
//! No I/O, no clocks, no randomness: the same input always yields the same output, which is what
//! lets the xDS layer version resources by content hash. Names follow App Mesh's
//! (`lds_ingress_0.0.0.0_15000`, `cds_egress_MESH_NODE_PROTO_PORT`, …) so dashboards carry over.
//! Output is encoded ([`output`]); what every caller of a generation shares is built once
//! ([`memo`]).

mod cloud_map;
mod envoy;
mod gateway;
mod memo;
mod output;
mod policy;
mod routes;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use envoy::SDS_CLUSTER;
pub use memo::Memo;
pub use output::{Blob, Encoded, Hash, Item};

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use output::{Host, Output, Part, RouteConfig};

use trellis_envoy_api::pb::envoy::config::cluster::v3::Cluster;
use trellis_envoy_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use trellis_envoy_api::pb::envoy::config::listener::v3::{FilterChain, Listener};
use trellis_envoy_api::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};

use trellis_model::{
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
}

impl PartialEq for Inputs {
    /// Plans compare by identity: each side holds its plans, so an address is never reused.
    fn eq(&self, other: &Self) -> bool {
        self.resources == other.resources
            && self.instances == other.instances
            && self.addresses == other.addresses
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
    let services = backend_names(&node.spec);
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
            Ok(virtual_node(&ctx, &who.name, &node.spec))
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

fn virtual_node<'a>(ctx: &Ctx<'a>, node_name: &str, spec: &'a VirtualNodeSpec) -> Output {
    let mut out = Output::default();
    ingress(ctx.mesh_name, ctx.mesh, node_name, spec, &mut out);
    egress(ctx, spec, &mut out);
    out.finish()
}

/// One filter chain per listener port on `lds_ingress_0.0.0.0_15000`, each to the local app,
/// with the listener's policies: timeouts on the route (or TCP proxy), its connection pool as
/// circuit breakers on the local cluster, its TLS on the chain, the node's access log.
fn ingress(
    mesh_name: &str,
    mesh: &MeshState,
    node: &str,
    spec: &VirtualNodeSpec,
    out: &mut Output,
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
        out.clusters.push(Part::built(local_cluster));
        let filter = if proto == PortProtocol::Tcp {
            envoy::tcp_proxy("ingress", &[(cluster, 1)], policy::tcp_idle(l), &logs)
        } else {
            let route_name = format!("rds_ingress_{}_{port}", proto.as_str());
            let (per_request, idle) = policy::http_timeouts(l);
            out.routes.push(RouteConfig::of(
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
    hosts: Vec<Arc<Host>>,
    /// The same services' hosts as the explicit egress chain names them.
    explicit: Vec<Arc<Host>>,
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
    logs: &[trellis_envoy_api::pb::envoy::config::accesslog::v3::AccessLog],
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
fn egress<'a>(ctx: &Ctx<'a>, spec: &'a VirtualNodeSpec, out: &mut Output) {
    let (mesh_name, mesh, endpoints) = (ctx.mesh_name, ctx.mesh, ctx.endpoints);
    let allow_all = mesh.mesh.spec.egress_filter_type() == EgressFilterType::AllowAll;
    let mut ports: BTreeMap<u32, PortPlan> = BTreeMap::new();
    let backends = backend_names(spec);
    let logs = policy::access_logs(spec);
    let (bind, _) = policy::bind(policy::own_ip_preference(mesh, spec));
    ctx.client_policies(
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
        let plan = ctx.service_plan(service, out);
        for (port, entry) in &plan.ports {
            let at = ports.entry(*port).or_default();
            match entry {
                PortEntry::Tcp(targets) => at.add_tcp(service, targets.clone()),
                PortEntry::Http {
                    proto,
                    host,
                    explicit,
                } => {
                    at.protocols.insert(*proto);
                    at.hosts.push(host.clone());
                    at.explicit.push(explicit.clone());
                }
            }
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
            explicit_hosts.extend(plan.explicit);
        }
        let mut hosts = plan.hosts;
        if allow_all {
            hosts.push(Host::new(envoy::virtual_host(
                "allow_all",
                vec!["*".into()],
                &passthrough,
            )));
        }
        // One connection manager per port (codec AUTO serves HTTP/1.1 and HTTP/2 alike); the
        // route config is named after the port's protocol, or http when services mix them.
        let proto = match plan.protocols.iter().collect::<Vec<_>>().as_slice() {
            [only] => only.as_str(),
            _ => "http",
        };
        let route_name = format!("rds_egress_{proto}_{port}");
        out.routes.push(RouteConfig {
            name: route_name.clone(),
            hosts,
        });
        chains.push(envoy::filter_chain(
            Some(port),
            envoy::http_connection_manager("egress", &route_name, &logs),
        ));
    }
    if !explicit_hosts.is_empty() {
        let route_name = format!("rds_egress_http_{EGRESS_PORT}");
        out.routes.push(RouteConfig {
            name: route_name.clone(),
            hosts: explicit_hosts,
        });
        chains.push(envoy::filter_chain(
            Some(EGRESS_PORT),
            envoy::http_connection_manager("egress", &route_name, &logs),
        ));
    }
    let default_chain = if allow_all {
        out.clusters
            .push(Part::built(envoy::original_dst_cluster(&passthrough)));
        Some(envoy::filter_chain(
            None,
            envoy::tcp_proxy("egress", &[(passthrough, 1)], None, &logs),
        ))
    } else {
        // DROP_ALL still lets AWS API calls out, as App Mesh did: TLS to *.amazonaws.com on 443,
        // recognised by SNI and passed through untouched. So the egress listener always exists
        // (never empty), and anything else that reaches it is closed.
        let aws = format!("cds_egress_{mesh_name}_amazonaws");
        out.clusters
            .push(Part::built(envoy::original_dst_cluster(&aws)));
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

/// The virtual services a node declares as backends, each once, by name.
fn backend_names(spec: &VirtualNodeSpec) -> BTreeSet<&str> {
    spec.backends
        .iter()
        .flatten()
        .filter_map(|b| b.virtual_service.as_ref())
        .map(|vs| vs.virtual_service_name.as_str())
        .collect()
}

/// A port's virtual host as the explicit egress route config carries it: a proxy request names
/// the port in its Host unless it is 80, so only those forms match (`NAME` alone would be ambiguous
/// between ports).
fn explicit_host(vh: &Host, port: u32) -> Arc<Host> {
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

/// A cluster built for a (node, port): its name, port and protocol.
type Built = Option<(String, u32, PortProtocol)>;

struct Ctx<'a> {
    mesh_name: &'a str,
    mesh: &'a MeshState,
    endpoints: &'a Endpoints,
    /// What this generation's translations share; none for gateways, whose listeners' pools
    /// change the clusters they reach.
    memo: Option<&'a Memo>,
    /// Clusters already built in this translation (many routes target the same nodes), and the
    /// caller they are built for. One `Default` field, so `Ctx { .., built: RefCell::default() }`
    /// stays a complete literal.
    built: RefCell<Cache<'a>>,
}

#[derive(Default)]
struct Cache<'a> {
    /// By node, then port.
    clusters: BTreeMap<String, Vec<(Option<i64>, Built)>>,
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
    fn new(mesh_name: &'a str, mesh: &'a MeshState, endpoints: &'a Endpoints) -> Self {
        Ctx {
            mesh_name,
            mesh,
            endpoints,
            memo: None,
            built: RefCell::default(),
        }
    }

    fn with_memo(mut self, memo: &'a Memo) -> Self {
        self.memo = Some(memo);
        self
    }

    /// The caller's client policies: `defaults` for every backend, `per_backend` overriding.
    fn client_policies(
        &self,
        defaults: Option<&'a ClientPolicy>,
        per_backend: BTreeMap<&'a str, &'a ClientPolicy>,
    ) {
        let mut cache = self.built.borrow_mut();
        cache.default_policy = defaults;
        cache.backend_policies = per_backend;
    }

    /// Clusters built from now on serve the virtual service `service`.
    fn serving(&self, service: &str) {
        service.clone_into(&mut self.built.borrow_mut().service);
    }
}

impl Ctx<'_> {
    /// The caller-side cluster for `node`'s listener on `port` (its only listener when `None`),
    /// built once per translation.
    fn node_cluster(&self, node: &str, port: Option<i64>, out: &mut Output) -> Built {
        let done = self.built.borrow().clusters.get(node).and_then(|ports| {
            ports
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, b)| b.clone())
        });
        if let Some(done) = done {
            return done;
        }
        let made = self.build_node_cluster(node, port, out);
        self.built
            .borrow_mut()
            .clusters
            .entry(node.to_string())
            .or_default()
            .push((port, made.clone()));
        made
    }

    fn build_node_cluster(&self, node: &str, port: Option<i64>, out: &mut Output) -> Built {
        let shared = self.memo.map(|m| {
            m.cluster((self.mesh_name, node, port), || {
                self.shared_cluster(node, port)
            })
        });
        let (name, port_n, proto) = match &shared {
            Some(s) => s.built.clone()?,
            None => cluster_identity(self.mesh_name, self.mesh, node, port)?,
        };
        let tls = {
            let cache = self.built.borrow();
            let policy = policy::client_policy(
                cache.backend_policies.get(cache.service.as_str()).copied(),
                cache.default_policy,
            );
            policy::client_tls(policy, &cache.service, port_n, proto, &mut out.unserved)
        };
        match (tls, shared) {
            (policy::ClientTls::Refuse, _) => None,
            // No caller policy applies: the cluster is the same for every caller.
            (policy::ClientTls::Plain, Some(shared)) => {
                out.clusters
                    .extend(shared.cluster.clone().map(Part::Shared));
                out.endpoints
                    .extend(shared.endpoints.clone().map(Part::Shared));
                out.pending.extend(shared.pending.clone());
                out.unserved.extend(shared.unserved.iter().cloned());
                shared.built.clone()
            }
            (tls, _) => {
                let mut c = self.plain_cluster(node, (&name, port_n, proto), out)?;
                if let policy::ClientTls::Tls(socket) = tls {
                    envoy::set_transport_socket(&mut c, socket);
                }
                out.clusters.push(Part::built(c));
                Some((name, port_n, proto))
            }
        }
    }

    /// The cluster to `node` before any client TLS, with its endpoints.
    fn plain_cluster(
        &self,
        node: &str,
        (name, port, proto): (&str, u32, PortProtocol),
        out: &mut Output,
    ) -> Option<Cluster> {
        let target = self.mesh.virtual_nodes.get(node)?;
        let mesh_pref = policy::mesh_ip_preference(self.mesh);
        let mut c = upstream_cluster(
            name,
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
            envoy::set_dns_lookup(&mut c, policy::lookup(mesh_pref));
        }
        Some(c)
    }

    /// [`Self::plain_cluster`], encoded for the memo with what it adds besides the cluster.
    fn shared_cluster(&self, node: &str, port: Option<i64>) -> memo::SharedCluster {
        let mut scratch = Output::default();
        let identity = cluster_identity(self.mesh_name, self.mesh, node, port);
        let cluster = identity.as_ref().and_then(|(name, port, proto)| {
            self.plain_cluster(node, (name, *port, *proto), &mut scratch)
        });
        let endpoint = scratch.endpoints.pop().map(|e| match e {
            Part::Built(e) => Part::shared(&*e),
            Part::Shared(i) => i,
        });
        memo::SharedCluster {
            built: identity.filter(|_| cluster.is_some()),
            cluster: cluster.as_ref().map(Part::shared),
            endpoints: endpoint,
            pending: scratch.pending.pop(),
            unserved: scratch.unserved,
        }
    }

    /// The virtual service's part of this caller's egress: the memo's when the caller's policies
    /// leave every cluster it routes to as the memo found it, else built for this caller.
    fn service_plan(&self, service: &str, out: &mut Output) -> Arc<ServicePlan> {
        if let Some(memo) = self.memo {
            let shared = shared_plan(memo, self.mesh_name, self.mesh, service);
            // Same lookups in the same order as building would make, so clusters get the same
            // first-service TLS either way.
            let mut same = true;
            for ((node, port), found) in &shared.lookups {
                same &= self.node_cluster(node, *port, out) == *found;
            }
            if same {
                return shared;
            }
        }
        Arc::new(service_plan(self.mesh, service, &mut |node, port| {
            self.node_cluster(node, port, out)
        }))
    }
}

/// The service's plan as every caller with no refusing policy gets it, from the memo.
fn shared_plan(memo: &Memo, mesh_name: &str, mesh: &MeshState, service: &str) -> Arc<ServicePlan> {
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

/// The caller-side cluster to `node`'s listener on `port` (its only listener when `None`), as
/// every caller names it, if the node can be reached there at all.
fn cluster_identity(mesh_name: &str, mesh: &MeshState, node: &str, port: Option<i64>) -> Built {
    let target = mesh.virtual_nodes.get(node)?;
    let mut listeners = target.spec.listeners.iter().flatten();
    let l = match port {
        Some(p) => listeners.find(|l| l.port_mapping.port == p)?,
        None => match (listeners.next(), listeners.next()) {
            (Some(only), None) => only,
            _ => return None,
        },
    };
    let sd = target.spec.service_discovery.as_ref()?;
    if sd.dns.is_none() && sd.aws_cloud_map.is_none() {
        return None;
    }
    let port = u32::try_from(l.port_mapping.port).ok()?;
    let proto = l.port_mapping.protocol;
    let name = format!("cds_egress_{mesh_name}_{node}_{}_{port}", proto.as_str());
    Some((name, port, proto))
}

/// What one virtual service puts on a caller's egress listener, per port.
#[derive(Debug)]
struct ServicePlan {
    /// The (node, port) clusters looked up while building, each once in the order first asked,
    /// and what each answered.
    lookups: Vec<((String, Option<i64>), Built)>,
    ports: Vec<(u32, PortEntry)>,
    /// The Cloud Map keys of the nodes it reaches: their instances are its callers' endpoints.
    keys: Vec<CloudMapKey>,
    /// What it was built from, as [`stamp`].
    stamp: output::Hash,
}

#[derive(Debug)]
enum PortEntry {
    /// The service's virtual host, and the same for the explicit egress chain.
    Http {
        proto: PortProtocol,
        host: Arc<Host>,
        explicit: Arc<Host>,
    },
    /// Weighted clusters of a TCP proxy.
    Tcp(Vec<(String, u32)>),
}

/// Builds a service's plan, finding clusters through `lookup`. A backend may name a service that
/// does not exist (yet); it gets no route.
fn service_plan(
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
fn stamp(
    mesh: &MeshState,
    service: &str,
    lookups: &[((String, Option<i64>), Built)],
) -> output::Hash {
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
            ports.push((port, PortEntry::Tcp(vec![(cluster, 1)])));
        } else {
            // The provider's listener timeouts hold on the caller's side too, or the caller's
            // 15 s default would cut a longer listener timeout short.
            let (per_request, idle) = policy::http_timeouts(l);
            let vh = envoy::virtual_host_timed("", vec![], &cluster, per_request, idle);
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
        let attached = router_routes(lookup, routes, proto, l.port_mapping.port, listeners.len());
        if proto == PortProtocol::Tcp {
            if let Some(first) = attached
                .iter()
                .find(|n| n.targets.iter().any(|t| t.weight > 0))
            {
                // Envoy's TCP proxy takes weights of 1 and up (HTTP routes take 0): a target
                // that may not receive connections is left out.
                let targets = first
                    .targets
                    .iter()
                    .filter(|t| t.weight > 0)
                    .map(|t| (t.cluster.clone(), t.weight))
                    .collect();
                ports.push((port, PortEntry::Tcp(targets)));
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
        vh.retry_policy = Some(routes::host_retry(proto));
        ports.push((port, http_entry(service, port, proto, vh)));
    }
}

/// The router's routes that attach to its listener (protocol, port), with their targets resolved
/// to caller-side clusters, in App Mesh's order.
fn router_routes<'r>(
    lookup: &mut dyn FnMut(&str, Option<i64>) -> Built,
    routes: Option<&'r BTreeMap<String, trellis_model::Resource<RouteSpec>>>,
    proto: PortProtocol,
    port: i64,
    listeners: usize,
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
                    let (cluster, _, _) = lookup(&t.virtual_node, t.port)?;
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
    out: &mut Output,
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
                out.endpoints.push(Part::built(assignment));
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod cloud_map_tests;

#[cfg(test)]
mod memo_tests;
