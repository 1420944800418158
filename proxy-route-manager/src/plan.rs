//! App Mesh's redirect rules as pure data: the [`NatState`] each address family should end up with for a
//! [`Config`]. Kept free of I/O so the exact rule text can be pinned by tests without root.

use crate::config::Config;
use crate::iptables::Family;
use crate::state::{Jump, NatState, converge};

/// `-m multiport` accepts at most 15 ports per rule; longer lists are split, never truncated.
pub const MULTIPORT_MAX: usize = 15;

/// The jump from PREROUTING: inbound TCP that did not come from this host.
pub const INGRESS_JUMP: &str = "-p tcp -m addrtype ! --src-type LOCAL -j APPMESH_INGRESS";
/// The jump from OUTPUT: outbound TCP to somewhere that is not this host.
pub const EGRESS_JUMP: &str = "-p tcp -m addrtype ! --dst-type LOCAL -j APPMESH_EGRESS";

/// The rules for both families. Rule text is written exactly as `iptables-save` prints it, so
/// `--status` and re-runs compare text for text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// What the IPv4 nat table should hold.
    pub ipv4: NatState,
    /// What the IPv6 nat table should hold; empty (nothing of ours) when IPv6 is off.
    pub ipv6: NatState,
    /// Whether the IPv6 rules are required (IPv6 on); when off, IPv6 is only tidied if reachable.
    pub ipv6_required: bool,
}

impl Plan {
    /// The rules App Mesh installs for this configuration.
    pub fn new(config: &Config) -> Plan {
        Plan {
            ipv4: family_state(config, Family::V4),
            ipv6: if config.enable_ipv6 {
                family_state(config, Family::V6)
            } else {
                NatState::default()
            },
            ipv6_required: config.enable_ipv6,
        }
    }

    /// The restore input for one family on a host that has none of our rules yet (what `--dry-run`
    /// prints), or `None` when that family gets nothing.
    pub fn fresh_install(&self, family: Family) -> Option<String> {
        converge(self.family(family), &NatState::default())
    }

    /// The target state of one family.
    pub fn family(&self, family: Family) -> &NatState {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }
}

fn multiport_chunks(ports: &[u16]) -> impl Iterator<Item = String> + '_ {
    ports.chunks(MULTIPORT_MAX).map(|chunk| {
        chunk
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    })
}

fn family_state(config: &Config, family: Family) -> NatState {
    let mut state = NatState::default();

    if !config.app_ports.is_empty() {
        state.ingress = Some(
            multiport_chunks(&config.app_ports)
                .map(|ports| {
                    format!(
                        "-p tcp -m multiport --dports {ports} -j REDIRECT --to-ports {}",
                        config.ingress_port
                    )
                })
                .collect(),
        );
        state.jumps.push(Jump {
            chain: "PREROUTING".into(),
            spec: INGRESS_JUMP.into(),
        });
    }

    let mut egress = Vec::new();
    if let Some(uid) = config.ignore_uid {
        egress.push(format!("-m owner --uid-owner {uid} -j RETURN"));
    }
    if let Some(gid) = config.ignore_gid {
        egress.push(format!("-m owner --gid-owner {gid} -j RETURN"));
    }
    egress.extend(
        multiport_chunks(&config.egress_ignored_ports)
            .map(|ports| format!("-p tcp -m multiport --dports {ports} -j RETURN")),
    );
    for cidr in &config.egress_ignored_ips {
        if cidr.is_ipv6() != (family == Family::V6) {
            continue;
        }
        // iptables-save leaves out a match on everything (`/0`); write it the same way.
        if cidr.prefix() == 0 {
            egress.push("-p tcp -j RETURN".to_owned());
        } else {
            egress.push(format!("-d {cidr} -p tcp -j RETURN"));
        }
    }
    egress.push(format!(
        "-p tcp -j REDIRECT --to-ports {}",
        config.egress_port
    ));
    state.egress = Some(egress);
    state.jumps.push(Jump {
        chain: "OUTPUT".into(),
        spec: EGRESS_JUMP.into(),
    });

    state
}

#[cfg(test)]
mod tests;
