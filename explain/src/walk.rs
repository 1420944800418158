//! The walk: a connection and its request through a proxy's resources in Envoy's order —
//! listener, filter chain, connection manager, HTTP filters, virtual host, route, action,
//! clusters, endpoints — recording each decision as a [`Step`] with what [`Spec`] says it came
//! from in App Mesh.

use std::net::{IpAddr, Ipv4Addr};

use prost::{Message, Name};
use trellis_envoy_api::pb::envoy::config::cluster::v3::cluster;
use trellis_envoy_api::pb::envoy::config::core::v3::{Address, address, health_check};
use trellis_envoy_api::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use trellis_envoy_api::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use trellis_envoy_api::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, VirtualHost, route, route_action,
};
use trellis_envoy_api::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck as HealthFilter;
use trellis_envoy_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use trellis_envoy_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy,
};
use trellis_envoy_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    UpstreamTlsContext, common_tls_context,
};
use trellis_envoy_api::pb::google::protobuf::{Any, Duration};
use trellis_model::ProxyKind;
use trellis_translate::{EGRESS_PORT, INGRESS_PORT, Resources};

use super::matching::{self, DomainMatch, Headers};
use super::spec::{Miss, RouteRef, Spec};
use super::{Direction, Outcome, Passed, Request, Stage, Step, Target};

/// A request may cross the proxy's own listeners this many times (a gateway's pool hop).
const MAX_HOPS: u8 = 3;
/// Envoy's route timeout when a route sets none.
const ENVOY_ROUTE_TIMEOUT_S: i64 = 15;

pub(crate) fn run(
    res: &Resources,
    spec: &Spec<'_>,
    req: &Request,
    direction: Direction,
) -> (Vec<Step>, Outcome) {
    let mut w = Walk {
        res,
        spec,
        steps: Vec::new(),
        direction,
    };
    let outcome = w.start(req);
    (w.steps, outcome)
}

struct Walk<'a> {
    res: &'a Resources,
    spec: &'a Spec<'a>,
    steps: Vec<Step>,
    direction: Direction,
}

/// A connection as a listener sees it.
#[derive(Clone, Debug)]
struct Conn {
    /// The name (or address) the client called.
    host: String,
    dst_ip: Option<IpAddr>,
    dst_port: u32,
    tls: bool,
    sni: Option<String>,
}

/// An HTTP request as the connection manager sees it.
#[derive(Clone, Debug)]
struct Http {
    authority: String,
    path: String,
    method: String,
    scheme: &'static str,
    headers: Vec<(String, String)>,
}

impl Http {
    fn of(req: &Request) -> Option<Self> {
        req.is_http().then(|| Http {
            authority: req.authority.clone(),
            path: req.path.clone(),
            method: req.method.clone(),
            scheme: "http",
            headers: req.headers.clone(),
        })
    }

    /// Every header routing sees: pseudo-headers, what the connection manager adds, the rest.
    fn routing_headers(&self) -> Headers {
        let mut h = Headers(vec![
            (":authority".into(), self.authority.clone()),
            (":path".into(), self.path.clone()),
            (":method".into(), self.method.clone()),
            (":scheme".into(), self.scheme.into()),
        ]);
        h.0.extend(self.headers.iter().cloned());
        h.set("x-forwarded-proto", self.scheme);
        h
    }

    /// Envoy's test for a gRPC request.
    fn is_grpc(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n == "content-type"
                && (v == "application/grpc"
                    || v.starts_with("application/grpc+")
                    || v.starts_with("application/grpc;"))
        })
    }
}

impl<'a> Walk<'a> {
    fn step(
        &mut self,
        stage: Stage,
        envoy: impl Into<String>,
        decision: impl Into<String>,
    ) -> &mut Step {
        self.steps.push(Step {
            stage,
            envoy: envoy.into(),
            decision: decision.into(),
            from: vec![],
            passed: vec![],
        });
        let last = self.steps.len() - 1;
        &mut self.steps[last]
    }

    fn start(&mut self, req: &Request) -> Outcome {
        let conn = Conn {
            host: req.host.clone(),
            dst_ip: req.destination,
            dst_port: u32::from(req.port),
            tls: req.is_tls(),
            sni: req.is_tls().then(|| req.host.clone()),
        };
        let http = Http::of(req);
        let (port, why) = match (self.spec.who.kind, self.direction) {
            (ProxyKind::VirtualGateway, _) => (
                conn.dst_port,
                "clients connect to the gateway's listener port itself (a gateway has no iptables redirect)",
            ),
            (ProxyKind::VirtualNode, Direction::Outbound) => (
                EGRESS_PORT,
                "iptables (APPMESH_EGRESS) redirects the app's outbound connection to Envoy's egress port; the listener's original_dst filter restores the destination the app asked for",
            ),
            (ProxyKind::VirtualNode, Direction::Inbound) => (
                INGRESS_PORT,
                "iptables (APPMESH_INGRESS) redirects connections to the node's listener ports to Envoy's ingress port; the listener's original_dst filter restores the port the caller asked for",
            ),
        };
        let Some(listener) = self.listener_on(port, false) else {
            let (reason, fix) = self.spec.no_listener(port, self.direction);
            self.step(Stage::Listener, "(none)", reason.clone());
            return Outcome::Closed { reason, fix };
        };
        self.step(Stage::Listener, listener.name.clone(), why);
        self.connection(listener, &conn, http.as_ref(), 0)
    }

    /// The listener bound to `port`: on any address, or (for a hop from the proxy itself) loopback.
    fn listener_on(&self, port: u32, loopback: bool) -> Option<&'a Listener> {
        let res: &'a Resources = self.res;
        res.listeners.iter().find(|l| {
            socket(l.address.as_ref()).is_some_and(|(ip, p)| {
                p == port && (ip.is_unspecified() || (loopback && ip.is_loopback()))
            })
        })
    }

    fn connection(&mut self, l: &Listener, conn: &Conn, http: Option<&Http>, hop: u8) -> Outcome {
        let inspector = l
            .listener_filters
            .iter()
            .find(|f| f.name == "envoy.filters.listener.tls_inspector");
        let inspected = inspector.is_some_and(|f| {
            !f.filter_disabled
                .as_ref()
                .is_some_and(|p| matching::predicate(p, conn.dst_port))
        });
        let (transport, sni) = if conn.tls && inspected {
            ("tls", conn.sni.as_deref())
        } else {
            ("raw_buffer", None)
        };
        let picked = pick_chain(l, conn, transport, sni);
        let Some((label, chain, why)) = picked else {
            let (reason, fix) =
                self.spec
                    .no_chain(conn.dst_port, &conn.host, conn.tls, self.direction);
            let envoy = l.name.clone();
            self.step(Stage::FilterChain, envoy, format!("none: {reason}"));
            return Outcome::Closed { reason, fix };
        };
        let from = self.spec.chain_fields(l, conn.dst_port, self.direction);
        let envoy = format!("{} {label}", l.name);
        self.step(Stage::FilterChain, envoy, why).from = from;
        if conn.tls && chain.transport_socket.is_none() {
            if let Some(tcp) = chain.filters.iter().find_map(tcp_proxy_of) {
                return self.tcp(&tcp, conn);
            }
            let reason = format!(
                "the client speaks TLS to port {}, where Envoy expects plain HTTP: in a mesh the app calls http:// and Envoy originates TLS from the backend's client policy (spec.backends[].virtualService.clientPolicy.tls)",
                conn.dst_port
            );
            return Outcome::Closed {
                reason,
                fix: vec![],
            };
        }
        for f in &chain.filters {
            if let Some(hcm) = decode::<HttpConnectionManager>(f) {
                let Some(http) = http else {
                    let reason = format!(
                        "port {} is an HTTP port (an HTTP connection manager): a raw TCP client's bytes are read as HTTP and refused",
                        conn.dst_port
                    );
                    return Outcome::Closed {
                        reason,
                        fix: vec![],
                    };
                };
                return self.http(&hcm, conn, http, hop);
            }
            if let Some(tcp) = tcp_proxy_of(f) {
                if http.is_some() {
                    let last = self.steps.len() - 1;
                    self.steps[last].decision.push_str(
                        "; a TCP proxy: the HTTP request passes as bytes, no route applies",
                    );
                }
                return self.tcp(&tcp, conn);
            }
        }
        Outcome::Closed {
            reason: "the chain has neither an HTTP connection manager nor a TCP proxy".into(),
            fix: vec![],
        }
    }

    fn tcp(&mut self, tcp: &TcpProxy, conn: &Conn) -> Outcome {
        let clusters: Vec<(String, u32)> = match &tcp.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .collect(),
            None => vec![],
        };
        let idle = tcp
            .idle_timeout
            .as_ref()
            .map_or("1 h (Envoy's default)".to_string(), show_duration);
        let from = self.spec.tcp_fields(conn.dst_port, self.direction);
        let decision = format!(
            "TCP proxy (stat prefix {}), idle timeout {idle}",
            tcp.stat_prefix
        );
        self.step(Stage::Targets, tcp.stat_prefix.clone(), decision)
            .from = from;
        let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        let targets = clusters
            .iter()
            .map(|(name, w)| self.cluster(name, *w, total, conn))
            .collect();
        Outcome::Proxied { targets }
    }

    fn http(&mut self, hcm: &HttpConnectionManager, conn: &Conn, http: &Http, hop: u8) -> Outcome {
        let mut req = http.clone();
        let mut notes = Vec::new();
        let strip_any = matches!(
            hcm.strip_port_mode,
            Some(http_connection_manager::StripPortMode::StripAnyHostPort(
                true
            ))
        );
        if (strip_any || hcm.strip_matching_host_port)
            && let Some((host, port)) = split_port(&req.authority)
            && (strip_any || port == conn.dst_port)
        {
            notes.push(format!(
                "strips the port from Host ({} → {host})",
                req.authority
            ));
            req.authority = host;
        }
        let before = req.path.clone();
        if hcm.normalize_path.as_ref().is_some_and(|b| b.value) {
            req.path = matching::normalize(&req.path);
        }
        if hcm.merge_slashes {
            req.path = matching::merge_slashes(&req.path);
        }
        if req.path != before {
            notes.push(format!("normalizes the path ({before} → {})", req.path));
        }
        let rds = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(r)) => r.route_config_name.clone(),
            Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => rc.name.clone(),
            _ => String::new(),
        };
        let mut decision = format!("HTTP, routed by route configuration {rds}");
        for n in &notes {
            decision.push_str("; ");
            decision.push_str(n);
        }
        self.step(Stage::ConnectionManager, hcm.stat_prefix.clone(), decision);
        for f in &hcm.http_filters {
            if f.name == "envoy.filters.http.health_check"
                && let Some(hc) =
                    typed::<HealthFilter>(f.config_type.as_ref().and_then(|c| match c {
                        http_filter::ConfigType::TypedConfig(a) => Some(a),
                        _ => None,
                    }))
                && !hc.pass_through_mode.as_ref().is_some_and(|b| b.value)
            {
                let headers = req.routing_headers();
                if hc
                    .headers
                    .iter()
                    .all(|h| matching::header(h, &headers).is_ok())
                {
                    let (reason, from) = self.spec.health_reply(conn.dst_port);
                    let step = self.step(Stage::HttpFilter, f.name.clone(), reason.clone());
                    step.from = from;
                    return Outcome::LocalReply {
                        status: 200,
                        reason,
                        fix: vec![],
                    };
                }
            }
        }
        let rc = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(r)) => self
                .res
                .routes
                .iter()
                .find(|rc| rc.name == r.route_config_name),
            Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => Some(rc),
            _ => None,
        };
        let Some(rc) = rc else {
            let reason = format!(
                "route configuration {rds} was not sent (Envoy answers 404 until it has one)"
            );
            return Outcome::LocalReply {
                status: 404,
                reason,
                fix: vec![],
            };
        };
        let host = req.authority.to_ascii_lowercase();
        let Some((vh, domain)) = pick_virtual_host(rc, &host) else {
            let names: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
            let (reason, fix) = self.spec.no_vhost(conn.dst_port, &host, &names);
            self.step(
                Stage::VirtualHost,
                rc.name.clone(),
                format!("none: {reason}"),
            );
            return Outcome::LocalReply {
                status: 404,
                reason,
                fix,
            };
        };
        let how = match &domain.1 {
            DomainMatch::Exact => format!("Host {host:?} equals the domain {:?}", domain.0),
            DomainMatch::Any => "the catch-all domain \"*\" takes any Host".to_string(),
            _ => format!("Host {host:?} matches the wildcard domain {:?}", domain.0),
        };
        let from = self.spec.vhost_fields(&vh.name);
        let envoy = format!("{}/{}", rc.name, vh.name);
        self.step(Stage::VirtualHost, envoy, how).from = from;
        self.route(rc, vh, req, conn, hop)
    }

    fn route(
        &mut self,
        rc: &RouteConfiguration,
        vh: &VirtualHost,
        req: Http,
        conn: &Conn,
        hop: u8,
    ) -> Outcome {
        let headers = req.routing_headers();
        let params = matching::query_params(&req.path);
        let grpc = req.is_grpc();
        let mut passed = Vec::new();
        let mut chosen = None;
        for r in &vh.routes {
            match route_miss(r, &req, &headers, &params, grpc) {
                None => {
                    chosen = Some(r);
                    break;
                }
                Some(miss) => {
                    // A gateway route composed with a router's routes (`GR/route`) fails either
                    // on the gateway route's own match (its `GR/no-route` sibling fails too) or
                    // on the router route's.
                    let own = r.name.split_once('/').and_then(|(gr, _)| {
                        let sibling = format!("{gr}/no-route");
                        vh.routes
                            .iter()
                            .find(|x| x.name == sibling)
                            .and_then(|x| route_miss(x, &req, &headers, &params, grpc))
                    });
                    let rr = self.spec.route(&vh.name, &r.name, conn.dst_port);
                    let (reason, from) = match own {
                        Some(own) => (
                            own.reason().to_string(),
                            self.spec.miss_fields(&rr, &own, true),
                        ),
                        None => (
                            miss.reason().to_string(),
                            self.spec.miss_fields(&rr, &miss, false),
                        ),
                    };
                    passed.push(Passed {
                        envoy: display_route(&r.name),
                        reason,
                        from,
                    });
                }
            }
        }
        let Some(r) = chosen else {
            let (reason, fix) = self.spec.no_route(&vh.name, &req.path);
            let envoy = format!("{}/{}", rc.name, vh.name);
            let step = self.step(Stage::Route, envoy, format!("none: {reason}"));
            step.passed = passed;
            return Outcome::LocalReply {
                status: 404,
                reason,
                fix,
            };
        };
        let rr = self.spec.route(&vh.name, &r.name, conn.dst_port);
        let decision = format!("{}: {}", display_route(&r.name), describe_match(r));
        let from = self.spec.route_fields(&rr);
        let step = self.step(Stage::Route, display_route(&r.name), decision);
        step.from = from;
        step.passed = passed;
        match &r.action {
            Some(route::Action::Route(a)) => self.forward(vh, r, &rr, a, req, conn, hop),
            Some(route::Action::DirectResponse(d)) => {
                let (reason, fix) = self.spec.direct(&rr, d.status);
                Outcome::LocalReply {
                    status: u16::try_from(d.status).unwrap_or(500),
                    reason,
                    fix,
                }
            }
            Some(route::Action::Redirect(_)) => Outcome::LocalReply {
                status: 301,
                reason: "the route redirects the client".into(),
                fix: vec![],
            },
            _ => Outcome::LocalReply {
                status: 404,
                reason: "the route has no action Envoy can take for this request".into(),
                fix: vec![],
            },
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the walk's state at a route, passed down"
    )]
    fn forward(
        &mut self,
        vh: &VirtualHost,
        r: &Route,
        rr: &RouteRef<'_>,
        a: &RouteAction,
        req: Http,
        conn: &Conn,
        hop: u8,
    ) -> Outcome {
        let clusters: Vec<(String, u32)> = match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                .collect(),
            _ => vec![],
        };
        let mut fwd = req.clone();
        let mut rewrites = Vec::new();
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (req.path.clone(), None),
        };
        let mut new_path = path.clone();
        if !a.prefix_rewrite.is_empty() {
            let matched = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                Some(trellis_envoy_api::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(p)) => p.len().min(path.len()),
                _ => path.len(),
            };
            new_path = format!("{}{}", a.prefix_rewrite, &path[matched..]);
            rewrites.push(format!("prefix_rewrite {:?}", a.prefix_rewrite));
        }
        if let Some(rx) = &a.regex_rewrite
            && let Some(p) = &rx.pattern
            && let Ok(re) = regex::Regex::new(&p.regex)
        {
            // RE2's \N references are the regex crate's ${N}.
            let sub = re2_substitution(&rx.substitution);
            new_path = re.replace_all(&new_path, sub.as_str()).into_owned();
            rewrites.push(format!(
                "regex_rewrite {:?} → {:?}",
                p.regex, rx.substitution
            ));
        }
        fwd.path = match &query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) =
            &a.host_rewrite_specifier
        {
            fwd.authority = h.clone();
            rewrites.push(format!("host_rewrite_literal {h:?}"));
        }
        if !rewrites.is_empty() {
            let decision = format!(
                "{}: forwarded as {} {} with Host {}",
                rewrites.join(", "),
                fwd.method,
                fwd.path,
                fwd.authority
            );
            let from = self.spec.rewrite_fields(rr);
            self.step(Stage::Rewrite, display_route(&r.name), decision)
                .from = from;
        }
        let (policy, own) = match (&a.retry_policy, &vh.retry_policy) {
            (Some(p), _) => (Some(p), true),
            (None, Some(p)) => (Some(p), false),
            (None, None) => (None, false),
        };
        let retries = match policy {
            Some(p) => {
                let mut s = format!(
                    "{} on {}",
                    p.num_retries.as_ref().map_or(1, |n| n.value),
                    if p.retry_on.is_empty() {
                        "nothing"
                    } else {
                        &p.retry_on
                    }
                );
                if !p.retriable_status_codes.is_empty() {
                    s.push_str(&format!(" (status codes {:?})", p.retriable_status_codes));
                }
                match &p.per_try_timeout {
                    Some(d) => s.push_str(&format!(", {} per try", show_duration(d))),
                    None => s.push_str(", no per-try timeout"),
                }
                if p.retry_host_predicate
                    .iter()
                    .any(|h| h.name.ends_with("previous_hosts"))
                {
                    s.push_str(", each on another host when there is one");
                }
                if !own {
                    s.push_str(" (the virtual host's policy: the route sets none)");
                }
                s
            }
            None => "none".into(),
        };
        let from = self.spec.retry_fields(rr, own);
        self.step(Stage::Retries, display_route(&r.name), retries)
            .from = from;
        let timeout = a.timeout.as_ref().map_or_else(
            || format!("{ENVOY_ROUTE_TIMEOUT_S} s (Envoy's default)"),
            |d| {
                if d.seconds == 0 && d.nanos == 0 {
                    "none".into()
                } else {
                    show_duration(d)
                }
            },
        );
        let idle = a.idle_timeout.as_ref().map_or_else(
            || "the connection manager's (5 min by default)".into(),
            |d| {
                if d.seconds == 0 && d.nanos == 0 {
                    "none".into()
                } else {
                    show_duration(d)
                }
            },
        );
        let from = self.spec.timeout_fields(rr);
        self.step(
            Stage::Timeouts,
            display_route(&r.name),
            format!("{timeout} per request, idle {idle}"),
        )
        .from = from;
        let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        if clusters.is_empty() {
            return Outcome::LocalReply {
                status: 503,
                reason: "the route names no cluster".into(),
                fix: vec![],
            };
        }
        let shares: Vec<String> = clusters
            .iter()
            .map(|(c, w)| format!("{c} weight {w} ({})", percent(*w, total)))
            .collect();
        let from = clusters
            .iter()
            .flat_map(|(c, _)| self.spec.target_fields(rr, c))
            .collect();
        let decision = if clusters.len() == 1 {
            format!("{} (all requests)", clusters[0].0)
        } else {
            format!("one per request, by weight: {}", shares.join("; "))
        };
        self.step(Stage::Targets, display_route(&r.name), decision)
            .from = from;
        let targets: Vec<Target> = clusters
            .iter()
            .map(|(name, w)| self.cluster(name, *w, total, conn))
            .collect();
        if let [only] = targets.as_slice()
            && hop < MAX_HOPS
            && let Some(port) = self.loopback_port(&only.cluster)
            && let Some(next) = self.listener_on(port, true)
        {
            let decision = format!(
                "{} sends the request to the proxy's own listener {} (127.0.0.1:{port}), which routes it again",
                only.cluster, next.name
            );
            let from = self.spec.hop_fields(&only.cluster);
            self.step(Stage::Hop, next.name.clone(), decision).from = from;
            let loopback = Conn {
                host: "127.0.0.1".into(),
                dst_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                dst_port: port,
                tls: false,
                sni: None,
            };
            return self.connection(next, &loopback, Some(&fwd), hop + 1);
        }
        let reachable: Vec<&Target> = targets.iter().filter(|t| t.weight > 0).collect();
        if !reachable.is_empty()
            && reachable.iter().all(|t| {
                t.endpoints.is_empty()
                    && t.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with("no endpoints"))
            })
        {
            let (reason, fix) = self.spec.no_endpoints(
                &reachable
                    .iter()
                    .map(|t| t.cluster.as_str())
                    .collect::<Vec<_>>(),
            );
            return Outcome::LocalReply {
                status: 503,
                reason,
                fix,
            };
        }
        Outcome::Forwarded {
            authority: fwd.authority,
            path: fwd.path,
            targets,
        }
    }

    /// The port of the proxy's own listener that `cluster` sends to, if it does (a static
    /// cluster of one loopback endpoint).
    fn loopback_port(&self, cluster: &str) -> Option<u32> {
        let c = self.res.clusters.iter().find(|c| c.name == cluster)?;
        let endpoints = static_endpoints(c.load_assignment.as_ref());
        match endpoints.as_slice() {
            [(ip, port)] if ip.is_loopback() => Some(*port),
            _ => None,
        }
    }

    /// One target: the cluster, how Envoy connects to it, and its endpoints.
    fn cluster(&mut self, name: &str, weight: u32, total: u64, conn: &Conn) -> Target {
        let share = if total == 0 {
            0.0
        } else {
            f64::from(weight) / total as f64
        };
        let (virtual_node, port) = self
            .spec
            .cluster_of(name)
            .map_or((None, None), |(n, p)| (Some(n), Some(p)));
        let mut target = Target {
            cluster: name.to_string(),
            weight,
            share,
            virtual_node,
            port,
            endpoints: vec![],
            note: None,
        };
        let Some(c) = self.res.clusters.iter().find(|c| c.name == name) else {
            target.note =
                Some("not sent to this proxy: Envoy answers 503 (cluster not found)".into());
            return target;
        };
        let kind = match &c.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t)) => {
                cluster::DiscoveryType::try_from(*t).unwrap_or(cluster::DiscoveryType::Static)
            }
            _ => cluster::DiscoveryType::Static,
        };
        let mut parts = vec![match kind {
            cluster::DiscoveryType::Static => "static addresses".to_string(),
            cluster::DiscoveryType::StrictDns => {
                "DNS, every address the name resolves to (STRICT_DNS)".into()
            }
            cluster::DiscoveryType::LogicalDns => {
                "DNS, the first address the name resolves to (LOGICAL_DNS)".into()
            }
            cluster::DiscoveryType::Eds => "endpoints sent by the agent (EDS)".into(),
            cluster::DiscoveryType::OriginalDst => {
                "the original destination the app connected to (ORIGINAL_DST)".into()
            }
        }];
        if let Some(ts) = &c.transport_socket
            && let Some(tls) = typed::<UpstreamTlsContext>(ts.config_type.as_ref().map(|t| match t {
                trellis_envoy_api::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a) => a,
            }))
        {
            parts.push(describe_tls(&tls));
        } else if kind != cluster::DiscoveryType::OriginalDst {
            parts.push("plaintext".into());
        }
        if c.typed_extension_protocol_options.values().any(is_http2) {
            parts.push("HTTP/2 upstream".into());
        }
        if let Some(hc) = c.health_checks.first() {
            let what = match &hc.health_checker {
                Some(health_check::HealthChecker::HttpHealthCheck(h)) => {
                    format!("HTTP GET {}", h.path)
                }
                Some(health_check::HealthChecker::TcpHealthCheck(_)) => "TCP connect".into(),
                Some(health_check::HealthChecker::GrpcHealthCheck(_)) => "gRPC health".into(),
                _ => "a health check".into(),
            };
            let every = hc
                .interval
                .as_ref()
                .map_or(String::new(), |d| format!(" every {}", show_duration(d)));
            parts.push(format!("active health check {what}{every}"));
        }
        if let Some(o) = &c.outlier_detection {
            let n = o.consecutive_5xx.as_ref().map_or(5, |v| v.value);
            parts.push(format!(
                "outlier detection (ejects a host after {n} consecutive 5xx)"
            ));
        }
        if let Some(t) = c
            .circuit_breakers
            .as_ref()
            .and_then(|cb| cb.thresholds.first())
        {
            let lim = |v: &Option<trellis_envoy_api::pb::google::protobuf::UInt32Value>| {
                v.as_ref().map(|v| v.value)
            };
            let limited: Vec<String> = [
                ("connections", lim(&t.max_connections)),
                ("pending requests", lim(&t.max_pending_requests)),
                ("requests", lim(&t.max_requests)),
            ]
            .into_iter()
            .filter_map(|(n, v)| {
                v.filter(|v| *v < i32::MAX as u32)
                    .map(|v| format!("{v} {n}"))
            })
            .collect();
            if !limited.is_empty() {
                parts.push(format!("circuit breakers: at most {}", limited.join(", ")));
            }
        }
        let from = self.spec.cluster_fields(name);
        self.step(Stage::Cluster, name.to_string(), parts.join("; "))
            .from = from;
        let (endpoints, note) = match kind {
            cluster::DiscoveryType::OriginalDst => {
                let dst = match conn.dst_ip {
                    Some(ip) => format!("{ip}:{}", conn.dst_port),
                    None => format!("the address the app connected to, port {}", conn.dst_port),
                };
                (vec![dst], None)
            }
            cluster::DiscoveryType::Eds => {
                let service = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(name);
                match self.res.endpoints.iter().find(|e| e.cluster_name == service) {
                    Some(cla) => {
                        let list = lb_addresses(cla);
                        let note = list.is_empty().then(|| "no endpoints: discovery found no healthy instance, so Envoy answers 503 (no healthy upstream)".to_string());
                        (list, note)
                    }
                    None if self.res.pending.iter().any(|p| p == service) => (
                        vec![],
                        Some("not known yet: Cloud Map has not answered for it on this agent (offline, or no proxy of this agent uses it yet)".into()),
                    ),
                    None => (vec![], Some("no endpoints were sent for it".into())),
                }
            }
            cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns => {
                let list: Vec<String> = c
                    .load_assignment
                    .as_ref()
                    .map(lb_addresses)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| format!("{a} (DNS, resolved by Envoy)"))
                    .collect();
                (list, None)
            }
            cluster::DiscoveryType::Static => {
                let list = c
                    .load_assignment
                    .as_ref()
                    .map(lb_addresses)
                    .unwrap_or_default();
                (list, None)
            }
        };
        let shown = if endpoints.is_empty() {
            note.clone().unwrap_or_else(|| "none".into())
        } else {
            endpoints.join(", ")
        };
        self.step(Stage::Endpoints, name.to_string(), shown);
        target.endpoints = endpoints;
        target.note = note;
        target
    }
}

/// Why `r` does not take the request, or `None` when it does (Envoy checks the path, then
/// headers and query parameters, then gRPC).
fn route_miss(
    r: &Route,
    req: &Http,
    headers: &Headers,
    params: &[(String, String)],
    grpc: bool,
) -> Option<Miss> {
    let Some(m) = &r.r#match else {
        return Some(Miss::Other("the route has no match".into()));
    };
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    if let Err(e) = matching::path(m.path_specifier.as_ref(), case_sensitive, &req.path) {
        return Some(Miss::Path(e));
    }
    for h in &m.headers {
        if let Err(e) = matching::header(h, headers) {
            return Some(Miss::Header {
                name: h.name.clone(),
                reason: e,
            });
        }
    }
    for q in &m.query_parameters {
        if let Err(e) = matching::query(q, params) {
            return Some(Miss::Query {
                name: q.name.clone(),
                reason: e,
            });
        }
    }
    if m.grpc.is_some() && !grpc {
        return Some(Miss::Grpc(
            "the route takes gRPC requests only (content-type application/grpc)".into(),
        ));
    }
    None
}

/// The conditions of a route that matched, in words.
fn describe_match(r: &Route) -> String {
    use trellis_envoy_api::pb::envoy::config::route::v3::route_match::PathSpecifier as P;
    let Some(m) = &r.r#match else {
        return "matches".into();
    };
    let mut parts = vec![match &m.path_specifier {
        Some(P::Prefix(p)) if p == "/" => "any path".to_string(),
        Some(P::Prefix(p)) => format!("path starts with {p:?}"),
        Some(P::Path(p)) => format!("path is {p:?}"),
        Some(P::SafeRegex(re)) => format!("path matches {:?}", re.regex),
        Some(P::PathSeparatedPrefix(p)) => format!("path is {p:?} or under it"),
        _ => "path".into(),
    }];
    for h in &m.headers {
        parts.push(format!("header {} as required", h.name));
    }
    for q in &m.query_parameters {
        parts.push(format!("query parameter {} as required", q.name));
    }
    if m.grpc.is_some() {
        parts.push("gRPC".into());
    }
    format!("matches ({})", parts.join(", "))
}

/// How a route is named in explanations (a gateway's 404 route for "no route of the router").
fn display_route(name: &str) -> String {
    if name.is_empty() {
        "(the virtual host's only route)".into()
    } else {
        name.to_string()
    }
}

/// Envoy's filter chain choice, as FilterChainManagerImpl makes it: destination port (a chain
/// for the exact port wins; if none of those matches the rest, the default chain, never the
/// port-less ones), then destination address (longest prefix), server name (exact, then
/// `*.suffix`, then none), transport protocol, application protocols; then the default chain.
fn pick_chain<'l>(
    l: &'l Listener,
    conn: &Conn,
    transport: &str,
    sni: Option<&str>,
) -> Option<(String, &'l FilterChain, String)> {
    let all: Vec<(usize, &FilterChain)> = l.filter_chains.iter().enumerate().collect();
    let port_of = |c: &FilterChain| {
        c.filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port.as_ref())
            .map(|p| p.value)
    };
    let exact: Vec<_> = all
        .iter()
        .copied()
        .filter(|(_, c)| port_of(c) == Some(conn.dst_port))
        .collect();
    let mut why = Vec::new();
    let by_port = if exact.is_empty() {
        if all.iter().any(|(_, c)| port_of(c).is_some()) {
            why.push(format!("no chain names port {}", conn.dst_port));
        } else {
            why.push("the listener's chains take any port".into());
        }
        all.iter()
            .copied()
            .filter(|(_, c)| port_of(c).is_none())
            .collect()
    } else {
        why.push(format!("destination port {}", conn.dst_port));
        exact
    };
    let rest = by_criteria(by_port, conn, transport, sni, &mut why);
    match rest {
        Some((i, c)) => Some((format!("filter_chains[{i}]"), c, why.join(", "))),
        None => l.default_filter_chain.as_ref().map(|c| {
            (
                "default_filter_chain".to_string(),
                c,
                format!("{}: no other chain takes the connection", why.join(", ")),
            )
        }),
    }
}

fn by_criteria<'l>(
    chains: Vec<(usize, &'l FilterChain)>,
    conn: &Conn,
    transport: &str,
    sni: Option<&str>,
    why: &mut Vec<String>,
) -> Option<(usize, &'l FilterChain)> {
    let m = |c: &FilterChain| c.filter_chain_match.clone().unwrap_or_default();
    // Destination address: the longest prefix; a chain without ranges is 0.0.0.0/0 and ::/0.
    let best_len = |c: &FilterChain| -> Option<u32> {
        let ranges = m(c).prefix_ranges;
        if ranges.is_empty() {
            return Some(0);
        }
        let ip = conn.dst_ip?;
        ranges.iter().filter_map(|r| matching::cidr(r, ip)).max()
    };
    let longest = chains.iter().filter_map(|(_, c)| best_len(c)).max()?;
    let chains: Vec<_> = chains
        .into_iter()
        .filter(|(_, c)| best_len(c) == Some(longest))
        .collect();
    if longest > 0
        && let Some(ip) = conn.dst_ip
    {
        why.push(format!("destination address {ip}"));
    }
    // Server name.
    let names = |c: &FilterChain| m(c).server_names;
    let chains: Vec<_> = match sni {
        Some(name) => {
            let exact: Vec<_> = chains
                .iter()
                .copied()
                .filter(|(_, c)| names(c).iter().any(|n| n == name))
                .collect();
            if !exact.is_empty() {
                why.push(format!("server name {name}"));
                exact
            } else {
                let mut wild = Vec::new();
                let mut pos = name.find('.');
                while let Some(p) = pos {
                    let w = format!("*{}", &name[p..]);
                    wild = chains
                        .iter()
                        .copied()
                        .filter(|(_, c)| names(c).contains(&w))
                        .collect();
                    if !wild.is_empty() {
                        why.push(format!("server name {name} matches {w}"));
                        break;
                    }
                    pos = name[p + 1..].find('.').map(|q| q + p + 1);
                }
                if wild.is_empty() {
                    chains
                        .iter()
                        .copied()
                        .filter(|(_, c)| names(c).is_empty())
                        .collect()
                } else {
                    wild
                }
            }
        }
        None => chains
            .iter()
            .copied()
            .filter(|(_, c)| names(c).is_empty())
            .collect(),
    };
    // Transport protocol.
    let exact: Vec<_> = chains
        .iter()
        .copied()
        .filter(|(_, c)| m(c).transport_protocol == transport)
        .collect();
    let chains = if exact.is_empty() {
        chains
            .into_iter()
            .filter(|(_, c)| m(c).transport_protocol.is_empty())
            .collect()
    } else {
        if transport == "tls" {
            why.push("TLS (seen by the TLS inspector)".into());
        } else {
            why.push("plaintext".into());
        }
        exact
    };
    // The client's ALPN and source are not modelled: chains that require them do not match.
    chains.into_iter().find(|(_, c)| {
        let fm = m(c);
        fm.application_protocols.is_empty()
            && fm.source_prefix_ranges.is_empty()
            && fm.direct_source_prefix_ranges.is_empty()
            && fm.source_ports.is_empty()
    })
}

/// The virtual host for `host` and the domain that matched: exact, then wildcard suffixes
/// (longest first), then wildcard prefixes, then `*`.
fn pick_virtual_host<'r>(
    rc: &'r RouteConfiguration,
    host: &str,
) -> Option<(&'r VirtualHost, (String, DomainMatch))> {
    let mut best: Option<(&VirtualHost, (String, DomainMatch))> = None;
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            if let Some(m) = matching::domain(d, host)
                && best.as_ref().is_none_or(|(_, (_, b))| m < *b)
            {
                best = Some((vh, (d.clone(), m)));
            }
        }
    }
    best
}

/// `host:port` → (host, port).
fn split_port(authority: &str) -> Option<(String, u32)> {
    let (h, p) = authority.rsplit_once(':')?;
    if h.contains(':') && !h.ends_with(']') {
        return None;
    }
    Some((h.to_string(), p.parse().ok()?))
}

fn socket(a: Option<&Address>) -> Option<(IpAddr, u32)> {
    match a?.address.as_ref()? {
        address::Address::SocketAddress(s) => {
            let ip = s.address.parse().ok()?;
            let port = match s.port_specifier.as_ref()? {
                trellis_envoy_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p) => *p,
                _ => return None,
            };
            Some((ip, port))
        }
        _ => None,
    }
}

/// Every endpoint address of an assignment, `host:port`.
fn lb_addresses(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => match ep.address.as_ref()?.address.as_ref()? {
                address::Address::SocketAddress(s) => {
                    let port = match s.port_specifier.as_ref()? {
                        trellis_envoy_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p) => *p,
                        _ => return None,
                    };
                    Some(if s.address.contains(':') {
                        format!("[{}]:{port}", s.address)
                    } else {
                        format!("{}:{port}", s.address)
                    })
                }
                address::Address::Pipe(p) => Some(p.path.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn static_endpoints(cla: Option<&ClusterLoadAssignment>) -> Vec<(IpAddr, u32)> {
    cla.into_iter()
        .flat_map(|c| &c.endpoints)
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => socket(ep.address.as_ref()),
            _ => None,
        })
        .collect()
}

fn decode<M: Message + Name + Default>(f: &Filter) -> Option<M> {
    typed::<M>(f.config_type.as_ref().and_then(|c| match c {
        filter::ConfigType::TypedConfig(a) => Some(a),
        _ => None,
    }))
}

fn tcp_proxy_of(f: &Filter) -> Option<TcpProxy> {
    decode::<TcpProxy>(f)
}

fn typed<M: Message + Name + Default>(a: Option<&Any>) -> Option<M> {
    let a = a?;
    (a.type_url == M::type_url())
        .then(|| M::decode(a.value.as_slice()).ok())
        .flatten()
}

fn is_http2(a: &Any) -> bool {
    use trellis_envoy_api::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options,
    };
    typed::<HttpProtocolOptions>(Some(a)).is_some_and(|o| {
        matches!(
            o.upstream_protocol_options,
            Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(ref e))
                if matches!(e.protocol_config, Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)))
        )
    })
}

fn describe_tls(tls: &UpstreamTlsContext) -> String {
    let common = tls.common_tls_context.as_ref();
    let verify = common
        .and_then(|c| c.validation_context_type.as_ref())
        .map(|v| match v {
            common_tls_context::ValidationContextType::ValidationContext(vc) => {
                let sans = vc.match_typed_subject_alt_names.len();
                let san = if sans > 0 {
                    format!(", {sans} subject alternative name(s) required")
                } else {
                    String::new()
                };
                format!("verifying the server's certificate against trusted CAs{san}")
            }
            common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s) => {
                format!(
                    "verifying the server against the SDS trust bundle {}",
                    s.name
                )
            }
            common_tls_context::ValidationContextType::CombinedValidationContext(c) => {
                let name = c
                    .validation_context_sds_secret_config
                    .as_ref()
                    .map_or("", |s| s.name.as_str());
                format!("verifying the server against {name}")
            }
            _ => "verifying the server".into(),
        })
        .unwrap_or_else(|| "without verifying the server's certificate".into());
    let client = common.is_some_and(|c| {
        !c.tls_certificates.is_empty() || !c.tls_certificate_sds_secret_configs.is_empty()
    });
    let sni = if tls.sni.is_empty() {
        String::new()
    } else {
        format!(" (SNI {})", tls.sni)
    };
    let mtls = if client {
        ", presenting a client certificate (mutual TLS)"
    } else {
        ""
    };
    format!("TLS{sni}, {verify}{mtls}")
}

/// RE2's `\1` is the regex crate's `${1}`; a literal `$` must be doubled.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

fn percent(w: u32, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    let p = f64::from(w) * 100.0 / total as f64;
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

pub(crate) fn show_duration(d: &Duration) -> String {
    let ms = d.seconds * 1000 + i64::from(d.nanos) / 1_000_000;
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}
