//! A one-shot ADS client for the ACM suite: opens a SotW stream as a node, asks for secrets by
//! name and prints what the first Secret response held, then exits. Run inside a container's
//! cgroup it is that container's attested process; over plain TCP it is attested by nothing.
//!
//! `ads-probe unix:/path/xds.sock|http://HOST:PORT NODE_ID SECRET_NAME...` prints
//! `secrets=N` then `secret NAME certificate|trust` per resource (never their contents), or
//! `refused CODE` when the stream is refused.

use std::process::ExitCode;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Connects a Unix socket stream for every request of the channel.
#[derive(Clone)]
struct UnixConnector(std::path::PathBuf);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        })
    }
}

async fn channel(target: &str) -> Result<Channel, String> {
    match target.strip_prefix("unix:") {
        Some(path) => Endpoint::from_static("http://localhost")
            .connect_with_connector(UnixConnector(path.into()))
            .await
            .map_err(|e| e.to_string()),
        None => Endpoint::from_shared(target.to_string())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string()),
    }
}

async fn probe(target: &str, node: &str, names: Vec<String>) -> Result<(), String> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel(target).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = DiscoveryRequest {
        node: Some(Node {
            id: node.to_string(),
            ..Default::default()
        }),
        type_url: SECRET.into(),
        resource_names: names,
        ..Default::default()
    };
    tx.send(first).await.map_err(|e| e.to_string())?;
    let answer = async {
        let mut inbound = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(r) = inbound.message().await? {
            if r.type_url == SECRET {
                return Ok(Some(r));
            }
        }
        Ok::<_, tonic::Status>(None)
    };
    match tokio::time::timeout(Duration::from_secs(20), answer).await {
        Err(_) => Err("no Secret response within 20 s".into()),
        Ok(Err(status)) => {
            println!("refused {:?}", status.code());
            Ok(())
        }
        Ok(Ok(None)) => Err("the stream ended without a Secret response".into()),
        Ok(Ok(Some(r))) => {
            println!("secrets={}", r.resources.len());
            for any in &r.resources {
                let s = Secret::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                let kind = match s.r#type {
                    Some(secret::Type::TlsCertificate(_)) => "certificate",
                    Some(secret::Type::ValidationContext(_)) => "trust",
                    _ => "other",
                };
                println!("secret {} {kind}", s.name);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: ads-probe unix:/path|http://host:port NODE_ID SECRET_NAME...");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ads-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(probe(&args[0], &args[1], args[2..].to_vec())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ads-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
