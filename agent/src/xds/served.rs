//! The cluster sets this agent has sent on state-of-the-world CDS, by the version it sent them
//! under, kept across reconnects and (in the data directory) across agent restarts.
//!
//! A SotW Envoy that reconnects names only the CDS version it holds. To keep, through the
//! reconnect, the clusters its running listeners and routes still use (make before break), the
//! agent must know what that version contained, even when the state moved on while the stream
//! was down or the agent itself was restarted. Versions are content hashes, so proxies with the
//! same clusters share one entry. Bounded: the least recently used versions are forgotten.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Versions remembered: enough for every proxy of a quota-sized mesh to be a few changes behind.
const MAX_VERSIONS: usize = 1024;
/// And at most this many bytes of them (memory, and the file rewritten as they change). Only a
/// proxy whose clusters changed across a restart needs its old set, so the oldest go first.
const MAX_BYTES: usize = 16 << 20;
/// After a write, further new versions wait this long, so a burst of them is written once.
const WRITE_DELAY: Duration = Duration::from_millis(500);

/// A cluster set as sent: name → the `Any` Envoy got.
pub(super) type Clusters = Arc<BTreeMap<String, Any>>;

#[derive(Debug, Default)]
pub struct Served {
    inner: Mutex<Inner>,
    /// Where the sets survive a restart; none keeps them in memory only.
    path: Option<PathBuf>,
    dirty: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    by_version: HashMap<String, Entry>,
    /// A use counter: the entry used longest ago goes first.
    clock: u64,
    /// The encoded size of every set remembered.
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    clusters: Clusters,
    used: u64,
    bytes: usize,
}

impl Inner {
    fn insert(&mut self, version: String, clusters: Clusters) {
        self.clock += 1;
        let bytes = clusters.iter().map(|(n, a)| n.len() + a.value.len()).sum();
        self.bytes += bytes;
        let used = self.clock;
        let old = self.by_version.insert(
            version,
            Entry {
                clusters,
                used,
                bytes,
            },
        );
        if let Some(old) = old {
            self.bytes -= old.bytes;
        }
        while self.by_version.len() > MAX_VERSIONS
            || (self.bytes > MAX_BYTES && self.by_version.len() > 1)
        {
            let Some(oldest) = self
                .by_version
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(v, _)| v.clone())
            else {
                break;
            };
            if let Some(e) = self.by_version.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
    }
}

impl Served {
    /// Remembered in memory only (tests, benches).
    pub fn in_memory() -> Self {
        Served::default()
    }

    /// Remembered in `path`, starting from what a previous run left there. A file that does not
    /// decode is set aside with a warning: it only ever costs make-before-break on reconnect.
    pub fn load(path: &Path) -> Self {
        let served = Served {
            path: Some(path.to_path_buf()),
            ..Served::default()
        };
        match std::fs::read(path) {
            Ok(bytes) => match decode(&bytes) {
                Ok(entries) => {
                    let n = entries.len();
                    let mut inner = served.lock();
                    for (version, clusters) in entries {
                        inner.insert(version, clusters);
                    }
                    drop(inner);
                    info!(path = %path.display(), versions = n, "cluster sets sent before the restart loaded");
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read the cluster sets sent before the restart; starting without them")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the cluster sets sent before the restart; starting without them")
            }
        }
        served
    }

    /// Remembers the set sent under `version` (built only when it is new); returns it, shared
    /// with every stream that was sent the same set.
    pub(super) fn record(
        &self,
        version: &str,
        clusters: impl FnOnce() -> Vec<(String, Any)>,
    ) -> Clusters {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(e) = inner.by_version.get_mut(version) {
            e.used = now;
            return e.clusters.clone();
        }
        let clusters: Clusters = Arc::new(clusters().into_iter().collect());
        inner.insert(version.to_string(), clusters.clone());
        drop(inner);
        self.dirty.notify_one();
        clusters
    }

    /// The set sent under `version`, if remembered.
    pub(super) fn get(&self, version: &str) -> Option<Clusters> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let e = inner.by_version.get_mut(version)?;
        e.used = now;
        Some(e.clusters.clone())
    }

    /// Runs until `cancel`: writes the sets to the file as soon as a new one is sent (then at
    /// most every [`WRITE_DELAY`] while more come, and once more on the way out), so a restarted
    /// agent finds what its Envoys hold.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        loop {
            tokio::select! {
                () = self.dirty.notified() => {}
                () = cancel.cancelled() => break,
            }
            self.write(&path).await;
            tokio::select! {
                () = tokio::time::sleep(WRITE_DELAY) => {}
                () = cancel.cancelled() => break,
            }
        }
        self.write(&path).await;
    }

    async fn write(&self, path: &Path) {
        let bytes = self.encode();
        let path = path.to_path_buf();
        let written =
            tokio::task::spawn_blocking(move || crate::store::write_private(&path, &bytes)).await;
        match written {
            Ok(Ok(())) => debug!("cluster sets written"),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot write the cluster sets sent; a restart will not keep what Envoys hold")
            }
            Err(e) => warn!(error = %e, "cluster set writer failed"),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (version, e) in &inner.by_version {
            let msg = DiscoveryResponse {
                version_info: version.clone(),
                resources: e.clusters.values().cloned().collect(),
                ..Default::default()
            };
            // Writing into a Vec cannot fail.
            let _ = msg.encode_length_delimited(&mut out);
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn cluster_name(a: &Any) -> Option<String> {
    Cluster::decode(a.value.as_slice()).ok().map(|c| c.name)
}

fn decode(mut bytes: &[u8]) -> Result<Vec<(String, Clusters)>, prost::DecodeError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let msg = DiscoveryResponse::decode_length_delimited(&mut bytes)?;
        let clusters: BTreeMap<String, Any> = msg
            .resources
            .into_iter()
            .filter_map(|a| Some((cluster_name(&a)?, a)))
            .collect();
        out.push((msg.version_info, Arc::new(clusters)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::TempDir;

    fn cluster(name: &str) -> (String, Any) {
        let any = envoy_types::util::pack_any(Cluster {
            name: name.into(),
            ..Default::default()
        });
        (name.to_string(), any)
    }

    #[tokio::test]
    async fn sets_survive_a_restart_and_the_least_recently_used_go_first() {
        let dir = TempDir::new("served");
        let path = dir.path().join("xds-served.pb");
        let served = Arc::new(Served::load(&path));
        let cancel = CancellationToken::new();
        let writer = tokio::spawn(served.clone().run(cancel.clone()));
        served.record("v1", || vec![cluster("a"), cluster("b")]);
        served.record("v2", || vec![cluster("a")]);
        let again = served.record("v1", || unreachable!("already remembered"));
        assert_eq!(again.len(), 2);
        cancel.cancel();
        writer.await.unwrap();

        let again = Served::load(&path);
        let v1 = again.get("v1").expect("v1 survives the restart");
        assert_eq!(v1.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(v1["a"], cluster("a").1);
        assert!(again.get("v3").is_none());

        let small = Served::in_memory();
        for i in 0..=MAX_VERSIONS {
            small.record(&format!("v{i}"), || vec![cluster("a")]);
            if i == 1 {
                // Used again: the oldest is now v1's neighbour, v0 stays.
                small.get("v0");
            }
        }
        assert!(small.get("v0").is_some());
        assert!(small.get("v1").is_none(), "least recently used goes");
        std::fs::write(&path, b"\xff\xff not a record").unwrap();
        assert!(
            Served::load(&path).get("v1").is_none(),
            "a bad file is set aside"
        );
    }
}
