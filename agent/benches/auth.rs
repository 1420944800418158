//! `cargo bench -p trellis-agent --features testing --bench auth`: what authentication costs.
//!
//! Two agents in this process, one open and one with `--api-auth`, serve the same `DescribeMesh`
//! to the same clients in the same run: keep-alive HTTP/1.1 connections, 4 concurrent clients.
//! The signed request is signed once by the Rust SDK's signer and replayed (valid for 15
//! minutes), so both clients do the same work and the difference is the server's: SigV4
//! verification (canonical request, five HMACs, constant-time compare), the policy check and the
//! buffered body. Rounds alternate between the two agents; medians are printed. Then the
//! verification alone, in-process, per request.
//!
//! A plain harness (no criterion). Figures depend on the machine; compare them as ratios.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use trellis_agent::auth::sigv4;
use trellis_agent::config::ServeConfig;
use trellis_agent::test_helpers::{self, TempDir, serve_config};

const CLIENTS: usize = 4;
const REQUESTS_PER_ROUND: usize = 4_000;
const ROUNDS: usize = 5;
const KEY_ID: &str = "AKIABENCH00000000001";
const SECRET: &str = "bench-secret-0123456789abcdef";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One agent and the request its clients send.
struct Target {
    uri: String,
    headers: HeaderMap,
    _bound: trellis_agent::app::Bound,
    _dir: TempDir,
}

async fn agent(signed: bool) -> Target {
    let dir = TempDir::new(if signed {
        "bench-auth-signed"
    } else {
        "bench-auth-open"
    });
    let mut cfg: ServeConfig = serve_config(dir.path());
    if signed {
        let file = dir.path().join("auth.json");
        let doc = serde_json::json!({"keys": [{"accessKeyId": KEY_ID, "secretAccessKey": SECRET,
            "policy": {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["appmesh:Describe*", "appmesh:List*"], "Resource": "*"}]}}]});
        std::fs::write(&file, doc.to_string()).expect("auth file");
        cfg.api.api_auth = Some(file);
    }
    let bound = trellis_agent::app::build(cfg).await.expect("agent");
    test_helpers::ops_with_mesh(&bound.store);
    let authority = format!("127.0.0.1:{}", bound.api_addr.port());
    let uri = format!("http://{authority}/v20190125/meshes/m");
    let mut headers = HeaderMap::new();
    if signed {
        let identity = Credentials::new(KEY_ID, SECRET, None, None, "bench").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("appmesh")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .expect("params")
            .into();
        let signable = SignableRequest::new(
            "GET",
            uri.as_str(),
            [("host", authority.as_str())].into_iter(),
            SignableBody::Bytes(b""),
        )
        .expect("signable");
        let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
        let mut req = Request::builder()
            .uri(uri.as_str())
            .body(())
            .expect("request");
        instructions.apply_to_request_http1x(&mut req);
        headers = req.headers().clone();
    }
    Target {
        uri,
        headers,
        _bound: bound,
        _dir: dir,
    }
}

/// Requests per second over one round of `REQUESTS_PER_ROUND` from `CLIENTS` clients.
async fn round(client: &HttpClient, t: &Target) -> f64 {
    let per = REQUESTS_PER_ROUND / CLIENTS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, uri, headers) = (client.clone(), t.uri.clone(), t.headers.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let mut req = Request::builder().uri(uri.as_str());
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                let req = req.body(Full::new(Bytes::new())).expect("request");
                let resp = client.request(req).await.expect("answer");
                assert_eq!(resp.status(), 200, "the agent served the request");
                resp.into_body().collect().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    (per * CLIENTS) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The verification alone: parse, scope and time checks, and the signature, per request.
fn verify_alone() -> Duration {
    let authority = "127.0.0.1:9080";
    let uri = format!("http://{authority}/v20190125/meshes/m/virtualNodes/web");
    let identity = Credentials::new(KEY_ID, SECRET, None, None, "bench").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("appmesh")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .expect("params")
        .into();
    let body = br#"{"spec":{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}]}}"#;
    let signable = SignableRequest::new(
        "PUT",
        uri.as_str(),
        [("host", authority), ("content-type", "application/json")].into_iter(),
        SignableBody::Bytes(body),
    )
    .expect("signable");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    let mut req = Request::builder()
        .method("PUT")
        .uri(uri.as_str())
        .header("host", authority)
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    instructions.apply_to_request_http1x(&mut req);
    let r = sigv4::Request {
        method: "PUT",
        path: req.uri().path(),
        query: None,
        headers: req.headers(),
        authority: None,
        body,
    };
    let n = 20_000;
    let start = Instant::now();
    for _ in 0..n {
        let claim = sigv4::parse(&r, "us-east-1", SystemTime::now()).expect("claim");
        sigv4::verify(&r, &claim, SECRET).expect("valid");
    }
    start.elapsed() / n
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let open = agent(false).await;
        let signed = agent(true).await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        // Warm both (connections, allocator).
        round(&client, &open).await;
        round(&client, &signed).await;
        let (mut o, mut s) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            o.push(round(&client, &open).await);
            s.push(round(&client, &signed).await);
        }
        let (o, s) = (median(o), median(s));
        println!(
            "DescribeMesh over keep-alive HTTP/1.1, {CLIENTS} clients, median of {ROUNDS} rounds of {REQUESTS_PER_ROUND}:"
        );
        println!("  open API:   {o:>8.0} req/s");
        println!("  signed API: {s:>8.0} req/s  ({:.2}x the open throughput)", s / o);
    });
    let per = verify_alone();
    println!(
        "SigV4 verification alone (PUT with a JSON body, one thread): {:.1} µs per request",
        per.as_secs_f64() * 1e6
    );
}
