//! The App Mesh operations as plain functions over the store: model validation, App Mesh's
//! semantic rules (in [`super::kinds`]), metadata, idempotency, pagination. The HTTP layer and the
//! `--resources` loader both call these.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Error;
use super::kind::{Check, CreateParts, Kind, Quotas};
use crate::store::Store;
use trellis_model::{
    CreateMeshBody, EgressFilter, EgressFilterType, MeshSpec, MeshState, Metadata, Resource, State,
    TagRef, TagResourceBody, UntagResourceBody, UpdateMeshBody, Validate,
};

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

/// `limit`, `nextToken` and `meshOwner` from the query string.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Query {
    #[serde(default)]
    pub limit: Option<String>,
    #[serde(default)]
    pub next_token: Option<String>,
    #[serde(default)]
    pub mesh_owner: Option<String>,
    #[serde(default)]
    pub resource_arn: Option<String>,
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

/// Where a resource lives: its mesh and, for routes and gateway routes, its router or gateway.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub mesh: &'a str,
    pub parent: Option<&'a str>,
    pub owner: Option<&'a str>,
}

/// Finds the tags of the resource at a resolved ARN path: shared (`get`) or mutable (`get_mut, mut`).
macro_rules! tags_lookup {
    ($state:expr, $path:expr, $arn:expr, $get:ident $(, $mut:tt)?) => {{
        let p = &$path;
        let name = |i: usize| p.get(i).map(String::as_str).unwrap_or_default();
        let m = $state.meshes.$get(name(1)).ok_or_else(|| arn_not_found($arn))?;
        let tags = match (p.len(), name(2)) {
            (2, _) => Some(&$($mut)? m.mesh.tags),
            (4, "virtualNode") => m.virtual_nodes.$get(name(3)).map(|r| &$($mut)? r.tags),
            (4, "virtualService") => m.virtual_services.$get(name(3)).map(|r| &$($mut)? r.tags),
            (4, "virtualRouter") => m.virtual_routers.$get(name(3)).map(|r| &$($mut)? r.tags),
            (4, _) => m.virtual_gateways.$get(name(3)).map(|r| &$($mut)? r.tags),
            (_, "virtualRouter") => m
                .routes
                .$get(name(3))
                .and_then(|routes| routes.$get(name(5)))
                .map(|r| &$($mut)? r.tags),
            _ => m
                .gateway_routes
                .$get(name(3))
                .and_then(|routes| routes.$get(name(5)))
                .map(|r| &$($mut)? r.tags),
        };
        tags.ok_or_else(|| arn_not_found($arn))
    }};
}

// === Meshes ===

impl Ops {
    pub fn create_mesh(&self, store: &Store, req: CreateMeshBody) -> Result<Value, Error> {
        req.validate("")?;
        let mut spec = req.spec.unwrap_or_default();
        normalize_mesh_spec(&mut spec);
        let name = req.mesh_name;
        let tags = req.tags.unwrap_or_default();
        let stamp = Stamp::new();
        store.write(|state| {
            if let Some(existing) = state.meshes.get(&name) {
                idempotent_or_conflict(&existing.mesh, &spec, &tags, &req.client_token, || {
                    format!("mesh {name} already exists")
                })?;
                return Ok(mesh_data(&name, &existing.mesh, Status::Active));
            }
            if state.meshes.len() >= self.quotas.meshes {
                return Err(Error::LimitExceeded(format!(
                    "meshName: the limit of {} meshes per account is reached",
                    self.quotas.meshes
                )));
            }
            let arn = self.arn(&format!("mesh/{name}"));
            let resource = self.new_resource(
                arn,
                &stamp,
                spec.clone(),
                tags.clone(),
                req.client_token.clone(),
            );
            let data = mesh_data(&name, &resource, Status::Active);
            state.meshes.insert(name.clone(), MeshState::new(resource));
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

    pub fn update_mesh(
        &self,
        store: &Store,
        mesh: &str,
        req: UpdateMeshBody,
    ) -> Result<Value, Error> {
        req.validate("")?;
        let mut spec = req.spec.unwrap_or_default();
        normalize_mesh_spec(&mut spec);
        let stamp = Stamp::new();
        store.write(|state| {
            let m = self.mesh_mut(state, mesh, None)?;
            apply_update(&mut m.mesh, &stamp, &spec, &req.client_token);
            Ok(mesh_data(mesh, &m.mesh, Status::Active))
        })
    }

    pub fn delete_mesh(&self, store: &Store, mesh: &str) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh(state, mesh, None)?;
            if !m.is_empty() {
                let what = first_resource(m);
                return Err(Error::ResourceInUse(format!(
                    "mesh {mesh} still has resources ({what}); delete them first"
                )));
            }
            let removed = state
                .meshes
                .remove(mesh)
                .ok_or_else(|| mesh_not_found(mesh))?;
            Ok(mesh_data(mesh, &removed.mesh, Status::Deleted))
        })
    }

    pub fn list_meshes(&self, state: &State, q: &Query) -> Result<Value, Error> {
        let items = state.meshes.iter().map(|(name, m)| {
            let md = &m.mesh.metadata;
            (
                name.as_str(),
                json!({
                    "arn": md.arn,
                    "createdAt": md.created_at,
                    "lastUpdatedAt": md.last_updated_at,
                    "meshName": name,
                    "meshOwner": md.mesh_owner,
                    "resourceOwner": md.resource_owner,
                    "version": md.version,
                }),
            )
        });
        paginate("meshes", items, q, 100)
    }
}

// === Everything that lives in a mesh, generically ===

impl Ops {
    pub fn create<K: Kind>(
        &self,
        store: &Store,
        at: Place<'_>,
        body: K::Create,
    ) -> Result<Value, Error> {
        body.validate("")?;
        let CreateParts {
            name,
            spec,
            tags,
            client_token,
        } = K::create_parts(body);
        let stamp = Stamp::new();
        store.write(|state| {
            let m = self.mesh_mut(state, at.mesh, at.owner)?;
            K::check(
                &Check {
                    mesh_name: at.mesh,
                    mesh: m,
                    parent: at.parent,
                    name: &name,
                    quotas: &self.quotas,
                },
                &spec,
            )?;
            let map = K::map(m, at.mesh, at.parent)?;
            if let Some(existing) = map.get(&name) {
                idempotent_or_conflict(existing, &spec, &tags, &client_token, || {
                    format!("{} {name} already exists in {}", K::HUMAN, where_::<K>(at))
                })?;
                return Ok(data::<K>(at, &name, existing, Status::Active));
            }
            let (limit, scope) = K::quota(&self.quotas);
            if map.len() >= limit {
                return Err(Error::LimitExceeded(format!(
                    "{}: the limit of {limit} {}s per {scope} is reached in {}",
                    K::NAME_KEY,
                    K::HUMAN,
                    where_::<K>(at)
                )));
            }
            let arn = self.arn(&arn_path::<K>(at, &name));
            let resource = self.new_resource(
                arn,
                &stamp,
                spec.clone(),
                tags.clone(),
                client_token.clone(),
            );
            let out = data::<K>(at, &name, &resource, Status::Active);
            K::map_mut(m, at.mesh, at.parent)?.insert(name.clone(), resource);
            Ok(out)
        })
    }

    pub fn describe<K: Kind>(
        &self,
        state: &State,
        at: Place<'_>,
        name: &str,
    ) -> Result<Value, Error> {
        let m = self.mesh(state, at.mesh, at.owner)?;
        let r = K::map(m, at.mesh, at.parent)?
            .get(name)
            .ok_or_else(|| not_found::<K>(at, name))?;
        Ok(data::<K>(at, name, r, Status::Active))
    }

    pub fn update<K: Kind>(
        &self,
        store: &Store,
        at: Place<'_>,
        name: &str,
        body: K::Update,
    ) -> Result<Value, Error> {
        body.validate("")?;
        let (spec, client_token) = K::update_parts(body);
        let stamp = Stamp::new();
        store.write(|state| {
            let m = self.mesh_mut(state, at.mesh, at.owner)?;
            if !K::map(m, at.mesh, at.parent)?.contains_key(name) {
                return Err(not_found::<K>(at, name));
            }
            K::check(
                &Check {
                    mesh_name: at.mesh,
                    mesh: m,
                    parent: at.parent,
                    name,
                    quotas: &self.quotas,
                },
                &spec,
            )?;
            let r = K::map_mut(m, at.mesh, at.parent)?
                .get_mut(name)
                .ok_or_else(|| not_found::<K>(at, name))?;
            apply_update(r, &stamp, &spec, &client_token);
            Ok(data::<K>(at, name, r, Status::Active))
        })
    }

    pub fn delete<K: Kind>(
        &self,
        store: &Store,
        at: Place<'_>,
        name: &str,
    ) -> Result<Value, Error> {
        store.write(|state| {
            let m = self.mesh_mut(state, at.mesh, at.owner)?;
            if !K::map(m, at.mesh, at.parent)?.contains_key(name) {
                return Err(not_found::<K>(at, name));
            }
            if let Some(user) = K::in_use(m, at.parent, name) {
                return Err(Error::ResourceInUse(format!(
                    "{} {name} is in use: {user}; change or delete that first",
                    K::HUMAN
                )));
            }
            let removed = K::map_mut(m, at.mesh, at.parent)?
                .remove(name)
                .ok_or_else(|| not_found::<K>(at, name))?;
            K::after_delete(m, name);
            Ok(data::<K>(at, name, &removed, Status::Deleted))
        })
    }

    pub fn list<K: Kind>(&self, state: &State, at: Place<'_>, q: &Query) -> Result<Value, Error> {
        let m = self.mesh(state, at.mesh, at.owner)?;
        let items = K::map(m, at.mesh, at.parent)?
            .iter()
            .map(|(name, r)| (name.as_str(), reference::<K>(at, name, &r.metadata)));
        paginate(K::LIST_KEY, items, q, 100)
    }
}

// === Tags ===

impl Ops {
    pub fn list_tags(&self, state: &State, q: &Query) -> Result<Value, Error> {
        let arn = q
            .resource_arn
            .as_deref()
            .ok_or_else(|| Error::bad("resourceArn", "is required"))?;
        let tags = self.tags_of(state, arn)?;
        let items = tags
            .iter()
            .map(|t| (t.key.as_str(), json!({"key": t.key, "value": t.value})));
        paginate("tags", items, q, 50)
    }

    pub fn tag_resource(
        &self,
        store: &Store,
        q: &Query,
        body: TagResourceBody,
    ) -> Result<Value, Error> {
        body.validate("")?;
        let arn = q
            .resource_arn
            .as_deref()
            .ok_or_else(|| Error::bad("resourceArn", "is required"))?;
        store.write(|state| {
            let tags = self.tags_of_mut(state, arn)?;
            let mut merged: BTreeMap<String, String> = tags
                .iter()
                .map(|t| (t.key.clone(), t.value.clone()))
                .collect();
            for t in &body.tags {
                merged.insert(t.key.clone(), t.value.clone());
            }
            if merged.len() > self.quotas.tags_per_resource {
                return Err(Error::TooManyTags(format!(
                    "tags: {} tags after this request, at most {} are allowed per resource",
                    merged.len(),
                    self.quotas.tags_per_resource
                )));
            }
            *tags = merged
                .into_iter()
                .map(|(key, value)| TagRef { key, value })
                .collect();
            Ok(json!({}))
        })
    }

    pub fn untag_resource(
        &self,
        store: &Store,
        q: &Query,
        body: UntagResourceBody,
    ) -> Result<Value, Error> {
        body.validate("")?;
        let arn = q
            .resource_arn
            .as_deref()
            .ok_or_else(|| Error::bad("resourceArn", "is required"))?;
        store.write(|state| {
            let tags = self.tags_of_mut(state, arn)?;
            tags.retain(|t| !body.tag_keys.contains(&t.key));
            Ok(json!({}))
        })
    }

    fn tags_of<'s>(&self, state: &'s State, arn: &str) -> Result<&'s Vec<TagRef>, Error> {
        let path = self.resolve_arn(arn)?;
        tags_lookup!(state, path, arn, get)
    }

    fn tags_of_mut<'s>(
        &self,
        state: &'s mut State,
        arn: &str,
    ) -> Result<&'s mut Vec<TagRef>, Error> {
        let path = self.resolve_arn(arn)?;
        tags_lookup!(state, path, arn, get_mut, mut)
    }

    /// `arn:aws:appmesh:REGION:ACCOUNT:mesh/M[/kind/N[/child/C]]` → the path segments.
    fn resolve_arn(&self, arn: &str) -> Result<Vec<String>, Error> {
        let prefix = format!(
            "arn:aws:appmesh:{}:{}:",
            self.account.region, self.account.account_id
        );
        let rest = arn.strip_prefix(&prefix).ok_or_else(|| {
            if arn.starts_with("arn:") {
                arn_not_found(arn)
            } else {
                Error::bad("resourceArn", format!("{arn:?} is not an ARN"))
            }
        })?;
        let path: Vec<String> = rest.split('/').map(str::to_string).collect();
        let valid = match path
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["mesh", m] => !m.is_empty(),
            [
                "mesh",
                _,
                "virtualNode" | "virtualService" | "virtualRouter" | "virtualGateway",
                n,
            ] => !n.is_empty(),
            ["mesh", _, "virtualRouter", _, "route", n] => !n.is_empty(),
            ["mesh", _, "virtualGateway", _, "gatewayRoute", n] => !n.is_empty(),
            _ => false,
        };
        if !valid {
            return Err(Error::bad(
                "resourceArn",
                format!("{arn:?} is not the ARN of an App Mesh resource"),
            ));
        }
        Ok(path)
    }
}

// === Shared helpers ===

impl Ops {
    fn arn(&self, resource: &str) -> String {
        format!(
            "arn:aws:appmesh:{}:{}:{resource}",
            self.account.region, self.account.account_id
        )
    }

    fn new_resource<S>(
        &self,
        arn: String,
        stamp: &Stamp,
        spec: S,
        tags: Vec<TagRef>,
        client_token: Option<String>,
    ) -> Resource<S> {
        Resource {
            metadata: Metadata {
                arn,
                created_at: stamp.now,
                last_updated_at: stamp.now,
                mesh_owner: self.account.account_id.clone(),
                resource_owner: self.account.account_id.clone(),
                uid: stamp.uid.clone(),
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

    pub(super) fn mesh<'s>(
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
}

fn first_resource(m: &MeshState) -> String {
    let first = |kind: &str, name: Option<&String>| name.map(|n| format!("{kind} {n}"));
    first("virtual node", m.virtual_nodes.keys().next())
        .or_else(|| first("virtual service", m.virtual_services.keys().next()))
        .or_else(|| first("virtual router", m.virtual_routers.keys().next()))
        .or_else(|| first("virtual gateway", m.virtual_gateways.keys().next()))
        .unwrap_or_default()
}

/// App Mesh fills in the default egress filter, so describe shows it.
fn normalize_mesh_spec(spec: &mut MeshSpec) {
    if spec.egress_filter.is_none() {
        spec.egress_filter = Some(EgressFilter {
            r#type: EgressFilterType::DropAll,
        });
    }
}

/// A create for a name that exists: the same `clientToken` with the same request is a retry and
/// succeeds; the same token with a different request, or no token, conflicts.
fn idempotent_or_conflict<S: PartialEq>(
    existing: &Resource<S>,
    spec: &S,
    tags: &[TagRef],
    token: &Option<String>,
    conflict: impl FnOnce() -> String,
) -> Result<(), Error> {
    match (token, &existing.client_token) {
        (Some(t), Some(e)) if t == e && existing.spec == *spec && existing.tags == tags => Ok(()),
        (Some(t), Some(e)) if t == e => Err(Error::Conflict(format!(
            "clientToken {t:?} was already used for a different request"
        ))),
        _ => Err(Error::Conflict(conflict())),
    }
}

/// Updates replace the whole spec; only a real change bumps the version.
fn apply_update<S: PartialEq + Clone>(
    r: &mut Resource<S>,
    stamp: &Stamp,
    spec: &S,
    client_token: &Option<String>,
) {
    if r.spec != *spec {
        r.spec = spec.clone();
        r.metadata.version += 1;
        r.metadata.last_updated_at = stamp.now;
    }
    if client_token.is_some() {
        r.client_token.clone_from(client_token);
    }
}

/// The time and uid of one request, taken before the store runs its closure: a closure that the
/// shared store re-runs after a lost race must compute the same resource again.
struct Stamp {
    now: f64,
    uid: String,
}

impl Stamp {
    fn new() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Stamp {
            // Millisecond precision, like App Mesh's timestamps.
            now: (d.as_millis() as f64) / 1000.0,
            uid: uuid::Uuid::new_v4().to_string(),
        }
    }
}

fn where_<K: Kind>(at: Place<'_>) -> String {
    match (at.parent, K::PARENT) {
        (Some(p), Some(kind)) => format!("{} {p} of mesh {}", kind.human(), at.mesh),
        _ => format!("mesh {}", at.mesh),
    }
}

fn mesh_not_found(mesh: &str) -> Error {
    Error::NotFound(format!("mesh {mesh} not found"))
}

fn arn_not_found(arn: &str) -> Error {
    Error::NotFound(format!("no resource with ARN {arn}"))
}

pub(super) fn not_found<K: Kind>(at: Place<'_>, name: &str) -> Error {
    Error::NotFound(format!(
        "{} {name} not found in {}",
        K::HUMAN,
        where_::<K>(at)
    ))
}

fn arn_path<K: Kind>(at: Place<'_>, name: &str) -> String {
    match (K::PARENT, at.parent) {
        (Some(p), Some(parent)) => format!(
            "mesh/{}/{}/{parent}/{}/{name}",
            at.mesh,
            p.arn_segment(),
            K::TYPE
        ),
        _ => format!("mesh/{}/{}/{name}", at.mesh, K::TYPE),
    }
}

fn mesh_data(name: &str, r: &Resource<MeshSpec>, status: Status) -> Value {
    json!({
        "meshName": name,
        "metadata": r.metadata,
        "spec": r.spec,
        "status": {"status": status.as_str()},
    })
}

fn data<K: Kind>(at: Place<'_>, name: &str, r: &Resource<K::Spec>, status: Status) -> Value {
    let mut v = json!({
        "meshName": at.mesh,
        "metadata": r.metadata,
        "spec": r.spec,
        "status": {"status": status.as_str()},
    });
    v[K::NAME_KEY] = json!(name);
    if let (Some(p), Some(parent)) = (K::PARENT, at.parent) {
        v[p.name_key()] = json!(parent);
    }
    v
}

fn reference<K: Kind>(at: Place<'_>, name: &str, md: &Metadata) -> Value {
    let mut v = json!({
        "arn": md.arn,
        "createdAt": md.created_at,
        "lastUpdatedAt": md.last_updated_at,
        "meshName": at.mesh,
        "meshOwner": md.mesh_owner,
        "resourceOwner": md.resource_owner,
        "version": md.version,
    });
    v[K::NAME_KEY] = json!(name);
    if let (Some(p), Some(parent)) = (K::PARENT, at.parent) {
        v[p.name_key()] = json!(parent);
    }
    v
}

/// Lists are ordered by name; `nextToken` is the hex of the last name returned, so a page
/// boundary stays put whatever is created or deleted meanwhile.
fn paginate<'a>(
    key: &str,
    items: impl Iterator<Item = (&'a str, Value)>,
    q: &Query,
    max: usize,
) -> Result<Value, Error> {
    let limit = match &q.limit {
        None => max,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(Error::bad(
                    "limit",
                    format!("{l:?} is out of range: must be between 1 and {max}"),
                ));
            }
        },
    };
    let after = match &q.next_token {
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
