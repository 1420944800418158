//! Caller-side clusters: one per (node, listener port) that a caller's routes reach, built once
//! per translation with the client TLS of the backend that reaches it, and shared across a
//! generation's callers through the memo when no client policy applies.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_envoy_api::pb::envoy::config::cluster::v3::Cluster;
use trellis_model::{
    ClientPolicyTls, DnsResponseType, IpPreference, MeshState, PortProtocol, VirtualNodeSpec,
};

use super::output::{Output, Part};
use super::plan::{ServicePlan, service_plan, shared_plan};
use super::{CloudMapKey, Endpoints, Memo, cloud_map, envoy, memo, policy};

/// A cluster built for a (node, port): its name, port and protocol.
pub(super) type Built = Option<(String, u32, PortProtocol)>;

/// Clusters built so far: by node, then listener port.
type Clusters = BTreeMap<String, Vec<(Option<i64>, Built)>>;

/// The caller's side of one backend: the virtual service it calls (its name is the SNI the
/// clusters send) and the client policy that applies to it (the backend's own, else the caller's
/// `backendDefaults`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Client<'a> {
    pub service: &'a str,
    pub policy: Option<&'a ClientPolicyTls>,
}

/// One translation: the mesh, the endpoints, what the generation shares, and the clusters built
/// so far.
pub(super) struct Ctx<'a> {
    pub mesh_name: &'a str,
    pub mesh: &'a MeshState,
    pub endpoints: &'a Endpoints,
    /// What this generation's translations share; none for gateways, whose listeners' pools
    /// change the clusters they reach.
    memo: Option<&'a Memo>,
    /// Clusters already built in this translation (many routes target the same nodes), by node,
    /// then port. A cache only: a (node, port) is always asked for with the same [`Client`].
    built: RefCell<Clusters>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(mesh_name: &'a str, mesh: &'a MeshState, endpoints: &'a Endpoints) -> Self {
        Ctx {
            mesh_name,
            mesh,
            endpoints,
            memo: None,
            built: RefCell::default(),
        }
    }

    pub(super) fn with_memo(mut self, memo: &'a Memo) -> Self {
        self.memo = Some(memo);
        self
    }
}

impl Ctx<'_> {
    /// The caller-side cluster for `node`'s listener on `port` (its only listener when `None`),
    /// with `client`'s TLS, built once per translation.
    pub(super) fn node_cluster(
        &self,
        node: &str,
        port: Option<i64>,
        client: Client<'_>,
        out: &mut Output,
    ) -> Built {
        let done = self.built.borrow().get(node).and_then(|ports| {
            ports
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, b)| b.clone())
        });
        if let Some(done) = done {
            return done;
        }
        let made = self.build_node_cluster(node, port, client, out);
        self.built
            .borrow_mut()
            .entry(node.to_string())
            .or_default()
            .push((port, made.clone()));
        made
    }

    fn build_node_cluster(
        &self,
        node: &str,
        port: Option<i64>,
        client: Client<'_>,
        out: &mut Output,
    ) -> Built {
        let shared = self.memo.map(|m| {
            m.cluster((self.mesh_name, node, port), || {
                self.shared_cluster(node, port)
            })
        });
        let (name, port_n, proto) = match &shared {
            Some(s) => s.built.clone()?,
            None => cluster_identity(self.mesh_name, self.mesh, node, port)?,
        };
        // Only a client policy reads the target (for the SANs it demands by default).
        let target = client
            .policy
            .and_then(|_| self.mesh.virtual_nodes.get(node))
            .map(|n| &n.spec);
        let tls = policy::client_tls(
            client.policy,
            client.service,
            port_n,
            proto,
            target,
            self.endpoints.acm.as_deref(),
            &mut out.unserved,
        );
        match (tls, shared) {
            (policy::ClientTls::Refuse, _) => None,
            // No caller policy applies: the cluster (with the TLS the server's listener asks
            // for) is the same for every caller.
            (policy::ClientTls::ServerDecides, Some(shared)) => {
                out.clusters
                    .extend(shared.cluster.clone().map(Part::Shared));
                out.endpoints
                    .extend(shared.endpoints.clone().map(Part::Shared));
                out.pending.extend(shared.pending.clone());
                out.unserved.extend(shared.unserved.iter().cloned());
                shared.built.clone()
            }
            (tls, _) => {
                let mut c = self.plain_cluster(node, (&name, port_n, proto), out)?;
                if let policy::ClientTls::Tls(socket) = tls {
                    envoy::set_transport_socket(&mut c, socket);
                }
                out.clusters.push(Part::built(c));
                Some((name, port_n, proto))
            }
        }
    }

    /// The cluster to `node` before any client TLS, with its endpoints.
    fn plain_cluster(
        &self,
        node: &str,
        (name, port, proto): (&str, u32, PortProtocol),
        out: &mut Output,
    ) -> Option<Cluster> {
        let target = self.mesh.virtual_nodes.get(node)?;
        let mesh_pref = policy::mesh_ip_preference(self.mesh);
        let mut c = upstream_cluster(
            name,
            &target.spec,
            port,
            proto,
            (self.endpoints, mesh_pref),
            out,
        )?;
        // The target's DNS IP preference, when it has none, is the mesh's.
        let dns = target
            .spec
            .service_discovery
            .as_ref()
            .and_then(|sd| sd.dns.as_ref());
        if let Some(d) = dns
            && d.ip_preference.is_none()
        {
            envoy::set_dns_lookup(&mut c, policy::lookup(mesh_pref));
        }
        Some(c)
    }

    /// [`Self::plain_cluster`], encoded for the memo with what it adds besides the cluster.
    fn shared_cluster(&self, node: &str, port: Option<i64>) -> memo::SharedCluster {
        let mut scratch = Output::default();
        let identity = cluster_identity(self.mesh_name, self.mesh, node, port);
        let cluster = identity.as_ref().and_then(|(name, port, proto)| {
            self.plain_cluster(node, (name, *port, *proto), &mut scratch)
        });
        let endpoint = scratch.endpoints.pop().map(|e| match e {
            Part::Built(e) => Part::shared(&*e),
            Part::Shared(i) => i,
        });
        memo::SharedCluster {
            built: identity.filter(|_| cluster.is_some()),
            cluster: cluster.as_ref().map(Part::shared),
            endpoints: endpoint,
            pending: scratch.pending.pop(),
            unserved: scratch.unserved,
        }
    }

    /// The lookups of `service`'s plan as every caller makes them: the memo's plan, or one built
    /// with cluster identities alone.
    pub(super) fn base_plan(&self, service: &str) -> Arc<ServicePlan> {
        match self.memo {
            Some(memo) => shared_plan(memo, self.mesh_name, self.mesh, service),
            None => Arc::new(service_plan(self.mesh, service, &mut |node, port| {
                cluster_identity(self.mesh_name, self.mesh, node, port)
            })),
        }
    }

    /// The virtual service's part of this caller's egress: `base` (its [`Self::base_plan`]) when
    /// the caller's clusters, each with the TLS of its `owner`, are what `base` found; else
    /// built for this caller (a client policy refused one of them).
    pub(super) fn caller_plan<'c>(
        &self,
        service: &str,
        base: &Arc<ServicePlan>,
        owner: &dyn Fn(&str, Option<i64>) -> Client<'c>,
        out: &mut Output,
    ) -> Arc<ServicePlan> {
        let mut same = true;
        for ((node, port), found) in &base.lookups {
            same &= self.node_cluster(node, *port, owner(node, *port), out) == *found;
        }
        if same {
            return base.clone();
        }
        Arc::new(service_plan(self.mesh, service, &mut |node, port| {
            self.node_cluster(node, port, owner(node, port), out)
        }))
    }
}

/// The caller-side cluster to `node`'s listener on `port` (its only listener when `None`), as
/// every caller names it, if the node can be reached there at all.
pub(super) fn cluster_identity(
    mesh_name: &str,
    mesh: &MeshState,
    node: &str,
    port: Option<i64>,
) -> Built {
    let target = mesh.virtual_nodes.get(node)?;
    let mut listeners = target.spec.listeners.iter().flatten();
    let l = match port {
        Some(p) => listeners.find(|l| l.port_mapping.port == p)?,
        None => match (listeners.next(), listeners.next()) {
            (Some(only), None) => only,
            _ => return None,
        },
    };
    let sd = target.spec.service_discovery.as_ref()?;
    if sd.dns.is_none() && sd.aws_cloud_map.is_none() {
        return None;
    }
    let port = u32::try_from(l.port_mapping.port).ok()?;
    let proto = l.port_mapping.protocol;
    let name = format!("cds_egress_{mesh_name}_{node}_{}_{port}", proto.as_str());
    Some((name, port, proto))
}

/// The caller-side cluster for one listener of a backend's provider node, with that listener's
/// health check, outlier detection and the TLS its mode asks of callers without a client policy,
/// DNS resolved by the target's IP preference (`Ctx::node_cluster` falls back to the mesh's).
fn upstream_cluster(
    name: &str,
    target: &VirtualNodeSpec,
    port: u32,
    proto: PortProtocol,
    (endpoints, mesh_pref): (&Endpoints, Option<IpPreference>),
    out: &mut Output,
) -> Option<Cluster> {
    let sd = target.service_discovery.as_ref()?;
    let listener = target
        .listeners
        .iter()
        .flatten()
        .find(|l| i64::from(port) == l.port_mapping.port);
    let check = listener.and_then(|l| policy::health_check(l, proto, &mut out.unserved));
    let outlier = listener.and_then(policy::outlier);
    let mut c = if let Some(dns) = &sd.dns {
        let strict = dns.response_type == Some(DnsResponseType::Endpoints);
        let mut c = envoy::dns_cluster(name, &dns.hostname, port, proto, strict);
        envoy::set_dns_lookup(&mut c, policy::lookup(dns.ip_preference));
        if let (Some((_, Some(hc_port))), Some(a)) = (&check, &mut c.load_assignment) {
            envoy::set_health_check_port(a, *hc_port);
        }
        c
    } else {
        // Endpoints from the key's instances, by the target's IP preference (else the mesh's),
        // on the listener's port: one discovery serves every preference and port.
        let cm = sd.aws_cloud_map.as_ref()?;
        let key = CloudMapKey::of(cm);
        let pref = cm.ip_preference.or(mesh_pref);
        match endpoints.cloud_map.get(&key) {
            Some(instances) => {
                let mut assignment = cloud_map::assignment(name, instances, pref, port);
                if let Some((_, Some(hc_port))) = &check {
                    envoy::set_health_check_port(&mut assignment, *hc_port);
                }
                out.endpoints.push(Part::built(assignment));
            }
            None => out.pending.push(name.to_string()),
        }
        envoy::eds_cluster(name, proto)
    };
    if let Some((hc, _)) = check {
        envoy::set_health_check(&mut c, hc);
    }
    match outlier {
        Some(o) => envoy::set_outlier_detection(&mut c, o),
        None => envoy::set_connection_failure_outlier_detection(&mut c),
    }
    let sni = policy::discovery_name(target);
    if let Some(tls) = listener
        .zip(sni.as_deref())
        .and_then(|(l, sni)| policy::server_tls(l, sni, proto, endpoints.acm.as_deref()))
    {
        envoy::set_transport_socket(&mut c, tls);
    }
    Some(c)
}
