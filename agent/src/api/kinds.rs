//! The six resource kinds that live in a mesh, and App Mesh's semantic rules for each: what must
//! exist, what must match, what blocks a delete. (The model's own constraints are checked by the
//! generated `Validate` impls before these run.)

use std::collections::{BTreeMap, BTreeSet};

use super::Error;
use super::kind::{Check, CreateParts, Kind, Parent, Quotas};
use trellis_model::*;

/// The route table of a router that has never had routes.
static NO_ROUTES: BTreeMap<String, Resource<RouteSpec>> = BTreeMap::new();
static NO_GATEWAY_ROUTES: BTreeMap<String, Resource<GatewayRouteSpec>> = BTreeMap::new();

macro_rules! parts {
    ($b:expr, $name:ident) => {
        CreateParts {
            name: $b.$name,
            spec: $b.spec,
            tags: $b.tags.unwrap_or_default(),
            client_token: $b.client_token,
        }
    };
}

fn parent_name(parent: Option<&str>) -> &str {
    parent.unwrap_or_default()
}

/// A table of resources per parent: routes per router, gateway routes per gateway.
type Children<S> = BTreeMap<String, BTreeMap<String, Resource<S>>>;

/// The children of `parent` (which must exist; one without children has the empty `none`).
fn children<'m, P, S>(
    parents: &BTreeMap<String, Resource<P>>,
    tables: &'m Children<S>,
    none: &'m BTreeMap<String, Resource<S>>,
    (kind, mesh, parent): (Parent, &str, Option<&str>),
) -> Result<&'m BTreeMap<String, Resource<S>>, Error> {
    let p = parent_name(parent);
    if !parents.contains_key(p) {
        return Err(parent_not_found(kind, mesh, p));
    }
    Ok(tables.get(p).unwrap_or(none))
}

/// [`children`], to write to.
fn children_mut<'m, P, S>(
    parents: &BTreeMap<String, Resource<P>>,
    tables: &'m mut Children<S>,
    (kind, mesh, parent): (Parent, &str, Option<&str>),
) -> Result<&'m mut BTreeMap<String, Resource<S>>, Error> {
    let p = parent_name(parent);
    if !parents.contains_key(p) {
        return Err(parent_not_found(kind, mesh, p));
    }
    Ok(tables.entry(p.to_string()).or_default())
}

// === Virtual nodes ===

pub struct VirtualNodes;

impl Kind for VirtualNodes {
    type Spec = VirtualNodeSpec;
    type Create = CreateVirtualNodeBody;
    type Update = UpdateVirtualNodeBody;
    const TYPE: &'static str = "virtualNode";
    const HUMAN: &'static str = "virtual node";
    const NAME_KEY: &'static str = "virtualNodeName";
    const LIST_KEY: &'static str = "virtualNodes";
    const PARENT: Option<Parent> = None;

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, virtual_node_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&m.virtual_nodes)
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&mut m.virtual_nodes)
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.virtual_nodes_per_mesh, "mesh")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        let listeners = spec.listeners.as_deref().unwrap_or_default();
        let mut ports = BTreeMap::new();
        for (i, l) in listeners.iter().enumerate() {
            let at = format!("spec.listeners[{i}]");
            let (port, proto) = (l.port_mapping.port, l.port_mapping.protocol);
            if let Some(j) = ports.insert(port, i) {
                return Err(Error::bad(
                    &format!("{at}.portMapping.port"),
                    format!("port {port} is already used by spec.listeners[{j}]"),
                ));
            }
            if let Some(pool) = &l.connection_pool {
                let member = union_member(&[
                    ("grpc", pool.grpc.is_some()),
                    ("http", pool.http.is_some()),
                    ("http2", pool.http2.is_some()),
                    ("tcp", pool.tcp.is_some()),
                ]);
                must_match_protocol(&format!("{at}.connectionPool"), member, proto.as_str())?;
            }
            if let Some(t) = &l.timeout {
                let member = union_member(&[
                    ("grpc", t.grpc.is_some()),
                    ("http", t.http.is_some()),
                    ("http2", t.http2.is_some()),
                    ("tcp", t.tcp.is_some()),
                ]);
                must_match_protocol(&format!("{at}.timeout"), member, proto.as_str())?;
            }
            if let Some(hc) = &l.health_check {
                if hc.timeout_millis >= hc.interval_millis {
                    return Err(Error::bad(
                        &format!("{at}.healthCheck.timeoutMillis"),
                        format!(
                            "{} must be less than intervalMillis ({})",
                            hc.timeout_millis, hc.interval_millis
                        ),
                    ));
                }
                if matches!(hc.protocol, PortProtocol::Http | PortProtocol::Http2)
                    && hc.path.as_deref().unwrap_or_default().is_empty()
                {
                    return Err(Error::bad(
                        &format!("{at}.healthCheck.path"),
                        "is required for http and http2 health checks",
                    ));
                }
            }
        }
        if !listeners.is_empty() && spec.service_discovery.is_none() {
            return Err(Error::bad(
                "spec.serviceDiscovery",
                "is required when spec.listeners is not empty (callers need to find this node)",
            ));
        }
        let backends = spec.backends.as_deref().unwrap_or_default();
        if backends.len() > c.quotas.backends_per_virtual_node {
            return Err(Error::LimitExceeded(format!(
                "spec.backends: {} backends given, at most {} are allowed per virtual node",
                backends.len(),
                c.quotas.backends_per_virtual_node
            )));
        }
        let mut seen = BTreeSet::new();
        for (i, b) in backends.iter().enumerate() {
            if let Some(vs) = &b.virtual_service
                && !seen.insert(vs.virtual_service_name.as_str())
            {
                return Err(Error::bad(
                    &format!("spec.backends[{i}].virtualService.virtualServiceName"),
                    format!(
                        "{} is already a backend of this node",
                        vs.virtual_service_name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn in_use(m: &MeshState, _: Option<&str>, name: &str) -> Option<String> {
        if let Some((vs, _)) = m
            .virtual_services
            .iter()
            .find(|(_, vs)| provider_node(&vs.spec) == Some(name))
        {
            return Some(format!("it provides virtual service {vs}"));
        }
        for (router, routes) in &m.routes {
            for (route, spec) in routes {
                if spec.spec.weighted_targets().any(|t| t.virtual_node == name) {
                    return Some(format!(
                        "route {route} of virtual router {router} targets it"
                    ));
                }
            }
        }
        None
    }
}

// === Virtual services ===

pub struct VirtualServices;

impl Kind for VirtualServices {
    type Spec = VirtualServiceSpec;
    type Create = CreateVirtualServiceBody;
    type Update = UpdateVirtualServiceBody;
    const TYPE: &'static str = "virtualService";
    const HUMAN: &'static str = "virtual service";
    const NAME_KEY: &'static str = "virtualServiceName";
    const LIST_KEY: &'static str = "virtualServices";
    const PARENT: Option<Parent> = None;

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, virtual_service_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&m.virtual_services)
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&mut m.virtual_services)
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.virtual_services_per_mesh, "mesh")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        let Some(p) = &spec.provider else {
            return Ok(());
        };
        if let Some(vn) = &p.virtual_node
            && !c.mesh.virtual_nodes.contains_key(&vn.virtual_node_name)
        {
            return Err(Error::bad(
                "spec.provider.virtualNode.virtualNodeName",
                format!(
                    "virtual node {} does not exist in mesh {}",
                    vn.virtual_node_name, c.mesh_name
                ),
            ));
        }
        if let Some(vr) = &p.virtual_router
            && !c.mesh.virtual_routers.contains_key(&vr.virtual_router_name)
        {
            return Err(Error::bad(
                "spec.provider.virtualRouter.virtualRouterName",
                format!(
                    "virtual router {} does not exist in mesh {}",
                    vr.virtual_router_name, c.mesh_name
                ),
            ));
        }
        Ok(())
    }

    fn in_use(m: &MeshState, _: Option<&str>, name: &str) -> Option<String> {
        for (gw, routes) in &m.gateway_routes {
            for (gr, r) in routes {
                if r.spec
                    .target()
                    .is_some_and(|t| t.virtual_service.virtual_service_name == name)
                {
                    return Some(format!(
                        "gateway route {gr} of virtual gateway {gw} targets it"
                    ));
                }
            }
        }
        None
    }
}

// === Virtual routers ===

pub struct VirtualRouters;

impl Kind for VirtualRouters {
    type Spec = VirtualRouterSpec;
    type Create = CreateVirtualRouterBody;
    type Update = UpdateVirtualRouterBody;
    const TYPE: &'static str = "virtualRouter";
    const HUMAN: &'static str = "virtual router";
    const NAME_KEY: &'static str = "virtualRouterName";
    const LIST_KEY: &'static str = "virtualRouters";
    const PARENT: Option<Parent> = None;

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, virtual_router_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&m.virtual_routers)
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&mut m.virtual_routers)
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.virtual_routers_per_mesh, "mesh")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        let listeners = spec.listeners.as_deref().unwrap_or_default();
        let mut ports = BTreeMap::new();
        for (i, l) in listeners.iter().enumerate() {
            if let Some(j) = ports.insert(l.port_mapping.port, i) {
                return Err(Error::bad(
                    &format!("spec.listeners[{i}].portMapping.port"),
                    format!(
                        "port {} is already used by spec.listeners[{j}]",
                        l.port_mapping.port
                    ),
                ));
            }
        }
        // Changing a listener must not strand the router's existing routes.
        if let Some(routes) = c.mesh.routes.get(c.name) {
            for (route, existing) in routes {
                check_route_fits_router(&existing.spec, listeners, &format!("route {route}"))?;
            }
        }
        Ok(())
    }

    fn in_use(m: &MeshState, _: Option<&str>, name: &str) -> Option<String> {
        if let Some((vs, _)) = m
            .virtual_services
            .iter()
            .find(|(_, vs)| provider_router(&vs.spec) == Some(name))
        {
            return Some(format!("it provides virtual service {vs}"));
        }
        let route = m.routes.get(name)?.keys().next()?;
        Some(format!("it still has route {route}"))
    }

    fn after_delete(m: &mut MeshState, name: &str) {
        m.routes.remove(name);
    }
}

// === Routes ===

pub struct Routes;

impl Kind for Routes {
    type Spec = RouteSpec;
    type Create = CreateRouteBody;
    type Update = UpdateRouteBody;
    const TYPE: &'static str = "route";
    const HUMAN: &'static str = "route";
    const NAME_KEY: &'static str = "routeName";
    const LIST_KEY: &'static str = "routes";
    const PARENT: Option<Parent> = Some(Parent::Router);

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, route_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        let at = (Parent::Router, mesh, parent);
        children(&m.virtual_routers, &m.routes, &NO_ROUTES, at)
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        children_mut(
            &m.virtual_routers,
            &mut m.routes,
            (Parent::Router, mesh, parent),
        )
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.routes_per_router, "virtual router")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        let p = parent_name(c.parent);
        let router = c
            .mesh
            .virtual_routers
            .get(p)
            .ok_or_else(|| parent_not_found(Parent::Router, c.mesh_name, p))?;
        let listeners = router.spec.listeners.as_deref().unwrap_or_default();
        check_route_fits_router(spec, listeners, "spec")?;
        let (kind, targets) = route_kind_and_targets(spec).ok_or_else(|| {
            Error::bad(
                "spec",
                "exactly one of grpcRoute, http2Route, httpRoute, tcpRoute must be set",
            )
        })?;
        if targets.len() > c.quotas.weighted_targets_per_route {
            return Err(Error::LimitExceeded(format!(
                "spec.{kind}.action.weightedTargets: {} targets given, at most {} are allowed",
                targets.len(),
                c.quotas.weighted_targets_per_route
            )));
        }
        for (i, t) in targets.iter().enumerate() {
            let at = format!("spec.{kind}.action.weightedTargets[{i}]");
            let node = c.mesh.virtual_nodes.get(&t.virtual_node).ok_or_else(|| {
                Error::bad(
                    &format!("{at}.virtualNode"),
                    format!(
                        "virtual node {} does not exist in mesh {}",
                        t.virtual_node, c.mesh_name
                    ),
                )
            })?;
            let node_ports: Vec<i64> = node
                .spec
                .listeners
                .iter()
                .flatten()
                .map(|l| l.port_mapping.port)
                .collect();
            match t.port {
                Some(port) if !node_ports.contains(&port) => {
                    return Err(Error::bad(
                        &format!("{at}.port"),
                        format!(
                            "virtual node {} has no listener on port {port}",
                            t.virtual_node
                        ),
                    ));
                }
                None if node_ports.len() > 1 => {
                    return Err(Error::bad(
                        &format!("{at}.port"),
                        format!(
                            "is required: virtual node {} has several listeners",
                            t.virtual_node
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn in_use(_: &MeshState, _: Option<&str>, _: &str) -> Option<String> {
        None
    }
}

// === Virtual gateways ===

pub struct VirtualGateways;

impl Kind for VirtualGateways {
    type Spec = VirtualGatewaySpec;
    type Create = CreateVirtualGatewayBody;
    type Update = UpdateVirtualGatewayBody;
    const TYPE: &'static str = "virtualGateway";
    const HUMAN: &'static str = "virtual gateway";
    const NAME_KEY: &'static str = "virtualGatewayName";
    const LIST_KEY: &'static str = "virtualGateways";
    const PARENT: Option<Parent> = None;

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, virtual_gateway_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&m.virtual_gateways)
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        _: &str,
        _: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        Ok(&mut m.virtual_gateways)
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.virtual_gateways_per_mesh, "mesh")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        if spec.listeners.is_empty() {
            return Err(Error::bad(
                "spec.listeners",
                "at least one listener is required",
            ));
        }
        let mut ports = BTreeMap::new();
        for (i, l) in spec.listeners.iter().enumerate() {
            let at = format!("spec.listeners[{i}]");
            let (port, proto) = (l.port_mapping.port, l.port_mapping.protocol);
            if let Some(j) = ports.insert(port, i) {
                return Err(Error::bad(
                    &format!("{at}.portMapping.port"),
                    format!("port {port} is already used by spec.listeners[{j}]"),
                ));
            }
            if let Some(pool) = &l.connection_pool {
                let member = union_member(&[
                    ("grpc", pool.grpc.is_some()),
                    ("http", pool.http.is_some()),
                    ("http2", pool.http2.is_some()),
                ]);
                must_match_protocol(&format!("{at}.connectionPool"), member, proto.as_str())?;
            }
            if let Some(hc) = &l.health_check
                && hc.timeout_millis >= hc.interval_millis
            {
                return Err(Error::bad(
                    &format!("{at}.healthCheck.timeoutMillis"),
                    format!(
                        "{} must be less than intervalMillis ({})",
                        hc.timeout_millis, hc.interval_millis
                    ),
                ));
            }
        }
        if let Some(routes) = c.mesh.gateway_routes.get(c.name) {
            for (gr, r) in routes {
                check_gateway_route_fits(&r.spec, &spec.listeners, &format!("gateway route {gr}"))?;
            }
        }
        Ok(())
    }

    fn in_use(m: &MeshState, _: Option<&str>, name: &str) -> Option<String> {
        let gr = m.gateway_routes.get(name)?.keys().next()?;
        Some(format!("it still has gateway route {gr}"))
    }

    fn after_delete(m: &mut MeshState, name: &str) {
        m.gateway_routes.remove(name);
    }
}

// === Gateway routes ===

pub struct GatewayRoutes;

impl Kind for GatewayRoutes {
    type Spec = GatewayRouteSpec;
    type Create = CreateGatewayRouteBody;
    type Update = UpdateGatewayRouteBody;
    const TYPE: &'static str = "gatewayRoute";
    const HUMAN: &'static str = "gateway route";
    const NAME_KEY: &'static str = "gatewayRouteName";
    const LIST_KEY: &'static str = "gatewayRoutes";
    const PARENT: Option<Parent> = Some(Parent::Gateway);

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec> {
        parts!(b, gateway_route_name)
    }
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>) {
        (b.spec, b.client_token)
    }
    fn map<'m>(
        m: &'m MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error> {
        let at = (Parent::Gateway, mesh, parent);
        children(
            &m.virtual_gateways,
            &m.gateway_routes,
            &NO_GATEWAY_ROUTES,
            at,
        )
    }
    fn map_mut<'m>(
        m: &'m mut MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error> {
        let at = (Parent::Gateway, mesh, parent);
        children_mut(&m.virtual_gateways, &mut m.gateway_routes, at)
    }
    fn quota(q: &Quotas) -> (usize, &'static str) {
        (q.gateway_routes_per_gateway, "virtual gateway")
    }

    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error> {
        let p = parent_name(c.parent);
        let g = c
            .mesh
            .virtual_gateways
            .get(p)
            .ok_or_else(|| parent_not_found(Parent::Gateway, c.mesh_name, p))?;
        check_gateway_route_fits(spec, &g.spec.listeners, "spec")?;
        let kind = gateway_route_kind(spec).unwrap_or("httpRoute");
        if let Some(t) = spec.target() {
            let name = &t.virtual_service.virtual_service_name;
            if !c.mesh.virtual_services.contains_key(name) {
                return Err(Error::bad(
                    &format!("spec.{kind}.action.target.virtualService.virtualServiceName"),
                    format!(
                        "virtual service {name} does not exist in mesh {}",
                        c.mesh_name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn in_use(_: &MeshState, _: Option<&str>, _: &str) -> Option<String> {
        None
    }
}

// === Shared rules ===

fn union_member(members: &[(&'static str, bool)]) -> Option<&'static str> {
    members.iter().find(|(_, set)| *set).map(|(name, _)| *name)
}

fn must_match_protocol(at: &str, member: Option<&str>, protocol: &str) -> Result<(), Error> {
    match member {
        Some(m) if m != protocol => Err(Error::bad(
            &format!("{at}.{m}"),
            format!("does not match the listener protocol {protocol}: use {at}.{protocol}"),
        )),
        _ => Ok(()),
    }
}

fn route_kind_and_targets(spec: &RouteSpec) -> Option<(&'static str, &[WeightedTarget])> {
    let set = [
        spec.grpc_route
            .as_ref()
            .map(|r| ("grpcRoute", r.action.weighted_targets.as_slice())),
        spec.http2_route
            .as_ref()
            .map(|r| ("http2Route", r.action.weighted_targets.as_slice())),
        spec.http_route
            .as_ref()
            .map(|r| ("httpRoute", r.action.weighted_targets.as_slice())),
        spec.tcp_route
            .as_ref()
            .map(|r| ("tcpRoute", r.action.weighted_targets.as_slice())),
    ];
    let mut it = set.into_iter().flatten();
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

fn route_match_port(spec: &RouteSpec) -> Option<i64> {
    spec.grpc_route
        .as_ref()
        .and_then(|r| r.r#match.port)
        .or_else(|| spec.http2_route.as_ref().and_then(|r| r.r#match.port))
        .or_else(|| spec.http_route.as_ref().and_then(|r| r.r#match.port))
        .or_else(|| {
            spec.tcp_route
                .as_ref()
                .and_then(|r| r.r#match.as_ref())
                .and_then(|m| m.port)
        })
}

fn route_protocol(kind: &str) -> PortProtocol {
    match kind {
        "grpcRoute" => PortProtocol::Grpc,
        "http2Route" => PortProtocol::Http2,
        "tcpRoute" => PortProtocol::Tcp,
        _ => PortProtocol::Http,
    }
}

/// A route's kind must match the protocol of the router listener it attaches to.
fn check_route_fits_router(
    spec: &RouteSpec,
    listeners: &[VirtualRouterListener],
    what: &str,
) -> Result<(), Error> {
    let Some((kind, _)) = route_kind_and_targets(spec) else {
        return Err(Error::bad(
            "spec",
            "exactly one of grpcRoute, http2Route, httpRoute, tcpRoute must be set",
        ));
    };
    let proto = route_protocol(kind);
    let port = route_match_port(spec);
    let field = if what == "spec" {
        format!("spec.{kind}")
    } else {
        "spec.listeners".to_string()
    };
    if listeners.is_empty() {
        return Err(Error::bad(
            &field,
            format!("{what}: the virtual router has no listener to attach a route to"),
        ));
    }
    if port.is_none() && listeners.len() > 1 {
        return Err(Error::bad(
            &format!("{field}.match.port"),
            format!("{what}: is required when the virtual router has several listeners"),
        ));
    }
    let fits = listeners
        .iter()
        .any(|l| l.port_mapping.protocol == proto && port.is_none_or(|p| p == l.port_mapping.port));
    if !fits {
        let rule = match port {
            Some(p) => format!(
                "{what}: no {} listener on port {p} in the virtual router",
                proto.as_str()
            ),
            None => format!(
                "{what}: a {kind} needs a virtual router listener with protocol {}",
                proto.as_str()
            ),
        };
        return Err(Error::bad(&field, rule));
    }
    Ok(())
}

fn gateway_route_kind(spec: &GatewayRouteSpec) -> Option<&'static str> {
    let set = [
        spec.grpc_route.as_ref().map(|_| "grpcRoute"),
        spec.http2_route.as_ref().map(|_| "http2Route"),
        spec.http_route.as_ref().map(|_| "httpRoute"),
    ];
    let mut it = set.into_iter().flatten();
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

fn check_gateway_route_fits(
    spec: &GatewayRouteSpec,
    listeners: &[VirtualGatewayListener],
    what: &str,
) -> Result<(), Error> {
    let Some(kind) = gateway_route_kind(spec) else {
        return Err(Error::bad(
            "spec",
            "exactly one of grpcRoute, http2Route, httpRoute must be set",
        ));
    };
    let proto = match kind {
        "grpcRoute" => VirtualGatewayPortProtocol::Grpc,
        "http2Route" => VirtualGatewayPortProtocol::Http2,
        _ => VirtualGatewayPortProtocol::Http,
    };
    let port = spec
        .grpc_route
        .as_ref()
        .and_then(|r| r.r#match.port)
        .or_else(|| spec.http2_route.as_ref().and_then(|r| r.r#match.port))
        .or_else(|| spec.http_route.as_ref().and_then(|r| r.r#match.port));
    let field = if what == "spec" {
        format!("spec.{kind}")
    } else {
        "spec.listeners".to_string()
    };
    if port.is_none() && listeners.len() > 1 {
        return Err(Error::bad(
            &format!("{field}.match.port"),
            format!("{what}: is required when the virtual gateway has several listeners"),
        ));
    }
    let fits = listeners
        .iter()
        .any(|l| l.port_mapping.protocol == proto && port.is_none_or(|p| p == l.port_mapping.port));
    if !fits {
        return Err(Error::bad(
            &field,
            format!(
                "{what}: a {kind} needs a virtual gateway listener with protocol {}",
                proto.as_str()
            ),
        ));
    }
    Ok(())
}

fn provider_node(spec: &VirtualServiceSpec) -> Option<&str> {
    spec.provider
        .as_ref()?
        .virtual_node
        .as_ref()
        .map(|p| p.virtual_node_name.as_str())
}

fn provider_router(spec: &VirtualServiceSpec) -> Option<&str> {
    spec.provider
        .as_ref()?
        .virtual_router
        .as_ref()
        .map(|p| p.virtual_router_name.as_str())
}

fn parent_not_found(kind: Parent, mesh: &str, name: &str) -> Error {
    Error::NotFound(format!("{} {name} not found in mesh {mesh}", kind.human()))
}
