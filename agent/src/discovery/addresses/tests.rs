//! Service-name resolution for TCP services sharing a port, against a scripted resolver.

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
