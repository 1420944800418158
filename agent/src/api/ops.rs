//! The App Mesh operations as plain functions over the store: validation, App Mesh's semantic
//! rules, metadata. The HTTP layer and the `--resources` loader both call these.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Error;
use crate::model::{
    EgressFilter, MeshSpec, MeshState, Metadata, Resource, State, Tag, VirtualNodeSpec,
    VirtualServiceSpec,
};
use crate::store::Store;

/// App Mesh's default quotas; every one is configurable.
#[derive(Clone, Debug, Serialize)]
pub struct Quotas {
    pub meshes: usize,
    pub virtual_nodes_per_mesh: usize,
    pub virtual_services_per_mesh: usize,
    pub backends_per_virtual_node: usize,
    pub tags_per_resource: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            meshes: 15,
            virtual_nodes_per_mesh: 200,
            virtual_services_per_mesh: 200,
            backends_per_virtual_node: 50,
            tags_per_resource: 50,
        }
    }
}

/// Who this agent is, for ARNs and owners.
#[derive(Clone, Debug, Serialize)]
pub struct Account {
    pub account_id: String,
    pub region: String,
}

#[derive(Clone, Debug)]
pub struct Ops {
    pub account: Account,
    pub quotas: Quotas,
}

// === Request bodies (the payload members of the botocore input shapes) ===

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMesh {
    pub mesh_name: String,
    #[serde(default)]
    pub spec: Option<MeshSpec>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMesh {
    #[serde(default)]
    pub spec: Option<MeshSpec>,
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVirtualNode {
    pub virtual_node_name: String,
    pub spec: VirtualNodeSpec,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateVirtualNode {
    pub spec: VirtualNodeSpec,
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVirtualService {
    pub virtual_service_name: String,
    pub spec: VirtualServiceSpec,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateVirtualService {
    pub spec: VirtualServiceSpec,
    #[serde(default)]
    pub client_token: Option<String>,
}

/// `limit` and `nextToken` of the list operations.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    #[serde(default)]
    pub limit: Option<String>,
    #[serde(default)]
    pub next_token: Option<String>,
    #[serde(default)]
    pub mesh_owner: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    Deleted,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Deleted => "DELETED",
        }
    }
}

// === Operations ===

impl Ops {
    pub fn create_mesh(&self, store: &Store, req: CreateMesh) -> Result<Value, Error> {
        check_name("meshName", &req.mesh_name)?;
        self.check_tags(&req.tags)?;
        let mut spec = req.spec.unwrap_or_default();
        normalize_mesh_spec(&mut spec);
        store.write(|state| {
            if let Some(existing) = state.meshes.get(&req.mesh_name) {
                return idempotent_or_conflict(&existing.mesh, &spec, &req.client_token, || {
                    format!("mesh {} already exists", req.mesh_name)
                })
                .map(|()| mesh_data(&req.mesh_name, &existing.mesh, Status::Active));
            }
            if state.meshes.len() >= self.quotas.meshes {
                return Err(Error::LimitExceeded(format!(
                    "meshes: the limit of {} meshes per account is reached",
                    self.quotas.meshes
                )));
            }
            let arn = self.arn(&format!("mesh/{}", req.mesh_name));
            let resource = self.new_resource(arn, spec, req.tags, req.client_token);
            let data = mesh_data(&req.mesh_name, &resource, Status::Active);
            state.meshes.insert(
                req.mesh_name.clone(),
                MeshState {
                    mesh: resource,
                    virtual_nodes: Default::default(),
                    virtual_services: Default::default(),
                },
            );
            Ok(data)
        })
    }

    pub fn describe_mesh(
        &self,
        state: &State,
        mesh: &str,
        owner: Option<&str>,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, mesh, owner)?;
        Ok(mesh_data(mesh, &m.mesh, Status::Active))
    }

    pub fn update_mesh(&self, store: &Store, mesh: &str, req: UpdateMesh) -> Result<Value, Error> {
        let mut spec = req.spec.unwrap_or_default();
        normalize_mesh_spec(&mut spec);
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, None)?;
            touch(&mut m.mesh, spec);
            Ok(mesh_data(mesh, &m.mesh, Status::Active))
        })
    }

    pub fn delete_mesh(&self, store: &Store, mesh: &str) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh(state, mesh, None)?;
            if let Some(vn) = m.virtual_nodes.keys().next() {
                return Err(Error::ResourceInUse(format!(
                    "mesh {mesh} still has resources (virtual node {vn}); delete them first"
                )));
            }
            if let Some(vs) = m.virtual_services.keys().next() {
                return Err(Error::ResourceInUse(format!(
                    "mesh {mesh} still has resources (virtual service {vs}); delete them first"
                )));
            }
            let removed = state
                .meshes
                .remove(mesh)
                .ok_or_else(|| mesh_not_found(mesh))?;
            Ok(mesh_data(mesh, &removed.mesh, Status::Deleted))
        })
    }

    pub fn list_meshes(&self, state: &State, page: &Page) -> Result<Value, Error> {
        let items = state.meshes.iter().map(|(name, m)| {
            (
                name.as_str(),
                json!({
                    "arn": m.mesh.metadata.arn,
                    "createdAt": m.mesh.metadata.created_at,
                    "lastUpdatedAt": m.mesh.metadata.last_updated_at,
                    "meshName": name,
                    "meshOwner": m.mesh.metadata.mesh_owner,
                    "resourceOwner": m.mesh.metadata.resource_owner,
                    "version": m.mesh.metadata.version,
                }),
            )
        });
        paginate("meshes", items, page)
    }

    pub fn create_virtual_node(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        req: CreateVirtualNode,
    ) -> Result<Value, Error> {
        check_name("virtualNodeName", &req.virtual_node_name)?;
        self.check_tags(&req.tags)?;
        self.check_virtual_node_spec(&req.spec)?;
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            let name = &req.virtual_node_name;
            if let Some(existing) = m.virtual_nodes.get(name) {
                return idempotent_or_conflict(existing, &req.spec, &req.client_token, || {
                    format!("virtual node {name} already exists in mesh {mesh}")
                })
                .map(|()| virtual_node_data(mesh, name, existing, Status::Active));
            }
            if m.virtual_nodes.len() >= self.quotas.virtual_nodes_per_mesh {
                return Err(Error::LimitExceeded(format!(
                    "virtualNodes: the limit of {} virtual nodes per mesh is reached in mesh {mesh}",
                    self.quotas.virtual_nodes_per_mesh
                )));
            }
            let arn = self.arn(&format!("mesh/{mesh}/virtualNode/{name}"));
            let resource = self.new_resource(arn, req.spec, req.tags, req.client_token);
            let data = virtual_node_data(mesh, name, &resource, Status::Active);
            m.virtual_nodes.insert(name.clone(), resource);
            Ok(data)
        })
    }

    pub fn describe_virtual_node(
        &self,
        state: &State,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, mesh, owner)?;
        let vn = m
            .virtual_nodes
            .get(name)
            .ok_or_else(|| not_found("virtual node", name, mesh))?;
        Ok(virtual_node_data(mesh, name, vn, Status::Active))
    }

    pub fn update_virtual_node(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
        req: UpdateVirtualNode,
    ) -> Result<Value, Error> {
        self.check_virtual_node_spec(&req.spec)?;
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            let vn = m
                .virtual_nodes
                .get_mut(name)
                .ok_or_else(|| not_found("virtual node", name, mesh))?;
            touch(vn, req.spec);
            Ok(virtual_node_data(mesh, name, vn, Status::Active))
        })
    }

    pub fn delete_virtual_node(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            if !m.virtual_nodes.contains_key(name) {
                return Err(not_found("virtual node", name, mesh));
            }
            if let Some((vs, _)) = m.virtual_services.iter().find(|(_, vs)| {
                vs.spec
                    .provider
                    .as_ref()
                    .and_then(|p| p.virtual_node.as_ref())
                    .is_some_and(|p| p.virtual_node_name == name)
            }) {
                return Err(Error::ResourceInUse(format!(
                    "virtual node {name} provides virtual service {vs}; change or delete that virtual service first"
                )));
            }
            let removed = m
                .virtual_nodes
                .remove(name)
                .ok_or_else(|| not_found("virtual node", name, mesh))?;
            Ok(virtual_node_data(mesh, name, &removed, Status::Deleted))
        })
    }

    pub fn list_virtual_nodes(
        &self,
        state: &State,
        mesh: &str,
        page: &Page,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, mesh, page.mesh_owner.as_deref())?;
        let items = m.virtual_nodes.iter().map(|(name, r)| {
            (
                name.as_str(),
                resource_ref(mesh, "virtualNodeName", name, &r.metadata),
            )
        });
        paginate("virtualNodes", items, page)
    }

    pub fn create_virtual_service(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        req: CreateVirtualService,
    ) -> Result<Value, Error> {
        check_name("virtualServiceName", &req.virtual_service_name)?;
        self.check_tags(&req.tags)?;
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            check_virtual_service_spec(m, mesh, &req.spec)?;
            let name = &req.virtual_service_name;
            if let Some(existing) = m.virtual_services.get(name) {
                return idempotent_or_conflict(existing, &req.spec, &req.client_token, || {
                    format!("virtual service {name} already exists in mesh {mesh}")
                })
                .map(|()| virtual_service_data(mesh, name, existing, Status::Active));
            }
            if m.virtual_services.len() >= self.quotas.virtual_services_per_mesh {
                return Err(Error::LimitExceeded(format!(
                    "virtualServices: the limit of {} virtual services per mesh is reached in mesh {mesh}",
                    self.quotas.virtual_services_per_mesh
                )));
            }
            let arn = self.arn(&format!("mesh/{mesh}/virtualService/{name}"));
            let resource = self.new_resource(arn, req.spec, req.tags, req.client_token);
            let data = virtual_service_data(mesh, name, &resource, Status::Active);
            m.virtual_services.insert(name.clone(), resource);
            Ok(data)
        })
    }

    pub fn describe_virtual_service(
        &self,
        state: &State,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, mesh, owner)?;
        let vs = m
            .virtual_services
            .get(name)
            .ok_or_else(|| not_found("virtual service", name, mesh))?;
        Ok(virtual_service_data(mesh, name, vs, Status::Active))
    }

    pub fn update_virtual_service(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
        req: UpdateVirtualService,
    ) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            check_virtual_service_spec(m, mesh, &req.spec)?;
            let vs = m
                .virtual_services
                .get_mut(name)
                .ok_or_else(|| not_found("virtual service", name, mesh))?;
            touch(vs, req.spec);
            Ok(virtual_service_data(mesh, name, vs, Status::Active))
        })
    }

    pub fn delete_virtual_service(
        &self,
        store: &Store,
        mesh: &str,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, owner)?;
            let removed = m
                .virtual_services
                .remove(name)
                .ok_or_else(|| not_found("virtual service", name, mesh))?;
            Ok(virtual_service_data(mesh, name, &removed, Status::Deleted))
        })
    }

    pub fn list_virtual_services(
        &self,
        state: &State,
        mesh: &str,
        page: &Page,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, mesh, page.mesh_owner.as_deref())?;
        let items = m.virtual_services.iter().map(|(name, r)| {
            (
                name.as_str(),
                resource_ref(mesh, "virtualServiceName", name, &r.metadata),
            )
        });
        paginate("virtualServices", items, page)
    }

    // === helpers ===

    fn arn(&self, resource: &str) -> String {
        format!(
            "arn:aws:appmesh:{}:{}:{resource}",
            self.account.region, self.account.account_id
        )
    }

    fn new_resource<S>(
        &self,
        arn: String,
        spec: S,
        tags: Vec<Tag>,
        client_token: Option<String>,
    ) -> Resource<S> {
        let now = now();
        Resource {
            metadata: Metadata {
                arn,
                created_at: now,
                last_updated_at: now,
                mesh_owner: self.account.account_id.clone(),
                resource_owner: self.account.account_id.clone(),
                uid: uuid::Uuid::new_v4().to_string(),
                version: 1,
            },
            spec,
            tags,
            client_token,
        }
    }

    fn check_owner(&self, mesh: &str, owner: Option<&str>) -> Result<(), Error> {
        match owner {
            None => Ok(()),
            Some(o) if o.len() != 12 || !o.bytes().all(|b| b.is_ascii_digit()) => Err(Error::bad(
                "meshOwner",
                format!("{o:?} is not a 12-digit AWS account ID"),
            )),
            Some(o) if o == self.account.account_id => Ok(()),
            Some(o) => Err(Error::NotFound(format!(
                "mesh {mesh} owned by account {o} not found: this agent holds only meshes of account {}",
                self.account.account_id
            ))),
        }
    }

    fn mesh<'s>(
        &self,
        state: &'s State,
        mesh: &str,
        owner: Option<&str>,
    ) -> Result<&'s MeshState, Error> {
        self.check_owner(mesh, owner)?;
        state.meshes.get(mesh).ok_or_else(|| mesh_not_found(mesh))
    }

    fn mesh_mut<'s>(
        &self,
        state: &'s mut State,
        mesh: &str,
        owner: Option<&str>,
    ) -> Result<&'s mut MeshState, Error> {
        self.check_owner(mesh, owner)?;
        state
            .meshes
            .get_mut(mesh)
            .ok_or_else(|| mesh_not_found(mesh))
    }

    fn check_tags(&self, tags: &[Tag]) -> Result<(), Error> {
        if tags.len() > self.quotas.tags_per_resource {
            return Err(Error::TooManyTags(format!(
                "tags: {} tags given, at most {} are allowed per resource",
                tags.len(),
                self.quotas.tags_per_resource
            )));
        }
        for (i, tag) in tags.iter().enumerate() {
            if tag.key.is_empty() || tag.key.chars().count() > 128 {
                return Err(Error::bad(
                    &format!("tags[{i}].key"),
                    "length must be between 1 and 128",
                ));
            }
            if tag.value.chars().count() > 256 {
                return Err(Error::bad(
                    &format!("tags[{i}].value"),
                    "length must be at most 256",
                ));
            }
        }
        Ok(())
    }

    fn check_virtual_node_spec(&self, spec: &VirtualNodeSpec) -> Result<(), Error> {
        for (i, l) in spec.listeners.iter().enumerate() {
            let port = l.port_mapping.port;
            if !(1..=65535).contains(&port) {
                return Err(Error::bad(
                    &format!("spec.listeners[{i}].portMapping.port"),
                    format!("{port} is out of range: must be between 1 and 65535"),
                ));
            }
            if let Some(j) = spec.listeners[..i]
                .iter()
                .position(|o| o.port_mapping.port == port)
            {
                return Err(Error::bad(
                    &format!("spec.listeners[{i}].portMapping.port"),
                    format!("port {port} is already used by spec.listeners[{j}]"),
                ));
            }
        }
        if spec.backends.len() > self.quotas.backends_per_virtual_node {
            return Err(Error::LimitExceeded(format!(
                "spec.backends: {} backends given, at most {} are allowed per virtual node",
                spec.backends.len(),
                self.quotas.backends_per_virtual_node
            )));
        }
        for (i, b) in spec.backends.iter().enumerate() {
            let Some(vs) = &b.virtual_service else {
                return Err(Error::bad(
                    &format!("spec.backends[{i}]"),
                    "exactly one of virtualService must be set",
                ));
            };
            if vs.virtual_service_name.is_empty() {
                return Err(Error::bad(
                    &format!("spec.backends[{i}].virtualService.virtualServiceName"),
                    "must not be empty",
                ));
            }
        }
        if let Some(sd) = &spec.service_discovery {
            match (&sd.dns, &sd.aws_cloud_map) {
                (Some(dns), None) => {
                    if dns.hostname.is_empty() {
                        return Err(Error::bad(
                            "spec.serviceDiscovery.dns.hostname",
                            "must not be empty",
                        ));
                    }
                }
                (None, Some(cm)) => {
                    for (field, v) in [
                        ("namespaceName", &cm.namespace_name),
                        ("serviceName", &cm.service_name),
                    ] {
                        if v.is_empty() || v.chars().count() > 1024 {
                            return Err(Error::bad(
                                &format!("spec.serviceDiscovery.awsCloudMap.{field}"),
                                "length must be between 1 and 1024",
                            ));
                        }
                    }
                }
                _ => {
                    return Err(Error::bad(
                        "spec.serviceDiscovery",
                        "exactly one of awsCloudMap, dns must be set",
                    ));
                }
            }
        } else if !spec.listeners.is_empty() {
            return Err(Error::bad(
                "spec.serviceDiscovery",
                "is required when spec.listeners is not empty (callers need to find this node)",
            ));
        }
        Ok(())
    }
}

fn check_virtual_service_spec(
    m: &MeshState,
    mesh: &str,
    spec: &VirtualServiceSpec,
) -> Result<(), Error> {
    let Some(p) = &spec.provider else {
        return Ok(());
    };
    match (&p.virtual_node, &p.virtual_router) {
        (Some(vn), None) => {
            if !m.virtual_nodes.contains_key(&vn.virtual_node_name) {
                return Err(Error::bad(
                    "spec.provider.virtualNode.virtualNodeName",
                    format!(
                        "virtual node {} does not exist in mesh {mesh}",
                        vn.virtual_node_name
                    ),
                ));
            }
        }
        (None, Some(vr)) => {
            return Err(Error::bad(
                "spec.provider.virtualRouter.virtualRouterName",
                format!(
                    "virtual router {} does not exist in mesh {mesh}",
                    vr.virtual_router_name
                ),
            ));
        }
        _ => {
            return Err(Error::bad(
                "spec.provider",
                "exactly one of virtualNode, virtualRouter must be set",
            ));
        }
    }
    Ok(())
}

/// App Mesh fills in the default egress filter, so describe shows it.
fn normalize_mesh_spec(spec: &mut MeshSpec) {
    if spec.egress_filter.is_none() {
        spec.egress_filter = Some(EgressFilter {
            kind: Default::default(),
        });
    }
}

fn check_name(field: &str, name: &str) -> Result<(), Error> {
    let n = name.chars().count();
    if !(1..=255).contains(&n) {
        return Err(Error::bad(
            field,
            format!("length {n} is out of range: must be between 1 and 255"),
        ));
    }
    Ok(())
}

/// A create for a name that exists: the same `clientToken` and spec is a retry and succeeds; anything
/// else conflicts.
fn idempotent_or_conflict<S: PartialEq>(
    existing: &Resource<S>,
    spec: &S,
    token: &Option<String>,
    conflict: impl FnOnce() -> String,
) -> Result<(), Error> {
    match (token, &existing.client_token) {
        (Some(t), Some(e)) if t == e && existing.spec == *spec => Ok(()),
        (Some(t), Some(e)) if t == e => Err(Error::Conflict(format!(
            "clientToken {t:?} was already used for a different request"
        ))),
        _ => Err(Error::Conflict(conflict())),
    }
}

fn touch<S: PartialEq>(r: &mut Resource<S>, spec: S) {
    if r.spec != spec {
        r.spec = spec;
        r.metadata.version += 1;
        r.metadata.last_updated_at = now();
    }
}

fn now() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Millisecond precision, like App Mesh's timestamps.
    (d.as_millis() as f64) / 1000.0
}

fn mesh_not_found(mesh: &str) -> Error {
    Error::NotFound(format!("mesh {mesh} not found"))
}

fn not_found(kind: &str, name: &str, mesh: &str) -> Error {
    Error::NotFound(format!("{kind} {name} not found in mesh {mesh}"))
}

fn mesh_data(name: &str, r: &Resource<MeshSpec>, status: Status) -> Value {
    json!({
        "meshName": name,
        "metadata": r.metadata,
        "spec": r.spec,
        "status": {"status": status.as_str()},
    })
}

fn virtual_node_data(
    mesh: &str,
    name: &str,
    r: &Resource<VirtualNodeSpec>,
    status: Status,
) -> Value {
    json!({
        "meshName": mesh,
        "metadata": r.metadata,
        "spec": r.spec,
        "status": {"status": status.as_str()},
        "virtualNodeName": name,
    })
}

fn virtual_service_data(
    mesh: &str,
    name: &str,
    r: &Resource<VirtualServiceSpec>,
    status: Status,
) -> Value {
    json!({
        "meshName": mesh,
        "metadata": r.metadata,
        "spec": r.spec,
        "status": {"status": status.as_str()},
        "virtualServiceName": name,
    })
}

fn resource_ref(mesh: &str, name_key: &str, name: &str, md: &Metadata) -> Value {
    let mut v = json!({
        "arn": md.arn,
        "createdAt": md.created_at,
        "lastUpdatedAt": md.last_updated_at,
        "meshName": mesh,
        "meshOwner": md.mesh_owner,
        "resourceOwner": md.resource_owner,
        "version": md.version,
    });
    v[name_key] = json!(name);
    v
}

/// Lists are ordered by name; `nextToken` is the hex of the last name returned.
fn paginate<'a>(
    key: &str,
    items: impl Iterator<Item = (&'a str, Value)>,
    page: &Page,
) -> Result<Value, Error> {
    let limit = match &page.limit {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(Error::bad(
                    "limit",
                    format!("{l:?} is out of range: must be between 1 and 100"),
                ));
            }
        },
    };
    let after = match &page.next_token {
        None => None,
        Some(t) => Some(
            decode_token(t)
                .ok_or_else(|| Error::bad("nextToken", "is not a token this API returned"))?,
        ),
    };
    let mut out = Vec::new();
    let mut more = false;
    for (name, v) in items {
        if after.as_deref().is_some_and(|a| name <= a) {
            continue;
        }
        if out.len() == limit {
            more = true;
            break;
        }
        out.push((name.to_string(), v));
    }
    let mut body = json!({ key: out.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>() });
    if more && let Some((last, _)) = out.last() {
        body["nextToken"] = json!(encode_token(last));
    }
    Ok(body)
}

fn encode_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(t: &str) -> Option<String> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..t.len())
        .step_by(2)
        .map(|i| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}
