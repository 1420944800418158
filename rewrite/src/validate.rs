//! Checks that catch, before registration, what real ECS (or a working mesh) would reject: the rules on
//! network mode, launch type, names, ports, memory/CPU and `dependsOn`. Each returns the first problem as
//! an [`Error`] naming the field, so the operator fixes one thing at a time with a precise pointer.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde_json::Value;

use crate::json::{self, Object};
use crate::options::{
    ENVOY_ADMIN_PORT, ENVOY_CONTAINER, ENVOY_EGRESS_PORT, ENVOY_INGRESS_PORT, Options,
    PROXY_CONFIGURATION_MAX_PORTS, Redirect, Target,
};
use crate::settings::{PC_APP_PORTS, PC_EGRESS_IGNORED_PORTS, Settings};
use crate::{Error, Warning};

const LOG_LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warn", "warning", "error", "critical", "off",
];
/// Envoy variables with a dedicated flag (or owned by the tool); `--envoy-env` may not set them.
const OWNED_ENVOY_VARS: [&str; 5] = [
    "APPMESH_RESOURCE_ARN",
    "APPMESH_RESOURCE_NAME",
    "APPMESH_VIRTUAL_NODE_NAME",
    "APPMESH_XDS_ENDPOINT",
    "ENVOY_LOG_LEVEL",
];
/// What an Envoy without its own memory setting must at least have left over in the task, MiB.
const ENVOY_MIN_MEMORY: u64 = 64;
/// ECS's smallest container memory, MiB.
const MIN_CONTAINER_MEMORY: u32 = 6;

/// Why IPv6 and ECS's native redirect do not mix.
const IPV6_WITH_PROXY_CONFIGURATION: &str = "ECS's APPMESH proxyConfiguration never redirects IPv6 (the ECS agent does not turn IPv6 on in its App Mesh CNI plugin), so IPv6 traffic would bypass Envoy; drop --proxy-configuration to use the route manager, which redirects IPv6 too";

/// Rejects options that would produce a broken task.
pub(crate) fn options(opts: &Options) -> Result<(), Error> {
    resource_name("mesh", &opts.mesh)?;
    match &opts.target {
        Target::VirtualNode(n) => resource_name("virtual-node", n)?,
        Target::VirtualGateway(n) => resource_name("virtual-gateway", n)?,
    }
    if let Some(image) = opts.envoy_image.as_deref()
        && image.trim().is_empty()
    {
        return Err(Error::option("envoy-image", image, "an image is required"));
    }
    if let Some(image) = opts.route_manager_image.as_deref()
        && image.trim().is_empty()
    {
        return Err(Error::option(
            "route-manager-image",
            image,
            "an image is required",
        ));
    }
    if opts.enable_ipv6 && opts.redirect() == Some(Redirect::ProxyConfiguration) {
        return Err(Error::option(
            "enable-ipv6",
            "",
            IPV6_WITH_PROXY_CONFIGURATION,
        ));
    }
    if !opts.socket_host_path.starts_with('/') {
        return Err(Error::option(
            "socket-host-path",
            &opts.socket_host_path,
            "must be an absolute path",
        ));
    }
    if let Some(p) = &opts.sds_socket_path
        && opts.sds_socket_dir().is_none_or(|d| !d.starts_with('/'))
    {
        return Err(Error::option(
            "sds-socket-path",
            p,
            "must be an absolute path to a socket inside a directory (e.g. /run/spire/sockets/agent.sock)",
        ));
    }
    if let Some(e) = &opts.xds_endpoint {
        xds_endpoint(e)?;
    }
    for p in opts.app_ports.iter().flatten() {
        if let Some(owner) = reserved_owner(u32::from(*p), ENVOY_ADMIN_PORT, opts.is_gateway()) {
            return Err(Error::option(
                "app-ports",
                p,
                format!("port {p} is reserved for {owner}"),
            ));
        }
        if *p == 0 {
            return Err(Error::option("app-ports", p, "ports run from 1 to 65535"));
        }
    }
    for p in &opts.egress_ignored_ports {
        if *p == 0 {
            return Err(Error::option(
                "egress-ignored-ports",
                p,
                "ports run from 1 to 65535",
            ));
        }
    }
    for ip in &opts.egress_ignored_ips {
        ip_or_cidr(ip)?;
    }
    if let Some(level) = &opts.envoy_log_level
        && !LOG_LEVELS.contains(&level.as_str())
    {
        return Err(Error::option(
            "envoy-log-level",
            level,
            format!("must be one of {}", LOG_LEVELS.join(", ")),
        ));
    }
    if let Some(m) = opts.envoy_memory
        && m < MIN_CONTAINER_MEMORY
    {
        return Err(Error::option(
            "envoy-memory",
            m,
            format!("ECS needs at least {MIN_CONTAINER_MEMORY} MiB"),
        ));
    }
    let mut seen = HashSet::new();
    for (name, _) in &opts.envoy_env {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Error::option(
                "envoy-env",
                name,
                "expected NAME=VALUE with NAME made of letters, digits and _",
            ));
        }
        if OWNED_ENVOY_VARS.contains(&name.as_str()) {
            return Err(Error::option(
                "envoy-env",
                name,
                "this variable is set by the tool; use its own flag",
            ));
        }
        if !seen.insert(name) {
            return Err(Error::option("envoy-env", name, "given twice"));
        }
    }
    Ok(())
}

fn resource_name(flag: &'static str, name: &str) -> Result<(), Error> {
    // App Mesh resource names: 1 to 255 characters; a `/` would break the `mesh/M/virtualNode/N` node id.
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(Error::option(
            flag,
            name,
            "App Mesh names are 1 to 255 characters without '/' or spaces",
        ));
    }
    Ok(())
}

fn xds_endpoint(e: &str) -> Result<(), Error> {
    if let Some(path) = e.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(());
        }
    } else if let Some((host, port)) = e.rsplit_once(':')
        && !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Ok(());
    }
    Err(Error::option(
        "xds-endpoint",
        e,
        "expected unix:///absolute/path or HOST:PORT",
    ))
}

fn ip_or_cidr(s: &str) -> Result<(), Error> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ok = match addr.parse::<IpAddr>() {
        Ok(ip) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max))
        }
        Err(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::option(
            "egress-ignored-ips",
            s,
            "expected an IP address or CIDR block",
        ))
    }
}

/// Which Envoy port `port` collides with, if any.
pub(crate) fn reserved_owner(port: u32, admin: u16, gateway: bool) -> Option<&'static str> {
    if port == u32::from(admin) {
        Some("Envoy's admin interface")
    } else if !gateway && port == u32::from(ENVOY_INGRESS_PORT) {
        Some("Envoy's ingress listener")
    } else if !gateway && port == u32::from(ENVOY_EGRESS_PORT) {
        Some("Envoy's egress listener")
    } else {
        None
    }
}

/// App Mesh had no Windows Envoy, and ECS rejects `user`, `ulimits`, `linuxParameters` and
/// `proxyConfiguration` for Windows containers: a Windows task cannot be meshed.
pub(crate) fn operating_system(td: &Object) -> Result<(), Error> {
    let Some(platform) = td.get("runtimePlatform").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let platform = json::object(platform, "runtimePlatform")?;
    match json::str_field(platform, "operatingSystemFamily", "runtimePlatform")? {
        Some(family) if family.to_ascii_uppercase().starts_with("WINDOWS") => Err(Error::invalid(
            "runtimePlatform.operatingSystemFamily",
            format!("{family:?}"),
            "Windows tasks cannot be meshed: App Mesh had no Windows Envoy, and ECS does not support user, ulimits, linuxParameters or proxyConfiguration on Windows containers, which the Envoy sidecar and the redirect need",
        )),
        _ => Ok(()),
    }
}

/// What ECS's native redirect cannot carry: more than 15 ports in a list (its CNI plugin silently
/// drops the rest) and IPv6 (never redirected).
pub(crate) fn proxy_configuration_settings(settings: &Settings) -> Result<(), Error> {
    for (property, ports, note) in [
        (PC_APP_PORTS, &settings.app_ports, ""),
        (
            PC_EGRESS_IGNORED_PORTS,
            &settings.ignored_ports,
            ", port 22 included",
        ),
    ] {
        if ports.len() > PROXY_CONFIGURATION_MAX_PORTS {
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>();
            return Err(Error::invalid(
                format!("proxyConfiguration.properties.{property}"),
                format!("{:?}", list.join(",")),
                format!(
                    "ECS's APPMESH proxyConfiguration applies at most {PROXY_CONFIGURATION_MAX_PORTS} ports here and silently drops the rest ({} given{note}); drop --proxy-configuration to use the route manager, which applies them all",
                    ports.len()
                ),
            ));
        }
    }
    if let Some((path, value)) = &settings.ipv6_from_task {
        return Err(Error::invalid(
            path,
            format!("{value:?}"),
            format!(
                "APPMESH_ENABLE_IPV6 cannot be carried into proxyConfiguration: {IPV6_WITH_PROXY_CONFIGURATION}, or remove the variable to redirect IPv4 only"
            ),
        ));
    }
    Ok(())
}

/// A container running as the UID (or GID) the redirect ignores sends all its traffic around Envoy:
/// the mesh's routing, TLS, policies and metrics do not apply to it. App Mesh's examples run agents
/// such as the X-Ray daemon that way on purpose, so this is a warning, not a refusal.
pub(crate) fn ignored_user(
    c: &Object,
    path: &str,
    settings: &Settings,
) -> Result<Option<Warning>, Error> {
    let Some(user) = json::str_field(c, "user", path)? else {
        return Ok(None);
    };
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let clash = if uid.trim().parse::<u32>().ok() == Some(settings.uid) {
        Some(format!("UID {}", settings.uid))
    } else {
        gid.and_then(|g| g.trim().parse::<u32>().ok())
            .filter(|g| Some(*g) == settings.gid)
            .map(|g| format!("GID {g}"))
    };
    Ok(clash.map(|who| Warning {
        path: format!("{path}.user"),
        message: format!(
            "{user:?} runs as {who}, the identity the redirect ignores (Envoy's own), so all of this container's outbound traffic bypasses Envoy: no mesh routing, TLS, policies or metrics. Right for an agent that must reach its endpoint directly (the X-Ray daemon); for an application, run it as another user"
        ),
    }))
}

/// Transparent redirect needs one network namespace per task.
pub(crate) fn network_mode(td: &Object, opts: &Options) -> Result<(), Error> {
    let mode = json::str_field(td, "networkMode", "")?;
    if opts.is_gateway() {
        // A gateway only needs Envoy reachable; any mode with a network works.
        return match mode {
            Some("none") => Err(Error::invalid(
                "networkMode",
                "\"none\"",
                "a virtual gateway needs a network",
            )),
            _ => Ok(()),
        };
    }
    match mode {
        Some("awsvpc") => Ok(()),
        // Explicit egress needs only that the app can reach Envoy: its own netns, the host's, or a
        // bridge link.
        Some("bridge" | "host") | None if opts.redirect == Redirect::Explicit => Ok(()),
        Some(other) => Err(Error::NetworkMode {
            found: format!("{other:?}"),
        }),
        None => Err(Error::NetworkMode {
            found: "missing (ECS defaults to \"bridge\")".into(),
        }),
    }
}

/// Fargate has no host volumes (the agent socket) and no `NET_ADMIN` (the route manager).
pub(crate) fn launch_type(td: &Object, opts: &Options) -> Result<(), Error> {
    for (i, c) in json::array_field(td, "requiresCompatibilities", "")?
        .iter()
        .enumerate()
    {
        if c.as_str() != Some("FARGATE") {
            continue;
        }
        let path = format!("requiresCompatibilities[{i}]");
        if opts.sds_socket_path.is_some() {
            return Err(Error::invalid(
                path,
                "\"FARGATE\"",
                "Fargate has no host volumes for the SDS socket; drop --sds-socket-path",
            ));
        }
        if opts.xds_endpoint.is_none() {
            return Err(Error::invalid(
                path,
                "\"FARGATE\"",
                "Fargate has no host volumes for the agent socket; pass --xds-endpoint HOST:PORT",
            ));
        }
        if opts.redirect() == Some(Redirect::RouteManager) {
            return Err(Error::invalid(
                path,
                "\"FARGATE\"",
                "Fargate does not grant NET_ADMIN to the route manager; pass --proxy-configuration",
            ));
        }
    }
    Ok(())
}

/// Fargate has no host volumes, so Envoy must reach the agent over TCP there (`--keep-envoy-image`,
/// where the redirect is not the tool's).
pub(crate) fn fargate_socket(td: &Object, opts: &Options) -> Result<(), Error> {
    for (i, c) in json::array_field(td, "requiresCompatibilities", "")?
        .iter()
        .enumerate()
    {
        if c.as_str() == Some("FARGATE") && opts.xds_endpoint.is_none() {
            return Err(Error::invalid(
                format!("requiresCompatibilities[{i}]"),
                "\"FARGATE\"",
                "Fargate has no host volumes for the agent socket; pass --xds-endpoint HOST:PORT",
            ));
        }
    }
    Ok(())
}

/// The kept Envoy container names the resource `--mesh` and `--virtual-node`/`--virtual-gateway`
/// name, in one of the variables AWS's image reads, so it asks the agent for the right node.
pub(crate) fn identity(c: &Object, path: &str, opts: &Options) -> Result<(), Error> {
    let env = json::name_values(c, "environment", path)?;
    let Some(nv) = IDENTITY_VARS.iter().find_map(|var| {
        env.iter()
            .find(|nv| nv.name == *var && !nv.value.trim().is_empty())
    }) else {
        return Err(Error::Missing {
            path: format!("{path}.environment"),
            why: "the kept Envoy image needs APPMESH_RESOURCE_ARN (or APPMESH_VIRTUAL_NODE_NAME) to know which node it is",
        });
    };
    let expected = opts.resource_arn();
    let matches = trellis_model::ProxyIdentity::parse(nv.value.trim())
        .is_ok_and(|id| id.to_string() == expected);
    if matches {
        Ok(())
    } else {
        Err(Error::invalid(
            &nv.path,
            format!("{:?}", nv.value),
            format!(
                "{} must name {expected} (its ARN or that path), as --mesh and the target flag say",
                nv.name
            ),
        ))
    }
}

/// The variables AWS's Envoy image takes its identity from, in the order it reads them.
const IDENTITY_VARS: [&str; 3] = [
    "APPMESH_RESOURCE_ARN",
    "APPMESH_RESOURCE_NAME",
    "APPMESH_VIRTUAL_NODE_NAME",
];

/// Every container has a unique name. Returns the names in order.
pub(crate) fn names(containers: &[Object]) -> Result<Vec<String>, Error> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let path = format!("containerDefinitions[{i}]");
        let Some(name) = json::str_field(c, "name", &path)? else {
            return Err(Error::Missing {
                path: format!("{path}.name"),
                why: "ECS requires a name for every container",
            });
        };
        if let Some(j) = first.insert(name, i) {
            return Err(Error::DuplicateName {
                path: format!("{path}.name"),
                name: name.to_string(),
                first: format!("containerDefinitions[{j}]"),
            });
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// A user container: it has an image, stays off Envoy's ports and, in awsvpc, maps ports 1:1.
pub(crate) fn app_container(
    c: &Object,
    path: &str,
    awsvpc: bool,
    admin: u16,
    gateway: bool,
) -> Result<(), Error> {
    match json::str_field(c, "image", path)? {
        Some(s) if !s.trim().is_empty() => {}
        _ => {
            return Err(Error::Missing {
                path: format!("{path}.image"),
                why: "ECS requires an image for every container",
            });
        }
    }
    for (j, pm) in json::array_field(c, "portMappings", path)?
        .iter()
        .enumerate()
    {
        let pm_path = format!("{path}.portMappings[{j}]");
        let pm = json::object(pm, &pm_path)?;
        let container_port = port_field(pm, "containerPort", &pm_path)?;
        let host_port = port_field(pm, "hostPort", &pm_path)?;
        if awsvpc {
            for (field, port) in [("containerPort", container_port), ("hostPort", host_port)] {
                if let Some(owner) = port.and_then(|p| reserved_owner(p, admin, gateway)) {
                    return Err(Error::ReservedPort {
                        path: format!("{pm_path}.{field}"),
                        port: port.unwrap_or_default(),
                        owner,
                    });
                }
            }
            if let (Some(cp), Some(hp)) = (container_port, host_port)
                && cp != hp
            {
                return Err(Error::invalid(
                    format!("{pm_path}.hostPort"),
                    hp,
                    format!("in awsvpc mode hostPort must be absent or equal containerPort {cp}"),
                ));
            }
            if let Some(range) = json::str_field(pm, "containerPortRange", &pm_path)? {
                let (lo, hi) = parse_range(range, &format!("{pm_path}.containerPortRange"))?;
                for port in [ENVOY_INGRESS_PORT, ENVOY_EGRESS_PORT, admin] {
                    let port = u32::from(port);
                    if let Some(owner) = (lo..=hi)
                        .contains(&port)
                        .then(|| reserved_owner(port, admin, gateway))
                        .flatten()
                    {
                        return Err(Error::ReservedPort {
                            path: format!("{pm_path}.containerPortRange"),
                            port,
                            owner,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn port_field(pm: &Object, key: &str, path: &str) -> Result<Option<u32>, Error> {
    match json::u64_field(pm, key, path)? {
        None => Ok(None),
        // hostPort 0 means "dynamic" in bridge mode.
        Some(p) if p <= 65535 => Ok(Some(p as u32).filter(|p| *p != 0 || key != "hostPort")),
        Some(p) => Err(Error::invalid(
            format!("{path}.{key}"),
            p,
            "ports run from 1 to 65535",
        )),
    }
}

fn parse_range(range: &str, path: &str) -> Result<(u32, u32), Error> {
    let parsed = range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
        .filter(|(a, b)| a < b);
    parsed
        .map(|(a, b)| (u32::from(a), u32::from(b)))
        .ok_or_else(|| {
            Error::invalid(
                path,
                format!("{range:?}"),
                "expected LOW-HIGH with LOW < HIGH",
            )
        })
}

/// Task-level `memory` in MiB: ECS accepts `"512"` or `"1 GB"`.
pub(crate) fn task_memory(td: &Object) -> Result<Option<u64>, Error> {
    task_amount(
        td,
        "memory",
        &["gb"],
        1024.0,
        "MiB, or GB with the unit, e.g. \"512\" or \"1 GB\"",
    )
}

/// Task-level `cpu` in CPU units: ECS accepts `"256"` or `"1 vCPU"`.
pub(crate) fn task_cpu(td: &Object) -> Result<Option<u64>, Error> {
    task_amount(
        td,
        "cpu",
        &["vcpu"],
        1024.0,
        "CPU units, or vCPU with the unit, e.g. \"256\" or \"1 vCPU\"",
    )
}

fn task_amount(
    td: &Object,
    key: &str,
    units: &[&str],
    scale: f64,
    rule: &str,
) -> Result<Option<u64>, Error> {
    let raw = match td.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return Err(json::wrong(key, "a string", other)),
    };
    if let Ok(n) = raw.parse::<u64>() {
        return Ok(Some(n));
    }
    for unit in units {
        if let Some(num) = raw.strip_suffix(unit)
            && let Ok(x) = num.trim().parse::<f64>()
            && x > 0.0
        {
            return Ok(Some((x * scale).round() as u64));
        }
    }
    Err(Error::invalid(
        key,
        format!("{raw:?}"),
        format!("expected {rule}"),
    ))
}

/// Memory and CPU rules ECS enforces, checked after Envoy's share is added.
pub(crate) fn resources(td: &Object, containers: &[Object]) -> Result<(), Error> {
    let task_mem = task_memory(td)?;
    let task_cpu = task_cpu(td)?;
    let mut reserved = 0u64;
    let mut cpu = 0u64;
    for (i, c) in containers.iter().enumerate() {
        let path = format!("containerDefinitions[{i}]");
        let hard = json::u64_field(c, "memory", &path)?;
        let soft = json::u64_field(c, "memoryReservation", &path)?;
        if let (Some(h), Some(s)) = (hard, soft)
            && s > h
        {
            return Err(Error::invalid(
                format!("{path}.memoryReservation"),
                s,
                format!("must not exceed the container's memory ({h} MiB)"),
            ));
        }
        match (task_mem, hard) {
            (None, None) if soft.is_none() => {
                return Err(Error::Missing {
                    path: format!("{path}.memory"),
                    why: "without a task-level memory ECS needs memory or memoryReservation on every container",
                });
            }
            (Some(t), Some(h)) if h > t => {
                return Err(Error::TooSmall {
                    path: "memory".into(),
                    task: format!("{t} MiB"),
                    needed: format!("{h} MiB for {path}.memory"),
                });
            }
            _ => {}
        }
        reserved += soft.or(hard).unwrap_or(0);
        cpu += json::u64_field(c, "cpu", &path)?.unwrap_or(0);
    }
    if let Some(t) = task_mem {
        // An Envoy without its own limit lives on what the others leave; make sure something is left.
        let envoy_unlimited = containers.iter().any(|c| {
            c.get("name").and_then(Value::as_str) == Some(ENVOY_CONTAINER)
                && c.get("memory").is_none_or(Value::is_null)
                && c.get("memoryReservation").is_none_or(Value::is_null)
        });
        if envoy_unlimited && reserved + ENVOY_MIN_MEMORY > t {
            return Err(Error::TooSmall {
                path: "memory".into(),
                task: format!("{t} MiB"),
                needed: format!(
                    "{reserved} MiB plus at least {ENVOY_MIN_MEMORY} MiB left for Envoy (or set --envoy-memory)"
                ),
            });
        }
        if reserved > t {
            return Err(Error::TooSmall {
                path: "memory".into(),
                task: format!("{t} MiB"),
                needed: format!("{reserved} MiB in total"),
            });
        }
    }
    if let Some(t) = task_cpu
        && cpu > t
    {
        return Err(Error::TooSmall {
            path: "cpu".into(),
            task: format!("{t} CPU units"),
            needed: format!("{cpu} CPU units in total"),
        });
    }
    Ok(())
}

const CONDITIONS: [&str; 4] = ["START", "COMPLETE", "SUCCESS", "HEALTHY"];

/// `dependsOn`: known targets, valid conditions, ECS's rules on essential and health-checked targets,
/// and no cycles (ECS would never start the task).
pub(crate) fn depends_on(containers: &[Object]) -> Result<(), Error> {
    let index: HashMap<&str, usize> = containers
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.get("name").and_then(Value::as_str).map(|n| (n, i)))
        .collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); containers.len()];
    for (i, c) in containers.iter().enumerate() {
        let path = format!("containerDefinitions[{i}]");
        for (j, d) in json::array_field(c, "dependsOn", &path)?.iter().enumerate() {
            let d_path = format!("{path}.dependsOn[{j}]");
            let d = json::object(d, &d_path)?;
            let Some(target) = json::str_field(d, "containerName", &d_path)? else {
                return Err(Error::Missing {
                    path: format!("{d_path}.containerName"),
                    why: "a dependency names the container it waits for",
                });
            };
            let Some(&t) = index.get(target) else {
                return Err(Error::UnknownDependency {
                    path: format!("{d_path}.containerName"),
                    name: target.to_string(),
                });
            };
            let condition = json::str_field(d, "condition", &d_path)?.unwrap_or_default();
            let cond_path = format!("{d_path}.condition");
            if !CONDITIONS.contains(&condition) {
                return Err(Error::invalid(
                    cond_path,
                    format!("{condition:?}"),
                    format!("must be one of {}", CONDITIONS.join(", ")),
                ));
            }
            let essential = containers[t]
                .get("essential")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if essential && (condition == "COMPLETE" || condition == "SUCCESS") {
                return Err(Error::invalid(
                    cond_path,
                    format!("{condition:?}"),
                    format!(
                        "{target:?} is essential; ECS allows COMPLETE and SUCCESS only on non-essential containers"
                    ),
                ));
            }
            if condition == "HEALTHY" && containers[t].get("healthCheck").is_none_or(Value::is_null)
            {
                return Err(Error::invalid(
                    cond_path,
                    "\"HEALTHY\"",
                    format!("{target:?} has no healthCheck, so it never becomes HEALTHY"),
                ));
            }
            if t == i {
                return Err(Error::DependencyCycle {
                    path: format!("{d_path}.containerName"),
                    cycle: format!("{target} -> {target}"),
                });
            }
            edges[i].push(t);
        }
    }
    find_cycle(containers, &edges)
}

fn find_cycle(containers: &[Object], edges: &[Vec<usize>]) -> Result<(), Error> {
    // Iterative DFS with colours: 0 unvisited, 1 on the stack, 2 done.
    let mut colour = vec![0u8; containers.len()];
    let name = |i: usize| {
        containers[i]
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    for start in 0..containers.len() {
        if colour[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        colour[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&to) = edges[node].get(*next) {
                *next += 1;
                match colour[to] {
                    0 => {
                        colour[to] = 1;
                        stack.push((to, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(n, _)| *n == to).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            stack[from..].iter().map(|(n, _)| name(*n)).collect();
                        cycle.push(name(to));
                        return Err(Error::DependencyCycle {
                            path: format!("containerDefinitions[{to}].dependsOn"),
                            cycle: cycle.join(" -> "),
                        });
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}
