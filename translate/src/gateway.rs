//! Virtual gateways and gateway routes → the configuration of a gateway's Envoy.
//!
//! A gateway Envoy runs without an iptables redirect: clients connect to its listener ports.
//!
//! **Names** (App Mesh named gateway resources after the listener port):
//! - one listener per gateway listener, `lds_ingress_0.0.0.0_PORT`, bound on 0.0.0.0:PORT, with
//!   one filter chain holding an HTTP connection manager (stat prefix `ingress.PROTO.PORT`, as
//!   App Mesh's) — http, http2 and grpc alike (codec AUTO);
//! - its route config `rds_ingress_PROTO_PORT` (PROTO: the listener's protocol), with one virtual
//!   host `ingress` for any domain (`*`) holding the gateway routes of that listener in order and
//!   App Mesh's default retry policy for those without their own;
//! - with a connection pool, the listener's self-redirect (see [`self_redirect`]):
//!   `cds_ingress_MESH_GATEWAY_self_redirect_PROTO_PORT` to `lds_egress_127.0.0.1_PORT` with
//!   `rds_egress_PROTO_PORT`;
//! - clusters `cds_egress_MESH_NODE_PROTO_PORT`, the very clusters (and discovery) of virtual
//!   nodes' egress, built by the same code.
//!
//! **Which routes, in which order.** A gateway route attaches to the listener of its protocol
//! (httpRoute → http, http2Route → http2, grpcRoute → grpc) whose port is its `match.port`, or to
//! the only listener when it names none. Order: `priority` (0 first, unset last); then routes
//! for an exact hostname, then for a hostname suffix (longest first), then for any host (the
//! order in which Envoy would pick virtual hosts, kept inside one virtual host so priorities
//! still hold across hostnames); then longest match (path, then headers and query parameters);
//! then name.
//!
//! **Matches.** prefix (default `/`), exact path, regex path; hostname exact/suffix as
//! case-insensitive `:authority` matchers (the connection manager strips any port from Host
//! first); headers (exact, prefix, suffix, regex, range, invert); query parameters (exact or
//! present); method; port (by listener, above). gRPC: `serviceName` as the path prefix
//! `/SERVICE/`, metadata as header matchers.
//!
//! **Rewrites**, as App Mesh's defaults: a prefix match rewrites the matched prefix to `/`
//! (`defaultPrefix` ENABLED or unset), to `value` when set, or not at all (DISABLED), a prefix
//! without a trailing slash as App Mesh did (see [`forwards`]); an exact or
//! regex path match is rewritten to `path.exact` when set; Host is rewritten to the target
//! virtual service's name unless `hostname.defaultTargetHostname` is DISABLED.
//!
//! **Targets.** A virtual service provided by a node: that node's listener cluster (the target
//! `port`, or the node's only listener). Provided by a router: see [`via_router`]. A target that
//! does not exist, has no provider, or whose port matches no listener yields no route (never an
//! error): requests then fall to later routes, or 404.
//!
//! **Policies** (App Mesh semantics in `policy.rs`): listener TLS (file or SDS certificates,
//! STRICT / PERMISSIVE / DISABLED, client-certificate validation) on the listener's chains, an
//! unservable (ACM) certificate refusing a STRICT listener altogether; the connection pool as
//! circuit breakers on one cluster all the listener's requests cross; the health check answered by
//! the gateway itself on its path; `backendDefaults.clientPolicy` TLS on every upstream cluster;
//! the access log on every listener's connection manager.

use std::collections::BTreeSet;

use trellis_envoy_api::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, Route, RouteAction, RouteMatch,
    VirtualHost, header_matcher, query_parameter_matcher, route, route_action, route_match,
};
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, StringMatcher, string_matcher,
};

use super::cluster::{Client, Ctx};
use super::output::{Output, Part, RouteConfig};
use super::{Endpoints, envoy, node, policy, routes};
use trellis_model::{
    ClientPolicyTls, DefaultGatewayRouteRewrite, GatewayRouteHostnameMatch,
    GatewayRouteHostnameRewrite, GatewayRouteSpec, GatewayRouteTarget, GrpcGatewayRoute,
    HttpGatewayRoute, HttpGatewayRoutePrefixRewrite, HttpPathMatch, HttpQueryParameter, MeshState,
    VirtualGatewayPortProtocol, VirtualGatewaySpec,
};

/// The virtual host of every gateway route config.
pub(super) const VIRTUAL_HOST: &str = "ingress";
/// The first loopback port of a pooled listener's second hop (App Mesh's egress port).
const SELF_REDIRECT_PORT: u32 = 15001;

/// The configuration of the gateway `name`: its listeners and the gateway routes behind them.
pub(super) fn virtual_gateway(
    mesh_name: &str,
    mesh: &MeshState,
    name: &str,
    spec: &VirtualGatewaySpec,
    endpoints: &Endpoints,
) -> Output {
    let defaults = spec
        .backend_defaults
        .as_ref()
        .and_then(|d| d.client_policy.as_ref())
        .map(policy::gateway_client_policy);
    // The gateway's backendDefaults is the only client policy: gateway backends have none.
    let client_tls = defaults.as_ref().and_then(|p| p.tls.as_ref());
    let ctx = Ctx::new(mesh_name, mesh, endpoints);
    let logs = policy::gateway_access_logs(spec);
    let mut out = Output::default();
    let gateway_routes = mesh.gateway_routes.get(name);
    let mut loopback = LoopbackPorts::new(spec);
    for l in &spec.listeners {
        let Ok(port) = u32::try_from(l.port_mapping.port) else {
            continue;
        };
        let proto = l.port_mapping.protocol;
        let tls = l.tls.as_ref().map(policy::gateway_listener_tls);
        let tls_plan = policy::listener_tls(
            tls.as_ref(),
            l.port_mapping.port,
            policy::gateway_proto(proto),
            endpoints.acm.as_deref(),
            &mut out.unserved,
        );
        // STRICT with a certificate that cannot be served: no listener (never plaintext), and
        // nothing behind it.
        if matches!(tls_plan, policy::ListenerTlsPlan::Refuse) {
            continue;
        }
        let mut attached: Vec<(&str, &GatewayRouteSpec)> = gateway_routes
            .into_iter()
            .flatten()
            .filter(|(_, r)| attaches(&r.spec, proto, l.port_mapping.port, spec.listeners.len()))
            .map(|(n, r)| (n.as_str(), &r.spec))
            .collect();
        order(&mut attached);
        let mut envoy_routes = Vec::new();
        for (route_name, route_spec) in attached {
            envoy_routes.extend(gateway_route(
                &ctx, client_tls, route_name, route_spec, &mut out,
            ));
        }
        // App Mesh's default retry policy for every route that sets none (a router route's own
        // policy travels with it).
        let mut routed = envoy::virtual_host_with(VIRTUAL_HOST, vec!["*".into()], envoy_routes);
        routed.retry_policy = Some(routes::host_retry());
        let rds = format!("rds_ingress_{}_{port}", proto.as_str());
        match policy::gateway_limits(l) {
            None => out.routes.push(RouteConfig::of(&rds, vec![routed])),
            Some(limits) => {
                let inner = loopback.next();
                let redirect =
                    self_redirect(mesh_name, name, proto, inner, limits, routed, &mut out);
                // Hop 1 only passes requests through the pool; the timeouts are hop 2's.
                let through = envoy::virtual_host_timed(
                    VIRTUAL_HOST,
                    vec!["*".into()],
                    &redirect,
                    envoy::seconds(0),
                    envoy::seconds(0),
                );
                out.routes.push(RouteConfig::of(&rds, vec![through]));
            }
        }
        // A listener without routes still listens (404s), as App Mesh's gateways did.
        let health = policy::gateway_health_path(l, &mut out.unserved);
        let stats = node::ingress_stat_prefix(proto.as_str(), port);
        let hcm = envoy::gateway_connection_manager(&stats, &rds, &logs, health.as_deref());
        let (chains, inspect) = match tls_plan {
            policy::ListenerTlsPlan::Plain => (vec![envoy::gateway_chain(hcm, None, "")], false),
            policy::ListenerTlsPlan::Strict(ts) => {
                (vec![envoy::gateway_chain(hcm, Some(ts), "")], false)
            }
            policy::ListenerTlsPlan::Permissive(ts) => (
                vec![
                    envoy::gateway_chain(hcm.clone(), Some(ts), "tls"),
                    envoy::gateway_chain(hcm, None, "raw_buffer"),
                ],
                true,
            ),
            policy::ListenerTlsPlan::Refuse => continue,
        };
        out.listeners.push(envoy::gateway_listener(
            &format!("lds_ingress_0.0.0.0_{port}"),
            "0.0.0.0",
            port,
            chains,
            inspect,
        ));
    }
    out.finish()
}

/// Where a gateway's self-redirect listeners go: loopback ports from App Mesh's 15001 up, past
/// the gateway's own listener ports.
struct LoopbackPorts {
    taken: BTreeSet<u32>,
    next: u32,
}

impl LoopbackPorts {
    fn new(spec: &VirtualGatewaySpec) -> Self {
        LoopbackPorts {
            taken: spec
                .listeners
                .iter()
                .filter_map(|l| u32::try_from(l.port_mapping.port).ok())
                .collect(),
            next: SELF_REDIRECT_PORT,
        }
    }

    fn next(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        let port = self.next;
        self.taken.insert(port);
        port
    }
}

/// A gateway listener's connection pool as App Mesh applied it: one limit for all the services
/// behind the listener (howto-circuit-breakers: the overflow shows on
/// `cds_ingress_MESH_GATEWAY_self_redirect_http_15001`, whatever the backend). Envoy's circuit
/// breakers are per cluster, so as App Mesh's gateway did, the listener sends every request
/// through one cluster carrying the pool, `cds_ingress_MESH_GATEWAY_self_redirect_PROTO_PORT`,
/// to the gateway's own loopback listener `lds_egress_127.0.0.1_PORT`, whose route config
/// `rds_egress_PROTO_PORT` holds the listener's routes (`routed`). HTTP/1 for an http pool (it
/// counts connections and queued requests), HTTP/2 for http2 and grpc (concurrent requests).
/// Returns the cluster's name.
fn self_redirect(
    mesh_name: &str,
    gateway: &str,
    proto: VirtualGatewayPortProtocol,
    port: u32,
    limits: envoy::Limits,
    routed: VirtualHost,
    out: &mut Output,
) -> String {
    let p = proto.as_str();
    let rds = format!("rds_egress_{p}_{port}");
    out.routes.push(RouteConfig::of(&rds, vec![routed]));
    let hcm = envoy::gateway_connection_manager("egress", &rds, &[], None);
    out.listeners.push(envoy::gateway_listener(
        &format!("lds_egress_127.0.0.1_{port}"),
        "127.0.0.1",
        port,
        vec![envoy::gateway_chain(hcm, None, "")],
        false,
    ));
    let name = format!("cds_ingress_{mesh_name}_{gateway}_self_redirect_{p}_{port}");
    let mut c = envoy::static_cluster(&name, "127.0.0.1", port, policy::gateway_proto(proto));
    envoy::set_circuit_breakers(&mut c, limits);
    out.clusters.push(Part::built(c));
    name
}

/// The listener protocol a gateway route needs, and the port it names.
fn kind(spec: &GatewayRouteSpec) -> Option<(VirtualGatewayPortProtocol, Option<i64>)> {
    if let Some(r) = &spec.http_route {
        Some((VirtualGatewayPortProtocol::Http, r.r#match.port))
    } else if let Some(r) = &spec.http2_route {
        Some((VirtualGatewayPortProtocol::Http2, r.r#match.port))
    } else {
        spec.grpc_route
            .as_ref()
            .map(|r| (VirtualGatewayPortProtocol::Grpc, r.r#match.port))
    }
}

/// Whether a gateway route attaches to the gateway listener (protocol, port).
fn attaches(
    spec: &GatewayRouteSpec,
    proto: VirtualGatewayPortProtocol,
    port: i64,
    listeners: usize,
) -> bool {
    kind(spec).is_some_and(|(p, match_port)| {
        p == proto && match_port.map_or(listeners == 1, |m| m == port)
    })
}

fn hostname_match(spec: &GatewayRouteSpec) -> Option<&GatewayRouteHostnameMatch> {
    spec.http_route
        .as_ref()
        .or(spec.http2_route.as_ref())
        .and_then(|r| r.r#match.hostname.as_ref())
        .or_else(|| {
            spec.grpc_route
                .as_ref()
                .and_then(|r| r.r#match.hostname.as_ref())
        })
}

/// Exact hostnames first, then suffixes (longest first), then any host.
fn host_rank(spec: &GatewayRouteSpec) -> (u8, std::cmp::Reverse<usize>) {
    match hostname_match(spec) {
        Some(GatewayRouteHostnameMatch { exact: Some(_), .. }) => (0, std::cmp::Reverse(0)),
        Some(GatewayRouteHostnameMatch {
            suffix: Some(s), ..
        }) => (1, std::cmp::Reverse(s.len())),
        _ => (2, std::cmp::Reverse(0)),
    }
}

fn match_len(spec: &GatewayRouteSpec) -> usize {
    if let Some(r) = spec.http_route.as_ref().or(spec.http2_route.as_ref()) {
        let m = &r.r#match;
        let conditions = m.headers.as_ref().map_or(0, Vec::len)
            + m.query_parameters.as_ref().map_or(0, Vec::len);
        return routes::http_match_len(m.path.as_ref(), m.prefix.as_ref(), conditions);
    }
    spec.grpc_route.as_ref().map_or(0, |r| {
        r.r#match.service_name.as_ref().map_or(0, String::len)
            + r.r#match.metadata.as_ref().map_or(0, Vec::len)
    })
}

/// Priority, then hostname specificity, then longest match, then name (see the module doc).
fn order(routes: &mut [(&str, &GatewayRouteSpec)]) {
    routes.sort_by(|(an, a), (bn, b)| {
        let pa = a.priority.unwrap_or(i64::MAX);
        let pb = b.priority.unwrap_or(i64::MAX);
        pa.cmp(&pb)
            .then_with(|| host_rank(a).cmp(&host_rank(b)))
            .then_with(|| match_len(b).cmp(&match_len(a)))
            .then_with(|| an.cmp(bn))
    });
}

/// What the target service sees of the path the gateway matched.
#[derive(Clone, Debug, PartialEq)]
enum Forward {
    /// Prefix `matched`, forwarded as `to` followed by the rest (`to == matched`: unchanged).
    Prefix { matched: String, to: String },
    /// Exact path `matched`, forwarded as `to` (itself when there is no path rewrite).
    Exact { matched: String, to: String },
    /// Regex path `matched`, forwarded as `to` when a path rewrite is set, else unchanged.
    Regex { matched: String, to: Option<String> },
}

/// How an Envoy route rewrites the path.
#[derive(Clone, Debug, PartialEq)]
enum PathRewrite {
    Keep,
    /// Envoy's `prefix_rewrite`: the route's matched prefix becomes this.
    Prefix(String),
    /// The whole path (query kept) becomes this.
    Whole(String),
}

/// The path part of an Envoy route: its path matcher, an extra `:path` condition when one path
/// matcher cannot say it all, and the rewrite.
#[derive(Clone, Debug, PartialEq)]
struct PathPlan {
    spec: route_match::PathSpecifier,
    extra: Option<HeaderMatcher>,
    rewrite: PathRewrite,
}

/// A gateway route reduced to what every target kind needs.
struct Parts<'a> {
    forward: Forward,
    /// Hostname, headers, method, gRPC metadata.
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryParameterMatcher>,
    grpc: bool,
    rewrite_host: bool,
    target: &'a GatewayRouteTarget,
}

impl Parts<'_> {
    fn route_match(
        &self,
        path: &PathPlan,
        more_headers: Vec<HeaderMatcher>,
        more_query: Vec<QueryParameterMatcher>,
        grpc: bool,
    ) -> RouteMatch {
        let mut headers = self.headers.clone();
        headers.extend(path.extra.clone());
        headers.extend(more_headers);
        let mut query_parameters = self.query.clone();
        query_parameters.extend(more_query);
        RouteMatch {
            path_specifier: Some(path.spec.clone()),
            headers,
            query_parameters,
            grpc: (self.grpc || grpc).then_some(route_match::GrpcRouteMatchOptions {}),
            ..Default::default()
        }
    }
}

fn parts(spec: &GatewayRouteSpec) -> Option<Parts<'_>> {
    if let Some(h) = spec.http_route.as_ref().or(spec.http2_route.as_ref()) {
        return Some(http_parts(h));
    }
    spec.grpc_route.as_ref().map(grpc_parts)
}

fn http_parts(h: &HttpGatewayRoute) -> Parts<'_> {
    let m = &h.r#match;
    let rewrite = h.action.rewrite.as_ref();
    let path_to = rewrite
        .and_then(|r| r.path.as_ref())
        .and_then(|p| p.exact.clone());
    let forward = match &m.path {
        Some(HttpPathMatch { exact: Some(e), .. }) => Forward::Exact {
            matched: e.clone(),
            to: path_to.unwrap_or_else(|| e.clone()),
        },
        Some(HttpPathMatch { regex: Some(r), .. }) => Forward::Regex {
            matched: r.clone(),
            to: path_to,
        },
        _ => {
            let matched = m.prefix.clone().unwrap_or_else(|| "/".into());
            let to = prefix_target(&matched, rewrite.and_then(|r| r.prefix.as_ref()));
            Forward::Prefix { matched, to }
        }
    };
    let mut headers: Vec<HeaderMatcher> =
        m.hostname.as_ref().and_then(hostname).into_iter().collect();
    headers.extend(
        m.headers
            .iter()
            .flatten()
            .map(|hd| routes::header_match(&hd.name, hd.invert, hd.r#match.as_ref())),
    );
    if let Some(method) = m.method {
        headers.push(routes::exact_header(":method", method.as_str()));
    }
    Parts {
        forward,
        headers,
        query: m.query_parameters.iter().flatten().map(query).collect(),
        grpc: false,
        rewrite_host: rewrites_host(rewrite.and_then(|r| r.hostname.as_ref())),
        target: &h.action.target,
    }
}

fn grpc_parts(g: &GrpcGatewayRoute) -> Parts<'_> {
    let m = &g.r#match;
    let prefix = m
        .service_name
        .as_ref()
        .map_or_else(|| "/".to_string(), |s| format!("/{s}/"));
    let mut headers: Vec<HeaderMatcher> =
        m.hostname.as_ref().and_then(hostname).into_iter().collect();
    headers.extend(m.metadata.iter().flatten().map(|md| {
        let mm = md.r#match.as_ref();
        routes::matcher(
            &md.name,
            md.invert.unwrap_or(false),
            mm.and_then(|x| x.exact.as_deref()),
            mm.and_then(|x| x.prefix.as_deref()),
            mm.and_then(|x| x.suffix.as_deref()),
            mm.and_then(|x| x.regex.as_deref()),
            mm.and_then(|x| x.range.as_ref()),
        )
    }));
    Parts {
        forward: Forward::Prefix {
            matched: prefix.clone(),
            to: prefix,
        },
        headers,
        query: vec![],
        grpc: true,
        rewrite_host: rewrites_host(g.action.rewrite.as_ref().and_then(|r| r.hostname.as_ref())),
        target: &g.action.target,
    }
}

/// The prefix a matched prefix becomes: `value`, itself when DISABLED, else `/` (App Mesh's default).
fn prefix_target(matched: &str, rewrite: Option<&HttpGatewayRoutePrefixRewrite>) -> String {
    match rewrite {
        Some(HttpGatewayRoutePrefixRewrite { value: Some(v), .. }) => v.clone(),
        Some(HttpGatewayRoutePrefixRewrite {
            default_prefix: Some(DefaultGatewayRouteRewrite::Disabled),
            ..
        }) => matched.to_string(),
        _ => "/".to_string(),
    }
}

/// Host becomes the target service's name unless `defaultTargetHostname` is DISABLED.
fn rewrites_host(rewrite: Option<&GatewayRouteHostnameRewrite>) -> bool {
    rewrite.and_then(|r| r.default_target_hostname) != Some(DefaultGatewayRouteRewrite::Disabled)
}

/// A hostname match as a case-insensitive `:authority` matcher (ports are stripped before
/// routing). A suffix also matches a host equal to it.
fn hostname(h: &GatewayRouteHostnameMatch) -> Option<HeaderMatcher> {
    let pattern = if let Some(e) = &h.exact {
        string_matcher::MatchPattern::Exact(e.clone())
    } else {
        string_matcher::MatchPattern::Suffix(h.suffix.clone()?)
    };
    Some(HeaderMatcher {
        name: ":authority".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: true,
            },
        )),
        ..Default::default()
    })
}

fn query(q: &HttpQueryParameter) -> QueryParameterMatcher {
    let spec = match q.r#match.as_ref().and_then(|m| m.exact.clone()) {
        Some(exact) => {
            query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(exact)),
                ..Default::default()
            })
        }
        None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
    };
    QueryParameterMatcher {
        name: q.name.clone(),
        query_parameter_match_specifier: Some(spec),
    }
}

/// The gateway route's own path matcher and rewrite.
fn own_path(f: &Forward) -> PathPlan {
    let (spec, rewrite) = match f {
        Forward::Prefix { matched, to } => (
            route_match::PathSpecifier::Prefix(matched.clone()),
            if to == matched {
                PathRewrite::Keep
            } else {
                PathRewrite::Prefix(to.clone())
            },
        ),
        Forward::Exact { matched, to } => (
            route_match::PathSpecifier::Path(matched.clone()),
            if to == matched {
                PathRewrite::Keep
            } else {
                PathRewrite::Whole(to.clone())
            },
        ),
        Forward::Regex { matched, to } => (
            route_match::PathSpecifier::SafeRegex(routes::regex(matched)),
            to.clone().map_or(PathRewrite::Keep, PathRewrite::Whole),
        ),
    };
    PathPlan {
        spec,
        extra: None,
        rewrite,
    }
}

/// A `:path` condition (the header carries the query string too).
fn path_header(pattern: string_matcher::MatchPattern) -> Option<HeaderMatcher> {
    Some(HeaderMatcher {
        name: ":path".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(pattern),
                ..Default::default()
            },
        )),
        ..Default::default()
    })
}

/// A path regex applied to `:path`, which may end with a query string.
fn path_regex_header(re: &str) -> Option<HeaderMatcher> {
    path_header(string_matcher::MatchPattern::SafeRegex(routes::regex(
        &format!("(?:{re})(?:\\?.*)?"),
    )))
}

/// The router route's path matcher `router`, which sees the path as the gateway forwards it,
/// expressed on the path the client sent; `None` when no request can match both (or, in the two
/// cases noted inline, when Envoy cannot express it).
fn compose(f: &Forward, router: &route_match::PathSpecifier) -> Option<PathPlan> {
    use route_match::PathSpecifier as P;
    let plan = |spec, extra, rewrite| {
        Some(PathPlan {
            spec,
            extra,
            rewrite,
        })
    };
    match (f, router) {
        (Forward::Prefix { matched, to }, P::Prefix(q)) => {
            if to.starts_with(q.as_str()) {
                // Every forwarded path starts with `q`.
                Some(own_path(f))
            } else if let Some(rest) = q.strip_prefix(to.as_str()) {
                // Forwarded `to + rest…` needs `rest` after the gateway's prefix too.
                let longer = format!("{matched}{rest}");
                let rewrite = if *q == longer {
                    PathRewrite::Keep
                } else {
                    PathRewrite::Prefix(q.clone())
                };
                plan(P::Prefix(longer), None, rewrite)
            } else {
                None
            }
        }
        (Forward::Prefix { matched, to }, P::Path(x)) => {
            let rest = x.strip_prefix(to.as_str())?;
            let original = format!("{matched}{rest}");
            let rewrite = if *x == original {
                PathRewrite::Keep
            } else {
                PathRewrite::Whole(x.clone())
            };
            plan(P::Path(original), None, rewrite)
        }
        (Forward::Prefix { matched, to }, P::SafeRegex(y)) if to == matched => plan(
            P::SafeRegex(y.clone()),
            path_header(string_matcher::MatchPattern::Prefix(matched.clone())),
            PathRewrite::Keep,
        ),
        // A router regex behind a prefix rewrite: "`to` + rest matches y" has no Envoy matcher.
        (Forward::Prefix { .. }, P::SafeRegex(_)) => None,
        (Forward::Exact { to, .. } | Forward::Regex { to: Some(to), .. }, P::Prefix(q)) => {
            to.starts_with(q.as_str()).then(|| own_path(f))
        }
        (Forward::Exact { to, .. } | Forward::Regex { to: Some(to), .. }, P::Path(x)) => {
            (to == x).then(|| own_path(f))
        }
        (Forward::Exact { matched, to }, P::SafeRegex(y)) if to == matched => plan(
            P::Path(matched.clone()),
            path_regex_header(&y.regex),
            PathRewrite::Keep,
        ),
        // A router regex against a rewritten constant path: the agent evaluates no regexes.
        (Forward::Exact { .. } | Forward::Regex { to: Some(_), .. }, P::SafeRegex(_)) => None,
        (Forward::Regex { matched, to: None }, P::Prefix(q)) => plan(
            P::SafeRegex(routes::regex(matched)),
            path_header(string_matcher::MatchPattern::Prefix(q.clone())),
            PathRewrite::Keep,
        ),
        (Forward::Regex { matched, to: None }, P::Path(x)) => plan(
            P::Path(x.clone()),
            path_regex_header(matched),
            PathRewrite::Keep,
        ),
        (Forward::Regex { matched, to: None }, P::SafeRegex(y)) => plan(
            P::SafeRegex(routes::regex(matched)),
            path_regex_header(&y.regex),
            PathRewrite::Keep,
        ),
        _ => None,
    }
}

/// Applies the path and Host rewrites to a route action.
fn apply_rewrites(a: &mut RouteAction, path: &PathRewrite, host: Option<&str>) {
    match path {
        PathRewrite::Keep => {}
        PathRewrite::Prefix(p) => a.prefix_rewrite = p.clone(),
        PathRewrite::Whole(w) => {
            a.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(routes::regex("^.*$")),
                // `\` starts a capture reference in a substitution.
                substitution: w.replace('\\', "\\\\"),
            });
        }
    }
    if let Some(h) = host {
        a.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
            h.to_string(),
        ));
    }
}

/// The plain Envoy prefix rewrites that together forward a prefix match as App Mesh did. Envoy
/// replaces the matched prefix verbatim, so `/chapter` rewritten to `/` would send `/chapter/1`
/// as `//1`; App Mesh sent `/1` (virtual_gateways.md: "if you have configured the Gateway route
/// match prefix to `/chapter`, and, if the incoming request is `/chapter/1`, the request would be
/// rewritten to `/1`"), and `/chapter1` as `/1` (aws-app-mesh-roadmap#247). So when the target
/// ends with `/` and the match does not, `PREFIX/` → `TO` comes first, then `PREFIX` → `TO`.
fn forwards(f: &Forward) -> Vec<Forward> {
    match f {
        Forward::Prefix { matched, to }
            if to != matched && to.ends_with('/') && !matched.ends_with('/') =>
        {
            vec![
                Forward::Prefix {
                    matched: format!("{matched}/"),
                    to: to.clone(),
                },
                f.clone(),
            ]
        }
        _ => vec![f.clone()],
    }
}

/// The Envoy routes of one gateway route (none when its target cannot be reached).
fn gateway_route(
    ctx: &Ctx<'_>,
    client_tls: Option<&ClientPolicyTls>,
    name: &str,
    spec: &GatewayRouteSpec,
    out: &mut Output,
) -> Vec<Route> {
    let Some(parts) = parts(spec) else {
        return vec![];
    };
    let service = parts.target.virtual_service.virtual_service_name.as_str();
    let Some(provider) = ctx
        .mesh
        .virtual_services
        .get(service)
        .and_then(|vs| vs.spec.provider.as_ref())
    else {
        return vec![];
    };
    let host = parts.rewrite_host.then_some(service);
    // A cluster is per (node, port): the first gateway route (in listener and route order) that
    // reaches one names it for SNI.
    let client = Client {
        service,
        policy: client_tls,
    };
    if let Some(p) = &provider.virtual_node {
        let Some((cluster, _, _)) =
            ctx.node_cluster(&p.virtual_node_name, parts.target.port, client, out)
        else {
            return vec![];
        };
        // App Mesh's route defaults (15 s, 300 s idle); the retry default is the virtual host's.
        return forwards(&parts.forward)
            .iter()
            .map(|f| {
                let path = own_path(f);
                let mut action = RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.clone(),
                    )),
                    timeout: envoy::seconds(routes::DEFAULT_PER_REQUEST_S),
                    idle_timeout: envoy::seconds(routes::DEFAULT_IDLE_S),
                    ..Default::default()
                };
                apply_rewrites(&mut action, &path.rewrite, host);
                Route {
                    name: name.to_string(),
                    r#match: Some(parts.route_match(&path, vec![], vec![], false)),
                    action: Some(route::Action::Route(action)),
                    ..Default::default()
                }
            })
            .collect();
    }
    if let Some(p) = &provider.virtual_router {
        return via_router(ctx, client, name, &parts, &p.virtual_router_name, host, out);
    }
    vec![]
}

/// A virtual service provided by a router, as App Mesh's gateways served it: the gateway forwards
/// the (rewritten) request to the service, whose router then picks a route and splits it over
/// its weighted targets.
///
/// Done in one hop: each router route (in the router's own order: priority, longest match,
/// name) becomes one Envoy route whose match is the gateway route's match AND the router
/// route's match, the latter restated on the path the client sent (the router sees the path
/// after the gateway's rewrite; see [`compose`]). Each composed route keeps the router route's
/// action whole — weighted clusters, its own retry policy (else the virtual host's default),
/// timeouts — plus the gateway's rewrites. A route with the gateway route's own match then
/// answers 404, as the router does when none of its routes matches: once a gateway route
/// matched, later gateway routes are not tried. A prefix forwarded by two plain rewrites
/// ([`forwards`]) gets this sequence once per rewrite, the longer prefix first.
///
/// Not expressible, so those router routes are left out: a router regex path match behind a
/// gateway prefix rewrite that changes the prefix, or behind a gateway path rewrite.
fn via_router(
    ctx: &Ctx<'_>,
    client: Client<'_>,
    name: &str,
    parts: &Parts<'_>,
    router: &str,
    host: Option<&str>,
    out: &mut Output,
) -> Vec<Route> {
    let Some(r) = ctx.mesh.virtual_routers.get(router) else {
        return vec![];
    };
    let listeners: Vec<_> = r.spec.listeners.iter().flatten().collect();
    let listener = match parts.target.port {
        Some(p) => listeners.iter().find(|l| l.port_mapping.port == p),
        None if listeners.len() == 1 => listeners.first(),
        None => None,
    };
    let Some(l) = listener else {
        return vec![];
    };
    let attached = routes::router_routes(
        &mut |node, port| ctx.node_cluster(node, port, client, out),
        ctx.mesh.routes.get(router),
        l.port_mapping.protocol,
        l.port_mapping.port,
        listeners.len(),
    );
    let bases: Vec<Route> = attached
        .iter()
        .filter_map(routes::envoy_route_in_host)
        .collect();
    let mut composed = Vec::new();
    for f in forwards(&parts.forward) {
        composed.extend(
            bases
                .iter()
                .filter_map(|base| compose_route(parts, &f, name, base.clone(), host)),
        );
        composed.push(Route {
            name: format!("{name}/no-route"),
            r#match: Some(parts.route_match(&own_path(&f), vec![], vec![], false)),
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 404,
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    composed
}

/// A router route (as `routes::envoy_route_in_host` built it) behind the gateway route `parts`
/// forwarding its path by `forward`.
fn compose_route(
    parts: &Parts<'_>,
    forward: &Forward,
    name: &str,
    base: Route,
    host: Option<&str>,
) -> Option<Route> {
    let Route {
        name: route_name,
        r#match,
        action,
        ..
    } = base;
    let m = r#match?;
    let path = compose(forward, m.path_specifier.as_ref()?)?;
    let route_match = parts.route_match(&path, m.headers, m.query_parameters, m.grpc.is_some());
    let action = match action? {
        route::Action::Route(mut a) => {
            apply_rewrites(&mut a, &path.rewrite, host);
            route::Action::Route(a)
        }
        other => other,
    };
    Some(Route {
        name: format!("{name}/{route_name}"),
        r#match: Some(route_match),
        action: Some(action),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
