//! ACM certificates and ACM PCA trust for attested Envoys: exports each certificate the spec of a
//! proxy with an attested stream names (`ExportCertificate`, with a random passphrase made per export and the
//! PKCS#8 key decrypted in memory), fetches the certificates of the authorities its client
//! policies trust (`GetCertificateAuthorityCertificate`), refreshes both on an interval and
//! publishes them beside the discovered endpoints: the ARNs held (translation serves only those)
//! and one secret per name translation uses. The ADS streams hand a secret only to an attested
//! stream of a node whose own spec names it (`xds::snapshot`).
//!
//! Key material never reaches a log line, an error, a metric or the disk: errors carry the ARN and
//! the AWS error code, secret versions hash the certificate chain, not the key.

pub mod sdk;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroize::Zeroizing;

pub use sdk::SdkAcm;

use crate::discovery::Found;
use trellis_model::{ProxyIdentity, State};
use trellis_translate::{AcmSecret, Item, acm_secrets};

/// Default refresh interval: ACM renews private certificates well before they expire (60 days
/// ahead for a 13-month certificate), so an hour is far inside any renewal window.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// An exported certificate: the PEM chain (leaf first) and the decrypted PKCS#8 key (PEM).
pub struct Exported {
    pub chain: String,
    pub key: Zeroizing<String>,
}

impl std::fmt::Debug for Exported {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("chain_bytes", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A failed ACM or ACM PCA call, or an export that could not be used: the AWS error code (or
/// this agent's own) and AWS's message, which never carries key material.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{code}: {message}")]
pub struct AcmError {
    pub code: String,
    pub message: String,
}

/// The two calls; the SDK in production, fakes in unit tests.
pub trait Source: Send + Sync + 'static {
    /// `ExportCertificate`, decrypted.
    fn export<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<Exported, AcmError>>;
    /// `GetCertificateAuthorityCertificate`: the authority's certificate and chain (PEM).
    fn authority<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<String, AcmError>>;
}

/// What one ARN gave.
enum Material {
    Certificate(Exported),
    Authority(String),
}

/// Every ACM secret some connected proxy needs in this state.
pub fn demand(state: &State, proxies: &BTreeSet<ProxyIdentity>) -> BTreeSet<AcmSecret> {
    proxies.iter().flat_map(|p| acm_secrets(state, p)).collect()
}

/// The ARNs behind `secrets`: certificates to export, authorities to fetch.
fn arns(secrets: &BTreeSet<AcmSecret>) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for s in secrets {
        let certificate = matches!(s, AcmSecret::Certificate(_));
        for a in s.arns() {
            out.insert(a.clone(), certificate);
        }
    }
    out
}

/// Runs until `cancel`: keeps the material of every ARN a connected proxy needs, fetched when
/// first needed and again every `refresh` (a failed one every `retry`), and publishes it on `out`.
pub async fn run(
    source: Arc<dyn Source>,
    mut state: watch::Receiver<Arc<State>>,
    mut proxies: watch::Receiver<BTreeSet<ProxyIdentity>>,
    out: Arc<watch::Sender<Found>>,
    refresh: Duration,
    cancel: CancellationToken,
) {
    let retry = refresh.min(Duration::from_secs(30));
    // ARN → (material, when it is fetched again). Failed ones are absent, with their retry time.
    let mut held: BTreeMap<String, (Material, Instant)> = BTreeMap::new();
    let mut failed: BTreeMap<String, Instant> = BTreeMap::new();
    publish(&out, &BTreeSet::new(), &held);
    loop {
        let wanted = {
            let s = state.borrow_and_update().clone();
            let p = proxies.borrow_and_update().clone();
            demand(&s, &p)
        };
        let needed = arns(&wanted);
        held.retain(|a, _| needed.contains_key(a));
        failed.retain(|a, _| needed.contains_key(a));
        let now = Instant::now();
        for (arn, certificate) in &needed {
            let due = match (held.get(arn), failed.get(arn)) {
                (Some((_, at)), _) => *at <= now,
                (None, Some(at)) => *at <= now,
                (None, None) => true,
            };
            if !due {
                continue;
            }
            let fetch = async {
                if *certificate {
                    source.export(arn).await.map(Material::Certificate)
                } else {
                    source.authority(arn).await.map(Material::Authority)
                }
            };
            // A slow ACM (timeouts, retries) never holds up the agent's shutdown.
            let got = tokio::select! {
                got = fetch => got,
                () = cancel.cancelled() => return,
            };
            match got {
                Ok(m) => {
                    info!(arn = %arn, "acm material fetched");
                    failed.remove(arn);
                    held.insert(arn.clone(), (m, Instant::now() + refresh));
                }
                Err(e) => {
                    // The last good material stays in use until it is replaced (a renewal
                    // that failed to export does not take TLS down); a first failure leaves
                    // the port fail-closed.
                    warn!(arn = %arn, code = %e.code, error = %e.message, kept = held.contains_key(arn), "acm export failed; what needs it stays fail-closed");
                    match held.get_mut(arn) {
                        Some((_, at)) => *at = Instant::now() + retry,
                        None => {
                            failed.insert(arn.clone(), Instant::now() + retry);
                        }
                    }
                }
            }
        }
        publish(&out, &wanted, &held);
        let next = held
            .values()
            .map(|(_, at)| *at)
            .chain(failed.values().copied())
            .min();
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            changed = proxies.changed() => if changed.is_err() { return },
            () = sleep_until_opt(next) => {}
            () = cancel.cancelled() => return,
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Publishes the ARNs held and the secrets of `wanted` that can be made from them, when either
/// changed (a renewal changes a secret's content, and with it its version).
fn publish(
    out: &watch::Sender<Found>,
    wanted: &BTreeSet<AcmSecret>,
    held: &BTreeMap<String, (Material, Instant)>,
) {
    let arns: BTreeSet<String> = held.keys().cloned().collect();
    let mut secrets = BTreeMap::new();
    for s in wanted {
        if let Some(item) = secret(s, held) {
            secrets.insert(item.name.clone(), item);
        }
    }
    out.send_if_modified(|f| {
        let same_arns = f.endpoints.acm.as_deref() == Some(&arns);
        if same_arns && *f.secrets == secrets {
            return false;
        }
        let m = Arc::make_mut(&mut f.endpoints);
        m.acm = Some(Arc::new(arns));
        m.generation += 1;
        f.secrets = Arc::new(secrets);
        true
    });
}

/// The secret `s`, if every ARN it needs is held.
fn secret(s: &AcmSecret, held: &BTreeMap<String, (Material, Instant)>) -> Option<Item> {
    let name = s.name();
    match s {
        AcmSecret::Certificate(arn) => match &held.get(arn)?.0 {
            Material::Certificate(e) => {
                Some(trellis_translate::certificate_item(&name, &e.chain, &e.key))
            }
            Material::Authority(_) => None,
        },
        AcmSecret::Trust(arns) => {
            let mut cas = String::new();
            for a in arns {
                match &held.get(a)?.0 {
                    Material::Authority(pem) => {
                        cas.push_str(pem.trim_end());
                        cas.push('\n');
                    }
                    Material::Certificate(_) => return None,
                }
            }
            Some(trellis_translate::trust_item(&name, &cas))
        }
    }
}

#[cfg(test)]
mod tests;
