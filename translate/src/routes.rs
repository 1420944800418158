//! Virtual router routes → Envoy routes: matches, ordering, weighted clusters, retries, timeouts.
//!
//! Ordering: routes with a `priority` first (0 is highest), then the rest as App Mesh ordered them,
//! longest match first; ties by route name so the output is deterministic.

use trellis_envoy_api::pack_any;
use trellis_envoy_api::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RetryPolicy, Route, RouteAction, RouteMatch,
    WeightedCluster, header_matcher, query_parameter_matcher, retry_policy, route, route_action,
    route_match, weighted_cluster,
};
use trellis_envoy_api::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher,
};
use trellis_envoy_api::pb::envoy::r#type::v3::Int64Range;
use trellis_envoy_api::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

use std::collections::BTreeMap;

use super::cluster::Built;
use super::envoy::{duration, seconds};
use trellis_model::Duration as MeshDuration;
use trellis_model::{
    GrpcRetryPolicy, GrpcRetryPolicyEvent, GrpcRoute, HeaderMatchMethod, HttpPathMatch,
    HttpRetryPolicy, HttpRoute, HttpRouteHeader, MatchRange, PortProtocol, Resource, RouteSpec,
    TcpRetryPolicyEvent, TcpRoute,
};

/// App Mesh's defaults: 15 s per request, 300 s idle.
pub(super) const DEFAULT_PER_REQUEST_S: i64 = 15;
pub(super) const DEFAULT_IDLE_S: i64 = 300;

/// A caller's TCP idle timeout to a service: its tcp route's `timeout.idle`, else App Mesh's 300 s
/// ("Idle duration – The default is 300 seconds. A value of 0 disables the timeout.",
/// routes.md). Envoy's own default would be one hour.
pub(super) fn tcp_idle(route: Option<&TcpRoute>) -> Option<PbDuration> {
    route
        .and_then(|r| r.timeout.as_ref())
        .and_then(|t| t.idle.as_ref())
        .and_then(duration)
        .or_else(|| seconds(DEFAULT_IDLE_S))
}

/// One weighted target resolved to its Envoy cluster.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Target {
    pub cluster: String,
    pub weight: u32,
}

/// A route of the router, ready to be turned into an Envoy route.
pub(super) struct Named<'a> {
    pub name: &'a str,
    pub spec: &'a RouteSpec,
    pub targets: Vec<Target>,
}

/// The router's routes that attach to its listener (protocol, port), with their targets resolved
/// to caller-side clusters, in App Mesh's order.
pub(super) fn router_routes<'r>(
    lookup: &mut dyn FnMut(&str, Option<i64>) -> Built,
    routes: Option<&'r BTreeMap<String, Resource<RouteSpec>>>,
    proto: PortProtocol,
    port: i64,
    listeners: usize,
) -> Vec<Named<'r>> {
    let mut attached: Vec<Named<'r>> = routes
        .into_iter()
        .flatten()
        .filter(|(_, route)| route_fits(&route.spec, proto, port, listeners))
        .map(|(name, route)| Named {
            name,
            spec: &route.spec,
            targets: route
                .spec
                .weighted_targets()
                .filter_map(|t| {
                    let (cluster, _, _) = lookup(&t.virtual_node, t.port)?;
                    Some(Target {
                        cluster,
                        weight: u32::try_from(t.weight).unwrap_or(0),
                    })
                })
                .collect(),
        })
        .collect();
    order(&mut attached);
    attached
}

/// Whether a route attaches to the router listener (protocol, port).
fn route_fits(spec: &RouteSpec, proto: PortProtocol, port: i64, listeners: usize) -> bool {
    let (kind_proto, match_port) = if let Some(r) = &spec.http_route {
        (PortProtocol::Http, r.r#match.port)
    } else if let Some(r) = &spec.http2_route {
        (PortProtocol::Http2, r.r#match.port)
    } else if let Some(r) = &spec.grpc_route {
        (PortProtocol::Grpc, r.r#match.port)
    } else if let Some(r) = &spec.tcp_route {
        (PortProtocol::Tcp, r.r#match.as_ref().and_then(|m| m.port))
    } else {
        return false;
    };
    kind_proto == proto && match_port.map_or(listeners == 1, |p| p == port)
}

/// Orders routes as App Mesh did: explicit priority first, then longest match, then name.
pub(super) fn order(routes: &mut [Named<'_>]) {
    routes.sort_by(|a, b| {
        let pa = a.spec.priority.unwrap_or(i64::MAX);
        let pb = b.spec.priority.unwrap_or(i64::MAX);
        pa.cmp(&pb)
            .then_with(|| match_len(b.spec).cmp(&match_len(a.spec)))
            .then_with(|| a.name.cmp(b.name))
    });
}

fn match_len(spec: &RouteSpec) -> usize {
    let http = spec.http_route.as_ref().or(spec.http2_route.as_ref());
    if let Some(r) = http {
        let m = &r.r#match;
        let conditions = m.headers.as_ref().map_or(0, Vec::len)
            + m.query_parameters.as_ref().map_or(0, Vec::len);
        return http_match_len(m.path.as_ref(), m.prefix.as_ref(), conditions);
    }
    if let Some(r) = &spec.grpc_route {
        let m = &r.r#match;
        return m.service_name.as_ref().map_or(0, String::len)
            + m.method_name.as_ref().map_or(0, String::len)
            + m.metadata.as_ref().map_or(0, Vec::len);
    }
    0
}

/// How specific an HTTP match is, for App Mesh's longest-match-first order: the length of its path
/// or prefix plus its header and query conditions.
pub(super) fn http_match_len(
    path: Option<&HttpPathMatch>,
    prefix: Option<&String>,
    conditions: usize,
) -> usize {
    path.and_then(|p| p.exact.as_ref().or(p.regex.as_ref()))
        .or(prefix)
        .map_or(0, String::len)
        + conditions
}

/// The Envoy route for an http, http2 or grpc route (tcp routes become tcp_proxy filters). A
/// route without its own retry policy carries none: it takes its virtual host's, which
/// [`host_retry`] gives. That default is most of a route's bytes, so a virtual host carries it
/// once instead of once per route.
pub(super) fn envoy_route_in_host(r: &Named<'_>) -> Option<Route> {
    route_of(r)
}

/// The retry policy of a virtual host: App Mesh's default, for the routes that set none (Envoy
/// applies a virtual host's policy to routes without their own).
pub(super) fn host_retry() -> RetryPolicy {
    default_retry()
}

fn route_of(r: &Named<'_>) -> Option<Route> {
    let (r#match, timeout, retry) =
        if let Some(h) = r.spec.http_route.as_ref().or(r.spec.http2_route.as_ref()) {
            (
                http_match(h),
                h.timeout.as_ref().map(|t| (&t.per_request, &t.idle)),
                h.retry_policy.as_ref().map(http_retry),
            )
        } else if let Some(g) = &r.spec.grpc_route {
            (
                grpc_match(g),
                g.timeout.as_ref().map(|t| (&t.per_request, &t.idle)),
                g.retry_policy.as_ref().map(grpc_retry),
            )
        } else {
            return None;
        };
    let (per_request, idle) = timeout.unwrap_or((&None, &None));
    let mut action = RouteAction {
        timeout: per_request
            .as_ref()
            .and_then(duration)
            .or_else(|| seconds(DEFAULT_PER_REQUEST_S)),
        idle_timeout: idle
            .as_ref()
            .and_then(duration)
            .or_else(|| seconds(DEFAULT_IDLE_S)),
        retry_policy: retry,
        ..Default::default()
    };
    let total: u32 = r.targets.iter().map(|t| t.weight).sum();
    let action = match r.targets.as_slice() {
        _ if total == 0 => {
            // Every target weighs 0: nothing may receive traffic.
            return Some(Route {
                name: r.name.to_string(),
                r#match: Some(r#match),
                action: Some(route::Action::DirectResponse(
                    trellis_envoy_api::pb::envoy::config::route::v3::DirectResponseAction {
                        status: 503,
                        ..Default::default()
                    },
                )),
                ..Default::default()
            });
        }
        [only] => {
            action.cluster_specifier = Some(route_action::ClusterSpecifier::Cluster(
                only.cluster.clone(),
            ));
            action
        }
        many => {
            action.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: many
                        .iter()
                        .map(|t| weighted_cluster::ClusterWeight {
                            name: t.cluster.clone(),
                            weight: Some(UInt32Value { value: t.weight }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ));
            action
        }
    };
    Some(Route {
        name: r.name.to_string(),
        r#match: Some(r#match),
        action: Some(route::Action::Route(action)),
        ..Default::default()
    })
}

fn http_match(h: &HttpRoute) -> RouteMatch {
    let m = &h.r#match;
    let path = match &m.path {
        Some(p) if p.exact.is_some() => {
            route_match::PathSpecifier::Path(p.exact.clone().unwrap_or_default())
        }
        Some(p) if p.regex.is_some() => {
            route_match::PathSpecifier::SafeRegex(regex(p.regex.as_deref().unwrap_or_default()))
        }
        _ => route_match::PathSpecifier::Prefix(m.prefix.clone().unwrap_or_else(|| "/".into())),
    };
    let mut headers: Vec<HeaderMatcher> = m.headers.iter().flatten().map(header).collect();
    if let Some(method) = m.method {
        headers.push(exact_header(":method", method.as_str()));
    }
    if let Some(scheme) = m.scheme {
        headers.push(exact_header(":scheme", scheme.as_str()));
    }
    let query_parameters = m
        .query_parameters
        .iter()
        .flatten()
        .map(|q| QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(
                match q.r#match.as_ref().and_then(|m| m.exact.clone()) {
                    Some(exact) => {
                        query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(exact)),
                                ..Default::default()
                            },
                        )
                    }
                    None => {
                        query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true)
                    }
                },
            ),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn grpc_match(g: &GrpcRoute) -> RouteMatch {
    let m = &g.r#match;
    let path = match (&m.service_name, &m.method_name) {
        (Some(s), Some(method)) => route_match::PathSpecifier::Path(format!("/{s}/{method}")),
        (Some(s), None) => route_match::PathSpecifier::Prefix(format!("/{s}/")),
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let headers = m
        .metadata
        .iter()
        .flatten()
        .map(|md| {
            let mm = md.r#match.as_ref();
            matcher(
                &md.name,
                md.invert.unwrap_or(false),
                mm.and_then(|x| x.exact.as_deref()),
                mm.and_then(|x| x.prefix.as_deref()),
                mm.and_then(|x| x.suffix.as_deref()),
                mm.and_then(|x| x.regex.as_deref()),
                mm.and_then(|x| x.range.as_ref()),
            )
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        headers,
        grpc: Some(route_match::GrpcRouteMatchOptions {}),
        ..Default::default()
    }
}

fn header(h: &HttpRouteHeader) -> HeaderMatcher {
    header_match(&h.name, h.invert, h.r#match.as_ref())
}

/// A header condition of a route or gateway route (both use the model's `HeaderMatchMethod`).
pub(super) fn header_match(
    name: &str,
    invert: Option<bool>,
    m: Option<&HeaderMatchMethod>,
) -> HeaderMatcher {
    matcher(
        name,
        invert.unwrap_or(false),
        m.and_then(|x| x.exact.as_deref()),
        m.and_then(|x| x.prefix.as_deref()),
        m.and_then(|x| x.suffix.as_deref()),
        m.and_then(|x| x.regex.as_deref()),
        m.and_then(|x| x.range.as_ref()),
    )
}

pub(super) fn matcher(
    name: &str,
    invert: bool,
    exact: Option<&str>,
    prefix: Option<&str>,
    suffix: Option<&str>,
    re: Option<&str>,
    range: Option<&MatchRange>,
) -> HeaderMatcher {
    let string = |p: string_matcher::MatchPattern| {
        header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(p),
            ..Default::default()
        })
    };
    let spec = if let Some(v) = exact {
        string(string_matcher::MatchPattern::Exact(v.into()))
    } else if let Some(v) = prefix {
        string(string_matcher::MatchPattern::Prefix(v.into()))
    } else if let Some(v) = suffix {
        string(string_matcher::MatchPattern::Suffix(v.into()))
    } else if let Some(v) = re {
        string(string_matcher::MatchPattern::SafeRegex(regex(v)))
    } else if let Some(r) = range {
        header_matcher::HeaderMatchSpecifier::RangeMatch(Int64Range {
            start: r.start,
            end: r.end,
        })
    } else {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    };
    HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

pub(super) fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    matcher(name, false, Some(value), None, None, None, None)
}

pub(super) fn regex(re: &str) -> RegexMatcher {
    RegexMatcher {
        regex: re.to_string(),
        ..Default::default()
    }
}

/// App Mesh's event names → Envoy's `retry_on` conditions.
fn http_event(e: &str) -> Option<&'static str> {
    Some(match e {
        "server-error" => "5xx",
        "gateway-error" => "gateway-error",
        "client-error" => "retriable-4xx",
        "stream-error" => "refused-stream",
        _ => return None,
    })
}

fn tcp_event(e: TcpRetryPolicyEvent) -> &'static str {
    match e {
        TcpRetryPolicyEvent::ConnectionError => "connect-failure",
    }
}

fn grpc_event(e: GrpcRetryPolicyEvent) -> &'static str {
    match e {
        GrpcRetryPolicyEvent::Cancelled => "cancelled",
        GrpcRetryPolicyEvent::DeadlineExceeded => "deadline-exceeded",
        GrpcRetryPolicyEvent::Internal => "internal",
        GrpcRetryPolicyEvent::ResourceExhausted => "resource-exhausted",
        GrpcRetryPolicyEvent::Unavailable => "unavailable",
    }
}

/// App Mesh's default policy for routes that set none (envoy-defaults.md, "Default route retry
/// policy"; the Envoy form announced in aws-app-mesh-roadmap#229, with `reset` added by #284): 2
/// retries on HTTP 503, gRPC UNAVAILABLE, connect failures, refused streams and resets, on
/// another host when there is one (5 host selections), with no per-try timeout (a try may use the
/// whole request timeout). The same for every protocol: `unavailable` reads `grpc-status`, which
/// plain HTTP answers do not carry.
fn default_retry() -> RetryPolicy {
    let mut p = retry(
        DEFAULT_RETRY_ON.to_string(),
        DEFAULT_MAX_RETRIES,
        &MeshDuration::default(),
    );
    p.retriable_status_codes = vec![503];
    p.host_selection_retry_max_attempts = 5;
    p
}

/// App Mesh's default retry conditions and count.
pub(super) const DEFAULT_RETRY_ON: &str =
    "unavailable,connect-failure,refused-stream,retriable-status-codes,reset";
const DEFAULT_MAX_RETRIES: i64 = 2;

fn http_retry(p: &HttpRetryPolicy) -> RetryPolicy {
    let mut on: Vec<&str> = p
        .http_retry_events
        .iter()
        .flatten()
        .filter_map(|e| http_event(e))
        .collect();
    on.extend(p.tcp_retry_events.iter().flatten().map(|e| tcp_event(*e)));
    retry(on.join(","), p.max_retries, &p.per_retry_timeout)
}

fn grpc_retry(p: &GrpcRetryPolicy) -> RetryPolicy {
    let mut on: Vec<&str> = p
        .grpc_retry_events
        .iter()
        .flatten()
        .map(|e| grpc_event(*e))
        .collect();
    on.extend(
        p.http_retry_events
            .iter()
            .flatten()
            .filter_map(|e| http_event(e)),
    );
    on.extend(p.tcp_retry_events.iter().flatten().map(|e| tcp_event(*e)));
    retry(on.join(","), p.max_retries, &p.per_retry_timeout)
}

/// A retry never goes back to the host that just failed (App Mesh's previous-hosts predicate).
fn retry(on: String, max: i64, per_try: &MeshDuration) -> RetryPolicy {
    RetryPolicy {
        retry_on: on,
        num_retries: Some(UInt32Value {
            value: u32::try_from(max).unwrap_or(0),
        }),
        per_try_timeout: duration(per_try),
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                pack_any(PreviousHostsPredicate::default()),
            )),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}
