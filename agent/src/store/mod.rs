//! The store: the whole App Mesh state, committed by `write` closures and published to watchers.
//!
//! Two backends behind one [`Store`]: `embedded` (one agent, a JSON file on local disk; the default)
//! and `dynamodb` (many agents sharing one DynamoDB table, see [`dynamodb`]). The API sees only
//! [`Store::write`] and [`Store::current`]; a write closure may run more than once when the shared
//! backend meets a concurrent writer, so closures must be pure functions of the state they get.

pub mod dynamodb;
mod embedded;
mod items;
pub mod secret;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use trellis_model::State;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Trellis state file: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot persist state to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The shared store did not answer (unreachable, throttled, timed out): retry later.
    #[error("the DynamoDB table {table} is unavailable ({detail}); retry the request")]
    Unavailable { table: String, detail: String },
    /// Other agents kept winning the race for the same generation: retry later.
    #[error(
        "the DynamoDB table {table} is busy with concurrent writes; the change was not made, retry"
    )]
    Contention { table: String },
    /// DynamoDB answered that the request can never succeed as sent (a validation error, access
    /// denied): retrying the same request does not help.
    #[error("the DynamoDB table {table} refused the request ({detail}); retrying will not help")]
    Rejected { table: String, detail: String },
    #[error(
        "table {table} does not exist: create it with `trellis-agent init-store --store dynamodb --dynamodb-table {table}`"
    )]
    NoTable { table: String },
    #[error("DynamoDB table {table}: {source}")]
    Item {
        table: String,
        #[source]
        source: items::ItemError,
    },
    /// The change cannot be stored (a key or an item over DynamoDB's limits): the request itself
    /// must change. `field` names the request field, `rule` the limit.
    #[error("{field}: {rule}")]
    Unstorable { field: String, rule: String },
    #[error("--store dynamodb: {0}")]
    Config(String),
}

impl Error {
    /// Whether the same request may succeed later unchanged (the API answers 503 for these).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Contention { .. })
    }

    /// Whether the request is at fault and names the field (the API answers 400 for these).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, Error::Unstorable { .. })
    }

    /// Whether the shared store failed to answer as it should (unreachable, busy, refusing,
    /// gone): a serving agent keeps its last good state through these.
    fn is_outage(&self) -> bool {
        self.is_retryable() || matches!(self, Error::Rejected { .. } | Error::NoTable { .. })
    }
}

/// Which backend holds the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One agent; a JSON file in `--data-dir`.
    #[default]
    Embedded,
    /// Many agents sharing one DynamoDB table.
    Dynamodb,
}

/// Store selection, shared by `serve`, `export` and `init-store`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StoreArgs {
    /// Where the mesh state lives: embedded (this instance only) or dynamodb (shared).
    #[arg(long = "store", env = "TRELLIS_STORE", value_enum, default_value_t)]
    pub backend: Backend,
    /// DynamoDB table of the shared store (with --store dynamodb).
    #[arg(long, env = "TRELLIS_DYNAMODB_TABLE")]
    pub dynamodb_table: Option<String>,
    /// DynamoDB endpoint URL (a local DynamoDB or a VPC endpoint); the SDK's default otherwise.
    #[arg(long, env = "TRELLIS_DYNAMODB_ENDPOINT")]
    pub dynamodb_endpoint: Option<String>,
    /// How often each agent checks the table's generation item, in milliseconds.
    #[arg(long, env = "TRELLIS_DYNAMODB_POLL_MS", default_value_t = 500)]
    pub dynamodb_poll_ms: u64,
}

impl Default for StoreArgs {
    fn default() -> Self {
        StoreArgs {
            backend: Backend::Embedded,
            dynamodb_table: None,
            dynamodb_endpoint: None,
            dynamodb_poll_ms: 500,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Embedded(embedded::Embedded),
    Dynamodb(Box<dynamodb::Dynamo>),
    /// Nothing behind it: see [`Store::scratch`].
    Scratch,
}

/// The store the agent runs on, whatever the backend.
#[derive(Debug)]
pub struct Store {
    inner: Inner,
    tx: watch::Sender<Arc<State>>,
}

impl Store {
    /// Opens (or creates) the embedded store in `dir`, loading the last committed state.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let (inner, state) = embedded::Embedded::open(dir)?;
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(Store {
            inner: Inner::Embedded(inner),
            tx,
        })
    }

    /// Opens the backend `args` names; `region` is the fallback when `aws-config` finds none.
    /// Reads the shared store as it is now, or fails.
    pub async fn connect(dir: &Path, args: &StoreArgs, region: &str) -> Result<Self, Error> {
        Store::connect_with(dir, args, region, false).await
    }

    /// [`Store::connect`] for a serving agent: the shared store's last good state is also kept in
    /// `dir`, and an agent that starts while DynamoDB is unreachable serves it until DynamoDB answers.
    pub async fn serve(dir: &Path, args: &StoreArgs, region: &str) -> Result<Self, Error> {
        Store::connect_with(dir, args, region, true).await
    }

    async fn connect_with(
        dir: &Path,
        args: &StoreArgs,
        region: &str,
        cache: bool,
    ) -> Result<Self, Error> {
        match args.backend {
            Backend::Embedded => Store::open(dir),
            Backend::Dynamodb => {
                let cache = cache.then_some(dir);
                let (inner, state) = dynamodb::Dynamo::connect(args, region, cache).await?;
                let (tx, _) = watch::channel(Arc::new(state));
                Ok(Store {
                    inner: Inner::Dynamodb(Box::new(inner)),
                    tx,
                })
            }
        }
    }

    /// A store in memory only, nothing persisted: what `explain --resources` reads a resources
    /// file into, with the API's own checks.
    pub fn in_memory() -> Store {
        let (tx, _) = watch::channel(Arc::new(State::default()));
        Store {
            inner: Inner::Scratch,
            tx,
        }
    }

    /// An in-memory copy of the embedded store's state for a batch of writes that is then
    /// committed as one ([`Store::commit_scratch`]): applying a big `--resources` file costs one
    /// persist instead of one per resource, and a rejected item leaves nothing behind. `None` for
    /// the shared store, whose transactions hold at most 98 resources.
    pub fn scratch(&self) -> Option<Store> {
        match self.inner {
            Inner::Embedded(_) => {
                let (tx, _) = watch::channel(self.current());
                Some(Store {
                    inner: Inner::Scratch,
                    tx,
                })
            }
            Inner::Dynamodb(_) | Inner::Scratch => None,
        }
    }

    /// Commits what a [`Store::scratch`] copy holds now, as one write.
    pub fn commit_scratch(&self, scratch: &Store) -> Result<(), Error> {
        let done = scratch.current();
        self.write(|s| {
            let generation = s.generation;
            *s = (*done).clone();
            s.generation = generation;
            Ok(())
        })
    }

    /// The current committed state.
    pub fn current(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    /// The state for an API read (describe, list): at least as new as every write acknowledged
    /// by any agent before the call. The embedded store's current state is; the shared store
    /// confirms it with at most one consistent read (see `dynamodb::Dynamo::fresh`).
    pub async fn fresh(&self) -> Arc<State> {
        match &self.inner {
            Inner::Embedded(_) | Inner::Scratch => self.current(),
            Inner::Dynamodb(d) => d.fresh(&self.tx).await,
        }
    }

    /// A receiver that sees every committed state (only the newest, if it falls behind).
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    /// Runs `f` on a copy of the state and commits the copy if `f` succeeds and changed something.
    /// `f` may run again on a fresher state if another agent committed first.
    ///
    /// Blocking (it fsyncs, or waits for DynamoDB); async callers should run it with
    /// `block_in_place` on a multi-threaded runtime.
    pub fn write<T, E>(&self, mut f: impl FnMut(&mut State) -> Result<T, E>) -> Result<T, E>
    where
        E: From<Error>,
    {
        match &self.inner {
            Inner::Embedded(e) => e.write(&self.tx, f),
            Inner::Dynamodb(d) => d.write(&self.tx, f),
            Inner::Scratch => {
                // In place, without a copy (the batch is dropped whole if an item fails): take
                // the state out so this is its only reference.
                let mut state = self.tx.send_replace(Arc::default());
                let s = Arc::make_mut(&mut state);
                let out = f(s);
                if out.is_ok() {
                    s.generation += 1;
                }
                self.tx.send_replace(state);
                out
            }
        }
    }

    /// Keeps the published state in step with the backend until `cancel` (the shared backend's
    /// change poller; nothing to do for the embedded one).
    pub async fn run(&self, cancel: CancellationToken) {
        match &self.inner {
            Inner::Embedded(_) | Inner::Scratch => cancel.cancelled().await,
            Inner::Dynamodb(d) => d.run(&self.tx, cancel).await,
        }
    }

    /// Prometheus text for the store's own counters (empty for the embedded store).
    pub fn metrics_text(&self) -> String {
        match &self.inner {
            Inner::Embedded(_) | Inner::Scratch => String::new(),
            Inner::Dynamodb(d) => d.metrics_text(self.current().generation),
        }
    }
}

/// `trellis-agent init-store`: creates what the backend needs (the data directory, or the DynamoDB
/// table with its time-to-live setting). Returns a one-line description of what it did.
pub async fn init(dir: &Path, args: &StoreArgs, region: &str) -> Result<String, Error> {
    match args.backend {
        Backend::Embedded => {
            embedded::load(dir)?;
            Ok(format!("embedded store ready in {}", dir.display()))
        }
        Backend::Dynamodb => dynamodb::create_table(args, region).await,
    }
}

/// Writes one of the agent's own files in its data directory (cluster sets sent, attested
/// containers): a 0600 temporary file, fsync, rename, so a crash leaves the previous file or the
/// new one, never half. The directory is not made here: it is the store's, created when it opens,
/// and one removed under a running agent is not made again.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
