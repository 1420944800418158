//! What each mode does, in order: validate, check the capability, enter the namespace, then read the
//! nat tables and converge them. IPv4 and IPv6 are separate transactions, so a failed IPv6 apply rolls
//! IPv4 back to what it was: a failing apply leaves no partial rules.

use caps::{CapSet, Capability};
use tracing::{debug, info, warn};

use crate::config::{self, Cli, EnvSource, Loaded};
use crate::detect;
use crate::error::{Error, Result};
use crate::iptables::{
    Backend, BackendChoice, Family, Iptables, other_backend_present, saved_backend,
};
use crate::netns;
use crate::plan::Plan;
use crate::state::{INGRESS_CHAIN, NatState, OWN_CHAINS, Status, converge};

/// How a run ended (errors aside); `main` turns it into output and an exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `APPMESH_START_ENABLED` is not "1"; nothing was touched.
    Disabled,
    /// `--dry-run`: the restore input(s) to print.
    DryRun(String),
    /// The rules are in place (installed now or already).
    Installed,
    /// `--cleanup` finished; nothing of ours is left.
    CleanedUp,
    /// `--status`: whether everything is as configured, and a line per family to print.
    Status { in_place: bool, report: String },
}

/// Runs the mode the command line asks for.
pub fn run(cli: &Cli, env: &dyn EnvSource) -> Result<Outcome> {
    if cli.cleanup {
        let resolved = prepare(cli)?;
        cleanup(resolved.iptables)?;
        if let Some(stray) = resolved.stray {
            cleanup(stray)?;
        }
        return Ok(Outcome::CleanedUp);
    }

    let plan = match config::load(cli, env)? {
        Loaded::Disabled { value, warnings } => {
            for warning in &warnings {
                warn!(%warning, "start switch not recognised");
            }
            info!(
                APPMESH_START_ENABLED = value.as_deref().unwrap_or(""),
                "route manager disabled: APPMESH_START_ENABLED is not \"1\"; leaving the network unchanged"
            );
            None
        }
        Loaded::Enabled { config, warnings } => {
            for warning in &warnings {
                warn!(%warning, "configuration warning");
            }
            info!(
                ignore_uid = ?config.ignore_uid,
                ignore_gid = ?config.ignore_gid,
                app_ports = ?config.app_ports,
                ingress_port = config.ingress_port,
                egress_port = config.egress_port,
                egress_ignored_ports = ?config.egress_ignored_ports,
                egress_ignored_ips = %config.egress_ignored_ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                enable_ipv6 = config.enable_ipv6,
                "configuration"
            );
            Some(Plan::new(&config))
        }
    };

    if cli.dry_run {
        return Ok(Outcome::DryRun(dry_run_text(
            plan.as_ref(),
            cli.iptables_backend,
        )));
    }
    if cli.status {
        let resolved = prepare(cli)?;
        let plan = plan.unwrap_or_default();
        let mut statuses = status(&plan, resolved.iptables)?;
        if let Some(stray) = resolved.stray {
            // A second copy on the other backend redirects too: not as configured.
            for (family, copy) in status(&Plan::default(), stray)? {
                if copy != Status::InPlace {
                    warn!(%family, backend = %stray.backend(), "a second copy of our rules is on the other iptables backend; a normal run removes it");
                    for (f, s) in statuses.iter_mut() {
                        if *f == family {
                            *s = Status::Different;
                        }
                    }
                }
            }
        }
        let in_place = statuses.iter().all(|(_, s)| *s == Status::InPlace);
        let report = statuses
            .iter()
            .map(|(family, s)| match s {
                Status::InPlace if plan.family(*family).is_empty() => {
                    format!("{family}: none configured, none present\n")
                }
                _ => format!("{family}: {s}\n"),
            })
            .collect();
        return Ok(Outcome::Status { in_place, report });
    }
    let Some(plan) = plan else {
        return Ok(Outcome::Disabled);
    };
    let resolved = prepare(cli)?;
    install(&plan, resolved.iptables)?;
    if let Some(stray) = resolved.stray {
        cleanup(stray)?;
        info!(backend = %stray.backend(), "removed the second copy of our rules from the other iptables backend");
    }
    Ok(Outcome::Installed)
}

/// What `--dry-run` prints: each family's restore input for a namespace without our rules. With
/// `--iptables-backend auto` the program is named generically: the backend is chosen at run time.
pub fn dry_run_text(plan: Option<&Plan>, choice: BackendChoice) -> String {
    let Some(plan) = plan else {
        return "# APPMESH_START_ENABLED is not \"1\": nothing would be installed\n".to_owned();
    };
    let mut text = String::new();
    for family in [Family::V4, Family::V6] {
        if let Some(input) = plan.fresh_install(family) {
            let backend = match choice {
                BackendChoice::Auto | BackendChoice::Path => Backend::Path,
                BackendChoice::Nft => Backend::Nft,
                BackendChoice::Legacy => Backend::Legacy,
            };
            let program = Iptables::new(backend).program(family, "restore");
            text.push_str(&format!("# {family}: {program} --noflush\n{input}"));
        }
    }
    text
}

/// Checks the capability, enters the namespace and chooses the iptables backend there: everything
/// before the first change. The returned programs are used for every later call of the run.
fn prepare(cli: &Cli) -> Result<detect::Resolved> {
    require_net_admin()?;
    if let Some(path) = cli.netns.as_deref() {
        netns::enter(path)?;
        debug!(netns = %path.display(), "entered network namespace");
    }
    detect::resolve_all(cli.iptables_backend)
}

/// Fails with an actionable message unless CAP_NET_ADMIN is in the effective set.
pub fn require_net_admin() -> Result<()> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_ADMIN)
        .map_err(Error::Capabilities)?
    {
        Ok(())
    } else {
        Err(Error::MissingNetAdmin)
    }
}

/// Reads our part of one family's nat table.
fn read(iptables: Iptables, family: Family) -> Result<NatState> {
    let saved = iptables.save_nat(family)?;
    debug!(%family, backend = saved_backend(&saved), "read nat table");
    if other_backend_present(&saved) {
        warn!(
            %family,
            program = %iptables.program(family, "save"),
            "the other iptables backend also has tables in this namespace; only this one is changed (see --iptables-backend)"
        );
    }
    Ok(NatState::from_save(&saved))
}

/// Moves one family from `current` to `target` in one transaction. Returns whether anything changed.
fn converge_family(
    iptables: Iptables,
    family: Family,
    target: &NatState,
    current: &NatState,
) -> Result<bool> {
    for rule in &current.foreign {
        debug!(%family, chain = %rule.chain, rule = %rule.spec, "a rule of a chain we do not own jumps to ours; left as it is");
    }
    for name in OWN_CHAINS {
        let unwanted = match name {
            INGRESS_CHAIN => target.ingress.is_none(),
            _ => target.egress.is_none(),
        };
        let present = match name {
            INGRESS_CHAIN => current.ingress.as_ref(),
            _ => current.egress.as_ref(),
        };
        if unwanted && present.is_some_and(|r| !r.is_empty()) && current.referenced_by_user(name) {
            warn!(%family, chain = name, "a rule in a chain we do not own jumps to this chain, so it is emptied rather than deleted; remove that rule to let the chain go");
        }
    }
    match converge(target, current) {
        None => Ok(false),
        Some(input) => {
            debug!(%family, input = %input, "iptables-restore input");
            iptables.restore(family, &input)?;
            Ok(true)
        }
    }
}

/// Installs (or updates) the planned rules in the current namespace; a no-op when already in place.
pub fn install(plan: &Plan, iptables: Iptables) -> Result<()> {
    let before_v4 = read(iptables, Family::V4)?;
    let changed = converge_family(iptables, Family::V4, &plan.ipv4, &before_v4)?;
    info!(family = %Family::V4, changed, "rules in place");

    let v6 = read(iptables, Family::V6)
        .and_then(|before| converge_family(iptables, Family::V6, &plan.ipv6, &before));
    match v6 {
        Ok(changed) if plan.ipv6_required => {
            info!(family = %Family::V6, changed, "rules in place");
            Ok(())
        }
        Ok(changed) => {
            if changed {
                info!(family = %Family::V6, "removed IPv6 rules left from an earlier run with IPv6 on");
            }
            Ok(())
        }
        Err(error) if !plan.ipv6_required => {
            debug!(%error, "IPv6 is off and ip6tables is unusable here; nothing to tidy");
            Ok(())
        }
        Err(error) => {
            let rollback = read(iptables, Family::V4)
                .and_then(|now| converge_family(iptables, Family::V4, &before_v4, &now));
            match rollback {
                Ok(_) => {
                    warn!(%error, "IPv6 rules failed; IPv4 rules rolled back to their previous state")
                }
                Err(rollback_error) => warn!(
                    %error,
                    %rollback_error,
                    "IPv6 rules failed and rolling IPv4 back failed too; run with --cleanup"
                ),
            }
            Err(error)
        }
    }
}

/// Removes our chains and the jumps into them from both families; succeeds when none are there.
pub fn cleanup(iptables: Iptables) -> Result<()> {
    let empty = NatState::default();
    let current = read(iptables, Family::V4)?;
    let removed = converge_family(iptables, Family::V4, &empty, &current)?;
    info!(family = %Family::V4, removed, "cleanup done");
    match read(iptables, Family::V6) {
        Ok(current) => {
            let removed = converge_family(iptables, Family::V6, &empty, &current)?;
            info!(family = %Family::V6, removed, "cleanup done");
        }
        Err(error) => debug!(%error, "ip6tables is unusable here; no IPv6 rules to remove"),
    }
    Ok(())
}

/// Compares each family's rules with the plan.
pub fn status(plan: &Plan, iptables: Iptables) -> Result<Vec<(Family, Status)>> {
    let v4 = read(iptables, Family::V4)?.status(&plan.ipv4);
    let v6 = match read(iptables, Family::V6) {
        Ok(current) => current.status(&plan.ipv6),
        Err(error) if !plan.ipv6_required => {
            debug!(%error, "ip6tables is unusable here and IPv6 is off");
            Status::InPlace
        }
        Err(error) => return Err(error),
    };
    for (family, status) in [(Family::V4, v4), (Family::V6, v6)] {
        info!(%family, %status, "status");
    }
    Ok(vec![(Family::V4, v4), (Family::V6, v6)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run_with(cli: Cli, pairs: &[(&str, &str)]) -> Result<Outcome> {
        let env: HashMap<&str, &str> = pairs.iter().copied().collect();
        run(&cli, &env)
    }

    #[test]
    fn dry_run_prints_both_families_without_root() {
        let cli = Cli {
            dry_run: true,
            ..Cli::default()
        };
        let outcome = run_with(
            cli,
            &[
                ("APPMESH_START_ENABLED", "1"),
                ("APPMESH_IGNORE_UID", "1337"),
                ("APPMESH_ENABLE_IPV6", "1"),
            ],
        )
        .unwrap();
        let Outcome::DryRun(text) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            text.starts_with("# ipv4: iptables-restore --noflush\n*nat\n"),
            "{text}"
        );
        assert!(
            text.contains("# ipv6: ip6tables-restore --noflush\n*nat\n"),
            "{text}"
        );
        assert_eq!(text.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn dry_run_when_disabled_says_nothing_would_be_installed() {
        let outcome = run_with(
            Cli {
                dry_run: true,
                ..Cli::default()
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            outcome,
            Outcome::DryRun(
                "# APPMESH_START_ENABLED is not \"1\": nothing would be installed\n".into()
            )
        );
    }

    #[test]
    fn disabled_apply_succeeds_without_touching_anything() {
        // No capability check, no namespace, no iptables: works for any user.
        let cli = Cli {
            netns: Some("/nonexistent".into()),
            ..Cli::default()
        };
        assert_eq!(
            run_with(cli, &[("APPMESH_START_ENABLED", "0")]).unwrap(),
            Outcome::Disabled
        );
    }

    #[test]
    fn configuration_errors_come_before_the_capability_check_and_namespace() {
        let cli = Cli {
            netns: Some("/nonexistent".into()),
            ..Cli::default()
        };
        let err = run_with(
            cli,
            &[
                ("APPMESH_START_ENABLED", "1"),
                ("APPMESH_IGNORE_UID", "1337"),
                ("APPMESH_APP_PORTS", "99999"),
            ],
        )
        .unwrap_err();
        assert!(
            err.is_config() && err.to_string().starts_with("APPMESH_APP_PORTS"),
            "{err}"
        );
    }

    #[test]
    fn missing_capability_message_says_what_to_add_to_the_task_definition() {
        assert_eq!(
            Error::MissingNetAdmin.to_string(),
            r#"CAP_NET_ADMIN is missing: add "linuxParameters": {"capabilities": {"add": ["NET_ADMIN"]}} to the route manager container"#
        );
    }
}
