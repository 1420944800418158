//! The table's side of the pollers shared by the fleet (`discovery::fleet`): per Cloud Map key, a
//! lease item and an answer item, beside the mesh state but outside its generations and change
//! log (never exported, never part of a full load).
//!
//! - `lease` / KEY: `holder` (an agent's random name), `until` (epoch milliseconds), `version`
//!   (of the last answer), `expiresAt` (time to live: a day after the last renewal);
//! - `endpoints` / KEY: `version`, `instances` (JSON `[{"id", "ipv4", "ipv6"}]`; absent when every
//!   call so far failed), `fetchedAt`, `holder`, `expiresAt` (a day; the holder republishes hourly).
//!
//! KEY is the Cloud Map key and the agents' health filter as JSON `[namespace, service,
//! [[attribute, value], …], health]` (agents filtering differently do not share answers), or
//! `sha256:HEX` of that when it is longer than a sort key holds. A claim is one conditional
//! `UpdateItem` (no lease, expired, or the claimant's); a publication one `TransactWriteItems`
//! that moves the lease's version only if the publisher still holds it at the version it knows,
//! and writes the answer: readers see a new version only with (or after) its answer. Reads are
//! `BatchGetItem`, eventually consistent (half a read unit per item): a stale lease costs at most
//! a claim that fails its condition, a stale answer is read again next round.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, ReturnValue, TransactWriteItem, Update,
};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::super::{Error, StoreArgs};
use super::table::{self, Item, n, s};
use super::{ATTR_EXPIRES, PK, SK};
use crate::discovery::Metrics;
use crate::discovery::fleet::{Answer, Board, BoardError, Claim, Lease, Published};
use trellis_translate::{CloudMapKey, Instance};

const LEASE: &str = "lease";
const ENDPOINTS: &str = "endpoints";
const ATTR_HOLDER: &str = "holder";
const ATTR_UNTIL: &str = "until";
const ATTR_VERSION: &str = "version";
const ATTR_INSTANCES: &str = "instances";
const ATTR_FETCHED: &str = "fetchedAt";
/// Lease and answer items nobody renews are deleted by the table's time to live after this.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// `BatchGetItem` takes at most this many keys.
const BATCH: usize = 100;
/// Rounds for keys DynamoDB left unprocessed (throttling) before the read counts as failed.
const UNPROCESSED_TRIES: u32 = 3;
/// The longest sort key DynamoDB stores.
const MAX_SK: usize = 1024;

/// Leases and answers in the store's DynamoDB table.
#[derive(Debug)]
pub struct FleetTable {
    client: Client,
    table: String,
    /// `DiscoverInstances`' health filter, part of every key.
    health: String,
    metrics: Arc<Metrics>,
}

impl FleetTable {
    /// The table `args` names (region and credentials as the store's), for agents polling with
    /// the `health` filter; calls are counted in `metrics`.
    pub async fn connect(
        args: &StoreArgs,
        region: &str,
        health: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        Ok(FleetTable {
            table: table::table_name(args)?,
            client: table::client(args, region).await,
            health: health.to_string(),
            metrics,
        })
    }

    fn sk(&self, key: &CloudMapKey) -> String {
        sort_key(key, &self.health)
    }

    fn key(&self, pk: &str, key: &CloudMapKey) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_string(), s(pk)), (SK.to_string(), s(&self.sk(key)))])
    }

    /// The items of partition `pk` for `keys`, in order.
    async fn batch_get(
        &self,
        pk: &str,
        keys: &[CloudMapKey],
    ) -> Result<Vec<Option<Item>>, BoardError> {
        let sks: Vec<String> = keys.iter().map(|k| self.sk(k)).collect();
        let mut found: HashMap<String, Item> = HashMap::new();
        for chunk in sks.chunks(BATCH) {
            let mut want: Vec<HashMap<String, AttributeValue>> = chunk
                .iter()
                .map(|sk| HashMap::from([(PK.to_string(), s(pk)), (SK.to_string(), s(sk))]))
                .collect();
            let mut tries = 0;
            while !want.is_empty() {
                tries += 1;
                if tries > UNPROCESSED_TRIES {
                    return Err(unavailable(
                        "BatchGetItem",
                        "keys left unprocessed (throttled)",
                    ));
                }
                if tries > 1 {
                    tokio::time::sleep(Duration::from_millis(50 << tries)).await;
                }
                let ka = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut want)))
                    .consistent_read(false)
                    .build()
                    .map_err(|e| unavailable("BatchGetItem", &e.to_string()))?;
                self.metrics.table_call("BatchGetItem");
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, ka)
                    .send()
                    .await
                    .map_err(|e| failed("BatchGetItem", &self.table, e))?;
                for item in out
                    .responses
                    .unwrap_or_default()
                    .remove(&self.table)
                    .unwrap_or_default()
                {
                    if let Some(AttributeValue::S(sk)) = item.get(SK) {
                        found.insert(sk.clone(), item);
                    }
                }
                want = out
                    .unprocessed_keys
                    .unwrap_or_default()
                    .remove(&self.table)
                    .map(|k| k.keys)
                    .unwrap_or_default();
            }
        }
        Ok(sks.iter().map(|sk| found.remove(sk)).collect())
    }
}

impl Board for FleetTable {
    fn leases<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Lease>>, BoardError>> {
        Box::pin(async move {
            let items = self.batch_get(LEASE, keys).await?;
            Ok(items.iter().map(|i| i.as_ref().map(lease)).collect())
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        now_ms: u64,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Claim, BoardError>> {
        Box::pin(async move {
            self.metrics.table_call("UpdateItem");
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(self.key(LEASE, key)))
                .update_expression(
                    "SET #h = :me, #u = :until, #v = if_not_exists(#v, :zero), #e = :expires",
                )
                .condition_expression("attribute_not_exists(#h) OR #u < :now OR #h = :me")
                .expression_attribute_names("#h", ATTR_HOLDER)
                .expression_attribute_names("#u", ATTR_UNTIL)
                .expression_attribute_names("#v", ATTR_VERSION)
                .expression_attribute_names("#e", ATTR_EXPIRES)
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":until", n(until_ms))
                .expression_attribute_values(":now", n(now_ms))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":expires", n(until_ms / 1000 + KEEP.as_secs()))
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            match sent {
                Ok(out) => Ok(Claim::Mine(out.attributes.as_ref().map(lease).unwrap_or(
                    Lease {
                        holder: me.to_string(),
                        until_ms,
                        version: 0,
                    },
                ))),
                Err(e) => match e.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(_)) => Ok(Claim::Taken),
                    _ => Err(failed("UpdateItem", &self.table, e)),
                },
            }
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
    ) -> BoxFuture<'a, Result<(), BoardError>> {
        Box::pin(async move {
            self.metrics.table_call("UpdateItem");
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(self.key(LEASE, key)))
                .update_expression("SET #u = :zero")
                .condition_expression("#h = :me")
                .expression_attribute_names("#h", ATTR_HOLDER)
                .expression_attribute_names("#u", ATTR_UNTIL)
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":zero", n(0))
                .send()
                .await;
            match sent {
                Ok(_) => Ok(()),
                Err(e) => match e.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(_)) => Ok(()),
                    _ => Err(failed("UpdateItem", &self.table, e)),
                },
            }
        })
    }

    fn publish<'a>(
        &'a self,
        key: &'a CloudMapKey,
        me: &'a str,
        prev: u64,
        answer: &'a Answer,
    ) -> BoxFuture<'a, Result<Published, BoardError>> {
        Box::pin(async move {
            let build = |e: aws_sdk_dynamodb::error::BuildError| {
                unavailable("TransactWriteItems", &e.to_string())
            };
            let expires = n(answer.fetched_ms / 1000 + KEEP.as_secs());
            let lease = Update::builder()
                .table_name(&self.table)
                .set_key(Some(self.key(LEASE, key)))
                .update_expression("SET #v = :next")
                .condition_expression("#h = :me AND #v = :prev")
                .expression_attribute_names("#h", ATTR_HOLDER)
                .expression_attribute_names("#v", ATTR_VERSION)
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":prev", n(prev))
                .expression_attribute_values(":next", n(answer.version))
                .build()
                .map_err(build)?;
            let mut put = Put::builder()
                .table_name(&self.table)
                .item(PK, s(ENDPOINTS))
                .item(SK, s(&self.sk(key)))
                .item(ATTR_VERSION, n(answer.version))
                .item(ATTR_FETCHED, n(answer.fetched_ms))
                .item(ATTR_HOLDER, s(me))
                .item(ATTR_EXPIRES, expires);
            if let Some(i) = &answer.instances {
                put = put.item(ATTR_INSTANCES, s(&encode(i)));
            }
            let put = put.build().map_err(build)?;
            self.metrics.table_call("TransactWriteItems");
            let sent = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(lease).build())
                .transact_items(TransactWriteItem::builder().put(put).build())
                .send()
                .await;
            match sent {
                Ok(_) => Ok(Published::Done),
                Err(e) => {
                    if let Some(TransactWriteItemsError::TransactionCanceledException(tc)) =
                        e.as_service_error()
                    {
                        let codes: Vec<&str> = tc
                            .cancellation_reasons()
                            .iter()
                            .filter_map(|r| r.code())
                            .collect();
                        if codes.first() == Some(&"ConditionalCheckFailed") {
                            return Ok(Published::Lost);
                        }
                        if codes.contains(&"TransactionConflict") || codes.is_empty() {
                            return Err(BoardError {
                                busy: true,
                                message: "TransactWriteItems: TransactionConflict".into(),
                            });
                        }
                    }
                    Err(failed("TransactWriteItems", &self.table, e))
                }
            }
        })
    }

    fn answers<'a>(
        &'a self,
        keys: &'a [CloudMapKey],
    ) -> BoxFuture<'a, Result<Vec<Option<Answer>>, BoardError>> {
        Box::pin(async move {
            let items = self.batch_get(ENDPOINTS, keys).await?;
            Ok(items.iter().map(|i| i.as_ref().and_then(answer)).collect())
        })
    }
}

/// The sort key of `key`'s items under a health filter: the same on every agent.
pub fn sort_key(key: &CloudMapKey, health: &str) -> String {
    let attrs: Vec<[&str; 2]> = key
        .attributes
        .iter()
        .map(|(k, v)| [k.as_str(), v.as_str()])
        .collect();
    let text = json!([key.namespace, key.service, attrs, health]).to_string();
    if text.len() <= MAX_SK {
        return text;
    }
    let digest = Sha256::digest(text.as_bytes());
    format!("sha256:{}", hex::encode(digest))
}

fn number(item: &Item, attr: &str) -> u64 {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().unwrap_or(0),
        _ => 0,
    }
}

fn lease(item: &Item) -> Lease {
    Lease {
        holder: match item.get(ATTR_HOLDER) {
            Some(AttributeValue::S(h)) => h.clone(),
            _ => String::new(),
        },
        until_ms: number(item, ATTR_UNTIL),
        version: number(item, ATTR_VERSION),
    }
}

/// An answer item; `None` for one that cannot be read (written by something else): it is read
/// again next round and the endpoints already served stay.
fn answer(item: &Item) -> Option<Answer> {
    let instances = match item.get(ATTR_INSTANCES) {
        None => None,
        Some(AttributeValue::S(text)) => Some(decode(text)?),
        Some(_) => return None,
    };
    Some(Answer {
        version: number(item, ATTR_VERSION),
        instances,
        fetched_ms: number(item, ATTR_FETCHED),
    })
}

fn encode(instances: &[Instance]) -> String {
    let list: Vec<Value> = instances
        .iter()
        .map(|i| {
            let mut o = json!({"id": i.id});
            if let Some(a) = i.ipv4 {
                o["ipv4"] = json!(a.to_string());
            }
            if let Some(a) = i.ipv6 {
                o["ipv6"] = json!(a.to_string());
            }
            o
        })
        .collect();
    Value::Array(list).to_string()
}

fn decode(text: &str) -> Option<Arc<[Instance]>> {
    let list: Vec<Value> = serde_json::from_str(text).ok()?;
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        let addr = |k: &str| v.get(k).and_then(Value::as_str);
        out.push(Instance {
            id: v.get("id")?.as_str()?.to_string(),
            ipv4: match addr("ipv4") {
                Some(a) => Some(a.parse::<Ipv4Addr>().ok()?),
                None => None,
            },
            ipv6: match addr("ipv6") {
                Some(a) => Some(a.parse::<Ipv6Addr>().ok()?),
                None => None,
            },
        });
    }
    out.sort();
    Some(out.into())
}

fn unavailable(op: &str, detail: &str) -> BoardError {
    BoardError {
        busy: false,
        message: format!("{op}: {detail}"),
    }
}

fn failed<E>(
    op: &str,
    table: &str,
    e: aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> BoardError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let busy = matches!(
        e.code(),
        Some("TransactionConflictException" | "TransactionInProgressException")
    );
    BoardError {
        busy,
        message: table::classify(table, op, e).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(attrs: &[(&str, &str)]) -> CloudMapKey {
        CloudMapKey {
            namespace: "ns".into(),
            service: "back".into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn sort_keys_are_canonical_and_fit_a_sort_key() {
        assert_eq!(
            sort_key(&key(&[]), "HEALTHY"),
            r#"["ns","back",[],"HEALTHY"]"#
        );
        assert_eq!(
            sort_key(&key(&[("stage", "blue"), ("az", "a")]), "ALL"),
            r#"["ns","back",[["az","a"],["stage","blue"]],"ALL"]"#
        );
        let long = "v".repeat(2000);
        let sk = sort_key(&key(&[("k", &long)]), "HEALTHY");
        assert!(sk.starts_with("sha256:") && sk.len() == 71, "{sk}");
        assert_ne!(sk, sort_key(&key(&[("k", &long[1..])]), "HEALTHY"));
    }

    #[test]
    fn instances_round_trip_through_their_json() {
        let list: Arc<[Instance]> = vec![
            Instance {
                id: "a".into(),
                ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ipv6: Some("fd00::1".parse().unwrap()),
            },
            Instance {
                id: "b".into(),
                ipv4: None,
                ipv6: Some("fd00::2".parse().unwrap()),
            },
        ]
        .into();
        assert_eq!(decode(&encode(&list)), Some(list));
        assert_eq!(decode(r#"[{"id":"x","ipv4":"nope"}]"#), None);
    }
}
