//! Every variable of App Mesh's Envoy image that Trellis knows, and what it does with each: so a
//! variable of these families that is set is either served, explained, or warned about as
//! unknown, never dropped in silence.

use super::Vars;

/// How loudly a variable that changes nothing here is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// It has no effect and the operator may expect one.
    Warn,
    /// It has no effect, and needs none here (App Mesh's endpoint selection, EKS metadata).
    Info,
}

/// Something said about one variable while reading the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub var: String,
    pub level: Level,
    pub text: String,
}

/// Prefixes of the variable families of App Mesh's Envoy image and its agent. `DD_*` is not one:
/// Envoy's Datadog tracer reads those itself.
const FAMILIES: &[&str] = &[
    "APPMESH_",
    "ENVOY_",
    "ENABLE_ENVOY_",
    "XRAY_",
    "AWS_XRAY_",
    "DATADOG_",
    "JAEGER_",
    "STATSD_",
    "APPNET_",
    "RELAY_",
];

/// Names outside those prefixes that belong to the same families.
const LOOSE: &[&str] = &[
    "LISTENER_DRAIN_WAIT_TIME_S",
    "PID_POLL_INTERVAL_MS",
    "HC_POLL_INTERVAL_MS",
    "HC_DISCONNECTED_TIMEOUT_S",
    "MAX_REQUESTS_PER_IO_CYCLE",
    "DISABLE_HOT_RESTART",
    "ENABLE_STATS_SNAPSHOT",
];

/// Variables read and honoured by `trellis-agent bootstrap` or `trellis-agent envoy`.
pub const SERVED: &[&str] = &[
    "APPMESH_RESOURCE_ARN",
    "APPMESH_RESOURCE_NAME",
    "APPMESH_VIRTUAL_NODE_NAME",
    "APPMESH_RESOURCE_CLUSTER",
    "APPMESH_VIRTUAL_NODE_CLUSTER",
    "APPMESH_XDS_ENDPOINT",
    "APPMESH_SDS_SOCKET_PATH",
    "APPMESH_METRIC_EXTENSION_VERSION",
    "APPMESH_SET_TRACING_DECISION",
    "ENVOY_ADMIN_ACCESS_PORT",
    "ENVOY_ADMIN_ACCESS_LOG_FILE",
    "ENVOY_ADMIN_ACCESS_ENABLE_IPV6",
    "ENVOY_ADMIN_MODE",
    "ENVOY_LOG_LEVEL",
    "ENVOY_INITIAL_FETCH_TIMEOUT",
    "ENVOY_CONCURRENCY",
    "ENVOY_NO_EXTENSION_LOOKUP_BY_NAME",
    "ENVOY_ENABLE_TCP_POOL_IDLE_TIMEOUT",
    "ENVOY_USE_HTTP_CLIENT_TO_FETCH_AWS_CREDENTIALS",
    "ENVOY_SANITIZE_ORIGINAL_PATH",
    "MAX_REQUESTS_PER_IO_CYCLE",
    "ENVOY_OUTLIER_DETECTION_EVENT_LOG_PATH",
    "ENVOY_TRACING_CFG_FILE",
    "ENVOY_STATS_CONFIG_FILE",
    "ENVOY_STATS_SINKS_CFG_FILE",
    "ENVOY_RESOURCES_CONFIG_FILE",
    "ENVOY_CONFIG_FILE",
    "ENVOY_STATS_FLUSH_INTERVAL",
    "ENABLE_ENVOY_STATS_TAGS",
    "ENABLE_ENVOY_DOG_STATSD",
    "STATSD_PORT",
    "STATSD_ADDRESS",
    "STATSD_SOCKET_PATH",
    "ENABLE_ENVOY_XRAY_TRACING",
    "XRAY_DAEMON_PORT",
    "AWS_XRAY_DAEMON_ADDRESS",
    "XRAY_SAMPLING_RATE",
    "XRAY_SAMPLING_RULE_MANIFEST",
    "XRAY_SEGMENT_NAME",
    "ENABLE_ENVOY_DATADOG_TRACING",
    "DATADOG_TRACER_PORT",
    "DATADOG_TRACER_ADDRESS",
    "ENABLE_ENVOY_JAEGER_TRACING",
    "JAEGER_TRACER_PORT",
    "JAEGER_TRACER_ADDRESS",
    "JAEGER_TRACER_VERSION",
    // The entrypoint's (`trellis-agent envoy`).
    "ENVOY_DRAIN_TIMEOUT",
    "LISTENER_DRAIN_WAIT_TIME_S",
    "APPNET_ENVOY_RESTART_COUNT",
    "PID_POLL_INTERVAL_MS",
    "DISABLE_HOT_RESTART",
    "ENVOY_SKIP_DEPRECATED_LOGS",
];

/// Known variables that change nothing in Trellis, and why.
const NOT_SERVED: &[(&str, Level, &str)] = &[
    (
        "APPMESH_PREVIEW",
        Level::Info,
        "selects App Mesh's preview endpoint; Trellis's is APPMESH_XDS_ENDPOINT",
    ),
    (
        "APPMESH_DUALSTACK_ENDPOINT",
        Level::Info,
        "selects App Mesh's dual-stack endpoint; Trellis's is APPMESH_XDS_ENDPOINT",
    ),
    (
        "APPMESH_SIGNING_NAME",
        Level::Info,
        "names the SigV4 service for App Mesh's endpoint; the agent's socket needs no signing",
    ),
    (
        "APPMESH_PLATFORM_K8S_VERSION",
        Level::Info,
        "EKS metadata for App Mesh's control plane",
    ),
    (
        "APPMESH_PLATFORM_K8S_POD_UID",
        Level::Info,
        "EKS metadata for App Mesh's control plane",
    ),
    (
        "APPMESH_PLATFORM_APP_MESH_CONTROLLER_VERSION",
        Level::Info,
        "EKS metadata for App Mesh's control plane",
    ),
    (
        "APPMESH_APP_PORTS",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_IGNORE_UID",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_IGNORE_GID",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_ENVOY_INGRESS_PORT",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_ENVOY_EGRESS_PORT",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_EGRESS_IGNORED_IP",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_EGRESS_IGNORED_PORTS",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_ENABLE_IPV6",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPMESH_START_ENABLED",
        Level::Info,
        "read by the route manager, not by Envoy",
    ),
    (
        "APPNET_AGENT_ADMIN_MODE",
        Level::Warn,
        "App Mesh's agent management server (/status, /stats/prometheus, /drain_listeners) is not served; use Envoy's admin port",
    ),
    (
        "APPNET_AGENT_HTTP_PORT",
        Level::Warn,
        "App Mesh's agent management server is not served; use Envoy's admin port",
    ),
    (
        "APPNET_AGENT_HTTP_BIND_ADDRESS",
        Level::Warn,
        "App Mesh's agent management server is not served; use Envoy's admin port",
    ),
    (
        "APPNET_AGENT_ADMIN_UDS_PATH",
        Level::Warn,
        "App Mesh's agent management server is not served; use Envoy's admin port",
    ),
    (
        "APPNET_AGENT_LOGGING_RESET_TIMEOUT",
        Level::Warn,
        "App Mesh's agent /enableLogging is not served; Envoy's admin /logging is",
    ),
    (
        "APPNET_AGENT_POLL_ENVOY_READINESS_INTERVAL_S",
        Level::Info,
        "App Mesh's EKS readiness poll; ECS health-checks Envoy's /server_info",
    ),
    (
        "APPNET_AGENT_POLL_ENVOY_READINESS_TIMEOUT_S",
        Level::Info,
        "App Mesh's EKS readiness poll; ECS health-checks Envoy's /server_info",
    ),
    (
        "HC_POLL_INTERVAL_MS",
        Level::Info,
        "App Mesh's agent health poll; ECS health-checks Envoy's /server_info",
    ),
    (
        "HC_DISCONNECTED_TIMEOUT_S",
        Level::Info,
        "App Mesh's agent health poll; ECS health-checks Envoy's /server_info",
    ),
    (
        "APPNET_ENVOY_LOG_DESTINATION",
        Level::Warn,
        "Envoy logs to standard output (the container's log driver); no log file is written",
    ),
    (
        "APPNET_ENVOY_LOG_NAME",
        Level::Warn,
        "Envoy logs to standard output (the container's log driver); no log file is written",
    ),
    (
        "APPNET_AGENT_MAX_LOG_FILE_SIZE",
        Level::Warn,
        "Envoy logs to standard output (the container's log driver); no log file is written",
    ),
    (
        "APPNET_AGENT_MAX_RETENTION_COUNT",
        Level::Warn,
        "Envoy logs to standard output (the container's log driver); no log file is written",
    ),
    (
        "ENABLE_STATS_SNAPSHOT",
        Level::Warn,
        "App Mesh's agent stats snapshots are not served; Envoy's /stats is",
    ),
    (
        "APPNET_ENABLE_RELAY_MODE_FOR_XDS",
        Level::Warn,
        "relay mode is not needed: the Trellis agent on the instance is the control plane",
    ),
    (
        "APPNET_RELAY_LISTENER_UDS_PATH",
        Level::Warn,
        "relay mode is not needed: the Trellis agent on the instance is the control plane",
    ),
    (
        "APPNET_CONTAINER_IP_MAPPING",
        Level::Info,
        "ECS Service Connect metadata for its control plane",
    ),
    (
        "APPNET_LISTENER_PORT_MAPPING",
        Level::Info,
        "ECS Service Connect metadata for its control plane",
    ),
    (
        "APPNET_FIPS_MODE_ENABLED",
        Level::Info,
        "selects App Mesh's FIPS endpoint; Trellis's is APPMESH_XDS_ENDPOINT",
    ),
];

/// Families whose every member is explained the same way (ECS Service Connect's relay).
const NOT_SERVED_PREFIXES: &[(&str, Level, &str)] = &[
    (
        "APPNET_MANAGEMENT_",
        Level::Warn,
        "relay mode is not needed: the Trellis agent on the instance is the control plane",
    ),
    (
        "RELAY_",
        Level::Warn,
        "relay mode is not needed: the Trellis agent on the instance is the control plane",
    ),
];

/// Notes for every set variable of the families that is not served: why it changes nothing, or
/// that it is unknown. `extra_known` are names another part of Trellis reads (its own settings).
pub fn notes(vars: &impl Vars, extra_known: &[&str]) -> Vec<Note> {
    let mut names = vars.names();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let in_family =
            FAMILIES.iter().any(|p| name.starts_with(p)) || LOOSE.contains(&name.as_str());
        if !in_family || SERVED.contains(&name.as_str()) || extra_known.contains(&name.as_str()) {
            continue;
        }
        let known = NOT_SERVED.iter().find(|(n, _, _)| *n == name).or_else(|| {
            NOT_SERVED_PREFIXES
                .iter()
                .find(|(p, _, _)| name.starts_with(p))
        });
        out.push(match known {
            Some((_, level, why)) => Note {
                var: name,
                level: *level,
                text: format!("not served: {why}"),
            },
            None => Note {
                var: name,
                level: Level::Warn,
                text: "unknown variable of the App Mesh Envoy image's families: ignored".into(),
            },
        });
    }
    out
}
