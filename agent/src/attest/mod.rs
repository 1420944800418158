//! Who is asking on an ADS stream: the kernel and ECS say which task's container opened a Unix
//! socket stream (`--xds-attestation ecs`), a client certificate's URI SAN says which node a TCP
//! stream may claim. A stream whose node id is not the caller's own is refused before it gets
//! anything.

pub mod cgroup;
pub mod ecs;
pub mod mtls;

use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use trellis_model::ProxyIdentity;

pub use ecs::{Ecs, EcsSettings};

/// How Unix socket streams are attested (`--xds-attestation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The peer's pid → its container → its ECS task definition names the node it may claim.
    Ecs,
    /// Any process that can open the socket may claim any node (labs, the local demo).
    None,
}

/// What the transport says about the other end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A Unix socket peer; its pid from `SO_PEERCRED` (none if the kernel gave none).
    Unix { pid: Option<i32> },
    /// A TCP peer that presented a client certificate verified against `--xds-tls-client-ca`:
    /// the certificate's URI SANs.
    Tls { uris: Arc<Vec<String>> },
    /// A plain TCP peer (only with `--xds-tcp-insecure`).
    Plain,
}

impl Peer {
    /// Reads the connection's details that tonic put in the request's extensions.
    pub fn of(ext: &http::Extensions) -> Self {
        if let Some(u) = ext.get::<UdsConnectInfo>() {
            return Peer::Unix {
                pid: u.peer_cred.and_then(|c| c.pid()),
            };
        }
        if let Some(t) = ext.get::<mtls::TlsPeer>() {
            return Peer::Tls {
                uris: t.uris.clone(),
            };
        }
        Peer::Plain
    }
}

/// Why a stream was refused. `reason()` is the `/metrics` label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the kernel gave no pid for this Unix socket peer")]
    NoPid,
    #[error("cannot read the cgroup of pid {pid}: {detail}")]
    NoCgroup { pid: i32, detail: String },
    #[error("pid {pid} is in no container's cgroup")]
    NotAContainer { pid: i32 },
    #[error("container {container} is in no task the ECS agent knows: {detail}")]
    UnknownTask { container: String, detail: String },
    #[error("cannot attest container {container}: {detail}")]
    EcsUnavailable { container: String, detail: String },
    #[error(
        "container {container_name} of task definition {task_definition} names no App Mesh node \
         (APPMESH_RESOURCE_ARN or APPMESH_VIRTUAL_NODE_NAME)"
    )]
    NoNode {
        task_definition: String,
        container_name: String,
    },
    #[error("this container may claim only {allowed}, not {claimed}")]
    WrongNode { allowed: String, claimed: String },
    #[error("no verified client certificate on this TCP stream")]
    NoCertificate,
    #[error("the client certificate's URI SANs ({sans}) do not name {claimed}")]
    SanMismatch { sans: String, claimed: String },
}

impl Refusal {
    /// The `reason` label of `trellis_xds_refused_streams_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoPid => "attestation_no_pid",
            Refusal::NoCgroup { .. } => "attestation_no_cgroup",
            Refusal::NotAContainer { .. } => "attestation_not_a_container",
            Refusal::UnknownTask { .. } => "attestation_unknown_task",
            Refusal::EcsUnavailable { .. } => "attestation_ecs_unavailable",
            Refusal::NoNode { .. } => "attestation_no_node",
            Refusal::WrongNode { .. } => "attestation_wrong_node",
            Refusal::NoCertificate => "attestation_no_certificate",
            Refusal::SanMismatch { .. } => "attestation_san_mismatch",
        }
    }
}

/// Decides whether a peer may claim a node.
#[derive(Debug)]
pub struct Attestor {
    mode: Mode,
    ecs: Option<Ecs>,
}

impl Attestor {
    /// Every Unix socket peer may claim any node.
    pub fn none() -> Self {
        Attestor {
            mode: Mode::None,
            ecs: None,
        }
    }

    /// Unix socket peers are attested through the kernel and ECS.
    pub fn ecs(ecs: Ecs) -> Self {
        Attestor {
            mode: Mode::Ecs,
            ecs: Some(ecs),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `Ok` when `peer` may serve as `claimed`.
    pub async fn verify(&self, peer: &Peer, claimed: &ProxyIdentity) -> Result<(), Refusal> {
        match peer {
            Peer::Unix { pid } => match &self.ecs {
                None => Ok(()),
                Some(ecs) => {
                    let pid = pid.ok_or(Refusal::NoPid)?;
                    let allowed = ecs.identify(pid).await?;
                    if same_proxy(&allowed, claimed) {
                        Ok(())
                    } else {
                        Err(Refusal::WrongNode {
                            allowed: allowed.to_string(),
                            claimed: claimed.to_string(),
                        })
                    }
                }
            },
            Peer::Tls { uris } => mtls::verify_sans(uris, claimed),
            Peer::Plain => Ok(()),
        }
    }
}

/// The same virtual node or gateway: mesh, kind and name equal, and the mesh owner too when
/// both name one (`mesh/M/virtualNode/N` is the short form of its ARN).
pub fn same_proxy(a: &ProxyIdentity, b: &ProxyIdentity) -> bool {
    a.mesh == b.mesh
        && a.kind == b.kind
        && a.name == b.name
        && match (&a.mesh_owner, &b.mesh_owner) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ProxyIdentity {
        ProxyIdentity::parse(s).unwrap()
    }

    #[test]
    fn the_short_form_is_the_same_proxy_as_its_arn_but_not_another_owners() {
        let arn = id("arn:aws:appmesh:us-west-2:111122223333:mesh/m/virtualNode/a");
        assert!(same_proxy(&arn, &id("mesh/m/virtualNode/a")));
        assert!(!same_proxy(&arn, &id("mesh/m/virtualNode/b")));
        assert!(!same_proxy(&arn, &id("mesh/m/virtualGateway/a")));
        assert!(!same_proxy(&arn, &id("mesh/m@444455556666/virtualNode/a")));
    }

    #[tokio::test]
    async fn without_attestation_a_unix_peer_may_claim_anything_but_tls_still_checks_sans() {
        let a = Attestor::none();
        let n = id("mesh/m/virtualNode/a");
        assert_eq!(a.verify(&Peer::Unix { pid: None }, &n).await, Ok(()));
        let other = Peer::Tls {
            uris: Arc::new(vec!["spiffe://x/mesh/m/virtualNode/b".into()]),
        };
        assert_eq!(
            a.verify(&other, &n).await.unwrap_err().reason(),
            "attestation_san_mismatch"
        );
    }
}
