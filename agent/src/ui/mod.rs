//! Seeing the mesh: `GET /ui` (one page, embedded in the binary, that draws the mesh and its live
//! traffic), and the JSON it and `trellis-agent explain` read: `POST /trellis/v1/explain`,
//! `GET /trellis/v1/topology?mesh=M`, `GET /trellis/v1/load`.
//!
//! Authentication is the API's own (`auth::http`): every JSON endpoint is SigV4-signed and
//! authorised (`trellis:Explain` on the proxy's ARN, `trellis:ReadTopology` on the mesh's,
//! `trellis:ReadMetrics` for all load figures). A browser cannot sign by itself, so the page does:
//! it signs each of its requests with WebCrypto from credentials the operator pastes into it (an
//! access key, or the session credentials `trellis-agent credentials` prints), kept in the tab's
//! `sessionStorage` only. The page itself holds no mesh data and no secret, so it is served to
//! anyone, like `/healthz`; every byte of the mesh it shows comes through a signed request. That
//! gives the API's guarantees unchanged (no cookie, so no cross-site request can ride on a
//! session; nothing to revoke but the key) at the cost of pasting credentials once per tab.
//! WebCrypto only runs in a secure context: over TLS (`--api-tls-cert`), or on loopback (an SSH
//! tunnel), which is also where such credentials belong.

mod topology;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use trellis_model::{ProxyIdentity, ProxyKind};

use crate::api::{Error, parse_body};
use crate::lrs::Lrs;
use crate::xds::Published;

pub use topology::Topology;

pub const PAGE_PATH: &str = "/ui";
pub const EXPLAIN_PATH: &str = "/trellis/v1/explain";
pub const TOPOLOGY_PATH: &str = "/trellis/v1/topology";
pub const LOAD_PATH: &str = "/trellis/v1/load";

/// The page, with `{{REGION}}` and `{{AUTH}}` filled in when served.
const PAGE: &str = include_str!("index.html");

/// What `POST /trellis/v1/explain` takes (and `trellis-agent explain` sends).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExplainBody {
    pub mesh_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_gateway_name: Option<String>,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `name: value`, as curl's `-H`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// A caller reaching the virtual node, instead of its app calling out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inbound: bool,
}

impl ExplainBody {
    /// The proxy it names, and which of the two name fields did (for errors).
    pub fn proxy(&self) -> Result<ProxyIdentity, Error> {
        let (kind, name) = match (&self.virtual_node_name, &self.virtual_gateway_name) {
            (Some(n), None) => (ProxyKind::VirtualNode, n),
            (None, Some(g)) => (ProxyKind::VirtualGateway, g),
            _ => {
                return Err(Error::BadRequest(
                    "virtualNodeName, virtualGatewayName: give exactly one".into(),
                ));
            }
        };
        if self.inbound && kind == ProxyKind::VirtualGateway {
            return Err(Error::BadRequest(
                "inbound: only a virtual node has an inbound side (a gateway is always entered from outside)".into(),
            ));
        }
        Ok(ProxyIdentity {
            mesh: self.mesh_name.clone(),
            mesh_owner: None,
            kind,
            name: name.clone(),
        })
    }

    /// The request it describes.
    pub fn request(&self) -> Result<trellis_explain::Request, Error> {
        trellis_explain::Request::parse(&self.url, self.method.as_deref(), &self.headers).map_err(
            |e| {
                let field = match e {
                    trellis_explain::Error::Url { .. } => "url",
                    trellis_explain::Error::Header { .. } => "headers",
                    trellis_explain::Error::Method(_) => "method",
                };
                Error::BadRequest(format!("{field}: {e}"))
            },
        )
    }
}

/// Explains `body` against a state and endpoints: what both the endpoint and offline
/// `trellis-agent explain` run.
pub fn explain(
    state: &trellis_model::State,
    endpoints: &trellis_translate::Endpoints,
    body: &ExplainBody,
) -> Result<trellis_explain::Explanation, Error> {
    let who = body.proxy()?;
    let req = body.request()?;
    let resources = trellis_translate::translate(state, &who, endpoints)
        .map_err(|e| Error::NotFound(e.to_string()))?;
    let direction = if body.inbound {
        trellis_explain::Direction::Inbound
    } else {
        trellis_explain::Direction::Outbound
    };
    Ok(trellis_explain::explain(
        state, &who, &resources, &req, direction,
    ))
}

#[derive(Clone)]
struct Ctx {
    published: watch::Receiver<Published>,
    lrs: Arc<Lrs>,
    page: Arc<(String, String)>,
}

/// The page and its endpoints. `region` is the agent's (the page signs for it); `auth` whether
/// requests must be signed.
pub fn router(
    published: watch::Receiver<Published>,
    lrs: Arc<Lrs>,
    region: &str,
    auth: bool,
) -> Router {
    let html = PAGE
        .replace("{{REGION}}", region)
        .replace("{{AUTH}}", if auth { "on" } else { "off" });
    let csp = content_security_policy(&html);
    Router::new()
        .route(PAGE_PATH, get(page))
        .route(EXPLAIN_PATH, post(explain_endpoint))
        .route(TOPOLOGY_PATH, get(topology_endpoint))
        .route(LOAD_PATH, get(load_endpoint))
        .with_state(Ctx {
            published,
            lrs,
            page: Arc::new((html, csp)),
        })
}

/// Only the page's own inline script and style run, it talks only to this origin, and nothing
/// may frame it.
fn content_security_policy(html: &str) -> String {
    let hash = |tag: &str| {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        html.split_once(&open)
            .and_then(|(_, rest)| rest.split_once(&close))
            .map(|(body, _)| {
                base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
            })
            .unwrap_or_default()
    };
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

async fn page(State(c): State<Ctx>) -> Response {
    let mut resp = (StatusCode::OK, c.page.0.clone()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&c.page.1) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn explain_endpoint(State(c): State<Ctx>, body: Bytes) -> Response {
    let body: ExplainBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let p = c.published.borrow().clone();
    match explain(&p.state, &p.endpoints, &body) {
        Ok(e) => axum::Json(e).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct MeshQuery {
    mesh: Option<String>,
}

async fn topology_endpoint(State(c): State<Ctx>, Query(q): Query<MeshQuery>) -> Response {
    let Some(mesh) = q.mesh else {
        return Error::BadRequest("mesh: the query parameter is required".into()).into_response();
    };
    let state = c.published.borrow().state.clone();
    match topology::build(&state, &mesh, &c.lrs.view()) {
        Some(t) => axum::Json(t).into_response(),
        None => Error::NotFound(format!("mesh {mesh} not found")).into_response(),
    }
}

async fn load_endpoint(State(c): State<Ctx>) -> Response {
    axum::Json(c.lrs.view()).into_response()
}

#[cfg(test)]
mod tests;
