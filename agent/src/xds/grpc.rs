//! The gRPC routing of ADS, in place of the generated `AggregatedDiscoveryServiceServer`, for one
//! reason: memory per stream. tonic allocates a codec buffer of `buffer_size` per stream for each
//! direction up front (8 KiB by default, so 16 KiB of a stream's cost at 10,000 streams); here it
//! is [`BUFFER`], and a larger message grows its buffer as it needs. The two methods are served
//! exactly as the generated server does (same paths, same message types, default limits).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::service::AdsService;

/// A stream's codec buffer in each direction, to start with (a DiscoveryRequest ACK is a few
/// hundred bytes).
const BUFFER: usize = 1024;
/// tonic's default: an encoded batch this large is flushed before encoding more.
const YIELD: usize = 32 * 1024;

const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Protobuf with small starting buffers: encodes `E`, decodes `D`.
struct SmallCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for SmallCodec<E, D> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

impl<E, D> Codec for SmallCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER, YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER, YIELD))
    }
}

/// The ADS gRPC service (both variants) that tonic's router serves.
#[derive(Clone, Debug)]
pub struct AdsServer(Arc<AdsService>);

impl AdsServer {
    pub fn new(service: AdsService) -> Self {
        AdsServer(Arc::new(service))
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct Sotw(Arc<AdsService>);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = DiscoveryResponse;
    type ResponseStream =
        <AdsService as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream_aggregated_resources(request).await })
    }
}

struct Delta(Arc<AdsService>);

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream =
        <AdsService as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.delta_aggregated_resources(request).await })
    }
}

impl tower_service::Service<http::Request<Body>> for AdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.0.clone();
        match req.uri().path() {
            SOTW => Box::pin(async move {
                let mut grpc =
                    Grpc::new(SmallCodec::<DiscoveryResponse, DiscoveryRequest>::default());
                Ok(grpc.streaming(Sotw(inner), req).await)
            }),
            DELTA => Box::pin(async move {
                let mut grpc = Grpc::new(
                    SmallCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default(),
                );
                Ok(grpc.streaming(Delta(inner), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("no method {other}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
