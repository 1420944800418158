//! What one DynamoDB item can hold, checked before a write is sent. A change the table can never
//! store (a sort key over 1,024 bytes, an item over 400 KB: AWS, "Service, account, and table
//! quotas in Amazon DynamoDB") is the request's fault, so it is refused as a 400 naming the field
//! instead of reaching DynamoDB and coming back as a `ValidationException`.

use super::super::Error;
use super::super::items::{self, Change};
use super::{ATTR_CHANGES, ATTR_DATA, ATTR_EXPIRES, ATTR_GENERATION, ATTR_TABLE_ID, CHANGE};
use super::{PK, RESOURCE, SK};

/// DynamoDB's limit on a sort key value, in UTF-8 bytes.
pub(super) const MAX_SORT_KEY: usize = 1024;
/// DynamoDB's limit on an item: attribute names and values together.
pub(super) const MAX_ITEM: usize = 400 * 1024;
/// The most a number attribute takes: a `u64` has 20 digits, a byte per two, plus one.
const NUMBER: usize = 11;
/// A table id: a UUID in text.
const TABLE_ID: usize = 36;
/// A change item's sort key: the generation, zero-padded.
const CHANGE_SK: usize = 20;

/// Bytes of the resource item that stores `data` under `key`.
fn resource_item(key: &str, data: &str) -> usize {
    PK.len()
        + RESOURCE.len()
        + SK.len()
        + key.len()
        + ATTR_DATA.len()
        + data.len()
        + ATTR_GENERATION.len()
        + NUMBER
}

/// Bytes of the change item whose log (the changes as JSON) is `log`.
fn change_item(log: &str) -> usize {
    PK.len()
        + CHANGE.len()
        + SK.len()
        + CHANGE_SK
        + ATTR_GENERATION.len()
        + NUMBER
        + ATTR_CHANGES.len()
        + log.len()
        + ATTR_EXPIRES.len()
        + NUMBER
        + ATTR_TABLE_ID.len()
        + TABLE_ID
}

/// Whether the items a write of `changes` (whose change log is `log`) makes fit in the table.
pub(super) fn check(changes: &[Change], log: &str) -> Result<(), Error> {
    for (key, data) in changes {
        if key.len() > MAX_SORT_KEY {
            return Err(key_too_long(key));
        }
        if let Some(d) = data
            && resource_item(key, d) > MAX_ITEM
        {
            return Err(too_large(key, resource_item(key, d)));
        }
    }
    match changes.first() {
        Some((key, _)) if change_item(log) > MAX_ITEM => Err(too_large(key, change_item(log))),
        _ => Ok(()),
    }
}

fn key_too_long(key: &str) -> Error {
    let fields = items::key_fields(key);
    let (field, others) = match fields.split_last() {
        Some((last, others)) => (*last, others.join(" and ")),
        None => ("name", String::new()),
    };
    let what = if others.is_empty() {
        "makes".to_string()
    } else {
        format!("with {others} makes")
    };
    Error::Unstorable {
        field: field.into(),
        rule: format!(
            "{what} an item key of {} bytes in the shared store, over DynamoDB's limit of \
             {MAX_SORT_KEY} bytes for a sort key (names count in UTF-8 bytes, '/' and '%' in a \
             name as 3); use a shorter name",
            key.len()
        ),
    }
}

fn too_large(key: &str, bytes: usize) -> Error {
    let name = items::key_fields(key).last().copied().unwrap_or("name");
    Error::Unstorable {
        field: "spec".into(),
        rule: format!(
            "the resource ({name} in item {key}) takes {bytes} bytes in the shared store, over \
             DynamoDB's limit of {MAX_ITEM} bytes for one item; make its spec or tags smaller"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(e: Error) -> (String, String) {
        match e {
            Error::Unstorable { field, rule } => (field, rule),
            other => panic!("not unstorable: {other}"),
        }
    }

    #[test]
    fn a_key_over_the_sort_key_limit_names_the_resource_field_and_the_others_in_it() {
        let wide = "é".repeat(255);
        let fits = format!("mesh/{wide}");
        assert!(check(&[(fits, Some("{}".into()))], "[]").is_ok());
        let key = format!("mesh/{wide}/virtualNode/{wide}");
        assert_eq!(key.len(), 1038);
        let (field, text) = rule(check(&[(key, None)], "[]").unwrap_err());
        assert_eq!(field, "virtualNodeName");
        assert!(
            text.contains("with meshName makes an item key of 1038 bytes"),
            "{text}"
        );
        assert!(text.contains("1024"), "{text}");
        let (field, _) =
            rule(check(&[(format!("mesh/{}", "𝄞".repeat(255)), None)], "[]").unwrap_err());
        assert_eq!(field, "meshName");
    }

    #[test]
    fn an_item_over_400_kb_is_refused_counting_names_and_values() {
        let key = "mesh/m/virtualNode/n".to_string();
        let room = MAX_ITEM - resource_item(&key, "");
        assert!(check(&[(key.clone(), Some("x".repeat(room)))], "[]").is_ok());
        let (field, text) =
            rule(check(&[(key.clone(), Some("x".repeat(room + 1)))], "[]").unwrap_err());
        assert_eq!(field, "spec");
        assert!(text.contains("virtualNodeName"), "{text}");
        // The change log of the write counts too (it holds the resource JSON-escaped).
        let log = "x".repeat(MAX_ITEM);
        assert!(check(&[(key, None)], &log).is_err());
    }
}
