//! Choosing the iptables backend when `--iptables-backend` is `auto` (the default). Our own chains
//! come first: the backend that holds them is the one to act on (re-run, `--status`, `--cleanup`),
//! whatever else the namespace gained since. Without them, the way Kubernetes' iptables-wrapper
//! does: whichever of nft and legacy already has rules in the namespace
//! is the one everybody there uses, so it is the one to add to. Each backend's rules are counted with
//! `iptables-{nft,legacy}-save` and `ip6tables-{nft,legacy}-save` without `-t` (which would create a
//! table and so change the next count); the backend with more rules wins. When both have as many
//! (typically none, in a fresh task namespace) the backend of the `iptables` on PATH wins, as it is the
//! one the image's other tools use, and nft when that cannot be told. The chosen programs are then
//! used for every save, restore and cleanup of the run, so the two are never mixed.

use std::fmt;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::iptables::{Backend, BackendChoice, Family, Iptables, find_on_path};
use crate::state::NatState;

/// What looking at one backend found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Its `iptables-*-save` is not on PATH.
    Missing { program: String },
    /// Its `iptables-*-save` ran and failed (e.g. the kernel lacks that backend).
    Unreadable { error: String },
    /// Its IPv4 and IPv6 tables in this namespace hold this many rules (displayed as the number).
    Rules(usize),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Missing { program } => write!(f, "not installed ({program} is not on PATH)"),
            Probe::Unreadable { error } => write!(f, "unreadable ({error})"),
            Probe::Rules(n) => write!(f, "{n}"),
        }
    }
}

/// Everything the choice is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The legacy backend.
    pub legacy: Probe,
    /// The nft backend.
    pub nft: Probe,
    /// The backend of the `iptables` on PATH, from `iptables --version`, when it says.
    pub path_mode: Option<Backend>,
    /// Whether `iptables-save` is on PATH (images with iptables before 1.8 have no -nft/-legacy names).
    pub path_installed: bool,
    /// Whether the legacy backend holds our chains (IPv4 or IPv6).
    pub legacy_ours: bool,
    /// Whether the nft backend holds our chains (IPv4 or IPv6).
    pub nft_ours: bool,
}

/// The programs a run uses, and the other backend when it holds a second copy of our rules (left
/// by an older route manager that chose by rule count): a run converges the chosen backend and
/// removes that copy, so the two never redirect at once.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    /// The backend every change of the run goes through.
    pub iptables: Iptables,
    /// The other backend, when it holds our chains too.
    pub stray: Option<Iptables>,
}

/// Why a backend was chosen; logged with the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `--iptables-backend` named it.
    Explicit,
    /// Our own chains are there (and not on the other backend).
    OwnRules,
    /// It has more rules in the namespace than the other.
    MoreRules { legacy: usize, nft: usize },
    /// Both have as many rules; the `iptables` on PATH is this backend (or says nothing: nft).
    Tie {
        rules: usize,
        path_mode: Option<Backend>,
    },
    /// The other backend cannot be used here at all.
    OnlyUsable { other: Backend, probe: Probe },
    /// Neither named backend is installed; only the unversioned programs on PATH are.
    OnlyPath,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Explicit => f.write_str("named by --iptables-backend"),
            Reason::OwnRules => f.write_str("our own chains are there"),
            Reason::MoreRules { legacy, nft } => write!(
                f,
                "it has more rules in the namespace (legacy {legacy}, nft {nft})"
            ),
            Reason::Tie { rules, path_mode } => {
                let had = match rules {
                    0 => "neither backend has rules in the namespace".to_owned(),
                    n => format!("both backends have {n} rules in the namespace"),
                };
                match path_mode {
                    Some(mode) => write!(f, "{had} and the iptables on PATH is {mode}"),
                    None => write!(
                        f,
                        "{had} and the iptables on PATH does not say which it is; nft is the default"
                    ),
                }
            }
            Reason::OnlyUsable { other, probe } => write!(f, "the {other} backend is {probe}"),
            Reason::OnlyPath => f.write_str(
                "only iptables-save/iptables-restore are installed, without -nft/-legacy variants",
            ),
        }
    }
}

/// The decision, from what was observed; no I/O.
pub fn choose(observed: &Observed) -> Result<(Backend, Reason)> {
    match (observed.legacy_ours, observed.nft_ours) {
        (true, false) => return Ok((Backend::Legacy, Reason::OwnRules)),
        (false, true) => return Ok((Backend::Nft, Reason::OwnRules)),
        // On both (an older run chose the other way) or on neither: by the rules, as below.
        _ => {}
    }
    match (&observed.legacy, &observed.nft) {
        (Probe::Rules(legacy), Probe::Rules(nft)) if legacy > nft => Ok((
            Backend::Legacy,
            Reason::MoreRules {
                legacy: *legacy,
                nft: *nft,
            },
        )),
        (Probe::Rules(legacy), Probe::Rules(nft)) if nft > legacy => Ok((
            Backend::Nft,
            Reason::MoreRules {
                legacy: *legacy,
                nft: *nft,
            },
        )),
        (Probe::Rules(rules), Probe::Rules(_)) => {
            let backend = match observed.path_mode {
                Some(Backend::Legacy) => Backend::Legacy,
                _ => Backend::Nft,
            };
            Ok((
                backend,
                Reason::Tie {
                    rules: *rules,
                    path_mode: observed.path_mode,
                },
            ))
        }
        (Probe::Rules(_), probe) => Ok((
            Backend::Legacy,
            Reason::OnlyUsable {
                other: Backend::Nft,
                probe: probe.clone(),
            },
        )),
        (probe, Probe::Rules(_)) => Ok((
            Backend::Nft,
            Reason::OnlyUsable {
                other: Backend::Legacy,
                probe: probe.clone(),
            },
        )),
        (Probe::Missing { .. }, Probe::Missing { .. }) if observed.path_installed => {
            Ok((Backend::Path, Reason::OnlyPath))
        }
        (legacy, nft) => Err(Error::NoUsableBackend {
            nft: nft.to_string(),
            legacy: legacy.to_string(),
        }),
    }
}

/// Counts one backend's rules (IPv4 and IPv6, every table) in the current namespace, and tells
/// whether our chains are among them.
pub fn probe(backend: Backend) -> (Probe, bool) {
    let iptables = Iptables::new(backend);
    let program = iptables.program(Family::V4, "save");
    if find_on_path(&program).is_none() {
        return (Probe::Missing { program }, false);
    }
    let v4 = match iptables.save_all(Family::V4) {
        Ok(text) => text,
        Err(error) => {
            return (
                Probe::Unreadable {
                    error: error.to_string(),
                },
                false,
            );
        }
    };
    let v6 = match iptables.save_all(Family::V6) {
        Ok(text) => text,
        Err(error) => {
            debug!(%backend, %error, "cannot count IPv6 rules; counting IPv4 only");
            String::new()
        }
    };
    let ours = [&v4, &v6]
        .iter()
        .any(|text| !NatState::from_save(text).is_empty());
    (Probe::Rules(count_rules(&v4) + count_rules(&v6)), ours)
}

/// The number of rules in `iptables-save` output.
pub fn count_rules(save_output: &str) -> usize {
    save_output.lines().filter(|l| l.starts_with('-')).count()
}

/// The backend `iptables --version` reports: `(nf_tables)` or `(legacy)`; versions before 1.8 only
/// had legacy and say nothing.
pub fn parse_version(output: &str) -> Option<Backend> {
    let line = output.lines().next()?.trim();
    if line.contains("(nf_tables)") {
        Some(Backend::Nft)
    } else if line.contains("(legacy)") || (line.starts_with("iptables v") && !line.contains('(')) {
        Some(Backend::Legacy)
    } else {
        None
    }
}

/// The backend of the `iptables` on PATH, if it runs and says.
fn path_mode() -> Option<Backend> {
    let output = Command::new("iptables")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&output.stdout))
}

/// Looks at the current namespace (for `auto`) and returns the programs to use for the whole run,
/// after checking they are installed. Logs the choice and why.
pub fn resolve(choice: BackendChoice) -> Result<Iptables> {
    resolve_all(choice).map(|r| r.iptables)
}

/// [`resolve`], also naming the other backend when it holds a second copy of our chains (`auto`
/// only: a backend named on the command line is used alone).
pub fn resolve_all(choice: BackendChoice) -> Result<Resolved> {
    let explicit = match choice {
        BackendChoice::Auto => None,
        BackendChoice::Path => Some(Backend::Path),
        BackendChoice::Nft => Some(Backend::Nft),
        BackendChoice::Legacy => Some(Backend::Legacy),
    };
    let (backend, reason, stray) = match explicit {
        Some(backend) => {
            info!(
                %backend,
                reason = Reason::Explicit.to_string(),
                "iptables backend chosen"
            );
            (backend, Reason::Explicit, None)
        }
        None => {
            let (legacy, legacy_ours) = probe(Backend::Legacy);
            let (nft, nft_ours) = probe(Backend::Nft);
            let observed = Observed {
                legacy,
                nft,
                path_mode: path_mode(),
                path_installed: find_on_path("iptables-save").is_some(),
                legacy_ours,
                nft_ours,
            };
            let (backend, reason) = choose(&observed)?;
            info!(
                %backend,
                reason = reason.to_string(),
                legacy_rules = %observed.legacy,
                nft_rules = %observed.nft,
                legacy_ours,
                nft_ours,
                path_iptables = observed.path_mode.map_or("unknown".to_owned(), |m| m.to_string()),
                "iptables backend chosen"
            );
            (backend, reason, stray(&observed, backend))
        }
    };
    let iptables = Iptables::new(backend);
    if let Some(program) = iptables.missing_program() {
        return Err(Error::BackendMissing {
            backend,
            why: reason.to_string(),
            program,
        });
    }
    let stray = stray.map(Iptables::new);
    if let Some(other) = stray {
        warn!(
            chosen = %backend,
            other = %other.backend(),
            "both iptables backends hold our chains (an older run chose the other one); the other copy will be removed"
        );
    }
    Ok(Resolved { iptables, stray })
}

/// The backend other than `chosen` when it holds our chains too.
pub fn stray(observed: &Observed, chosen: Backend) -> Option<Backend> {
    match chosen {
        Backend::Nft if observed.legacy_ours => Some(Backend::Legacy),
        Backend::Legacy if observed.nft_ours => Some(Backend::Nft),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
