//! A virtual node's listeners: ingress (one filter chain per listener port, to the local app,
//! with the listener's policies) and egress (one filter chain per destination port its backends
//! listen on; HTTP ports route by Host to one virtual host per virtual service).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_envoy_api::pb::envoy::config::accesslog::v3::AccessLog;
use trellis_envoy_api::pb::envoy::config::listener::v3::FilterChain;
use trellis_model::{ClientPolicy, EgressFilterType, MeshState, PortProtocol, VirtualNodeSpec};

use super::cluster::{Client, Ctx};
use super::output::{Host, Output, Part, RouteConfig};
use super::plan::{PortEntry, TcpTargets};
use super::{EGRESS_PORT, INGRESS_PORT, envoy, policy};

/// What DROP_ALL still lets through: AWS API endpoints over TLS.
const AWS_API_PORT: u32 = 443;
const AWS_API_DOMAINS: &str = "*.amazonaws.com";

pub(super) fn virtual_node<'a>(
    ctx: &Ctx<'a>,
    node_name: &str,
    spec: &'a VirtualNodeSpec,
) -> Output {
    let mut out = Output::default();
    let acm = ctx.endpoints.acm.as_deref();
    ingress(ctx.mesh_name, ctx.mesh, node_name, spec, acm, &mut out);
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
    acm: Option<&BTreeSet<String>>,
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
        let stats = ingress_stat_prefix(proto.as_str(), port);
        let filter = if proto == PortProtocol::Tcp {
            envoy::tcp_proxy(&stats, &[(cluster, 1)], policy::tcp_idle(l), &logs)
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
            envoy::http_connection_manager(&stats, &route_name, &logs, false)
        };
        match policy::listener_tls(
            l.tls.as_ref(),
            l.port_mapping.port,
            proto,
            acm,
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
    /// The TCP services on this port (by name) and their proxies' targets. Only the address the
    /// app connects to tells them apart: each gets the addresses its name resolves to, and the
    /// first also takes whatever matches no address (App Mesh's one service per TCP port).
    tcp: Vec<(String, TcpTargets)>,
}

impl PortPlan {
    fn add_tcp(&mut self, service: &str, targets: TcpTargets) {
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
    services: &[(String, TcpTargets)],
    addresses: &BTreeMap<String, std::sync::Arc<[std::net::IpAddr]>>,
    logs: &[AccessLog],
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
                    envoy::tcp_proxy("egress", &targets.clusters, targets.idle, logs),
                ));
            }
        }
    }
    if let Some((_, targets)) = services.first() {
        chains.push(envoy::filter_chain(
            Some(port),
            envoy::tcp_proxy("egress", &targets.clusters, targets.idle, logs),
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
    let defaults = spec
        .backend_defaults
        .as_ref()
        .and_then(|d| d.client_policy.as_ref());
    let own: BTreeMap<&str, &ClientPolicy> = spec
        .backends
        .iter()
        .flatten()
        .filter_map(|b| b.virtual_service.as_ref())
        .filter_map(|vs| Some((vs.virtual_service_name.as_str(), vs.client_policy.as_ref()?)))
        .collect();
    let client = |service| Client {
        service,
        policy: policy::client_policy(own.get(service).copied(), defaults),
    };
    let bases: Vec<_> = backends.iter().map(|s| (*s, ctx.base_plan(s))).collect();
    // A cluster is per (node, port), so one backend's client policy and name (SNI) decide its
    // TLS when several backends reach a node: the first by name whose routes reach it.
    // Without any client policy every cluster is plain whoever owns it: no need to know.
    let mut owners: BTreeMap<(&str, Option<i64>), Client<'_>> = BTreeMap::new();
    let policies = defaults.is_some() || !own.is_empty();
    for (service, base) in bases.iter().filter(|_| policies) {
        for ((node, port), _) in &base.lookups {
            owners
                .entry((node.as_str(), *port))
                .or_insert_with(|| client(service));
        }
    }
    for (service, base) in &bases {
        let owner = |node: &str, port| {
            owners
                .get(&(node, port))
                .copied()
                .unwrap_or(client(service))
        };
        let plan = ctx.caller_plan(service, base, &owner, out);
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
            envoy::http_connection_manager("egress", &route_name, &logs, true),
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
            envoy::http_connection_manager("egress", &route_name, &logs, true),
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

/// The stat prefix of a listener port's connection manager or TCP proxy, as App Mesh's control
/// plane named it and its Envoy image's stats tags parse it (`appmesh.listener_protocol`,
/// `appmesh.listener_port` from `*.ingress.PROTOCOL.PORT.*`, aws/amazon-ecs-service-connect-agent
/// `envoy_bootstrap.go`): `http.ingress.http.8080.downstream_rq_2xx`.
pub(super) fn ingress_stat_prefix(proto: &str, port: u32) -> String {
    format!("ingress.{proto}.{port}")
}

/// The virtual services a node declares as backends, each once, by name.
pub(super) fn backend_names(spec: &VirtualNodeSpec) -> BTreeSet<&str> {
    spec.backends
        .iter()
        .flatten()
        .filter_map(|b| b.virtual_service.as_ref())
        .map(|vs| vs.virtual_service_name.as_str())
        .collect()
}
