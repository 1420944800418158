//! The request to explain, as a client would send it: a URL (`http`, `https`, `grpc` or `tcp`),
//! a method and headers, turned into what Envoy sees (destination port, `Host`, `:path`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Error;

/// How the client talks to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    /// TLS from the client (Envoy sees SNI, not HTTP, unless it terminates TLS).
    Https,
    /// HTTP/2 `POST` with `content-type: application/grpc`.
    Grpc,
    /// A plain TCP connection: only the destination matters.
    Tcp,
}

impl Scheme {
    fn default_port(self) -> Option<u16> {
        match self {
            Scheme::Http | Scheme::Grpc => Some(80),
            Scheme::Https => Some(443),
            Scheme::Tcp => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Grpc => "grpc",
            Scheme::Tcp => "tcp",
        }
    }
}

/// One request, parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub scheme: Scheme,
    /// The URL's host, lowercased (a name or an IP address).
    pub host: String,
    pub port: u16,
    /// `:path`: the path and query as sent (`/` when the URL has none).
    pub path: String,
    pub method: String,
    /// The `Host` (`:authority`) header: the URL's host, with the port unless it is the scheme's
    /// default (as curl sends it), or a `Host` header given explicitly.
    pub authority: String,
    /// Every other header, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The address the client connects to, when known (an IP in the URL, or given).
    pub destination: Option<IpAddr>,
}

impl Request {
    /// Parses `url` with an optional method and `name: value` headers.
    pub fn parse(url: &str, method: Option<&str>, headers: &[String]) -> Result<Self, Error> {
        let bad = |rule: &str| Error::Url {
            url: url.to_string(),
            rule: rule.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("must start with http://, https://, grpc:// or tcp://"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "grpc" => Scheme::Grpc,
            "tcp" => Scheme::Tcp,
            _ => return Err(bad("the scheme must be http, https, grpc or tcp")),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (hostport, tail) = rest.split_at(split);
        if hostport.contains('@') {
            return Err(bad(
                "user information (user@host) is not part of what Envoy routes on",
            ));
        }
        let (host, port) = split_host_port(hostport).ok_or_else(|| {
            bad("the host must be a name, an IPv4 address or [an IPv6 address], with an optional :port (1-65535)")
        })?;
        let port = match port.or(scheme.default_port()) {
            Some(p) => p,
            None => return Err(bad("a tcp:// URL needs a port")),
        };
        let path = match tail {
            "" => "/".to_string(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_string(),
        };
        let path = path.split('#').next().unwrap_or("/").to_string();
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad(
                "the path may not hold spaces or control characters (percent-encode them)",
            ));
        }
        if scheme == Scheme::Tcp && path != "/" {
            return Err(bad("a tcp:// URL has no path"));
        }
        let method = match (method, scheme) {
            (Some(m), _) => {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(Error::Method(m.to_string()));
                }
                m.to_ascii_uppercase()
            }
            (None, Scheme::Grpc) => "POST".to_string(),
            (None, _) => "GET".to_string(),
        };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let mut authority = match scheme.default_port() {
            Some(d) if d == port => bracketed,
            _ => format!("{bracketed}:{port}"),
        };
        let mut parsed = Vec::new();
        if scheme == Scheme::Grpc {
            parsed.push(("content-type".to_string(), "application/grpc".to_string()));
            parsed.push(("te".to_string(), "trailers".to_string()));
        }
        for h in headers {
            let (name, value) = h.split_once(':').ok_or_else(|| Error::Header {
                header: h.clone(),
                rule: "must be 'name: value'".into(),
            })?;
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty()
                || name.starts_with(':')
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            {
                return Err(Error::Header {
                    header: h.clone(),
                    rule:
                        "the name must be a token (pseudo-headers come from the URL and --method)"
                            .into(),
                });
            }
            let value = value.trim().to_string();
            if value.bytes().any(|b| b < b' ' && b != b'\t') {
                return Err(Error::Header {
                    header: h.clone(),
                    rule: "the value may not hold control characters".into(),
                });
            }
            if name == "host" {
                authority = value;
                continue;
            }
            // A header given again replaces a default (gRPC's content-type).
            if scheme == Scheme::Grpc && name == "content-type" {
                parsed.retain(|(n, _)| n != "content-type");
            }
            parsed.push((name, value));
        }
        let destination = host.parse::<IpAddr>().ok();
        Ok(Request {
            scheme,
            host,
            port,
            path,
            method,
            authority,
            headers: parsed,
            destination,
        })
    }

    /// The URL as the client called it.
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.scheme {
            Scheme::Tcp => format!("tcp://{host}:{}", self.port),
            s => format!("{}://{host}:{}{}", s.as_str(), self.port, self.path),
        }
    }

    /// Whether Envoy would see a TLS handshake (SNI) rather than HTTP.
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// Whether Envoy speaks HTTP with the client at all.
    pub fn is_http(&self) -> bool {
        matches!(self.scheme, Scheme::Http | Scheme::Grpc)
    }
}

/// `host[:port]` or `[v6][:port]`; the host lowercased and checked.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0)?),
    };
    let ok = !host.is_empty()
        && (host.parse::<IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
    ok.then(|| (host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_becomes_what_envoy_sees() {
        let r = Request::parse("http://Back.Local:8080/a/b?x=1#frag", None, &[]).unwrap();
        assert_eq!((r.host.as_str(), r.port), ("back.local", 8080));
        assert_eq!(r.path, "/a/b?x=1");
        assert_eq!(r.authority, "back.local:8080");
        assert_eq!(r.method, "GET");
        let r = Request::parse("http://back.local", Some("post"), &["X-Canary: 1".into()]).unwrap();
        assert_eq!(
            (r.port, r.path.as_str(), r.authority.as_str()),
            (80, "/", "back.local")
        );
        assert_eq!(r.method, "POST");
        assert_eq!(r.headers, vec![("x-canary".to_string(), "1".to_string())]);
        let r = Request::parse("grpc://svc:50051/pkg.Svc/Get", None, &[]).unwrap();
        assert_eq!(r.method, "POST");
        assert!(
            r.headers
                .contains(&("content-type".into(), "application/grpc".into()))
        );
        let r = Request::parse("http://10.0.0.5:9080/", None, &["host: a.b".into()]).unwrap();
        assert_eq!(r.destination, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(r.authority, "a.b");
        let r = Request::parse("tcp://[fd00::1]:5432", None, &[]).unwrap();
        assert_eq!((r.host.as_str(), r.port), ("fd00::1", 5432));
    }

    #[test]
    fn bad_input_names_the_part_and_the_rule() {
        for (url, part) in [
            ("back.local/x", "must start with"),
            ("ftp://a/", "scheme"),
            ("http://a:0/", "port"),
            ("http://a:99999/", "port"),
            ("http://a b/", "host"),
            ("tcp://a", "needs a port"),
            ("http://u@a/", "user information"),
        ] {
            let e = Request::parse(url, None, &[]).unwrap_err().to_string();
            assert!(e.contains(part), "{url}: {e}");
        }
        let e = Request::parse("http://a/", None, &["nocolon".into()]).unwrap_err();
        assert!(e.to_string().contains("'name: value'"), "{e}");
        let e = Request::parse("http://a/", Some("GE T"), &[]).unwrap_err();
        assert!(e.to_string().contains("method"), "{e}");
    }
}
