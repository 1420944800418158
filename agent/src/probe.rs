//! A minimal HTTP/1.1 client for loopback and link-local peers (Envoy's admin, the ECS task
//! metadata endpoint, the agent's own `/healthz`), and `trellis-agent health`, the daemon task's
//! container health check: the images carry no curl for the agent. When the API speaks HTTPS the
//! health check does too, trusting exactly the certificate in the agent's own `--api-tls-cert`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on each request, so a wedged peer cannot eat a caller's deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The agent's API address (where `/healthz` is served).
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:9080")]
    pub api_addr: SocketAddr,
    /// The path to probe (`/readyz` also waits for the first snapshot).
    #[arg(long, default_value = "/healthz")]
    pub path: String,
    /// The API's certificate: probe over HTTPS, accepting exactly this certificate.
    #[arg(long, env = "TRELLIS_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
}

/// Probes the agent: `Ok` when it answers 200, else what went wrong.
pub fn health(args: &HealthArgs) -> Result<(), String> {
    // A wildcard API address is probed on loopback.
    let mut addr = args.api_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let (scheme, answer) = match &args.api_tls_cert {
        None => (
            "http",
            rt.block_on(http(&addr.to_string(), "GET", &args.path)),
        ),
        Some(cert) => ("https", rt.block_on(https_pinned(addr, cert, &args.path))),
    };
    match answer {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("GET {}: HTTP {status}: {}", args.path, body.trim())),
        Err(e) => Err(format!("GET {scheme}://{addr}{}: {e}", args.path)),
    }
}

/// One HTTPS GET to the agent, trusting only the certificate in `cert` (the health check's
/// peer is its own agent; its name does not matter, its certificate does).
async fn https_pinned(
    addr: SocketAddr,
    cert: &std::path::Path,
    path: &str,
) -> Result<(u16, String), String> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let pinned = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{}: no PEM certificate", cert.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        cert: pinned,
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        exchange(tls, &addr.to_string(), "GET", path).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Accepts exactly one certificate (whatever its name or issuer), with valid handshake signatures.
#[derive(Debug)]
struct Pinned {
    cert: rustls_pki_types::CertificateDer<'static>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the agent presents another certificate than --api-tls-cert".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One HTTP/1.1 request with `Connection: close` (so the body ends at EOF; Envoy's admin refuses
/// HTTP/1.0): enough for Envoy's admin and the
/// ECS agent's metadata server, without an HTTP client dependency.
pub(crate) async fn http(
    authority: &str,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let exchange = async {
        let s = TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        exchange(s, authority, method, path).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn exchange(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    authority: &str,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify once the answer is complete.
    if let Err(e) = s.read_to_end(&mut buf).await
        && buf.is_empty()
    {
        return Err(e.to_string());
    }
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("truncated HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("truncated chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "malformed chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nOK\n";
        assert_eq!(parse_response(plain).unwrap(), (200, "OK\n".to_string()));
        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, "abcde".to_string()));
        assert!(parse_response(b"garbage").is_err());
    }
}
