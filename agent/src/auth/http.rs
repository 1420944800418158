//! The HTTP side: a middleware in front of every route (request id, signature, policy, audit),
//! the credential exchange endpoints, and what a connection tells about its peer.
//!
//! A bearer token (a metrics scraper's, from the auth file) authenticates `GET /metrics` and
//! nothing else, over TLS or from loopback only.
//!
//! Open without a signature: `/healthz`, `/readyz` (container and load balancer health checks),
//! the credential exchange (`/trellis/v1/sts`, `/trellis/v1/credentials`), whose request is its
//! own proof, and the topology page `/ui` (code only: it signs its own data requests). Trellis's
//! endpoints need their `trellis:` actions (`operation::trellis`); every App Mesh operation its
//! `appmesh:` action on its resources.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use super::audit::{Outcome, Record};
use super::identity::Principal;
use super::operation::{self, Operation};
use super::sts::Proof;
use super::{Auth, Refusal, sigv4, unix};
use crate::tls::TlsListener;

pub const STS_PATH: &str = "/trellis/v1/sts";
pub const CREDENTIALS_PATH: &str = "/trellis/v1/credentials";
/// App Mesh request bodies are small; a larger one is refused before it is hashed.
const MAX_BODY: usize = 1 << 20;
/// A signed `GetCallerIdentity` is a few kilobytes.
const MAX_PROOF: usize = 64 * 1024;
/// The operation name audit lines use for the credential exchange.
const GET_CREDENTIALS: &str = "GetCredentials";

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
}

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Conn {
            peer: *stream.remote_addr(),
            tls: false,
        }
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Conn {
            peer: *stream.remote_addr(),
            tls: true,
        }
    }
}

/// The token of an `Authorization: Bearer …` header (a scraper's); SigV4 uses another scheme.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The credential exchange's routes.
pub fn routes(auth: Arc<Auth>) -> Router {
    Router::new()
        .route(STS_PATH, get(sts_target))
        .route(CREDENTIALS_PATH, axum::routing::post(credentials))
        .with_state(auth)
}

/// The middleware: every response gets an `x-amzn-RequestId`; every request but the open ones
/// is authenticated and authorised, and mutations and refusals are audited.
pub async fn layer(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let path = req.uri().path();
    // The topology page holds no mesh data and no secret; what it shows comes from requests it
    // signs itself (ui/mod.rs).
    let open = matches!(
        path,
        "/healthz" | "/readyz" | STS_PATH | CREDENTIALS_PATH | crate::ui::PAGE_PATH
    );
    let mut resp = if open {
        let mut req = req;
        req.extensions_mut().insert(RequestId(request_id.clone()));
        next.run(req).await
    } else {
        guard(&auth, req, next, &request_id).await
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-amzn-RequestId", v);
    }
    resp
}

#[derive(Debug, Clone)]
struct RequestId(String);

async fn guard(auth: &Auth, req: Request, next: Next, request_id: &str) -> Response {
    let conn = req.extensions().get::<ConnectInfo<Conn>>().map(|c| c.0);
    let source = conn.map(|c| c.peer.ip().to_string());
    let protected = conn.is_some_and(|c| c.tls || c.peer.ip().is_loopback());
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return Refusal::BadRequest(format!(
                "the request body is unreadable or larger than {MAX_BODY} bytes"
            ))
            .into_response();
        }
    };
    let sreq = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        body: &body,
    };
    let op = operation::trellis(sreq.path, sreq.query, &body, &auth.scope())
        .or_else(|| operation::appmesh(sreq.method, sreq.path, sreq.query, &body, &auth.scope()));
    let now = SystemTime::now();
    let record = |principal: Option<String>,
                  caller: Option<String>,
                  outcome: Outcome,
                  status: u16,
                  error_code: Option<String>| Record {
        time: sigv4::iso8601(unix(now)),
        request_id: request_id.to_string(),
        principal,
        caller,
        operation: op.as_ref().map(|o| o.name).unwrap_or("Unknown").to_string(),
        resource: op.as_ref().and_then(|o| o.resources.first().cloned()),
        resources: op.as_ref().map(|o| o.resources.clone()).unwrap_or_default(),
        outcome,
        status,
        error_code,
        source_ip: source.clone(),
    };
    let authenticated = match bearer(&parts.headers) {
        Some(token) => auth
            .authenticate_bearer(token, sreq.method, sreq.path, protected)
            .map_err(|r| (r, None)),
        None => auth.authenticate(&sreq, now).await,
    };
    let who = match authenticated {
        Ok(who) => who,
        Err((refusal, claimed)) => {
            auth.metrics.refusal(&refusal);
            let r = record(
                claimed,
                None,
                refusal.outcome(),
                refusal.status().as_u16(),
                Some(refusal.code().into()),
            );
            auth.record(r).await;
            return refusal.into_response();
        }
    };
    let (principal, caller) = match &who.principal {
        Principal::Anonymous => (None, None),
        Principal::Role { caller, .. } => {
            (Some(who.principal.name().to_string()), Some(caller.clone()))
        }
        p => (Some(p.name().to_string()), None),
    };
    if let Some(Err(refusal)) = op.as_ref().map(|op| auth.authorize(&who, op)) {
        auth.metrics.refusal(&refusal);
        let r = record(
            principal,
            caller,
            refusal.outcome(),
            refusal.status().as_u16(),
            Some(refusal.code().into()),
        );
        auth.record(r).await;
        return refusal.into_response();
    }
    let mut req = Request::from_parts(parts, Body::from(body));
    req.extensions_mut()
        .insert(RequestId(request_id.to_string()));
    let resp = next.run(req).await;
    if op.as_ref().is_some_and(|o: &Operation| o.mutating) {
        let status = resp.status().as_u16();
        let error_code = resp
            .headers()
            .get("x-amzn-ErrorType")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let outcome = if status < 400 {
            Outcome::Allowed
        } else {
            Outcome::Failed
        };
        auth.record(record(principal, caller, outcome, status, error_code))
            .await;
    }
    resp
}

/// `GET /trellis/v1/sts`: what `trellis-agent credentials` signs for.
async fn sts_target(State(auth): State<Arc<Auth>>) -> Response {
    match &auth.sts {
        Some(sts) => axum::Json(sts.target()).into_response(),
        None => not_enforced(),
    }
}

fn not_enforced() -> Response {
    Refusal::BadRequest(
        "this agent runs without --api-auth: it issues no credentials (sign with any key)".into(),
    )
    .into_response()
}

/// `POST /trellis/v1/credentials`: a signed `sts:GetCallerIdentity` in, session credentials out
/// (credential_process JSON).
async fn credentials(State(auth): State<Arc<Auth>>, req: Request) -> Response {
    let (Some(sts), Some(sessions)) = (&auth.sts, &auth.sessions) else {
        return not_enforced();
    };
    let now = SystemTime::now();
    let conn = req.extensions().get::<ConnectInfo<Conn>>().map(|c| c.0);
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let Ok(body) = axum::body::to_bytes(req.into_body(), MAX_PROOF).await else {
        return Refusal::BadRequest(format!("the proof is larger than {MAX_PROOF} bytes"))
            .into_response();
    };
    let mut record = Record {
        time: sigv4::iso8601(unix(now)),
        request_id,
        principal: None,
        caller: None,
        operation: GET_CREDENTIALS.into(),
        resource: None,
        resources: vec![],
        outcome: Outcome::Allowed,
        status: 200,
        error_code: None,
        source_ip: conn.map(|c| c.peer.ip().to_string()),
    };
    let result = async {
        // The answer holds a secret: never in clear text across a network.
        if let Some(c) = conn
            && !c.tls
            && !c.peer.ip().is_loopback()
        {
            return Err(Refusal::AccessDenied(
                "credentials are handed out over TLS only (start the agent with --api-tls-cert and --api-tls-key)".into(),
            ));
        }
        let proof: Proof = serde_json::from_slice(&body).map_err(|e| {
            Refusal::BadRequest(format!(
                "the body must be {{\"headers\": {{…}}, \"body\": \"…\"}}: {e}"
            ))
        })?;
        let caller = sts.caller(&proof, unix(now)).await?;
        record.caller = Some(caller.clone());
        let file = auth.current().ok_or_else(|| {
            Refusal::BadRequest("this agent runs without --api-auth".into())
        })?;
        let role = file.role_for_caller(&caller).ok_or_else(|| {
            Refusal::AccessDenied(format!(
                "no role of the auth file matches {caller}: add its role ARN to \"roles\""
            ))
        })?;
        record.principal = Some(role.arn.clone());
        record.resource = Some(role.arn.clone());
        record.resources = vec![role.arn.clone()];
        sessions.issue(&role.arn, &caller, unix(now)).await
    }
    .await;
    match result {
        Ok(issued) => {
            auth.metrics.sessions_issued.fetch_add(1, Ordering::Relaxed);
            auth.record(record).await;
            let mut resp = axum::Json(json!({
                "Version": 1,
                "AccessKeyId": issued.access_key_id,
                "SecretAccessKey": issued.secret.expose(),
                "SessionToken": issued.token.expose(),
                "Expiration": sigv4::iso8601(issued.expires),
            }))
            .into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(refusal) => {
            auth.metrics.refusal(&refusal);
            record.outcome = refusal.outcome();
            record.status = refusal.status().as_u16();
            record.error_code = Some(refusal.code().into());
            auth.record(record).await;
            refusal.into_response()
        }
    }
}
