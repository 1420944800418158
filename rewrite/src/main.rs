//! The `trellis-rewrite` command: flags to [`Options`], a file or stdin in, pretty JSON out. All the
//! logic lives in the library so it can be tested without IO.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use trellis_rewrite::{Options, Redirect, Target};

/// Turn an ECS task definition into a Trellis-meshed one.
///
/// Reads a RegisterTaskDefinition request or DescribeTaskDefinition output (JSON) and prints a
/// RegisterTaskDefinition request with the Envoy sidecar, the traffic redirect and the start-up ordering
/// added. Every other field is kept as it was. Running it again on its own output changes nothing.
#[derive(Debug, Parser)]
#[command(version, group(ArgGroup::new("target").required(true).args(["virtual_node", "virtual_gateway"])))]
struct Cli {
    /// Task definition JSON file; `-` or nothing reads stdin.
    #[arg(default_value = "-")]
    file: PathBuf,

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

    /// Envoy image.
    #[arg(long, value_name = "IMAGE", default_value = trellis_rewrite::DEFAULT_ENVOY_IMAGE)]
    envoy_image: String,

    /// Route manager image.
    #[arg(long, value_name = "IMAGE", default_value = trellis_rewrite::DEFAULT_ROUTE_MANAGER_IMAGE)]
    route_manager_image: String,

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
        conflicts_with = "virtual_gateway"
    )]
    app_ports: Option<Vec<u16>>,

    /// UID whose traffic bypasses the redirect; Envoy runs as it [default: existing setting, else 1337].
    #[arg(long, value_name = "UID", conflicts_with = "virtual_gateway")]
    ignored_uid: Option<u32>,

    /// GID whose traffic bypasses the redirect [default: existing setting, else none].
    #[arg(long, value_name = "GID", conflicts_with = "virtual_gateway")]
    ignored_gid: Option<u32>,

    /// Destinations that bypass Envoy, added to 169.254.170.2, 169.254.169.254 and existing ones.
    #[arg(
        long,
        value_name = "IP|CIDR,...",
        value_delimiter = ',',
        conflicts_with = "virtual_gateway"
    )]
    egress_ignored_ips: Vec<String>,

    /// Destination ports that bypass Envoy, added to existing ones.
    #[arg(
        long,
        value_name = "PORT,...",
        value_delimiter = ',',
        conflicts_with = "virtual_gateway"
    )]
    egress_ignored_ports: Vec<u16>,

    /// Redirect IPv6 traffic too.
    #[arg(long, conflicts_with = "virtual_gateway")]
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
    fn options(self) -> Options {
        let target = match (self.virtual_node, self.virtual_gateway) {
            (_, Some(gw)) => Target::VirtualGateway(gw),
            (Some(node), None) => Target::VirtualNode(node),
            // clap's required group guarantees one of them.
            (None, None) => Target::VirtualNode(String::new()),
        };
        let mut opts = Options::new(self.mesh, target);
        opts.redirect = if self.proxy_configuration {
            Redirect::ProxyConfiguration
        } else {
            Redirect::RouteManager
        };
        opts.envoy_image = self.envoy_image;
        opts.route_manager_image = self.route_manager_image;
        opts.socket_host_path = self.socket_host_path;
        opts.xds_endpoint = self.xds_endpoint;
        opts.app_ports = self.app_ports;
        opts.ignored_uid = self.ignored_uid;
        opts.ignored_gid = self.ignored_gid;
        opts.egress_ignored_ips = self.egress_ignored_ips;
        opts.egress_ignored_ports = self.egress_ignored_ports;
        opts.enable_ipv6 = self.enable_ipv6;
        opts.envoy_log_level = self.envoy_log_level;
        opts.envoy_cpu = self.envoy_cpu;
        opts.envoy_memory = self.envoy_memory;
        opts.envoy_env = self.envoy_env;
        opts
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let text = if cli.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&cli.file)
            .with_context(|| format!("reading {}", cli.file.display()))?
    };
    let input = trellis_rewrite::parse(&text)?;
    let output = trellis_rewrite::rewrite(input, &cli.options())?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &output)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
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
