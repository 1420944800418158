//! Command line and environment: every flag of `serve` also reads a `TRELLIS_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::store::StoreArgs;

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
    /// Create what the store needs: the data directory, or the DynamoDB table (if absent).
    InitStore(InitStoreArgs),
    /// An AWS CLI credential_process: prove your IAM identity (signed sts:GetCallerIdentity) to
    /// the agent at --endpoint and print the session credentials it issues.
    Credentials(crate::auth::client::CredentialsArgs),
    /// Where does this request go, and why: run it through the Envoy configuration the agent sends
    /// the proxy, and print each decision with the App Mesh field it came from.
    Explain(crate::explain::ExplainArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InitStoreArgs {
    /// Directory of the embedded store.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "/var/lib/trellis")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Region when the AWS SDK's default chain finds none.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Directory of the embedded store (safe to read while the agent runs).
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "/var/lib/trellis")]
    pub data_dir: PathBuf,
    /// Only these meshes (repeatable); all when absent.
    #[arg(long = "mesh")]
    pub meshes: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Region when the AWS SDK's default chain finds none.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
}

#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct ServeConfig {
    /// Directory of the embedded store.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "/var/lib/trellis")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address of the App Mesh REST API. Anything but loopback needs --api-auth (or, to leave it
    /// open on purpose, --api-auth-disabled).
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:9080")]
    pub api_addr: SocketAddr,
    #[command(flatten)]
    pub api: ApiSecurityArgs,
    /// Unix socket for ADS (the default transport; mounted into each task's Envoy).
    #[arg(
        long,
        env = "TRELLIS_XDS_SOCKET",
        default_value = "/var/run/trellis/xds.sock"
    )]
    pub xds_socket: PathBuf,
    /// Also serve ADS over TCP at this address (off unless given). Needs --xds-tls-cert,
    /// --xds-tls-key and --xds-tls-client-ca (or, in a lab, --xds-tcp-insecure).
    #[arg(long, env = "TRELLIS_XDS_ADDR")]
    pub xds_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub xds_security: XdsSecurityArgs,
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
    #[command(flatten)]
    pub cloudmap: CloudMapArgs,
    /// How often the names of TCP services that share a port are resolved again, in
    /// milliseconds (they tell those services apart by address).
    #[arg(long, env = "TRELLIS_ADDRESS_POLL_MS", default_value_t = 5000)]
    pub address_poll_ms: u64,
    /// How often Envoys send load reports (per-cluster request counts, for `/metrics`, the
    /// topology page and `/trellis/v1/load`), in milliseconds; 0 asks for none.
    #[arg(long, env = "TRELLIS_LOAD_REPORT_INTERVAL_MS", default_value_t = 5000)]
    pub load_report_interval_ms: u64,
    /// ACM and ACM PCA endpoint URL (one for both) instead of the region's (a VPC endpoint,
    /// tests). ACM certificates and trust are served only with attestation (`--xds-attestation
    /// ecs`, or TCP ADS with mTLS).
    #[arg(long, env = "TRELLIS_ACM_ENDPOINT")]
    pub acm_endpoint: Option<String>,
    /// How often each ACM certificate is exported again and each ACM PCA certificate fetched
    /// again (renewals reach Envoy without a restart), in seconds.
    #[arg(long, env = "TRELLIS_ACM_REFRESH_INTERVAL_S", default_value_t = 3600)]
    pub acm_refresh_interval_s: u64,
}

/// Who may use the API and how it is reached: SigV4 with the auth file's keys and roles, TLS, the
/// audit log, and the STS that proves IAM identities.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct ApiSecurityArgs {
    /// Keys and IAM roles with their policies (JSON; reloaded when it changes). Every API request
    /// must then be SigV4-signed.
    #[arg(long, env = "TRELLIS_API_AUTH", conflicts_with = "api_auth_disabled")]
    pub api_auth: Option<PathBuf>,
    /// Serve the API without authentication on a non-loopback address, knowingly.
    #[arg(long, env = "TRELLIS_API_AUTH_DISABLED")]
    pub api_auth_disabled: bool,
    /// PEM certificate chain for HTTPS on the API (reloaded when it changes).
    #[arg(long, env = "TRELLIS_API_TLS_CERT", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of --api-tls-cert.
    #[arg(long, env = "TRELLIS_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Append one JSON line per mutating or refused API request here.
    #[arg(long, env = "TRELLIS_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Names of this Trellis deployment that an IAM identity proof may carry in its signed
    /// x-trellis-server-id header (comma-separated; e.g. the API's DNS name). Without one, no
    /// IAM role can get credentials.
    #[arg(long, env = "TRELLIS_API_SERVER_ID", value_delimiter = ',')]
    pub api_server_id: Vec<String>,
    /// STS endpoint that identity proofs are sent to, instead of https://sts.REGION.amazonaws.com
    /// (a VPC endpoint, or a test STS).
    #[arg(long, env = "TRELLIS_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Lifetime of the session credentials issued to IAM roles, in seconds.
    #[arg(
        long,
        env = "TRELLIS_API_SESSION_SECONDS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u64).range(900..=43200)
    )]
    pub api_session_seconds: u64,
    /// How often the auth file and the TLS files are checked for changes, in milliseconds.
    #[arg(
        long,
        env = "TRELLIS_API_RELOAD_MS",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub api_reload_ms: u64,
}

impl Default for ApiSecurityArgs {
    /// The command line's defaults (an open API on loopback), for agents built in code.
    fn default() -> Self {
        ApiSecurityArgs {
            api_auth: None,
            api_auth_disabled: false,
            api_tls_cert: None,
            api_tls_key: None,
            audit_log: None,
            api_server_id: vec![],
            sts_endpoint: None,
            api_session_seconds: 3600,
            api_reload_ms: 2000,
        }
    }
}

/// Who may open an ADS stream as which node: attestation of Unix socket peers (the kernel and
/// ECS), mutual TLS on TCP.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct XdsSecurityArgs {
    /// How a Unix socket stream proves its node: `ecs` (the peer's pid, cgroup, ECS task
    /// definition; the agent task needs `pidMode: host`) or `none` (any process that can open
    /// the socket may claim any node: labs and the local demo only).
    #[arg(
        long,
        env = "TRELLIS_XDS_ATTESTATION",
        value_enum,
        default_value = "ecs"
    )]
    pub xds_attestation: crate::attest::Mode,
    /// The ECS agent's introspection API (task and container of a Docker id).
    #[arg(long, env = "TRELLIS_ECS_AGENT_URI", default_value = crate::attest::ecs::DEFAULT_AGENT_URI)]
    pub ecs_agent_uri: String,
    /// ECS API endpoint for DescribeTaskDefinition instead of the region's (a VPC endpoint, tests).
    #[arg(long, env = "TRELLIS_ECS_ENDPOINT")]
    pub ecs_endpoint: Option<String>,
    /// Regular expression matched against each component of a process's cgroup paths; its one
    /// capture group is the container id (default: a 64-hex id, bare, `docker-ID.scope`,
    /// `cri-containerd-ID.scope`, …).
    #[arg(long, env = "TRELLIS_XDS_ATTESTATION_CONTAINER_PATTERN", default_value = crate::attest::cgroup::DEFAULT_PATTERN)]
    pub xds_attestation_container_pattern: String,
    /// Group (numeric id) owning the ADS socket; the socket is then 0660 instead of 0666.
    #[arg(long, env = "TRELLIS_XDS_SOCKET_GROUP")]
    pub xds_socket_group: Option<u32>,
    /// PEM certificate chain of TCP ADS (reloaded when it changes).
    #[arg(long, env = "TRELLIS_XDS_TLS_CERT", requires_all = ["xds_tls_key", "xds_tls_client_ca"])]
    pub xds_tls_cert: Option<PathBuf>,
    /// PEM private key of --xds-tls-cert.
    #[arg(long, env = "TRELLIS_XDS_TLS_KEY", requires = "xds_tls_cert")]
    pub xds_tls_key: Option<PathBuf>,
    /// PEM CA bundle that TCP Envoys' client certificates must chain to; the node id must be a
    /// URI SAN of the certificate (the node's ARN, or spiffe://DOMAIN/mesh/M/virtualNode/N).
    #[arg(long, env = "TRELLIS_XDS_TLS_CLIENT_CA", requires = "xds_tls_cert")]
    pub xds_tls_client_ca: Option<PathBuf>,
    /// Serve TCP ADS in plain text to anyone who can reach --xds-addr, as any node they claim
    /// (labs only).
    #[arg(
        long,
        env = "TRELLIS_XDS_TCP_INSECURE",
        conflicts_with = "xds_tls_cert"
    )]
    pub xds_tcp_insecure: bool,
}

impl Default for XdsSecurityArgs {
    /// The command line's defaults, for agents built in code.
    fn default() -> Self {
        XdsSecurityArgs {
            xds_attestation: crate::attest::Mode::Ecs,
            ecs_agent_uri: crate::attest::ecs::DEFAULT_AGENT_URI.into(),
            ecs_endpoint: None,
            xds_attestation_container_pattern: crate::attest::cgroup::DEFAULT_PATTERN.into(),
            xds_socket_group: None,
            xds_tls_cert: None,
            xds_tls_key: None,
            xds_tls_client_ca: None,
            xds_tcp_insecure: false,
        }
    }
}

/// Cloud Map discovery: where, how often, and which health filter.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct CloudMapArgs {
    /// Cloud Map endpoint URL instead of the region's (a VPC endpoint or a local stand-in; the
    /// `data-` host prefix is dropped unless the host is an AWS one).
    #[arg(long = "cloudmap-endpoint", env = "TRELLIS_CLOUDMAP_ENDPOINT")]
    pub endpoint: Option<String>,
    /// How often each Cloud Map service in use is checked (DiscoverInstancesRevision), in ms.
    #[arg(
        long = "cloudmap-poll-interval-ms",
        env = "TRELLIS_CLOUDMAP_POLL_INTERVAL_MS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub poll_ms: u64,
    /// How often a service whose instances changed within the churn window is checked, in ms
    /// (a rolling deployment's next deregistration reaches callers sooner).
    #[arg(
        long = "cloudmap-churn-poll-interval-ms",
        env = "TRELLIS_CLOUDMAP_CHURN_POLL_INTERVAL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub churn_poll_ms: u64,
    /// How long after a service's instances changed the churn poll interval applies, in ms (0:
    /// never).
    #[arg(
        long = "cloudmap-churn-window-ms",
        env = "TRELLIS_CLOUDMAP_CHURN_WINDOW_MS",
        default_value_t = 60000
    )]
    pub churn_window_ms: u64,
    /// How often instances are fetched even when the revision is unchanged (health), in ms.
    #[arg(
        long = "cloudmap-refresh-interval-ms",
        env = "TRELLIS_CLOUDMAP_REFRESH_INTERVAL_MS",
        default_value_t = 30000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub refresh_ms: u64,
    /// Random spread of every wait, in percent of it.
    #[arg(
        long = "cloudmap-jitter-percent",
        env = "TRELLIS_CLOUDMAP_JITTER_PERCENT",
        default_value_t = 10,
        value_parser = clap::value_parser!(u8).range(0..=50)
    )]
    pub jitter_percent: u8,
    /// Longest wait between calls after repeated failures (throttling, outage), in ms.
    #[arg(
        long = "cloudmap-backoff-max-ms",
        env = "TRELLIS_CLOUDMAP_BACKOFF_MAX_MS",
        default_value_t = 60000
    )]
    pub backoff_max_ms: u64,
    /// How long a service nobody on this agent needs any more is still polled, in ms.
    #[arg(
        long = "cloudmap-linger-ms",
        env = "TRELLIS_CLOUDMAP_LINGER_MS",
        default_value_t = 60000
    )]
    pub linger_ms: u64,
    /// DiscoverInstances HealthStatus filter.
    #[arg(
        long = "cloudmap-health-status",
        env = "TRELLIS_CLOUDMAP_HEALTH_STATUS",
        default_value = "HEALTHY",
        value_parser = ["HEALTHY", "HEALTHY_OR_ELSE_ALL", "ALL"]
    )]
    pub health_status: String,
    /// With --store dynamodb: one poller per Cloud Map service for every agent of the table,
    /// elected with a lease in it, its answers served by all (false: each agent polls Cloud Map
    /// for its own Envoys).
    #[arg(
        long = "cloudmap-shared-pollers",
        env = "TRELLIS_CLOUDMAP_SHARED_POLLERS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub shared_pollers: bool,
}

impl Default for CloudMapArgs {
    /// The command line's defaults, for agents built in code (benches, tests).
    fn default() -> Self {
        CloudMapArgs {
            endpoint: None,
            poll_ms: 5000,
            churn_poll_ms: 1000,
            churn_window_ms: 60000,
            refresh_ms: 30000,
            jitter_percent: 10,
            backoff_max_ms: 60000,
            linger_ms: 60000,
            health_status: "HEALTHY".into(),
            shared_pollers: true,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_map_defaults_in_code_match_the_command_line() {
        let cli = Cli::try_parse_from(["trellis-agent", "serve"]).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("serve")
        };
        let d = CloudMapArgs::default();
        assert_eq!(
            (
                serve.cloudmap.poll_ms,
                serve.cloudmap.refresh_ms,
                serve.cloudmap.jitter_percent
            ),
            (d.poll_ms, d.refresh_ms, d.jitter_percent)
        );
        assert_eq!(
            (serve.cloudmap.backoff_max_ms, serve.cloudmap.linger_ms),
            (d.backoff_max_ms, d.linger_ms)
        );
        assert_eq!(
            (serve.cloudmap.churn_poll_ms, serve.cloudmap.churn_window_ms),
            (d.churn_poll_ms, d.churn_window_ms)
        );
        assert_eq!(serve.cloudmap.health_status, d.health_status);
        let a = ApiSecurityArgs::default();
        assert_eq!(
            (serve.api.api_session_seconds, serve.api.api_reload_ms),
            (a.api_session_seconds, a.api_reload_ms)
        );
    }

    #[test]
    fn an_unknown_health_filter_is_refused_by_name() {
        let err = Cli::try_parse_from([
            "trellis-agent",
            "serve",
            "--cloudmap-health-status",
            "UNHEALTHY",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--cloudmap-health-status"), "{err}");
    }
}
