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
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::test_helpers::mesh_state;
    use trellis_translate::Endpoints;

    /// A resolver answering from a table that the test changes; `None` fails the lookup.
    #[derive(Default)]
    struct Table(Mutex<BTreeMap<String, Option<Vec<IpAddr>>>>);

    impl Table {
        fn set(&self, name: &str, answer: Option<&[&str]>) {
            let answer = answer.map(|a| a.iter().map(|s| s.parse().unwrap()).collect());
            self.0.lock().unwrap().insert(name.into(), answer);
        }
    }

    impl Resolve for Table {
        fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
            let answer = self.0.lock().unwrap().get(name).cloned().flatten();
            Box::pin(async move { answer.ok_or_else(|| io::Error::other("no such name")) })
        }
    }

    fn tcp_pair() -> State {
        let tcp = json!({"listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}],
                         "serviceDiscovery": {"dns": {"hostname": "x.internal"}}});
        mesh_state(
            json!({}),
            &[
                ("a", tcp.clone()),
                ("b", tcp),
                (
                    "front",
                    json!({"backends": [
                        {"virtualService": {"virtualServiceName": "a.local"}},
                        {"virtualService": {"virtualServiceName": "b.local"}}]}),
                ),
            ],
            &[("a.local", "a"), ("b.local", "b")],
        )
    }

    async fn next(rx: &mut watch::Receiver<Found>) -> Arc<Endpoints> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a publication")
            .expect("open");
        rx.borrow_and_update().endpoints.clone()
    }

    #[tokio::test]
    async fn names_are_resolved_for_connected_proxies_only_and_a_failure_keeps_the_last_answer() {
        let table = Arc::new(Table::default());
        table.set("a.local", Some(&["10.0.0.1"]));
        table.set("b.local", Some(&["10.0.0.3", "10.0.0.2"]));
        let (_state_tx, state) = watch::channel(Arc::new(tcp_pair()));
        let (proxies_tx, proxies) = watch::channel(BTreeSet::new());
        let (out, mut rx) = watch::channel(Found::default());
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        tokio::spawn(run(
            table.clone(),
            state,
            proxies,
            Arc::new(out),
            Duration::from_millis(20),
            cancel,
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            rx.borrow().endpoints.addresses.is_empty(),
            "no proxy, no lookups"
        );

        proxies_tx.send_replace([ProxyIdentity::parse("mesh/m/virtualNode/front").unwrap()].into());
        let e = next(&mut rx).await;
        let b: Vec<String> = e.addresses["b.local"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(b, ["10.0.0.2", "10.0.0.3"], "sorted");
        assert_eq!(e.addresses.len(), 2);

        // The resolver fails: nothing changes. Then a new answer arrives.
        table.set("a.local", None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            rx.borrow().endpoints.addresses["a.local"][0].to_string(),
            "10.0.0.1"
        );
        table.set("a.local", Some(&["10.0.0.9"]));
        let e = next(&mut rx).await;
        assert_eq!(e.addresses["a.local"][0].to_string(), "10.0.0.9");

        // The proxy leaves: its names go.
        proxies_tx.send_replace(BTreeSet::new());
        let e = next(&mut rx).await;
        assert!(e.addresses.is_empty());
    }
}
