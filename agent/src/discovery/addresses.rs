//! What the names of TCP virtual services that share a port resolve to. The app connects to the
//! address its resolver gives for the name, so the same lookup, done here through the system
//! resolver (the VPC's, on an ECS instance), is what tells those services apart on Envoy's egress
//! listener. Only names some connected proxy needs are looked up; a failed lookup keeps the last
//! answer.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Found;
use trellis_model::{ProxyIdentity, State};
use trellis_translate::shared_tcp_services;

/// Name resolution: the system resolver in production, a table in unit tests.
pub trait Resolve: Send + Sync + 'static {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// `getaddrinfo`, as the app's own lookup would do it.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Every name some connected proxy needs in this state.
pub fn demand(state: &State, proxies: &BTreeSet<ProxyIdentity>) -> BTreeSet<String> {
    proxies
        .iter()
        .flat_map(|p| shared_tcp_services(state, p))
        .collect()
}

/// Runs until `cancel`: resolves the demanded names every `every` (and at once when the demand
/// changes) and publishes changes in `Endpoints::addresses` (of [`super::Found`]).
pub async fn run(
    resolver: Arc<dyn Resolve>,
    mut state: watch::Receiver<Arc<State>>,
    mut proxies: watch::Receiver<BTreeSet<ProxyIdentity>>,
    out: Arc<watch::Sender<Found>>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let wanted = {
            let s = state.borrow_and_update().clone();
            let p = proxies.borrow_and_update().clone();
            demand(&s, &p)
        };
        let mut found = BTreeMap::new();
        for name in &wanted {
            match resolver.lookup(name).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let sorted: BTreeSet<IpAddr> = addrs.into_iter().collect();
                    found.insert(name.clone(), sorted.into_iter().collect::<Arc<[IpAddr]>>());
                }
                Ok(_) => {
                    warn!(name = %name, hint = "the name has no address; until it has, its TCP port goes to the first service by name", "service name did not resolve")
                }
                Err(e) => {
                    warn!(name = %name, error = %e, hint = "check the resolver the agent uses (the VPC's) has the name; the last answer is kept", "service name lookup failed")
                }
            }
        }
        out.send_if_modified(|f| {
            let mut next = f.endpoints.addresses.clone();
            next.retain(|name, _| wanted.contains(name));
            next.extend(found);
            if next == f.endpoints.addresses {
                return false;
            }
            debug!(names = next.len(), "service addresses changed");
            let m = Arc::make_mut(&mut f.endpoints);
            m.addresses = next;
            m.generation += 1;
            true
        });
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            changed = proxies.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests;
