//! `trellis-rewrite` turns an ECS task definition into a Trellis-meshed one: it adds the Envoy sidecar
//! (pointed at the agent's ADS socket), the redirect (route manager init container or ECS's native
//! `proxyConfiguration`) and the `dependsOn` ordering, and keeps every field it does not own verbatim and
//! in order. The core never does IO (architecture invariant): [`parse`] and [`rewrite`] work on strings
//! and JSON values; the binary reads files and prints.

mod diff;
mod error;
mod json;
mod options;
mod settings;
mod transform;
mod validate;
mod warning;

pub use diff::unified as diff;
pub use error::Error;
pub use options::{
    ALWAYS_IGNORED_IPS, ALWAYS_IGNORED_PORTS, DEFAULT_ENVOY_IMAGE, DEFAULT_IGNORED_UID,
    DEFAULT_ROUTE_MANAGER_IMAGE, DEFAULT_SOCKET_HOST_PATH, ENVOY_ADMIN_PORT, ENVOY_CONTAINER,
    ENVOY_EGRESS_PORT, ENVOY_INGRESS_PORT, Options, PROXY_CONFIGURATION_MAX_PORTS,
    ROUTE_MANAGER_CONTAINER, Redirect, SOCKET_CONTAINER_PATH, SOCKET_FILE, SOCKET_VOLUME, Target,
};
pub use warning::Warning;

use serde_json::Value;

/// Parses task-definition JSON text; a syntax error reports its line and column.
pub fn parse(text: &str) -> Result<Value, Error> {
    serde_json::from_str(text).map_err(|e| Error::from_json(&e))
}

/// The `RegisterTaskDefinition` request a task definition stands for, unmeshed: the `taskDefinition`
/// wrapper removed (its `tags` carried over) and read-only fields dropped. This is the "before" that
/// `--diff` compares [`rewrite`]'s output with.
pub fn normalize(input: Value) -> Result<Value, Error> {
    transform::task_definition(input).map(Value::Object)
}

/// Meshes a task definition.
///
/// `input` is a `RegisterTaskDefinition` request or `DescribeTaskDefinition` output (with or without the
/// `{"taskDefinition": ...}` wrapper); the result is a `RegisterTaskDefinition` request. Rewriting the
/// result again with the same options returns it unchanged.
pub fn rewrite(input: Value, opts: &Options) -> Result<Value, Error> {
    rewrite_with_warnings(input, opts).map(|r| r.definition)
}

/// A meshed task definition and the deliberate differences from ECS or App Mesh it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten {
    /// The `RegisterTaskDefinition` request.
    pub definition: Value,
    /// Where the output behaves differently from ECS or App Mesh; the CLI prints them on stderr.
    pub warnings: Vec<Warning>,
}

/// [`rewrite`], also returning the warnings the operator must see.
pub fn rewrite_with_warnings(input: Value, opts: &Options) -> Result<Rewritten, Error> {
    transform::rewrite(input, opts)
}

#[cfg(test)]
mod tests;
