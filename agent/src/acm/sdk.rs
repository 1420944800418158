//! ACM and ACM PCA through the AWS SDK: credentials and region from the default chain (the
//! agent's task role needs `acm:ExportCertificate` and
//! `acm-pca:GetCertificateAuthorityCertificate`), clients built on first use so an agent whose
//! proxies name no ACM ARN never calls AWS.

use std::time::Duration;

use aws_sdk_acm::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acm::primitives::Blob;
use futures::future::BoxFuture;
use pkcs8::EncryptedPrivateKeyInfo;
use pkcs8::der::Decode;
use pkcs8::der::pem::LineEnding;
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use super::{AcmError, Exported, Source};
use crate::sdk::{self, Loading};

/// How to reach ACM and ACM PCA.
#[derive(Clone, Debug)]
pub struct Settings {
    /// One endpoint URL for both services instead of the region's (a VPC endpoint, tests).
    pub endpoint: Option<String>,
    pub fallback_region: String,
}

#[derive(Debug)]
pub struct SdkAcm {
    settings: Settings,
    clients: OnceCell<(aws_sdk_acm::Client, aws_sdk_acmpca::Client)>,
}

impl SdkAcm {
    pub fn new(settings: Settings) -> Self {
        SdkAcm {
            settings,
            clients: OnceCell::new(),
        }
    }

    async fn clients(&self) -> &(aws_sdk_acm::Client, aws_sdk_acmpca::Client) {
        self.clients
            .get_or_init(|| async {
                let cfg = sdk::load(Loading {
                    endpoint: self.settings.endpoint.as_deref(),
                    fallback_region: &self.settings.fallback_region,
                    attempt_timeout: Duration::from_secs(10),
                    sdk_retries: true,
                })
                .await;
                (
                    aws_sdk_acm::Client::new(&cfg),
                    aws_sdk_acmpca::Client::new(&cfg),
                )
            })
            .await
    }
}

impl Source for SdkAcm {
    fn export<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<Exported, AcmError>> {
        Box::pin(async move {
            let (acm, _) = self.clients().await;
            let passphrase = passphrase()?;
            let out = acm
                .export_certificate()
                .certificate_arn(arn)
                .passphrase(Blob::new(passphrase.as_bytes()))
                .send()
                .await
                .map_err(aws_error)?;
            let (Some(cert), Some(key)) = (out.certificate(), out.private_key()) else {
                return Err(own("IncompleteExport", "no certificate or no private key"));
            };
            let key = decrypt(key, &passphrase)?;
            let mut chain = cert.trim_end().to_string();
            chain.push('\n');
            if let Some(rest) = out.certificate_chain() {
                chain.push_str(rest.trim_end());
                chain.push('\n');
            }
            Ok(Exported { chain, key })
        })
    }

    fn authority<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<String, AcmError>> {
        Box::pin(async move {
            let (_, pca) = self.clients().await;
            let out = pca
                .get_certificate_authority_certificate()
                .certificate_authority_arn(arn)
                .send()
                .await
                .map_err(aws_error)?;
            let Some(cert) = out.certificate() else {
                return Err(own("IncompleteCertificate", "no certificate"));
            };
            let mut pem = cert.trim_end().to_string();
            pem.push('\n');
            if let Some(rest) = out.certificate_chain() {
                pem.push_str(rest.trim_end());
                pem.push('\n');
            }
            Ok(pem)
        })
    }
}

fn own(code: &str, message: &str) -> AcmError {
    AcmError {
        code: code.into(),
        message: message.into(),
    }
}

/// A fresh passphrase for one export: 192 random bits as hex (ACM accepts any ASCII but `#`,
/// `$` and `%`). Never logged, never stored; wiped when the export is decrypted.
fn passphrase() -> Result<Zeroizing<String>, AcmError> {
    let mut raw = Zeroizing::new([0u8; 24]);
    getrandom::getrandom(raw.as_mut())
        .map_err(|e| own("NoRandomness", &format!("the OS gave no random bytes: {e}")))?;
    let mut hex = Zeroizing::new(String::with_capacity(48));
    for b in raw.iter() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Ok(hex)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The encrypted PKCS#8 key ACM returns (PEM `ENCRYPTED PRIVATE KEY`, PBES2) as a plain PKCS#8
/// PEM, in memory only.
pub(super) fn decrypt(pem: &str, passphrase: &str) -> Result<Zeroizing<String>, AcmError> {
    let unusable = |what: &str| own("UnusablePrivateKey", what);
    let (label, der) =
        pkcs8::der::Document::from_pem(pem).map_err(|_| unusable("the private key is not PEM"))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(unusable("the private key is not an encrypted PKCS#8 key"));
    }
    let info = EncryptedPrivateKeyInfo::from_der(der.as_bytes())
        .map_err(|_| unusable("the private key is not an encrypted PKCS#8 key"))?;
    let plain = info.decrypt(passphrase.as_bytes()).map_err(|_| {
        unusable(
            "the private key does not decrypt (PBES2: PBKDF2 with HMAC-SHA1 or SHA-2, AES-CBC or 3DES expected)",
        )
    })?;
    plain
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(|_| unusable("the decrypted key does not encode"))
}

/// The AWS error code and message (what a WARN names), or the transport failure.
fn aws_error<E, R>(e: SdkError<E, R>) -> AcmError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(ctx) => AcmError {
            code: ctx.err().code().unwrap_or("Unknown").to_string(),
            message: ctx.err().message().unwrap_or_default().to_string(),
        },
        SdkError::TimeoutError(_) => own("Timeout", "ACM did not answer in time"),
        SdkError::DispatchFailure(_) => own("Unreachable", "ACM could not be reached"),
        _ => own("Unexpected", "ACM's answer could not be read"),
    }
}
