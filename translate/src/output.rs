//! What a translation produces, in the form the xDS layer sends: every resource encoded, with a
//! content hash.
//!
//! At App Mesh's quota scale most of a proxy's bytes are its backends' virtual hosts (50 backends
//! × 50 routes), and every caller of a service gets the same ones. So a virtual host is kept as
//! its name and domains plus the rest of it encoded once ([`Host`]), and a route configuration is
//! assembled by concatenating those encodings: protobuf fields may be written one after another,
//! and writing fields 1 and 2 before the body keeps prost's canonical field order, so the bytes
//! are the ones prost would write. Its hash is a hash of the parts' hashes, never of the whole,
//! and its bytes are only written when it is sent ([`Item::encode`]): a snapshot holds the parts,
//! so a proxy costs its list of hosts, not a copy of all their routes.

use std::sync::Arc;

use prost::Message;
use prost::encoding::{self, WireType};
use sha2::{Digest, Sha256};
use trellis_envoy_api::pb::envoy::config::cluster::v3::Cluster;
use trellis_envoy_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use trellis_envoy_api::pb::envoy::config::listener::v3::Listener;
use trellis_envoy_api::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};

use super::{Error, Resources};

/// A SHA-256 content hash.
pub type Hash = [u8; 32];

/// Encoded bytes and the hash that versions them.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub hash: Hash,
}

impl std::fmt::Debug for Blob {
    /// The length and the hash, never the bytes: an ACM secret's bytes hold its private key, and
    /// a debug print of a snapshot or a publication must not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("len", &self.bytes.len())
            .field("hash", &&self.hash[..4])
            .finish()
    }
}

impl Blob {
    pub fn of<M: Message>(m: &M) -> Self {
        let bytes = m.encode_to_vec();
        let hash = Sha256::digest(&bytes).into();
        Blob { bytes, hash }
    }
}

/// One resource as a snapshot holds it: its name, content hash, and what writes its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub hash: Hash,
    content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Encoded(Arc<Blob>),
    /// Assembled from its hosts when sent.
    Routes(Arc<RouteConfig>),
}

impl Item {
    pub(super) fn encoded(name: String, blob: Arc<Blob>) -> Self {
        Item {
            name,
            hash: blob.hash,
            content: Content::Encoded(blob),
        }
    }

    /// The resource's protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        match &self.content {
            Content::Encoded(blob) => blob.bytes.clone(),
            Content::Routes(rc) => rc.encode(),
        }
    }

    pub fn encoded_len(&self) -> usize {
        match &self.content {
            Content::Encoded(blob) => blob.bytes.len(),
            Content::Routes(rc) => rc.encoded_len(),
        }
    }
}

/// Resources that carry their own name.
pub(super) trait Named: Message + Default {
    fn name(&self) -> &str;
}

impl Named for Cluster {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for ClusterLoadAssignment {
    fn name(&self) -> &str {
        &self.cluster_name
    }
}

/// A resource built for this proxy, or one encoded once for every proxy of a generation.
#[derive(Clone, Debug)]
pub(super) enum Part<T> {
    /// Boxed: most parts are shared, and they sort by moving.
    Built(Box<T>),
    Shared(Item),
}

impl<T: Named> Part<T> {
    pub(super) fn built(t: T) -> Self {
        Part::Built(Box::new(t))
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Part::Built(t) => t.name(),
            Part::Shared(i) => &i.name,
        }
    }

    pub(super) fn shared(t: &T) -> Item {
        Item::encoded(t.name().to_string(), Arc::new(Blob::of(t)))
    }

    fn item(self) -> Item {
        match self {
            Part::Built(t) => Self::shared(&*t),
            Part::Shared(i) => i,
        }
    }

    fn decode(self) -> Result<T, Error> {
        match self {
            Part::Built(t) => Ok(*t),
            Part::Shared(i) => Ok(T::decode(i.encode().as_slice())?),
        }
    }
}

/// A virtual host: its name and domains as each use needs them, every other field encoded once,
/// and a hash of the three.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Host {
    pub name: String,
    pub domains: Vec<String>,
    pub body: Arc<Blob>,
    hash: Hash,
}

impl Host {
    /// `vh` with its name and domains set aside and the rest encoded (proto3 writes no empty
    /// field, so the body holds fields 3 and up only).
    pub(super) fn new(mut vh: VirtualHost) -> Arc<Self> {
        let name = std::mem::take(&mut vh.name);
        let domains = std::mem::take(&mut vh.domains);
        Host::with(name, domains, Arc::new(Blob::of(&vh)))
    }

    pub(super) fn with(name: String, domains: Vec<String>, body: Arc<Blob>) -> Arc<Self> {
        let mut h = Sha256::new();
        hash_str(&mut h, &name);
        h.update((domains.len() as u64).to_le_bytes());
        for d in &domains {
            hash_str(&mut h, d);
        }
        h.update(body.hash);
        let hash = h.finalize().into();
        Arc::new(Host {
            name,
            domains,
            body,
            hash,
        })
    }

    fn encoded_len(&self) -> usize {
        let name = if self.name.is_empty() {
            0
        } else {
            encoding::string::encoded_len(1, &self.name)
        };
        name + encoding::string::encoded_len_repeated(2, &self.domains) + self.body.bytes.len()
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        if !self.name.is_empty() {
            encoding::string::encode(1, &self.name, buf);
        }
        encoding::string::encode_repeated(2, &self.domains, buf);
        buf.extend_from_slice(&self.body.bytes);
    }
}

fn hash_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// A route configuration as a list of virtual hosts (its only fields besides the name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RouteConfig {
    pub name: String,
    /// Shared: a service's host is the same in every caller's route configuration.
    pub hosts: Vec<Arc<Host>>,
}

impl RouteConfig {
    pub(super) fn of(name: &str, hosts: Vec<VirtualHost>) -> Self {
        RouteConfig {
            name: name.to_string(),
            hosts: hosts.into_iter().map(Host::new).collect(),
        }
    }

    /// A hash of its parts' hashes.
    fn item(self) -> Item {
        let mut h = Sha256::new();
        hash_str(&mut h, &self.name);
        for host in &self.hosts {
            h.update(host.hash);
        }
        Item {
            name: self.name.clone(),
            hash: h.finalize().into(),
            content: Content::Routes(Arc::new(self)),
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::string::encoded_len(1, &self.name)
            + self
                .hosts
                .iter()
                .map(|h| {
                    let l = h.encoded_len();
                    encoding::key_len(2) + encoding::encoded_len_varint(l as u64) + l
                })
                .sum::<usize>()
    }

    /// The bytes prost would write for the `RouteConfiguration`.
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.encoded_len());
        encoding::string::encode(1, &self.name, &mut bytes);
        for host in &self.hosts {
            encoding::encode_key(2, WireType::LengthDelimited, &mut bytes);
            encoding::encode_varint(host.encoded_len() as u64, &mut bytes);
            host.encode(&mut bytes);
        }
        bytes
    }
}

/// What a translation accumulates, parts built here and parts shared alike.
#[derive(Debug, Default)]
pub(super) struct Output {
    pub clusters: Vec<Part<Cluster>>,
    pub endpoints: Vec<Part<ClusterLoadAssignment>>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfig>,
    pub unserved: Vec<String>,
    pub pending: Vec<String>,
}

impl Output {
    /// Each resource once (the first of a name wins: the same name is the same content), in name
    /// order, so equal inputs give equal outputs.
    pub(super) fn finish(mut self) -> Self {
        self.clusters.sort_by(|a, b| a.name().cmp(b.name()));
        self.clusters.dedup_by(|a, b| a.name() == b.name());
        self.endpoints.sort_by(|a, b| a.name().cmp(b.name()));
        self.endpoints.dedup_by(|a, b| a.name() == b.name());
        self.routes.sort_by(|a, b| a.name.cmp(&b.name));
        self.unserved.sort();
        self.unserved.dedup();
        self.pending.sort();
        self.pending.dedup();
        self
    }

    pub(super) fn encode(self) -> Encoded {
        Encoded {
            clusters: self.clusters.into_iter().map(Part::item).collect(),
            endpoints: self.endpoints.into_iter().map(Part::item).collect(),
            listeners: self
                .listeners
                .iter()
                .map(|l| Item::encoded(l.name.clone(), Arc::new(Blob::of(l))))
                .collect(),
            routes: self.routes.into_iter().map(RouteConfig::item).collect(),
            unserved: self.unserved,
            pending: self.pending,
        }
    }

    /// The same resources as messages (tests and debugging read them; the xDS layer never does).
    pub(super) fn decode(self) -> Result<Resources, Error> {
        Ok(Resources {
            clusters: self
                .clusters
                .into_iter()
                .map(Part::decode)
                .collect::<Result<_, _>>()?,
            endpoints: self
                .endpoints
                .into_iter()
                .map(Part::decode)
                .collect::<Result<_, _>>()?,
            listeners: self.listeners,
            routes: self
                .routes
                .iter()
                .map(|rc| Ok(RouteConfiguration::decode(rc.encode().as_slice())?))
                .collect::<Result<_, Error>>()?,
            unserved: self.unserved,
            pending: self.pending,
        })
    }
}

/// Everything one Envoy is sent, encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub clusters: Vec<Item>,
    pub endpoints: Vec<Item>,
    pub listeners: Vec<Item>,
    pub routes: Vec<Item>,
    /// As [`Resources::unserved`].
    pub unserved: Vec<String>,
    /// As [`Resources::pending`].
    pub pending: Vec<String>,
}

impl Encoded {
    /// Messages built elsewhere (tests, an empty configuration), encoded one by one.
    pub fn from_resources(r: Resources) -> Self {
        let out = Output {
            clusters: r.clusters.into_iter().map(Part::built).collect(),
            endpoints: r.endpoints.into_iter().map(Part::built).collect(),
            listeners: r.listeners,
            routes: r
                .routes
                .into_iter()
                .map(|rc| RouteConfig::of(&rc.name, rc.virtual_hosts))
                .collect(),
            unserved: r.unserved,
            pending: r.pending,
        };
        out.encode()
    }
}

#[cfg(test)]
mod tests {
    use trellis_envoy_api::pb::envoy::config::route::v3::{Route, RouteMatch, route_match};

    use super::*;

    fn host(name: &str, domains: &[&str], prefixes: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: prefixes
                .iter()
                .map(|p| Route {
                    name: format!("r{p}"),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix(p.to_string())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn assembled_route_config_is_byte_for_byte_what_prost_writes() {
        let whole = RouteConfiguration {
            name: "rds_egress_http_8080".into(),
            virtual_hosts: vec![
                host("a.local", &["a.local", "a.local:8080"], &["/x", "/"]),
                host("", &[], &["/"]),
                host("b.local", &["*"], &[]),
            ],
            ..Default::default()
        };
        let rc = RouteConfig {
            name: whole.name.clone(),
            hosts: whole.virtual_hosts.iter().cloned().map(Host::new).collect(),
        };
        assert_eq!(rc.encoded_len(), whole.encoded_len());
        assert_eq!(rc.item().encode(), whole.encode_to_vec());
    }

    #[test]
    fn route_config_hash_moves_with_any_part_and_only_then() {
        let rc = |domain: &str, prefix: &str| RouteConfig {
            name: "rc".into(),
            hosts: vec![Host::new(host("a", &[domain], &[prefix]))],
        };
        let base = rc("a", "/").item().hash;
        assert_eq!(base, rc("a", "/").item().hash);
        assert_ne!(base, rc("b", "/").item().hash, "a domain");
        assert_ne!(base, rc("a", "/b").item().hash, "a route");
        // Name and domains are length-prefixed: moving a byte between them is a change.
        let split = |name: &str, domain: &str| RouteConfig {
            name: "rc".into(),
            hosts: vec![Host::new(host(name, &[domain], &[]))],
        };
        assert_ne!(split("ab", "c").item().hash, split("a", "bc").item().hash);
    }
}
