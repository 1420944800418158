//! The slice of a nat table this program owns (its two chains and the jumps into them) as plain data,
//! read back from `iptables-save` and turned into the one `iptables-restore --noflush` input that moves
//! the table from what is there to what should be there. Because both apply and cleanup go through
//! [`converge`], re-running converges and cleanup removes exactly what apply added.

use std::fmt;

/// The chain inbound traffic is sent through (from PREROUTING).
pub const INGRESS_CHAIN: &str = "APPMESH_INGRESS";
/// The chain outbound traffic is sent through (from OUTPUT).
pub const EGRESS_CHAIN: &str = "APPMESH_EGRESS";
/// The chains this program owns, in the order they are written.
pub const OWN_CHAINS: [&str; 2] = [INGRESS_CHAIN, EGRESS_CHAIN];

/// A rule in a chain we do not own that jumps to one we do, e.g. PREROUTING → APPMESH_INGRESS.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    /// The chain holding the rule (`PREROUTING`, `OUTPUT`, …).
    pub chain: String,
    /// The rule after `-A CHAIN `, exactly as `iptables-save` prints it.
    pub spec: String,
}

/// What this program owns in one family's nat table. `None` means the chain does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatState {
    /// Rules of `APPMESH_INGRESS` (each after `-A APPMESH_INGRESS `).
    pub ingress: Option<Vec<String>>,
    /// Rules of `APPMESH_EGRESS` (each after `-A APPMESH_EGRESS `).
    pub egress: Option<Vec<String>>,
    /// Rules elsewhere that jump to our chains.
    pub jumps: Vec<Jump>,
}

/// Whether a family's rules match the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exactly the planned chains, rules and jumps are there.
    InPlace,
    /// None of our chains or jumps are there.
    Absent,
    /// Some are there but they differ from the plan (an older configuration, a partial edit).
    Different,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::InPlace => "in place",
            Status::Absent => "absent",
            Status::Different => "different from the configuration",
        })
    }
}

impl NatState {
    fn chain(&self, name: &str) -> Option<&Vec<String>> {
        match name {
            INGRESS_CHAIN => self.ingress.as_ref(),
            _ => self.egress.as_ref(),
        }
    }

    fn chain_mut(&mut self, name: &str) -> &mut Option<Vec<String>> {
        match name {
            INGRESS_CHAIN => &mut self.ingress,
            _ => &mut self.egress,
        }
    }

    /// Whether nothing of ours is there.
    pub fn is_empty(&self) -> bool {
        *self == NatState::default()
    }

    /// Reads our part of `iptables-save -t nat` output; everything else is ignored.
    pub fn from_save(text: &str) -> NatState {
        let mut state = NatState::default();
        for line in text.lines().map(str::trim) {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if OWN_CHAINS.contains(&name) {
                    state.chain_mut(name).get_or_insert_with(Vec::new);
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                let spec = spec.trim().to_owned();
                if OWN_CHAINS.contains(&chain) {
                    state
                        .chain_mut(chain)
                        .get_or_insert_with(Vec::new)
                        .push(spec);
                } else if targets_own_chain(&spec) {
                    state.jumps.push(Jump {
                        chain: chain.to_owned(),
                        spec,
                    });
                }
            }
        }
        state
    }

    /// Compares what is there (`self`) with the plan.
    pub fn status(&self, planned: &NatState) -> Status {
        if same(self, planned) {
            Status::InPlace
        } else if self.is_empty() {
            Status::Absent
        } else {
            Status::Different
        }
    }
}

/// Whether a rule's target (`-j`/`-g`) is one of our chains.
fn targets_own_chain(spec: &str) -> bool {
    let mut tokens = spec.split_whitespace();
    while let Some(token) = tokens.next() {
        if matches!(token, "-j" | "--jump" | "-g" | "--goto")
            && tokens
                .next()
                .is_some_and(|target| OWN_CHAINS.contains(&target))
        {
            return true;
        }
    }
    false
}

/// Equal up to the order of the jumps (which `iptables-save` prints by chain).
fn same(a: &NatState, b: &NatState) -> bool {
    let mut ja = a.jumps.clone();
    let mut jb = b.jumps.clone();
    ja.sort();
    jb.sort();
    a.ingress == b.ingress && a.egress == b.egress && ja == jb
}

/// The `iptables-restore --noflush` input that turns `current` into `target`, or `None` when they
/// already match. Jumps already present are kept where they are (so re-running adds no duplicates);
/// extra or stale jumps are deleted; each target chain is declared (which empties it) and refilled;
/// chains not in the target are emptied and deleted. The whole input is one transaction.
pub fn converge(target: &NatState, current: &NatState) -> Option<String> {
    if same(target, current) {
        return None;
    }
    let mut lines = vec!["*nat".to_owned()];

    let mut missing = target.jumps.clone();
    for jump in &current.jumps {
        match missing.iter().position(|j| j == jump) {
            Some(i) => {
                missing.remove(i);
            }
            None => lines.push(format!("-D {} {}", jump.chain, jump.spec)),
        }
    }
    for name in OWN_CHAINS {
        if target.chain(name).is_some() || current.chain(name).is_some() {
            lines.push(format!(":{name} - [0:0]"));
        }
    }
    for name in OWN_CHAINS {
        match target.chain(name) {
            Some(rules) => lines.extend(rules.iter().map(|rule| format!("-A {name} {rule}"))),
            None if current.chain(name).is_some() => lines.push(format!("-X {name}")),
            None => {}
        }
    }
    lines.extend(missing.iter().map(|j| format!("-A {} {}", j.chain, j.spec)));
    lines.push("COMMIT".to_owned());
    let mut text = lines.join("\n");
    text.push('\n');
    Some(text)
}

#[cfg(test)]
mod tests;
