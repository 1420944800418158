//! The crate's single error type. Every variant renders as one line that tells an ECS operator what to
//! change (a variable, the task definition, the image), because that line is all they see in the logs.

use std::path::PathBuf;

use crate::iptables::{Backend, Family};

/// Everything that can stop the route manager. Configuration errors are reported before anything is
/// touched; the others come from the environment the container runs in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A port setting is not a whole number from 1 to 65535.
    #[error("{var} (--{flag}): {value:?} is not a port; ports are whole numbers from 1 to 65535")]
    InvalidPort {
        var: &'static str,
        flag: &'static str,
        value: String,
    },

    /// A uid or gid setting is not a non-negative whole number.
    #[error(
        "{var} (--{flag}): {value:?} is not a numeric id; give the number, not a user or group name"
    )]
    InvalidId {
        var: &'static str,
        flag: &'static str,
        value: String,
    },

    /// An ignored address is neither an IP address nor a CIDR block.
    #[error(
        "{var} (--{flag}): {value:?} is not an IP address or CIDR block (examples: 10.0.0.1, 10.0.0.0/8, fd00::/8)"
    )]
    InvalidCidr {
        var: &'static str,
        flag: &'static str,
        value: String,
    },

    /// A boolean setting has a value that is neither on nor off.
    #[error("{var} (--{flag}): {value:?} is not a boolean; use 1/true or 0/false")]
    InvalidBool {
        var: &'static str,
        flag: &'static str,
        value: String,
    },

    /// Without an exempt uid or gid the proxy's own upstream connections would loop back into it.
    #[error(
        "neither APPMESH_IGNORE_UID (--ignored-uid) nor APPMESH_IGNORE_GID (--ignored-gid) is set: set the proxy's uid (1337 for Envoy) so its own traffic is not redirected back to it"
    )]
    NoIgnoredOwner,

    /// Ingress and egress would redirect to the same listener.
    #[error(
        "APPMESH_ENVOY_INGRESS_PORT (--proxy-ingress-port) and APPMESH_ENVOY_EGRESS_PORT (--proxy-egress-port) are both {port}; the proxy needs a separate listener for each"
    )]
    SameProxyPort { port: u16 },

    /// The process may not change the firewall.
    #[error(
        "CAP_NET_ADMIN is missing: add \"linuxParameters\": {{\"capabilities\": {{\"add\": [\"NET_ADMIN\"]}}}} to the route manager container"
    )]
    MissingNetAdmin,

    /// The capability sets could not be read.
    #[error("cannot read this process's capabilities: {0}")]
    Capabilities(#[source] caps::errors::CapsError),

    /// `--netns` names something that cannot be opened.
    #[error("cannot open network namespace {}: {source}", path.display())]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `--netns` could be opened but not entered.
    #[error(
        "cannot enter network namespace {}: {source} (is it a network namespace? entering one needs CAP_SYS_ADMIN)",
        path.display()
    )]
    NetnsEnter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    /// An iptables program could not be started at all.
    #[error("cannot run {program}: {source} (the image needs the iptables package on PATH)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// The backend to use is known, but its programs are not installed.
    #[error(
        "the {backend} iptables backend was chosen ({why}) but {program} is not on PATH: install the iptables package (with its {backend} programs) in the route manager image, or choose another with --iptables-backend"
    )]
    BackendMissing {
        backend: Backend,
        why: String,
        program: String,
    },

    /// Neither the nft nor the legacy programs can read the namespace's tables.
    #[error(
        "no iptables backend can be used here (nft: {nft}; legacy: {legacy}): the route manager image needs the iptables package"
    )]
    NoUsableBackend { nft: String, legacy: String },

    /// `iptables-restore` refused the input; being one transaction, none of it was applied.
    #[error(
        "{program} rejected the {family} nat rules ({status}), so none of them were applied: {stderr}"
    )]
    Rejected {
        program: String,
        family: Family,
        status: std::process::ExitStatus,
        stderr: String,
    },

    /// An iptables program ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the error is the operator's configuration (exit code 2) rather than the environment.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::InvalidPort { .. }
                | Error::InvalidId { .. }
                | Error::InvalidCidr { .. }
                | Error::InvalidBool { .. }
                | Error::NoIgnoredOwner
                | Error::SameProxyPort { .. }
        )
    }
}
