//! The `trellis-rewrite` command: flags to [`Options`], a file, stdin or ECS in; pretty JSON, a diff or a
//! newly registered revision out. The transform lives in the library so it can be tested without IO; the
//! ECS calls live in `ecs.rs`.

mod ecs;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use serde_json::Value;
use trellis_rewrite::{Options, Redirect, Target};

/// Turn an ECS task definition into a Trellis-meshed one.
///
/// Reads a RegisterTaskDefinition request or DescribeTaskDefinition output (JSON) and prints a
/// RegisterTaskDefinition request with the Envoy sidecar, the traffic redirect and the start-up ordering
/// added. Every other field is kept as it was. Running it again on its own output changes nothing.
///
/// With --from-ecs it reads the definition from ECS instead, and with --register it registers the result
/// as a new revision.
#[derive(Debug, Clone, Parser)]
#[command(version, group(ArgGroup::new("target").required(true).args(["virtual_node", "virtual_gateway"])))]
struct Cli {
    /// Task definition JSON file; `-` or nothing reads stdin.
    #[arg(default_value = "-", conflicts_with = "from_ecs")]
    file: PathBuf,

    /// Read the task definition from ECS (DescribeTaskDefinition, tags included): a family, family:revision
    /// or ARN. A family alone means its latest ACTIVE revision.
    #[arg(long, value_name = "FAMILY[:REVISION]")]
    from_ecs: Option<String>,

    /// Register the result in ECS as a new revision (tags included) and print its ARN instead of the JSON.
    /// A definition read with --from-ecs that is already meshed is not registered again; its ARN is printed.
    #[arg(long)]
    register: bool,

    /// Print a unified diff of the task definition before and after meshing instead of the JSON.
    #[arg(long)]
    diff: bool,

    /// ECS endpoint URL, e.g. a local emulator [default: AWS_ENDPOINT_URL, else AWS's regional endpoint].
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,

    /// AWS region [default: AWS_REGION, else the shared config profile's].
    #[arg(long)]
    region: Option<String>,

    /// App Mesh mesh name.
    #[arg(long)]
    mesh: String,

    /// Virtual node the task runs (Envoy sidecar plus transparent redirect).
    #[arg(long, value_name = "NAME")]
    virtual_node: Option<String>,

    /// Virtual gateway the task runs (Envoy only: no redirect, no route manager).
    #[arg(long, value_name = "NAME")]
    virtual_gateway: Option<String>,

    /// Use ECS's native proxyConfiguration (type APPMESH) instead of the route manager container.
    #[arg(long, conflicts_with = "virtual_gateway")]
    proxy_configuration: bool,

    /// No redirect: app containers get HTTP_PROXY pointing at Envoy's egress port (by a container
    /// link in bridge mode), and Envoy routes by Host. For bridge and host network modes.
    #[arg(long, conflicts_with_all = ["virtual_gateway", "proxy_configuration"])]
    explicit_backends: bool,

    /// Envoy image [default: the image of a task already meshed for Trellis (a re-run keeps a pinned
    /// image), else trellis-envoy:0.1.0].
    #[arg(long, value_name = "IMAGE")]
    envoy_image: Option<String>,

    /// Route manager image [default: the image of a task already meshed for Trellis, else
    /// trellis-proxy-route-manager:0.1.0].
    #[arg(long, value_name = "IMAGE", conflicts_with = "keep_envoy_image")]
    route_manager_image: Option<String>,

    /// Keep the task's own Envoy container (e.g. AWS's aws-appmesh-envoy image) exactly as it is,
    /// variables and health check included, and only point it at the agent: APPMESH_XDS_ENDPOINT plus
    /// the socket mount. Nothing else in the task changes (the redirect stays what it was).
    #[arg(
        long,
        conflicts_with_all = [
            "envoy_image", "proxy_configuration", "explicit_backends", "app_ports", "ignored_uid",
            "ignored_gid", "egress_ignored_ips", "egress_ignored_ports", "enable_ipv6",
            "envoy_log_level", "envoy_cpu", "envoy_memory", "sds_socket_path", "envoy_env",
        ]
    )]
    keep_envoy_image: bool,

    /// Host directory holding the agent's ADS socket (xds.sock), mounted read-only into Envoy.
    #[arg(long, value_name = "DIR", default_value = trellis_rewrite::DEFAULT_SOCKET_HOST_PATH)]
    socket_host_path: String,

    /// Reach the agent over TCP (HOST:PORT) instead of the host socket; needed on Fargate.
    #[arg(long, value_name = "HOST:PORT")]
    xds_endpoint: Option<String>,

    /// Ports redirected into Envoy's ingress listener [default: the task's existing setting, else the
    /// app containers' containerPorts].
    #[arg(
        long,
        value_name = "PORT,...",
        value_delimiter = ',',
        conflicts_with_all = ["virtual_gateway", "explicit_backends"]
    )]
    app_ports: Option<Vec<u16>>,

    /// UID whose traffic bypasses the redirect; Envoy runs as it [default: existing setting, else 1337].
    #[arg(long, value_name = "UID", conflicts_with = "virtual_gateway")]
    ignored_uid: Option<u32>,

    /// GID whose traffic bypasses the redirect [default: existing setting, else none].
    #[arg(long, value_name = "GID", conflicts_with_all = ["virtual_gateway", "explicit_backends"])]
    ignored_gid: Option<u32>,

    /// Destinations that bypass Envoy, added to 169.254.170.2, 169.254.169.254 and existing ones.
    #[arg(
        long,
        value_name = "IP|CIDR,...",
        value_delimiter = ',',
        conflicts_with_all = ["virtual_gateway", "explicit_backends"]
    )]
    egress_ignored_ips: Vec<String>,

    /// Destination ports that bypass Envoy, added to existing ones.
    #[arg(
        long,
        value_name = "PORT,...",
        value_delimiter = ',',
        conflicts_with_all = ["virtual_gateway", "explicit_backends"]
    )]
    egress_ignored_ports: Vec<u16>,

    /// Redirect IPv6 traffic too.
    #[arg(long, conflicts_with_all = ["virtual_gateway", "explicit_backends"])]
    enable_ipv6: bool,

    /// Envoy log level (trace, debug, info, warning, error, critical, off).
    #[arg(long, value_name = "LEVEL")]
    envoy_log_level: Option<String>,

    /// CPU units reserved for Envoy.
    #[arg(long, value_name = "UNITS")]
    envoy_cpu: Option<u32>,

    /// Hard memory limit of Envoy, MiB.
    #[arg(long, value_name = "MIB")]
    envoy_memory: Option<u32>,

    /// The instance's SDS server socket (e.g. a SPIRE agent's), for SDS certificates: its directory
    /// is mounted read-only into Envoy and APPMESH_SDS_SOCKET_PATH set.
    #[arg(long, value_name = "PATH")]
    sds_socket_path: Option<String>,

    /// Extra Envoy variable, e.g. ENABLE_ENVOY_STATS_TAGS=1 or ENABLE_ENVOY_XRAY_TRACING=1 (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env)]
    envoy_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

impl Cli {
    fn options(&self) -> Options {
        let cli = self.clone();
        let target = match (cli.virtual_node, cli.virtual_gateway) {
            (_, Some(gw)) => Target::VirtualGateway(gw),
            (Some(node), None) => Target::VirtualNode(node),
            // clap's required group guarantees one of them.
            (None, None) => Target::VirtualNode(String::new()),
        };
        let mut opts = Options::new(cli.mesh, target);
        opts.redirect = if cli.proxy_configuration {
            Redirect::ProxyConfiguration
        } else if cli.explicit_backends {
            Redirect::Explicit
        } else {
            Redirect::RouteManager
        };
        opts.envoy_image = cli.envoy_image;
        opts.route_manager_image = cli.route_manager_image;
        opts.keep_envoy = cli.keep_envoy_image;
        opts.socket_host_path = cli.socket_host_path;
        opts.xds_endpoint = cli.xds_endpoint;
        opts.app_ports = cli.app_ports;
        opts.ignored_uid = cli.ignored_uid;
        opts.ignored_gid = cli.ignored_gid;
        opts.egress_ignored_ips = cli.egress_ignored_ips;
        opts.egress_ignored_ports = cli.egress_ignored_ports;
        opts.enable_ipv6 = cli.enable_ipv6;
        opts.envoy_log_level = cli.envoy_log_level;
        opts.envoy_cpu = cli.envoy_cpu;
        opts.envoy_memory = cli.envoy_memory;
        opts.envoy_env = cli.envoy_env;
        opts.sds_socket_path = cli.sds_socket_path;
        opts
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = ecs::Settings {
        endpoint_url: cli.endpoint_url.clone(),
        region: cli.region.clone(),
    };
    // Connect only when ECS is involved: plain file rewrites need no credentials or network.
    let ecs = if cli.from_ecs.is_some() || cli.register {
        Some(ecs::Ecs::connect(&settings)?)
    } else {
        None
    };
    let (input, label) = match (&cli.from_ecs, &ecs) {
        (Some(id), Some(ecs)) => (ecs.describe(id)?, format!("{id} (ECS)")),
        _ => (read_input(&cli.file)?, cli.file.display().to_string()),
    };
    // The ARN of what was read from ECS, for an unchanged --register.
    let source_arn = cli
        .from_ecs
        .as_ref()
        .and(input.pointer("/taskDefinition/taskDefinitionArn"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let before = pretty(&trellis_rewrite::normalize(input.clone())?)?;
    let rewritten = trellis_rewrite::rewrite_with_warnings(input, &cli.options())?;
    for warning in &rewritten.warnings {
        eprintln!("trellis-rewrite: warning: {warning}");
    }
    let output = rewritten.definition;
    let after = pretty(&output)?;

    let mut out = std::io::stdout().lock();
    if cli.diff {
        let diff = trellis_rewrite::diff(&before, &after, &label, "meshed");
        if diff.is_empty() {
            eprintln!("trellis-rewrite: no changes: {label} is already meshed this way");
        }
        out.write_all(diff.as_bytes())?;
    } else if !cli.register {
        out.write_all(after.as_bytes())?;
    }
    if let Some(ecs) = &ecs
        && cli.register
    {
        match source_arn.filter(|_| before == after) {
            Some(arn) => {
                eprintln!(
                    "trellis-rewrite: {arn} is already meshed this way; not registering a new revision"
                );
                writeln!(out, "{arn}")?;
            }
            None => writeln!(out, "{}", ecs.register(&output)?)?,
        }
    }
    out.flush()?;
    Ok(())
}

fn read_input(file: &std::path::Path) -> anyhow::Result<Value> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    Ok(trellis_rewrite::parse(&text)?)
}

/// Pretty JSON with a final newline, as printed and as diffed.
fn pretty(v: &Value) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-rewrite: {e:#}");
            ExitCode::FAILURE
        }
    }
}
