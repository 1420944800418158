//! What a rewrite accepted but wants the operator to know: where the output deliberately behaves
//! differently from ECS or App Mesh. The binary prints each on stderr; nothing is changed silently.

use std::fmt;

/// A deliberate difference from ECS or App Mesh that the output carries, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The field (or flag) the difference is about.
    pub path: String,
    /// What differs, and what to do to get ECS's behaviour instead.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
