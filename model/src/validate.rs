//! The constraint checks the generated `Validate` impls call, and the error they return: the field
//! path and the rule, which the API turns into App Mesh's BadRequestException message.

use std::fmt;

/// One violated constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub rule: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.rule)
    }
}

impl std::error::Error for FieldError {}

impl FieldError {
    pub fn new(path: &str, rule: impl Into<String>) -> Self {
        FieldError {
            path: path.to_string(),
            rule: rule.into(),
        }
    }
}

/// Checks a value against every constraint the model states for its shape.
pub trait Validate {
    fn validate(&self, path: &str) -> Result<(), FieldError>;
}

/// `spec` under the root, `spec.listeners` under `spec`.
pub fn join(path: &str, member: &str) -> String {
    if path.is_empty() {
        member.to_string()
    } else {
        format!("{path}.{member}")
    }
}

pub fn check_len(path: &str, len: usize, min: usize, max: usize) -> Result<(), FieldError> {
    if len < min || len > max {
        let rule = if max == usize::MAX {
            format!("length {len} is too short: must be at least {min}")
        } else {
            format!("length {len} is out of range: must be between {min} and {max}")
        };
        return Err(FieldError::new(path, rule));
    }
    Ok(())
}

pub fn check_range(path: &str, value: i64, min: i64, max: i64) -> Result<(), FieldError> {
    if value < min || value > max {
        let rule = match (min, max) {
            (i64::MIN, max) => format!("{value} is out of range: must be at most {max}"),
            (min, i64::MAX) => format!("{value} is out of range: must be at least {min}"),
            (min, max) => format!("{value} is out of range: must be between {min} and {max}"),
        };
        return Err(FieldError::new(path, rule));
    }
    Ok(())
}

pub fn check_count(path: &str, count: usize, min: usize, max: usize) -> Result<(), FieldError> {
    if count < min || count > max {
        let rule = if max == usize::MAX {
            format!("{count} items given: at least {min} required")
        } else {
            format!("{count} items given: must have between {min} and {max}")
        };
        return Err(FieldError::new(path, rule));
    }
    Ok(())
}

/// A union must have exactly one member set.
pub fn check_union(path: &str, set: usize, members: &str) -> Result<(), FieldError> {
    if set != 1 {
        let path = if path.is_empty() { "(request)" } else { path };
        return Err(FieldError::new(
            path,
            format!("exactly one of {members} must be set ({set} given)"),
        ));
    }
    Ok(())
}
