//! The ADS server (state of the world): one task per Envoy stream, fed by the store's latest-value
//! channel, with the per-type ACK/NACK state machine of the xDS protocol.

pub mod snapshot;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::model::{ProxyIdentity, State};
use crate::translate;
use snapshot::{PUSH_ORDER, Snapshot, Snapshots, TypeSnapshot, is_wildcard_type};

/// Responses a stream may have queued before it waits for Envoy to read (HTTP/2 flow control).
const STREAM_QUEUE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the ADS socket {path}: {source}")]
    BindUnix {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the ADS address {addr}: {source}")]
    BindTcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ADS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Shared by every stream.
#[derive(Debug)]
pub struct Ads {
    state: watch::Receiver<Arc<State>>,
    snapshots: Snapshots,
    next_stream: AtomicU64,
    cancel: CancellationToken,
}

impl Ads {
    pub fn new(state: watch::Receiver<Arc<State>>, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Ads {
            state,
            snapshots: Snapshots::default(),
            next_stream: AtomicU64::new(1),
            cancel,
        })
    }

    pub fn service(self: &Arc<Self>) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService(self.clone()))
    }
}

/// Binds the Unix socket so that any local uid (Envoy runs as 1337) can connect.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::BindUnix {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail; nothing else lives at this path.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

pub async fn serve_unix(ads: Arc<Ads>, listener: tokio::net::UnixListener) -> Result<(), Error> {
    let cancel = ads.cancel.clone();
    tonic::transport::Server::builder()
        .add_service(ads.service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

pub async fn serve_tcp(ads: Arc<Ads>, listener: tokio::net::TcpListener) -> Result<(), Error> {
    let cancel = ads.cancel.clone();
    tonic::transport::Server::builder()
        .add_service(ads.service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

#[derive(Debug)]
pub struct AdsService(Arc<Ads>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let ads = self.0.clone();
        let id = ads.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let inbound = request.into_inner();
        tokio::spawn(
            async move {
                if let Err(status) = run_stream(&ads, inbound, &tx).await {
                    warn!(code = ?status.code(), message = status.message(), "stream refused");
                    // The stream may already be gone; nothing else to tell.
                    let _ = tx.send(Err(status)).await;
                }
                debug!("stream closed");
            }
            .instrument(info_span!(
                "ads_stream",
                stream = id,
                node = tracing::field::Empty
            )),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "delta ADS is not served yet: use state-of-the-world ADS (api_type: GRPC)",
        ))
    }
}

/// What one stream has sent and heard back for one type.
#[derive(Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    acked_version: Option<String>,
    rejected_version: Option<String>,
}

struct Stream<'a> {
    who: ProxyIdentity,
    next_nonce: u64,
    types: HashMap<String, TypeState>,
    tx: &'a mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

async fn run_stream(
    ads: &Ads,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let node = first
        .node
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the first request on a stream must carry node"))?;
    let who = ProxyIdentity::parse(&node.id)
        .map_err(|e| Status::invalid_argument(format!("node.id: {e}")))?;
    tracing::Span::current().record("node", node.id.as_str());
    let mut state_rx = ads.state.clone();
    let state = state_rx.borrow_and_update().clone();
    let mut snap = ads.snapshots.get(&state, &who).map_err(unknown_proxy)?;
    info!(node = %who, "envoy connected");
    let mut stream = Stream {
        who,
        next_nonce: 0,
        types: HashMap::new(),
        tx,
    };
    stream.on_request(first, &snap).await?;
    loop {
        tokio::select! {
            req = inbound.message() => match req {
                Ok(Some(req)) => stream.on_request(req, &snap).await?,
                Ok(None) => break,
                Err(status) => {
                    debug!(message = status.message(), "stream ended by envoy");
                    break;
                }
            },
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = state_rx.borrow_and_update().clone();
                snap = match ads.snapshots.get(&state, &stream.who) {
                    Ok(s) => s,
                    Err(e) => {
                        // The proxy's resource went away: it keeps its stream but gets nothing.
                        warn!(node = %stream.who, error = %e, "proxy no longer exists; sending empty configuration");
                        Arc::new(Snapshot::from_resources(state.generation, Default::default()))
                    }
                };
                stream.push_changes(&snap).await?;
            }
            () = ads.cancel.cancelled() => break,
        }
    }
    info!(node = %stream.who, "envoy disconnected");
    Ok(())
}

fn unknown_proxy(e: translate::Error) -> Status {
    Status::not_found(format!(
        "{e}: create it with the App Mesh API before starting its Envoy, or fix APPMESH_RESOURCE_ARN"
    ))
}

impl Stream<'_> {
    async fn on_request(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Result<(), Status> {
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "type_url is required on an aggregated stream",
            ));
        }
        let ts = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && Some(&req.response_nonce) != ts.sent_nonce.as_ref() {
            debug!(type_url = %req.type_url, nonce = %req.response_nonce, "stale request ignored");
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let names_changed = names != ts.names;
        ts.names = names;
        if let Some(err) = &req.error_detail {
            // A NACK: remember it and wait for new input; resending the same version would loop.
            warn!(
                type_url = %req.type_url,
                nonce = %req.response_nonce,
                rejected = ?ts.sent_version,
                message = %err.message,
                "envoy rejected configuration"
            );
            ts.rejected_version = ts.sent_version.clone();
            return Ok(());
        }
        let current = snap.get(&req.type_url).map(|t| t.version.clone());
        if ts.sent_nonce.is_some() {
            debug!(type_url = %req.type_url, version = %req.version_info, "ack");
            ts.acked_version = Some(req.version_info.clone());
            if names_changed {
                self.send(&req.type_url, snap).await?;
            }
            return Ok(());
        }
        // The first request for this type on this stream.
        if !req.version_info.is_empty() && Some(&req.version_info) == current.as_ref() {
            // A reconnecting Envoy that already has exactly this: nothing to resend.
            ts.sent_version = current;
            ts.acked_version = Some(req.version_info);
            return Ok(());
        }
        self.send(&req.type_url, snap).await
    }

    /// After an input change: send every subscribed type whose version moved, in push order.
    async fn push_changes(&mut self, snap: &Snapshot) -> Result<(), Status> {
        for type_url in PUSH_ORDER {
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            let current = snap.get(type_url).map(|t| &t.version);
            if ts.sent_version.as_ref() != current {
                self.send(type_url, snap).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str, snap: &Snapshot) -> Result<(), Status> {
        let empty = TypeSnapshot::default();
        let t = snap.get(type_url).unwrap_or(&empty);
        let ts = self.types.entry(type_url.to_string()).or_default();
        let resources = if ts.names.is_empty() && is_wildcard_type(type_url) {
            t.resources.values().cloned().collect()
        } else {
            ts.names
                .iter()
                .filter_map(|n| t.resources.get(n).cloned())
                .collect()
        };
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        ts.sent_version = Some(t.version.clone());
        ts.sent_nonce = Some(nonce.clone());
        let resp = DiscoveryResponse {
            version_info: t.version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        debug!(type_url, version = %t.version, count = resp.resources.len(), "push");
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Status::cancelled("envoy went away"))
    }
}

#[cfg(test)]
mod tests;
