//! What the translations of one generation share: each virtual service's virtual hosts and each
//! cluster no caller policy changes, built and encoded once instead of once per caller.
//!
//! A cache of pure functions of the state and the endpoints, so it changes no output (a test
//! translates every proxy with one memo and with none and compares). A memo serves one
//! (state generation, endpoints generation); [`Memo::next`] carries over what the new one may
//! keep. Virtual hosts name clusters, never endpoints, so they outlive an endpoints change; and
//! across a state change each is kept if the resources it was built from are the same ones at
//! the same versions (every spec change bumps a resource's version), so a change rebuilds only
//! the services it touches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::cluster::Built;
use super::output::Item;
use super::plan::ServicePlan;

/// The caller-side cluster to a (node, port) before any client TLS, encoded with what building
/// it adds: callers that apply no TLS to it share it as is.
#[derive(Debug)]
pub(super) struct SharedCluster {
    pub built: Built,
    pub cluster: Option<Item>,
    pub endpoints: Option<Item>,
    pub pending: Option<String>,
    pub unserved: Vec<String>,
}

/// By mesh, then by name: looked up with borrowed names, so a hit allocates nothing.
type Table<V> = Arc<Mutex<ByMesh<V>>>;
type ByMesh<V> = HashMap<String, HashMap<String, V>>;
type ByPort = Vec<(Option<i64>, Arc<SharedCluster>)>;

#[derive(Debug, Default)]
pub struct Memo {
    generation: u64,
    endpoints_generation: u64,
    /// By (mesh, virtual service).
    services: Table<Arc<ServicePlan>>,
    /// The previous state generation's, each reused once its stamp is checked.
    carried: Option<Table<Arc<ServicePlan>>>,
    /// By (mesh, virtual node), then port.
    clusters: Table<ByPort>,
}

impl Memo {
    pub fn new(generation: u64, endpoints_generation: u64) -> Self {
        Memo {
            generation,
            endpoints_generation,
            ..Default::default()
        }
    }

    /// Whether this memo serves these generations.
    pub fn serves(&self, generation: u64, endpoints_generation: u64) -> bool {
        self.generation == generation && self.endpoints_generation == endpoints_generation
    }

    pub fn generations(&self) -> (u64, u64) {
        (self.generation, self.endpoints_generation)
    }

    /// The memo for the given generations, keeping what they still share with this one.
    pub fn next(&self, generation: u64, endpoints_generation: u64) -> Memo {
        let mut next = Memo::new(generation, endpoints_generation);
        if generation == self.generation {
            next.services = self.services.clone();
            next.carried = self.carried.clone();
        } else {
            next.carried = Some(self.services.clone());
        }
        next
    }

    /// The service's plan: this generation's, else the previous one's if `still_valid`, else
    /// built.
    pub(super) fn service(
        &self,
        (mesh, service): (&str, &str),
        still_valid: impl FnOnce(&ServicePlan) -> bool,
        build: impl FnOnce() -> ServicePlan,
    ) -> Arc<ServicePlan> {
        if let Some(plan) = lock(&self.services).get(mesh).and_then(|m| m.get(service)) {
            return plan.clone();
        }
        // Built outside the lock: two translations may both build a plan once (the same one),
        // never wait on each other.
        let old = self
            .carried
            .as_ref()
            .and_then(|c| lock(c).get(mesh).and_then(|m| m.get(service)).cloned());
        let plan = match old {
            Some(plan) if still_valid(&plan) => plan,
            _ => Arc::new(build()),
        };
        lock(&self.services)
            .entry(mesh.to_string())
            .or_default()
            .entry(service.to_string())
            .or_insert(plan)
            .clone()
    }

    pub(super) fn cluster(
        &self,
        (mesh, node, port): (&str, &str, Option<i64>),
        build: impl FnOnce() -> SharedCluster,
    ) -> Arc<SharedCluster> {
        let found = |t: &ByMesh<ByPort>| {
            t.get(mesh)
                .and_then(|m| m.get(node))
                .and_then(|ports| ports.iter().find(|(p, _)| *p == port))
                .map(|(_, c)| c.clone())
        };
        if let Some(c) = found(&lock(&self.clusters)) {
            return c;
        }
        let built = Arc::new(build());
        let mut t = lock(&self.clusters);
        if let Some(c) = found(&t) {
            return c;
        }
        t.entry(mesh.to_string())
            .or_default()
            .entry(node.to_string())
            .or_default()
            .push((port, built.clone()));
        built
    }
}

fn lock<V>(t: &Table<V>) -> std::sync::MutexGuard<'_, ByMesh<V>> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
