//! Which IAM action and which resource ARNs an API request needs, after App Mesh's service
//! authorization reference: `ListMeshes` on `*`; a kind's list on its mesh (routes on their
//! router, gateway routes on their gateway); create, describe, update and delete on the
//! resource's own ARN; tags on the `resourceArn`. As in App Mesh, a write that references other
//! resources needs the same action on them too: a virtual node's backends (virtual services), a
//! virtual service's provider (node or router), a route's targets (virtual nodes), a gateway
//! route's target (virtual service).

use serde_json::Value;

/// One request's authorisation question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// App Mesh's operation name (`CreateVirtualNode`), or Trellis's (`ReadMetrics`).
    pub name: &'static str,
    /// `appmesh:CreateVirtualNode`.
    pub action: String,
    /// Every ARN the action must be allowed on (the first is the resource itself).
    pub resources: Vec<String>,
    /// Whether it changes the mesh (and so goes to the audit log whatever its outcome).
    pub mutating: bool,
}

/// Where ARNs point: the agent's region and account (the mesh owner's, for shared meshes).
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
}

impl Scope<'_> {
    /// `arn:aws:appmesh:REGION:ACCOUNT:PATH`.
    pub fn arn(&self, account: &str, path: &str) -> String {
        format!(
            "arn:{}:appmesh:{}:{account}:{path}",
            self.partition, self.region
        )
    }
}

/// The kinds that live in a mesh: URI collection segment, ARN segment, operation suffix, name key.
const KINDS: &[(&str, &str, &str, &str)] = &[
    (
        "virtualNodes",
        "virtualNode",
        "VirtualNode",
        "virtualNodeName",
    ),
    (
        "virtualServices",
        "virtualService",
        "VirtualService",
        "virtualServiceName",
    ),
    (
        "virtualRouters",
        "virtualRouter",
        "VirtualRouter",
        "virtualRouterName",
    ),
    (
        "virtualGateways",
        "virtualGateway",
        "VirtualGateway",
        "virtualGatewayName",
    ),
];

/// Trellis's own endpoints beside the API: `/metrics` and `/trellis/v1/load` need
/// `trellis:ReadMetrics`, `/debug/xds` `trellis:ReadDebug` (on `*`); `/trellis/v1/topology?mesh=M`
/// needs `trellis:ReadTopology` on the mesh's ARN, and `POST /trellis/v1/explain`
/// `trellis:Explain` on the ARN of the virtual node or gateway it explains (as describing it
/// would need its own ARN).
pub fn trellis(
    path: &str,
    query: Option<&str>,
    body: &[u8],
    scope: &Scope<'_>,
) -> Option<Operation> {
    let read = |name: &'static str, resources: Vec<String>| Operation {
        name,
        action: format!("trellis:{name}"),
        resources,
        mutating: false,
    };
    match path {
        "/metrics" | "/trellis/v1/load" => Some(read("ReadMetrics", vec!["*".into()])),
        "/debug/xds" => Some(read("ReadDebug", vec!["*".into()])),
        "/trellis/v1/topology" => {
            let mesh = query_param(query, "mesh").unwrap_or_default();
            Some(read(
                "ReadTopology",
                vec![scope.arn(scope.account, &format!("mesh/{mesh}"))],
            ))
        }
        "/trellis/v1/explain" => {
            let doc = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
            let mesh = text(&doc, &["meshName"]);
            let (kind, name) = match doc.get("virtualGatewayName").and_then(Value::as_str) {
                Some(g) => ("virtualGateway", g.to_string()),
                None => ("virtualNode", text(&doc, &["virtualNodeName"])),
            };
            Some(read(
                "Explain",
                vec![scope.arn(scope.account, &format!("mesh/{mesh}/{kind}/{name}"))],
            ))
        }
        _ => None,
    }
}

/// The App Mesh operation at `method` and raw `path`, or `None` when none is served there.
pub fn appmesh(
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &[u8],
    scope: &Scope<'_>,
) -> Option<Operation> {
    let rest = path.strip_prefix("/v20190125/")?;
    let segs: Vec<String> = rest.split('/').map(decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let q = |name: &str| query_param(query, name);
    let verb = match method {
        "GET" => "Describe",
        "PUT" => "Update",
        "DELETE" => "Delete",
        _ => return None,
    };
    let owner = q("meshOwner")
        .filter(|o| o.len() == 12 && o.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| scope.account.to_string());
    let arn = |p: &str| scope.arn(&owner, p);
    let doc = || serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let op = |name: &'static str, resources: Vec<String>| {
        let mutating = !name.starts_with("Describe") && !name.starts_with("List");
        let mut unique: Vec<String> = Vec::with_capacity(resources.len());
        for r in resources {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        Some(Operation {
            name,
            action: format!("appmesh:{name}"),
            resources: unique,
            mutating,
        })
    };
    match (method, segs.as_slice()) {
        ("GET", ["meshes"]) => op("ListMeshes", vec!["*".into()]),
        ("PUT", ["meshes"]) => {
            let name = text(&doc(), &["meshName"]);
            op("CreateMesh", vec![arn(&format!("mesh/{name}"))])
        }
        (_, ["meshes", mesh]) => op(
            pick(verb, "DescribeMesh", "UpdateMesh", "DeleteMesh"),
            vec![arn(&format!("mesh/{mesh}"))],
        ),
        ("GET", ["tags"]) => op(
            "ListTagsForResource",
            vec![q("resourceArn").unwrap_or_default()],
        ),
        ("PUT", ["tag"]) => op("TagResource", vec![q("resourceArn").unwrap_or_default()]),
        ("PUT", ["untag"]) => op("UntagResource", vec![q("resourceArn").unwrap_or_default()]),
        (_, ["meshes", mesh, coll]) | (_, ["meshes", mesh, coll, _]) => {
            let (_, seg, kind, key) = KINDS.iter().find(|k| k.0 == *coll)?;
            let mesh_arn = arn(&format!("mesh/{mesh}"));
            let name = match segs.get(3) {
                Some(n) => (*n).to_string(),
                None if method == "PUT" => text(&doc(), &[key]),
                None if method == "GET" => return op(list_name(kind), vec![mesh_arn]),
                None => return None,
            };
            let own = arn(&format!("mesh/{mesh}/{seg}/{name}"));
            let create = segs.len() == 3;
            let name = operation_name(if create { "Create" } else { verb }, kind);
            let mut resources = vec![own];
            if matches!(method, "PUT") {
                resources.extend(
                    references(kind, &doc())
                        .into_iter()
                        .map(|(s, n)| arn(&format!("mesh/{mesh}/{s}/{n}"))),
                );
            }
            op(name, resources)
        }
        (_, ["meshes", mesh, parent_seg, parent, coll])
        | (_, ["meshes", mesh, parent_seg, parent, coll, _]) => {
            let (kind, child_seg, key) = match (*parent_seg, *coll) {
                ("virtualRouter", "routes") => ("Route", "route", "routeName"),
                ("virtualGateway", "gatewayRoutes") => {
                    ("GatewayRoute", "gatewayRoute", "gatewayRouteName")
                }
                _ => return None,
            };
            let parent_arn = arn(&format!("mesh/{mesh}/{parent_seg}/{parent}"));
            let name = match segs.get(5) {
                Some(n) => (*n).to_string(),
                None if method == "PUT" => text(&doc(), &[key]),
                None if method == "GET" => return op(list_name(kind), vec![parent_arn]),
                None => return None,
            };
            let own = arn(&format!(
                "mesh/{mesh}/{parent_seg}/{parent}/{child_seg}/{name}"
            ));
            let create = segs.len() == 5;
            let name = operation_name(if create { "Create" } else { verb }, kind);
            let mut resources = vec![own];
            if method == "PUT" {
                resources.extend(
                    references(kind, &doc())
                        .into_iter()
                        .map(|(s, n)| arn(&format!("mesh/{mesh}/{s}/{n}"))),
                );
            }
            op(name, resources)
        }
        _ => None,
    }
}

fn pick(
    verb: &str,
    describe: &'static str,
    update: &'static str,
    delete: &'static str,
) -> &'static str {
    match verb {
        "Describe" => describe,
        "Update" => update,
        _ => delete,
    }
}

/// Every App Mesh operation name, so [`Operation::name`] can be `'static`.
const NAMES: &[&str] = &[
    "CreateVirtualNode",
    "DescribeVirtualNode",
    "UpdateVirtualNode",
    "DeleteVirtualNode",
    "ListVirtualNodes",
    "CreateVirtualService",
    "DescribeVirtualService",
    "UpdateVirtualService",
    "DeleteVirtualService",
    "ListVirtualServices",
    "CreateVirtualRouter",
    "DescribeVirtualRouter",
    "UpdateVirtualRouter",
    "DeleteVirtualRouter",
    "ListVirtualRouters",
    "CreateVirtualGateway",
    "DescribeVirtualGateway",
    "UpdateVirtualGateway",
    "DeleteVirtualGateway",
    "ListVirtualGateways",
    "CreateRoute",
    "DescribeRoute",
    "UpdateRoute",
    "DeleteRoute",
    "ListRoutes",
    "CreateGatewayRoute",
    "DescribeGatewayRoute",
    "UpdateGatewayRoute",
    "DeleteGatewayRoute",
    "ListGatewayRoutes",
];

fn operation_name(verb: &str, kind: &str) -> &'static str {
    NAMES
        .iter()
        .find(|n| n.strip_prefix(verb) == Some(kind))
        .copied()
        .unwrap_or("Unknown")
}

fn list_name(kind: &str) -> &'static str {
    NAMES
        .iter()
        .find(|n| n.strip_prefix("List").and_then(|r| r.strip_suffix('s')) == Some(kind))
        .copied()
        .unwrap_or("Unknown")
}

/// The resources a create or update body references, as (ARN segment, name) in its mesh.
fn references(kind: &str, doc: &Value) -> Vec<(&'static str, String)> {
    let spec = &doc["spec"];
    let mut out = Vec::new();
    let mut push = |seg: &'static str, v: &Value| {
        if let Some(n) = v.as_str() {
            out.push((seg, n.to_string()));
        }
    };
    match kind {
        "VirtualNode" => {
            for b in spec["backends"].as_array().into_iter().flatten() {
                push("virtualService", &b["virtualService"]["virtualServiceName"]);
            }
        }
        "VirtualService" => {
            push(
                "virtualNode",
                &spec["provider"]["virtualNode"]["virtualNodeName"],
            );
            push(
                "virtualRouter",
                &spec["provider"]["virtualRouter"]["virtualRouterName"],
            );
        }
        "Route" => {
            for r in ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"] {
                for t in spec[r]["action"]["weightedTargets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    push("virtualNode", &t["virtualNode"]);
                }
            }
        }
        "GatewayRoute" => {
            for r in ["httpRoute", "http2Route", "grpcRoute"] {
                push(
                    "virtualService",
                    &spec[r]["action"]["target"]["virtualService"]["virtualServiceName"],
                );
            }
        }
        _ => {}
    }
    out
}

fn text(doc: &Value, path: &[&str]) -> String {
    path.iter()
        .fold(doc, |v, k| &v[*k])
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| decode(k) == name)
        .map(|(_, v)| decode(v))
}

/// Percent-decodes a URI component (`+` stays a plus).
fn decode(s: &str) -> String {
    String::from_utf8_lossy(&super::sigv4::decode(s)).into_owned()
}

#[cfg(test)]
mod tests;
