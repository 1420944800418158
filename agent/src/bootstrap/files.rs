//! The bootstrap fragments operators hand App Mesh's image as files (`ENVOY_TRACING_CFG_FILE`,
//! `ENVOY_STATS_CONFIG_FILE`, `ENVOY_STATS_SINKS_CFG_FILE`, `ENVOY_RESOURCES_CONFIG_FILE`), merged
//! the way that image merged them: one tracing and one stats config at most, stats sinks and
//! static listeners, clusters and secrets appended, anything else replaced (with a warning).

use serde_json::{Map, Value};

use super::catalogue::{Level, Note};
use super::{Env, Error, Vars};

/// The files, in the order App Mesh merged them.
pub const FILES: [&str; 4] = [
    "ENVOY_TRACING_CFG_FILE",
    "ENVOY_STATS_CONFIG_FILE",
    "ENVOY_STATS_SINKS_CFG_FILE",
    "ENVOY_RESOURCES_CONFIG_FILE",
];

/// A file read and parsed (YAML or JSON), keyed by the variable that named it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    pub var: &'static str,
    pub path: String,
    pub doc: Map<String, Value>,
}

/// Reads every file the variables name; an unreadable or malformed file is an error naming it.
pub(super) fn read(env: &Env<'_, impl Vars>) -> Result<Vec<Fragment>, Error> {
    let mut out = Vec::new();
    for var in FILES {
        let Some(path) = env.get(var) else { continue };
        let file = |reason: String| Error::File {
            var,
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file(e.to_string()))?;
        let doc: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml::from_str(&text).map_err(|e| file(format!("not YAML or JSON: {e}")))?
        };
        let doc = match doc {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => return Err(file("must be a map of Envoy bootstrap fields".into())),
        };
        // App Mesh refused empty files, except the resources file, which it skipped.
        if doc.is_empty() && var != "ENVOY_RESOURCES_CONFIG_FILE" {
            return Err(file("is empty".into()));
        }
        out.push(Fragment { var, path, doc });
    }
    Ok(out)
}

/// Merges the fragments into `boot`, in order, noting each field a fragment replaced.
pub(super) fn merge(
    boot: &mut Map<String, Value>,
    fragments: &[Fragment],
    notes: &mut Vec<Note>,
) -> Result<(), Error> {
    for f in fragments {
        let fail = |reason: String| Error::File {
            var: f.var,
            path: f.path.clone(),
            reason,
        };
        if f.doc.is_empty() {
            notes.push(Note {
                var: f.var.into(),
                level: Level::Warn,
                text: format!("{} is empty: nothing merged", f.path),
            });
            continue;
        }
        let mut src = Map::new();
        for (key, value) in &f.doc {
            let snake = snake_case(key);
            if src.insert(snake.clone(), value.clone()).is_some() {
                return Err(fail(format!(
                    "names {snake} twice (in snake_case and lowerCamelCase): give only one"
                )));
            }
        }
        for (key, value) in src {
            match key.as_str() {
                "tracing" | "stats_config" => {
                    if boot.contains_key(&key) {
                        return Err(fail(format!(
                            "a second {key} configuration: only one can be given (unset the \
                             variables that enable a built-in one, or merge the files)"
                        )));
                    }
                    boot.insert(key, value);
                }
                "stats_sinks" => append(boot, &key, value).map_err(fail)?,
                "static_resources" => {
                    let Value::Object(resources) = value else {
                        return Err(fail("static_resources must be a map".into()));
                    };
                    let slot = boot
                        .entry("static_resources")
                        .or_insert_with(|| Value::Object(Map::new()));
                    let Some(dst) = slot.as_object_mut() else {
                        return Err(fail("static_resources must be a map".into()));
                    };
                    for (k, v) in resources {
                        match k.as_str() {
                            "listeners" | "clusters" | "secrets" => {
                                append(dst, &k, v).map_err(fail)?
                            }
                            _ => {
                                return Err(fail(format!(
                                    "static_resources.{k}: only listeners, clusters and secrets \
                                     can be added"
                                )));
                            }
                        }
                    }
                }
                _ => {
                    if boot.contains_key(&key) {
                        notes.push(Note {
                            var: f.var.into(),
                            level: Level::Warn,
                            text: format!("{} replaces the bootstrap's {key}", f.path),
                        });
                    }
                    boot.insert(key, value);
                }
            }
        }
        if f.var == "ENVOY_STATS_SINKS_CFG_FILE" && !boot.contains_key("stats_sinks") {
            return Err(fail("has no stats_sinks".into()));
        }
    }
    Ok(())
}

fn append(dst: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    let Value::Array(items) = value else {
        return Err(format!("{key} must be a list"));
    };
    match dst.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
        Value::Array(list) => {
            list.extend(items);
            Ok(())
        }
        _ => Err(format!("{key} must be a list")),
    }
}

/// `statsConfig` → `stats_config`; snake_case stays as it is.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
