//! The gRPC entry of ADS: tonic's `AggregatedDiscoveryService`, which gives each stream its own
//! task and span and hands it to its protocol variant (state of the world in `sotw.rs`, delta in
//! `delta.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
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
    type StreamAggregatedResourcesStream = Unboxed<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Unboxed<DeltaDiscoveryResponse>;

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
    run: impl FnOnce(u64, Outbox<R>) -> F,
) -> Unboxed<R>
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
    Unboxed(rx)
}

/// Where a stream puts its responses: boxed, because the channel allocates room for 32 of them
/// up front whatever its bound, and a response is some 150 bytes (5 KiB per stream unboxed).
pub(super) type Outbox<R> = mpsc::Sender<Result<Box<R>, Status>>;

/// The responses of a stream, as tonic takes them.
#[derive(Debug)]
pub struct Unboxed<R>(mpsc::Receiver<Result<Box<R>, Status>>);

impl<R> Stream for Unboxed<R> {
    type Item = Result<R, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|r| r.map(|r| r.map(|b| *b)))
    }
}
