//! TLS with rustls (ring): the API's server side, whose certificate and key files are reloaded
//! when they change (the old pair stays in force while a new one is unreadable or invalid), a
//! listener that handshakes off the accept loop, and the outbound HTTPS client (native roots plus
//! an optional CA bundle) that STS calls and `trellis-agent credentials` use.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A handshake that takes longer is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    certified_key(&cert_pem, cert, &key_pem, key)
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certified_key(
    cert_pem: &[u8],
    cert: &Path,
    key_pem: &[u8],
    key: &Path,
) -> Result<CertifiedKey, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Pem {
            path: cert.to_path_buf(),
            detail: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(Error::Pem {
            path: cert.to_path_buf(),
            detail: "holds no CERTIFICATE block".into(),
        });
    }
    // The key's own parse error could quote key material: say only what is wrong.
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| Error::Pem {
        path: key.to_path_buf(),
        detail: "holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })?;
    let ck = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| Error::Pem {
        path: key.to_path_buf(),
        detail: format!("does not match the certificate: {e}"),
    })?;
    Ok(ck)
}

/// The API's certificate, swapped in place when its files change.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

impl ReloadingCert {
    /// Loads the pair now (a bad pair fails start-up).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, Error> {
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let ck = certified_key(&cert_pem, cert, &key_pem, key)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: RwLock::new((Arc::new(ck), digest(&cert_pem, &key_pem))),
        }))
    }

    /// Checks the files now: `Ok(true)` when a new pair took over, `Ok(false)` when unchanged,
    /// `Err` (the old pair stays) when the new files are unreadable or do not form a pair.
    pub fn reload(&self) -> Result<bool, Error> {
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        let d = digest(&cert_pem, &key_pem);
        if self.current.read().map(|c| c.1 == d).unwrap_or(false) {
            return Ok(false);
        }
        let ck = certified_key(&cert_pem, &self.cert_path, &key_pem, &self.key_path)?;
        if let Ok(mut c) = self.current.write() {
            *c = (Arc::new(ck), d);
        }
        Ok(true)
    }

    /// Re-reads the files every `every` until `cancel`; `on_reload` counts outcomes.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        on_reload: impl Fn(bool) + Send,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload() {
                Ok(true) => {
                    info!(cert = %self.cert_path.display(), "API TLS certificate reloaded");
                    on_reload(true);
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "API TLS certificate not reloaded; the previous one stays in force");
                    on_reload(false);
                }
            }
        }
    }

    /// A server configuration that always presents the current pair.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ReloadingCert {
    /// A server configuration for gRPC (h2) that requires a client certificate issued by a CA of
    /// `client_ca` (PEM bundle), and always presents the current pair.
    pub fn mtls_server_config(
        self: &Arc<Self>,
        client_ca: &Path,
    ) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut roots = rustls::RootCertStore::empty();
        add_pem_roots(&mut roots, client_ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| Error::Pem {
            path: client_ca.to_path_buf(),
            detail: format!("unusable client CA: {e}"),
        })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

fn digest(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(a);
    h.update([0]);
    h.update(b);
    h.finalize().into()
}

/// A TCP listener whose connections come out TLS-handshaken; handshakes run beside the accept
/// loop, so a slow client never holds up others.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    pending: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            pending: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = self.acceptor.clone();
                        self.pending.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    debug!(%peer, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    // Out of descriptors and the like: pause instead of spinning.
                    Err(e) => {
                        warn!(error = %e, "cannot accept an API connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.pending.join_next(), if !self.pending.is_empty() => {
                    if let Ok(Some(conn)) = done {
                        return conn;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An error with its causes (`client error (Connect): invalid peer certificate: UnknownIssuer`):
/// hyper's own message names only the outermost.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Outbound HTTP(S): native roots plus the certificates of `ca_bundle`, if given.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn client_config(ca_bundle: Option<&Path>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A certificate the platform store holds but rustls cannot use is skipped.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_bundle {
        add_pem_roots(&mut roots, path)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds every certificate of a PEM bundle (at least one) to `roots`.
fn add_pem_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), Error> {
    let pem = read(path)?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            detail: format!("not a PEM certificate bundle: {e}"),
        })?;
        roots.add(cert).map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            detail: format!("unusable certificate: {e}"),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::Pem {
            path: path.to_path_buf(),
            detail: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(())
}

pub fn http_client(ca_bundle: Option<&Path>) -> Result<HttpClient, Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca_bundle)?)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}
