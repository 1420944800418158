//! The App Mesh REST API (`/v20190125/...`): all 38 operations, body parsing with field paths, and
//! the `--resources` import / `export` pair. The rules live in [`ops`] and [`kinds`]. Reads
//! (describe, list) answer from [`Store::fresh`]: with a shared store, they see every write any
//! agent acknowledged before them.

mod error;
pub mod kind;
pub mod kinds;
pub mod ops;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UriPath, Query as UriQuery, State as AxState};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use error::Error;
use kind::Kind;
pub use kind::Quotas;
use kinds::{
    GatewayRoutes, Routes, VirtualGateways, VirtualNodes, VirtualRouters, VirtualServices,
};
pub use ops::{Account, Ops, Place, Query};

use crate::store::Store;
use trellis_model::State;

#[derive(Clone)]
struct Ctx {
    ops: Arc<Ops>,
    store: Arc<Store>,
}

type Params = HashMap<String, String>;

/// The REST router, ready to be served.
pub fn router(ops: Arc<Ops>, store: Arc<Store>) -> Router {
    let m = "/v20190125/meshes";
    let r = Router::new()
        .route(m, get(list_meshes).put(create_mesh))
        .route(
            &format!("{m}/{{mesh}}"),
            get(describe_mesh).put(update_mesh).delete(delete_mesh),
        )
        .route("/v20190125/tags", get(list_tags))
        .route("/v20190125/tag", put(tag_resource))
        .route("/v20190125/untag", put(untag_resource));
    let r = kind_routes::<VirtualNodes>(r, &format!("{m}/{{mesh}}/virtualNodes"));
    let r = kind_routes::<VirtualServices>(r, &format!("{m}/{{mesh}}/virtualServices"));
    let r = kind_routes::<VirtualRouters>(r, &format!("{m}/{{mesh}}/virtualRouters"));
    let r = kind_routes::<VirtualGateways>(r, &format!("{m}/{{mesh}}/virtualGateways"));
    let r = kind_routes::<Routes>(r, &format!("{m}/{{mesh}}/virtualRouter/{{parent}}/routes"));
    let r = kind_routes::<GatewayRoutes>(
        r,
        &format!("{m}/{{mesh}}/virtualGateway/{{parent}}/gatewayRoutes"),
    );
    r.fallback(unknown_operation).with_state(Ctx { ops, store })
}

fn kind_routes<K: Kind>(r: Router<Ctx>, collection: &str) -> Router<Ctx> {
    r.route(collection, get(list::<K>).put(create::<K>)).route(
        &format!("{collection}/{{name}}"),
        get(describe::<K>).put(update::<K>).delete(delete::<K>),
    )
}

/// Parses a JSON body; a failure names the field path (`spec.listeners[0].portMapping.port`).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return Error::BadRequest(format!("the request body is not valid JSON: {inner}"));
        }
        // serde says "missing field `x` at line 1 column 9": the rule belongs to the member itself,
        // and the position means nothing to an API client.
        let text = inner.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text);
        let parent = if path == "." { "" } else { path.as_str() };
        match text
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            Some(member) => Error::bad(
                &trellis_model::validate::join(parent, member),
                "is required",
            ),
            None if parent.is_empty() => Error::BadRequest(text.to_string()),
            None => Error::bad(parent, text),
        }
    })
}

/// Names in the URI obey the model's ResourceName rule (1–255 characters) too.
fn uri_name<'p>(p: &'p Params, key: &str, field: &str) -> Result<&'p str, Error> {
    let v = p.get(key).map(String::as_str).unwrap_or_default();
    let n = v.chars().count();
    if !(1..=255).contains(&n) {
        return Err(Error::bad(
            field,
            format!("length {n} is out of range: must be between 1 and 255"),
        ));
    }
    Ok(v)
}

fn place<'a, K: Kind>(p: &'a Params, q: &'a Query) -> Result<Place<'a>, Error> {
    let mesh = uri_name(p, "mesh", "meshName")?;
    let parent = match K::PARENT {
        Some(kind) => Some(uri_name(p, "parent", kind.name_key())?),
        None => None,
    };
    Ok(Place {
        mesh,
        parent,
        owner: q.mesh_owner.as_deref(),
    })
}

/// Runs a store write off the async worker (it fsyncs).
fn blocking<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    tokio::task::block_in_place(f)
}

fn reply(r: Result<Value, Error>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unknown_operation() -> Response {
    Error::NotFound("no App Mesh operation at this path and method".into()).into_response()
}

async fn list_meshes(AxState(c): AxState<Ctx>, UriQuery(q): UriQuery<Query>) -> Response {
    let state = c.store.fresh().await;
    reply(c.ops.list_meshes(&state, &q))
}

async fn create_mesh(AxState(c): AxState<Ctx>, body: Bytes) -> Response {
    reply(parse_body(&body).and_then(|req| blocking(|| c.ops.create_mesh(&c.store, req))))
}

async fn describe_mesh(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
) -> Response {
    let mesh = match uri_name(&p, "mesh", "meshName") {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let state = c.store.fresh().await;
    reply(c.ops.describe_mesh(&state, mesh, q.mesh_owner.as_deref()))
}

async fn update_mesh(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    body: Bytes,
) -> Response {
    reply(uri_name(&p, "mesh", "meshName").and_then(|m| {
        let req = parse_body(&body)?;
        blocking(|| c.ops.update_mesh(&c.store, m, req))
    }))
}

async fn delete_mesh(AxState(c): AxState<Ctx>, UriPath(p): UriPath<Params>) -> Response {
    reply(
        uri_name(&p, "mesh", "meshName").and_then(|m| blocking(|| c.ops.delete_mesh(&c.store, m))),
    )
}

async fn list<K: Kind>(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
) -> Response {
    let at = match place::<K>(&p, &q) {
        Ok(at) => at,
        Err(e) => return e.into_response(),
    };
    let state = c.store.fresh().await;
    reply(c.ops.list::<K>(&state, at, &q))
}

async fn create<K: Kind>(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
    body: Bytes,
) -> Response {
    reply(place::<K>(&p, &q).and_then(|at| {
        let req: K::Create = parse_body(&body)?;
        blocking(|| c.ops.create::<K>(&c.store, at, req))
    }))
}

async fn describe<K: Kind>(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
) -> Response {
    let (at, name) =
        match place::<K>(&p, &q).and_then(|at| Ok((at, uri_name(&p, "name", K::NAME_KEY)?))) {
            Ok(v) => v,
            Err(e) => return e.into_response(),
        };
    let state = c.store.fresh().await;
    reply(c.ops.describe::<K>(&state, at, name))
}

async fn update<K: Kind>(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
    body: Bytes,
) -> Response {
    reply(place::<K>(&p, &q).and_then(|at| {
        let name = uri_name(&p, "name", K::NAME_KEY)?;
        let req: K::Update = parse_body(&body)?;
        blocking(|| c.ops.update::<K>(&c.store, at, name, req))
    }))
}

async fn delete<K: Kind>(
    AxState(c): AxState<Ctx>,
    UriPath(p): UriPath<Params>,
    UriQuery(q): UriQuery<Query>,
) -> Response {
    reply(place::<K>(&p, &q).and_then(|at| {
        let name = uri_name(&p, "name", K::NAME_KEY)?;
        blocking(|| c.ops.delete::<K>(&c.store, at, name))
    }))
}

async fn list_tags(AxState(c): AxState<Ctx>, UriQuery(q): UriQuery<Query>) -> Response {
    let state = c.store.fresh().await;
    reply(c.ops.list_tags(&state, &q))
}

async fn tag_resource(
    AxState(c): AxState<Ctx>,
    UriQuery(q): UriQuery<Query>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| blocking(|| c.ops.tag_resource(&c.store, &q, req))))
}

async fn untag_resource(
    AxState(c): AxState<Ctx>,
    UriQuery(q): UriQuery<Query>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| blocking(|| c.ops.untag_resource(&c.store, &q, req))))
}

// === --resources and export ===

/// The kinds in dependency order: what a resource references is applied before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FileKind {
    Mesh,
    VirtualNode,
    VirtualRouter,
    VirtualGateway,
    VirtualService,
    Route,
    GatewayRoute,
}

impl FileKind {
    /// Which create operation a `--cli-input-json` body is for, from the name keys present.
    fn of(item: &Value) -> Option<FileKind> {
        let has = |k: &str| item.get(k).is_some();
        Some(if has("gatewayRouteName") {
            FileKind::GatewayRoute
        } else if has("routeName") {
            FileKind::Route
        } else if has("virtualGatewayName") {
            FileKind::VirtualGateway
        } else if has("virtualRouterName") {
            FileKind::VirtualRouter
        } else if has("virtualNodeName") {
            FileKind::VirtualNode
        } else if has("virtualServiceName") {
            FileKind::VirtualService
        } else if has("meshName") {
            FileKind::Mesh
        } else {
            return None;
        })
    }
}

/// Applies a `--resources` file: a JSON list of create-request bodies in the form
/// `aws appmesh create-* --cli-input-json` takes (`meshName`, the parent's name for routes and
/// gateway routes, the resource's name, `spec`, `tags`). Idempotent: an existing resource with a
/// different spec is updated, an identical one is left alone. The file's order does not matter.
pub fn apply_resources_file(ops: &Ops, store: &Store, path: &Path) -> Result<usize, Error> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::BadRequest(format!(
            "cannot read resources file {}: {e}",
            path.display()
        ))
    })?;
    let items: Vec<Value> =
        parse_body(&bytes).map_err(|e| Error::BadRequest(format!("{}: {e}", path.display())))?;
    let mut ordered = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let kind = FileKind::of(item).ok_or_else(|| {
            Error::bad(
                &format!("{}[{i}]", path.display()),
                "names no resource: expected meshName and a resource name",
            )
        })?;
        ordered.push((kind, i, item));
    }
    ordered.sort_by_key(|(kind, i, _)| (*kind, *i));
    // The embedded store applies the whole file to a copy and commits it once; the shared store
    // commits item by item (its transactions are bounded).
    let scratch = store.scratch();
    let target = scratch.as_ref().unwrap_or(store);
    for (kind, i, item) in &ordered {
        let at_item = |e: Error| match e {
            Error::BadRequest(m) => Error::BadRequest(format!("{}[{i}]: {m}", path.display())),
            other => other,
        };
        apply_item(ops, target, *kind, item).map_err(at_item)?;
    }
    if let Some(scratch) = &scratch {
        store.commit_scratch(scratch)?;
    }
    Ok(ordered.len())
}

fn apply_item(ops: &Ops, store: &Store, kind: FileKind, item: &Value) -> Result<(), Error> {
    let bytes = serde_json::to_vec(item).map_err(|e| Error::BadRequest(e.to_string()))?;
    let text = |k: &str| {
        item.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad(k, "is required"))
    };
    let mesh = text("meshName")?;
    // Another agent may create the same resource from the same file at the same time: a create
    // that meets it becomes an update.
    if kind == FileKind::Mesh {
        if !store.current().meshes.contains_key(mesh) {
            match ops.create_mesh(store, parse_body(&bytes)?) {
                Err(Error::Conflict(_)) => {}
                other => return other.map(drop),
            }
        }
        ops.update_mesh(store, mesh, parse_body(&bytes)?)?;
        return Ok(());
    }
    fn upsert<K: Kind>(
        ops: &Ops,
        store: &Store,
        at: Place<'_>,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), Error> {
        // The state is let go before the write, so a scratch store updates it in place.
        let exists = {
            let state = store.current();
            ops.mesh(&state, at.mesh, None)
                .ok()
                .and_then(|m| K::map(m, at.mesh, at.parent).ok())
                .is_some_and(|map| map.contains_key(name))
        };
        if !exists {
            match ops.create::<K>(store, at, parse_body(bytes)?) {
                Err(Error::Conflict(_)) => {}
                other => return other.map(drop),
            }
        }
        ops.update::<K>(store, at, name, parse_body(bytes)?)?;
        Ok(())
    }
    let top = Place {
        mesh,
        parent: None,
        owner: None,
    };
    match kind {
        FileKind::Mesh => Ok(()),
        FileKind::VirtualNode => {
            upsert::<VirtualNodes>(ops, store, top, text("virtualNodeName")?, &bytes)
        }
        FileKind::VirtualService => {
            upsert::<VirtualServices>(ops, store, top, text("virtualServiceName")?, &bytes)
        }
        FileKind::VirtualRouter => {
            upsert::<VirtualRouters>(ops, store, top, text("virtualRouterName")?, &bytes)
        }
        FileKind::VirtualGateway => {
            upsert::<VirtualGateways>(ops, store, top, text("virtualGatewayName")?, &bytes)
        }
        FileKind::Route => {
            let at = Place {
                parent: Some(text("virtualRouterName")?),
                ..top
            };
            upsert::<Routes>(ops, store, at, text("routeName")?, &bytes)
        }
        FileKind::GatewayRoute => {
            let at = Place {
                parent: Some(text("virtualGatewayName")?),
                ..top
            };
            upsert::<GatewayRoutes>(ops, store, at, text("gatewayRouteName")?, &bytes)
        }
    }
}

/// Every resource of `meshes` (all when empty) as create-request bodies that `--resources`
/// re-imports to the same specs and tags, in dependency order.
pub fn export(state: &State, meshes: &[String]) -> Value {
    let mut out = Vec::new();
    for (name, m) in &state.meshes {
        if !meshes.is_empty() && !meshes.contains(name) {
            continue;
        }
        let item = |extra: Value, spec: Value, tags: &Vec<trellis_model::TagRef>| {
            let mut v = json!({"meshName": name});
            if let Value::Object(e) = extra {
                for (k, x) in e {
                    v[k] = x;
                }
            }
            v["spec"] = spec;
            if !tags.is_empty() {
                v["tags"] = json!(tags);
            }
            v
        };
        let spec = |s: &dyn erased::Spec| s.to_json();
        out.push(item(json!({}), spec(&m.mesh.spec), &m.mesh.tags));
        for (n, r) in &m.virtual_nodes {
            out.push(item(json!({"virtualNodeName": n}), spec(&r.spec), &r.tags));
        }
        for (n, r) in &m.virtual_routers {
            out.push(item(
                json!({"virtualRouterName": n}),
                spec(&r.spec),
                &r.tags,
            ));
        }
        for (n, r) in &m.virtual_gateways {
            out.push(item(
                json!({"virtualGatewayName": n}),
                spec(&r.spec),
                &r.tags,
            ));
        }
        for (n, r) in &m.virtual_services {
            out.push(item(
                json!({"virtualServiceName": n}),
                spec(&r.spec),
                &r.tags,
            ));
        }
        for (router, routes) in &m.routes {
            for (n, r) in routes {
                out.push(item(
                    json!({"virtualRouterName": router, "routeName": n}),
                    spec(&r.spec),
                    &r.tags,
                ));
            }
        }
        for (gateway, routes) in &m.gateway_routes {
            for (n, r) in routes {
                out.push(item(
                    json!({"virtualGatewayName": gateway, "gatewayRouteName": n}),
                    spec(&r.spec),
                    &r.tags,
                ));
            }
        }
    }
    Value::Array(out)
}

mod erased {
    /// Any spec, as JSON (specs always serialize).
    pub(super) trait Spec {
        fn to_json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Spec for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::test_helpers::TempDir;

    fn ops() -> Ops {
        Ops {
            account: Account {
                account_id: "000000000000".into(),
                region: "us-east-1".into(),
            },
            quotas: Quotas::default(),
        }
    }

    fn write_file(path: &Path, items: &[Value]) {
        std::fs::write(path, serde_json::to_vec(items).unwrap()).unwrap();
    }

    #[test]
    fn a_resources_file_is_committed_as_one_write_and_a_rejected_item_leaves_nothing() {
        let dir = TempDir::new("resources-file");
        let store = Store::open(&dir.path().join("data")).unwrap();
        let file = dir.path().join("resources.json");
        let mut items = vec![json!({"meshName": "m"})];
        for i in 0..50 {
            items.push(json!({"meshName": "m", "virtualNodeName": format!("n{i}"), "spec": {}}));
        }
        write_file(&file, &items);
        let before = store.current().generation;
        assert_eq!(apply_resources_file(&ops(), &store, &file).unwrap(), 51);
        assert_eq!(store.current().generation, before + 1, "one commit");
        assert_eq!(store.current().meshes["m"].virtual_nodes.len(), 50);
        drop(store);
        let store = Store::open(&dir.path().join("data")).unwrap();
        assert_eq!(
            store.current().meshes["m"].virtual_nodes.len(),
            50,
            "persisted"
        );

        // Applying it again changes nothing; a file with a bad item changes nothing either, not
        // even the items before it (the new mesh sorts first).
        let generation = store.current().generation;
        apply_resources_file(&ops(), &store, &file).unwrap();
        assert_eq!(store.current().generation, generation);
        items.push(json!({"meshName": "m2"}));
        items.push(json!({"meshName": "m", "virtualNodeName": "bad", "spec": {
            "listeners": [{"portMapping": {"port": 0, "protocol": "http"}}]}}));
        write_file(&file, &items);
        let err = apply_resources_file(&ops(), &store, &file).unwrap_err();
        assert!(err.to_string().contains("[52]"), "names the item: {err}");
        assert_eq!(store.current().generation, generation);
        assert!(!store.current().meshes.contains_key("m2"));
    }
}
