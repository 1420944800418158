//! The ADS server (state of the world and delta): a debouncer turns store commits into publications, one task
//! per Envoy stream serves them with the per-type ACK/NACK state machine of the xDS protocol.

mod authority;
pub mod debounce;
mod delta;
mod grpc;
pub mod metrics;
mod served;
mod service;
mod session;
pub mod snapshot;
mod sotw;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::attest::Attestor;
pub use debounce::{Debounce, Published};
pub use metrics::Metrics;
pub use served::Served;
use snapshot::Snapshots;
use trellis_model::ProxyIdentity;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the ADS socket {path}: {source}")]
    BindUnix {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the ADS address {addr}: {source}")]
    BindTcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ADS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// App Mesh's limit of Envoy connections per virtual node or gateway.
pub const DEFAULT_CONNECTIONS_PER_PROXY: usize = 50;

/// How long listeners and routes wait for a new cluster's endpoints before they go anyway:
/// Envoy's own default wait for an EDS cluster (its initial fetch timeout), so a route is never
/// held past the moment Envoy itself would stop warming the cluster.
pub const DEFAULT_WARMING_HOLD: Duration = Duration::from_secs(15);

/// The file in the data directory where the cluster sets sent on SotW CDS outlive a restart.
pub const SERVED_FILE: &str = "xds-served.pb";

/// How the ADS server treats its streams.
#[derive(Debug)]
pub struct Settings {
    /// Envoy connections per virtual node or gateway.
    pub max_per_proxy: usize,
    /// See [`DEFAULT_WARMING_HOLD`].
    pub warming_hold: Duration,
    /// The cluster sets sent on SotW CDS, so a reconnecting Envoy keeps what it still uses.
    pub served: Arc<Served>,
    /// Who may claim which node ([`Attestor::none`] unless set).
    pub attestor: Arc<Attestor>,
}

impl Settings {
    /// The defaults, with `max_per_proxy` connections per proxy and sets kept in memory only.
    pub fn new(max_per_proxy: usize) -> Self {
        Settings {
            max_per_proxy,
            warming_hold: DEFAULT_WARMING_HOLD,
            served: Arc::new(Served::in_memory()),
            attestor: Arc::new(Attestor::none()),
        }
    }
}

/// Shared by every stream.
#[derive(Debug)]
pub struct Ads {
    published: watch::Receiver<Published>,
    /// The store's own channel: a stream that connects reads the freshest committed state, so a
    /// proxy created a moment ago is found before the debouncer publishes it.
    committed: watch::Receiver<Arc<trellis_model::State>>,
    snapshots: Snapshots,
    pub metrics: Arc<Metrics>,
    next_stream: AtomicU64,
    cancel: CancellationToken,
    max_per_proxy: usize,
    warming_hold: Duration,
    served: Arc<Served>,
    attestor: Arc<Attestor>,
    per_proxy: Mutex<HashMap<ProxyIdentity, usize>>,
    /// The proxies with at least one stream: what discovery must serve on this agent.
    connected: watch::Sender<BTreeSet<ProxyIdentity>>,
    /// Attested streams per proxy, and the proxies with at least one: the only ones whose ACM
    /// certificates are exported (an unattested caller cannot make the agent fetch a key).
    attested_per_proxy: Mutex<HashMap<ProxyIdentity, usize>>,
    attested: watch::Sender<BTreeSet<ProxyIdentity>>,
}

impl Ads {
    pub fn new(
        published: watch::Receiver<Published>,
        committed: watch::Receiver<Arc<trellis_model::State>>,
        metrics: Arc<Metrics>,
        settings: Settings,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Ads {
            snapshots: Snapshots::new(published.clone()),
            published,
            committed,
            metrics,
            next_stream: AtomicU64::new(1),
            cancel,
            max_per_proxy: settings.max_per_proxy,
            warming_hold: settings.warming_hold,
            served: settings.served,
            attestor: settings.attestor,
            per_proxy: Mutex::new(HashMap::new()),
            connected: watch::channel(BTreeSet::new()).0,
            attested_per_proxy: Mutex::new(HashMap::new()),
            attested: watch::channel(BTreeSet::new()).0,
        })
    }

    /// The set of proxies with a stream open, updated as the first connects and the last leaves.
    pub fn connected_proxies(&self) -> watch::Receiver<BTreeSet<ProxyIdentity>> {
        self.connected.subscribe()
    }

    /// The set of proxies with an attested stream open (see [`Ads::connected_proxies`]).
    pub fn attested_proxies(&self) -> watch::Receiver<BTreeSet<ProxyIdentity>> {
        self.attested.subscribe()
    }

    pub fn service(self: &Arc<Self>) -> grpc::AdsServer {
        grpc::AdsServer::new(self.clone())
    }

    /// Takes one of the proxy's connection slots, or says it has none left.
    fn admit(self: &Arc<Self>, who: &ProxyIdentity, attested: bool) -> Option<Slot> {
        let mut map = self.per_proxy.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(who.clone()).or_default();
        if *n >= self.max_per_proxy {
            return None;
        }
        *n += 1;
        if *n == 1 {
            self.connected.send_modify(|c| {
                c.insert(who.clone());
            });
        }
        drop(map);
        if attested {
            count(&self.attested_per_proxy, &self.attested, who, true);
        }
        Some(Slot {
            ads: self.clone(),
            who: who.clone(),
            attested,
        })
    }
}

/// One more (`up`) or one fewer stream of `who` in `counts`; `set` follows which are non-zero.
fn count(
    counts: &Mutex<HashMap<ProxyIdentity, usize>>,
    set: &watch::Sender<BTreeSet<ProxyIdentity>>,
    who: &ProxyIdentity,
    up: bool,
) {
    let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
    let n = map.entry(who.clone()).or_default();
    if up {
        *n += 1;
    } else {
        *n = n.saturating_sub(1);
    }
    if *n == 0 {
        map.remove(who);
        set.send_modify(|c| {
            c.remove(who);
        });
    } else if up && *n == 1 {
        set.send_modify(|c| {
            c.insert(who.clone());
        });
    }
}

/// A connection slot of one proxy, given back when the stream ends.
struct Slot {
    ads: Arc<Ads>,
    who: ProxyIdentity,
    attested: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.attested {
            count(
                &self.ads.attested_per_proxy,
                &self.ads.attested,
                &self.who,
                false,
            );
        }
        let mut map = self.ads.per_proxy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.who);
                // Its last stream is gone: a reconnect translates afresh, and memory stays
                // bounded by the proxies connected.
                self.ads.snapshots.forget(&self.who);
                self.ads.connected.send_modify(|c| {
                    c.remove(&self.who);
                });
            }
        }
    }
}

/// Binds the Unix socket so that any local uid (Envoy runs as 1337) can connect, or only the
/// members of `group` (0660). Connecting proves nothing by itself: each stream is attested.
pub fn bind_unix(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::BindUnix {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail; nothing else lives at this path.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
            0o660
        }
        None => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// ADS and, beside it, load reports (attested as ADS streams are), on any transport.
fn services(ads: &Arc<Ads>, lrs: &Arc<crate::lrs::Lrs>) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(ads.service())
        .add_service(lrs.service(ads.attestor.clone()))
}

/// Serves ADS (and `lrs`, load reports, beside it) on the Unix socket.
pub async fn serve_unix(
    ads: Arc<Ads>,
    lrs: Arc<crate::lrs::Lrs>,
    listener: tokio::net::UnixListener,
) -> Result<(), Error> {
    let cancel = ads.cancel.clone();
    services(&ads, &lrs)
        .serve_with_incoming_shutdown(
            // grpc-core and grpc-java clients name the socket path as :authority (authority.rs).
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                |conn| conn.map(authority::AuthorityTolerant::new),
            ),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// Serves ADS (and `lrs`) over TCP.
pub async fn serve_tcp(
    ads: Arc<Ads>,
    lrs: Arc<crate::lrs::Lrs>,
    listener: tokio::net::TcpListener,
) -> Result<(), Error> {
    let cancel = ads.cancel.clone();
    services(&ads, &lrs)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// TCP ADS (and `lrs`) over mutual TLS: the node of each stream must be a URI SAN of its
/// client certificate.
pub async fn serve_tls(
    ads: Arc<Ads>,
    lrs: Arc<crate::lrs::Lrs>,
    listener: crate::tls::TlsListener,
) -> Result<(), Error> {
    let cancel = ads.cancel.clone();
    services(&ads, &lrs)
        .serve_with_incoming_shutdown(
            Box::pin(crate::attest::mtls::incoming(listener)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
