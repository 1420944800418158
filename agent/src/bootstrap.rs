//! `trellis-agent bootstrap`: the Envoy bootstrap built from the App Mesh Envoy image's variables,
//! so task definitions written for App Mesh keep working unchanged.

use std::collections::HashMap;

use serde_json::{Value, json};

use trellis_model::ProxyIdentity;

pub const ENV_RESOURCE_ARN: &str = "APPMESH_RESOURCE_ARN";
pub const ENV_RESOURCE_NAME: &str = "APPMESH_RESOURCE_NAME";
pub const ENV_VIRTUAL_NODE_NAME: &str = "APPMESH_VIRTUAL_NODE_NAME";
pub const ENV_RESOURCE_CLUSTER: &str = "APPMESH_RESOURCE_CLUSTER";
pub const ENV_XDS_ENDPOINT: &str = "APPMESH_XDS_ENDPOINT";
pub const ENV_ADMIN_PORT: &str = "ENVOY_ADMIN_ACCESS_PORT";
pub const ENV_ADMIN_LOG: &str = "ENVOY_ADMIN_ACCESS_LOG_FILE";
pub const ENV_LOG_LEVEL: &str = "ENVOY_LOG_LEVEL";
pub const ENV_INITIAL_FETCH_TIMEOUT: &str = "ENVOY_INITIAL_FETCH_TIMEOUT";
pub const ENV_CONCURRENCY: &str = "ENVOY_CONCURRENCY";
/// The local SDS server's Unix socket (a SPIRE agent's), for SDS certificates and trust.
pub const ENV_SDS_SOCKET_PATH: &str = "APPMESH_SDS_SOCKET_PATH";
/// Trellis's own: `DELTA_GRPC` makes Envoy use incremental ADS; `GRPC` (state of the world, the
/// only variant App Mesh's image spoke) is the default.
pub const ENV_XDS_API_TYPE: &str = "TRELLIS_XDS_API_TYPE";

/// Where the agent's socket is when nothing says otherwise (the host directory the rewriter mounts).
pub const DEFAULT_XDS_ENDPOINT: &str = "unix:///var/run/trellis/xds.sock";
pub const XDS_CLUSTER: &str = "trellis_xds";

const LOG_LEVELS: [&str; 7] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical",
];

/// A source of variables: the process environment in `main`, a map in tests.
pub trait Vars {
    fn get(&self, name: &str) -> Option<String>;
}

impl Vars for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Vars for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
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
}

/// The settings that the variables describe; also what the entrypoint needs for Envoy's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoySettings {
    pub node_id: String,
    pub cluster: String,
    pub xds: XdsEndpoint,
    pub admin_port: u16,
    pub admin_log: String,
    pub log_level: String,
    pub initial_fetch_timeout_s: u64,
    pub concurrency: Option<u32>,
    /// `APPMESH_SDS_SOCKET_PATH`: when set, the bootstrap gets the static SDS cluster.
    pub sds_socket: Option<String>,
    pub api_type: ApiType,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsEndpoint {
    Unix(String),
    Tcp { host: String, port: u16 },
}

impl EnvoySettings {
    pub fn from_vars(vars: &impl Vars) -> Result<Self, Error> {
        let nonempty = |n: &str| vars.get(n).filter(|v| !v.trim().is_empty());
        let (var, node_id) = [ENV_RESOURCE_ARN, ENV_RESOURCE_NAME, ENV_VIRTUAL_NODE_NAME]
            .into_iter()
            .find_map(|n| nonempty(n).map(|v| (n, v)))
            .ok_or(Error::MissingIdentity)?;
        // APPMESH_VIRTUAL_NODE_NAME historically held `mesh/M/virtualNode/N`; all forms go through one parser.
        ProxyIdentity::parse(&node_id).map_err(|source| Error::Identity { var, source })?;
        let cluster = nonempty(ENV_RESOURCE_CLUSTER).unwrap_or_else(|| node_id.clone());
        let xds = parse_xds(
            nonempty(ENV_XDS_ENDPOINT)
                .as_deref()
                .unwrap_or(DEFAULT_XDS_ENDPOINT),
        )?;
        let admin_port = match nonempty(ENV_ADMIN_PORT) {
            None => 9901,
            Some(v) => v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or(Error::Invalid {
                    var: ENV_ADMIN_PORT,
                    value: v,
                    rule: "must be a port between 1 and 65535",
                })?,
        };
        let log_level = match nonempty(ENV_LOG_LEVEL) {
            None => "info".to_string(),
            Some(v) if LOG_LEVELS.contains(&v.to_ascii_lowercase().as_str()) => {
                v.to_ascii_lowercase()
            }
            Some(v) => {
                return Err(Error::Invalid {
                    var: ENV_LOG_LEVEL,
                    value: v,
                    rule: "must be one of trace, debug, info, warning, error, critical",
                });
            }
        };
        let initial_fetch_timeout_s = match nonempty(ENV_INITIAL_FETCH_TIMEOUT) {
            None => 0,
            Some(v) => {
                v.trim()
                    .trim_end_matches('s')
                    .parse::<u64>()
                    .map_err(|_| Error::Invalid {
                        var: ENV_INITIAL_FETCH_TIMEOUT,
                        value: v,
                        rule: "must be a whole number of seconds (0 waits forever)",
                    })?
            }
        };
        let concurrency = match nonempty(ENV_CONCURRENCY) {
            None => None,
            Some(v) => Some(v.trim().parse::<u32>().ok().filter(|c| *c > 0).ok_or(
                Error::Invalid {
                    var: ENV_CONCURRENCY,
                    value: v,
                    rule: "must be a positive number of worker threads",
                },
            )?),
        };
        let sds_socket = match nonempty(ENV_SDS_SOCKET_PATH) {
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
        let api_type = match nonempty(ENV_XDS_API_TYPE) {
            None => ApiType::Sotw,
            Some(v) => match v.trim().to_ascii_uppercase().as_str() {
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
        Ok(EnvoySettings {
            node_id,
            cluster,
            xds,
            admin_port,
            admin_log: nonempty(ENV_ADMIN_LOG)
                .unwrap_or_else(|| "/tmp/envoy_admin_access.log".into()),
            log_level,
            initial_fetch_timeout_s,
            concurrency,
            sds_socket,
            api_type,
        })
    }

    /// The bootstrap document (JSON, which Envoy reads as YAML's superset).
    pub fn bootstrap(&self) -> Value {
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
        let ads_source = json!({
            "ads": {},
            "resource_api_version": "V3",
            "initial_fetch_timeout": format!("{}s", self.initial_fetch_timeout_s),
        });
        let mut bootstrap = json!({
            "node": {"id": self.node_id, "cluster": self.cluster},
            "admin": {
                "access_log": [{
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": self.admin_log,
                    }
                }],
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": self.admin_port}}
            },
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
        if let (Some(path), Some(clusters)) = (
            &self.sds_socket,
            bootstrap["static_resources"]["clusters"].as_array_mut(),
        ) {
            clusters.push(sds_cluster(path));
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
