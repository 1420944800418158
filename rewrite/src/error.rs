//! The one error type of the crate. Every message starts with the path of the offending field (or the
//! CLI flag) and then states the rule, so an operator can fix the task definition without reading code.

use thiserror::Error;

/// Why a task definition (or the options) cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The input is not JSON at all.
    #[error("input is not valid JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },

    /// A field has the wrong JSON type.
    #[error("{path}: expected {expected}, found {found}")]
    WrongType {
        path: String,
        expected: &'static str,
        found: String,
    },

    /// A field ECS requires is absent.
    #[error("{path}: missing; {why}")]
    Missing { path: String, why: &'static str },

    /// A field is present but its value breaks an ECS or Trellis rule.
    #[error("{path}: {value} is not valid: {rule}")]
    Invalid {
        path: String,
        value: String,
        rule: String,
    },

    /// The task's network mode cannot carry a transparent redirect.
    #[error(
        "networkMode: {found} is not supported: transparent redirect needs awsvpc (one network namespace per task); --explicit-backends meshes bridge and host tasks through HTTP_PROXY"
    )]
    NetworkMode { found: String },

    /// Two containers share a name.
    #[error("{path}: {name:?} is also the name of {first}; container names must be unique")]
    DuplicateName {
        path: String,
        name: String,
        first: String,
    },

    /// An application port collides with a port Envoy owns.
    #[error("{path}: port {port} is reserved for {owner}; move the application off it")]
    ReservedPort {
        path: String,
        port: u32,
        owner: &'static str,
    },

    /// A `dependsOn` entry names a container that does not exist.
    #[error("{path}: no container is named {name:?}")]
    UnknownDependency { path: String, name: String },

    /// The `dependsOn` graph has a cycle, so ECS could never start the task.
    #[error("{path}: dependsOn cycle {cycle}")]
    DependencyCycle { path: String, cycle: String },

    /// The task's memory (or CPU) cannot hold its containers once Envoy is added.
    #[error("{path}: {task} is too small: the containers (Envoy included) need {needed}")]
    TooSmall {
        path: String,
        task: String,
        needed: String,
    },

    /// A command-line option is unusable.
    #[error("--{flag}: {value:?} is not valid: {rule}")]
    Option {
        flag: &'static str,
        value: String,
        rule: String,
    },
}

impl Error {
    pub(crate) fn invalid(
        path: impl Into<String>,
        value: impl ToString,
        rule: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            path: path.into(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }

    pub(crate) fn option(
        flag: &'static str,
        value: impl ToString,
        rule: impl Into<String>,
    ) -> Self {
        Self::Option {
            flag,
            value: value.to_string(),
            rule: rule.into(),
        }
    }

    /// Maps a `serde_json` parse error to one that keeps the position.
    pub(crate) fn from_json(e: &serde_json::Error) -> Self {
        let full = e.to_string();
        // serde_json appends " at line L column C"; we report the position in our own words.
        let message = match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        };
        Self::Json {
            line: e.line(),
            column: e.column(),
            message,
        }
    }
}
