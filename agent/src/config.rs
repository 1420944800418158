//! Command line and environment: every flag of `serve` also reads a `TRELLIS_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "trellis-agent",
    version,
    about = "Trellis: the App Mesh-compatible mesh for ECS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: App Mesh API, store, and the ADS server for this instance's Envoys.
    Serve(Box<ServeConfig>),
    /// Print the Envoy bootstrap built from the App Mesh Envoy variables (APPMESH_RESOURCE_ARN, …).
    Bootstrap(BootstrapArgs),
    /// Print every resource (of the given meshes) as a `--resources` file.
    Export(ExportArgs),
    /// The Envoy image's entrypoint: write the bootstrap, run Envoy, drain it on SIGTERM while the
    /// task's app containers stop (ENVOY_DRAIN_TIMEOUT seconds at most, default 20).
    Envoy(crate::entrypoint::EnvoyArgs),
    /// Exit 0 when the agent at --api-addr answers /healthz (the container health check).
    Health(crate::probe::HealthArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Directory of the embedded store (safe to read while the agent runs).
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "/var/lib/trellis")]
    pub data_dir: PathBuf,
    /// Only these meshes (repeatable); all when absent.
    #[arg(long = "mesh")]
    pub meshes: Vec<String>,
}

#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct ServeConfig {
    /// Directory of the embedded store.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "/var/lib/trellis")]
    pub data_dir: PathBuf,
    /// Address of the App Mesh REST API.
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:9080")]
    pub api_addr: SocketAddr,
    /// Unix socket for ADS (the default transport; mounted into each task's Envoy).
    #[arg(
        long,
        env = "TRELLIS_XDS_SOCKET",
        default_value = "/var/run/trellis/xds.sock"
    )]
    pub xds_socket: PathBuf,
    /// Also serve ADS over TCP at this address (off unless given).
    #[arg(long, env = "TRELLIS_XDS_ADDR")]
    pub xds_addr: Option<SocketAddr>,
    /// JSON list of App Mesh create-request bodies to apply at start-up (idempotently).
    #[arg(long, env = "TRELLIS_RESOURCES")]
    pub resources: Option<PathBuf>,
    /// Account ID used in ARNs and owners.
    #[arg(long, env = "TRELLIS_ACCOUNT_ID", default_value = "000000000000")]
    pub account_id: String,
    /// Region used in ARNs.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Quota: meshes per account.
    #[arg(long, env = "TRELLIS_QUOTA_MESHES", default_value_t = 15)]
    pub quota_meshes: usize,
    /// Quota: virtual nodes per mesh.
    #[arg(long, env = "TRELLIS_QUOTA_VIRTUAL_NODES", default_value_t = 200)]
    pub quota_virtual_nodes: usize,
    /// Quota: virtual services per mesh.
    #[arg(long, env = "TRELLIS_QUOTA_VIRTUAL_SERVICES", default_value_t = 200)]
    pub quota_virtual_services: usize,
    /// Quota: backends per virtual node.
    #[arg(long, env = "TRELLIS_QUOTA_BACKENDS", default_value_t = 50)]
    pub quota_backends: usize,
    /// Quota: virtual routers per mesh.
    #[arg(long, env = "TRELLIS_QUOTA_VIRTUAL_ROUTERS", default_value_t = 200)]
    pub quota_virtual_routers: usize,
    /// Quota: routes per virtual router.
    #[arg(long, env = "TRELLIS_QUOTA_ROUTES", default_value_t = 50)]
    pub quota_routes: usize,
    /// Quota: weighted targets per route.
    #[arg(long, env = "TRELLIS_QUOTA_WEIGHTED_TARGETS", default_value_t = 10)]
    pub quota_weighted_targets: usize,
    /// Quota: virtual gateways per mesh.
    #[arg(long, env = "TRELLIS_QUOTA_VIRTUAL_GATEWAYS", default_value_t = 3)]
    pub quota_virtual_gateways: usize,
    /// Quota: gateway routes per virtual gateway.
    #[arg(long, env = "TRELLIS_QUOTA_GATEWAY_ROUTES", default_value_t = 10)]
    pub quota_gateway_routes: usize,
    /// Quota: tags per resource.
    #[arg(long, env = "TRELLIS_QUOTA_TAGS", default_value_t = 50)]
    pub quota_tags: usize,
    /// Envoy connections allowed per virtual node or gateway (App Mesh's limit).
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_PER_PROXY", default_value_t = 50)]
    pub max_connections_per_proxy: usize,
    /// Quiet period before a burst of changes is pushed, in milliseconds.
    #[arg(long, env = "TRELLIS_XDS_DEBOUNCE_MS", default_value_t = 20)]
    pub xds_debounce_ms: u64,
    /// Longest a change waits for a burst to end before it is pushed anyway, in milliseconds.
    #[arg(long, env = "TRELLIS_XDS_DEBOUNCE_MAX_MS", default_value_t = 500)]
    pub xds_debounce_max_ms: u64,
    /// Log format: text or json.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Write the bootstrap here instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// After writing the bootstrap (to --output), replace this process with Envoy at this path,
    /// passing -c and the flags the variables ask for (ENVOY_LOG_LEVEL, ENVOY_CONCURRENCY).
    #[arg(long, requires = "output")]
    pub exec: Option<PathBuf>,
}
