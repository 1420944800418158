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
mod tests {
    use super::*;
    use crate::test_helpers::{mesh_resource, resource};
    use trellis_model::{RouteSpec, VirtualNodeSpec};

    fn sample() -> State {
        let mut s = State::default();
        let mut m = mesh_resource("a/b%c");
        m.virtual_nodes
            .insert("n/1".into(), resource("n", VirtualNodeSpec::default()));
        let mut route = resource("x", RouteSpec::default());
        route.client_token = Some("t".into());
        m.routes
            .entry("r".into())
            .or_default()
            .insert("x".into(), route);
        s.meshes.insert("a/b%c".into(), m);
        s.meshes.insert("z".into(), mesh_resource("z"));
        s
    }

    #[test]
    fn items_rebuild_the_same_state_even_with_slashes_and_percents_in_names() {
        let s = sample();
        let it = items(&s).unwrap();
        assert!(
            it.contains_key("mesh/a%2Fb%25c/virtualNode/n%2F1"),
            "{it:?}"
        );
        assert!(it.contains_key("mesh/a%2Fb%25c/virtualRouter/r/route/x"));
        assert_eq!(from_items(&it).unwrap(), s);
    }

    #[test]
    fn a_diff_applied_to_the_old_state_gives_the_new_one() {
        let old = sample();
        let mut new = old.clone();
        new.meshes.remove("z");
        new.meshes.insert("y".into(), mesh_resource("y"));
        let m = new.meshes.get_mut("a/b%c").unwrap();
        m.routes.clear();
        m.virtual_nodes.get_mut("n/1").unwrap().metadata.version = 2;
        let changes = diff(&old, &new).unwrap();
        assert_eq!(changes.len(), 4, "{changes:?}");
        let mut replayed = old.clone();
        apply(&mut replayed, &changes).unwrap();
        assert_eq!(replayed, new);
        assert!(diff(&new, &new).unwrap().is_empty());
    }

    #[test]
    fn deleting_a_mesh_with_its_last_resources_deletes_children_before_the_mesh() {
        let old = sample();
        let mut new = old.clone();
        new.meshes.remove("a/b%c");
        let changes = diff(&old, &new).unwrap();
        assert_eq!(changes.last().unwrap().0, "mesh/a%2Fb%25c");
        let mut replayed = old;
        apply(&mut replayed, &changes).unwrap();
        assert_eq!(replayed, new);
    }

    #[test]
    fn an_empty_route_table_is_no_change_and_is_normalized_away() {
        let old = sample();
        let mut new = old.clone();
        new.meshes
            .get_mut("z")
            .unwrap()
            .routes
            .insert("r".into(), BTreeMap::new());
        assert!(diff(&old, &new).unwrap().is_empty());
        normalize(&mut new);
        assert_eq!(new, old);
    }

    #[test]
    fn a_resource_of_a_missing_mesh_or_a_bad_key_is_an_error_naming_the_item() {
        let mut s = State::default();
        let orphan = vec![("mesh/q/virtualNode/n".to_string(), Some("{}".to_string()))];
        assert!(
            apply(&mut s, &orphan)
                .unwrap_err()
                .to_string()
                .contains("mesh/q")
        );
        let bad = vec![("mesh/q/route/n".to_string(), None)];
        assert!(matches!(apply(&mut s, &bad), Err(ItemError::BadKey(_))));
    }
}
