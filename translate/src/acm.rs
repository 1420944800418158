//! ACM certificates and ACM PCA trust: the names of the secrets that carry them, and which of
//! them a proxy's own spec entitles it to.
//!
//! Translation never holds key material. A listener with an ACM certificate, or a client policy
//! trusting ACM PCA authorities, refers to a secret by name that the agent serves on the same ADS
//! stream (only to an attested Envoy of this very node); the agent learns which ARNs to export
//! from [`acm_secrets`] and says which it holds through [`crate::Endpoints::acm`]. Until an ARN
//! is held (or when the agent serves no ACM at all) the setting fails closed as before.

use std::collections::BTreeSet;

use trellis_model::{
    ClientPolicy, ListenerTlsMode, ProxyIdentity, ProxyKind, State, VirtualGatewayListenerTlsMode,
};

use super::envoy;
use super::output::{Blob, Item};
use super::policy::gateway_client_policy;

/// One secret the agent serves for ACM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AcmSecret {
    /// A certificate, its chain and its private key (`ExportCertificate`).
    Certificate(String),
    /// The certificates of these authorities, sorted (`GetCertificateAuthorityCertificate`).
    Trust(Vec<String>),
}

impl AcmSecret {
    /// The secret's name on the ADS stream.
    pub fn name(&self) -> String {
        match self {
            AcmSecret::Certificate(arn) => certificate_secret(arn),
            AcmSecret::Trust(arns) => trust_secret(arns),
        }
    }

    /// The ARNs whose material makes the secret.
    pub fn arns(&self) -> &[String] {
        match self {
            AcmSecret::Certificate(arn) => std::slice::from_ref(arn),
            AcmSecret::Trust(arns) => arns,
        }
    }

    /// Parses what [`AcmSecret::name`] wrote.
    pub fn parse(name: &str) -> Option<Self> {
        if let Some(arn) = name.strip_prefix("acm:") {
            return Some(AcmSecret::Certificate(arn.to_string()));
        }
        let arns = name.strip_prefix("acm-pca:")?;
        Some(AcmSecret::Trust(
            arns.split(',').map(str::to_string).collect(),
        ))
    }
}

/// The secret name of an ACM certificate: `acm:<certificate ARN>`.
pub fn certificate_secret(arn: &str) -> String {
    format!("acm:{arn}")
}

/// The secret name of trust in ACM PCA authorities: `acm-pca:<ARNs, sorted, comma-joined>`, so
/// policies listing the same authorities in any order share one secret.
pub fn trust_secret(arns: &[String]) -> String {
    format!("acm-pca:{}", sorted(arns).join(","))
}

fn sorted(arns: &[String]) -> Vec<String> {
    let set: BTreeSet<&String> = arns.iter().collect();
    set.into_iter().cloned().collect()
}

/// The ACM secrets the proxy `who`'s own spec names: certificates of its listeners that
/// terminate TLS (STRICT or PERMISSIVE), and the ACM PCA trust of its enforced client policies
/// (backends' own and backend defaults; a gateway's backend defaults). Only these are ever
/// served to `who`.
pub fn acm_secrets(state: &State, who: &ProxyIdentity) -> BTreeSet<AcmSecret> {
    let mut out = BTreeSet::new();
    let Some(mesh) = state.meshes.get(&who.mesh) else {
        return out;
    };
    match who.kind {
        ProxyKind::VirtualNode => {
            let Some(node) = mesh.virtual_nodes.get(&who.name) else {
                return out;
            };
            let spec = &node.spec;
            for l in spec.listeners.iter().flatten() {
                if let Some(tls) = &l.tls
                    && tls.mode != ListenerTlsMode::Disabled
                    && let Some(acm) = &tls.certificate.acm
                {
                    out.insert(AcmSecret::Certificate(acm.certificate_arn.clone()));
                }
            }
            let defaults = spec
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref());
            let own = spec
                .backends
                .iter()
                .flatten()
                .filter_map(|b| b.virtual_service.as_ref())
                .filter_map(|vs| vs.client_policy.as_ref());
            for p in defaults.into_iter().chain(own) {
                out.extend(trust_of(p));
            }
        }
        ProxyKind::VirtualGateway => {
            let Some(gw) = mesh.virtual_gateways.get(&who.name) else {
                return out;
            };
            for l in &gw.spec.listeners {
                if let Some(tls) = &l.tls
                    && tls.mode != VirtualGatewayListenerTlsMode::Disabled
                    && let Some(acm) = &tls.certificate.acm
                {
                    out.insert(AcmSecret::Certificate(acm.certificate_arn.clone()));
                }
            }
            if let Some(p) = gw
                .spec
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref())
            {
                out.extend(trust_of(&gateway_client_policy(p)));
            }
        }
    }
    out
}

fn trust_of(p: &ClientPolicy) -> Option<AcmSecret> {
    let tls = p.tls.as_ref().filter(|t| t.enforce != Some(false))?;
    let acm = tls.validation.trust.acm.as_ref()?;
    Some(AcmSecret::Trust(sorted(&acm.certificate_authority_arns)))
}

/// The secret `name` with an exported certificate: `chain` (PEM, leaf first) and `key` (PEM
/// PKCS#8, decrypted). The bytes hold the key: they go only to the attested Envoy of a node whose
/// spec names the certificate.
/// Its version hashes the name and the chain, never the key (versions are logged and shown on
/// `/metrics`-adjacent pages); a renewal changes the certificate, and with it the version.
pub fn certificate_item(name: &str, chain: &str, key: &str) -> Item {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(chain.as_bytes());
    let blob = Blob {
        bytes: envoy::certificate_secret(name, chain, key).encode_to_vec(),
        hash: h.finalize().into(),
    };
    Item::encoded(name.to_string(), std::sync::Arc::new(blob))
}

/// The secret `name` trusting the certificates `cas` (PEM).
pub fn trust_item(name: &str, cas: &str) -> Item {
    Item::encoded(
        name.to_string(),
        std::sync::Arc::new(Blob::of(&envoy::trust_secret(name, cas))),
    )
}

/// Whether every ARN of `arns` is held, or why not (the reason goes to `Resources::unserved`).
pub(super) fn held(acm: Option<&BTreeSet<String>>, arns: &[String]) -> Result<(), String> {
    let Some(held) = acm else {
        return Err(NOT_ATTESTED.to_string());
    };
    match arns.iter().find(|a| !held.contains(*a)) {
        None => Ok(()),
        Some(missing) => Err(format!(
            "{missing} is not exported yet or its export failed (see the agent's ACM warning)"
        )),
    }
}

/// Why ACM is refused when the agent serves none.
const NOT_ATTESTED: &str = "ACM certificates and ACM PCA trust are served only to attested \
     Envoys (start the agent with --xds-attestation ecs or serve TCP ADS with mTLS); without \
     attestation any local process could obtain the private key";

#[cfg(test)]
mod tests {
    #[test]
    fn a_certificate_secret_debug_print_and_version_hold_no_key() {
        let key = "-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n";
        let a = super::certificate_item("acm:x", "CHAIN", key);
        let b = super::certificate_item("acm:x", "CHAIN", "another key");
        assert!(!format!("{a:?}").contains("SECRETKEYMATERIAL"));
        assert!(String::from_utf8_lossy(&a.encode()).contains("SECRETKEYMATERIAL"));
        assert_eq!(a.hash, b.hash, "the version is the chain's, not the key's");
    }
}
