//! Trellis's proxy route manager: the init container every meshed ECS task runs first. It installs App
//! Mesh's iptables redirect (inbound app ports → the proxy's ingress port, outbound TCP → its egress
//! port, with the proxy's own uid/gid and ignored ports/addresses exempt) from the same `APPMESH_*`
//! variables as AWS's `aws-appmesh-proxy-route-manager`, atomically and idempotently.

pub mod cidr;
pub mod config;
pub mod detect;
pub mod error;
pub mod iptables;
pub mod netns;
pub mod plan;
pub mod run;
pub mod state;

#[cfg(test)]
mod test_support;

pub use config::{Cli, Config, EnvSource, ProcessEnv};
pub use error::{Error, Result};
pub use plan::Plan;
pub use run::{Outcome, run};
