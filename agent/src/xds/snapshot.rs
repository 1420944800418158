//! Immutable per-proxy snapshots with content-derived versions, cached per (proxy, state
//! generation, endpoints generation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::debounce::{self, Published};
use trellis_model::{ProxyIdentity, State};
use trellis_translate::{CloudMapKey, Encoded, Inputs, Item, Memo, Resources};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// ACM certificates and trust ([`crate::acm`]): only in snapshots served to attested streams.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Make-before-break push order: clusters, endpoints, listeners, routes; secrets are named
/// (Envoy asks for those its listeners and clusters use) and their removals come last.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Whether an empty `resource_names` means "everything" for this type (SotW wildcard).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// Whether Trellis serves this type: per-stream state and metric labels exist only for these, so
/// a client naming other types cannot grow either.
pub fn is_served_type(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeSnapshot {
    /// Hash over the (name, resource version) pairs: unchanged output, unchanged version.
    pub version: String,
    pub resources: BTreeMap<String, Packed>,
    /// Each resource's own content hash (delta ADS sends only the resources whose hash moved).
    pub versions: BTreeMap<String, String>,
    /// Endpoints: clusters we manage whose discovery has not answered yet. Asked for by name,
    /// they get no assignment (Envoy keeps what it has), unlike names we do not manage.
    pub pending: BTreeSet<String>,
}

/// A resource as a snapshot holds it: its parts, shared with the translations of other proxies
/// (a proxy's route configurations are most of its bytes), written into an `Any` only when sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    type_url: &'static str,
    item: Item,
}

impl Packed {
    pub fn any(&self) -> Any {
        Any {
            type_url: self.type_url.to_string(),
            value: self.item.encode(),
        }
    }

    pub fn encoded_len(&self) -> usize {
        self.item.encoded_len()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub generation: u64,
    /// The generation of the discovered endpoints it was built from.
    pub endpoints_generation: u64,
    /// Shared: a snapshot kept over a change that left its proxy alone is a new generation over
    /// the same content.
    pub types: Arc<BTreeMap<&'static str, TypeSnapshot>>,
    /// Endpoints (cluster names) assigned empty only because Cloud Map has not answered for them
    /// on this agent yet (every call failed): sent to an Envoy that has nothing for them, never
    /// over endpoints an Envoy already has.
    pub unanswered: Arc<BTreeSet<String>>,
}

impl Snapshot {
    /// Messages built elsewhere (tests, the empty configuration of a proxy that went away).
    pub fn from_resources(generation: u64, r: Resources) -> Self {
        Snapshot::from_encoded(generation, Encoded::from_resources(r))
    }

    pub fn from_encoded(generation: u64, r: Encoded) -> Self {
        let mut types = BTreeMap::new();
        types.insert(CLUSTER, typed(CLUSTER, r.clusters));
        let mut endpoints = typed(ENDPOINT, r.endpoints);
        endpoints.pending = r.pending.into_iter().collect();
        types.insert(ENDPOINT, endpoints);
        types.insert(LISTENER, typed(LISTENER, r.listeners));
        types.insert(ROUTE, typed(ROUTE, r.routes));
        Snapshot {
            generation,
            endpoints_generation: 0,
            types: Arc::new(types),
            unanswered: Arc::default(),
        }
    }

    pub fn get(&self, type_url: &str) -> Option<&TypeSnapshot> {
        self.types.get(type_url)
    }

    /// This snapshot as served to a stream that is not attested: no secrets (its listeners and
    /// clusters that need one stay unwarmed, never plaintext).
    pub fn without_secrets(self: &Arc<Self>) -> Arc<Self> {
        if self.get(SECRET).is_none() {
            return self.clone();
        }
        let mut types = (*self.types).clone();
        types.remove(SECRET);
        Arc::new(Snapshot {
            types: Arc::new(types),
            ..(**self).clone()
        })
    }

    /// Whether `cluster` is an EDS cluster of this snapshot (assigned, or waiting on discovery).
    pub fn is_eds(&self, cluster: &str) -> bool {
        self.get(ENDPOINT)
            .is_some_and(|t| t.resources.contains_key(cluster) || t.pending.contains(cluster))
    }
}

/// The clusters of `who`'s mesh whose Cloud Map key is in `keys`, by the name every caller gives
/// them: App Mesh's `cds_egress_MESH_NODE_PROTO_PORT`, one per listener of the node (a test pins
/// it to what translation names them).
fn cluster_names_of(
    state: &State,
    who: &ProxyIdentity,
    keys: &BTreeSet<CloudMapKey>,
) -> Arc<BTreeSet<String>> {
    if keys.is_empty() {
        return Arc::default();
    }
    let Some(mesh) = state.meshes.get(&who.mesh) else {
        return Arc::default();
    };
    let mut names = BTreeSet::new();
    for (node, vn) in &mesh.virtual_nodes {
        let key = vn
            .spec
            .service_discovery
            .as_ref()
            .and_then(|sd| sd.aws_cloud_map.as_ref())
            .map(CloudMapKey::of);
        if !key.is_some_and(|k| keys.contains(&k)) {
            continue;
        }
        for l in vn.spec.listeners.iter().flatten() {
            let (proto, port) = (l.port_mapping.protocol.as_str(), l.port_mapping.port);
            names.insert(format!("cds_egress_{}_{node}_{proto}_{port}", who.mesh));
        }
    }
    Arc::new(names)
}

/// The ACM secrets `who`'s own spec names that are published: nothing else is ever in its
/// snapshot, so no stream of another node can be handed them.
fn secrets_of(
    state: &State,
    who: &ProxyIdentity,
    published: &BTreeMap<String, Item>,
) -> Option<TypeSnapshot> {
    if published.is_empty() {
        return None;
    }
    let items: Vec<Item> = trellis_translate::acm_secrets(state, who)
        .iter()
        .filter_map(|s| published.get(&s.name()).cloned())
        .collect();
    (!items.is_empty()).then(|| typed(SECRET, items))
}

/// `types` with `secrets` as its secret type (shared as it is when they are the same).
fn with_secrets(
    types: Arc<BTreeMap<&'static str, TypeSnapshot>>,
    secrets: Option<TypeSnapshot>,
) -> Arc<BTreeMap<&'static str, TypeSnapshot>> {
    if types.get(SECRET) == secrets.as_ref() {
        return types;
    }
    let mut t = (*types).clone();
    match secrets {
        Some(s) => t.insert(SECRET, s),
        None => t.remove(SECRET),
    };
    Arc::new(t)
}

/// Versions are the items' own hashes (computed with the encoding, from parts for route
/// configurations), and the type's version a hash over them.
fn typed(type_url: &'static str, items: Vec<Item>) -> TypeSnapshot {
    let mut h = Sha256::new();
    let mut versions = BTreeMap::new();
    let mut resources = BTreeMap::new();
    for item in items {
        h.update(item.name.as_bytes());
        h.update([0]);
        h.update(item.hash);
        versions.insert(item.name.clone(), hex8(&item.hash));
        resources.insert(item.name.clone(), Packed { type_url, item });
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(16);
    for b in &digest[..8] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Builds each proxy's snapshot once per (store generation, endpoints generation) and shares it
/// between its streams. The endpoints are the newest published ones: since versions are content
/// hashes, an endpoint change moves only the ClusterLoadAssignment versions.
#[derive(Debug)]
pub struct Snapshots {
    /// Each proxy's newest snapshot and the inputs it was translated from.
    cache: Mutex<HashMap<ProxyIdentity, Cached>>,
    /// What the translations of the newest generations share.
    memo: Mutex<Arc<Memo>>,
    published: watch::Receiver<Published>,
}

#[derive(Debug)]
struct Cached {
    snap: Arc<Snapshot>,
    inputs: Option<Inputs>,
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
            memo: Mutex::default(),
            published,
        }
    }

    /// The proxy's snapshot for this state and the newest endpoints, and whether it had to be
    /// built now (a change that leaves the proxy's inputs alone reuses its snapshot).
    pub fn get(
        &self,
        state: &State,
        who: &ProxyIdentity,
    ) -> Result<(Arc<Snapshot>, bool), trellis_translate::Error> {
        let (endpoints, unanswered, secrets) = {
            let p = self.published.borrow();
            (p.endpoints.clone(), p.unanswered.clone(), p.secrets.clone())
        };
        if let Some(c) = self.lock().get(who)
            && c.snap.generation == state.generation
            && c.snap.endpoints_generation == endpoints.generation
        {
            return Ok((c.snap.clone(), false));
        }
        // Built outside the lock: two streams of one proxy may both build once, never block each other.
        let memo = self.memo(state.generation, endpoints.generation);
        let inputs = trellis_translate::inputs(state, who, &endpoints, &memo);
        let kept = self.lock().get(who).and_then(|c| {
            let same = inputs.is_some() && c.inputs == inputs;
            same.then(|| c.snap.clone())
        });
        let unanswered = cluster_names_of(state, who, &unanswered);
        let secrets = secrets_of(state, who, &secrets);
        if let Some(old) = kept {
            let snap = Arc::new(Snapshot {
                generation: state.generation,
                endpoints_generation: endpoints.generation,
                types: with_secrets(old.types.clone(), secrets),
                unanswered,
            });
            self.keep(who, &snap, inputs);
            return Ok((snap, false));
        }
        let resources = trellis_translate::translate_encoded(state, who, &endpoints, &memo)?;
        // What the translation had to leave out (SDS/ACM certificates...) is the operator's to fix.
        for reason in &resources.unserved {
            tracing::warn!(proxy = %who, generation = state.generation, reason = %reason, "configuration not served");
        }
        let mut snap = Snapshot::from_encoded(state.generation, resources);
        snap.endpoints_generation = endpoints.generation;
        snap.unanswered = unanswered;
        snap.types = with_secrets(snap.types, secrets);
        let snap = Arc::new(snap);
        self.keep(who, &snap, inputs);
        Ok((snap, true))
    }

    /// Drops the proxy's cached snapshot.
    pub fn forget(&self, who: &ProxyIdentity) {
        self.lock().remove(who);
    }

    /// Caches `snap` unless a newer one is cached already (streams of one proxy race).
    fn keep(&self, who: &ProxyIdentity, snap: &Arc<Snapshot>, inputs: Option<Inputs>) {
        let mut cache = self.lock();
        let newer = cache.get(who).is_some_and(|c| {
            (c.snap.generation, c.snap.endpoints_generation)
                > (snap.generation, snap.endpoints_generation)
        });
        if !newer {
            let snap = snap.clone();
            cache.insert(who.clone(), Cached { snap, inputs });
        }
    }

    /// The memo for these generations (an older one is replaced; a stream on a newer
    /// generation than `generation` gets a memo of its own rather than an older one's).
    fn memo(&self, generation: u64, endpoints_generation: u64) -> Arc<Memo> {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if memo.serves(generation, endpoints_generation) {
            return memo.clone();
        }
        let next = Arc::new(memo.next(generation, endpoints_generation));
        if (generation, endpoints_generation) > memo.generations() {
            *memo = next.clone();
        }
        next
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProxyIdentity, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
