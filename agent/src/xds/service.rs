//! The gRPC entry of ADS: tonic's `AggregatedDiscoveryService`, which gives each stream its own
//! task and span and hands it to its protocol variant (state of the world in `sotw.rs`, delta in
//! `delta.rs`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use super::{Ads, delta, sotw};
use crate::attest::Peer;

/// Responses a stream may have queued before it waits for Envoy to read (HTTP/2 flow control).
const STREAM_QUEUE: usize = 8;

#[derive(Debug)]
pub struct AdsService(pub(super) Arc<Ads>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let ads = self.0.clone();
        let peer = Peer::of(request.extensions());
        let inbound = request.into_inner();
        Ok(Response::new(spawn_stream(
            &self.0,
            "sotw",
            move |id, tx| async move { sotw::run_stream(&ads, id, peer, inbound, &tx).await },
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let ads = self.0.clone();
        let peer = Peer::of(request.extensions());
        let inbound = request.into_inner();
        Ok(Response::new(spawn_stream(
            &self.0,
            "delta",
            move |id, tx| async move { delta::run_stream(&ads, id, peer, inbound, &tx).await },
        )))
    }
}

/// Runs one stream in its own task and span; a refusal reaches Envoy as the stream's status.
fn spawn_stream<R, F>(
    ads: &Ads,
    variant: &'static str,
    run: impl FnOnce(u64, mpsc::Sender<Result<R, Status>>) -> F,
) -> ReceiverStream<Result<R, Status>>
where
    R: Send + 'static,
    F: Future<Output = Result<(), Status>> + Send + 'static,
{
    let id = ads.next_stream.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let stream = run(id, tx.clone());
    tokio::spawn(
        async move {
            if let Err(status) = stream.await {
                warn!(code = ?status.code(), message = status.message(), "stream refused");
                // The stream may already be gone; nothing else to tell.
                let _ = tx.send(Err(status)).await;
            }
            debug!("stream closed");
        }
        .instrument(info_span!(
            "ads_stream",
            stream = id,
            variant,
            node = tracing::field::Empty
        )),
    );
    ReceiverStream::new(rx)
}
