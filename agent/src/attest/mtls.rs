//! TCP ADS over mutual TLS: connections handshaken beside the accept loop (`tls::TlsListener`),
//! each carrying the URI SANs of its verified client certificate to the stream, where the node id
//! must be one of them (`arn:aws:appmesh:…:mesh/M/virtualNode/N`, or
//! `spiffe://TRUST_DOMAIN/mesh/M/virtualNode/N`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use trellis_model::ProxyIdentity;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::{Refusal, same_proxy};
use crate::tls::TlsListener;

/// What a stream knows of its TLS peer (tonic's connect info).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub uris: Arc<Vec<String>>,
}

/// A handshaken connection and its peer's URI SANs.
pub struct MtlsStream {
    inner: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl MtlsStream {
    fn new(inner: TlsStream<TcpStream>) -> Self {
        let uris = inner
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| uri_sans(c.as_ref()))
            .unwrap_or_default();
        MtlsStream {
            inner,
            peer: TlsPeer {
                uris: Arc::new(uris),
            },
        }
    }
}

/// The URI SANs of a DER certificate (none if it cannot be read: the stream is then refused).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return vec![];
    };
    match cert.tbs_certificate.get::<SubjectAltName>() {
        Ok(Some((_, san))) => san
            .0
            .iter()
            .filter_map(|n| match n {
                GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// `Ok` when one of the URI SANs names the claimed node.
pub fn verify_sans(uris: &[String], claimed: &ProxyIdentity) -> Result<(), Refusal> {
    let names = |u: &String| {
        let id = match u.strip_prefix("spiffe://") {
            Some(rest) => rest.split_once('/').map(|(_, path)| path).unwrap_or(""),
            None => u.as_str(),
        };
        ProxyIdentity::parse(id).is_ok_and(|id| same_proxy(&id, claimed))
    };
    if uris.iter().any(names) {
        return Ok(());
    }
    Err(Refusal::SanMismatch {
        sans: if uris.is_empty() {
            "none".into()
        } else {
            uris.join(", ")
        },
        claimed: claimed.to_string(),
    })
}

/// The connections of `listener` as tonic's incoming stream.
pub fn incoming(
    listener: TlsListener,
) -> impl futures::Stream<Item = Result<MtlsStream, io::Error>> + Send {
    futures::stream::unfold(listener, |mut l| async move {
        let (io, _) = axum::serve::Listener::accept(&mut l).await;
        Some((Ok(MtlsStream::new(io)), l))
    })
}

impl tonic::transport::server::Connected for MtlsStream {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_san_names_a_node_as_an_arn_or_a_spiffe_path() {
        let n = ProxyIdentity::parse("mesh/m/virtualNode/a").unwrap();
        let arn = vec!["arn:aws:appmesh:us-west-2:111122223333:mesh/m/virtualNode/a".to_string()];
        assert_eq!(verify_sans(&arn, &n), Ok(()));
        let spiffe = vec!["spiffe://mesh.internal/mesh/m/virtualNode/a".to_string()];
        assert_eq!(verify_sans(&spiffe, &n), Ok(()));
        let other = vec!["spiffe://mesh.internal/mesh/m/virtualNode/b".to_string()];
        assert!(verify_sans(&other, &n).is_err());
        assert!(verify_sans(&[], &n).is_err());
        // No trust-domain sleight of hand: the whole path must be the node.
        let nested = vec!["spiffe://mesh/m/virtualNode/a".to_string()];
        assert!(verify_sans(&nested, &n).is_err());
    }
}
