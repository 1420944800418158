//! The App Mesh side of an explanation: which spec field each Envoy decision came from, and, for
//! a refused request, the reason in App Mesh's terms and the field to change.
//!
//! Envoy names carry App Mesh's (translation's contract, DESIGN.md): a virtual host is named
//! after its virtual service, a route after its App Mesh route (a gateway's `GR`, `GR/ROUTE` when
//! composed with a router's route, `GR/no-route` for the router's 404), a cluster
//! `cds_egress_MESH_NODE_PROTO_PORT` after the node and listener it reaches. Clusters are
//! recognised by computing those names from the state, never by parsing them.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_envoy_api::pb::envoy::config::listener::v3::Listener;
use trellis_model::{
    GatewayRouteSpec, GrpcRoute, HttpRoute, MeshState, ProxyIdentity, ProxyKind, RouteSpec, State,
    VirtualGatewaySpec, VirtualNodeSpec,
};

use super::{Direction, Field, Fix};

/// Why a route did not take the request.
#[derive(Clone, Debug)]
pub(crate) enum Miss {
    Path(String),
    Header { name: String, reason: String },
    Query { name: String, reason: String },
    Grpc(String),
    Other(String),
}

impl Miss {
    pub(crate) fn reason(&self) -> &str {
        match self {
            Miss::Path(r) | Miss::Grpc(r) | Miss::Other(r) => r,
            Miss::Header { reason, .. } | Miss::Query { reason, .. } => reason,
        }
    }
}

/// The App Mesh resource an Envoy route came from.
#[derive(Clone, Debug)]
pub(crate) enum RouteRef<'a> {
    /// A router's route, for the virtual service the router provides.
    Router {
        router: String,
        name: String,
        spec: &'a RouteSpec,
    },
    /// The one catch-all route of a service provided by a node.
    Node {
        service: String,
        node: String,
    },
    /// A virtual node's own listener (inbound).
    Ingress {
        port: u32,
    },
    /// A gateway route, alone or composed with one of its target router's routes.
    Gateway {
        name: String,
        spec: &'a GatewayRouteSpec,
        router: Option<(String, String, &'a RouteSpec)>,
        service: String,
    },
    /// ALLOW_ALL's catch-all to the original destination.
    AllowAll,
    Unknown,
}

/// What a cluster name stands for.
#[derive(Clone, Debug)]
enum ClusterOf {
    /// A caller-side cluster to a node's listener.
    Egress {
        node: String,
        port: u32,
    },
    /// The node's own app, behind its listener.
    Ingress {
        port: u32,
    },
    AllowAll,
    Amazonaws,
    /// A gateway listener's pool (a loopback hop).
    SelfRedirect {
        port: u32,
    },
}

pub(crate) struct Spec<'a> {
    pub(crate) who: &'a ProxyIdentity,
    mesh: Option<&'a MeshState>,
    clusters: BTreeMap<String, ClusterOf>,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn field(resource: String, field: impl Into<String>, value: impl Into<String>) -> Field {
    Field {
        resource,
        field: field.into(),
        value: value.into(),
    }
}

fn fix(resource: String, field: impl Into<String>, change: impl Into<String>) -> Fix {
    Fix {
        resource,
        field: field.into(),
        change: change.into(),
    }
}

const UNSET: &str = "(unset)";

/// The kind of a route and its field path (`spec.httpRoute`).
enum Kind<'a> {
    Http(&'static str, &'a HttpRoute),
    Grpc(&'a GrpcRoute),
    Tcp,
}

fn kind(spec: &RouteSpec) -> Kind<'_> {
    if let Some(h) = &spec.http_route {
        Kind::Http("spec.httpRoute", h)
    } else if let Some(h) = &spec.http2_route {
        Kind::Http("spec.http2Route", h)
    } else if let Some(g) = &spec.grpc_route {
        Kind::Grpc(g)
    } else {
        Kind::Tcp
    }
}

fn kind_path(spec: &RouteSpec) -> &'static str {
    match kind(spec) {
        Kind::Http(p, _) => p,
        Kind::Grpc(_) => "spec.grpcRoute",
        Kind::Tcp => "spec.tcpRoute",
    }
}

fn gateway_kind_path(spec: &GatewayRouteSpec) -> &'static str {
    if spec.http_route.is_some() {
        "spec.httpRoute"
    } else if spec.http2_route.is_some() {
        "spec.http2Route"
    } else {
        "spec.grpcRoute"
    }
}

impl<'a> Spec<'a> {
    pub(crate) fn new(state: &'a State, who: &'a ProxyIdentity) -> Self {
        let mesh = state.meshes.get(&who.mesh);
        let m = &who.mesh;
        let mut clusters = BTreeMap::new();
        if let Some(mesh) = mesh {
            for (name, node) in &mesh.virtual_nodes {
                for l in node.spec.listeners.iter().flatten() {
                    let Ok(port) = u32::try_from(l.port_mapping.port) else {
                        continue;
                    };
                    let p = l.port_mapping.protocol.as_str();
                    clusters.insert(
                        format!("cds_egress_{m}_{name}_{p}_{port}"),
                        ClusterOf::Egress {
                            node: name.clone(),
                            port,
                        },
                    );
                    if who.kind == ProxyKind::VirtualNode && *name == who.name {
                        clusters.insert(
                            format!("cds_ingress_{m}_{name}_{p}_{port}"),
                            ClusterOf::Ingress { port },
                        );
                    }
                }
            }
            if who.kind == ProxyKind::VirtualGateway
                && let Some(gw) = mesh.virtual_gateways.get(&who.name)
            {
                for l in &gw.spec.listeners {
                    let Ok(port) = u32::try_from(l.port_mapping.port) else {
                        continue;
                    };
                    let p = l.port_mapping.protocol.as_str();
                    // A pool's hop cluster ends with the loopback port it reaches, not the
                    // listener's: known by its prefix.
                    clusters.insert(
                        format!("cds_ingress_{m}_{}_self_redirect_{p}_", who.name),
                        ClusterOf::SelfRedirect { port },
                    );
                }
            }
        }
        clusters.insert(format!("cds_egress_{m}_allow_all"), ClusterOf::AllowAll);
        clusters.insert(format!("cds_egress_{m}_amazonaws"), ClusterOf::Amazonaws);
        Spec {
            who,
            mesh,
            clusters,
        }
    }

    // === Resource paths ===

    fn mesh_path(&self) -> String {
        format!("mesh/{}", self.who.mesh)
    }

    fn node_path(&self, n: &str) -> String {
        format!("mesh/{}/virtualNode/{n}", self.who.mesh)
    }

    fn service_path(&self, s: &str) -> String {
        format!("mesh/{}/virtualService/{s}", self.who.mesh)
    }

    fn router_path(&self, r: &str) -> String {
        format!("mesh/{}/virtualRouter/{r}", self.who.mesh)
    }

    fn route_path(&self, r: &str, x: &str) -> String {
        format!("mesh/{}/virtualRouter/{r}/route/{x}", self.who.mesh)
    }

    fn gateway_path(&self) -> String {
        format!("mesh/{}/virtualGateway/{}", self.who.mesh, self.who.name)
    }

    fn gateway_route_path(&self, gr: &str) -> String {
        format!("{}/gatewayRoute/{gr}", self.gateway_path())
    }

    fn own_path(&self) -> String {
        self.who.to_string()
    }

    // === Lookups ===

    fn own_node(&self) -> Option<&'a VirtualNodeSpec> {
        (self.who.kind == ProxyKind::VirtualNode)
            .then(|| self.mesh?.virtual_nodes.get(&self.who.name))
            .flatten()
            .map(|n| &n.spec)
    }

    fn own_gateway(&self) -> Option<&'a VirtualGatewaySpec> {
        (self.who.kind == ProxyKind::VirtualGateway)
            .then(|| self.mesh?.virtual_gateways.get(&self.who.name))
            .flatten()
            .map(|g| &g.spec)
    }

    /// The caller's backends: (index, service name).
    fn backends(&self) -> Vec<(usize, &'a str)> {
        self.own_node()
            .and_then(|n| n.backends.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, b)| {
                Some((i, b.virtual_service.as_ref()?.virtual_service_name.as_str()))
            })
            .collect()
    }

    fn backend_field(&self, service: &str) -> Option<Field> {
        let (i, s) = self.backends().into_iter().find(|(_, s)| *s == service)?;
        Some(field(
            self.own_path(),
            format!("spec.backends[{i}].virtualService.virtualServiceName"),
            json(&s),
        ))
    }

    /// The ports a service listens on, each with the provider's field that says so.
    fn service_ports(&self, service: &str) -> Vec<(u32, Field)> {
        let Some(mesh) = self.mesh else {
            return vec![];
        };
        let Some(p) = mesh
            .virtual_services
            .get(service)
            .and_then(|s| s.spec.provider.as_ref())
        else {
            return vec![];
        };
        let mut out = Vec::new();
        if let Some(n) = &p.virtual_node {
            let listeners = mesh
                .virtual_nodes
                .get(&n.virtual_node_name)
                .and_then(|n| n.spec.listeners.as_ref());
            for (j, l) in listeners.into_iter().flatten().enumerate() {
                if let Ok(port) = u32::try_from(l.port_mapping.port) {
                    out.push((
                        port,
                        field(
                            self.node_path(&n.virtual_node_name),
                            format!("spec.listeners[{j}].portMapping"),
                            json(&l.port_mapping),
                        ),
                    ));
                }
            }
        } else if let Some(r) = &p.virtual_router {
            let listeners = mesh
                .virtual_routers
                .get(&r.virtual_router_name)
                .and_then(|r| r.spec.listeners.as_ref());
            for (j, l) in listeners.into_iter().flatten().enumerate() {
                if let Ok(port) = u32::try_from(l.port_mapping.port) {
                    out.push((
                        port,
                        field(
                            self.router_path(&r.virtual_router_name),
                            format!("spec.listeners[{j}].portMapping"),
                            json(&l.port_mapping),
                        ),
                    ));
                }
            }
        }
        out
    }

    /// `host` as a virtual service name (a Host header's port dropped).
    fn service_named(&self, host: &str) -> Option<&'a str> {
        let mesh = self.mesh?;
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        mesh.virtual_services
            .get_key_value(bare)
            .map(|(k, _)| k.as_str())
    }

    // === Listeners and chains ===

    pub(crate) fn no_listener(&self, port: u32, direction: Direction) -> (String, Vec<Fix>) {
        match (self.who.kind, direction) {
            (ProxyKind::VirtualGateway, _) => {
                let ports: Vec<i64> = self
                    .own_gateway()
                    .map(|g| g.listeners.iter().map(|l| l.port_mapping.port).collect())
                    .unwrap_or_default();
                (
                    format!(
                        "virtual gateway {} has no listener on port {port} (its ports: {ports:?}): the connection is refused",
                        self.who.name
                    ),
                    vec![fix(
                        self.gateway_path(),
                        "spec.listeners[].portMapping.port",
                        format!("add a listener on {port}, or call one of {ports:?}"),
                    )],
                )
            }
            (_, Direction::Inbound) => (
                format!(
                    "virtual node {} has no listeners, so Envoy has no ingress listener",
                    self.who.name
                ),
                vec![fix(
                    self.own_path(),
                    "spec.listeners",
                    format!("add a listener with portMapping.port {port}"),
                )],
            ),
            (_, Direction::Outbound) => ("this proxy was sent no egress listener".into(), vec![]),
        }
    }

    pub(crate) fn chain_fields(&self, l: &Listener, port: u32, direction: Direction) -> Vec<Field> {
        match (self.who.kind, direction) {
            (ProxyKind::VirtualGateway, _) => self
                .own_gateway()
                .into_iter()
                .flat_map(|g| g.listeners.iter().enumerate())
                .filter(|(_, gl)| gl.port_mapping.port == i64::from(port))
                .flat_map(|(j, gl)| {
                    let mut f = vec![field(
                        self.gateway_path(),
                        format!("spec.listeners[{j}].portMapping"),
                        json(&gl.port_mapping),
                    )];
                    if let Some(tls) = &gl.tls {
                        f.push(field(
                            self.gateway_path(),
                            format!("spec.listeners[{j}].tls.mode"),
                            json(&tls.mode),
                        ));
                    }
                    f
                })
                .collect(),
            (_, Direction::Inbound) => self
                .own_node()
                .and_then(|n| n.listeners.as_ref())
                .into_iter()
                .flatten()
                .enumerate()
                .filter(|(_, nl)| nl.port_mapping.port == i64::from(port))
                .flat_map(|(j, nl)| {
                    let mut f = vec![field(
                        self.own_path(),
                        format!("spec.listeners[{j}].portMapping"),
                        json(&nl.port_mapping),
                    )];
                    if let Some(tls) = &nl.tls {
                        f.push(field(
                            self.own_path(),
                            format!("spec.listeners[{j}].tls.mode"),
                            json(&tls.mode),
                        ));
                    }
                    f
                })
                .collect(),
            (_, Direction::Outbound) => {
                let mut out = Vec::new();
                for (i, s) in self.backends() {
                    let ports = self.service_ports(s);
                    let on: Vec<Field> = ports
                        .into_iter()
                        .filter(|(p, _)| *p == port)
                        .map(|(_, f)| f)
                        .collect();
                    if !on.is_empty() {
                        out.push(field(
                            self.own_path(),
                            format!("spec.backends[{i}].virtualService.virtualServiceName"),
                            json(&s),
                        ));
                        out.extend(on);
                    }
                }
                if out.is_empty()
                    && let Some(mesh) = self.mesh
                    && l.default_filter_chain.is_some()
                {
                    out.push(field(
                        self.mesh_path(),
                        "spec.egressFilter.type",
                        json(&mesh.mesh.spec.egress_filter_type()),
                    ));
                }
                out
            }
        }
    }

    pub(crate) fn tcp_fields(&self, port: u32, direction: Direction) -> Vec<Field> {
        match direction {
            Direction::Inbound => vec![],
            Direction::Outbound => {
                let mut out = Vec::new();
                for (_, s) in self.backends() {
                    if self.service_ports(s).iter().any(|(p, _)| *p == port)
                        && let Some(r) = self.router_of(s)
                    {
                        for (name, route) in self.routes_of(&r) {
                            if route.tcp_route.is_some() {
                                out.push(field(
                                    self.route_path(&r, name),
                                    "spec.tcpRoute.action.weightedTargets",
                                    route
                                        .tcp_route
                                        .as_ref()
                                        .map(|t| json(&t.action.weighted_targets))
                                        .unwrap_or_default(),
                                ));
                            }
                        }
                    }
                }
                out
            }
        }
    }

    pub(crate) fn no_chain(
        &self,
        port: u32,
        host: &str,
        tls: bool,
        direction: Direction,
    ) -> (String, Vec<Fix>) {
        match (self.who.kind, direction) {
            (ProxyKind::VirtualGateway, _) => (
                format!(
                    "the gateway's listener on port {port} takes no {} connection (its TLS mode)",
                    if tls { "TLS" } else { "plaintext" }
                ),
                vec![fix(
                    self.gateway_path(),
                    "spec.listeners[].tls.mode",
                    "STRICT takes TLS only, PERMISSIVE both, DISABLED plaintext only",
                )],
            ),
            (_, Direction::Inbound) => {
                let ports: Vec<i64> = self
                    .own_node()
                    .and_then(|n| n.listeners.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|l| l.port_mapping.port)
                    .collect();
                (
                    format!(
                        "virtual node {} does not listen on port {port} (its ports: {ports:?})",
                        self.who.name
                    ),
                    vec![fix(
                        self.own_path(),
                        "spec.listeners[].portMapping.port",
                        format!("add a listener on {port}"),
                    )],
                )
            }
            (_, Direction::Outbound) => {
                let mesh_fix = fix(
                    self.mesh_path(),
                    "spec.egressFilter.type",
                    "ALLOW_ALL lets the app reach destinations outside the mesh",
                );
                let mut reason = format!(
                    "no backend of virtual node {} listens on port {port}, and mesh {}'s egress filter is DROP_ALL: Envoy closes the connection",
                    self.who.name, self.who.mesh
                );
                if tls && port == 443 {
                    reason.push_str(" (DROP_ALL lets through TLS to *.amazonaws.com on 443 only)");
                }
                let mut fixes = Vec::new();
                if let Some(s) = self.service_named(host) {
                    let ports: Vec<u32> = self.service_ports(s).iter().map(|(p, _)| *p).collect();
                    if self.backend_field(s).is_none() {
                        reason = format!(
                            "backend not declared: {s} is a virtual service of mesh {}, but not a backend of virtual node {}; {reason}",
                            self.who.mesh, self.who.name
                        );
                        fixes.push(fix(
                            self.own_path(),
                            "spec.backends",
                            format!(
                                "add {{\"virtualService\": {{\"virtualServiceName\": \"{s}\"}}}}"
                            ),
                        ));
                    } else {
                        reason = format!("{s} listens on ports {ports:?}, not {port}; {reason}");
                        fixes.push(fix(
                            self.service_path(s),
                            "spec.provider",
                            format!("call {s} on one of {ports:?}, or give its provider a listener on {port}"),
                        ));
                    }
                } else {
                    fixes.push(fix(
                        self.own_path(),
                        "spec.backends",
                        format!("add the virtual service you call on port {port}"),
                    ));
                }
                fixes.push(mesh_fix);
                (reason, fixes)
            }
        }
    }

    pub(crate) fn health_reply(&self, port: u32) -> (String, Vec<Field>) {
        let from = self
            .own_gateway()
            .into_iter()
            .flat_map(|g| g.listeners.iter().enumerate())
            .filter(|(_, l)| l.port_mapping.port == i64::from(port))
            .filter_map(|(j, l)| {
                let hc = l.health_check.as_ref()?;
                Some(field(
                    self.gateway_path(),
                    format!("spec.listeners[{j}].healthCheck.path"),
                    json(&hc.path),
                ))
            })
            .collect();
        (
            "answered 200 by the gateway itself: the path is its listener's health check".into(),
            from,
        )
    }

    // === Virtual hosts ===

    pub(crate) fn vhost_fields(&self, name: &str) -> Vec<Field> {
        if name == "allow_all" {
            return vec![field(
                self.mesh_path(),
                "spec.egressFilter.type",
                json(&"ALLOW_ALL"),
            )];
        }
        let Some(s) = self.service_named(name) else {
            return vec![];
        };
        let mut out: Vec<Field> = self.backend_field(s).into_iter().collect();
        if let Some(p) = self
            .mesh
            .and_then(|m| m.virtual_services.get(s))
            .and_then(|v| v.spec.provider.as_ref())
        {
            out.push(field(self.service_path(s), "spec.provider", json(p)));
        }
        out
    }

    pub(crate) fn no_vhost(&self, port: u32, host: &str, names: &[&str]) -> (String, Vec<Fix>) {
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let Some(s) = self.service_named(host) else {
            return (
                format!(
                    "{bare:?} is not a virtual service of mesh {} (on port {port} this proxy routes {names:?}): Envoy answers 404",
                    self.who.mesh
                ),
                vec![
                    fix(
                        self.mesh_path(),
                        "virtualServices",
                        format!("create virtual service {bare} (or call one of {names:?})"),
                    ),
                    fix(
                        self.own_path(),
                        "spec.backends",
                        format!("declare {bare} as a backend"),
                    ),
                ],
            );
        };
        if self.backend_field(s).is_none() {
            return (
                format!(
                    "backend not declared: {s} is a virtual service of mesh {}, but not a backend of virtual node {}: Envoy answers 404",
                    self.who.mesh, self.who.name
                ),
                vec![fix(
                    self.own_path(),
                    "spec.backends",
                    format!("add {{\"virtualService\": {{\"virtualServiceName\": \"{s}\"}}}}"),
                )],
            );
        }
        let ports: Vec<u32> = self.service_ports(s).iter().map(|(p, _)| *p).collect();
        if !ports.contains(&port) {
            return (
                format!("{s} listens on ports {ports:?}, not {port}: Envoy answers 404"),
                vec![fix(
                    self.service_path(s),
                    "spec.provider",
                    format!(
                        "call {s} on one of {ports:?}, or give its provider a listener on {port}"
                    ),
                )],
            );
        }
        if let Some(r) = self.router_of(s) {
            return (
                format!(
                    "virtual router {r} (the provider of {s}) has no route for its listener on port {port}: Envoy answers 404"
                ),
                vec![fix(
                    self.router_path(&r),
                    "routes",
                    format!(
                        "create a route whose match.port is {port} (or that names no port, when the router has one listener)"
                    ),
                )],
            );
        }
        let node = self
            .mesh
            .and_then(|m| m.virtual_services.get(s))
            .and_then(|v| v.spec.provider.as_ref())
            .and_then(|p| p.virtual_node.as_ref())
            .map(|n| n.virtual_node_name.clone())
            .unwrap_or_default();
        (
            format!(
                "{s}'s provider, virtual node {node}, cannot be reached (it has no service discovery, or does not exist): Envoy answers 404"
            ),
            vec![fix(
                self.node_path(&node),
                "spec.serviceDiscovery",
                "set dns.hostname or awsCloudMap",
            )],
        )
    }

    // === Routes ===

    fn router_of(&self, service: &str) -> Option<String> {
        self.mesh?
            .virtual_services
            .get(service)?
            .spec
            .provider
            .as_ref()?
            .virtual_router
            .as_ref()
            .map(|r| r.virtual_router_name.clone())
    }

    fn routes_of(&self, router: &str) -> Vec<(&'a str, &'a RouteSpec)> {
        self.mesh
            .and_then(|m| m.routes.get(router))
            .into_iter()
            .flatten()
            .map(|(n, r)| (n.as_str(), &r.spec))
            .collect()
    }

    pub(crate) fn route(&self, vhost: &str, name: &str, port: u32) -> RouteRef<'a> {
        let Some(mesh) = self.mesh else {
            return RouteRef::Unknown;
        };
        match self.who.kind {
            ProxyKind::VirtualGateway => {
                let (gr, rest) = match name.split_once('/') {
                    Some((g, r)) => (g, Some(r)),
                    None => (name, None),
                };
                let Some(g) = mesh
                    .gateway_routes
                    .get(&self.who.name)
                    .and_then(|m| m.get(gr))
                else {
                    return RouteRef::Unknown;
                };
                let service = g
                    .spec
                    .target()
                    .map(|t| t.virtual_service.virtual_service_name.clone())
                    .unwrap_or_default();
                let router = rest.filter(|r| *r != "no-route").and_then(|x| {
                    let r = self.router_of(&service)?;
                    let spec = mesh.routes.get(&r)?.get(x)?;
                    Some((r, x.to_string(), &spec.spec))
                });
                RouteRef::Gateway {
                    name: gr.to_string(),
                    spec: &g.spec,
                    router,
                    service,
                }
            }
            ProxyKind::VirtualNode => {
                if vhost == "allow_all" {
                    return RouteRef::AllowAll;
                }
                if vhost == "ingress" {
                    return RouteRef::Ingress { port };
                }
                let Some(s) = self.service_named(vhost) else {
                    return RouteRef::Unknown;
                };
                let provider = mesh
                    .virtual_services
                    .get(s)
                    .and_then(|v| v.spec.provider.as_ref());
                if let Some(n) = provider.and_then(|p| p.virtual_node.as_ref()) {
                    return RouteRef::Node {
                        service: s.to_string(),
                        node: n.virtual_node_name.clone(),
                    };
                }
                let Some(r) = provider.and_then(|p| p.virtual_router.as_ref()) else {
                    return RouteRef::Unknown;
                };
                let r = &r.virtual_router_name;
                match mesh.routes.get(r).and_then(|m| m.get(name)) {
                    Some(route) => RouteRef::Router {
                        router: r.clone(),
                        name: name.to_string(),
                        spec: &route.spec,
                    },
                    None => RouteRef::Unknown,
                }
            }
        }
    }

    pub(crate) fn route_fields(&self, rr: &RouteRef<'_>) -> Vec<Field> {
        match rr {
            RouteRef::Router {
                router, name, spec, ..
            } => self.router_route_fields(router, name, spec),
            RouteRef::Node { service, node } => vec![field(
                self.service_path(service),
                "spec.provider.virtualNode.virtualNodeName",
                json(node),
            )],
            RouteRef::Ingress { port } => {
                self.chain_fields(&Listener::default(), *port, Direction::Inbound)
            }
            RouteRef::Gateway {
                name, spec, router, ..
            } => {
                let k = gateway_kind_path(spec);
                let mut out = Vec::new();
                if let Some(p) = spec.priority {
                    out.push(field(
                        self.gateway_route_path(name),
                        "spec.priority",
                        p.to_string(),
                    ));
                }
                out.push(field(
                    self.gateway_route_path(name),
                    format!("{k}.match"),
                    gateway_match_json(spec),
                ));
                if let Some(t) = spec.target() {
                    out.push(field(
                        self.gateway_route_path(name),
                        format!("{k}.action.target"),
                        json(t),
                    ));
                }
                if let Some((r, x, rs)) = router {
                    out.extend(self.router_route_fields(r, x, rs));
                }
                out
            }
            RouteRef::AllowAll => self.vhost_fields("allow_all"),
            RouteRef::Unknown => vec![],
        }
    }

    fn router_route_fields(&self, router: &str, name: &str, spec: &RouteSpec) -> Vec<Field> {
        let path = self.route_path(router, name);
        let k = kind_path(spec);
        let mut out = Vec::new();
        if let Some(p) = spec.priority {
            out.push(field(path.clone(), "spec.priority", p.to_string()));
        }
        let m = match kind(spec) {
            Kind::Http(_, h) => json(&h.r#match),
            Kind::Grpc(g) => json(&g.r#match),
            Kind::Tcp => UNSET.into(),
        };
        out.push(field(path, format!("{k}.match"), m));
        out
    }

    /// The App Mesh field behind a failed condition: the gateway route's own match when
    /// `gateway_own`, else the (router) route's.
    pub(crate) fn miss_fields(
        &self,
        rr: &RouteRef<'_>,
        miss: &Miss,
        gateway_own: bool,
    ) -> Vec<Field> {
        match rr {
            RouteRef::Router {
                router, name, spec, ..
            } => self.router_miss(router, name, spec, miss),
            RouteRef::Gateway {
                name, spec, router, ..
            } => match router {
                Some((r, x, rs)) if !gateway_own => self.router_miss(r, x, rs, miss),
                _ => self.gateway_miss(name, spec, miss),
            },
            _ => vec![],
        }
    }

    fn router_miss(&self, router: &str, name: &str, spec: &RouteSpec, miss: &Miss) -> Vec<Field> {
        let path = self.route_path(router, name);
        let k = kind_path(spec);
        match (kind(spec), miss) {
            (Kind::Http(_, h), Miss::Path(_) | Miss::Header { .. })
                if matches!(miss, Miss::Path(_))
                    || matches!(miss, Miss::Header { name, .. } if name == ":path") =>
            {
                let m = &h.r#match;
                match &m.path {
                    Some(p) if p.exact.is_some() => {
                        vec![field(path, format!("{k}.match.path.exact"), json(&p.exact))]
                    }
                    Some(p) if p.regex.is_some() => {
                        vec![field(path, format!("{k}.match.path.regex"), json(&p.regex))]
                    }
                    _ => vec![field(
                        path,
                        format!("{k}.match.prefix"),
                        m.prefix.as_ref().map_or(UNSET.into(), json),
                    )],
                }
            }
            (Kind::Http(_, h), Miss::Header { name: hn, .. }) => {
                let m = &h.r#match;
                match hn.as_str() {
                    ":method" => vec![field(path, format!("{k}.match.method"), json(&m.method))],
                    ":scheme" => vec![field(path, format!("{k}.match.scheme"), json(&m.scheme))],
                    _ => m
                        .headers
                        .iter()
                        .flatten()
                        .enumerate()
                        .filter(|(_, x)| x.name.eq_ignore_ascii_case(hn))
                        .map(|(i, x)| {
                            field(path.clone(), format!("{k}.match.headers[{i}]"), json(x))
                        })
                        .collect(),
                }
            }
            (Kind::Http(_, h), Miss::Query { name: qn, .. }) => h
                .r#match
                .query_parameters
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, q)| q.name == *qn)
                .map(|(i, q)| {
                    field(
                        path.clone(),
                        format!("{k}.match.queryParameters[{i}]"),
                        json(q),
                    )
                })
                .collect(),
            (Kind::Grpc(g), Miss::Path(_)) => vec![
                field(
                    path.clone(),
                    format!("{k}.match.serviceName"),
                    json(&g.r#match.service_name),
                ),
                field(
                    path,
                    format!("{k}.match.methodName"),
                    json(&g.r#match.method_name),
                ),
            ],
            (Kind::Grpc(g), Miss::Header { name: hn, .. }) => g
                .r#match
                .metadata
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, x)| x.name.eq_ignore_ascii_case(hn))
                .map(|(i, x)| field(path.clone(), format!("{k}.match.metadata[{i}]"), json(x)))
                .collect(),
            (Kind::Grpc(_), Miss::Grpc(_)) => vec![field(path, k, "(a gRPC route)")],
            _ => vec![],
        }
    }

    fn gateway_miss(&self, name: &str, spec: &GatewayRouteSpec, miss: &Miss) -> Vec<Field> {
        let path = self.gateway_route_path(name);
        let k = gateway_kind_path(spec);
        let header = |hn: &str| -> Vec<Field> {
            if hn == ":authority" {
                let h = spec
                    .http_route
                    .as_ref()
                    .or(spec.http2_route.as_ref())
                    .and_then(|r| r.r#match.hostname.as_ref())
                    .or_else(|| {
                        spec.grpc_route
                            .as_ref()
                            .and_then(|r| r.r#match.hostname.as_ref())
                    });
                return vec![field(
                    path.clone(),
                    format!("{k}.match.hostname"),
                    h.map_or(UNSET.into(), json),
                )];
            }
            if let Some(r) = spec.http_route.as_ref().or(spec.http2_route.as_ref()) {
                if hn == ":method" {
                    return vec![field(
                        path.clone(),
                        format!("{k}.match.method"),
                        json(&r.r#match.method),
                    )];
                }
                return r
                    .r#match
                    .headers
                    .iter()
                    .flatten()
                    .enumerate()
                    .filter(|(_, x)| x.name.eq_ignore_ascii_case(hn))
                    .map(|(i, x)| field(path.clone(), format!("{k}.match.headers[{i}]"), json(x)))
                    .collect();
            }
            spec.grpc_route
                .iter()
                .flat_map(|r| r.r#match.metadata.iter().flatten().enumerate())
                .filter(|(_, x)| x.name.eq_ignore_ascii_case(hn))
                .map(|(i, x)| field(path.clone(), format!("{k}.match.metadata[{i}]"), json(x)))
                .collect()
        };
        match miss {
            Miss::Header { name: hn, .. } if hn != ":path" => header(hn),
            Miss::Query { name: qn, .. } => spec
                .http_route
                .as_ref()
                .or(spec.http2_route.as_ref())
                .into_iter()
                .flat_map(|r| r.r#match.query_parameters.iter().flatten().enumerate())
                .filter(|(_, q)| q.name == *qn)
                .map(|(i, q)| {
                    field(
                        path.clone(),
                        format!("{k}.match.queryParameters[{i}]"),
                        json(q),
                    )
                })
                .collect(),
            _ => {
                if let Some(r) = spec.http_route.as_ref().or(spec.http2_route.as_ref()) {
                    let m = &r.r#match;
                    match &m.path {
                        Some(p) => vec![field(path, format!("{k}.match.path"), json(p))],
                        None => vec![field(
                            path,
                            format!("{k}.match.prefix"),
                            m.prefix.as_ref().map_or(UNSET.into(), json),
                        )],
                    }
                } else {
                    let sn = spec
                        .grpc_route
                        .as_ref()
                        .and_then(|g| g.r#match.service_name.as_ref());
                    vec![field(
                        path,
                        format!("{k}.match.serviceName"),
                        sn.map_or(UNSET.into(), json),
                    )]
                }
            }
        }
    }

    pub(crate) fn no_route(&self, vhost: &str, path: &str) -> (String, Vec<Fix>) {
        match self.who.kind {
            ProxyKind::VirtualGateway => (
                format!(
                    "no gateway route of virtual gateway {} matches {path}: Envoy answers 404",
                    self.who.name
                ),
                vec![fix(
                    self.gateway_path(),
                    "gatewayRoutes[].spec.httpRoute.match",
                    format!("add a gateway route whose match takes {path}, or widen one"),
                )],
            ),
            ProxyKind::VirtualNode => match self
                .service_named(vhost)
                .and_then(|s| self.router_of(s).map(|r| (s, r)))
            {
                Some((s, r)) => (
                    format!(
                        "no route of virtual router {r} (the provider of {s}) matches the request: Envoy answers 404"
                    ),
                    vec![fix(
                        self.router_path(&r),
                        "routes[].spec.httpRoute.match",
                        format!("add a route that takes {path}, or widen a route's match"),
                    )],
                ),
                None => (
                    "no route matches the request: Envoy answers 404".into(),
                    vec![],
                ),
            },
        }
    }

    pub(crate) fn direct(&self, rr: &RouteRef<'_>, status: u32) -> (String, Vec<Fix>) {
        match rr {
            RouteRef::Gateway { name, service, .. } if status == 404 => {
                let r = self.router_of(service).unwrap_or_default();
                (
                    format!(
                        "gateway route {name} matched, but no route of virtual router {r} (the provider of {service}) matches the request as the gateway forwards it: Envoy answers 404"
                    ),
                    vec![fix(
                        self.router_path(&r),
                        "routes[].spec.httpRoute.match",
                        "add a route that takes the forwarded path, or widen a route's match",
                    )],
                )
            }
            RouteRef::Router {
                router, name, spec, ..
            } => (
                format!("every weighted target of route {name} weighs 0: Envoy answers {status}"),
                vec![fix(
                    self.route_path(router, name),
                    format!("{}.action.weightedTargets[].weight", kind_path(spec)),
                    "give at least one target a weight above 0",
                )],
            ),
            _ => (format!("the route answers {status} itself"), vec![]),
        }
    }

    pub(crate) fn rewrite_fields(&self, rr: &RouteRef<'_>) -> Vec<Field> {
        match rr {
            RouteRef::Gateway { name, spec, .. } => {
                let k = gateway_kind_path(spec);
                let rewrite = spec
                    .http_route
                    .as_ref()
                    .or(spec.http2_route.as_ref())
                    .and_then(|r| r.action.rewrite.as_ref())
                    .map(json)
                    .or_else(|| {
                        spec.grpc_route
                            .as_ref()
                            .and_then(|r| r.action.rewrite.as_ref())
                            .map(json)
                    })
                    .unwrap_or_else(|| {
                        "(unset): App Mesh's defaults, the matched prefix becomes / and Host the target service".into()
                    });
                vec![field(
                    self.gateway_route_path(name),
                    format!("{k}.action.rewrite"),
                    rewrite,
                )]
            }
            _ => vec![],
        }
    }

    pub(crate) fn retry_fields(&self, rr: &RouteRef<'_>, own: bool) -> Vec<Field> {
        let of_router = |router: &str, name: &str, spec: &RouteSpec| {
            let k = kind_path(spec);
            let p = match kind(spec) {
                Kind::Http(_, h) => h.retry_policy.as_ref().map(json),
                Kind::Grpc(g) => g.retry_policy.as_ref().map(json),
                Kind::Tcp => None,
            };
            let value = match (p, own) {
                (Some(p), _) => p,
                (None, _) => "(unset): App Mesh's default retry policy".into(),
            };
            vec![field(
                self.route_path(router, name),
                format!("{k}.retryPolicy"),
                value,
            )]
        };
        match rr {
            RouteRef::Router {
                router, name, spec, ..
            } => of_router(router, name, spec),
            RouteRef::Gateway {
                router: Some((r, x, rs)),
                ..
            } => of_router(r, x, rs),
            RouteRef::Gateway { name, .. } => vec![field(
                self.gateway_route_path(name),
                "spec",
                "(a gateway route has no retry policy): App Mesh's default",
            )],
            RouteRef::Node { service, .. } => vec![field(
                self.service_path(service),
                "spec.provider.virtualNode",
                "(a node-provided service has no route to set one): App Mesh's default",
            )],
            _ => vec![],
        }
    }

    pub(crate) fn timeout_fields(&self, rr: &RouteRef<'_>) -> Vec<Field> {
        let of_router = |router: &str, name: &str, spec: &RouteSpec| {
            let k = kind_path(spec);
            let t = match kind(spec) {
                Kind::Http(_, h) => h.timeout.as_ref().map(json),
                Kind::Grpc(g) => g.timeout.as_ref().map(json),
                Kind::Tcp => None,
            };
            vec![field(
                self.route_path(router, name),
                format!("{k}.timeout"),
                t.unwrap_or_else(|| {
                    "(unset): App Mesh's defaults, 15 s per request, 300 s idle".into()
                }),
            )]
        };
        match rr {
            RouteRef::Router {
                router, name, spec, ..
            } => of_router(router, name, spec),
            RouteRef::Gateway {
                router: Some((r, x, rs)),
                ..
            } => of_router(r, x, rs),
            RouteRef::Node { node, .. } => self.listener_timeout(node, None),
            RouteRef::Ingress { port } => self.listener_timeout(&self.who.name, Some(*port)),
            _ => vec![],
        }
    }

    fn listener_timeout(&self, node: &str, port: Option<u32>) -> Vec<Field> {
        self.mesh
            .and_then(|m| m.virtual_nodes.get(node))
            .and_then(|n| n.spec.listeners.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, l)| port.is_none_or(|p| l.port_mapping.port == i64::from(p)))
            .map(|(j, l)| {
                field(
                    self.node_path(node),
                    format!("spec.listeners[{j}].timeout"),
                    l.timeout.as_ref().map_or(UNSET.into(), json),
                )
            })
            .collect()
    }

    pub(crate) fn target_fields(&self, rr: &RouteRef<'_>, cluster: &str) -> Vec<Field> {
        let of = self.clusters_entry(cluster);
        let of_router = |router: &str, name: &str, spec: &RouteSpec| -> Vec<Field> {
            let Some(ClusterOf::Egress { node, port }) = &of else {
                return vec![];
            };
            let k = kind_path(spec);
            spec.weighted_targets()
                .enumerate()
                .filter(|(_, t)| {
                    t.virtual_node == *node && t.port.is_none_or(|p| p == i64::from(*port))
                })
                .map(|(i, t)| {
                    field(
                        self.route_path(router, name),
                        format!("{k}.action.weightedTargets[{i}]"),
                        json(t),
                    )
                })
                .collect()
        };
        match rr {
            RouteRef::Router {
                router, name, spec, ..
            } => of_router(router, name, spec),
            RouteRef::Gateway {
                router: Some((r, x, rs)),
                ..
            } => of_router(r, x, rs),
            RouteRef::Gateway { name, spec, .. } => spec
                .target()
                .map(|t| {
                    vec![field(
                        self.gateway_route_path(name),
                        format!("{}.action.target", gateway_kind_path(spec)),
                        json(t),
                    )]
                })
                .unwrap_or_default(),
            RouteRef::Node { service, node } => vec![field(
                self.service_path(service),
                "spec.provider.virtualNode.virtualNodeName",
                json(node),
            )],
            RouteRef::Ingress { port } => {
                self.chain_fields(&Listener::default(), *port, Direction::Inbound)
            }
            RouteRef::AllowAll => self.vhost_fields("allow_all"),
            RouteRef::Unknown => vec![],
        }
    }

    fn clusters_entry(&self, cluster: &str) -> Option<ClusterOf> {
        if let Some(c) = self.clusters.get(cluster) {
            return Some(c.clone());
        }
        self.clusters
            .iter()
            .find(|(prefix, c)| {
                matches!(c, ClusterOf::SelfRedirect { .. }) && cluster.starts_with(prefix.as_str())
            })
            .map(|(_, c)| c.clone())
    }

    /// The virtual node and port behind a cluster, when it is a node's.
    pub(crate) fn cluster_of(&self, cluster: &str) -> Option<(String, u32)> {
        match self.clusters_entry(cluster)? {
            ClusterOf::Egress { node, port } => Some((node, port)),
            ClusterOf::Ingress { port } => Some((self.who.name.clone(), port)),
            _ => None,
        }
    }

    pub(crate) fn hop_fields(&self, cluster: &str) -> Vec<Field> {
        let Some(ClusterOf::SelfRedirect { port }) = self.clusters_entry(cluster) else {
            return vec![];
        };
        self.own_gateway()
            .into_iter()
            .flat_map(|g| g.listeners.iter().enumerate())
            .filter(|(_, l)| l.port_mapping.port == i64::from(port))
            .map(|(j, l)| {
                field(
                    self.gateway_path(),
                    format!("spec.listeners[{j}].connectionPool"),
                    l.connection_pool.as_ref().map_or(UNSET.into(), json),
                )
            })
            .collect()
    }

    pub(crate) fn cluster_fields(&self, cluster: &str) -> Vec<Field> {
        match self.clusters_entry(cluster) {
            Some(ClusterOf::Egress { node, port }) => {
                let Some(n) = self.mesh.and_then(|m| m.virtual_nodes.get(&node)) else {
                    return vec![];
                };
                let mut out = vec![field(
                    self.node_path(&node),
                    "spec.serviceDiscovery",
                    n.spec.service_discovery.as_ref().map_or(UNSET.into(), json),
                )];
                for (j, l) in n.spec.listeners.iter().flatten().enumerate() {
                    if l.port_mapping.port != i64::from(port) {
                        continue;
                    }
                    if let Some(hc) = &l.health_check {
                        out.push(field(
                            self.node_path(&node),
                            format!("spec.listeners[{j}].healthCheck"),
                            json(hc),
                        ));
                    }
                    if let Some(o) = &l.outlier_detection {
                        out.push(field(
                            self.node_path(&node),
                            format!("spec.listeners[{j}].outlierDetection"),
                            json(o),
                        ));
                    }
                    if let Some(t) = &l.tls {
                        out.push(field(
                            self.node_path(&node),
                            format!("spec.listeners[{j}].tls.mode"),
                            json(&t.mode),
                        ));
                    }
                }
                out.extend(self.client_policy_fields(&node));
                out
            }
            Some(ClusterOf::Ingress { port }) => self
                .own_node()
                .and_then(|n| n.listeners.as_ref())
                .into_iter()
                .flatten()
                .enumerate()
                .filter(|(_, l)| l.port_mapping.port == i64::from(port))
                .map(|(j, l)| match &l.connection_pool {
                    Some(p) => field(
                        self.own_path(),
                        format!("spec.listeners[{j}].connectionPool"),
                        json(p),
                    ),
                    None => field(
                        self.own_path(),
                        format!("spec.listeners[{j}].portMapping"),
                        json(&l.port_mapping),
                    ),
                })
                .collect(),
            Some(ClusterOf::AllowAll | ClusterOf::Amazonaws) => vec![field(
                self.mesh_path(),
                "spec.egressFilter.type",
                self.mesh
                    .map_or(UNSET.into(), |m| json(&m.mesh.spec.egress_filter_type())),
            )],
            Some(ClusterOf::SelfRedirect { .. }) => self.hop_fields(cluster),
            None => vec![],
        }
    }

    /// The caller's client policies that may apply to clusters of `node`.
    fn client_policy_fields(&self, node: &str) -> Vec<Field> {
        if let Some(g) = self.own_gateway() {
            return g
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref())
                .map(|p| {
                    vec![field(
                        self.gateway_path(),
                        "spec.backendDefaults.clientPolicy",
                        json(p),
                    )]
                })
                .unwrap_or_default();
        }
        let Some(n) = self.own_node() else {
            return vec![];
        };
        let mut out = Vec::new();
        if let Some(p) = n
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref())
        {
            out.push(field(
                self.own_path(),
                "spec.backendDefaults.clientPolicy",
                json(p),
            ));
        }
        for (i, b) in n.backends.iter().flatten().enumerate() {
            let Some(vs) = &b.virtual_service else {
                continue;
            };
            if vs.client_policy.is_some() && self.reaches(&vs.virtual_service_name, node) {
                out.push(field(
                    self.own_path(),
                    format!("spec.backends[{i}].virtualService.clientPolicy"),
                    vs.client_policy.as_ref().map_or(UNSET.into(), json),
                ));
            }
        }
        out
    }

    /// Whether `service`'s provider sends to `node`.
    fn reaches(&self, service: &str, node: &str) -> bool {
        let Some(p) = self
            .mesh
            .and_then(|m| m.virtual_services.get(service))
            .and_then(|v| v.spec.provider.as_ref())
        else {
            return false;
        };
        if let Some(n) = &p.virtual_node {
            return n.virtual_node_name == node;
        }
        p.virtual_router.as_ref().is_some_and(|r| {
            self.routes_of(&r.virtual_router_name)
                .iter()
                .any(|(_, s)| s.weighted_targets().any(|t| t.virtual_node == node))
        })
    }

    // === Load reports (edges.rs) ===

    /// The virtual service of a gateway route's Envoy route (`GR`, `GR/ROUTE`).
    pub(crate) fn gateway_route_service(&self, route: &str) -> Option<String> {
        let gr = route.split_once('/').map_or(route, |(g, _)| g);
        let g = self.mesh?.gateway_routes.get(&self.who.name)?.get(gr)?;
        g.spec
            .target()
            .map(|t| t.virtual_service.virtual_service_name.clone())
    }

    /// The virtual service a caller's virtual host is named after.
    pub(crate) fn service_of_host(&self, vhost: &str) -> Option<String> {
        self.service_named(vhost).map(str::to_string)
    }

    /// The caller's backends that listen on `port`.
    pub(crate) fn backends_on(&self, port: u32) -> Vec<String> {
        self.backends()
            .into_iter()
            .filter(|(_, s)| self.service_ports(s).iter().any(|(p, _)| *p == port))
            .map(|(_, s)| s.to_string())
            .collect()
    }

    pub(crate) fn cluster_target(&self, cluster: &str) -> super::edges::ClusterTarget {
        use super::edges::ClusterTarget as T;
        match self.clusters_entry(cluster) {
            Some(ClusterOf::Egress { node, port }) => T::VirtualNode { name: node, port },
            Some(ClusterOf::Ingress { port }) => T::LocalApp { port },
            Some(ClusterOf::AllowAll | ClusterOf::Amazonaws) => T::External,
            Some(ClusterOf::SelfRedirect { .. }) | None => T::Other,
        }
    }

    pub(crate) fn no_endpoints(&self, clusters: &[&str]) -> (String, Vec<Fix>) {
        let fixes = clusters
            .iter()
            .filter_map(|c| self.cluster_of(c))
            .map(|(node, _)| {
                fix(
                    self.node_path(&node),
                    "spec.serviceDiscovery",
                    "register healthy instances where it points (Cloud Map), or fix where it points",
                )
            })
            .collect();
        (
            format!(
                "no endpoints for {}: Envoy answers 503 (no healthy upstream)",
                clusters.join(", ")
            ),
            fixes,
        )
    }
}

/// A gateway route's match, whatever its kind, as App Mesh's JSON.
fn gateway_match_json(spec: &GatewayRouteSpec) -> String {
    if let Some(r) = spec.http_route.as_ref().or(spec.http2_route.as_ref()) {
        return json(&r.r#match);
    }
    spec.grpc_route
        .as_ref()
        .map_or(UNSET.into(), |g| json(&g.r#match))
}
