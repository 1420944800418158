//! Virtual-node policies → what Envoy should do: listener timeouts, connection pools, health
//! checks, outlier detection, access logs, TLS and IP preference. App Mesh semantics live here;
//! `envoy.rs` spells the protos.
//!
//! Where App Mesh applied each policy:
//! - listener timeout, connection pool, listener TLS: the node's own ingress (destination side);
//! - health check, outlier detection: every caller's egress cluster for that listener;
//! - client policy TLS: the caller's egress cluster, from the backend's `clientPolicy`, else the
//!   caller's `backendDefaults`; where none applies, the target listener's TLS mode decides
//!   (TLS without verification toward STRICT and PERMISSIVE listeners);
//! - access log: every connection manager and TCP proxy of the node's Envoy;
//! - IP preference: the node's own listener bind and local app address (its own preference, else
//!   the mesh's), DNS resolution of a target (the target's `dns.ipPreference`, else the mesh's),
//!   the Cloud Map address used (the target's, else the mesh's); with none at all, as
//!   virtual_nodes.md's "Default": DNS IPv6 first then IPv4, Cloud Map's IPv4 address else its
//!   IPv6 one, listeners on IPv4 and the app over IPv4.
//!
//! Choices where App Mesh's documents are silent:
//! - listeners that bind "all IPv4 and IPv6 addresses" bind `::` dual-stack (IPv4 callers and the
//!   IPv4 REDIRECT keep working); listener names keep App Mesh's `0.0.0.0` spelling either way;
//! - a client policy with `enforce: false` does not apply: the server decides, as without one;
//! - HTTP health checks expect 200 (Envoy's default); the check's `port` becomes each endpoint's
//!   health-check port;
//! - a caller cluster is per (node, port), so when several backends reach one node with
//!   different client policies, the first backend by name decides its TLS and SNI;
//! - certificates and trust from SDS are fetched by Envoy from the task's local SDS server (a
//!   SPIRE agent) through the bootstrap cluster `static_cluster_sds_unix_socket`, which
//!   `trellis-agent bootstrap` adds when `APPMESH_SDS_SOCKET_PATH` is set, as App Mesh's image
//!   did; SANs are still matched against the SDS-provided bundle;
//! - ACM certificates and ACM PCA trust are secrets the agent serves on the Envoy's own ADS
//!   stream ([`crate::acm`]), only when the agent serves ACM at all (attested streams) and holds
//!   the ARN; otherwise they fail closed (STRICT port refused, enforced client cluster dropped,
//!   PERMISSIVE plaintext) and are listed in `Resources::unserved`.

use trellis_envoy_api::pb::envoy::config::accesslog::v3::AccessLog;
use trellis_envoy_api::pb::envoy::config::core::v3::TransportSocket;
use trellis_envoy_api::pb::google::protobuf::Duration as PbDuration;

use std::collections::BTreeSet;

use super::acm;
use super::envoy::{self, Bind, Cert, Check, Checker, Limits, LogFormat, Lookup, Outlier, Trust};
use super::routes::{DEFAULT_IDLE_S, DEFAULT_PER_REQUEST_S};
use trellis_model::{
    ClientPolicy, ClientPolicyTls, ClientTlsCertificate, Duration, HealthCheckPolicy, IpPreference,
    Listener, ListenerTls, ListenerTlsAcmCertificate, ListenerTlsCertificate,
    ListenerTlsFileCertificate, ListenerTlsMode, ListenerTlsSdsCertificate,
    ListenerTlsValidationContext, ListenerTlsValidationContextTrust, LoggingFormat, MeshState,
    PortProtocol, SubjectAlternativeNames, TlsValidationContext, TlsValidationContextAcmTrust,
    TlsValidationContextFileTrust, TlsValidationContextSdsTrust, TlsValidationContextTrust,
    VirtualGatewayClientPolicy, VirtualGatewayListener, VirtualGatewayListenerTls,
    VirtualGatewayListenerTlsMode, VirtualGatewayPortProtocol, VirtualGatewaySpec, VirtualNodeSpec,
};

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// An HTTP/1 pool (node or gateway): connections, and pending requests (unbounded when unset).
fn http1_limits(max_connections: i64, max_pending_requests: Option<i64>) -> Limits {
    Limits {
        max_connections: Some(u32_of(max_connections)),
        max_pending_requests: Some(max_pending_requests.map_or(i32::MAX as u32, u32_of)),
        max_requests: None,
    }
}

/// An HTTP/2 or gRPC pool (node or gateway): concurrent requests.
fn request_limits(max_requests: i64) -> Limits {
    Limits {
        max_requests: Some(u32_of(max_requests)),
        ..Limits::default()
    }
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
        PortProtocol::Http => pool
            .http
            .as_ref()
            .map(|h| http1_limits(h.max_connections, h.max_pending_requests)),
        PortProtocol::Http2 => pool.http2.as_ref().map(|h| request_limits(h.max_requests)),
        PortProtocol::Grpc => pool.grpc.as_ref().map(|g| request_limits(g.max_requests)),
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

/// The node's access logs (App Mesh has one, a file), for every filter of its Envoy.
pub(super) fn access_logs(spec: &VirtualNodeSpec) -> Vec<AccessLog> {
    spec.logging
        .as_ref()
        .and_then(|l| l.access_log.as_ref())
        .and_then(|a| a.file.as_ref())
        .map(|f| file_access_logs(&f.path, f.format.as_ref()))
        .unwrap_or_default()
}

/// The gateway's access logs, on every listener's connection manager.
pub(super) fn gateway_access_logs(spec: &VirtualGatewaySpec) -> Vec<AccessLog> {
    spec.logging
        .as_ref()
        .and_then(|l| l.access_log.as_ref())
        .and_then(|a| a.file.as_ref())
        .map(|f| file_access_logs(&f.path, f.format.as_ref()))
        .unwrap_or_default()
}

/// A file access log; a text format gets the newline Envoy does not add.
fn file_access_logs(path: &str, format: Option<&LoggingFormat>) -> Vec<AccessLog> {
    let format = match format {
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
    vec![envoy::file_access_log(path, &format)]
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

/// Listener bind and local app address, as virtual_nodes.md ("IP version preference") lists
/// them: with no preference "The Envoy listeners bind to all IPv4 addresses" and the local app is
/// reached over IPv4; with any preference they "bind to all IPv4 and IPv6 addresses" (`::`
/// dual-stack: the route manager's IPv4 redirect still lands) and the app is reached on `::1` for
/// the IPv6 preferences, `127.0.0.1` for the IPv4 ones.
pub(super) fn bind(pref: Option<IpPreference>) -> (Bind<'static>, &'static str) {
    let dual = Bind {
        address: "::",
        ipv4_compat: true,
    };
    match pref {
        None => (envoy::BIND_V4, "127.0.0.1"),
        Some(IpPreference::Ipv6Preferred | IpPreference::Ipv6Only) => (dual, "::1"),
        Some(IpPreference::Ipv4Preferred | IpPreference::Ipv4Only) => (dual, "127.0.0.1"),
    }
}

/// DNS lookup family (virtual_nodes.md): with no preference, as with IPv6_PREFERRED, "Envoy's
/// DNS resolver prefers IPv6 and falls back to IPv4" (Envoy's AUTO).
pub(super) fn lookup(pref: Option<IpPreference>) -> Lookup {
    match pref {
        None | Some(IpPreference::Ipv6Preferred) => Lookup::Auto,
        Some(IpPreference::Ipv4Only) => Lookup::V4Only,
        Some(IpPreference::Ipv6Only) => Lookup::V6Only,
        Some(IpPreference::Ipv4Preferred) => Lookup::V4Preferred,
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
pub(super) enum ListenerTlsPlan {
    Plain,
    Strict(TransportSocket),
    /// TLS and plaintext on the same port.
    Permissive(TransportSocket),
    /// STRICT with a certificate this control plane cannot serve: no plaintext either.
    Refuse,
}

/// The listener's TLS. Certificates and trust from files or from the local SDS server are
/// served; ACM ones only when `acm` (the ARNs the agent holds) has them: otherwise STRICT
/// refuses the port rather than fall back to plaintext, PERMISSIVE serves plaintext only, and
/// `notes` says why.
pub(super) fn listener_tls(
    tls: Option<&ListenerTls>,
    port: i64,
    proto: PortProtocol,
    acm: Option<&BTreeSet<String>>,
    notes: &mut Vec<String>,
) -> ListenerTlsPlan {
    let Some(tls) = tls else {
        return ListenerTlsPlan::Plain;
    };
    if tls.mode == ListenerTlsMode::Disabled {
        return ListenerTlsPlan::Plain;
    }
    let mut unserved = |what: &str| {
        notes.push(format!(
            "listener {port}: TLS {} not served: {what}",
            tls.mode.as_str()
        ));
        if tls.mode == ListenerTlsMode::Strict {
            ListenerTlsPlan::Refuse
        } else {
            ListenerTlsPlan::Plain
        }
    };
    let cert = if let Some(f) = &tls.certificate.file {
        Cert::Files {
            chain: f.certificate_chain.clone(),
            key: f.private_key.clone(),
        }
    } else if let Some(sds) = &tls.certificate.sds {
        Cert::Sds(sds.secret_name.clone())
    } else if let Some(a) = &tls.certificate.acm {
        let arn = &a.certificate_arn;
        if let Err(why) = acm::held(acm, std::slice::from_ref(arn)) {
            return unserved(&format!("ACM certificate: {why}"));
        }
        Cert::Acm(acm::certificate_secret(arn))
    } else {
        return unserved("no certificate");
    };
    let validation = match &tls.validation {
        None => None,
        Some(v) => {
            let trust = if let Some(f) = &v.trust.file {
                Trust::File(f.certificate_chain.clone())
            } else if let Some(sds) = &v.trust.sds {
                Trust::Sds(sds.secret_name.clone())
            } else {
                return unserved("client-certificate validation names no trust");
            };
            Some(envoy::Validation {
                trust,
                sans: sans(v.subject_alternative_names.as_ref()),
            })
        }
    };
    let socket = envoy::downstream_tls(&cert, validation.as_ref(), alpn(proto));
    if tls.mode == ListenerTlsMode::Strict {
        ListenerTlsPlan::Strict(socket)
    } else {
        ListenerTlsPlan::Permissive(socket)
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
    /// No client policy applies: the server's listener decides ([`server_tls`]).
    ServerDecides,
    Tls(TransportSocket),
    /// Enforced TLS whose trust or certificate this control plane cannot serve: no cluster.
    Refuse,
}

/// Client-policy TLS for the cluster to `port`: enforced unless `enforce` is false, only on
/// `ports` when given (tls.md: "When a client policy is enforcing the use of TLS, and one of the
/// ports in the client policy matches the port of the server's policy, the client policy is
/// used"), verifying the server against the trusted CA and SANs, with the client certificate for
/// mTLS. SNI is the virtual service's name. Without SANs in the policy the server must present
/// the service-discovery name of `target` (tls.md: "If you don't specify SANs on the originating
/// mesh endpoint, the SAN on the certificate provided by the terminating endpoint must match the
/// mesh endpoint service discovery configuration").
pub(super) fn client_tls(
    policy: Option<&ClientPolicyTls>,
    sni: &str,
    port: u32,
    proto: PortProtocol,
    target: Option<&VirtualNodeSpec>,
    acm: Option<&BTreeSet<String>>,
    notes: &mut Vec<String>,
) -> ClientTls {
    let Some(p) = policy else {
        return ClientTls::ServerDecides;
    };
    if p.enforce == Some(false) {
        return ClientTls::ServerDecides;
    }
    if let Some(ports) = &p.ports
        && !ports.is_empty()
        && !ports.contains(&i64::from(port))
    {
        return ClientTls::ServerDecides;
    }
    let mut refuse = |what: &str| {
        notes.push(format!(
            "backend {sni}: client TLS to port {port} not served: {what}"
        ));
        ClientTls::Refuse
    };
    let trust = if let Some(f) = &p.validation.trust.file {
        Trust::File(f.certificate_chain.clone())
    } else if let Some(sds) = &p.validation.trust.sds {
        Trust::Sds(sds.secret_name.clone())
    } else if let Some(a) = &p.validation.trust.acm {
        let arns = &a.certificate_authority_arns;
        if let Err(why) = acm::held(acm, arns) {
            return refuse(&format!("ACM PCA trust: {why}"));
        }
        Trust::Acm(acm::trust_secret(arns))
    } else {
        return refuse("no trust");
    };
    let cert = p.certificate.as_ref().and_then(|c| {
        c.file
            .as_ref()
            .map(|f| Cert::Files {
                chain: f.certificate_chain.clone(),
                key: f.private_key.clone(),
            })
            .or_else(|| c.sds.as_ref().map(|s| Cert::Sds(s.secret_name.clone())))
    });
    let mut sans = sans(p.validation.subject_alternative_names.as_ref());
    if sans.is_empty() {
        sans.extend(target.and_then(discovery_name));
    }
    ClientTls::Tls(envoy::upstream_tls(
        sni,
        cert.as_ref(),
        &envoy::Validation { trust, sans },
        alpn(proto),
    ))
}

/// The TLS a caller negotiates with a node's listener when none of its client policies applies:
/// the server decides (tls.md, "Without client policies": "If a client has not specified a
/// matching client policy, and a server has been configured with TLS modes STRICT or
/// PERMISSIVE, the proxies will be configured to negotiate TLS" and, for certificates from files,
/// "the certificate of the server is not validated"). Certificates from SDS are treated the same
/// (App Mesh documents none; without a client policy the caller has no trust to validate with).
/// An ACM certificate counts only when `acm` (the ARNs the agent holds) has it: else the
/// listener is plaintext or refused, so plain.
/// `sni`: the target's service-discovery name, the name its certificate carries.
pub(super) fn server_tls(
    l: &Listener,
    sni: &str,
    proto: PortProtocol,
    acm: Option<&BTreeSet<String>>,
) -> Option<TransportSocket> {
    let tls = l.tls.as_ref()?;
    let served = tls.certificate.file.is_some()
        || tls.certificate.sds.is_some()
        || tls
            .certificate
            .acm
            .as_ref()
            .is_some_and(|a| acm::held(acm, std::slice::from_ref(&a.certificate_arn)).is_ok());
    (tls.mode != ListenerTlsMode::Disabled && served)
        .then(|| envoy::upstream_tls_unverified(sni, alpn(proto)))
}

/// The name a node's certificate must carry for callers (tls.md, "Certificate requirements"):
/// its DNS hostname, or `SERVICE.NAMESPACE` for Cloud Map.
pub(super) fn discovery_name(spec: &VirtualNodeSpec) -> Option<String> {
    let sd = spec.service_discovery.as_ref()?;
    if let Some(dns) = &sd.dns {
        return Some(dns.hostname.clone());
    }
    sd.aws_cloud_map
        .as_ref()
        .map(|c| format!("{}.{}", c.service_name, c.namespace_name))
}

// === Virtual gateways ===
//
// A gateway listener's policies are a node listener's, seen from the gateway: its TLS terminates
// client connections on the listener, its connection pool limits what the gateway sends to the
// services behind the listener (circuit breakers on those clusters, as a node's pool limits what
// reaches its app), its backend defaults' client policy is a node's `backendDefaults`. The
// gateway types mirror the node types field for field; they are converted once, here, so TLS has
// one implementation.

pub(super) fn gateway_proto(p: VirtualGatewayPortProtocol) -> PortProtocol {
    match p {
        VirtualGatewayPortProtocol::Http => PortProtocol::Http,
        VirtualGatewayPortProtocol::Http2 => PortProtocol::Http2,
        VirtualGatewayPortProtocol::Grpc => PortProtocol::Grpc,
    }
}

/// A gateway listener's TLS as the node listener TLS it mirrors.
pub(super) fn gateway_listener_tls(t: &VirtualGatewayListenerTls) -> ListenerTls {
    let c = &t.certificate;
    ListenerTls {
        certificate: ListenerTlsCertificate {
            acm: c.acm.as_ref().map(|a| ListenerTlsAcmCertificate {
                certificate_arn: a.certificate_arn.clone(),
            }),
            file: c.file.as_ref().map(|f| ListenerTlsFileCertificate {
                certificate_chain: f.certificate_chain.clone(),
                private_key: f.private_key.clone(),
            }),
            sds: c.sds.as_ref().map(|s| ListenerTlsSdsCertificate {
                secret_name: s.secret_name.clone(),
            }),
        },
        mode: match t.mode {
            VirtualGatewayListenerTlsMode::Strict => ListenerTlsMode::Strict,
            VirtualGatewayListenerTlsMode::Permissive => ListenerTlsMode::Permissive,
            VirtualGatewayListenerTlsMode::Disabled => ListenerTlsMode::Disabled,
        },
        validation: t.validation.as_ref().map(|v| ListenerTlsValidationContext {
            subject_alternative_names: v.subject_alternative_names.clone(),
            trust: ListenerTlsValidationContextTrust {
                file: v
                    .trust
                    .file
                    .as_ref()
                    .map(|f| TlsValidationContextFileTrust {
                        certificate_chain: f.certificate_chain.clone(),
                    }),
                sds: v.trust.sds.as_ref().map(|s| TlsValidationContextSdsTrust {
                    secret_name: s.secret_name.clone(),
                }),
            },
        }),
    }
}

/// A gateway's backend-defaults client policy as the node client policy it mirrors.
pub(super) fn gateway_client_policy(p: &VirtualGatewayClientPolicy) -> ClientPolicy {
    ClientPolicy {
        tls: p.tls.as_ref().map(|t| ClientPolicyTls {
            certificate: t.certificate.as_ref().map(|c| ClientTlsCertificate {
                file: c.file.as_ref().map(|f| ListenerTlsFileCertificate {
                    certificate_chain: f.certificate_chain.clone(),
                    private_key: f.private_key.clone(),
                }),
                sds: c.sds.as_ref().map(|s| ListenerTlsSdsCertificate {
                    secret_name: s.secret_name.clone(),
                }),
            }),
            enforce: t.enforce,
            ports: t.ports.clone(),
            validation: TlsValidationContext {
                subject_alternative_names: t.validation.subject_alternative_names.clone(),
                trust: TlsValidationContextTrust {
                    acm: t
                        .validation
                        .trust
                        .acm
                        .as_ref()
                        .map(|a| TlsValidationContextAcmTrust {
                            certificate_authority_arns: a.certificate_authority_arns.clone(),
                        }),
                    file: t
                        .validation
                        .trust
                        .file
                        .as_ref()
                        .map(|f| TlsValidationContextFileTrust {
                            certificate_chain: f.certificate_chain.clone(),
                        }),
                    sds: t
                        .validation
                        .trust
                        .sds
                        .as_ref()
                        .map(|s| TlsValidationContextSdsTrust {
                            secret_name: s.secret_name.clone(),
                        }),
                },
            },
        }),
    }
}

/// A gateway listener's connection pool as circuit breakers on the clusters its routes reach:
/// HTTP/1 limits connections and queued requests (pending default 2^31-1, as App Mesh), HTTP/2
/// and gRPC limit concurrent requests. A pool for another protocol than the listener's is
/// ignored, as App Mesh's validation does not allow it.
pub(super) fn gateway_limits(l: &VirtualGatewayListener) -> Option<Limits> {
    let pool = l.connection_pool.as_ref()?;
    match l.port_mapping.protocol {
        VirtualGatewayPortProtocol::Http => pool
            .http
            .as_ref()
            .map(|h| http1_limits(h.max_connections, h.max_pending_requests)),
        VirtualGatewayPortProtocol::Http2 => {
            pool.http2.as_ref().map(|h| request_limits(h.max_requests))
        }
        VirtualGatewayPortProtocol::Grpc => {
            pool.grpc.as_ref().map(|g| request_limits(g.max_requests))
        }
    }
}

/// The path a gateway listener answers its own health checks on (App Mesh's gateway health
/// check describes how the gateway itself is checked, e.g. by a load balancer's target group):
/// the gateway's Envoy answers `path` itself, 200 while it serves and 503 once it drains, before
/// any gateway route sees it. An http or http2 check on the listener's own port; a check on
/// another port or with gRPC has nothing here to answer it (noted).
pub(super) fn gateway_health_path(
    l: &VirtualGatewayListener,
    notes: &mut Vec<String>,
) -> Option<String> {
    let h = l.health_check.as_ref()?;
    let port = l.port_mapping.port;
    if let Some(other) = h.port.filter(|p| *p != port) {
        notes.push(format!(
            "gateway listener {port}: health check on port {other} has no listener to answer it"
        ));
        return None;
    }
    match h.protocol {
        VirtualGatewayPortProtocol::Http | VirtualGatewayPortProtocol::Http2 => {
            Some(h.path.clone().unwrap_or_else(|| "/".into()))
        }
        VirtualGatewayPortProtocol::Grpc => {
            notes.push(format!(
                "gateway listener {port}: a grpc health check is answered by the services, not the gateway"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests;
