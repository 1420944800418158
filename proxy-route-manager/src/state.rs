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
/// The nat table's built-in chains: the hooks our jumps hang from. A rule elsewhere that jumps to our
/// chains is the user's, and is never changed.
pub const BUILT_IN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

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
    /// Rules in the built-in chains that jump to our chains: ours to add, keep or delete.
    pub jumps: Vec<Jump>,
    /// Rules in chains we do not own (the user's) that jump to ours. Never touched; a chain they
    /// reference is emptied rather than deleted when it is no longer wanted.
    pub foreign: Vec<Jump>,
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

    /// Whether nothing of ours is there (the user's references to our chains aside).
    pub fn is_empty(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none() && self.jumps.is_empty()
    }

    /// Whether a rule we do not own jumps to chain `name`.
    pub fn referenced_by_user(&self, name: &str) -> bool {
        self.foreign.iter().any(|j| targets(&j.spec, name))
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
                } else if OWN_CHAINS.iter().any(|own| targets(&spec, own)) {
                    let jump = Jump {
                        chain: chain.to_owned(),
                        spec,
                    };
                    if BUILT_IN_CHAINS.contains(&chain) {
                        state.jumps.push(jump);
                    } else {
                        state.foreign.push(jump);
                    }
                }
            }
        }
        state
    }

    /// Compares what is there (`self`) with the plan.
    pub fn status(&self, planned: &NatState) -> Status {
        if same(planned, self) {
            Status::InPlace
        } else if self.is_empty() {
            Status::Absent
        } else {
            Status::Different
        }
    }
}

/// Whether a rule's target (`-j`/`-g`) is chain `name`.
fn targets(spec: &str, name: &str) -> bool {
    let mut tokens = spec.split_whitespace();
    while let Some(token) = tokens.next() {
        if matches!(token, "-j" | "--jump" | "-g" | "--goto") && tokens.next() == Some(name) {
            return true;
        }
    }
    false
}

/// Whether `current` is what `target` asks for, up to the order of the jumps (which `iptables-save`
/// prints by chain). A chain the target does without may remain empty while a user's rule still
/// jumps to it: that is as close to gone as we may make it.
fn same(target: &NatState, current: &NatState) -> bool {
    let mut jt = target.jumps.clone();
    let mut jc = current.jumps.clone();
    jt.sort();
    jc.sort();
    jt == jc
        && OWN_CHAINS
            .iter()
            .all(|name| chain_done(name, target, current))
}

/// Whether chain `name` is as `target` wants it in `current`.
fn chain_done(name: &str, target: &NatState, current: &NatState) -> bool {
    match (target.chain(name), current.chain(name)) {
        (None, Some(rules)) => rules.is_empty() && current.referenced_by_user(name),
        (t, c) => t == c,
    }
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
            // A user's rule still jumps here: deleting the chain would fail (and take the
            // user's rule's target away); declaring it above has emptied it.
            None if current.referenced_by_user(name) => {}
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
