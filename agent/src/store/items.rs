//! The state as items: one item per App Mesh resource, keyed by its ARN-like path
//! (`mesh/M`, `mesh/M/virtualNode/N`, `mesh/M/virtualRouter/R/route/X`, …), valued by the
//! resource's JSON. Pure: the DynamoDB backend stores these items and replays change lists of
//! them, and every agent that applies the same change list to the same state gets the same state.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use trellis_model::{MeshState, Resource, State};

/// One resource's new JSON, or `None` when it was deleted.
pub(crate) type Change = (String, Option<String>);

#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("item key {0:?} is not a Trellis resource path")]
    BadKey(String),
    #[error("item {key}: {source}")]
    BadData {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("item {0} belongs to a mesh that is not there")]
    Orphan(String),
    #[error("cannot encode resource {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Names may hold any character, so `/` and `%` inside a name are percent-escaped.
fn esc(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

fn unesc(seg: &str) -> String {
    seg.replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%25", "%")
}

/// What an item key names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Mesh(String),
    Child {
        mesh: String,
        kind: &'static str,
        name: String,
    },
    Grandchild {
        mesh: String,
        kind: &'static str,
        parent: String,
        name: String,
    },
}

const NODE: &str = "virtualNode";
const SERVICE: &str = "virtualService";
const ROUTER: &str = "virtualRouter";
const GATEWAY: &str = "virtualGateway";
const ROUTE: &str = "route";
const GATEWAY_ROUTE: &str = "gatewayRoute";

fn kind_of(s: &str) -> Option<&'static str> {
    [NODE, SERVICE, ROUTER, GATEWAY, ROUTE, GATEWAY_ROUTE]
        .into_iter()
        .find(|k| *k == s)
}

pub(crate) fn mesh_key(mesh: &str) -> String {
    format!("mesh/{}", esc(mesh))
}

fn child_key(mesh: &str, kind: &str, name: &str) -> String {
    format!("mesh/{}/{kind}/{}", esc(mesh), esc(name))
}

fn grandchild_key(mesh: &str, parent_kind: &str, parent: &str, kind: &str, name: &str) -> String {
    format!(
        "mesh/{}/{parent_kind}/{}/{kind}/{}",
        esc(mesh),
        esc(parent),
        esc(name)
    )
}

fn parse(key: &str) -> Result<Key, ItemError> {
    let bad = || ItemError::BadKey(key.to_string());
    let segs: Vec<&str> = key.split('/').collect();
    match segs.as_slice() {
        ["mesh", m] => Ok(Key::Mesh(unesc(m))),
        ["mesh", m, k, n] => {
            let kind = kind_of(k).filter(|k| ![ROUTE, GATEWAY_ROUTE].contains(k));
            Ok(Key::Child {
                mesh: unesc(m),
                kind: kind.ok_or_else(bad)?,
                name: unesc(n),
            })
        }
        ["mesh", m, pk, p, k, n] => {
            let kind = match (*pk, *k) {
                (ROUTER, ROUTE) => ROUTE,
                (GATEWAY, GATEWAY_ROUTE) => GATEWAY_ROUTE,
                _ => return Err(bad()),
            };
            Ok(Key::Grandchild {
                mesh: unesc(m),
                kind,
                parent: unesc(p),
                name: unesc(n),
            })
        }
        _ => Err(bad()),
    }
}

/// The request fields whose names make up `key`, outermost first (`meshName`, the parent's name,
/// the resource's own name): what an error about the key names.
pub(crate) fn key_fields(key: &str) -> Vec<&'static str> {
    let name = |kind: &str| match kind {
        NODE => "virtualNodeName",
        SERVICE => "virtualServiceName",
        ROUTER => "virtualRouterName",
        GATEWAY => "virtualGatewayName",
        ROUTE => "routeName",
        _ => "gatewayRouteName",
    };
    match parse(key) {
        Ok(Key::Mesh(_)) => vec!["meshName"],
        Ok(Key::Child { kind, .. }) => vec!["meshName", name(kind)],
        Ok(Key::Grandchild { kind, .. }) => {
            let parent = if kind == ROUTE { ROUTER } else { GATEWAY };
            vec!["meshName", name(parent), name(kind)]
        }
        Err(_) => Vec::new(),
    }
}

fn encode<S: Serialize>(key: &str, r: &Resource<S>) -> Result<String, ItemError> {
    serde_json::to_string(r).map_err(|source| ItemError::Encode {
        key: key.to_string(),
        source,
    })
}

fn decode<S: DeserializeOwned>(key: &str, data: &str) -> Result<Resource<S>, ItemError> {
    serde_json::from_str(data).map_err(|source| ItemError::BadData {
        key: key.to_string(),
        source,
    })
}

/// Every resource of `state` as (key, JSON), in key order.
#[cfg(test)]
pub(crate) fn items(state: &State) -> Result<BTreeMap<String, String>, ItemError> {
    let empty = State::default();
    let mut out = BTreeMap::new();
    for (k, v) in diff(&empty, state)? {
        if let Some(v) = v {
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Adds to `out` what changed between two maps of resources.
fn diff_map<S: Serialize + PartialEq>(
    old: Option<&BTreeMap<String, Resource<S>>>,
    new: Option<&BTreeMap<String, Resource<S>>>,
    key: impl Fn(&str) -> String,
    out: &mut Vec<Change>,
) -> Result<(), ItemError> {
    let none = BTreeMap::new();
    let (old, new) = (old.unwrap_or(&none), new.unwrap_or(&none));
    for (name, r) in new {
        if old.get(name) != Some(r) {
            let k = key(name);
            let data = encode(&k, r)?;
            out.push((k, Some(data)));
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push((key(name), None));
    }
    Ok(())
}

fn diff_nested<S: Serialize + PartialEq>(
    old: Option<&BTreeMap<String, BTreeMap<String, Resource<S>>>>,
    new: Option<&BTreeMap<String, BTreeMap<String, Resource<S>>>>,
    key: impl Fn(&str, &str) -> String,
    out: &mut Vec<Change>,
) -> Result<(), ItemError> {
    let none = BTreeMap::new();
    let (old, new) = (old.unwrap_or(&none), new.unwrap_or(&none));
    for parent in old
        .keys()
        .chain(new.keys().filter(|p| !old.contains_key(*p)))
    {
        diff_map(old.get(parent), new.get(parent), |n| key(parent, n), out)?;
    }
    Ok(())
}

/// The changes that turn `old` into `new`: upserted meshes first, deleted meshes last, so that
/// [`apply`] never meets a resource whose mesh is not there.
pub(crate) fn diff(old: &State, new: &State) -> Result<Vec<Change>, ItemError> {
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for (mesh, m) in &new.meshes {
        let before = old.meshes.get(mesh);
        if before.map(|b| &b.mesh) != Some(&m.mesh) {
            let k = mesh_key(mesh);
            let data = encode(&k, &m.mesh)?;
            out.push((k, Some(data)));
        }
    }
    let names: std::collections::BTreeSet<&String> =
        old.meshes.keys().chain(new.meshes.keys()).collect();
    for mesh in names {
        let (o, n) = (old.meshes.get(mesh), new.meshes.get(mesh));
        if o == n {
            continue;
        }
        diff_mesh(mesh, o, n, &mut out)?;
        if n.is_none() {
            dropped.push((mesh_key(mesh), None));
        }
    }
    out.extend(dropped);
    Ok(out)
}

fn diff_mesh(
    mesh: &str,
    o: Option<&MeshState>,
    n: Option<&MeshState>,
    out: &mut Vec<Change>,
) -> Result<(), ItemError> {
    diff_map(
        o.map(|m| &m.virtual_nodes),
        n.map(|m| &m.virtual_nodes),
        |x| child_key(mesh, NODE, x),
        out,
    )?;
    diff_map(
        o.map(|m| &m.virtual_routers),
        n.map(|m| &m.virtual_routers),
        |x| child_key(mesh, ROUTER, x),
        out,
    )?;
    diff_map(
        o.map(|m| &m.virtual_gateways),
        n.map(|m| &m.virtual_gateways),
        |x| child_key(mesh, GATEWAY, x),
        out,
    )?;
    diff_map(
        o.map(|m| &m.virtual_services),
        n.map(|m| &m.virtual_services),
        |x| child_key(mesh, SERVICE, x),
        out,
    )?;
    diff_nested(
        o.map(|m| &m.routes),
        n.map(|m| &m.routes),
        |p, x| grandchild_key(mesh, ROUTER, p, ROUTE, x),
        out,
    )?;
    diff_nested(
        o.map(|m| &m.gateway_routes),
        n.map(|m| &m.gateway_routes),
        |p, x| grandchild_key(mesh, GATEWAY, p, GATEWAY_ROUTE, x),
        out,
    )
}

fn put<S: DeserializeOwned>(
    map: &mut BTreeMap<String, Resource<S>>,
    name: &str,
    key: &str,
    data: Option<&str>,
) -> Result<(), ItemError> {
    match data {
        Some(d) => {
            map.insert(name.to_string(), decode(key, d)?);
        }
        None => {
            map.remove(name);
        }
    }
    Ok(())
}

/// Applies changes in order. A deleted resource that is not there is fine (replays over a
/// state read mid-change rely on it); a resource whose mesh is not there is an error.
pub(crate) fn apply(state: &mut State, changes: &[Change]) -> Result<(), ItemError> {
    for (key, data) in changes {
        let data = data.as_deref();
        match parse(key)? {
            Key::Mesh(mesh) => match data {
                None => {
                    state.meshes.remove(&mesh);
                }
                Some(d) => {
                    let r = decode(key, d)?;
                    match state.meshes.get_mut(&mesh) {
                        Some(m) => m.mesh = r,
                        None => {
                            state.meshes.insert(mesh, MeshState::new(r));
                        }
                    }
                }
            },
            Key::Child { mesh, kind, name } => {
                let Some(m) = mesh_of(state, &mesh, key, data)? else {
                    continue;
                };
                match kind {
                    NODE => put(&mut m.virtual_nodes, &name, key, data)?,
                    SERVICE => put(&mut m.virtual_services, &name, key, data)?,
                    ROUTER => put(&mut m.virtual_routers, &name, key, data)?,
                    _ => put(&mut m.virtual_gateways, &name, key, data)?,
                }
            }
            Key::Grandchild {
                mesh,
                kind,
                parent,
                name,
            } => {
                let Some(m) = mesh_of(state, &mesh, key, data)? else {
                    continue;
                };
                if kind == ROUTE {
                    put(m.routes.entry(parent).or_default(), &name, key, data)?;
                } else {
                    put(
                        m.gateway_routes.entry(parent).or_default(),
                        &name,
                        key,
                        data,
                    )?;
                }
            }
        }
    }
    normalize(state);
    Ok(())
}

/// The mesh a change belongs to; `None` (skip) for a deletion in a mesh that is gone.
fn mesh_of<'s>(
    state: &'s mut State,
    mesh: &str,
    key: &str,
    data: Option<&str>,
) -> Result<Option<&'s mut MeshState>, ItemError> {
    match (state.meshes.get_mut(mesh), data) {
        (Some(m), _) => Ok(Some(m)),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ItemError::Orphan(key.to_string())),
    }
}

/// Empty route tables are not items: drop them so every agent holds the same state.
pub(crate) fn normalize(state: &mut State) {
    for m in state.meshes.values_mut() {
        m.routes.retain(|_, r| !r.is_empty());
        m.gateway_routes.retain(|_, r| !r.is_empty());
    }
}

/// A state from a full set of items, meshes first.
pub(crate) fn from_items(items: &BTreeMap<String, String>) -> Result<State, ItemError> {
    let mut state = State::default();
    let (meshes, rest): (Vec<Change>, Vec<Change>) = items
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .partition(|(k, _)| matches!(parse(k), Ok(Key::Mesh(_))));
    apply(&mut state, &meshes)?;
    apply(&mut state, &rest)?;
    Ok(state)
}

#[cfg(test)]
mod tests;
