//! A minimal HTTP/1.1 client for loopback and link-local peers (Envoy's admin, the ECS task
//! metadata endpoint, the agent's own `/healthz`), and `trellis-agent health`, the daemon task's
//! container health check: the images carry no curl for the agent.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    match rt.block_on(http(&addr.to_string(), "GET", &args.path)) {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("GET {}: HTTP {status}: {}", args.path, body.trim())),
        Err(e) => Err(format!("GET http://{addr}{}: {e}", args.path)),
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
        let mut s = TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        parse_response(&buf)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
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
