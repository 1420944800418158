//! App Mesh resources as the API accepts and returns them, and the identities Envoy presents.
//!
//! A crate of its own so that everything above it (translation, the agent) shares one model and
//! nothing here can reach I/O: its normal dependencies are serde and thiserror
//! (`scripts/check_deps.sh`).
//!
//! The spec types are generated from botocore's model (`generated.rs`, by `scripts/gen_model.py`),
//! so field names, required members, enums and constraints are exactly App Mesh's. This module adds
//! what the model does not have: stored metadata, the whole state, and proxy identities.

#[rustfmt::skip]
mod generated;
mod patterns;
pub mod validate;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use generated::*;
pub use validate::{FieldError, Validate};

/// Metadata that App Mesh attaches to every resource.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub arn: String,
    /// Seconds since the epoch, as the rest-json protocol encodes timestamps.
    pub created_at: f64,
    pub last_updated_at: f64,
    pub mesh_owner: String,
    pub resource_owner: String,
    pub uid: String,
    pub version: i64,
}

/// A stored resource: what describe returns plus what idempotent creates need.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resource<S> {
    pub metadata: Metadata,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

impl MeshSpec {
    /// DROP_ALL unless the mesh says otherwise (App Mesh's default).
    pub fn egress_filter_type(&self) -> EgressFilterType {
        self.egress_filter
            .as_ref()
            .map(|f| f.r#type)
            .unwrap_or(EgressFilterType::DropAll)
    }
}

impl RouteSpec {
    /// Every weighted target, whatever the route's kind.
    pub fn weighted_targets(&self) -> impl Iterator<Item = &WeightedTarget> {
        self.grpc_route
            .iter()
            .flat_map(|r| &r.action.weighted_targets)
            .chain(
                self.http2_route
                    .iter()
                    .flat_map(|r| &r.action.weighted_targets),
            )
            .chain(
                self.http_route
                    .iter()
                    .flat_map(|r| &r.action.weighted_targets),
            )
            .chain(
                self.tcp_route
                    .iter()
                    .flat_map(|r| &r.action.weighted_targets),
            )
    }
}

impl GatewayRouteSpec {
    /// The virtual service the gateway route sends to, whatever its kind.
    pub fn target(&self) -> Option<&GatewayRouteTarget> {
        self.grpc_route
            .as_ref()
            .map(|r| &r.action.target)
            .or_else(|| self.http2_route.as_ref().map(|r| &r.action.target))
            .or_else(|| self.http_route.as_ref().map(|r| &r.action.target))
    }
}

// === The whole state ===

/// Everything in one mesh. Routes and gateway routes are keyed by their router or gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    pub mesh: Resource<MeshSpec>,
    #[serde(default)]
    pub virtual_nodes: BTreeMap<String, Resource<VirtualNodeSpec>>,
    #[serde(default)]
    pub virtual_services: BTreeMap<String, Resource<VirtualServiceSpec>>,
    #[serde(default)]
    pub virtual_routers: BTreeMap<String, Resource<VirtualRouterSpec>>,
    #[serde(default)]
    pub routes: BTreeMap<String, BTreeMap<String, Resource<RouteSpec>>>,
    #[serde(default)]
    pub virtual_gateways: BTreeMap<String, Resource<VirtualGatewaySpec>>,
    #[serde(default)]
    pub gateway_routes: BTreeMap<String, BTreeMap<String, Resource<GatewayRouteSpec>>>,
}

impl MeshState {
    pub fn new(mesh: Resource<MeshSpec>) -> Self {
        MeshState {
            mesh,
            virtual_nodes: BTreeMap::new(),
            virtual_services: BTreeMap::new(),
            virtual_routers: BTreeMap::new(),
            routes: BTreeMap::new(),
            virtual_gateways: BTreeMap::new(),
            gateway_routes: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.virtual_nodes.is_empty()
            && self.virtual_services.is_empty()
            && self.virtual_routers.is_empty()
            && self.virtual_gateways.is_empty()
    }
}

/// All meshes. `generation` increases by one on every committed write.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub meshes: BTreeMap<String, MeshState>,
}

// === Identities ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyKind {
    VirtualNode,
    VirtualGateway,
}

/// Who an Envoy says it is (`node.id`), in any of the forms App Mesh accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyIdentity {
    pub mesh: String,
    /// The account in `mesh/M@OWNER/...` or in a full ARN, when given.
    pub mesh_owner: Option<String>,
    pub kind: ProxyKind,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{value:?} is not an App Mesh resource identity: expected mesh/MESH/virtualNode/NAME, \
     mesh/MESH/virtualGateway/NAME, mesh/MESH@OWNER/..., or the full ARN of a virtual node or gateway"
)]
pub struct IdentityError {
    pub value: String,
}

impl ProxyIdentity {
    /// Parses `mesh/M/virtualNode/N`, `mesh/M@OWNER/virtualNode/N` or
    /// `arn:aws:appmesh:REGION:ACCOUNT:mesh/M/virtualNode/N` (and the virtualGateway forms).
    pub fn parse(value: &str) -> Result<Self, IdentityError> {
        let err = || IdentityError {
            value: value.to_string(),
        };
        let (path, arn_account) = if let Some(rest) = value.strip_prefix("arn:") {
            // arn:PARTITION:appmesh:REGION:ACCOUNT:RESOURCE
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            match parts.as_slice() {
                [_partition, "appmesh", _region, account, resource] => {
                    (*resource, Some((*account).to_string()))
                }
                _ => return Err(err()),
            }
        } else {
            (value, None)
        };
        let parts: Vec<&str> = path.split('/').collect();
        let ["mesh", mesh, kind, name] = parts.as_slice() else {
            return Err(err());
        };
        let kind = match *kind {
            "virtualNode" => ProxyKind::VirtualNode,
            "virtualGateway" => ProxyKind::VirtualGateway,
            _ => return Err(err()),
        };
        let (mesh, owner) = match mesh.split_once('@') {
            Some((m, o)) => (m, Some(o.to_string())),
            None => (*mesh, None),
        };
        if mesh.is_empty() || name.is_empty() {
            return Err(err());
        }
        Ok(ProxyIdentity {
            mesh: mesh.to_string(),
            mesh_owner: owner.or(arn_account),
            kind,
            name: (*name).to_string(),
        })
    }
}

impl fmt::Display for ProxyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ProxyKind::VirtualNode => "virtualNode",
            ProxyKind::VirtualGateway => "virtualGateway",
        };
        write!(f, "mesh/{}/{kind}/{}", self.mesh, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_accepts_every_form_app_mesh_accepted() {
        let short = ProxyIdentity::parse("mesh/m/virtualNode/front").unwrap();
        assert_eq!(short.mesh, "m");
        assert_eq!(short.name, "front");
        assert_eq!(short.kind, ProxyKind::VirtualNode);
        assert_eq!(short.mesh_owner, None);

        let arn =
            ProxyIdentity::parse("arn:aws:appmesh:us-west-2:111122223333:mesh/m/virtualGateway/gw")
                .unwrap();
        assert_eq!(arn.kind, ProxyKind::VirtualGateway);
        assert_eq!(arn.mesh_owner.as_deref(), Some("111122223333"));

        let shared = ProxyIdentity::parse("mesh/m@444455556666/virtualNode/n").unwrap();
        assert_eq!(shared.mesh, "m");
        assert_eq!(shared.mesh_owner.as_deref(), Some("444455556666"));
        assert_eq!(shared.to_string(), "mesh/m/virtualNode/n");
    }

    #[test]
    fn identity_rejects_other_shapes_with_the_value_in_the_message() {
        for bad in [
            "",
            "front",
            "mesh/m/virtualRouter/r",
            "mesh//virtualNode/n",
            "mesh/m/virtualNode/",
            "arn:aws:s3:::bucket",
            "mesh/m/virtualNode/n/extra",
        ] {
            let err = ProxyIdentity::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn specs_round_trip_without_losing_uninterpreted_fields() {
        let json = serde_json::json!({
            "backends": [{"virtualService": {"virtualServiceName": "b.local",
                "clientPolicy": {"tls": {"enforce": true, "validation": {"trust": {"file": {"certificateChain": "/c"}}}}}}}],
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                    "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}],
            "serviceDiscovery": {"dns": {"hostname": "a.local", "responseType": "ENDPOINTS"}}
        });
        let spec: VirtualNodeSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&spec).unwrap(), json);
    }
}
