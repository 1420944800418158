//! One mesh as a graph for the page: gateways, virtual nodes, virtual services and routers as
//! vertices; gateway routes, backends, providers and routes (with their weights) as links; each
//! link carrying the live request and error rates of the load-report edges that cross it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use trellis_model::State;

use crate::lrs::{EdgeView, LoadView};

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub mesh: String,
    pub egress_filter: String,
    pub interval_ms: u128,
    pub vertices: Vec<Vertex>,
    pub links: Vec<Link>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Vertex {
    /// `KIND/NAME`.
    pub id: String,
    /// `virtualGateway`, `virtualNode`, `virtualService`, `virtualRouter` or `external`.
    pub kind: &'static str,
    pub name: String,
    /// Listeners, discovery: a line each.
    pub detail: Vec<String>,
    /// A node's requests into its own app, per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_rps: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    pub from: String,
    pub to: String,
    /// `gatewayRoute`, `backend`, `provider`, `route` or `external`.
    pub kind: &'static str,
    pub label: String,
    pub rps: f64,
    pub errors_per_second: f64,
    pub requests: u64,
    pub errors: u64,
}

#[derive(Default, Clone, Copy)]
struct Live {
    rps: f64,
    eps: f64,
    requests: u64,
    errors: u64,
}

impl Live {
    fn add(&mut self, e: &EdgeView) {
        self.rps += e.rps;
        self.eps += e.errors_per_second;
        self.requests += e.requests;
        self.errors += e.errors;
    }
}

fn sum<'e>(edges: impl Iterator<Item = &'e EdgeView>) -> Live {
    let mut l = Live::default();
    for e in edges {
        l.add(e);
    }
    l
}

fn link(from: String, to: String, kind: &'static str, label: String, live: Live) -> Link {
    Link {
        from,
        to,
        kind,
        label,
        rps: live.rps,
        errors_per_second: live.eps,
        requests: live.requests,
        errors: live.errors,
    }
}

/// The services an edge was counted under (a cluster several services share lists them all).
fn services(e: &EdgeView) -> impl Iterator<Item = &str> {
    e.key.service.split(',')
}

/// The graph of `mesh`, or `None` when it does not exist.
pub(super) fn build(state: &State, mesh: &str, load: &LoadView) -> Option<Topology> {
    let m = state.meshes.get(mesh)?;
    let edges: Vec<&EdgeView> = load.edges.iter().filter(|e| e.key.mesh == mesh).collect();
    let mut vertices = Vec::new();
    let mut links = Vec::new();
    for (name, g) in &m.virtual_gateways {
        vertices.push(Vertex {
            id: format!("virtualGateway/{name}"),
            kind: "virtualGateway",
            name: name.clone(),
            detail: g
                .spec
                .listeners
                .iter()
                .map(|l| {
                    format!(
                        "{}:{}",
                        l.port_mapping.protocol.as_str(),
                        l.port_mapping.port
                    )
                })
                .collect(),
            inbound_rps: None,
        });
        // One link per (gateway, service), labelled with its gateway routes.
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (gr, r) in m.gateway_routes.get(name).into_iter().flatten() {
            if let Some(t) = r.spec.target() {
                by_service
                    .entry(t.virtual_service.virtual_service_name.clone())
                    .or_default()
                    .push(gr.clone());
            }
        }
        let caller = format!("virtualGateway/{name}");
        for (s, routes) in by_service {
            let live = sum(edges
                .iter()
                .copied()
                .filter(|e| e.key.caller == caller && services(e).any(|x| x == s)));
            links.push(link(
                caller.clone(),
                format!("virtualService/{s}"),
                "gatewayRoute",
                routes.join(", "),
                live,
            ));
        }
    }
    for (name, n) in &m.virtual_nodes {
        let mut detail: Vec<String> = n
            .spec
            .listeners
            .iter()
            .flatten()
            .map(|l| {
                format!(
                    "{}:{}",
                    l.port_mapping.protocol.as_str(),
                    l.port_mapping.port
                )
            })
            .collect();
        if let Some(sd) = &n.spec.service_discovery {
            if let Some(d) = &sd.dns {
                detail.push(format!("dns {}", d.hostname));
            } else if let Some(c) = &sd.aws_cloud_map {
                detail.push(format!("cloud map {}/{}", c.namespace_name, c.service_name));
            }
        }
        let inbound = load
            .inbound
            .iter()
            .find(|i| i.mesh == mesh && i.node == *name)
            .map(|i| i.rps);
        vertices.push(Vertex {
            id: format!("virtualNode/{name}"),
            kind: "virtualNode",
            name: name.clone(),
            detail,
            inbound_rps: inbound,
        });
        let caller = format!("virtualNode/{name}");
        for b in n.spec.backends.iter().flatten() {
            let Some(vs) = &b.virtual_service else {
                continue;
            };
            let s = &vs.virtual_service_name;
            let live = sum(edges
                .iter()
                .copied()
                .filter(|e| e.key.caller == caller && services(e).any(|x| x == s)));
            links.push(link(
                caller.clone(),
                format!("virtualService/{s}"),
                "backend",
                String::new(),
                live,
            ));
        }
    }
    for (name, s) in &m.virtual_services {
        vertices.push(Vertex {
            id: format!("virtualService/{name}"),
            kind: "virtualService",
            name: name.clone(),
            detail: vec![],
            inbound_rps: None,
        });
        let through = |e: &&EdgeView| services(e).any(|x| x == name);
        let provider = s.spec.provider.as_ref();
        if let Some(p) = provider.and_then(|p| p.virtual_node.as_ref()) {
            let live = sum(edges
                .iter()
                .copied()
                .filter(through)
                .filter(|e| e.key.target == p.virtual_node_name));
            links.push(link(
                format!("virtualService/{name}"),
                format!("virtualNode/{}", p.virtual_node_name),
                "provider",
                String::new(),
                live,
            ));
        } else if let Some(p) = provider.and_then(|p| p.virtual_router.as_ref()) {
            let live = sum(edges.iter().copied().filter(through));
            links.push(link(
                format!("virtualService/{name}"),
                format!("virtualRouter/{}", p.virtual_router_name),
                "provider",
                String::new(),
                live,
            ));
        }
    }
    for (name, r) in &m.virtual_routers {
        vertices.push(Vertex {
            id: format!("virtualRouter/{name}"),
            kind: "virtualRouter",
            name: name.clone(),
            detail: r
                .spec
                .listeners
                .iter()
                .flatten()
                .map(|l| {
                    format!(
                        "{}:{}",
                        l.port_mapping.protocol.as_str(),
                        l.port_mapping.port
                    )
                })
                .collect(),
            inbound_rps: None,
        });
        // The services this router provides: its traffic is theirs.
        let provided: BTreeSet<&str> = m
            .virtual_services
            .iter()
            .filter(|(_, s)| {
                s.spec
                    .provider
                    .as_ref()
                    .and_then(|p| p.virtual_router.as_ref())
                    .is_some_and(|p| p.virtual_router_name == *name)
            })
            .map(|(n, _)| n.as_str())
            .collect();
        // One link per target node, labelled with each route's share of it.
        let mut targets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (rn, route) in m.routes.get(name).into_iter().flatten() {
            let all: Vec<_> = route.spec.weighted_targets().collect();
            let total: i64 = all.iter().map(|t| t.weight).sum();
            for t in &all {
                let share = if total > 0 {
                    format!("{rn} {}%", (t.weight * 100 + total / 2) / total)
                } else {
                    format!("{rn} 0%")
                };
                targets
                    .entry(t.virtual_node.as_str())
                    .or_default()
                    .push(share);
            }
        }
        for (node, shares) in targets {
            let live = sum(edges
                .iter()
                .copied()
                .filter(|e| services(e).any(|x| provided.contains(x)) && e.key.target == node));
            links.push(link(
                format!("virtualRouter/{name}"),
                format!("virtualNode/{node}"),
                "route",
                shares.join(", "),
                live,
            ));
        }
    }
    // Traffic that left the mesh (ALLOW_ALL, or AWS APIs under DROP_ALL).
    let external: Vec<&EdgeView> = edges
        .iter()
        .copied()
        .filter(|e| e.key.service == "(external)")
        .collect();
    if !external.is_empty() {
        vertices.push(Vertex {
            id: "external".into(),
            kind: "external",
            name: "outside the mesh".into(),
            detail: vec![],
            inbound_rps: None,
        });
        let callers: BTreeSet<&str> = external.iter().map(|e| e.key.caller.as_str()).collect();
        for c in callers {
            let live = sum(external.iter().copied().filter(|e| e.key.caller == c));
            links.push(link(
                c.to_string(),
                "external".into(),
                "external",
                String::new(),
                live,
            ));
        }
    }
    Some(Topology {
        mesh: mesh.to_string(),
        egress_filter: m.mesh.spec.egress_filter_type().as_str().to_string(),
        interval_ms: load.interval_ms,
        vertices,
        links,
    })
}
