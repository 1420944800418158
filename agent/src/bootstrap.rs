//! `trellis-agent bootstrap`: the Envoy bootstrap built from the App Mesh Envoy image's variables,
//! so task definitions written for App Mesh keep working unchanged: identity, xDS endpoint,
//! admin, log level, runtime, tracing (`observe.rs`), stats, and the operator's bootstrap files
//! (`files.rs`). Every variable of the image's families is served, explained, or warned about
//! (`catalogue.rs`).

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use trellis_model::ProxyIdentity;

pub mod catalogue;
pub mod files;
pub mod observe;

pub use catalogue::{Level, Note};
pub use observe::{Stats, StatsdTarget, Tracer};

pub const ENV_RESOURCE_ARN: &str = "APPMESH_RESOURCE_ARN";
pub const ENV_RESOURCE_NAME: &str = "APPMESH_RESOURCE_NAME";
pub const ENV_VIRTUAL_NODE_NAME: &str = "APPMESH_VIRTUAL_NODE_NAME";
pub const ENV_RESOURCE_CLUSTER: &str = "APPMESH_RESOURCE_CLUSTER";
/// The older name of `APPMESH_RESOURCE_CLUSTER`.
pub const ENV_VIRTUAL_NODE_CLUSTER: &str = "APPMESH_VIRTUAL_NODE_CLUSTER";
pub const ENV_XDS_ENDPOINT: &str = "APPMESH_XDS_ENDPOINT";
pub const ENV_ADMIN_PORT: &str = "ENVOY_ADMIN_ACCESS_PORT";
pub const ENV_ADMIN_LOG: &str = "ENVOY_ADMIN_ACCESS_LOG_FILE";
pub const ENV_ADMIN_IPV6: &str = "ENVOY_ADMIN_ACCESS_ENABLE_IPV6";
pub const ENV_ADMIN_MODE: &str = "ENVOY_ADMIN_MODE";
pub const ENV_LOG_LEVEL: &str = "ENVOY_LOG_LEVEL";
pub const ENV_INITIAL_FETCH_TIMEOUT: &str = "ENVOY_INITIAL_FETCH_TIMEOUT";
pub const ENV_CONCURRENCY: &str = "ENVOY_CONCURRENCY";
pub const ENV_MAX_REQUESTS_PER_IO_CYCLE: &str = "MAX_REQUESTS_PER_IO_CYCLE";
pub const ENV_OUTLIER_LOG: &str = "ENVOY_OUTLIER_DETECTION_EVENT_LOG_PATH";
/// The local SDS server's Unix socket (a SPIRE agent's), for SDS certificates and trust.
pub const ENV_SDS_SOCKET_PATH: &str = "APPMESH_SDS_SOCKET_PATH";
/// Trellis's own: `DELTA_GRPC` makes Envoy use incremental ADS; `GRPC` (state of the world, the
/// only variant App Mesh's image spoke) is the default.
pub const ENV_XDS_API_TYPE: &str = "TRELLIS_XDS_API_TYPE";
/// Trellis's own: mutual TLS to a TCP `APPMESH_XDS_ENDPOINT` (the agent's `--xds-addr`). Paths in
/// the Envoy container of its client certificate (whose URI SAN names the node), key, and the CA
/// the agent's certificate must chain to; all three or none.
pub const ENV_XDS_CLIENT_CERT: &str = "TRELLIS_XDS_CLIENT_CERT";
pub const ENV_XDS_CLIENT_KEY: &str = "TRELLIS_XDS_CLIENT_KEY";
pub const ENV_XDS_SERVER_CA: &str = "TRELLIS_XDS_SERVER_CA";

/// Where the agent's socket is when nothing says otherwise (the host directory the rewriter mounts).
pub const DEFAULT_XDS_ENDPOINT: &str = "unix:///var/run/trellis/xds.sock";
pub const XDS_CLUSTER: &str = "trellis_xds";
/// Where App Mesh's image put the admin socket in `ENVOY_ADMIN_MODE=uds`.
pub const ADMIN_UDS_PATH: &str = "/tmp/envoy_admin.sock";

const LOG_LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// A source of variables: the process environment in `main`, a map in tests.
pub trait Vars {
    fn get(&self, name: &str) -> Option<String>;
    /// Every variable set, so the unknown ones of App Mesh's families can be named.
    fn names(&self) -> Vec<String>;
}

impl Vars for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Vars for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn names(&self) -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "no Envoy identity: set {ENV_RESOURCE_ARN} to the virtual node or gateway (for example \
         mesh/MESH/virtualNode/NAME or its full ARN); {ENV_RESOURCE_NAME} and {ENV_VIRTUAL_NODE_NAME} \
         are accepted as fallbacks"
    )]
    MissingIdentity,
    #[error("{var}: {source}")]
    Identity {
        var: &'static str,
        #[source]
        source: trellis_model::IdentityError,
    },
    #[error("{var}={value:?}: {rule}")]
    Invalid {
        var: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("{var}={path:?}: {reason}")]
    File {
        var: &'static str,
        path: String,
        reason: String,
    },
}

/// The variables, read the way App Mesh's image read them: trimmed, empty meaning unset.
pub(crate) struct Env<'a, V> {
    vars: &'a V,
}

impl<'a, V: Vars> Env<'a, V> {
    pub(crate) fn new(vars: &'a V) -> Self {
        Env { vars }
    }

    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.vars
            .get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// A boolean as App Mesh's image (Go's `strconv.ParseBool`) took it.
    pub(crate) fn flag(&self, name: &'static str, default: bool) -> Result<bool, Error> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(Error::Invalid {
                    var: name,
                    value: v,
                    rule: "must be a boolean: 1, true, 0 or false",
                }),
            },
        }
    }

    pub(crate) fn port(&self, name: &'static str, default: u16) -> Result<u16, Error> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or(Error::Invalid {
                    var: name,
                    value: v,
                    rule: "must be a port between 1 and 65535",
                }),
        }
    }

    /// An IP address literal (Envoy's socket addresses take no names).
    pub(crate) fn ip(&self, name: &'static str, default: &str) -> Result<String, Error> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(v) => v
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| Error::Invalid {
                    var: name,
                    value: v,
                    rule: "must be an IPv4 or IPv6 address",
                }),
        }
    }

    /// An address or DNS name (for clusters Envoy resolves).
    pub(crate) fn host(&self, name: &'static str, default: &str) -> Result<String, Error> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(v)
                if v.parse::<std::net::IpAddr>().is_ok()
                    || v.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    }) =>
            {
                Ok(v)
            }
            Some(v) => Err(Error::Invalid {
                var: name,
                value: v,
                rule: "must be an IP address or a DNS name",
            }),
        }
    }
}

/// Where Envoy's admin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admin {
    /// `0.0.0.0:port`, or `[::]:port` taking IPv4 too with `ENVOY_ADMIN_ACCESS_ENABLE_IPV6`.
    Tcp { port: u16, ipv6: bool },
    /// `ENVOY_ADMIN_MODE=uds`: a Unix socket only Envoy's user may use.
    Uds(String),
}

/// The settings that the variables describe; also what the entrypoint needs for Envoy's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoySettings {
    pub node_id: String,
    pub identity: ProxyIdentity,
    pub cluster: String,
    pub xds: XdsEndpoint,
    pub admin: Admin,
    pub admin_log: String,
    pub log_level: String,
    pub initial_fetch_timeout_s: u64,
    pub concurrency: Option<u32>,
    /// `APPMESH_SDS_SOCKET_PATH`: when set, the bootstrap gets the static SDS cluster.
    pub sds_socket: Option<String>,
    pub api_type: ApiType,
    /// Mutual TLS to a TCP ADS endpoint.
    pub xds_tls: Option<XdsTls>,
    pub tracer: Option<Tracer>,
    pub stats: Stats,
    /// Envoy runtime keys of the static layer.
    pub runtime: Map<String, Value>,
    pub outlier_log: Option<String>,
    pub fragments: Vec<files::Fragment>,
    /// What the variables said that changes nothing, or is unknown: for the caller to log.
    pub notes: Vec<Note>,
    doc: Value,
}

/// Which ADS variant Envoy speaks (`ads_config.api_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiType {
    /// State of the world (`GRPC`).
    #[default]
    Sotw,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

impl ApiType {
    fn envoy_name(self) -> &'static str {
        match self {
            ApiType::Sotw => "GRPC",
            ApiType::Delta => "DELTA_GRPC",
        }
    }
}

/// Envoy's client certificate, key and the agent's CA, as paths in Envoy's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsEndpoint {
    Unix(String),
    Tcp { host: String, port: u16 },
}

impl EnvoySettings {
    pub fn from_vars(vars: &impl Vars) -> Result<Self, Error> {
        Self::from_vars_with(vars, &[])
    }

    /// [`EnvoySettings::from_vars`], where `extra_known` are further variables of the image's
    /// families that the caller reads itself (so they are not reported as unknown).
    pub fn from_vars_with(vars: &impl Vars, extra_known: &[&str]) -> Result<Self, Error> {
        let env = Env::new(vars);
        let (var, node_id) = [ENV_RESOURCE_ARN, ENV_RESOURCE_NAME, ENV_VIRTUAL_NODE_NAME]
            .into_iter()
            .find_map(|n| env.get(n).map(|v| (n, v)))
            .ok_or(Error::MissingIdentity)?;
        // APPMESH_VIRTUAL_NODE_NAME historically held `mesh/M/virtualNode/N`; all forms go through one parser.
        let identity =
            ProxyIdentity::parse(&node_id).map_err(|source| Error::Identity { var, source })?;
        let cluster = env
            .get(ENV_RESOURCE_CLUSTER)
            .or_else(|| env.get(ENV_VIRTUAL_NODE_CLUSTER))
            .unwrap_or_else(|| node_id.clone());
        let xds = parse_xds(
            env.get(ENV_XDS_ENDPOINT)
                .as_deref()
                .unwrap_or(DEFAULT_XDS_ENDPOINT),
        )?;
        let admin = match env.get(ENV_ADMIN_MODE).map(|m| m.to_ascii_lowercase()) {
            None => Admin::Tcp {
                port: env.port(ENV_ADMIN_PORT, 9901)?,
                ipv6: env.flag(ENV_ADMIN_IPV6, false)?,
            },
            Some(m) if m == "tcp" => Admin::Tcp {
                port: env.port(ENV_ADMIN_PORT, 9901)?,
                ipv6: env.flag(ENV_ADMIN_IPV6, false)?,
            },
            Some(m) if m == "uds" => Admin::Uds(ADMIN_UDS_PATH.into()),
            Some(m) => {
                return Err(Error::Invalid {
                    var: ENV_ADMIN_MODE,
                    value: m,
                    rule: "must be tcp (the default) or uds",
                });
            }
        };
        let log_level = match env.get(ENV_LOG_LEVEL) {
            None => "info".to_string(),
            Some(v) if LOG_LEVELS.contains(&v.to_ascii_lowercase().as_str()) => {
                v.to_ascii_lowercase()
            }
            Some(v) => {
                return Err(Error::Invalid {
                    var: ENV_LOG_LEVEL,
                    value: v,
                    rule: "must be one of trace, debug, info, warning, error, critical, off",
                });
            }
        };
        let initial_fetch_timeout_s = match env.get(ENV_INITIAL_FETCH_TIMEOUT) {
            None => 0,
            Some(v) => v
                .trim_end_matches('s')
                .parse::<u64>()
                .map_err(|_| Error::Invalid {
                    var: ENV_INITIAL_FETCH_TIMEOUT,
                    value: v,
                    rule: "must be a whole number of seconds (0 waits forever)",
                })?,
        };
        let concurrency = match env.get(ENV_CONCURRENCY).as_deref() {
            // App Mesh's image documents -1 as "not set".
            None | Some("-1") => None,
            Some(v) => Some(v.parse::<u32>().ok().filter(|c| *c > 0).ok_or(
                Error::Invalid {
                    var: ENV_CONCURRENCY,
                    value: v.to_string(),
                    rule: "must be a positive number of worker threads (or -1: Envoy's default)",
                },
            )?),
        };
        let sds_socket = match env.get(ENV_SDS_SOCKET_PATH) {
            None => None,
            Some(v) if v.starts_with('/') => Some(v),
            Some(v) => {
                return Err(Error::Invalid {
                    var: ENV_SDS_SOCKET_PATH,
                    value: v,
                    rule: "must be the absolute path of the SDS server's Unix socket",
                });
            }
        };
        let api_type = match env.get(ENV_XDS_API_TYPE) {
            None => ApiType::Sotw,
            Some(v) => match v.to_ascii_uppercase().as_str() {
                "GRPC" => ApiType::Sotw,
                "DELTA_GRPC" => ApiType::Delta,
                _ => {
                    return Err(Error::Invalid {
                        var: ENV_XDS_API_TYPE,
                        value: v,
                        rule: "must be GRPC (state of the world, the default) or DELTA_GRPC (incremental)",
                    });
                }
            },
        };
        let xds_tls = xds_tls(&env, &xds)?;
        let mut notes = catalogue::notes(vars, extra_known);
        let runtime = runtime(&env, &mut notes)?;
        let tracer = observe::tracer(&env, &identity)?;
        let stats = observe::stats(&env)?;
        if stats.metric_extension {
            notes.push(Note {
                var: "APPMESH_METRIC_EXTENSION_VERSION".into(),
                level: Level::Warn,
                text: "partly served: the extension's tags (Mesh, VirtualNode/VirtualGateway on \
                       every stat) are set, but its envoy.appmesh.* metrics came from a filter in \
                       AWS's Envoy build and are not emitted"
                    .into(),
            });
        }
        let fragments = files::read(&env)?;
        let mut settings = EnvoySettings {
            node_id,
            identity,
            cluster,
            xds,
            admin,
            admin_log: env
                .get(ENV_ADMIN_LOG)
                .unwrap_or_else(|| "/tmp/envoy_admin_access.log".into()),
            log_level,
            initial_fetch_timeout_s,
            concurrency,
            sds_socket,
            api_type,
            xds_tls,
            tracer,
            stats,
            runtime,
            outlier_log: env.get(ENV_OUTLIER_LOG),
            fragments,
            notes,
            doc: Value::Null,
        };
        let mut doc = settings.generated();
        if let Some(boot) = doc.as_object_mut() {
            files::merge(boot, &settings.fragments, &mut settings.notes)?;
        }
        settings.doc = doc;
        Ok(settings)
    }

    /// The bootstrap document (JSON, which Envoy reads as YAML's superset).
    pub fn bootstrap(&self) -> Value {
        self.doc.clone()
    }

    /// What the variables generate, before the operator's files are merged in.
    fn generated(&self) -> Value {
        let xds_address = match &self.xds {
            XdsEndpoint::Unix(path) => json!({"pipe": {"path": path}}),
            XdsEndpoint::Tcp { host, port } => {
                json!({"socket_address": {"address": host, "port_value": port}})
            }
        };
        let cluster_type = match &self.xds {
            XdsEndpoint::Tcp { host, .. } if host.parse::<std::net::IpAddr>().is_err() => {
                "STRICT_DNS"
            }
            _ => "STATIC",
        };
        let xds_tls = match (&self.xds, &self.xds_tls) {
            (XdsEndpoint::Tcp { host, .. }, Some(t)) => Some(xds_transport_socket(host, t)),
            _ => None,
        };
        let ads_source = json!({
            "ads": {},
            "resource_api_version": "V3",
            "initial_fetch_timeout": format!("{}s", self.initial_fetch_timeout_s),
        });
        let admin_address = match &self.admin {
            Admin::Tcp { port, ipv6: false } => {
                json!({"socket_address": {"address": "0.0.0.0", "port_value": port}})
            }
            Admin::Tcp { port, ipv6: true } => {
                json!({"socket_address": {"address": "::", "port_value": port, "ipv4_compat": true}})
            }
            Admin::Uds(path) => json!({"pipe": {"path": path, "mode": 0o600}}),
        };
        let mut node = json!({"id": self.node_id, "cluster": self.cluster});
        if self.stats.metric_extension {
            // Where App Mesh's image told its control plane the extension's level.
            node["metadata"] = json!({"aws.appmesh.metric_filter": {"level": "1"}});
        }
        let mut bootstrap = json!({
            "node": node,
            "admin": {
                "access_log": [{
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": self.admin_log,
                    }
                }],
                "address": admin_address
            },
            "layered_runtime": {"layers": [
                {"name": "static_layer_0", "static_layer": self.runtime},
                {"name": "admin_layer", "admin_layer": {}},
            ]},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": self.api_type.envoy_name(),
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
                },
                "cds_config": ads_source,
                "lds_config": ads_source,
            },
            "static_resources": {
                "clusters": [{
                    "name": XDS_CLUSTER,
                    "type": cluster_type,
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}}
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": xds_address}}]}]
                    }
                }]
            }
        });
        let mut clusters = Vec::new();
        if let Some(ts) = xds_tls {
            bootstrap["static_resources"]["clusters"][0]["transport_socket"] = ts;
        }
        if let Some(path) = &self.sds_socket {
            clusters.push(sds_cluster(path));
        }
        if let Some(t) = &self.tracer {
            let (tracing, collector) = observe::tracing_json(t, &self.identity);
            bootstrap["tracing"] = tracing;
            clusters.extend(collector);
        }
        if let Some(list) = bootstrap["static_resources"]["clusters"].as_array_mut() {
            list.extend(clusters);
        }
        if self
            .fragments
            .iter()
            .all(|f| f.var != "ENVOY_STATS_CONFIG_FILE")
        {
            bootstrap["stats_config"] =
                json!({"stats_tags": observe::stats_tags(&self.stats, &self.identity)});
        }
        if let Some(sink) = &self.stats.dogstatsd {
            bootstrap["stats_sinks"] = json!([observe::dogstatsd_sink(sink)]);
        }
        if let Some(interval) = &self.stats.flush_interval {
            bootstrap["stats_flush_interval"] = json!(interval);
        }
        // Per-cluster load reports to the agent (its LRS service beside ADS): the topology page's
        // and `/metrics`' per-edge figures.
        bootstrap["cluster_manager"] = json!({"load_stats_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
        }});
        if let Some(path) = &self.outlier_log {
            bootstrap["cluster_manager"]["outlier_detection"] = json!({"event_log_path": path});
        }
        bootstrap
    }

    /// Envoy's command-line flags for what a bootstrap cannot hold.
    pub fn envoy_args(&self, config_path: &str) -> Vec<String> {
        let mut args = vec![
            "-c".to_string(),
            config_path.to_string(),
            "-l".to_string(),
            self.log_level.clone(),
        ];
        if let Some(c) = self.concurrency {
            args.extend(["--concurrency".to_string(), c.to_string()]);
        }
        args
    }
}

/// The static runtime layer App Mesh's image wrote, from its runtime variables. Flags that
/// Envoy 1.40 no longer has are reported when set to what they can no longer do.
fn runtime(env: &Env<'_, impl Vars>, notes: &mut Vec<Note>) -> Result<Map<String, Value>, Error> {
    let mut rt = Map::new();
    // App Mesh's image allowed configuration Envoy deprecates (bootstrap `tracing` is) and
    // regular expressions of any complexity (Envoy's default refuses large route regexes).
    rt.insert(
        "envoy.features.enable_all_deprecated_features".into(),
        json!(true),
    );
    rt.insert("re2.max_program_size.error_level".into(), json!(1000));
    let mut gone = |var: &str, text: &str| {
        notes.push(Note {
            var: var.into(),
            level: Level::Warn,
            text: format!("not served: {text}"),
        })
    };
    if !env.flag("APPMESH_SET_TRACING_DECISION", true)? {
        gone(
            "APPMESH_SET_TRACING_DECISION",
            "false asked AWS's Envoy build not to write the trace decision into x-request-id; \
             upstream Envoy 1.40 has no such runtime flag and keeps its default (the decision is \
             written, as with App Mesh's default true)",
        );
    }
    if !env.flag("ENVOY_NO_EXTENSION_LOOKUP_BY_NAME", true)? {
        gone(
            "ENVOY_NO_EXTENSION_LOOKUP_BY_NAME",
            "the runtime flag was removed from Envoy; 1.40 always looks extensions up by type \
             URL (true), and Trellis's configuration always carries one",
        );
    }
    if !env.flag("ENVOY_ENABLE_TCP_POOL_IDLE_TIMEOUT", true)? {
        gone(
            "ENVOY_ENABLE_TCP_POOL_IDLE_TIMEOUT",
            "the runtime flag was removed from Envoy (1.28); idle TCP upstream connections \
             close after Envoy's 10 minute default",
        );
    }
    env.flag("ENVOY_USE_HTTP_CLIENT_TO_FETCH_AWS_CREDENTIALS", false)?;
    env.flag("ENVOY_SANITIZE_ORIGINAL_PATH", true)?;
    if let Some(v) = env.get(ENV_MAX_REQUESTS_PER_IO_CYCLE) {
        let n = v
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(Error::Invalid {
                var: ENV_MAX_REQUESTS_PER_IO_CYCLE,
                value: v,
                rule: "must be a positive whole number of requests",
            })?;
        rt.insert("http.max_requests_per_io_cycle".into(), json!(n));
    }
    Ok(rt)
}

/// The static cluster SDS secrets are fetched through (gRPC over the Unix socket `path`), under
/// the name App Mesh's Envoy image gave it, which the translation's SDS configs reference.
fn sds_cluster(path: &str) -> Value {
    let name = trellis_translate::SDS_CLUSTER;
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}]
        }
    })
}

/// `TRELLIS_XDS_CLIENT_CERT`, `_CLIENT_KEY`, `_SERVER_CA`: all three absolute paths, or none; only with a TCP endpoint.
fn xds_tls<V: Vars>(env: &Env<'_, V>, xds: &XdsEndpoint) -> Result<Option<XdsTls>, Error> {
    let vars = [ENV_XDS_CLIENT_CERT, ENV_XDS_CLIENT_KEY, ENV_XDS_SERVER_CA];
    let [cert, key, ca] = vars.map(|v| env.get(v));
    if cert.is_none() && key.is_none() && ca.is_none() {
        return Ok(None);
    }
    for (var, value) in vars.into_iter().zip([&cert, &key, &ca]) {
        match value {
            None => {
                return Err(Error::Invalid {
                    var,
                    value: String::new(),
                    rule: "TRELLIS_XDS_CLIENT_CERT, TRELLIS_XDS_CLIENT_KEY and TRELLIS_XDS_SERVER_CA go together",
                });
            }
            Some(v) if !v.starts_with('/') => {
                return Err(Error::Invalid {
                    var,
                    value: v.clone(),
                    rule: "must be an absolute path in the Envoy container",
                });
            }
            Some(_) => {}
        }
    }
    if let XdsEndpoint::Unix(path) = xds {
        return Err(Error::Invalid {
            var: ENV_XDS_ENDPOINT,
            value: format!("unix://{path}"),
            rule: "TRELLIS_XDS_CLIENT_CERT/_KEY and TRELLIS_XDS_SERVER_CA need a host:port endpoint (the agent's --xds-addr)",
        });
    }
    Ok(cert
        .zip(key)
        .zip(ca)
        .map(|((cert, key), ca)| XdsTls { cert, key, ca }))
}

/// Envoy's side of TCP ADS over mutual TLS: its certificate, and the agent's checked against
/// the CA and the endpoint's name (DNS name or IP address SAN).
fn xds_transport_socket(host: &str, t: &XdsTls) -> Value {
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let san_type = if is_ip { "IP_ADDRESS" } else { "DNS" };
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{
                "certificate_chain": {"filename": t.cert},
                "private_key": {"filename": t.key},
            }],
            "validation_context": {
                "trusted_ca": {"filename": t.ca},
                "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": host}}],
            },
        },
    });
    if !is_ip {
        ctx["sni"] = json!(host);
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": ctx})
}

fn parse_xds(v: &str) -> Result<XdsEndpoint, Error> {
    let invalid = || Error::Invalid {
        var: ENV_XDS_ENDPOINT,
        value: v.to_string(),
        rule: "must be unix:///absolute/path or host:port",
    };
    if let Some(path) = v.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(invalid());
        }
        return Ok(XdsEndpoint::Unix(path.to_string()));
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(invalid)?;
    if host.is_empty() {
        return Err(invalid());
    }
    Ok(XdsEndpoint::Tcp {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests;
