//! The shared backend: every agent of a cluster keeps the whole state in memory, as the embedded
//! store does, and DynamoDB orders and holds the writes. No consensus of our own: DynamoDB's
//! transactions decide who wins.
//!
//! Table layout (partition key `pk`, sort key `sk`, both strings; see README "Many instances"):
//! - `meta` / `generation`: `generation` (number), the number of committed writes, and `tableId`,
//!   random per table (so a table deleted and created again is another table).
//! - `resource` / `mesh/M[/KIND/N[/KIND/N]]`: one item per App Mesh resource, attribute `data` (the
//!   resource's JSON: metadata, spec, tags, clientToken) and `generation` (the write that made it).
//! - `change` / zero-padded generation: what that write changed, attribute `changes` (JSON list of
//!   `[key, data or null]`, whole values), `generation`, `tableId`, and `expiresAt` for DynamoDB's
//!   time to live (a day).
//!
//! Which DynamoDB guarantee each step relies on (ARCHITECTURE.md's store section says the same):
//! - A write is one `TransactWriteItems` (all or nothing) whose condition is that the generation
//!   item still holds the generation and table id the closure saw; the item is in every write
//!   transaction, so any two writes serialise (transactions are serializable with each other).
//!   The loser catches up and re-runs its closure on the fresh state, so uniqueness, versions,
//!   references, quotas and `clientToken` idempotency hold as on one agent. A closure that fails
//!   or changes nothing is confirmed by a strongly consistent `GetItem` of the generation item
//!   (serializable with transactions), so an error is never the product of a stale state.
//! - A write also checks (`ConditionCheck`, always true) every item of the write before it that
//!   it does not write itself. DynamoDB cancels a transaction with an item another transaction is
//!   still applying, so a write commits only once the one before it is applied in full: at any
//!   moment only the newest writes can be partly visible.
//! - Agents follow the table by polling that item (`GetItem`, consistent) and replaying change
//!   items after their own generation. A change item is one item written whole by its
//!   transaction, so a replay never sees half a write. `Query` is only read-committed against
//!   transactions (a transaction's items are applied one by one), so the newest change items may
//!   not be visible yet; a missing one is read again with `TransactGetItems`, which is
//!   serializable and is rejected while a transaction is updating the item: present means it was
//!   in flight, absent means time to live deleted it, and the agent reloads instead of trusting a
//!   log with a hole in it.
//! - A full load reads the generation item with `TransactGetItems` (`B`), queries every resource
//!   item, and reads the generation again (`G`). Every write before `B` was applied in full before
//!   the query began (the check above); no write after `G` had begun to apply while it ran (the
//!   second read would have been rejected or seen it). Only writes `B..=G` can be half visible in
//!   what the query returned, so the load lays their change items (whole values) over it.
//! - Time to live deletes a change item only after its `expiresAt` (a day after its write), and
//!   may keep it for days more; an expired item that is still there is replayed like any other.
//!
//! When DynamoDB fails, agents keep publishing the last good state (also across a restart, from
//! the cache file, which keeps the table id), writes fail with a retryable error, and the poller
//! backs off with jitter until the table answers again. Every retry loop is bounded.

pub mod fleet;
mod limits;
mod table;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{ConditionCheck, Delete, Put, TransactWriteItem, Update};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::items::{self, Change};
use super::{Error, StoreArgs, embedded};
use table::{Meta, Probe, Range, n, s, string};
use trellis_model::State;

pub use fleet::FleetTable;
pub(super) use table::create_table;
// The shared keys of `store::secret` live in the same table, through the same client.
pub(super) use table::{client, table_name};

const PK: &str = "pk";
const SK: &str = "sk";
const META: &str = "meta";
const GENERATION_SK: &str = "generation";
const RESOURCE: &str = "resource";
const CHANGE: &str = "change";
const ATTR_GENERATION: &str = "generation";
const ATTR_TABLE_ID: &str = "tableId";
const ATTR_DATA: &str = "data";
const ATTR_CHANGES: &str = "changes";
const ATTR_EXPIRES: &str = "expiresAt";
/// How long change items stay: an agent away for longer reloads everything.
const CHANGE_TTL: Duration = Duration::from_secs(24 * 3600);
/// A transaction holds at most 100 actions.
const MAX_ACTIONS: usize = 100;
/// Of which the generation and the change item take two.
const MAX_RESOURCES_PER_WRITE: usize = MAX_ACTIONS - 2;
/// Rounds of one write (lost races, or catch-ups before a rejection holds) before it gives up
/// with a retryable error.
const MAX_WRITE_ROUNDS: u32 = 25;
/// Longest pause between polls while the table fails.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Rounds of a full load that met writes in flight before giving up.
const MAX_RELOADS: u32 = 8;
/// First pause between such rounds (doubling).
const RELOAD_PAUSE: Duration = Duration::from_millis(20);
/// Steps of one catch-up (each replays what is visible, or waits for a change in flight).
const MAX_SYNC_STEPS: u32 = 8;
/// First pause when the next change item is still in flight (doubling).
const IN_FLIGHT_PAUSE: Duration = Duration::from_millis(10);
/// Change items a full load reads serializably because a query did not show them.
const MAX_PROBES: u32 = 8;

/// DynamoDB calls and their outcomes, for `/metrics` and the store bench.
#[derive(Debug, Default)]
struct Metrics {
    get_item: AtomicU64,
    transact_get: AtomicU64,
    query: AtomicU64,
    transact: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
    reloads: AtomicU64,
    gaps: AtomicU64,
    /// 1 while the last call succeeded.
    up: AtomicU64,
    /// Consistent reads of the generation item made for API reads (read-your-writes).
    read_checks: AtomicU64,
    /// API reads answered by a check another read started after they arrived.
    read_checks_shared: AtomicU64,
    /// API reads answered without confirmation (the table did not answer the check).
    read_checks_unconfirmed: AtomicU64,
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

/// What this agent knows besides the published state: the id of the table that state is of.
/// Guarded by the commit lock, so it changes with the state.
#[derive(Debug, Default)]
struct Local {
    /// `None`: a table written before ids existed (or a cache file from then).
    table_id: Option<String>,
    /// The resource keys the write that made the published generation touched (`None` when not
    /// known, as after a start from the cache file): the next write checks that none of its
    /// items is still being applied.
    last: Option<(u64, Vec<String>)>,
}

/// A published state and the table it is of: what the cache file keeps.
type Published = (Option<String>, Arc<State>);

/// The cache file as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CacheOut<'a> {
    table_id: Option<&'a str>,
    state: &'a State,
}

/// The cache file as read: also a bare state, as agents wrote it before table ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum CacheIn {
    Current {
        #[serde(rename = "tableId")]
        table_id: Option<String>,
        state: State,
    },
    Bare(State),
}

/// A state read whole from the table.
struct Loaded {
    state: State,
    table_id: Option<String>,
    /// The resource keys of the write that made its generation, when its change item was read.
    touched: Option<Vec<String>>,
}

/// What the change log holds after a generation.
enum Next {
    /// The next changes, in order (perhaps not yet up to the table's generation).
    Changes(Vec<(u64, Vec<Change>)>),
    /// The next change item is gone: time to live deleted it before this agent read it.
    Gap(u64),
    /// The next change item belongs to another table.
    Foreign,
    /// The next change item is held by a transaction in flight.
    InFlight,
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
    /// interleaves with it (the one lock held across an await, see ARCHITECTURE.md).
    lock: Mutex<Local>,
    /// Every published state with its table id, for the cache file.
    published: watch::Sender<Published>,
    /// When the last read-your-writes check began: one check serves every API read that
    /// arrived before it began and waits on this lock.
    read_check: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl Dynamo {
    /// Connects and loads the whole state; with a `cache` directory, falls back to the last good
    /// state kept there when DynamoDB does not answer as it should.
    pub(super) async fn connect(
        args: &StoreArgs,
        region: &str,
        cache: Option<&Path>,
    ) -> Result<(Self, State), Error> {
        let table = table::table_name(args)?;
        if let Some(dir) = cache {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut store = Dynamo {
            client: table::client(args, region).await,
            cache: cache.map(|dir| (dir.to_path_buf(), format!("dynamodb-{table}.json"))),
            table,
            poll: Duration::from_millis(args.dynamodb_poll_ms.max(10)),
            handle: tokio::runtime::Handle::current(),
            lock: Mutex::new(Local::default()),
            published: watch::channel((None, Arc::default())).0,
            read_check: Mutex::new(None),
            metrics: Metrics::default(),
        };
        let loaded = match (store.full_load().await, &store.cache) {
            (Ok(l), _) => l,
            (Err(e), Some((dir, file))) if e.is_outage() => match load_cache(dir, file) {
                Ok(Some(l)) => {
                    warn!(table = %store.table, error = %e, generation = l.state.generation,
                        "DynamoDB does not answer; serving the last good state kept on disk");
                    l
                }
                _ => return Err(e),
            },
            (Err(e), _) => return Err(e),
        };
        info!(table = %store.table, generation = loaded.state.generation,
            meshes = loaded.state.meshes.len(), table_id = ?loaded.table_id,
            "loaded the shared store");
        let local = store.lock.get_mut();
        local.table_id.clone_from(&loaded.table_id);
        local.last = loaded.touched.map(|k| (loaded.state.generation, k));
        store
            .published
            .send_replace((loaded.table_id, Arc::new(loaded.state.clone())));
        Ok((store, loaded.state))
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
            let mut local = self.lock.lock().await;
            for round in 0..MAX_WRITE_ROUNDS {
                if round > 2 {
                    tokio::time::sleep(jittered(Duration::from_millis(5 << round.min(6)))).await;
                }
                let current = tx.borrow().clone();
                let mut next = (*current).clone();
                let out = f(&mut next);
                let changes = match &out {
                    Ok(_) => items::diff(&current, &next).map_err(|e| E::from(self.item(e)))?,
                    Err(_) => Vec::new(),
                };
                if changes.is_empty() {
                    // A rejection or a no-op must hold on the newest state, not a stale one.
                    let meta = self.read_meta().await.map_err(E::from)?;
                    if meta.generation == current.generation && meta.table_id == local.table_id {
                        return out;
                    }
                    self.sync(tx, &mut local, Some(meta))
                        .await
                        .map_err(E::from)?;
                    continue;
                }
                match self.commit(&local, current.generation, &changes).await {
                    Ok(table_id) => {
                        let mut s = (*current).clone();
                        items::apply(&mut s, &changes).map_err(|e| E::from(self.item(e)))?;
                        s.generation = current.generation + 1;
                        self.publish(tx, &mut local, s, Some(table_id), Some(keys(&changes)));
                        return out;
                    }
                    Err(Fail::Conflict) => {
                        inc(&self.metrics.conflicts);
                        self.sync(tx, &mut local, None).await.map_err(E::from)?;
                    }
                    Err(Fail::Store(e)) => return Err(E::from(e)),
                }
            }
            Err(E::from(Error::Contention {
                table: self.table.clone(),
            }))
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.handle.block_on(run))
        } else {
            self.handle.block_on(run)
        }
    }

    /// The state for an API read: at least as new as every write any agent acknowledged before
    /// the call (read-your-writes across agents). One consistent `GetItem` of the generation item
    /// (serializable with write transactions, so it reflects every committed write); a catch-up
    /// only if the table is ahead (the change-log replay the poll would have made anyway). Reads
    /// that arrive while a check is under way wait for the next one and share it, so there is at
    /// most one consistent read per API read, and fewer under load. If the table does not answer,
    /// the last good state is served (static stability), counted as unconfirmed.
    pub(super) async fn fresh(&self, tx: &watch::Sender<Arc<State>>) -> Arc<State> {
        let asked = Instant::now();
        let mut last = self.read_check.lock().await;
        if last.is_some_and(|t| t >= asked) {
            inc(&self.metrics.read_checks_shared);
            return tx.borrow().clone();
        }
        let started = Instant::now();
        inc(&self.metrics.read_checks);
        match self.read_meta().await {
            Ok(meta) => {
                let behind = {
                    let (id, state) = &*self.published.borrow();
                    meta.generation != state.generation || meta.table_id != *id
                };
                if behind {
                    let mut local = self.lock.lock().await;
                    if let Err(e) = self.sync(tx, &mut local, Some(meta)).await {
                        inc(&self.metrics.read_checks_unconfirmed);
                        warn!(table = %self.table, error = %e,
                            "cannot catch up for a read; answering from the last good state");
                    }
                }
            }
            Err(e) => {
                inc(&self.metrics.read_checks_unconfirmed);
                debug!(table = %self.table, error = %e,
                    "cannot confirm a read; answering from the last good state");
            }
        }
        *last = Some(started);
        tx.borrow().clone()
    }

    /// Polls the generation item until `cancel`, applying what other agents committed, and keeps
    /// the last good state on disk.
    pub(super) async fn run(&self, tx: &watch::Sender<Arc<State>>, cancel: CancellationToken) {
        tokio::join!(self.poll_loop(tx, cancel.clone()), self.keep_cache(cancel));
    }

    /// Writes every published state and its table id to the cache file (only the newest, if
    /// writes fall behind).
    async fn keep_cache(&self, cancel: CancellationToken) {
        let Some((dir, file)) = self.cache.clone() else {
            return;
        };
        let mut rx = self.published.subscribe();
        loop {
            let (id, state) = rx.borrow_and_update().clone();
            let (d, f) = (dir.clone(), file.clone());
            let written = tokio::task::spawn_blocking(move || {
                let out = CacheOut {
                    table_id: id.as_deref(),
                    state: &state,
                };
                embedded::persist_file(&d, &f, &out)
            })
            .await;
            match written {
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
                let meta = self.read_meta().await?;
                let mut local = self.lock.lock().await;
                if meta.generation != tx.borrow().generation || meta.table_id != local.table_id {
                    self.sync(tx, &mut local, Some(meta)).await?;
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

    /// Publishes `state` of table `table_id`, made by a write that touched `touched` (the caller
    /// holds the commit lock).
    fn publish(
        &self,
        tx: &watch::Sender<Arc<State>>,
        local: &mut Local,
        state: State,
        table_id: Option<String>,
        touched: Option<Vec<String>>,
    ) {
        local.last = touched.map(|k| (state.generation, k));
        let state = Arc::new(state);
        local.table_id.clone_from(&table_id);
        self.published.send_replace((table_id, state.clone()));
        tx.send_replace(state);
    }

    /// Brings the published state to the table's (`seen`, if the caller just read the generation
    /// item): replays the change log, or reloads everything when the table is another one (its id
    /// changed), went backwards, or the log has a gap. Progresses or fails: never returns behind
    /// the generation it read, and gives up after [`MAX_SYNC_STEPS`].
    async fn sync(
        &self,
        tx: &watch::Sender<Arc<State>>,
        local: &mut Local,
        seen: Option<Meta>,
    ) -> Result<(), Error> {
        let meta = match seen {
            // Read before the lock, ahead of this agent: still the table's newest news.
            Some(m) if m.table_id == local.table_id && m.generation > tx.borrow().generation => m,
            _ => self.read_meta().await?,
        };
        let mut pause = IN_FLIGHT_PAUSE;
        for _ in 0..MAX_SYNC_STEPS {
            let at = tx.borrow().clone();
            if meta.table_id != local.table_id {
                warn!(table = %self.table, local = ?local.table_id, table_id = ?meta.table_id,
                    "the table is another one (deleted and created again?); reloading");
                return self.reload(tx, local).await;
            }
            if meta.generation == at.generation {
                return Ok(());
            }
            if meta.generation < at.generation {
                warn!(table = %self.table, local = at.generation, table_generation = meta.generation,
                    "the table's generation went backwards; reloading");
                return self.reload(tx, local).await;
            }
            let id = local.table_id.clone();
            match self
                .changes_after(at.generation, meta.generation, id.as_deref())
                .await?
            {
                Next::Changes(log) => {
                    let touched = log.last().map(|(_, c)| keys(c));
                    let mut s = (*at).clone();
                    if let Err(e) = replay(&mut s, log) {
                        warn!(table = %self.table, error = %e, "cannot replay changes; reloading");
                        return self.reload(tx, local).await;
                    }
                    self.publish(tx, local, s, id, touched);
                }
                Next::Gap(missing) => {
                    inc(&self.metrics.gaps);
                    warn!(table = %self.table, local = at.generation,
                        table_generation = meta.generation, missing,
                        "the change log ends before the table's generation (changes this agent \
                         missed have expired); reloading the whole table");
                    return self.reload(tx, local).await;
                }
                Next::Foreign => {
                    warn!(table = %self.table,
                        "the change log is another table's (deleted and created again?); reloading");
                    return self.reload(tx, local).await;
                }
                Next::InFlight => {
                    tokio::time::sleep(jittered(pause)).await;
                    pause *= 2;
                }
            }
        }
        Err(Error::Contention {
            table: self.table.clone(),
        })
    }

    async fn reload(&self, tx: &watch::Sender<Arc<State>>, local: &mut Local) -> Result<(), Error> {
        let loaded = self.full_load().await?;
        self.publish(tx, local, loaded.state, loaded.table_id, loaded.touched);
        Ok(())
    }

    /// The change items after `from` up to `to`, in order, as far as they go without a hole.
    async fn changes_after(&self, from: u64, to: u64, id: Option<&str>) -> Result<Next, Error> {
        let rows = self.query(CHANGE, Range::After(&change_sk(from))).await?;
        let mut out = Vec::new();
        for row in &rows {
            let c = self.logged(row)?;
            if c.generation != from + 1 + out.len() as u64 || c.generation > to {
                break;
            }
            if c.foreign(id) {
                return Ok(Next::Foreign);
            }
            out.push((c.generation, c.changes));
        }
        if !out.is_empty() {
            return Ok(Next::Changes(out));
        }
        // The next change item is not visible: still in flight, or deleted by time to live.
        Ok(match self.probe_change(from + 1).await? {
            Probe::Found(c) if c.foreign(id) => Next::Foreign,
            Probe::Found(c) => Next::Changes(vec![(c.generation, c.changes)]),
            Probe::Absent => Next::Gap(from + 1),
            Probe::Busy => Next::InFlight,
        })
    }

    /// The whole state at one generation (see the module docs for why it is exact).
    async fn full_load(&self) -> Result<Loaded, Error> {
        inc(&self.metrics.reloads);
        let mut pause = RELOAD_PAUSE;
        for round in 0..MAX_RELOADS {
            if round > 0 {
                tokio::time::sleep(jittered(pause)).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            // Every write before this generation was applied in full before the query starts.
            let Some(before) = self.read_meta_serializable().await? else {
                continue;
            };
            let mut map = BTreeMap::new();
            for row in &self.query(RESOURCE, Range::All).await? {
                map.insert(
                    string(row, SK, &self.table)?.to_string(),
                    string(row, ATTR_DATA, &self.table)?.to_string(),
                );
            }
            // No write after this generation had begun to apply while the query ran.
            let Some(meta) = self.read_meta_serializable().await? else {
                continue;
            };
            if meta.table_id != before.table_id {
                continue;
            }
            let id = meta.table_id.as_deref();
            let Some(recent) = self
                .changes_between(before.generation, meta.generation, id)
                .await?
            else {
                continue;
            };
            // Whole values, oldest first: each key ends at its value at `meta.generation`.
            for (_, changes) in &recent {
                for (key, data) in changes {
                    match data {
                        Some(d) => map.insert(key.clone(), d.clone()),
                        None => map.remove(key),
                    };
                }
            }
            let mut state = match items::from_items(&map) {
                Ok(s) => s,
                Err(items::ItemError::Orphan(_)) => continue,
                Err(e) => return Err(self.item(e)),
            };
            state.generation = meta.generation;
            let touched = recent
                .last()
                .filter(|(g, _)| *g == meta.generation)
                .map(|(_, c)| keys(c));
            return Ok(Loaded {
                state,
                table_id: meta.table_id,
                touched,
            });
        }
        Err(Error::Contention {
            table: self.table.clone(),
        })
    }

    /// The change items of generations `lo..=hi`, oldest first. One that a query does not show is
    /// read serializably: still held by a transaction in flight gives `None` (the load starts
    /// over), gone means time to live deleted it, a day after its write (nothing left to apply).
    async fn changes_between(
        &self,
        lo: u64,
        hi: u64,
        id: Option<&str>,
    ) -> Result<Option<Vec<(u64, Vec<Change>)>>, Error> {
        let lo = lo.max(1);
        if lo > hi {
            return Ok(Some(Vec::new()));
        }
        let mut found = BTreeMap::new();
        for row in &self.query(CHANGE, Range::After(&change_sk(lo - 1))).await? {
            let c = self.logged(row)?;
            if c.generation <= hi {
                if c.foreign(id) {
                    return Ok(None);
                }
                found.insert(c.generation, c.changes);
            }
        }
        let mut probes = 0;
        for g in lo..=hi {
            if found.contains_key(&g) {
                continue;
            }
            probes += 1;
            if probes > MAX_PROBES {
                return Ok(None);
            }
            match self.probe_change(g).await? {
                Probe::Found(c) if !c.foreign(id) => {
                    found.insert(g, c.changes);
                }
                Probe::Absent => {}
                Probe::Found(_) | Probe::Busy => return Ok(None),
            }
        }
        Ok(Some(found.into_iter().collect()))
    }

    /// The items of the write that made generation `cur`: this write checks that none of them
    /// is still being applied (DynamoDB cancels a transaction that touches an item another one
    /// is applying), so a write commits only once the write before it is applied in full.
    async fn prior_items(&self, local: &Local, cur: u64) -> Result<Vec<(String, String)>, Fail> {
        if cur == 0 {
            return Ok(Vec::new());
        }
        let keys = match &local.last {
            Some((g, keys)) if *g == cur => keys.clone(),
            _ => match self.probe_change(cur).await? {
                Probe::Found(c) => keys(&c.changes),
                // Deleted by time to live: written over a day ago.
                Probe::Absent => return Ok(Vec::new()),
                Probe::Busy => return Err(Fail::Conflict),
            },
        };
        let mut items = vec![(CHANGE.to_string(), change_sk(cur))];
        items.extend(keys.into_iter().map(|k| (RESOURCE.to_string(), k)));
        Ok(items)
    }

    /// One transaction: generation `cur` → `cur + 1` (on the condition that the generation item
    /// still holds `cur` and this agent's table id), the change item, the resource items. Returns
    /// the table id now on the generation item.
    async fn commit(&self, local: &Local, cur: u64, changes: &[Change]) -> Result<String, Fail> {
        if changes.len() > MAX_RESOURCES_PER_WRITE {
            return Err(Fail::Store(Error::Config(format!(
                "one write changes {} resources; a DynamoDB transaction holds at most {MAX_RESOURCES_PER_WRITE}",
                changes.len()
            ))));
        }
        let next = cur + 1;
        let log = serde_json::to_string(changes).map_err(Error::Encode)?;
        limits::check(changes, &log)?;
        let build = |e: aws_sdk_dynamodb::error::BuildError| Error::Config(e.to_string());
        // The previous write's items this one does not write itself.
        let mine: std::collections::HashSet<&str> =
            changes.iter().map(|(k, _)| k.as_str()).collect();
        let checks: Vec<(String, String)> = self
            .prior_items(local, cur)
            .await?
            .into_iter()
            .filter(|(pk, sk)| !(pk == RESOURCE && mine.contains(sk.as_str())))
            .collect();
        let inline = 2 + changes.len() + checks.len() <= MAX_ACTIONS;
        if !inline && !self.applied(&checks).await? {
            return Err(Fail::Conflict);
        }
        // A table written before ids gets one with its next write.
        let id = local
            .table_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let condition = match (&local.table_id, cur) {
            (Some(_), _) => "#g = :cur AND #id = :id",
            (None, 0) => "(attribute_not_exists(#g) OR #g = :cur) AND attribute_not_exists(#id)",
            (None, _) => "#g = :cur AND attribute_not_exists(#id)",
        };
        let mut ops = vec![
            TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&self.table)
                        .key(PK, s(META))
                        .key(SK, s(GENERATION_SK))
                        .update_expression("SET #g = :next, #id = :id")
                        .condition_expression(condition)
                        .expression_attribute_names("#g", ATTR_GENERATION)
                        .expression_attribute_names("#id", ATTR_TABLE_ID)
                        .expression_attribute_values(":cur", n(cur))
                        .expression_attribute_values(":next", n(next))
                        .expression_attribute_values(":id", s(&id))
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
                        .item(ATTR_TABLE_ID, s(&id))
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
        for (pk, sk) in checks.iter().filter(|_| inline) {
            ops.push(
                TransactWriteItem::builder()
                    .condition_check(
                        ConditionCheck::builder()
                            .table_name(&self.table)
                            .key(PK, s(pk))
                            .key(SK, s(sk))
                            // Always true: the check is that no transaction is applying the item.
                            .condition_expression(
                                "attribute_exists(#pk) OR attribute_not_exists(#pk)",
                            )
                            .expression_attribute_names("#pk", PK)
                            .build()
                            .map_err(build)?,
                    )
                    .build(),
            );
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
                self.up();
                Ok(id)
            }
            Err(e) => Err(self.commit_failed(e)),
        }
    }

    /// A lost race (our condition failed, or another transaction holds one of the items: catch
    /// up and re-run), or a failure, retryable or not by the reasons DynamoDB gives.
    fn commit_failed(&self, e: SdkError<TransactWriteItemsError, HttpResponse>) -> Fail {
        if let Some(TransactWriteItemsError::TransactionCanceledException(tc)) =
            e.as_service_error()
        {
            let reasons: Vec<&str> = tc
                .cancellation_reasons()
                .iter()
                .filter_map(|r| r.code())
                .filter(|c| *c != "None")
                .collect();
            // moto and older services may omit the reasons; the only condition is ours.
            if reasons.is_empty()
                || reasons
                    .iter()
                    .any(|c| matches!(*c, "ConditionalCheckFailed" | "TransactionConflict"))
            {
                self.up();
                return Fail::Conflict;
            }
            inc(&self.metrics.errors);
            self.metrics.up.store(0, Ordering::Relaxed);
            let detail = format!(
                "TransactWriteItems: TransactionCanceledException: {}",
                reasons.join(", ")
            );
            let table = self.table.clone();
            let throttled = reasons
                .iter()
                .all(|c| matches!(*c, "ThrottlingError" | "ProvisionedThroughputExceeded"));
            return Fail::Store(if throttled {
                Error::Unavailable { table, detail }
            } else {
                Error::Rejected { table, detail }
            });
        }
        Fail::Store(self.failed("TransactWriteItems", e))
    }

    fn up(&self) {
        self.metrics.up.store(1, Ordering::Relaxed);
    }

    fn failed<E>(&self, op: &str, e: SdkError<E, HttpResponse>) -> Error
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
    {
        inc(&self.metrics.errors);
        self.metrics.up.store(0, Ordering::Relaxed);
        table::classify(&self.table, op, e)
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
             trellis_store_dynamodb_requests_total{{operation=\"TransactGetItems\"}} {}\n\
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
             # HELP trellis_store_log_gaps_total Catch-ups that found the change log ended before the table's generation (changes expired), each followed by a full reload.\n\
             # TYPE trellis_store_log_gaps_total counter\n\
             trellis_store_log_gaps_total {}\n\
             # HELP trellis_store_dynamodb_up 1 if the last DynamoDB call succeeded.\n\
             # TYPE trellis_store_dynamodb_up gauge\n\
             trellis_store_dynamodb_up {}\n\
             # HELP trellis_store_read_checks_total Consistent reads of the generation item made for API reads (read-your-writes).\n\
             # TYPE trellis_store_read_checks_total counter\n\
             trellis_store_read_checks_total {}\n\
             # HELP trellis_store_read_checks_shared_total API reads answered by a check that began after they arrived.\n\
             # TYPE trellis_store_read_checks_shared_total counter\n\
             trellis_store_read_checks_shared_total {}\n\
             # HELP trellis_store_read_checks_unconfirmed_total API reads answered from the last good state because the table did not answer.\n\
             # TYPE trellis_store_read_checks_unconfirmed_total counter\n\
             trellis_store_read_checks_unconfirmed_total {}\n\
             # HELP trellis_store_generation The generation this agent publishes.\n\
             # TYPE trellis_store_generation gauge\n\
             trellis_store_generation {generation}\n",
            get(&m.get_item),
            get(&m.transact_get),
            get(&m.query),
            get(&m.transact),
            get(&m.errors),
            get(&m.conflicts),
            get(&m.reloads),
            get(&m.gaps),
            get(&m.up),
            get(&m.read_checks),
            get(&m.read_checks_shared),
            get(&m.read_checks_unconfirmed),
        )
    }
}

/// The resource keys a write touched.
fn keys(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|(k, _)| k.clone()).collect()
}

fn replay(state: &mut State, log: Vec<(u64, Vec<Change>)>) -> Result<(), items::ItemError> {
    for (g, changes) in log {
        items::apply(state, &changes)?;
        state.generation = g;
    }
    Ok(())
}

/// The cache file in `dir`, if there is one.
fn load_cache(dir: &Path, file: &str) -> Result<Option<Loaded>, Error> {
    Ok(embedded::load_file::<CacheIn>(dir, file)?.map(|c| match c {
        CacheIn::Current { table_id, state } => Loaded {
            state,
            table_id,
            touched: None,
        },
        CacheIn::Bare(state) => Loaded {
            state,
            table_id: None,
            touched: None,
        },
    }))
}

fn change_sk(g: u64) -> String {
    format!("{g:020}")
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
        let err = table::table_name(&StoreArgs::default()).unwrap_err();
        assert!(err.to_string().contains("--dynamodb-table"), "{err}");
    }

    #[test]
    fn the_cache_file_keeps_the_table_id_and_older_files_still_load() {
        let dir = crate::test_helpers::TempDir::new("dynamo-cache");
        let state = State {
            generation: 7,
            ..State::default()
        };
        let out = CacheOut {
            table_id: Some("t-1"),
            state: &state,
        };
        embedded::persist_file(dir.path(), "new.json", &out).unwrap();
        let loaded = load_cache(dir.path(), "new.json").unwrap().unwrap();
        assert_eq!(loaded.table_id.as_deref(), Some("t-1"));
        assert_eq!(loaded.state, state);
        // Written before table ids: the bare state, of a table the agent cannot name.
        embedded::persist_file(dir.path(), "old.json", &state).unwrap();
        let loaded = load_cache(dir.path(), "old.json").unwrap().unwrap();
        assert_eq!((loaded.table_id, loaded.state), (None, state));
        assert!(load_cache(dir.path(), "none.json").unwrap().is_none());
    }
}
