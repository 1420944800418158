//! The shared backend: every agent of a cluster keeps the whole state in memory, as the embedded
//! store does, and DynamoDB orders and holds the writes. No consensus of our own: DynamoDB's
//! transactions decide who wins.
//!
//! Table layout (partition key `pk`, sort key `sk`, both strings; see README "Many instances"):
//! - `meta` / `generation`: attribute `generation` (number), the number of committed writes.
//! - `resource` / `mesh/M[/KIND/N[/KIND/N]]`: one item per App Mesh resource, attribute `data` (the
//!   resource's JSON: metadata, spec, tags, clientToken) and `generation` (the write that made it).
//! - `change` / zero-padded generation: what that write changed, attribute `changes` (JSON list of
//!   `[key, data or null]`), `generation`, and `expiresAt` for DynamoDB's time to live (a day).
//!
//! A write runs the API's closure on the agent's current state, diffs it, and commits one
//! `TransactWriteItems`: the generation item updated on the condition that it still holds the
//! generation the closure saw, the change item, and the resource items. Any two writes therefore
//! serialise, whichever agents they come through; the loser catches up and re-runs its closure on
//! the fresh state, so uniqueness, versions, references, quotas and `clientToken` idempotency
//! (stored in the resource item) hold exactly as on one agent. A closure that fails or changes
//! nothing is confirmed against a consistent read of the generation, so an error is never the
//! product of a stale state. One generation for all meshes keeps cross-mesh rules (the mesh quota)
//! sound at the price of one write at a time per table: tens of writes per second, far above
//! App Mesh's own API rate for mutations.
//!
//! Each agent polls the generation item with a strongly consistent `GetItem` and, when it moved,
//! replays the change items after its own generation (or reloads everything if the log has a
//! gap). Every agent applies the same changes to the same state, so all publish the same `State`
//! for a generation, and Envoy resource versions (content hashes) agree across agents. When
//! DynamoDB fails, agents keep publishing the last good state, writes fail with a retryable error,
//! and the poller backs off with jitter until the table answers again.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TransactWriteItem, Update,
};
use aws_smithy_http_client::tls;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::items::{self, Change};
use super::{Error, StoreArgs, embedded};
use trellis_model::State;

const PK: &str = "pk";
const SK: &str = "sk";
const META: &str = "meta";
const GENERATION_SK: &str = "generation";
const RESOURCE: &str = "resource";
const CHANGE: &str = "change";
const ATTR_GENERATION: &str = "generation";
const ATTR_DATA: &str = "data";
const ATTR_CHANGES: &str = "changes";
const ATTR_EXPIRES: &str = "expiresAt";
/// How long change items stay: an agent away for longer reloads everything.
const CHANGE_TTL: Duration = Duration::from_secs(24 * 3600);
/// DynamoDB items hold at most 400 KB; keep room for keys and attribute names.
const MAX_ITEM_BYTES: usize = 390_000;
/// A transaction holds at most 100 actions: the generation, the change, and the resources.
const MAX_RESOURCES_PER_WRITE: usize = 98;
/// Lost races in a row before a write gives up with a retryable error.
const MAX_CONFLICTS: u32 = 25;
/// Longest pause between polls while the table fails.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Full reloads raced by writes in a row before giving up.
const MAX_RELOADS: u32 = 8;

/// DynamoDB calls and their outcomes, for `/metrics` and the store bench.
#[derive(Debug, Default)]
struct Metrics {
    get_item: AtomicU64,
    query: AtomicU64,
    transact: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
    reloads: AtomicU64,
    /// 1 while the last call succeeded.
    up: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How a commit failed: lost the race (catch up and re-run) or the store failed.
enum Fail {
    Conflict,
    Store(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Store(e)
    }
}

#[derive(Debug)]
pub(super) struct Dynamo {
    client: Client,
    table: String,
    /// Where a serving agent keeps the last good state: (directory, file name).
    cache: Option<(PathBuf, String)>,
    poll: Duration,
    /// The runtime that drives the SDK when a synchronous `write` waits for it.
    handle: tokio::runtime::Handle,
    /// Serialises this agent's writes and catch-ups: held across a commit so a catch-up never
    /// interleaves with it.
    lock: Mutex<()>,
    metrics: Metrics,
}

impl Dynamo {
    /// Connects and loads the whole state (consistent reads); with a `cache` directory, falls back
    /// to the last good state kept there when DynamoDB does not answer.
    pub(super) async fn connect(
        args: &StoreArgs,
        region: &str,
        cache: Option<&Path>,
    ) -> Result<(Self, State), Error> {
        let table = table_name(args)?;
        if let Some(dir) = cache {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let store = Dynamo {
            client: client(args, region).await,
            cache: cache.map(|dir| (dir.to_path_buf(), format!("dynamodb-{table}.json"))),
            table,
            poll: Duration::from_millis(args.dynamodb_poll_ms.max(10)),
            handle: tokio::runtime::Handle::current(),
            lock: Mutex::new(()),
            metrics: Metrics::default(),
        };
        let state = match (store.full_load().await, &store.cache) {
            (Ok(s), _) => s,
            (Err(e), Some((dir, file))) if e.is_retryable() => {
                match embedded::load_file(dir, file) {
                    Ok(Some(s)) => {
                        warn!(table = %store.table, error = %e, generation = s.generation,
                            "DynamoDB does not answer; serving the last good state kept on disk");
                        s
                    }
                    _ => return Err(e),
                }
            }
            (Err(e), _) => return Err(e),
        };
        info!(table = %store.table, generation = state.generation, meshes = state.meshes.len(),
            "loaded the shared store from DynamoDB");
        Ok((store, state))
    }

    /// See [`super::Store::write`]. Runs the closure against the newest state this agent has,
    /// commits conditionally, and on a lost race catches up and runs it again.
    pub(super) fn write<T, E>(
        &self,
        tx: &watch::Sender<Arc<State>>,
        mut f: impl FnMut(&mut State) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error>,
    {
        let run = async {
            let _guard = self.lock.lock().await;
            let mut conflicts = 0u32;
            loop {
                let current = tx.borrow().clone();
                let mut next = (*current).clone();
                let out = f(&mut next);
                let changes = match &out {
                    Ok(_) => items::diff(&current, &next).map_err(|e| E::from(self.item(e)))?,
                    Err(_) => Vec::new(),
                };
                if changes.is_empty() {
                    // A rejection or a no-op must hold on the newest state, not a stale one.
                    let g = self.read_generation().await.map_err(E::from)?;
                    if g == current.generation {
                        return out;
                    }
                    self.sync(tx, Some(g)).await.map_err(E::from)?;
                    continue;
                }
                match self.commit(current.generation, &changes).await {
                    Ok(()) => {
                        let mut s = (*current).clone();
                        items::apply(&mut s, &changes).map_err(|e| E::from(self.item(e)))?;
                        s.generation = current.generation + 1;
                        tx.send_if_modified(|cur| {
                            let behind = cur.generation == current.generation;
                            if behind {
                                *cur = Arc::new(s);
                            }
                            behind
                        });
                        return out;
                    }
                    Err(Fail::Conflict) => {
                        conflicts += 1;
                        inc(&self.metrics.conflicts);
                        if conflicts >= MAX_CONFLICTS {
                            return Err(E::from(Error::Contention {
                                table: self.table.clone(),
                            }));
                        }
                        if conflicts > 2 {
                            tokio::time::sleep(jittered(Duration::from_millis(
                                5 << conflicts.min(6),
                            )))
                            .await;
                        }
                        self.sync(tx, None).await.map_err(E::from)?;
                    }
                    Err(Fail::Store(e)) => return Err(E::from(e)),
                }
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.handle.block_on(run))
        } else {
            self.handle.block_on(run)
        }
    }

    /// Polls the generation item until `cancel`, applying what other agents committed, and keeps
    /// the last good state on disk.
    pub(super) async fn run(&self, tx: &watch::Sender<Arc<State>>, cancel: CancellationToken) {
        tokio::join!(
            self.poll_loop(tx, cancel.clone()),
            self.keep_cache(tx, cancel)
        );
    }

    /// Writes every published state to the cache file (only the newest, if writes fall behind).
    async fn keep_cache(&self, tx: &watch::Sender<Arc<State>>, cancel: CancellationToken) {
        let Some((dir, file)) = self.cache.clone() else {
            return;
        };
        let mut rx = tx.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            let (d, f) = (dir.clone(), file.clone());
            match tokio::task::spawn_blocking(move || embedded::persist_file(&d, &f, &state)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot keep the last good state on disk"),
                Err(e) => warn!(error = %e, "cannot keep the last good state on disk"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn poll_loop(&self, tx: &watch::Sender<Arc<State>>, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let wait = if failures == 0 {
                jittered(self.poll)
            } else {
                jittered(
                    self.poll
                        .saturating_mul(1 << failures.min(5))
                        .min(MAX_BACKOFF),
                )
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let res = async {
                let g = self.read_generation().await?;
                if g != tx.borrow().generation {
                    let _guard = self.lock.lock().await;
                    self.sync(tx, Some(g)).await?;
                }
                Ok::<_, Error>(())
            }
            .await;
            match res {
                Ok(()) => {
                    if failures > 0 {
                        info!(table = %self.table, failures, "DynamoDB answers again; in step");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(table = %self.table, failures, error = %e,
                            "cannot read the shared store; serving the last good state");
                    }
                }
            }
        }
    }

    /// Brings the published state to the table's generation (`seen` if the caller just read it):
    /// replays the change log, or reloads everything when the log has a gap or the table went
    /// backwards (recreated). Callers hold `lock`.
    async fn sync(&self, tx: &watch::Sender<Arc<State>>, seen: Option<u64>) -> Result<(), Error> {
        let local = tx.borrow().clone();
        let g = match seen {
            // Read before the lock: a write of this agent may have moved past it since.
            Some(g) if g >= local.generation => g,
            _ => self.read_generation().await?,
        };
        if g == local.generation {
            return Ok(());
        }
        let next = if g > local.generation {
            match self.changes_since(local.generation).await? {
                Some(log) => {
                    let mut s = (*local).clone();
                    match replay(&mut s, log) {
                        Ok(()) => s,
                        Err(e) => {
                            warn!(table = %self.table, error = %e, "cannot replay changes; reloading");
                            self.full_load().await?
                        }
                    }
                }
                None => self.full_load().await?,
            }
        } else {
            warn!(table = %self.table, local = local.generation, table_generation = g,
                "the table's generation went backwards (recreated?); reloading");
            self.full_load().await?
        };
        if next.generation > local.generation || g < local.generation {
            tx.send_replace(Arc::new(next));
        }
        Ok(())
    }

    /// The whole state, read consistently: resources, then whatever changed during the read.
    async fn full_load(&self) -> Result<State, Error> {
        inc(&self.metrics.reloads);
        for _ in 0..MAX_RELOADS {
            let before = self.read_generation().await?;
            let rows = self.query(RESOURCE, None).await?;
            let mut map = BTreeMap::new();
            for row in &rows {
                map.insert(
                    string(row, SK, &self.table)?.to_string(),
                    string(row, ATTR_DATA, &self.table)?.to_string(),
                );
            }
            // A read that overlapped writes can miss a mesh whose children it saw; the replay
            // below fixes every key those writes touched, so only a hard error is fatal.
            let mut state = match items::from_items(&map) {
                Ok(s) => s,
                Err(items::ItemError::Orphan(_)) => continue,
                Err(e) => return Err(self.item(e)),
            };
            state.generation = before;
            let after = self.read_generation().await?;
            if after == before {
                return Ok(state);
            }
            // Every item was read at some generation in [before, after]; replaying the changes
            // after `before` sets each key they touched to its newest value, the rest never moved.
            if let Some(log) = self.changes_since(before).await?
                && replay(&mut state, log).is_ok()
                && state.generation >= after
            {
                return Ok(state);
            }
        }
        Err(Error::Contention {
            table: self.table.clone(),
        })
    }

    /// The change items after `from`, in order; `None` when some are gone (expired).
    async fn changes_since(&self, from: u64) -> Result<Option<Vec<(u64, Vec<Change>)>>, Error> {
        let rows = self.query(CHANGE, Some(change_sk(from))).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let g = number(row, ATTR_GENERATION, &self.table)?;
            if g != from + 1 + i as u64 {
                return Ok(None);
            }
            let text = string(row, ATTR_CHANGES, &self.table)?;
            let changes: Vec<Change> = serde_json::from_str(text).map_err(|source| {
                self.item(items::ItemError::BadData {
                    key: change_sk(g),
                    source,
                })
            })?;
            out.push((g, changes));
        }
        Ok(Some(out))
    }

    async fn read_generation(&self) -> Result<u64, Error> {
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
        self.metrics.up.store(1, Ordering::Relaxed);
        match out.item() {
            None => Ok(0),
            Some(item) => number(item, ATTR_GENERATION, &self.table),
        }
    }

    /// Every item of partition `pk` (after sort key `after`), consistently, page by page.
    async fn query(
        &self,
        pk: &str,
        after: Option<String>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, Error> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            inc(&self.metrics.query);
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(pk))
                .set_exclusive_start_key(start);
            q = match &after {
                None => q.key_condition_expression("#pk = :pk"),
                Some(a) => q
                    .key_condition_expression("#pk = :pk AND #sk > :after")
                    .expression_attribute_names("#sk", SK)
                    .expression_attribute_values(":after", s(a)),
            };
            let page = q.send().await.map_err(|e| self.failed("Query", e))?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// One transaction: generation `cur` → `cur + 1` (the condition), the change item, the
    /// resource items.
    async fn commit(&self, cur: u64, changes: &[Change]) -> Result<(), Fail> {
        if changes.len() > MAX_RESOURCES_PER_WRITE {
            return Err(Fail::Store(Error::Config(format!(
                "one write changes {} resources; a DynamoDB transaction holds at most {MAX_RESOURCES_PER_WRITE}",
                changes.len()
            ))));
        }
        let next = cur + 1;
        let log = serde_json::to_string(changes).map_err(Error::Encode)?;
        if log.len() > MAX_ITEM_BYTES {
            return Err(Fail::Store(Error::TooLarge {
                bytes: log.len(),
                max: MAX_ITEM_BYTES,
            }));
        }
        let build = |e: aws_sdk_dynamodb::error::BuildError| Error::Config(e.to_string());
        let condition = if cur == 0 {
            "attribute_not_exists(#g) OR #g = :cur"
        } else {
            "#g = :cur"
        };
        let mut ops = vec![
            TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&self.table)
                        .key(PK, s(META))
                        .key(SK, s(GENERATION_SK))
                        .update_expression("SET #g = :next")
                        .condition_expression(condition)
                        .expression_attribute_names("#g", ATTR_GENERATION)
                        .expression_attribute_values(":cur", n(cur))
                        .expression_attribute_values(":next", n(next))
                        .build()
                        .map_err(build)?,
                )
                .build(),
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .item(PK, s(CHANGE))
                        .item(SK, s(&change_sk(next)))
                        .item(ATTR_GENERATION, n(next))
                        .item(ATTR_CHANGES, s(&log))
                        .item(ATTR_EXPIRES, n(epoch_secs() + CHANGE_TTL.as_secs()))
                        .build()
                        .map_err(build)?,
                )
                .build(),
        ];
        for (key, data) in changes {
            let op = match data {
                Some(d) => TransactWriteItem::builder().put(
                    Put::builder()
                        .table_name(&self.table)
                        .item(PK, s(RESOURCE))
                        .item(SK, s(key))
                        .item(ATTR_DATA, s(d))
                        .item(ATTR_GENERATION, n(next))
                        .build()
                        .map_err(build)?,
                ),
                None => TransactWriteItem::builder().delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .key(PK, s(RESOURCE))
                        .key(SK, s(key))
                        .build()
                        .map_err(build)?,
                ),
            };
            ops.push(op.build());
        }
        inc(&self.metrics.transact);
        let sent = self
            .client
            .transact_write_items()
            .set_transact_items(Some(ops))
            // The SDK reuses it on its own retries: a commit whose answer was lost is not redone.
            .client_request_token(uuid::Uuid::new_v4().to_string())
            .send()
            .await;
        match sent {
            Ok(_) => {
                self.metrics.up.store(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if let Some(TransactWriteItemsError::TransactionCanceledException(tc)) =
                    e.as_service_error()
                {
                    let lost = tc.cancellation_reasons().iter().any(|r| {
                        matches!(
                            r.code(),
                            Some("ConditionalCheckFailed" | "TransactionConflict")
                        )
                    });
                    // moto and older services may omit the reasons; the only condition is ours.
                    if lost || tc.cancellation_reasons().is_empty() {
                        return Err(Fail::Conflict);
                    }
                }
                Err(Fail::Store(self.failed("TransactWriteItems", e)))
            }
        }
    }

    fn failed<E, R>(&self, op: &str, e: SdkError<E, R>) -> Error
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        inc(&self.metrics.errors);
        self.metrics.up.store(0, Ordering::Relaxed);
        classify(&self.table, op, e)
    }

    fn item(&self, source: items::ItemError) -> Error {
        Error::Item {
            table: self.table.clone(),
            source,
        }
    }

    /// Prometheus text: DynamoDB calls, errors, lost races, and where this agent stands.
    pub(super) fn metrics_text(&self, generation: u64) -> String {
        let m = &self.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP trellis_store_dynamodb_requests_total DynamoDB calls by operation.\n\
             # TYPE trellis_store_dynamodb_requests_total counter\n\
             trellis_store_dynamodb_requests_total{{operation=\"GetItem\"}} {}\n\
             trellis_store_dynamodb_requests_total{{operation=\"Query\"}} {}\n\
             trellis_store_dynamodb_requests_total{{operation=\"TransactWriteItems\"}} {}\n\
             # HELP trellis_store_dynamodb_errors_total DynamoDB calls that failed (after SDK retries).\n\
             # TYPE trellis_store_dynamodb_errors_total counter\n\
             trellis_store_dynamodb_errors_total {}\n\
             # HELP trellis_store_write_conflicts_total Writes that lost a race and re-ran.\n\
             # TYPE trellis_store_write_conflicts_total counter\n\
             trellis_store_write_conflicts_total {}\n\
             # HELP trellis_store_full_reloads_total Full reads of the table.\n\
             # TYPE trellis_store_full_reloads_total counter\n\
             trellis_store_full_reloads_total {}\n\
             # HELP trellis_store_dynamodb_up 1 if the last DynamoDB call succeeded.\n\
             # TYPE trellis_store_dynamodb_up gauge\n\
             trellis_store_dynamodb_up {}\n\
             # HELP trellis_store_generation The generation this agent publishes.\n\
             # TYPE trellis_store_generation gauge\n\
             trellis_store_generation {generation}\n",
            get(&m.get_item),
            get(&m.query),
            get(&m.transact),
            get(&m.errors),
            get(&m.conflicts),
            get(&m.reloads),
            get(&m.up),
        )
    }
}

fn replay(state: &mut State, log: Vec<(u64, Vec<Change>)>) -> Result<(), items::ItemError> {
    for (g, changes) in log {
        items::apply(state, &changes)?;
        state.generation = g;
    }
    Ok(())
}

/// Unavailable (retry later) for transport failures, timeouts and throttling; a clear hint when
/// the table does not exist.
fn classify<E, R>(table: &str, op: &str, e: SdkError<E, R>) -> Error
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    if e.code() == Some("ResourceNotFoundException") {
        return Error::Config(format!(
            "table {table} does not exist: create it with `trellis-agent init-store --store dynamodb --dynamodb-table {table}`"
        ));
    }
    let detail = match e.code() {
        Some(code) => format!("{op}: {code}: {}", e.message().unwrap_or_default()),
        None => format!("{op}: {}", DisplayErrorContext(&e)),
    };
    Error::Unavailable {
        table: table.to_string(),
        detail,
    }
}

fn table_name(args: &StoreArgs) -> Result<String, Error> {
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
async fn client(args: &StoreArgs, region: &str) -> Client {
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

/// Creates the table (on-demand capacity) if it does not exist, waits until it is active, and
/// turns on time to live for change items.
pub(super) async fn create_table(args: &StoreArgs, region: &str) -> Result<String, Error> {
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
    Ok(format!(
        "DynamoDB table {table} {} (keys pk/sk, on-demand capacity, time to live on {ATTR_EXPIRES})",
        if created { "created" } else { "already exists" }
    ))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn change_sk(g: u64) -> String {
    format!("{g:020}")
}

fn string<'a>(
    item: &'a HashMap<String, AttributeValue>,
    attr: &str,
    table: &str,
) -> Result<&'a str, Error> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(Error::Config(format!(
            "table {table} holds an item without string attribute {attr:?}: is it a Trellis table?"
        ))),
    }
}

fn number(item: &HashMap<String, AttributeValue>, attr: &str, table: &str) -> Result<u64, Error> {
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

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `d` scaled by a random factor in [0.5, 1.5): agents that failed together do not retry together.
fn jittered(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half_times() {
        let d = Duration::from_millis(1000);
        let samples: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(samples.iter().all(|s| *s >= d / 2 && *s < d * 3 / 2));
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "jitter is not random: {distinct:?}");
    }

    #[test]
    fn change_keys_sort_in_generation_order() {
        assert!(change_sk(9) < change_sk(10));
        assert!(change_sk(99_999) < change_sk(100_000));
    }

    #[test]
    fn a_missing_table_name_is_a_clear_error() {
        let err = table_name(&StoreArgs::default()).unwrap_err();
        assert!(err.to_string().contains("--dynamodb-table"), "{err}");
    }
}
