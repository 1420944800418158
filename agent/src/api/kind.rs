//! What every resource kind of a mesh is to the operations: the [`Kind`] trait (its payload
//! names, where it lives, its quota, its rules), and the types both the generic operations
//! (`ops.rs`) and the six kinds (`kinds.rs`) use.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;
use trellis_model::{MeshState, Resource, TagRef, Validate};

/// App Mesh's default quotas; every one is configurable.
#[derive(Clone, Debug, Serialize)]
pub struct Quotas {
    pub meshes: usize,
    pub virtual_nodes_per_mesh: usize,
    pub virtual_services_per_mesh: usize,
    pub virtual_routers_per_mesh: usize,
    pub routes_per_router: usize,
    pub weighted_targets_per_route: usize,
    pub backends_per_virtual_node: usize,
    pub virtual_gateways_per_mesh: usize,
    pub gateway_routes_per_gateway: usize,
    pub tags_per_resource: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            meshes: 15,
            virtual_nodes_per_mesh: 200,
            virtual_services_per_mesh: 200,
            virtual_routers_per_mesh: 200,
            routes_per_router: 50,
            weighted_targets_per_route: 10,
            backends_per_virtual_node: 50,
            virtual_gateways_per_mesh: 3,
            gateway_routes_per_gateway: 10,
            tags_per_resource: 50,
        }
    }
}

/// What a create request carries, whatever the kind.
#[derive(Debug)]
pub struct CreateParts<S> {
    pub name: String,
    pub spec: S,
    pub tags: Vec<TagRef>,
    pub client_token: Option<String>,
}

/// The parent of routes (a virtual router) or of gateway routes (a virtual gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    Router,
    Gateway,
}

impl Parent {
    pub fn arn_segment(self) -> &'static str {
        match self {
            Parent::Router => "virtualRouter",
            Parent::Gateway => "virtualGateway",
        }
    }

    pub fn name_key(self) -> &'static str {
        match self {
            Parent::Router => "virtualRouterName",
            Parent::Gateway => "virtualGatewayName",
        }
    }

    pub fn human(self) -> &'static str {
        match self {
            Parent::Router => "virtual router",
            Parent::Gateway => "virtual gateway",
        }
    }
}

/// What the rules of one write can see.
pub struct Check<'a> {
    pub mesh_name: &'a str,
    pub mesh: &'a MeshState,
    pub parent: Option<&'a str>,
    pub name: &'a str,
    pub quotas: &'a Quotas,
}

pub trait Kind: Send + Sync + 'static {
    type Spec: Clone + PartialEq + Serialize + DeserializeOwned + Validate + Send + Sync + 'static;
    type Create: DeserializeOwned + Validate + Send;
    type Update: DeserializeOwned + Validate + Send;
    /// The ARN segment and payload key: `virtualNode`.
    const TYPE: &'static str;
    const HUMAN: &'static str;
    const NAME_KEY: &'static str;
    const LIST_KEY: &'static str;
    const PARENT: Option<Parent>;

    fn create_parts(b: Self::Create) -> CreateParts<Self::Spec>;
    fn update_parts(b: Self::Update) -> (Self::Spec, Option<String>);
    fn map<'m>(
        m: &'m MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m BTreeMap<String, Resource<Self::Spec>>, Error>;
    fn map_mut<'m>(
        m: &'m mut MeshState,
        mesh: &str,
        parent: Option<&str>,
    ) -> Result<&'m mut BTreeMap<String, Resource<Self::Spec>>, Error>;
    /// The limit and what it is counted per.
    fn quota(q: &Quotas) -> (usize, &'static str);
    fn check(c: &Check<'_>, spec: &Self::Spec) -> Result<(), Error>;
    /// Who still references this resource, if anyone (that blocks a delete).
    fn in_use(m: &MeshState, parent: Option<&str>, name: &str) -> Option<String>;
    /// Tidies what hangs off a deleted resource (the empty route table of a router).
    fn after_delete(_m: &mut MeshState, _name: &str) {}
}
