//! Builders for the Envoy protos the translation emits. The only place that spells out proto
//! structure, so the translation above reads as App Mesh semantics.

use prost::{Message, Name};
use trellis_envoy_api::pack_any;
use trellis_envoy_api::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use trellis_envoy_api::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, circuit_breakers, cluster,
};
use trellis_envoy_api::pb::envoy::config::core::v3::Address;
use trellis_envoy_api::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiConfigSource, ApiVersion, CidrRange, ConfigSource, DataSource,
    GrpcService, HealthCheck, Http2ProtocolOptions, SocketAddress, SubstitutionFormatString,
    TrafficDirection, TransportSocket, address, api_config_source, config_source, data_source,
    grpc_service, health_check, socket_address, substitution_format_string, transport_socket,
};
use trellis_envoy_api::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, endpoint, lb_endpoint,
};
use trellis_envoy_api::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
    ListenerFilterChainMatchPredicate, filter, listener_filter,
};
use trellis_envoy_api::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteMatch, VirtualHost, route, route_action, route_match,
};
use trellis_envoy_api::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use trellis_envoy_api::pb::envoy::extensions::filters::http::router::v3::Router;
use trellis_envoy_api::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use trellis_envoy_api::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use trellis_envoy_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use trellis_envoy_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy,
};
use trellis_envoy_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context, secret,
    subject_alt_name_matcher::SanType,
};
use trellis_envoy_api::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use trellis_envoy_api::pb::envoy::r#type::v3::CodecClientType;
use trellis_envoy_api::pb::google::protobuf::{Any, BoolValue, Struct, Value, value};
use trellis_envoy_api::pb::google::protobuf::{Duration, UInt32Value};

use trellis_model::PortProtocol;

/// App Mesh's defaults: 1 s connect timeout, 15 s per-request timeout.
const CONNECT_TIMEOUT_S: i64 = 1;
const ROUTE_TIMEOUT_S: i64 = 15;

pub(super) fn seconds(s: i64) -> Option<Duration> {
    Some(Duration {
        seconds: s,
        nanos: 0,
    })
}

/// An App Mesh duration (value + unit, milliseconds when no unit) as a protobuf duration.
pub(super) fn duration(d: &trellis_model::Duration) -> Option<Duration> {
    let v = d.value?;
    let ms = match d.unit.unwrap_or(trellis_model::DurationUnit::Ms) {
        trellis_model::DurationUnit::S => v.saturating_mul(1000),
        trellis_model::DurationUnit::Ms => v,
    };
    Some(Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    })
}

fn socket(host: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn load_assignment(name: &str, host: &str, port: u32) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket(host, port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every cluster starts with App Mesh's circuit breakers (envoy-defaults.md, "Default circuit
/// breaker": all four limits 2147483647); a connection pool lowers the limits it names.
fn base_cluster(name: &str, kind: cluster::DiscoveryType, proto: PortProtocol) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: seconds(CONNECT_TIMEOUT_S),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        circuit_breakers: Some(circuit_breakers_of(Limits::default())),
        ..Default::default()
    };
    if matches!(proto, PortProtocol::Http2 | PortProtocol::Grpc) {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Http2ProtocolOptions::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(opts),
        );
    }
    c
}

/// The local app behind an ingress listener.
pub(super) fn static_cluster(name: &str, host: &str, port: u32, proto: PortProtocol) -> Cluster {
    Cluster {
        load_assignment: Some(load_assignment(name, host, port)),
        ..base_cluster(name, cluster::DiscoveryType::Static, proto)
    }
}

/// DNS service discovery: LOADBALANCER → LOGICAL_DNS, ENDPOINTS → STRICT_DNS, as App Mesh did.
pub(super) fn dns_cluster(
    name: &str,
    host: &str,
    port: u32,
    proto: PortProtocol,
    strict: bool,
) -> Cluster {
    let kind = if strict {
        cluster::DiscoveryType::StrictDns
    } else {
        cluster::DiscoveryType::LogicalDns
    };
    Cluster {
        load_assignment: Some(load_assignment(name, host, port)),
        ..base_cluster(name, kind, proto)
    }
}

/// Endpoints come over ADS (Cloud Map discovery).
pub(super) fn eds_cluster(name: &str, proto: PortProtocol) -> Cluster {
    Cluster {
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        ..base_cluster(name, cluster::DiscoveryType::Eds, proto)
    }
}

/// ALLOW_ALL's passthrough: connect to wherever the app was connecting.
pub(super) fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..base_cluster(name, cluster::DiscoveryType::OriginalDst, PortProtocol::Tcp)
    }
}

// ---- Virtual-node policies: what the translation decided, spelled as Envoy protos. ----

/// How a DNS cluster resolves its hostname (App Mesh's IP preference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    V4Only,
    V6Only,
    V4Preferred,
    /// IPv6 first, IPv4 when there is no IPv6 address.
    Auto,
}

pub(super) fn set_dns_lookup(c: &mut Cluster, lookup: Lookup) {
    let family = match lookup {
        Lookup::V4Only => cluster::DnsLookupFamily::V4Only,
        Lookup::V6Only => cluster::DnsLookupFamily::V6Only,
        Lookup::V4Preferred => cluster::DnsLookupFamily::V4Preferred,
        Lookup::Auto => cluster::DnsLookupFamily::Auto,
    };
    c.dns_lookup_family = family as i32;
}

/// App Mesh's value for a circuit-breaker limit it does not want to bind: i32::MAX, the
/// 2147483647 of envoy-defaults.md (Envoy's own defaults would be 1024 connections, pending and
/// requests and 3 concurrent retries).
pub(super) const UNLIMITED: u32 = i32::MAX as u32;

/// Circuit-breaker limits at default priority (a connection pool's); `None` is App Mesh's
/// [`UNLIMITED`]. Retries are never limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
}

fn circuit_breakers_of(l: Limits) -> CircuitBreakers {
    let v = |n: Option<u32>| {
        Some(UInt32Value {
            value: n.unwrap_or(UNLIMITED),
        })
    };
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: v(l.max_connections),
            max_pending_requests: v(l.max_pending_requests),
            max_requests: v(l.max_requests),
            max_retries: v(None),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A connection pool's limits on `c`, App Mesh's unlimited value for the rest.
pub(super) fn set_circuit_breakers(c: &mut Cluster, l: Limits) {
    c.circuit_breakers = Some(circuit_breakers_of(l));
}

/// What an active health check sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Checker {
    Http {
        path: String,
        http2: bool,
    },
    Grpc,
    /// Connect only.
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Check {
    pub checker: Checker,
    pub timeout: Option<Duration>,
    pub interval: Option<Duration>,
    pub healthy: u32,
    pub unhealthy: u32,
}

pub(super) fn set_health_check(c: &mut Cluster, check: Check) {
    let checker = match check.checker {
        Checker::Http { path, http2 } => {
            health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
                path,
                codec_client_type: if http2 {
                    CodecClientType::Http2 as i32
                } else {
                    CodecClientType::Http1 as i32
                },
                ..Default::default()
            })
        }
        Checker::Grpc => {
            health_check::HealthChecker::GrpcHealthCheck(health_check::GrpcHealthCheck::default())
        }
        Checker::Tcp => {
            health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default())
        }
    };
    c.health_checks = vec![HealthCheck {
        timeout: check.timeout,
        interval: check.interval,
        healthy_threshold: Some(UInt32Value {
            value: check.healthy,
        }),
        unhealthy_threshold: Some(UInt32Value {
            value: check.unhealthy,
        }),
        health_checker: Some(checker),
        ..Default::default()
    }];
}

/// Health checks go to `port` on every endpoint instead of the traffic port.
pub(super) fn set_health_check_port(a: &mut ClusterLoadAssignment, port: u32) {
    for e in a
        .endpoints
        .iter_mut()
        .flat_map(|l| l.lb_endpoints.iter_mut())
    {
        if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &mut e.host_identifier {
            ep.health_check_config = Some(endpoint::HealthCheckConfig {
                port_value: port,
                ..Default::default()
            });
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Outlier {
    pub consecutive_5xx: u32,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: u32,
}

/// Consecutive 5xx ejection only: success-rate ejection (on by default in Envoy) is not App Mesh's.
pub(super) fn set_outlier_detection(c: &mut Cluster, o: Outlier) {
    c.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: Some(UInt32Value {
            value: o.consecutive_5xx,
        }),
        enforcing_consecutive_5xx: Some(UInt32Value { value: 100 }),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        interval: o.interval,
        base_ejection_time: o.base_ejection_time,
        max_ejection_percent: Some(UInt32Value {
            value: o.max_ejection_percent,
        }),
        ..Default::default()
    });
}

/// Trellis's outlier detection where a listener sets none: a host whose connections fail 5 times
/// in a row (refused, timed out, reset: errors raised by the caller's Envoy, never an app's answer)
/// is ejected for 30 s, longer each time, at most half of the hosts (Envoy's 10 % would eject none
/// of a three-task service). Answers, 5xx
/// included, never eject (App Mesh had no outlier detection by default); this only stops callers
/// from paying a connect timeout on every request that picks a task gone without deregistering.
pub(super) fn set_connection_failure_outlier_detection(c: &mut Cluster) {
    c.outlier_detection = Some(OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: Some(UInt32Value { value: 5 }),
        enforcing_consecutive_local_origin_failure: Some(UInt32Value { value: 100 }),
        enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }),
        enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 0 }),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        enforcing_local_origin_success_rate: Some(UInt32Value { value: 0 }),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..Default::default()
    });
}

/// An access log line's format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum LogFormat {
    /// Envoy's default format.
    Default,
    Text(String),
    /// Keys and their command-operator values, in this order.
    Json(Vec<(String, String)>),
}

/// A file access log. JSON formats are encoded one key per message and concatenated (protobuf
/// merges repeated messages): `Struct` is a `HashMap`, whose order would make the resource's
/// content hash, and so its version, change from run to run.
pub(super) fn file_access_log(path: &str, format: &LogFormat) -> AccessLog {
    let one = |f: Option<SubstitutionFormatString>| FileAccessLog {
        path: path.to_string(),
        access_log_format: f.map(file_access_log::AccessLogFormat::LogFormat),
    };
    let value = match format {
        LogFormat::Default => one(None).encode_to_vec(),
        LogFormat::Text(text) => one(Some(SubstitutionFormatString {
            format: Some(substitution_format_string::Format::TextFormatSource(
                DataSource {
                    specifier: Some(data_source::Specifier::InlineString(text.clone())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }))
        .encode_to_vec(),
        LogFormat::Json(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| {
                let mut s = Struct::default();
                s.fields.insert(
                    k.clone(),
                    Value {
                        kind: Some(value::Kind::StringValue(v.clone())),
                    },
                );
                one(Some(SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::JsonFormat(s)),
                    ..Default::default()
                }))
                .encode_to_vec()
            })
            .collect(),
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: FileAccessLog::type_url(),
            value,
        })),
        ..Default::default()
    }
}

/// The bootstrap cluster that reaches the local SDS server (a SPIRE agent) over the Unix socket
/// `APPMESH_SDS_SOCKET_PATH`; the name is the one App Mesh's Envoy image gave it.
pub const SDS_CLUSTER: &str = "static_cluster_sds_unix_socket";

/// Where a certificate and its key come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Cert {
    Files {
        chain: String,
        key: String,
    },
    /// A secret of this name from the local SDS server.
    Sds(String),
    /// An ACM certificate, a secret of this name the agent serves over ADS (only to an attested
    /// Envoy: `acm::certificate_secret`).
    Acm(String),
}

/// Where the trusted CA bundle comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Trust {
    File(String),
    /// A validation-context secret of this name from the local SDS server.
    Sds(String),
    /// ACM PCA certificates, a validation-context secret of this name the agent serves over ADS.
    Acm(String),
}

/// Peer validation: a CA bundle and, optionally, names one of the peer's SANs must equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Validation {
    pub trust: Trust,
    pub sans: Vec<String>,
}

fn file(path: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    })
}

/// A secret fetched over SDS from the bootstrap's [`SDS_CLUSTER`], independent of ADS: the SDS
/// server is local to the task and owns the secrets; the agent never sees them.
fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// A secret the agent itself serves on the Envoy's ADS stream (ACM material): no other source
/// to reach, and it arrives on the stream the agent attested.
fn ads_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                AggregatedConfigSource {},
            )),
            ..Default::default()
        }),
    }
}

fn inline(text: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_string())),
        ..Default::default()
    })
}

/// A certificate secret: the PEM chain (leaf first) and the PEM private key, inline.
pub(super) fn certificate_secret(name: &str, chain: &str, key: &str) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// A validation-context secret: the trusted CA certificates (PEM), inline.
pub(super) fn trust_secret(name: &str, cas: &str) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(cas),
                ..Default::default()
            },
        )),
    }
}

fn common_tls(
    cert: Option<&Cert>,
    validation: Option<&Validation>,
    alpn: &[&str],
) -> CommonTlsContext {
    // App Mesh names may be DNS names or SPIFFE URIs; either SAN type may carry them.
    let sans = validation
        .into_iter()
        .flat_map(|v| &v.sans)
        .flat_map(|name| {
            [SanType::Dns, SanType::Uri].map(|t| SubjectAltNameMatcher {
                san_type: t as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(name.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect();
    let (tls_certificates, tls_certificate_sds_secret_configs) = match cert {
        None => (vec![], vec![]),
        Some(Cert::Files { chain, key }) => (
            vec![TlsCertificate {
                certificate_chain: file(chain),
                private_key: file(key),
                ..Default::default()
            }],
            vec![],
        ),
        Some(Cert::Sds(name)) => (vec![], vec![sds_secret(name)]),
        Some(Cert::Acm(name)) => (vec![], vec![ads_secret(name)]),
    };
    // SDS trust keeps the SAN matchers here: the SDS bundle is merged into this default context.
    let validation_context_type = validation.map(|v| match &v.trust {
        Trust::File(ca) => common_tls_context::ValidationContextType::ValidationContext(
            CertificateValidationContext {
                trusted_ca: file(ca),
                match_typed_subject_alt_names: sans,
                ..Default::default()
            },
        ),
        Trust::Sds(name) => common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds_secret(name)),
                ..Default::default()
            },
        ),
        Trust::Acm(name) => common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(ads_secret(name)),
                ..Default::default()
            },
        ),
    });
    CommonTlsContext {
        tls_certificates,
        tls_certificate_sds_secret_configs,
        validation_context_type,
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// TLS termination on a listener; with `validation`, clients must present a trusted certificate.
pub(super) fn downstream_tls(
    cert: &Cert,
    validation: Option<&Validation>,
    alpn: &[&str],
) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common_tls(Some(cert), validation, alpn)),
        require_client_certificate: validation.map(|_| BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

/// TLS origination that does not verify the server: what App Mesh gave a caller with no client
/// policy for a server whose listener terminates TLS with a file (or SDS) certificate (tls.md:
/// "configures a client to negotiate TLS, but the certificate of the server is not validated").
pub(super) fn upstream_tls_unverified(sni: &str, alpn: &[&str]) -> TransportSocket {
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(common_tls(None, None, alpn)),
        sni: sni.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

/// TLS origination from a cluster, verifying the server; `cert` is presented for mTLS.
pub(super) fn upstream_tls(
    sni: &str,
    cert: Option<&Cert>,
    validation: &Validation,
    alpn: &[&str],
) -> TransportSocket {
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(common_tls(cert, Some(validation), alpn)),
        sni: sni.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

pub(super) fn set_transport_socket(c: &mut Cluster, socket: TransportSocket) {
    c.transport_socket = Some(socket);
}

/// A virtual host with one catch-all route to `cluster` and the given timeouts.
pub(super) fn virtual_host_timed(
    name: &str,
    domains: Vec<String>,
    cluster: &str,
    per_request: Option<Duration>,
    idle: Option<Duration>,
) -> VirtualHost {
    let mut vh = virtual_host(name, domains, cluster);
    for r in &mut vh.routes {
        if let Some(route::Action::Route(a)) = &mut r.action {
            a.timeout = per_request;
            a.idle_timeout = idle;
        }
    }
    vh
}

/// Where a listener binds: `::` with `ipv4_compat` accepts IPv4 connections as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Bind<'a> {
    pub address: &'a str,
    pub ipv4_compat: bool,
}

pub(super) const BIND_V4: Bind<'static> = Bind {
    address: "0.0.0.0",
    ipv4_compat: false,
};

pub(super) fn virtual_host(name: &str, domains: Vec<String>, cluster: &str) -> VirtualHost {
    VirtualHost {
        name: name.to_string(),
        domains,
        routes: vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                    cluster.to_string(),
                )),
                timeout: seconds(ROUTE_TIMEOUT_S),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A virtual host whose routes were built elsewhere (router routes).
pub(super) fn virtual_host_with(
    name: &str,
    domains: Vec<String>,
    routes: Vec<Route>,
) -> VirtualHost {
    VirtualHost {
        name: name.to_string(),
        domains,
        routes,
        ..Default::default()
    }
}

/// A connection manager routing by RDS `route_name`, writing the node's access logs. Tracing is
/// on, as App Mesh had it on every connection manager: spans go to the tracer the bootstrap
/// configures (the App Mesh Envoy image's tracing variables), and nowhere without one. With
/// `normalize_paths`, what App Mesh set where routes match paths or prefixes (routes.md):
/// `normalize_path` and `merge_slashes`, so `//admin/./x` is routed (and sent) as `/admin/x`.
pub(super) fn http_connection_manager(
    stat_prefix: &str,
    route_name: &str,
    access_log: &[AccessLog],
    normalize_paths: bool,
) -> Filter {
    let hcm = HttpConnectionManager {
        access_log: access_log.to_vec(),
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        tracing: Some(http_connection_manager::Tracing::default()),
        normalize_path: normalize_paths.then_some(BoolValue { value: true }),
        merge_slashes: normalize_paths,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

/// A TCP proxy to one cluster, or split by weight across several, with an idle timeout (`None`:
/// Envoy's 1 h) and access logs.
pub(super) fn tcp_proxy(
    stat_prefix: &str,
    targets: &[(String, u32)],
    idle: Option<Duration>,
    access_log: &[AccessLog],
) -> Filter {
    let spec = match targets {
        [(only, _)] => tcp_proxy::ClusterSpecifier::Cluster(only.clone()),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(
                    |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                        name: name.clone(),
                        weight: *weight,
                        ..Default::default()
                    },
                )
                .collect(),
        }),
    };
    let tcp = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(spec),
        idle_timeout: idle,
        access_log: access_log.to_vec(),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(tcp))),
    }
}

/// A chain for connections whose original destination port is `port` (`None`: the default chain).
pub(super) fn filter_chain(port: Option<u32>, filter: Filter) -> FilterChain {
    FilterChain {
        filter_chain_match: port.map(|p| FilterChainMatch {
            destination_port: Some(UInt32Value { value: p }),
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    }
}

/// A chain for connections to `port` on one of `addresses` (each a host prefix).
pub(super) fn filter_chain_to(
    port: u32,
    addresses: &[std::net::IpAddr],
    filter: Filter,
) -> FilterChain {
    let mut chain = filter_chain(Some(port), filter);
    if let Some(m) = &mut chain.filter_chain_match {
        m.prefix_ranges = addresses
            .iter()
            .map(|a| CidrRange {
                address_prefix: a.to_string(),
                prefix_len: Some(UInt32Value {
                    value: if a.is_ipv4() { 32 } else { 128 },
                }),
            })
            .collect();
    }
    chain
}

/// A chain for TLS connections to `port` whose SNI matches one of `server_names`, passed through
/// without terminating TLS.
pub(super) fn filter_chain_sni(port: u32, server_names: &[&str], filter: Filter) -> FilterChain {
    let mut chain = filter_chain(Some(port), filter);
    if let Some(m) = &mut chain.filter_chain_match {
        m.server_names = server_names.iter().map(|n| n.to_string()).collect();
        m.transport_protocol = "tls".into();
    }
    chain
}

/// A chain that terminates TLS with `tls`; `transport_protocol` "tls" when a plaintext chain for
/// the same port sits beside it (PERMISSIVE, told apart by the TLS inspector).
pub(super) fn filter_chain_tls(
    port: Option<u32>,
    filter: Filter,
    tls: TransportSocket,
    transport_protocol: &str,
) -> FilterChain {
    let mut chain = filter_chain(port, filter);
    chain.transport_socket = Some(tls);
    if let Some(m) = &mut chain.filter_chain_match {
        m.transport_protocol = transport_protocol.to_string();
    }
    chain
}

/// A listener on `bind`:`port` that sees the pre-redirect destination (iptables REDIRECT), with
/// the TLS inspector when its chains tell TLS from plaintext.
pub(super) fn listener(
    name: &str,
    bind: Bind<'_>,
    port: u32,
    chains: Vec<FilterChain>,
    default: Option<FilterChain>,
    tls_ports: &[u32],
) -> Listener {
    let direction = if port == super::INGRESS_PORT {
        TrafficDirection::Inbound
    } else {
        TrafficDirection::Outbound
    };
    let mut listener_filters = vec![ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            OriginalDst::default(),
        ))),
        ..Default::default()
    }];
    if !tls_ports.is_empty() {
        listener_filters.push(ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            filter_disabled: Some(only_on_ports(tls_ports)),
        });
    }
    let mut address = socket(bind.address, port);
    if let Some(address::Address::SocketAddress(sa)) = &mut address.address {
        sa.ipv4_compat = bind.ipv4_compat;
    }
    Listener {
        name: name.to_string(),
        address: Some(address),
        filter_chains: chains,
        default_filter_chain: default,
        listener_filters,
        // Server-first protocols (PERMISSIVE tcp) must not wait for the inspector forever.
        continue_on_listener_filters_timeout: !tls_ports.is_empty(),
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

/// "Disabled unless the destination port is one of `ports`": the TLS inspector waits for the
/// client's first bytes, which a server-first protocol (MySQL, SMTP, a banner) never sends, so it
/// runs only where a chain needs to see TLS.
fn only_on_ports(ports: &[u32]) -> ListenerFilterChainMatchPredicate {
    use trellis_envoy_api::pb::envoy::config::listener::v3::listener_filter_chain_match_predicate::{
        MatchSet, Rule,
    };
    use trellis_envoy_api::pb::envoy::r#type::v3::Int32Range;
    let one = |p: u32| {
        let p = i64::from(p);
        ListenerFilterChainMatchPredicate {
            rule: Some(Rule::DestinationPortRange(Int32Range {
                start: i32::try_from(p).unwrap_or(i32::MAX),
                end: i32::try_from(p + 1).unwrap_or(i32::MAX),
            })),
        }
    };
    // Envoy wants at least two rules in a set.
    let any_of = match ports {
        [p] => one(*p),
        _ => ListenerFilterChainMatchPredicate {
            rule: Some(Rule::OrMatch(MatchSet {
                rules: ports.iter().map(|p| one(*p)).collect(),
            })),
        },
    };
    ListenerFilterChainMatchPredicate {
        rule: Some(Rule::NotMatch(Box::new(any_of))),
    }
}

// === Virtual gateways (translate/gateway.rs) ===

/// A gateway's connection manager: `http_connection_manager` plus what App Mesh set on gateways,
/// path normalization (`normalize_path`, `merge_slashes`) against path-confusion attacks, and
/// any port stripped from Host before routing so hostname matches see the bare name; the
/// gateway's access logs; with `health_path`, the gateway itself answers requests for exactly
/// that path (200 while serving, 503 once draining) before routing.
pub(super) fn gateway_connection_manager(
    stat_prefix: &str,
    route_name: &str,
    access_log: &[AccessLog],
    health_path: Option<&str>,
) -> Filter {
    use trellis_envoy_api::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
    use trellis_envoy_api::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck as HealthFilter;
    let mut http_filters = Vec::new();
    if let Some(path) = health_path {
        http_filters.push(HttpFilter {
            name: "envoy.filters.http.health_check".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                HealthFilter {
                    pass_through_mode: Some(BoolValue { value: false }),
                    headers: vec![HeaderMatcher {
                        name: ":path".into(),
                        header_match_specifier: Some(
                            header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(
                                    path.to_string(),
                                )),
                                ..Default::default()
                            }),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ))),
            ..Default::default()
        });
    }
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        access_log: access_log.to_vec(),
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.to_string(),
        })),
        http_filters,
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        strip_port_mode: Some(http_connection_manager::StripPortMode::StripAnyHostPort(
            true,
        )),
        // As on every App Mesh connection manager (see `http_connection_manager`).
        tracing: Some(http_connection_manager::Tracing::default()),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

/// A gateway chain for connections of one transport protocol ("tls" or "raw_buffer"), for a
/// PERMISSIVE listener where the TLS inspector tells them apart.
pub(super) fn gateway_chain(
    filter: Filter,
    tls: Option<TransportSocket>,
    transport_protocol: &str,
) -> FilterChain {
    FilterChain {
        filter_chain_match: (!transport_protocol.is_empty()).then(|| FilterChainMatch {
            transport_protocol: transport_protocol.to_string(),
            ..Default::default()
        }),
        filters: vec![filter],
        transport_socket: tls,
        ..Default::default()
    }
}

/// A gateway listener on `address`:`port`: clients connect to it directly (a gateway has no
/// iptables redirect, hence no original_dst filter), with the TLS inspector when its chains tell
/// TLS from plaintext (PERMISSIVE).
pub(super) fn gateway_listener(
    name: &str,
    address: &str,
    port: u32,
    chains: Vec<FilterChain>,
    tls_inspector: bool,
) -> Listener {
    let listener_filters = if tls_inspector {
        vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        }]
    } else {
        vec![]
    };
    Listener {
        name: name.to_string(),
        address: Some(socket(address, port)),
        filter_chains: chains,
        listener_filters,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// An EDS answer: one locality with every host on `port` (none: a known-empty cluster).
pub(super) fn eds_assignment(name: &str, hosts: &[String], port: u32) -> ClusterLoadAssignment {
    let lb_endpoints: Vec<LbEndpoint> = hosts
        .iter()
        .map(|h| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(h, port)),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }]
        },
        ..Default::default()
    }
}
