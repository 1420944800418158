//! Choosing the iptables backend when `--iptables-backend` is `auto` (the default), the way
//! Kubernetes' iptables-wrapper does: whichever of nft and legacy already has rules in the namespace
//! is the one everybody there uses, so it is the one to add to. Each backend's rules are counted with
//! `iptables-{nft,legacy}-save` and `ip6tables-{nft,legacy}-save` without `-t` (which would create a
//! table and so change the next count); the backend with more rules wins. When both have as many
//! (typically none, in a fresh task namespace) the backend of the `iptables` on PATH wins, as it is the
//! one the image's other tools use, and nft when that cannot be told. The chosen programs are then
//! used for every save, restore and cleanup of the run, so the two are never mixed.

use std::fmt;
use std::process::{Command, Stdio};

use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::iptables::{Backend, BackendChoice, Family, Iptables, find_on_path};

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
}

/// Why a backend was chosen; logged with the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `--iptables-backend` named it.
    Explicit,
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

/// Counts one backend's rules (IPv4 and IPv6, every table) in the current namespace.
pub fn probe(backend: Backend) -> Probe {
    let iptables = Iptables::new(backend);
    let program = iptables.program(Family::V4, "save");
    if find_on_path(&program).is_none() {
        return Probe::Missing { program };
    }
    let v4 = match iptables.save_all(Family::V4) {
        Ok(text) => count_rules(&text),
        Err(error) => {
            return Probe::Unreadable {
                error: error.to_string(),
            };
        }
    };
    let v6 = match iptables.save_all(Family::V6) {
        Ok(text) => count_rules(&text),
        Err(error) => {
            debug!(%backend, %error, "cannot count IPv6 rules; counting IPv4 only");
            0
        }
    };
    Probe::Rules(v4 + v6)
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
    let explicit = match choice {
        BackendChoice::Auto => None,
        BackendChoice::Path => Some(Backend::Path),
        BackendChoice::Nft => Some(Backend::Nft),
        BackendChoice::Legacy => Some(Backend::Legacy),
    };
    let (backend, reason) = match explicit {
        Some(backend) => {
            info!(
                %backend,
                reason = Reason::Explicit.to_string(),
                "iptables backend chosen"
            );
            (backend, Reason::Explicit)
        }
        None => {
            let observed = Observed {
                legacy: probe(Backend::Legacy),
                nft: probe(Backend::Nft),
                path_mode: path_mode(),
                path_installed: find_on_path("iptables-save").is_some(),
            };
            let (backend, reason) = choose(&observed)?;
            info!(
                %backend,
                reason = reason.to_string(),
                legacy_rules = %observed.legacy,
                nft_rules = %observed.nft,
                path_iptables = observed.path_mode.map_or("unknown".to_owned(), |m| m.to_string()),
                "iptables backend chosen"
            );
            (backend, reason)
        }
    };
    let iptables = Iptables::new(backend);
    match iptables.missing_program() {
        Some(program) => Err(Error::BackendMissing {
            backend,
            why: reason.to_string(),
            program,
        }),
        None => Ok(iptables),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(legacy: Probe, nft: Probe, path_mode: Option<Backend>) -> Observed {
        Observed {
            legacy,
            nft,
            path_mode,
            path_installed: true,
        }
    }

    fn missing(program: &str) -> Probe {
        Probe::Missing {
            program: program.into(),
        }
    }

    #[test]
    fn the_backend_with_more_rules_wins_whatever_path_says() {
        let (backend, reason) = choose(&observed(
            Probe::Rules(3),
            Probe::Rules(1),
            Some(Backend::Nft),
        ))
        .unwrap();
        assert_eq!(backend, Backend::Legacy);
        assert_eq!(
            reason.to_string(),
            "it has more rules in the namespace (legacy 3, nft 1)"
        );
        let (backend, _) = choose(&observed(
            Probe::Rules(0),
            Probe::Rules(7),
            Some(Backend::Legacy),
        ))
        .unwrap();
        assert_eq!(backend, Backend::Nft);
    }

    #[test]
    fn a_tie_goes_to_the_iptables_on_path_and_otherwise_to_nft() {
        let tie = |path| choose(&observed(Probe::Rules(0), Probe::Rules(0), path)).unwrap();
        assert_eq!(tie(Some(Backend::Legacy)).0, Backend::Legacy);
        assert_eq!(tie(Some(Backend::Nft)).0, Backend::Nft);
        let (backend, reason) = tie(None);
        assert_eq!(backend, Backend::Nft);
        assert_eq!(
            reason.to_string(),
            "neither backend has rules in the namespace and the iptables on PATH does not say which it is; nft is the default"
        );
        let (_, reason) = choose(&observed(
            Probe::Rules(2),
            Probe::Rules(2),
            Some(Backend::Nft),
        ))
        .unwrap();
        assert_eq!(
            reason.to_string(),
            "both backends have 2 rules in the namespace and the iptables on PATH is nft"
        );
    }

    #[test]
    fn a_backend_that_cannot_be_read_is_not_chosen() {
        let (backend, reason) = choose(&observed(
            Probe::Rules(0),
            Probe::Unreadable {
                error: "no nf_tables".into(),
            },
            Some(Backend::Nft),
        ))
        .unwrap();
        assert_eq!(backend, Backend::Legacy);
        assert_eq!(
            reason.to_string(),
            "the nft backend is unreadable (no nf_tables)"
        );
        let (backend, _) = choose(&observed(
            missing("iptables-legacy-save"),
            Probe::Rules(0),
            Some(Backend::Legacy),
        ))
        .unwrap();
        assert_eq!(backend, Backend::Nft);
    }

    #[test]
    fn without_named_backends_the_programs_on_path_are_used_or_it_is_an_error() {
        let none = observed(
            missing("iptables-legacy-save"),
            missing("iptables-nft-save"),
            Some(Backend::Legacy),
        );
        assert_eq!(choose(&none).unwrap(), (Backend::Path, Reason::OnlyPath));
        let err = choose(&Observed {
            path_installed: false,
            ..none
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no iptables backend can be used here (nft: not installed (iptables-nft-save is not on PATH); legacy: not installed (iptables-legacy-save is not on PATH)): the route manager image needs the iptables package"
        );
    }

    #[test]
    fn version_output_names_the_backend() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some(Backend::Nft)
        );
        assert_eq!(
            parse_version("iptables v1.8.7 (legacy)\n"),
            Some(Backend::Legacy)
        );
        assert_eq!(parse_version("iptables v1.6.1\n"), Some(Backend::Legacy));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("something else (x)"), None);
    }

    #[test]
    fn only_rule_lines_are_counted() {
        let saved = "# Generated by iptables-save v1.8.9\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n# Warning: iptables-legacy tables present\n";
        assert_eq!(count_rules(saved), 2);
    }

    #[test]
    fn a_missing_program_of_the_chosen_backend_is_a_clear_error() {
        let err = Error::BackendMissing {
            backend: Backend::Legacy,
            why: Reason::Explicit.to_string(),
            program: "iptables-legacy-restore".into(),
        };
        assert_eq!(
            err.to_string(),
            "the legacy iptables backend was chosen (named by --iptables-backend) but iptables-legacy-restore is not on PATH: install the iptables package (with its legacy programs) in the route manager image, or choose another with --iptables-backend"
        );
    }
}
