//! Path-aware access to untyped task-definition JSON. The tool edits `serde_json::Value` in place rather
//! than typed structs so that every field it does not own survives verbatim and in order; these helpers
//! keep that editing short and make every type mismatch an error that names the field.

use serde_json::{Map, Value};

use crate::Error;

pub(crate) type Object = Map<String, Value>;

/// `path.key`, or just `key` at the top level (empty `path`).
pub(crate) fn at(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A JSON type name for error messages.
pub(crate) fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

pub(crate) fn wrong(path: &str, expected: &'static str, found: &Value) -> Error {
    Error::WrongType {
        path: path.to_string(),
        expected,
        found: kind(found),
    }
}

pub(crate) fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Object, Error> {
    v.as_object().ok_or_else(|| wrong(path, "an object", v))
}

pub(crate) fn object_mut<'a>(v: &'a mut Value, path: &str) -> Result<&'a mut Object, Error> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong(path, "an object", other)),
    }
}

/// `map[key]` as a string, `None` when absent or null.
pub(crate) fn str_field<'a>(
    map: &'a Object,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, Error> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong(&at(path, key), "a string", other)),
    }
}

/// `map[key]` as a non-negative integer, `None` when absent or null.
pub(crate) fn u64_field(map: &Object, key: &str, path: &str) -> Result<Option<u64>, Error> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong(&at(path, key), "a non-negative integer", v)),
    }
}

/// `map[key]` as an array, empty when absent or null.
pub(crate) fn array_field<'a>(
    map: &'a Object,
    key: &str,
    path: &str,
) -> Result<&'a [Value], Error> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(wrong(&at(path, key), "an array", other)),
    }
}

/// `map[key]` as a mutable array, created (appended to the object) when absent or null.
pub(crate) fn array_field_mut<'a>(
    map: &'a mut Object,
    key: &str,
    path: &str,
) -> Result<&'a mut Vec<Value>, Error> {
    let slot = map.entry(key.to_string()).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    match slot {
        Value::Array(a) => Ok(a),
        other => Err(wrong(&at(path, key), "an array", other)),
    }
}

/// Reads an ECS `[{"name": .., "value": ..}]` list (container `environment`, proxy `properties`).
pub(crate) fn name_values(map: &Object, key: &str, path: &str) -> Result<Vec<NameValue>, Error> {
    let mut out = Vec::new();
    for (i, item) in array_field(map, key, path)?.iter().enumerate() {
        let item_path = format!("{path}.{key}[{i}]");
        let obj = object(item, &item_path)?;
        let name = str_field(obj, "name", &item_path)?
            .unwrap_or_default()
            .to_string();
        let value = str_field(obj, "value", &item_path)?
            .unwrap_or_default()
            .to_string();
        out.push(NameValue {
            name,
            value,
            path: format!("{item_path}.value"),
        });
    }
    Ok(out)
}

/// One entry of an ECS name/value list, with the path of its value for error messages.
#[derive(Debug, Clone)]
pub(crate) struct NameValue {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) path: String,
}

/// Rewrites an ECS name/value list: `set` entries win, `remove` names go, everything else is kept; the
/// result is sorted by name (stable, so duplicates keep their relative order) for deterministic output.
pub(crate) fn set_name_values(
    map: &mut Object,
    key: &str,
    path: &str,
    set: &[(String, String)],
    remove: &[&str],
) -> Result<(), Error> {
    let mut kept: Vec<(String, String)> = name_values(map, key, path)?
        .into_iter()
        .filter(|nv| !remove.contains(&nv.name.as_str()) && !set.iter().any(|(n, _)| *n == nv.name))
        .map(|nv| (nv.name, nv.value))
        .collect();
    kept.extend(set.iter().cloned());
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let list = kept
        .into_iter()
        .map(|(name, value)| {
            let mut o = Object::new();
            o.insert("name".into(), Value::String(name));
            o.insert("value".into(), Value::String(value));
            Value::Object(o)
        })
        .collect();
    map.insert(key.to_string(), Value::Array(list));
    Ok(())
}

/// Sets one entry of an ECS name/value list in place (every entry of that name, if repeated),
/// appending it when absent; the other entries and their order are left alone.
pub(crate) fn set_name_value(
    map: &mut Object,
    key: &str,
    path: &str,
    name: &str,
    value: &str,
) -> Result<(), Error> {
    let list = array_field_mut(map, key, path)?;
    let mut found = false;
    for (i, item) in list.iter_mut().enumerate() {
        let obj = object_mut(item, &format!("{path}.{key}[{i}]"))?;
        if obj.get("name").and_then(Value::as_str) == Some(name) {
            obj.insert("value".into(), Value::String(value.to_string()));
            found = true;
        }
    }
    if !found {
        let mut o = Object::new();
        o.insert("name".into(), Value::String(name.to_string()));
        o.insert("value".into(), Value::String(value.to_string()));
        list.push(Value::Object(o));
    }
    Ok(())
}
