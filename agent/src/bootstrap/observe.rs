//! Tracing and stats from the App Mesh Envoy image's variables, as that image's agent wrote them:
//! one tracer (X-Ray, Datadog or Jaeger through Envoy's Zipkin tracer), App Mesh's stats tags,
//! DogStatsD, and the stats flush interval.

use serde_json::{Value, json};
use trellis_model::{ProxyIdentity, ProxyKind};

use super::{Env, Error, Vars};

pub const DATADOG_CLUSTER: &str = "datadog_agent";
pub const JAEGER_CLUSTER: &str = "jaeger";
/// X-Ray's own default sampling (5 %, and one request a second): no manifest is written for it.
const XRAY_DEFAULT_RATE: f64 = 0.05;

/// The one tracer a proxy reports to.
#[derive(Debug, Clone, PartialEq)]
pub enum Tracer {
    XRay {
        address: String,
        port: u16,
        segment_name: String,
        /// A localized sampling manifest (X-Ray's version 2 format), inline.
        sampling: Option<String>,
    },
    Datadog {
        address: String,
        port: u16,
        service: String,
    },
    /// Jaeger's Zipkin-compatible collector, `/api/v2/spans`.
    Jaeger {
        address: String,
        port: u16,
        json: bool,
    },
}

/// Where DogStatsD lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsdTarget {
    Udp { address: String, port: u16 },
    Unix(String),
}

/// The stats settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// `ENABLE_ENVOY_STATS_TAGS`: `appmesh.mesh` and `appmesh.virtual_node` (or `_gateway`).
    pub appmesh_tags: bool,
    /// `APPMESH_METRIC_EXTENSION_VERSION=1`: the extension's tags (`Mesh`, `VirtualNode`, …).
    pub metric_extension: bool,
    pub dogstatsd: Option<StatsdTarget>,
    /// Envoy's duration text (`"1.500s"`).
    pub flush_interval: Option<String>,
}

/// Reads the tracer: none, or exactly one of X-Ray, Datadog, Jaeger. With `ENVOY_TRACING_CFG_FILE`
/// the file's tracing replaces them (App Mesh: the built-in tracers are then not configured).
pub(super) fn tracer(
    env: &Env<'_, impl Vars>,
    id: &ProxyIdentity,
) -> Result<Option<Tracer>, Error> {
    let xray = env.flag("ENABLE_ENVOY_XRAY_TRACING", false)?;
    let datadog = env.flag("ENABLE_ENVOY_DATADOG_TRACING", false)?;
    let jaeger = env.flag("ENABLE_ENVOY_JAEGER_TRACING", false)?;
    if [xray, datadog, jaeger].iter().filter(|on| **on).count() > 1 {
        return Err(Error::Invalid {
            var: "ENABLE_ENVOY_XRAY_TRACING",
            value: "1".into(),
            rule: "only one tracer can be enabled: set one of ENABLE_ENVOY_XRAY_TRACING, \
                   ENABLE_ENVOY_DATADOG_TRACING, ENABLE_ENVOY_JAEGER_TRACING",
        });
    }
    if env.get("ENVOY_TRACING_CFG_FILE").is_some() {
        return Ok(None);
    }
    let who = format!("{}/{}", id.mesh, id.name);
    if xray {
        let (address, port) = xray_daemon(env)?;
        return Ok(Some(Tracer::XRay {
            address,
            port,
            segment_name: env.get("XRAY_SEGMENT_NAME").unwrap_or(who),
            sampling: xray_sampling(env)?,
        }));
    }
    if datadog {
        return Ok(Some(Tracer::Datadog {
            address: env.host("DATADOG_TRACER_ADDRESS", "127.0.0.1")?,
            port: env.port("DATADOG_TRACER_PORT", 8126)?,
            service: env.get("DD_SERVICE").unwrap_or(format!("envoy-{who}")),
        }));
    }
    if jaeger {
        let json = match env.get("JAEGER_TRACER_VERSION") {
            None => false,
            Some(v) => match v.to_ascii_uppercase().as_str() {
                "PROTO" => false,
                "JSON" => true,
                _ => {
                    return Err(Error::Invalid {
                        var: "JAEGER_TRACER_VERSION",
                        value: v,
                        rule: "must be PROTO (the default) or JSON",
                    });
                }
            },
        };
        return Ok(Some(Tracer::Jaeger {
            address: env.host("JAEGER_TRACER_ADDRESS", "127.0.0.1")?,
            port: env.port("JAEGER_TRACER_PORT", 9411)?,
            json,
        }));
    }
    Ok(None)
}

/// The daemon's UDP address: `XRAY_DAEMON_PORT` on 127.0.0.1, unless `AWS_XRAY_DAEMON_ADDRESS`
/// (the X-Ray SDKs' variable: `ADDR`, `ADDR:PORT`, or `tcp:ADDR:PORT udp:ADDR:PORT`) says where.
fn xray_daemon(env: &Env<'_, impl Vars>) -> Result<(String, u16), Error> {
    let port = env.port("XRAY_DAEMON_PORT", 2000)?;
    let Some(v) = env.get("AWS_XRAY_DAEMON_ADDRESS") else {
        return Ok(("127.0.0.1".into(), port));
    };
    let invalid = || Error::Invalid {
        var: "AWS_XRAY_DAEMON_ADDRESS",
        value: v.clone(),
        rule: "must be an IP address, IP:PORT, or tcp:IP:PORT udp:IP:PORT (segments go over UDP)",
    };
    let udp = match v.split_whitespace().find_map(|p| p.strip_prefix("udp:")) {
        Some(u) => u.to_string(),
        None if v.contains("tcp:") => return Err(invalid()),
        None => v.clone(),
    };
    if let Ok(ip) = udp.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), port));
    }
    let addr: std::net::SocketAddr = udp.parse().map_err(|_| invalid())?;
    Ok((addr.ip().to_string(), addr.port()))
}

/// `XRAY_SAMPLING_RULE_MANIFEST` (a file, X-Ray's version 2 format), else `XRAY_SAMPLING_RATE`
/// as the default rule's rate with a reservoir of one request a second.
fn xray_sampling(env: &Env<'_, impl Vars>) -> Result<Option<String>, Error> {
    if let Some(path) = env.get("XRAY_SAMPLING_RULE_MANIFEST") {
        let file = |reason: String| Error::File {
            var: "XRAY_SAMPLING_RULE_MANIFEST",
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| file(format!("not JSON: {e}")))?;
        match doc["version"].as_u64() {
            Some(2) => {}
            Some(1) => {
                return Err(file(
                    "version 1 manifests are not supported by Envoy's X-Ray tracer; use version 2"
                        .into(),
                ));
            }
            _ => {
                return Err(file(
                    "must be an X-Ray sampling rule manifest with \"version\": 2".into(),
                ));
            }
        }
        let default = &doc["default"];
        if !(default["fixed_target"].is_u64() && default["rate"].is_number()) {
            return Err(file(
                "needs a \"default\" rule with \"fixed_target\" and \"rate\"".into(),
            ));
        }
        return Ok(Some(text));
    }
    let Some(v) = env.get("XRAY_SAMPLING_RATE") else {
        return Ok(None);
    };
    let rate = v
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or(Error::Invalid {
            var: "XRAY_SAMPLING_RATE",
            value: v.clone(),
            rule: "must be a decimal between 0 and 1.00 (100%)",
        })?;
    // App Mesh rounded to two decimals and wrote nothing for X-Ray's own default.
    let rate = (rate * 100.0).round() / 100.0;
    if (rate - XRAY_DEFAULT_RATE).abs() < f64::EPSILON {
        return Ok(None);
    }
    let manifest = json!({"version": 2, "default": {"fixed_target": 1, "rate": rate}, "rules": []});
    Ok(Some(manifest.to_string()))
}

/// Reads the stats settings (`ENVOY_STATS_CONFIG_FILE` and `ENVOY_STATS_SINKS_CFG_FILE` are merged
/// as files; with the first, the tags are the file's, with the second the sinks are).
pub(super) fn stats(env: &Env<'_, impl Vars>) -> Result<Stats, Error> {
    let metric_extension = match env.get("APPMESH_METRIC_EXTENSION_VERSION").as_deref() {
        None | Some("0") => false,
        Some("1") => true,
        Some(v) => {
            return Err(Error::Invalid {
                var: "APPMESH_METRIC_EXTENSION_VERSION",
                value: v.to_string(),
                rule: "must be 0 or 1",
            });
        }
    };
    let dogstatsd = if env.flag("ENABLE_ENVOY_DOG_STATSD", false)?
        && env.get("ENVOY_STATS_SINKS_CFG_FILE").is_none()
    {
        Some(match env.get("STATSD_SOCKET_PATH") {
            Some(path) if path.starts_with('/') => StatsdTarget::Unix(path),
            Some(path) => {
                return Err(Error::Invalid {
                    var: "STATSD_SOCKET_PATH",
                    value: path,
                    rule: "must be the absolute path of the DogStatsD daemon's Unix socket",
                });
            }
            None => StatsdTarget::Udp {
                address: env.ip("STATSD_ADDRESS", "127.0.0.1")?,
                port: env.port("STATSD_PORT", 8125)?,
            },
        })
    } else {
        None
    };
    let flush_interval = match env.get("ENVOY_STATS_FLUSH_INTERVAL") {
        None => None,
        Some(v) => Some(
            go_duration(&v)
                .filter(|ns| (1_000_000..300_000_000_000).contains(ns))
                .map(|ns| format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000))
                .ok_or(Error::Invalid {
                    var: "ENVOY_STATS_FLUSH_INTERVAL",
                    value: v,
                    rule: "must be a duration such as 5000ms, 10s or 1m, at least 1ms and under 300s",
                })?,
        ),
    };
    Ok(Stats {
        appmesh_tags: env.flag("ENABLE_ENVOY_STATS_TAGS", false)?,
        metric_extension,
        dogstatsd,
        flush_interval,
    })
}

/// A Go duration (`300ms`, `1.5s`, `1m30s`; what App Mesh's agent parsed) in nanoseconds.
fn go_duration(s: &str) -> Option<u128> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|n| *n > 0)?;
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(total.round() as u128)
}

/// `bootstrap.tracing` and the static cluster its collector needs.
pub(super) fn tracing_json(t: &Tracer, id: &ProxyIdentity) -> (Value, Option<Value>) {
    match t {
        Tracer::XRay {
            address,
            port,
            segment_name,
            sampling,
        } => {
            let mut cfg = json!({
                "@type": "type.googleapis.com/envoy.config.trace.v3.XRayConfig",
                "daemon_endpoint": {"protocol": "UDP", "address": address, "port_value": port},
                "segment_name": segment_name,
                "segment_fields": {
                    "origin": "AWS::AppMesh::Proxy",
                    // App Mesh named gateways under this key too.
                    "aws": {"app_mesh": {"mesh_name": id.mesh, "virtual_node_name": id.name}}
                }
            });
            if let Some(m) = sampling {
                cfg["sampling_rule_manifest"] = json!({"inline_string": m});
            }
            (
                json!({"http": {"name": "envoy.tracers.xray", "typed_config": cfg}}),
                None,
            )
        }
        Tracer::Datadog {
            address,
            port,
            service,
        } => (
            json!({"http": {"name": "envoy.tracers.datadog", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig",
                "collector_cluster": DATADOG_CLUSTER,
                "service_name": service,
            }}}),
            Some(collector_cluster(DATADOG_CLUSTER, address, *port)),
        ),
        Tracer::Jaeger {
            address,
            port,
            json,
        } => (
            json!({"http": {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": JAEGER_CLUSTER,
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": if *json { "HTTP_JSON" } else { "HTTP_PROTO" },
                "shared_span_context": false,
            }}}),
            Some(collector_cluster(JAEGER_CLUSTER, address, *port)),
        ),
    }
}

/// A collector reached by name or address (resolved as the task resolves names).
fn collector_cluster(name: &str, address: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": address, "port_value": port}}}}]}]}
    })
}

/// App Mesh's stats tags. The listener tags are always there: they split `ingress.PROTOCOL.PORT`
/// stat prefixes into `appmesh.listener_protocol` and `appmesh.listener_port`, and name the
/// ingress route configuration.
pub(super) fn stats_tags(s: &Stats, id: &ProxyIdentity) -> Vec<Value> {
    let (snake, camel) = match id.kind {
        ProxyKind::VirtualNode => ("virtual_node", "VirtualNode"),
        ProxyKind::VirtualGateway => ("virtual_gateway", "VirtualGateway"),
    };
    let fixed = |tag: String, value: &str| json!({"tag_name": tag, "fixed_value": value});
    let regex = |tag: &str, regex: &str| json!({"tag_name": tag, "regex": regex});
    let mut tags = Vec::new();
    if s.appmesh_tags {
        tags.push(fixed("appmesh.mesh".into(), &id.mesh));
        tags.push(fixed(format!("appmesh.{snake}"), &id.name));
    }
    if s.metric_extension {
        // The extension's own stats are named `appmesh.<Metric>.<Tag>.<value>…`; its target
        // service must come last, as service names hold dots.
        tags.push(regex(
            "TargetVirtualNode",
            r"^appmesh(?:\..+?\..+?)*?(\.TargetVirtualNode\.(.+?))(?:\..+?\..+?)*\.[^.]+$",
        ));
        tags.push(regex(
            "TargetVirtualService",
            r"^appmesh(?:\..+?\..+?)*?(\.TargetVirtualService\.([^MVT]+))(?:\..+?\..+?)*\.[^.]+$",
        ));
        tags.push(fixed("Mesh".into(), &id.mesh));
        tags.push(fixed(camel.into(), &id.name));
    }
    tags.push(regex(
        "appmesh.listener_protocol",
        r"^.*?\.ingress\.((\w+?)\.)\d+?\..+$",
    ));
    tags.push(regex(
        "appmesh.listener_port",
        r"^.*?\.ingress\.\w+?\.((\d+?)\.).+$",
    ));
    tags.push(regex(
        "envoy_rds_route_config",
        r"^.*?\.ingress\.\w+?\.\d+?\.rds\.((.*?)\.).+$",
    ));
    tags
}

/// The DogStatsD sink.
pub(super) fn dogstatsd_sink(t: &StatsdTarget) -> Value {
    let address = match t {
        StatsdTarget::Udp { address, port } => {
            json!({"socket_address": {"protocol": "UDP", "address": address, "port_value": port}})
        }
        StatsdTarget::Unix(path) => json!({"pipe": {"path": path}}),
    };
    json!({"name": "envoy.stat_sinks.dog_statsd", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink",
        "address": address,
    }})
}

#[cfg(test)]
mod tests {
    use super::go_duration;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("5000ms"), Some(5_000_000_000));
        assert_eq!(go_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration("10"), None);
        assert_eq!(go_duration("fast"), None);
        assert_eq!(go_duration(""), None);
    }
}
