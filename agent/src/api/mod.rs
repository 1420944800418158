//! The App Mesh REST API (`/v20190125/...`): routes, body parsing with field paths, and the
//! start-up `--resources` loader. The rules live in [`ops`].

mod error;
pub mod ops;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UriPath, Query, State as AxState};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use error::Error;
pub use ops::{Account, Ops, Quotas};

use crate::store::Store;

#[derive(Clone)]
struct Ctx {
    ops: Arc<Ops>,
    store: Arc<Store>,
}

/// The REST router, ready to be served.
pub fn router(ops: Arc<Ops>, store: Arc<Store>) -> Router {
    let prefix = "/v20190125/meshes";
    Router::new()
        .route(prefix, get(list_meshes).put(create_mesh))
        .route(
            &format!("{prefix}/{{mesh}}"),
            get(describe_mesh).put(update_mesh).delete(delete_mesh),
        )
        .route(
            &format!("{prefix}/{{mesh}}/virtualNodes"),
            get(list_virtual_nodes).put(create_virtual_node),
        )
        .route(
            &format!("{prefix}/{{mesh}}/virtualNodes/{{name}}"),
            get(describe_virtual_node)
                .put(update_virtual_node)
                .delete(delete_virtual_node),
        )
        .route(
            &format!("{prefix}/{{mesh}}/virtualServices"),
            get(list_virtual_services).put(create_virtual_service),
        )
        .route(
            &format!("{prefix}/{{mesh}}/virtualServices/{{name}}"),
            get(describe_virtual_service)
                .put(update_virtual_service)
                .delete(delete_virtual_service),
        )
        .fallback(unknown_operation)
        .with_state(Ctx { ops, store })
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
            Error::BadRequest(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            Error::BadRequest(inner.to_string())
        } else {
            Error::bad(&path, inner)
        }
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

async fn list_meshes(AxState(c): AxState<Ctx>, Query(page): Query<ops::Page>) -> Response {
    reply(c.ops.list_meshes(&c.store.current(), &page))
}

async fn create_mesh(AxState(c): AxState<Ctx>, body: Bytes) -> Response {
    reply(parse_body(&body).and_then(|req| blocking(|| c.ops.create_mesh(&c.store, req))))
}

async fn describe_mesh(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    Query(page): Query<ops::Page>,
) -> Response {
    reply(
        c.ops
            .describe_mesh(&c.store.current(), &mesh, page.mesh_owner.as_deref()),
    )
}

async fn update_mesh(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| blocking(|| c.ops.update_mesh(&c.store, &mesh, req))))
}

async fn delete_mesh(AxState(c): AxState<Ctx>, UriPath(mesh): UriPath<String>) -> Response {
    reply(blocking(|| c.ops.delete_mesh(&c.store, &mesh)))
}

async fn list_virtual_nodes(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    Query(page): Query<ops::Page>,
) -> Response {
    reply(c.ops.list_virtual_nodes(&c.store.current(), &mesh, &page))
}

async fn create_virtual_node(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    Query(q): Query<ops::Page>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| {
        blocking(|| {
            c.ops
                .create_virtual_node(&c.store, &mesh, q.mesh_owner.as_deref(), req)
        })
    }))
}

async fn describe_virtual_node(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
) -> Response {
    reply(
        c.ops
            .describe_virtual_node(&c.store.current(), &mesh, q.mesh_owner.as_deref(), &name),
    )
}

async fn update_virtual_node(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| {
        blocking(|| {
            c.ops
                .update_virtual_node(&c.store, &mesh, q.mesh_owner.as_deref(), &name, req)
        })
    }))
}

async fn delete_virtual_node(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
) -> Response {
    reply(blocking(|| {
        c.ops
            .delete_virtual_node(&c.store, &mesh, q.mesh_owner.as_deref(), &name)
    }))
}

async fn list_virtual_services(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    Query(page): Query<ops::Page>,
) -> Response {
    reply(
        c.ops
            .list_virtual_services(&c.store.current(), &mesh, &page),
    )
}

async fn create_virtual_service(
    AxState(c): AxState<Ctx>,
    UriPath(mesh): UriPath<String>,
    Query(q): Query<ops::Page>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| {
        blocking(|| {
            c.ops
                .create_virtual_service(&c.store, &mesh, q.mesh_owner.as_deref(), req)
        })
    }))
}

async fn describe_virtual_service(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
) -> Response {
    reply(
        c.ops
            .describe_virtual_service(&c.store.current(), &mesh, q.mesh_owner.as_deref(), &name),
    )
}

async fn update_virtual_service(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
    body: Bytes,
) -> Response {
    reply(parse_body(&body).and_then(|req| {
        blocking(|| {
            c.ops
                .update_virtual_service(&c.store, &mesh, q.mesh_owner.as_deref(), &name, req)
        })
    }))
}

async fn delete_virtual_service(
    AxState(c): AxState<Ctx>,
    UriPath((mesh, name)): UriPath<(String, String)>,
    Query(q): Query<ops::Page>,
) -> Response {
    reply(blocking(|| {
        c.ops
            .delete_virtual_service(&c.store, &mesh, q.mesh_owner.as_deref(), &name)
    }))
}

/// Applies a `--resources` file: a JSON list of create-request bodies in the form
/// `aws appmesh create-* --cli-input-json` takes. Idempotent: an existing resource with a different
/// spec is updated, an identical one is left alone. Meshes go first, then nodes, then services, so
/// the file's order does not matter for references.
pub fn apply_resources_file(ops: &Ops, store: &Store, path: &Path) -> Result<usize, Error> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::BadRequest(format!(
            "cannot read resources file {}: {e}",
            path.display()
        ))
    })?;
    let items: Vec<Value> =
        parse_body(&bytes).map_err(|e| Error::BadRequest(format!("{}: {e}", path.display())))?;
    let mut ordered: Vec<(u8, usize, &Value)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rank = if item.get("virtualNodeName").is_some() {
            1
        } else if item.get("virtualServiceName").is_some() {
            2
        } else if item.get("meshName").is_some() {
            0
        } else {
            return Err(Error::bad(
                &format!("[{i}]"),
                "names no resource: expected meshName, and virtualNodeName or virtualServiceName",
            ));
        };
        ordered.push((rank, i, item));
    }
    ordered.sort_by_key(|(rank, i, _)| (*rank, *i));
    let mut applied = 0;
    for (rank, i, item) in ordered {
        let at = |e: Error| match e {
            Error::BadRequest(m) => Error::BadRequest(format!("{}[{i}]: {m}", path.display())),
            other => other,
        };
        let bytes = serde_json::to_vec(item).map_err(|e| Error::BadRequest(e.to_string()))?;
        let mesh = item
            .get("meshName")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad(&format!("[{i}].meshName"), "is required"))
            .map_err(at)?
            .to_string();
        let state = store.current();
        let result = match rank {
            0 => {
                let req: ops::CreateMesh = parse_body(&bytes).map_err(at)?;
                if state.meshes.contains_key(&mesh) {
                    ops.update_mesh(
                        store,
                        &mesh,
                        ops::UpdateMesh {
                            spec: req.spec,
                            client_token: None,
                        },
                    )
                } else {
                    ops.create_mesh(store, req)
                }
            }
            1 => {
                let req: ops::CreateVirtualNode = parse_body(&bytes).map_err(at)?;
                let exists = state
                    .meshes
                    .get(&mesh)
                    .is_some_and(|m| m.virtual_nodes.contains_key(&req.virtual_node_name));
                if exists {
                    let name = req.virtual_node_name.clone();
                    let upd = ops::UpdateVirtualNode {
                        spec: req.spec,
                        client_token: None,
                    };
                    ops.update_virtual_node(store, &mesh, None, &name, upd)
                } else {
                    ops.create_virtual_node(store, &mesh, None, req)
                }
            }
            _ => {
                let req: ops::CreateVirtualService = parse_body(&bytes).map_err(at)?;
                let exists = state
                    .meshes
                    .get(&mesh)
                    .is_some_and(|m| m.virtual_services.contains_key(&req.virtual_service_name));
                if exists {
                    let name = req.virtual_service_name.clone();
                    let upd = ops::UpdateVirtualService {
                        spec: req.spec,
                        client_token: None,
                    };
                    ops.update_virtual_service(store, &mesh, None, &name, upd)
                } else {
                    ops.create_virtual_service(store, &mesh, None, req)
                }
            }
        };
        result.map_err(at)?;
        applied += 1;
    }
    Ok(applied)
}
