//! Running `iptables-save` and `iptables-restore` (and the ip6tables twins) in the calling thread's
//! network namespace. One backend is used for every call, so nft and legacy rules are never mixed.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The address family a rule set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// `--iptables-backend`: how to pick the iptables programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    // These doc comments are `--help` text (clap): no rustdoc links. How auto decides: detect.rs.
    /// Look at the namespace: the backend that already has more rules there; on a tie, the one
    /// `iptables` on PATH uses.
    #[default]
    Auto,
    /// `iptables-restore` etc. from PATH: whatever the image's alternatives point at.
    Path,
    /// `iptables-nft-restore` etc.
    Nft,
    /// `iptables-legacy-restore` etc.
    Legacy,
}

/// A set of iptables programs: the ones every call of a run goes through, so the nft and legacy
/// backends are never mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-restore` etc. from PATH.
    #[default]
    Path,
    /// `iptables-nft-restore` etc.
    Nft,
    /// `iptables-legacy-restore` etc.
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Path => "path",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// Runs the iptables programs of one backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Iptables {
    backend: Backend,
}

/// How long `iptables-restore` waits for the legacy xtables lock before failing.
const LOCK_WAIT_SECONDS: &str = "10";

impl Iptables {
    /// Programs of the given backend.
    pub fn new(backend: Backend) -> Iptables {
        Iptables { backend }
    }

    /// The backend whose programs are run.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The program name for a family and tool (`save` or `restore`).
    pub fn program(&self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self.backend {
            Backend::Path => format!("{base}-{tool}"),
            Backend::Nft => format!("{base}-nft-{tool}"),
            Backend::Legacy => format!("{base}-legacy-{tool}"),
        }
    }

    /// `iptables-save -t nat` output.
    pub fn save_nat(&self, family: Family) -> Result<String> {
        self.save(family, &["-t", "nat"])
    }

    /// `iptables-save` output for every table the backend has in the namespace. Unlike `-t TABLE`,
    /// this creates no table, so looking does not change what the next look sees.
    pub fn save_all(&self, family: Family) -> Result<String> {
        self.save(family, &[])
    }

    fn save(&self, family: Family, args: &[&str]) -> Result<String> {
        let program = self.program(family, "save");
        let output = Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(Error::Command {
                program,
                status: output.status,
                stderr: one_line(&output.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The first of the IPv4 save/restore programs that is not on PATH, if any: the backend cannot
    /// be used without both.
    pub fn missing_program(&self) -> Option<String> {
        ["save", "restore"]
            .into_iter()
            .map(|tool| self.program(Family::V4, tool))
            .find(|program| find_on_path(program).is_none())
    }

    /// `iptables-restore --noflush` with `input` on stdin: all of it or none of it.
    pub fn restore(&self, family: Family, input: &str) -> Result<()> {
        let program = self.program(family, "restore");
        let mut child = Command::new(&program)
            .args(["--noflush", "--wait", LOCK_WAIT_SECONDS])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        let written = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(input.as_bytes()),
            None => Ok(()),
        };
        let output = child.wait_with_output().map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
        if !output.status.success() {
            return Err(Error::Rejected {
                program,
                family,
                status: output.status,
                stderr: one_line(&output.stderr),
            });
        }
        written.map_err(|source| Error::Spawn { program, source })
    }
}

/// Where PATH finds `program`, if anywhere (an executable regular file, as `execvp` would run).
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Stderr folded onto one line for a log message.
fn one_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The backend named in an `iptables-save` header (`nf_tables` or `legacy`), if any.
pub fn saved_backend(save_output: &str) -> &'static str {
    match save_output
        .lines()
        .find(|l| l.starts_with("# Generated by"))
    {
        Some(line) if line.contains("(nf_tables)") => "nf_tables",
        Some(line) if line.contains("(legacy)") || !line.contains('(') => "legacy",
        _ => "unknown",
    }
}

/// Whether `iptables-save` warned that the other backend also has tables here.
pub fn other_backend_present(save_output: &str) -> bool {
    save_output
        .lines()
        .any(|l| l.starts_with("# Warning:") && l.contains("tables present"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_follow_the_backend_and_family() {
        assert_eq!(
            Iptables::new(Backend::Path).program(Family::V4, "restore"),
            "iptables-restore"
        );
        assert_eq!(
            Iptables::new(Backend::Nft).program(Family::V6, "save"),
            "ip6tables-nft-save"
        );
        assert_eq!(
            Iptables::new(Backend::Legacy).program(Family::V4, "save"),
            "iptables-legacy-save"
        );
    }

    #[test]
    fn backend_and_mixing_are_read_from_the_save_header() {
        let nft = "# Generated by iptables-save v1.8.9 (nf_tables) on Mon\n*nat\n";
        assert_eq!(saved_backend(nft), "nf_tables");
        assert_eq!(
            saved_backend("# Generated by iptables-save v1.8.9 on Mon\n"),
            "legacy"
        );
        assert!(!other_backend_present(nft));
        assert!(other_backend_present(
            "COMMIT\n# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n"
        ));
    }

    #[test]
    fn stderr_is_folded_onto_one_line() {
        assert_eq!(
            one_line(b"a: bad\n\nError occurred at line: 4\n"),
            "a: bad; Error occurred at line: 4"
        );
    }
}
