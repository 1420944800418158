//! Immutable per-proxy snapshots with content-derived versions, cached per (proxy, state
//! generation, endpoints generation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::debounce::{self, Published};
use crate::model::{ProxyIdentity, State};
use crate::translate::{self, Resources};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Make-before-break push order: clusters, endpoints, listeners, routes.
pub const PUSH_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Whether an empty `resource_names` means "everything" for this type (SotW wildcard).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeSnapshot {
    /// Hash over the (name, resource version) pairs: unchanged output, unchanged version.
    pub version: String,
    pub resources: BTreeMap<String, Any>,
    /// Each resource's own content hash (delta ADS sends only the resources whose hash moved).
    pub versions: BTreeMap<String, String>,
    /// Endpoints: clusters we manage whose discovery has not answered yet. Asked for by name,
    /// they get no assignment (Envoy keeps what it has), unlike names we do not manage.
    pub pending: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub generation: u64,
    /// The generation of the discovered endpoints it was built from.
    pub endpoints_generation: u64,
    pub types: BTreeMap<&'static str, TypeSnapshot>,
}

impl Snapshot {
    pub fn from_resources(generation: u64, r: Resources) -> Self {
        let mut types = BTreeMap::new();
        types.insert(
            CLUSTER,
            typed(
                r.clusters
                    .into_iter()
                    .map(|c| (c.name.clone(), pack_any(c))),
            ),
        );
        let mut endpoints = typed(
            r.endpoints
                .into_iter()
                .map(|e| (e.cluster_name.clone(), pack_any(e))),
        );
        endpoints.pending = r.pending.into_iter().collect();
        types.insert(ENDPOINT, endpoints);
        types.insert(
            LISTENER,
            typed(
                r.listeners
                    .into_iter()
                    .map(|l| (l.name.clone(), pack_any(l))),
            ),
        );
        types.insert(
            ROUTE,
            typed(
                r.routes
                    .into_iter()
                    .map(|rc| (rc.name.clone(), pack_any(rc))),
            ),
        );
        Snapshot {
            generation,
            endpoints_generation: 0,
            types,
        }
    }

    pub fn get(&self, type_url: &str) -> Option<&TypeSnapshot> {
        self.types.get(type_url)
    }
}

fn typed(items: impl Iterator<Item = (String, Any)>) -> TypeSnapshot {
    let resources: BTreeMap<String, Any> = items.collect();
    let mut h = Sha256::new();
    let mut versions = BTreeMap::new();
    for (name, any) in &resources {
        h.update(name.as_bytes());
        h.update([0]);
        // The type URL is the same for every resource of a type: the encoded value is the content.
        let own = Sha256::digest(&any.value);
        h.update(own);
        versions.insert(name.clone(), hex8(&own));
    }
    let version = hex8(&h.finalize());
    TypeSnapshot {
        version,
        resources,
        versions,
        pending: BTreeSet::new(),
    }
}

fn hex8(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds each proxy's snapshot once per (store generation, endpoints generation) and shares it
/// between its streams. The endpoints are the newest published ones: since versions are content
/// hashes, an endpoint change moves only the ClusterLoadAssignment versions.
#[derive(Debug)]
pub struct Snapshots {
    cache: Mutex<HashMap<ProxyIdentity, Arc<Snapshot>>>,
    published: watch::Receiver<Published>,
}

impl Default for Snapshots {
    /// No discovered endpoints, ever.
    fn default() -> Self {
        Snapshots::new(debounce::channel(Arc::new(State::default())).1)
    }
}

impl Snapshots {
    /// Endpoints are read from the publications on `published`.
    pub fn new(published: watch::Receiver<Published>) -> Self {
        Snapshots {
            cache: Mutex::new(HashMap::new()),
            published,
        }
    }

    /// The proxy's snapshot for this state and the newest endpoints, and whether it had to be
    /// built now.
    pub fn get(
        &self,
        state: &State,
        who: &ProxyIdentity,
    ) -> Result<(Arc<Snapshot>, bool), translate::Error> {
        let endpoints = self.published.borrow().endpoints.clone();
        if let Some(s) = self.lock().get(who)
            && s.generation == state.generation
            && s.endpoints_generation == endpoints.generation
        {
            return Ok((s.clone(), false));
        }
        // Built outside the lock: two streams of one proxy may both build once, never block each other.
        let resources = translate::translate(state, who, &endpoints)?;
        // What the translation had to leave out (SDS/ACM certificates...) is the operator's to fix.
        for reason in &resources.unserved {
            tracing::warn!(proxy = %who, generation = state.generation, reason = %reason, "configuration not served");
        }
        let mut snap = Snapshot::from_resources(state.generation, resources);
        snap.endpoints_generation = endpoints.generation;
        let snap = Arc::new(snap);
        self.lock().insert(who.clone(), snap.clone());
        Ok((snap, true))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProxyIdentity, Arc<Snapshot>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
