//! `trellis-agent credentials`: an AWS CLI `credential_process` that turns the caller's ambient
//! AWS credentials (task role, instance profile, SSO…) into Trellis session credentials. It asks
//! the agent which STS to sign for, signs `sts:GetCallerIdentity` (with the Rust SDK's signer) for
//! it, including `x-trellis-server-id` naming the deployment it means to talk to, and prints what
//! the agent answers: `{"Version": 1, "AccessKeyId", "SecretAccessKey", "SessionToken",
//! "Expiration"}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::tls as sdk_tls;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::http::{CREDENTIALS_PATH, STS_PATH};
use super::sts::{GET_CALLER_IDENTITY, Proof, SERVER_ID_HEADER, StsTarget};
use crate::tls::{self, HttpClient};

/// Each call to the agent.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct CredentialsArgs {
    /// The agent's API, as the CLI's --endpoint-url (https://trellis.mesh.internal:9443).
    #[arg(long, env = "TRELLIS_ENDPOINT")]
    pub endpoint: String,
    /// The deployment the proof is for: the agent's --api-server-id. Defaults to the endpoint's
    /// host name.
    #[arg(long, env = "TRELLIS_SERVER_ID")]
    pub server_id: Option<String>,
    /// PEM bundle of the CAs that sign the agent's certificate (beside the system's roots).
    #[arg(long, env = "AWS_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// The AWS profile whose credentials prove who you are (the SDK's default chain otherwise).
    /// Not the profile that runs this command, or it would call itself.
    #[arg(long)]
    pub aws_profile: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--endpoint {0:?} must be an http(s) URL")]
    Endpoint(String),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    #[error("the agent refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no AWS credentials to prove an identity with: {0}")]
    Ambient(String),
    #[error("cannot sign the proof: {0}")]
    Sign(String),
}

/// Runs the exchange and returns the credential_process JSON to print.
pub async fn run(args: &CredentialsArgs) -> Result<String, Error> {
    let base = args.endpoint.trim_end_matches('/').to_string();
    let uri: http::Uri = base
        .parse()
        .map_err(|_| Error::Endpoint(args.endpoint.clone()))?;
    let host = uri
        .host()
        .filter(|_| matches!(uri.scheme_str(), Some("http" | "https")))
        .ok_or_else(|| Error::Endpoint(args.endpoint.clone()))?
        .to_string();
    let server_id = args.server_id.clone().unwrap_or(host);
    let client = tls::http_client(args.ca_bundle.as_deref())?;

    let target: StsTarget = {
        let (status, body) = call(&client, "GET", &format!("{base}{STS_PATH}"), None).await?;
        refused(status, &body)?;
        serde_json::from_slice(&body).map_err(|e| Error::Http {
            url: format!("{base}{STS_PATH}"),
            detail: format!("not the agent's answer: {e}"),
        })?
    };
    let proof = prove(&target, &server_id, args.aws_profile.as_deref()).await?;
    let body = serde_json::to_vec(&proof).map_err(|e| Error::Sign(e.to_string()))?;
    let url = format!("{base}{CREDENTIALS_PATH}");
    let (status, answer) = call(&client, "POST", &url, Some(body)).await?;
    refused(status, &answer)?;
    let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| Error::Http {
        url: url.clone(),
        detail: format!("not credential_process JSON: {e}"),
    })?;
    if v["Version"] != 1 || !v["AccessKeyId"].is_string() {
        return Err(Error::Http {
            url,
            detail: "not credential_process JSON".into(),
        });
    }
    Ok(v.to_string())
}

/// A signed `GetCallerIdentity` for STS at `target`, with the caller's ambient credentials.
async fn prove(target: &StsTarget, server_id: &str, profile: Option<&str>) -> Result<Proof, Error> {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(sdk_tls::Provider::Rustls(
            sdk_tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(https);
    if let Some(p) = profile {
        loader = loader.profile_name(p);
    }
    let config = loader.load().await;
    let provider = config
        .credentials_provider()
        .ok_or_else(|| Error::Ambient("the SDK's default chain found no provider".into()))?;
    let creds = provider.provide_credentials().await.map_err(|e| {
        Error::Ambient(aws_smithy_types::error::display::DisplayErrorContext(e).to_string())
    })?;
    let identity = creds.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&target.region)
        .name("sts")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| Error::Sign(e.to_string()))?
        .into();
    let headers = [
        ("host", target.host.as_str()),
        (
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        ),
        (target.server_id_header.as_str(), server_id),
    ];
    if target.server_id_header != SERVER_ID_HEADER {
        return Err(Error::Sign(format!(
            "the agent asks for header {:?}; this client signs {SERVER_ID_HEADER}",
            target.server_id_header
        )));
    }
    let signable = SignableRequest::new(
        "POST",
        format!("https://{}/", target.host),
        headers.iter().copied(),
        SignableBody::Bytes(GET_CALLER_IDENTITY.as_bytes()),
    )
    .map_err(|e| Error::Sign(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| Error::Sign(e.to_string()))?
        .into_parts();
    let mut all: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in instructions.headers() {
        all.insert(k.to_string(), v.to_string());
    }
    Ok(Proof {
        headers: all,
        body: GET_CALLER_IDENTITY.into(),
    })
}

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes), Error> {
    let fail = |detail: String| Error::Http {
        url: url.to_string(),
        detail,
    };
    let mut req = http::Request::builder().method(method).uri(url);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| fail(e.to_string()))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| fail(tls::chain(&e)))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok::<_, Error>((status, bytes))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
}

/// The agent's App Mesh-shaped error, if it answered one.
fn refused(status: u16, body: &[u8]) -> Result<(), Error> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    Err(Error::Refused {
        code: v["__type"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}")),
        message: v["message"].as_str().unwrap_or_default().to_string(),
    })
}
