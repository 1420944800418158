//! The Unix socket's tolerance of gRPC clients that send the socket path as `:authority`.
//!
//! grpc-core (Envoy's Google gRPC client, so the stock aws-appmesh-envoy image with a `unix://`
//! endpoint, and Python's `grpcio`) and grpc-java name a Unix-socket channel's authority after
//! the socket path. A path is no URI authority, and the h2 server under tonic resets such a
//! stream (RST_STREAM PROTOCOL_ERROR) before any handler sees it. Over a local socket the
//! authority means nothing, so this reader rewrites a malformed `:authority` value in the
//! client's HEADERS frames to one of the same length made of unreserved characters (`/` → `_`)
//! before h2 reads it. Same length keeps frame lengths and both HPACK dynamic tables in step
//! (a later reference by index finds the rewritten entry). Only literal values sent without
//! Huffman coding can be rewritten; grpc-core sends them so. Everything else passes untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HEADERS frames longer than this are passed on untouched (h2's own limit is far lower).
const MAX_HEADERS_FRAME: usize = 1 << 20;

/// A client connection on the Unix socket, with `:authority` made acceptable.
#[derive(Debug)]
pub(super) struct AuthorityTolerant {
    inner: UnixStream,
    /// Read from the client, not yet handed on.
    pending: Vec<u8>,
    /// How much of `pending` may be handed on.
    ready: usize,
    preface_left: usize,
    /// Payload bytes of the current non-HEADERS frame still to pass.
    skip: usize,
    eof: bool,
}

impl AuthorityTolerant {
    pub(super) fn new(inner: UnixStream) -> Self {
        AuthorityTolerant {
            inner,
            pending: Vec::new(),
            ready: 0,
            preface_left: PREFACE_LEN,
            skip: 0,
            eof: false,
        }
    }

    /// Advances `ready` over every byte that can be handed on, rewriting HEADERS frames.
    fn process(&mut self) {
        loop {
            let avail = self.pending.len() - self.ready;
            if avail == 0 {
                return;
            }
            if self.preface_left > 0 || self.skip > 0 {
                let n = if self.preface_left > 0 {
                    self.preface_left.min(avail)
                } else {
                    self.skip.min(avail)
                };
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else {
                    self.skip -= n;
                }
                self.ready += n;
                continue;
            }
            if avail < FRAME_HEADER {
                return;
            }
            let h = &self.pending[self.ready..self.ready + FRAME_HEADER];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            if (kind == HEADERS || kind == CONTINUATION) && len <= MAX_HEADERS_FRAME {
                if avail < FRAME_HEADER + len {
                    return;
                }
                let start = self.ready + FRAME_HEADER;
                let payload = &mut self.pending[start..start + len];
                rewrite_frame(payload, kind, flags);
                self.ready += FRAME_HEADER + len;
            } else {
                self.ready += FRAME_HEADER;
                self.skip = len;
            }
        }
    }
}

/// The header block fragment of a HEADERS or CONTINUATION frame, then its representations.
fn rewrite_frame(payload: &mut [u8], kind: u8, flags: u8) {
    let mut start = 0;
    let mut end = payload.len();
    if kind == HEADERS {
        if flags & FLAG_PADDED != 0 {
            let Some(&pad) = payload.first() else { return };
            start += 1;
            end = end.saturating_sub(usize::from(pad));
        }
        if flags & FLAG_PRIORITY != 0 {
            start += 5;
        }
    }
    if start < end {
        rewrite_block(&mut payload[start..end]);
    }
}

/// An HPACK integer with an `n`-bit prefix at `buf[*i]`.
fn integer(buf: &[u8], i: &mut usize, n: u32) -> Option<usize> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*buf.get(*i)?) & mask;
    *i += 1;
    if value < mask {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*i)?;
        *i += 1;
        value = value.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        shift += 7;
        if b & 0x80 == 0 || shift > 28 {
            return Some(value);
        }
    }
}

/// A string literal: (Huffman-coded, byte range).
fn string(buf: &[u8], i: &mut usize) -> Option<(bool, std::ops::Range<usize>)> {
    let huffman = *buf.get(*i)? & 0x80 != 0;
    let len = integer(buf, i, 7)?;
    let range = *i..i.checked_add(len)?;
    if range.end > buf.len() {
        return None;
    }
    *i = range.end;
    Some((huffman, range))
}

/// Walks the representations (RFC 7541 section 6) and rewrites a literal `:authority` value.
/// Stops at anything it cannot read whole (a block split across frames): nothing is guessed.
fn rewrite_block(block: &mut [u8]) {
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        let prefix = if b & 0x80 != 0 {
            // Indexed field: nothing literal.
            if integer(block, &mut i, 7).is_none() {
                return;
            }
            continue;
        } else if b & 0x40 != 0 {
            6
        } else if b & 0x20 != 0 {
            // Dynamic table size update.
            if integer(block, &mut i, 5).is_none() {
                return;
            }
            continue;
        } else {
            4
        };
        let Some(index) = integer(block, &mut i, prefix) else {
            return;
        };
        let is_authority = if index == 0 {
            match string(block, &mut i) {
                Some((false, name)) => &block[name] == b":authority",
                Some((true, _)) => false,
                None => return,
            }
        } else {
            // Static table entry 1 is `:authority`.
            index == 1
        };
        let Some((huffman, value)) = string(block, &mut i) else {
            return;
        };
        if is_authority && !huffman && !valid_authority(&block[value.clone()]) {
            for c in &mut block[value] {
                if !(c.is_ascii_alphanumeric() || matches!(*c, b'-' | b'.' | b'_' | b'~')) {
                    *c = b'_';
                }
            }
        }
    }
}

fn valid_authority(v: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(v).is_ok()
}

impl AsyncRead for AuthorityTolerant {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever is left (a cut frame) goes on as it is; h2 will judge it.
                this.ready = this.pending.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.pending.extend_from_slice(rb.filled());
                        this.process();
                    }
                }
            }
        }
    }
}

impl AsyncWrite for AuthorityTolerant {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityTolerant {
    type ConnectInfo = <UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_socket_path_authority_is_rewritten_in_place() {
        // :method GET (indexed 2), then :authority (static name 1, incremental indexing)
        // with the raw path, then a literal header with a new name.
        let path = b"/var/run/trellis/xds.sock";
        let mut block = vec![0x82, 0x41, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x00, 0x01, b'x', 0x01, b'/']);
        let before = block.len();
        rewrite_block(&mut block);
        assert_eq!(block.len(), before);
        assert_eq!(&block[3..3 + path.len()], b"_var_run_trellis_xds.sock");
        // The other header's value is not an authority: left alone.
        assert_eq!(block[before - 1], b'/');
        // A valid authority is left as it is.
        let mut ok = vec![0x41, 9];
        ok.extend_from_slice(b"localhost");
        let copy = ok.clone();
        rewrite_block(&mut ok);
        assert_eq!(ok, copy);
    }
}
