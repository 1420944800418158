//! Settings from the App Mesh variables (`APPMESH_*`) and the equivalent ECS `proxyConfiguration`
//! flags, validated in full before anything is touched. The environment is read through [`EnvSource`]
//! so tests pass a map instead of mutating the process environment.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::cidr::Cidr;
use crate::error::{Error, Result};
use crate::iptables::BackendChoice;

/// The default port of the proxy's ingress listener (App Mesh's Envoy).
pub const DEFAULT_INGRESS_PORT: u16 = 15000;
/// The default port of the proxy's egress listener (App Mesh's Envoy).
pub const DEFAULT_EGRESS_PORT: u16 = 15001;
/// Destination ports that are never redirected, even when none are listed: SSH, as App Mesh on ECS
/// ("Even if you list no ports, port 22 is ignored").
pub const ALWAYS_IGNORED_PORTS: [u16; 1] = [22];
/// How many ports of a list ECS's App Mesh redirect (its CNI plugin, one multiport rule per list)
/// applied; it dropped the rest. Trellis applies every port and warns where that differs.
pub const ECS_PORT_LIMIT: usize = 15;
/// Addresses that are never redirected: the EC2 instance metadata service and the ECS task metadata /
/// credentials endpoint. The proxy cannot serve them and the task needs them to start.
pub const ALWAYS_IGNORED_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
];

/// Command line. Every setting flag is named after the ECS `proxyConfiguration` property and wins over
/// the matching `APPMESH_*` variable.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "trellis-proxy-route-manager", version, about)]
pub struct Cli {
    /// Network namespace to change (e.g. /var/run/netns/NAME) instead of the current one.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Remove the chains and jumps this program installs; succeeds when none are there.
    #[arg(long, conflicts_with_all = ["dry_run", "status"])]
    pub cleanup: bool,

    /// Print the iptables-restore input(s) for a fresh install and change nothing.
    #[arg(long, conflicts_with = "status")]
    pub dry_run: bool,

    /// Report whether the configured rules are in place (exit 0) or not (exit 3).
    #[arg(long)]
    pub status: bool,

    /// Which iptables programs to run: auto picks nft or legacy by which already has rules in the
    /// namespace; path runs iptables-restore etc. from PATH; nft and legacy name the variant.
    #[arg(long, value_enum, value_name = "BACKEND", default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,

    /// Install only when "1" [env: APPMESH_START_ENABLED]
    #[arg(long, value_name = "VALUE")]
    pub start_enabled: Option<String>,

    /// Uid whose traffic is not redirected: the proxy's [env: APPMESH_IGNORE_UID]
    #[arg(long, value_name = "UID")]
    pub ignored_uid: Option<String>,

    /// Gid whose traffic is not redirected [env: APPMESH_IGNORE_GID]
    #[arg(long, value_name = "GID")]
    pub ignored_gid: Option<String>,

    /// Comma-separated ports the application listens on; inbound TCP to them goes to the proxy [env: APPMESH_APP_PORTS]
    #[arg(long, value_name = "PORTS")]
    pub app_ports: Option<String>,

    /// Proxy port for inbound traffic [env: APPMESH_ENVOY_INGRESS_PORT] [default: 15000]
    #[arg(long, value_name = "PORT")]
    pub proxy_ingress_port: Option<String>,

    /// Proxy port for outbound traffic [env: APPMESH_ENVOY_EGRESS_PORT] [default: 15001]
    #[arg(long, value_name = "PORT")]
    pub proxy_egress_port: Option<String>,

    /// Comma-separated IPs/CIDRs reached directly; 169.254.169.254 and 169.254.170.2 always are [env: APPMESH_EGRESS_IGNORED_IP]
    #[arg(long, value_name = "IPS")]
    pub egress_ignored_ips: Option<String>,

    /// Comma-separated destination ports reached directly [env: APPMESH_EGRESS_IGNORED_PORTS]
    #[arg(long, value_name = "PORTS")]
    pub egress_ignored_ports: Option<String>,

    /// Also install the rules for IPv6 (ip6tables) [env: APPMESH_ENABLE_IPV6]
    #[arg(long)]
    pub enable_ipv6: bool,
}

/// Where `APPMESH_*` variables come from: the process environment in `main`, a map in tests.
pub trait EnvSource {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: std::hash::BuildHasher> EnvSource for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl<S: std::hash::BuildHasher> EnvSource for HashMap<&str, &str, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

/// One setting: its App Mesh variable and its flag (without the leading dashes).
#[derive(Debug, Clone, Copy)]
struct Setting {
    var: &'static str,
    flag: &'static str,
}

const START_ENABLED: Setting = Setting {
    var: "APPMESH_START_ENABLED",
    flag: "start-enabled",
};
const IGNORE_UID: Setting = Setting {
    var: "APPMESH_IGNORE_UID",
    flag: "ignored-uid",
};
const IGNORE_GID: Setting = Setting {
    var: "APPMESH_IGNORE_GID",
    flag: "ignored-gid",
};
const APP_PORTS: Setting = Setting {
    var: "APPMESH_APP_PORTS",
    flag: "app-ports",
};
const INGRESS_PORT: Setting = Setting {
    var: "APPMESH_ENVOY_INGRESS_PORT",
    flag: "proxy-ingress-port",
};
const EGRESS_PORT: Setting = Setting {
    var: "APPMESH_ENVOY_EGRESS_PORT",
    flag: "proxy-egress-port",
};
const IGNORED_IPS: Setting = Setting {
    var: "APPMESH_EGRESS_IGNORED_IP",
    flag: "egress-ignored-ips",
};
const IGNORED_PORTS: Setting = Setting {
    var: "APPMESH_EGRESS_IGNORED_PORTS",
    flag: "egress-ignored-ports",
};
const ENABLE_IPV6: Setting = Setting {
    var: "APPMESH_ENABLE_IPV6",
    flag: "enable-ipv6",
};

/// The validated settings the rules are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Traffic from this uid is never redirected (the proxy's own).
    pub ignore_uid: Option<u32>,
    /// Traffic from this gid is never redirected.
    pub ignore_gid: Option<u32>,
    /// Inbound TCP to these ports is redirected to `ingress_port`; none means no ingress rules.
    pub app_ports: Vec<u16>,
    /// The proxy's inbound listener.
    pub ingress_port: u16,
    /// The proxy's outbound listener.
    pub egress_port: u16,
    /// Destinations reached directly, IPv4 and (when enabled) IPv6, always including the metadata IPs.
    pub egress_ignored_ips: Vec<Cidr>,
    /// Destination ports reached directly, always including [`ALWAYS_IGNORED_PORTS`].
    pub egress_ignored_ports: Vec<u16>,
    /// Whether the IPv6 rule set is installed too.
    pub enable_ipv6: bool,
}

/// Something in the settings that was accepted but changed; logged so nobody is surprised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// An IPv6 address was given while IPv6 is off, so it was left out.
    Ipv6Skipped { value: String },
    /// A CIDR had host bits set; the network address is used (as iptables would).
    HostBitsCleared { value: String, network: Cidr },
    /// `APPMESH_START_ENABLED` is neither empty, "0" nor "1": nothing is installed, as with AWS's
    /// route manager, but a typo should not pass for a decision.
    StartSwitchUnrecognised { value: String },
    /// More than 15 ports in a list: ECS kept the first 15 and dropped the rest, Trellis applies all,
    /// so traffic to `beyond` takes the other path than it did on ECS.
    BeyondEcsLimit {
        var: &'static str,
        flag: &'static str,
        count: usize,
        beyond: Vec<u16>,
        effect: &'static str,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Ipv6Skipped { value } => write!(
                f,
                "{} (--{}): skipping IPv6 entry {value:?} because IPv6 is off; set {}=1 to install IPv6 rules",
                IGNORED_IPS.var, IGNORED_IPS.flag, ENABLE_IPV6.var
            ),
            Warning::HostBitsCleared { value, network } => write!(
                f,
                "{} (--{}): {value:?} has host bits set; using network {network}",
                IGNORED_IPS.var, IGNORED_IPS.flag
            ),
            Warning::StartSwitchUnrecognised { value } => write!(
                f,
                "{} (--{}) is {value:?}, which is neither \"1\" (install) nor \"0\" or empty (do not): nothing is installed; set it to 1 to install the redirect",
                START_ENABLED.var, START_ENABLED.flag
            ),
            Warning::BeyondEcsLimit {
                var,
                flag,
                count,
                beyond,
                effect,
            } => {
                let beyond: Vec<String> = beyond.iter().map(u16::to_string).collect();
                write!(
                    f,
                    "{var} (--{flag}) lists {count} ports: ECS's App Mesh redirect applied only the first {ECS_PORT_LIMIT} and dropped the rest, Trellis applies them all, so {effect} for ports {}",
                    beyond.join(",")
                )
            }
        }
    }
}

/// The result of reading the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// `APPMESH_START_ENABLED` is not "1": do nothing. Holds the value seen, if any, and a warning
    /// when that value is not one of the recognised ones.
    Disabled {
        value: Option<String>,
        warnings: Vec<Warning>,
    },
    /// Install these rules; the warnings should be logged.
    Enabled {
        config: Config,
        warnings: Vec<Warning>,
    },
}

/// The value of a setting: the flag if given, else the variable; blank counts as unset.
fn lookup(flag: Option<&str>, setting: Setting, env: &dyn EnvSource) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| env.var(setting.var))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether installing is switched on (`APPMESH_START_ENABLED=1` or `--start-enabled 1`).
pub fn start_enabled(cli: &Cli, env: &dyn EnvSource) -> (bool, Option<String>) {
    let value = lookup(cli.start_enabled.as_deref(), START_ENABLED, env);
    (value.as_deref() == Some("1"), value)
}

/// Reads and validates everything; nothing outside this process is touched. Settings are validated
/// even when installing is switched off: an invalid one is an error either way, so a broken task
/// definition does not pass unnoticed until the day the switch is turned on.
pub fn load(cli: &Cli, env: &dyn EnvSource) -> Result<Loaded> {
    let (enabled, value) = start_enabled(cli, env);
    if !enabled {
        match Config::from_sources(cli, env) {
            // Nothing to exempt is only a problem for rules that are installed.
            Ok(_) | Err(Error::NoIgnoredOwner) => {}
            Err(error) => return Err(error),
        }
        let warnings = value
            .iter()
            .filter(|v| v.as_str() != "0")
            .map(|v| Warning::StartSwitchUnrecognised { value: v.clone() })
            .collect();
        return Ok(Loaded::Disabled { value, warnings });
    }
    let (config, warnings) = Config::from_sources(cli, env)?;
    Ok(Loaded::Enabled { config, warnings })
}

impl Config {
    /// Builds the configuration from flags and variables, ignoring `APPMESH_START_ENABLED`.
    pub fn from_sources(cli: &Cli, env: &dyn EnvSource) -> Result<(Config, Vec<Warning>)> {
        let get = |flag: &Option<String>, setting| lookup(flag.as_deref(), setting, env);

        let ignore_uid = get(&cli.ignored_uid, IGNORE_UID)
            .map(|v| parse_id(&v, IGNORE_UID))
            .transpose()?;
        let ignore_gid = get(&cli.ignored_gid, IGNORE_GID)
            .map(|v| parse_id(&v, IGNORE_GID))
            .transpose()?;
        let app_ports = match get(&cli.app_ports, APP_PORTS) {
            Some(v) => parse_port_list(&v, APP_PORTS)?,
            None => Vec::new(),
        };
        let ingress_port = match get(&cli.proxy_ingress_port, INGRESS_PORT) {
            Some(v) => parse_port(&v, INGRESS_PORT)?,
            None => DEFAULT_INGRESS_PORT,
        };
        let egress_port = match get(&cli.proxy_egress_port, EGRESS_PORT) {
            Some(v) => parse_port(&v, EGRESS_PORT)?,
            None => DEFAULT_EGRESS_PORT,
        };
        if ingress_port == egress_port {
            return Err(Error::SameProxyPort { port: ingress_port });
        }
        let mut egress_ignored_ports = match get(&cli.egress_ignored_ports, IGNORED_PORTS) {
            Some(v) => parse_port_list(&v, IGNORED_PORTS)?,
            None => Vec::new(),
        };
        let mut warnings = Vec::new();
        for (setting, ports, effect) in [
            (
                APP_PORTS,
                &app_ports,
                "inbound traffic goes through the proxy where ECS sent it straight to the app",
            ),
            (
                IGNORED_PORTS,
                &egress_ignored_ports,
                "outbound traffic bypasses the proxy where ECS sent it through the proxy",
            ),
        ] {
            if ports.len() > ECS_PORT_LIMIT {
                warnings.push(Warning::BeyondEcsLimit {
                    var: setting.var,
                    flag: setting.flag,
                    count: ports.len(),
                    beyond: ports[ECS_PORT_LIMIT..].to_vec(),
                    effect,
                });
            }
        }
        for port in ALWAYS_IGNORED_PORTS {
            if !egress_ignored_ports.contains(&port) {
                egress_ignored_ports.push(port);
            }
        }

        let enable_ipv6 = if cli.enable_ipv6 {
            true
        } else {
            match env
                .var(ENABLE_IPV6.var)
                .map(|v| v.trim().to_ascii_lowercase())
            {
                None => false,
                Some(v) => match v.as_str() {
                    "1" | "true" => true,
                    "" | "0" | "false" => false,
                    _ => {
                        return Err(Error::InvalidBool {
                            var: ENABLE_IPV6.var,
                            flag: ENABLE_IPV6.flag,
                            value: v,
                        });
                    }
                },
            }
        };

        let mut egress_ignored_ips = Vec::new();
        for item in get(&cli.egress_ignored_ips, IGNORED_IPS)
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (cidr, had_host_bits) = Cidr::parse(item).ok_or_else(|| Error::InvalidCidr {
                var: IGNORED_IPS.var,
                flag: IGNORED_IPS.flag,
                value: item.to_owned(),
            })?;
            if cidr.is_ipv6() && !enable_ipv6 {
                warnings.push(Warning::Ipv6Skipped {
                    value: item.to_owned(),
                });
                continue;
            }
            if had_host_bits {
                warnings.push(Warning::HostBitsCleared {
                    value: item.to_owned(),
                    network: cidr,
                });
            }
            if !egress_ignored_ips.contains(&cidr) {
                egress_ignored_ips.push(cidr);
            }
        }
        for ip in ALWAYS_IGNORED_IPS {
            let cidr = Cidr::host(IpAddr::V4(ip));
            if !egress_ignored_ips.contains(&cidr) {
                egress_ignored_ips.push(cidr);
            }
        }

        // Checked last, so that an invalid value elsewhere is reported even when this is the case.
        if ignore_uid.is_none() && ignore_gid.is_none() {
            return Err(Error::NoIgnoredOwner);
        }
        let config = Config {
            ignore_uid,
            ignore_gid,
            app_ports,
            ingress_port,
            egress_port,
            egress_ignored_ips,
            egress_ignored_ports,
            enable_ipv6,
        };
        Ok((config, warnings))
    }
}

fn parse_id(value: &str, setting: Setting) -> Result<u32> {
    value.parse::<u32>().map_err(|_| Error::InvalidId {
        var: setting.var,
        flag: setting.flag,
        value: value.to_owned(),
    })
}

fn parse_port(value: &str, setting: Setting) -> Result<u16> {
    match value.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Error::InvalidPort {
            var: setting.var,
            flag: setting.flag,
            value: value.to_owned(),
        }),
    }
}

/// A comma-separated port list; blanks are skipped and repeats dropped, order kept.
fn parse_port_list(value: &str, setting: Setting) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let port = parse_port(item, setting)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests;
