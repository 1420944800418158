//! Authentication and authorisation of the API, as AWS does it for App Mesh: every request is
//! SigV4-signed ([`sigv4`]) with a key of the auth file ([`file`]) or with session credentials
//! issued to an IAM role proven through STS ([`sts`], [`session`]); its operation needs an IAM
//! action on resource ARNs ([`operation`]), which the principal's policy ([`policy`]) must allow.
//! Refusals carry AWS's error codes in App Mesh's JSON shape; mutations and refusals go to the
//! audit log ([`audit`]). [`http`] hooks all of it in front of the router.
//!
//! [`policy`] and [`identity`] know nothing of HTTP, for the ADS server's use.

pub mod audit;
pub mod client;
pub mod file;
pub mod http;
pub mod identity;
pub mod operation;
pub mod policy;
pub mod session;
pub mod sigv4;
pub mod sts;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use audit::{Audit, Outcome, Writer};
use file::AuthFile;
use identity::Principal;
use operation::Operation;
use policy::Decision;
use session::Sessions;
use sts::Sts;

use crate::store::secret::Secrets;

/// The one path a scraper's bearer token opens.
pub const METRICS_PATH: &str = "/metrics";

/// Why a request is refused: AWS's error codes and statuses, in App Mesh's JSON error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Missing Authentication Token")]
    MissingToken,
    #[error("{0}")]
    Incomplete(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("The security token included in the request is invalid.")]
    UnrecognizedClient,
    #[error("The security token included in the request is expired")]
    ExpiredToken,
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::MissingToken => "MissingAuthenticationTokenException",
            Refusal::Incomplete(_) => "IncompleteSignatureException",
            Refusal::InvalidSignature(_) => "InvalidSignatureException",
            Refusal::UnrecognizedClient => "UnrecognizedClientException",
            Refusal::ExpiredToken => "ExpiredTokenException",
            Refusal::AccessDenied(_) => "AccessDeniedException",
            Refusal::BadRequest(_) => "BadRequestException",
            Refusal::Unavailable(_) => "ServiceUnavailableException",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Incomplete(_) | Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::AccessDenied(_) => Outcome::Denied,
            Refusal::BadRequest(_) | Refusal::Unavailable(_) => Outcome::Failed,
            _ => Outcome::Unauthenticated,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let code = self.code();
        let body = serde_json::json!({ "__type": code, "message": self.to_string() });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        resp.headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(code));
        resp
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] file::Error),
    #[error("--audit-log {path}: {source}")]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sts(#[from] sts::Error),
}

/// What `serve` configures.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--api-auth`; `None` leaves the API open (loopback, or `--api-auth-disabled`).
    pub file: Option<PathBuf>,
    pub region: String,
    pub account: String,
    pub audit_log: Option<PathBuf>,
    pub sts_endpoint: Option<String>,
    pub server_ids: Vec<String>,
    pub session_duration: Duration,
}

/// The auth file in force and the digest of the bytes it was read from.
type Loaded = (Arc<AuthFile>, [u8; 32]);

/// A caller who passed authentication, with the auth file they were checked against.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Principal,
    file: Option<Arc<AuthFile>>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; 4],
    refusals: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    sessions_issued: AtomicU64,
    pub tls_reloads_ok: AtomicU64,
    pub tls_reloads_failed: AtomicU64,
}

impl Metrics {
    fn outcome(&self, o: Outcome) {
        let i = match o {
            Outcome::Allowed => 0,
            Outcome::Failed => 1,
            Outcome::Denied => 2,
            Outcome::Unauthenticated => 3,
        };
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    fn refusal(&self, r: &Refusal) {
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry(r.code()).or_default() += 1;
        }
    }
}

/// The API's gatekeeper.
#[derive(Debug)]
pub struct Auth {
    file: Option<(PathBuf, watch::Sender<Loaded>)>,
    region: String,
    account: String,
    sessions: Option<Sessions>,
    sts: Option<Sts>,
    audit: Option<Audit>,
    pub metrics: Metrics,
}

impl Auth {
    /// Loads the auth file (a bad one fails start-up) and opens the audit log; the returned
    /// writer must run as a task. `secrets` is where session keys live (the store's).
    pub async fn new(
        s: &Settings,
        secrets: Option<Secrets>,
    ) -> Result<(Arc<Auth>, Option<Writer>), Error> {
        let file = match &s.file {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| file::Error::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let f = AuthFile::parse(&bytes, &path.display().to_string())?;
                let (keys, roles, scrapers) = f.summary();
                info!(file = %path.display(), keys, roles, scrapers, "API authentication on");
                let (tx, _) = watch::channel((Arc::new(f), digest(&bytes)));
                Some((path.clone(), tx))
            }
        };
        let (audit, writer) = match &s.audit_log {
            None => (None, None),
            Some(path) => {
                let (a, w) = Audit::open(path).await.map_err(|source| Error::Audit {
                    path: path.clone(),
                    source,
                })?;
                (Some(a), Some(w))
            }
        };
        let enforced = file.is_some();
        let sessions = match (enforced, secrets) {
            (true, Some(secrets)) => Some(Sessions::new(secrets, s.session_duration)),
            _ => None,
        };
        let sts = if enforced {
            Some(Sts::new(
                s.sts_endpoint.as_deref(),
                &s.region,
                s.server_ids.clone(),
            )?)
        } else {
            None
        };
        Ok((
            Arc::new(Auth {
                file,
                region: s.region.clone(),
                account: s.account.clone(),
                sessions,
                sts,
                audit,
                metrics: Metrics::default(),
            }),
            writer,
        ))
    }

    /// Whether requests must be signed.
    pub fn enforced(&self) -> bool {
        self.file.is_some()
    }

    /// The auth file in force.
    pub fn current(&self) -> Option<Arc<AuthFile>> {
        self.file.as_ref().map(|(_, tx)| tx.borrow().0.clone())
    }

    /// Reads the auth file again: `Ok(true)` when a changed, valid file took over; `Err` leaves
    /// the previous one in force.
    pub fn reload(&self) -> Result<bool, file::Error> {
        let Some((path, tx)) = &self.file else {
            return Ok(false);
        };
        let bytes = std::fs::read(path).map_err(|source| file::Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let d = digest(&bytes);
        if tx.borrow().1 == d {
            return Ok(false);
        }
        let f = AuthFile::parse(&bytes, &path.display().to_string())?;
        tx.send_replace((Arc::new(f), d));
        Ok(true)
    }

    /// Re-reads the auth file every `every` until `cancel`. Requests in flight keep the file
    /// they started with; the next ones see the new one.
    pub async fn watch_file(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload() {
                Ok(true) => {
                    self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    let (keys, roles, scrapers) =
                        self.current().map(|f| f.summary()).unwrap_or_default();
                    info!(keys, roles, scrapers, "auth file reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "auth file refused; the previous one stays in force");
                }
            }
        }
    }

    fn scope(&self) -> operation::Scope<'_> {
        operation::Scope {
            partition: "aws",
            region: &self.region,
            account: &self.account,
        }
    }

    /// Verifies a request's signature. On failure, also the access key id it claimed.
    pub async fn authenticate(
        &self,
        req: &sigv4::Request<'_>,
        now: SystemTime,
    ) -> Result<Authenticated, (Refusal, Option<String>)> {
        let Some(file) = self.current() else {
            return Ok(Authenticated {
                principal: Principal::Anonymous,
                file: None,
            });
        };
        let claim = sigv4::read(req).map_err(|r| (r, None))?;
        let claimed = Some(claim.access_key_id.clone());
        let fail = |r: Refusal| (r, claimed.clone());
        sigv4::check(&claim, &self.region, now).map_err(fail)?;
        let principal = match &claim.security_token {
            None => {
                let key = file
                    .key(&claim.access_key_id)
                    .ok_or_else(|| fail(Refusal::UnrecognizedClient))?;
                sigv4::verify(req, &claim, key.secret.expose()).map_err(fail)?;
                Principal::Key {
                    access_key_id: key.access_key_id.clone(),
                }
            }
            Some(token) => {
                let sessions = self
                    .sessions
                    .as_ref()
                    .ok_or_else(|| fail(Refusal::UnrecognizedClient))?;
                let v = sessions
                    .verify(&claim.access_key_id, token, unix(now))
                    .await
                    .map_err(fail)?;
                sigv4::verify(req, &claim, v.secret.expose()).map_err(fail)?;
                Principal::Role {
                    arn: v.role,
                    caller: v.caller,
                    access_key_id: claim.access_key_id.clone(),
                }
            }
        };
        Ok(Authenticated {
            principal,
            file: Some(file),
        })
    }

    /// Authenticates a bearer token: a scraper of the auth file, for `GET /metrics` only.
    /// `protected`: the connection is TLS or from loopback. A bearer token, unlike a signature,
    /// can be replayed by whoever sees it, so it is refused in the clear off the host.
    pub fn authenticate_bearer(
        &self,
        token: &str,
        method: &str,
        path: &str,
        protected: bool,
    ) -> Result<Authenticated, Refusal> {
        let Some(file) = self.current() else {
            return Ok(Authenticated {
                principal: Principal::Anonymous,
                file: None,
            });
        };
        if method != "GET" || path != METRICS_PATH {
            return Err(Refusal::AccessDenied(format!(
                "a bearer token is accepted only for GET {METRICS_PATH} (a metrics scrape); sign this request with SigV4"
            )));
        }
        if !protected {
            return Err(Refusal::AccessDenied(
                "a bearer token is accepted only over TLS or from loopback: it would travel in the clear".into(),
            ));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let scraper = file.scraper(&digest).ok_or(Refusal::UnrecognizedClient)?;
        Ok(Authenticated {
            principal: Principal::Scraper {
                name: format!("scraper/{}", scraper.name),
            },
            file: Some(file),
        })
    }

    /// Checks the principal's policy for every resource of the operation. A scraper's only
    /// permission is `trellis:ReadMetrics`.
    pub fn authorize(&self, who: &Authenticated, op: &Operation) -> Result<(), Refusal> {
        let Some(file) = &who.file else {
            return Ok(());
        };
        let policy = match &who.principal {
            Principal::Key { access_key_id } => file.key(access_key_id).map(|k| &k.policy),
            Principal::Role { arn, .. } => file.role(arn).map(|r| &r.policy),
            Principal::Scraper { name } => {
                return if op.action == "trellis:ReadMetrics" {
                    Ok(())
                } else {
                    Err(Refusal::AccessDenied(format!(
                        "User: {name} is not authorized to perform: {}: a scraper may only read metrics",
                        op.action
                    )))
                };
            }
            Principal::Anonymous => None,
        };
        let user = who.principal.name();
        let Some(policy) = policy else {
            return Err(Refusal::AccessDenied(format!(
                "User: {user} is not authorized to perform: {} because it is no longer in the auth file",
                op.action
            )));
        };
        for resource in &op.resources {
            match policy.evaluate(&op.action, resource) {
                Decision::Allow => {}
                Decision::ExplicitDeny => {
                    return Err(Refusal::AccessDenied(format!(
                        "User: {user} is not authorized to perform: {} on resource: {resource} with an explicit deny in an identity-based policy",
                        op.action
                    )));
                }
                Decision::ImplicitDeny => {
                    return Err(Refusal::AccessDenied(format!(
                        "User: {user} is not authorized to perform: {} on resource: {resource} because no identity-based policy allows the {} action",
                        op.action, op.action
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn record(&self, r: audit::Record) {
        self.metrics.outcome(r.outcome);
        if let Some(a) = &self.audit {
            a.record(&r).await;
        }
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let mut out = String::from(
            "# HELP trellis_api_requests_total API requests that were audited or refused, by outcome.\n\
             # TYPE trellis_api_requests_total counter\n",
        );
        for (i, o) in ["allowed", "failed", "denied", "unauthenticated"]
            .iter()
            .enumerate()
        {
            out.push_str(&format!(
                "trellis_api_requests_total{{outcome=\"{o}\"}} {}\n",
                m.outcomes[i].load(Ordering::Relaxed)
            ));
        }
        out.push_str(
            "# HELP trellis_api_refusals_total Requests refused by authentication or authorisation, by error code.\n\
             # TYPE trellis_api_refusals_total counter\n",
        );
        if let Ok(r) = m.refusals.lock() {
            for (code, n) in r.iter() {
                out.push_str(&format!(
                    "trellis_api_refusals_total{{code=\"{code}\"}} {n}\n"
                ));
            }
        }
        let counter = |name: &str, help: &str, v: u64| {
            format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n")
        };
        out.push_str(&format!(
            "# HELP trellis_api_auth_reloads_total Auth file reloads, by result (a refused file leaves the previous one in force).\n\
             # TYPE trellis_api_auth_reloads_total counter\n\
             trellis_api_auth_reloads_total{{result=\"ok\"}} {}\n\
             trellis_api_auth_reloads_total{{result=\"refused\"}} {}\n",
            m.reloads_ok.load(Ordering::Relaxed),
            m.reloads_failed.load(Ordering::Relaxed)
        ));
        out.push_str(&format!(
            "# HELP trellis_api_tls_reloads_total API certificate reloads, by result.\n\
             # TYPE trellis_api_tls_reloads_total counter\n\
             trellis_api_tls_reloads_total{{result=\"ok\"}} {}\n\
             trellis_api_tls_reloads_total{{result=\"refused\"}} {}\n",
            m.tls_reloads_ok.load(Ordering::Relaxed),
            m.tls_reloads_failed.load(Ordering::Relaxed)
        ));
        out.push_str(&counter(
            "trellis_api_sessions_issued_total",
            "Session credentials issued to IAM identities.",
            m.sessions_issued.load(Ordering::Relaxed),
        ));
        out.push_str(&counter(
            "trellis_api_audit_write_failures_total",
            "Audit lines that could not be written.",
            self.audit
                .as_ref()
                .map(|a| a.failures.load(Ordering::Relaxed))
                .unwrap_or(0),
        ));
        out
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
