//! Virtual-node policies → what Envoy should do: listener timeouts, connection pools, health
//! checks, outlier detection, access logs, TLS and IP preference. App Mesh semantics live here;
//! `envoy.rs` spells the protos.
//!
//! Where App Mesh applied each policy:
//! - listener timeout, connection pool, listener TLS: the node's own ingress (destination side);
//! - health check, outlier detection: every caller's egress cluster for that listener;
//! - client policy TLS: the caller's egress cluster, from the backend's `clientPolicy`, else the
//!   caller's `backendDefaults`;
//! - access log: every connection manager and TCP proxy of the node's Envoy;
//! - IP preference: the node's own listener bind and local app address (its own preference, else
//!   the mesh's), and DNS resolution of a target (the target's `dns.ipPreference`, else the
//!   mesh's).
//!
//! Choices where App Mesh's documents are silent:
//! - a node-provided service also gets its provider's listener timeouts on the caller's egress
//!   route (else the caller's 15 s default would cut a longer listener timeout short);
//! - IPv6 preferences bind `::` dual-stack (IPv4 callers and the IPv4 REDIRECT keep working) and
//!   reach the app on `::1`; listener names keep App Mesh's `0.0.0.0` spelling either way;
//!   with no preference anywhere DNS is IPv4 only, as App Mesh did;
//! - HTTP health checks expect 200 (Envoy's default); the check's `port` becomes each endpoint's
//!   health-check port;
//! - a caller cluster is per (node, port), so when several backends reach one node with
//!   different client policies, the first backend by name decides its TLS and SNI;
//! - what cannot be served (SDS/ACM certificates or trust) fails closed and is listed in
//!   `Resources::unserved`.

use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::google::protobuf::Duration as PbDuration;

use super::envoy::{self, Bind, CertFiles, Check, Checker, Limits, LogFormat, Lookup, Outlier};
use super::routes::{DEFAULT_IDLE_S, DEFAULT_PER_REQUEST_S};
use crate::model::{
    ClientPolicy, ClientPolicyTls, Duration, HealthCheckPolicy, IpPreference, Listener,
    ListenerTlsMode, MeshState, PortProtocol, SubjectAlternativeNames, VirtualNodeSpec,
};

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn millis(ms: i64) -> Option<PbDuration> {
    envoy::duration(&Duration {
        unit: None,
        value: Some(ms),
    })
}

/// (per-request, idle) for an http/http2/grpc listener: App Mesh's 15 s and 300 s unless set.
pub(super) fn http_timeouts(l: &Listener) -> (Option<PbDuration>, Option<PbDuration>) {
    let t = l.timeout.as_ref();
    let (per_request, idle) = match l.port_mapping.protocol {
        PortProtocol::Http => t
            .and_then(|t| t.http.as_ref())
            .map(|h| (&h.per_request, &h.idle)),
        PortProtocol::Http2 => t
            .and_then(|t| t.http2.as_ref())
            .map(|h| (&h.per_request, &h.idle)),
        PortProtocol::Grpc => t
            .and_then(|t| t.grpc.as_ref())
            .map(|g| (&g.per_request, &g.idle)),
        PortProtocol::Tcp => None,
    }
    .unwrap_or((&None, &None));
    (
        per_request
            .as_ref()
            .and_then(envoy::duration)
            .or_else(|| envoy::seconds(DEFAULT_PER_REQUEST_S)),
        idle.as_ref()
            .and_then(envoy::duration)
            .or_else(|| envoy::seconds(DEFAULT_IDLE_S)),
    )
}

/// A tcp listener's idle timeout: 300 s unless set (Envoy's own default would be 1 h).
pub(super) fn tcp_idle(l: &Listener) -> Option<PbDuration> {
    l.timeout
        .as_ref()
        .and_then(|t| t.tcp.as_ref())
        .and_then(|t| t.idle.as_ref())
        .and_then(envoy::duration)
        .or_else(|| envoy::seconds(DEFAULT_IDLE_S))
}

/// The listener's connection pool as circuit breakers on the local app cluster. HTTP/1 limits
/// connections and queued requests (App Mesh's pending default is 2^31-1), HTTP/2 and gRPC limit
/// concurrent requests (streams), TCP limits connections. A pool for another protocol than the
/// listener's is ignored, as App Mesh's validation does not allow it.
pub(super) fn limits(l: &Listener) -> Option<Limits> {
    let pool = l.connection_pool.as_ref()?;
    match l.port_mapping.protocol {
        PortProtocol::Http => pool.http.as_ref().map(|h| Limits {
            max_connections: Some(u32_of(h.max_connections)),
            max_pending_requests: Some(h.max_pending_requests.map_or(i32::MAX as u32, u32_of)),
            max_requests: None,
        }),
        PortProtocol::Http2 => pool.http2.as_ref().map(|h| Limits {
            max_requests: Some(u32_of(h.max_requests)),
            ..Limits::default()
        }),
        PortProtocol::Grpc => pool.grpc.as_ref().map(|g| Limits {
            max_requests: Some(u32_of(g.max_requests)),
            ..Limits::default()
        }),
        PortProtocol::Tcp => pool.tcp.as_ref().map(|t| Limits {
            max_connections: Some(u32_of(t.max_connections)),
            ..Limits::default()
        }),
    }
}

/// The active health check callers run against the listener `l` of a node, and the port it
/// goes to when that is not the traffic port. Envoy rejects a gRPC check on a cluster that does
/// not speak HTTP/2, so a gRPC check on an http or tcp listener becomes a connect check (noted).
pub(super) fn health_check(
    l: &Listener,
    cluster_proto: PortProtocol,
    notes: &mut Vec<String>,
) -> Option<(Check, Option<u32>)> {
    let h: &HealthCheckPolicy = l.health_check.as_ref()?;
    let h2 = matches!(cluster_proto, PortProtocol::Http2 | PortProtocol::Grpc);
    let path = || h.path.clone().unwrap_or_else(|| "/".into());
    let checker = match h.protocol {
        PortProtocol::Http => Checker::Http {
            path: path(),
            http2: false,
        },
        PortProtocol::Http2 => Checker::Http {
            path: path(),
            http2: true,
        },
        PortProtocol::Grpc if h2 => Checker::Grpc,
        PortProtocol::Grpc => {
            notes.push(format!(
                "listener {}: a grpc health check needs an http2 or grpc listener; checking connections instead",
                l.port_mapping.port
            ));
            Checker::Tcp
        }
        PortProtocol::Tcp => Checker::Tcp,
    };
    let check = Check {
        checker,
        timeout: millis(h.timeout_millis),
        interval: millis(h.interval_millis),
        healthy: u32_of(h.healthy_threshold),
        unhealthy: u32_of(h.unhealthy_threshold),
    };
    let port = h
        .port
        .filter(|p| *p != l.port_mapping.port)
        .and_then(|p| u32::try_from(p).ok());
    Some((check, port))
}

pub(super) fn outlier(l: &Listener) -> Option<Outlier> {
    let o = l.outlier_detection.as_ref()?;
    Some(Outlier {
        consecutive_5xx: u32_of(o.max_server_errors),
        interval: envoy::duration(&o.interval),
        base_ejection_time: envoy::duration(&o.base_ejection_duration),
        max_ejection_percent: u32_of(o.max_ejection_percent).min(100),
    })
}

/// The node's access logs (App Mesh has one, a file), for every filter of its Envoy. A text
/// format gets the newline Envoy does not add.
pub(super) fn access_logs(
    spec: &VirtualNodeSpec,
) -> Vec<envoy_types::pb::envoy::config::accesslog::v3::AccessLog> {
    let Some(file) = spec
        .logging
        .as_ref()
        .and_then(|l| l.access_log.as_ref())
        .and_then(|a| a.file.as_ref())
    else {
        return Vec::new();
    };
    let format = match &file.format {
        Some(f) if f.text.is_some() => {
            let mut text = f.text.clone().unwrap_or_default();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            LogFormat::Text(text)
        }
        Some(f) if f.json.as_ref().is_some_and(|j| !j.is_empty()) => LogFormat::Json(
            f.json
                .iter()
                .flatten()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect(),
        ),
        _ => LogFormat::Default,
    };
    vec![envoy::file_access_log(&file.path, &format)]
}

/// The node's own IP preference: its service discovery's, else the mesh's.
pub(super) fn own_ip_preference(mesh: &MeshState, spec: &VirtualNodeSpec) -> Option<IpPreference> {
    let sd = spec.service_discovery.as_ref();
    sd.and_then(|sd| sd.dns.as_ref())
        .and_then(|d| d.ip_preference)
        .or_else(|| {
            sd.and_then(|sd| sd.aws_cloud_map.as_ref())
                .and_then(|c| c.ip_preference)
        })
        .or_else(|| mesh_ip_preference(mesh))
}

pub(super) fn mesh_ip_preference(mesh: &MeshState) -> Option<IpPreference> {
    mesh.mesh
        .spec
        .service_discovery
        .as_ref()
        .and_then(|sd| sd.ip_preference)
}

/// Listener bind and local app address. IPv6 preferences bind `::` dual-stack (the route
/// manager redirects IPv4 too) and reach the app on `::1`; otherwise `0.0.0.0` and `127.0.0.1`.
pub(super) fn bind(pref: Option<IpPreference>) -> (Bind<'static>, &'static str) {
    match pref {
        Some(IpPreference::Ipv6Preferred | IpPreference::Ipv6Only) => (
            Bind {
                address: "::",
                ipv4_compat: true,
            },
            "::1",
        ),
        _ => (envoy::BIND_V4, "127.0.0.1"),
    }
}

/// DNS lookup family. Without a preference App Mesh resolved IPv4 only; IPv6_PREFERRED is
/// Envoy's AUTO (IPv6 first, then IPv4).
pub(super) fn lookup(pref: Option<IpPreference>) -> Lookup {
    match pref {
        None | Some(IpPreference::Ipv4Only) => Lookup::V4Only,
        Some(IpPreference::Ipv6Only) => Lookup::V6Only,
        Some(IpPreference::Ipv4Preferred) => Lookup::V4Preferred,
        Some(IpPreference::Ipv6Preferred) => Lookup::Auto,
    }
}

fn sans(s: Option<&SubjectAlternativeNames>) -> Vec<String> {
    s.map(|s| s.r#match.exact.clone()).unwrap_or_default()
}

fn alpn(proto: PortProtocol) -> &'static [&'static str] {
    match proto {
        PortProtocol::Http => &["http/1.1"],
        PortProtocol::Http2 | PortProtocol::Grpc => &["h2"],
        PortProtocol::Tcp => &[],
    }
}

/// What a listener's TLS setting asks of its ingress filter chain.
#[derive(Debug)]
pub(super) enum ListenerTls {
    Plain,
    Strict(TransportSocket),
    /// TLS and plaintext on the same port.
    Permissive(TransportSocket),
    /// STRICT with a certificate this control plane cannot serve: no plaintext either.
    Refuse,
}

/// The listener's TLS. Certificates and trust from files are served; SDS and ACM ones are not
/// (no SDS source or ACM PCA here): STRICT then refuses the port rather than fall back to
/// plaintext, PERMISSIVE serves plaintext only, and `notes` says why.
pub(super) fn listener_tls(l: &Listener, notes: &mut Vec<String>) -> ListenerTls {
    let Some(tls) = &l.tls else {
        return ListenerTls::Plain;
    };
    if tls.mode == ListenerTlsMode::Disabled {
        return ListenerTls::Plain;
    }
    let port = l.port_mapping.port;
    let mut unserved = |what: &str| {
        notes.push(format!(
            "listener {port}: TLS {} not served: {what}",
            tls.mode.as_str()
        ));
        if tls.mode == ListenerTlsMode::Strict {
            ListenerTls::Refuse
        } else {
            ListenerTls::Plain
        }
    };
    let Some(cert) = &tls.certificate.file else {
        return unserved(if tls.certificate.sds.is_some() {
            "SDS certificates are not served yet"
        } else {
            "ACM certificates exist only inside AWS App Mesh"
        });
    };
    let validation = match &tls.validation {
        None => None,
        Some(v) => match &v.trust.file {
            Some(f) => Some(envoy::Validation {
                trusted_ca: f.certificate_chain.clone(),
                sans: sans(v.subject_alternative_names.as_ref()),
            }),
            None => return unserved("SDS client-certificate trust is not served yet"),
        },
    };
    let socket = envoy::downstream_tls(
        &CertFiles {
            chain: cert.certificate_chain.clone(),
            key: cert.private_key.clone(),
        },
        validation.as_ref(),
        alpn(l.port_mapping.protocol),
    );
    if tls.mode == ListenerTlsMode::Strict {
        ListenerTls::Strict(socket)
    } else {
        ListenerTls::Permissive(socket)
    }
}

/// The client policy a caller applies to `service`: the backend's own, else its defaults.
pub(super) fn client_policy<'a>(
    backend: Option<&'a ClientPolicy>,
    defaults: Option<&'a ClientPolicy>,
) -> Option<&'a ClientPolicyTls> {
    backend
        .and_then(|p| p.tls.as_ref())
        .or_else(|| defaults.and_then(|p| p.tls.as_ref()))
}

/// What a caller's client policy asks of its cluster to a target port.
#[derive(Debug)]
pub(super) enum ClientTls {
    Plain,
    Tls(TransportSocket),
    /// Enforced TLS whose trust or certificate this control plane cannot serve: no cluster.
    Refuse,
}

/// Client-policy TLS for the cluster to `port`: enforced unless `enforce` is false, only on
/// `ports` when given, verifying the server against the trusted CA file and SANs, with the
/// client certificate for mTLS. SNI is the virtual service's name.
pub(super) fn client_tls(
    policy: Option<&ClientPolicyTls>,
    sni: &str,
    port: u32,
    proto: PortProtocol,
    notes: &mut Vec<String>,
) -> ClientTls {
    let Some(p) = policy else {
        return ClientTls::Plain;
    };
    if p.enforce == Some(false) {
        return ClientTls::Plain;
    }
    if let Some(ports) = &p.ports
        && !ports.is_empty()
        && !ports.contains(&i64::from(port))
    {
        return ClientTls::Plain;
    }
    let mut refuse = |what: &str| {
        notes.push(format!(
            "backend {sni}: client TLS to port {port} not served: {what}"
        ));
        ClientTls::Refuse
    };
    let Some(trust) = &p.validation.trust.file else {
        return refuse(if p.validation.trust.sds.is_some() {
            "SDS trust is not served yet"
        } else {
            "ACM PCA trust exists only inside AWS App Mesh"
        });
    };
    let cert = match &p.certificate {
        None => None,
        Some(c) => match &c.file {
            Some(f) => Some(CertFiles {
                chain: f.certificate_chain.clone(),
                key: f.private_key.clone(),
            }),
            None => return refuse("SDS client certificates are not served yet"),
        },
    };
    ClientTls::Tls(envoy::upstream_tls(
        sni,
        cert.as_ref(),
        &envoy::Validation {
            trusted_ca: trust.certificate_chain.clone(),
            sans: sans(p.validation.subject_alternative_names.as_ref()),
        },
        alpn(proto),
    ))
}
