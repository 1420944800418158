//! Builders for the Envoy protos the translation emits. The only place that spells out proto
//! structure, so the translation above reads as App Mesh semantics.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Http2ProtocolOptions, SocketAddress,
    TrafficDirection, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use envoy_types::util::pack_any;

use crate::model::PortProtocol;

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
pub(super) fn duration(d: &crate::model::Duration) -> Option<Duration> {
    let v = d.value?;
    let ms = match d.unit.unwrap_or(crate::model::DurationUnit::Ms) {
        crate::model::DurationUnit::S => v.saturating_mul(1000),
        crate::model::DurationUnit::Ms => v,
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

fn base_cluster(name: &str, kind: cluster::DiscoveryType, proto: PortProtocol) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: seconds(CONNECT_TIMEOUT_S),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
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

pub(super) fn route_config(name: &str, virtual_hosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

pub(super) fn http_connection_manager(stat_prefix: &str, route_name: &str) -> Filter {
    let hcm = HttpConnectionManager {
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
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

pub(super) fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    tcp_proxy_weighted(stat_prefix, &[(cluster.to_string(), 1)])
}

/// A TCP proxy to one cluster, or split by weight across several.
pub(super) fn tcp_proxy_weighted(stat_prefix: &str, targets: &[(String, u32)]) -> Filter {
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

/// A listener on 0.0.0.0:`port` that sees the pre-redirect destination (iptables REDIRECT).
pub(super) fn listener(
    name: &str,
    port: u32,
    chains: Vec<FilterChain>,
    default: Option<FilterChain>,
) -> Listener {
    let direction = if port == super::INGRESS_PORT {
        TrafficDirection::Inbound
    } else {
        TrafficDirection::Outbound
    };
    Listener {
        name: name.to_string(),
        address: Some(socket("0.0.0.0", port)),
        filter_chains: chains,
        default_filter_chain: default,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                OriginalDst::default(),
            ))),
            ..Default::default()
        }],
        traffic_direction: direction as i32,
        ..Default::default()
    }
}
