//! The gRPC routing of ADS, in place of the generated `AggregatedDiscoveryServiceServer`, for
//! memory and CPU per stream: requests are decoded by tonic with a small starting buffer
//! ([`BUFFER`]; tonic's default is 8 KiB per stream), and responses, which each stream encodes
//! into a message of its own exact size (`service::frame`), go to HTTP/2 as they are ([`Frames`])
//! rather than through tonic's encoder, which copies each into a per-stream buffer that keeps the
//! size of the largest. The two methods are served as the generated server does (same paths and
//! message types, default size limits, no compression, the stream's status in its trailers).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Bytes, Frame};
use tonic::Status;
use tonic::Streaming;
use tonic::body::Body;
use tonic::codec::BufferSettings;
use tonic::server::NamedService;
use tonic_prost::ProstDecoder;

use super::service::{Inbox, spawn_stream};
use super::{Ads, delta, sotw};
use crate::attest::Peer;

/// A stream's decoding buffer, to start with (a DiscoveryRequest ACK is a few hundred bytes); a
/// larger message grows it as it needs.
const BUFFER: usize = 1024;
/// tonic's default (unused when decoding).
const YIELD: usize = 32 * 1024;

const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS gRPC service (both variants) that tonic's router serves.
#[derive(Clone, Debug)]
pub struct AdsServer(Arc<Ads>);

impl AdsServer {
    pub fn new(ads: Arc<Ads>) -> Self {
        AdsServer(ads)
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tower_service::Service<http::Request<Body>> for AdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ads = self.0.clone();
        let response = match req.uri().path() {
            SOTW => open::<DiscoveryRequest>(req).map(|(peer, inbound)| {
                spawn_stream(&ads.clone(), "sotw", move |id, tx| async move {
                    sotw::run_stream(&ads, id, peer, inbound, &tx).await
                })
            }),
            DELTA => open::<DeltaDiscoveryRequest>(req).map(|(peer, inbound)| {
                spawn_stream(&ads.clone(), "delta", move |id, tx| async move {
                    delta::run_stream(&ads, id, peer, inbound, &tx).await
                })
            }),
            other => Err(Status::unimplemented(format!("no method {other}"))),
        };
        let response = match response {
            Ok(rx) => respond(rx),
            Err(status) => status.into_http(),
        };
        Box::pin(async move { Ok(response) })
    }
}

/// The caller and the decoded requests of a stream; a compressed one is refused as tonic refuses
/// it when no compression is enabled.
fn open<R>(req: http::Request<Body>) -> Result<(Peer, Streaming<R>), Status>
where
    R: prost::Message + Default + Send + 'static,
{
    if let Some(encoding) = req.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            encoding.to_str().unwrap_or("?")
        )));
    }
    let peer = Peer::of(req.extensions());
    let decoder = ProstDecoder::<R>::new(BufferSettings::new(BUFFER, YIELD));
    let inbound = Streaming::new_request(decoder, req.into_body(), None, None);
    Ok((peer, inbound))
}

fn respond(rx: Inbox) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Frames { rx, ended: false }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A stream's response body: its encoded messages as they come, then its status as trailers
/// (OK once the stream's task is done with it).
struct Frames {
    rx: Inbox,
    ended: bool,
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(this.rx.poll_recv(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.ended = true;
        let mut trailers = HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            // A message that cannot be a header value: the status goes without it.
            trailers = HeaderMap::new();
            let _ = Status::new(unsendable.code(), "").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
