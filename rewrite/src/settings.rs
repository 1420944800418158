//! The redirect settings (ignored UID/GID, application ports, egress exceptions) live in one of two
//! places: the route manager's environment or ECS's `proxyConfiguration`. This module reads whichever a
//! task already has, lays the operator's flags on top, and renders the result in either form, so re-running
//! the tool, switching modes or migrating an App Mesh definition never loses a setting.

use crate::Error;
use crate::json::NameValue;
use crate::options::{
    ALWAYS_IGNORED_IPS, ALWAYS_IGNORED_PORTS, DEFAULT_IGNORED_UID, ENVOY_EGRESS_PORT,
    ENVOY_INGRESS_PORT, Options,
};

/// Route manager variables (same names as AWS's proxy route manager).
pub(crate) const RM_START_ENABLED: &str = "APPMESH_START_ENABLED";
pub(crate) const RM_IGNORE_UID: &str = "APPMESH_IGNORE_UID";
pub(crate) const RM_IGNORE_GID: &str = "APPMESH_IGNORE_GID";
pub(crate) const RM_APP_PORTS: &str = "APPMESH_APP_PORTS";
pub(crate) const RM_INGRESS_PORT: &str = "APPMESH_ENVOY_INGRESS_PORT";
pub(crate) const RM_EGRESS_PORT: &str = "APPMESH_ENVOY_EGRESS_PORT";
pub(crate) const RM_EGRESS_IGNORED_IP: &str = "APPMESH_EGRESS_IGNORED_IP";
pub(crate) const RM_EGRESS_IGNORED_PORTS: &str = "APPMESH_EGRESS_IGNORED_PORTS";
pub(crate) const RM_ENABLE_IPV6: &str = "APPMESH_ENABLE_IPV6";

/// ECS `proxyConfiguration` (type APPMESH) property names.
pub(crate) const PC_IGNORED_UID: &str = "IgnoredUID";
pub(crate) const PC_IGNORED_GID: &str = "IgnoredGID";
pub(crate) const PC_APP_PORTS: &str = "AppPorts";
pub(crate) const PC_INGRESS_PORT: &str = "ProxyIngressPort";
pub(crate) const PC_EGRESS_PORT: &str = "ProxyEgressPort";
pub(crate) const PC_EGRESS_IGNORED_IPS: &str = "EgressIgnoredIPs";
pub(crate) const PC_EGRESS_IGNORED_PORTS: &str = "EgressIgnoredPorts";

/// Settings found in the task as given; `None`/empty where it has none.
#[derive(Debug, Default)]
pub(crate) struct Existing {
    uid: Option<u32>,
    gid: Option<u32>,
    app_ports: Option<Vec<u16>>,
    ignored_ips: Vec<String>,
    ignored_ports: Vec<u16>,
    /// Where the task turned IPv6 on (the path of its `APPMESH_ENABLE_IPV6` value, and the value).
    ipv6: Option<(String, String)>,
}

/// The effective redirect settings written to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) uid: u32,
    pub(crate) gid: Option<u32>,
    pub(crate) app_ports: Vec<u16>,
    pub(crate) ignored_ips: Vec<String>,
    pub(crate) ignored_ports: Vec<u16>,
    pub(crate) ipv6: bool,
    /// The task's own IPv6 setting (path and value), which ECS's proxyConfiguration cannot carry.
    pub(crate) ipv6_from_task: Option<(String, String)>,
}

// === impl Existing ===

impl Existing {
    /// Reads a route manager container's environment.
    pub(crate) fn read_route_manager(&mut self, env: &[NameValue]) -> Result<(), Error> {
        for nv in env {
            match nv.name.as_str() {
                RM_IGNORE_UID => self.uid = Some(parse_id(nv)?),
                RM_IGNORE_GID => self.gid = Some(parse_id(nv)?),
                RM_APP_PORTS => self.app_ports = Some(parse_ports(nv)?),
                RM_EGRESS_IGNORED_IP => self.ignored_ips.extend(parse_list(&nv.value)),
                RM_EGRESS_IGNORED_PORTS => self.ignored_ports.extend(parse_ports(nv)?),
                RM_ENABLE_IPV6 if matches!(nv.value.trim(), "1" | "true") => {
                    self.ipv6 = Some((nv.path.clone(), nv.value.clone()));
                }
                RM_INGRESS_PORT => expect_port(nv, ENVOY_INGRESS_PORT, "ingress")?,
                RM_EGRESS_PORT => expect_port(nv, ENVOY_EGRESS_PORT, "egress")?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads ECS `proxyConfiguration.properties` (an App Mesh-era definition, or our own output).
    pub(crate) fn read_proxy_configuration(&mut self, props: &[NameValue]) -> Result<(), Error> {
        for nv in props {
            match nv.name.as_str() {
                PC_IGNORED_UID => self.uid = Some(parse_id(nv)?),
                PC_IGNORED_GID => self.gid = Some(parse_id(nv)?),
                PC_APP_PORTS => self.app_ports = Some(parse_ports(nv)?),
                PC_EGRESS_IGNORED_IPS => self.ignored_ips.extend(parse_list(&nv.value)),
                PC_EGRESS_IGNORED_PORTS => self.ignored_ports.extend(parse_ports(nv)?),
                PC_INGRESS_PORT => expect_port(nv, ENVOY_INGRESS_PORT, "ingress")?,
                PC_EGRESS_PORT => expect_port(nv, ENVOY_EGRESS_PORT, "egress")?,
                _ => {}
            }
        }
        Ok(())
    }
}

// === impl Settings ===

impl Settings {
    /// Flags win over what the task had, which wins over what is derived from the app containers.
    /// Lists of exceptions are unions, so nothing the user once excluded is silently redirected again.
    pub(crate) fn resolve(opts: &Options, existing: Existing, derived_ports: Vec<u16>) -> Self {
        let mut ignored_ips: Vec<String> =
            ALWAYS_IGNORED_IPS.iter().map(|s| s.to_string()).collect();
        for ip in existing
            .ignored_ips
            .into_iter()
            .chain(opts.egress_ignored_ips.iter().cloned())
        {
            if !ignored_ips.contains(&ip) {
                ignored_ips.push(ip);
            }
        }
        let mut ignored_ports = Vec::new();
        for p in existing
            .ignored_ports
            .into_iter()
            .chain(opts.egress_ignored_ports.iter().copied())
            .chain(ALWAYS_IGNORED_PORTS)
        {
            if !ignored_ports.contains(&p) {
                ignored_ports.push(p);
            }
        }
        Self {
            uid: opts
                .ignored_uid
                .or(existing.uid)
                .unwrap_or(DEFAULT_IGNORED_UID),
            gid: opts.ignored_gid.or(existing.gid),
            app_ports: opts
                .app_ports
                .clone()
                .or(existing.app_ports)
                .unwrap_or(derived_ports),
            ignored_ips,
            ignored_ports,
            ipv6: opts.enable_ipv6 || existing.ipv6.is_some(),
            ipv6_from_task: existing.ipv6,
        }
    }

    /// The `user` of the Envoy container: the redirect exempts exactly this identity.
    pub(crate) fn envoy_user(&self) -> String {
        match self.gid {
            Some(gid) => format!("{}:{gid}", self.uid),
            None => self.uid.to_string(),
        }
    }

    pub(crate) fn route_manager_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (RM_START_ENABLED, "1".to_string()),
            (RM_IGNORE_UID, self.uid.to_string()),
            (RM_APP_PORTS, join(&self.app_ports)),
            (RM_INGRESS_PORT, ENVOY_INGRESS_PORT.to_string()),
            (RM_EGRESS_PORT, ENVOY_EGRESS_PORT.to_string()),
            (RM_EGRESS_IGNORED_IP, self.ignored_ips.join(",")),
        ];
        if let Some(gid) = self.gid {
            env.push((RM_IGNORE_GID, gid.to_string()));
        }
        if !self.ignored_ports.is_empty() {
            env.push((RM_EGRESS_IGNORED_PORTS, join(&self.ignored_ports)));
        }
        if self.ipv6 {
            env.push((RM_ENABLE_IPV6, "1".to_string()));
        }
        owned(env)
    }

    pub(crate) fn proxy_properties(&self) -> Vec<(String, String)> {
        let mut props = vec![
            (PC_IGNORED_UID, self.uid.to_string()),
            (PC_APP_PORTS, join(&self.app_ports)),
            (PC_INGRESS_PORT, ENVOY_INGRESS_PORT.to_string()),
            (PC_EGRESS_PORT, ENVOY_EGRESS_PORT.to_string()),
            (PC_EGRESS_IGNORED_IPS, self.ignored_ips.join(",")),
        ];
        if let Some(gid) = self.gid {
            props.push((PC_IGNORED_GID, gid.to_string()));
        }
        if !self.ignored_ports.is_empty() {
            props.push((PC_EGRESS_IGNORED_PORTS, join(&self.ignored_ports)));
        }
        owned(props)
    }
}

/// Every variable and property name the tool writes, so stale ones are removed when a setting goes away.
pub(crate) const ROUTE_MANAGER_VARS: [&str; 9] = [
    RM_START_ENABLED,
    RM_IGNORE_UID,
    RM_IGNORE_GID,
    RM_APP_PORTS,
    RM_INGRESS_PORT,
    RM_EGRESS_PORT,
    RM_EGRESS_IGNORED_IP,
    RM_EGRESS_IGNORED_PORTS,
    RM_ENABLE_IPV6,
];
pub(crate) const PROXY_PROPERTIES: [&str; 7] = [
    PC_IGNORED_UID,
    PC_IGNORED_GID,
    PC_APP_PORTS,
    PC_INGRESS_PORT,
    PC_EGRESS_PORT,
    PC_EGRESS_IGNORED_IPS,
    PC_EGRESS_IGNORED_PORTS,
];

fn owned(list: Vec<(&str, String)>) -> Vec<(String, String)> {
    list.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_list(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn parse_id(nv: &NameValue) -> Result<u32, Error> {
    nv.value.trim().parse().map_err(|_| {
        Error::invalid(
            &nv.path,
            format!("{:?}", nv.value),
            format!("{} must be a numeric ID", nv.name),
        )
    })
}

fn parse_ports(nv: &NameValue) -> Result<Vec<u16>, Error> {
    parse_list(&nv.value)
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(Error::invalid(
                &nv.path,
                format!("{:?}", nv.value),
                format!(
                    "{} must be a comma-separated list of ports from 1 to 65535 ({p:?} is not)",
                    nv.name
                ),
            )),
        })
        .collect()
}

fn expect_port(nv: &NameValue, expected: u16, which: &str) -> Result<(), Error> {
    if nv.value.trim() == expected.to_string() {
        return Ok(());
    }
    Err(Error::invalid(
        &nv.path,
        format!("{:?}", nv.value),
        format!(
            "{} must be {expected}: Trellis Envoy's {which} listener is fixed at that port",
            nv.name
        ),
    ))
}
