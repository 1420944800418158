//! The table itself: the SDK client, `init-store`, the items' attributes, and the reads the store
//! makes (the generation item, change items, resources), with DynamoDB's errors sorted into
//! "retry later" and "will never succeed".

use std::collections::HashMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_get_items::TransactGetItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Get, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TransactGetItem,
};
use aws_smithy_http_client::tls;

use super::super::items::{self, Change};
use super::super::{Error, StoreArgs};
use super::{
    ATTR_CHANGES, ATTR_EXPIRES, ATTR_GENERATION, ATTR_TABLE_ID, Dynamo, GENERATION_SK, META, PK,
    SK, change_sk, inc, jittered,
};

/// Tries of a serializable read that meets a transaction in flight before giving up this round.
const BUSY_TRIES: u32 = 4;
/// First pause after such a conflict.
const BUSY_PAUSE: Duration = Duration::from_millis(10);

/// Error codes DynamoDB (and the SDK) give for a request that may succeed later unchanged.
const RETRYABLE: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    "TransactionConflictException",
    "LimitExceededException",
    "ExpiredTokenException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// The generation item: how many writes the table has committed, and which table it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) generation: u64,
    /// Random, written by `init-store` (or by the first write to a table made before ids): a
    /// table deleted and created again gets another, whatever its generation.
    pub(super) table_id: Option<String>,
}

/// One change item: what the write that made `generation` changed.
#[derive(Debug)]
pub(super) struct Logged {
    pub(super) generation: u64,
    pub(super) changes: Vec<Change>,
    pub(super) table_id: Option<String>,
}

impl Logged {
    /// Whether it belongs to another table than `id` (only items that carry an id can tell).
    pub(super) fn foreign(&self, id: Option<&str>) -> bool {
        self.table_id.is_some() && self.table_id.as_deref() != id
    }
}

/// What a serializable read of one item found.
pub(super) enum Probe<T> {
    Found(T),
    Absent,
    /// A transaction in flight holds the item (DynamoDB cancels the read): try again later.
    Busy,
}

pub(super) type Item = HashMap<String, AttributeValue>;

impl Dynamo {
    /// The generation item, strongly consistent (one read unit).
    pub(super) async fn read_meta(&self) -> Result<Meta, Error> {
        inc(&self.metrics.get_item);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, s(META))
            .key(SK, s(GENERATION_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.failed("GetItem", e))?;
        self.up();
        self.meta_of(out.item())
    }

    /// The generation item read in a `TransactGetItems`, which DynamoDB serialises with every
    /// write transaction (each of ours writes this item): a transaction whose writes a read
    /// before this one saw has a generation at most the one returned. `None` while transactions
    /// in flight keep cancelling the read.
    pub(super) async fn read_meta_serializable(&self) -> Result<Option<Meta>, Error> {
        match self.get_serializable(META, GENERATION_SK).await? {
            Probe::Found(item) => self.meta_of(Some(&item)).map(Some),
            Probe::Absent => self.meta_of(None).map(Some),
            Probe::Busy => Ok(None),
        }
    }

    /// The change item of generation `g`, read serializably: absent means time to live deleted
    /// it (every change item is written in the transaction that makes its generation).
    pub(super) async fn probe_change(&self, g: u64) -> Result<Probe<Logged>, Error> {
        Ok(
            match self.get_serializable(super::CHANGE, &change_sk(g)).await? {
                Probe::Found(item) => Probe::Found(self.logged(&item)?),
                Probe::Absent => Probe::Absent,
                Probe::Busy => Probe::Busy,
            },
        )
    }

    async fn get_serializable(&self, pk: &str, sk: &str) -> Result<Probe<Item>, Error> {
        let keys = [(pk.to_string(), sk.to_string())];
        Ok(match self.get_all_serializable(&keys).await? {
            Probe::Found(mut items) => match items.pop().flatten() {
                Some(item) => Probe::Found(item),
                None => Probe::Absent,
            },
            Probe::Absent => Probe::Absent,
            Probe::Busy => Probe::Busy,
        })
    }

    /// Whether no transaction is applying any of these items (read serializably, in calls of
    /// at most 100 items).
    pub(super) async fn applied(&self, keys: &[(String, String)]) -> Result<bool, Error> {
        for chunk in keys.chunks(100) {
            if let Probe::Busy = self.get_all_serializable(chunk).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One `TransactGetItems` of `keys` ((pk, sk), at most 100), retried a few times while a
    /// transaction in flight holds one of them.
    async fn get_all_serializable(
        &self,
        keys: &[(String, String)],
    ) -> Result<Probe<Vec<Option<Item>>>, Error> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| Error::Config(e.to_string());
        let mut gets = Vec::with_capacity(keys.len());
        for (pk, sk) in keys {
            let get = Get::builder()
                .table_name(&self.table)
                .key(PK, s(pk))
                .key(SK, s(sk))
                .build()
                .map_err(build)?;
            gets.push(TransactGetItem::builder().get(get).build());
        }
        let mut pause = BUSY_PAUSE;
        for _ in 0..BUSY_TRIES {
            inc(&self.metrics.transact_get);
            let sent = self
                .client
                .transact_get_items()
                .set_transact_items(Some(gets.clone()))
                .send()
                .await;
            match sent {
                Ok(out) => {
                    self.up();
                    return Ok(Probe::Found(
                        out.responses().iter().map(|r| r.item().cloned()).collect(),
                    ));
                }
                Err(e) if busy(&e) => {
                    self.up();
                    tokio::time::sleep(jittered(pause)).await;
                    pause *= 2;
                }
                Err(e) => return Err(self.failed("TransactGetItems", e)),
            }
        }
        Ok(Probe::Busy)
    }

    fn meta_of(&self, item: Option<&Item>) -> Result<Meta, Error> {
        Ok(match item {
            None => Meta {
                generation: 0,
                table_id: None,
            },
            Some(item) => Meta {
                generation: number(item, ATTR_GENERATION, &self.table)?,
                table_id: optional_string(item, ATTR_TABLE_ID),
            },
        })
    }

    pub(super) fn logged(&self, item: &Item) -> Result<Logged, Error> {
        let generation = number(item, ATTR_GENERATION, &self.table)?;
        let text = string(item, ATTR_CHANGES, &self.table)?;
        let changes: Vec<Change> = serde_json::from_str(text).map_err(|source| {
            self.item(items::ItemError::BadData {
                key: change_sk(generation),
                source,
            })
        })?;
        Ok(Logged {
            generation,
            changes,
            table_id: optional_string(item, ATTR_TABLE_ID),
        })
    }

    /// One page of partition `pk` in `range`, consistently; then where the next page starts.
    async fn query_page(
        &self,
        pk: &str,
        range: Range<'_>,
        start: Option<Item>,
    ) -> Result<(Vec<Item>, Option<Item>), Error> {
        inc(&self.metrics.query);
        let mut q = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":pk", s(pk))
            .set_exclusive_start_key(start);
        q = match range {
            Range::All => q.key_condition_expression("#pk = :pk"),
            Range::After(sk) => q
                .key_condition_expression("#pk = :pk AND #sk > :sk")
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":sk", s(sk)),
        };
        let page = q.send().await.map_err(|e| self.failed("Query", e))?;
        self.up();
        let next = page.last_evaluated_key.filter(|k| !k.is_empty());
        Ok((page.items.unwrap_or_default(), next))
    }

    /// Every item of partition `pk` in `range`, page by page.
    pub(super) async fn query(&self, pk: &str, range: Range<'_>) -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let (items, next) = self.query_page(pk, range, start).await?;
            out.extend(items);
            match next {
                Some(k) => start = Some(k),
                None => return Ok(out),
            }
        }
    }
}

/// Which sort keys of a partition to read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Range<'a> {
    All,
    After(&'a str),
}

/// Whether a `TransactGetItems` was cancelled by a write transaction in flight on its item.
fn busy<R>(e: &SdkError<TransactGetItemsError, R>) -> bool {
    match e.as_service_error() {
        Some(TransactGetItemsError::TransactionCanceledException(tc)) => {
            tc.cancellation_reasons().is_empty()
                || tc
                    .cancellation_reasons()
                    .iter()
                    .any(|r| r.code() == Some("TransactionConflict"))
        }
        Some(other) => other.code() == Some("TransactionInProgressException"),
        None => false,
    }
}

/// What a failed call means: the table is missing; the request may succeed later (transport
/// failures, timeouts, throttling, DynamoDB's own 5xx); or it never will as sent (validation,
/// access, a malformed request), which callers must not answer as "retry".
pub(super) fn classify<E>(table: &str, op: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let table = table.to_string();
    let status = e.raw_response().map(|r| r.status().as_u16());
    match e.code() {
        Some("ResourceNotFoundException") => Error::NoTable { table },
        Some(code) if !RETRYABLE.contains(&code) && status.is_some_and(|s| s < 500) => {
            Error::Rejected {
                table,
                detail: format!("{op}: {code}: {}", e.message().unwrap_or_default()),
            }
        }
        Some(code) => Error::Unavailable {
            table,
            detail: format!("{op}: {code}: {}", e.message().unwrap_or_default()),
        },
        None => Error::Unavailable {
            table,
            detail: format!("{op}: {}", DisplayErrorContext(&e)),
        },
    }
}

pub(in crate::store) fn table_name(args: &StoreArgs) -> Result<String, Error> {
    args.dynamodb_table
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Error::Config("--dynamodb-table (TRELLIS_DYNAMODB_TABLE) is required".into())
        })
}

/// An SDK client: region and credentials from `aws-config`'s default chain (the `--region` of the
/// agent when the chain has no region), short timeouts so a dead endpoint fails a write quickly,
/// the SDK's standard retries (exponential backoff with jitter on throttling).
pub(in crate::store) async fn client(args: &StoreArgs, region: &str) -> Client {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https)
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(5))
                .build(),
        );
    if let Some(url) = &args.dynamodb_endpoint {
        loader = loader.endpoint_url(url);
    }
    let mut config = loader.load().await;
    if config.region().is_none() {
        config = config
            .into_builder()
            .region(Region::new(region.to_string()))
            .build();
    }
    Client::new(&config)
}

/// Creates the table (on-demand capacity) if it does not exist, waits until it is active, turns
/// on time to live for change items, and gives the table its id (a new table, or one made
/// before ids).
pub(in crate::store) async fn create_table(
    args: &StoreArgs,
    region: &str,
) -> Result<String, Error> {
    let table = table_name(args)?;
    let client = client(args, region).await;
    let build = |e: aws_sdk_dynamodb::error::BuildError| Error::Config(e.to_string());
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build)
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build)
    };
    let created = match client
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr(PK)?)
        .attribute_definitions(attr(SK)?)
        .key_schema(key(PK, KeyType::Hash)?)
        .key_schema(key(SK, KeyType::Range)?)
        .send()
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Some("ResourceInUseException") => false,
        Err(e) => return Err(classify(&table, "CreateTable", e)),
    };
    let mut active = false;
    for _ in 0..120 {
        let out = client
            .describe_table()
            .table_name(&table)
            .send()
            .await
            .map_err(|e| classify(&table, "DescribeTable", e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            active = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !active {
        return Err(Error::Unavailable {
            table,
            detail: "the table did not become ACTIVE within two minutes".into(),
        });
    }
    let ttl = TimeToLiveSpecification::builder()
        .attribute_name(ATTR_EXPIRES)
        .enabled(true)
        .build()
        .map_err(build)?;
    match client
        .update_time_to_live()
        .table_name(&table)
        .time_to_live_specification(ttl)
        .send()
        .await
    {
        Ok(_) => {}
        // Already enabled (a second init-store) is fine.
        Err(e) if e.code() == Some("ValidationException") => {}
        Err(e) => return Err(classify(&table, "UpdateTimeToLive", e)),
    }
    // The id, unless the table has one: on the generation item, whether or not it exists yet.
    let id = uuid::Uuid::new_v4().to_string();
    let named = client
        .update_item()
        .table_name(&table)
        .key(PK, s(META))
        .key(SK, s(GENERATION_SK))
        .update_expression("SET #id = :id, #g = if_not_exists(#g, :zero)")
        .condition_expression("attribute_not_exists(#id)")
        .expression_attribute_names("#id", ATTR_TABLE_ID)
        .expression_attribute_names("#g", ATTR_GENERATION)
        .expression_attribute_values(":id", s(&id))
        .expression_attribute_values(":zero", n(0))
        .send()
        .await;
    let id = match named {
        Ok(_) => id,
        Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
            let out = client
                .get_item()
                .table_name(&table)
                .key(PK, s(META))
                .key(SK, s(GENERATION_SK))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| classify(&table, "GetItem", e))?;
            out.item()
                .and_then(|i| optional_string(i, ATTR_TABLE_ID))
                .unwrap_or_default()
        }
        Err(e) => return Err(classify(&table, "UpdateItem", e)),
    };
    Ok(format!(
        "DynamoDB table {table} {} (keys pk/sk, on-demand capacity, time to live on {ATTR_EXPIRES}, table id {id})",
        if created { "created" } else { "already exists" }
    ))
}

pub(super) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

pub(super) fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn string<'a>(item: &'a Item, attr: &str, table: &str) -> Result<&'a str, Error> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(Error::Config(format!(
            "table {table} holds an item without string attribute {attr:?}: is it a Trellis table?"
        ))),
    }
}

fn optional_string(item: &Item, attr: &str) -> Option<String> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

pub(super) fn number(item: &Item, attr: &str, table: &str) -> Result<u64, Error> {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| {
            Error::Config(format!(
                "table {table}: attribute {attr:?} is {v:?}, not a generation"
            ))
        }),
        _ => Err(Error::Config(format!(
            "table {table} holds an item without number attribute {attr:?}: is it a Trellis table?"
        ))),
    }
}
