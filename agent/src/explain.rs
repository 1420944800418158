//! `trellis-agent explain`: where a request goes, and why. Online it asks the agent at
//! `--api-addr` (`POST /trellis/v1/explain`), which runs the request through the very
//! configuration it serves the proxy (its published state and discovered endpoints), signing the
//! call as the AWS CLI would with the caller's AWS credentials (the SDK's default chain: the
//! environment, a profile, SSO, a `credential_process` such as `trellis-agent credentials`).
//! Offline (`--resources FILE`, an `export` file) it reads the file with the API's own checks
//! and runs the same translation and explanation with nothing running; Cloud Map endpoints are
//! then unknown.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::tls as sdk_tls;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::api::{self, Account, Ops, Quotas};
use crate::store::Store;
use crate::tls;
use crate::ui::{EXPLAIN_PATH, ExplainBody};

/// The agent has this long to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("proxy").required(true).args(["virtual_node", "virtual_gateway"]))]
pub struct ExplainArgs {
    /// The mesh of the proxy.
    #[arg(long)]
    pub mesh: String,
    /// The virtual node whose app sends the request (or, with --inbound, that receives it).
    #[arg(long)]
    pub virtual_node: Option<String>,
    /// The virtual gateway that receives the request.
    #[arg(long)]
    pub virtual_gateway: Option<String>,
    /// What is called: http://NAME[:PORT]/PATH, https://…, grpc://NAME:PORT/pkg.Service/Method or
    /// tcp://NAME:PORT.
    pub url: String,
    /// A request header, `name: value` (repeatable), as curl's -H.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// The request method (GET; POST for grpc://).
    #[arg(short = 'X', long)]
    pub method: Option<String>,
    /// A caller reaching the virtual node on its listener, instead of its app calling out.
    #[arg(long)]
    pub inbound: bool,
    /// text, or json (the explanation as the API returns it).
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Offline: explain against this `trellis-agent export` (or `--resources`) file, without an
    /// agent. Cloud Map endpoints are then unknown.
    #[arg(long)]
    pub resources: Option<PathBuf>,
    /// The agent's API (HOST:PORT, or an http(s):// URL).
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:9080")]
    pub api_addr: String,
    /// PEM bundle of the CAs that sign the agent's certificate (beside the system's roots).
    #[arg(long, env = "AWS_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// The AWS profile to sign with (the SDK's default chain otherwise).
    #[arg(long)]
    pub aws_profile: Option<String>,
    /// The agent's region, which signatures are scoped to (default: the SDK's: AWS_REGION, the
    /// profile's region).
    #[arg(long)]
    pub region: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Request(#[from] api::Error),
    #[error("--api-addr {0:?} must be HOST:PORT or an http(s):// URL")]
    ApiAddr(String),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    #[error("the agent refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("cannot sign the request: {0}")]
    Sign(String),
}

/// Explains the request and returns what to print.
pub async fn run(args: &ExplainArgs) -> Result<String, Error> {
    let body = ExplainBody {
        mesh_name: args.mesh.clone(),
        virtual_node_name: args.virtual_node.clone(),
        virtual_gateway_name: args.virtual_gateway.clone(),
        url: args.url.clone(),
        method: args.method.clone(),
        headers: args.headers.clone(),
        inbound: args.inbound,
    };
    // Bad input is refused here, before anything is asked of the agent.
    body.proxy()?;
    body.request()?;
    let explanation = match &args.resources {
        Some(path) => offline(path, &body, args.region.as_deref())?,
        None => online(args, &body).await?,
    };
    Ok(match args.output {
        Output::Json => serde_json::to_string_pretty(&explanation).unwrap_or_default(),
        Output::Text => trellis_explain::text(&explanation),
    })
}

/// Against a resources file, read into a store that lives in memory only.
fn offline(
    path: &std::path::Path,
    body: &ExplainBody,
    region: Option<&str>,
) -> Result<trellis_explain::Explanation, Error> {
    let ops = Ops {
        account: Account {
            account_id: "000000000000".into(),
            region: region.unwrap_or("us-east-1").into(),
        },
        quotas: Quotas::default(),
    };
    let store = Store::in_memory();
    api::apply_resources_file(&ops, &store, path)?;
    let state = store.current();
    Ok(crate::ui::explain(
        &state,
        &trellis_translate::Endpoints::default(),
        body,
    )?)
}

async fn online(
    args: &ExplainArgs,
    body: &ExplainBody,
) -> Result<trellis_explain::Explanation, Error> {
    let base = if args.api_addr.contains("://") {
        args.api_addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", args.api_addr)
    };
    let uri: http::Uri = base
        .parse()
        .map_err(|_| Error::ApiAddr(args.api_addr.clone()))?;
    let host = match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(a)) => a.to_string(),
        _ => return Err(Error::ApiAddr(args.api_addr.clone())),
    };
    let url = format!("{base}{EXPLAIN_PATH}");
    let bytes = serde_json::to_vec(body).map_err(|e| Error::Sign(e.to_string()))?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(&url)
        .header("host", &host)
        .header("content-type", "application/json");
    let signing = signer(args.aws_profile.as_deref(), args.region.as_deref()).await;
    let unsigned_reason = match &signing {
        Ok((identity, region)) => {
            for (k, v) in sign_headers(&url, &host, &bytes, identity, region)? {
                req = req.header(k, v);
            }
            None
        }
        Err(why) => Some(why.clone()),
    };
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| Error::Sign(e.to_string()))?;
    let client = tls::http_client(args.ca_bundle.as_deref())?;
    let fail = |detail: String| Error::Http {
        url: url.clone(),
        detail,
    };
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
    let (status, answer) = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))??;
    if !(200..300).contains(&status) {
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let code = v["__type"]
            .as_str()
            .map_or_else(|| format!("HTTP {status}"), str::to_string);
        let mut message = v["message"].as_str().unwrap_or_default().to_string();
        if code == "MissingAuthenticationTokenException"
            && let Some(why) = unsigned_reason
        {
            message = format!(
                "{message} (this agent takes signed requests only, and no AWS credentials were found to sign with: {why})"
            );
        }
        return Err(Error::Refused { code, message });
    }
    serde_json::from_slice(&answer).map_err(|e| fail(format!("not an explanation: {e}")))
}

/// The caller's credentials and the region to sign for, or why there are none (the request then
/// goes unsigned: an agent without `--api-auth` takes it).
async fn signer(
    profile: Option<&str>,
    region: Option<&str>,
) -> Result<(aws_smithy_runtime_api::client::identity::Identity, String), String> {
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
        .ok_or_else(|| "the SDK's default chain has no credentials provider".to_string())?;
    let creds = provider
        .provide_credentials()
        .await
        .map_err(|e| aws_smithy_types::error::display::DisplayErrorContext(e).to_string())?;
    let region = region
        .map(str::to_string)
        .or_else(|| config.region().map(|r| r.to_string()))
        .ok_or_else(|| {
            "no region to sign for: give --region (the agent's) or set AWS_REGION".to_string()
        })?;
    Ok((creds.into(), region))
}

/// SigV4 headers for the request, as the AWS CLI signs for service `appmesh`.
fn sign_headers(
    url: &str,
    host: &str,
    body: &[u8],
    identity: &aws_smithy_runtime_api::client::identity::Identity,
    region: &str,
) -> Result<Vec<(String, String)>, Error> {
    let params = v4::SigningParams::builder()
        .identity(identity)
        .region(region)
        .name(crate::auth::sigv4::SERVICE)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| Error::Sign(e.to_string()))?
        .into();
    let headers = [("host", host), ("content-type", "application/json")];
    let signable = SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| Error::Sign(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| Error::Sign(e.to_string()))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}
