//! The stream side of the ADS entry: each stream gets its own task and span and goes to its
//! protocol variant (state of the world in `sotw.rs`, delta in `delta.rs`), which encodes each
//! response itself into a gRPC message ([`frame`]) that `grpc.rs` hands to HTTP/2 as it is.

use std::future::Future;
use std::sync::atomic::Ordering;

use hyper::body::Bytes;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{Instrument, debug, info_span, warn};

use super::Ads;

/// Responses a stream may have queued before it waits for Envoy to read (HTTP/2 flow control).
const STREAM_QUEUE: usize = 8;
/// The gRPC message prefix: a compression flag and a 4-byte big-endian length.
const PREFIX: usize = 5;

/// Where a stream puts its responses, each a whole gRPC message ([`frame`]), or the status
/// that ends the stream.
pub(super) type Outbox = mpsc::Sender<Result<Bytes, Status>>;
/// What `grpc.rs` reads a stream's responses from.
pub(super) type Inbox = mpsc::Receiver<Result<Bytes, Status>>;

/// Runs one stream in its own task and span; a refusal reaches Envoy as the stream's status.
pub(super) fn spawn_stream<F>(
    ads: &Ads,
    variant: &'static str,
    run: impl FnOnce(u64, Outbox) -> F,
) -> Inbox
where
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
    rx
}

/// `m` as one uncompressed gRPC message, in a buffer of its exact size: nothing stays allocated
/// per stream between responses (tonic's encoder keeps a buffer as large as the largest one).
pub(super) fn frame<M: prost::Message>(m: &M) -> Result<Bytes, Status> {
    let len = m.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("response of {len} bytes")))?;
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    m.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}
