//! The ADS protocol rules, scripted with a fake Envoy over a real gRPC stream.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::debounce;
use super::snapshot::{CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshots};
use super::*;
use crate::api::kinds::{VirtualNodes, VirtualServices};
use crate::api::ops::{Ops, Place};
use crate::store::Store;
use crate::test_helpers::ads::{FakeEnvoy, request};
use crate::test_helpers::delta::DeltaEnvoy;
use crate::test_helpers::{TempDir, ops_with_mesh};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use trellis_translate::Endpoints;

pub(super) const FRONT: &str = "mesh/m/virtualNode/front";
pub(super) const M: Place<'static> = Place {
    mesh: "m",
    parent: None,
    owner: None,
};
pub(super) const QUIET: Duration = Duration::from_millis(300);
/// Short enough that a test waits little for pushes, long enough to merge one write's changes.
pub(super) const FAST: Debounce = Debounce {
    quiet: Duration::from_millis(5),
    max_delay: Duration::from_millis(50),
};

pub(super) struct Harness {
    /// Shared with the cluster-set writer, which writes once more after cancellation: the
    /// directory goes only when both are done, so no test leaves it behind.
    dir: Arc<TempDir>,
    pub(super) store: Arc<Store>,
    pub(super) ops: Ops,
    pub(super) addr: std::net::SocketAddr,
    pub(super) metrics: Arc<Metrics>,
    /// What discovery last found, fed to the debouncer: set by the test, or by discovery itself
    /// polling the scripted Cloud Map.
    endpoints: Arc<watch::Sender<crate::discovery::Found>>,
    /// The proxies with a stream open, which is what discovery follows.
    connected: watch::Receiver<BTreeSet<ProxyIdentity>>,
    /// The proxies with an attested stream open, which is what ACM exports follow.
    attested: watch::Receiver<BTreeSet<ProxyIdentity>>,
    /// Stops this agent's tasks (a restart makes a new one).
    cancel: CancellationToken,
    debounce: Debounce,
    /// A scripted Cloud Map that real discovery polls, when the test wants one.
    pub(super) cloud_map: Option<Arc<ScriptedCloudMap>>,
    /// Writes the cluster sets sent into the data directory.
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Harness {
    /// A fake Envoy of `front` on state-of-the-world ADS, its first request sent.
    pub(super) async fn front(&self, first: DiscoveryRequest) -> FakeEnvoy {
        FakeEnvoy::connect(self.addr, FRONT, first).await.unwrap()
    }

    /// A fake Envoy of `front` on incremental ADS, its first request sent.
    pub(super) async fn delta_front(&self, first: DeltaDiscoveryRequest) -> DeltaEnvoy {
        DeltaEnvoy::connect(self.addr, FRONT, first).await.unwrap()
    }

    /// Publishes Cloud Map service `ns/service` answering one instance per address, as
    /// discovery does when Cloud Map answers.
    pub(super) fn set_instances(&self, service: &str, ips: &[std::net::Ipv4Addr]) {
        use trellis_translate::{CloudMapKey, Instance};
        let key = CloudMapKey {
            namespace: "ns".into(),
            service: service.into(),
            attributes: Default::default(),
        };
        let instances: Vec<Instance> = ips
            .iter()
            .map(|ip| Instance {
                id: format!("i-{ip}"),
                ipv4: Some(*ip),
                ipv6: None,
            })
            .collect();
        self.endpoints.send_modify(|f| {
            let e = Arc::make_mut(&mut f.endpoints);
            e.cloud_map.insert(key, instances.into());
            e.generation += 1;
        });
    }

    /// Stops the agent (every stream ends, everything it kept in memory is gone) and starts it
    /// again on the same store and data directory, at a new address.
    pub(super) async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// Stops the agent: every stream ends, and what it kept in memory is gone (what it writes
    /// to its data directory is written).
    pub(super) async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(w) = self.writer.take() {
            w.await.unwrap();
        }
    }

    /// Starts the agent again after [`Harness::stop`], on the same store and data directory,
    /// at a new address.
    pub(super) async fn start(&mut self) {
        let agent = start_agent(
            &self.store,
            &self.dir,
            self.debounce,
            self.cloud_map.clone(),
        )
        .await;
        self.addr = agent.addr;
        self.metrics = agent.metrics;
        self.endpoints = agent.endpoints;
        self.connected = agent.connected;
        self.attested = agent.attested;
        self.cancel = agent.cancel;
        self.writer = Some(agent.writer);
    }
}

/// A Cloud Map that answers each service's scripted instances, or fails every call.
#[derive(Debug, Default)]
pub(super) struct ScriptedCloudMap {
    instances: std::sync::Mutex<std::collections::BTreeMap<String, Vec<std::net::Ipv4Addr>>>,
    failing: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicU32,
}

impl ScriptedCloudMap {
    pub(super) fn set(&self, service: &str, ips: &[std::net::Ipv4Addr]) {
        self.instances
            .lock()
            .unwrap()
            .insert(service.to_string(), ips.to_vec());
    }

    /// Every call fails as throttled while `on`.
    pub(super) fn throttle(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn calls(&self) -> u32 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn answer<T>(
        &self,
        f: impl FnOnce(Vec<std::net::Ipv4Addr>) -> T,
        service: &str,
    ) -> Result<T, crate::discovery::CallError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::discovery::CallError {
                kind: crate::discovery::FailureKind::Throttled,
                message: "Rate exceeded".into(),
            });
        }
        let ips = self
            .instances
            .lock()
            .unwrap()
            .get(service)
            .cloned()
            .unwrap_or_default();
        Ok(f(ips))
    }
}

impl crate::discovery::CloudMap for ScriptedCloudMap {
    fn discover<'a>(
        &'a self,
        key: &'a trellis_translate::CloudMapKey,
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::discovery::Discovered, crate::discovery::CallError>,
    > {
        let r = self.answer(
            |ips| crate::discovery::Discovered {
                instances: ips
                    .into_iter()
                    .map(|ip| trellis_translate::Instance {
                        id: format!("i-{ip}"),
                        ipv4: Some(ip),
                        ipv6: None,
                    })
                    .collect(),
            },
            &key.service,
        );
        Box::pin(async move { r })
    }

    fn revision<'a>(
        &'a self,
        key: &'a trellis_translate::CloudMapKey,
    ) -> futures::future::BoxFuture<'a, Result<i64, crate::discovery::CallError>> {
        let r = self.answer(|ips| ips.len() as i64, &key.service);
        Box::pin(async move { r })
    }
}

/// Operations as the API runs them, on a store that already holds mesh `m`, where `front` calls
/// `back.local`, provided by `back` (HTTP 8080, found by DNS).
pub(super) async fn harness() -> Harness {
    harness_with(FAST, back_by_dns()).await
}

fn back_by_dns() -> serde_json::Value {
    json!({"dns": {"hostname": "back.internal"}})
}

/// Found through Cloud Map service `ns/NAME`.
pub(super) fn by_cloud_map(service: &str) -> serde_json::Value {
    json!({"awsCloudMap": {"namespaceName": "ns", "serviceName": service}})
}

/// The harness with debounce `cfg` and `back` found through `back_discovery` (a virtual node's
/// `serviceDiscovery`), served over ADS on a loopback port.
pub(super) async fn harness_with(cfg: Debounce, back_discovery: serde_json::Value) -> Harness {
    harness_full(cfg, back_discovery, None).await
}

/// [`harness_with`] where real discovery polls `cloud_map` for the Cloud Map services.
pub(super) async fn harness_polling(
    back_discovery: serde_json::Value,
    cloud_map: Arc<ScriptedCloudMap>,
) -> Harness {
    harness_full(FAST, back_discovery, Some(cloud_map)).await
}

async fn harness_full(
    cfg: Debounce,
    back_discovery: serde_json::Value,
    cloud_map: Option<Arc<ScriptedCloudMap>>,
) -> Harness {
    let dir = Arc::new(TempDir::new("xds"));
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let ops = ops_with_mesh(&store);
    let back = json!({"virtualNodeName": "back", "spec": {
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
        "serviceDiscovery": back_discovery}});
    ops.create::<VirtualNodes>(&store, M, serde_json::from_value(back).unwrap())
        .unwrap();
    let svc = json!({"virtualServiceName": "back.local",
        "spec": {"provider": {"virtualNode": {"virtualNodeName": "back"}}}});
    ops.create::<VirtualServices>(&store, M, serde_json::from_value(svc).unwrap())
        .unwrap();
    let front = json!({"virtualNodeName": "front", "spec": {
        "backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}});
    ops.create::<VirtualNodes>(&store, M, serde_json::from_value(front).unwrap())
        .unwrap();
    let agent = start_agent(&store, &dir, cfg, cloud_map.clone()).await;
    Harness {
        dir,
        store,
        ops,
        addr: agent.addr,
        metrics: agent.metrics,
        endpoints: agent.endpoints,
        connected: agent.connected,
        attested: agent.attested,
        cancel: agent.cancel,
        debounce: cfg,
        cloud_map,
        writer: Some(agent.writer),
    }
}

/// One run of the agent's ADS side over `store`.
struct Agent {
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    endpoints: Arc<watch::Sender<crate::discovery::Found>>,
    connected: watch::Receiver<BTreeSet<ProxyIdentity>>,
    attested: watch::Receiver<BTreeSet<ProxyIdentity>>,
    cancel: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

/// How long listeners and routes wait for a new cluster's endpoints in these tests.
pub(super) const WARMING_HOLD: Duration = Duration::from_millis(1500);

async fn start_agent(
    store: &Arc<Store>,
    dir: &Arc<TempDir>,
    cfg: Debounce,
    cloud_map: Option<Arc<ScriptedCloudMap>>,
) -> Agent {
    let cancel = CancellationToken::new();
    let (published_tx, published_rx) = debounce::channel(store.current());
    let (endpoints, endpoints_rx) = watch::channel(crate::discovery::Found::default());
    let endpoints = Arc::new(endpoints);
    tokio::spawn(debounce::run_with_endpoints(
        store.subscribe(),
        endpoints_rx,
        published_tx,
        cfg,
        cancel.clone(),
    ));
    let metrics = Arc::new(Metrics::default());
    let served = Arc::new(Served::load(&dir.path().join(SERVED_FILE)));
    let (keep, run) = (dir.clone(), served.clone().run(cancel.clone()));
    let writer = tokio::spawn(async move {
        run.await;
        drop(keep);
    });
    let lrs = crate::lrs::Lrs::new(Duration::from_secs(1), published_rx.clone(), cancel.clone());
    let ads = Ads::new(
        published_rx,
        store.subscribe(),
        metrics.clone(),
        Settings {
            max_per_proxy: 2,
            warming_hold: WARMING_HOLD,
            served,
            attestor: Arc::new(crate::attest::Attestor::none()),
        },
        cancel.clone(),
    );
    let connected = ads.connected_proxies();
    let attested = ads.attested_proxies();
    if let Some(client) = cloud_map {
        let timing = crate::discovery::Config {
            poll: Duration::from_millis(50),
            refresh: Duration::from_millis(500),
            jitter: 0.0,
            backoff_max: Duration::from_millis(100),
            linger: Duration::from_secs(5),
            churn_poll: Duration::from_millis(50),
            churn_window: Duration::ZERO,
        };
        tokio::spawn(crate::discovery::run(
            client,
            store.subscribe(),
            ads.connected_proxies(),
            endpoints.clone(),
            Arc::new(crate::discovery::Metrics::default()),
            timing,
            cancel.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_tcp(ads, lrs, listener));
    Agent {
        addr,
        metrics,
        endpoints,
        connected,
        attested,
        cancel,
        writer,
    }
}

/// The destination ports of the egress listener's chains in an LDS response.
fn egress_ports(resp: &DiscoveryResponse) -> Vec<Option<u32>> {
    use trellis_envoy_api::pb::envoy::config::listener::v3::Listener;
    resp.resources
        .iter()
        .map(|a| <Listener as prost::Message>::decode(a.value.as_slice()).unwrap())
        .filter(|l| l.name == "lds_egress_0.0.0.0_15001")
        .flat_map(|l| trellis_translate::testing::chain_ports(&l))
        .collect()
}

/// `front` loses its only backend: its egress cluster and route config go, its listener changes.
pub(super) fn front_drops_back(h: &Harness) {
    set_front_backends(h, json!([]));
}

/// `front` calls `back.local` again, as when the harness starts.
pub(super) fn front_calls_back(h: &Harness) {
    set_front_backends(
        h,
        json!([{"virtualService": {"virtualServiceName": "back.local"}}]),
    );
}

pub(super) fn set_front_backends(h: &Harness, backends: serde_json::Value) {
    let upd: trellis_model::UpdateVirtualNodeBody =
        serde_json::from_value(json!({"spec": {"backends": backends}})).unwrap();
    h.ops
        .update::<VirtualNodes>(&h.store, M, "front", upd)
        .unwrap();
}

/// Virtual node `name` serving HTTP on `port`, found through `discovery`, providing `NAME.local`
/// (nobody calls it yet).
pub(super) fn add_service(h: &Harness, name: &str, port: u16, discovery: serde_json::Value) {
    let node = json!({"virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": port, "protocol": "http"}}],
        "serviceDiscovery": discovery}});
    h.ops
        .create::<VirtualNodes>(&h.store, M, serde_json::from_value(node).unwrap())
        .unwrap();
    let svc = json!({"virtualServiceName": format!("{name}.local"),
        "spec": {"provider": {"virtualNode": {"virtualNodeName": name}}}});
    h.ops
        .create::<VirtualServices>(&h.store, M, serde_json::from_value(svc).unwrap())
        .unwrap();
}

/// `front` calls exactly these virtual services.
pub(super) fn front_calls(h: &Harness, services: &[&str]) {
    let backends: Vec<serde_json::Value> = services
        .iter()
        .map(|s| json!({"virtualService": {"virtualServiceName": s}}))
        .collect();
    set_front_backends(h, json!(backends));
}

/// Commits a write that changes nothing `front` gets (a new mesh): the store moves, its output not.
pub(super) fn commit_unrelated_write(h: &Harness) {
    h.ops
        .create_mesh(
            &h.store,
            serde_json::from_value(json!({"meshName": "other"})).unwrap(),
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_subscribe_gets_the_snapshot_and_an_ack_gets_no_push() {
    let h = harness().await;
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    // The backend's cluster and DROP_ALL's AWS API pass-through.
    assert_eq!(cds.resources.len(), 2);
    assert!(!cds.version_info.is_empty() && !cds.nonce.is_empty());
    envoy.ack(&cds, &[]).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_pushed_and_a_nack_is_not_answered_by_resending_the_same_version() {
    let h = harness().await;
    let mut envoy = h.front(request(LISTENER, &[], "", "")).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds, &[]).await;

    // Removing the backend removes the egress listener: a push with a new version.
    front_drops_back(&h);
    let pushed = envoy.recv().await.unwrap();
    assert_ne!(pushed.version_info, lds.version_info);
    assert_eq!(
        egress_ports(&pushed),
        [Some(443)],
        "only the AWS API pass-through is left"
    );

    envoy.nack(&pushed, &[], "listener rejected").await;
    envoy.expect_silence(QUIET).await;
    // A committed write that does not change this proxy's output pushes nothing either.
    let generation = h.store.current().generation;
    commit_unrelated_write(&h);
    assert!(h.store.current().generation > generation);
    envoy.expect_silence(QUIET).await;
    // New input that changes the output is pushed again.
    front_calls_back(&h);
    let again = envoy.recv().await.unwrap();
    assert_eq!(
        again.version_info, lds.version_info,
        "same input, same content version"
    );
    assert_eq!(egress_ports(&again), [Some(8080), Some(15001), Some(443)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_stale_nonce_is_ignored() {
    let h = harness().await;
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let first = envoy.recv().await.unwrap();
    front_drops_back(&h);
    let second = envoy.recv().await.unwrap();
    // An ACK of the first response arrives late: it must not trigger anything.
    envoy.ack(&first, &[]).await;
    envoy.expect_silence(QUIET).await;
    envoy.ack(&second, &[]).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_subscriptions_get_exactly_the_requested_routes_and_again_when_the_names_change() {
    let h = harness().await;
    let mut envoy = h
        .front(request(ROUTE, &["rds_egress_http_8080"], "", ""))
        .await;
    let rds = envoy.recv().await.unwrap();
    assert_eq!(rds.resources.len(), 1);
    envoy.ack(&rds, &["rds_egress_http_8080"]).await;
    envoy.expect_silence(QUIET).await;
    envoy
        .ack(&rds, &["rds_egress_http_8080", "rds_egress_http_9999"])
        .await;
    let subset = envoy.recv().await.unwrap();
    assert_eq!(subset.resources.len(), 1, "only names that exist are sent");
    assert_ne!(subset.nonce, rds.nonce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_envoy_with_the_current_version_gets_nothing_resent() {
    let h = harness().await;
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = envoy.recv().await.unwrap();
    drop(envoy);
    let mut again = h.front(request(CLUSTER, &[], &cds.version_info, "")).await;
    again.expect_silence(QUIET).await;
    // But it still gets later changes.
    front_drops_back(&h);
    let cds = again.recv().await.unwrap();
    assert_eq!(
        cds.resources.len(),
        1,
        "only the AWS API pass-through cluster remains"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_identities_are_refused_with_clear_statuses() {
    let h = harness().await;
    let mut ghost = FakeEnvoy::connect(
        h.addr,
        "mesh/m/virtualNode/ghost",
        request(CLUSTER, &[], "", ""),
    )
    .await
    .unwrap();
    let status = ghost.recv().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status
            .message()
            .contains("virtual node ghost not found in mesh m"),
        "{}",
        status.message()
    );

    let mut bad = FakeEnvoy::connect(h.addr, "front", request(CLUSTER, &[], "", ""))
        .await
        .unwrap();
    let status = bad.recv().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("node.id:"),
        "{}",
        status.message()
    );
}

#[test]
fn versions_depend_only_on_content() {
    let dir = TempDir::new("xds-versions");
    let store = Store::open(dir.path()).unwrap();
    let ops = ops_with_mesh(&store);
    let who = trellis_model::ProxyIdentity::parse("mesh/m/virtualNode/n").unwrap();
    let node = json!({"virtualNodeName": "n", "spec": {
        "listeners": [{"portMapping": {"port": 80, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": "n.internal"}}}});
    ops.create::<VirtualNodes>(&store, M, serde_json::from_value(node).unwrap())
        .unwrap();
    let (a, _) = Snapshots::default().get(&store.current(), &who).unwrap();
    // Another agent (fresh cache, different generation) with the same resources.
    let mut later = (*store.current()).clone();
    later.generation += 10;
    let (b, _) = Snapshots::default().get(&later, &who).unwrap();
    for t in [CLUSTER, LISTENER, ROUTE] {
        assert_eq!(a.get(t).unwrap().version, b.get(t).unwrap().version, "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_proxy_quota_are_refused_with_resource_exhausted() {
    let h = harness().await;
    let mut a = h.front(request(CLUSTER, &[], "", "")).await;
    let mut b = h.front(request(CLUSTER, &[], "", "")).await;
    a.recv().await.unwrap();
    b.recv().await.unwrap();
    let mut c = h.front(request(CLUSTER, &[], "", "")).await;
    let status = c.recv().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("already has 2 Envoy connections"),
        "{}",
        status.message()
    );
    // A slot comes back when a stream ends.
    drop(a);
    let (_d, first) = eventually_connect(&h).await;
    assert_eq!(first.type_url, CLUSTER);
}

/// Connects until the server has a free slot again (slots come back when the old stream's task ends).
async fn eventually_connect(h: &Harness) -> (FakeEnvoy, DiscoveryResponse) {
    for _ in 0..50 {
        let mut e = h.front(request(CLUSTER, &[], "", "")).await;
        match e.recv().await {
            Ok(first) => return (e, first),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("the slot never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_asked_for_by_name_that_we_do_not_manage_get_an_empty_assignment() {
    let h = harness().await;
    // The stock App Mesh Envoy image subscribes to EDS for its `local_cluster`.
    let mut envoy = h.front(request(ENDPOINT, &["local_cluster"], "", "")).await;
    let eds = envoy.recv().await.unwrap();
    assert_eq!(eds.resources.len(), 1);
    let cla: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        prost::Message::decode(eds.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, "local_cluster");
    assert!(cla.endpoints.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_reaches_a_stream_as_one_push() {
    // A quiet period longer than one fsync'd commit takes on a loaded machine, so the burst is one.
    let h = harness_with(
        Debounce {
            quiet: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
        },
        back_by_dns(),
    )
    .await;
    let mut envoy = h.front(request(LISTENER, &[], "", "")).await;
    let first = envoy.recv().await.unwrap();
    envoy.ack(&first, &[]).await;
    for i in 0..=10 {
        if i % 2 == 0 {
            front_drops_back(&h);
        } else {
            front_calls_back(&h);
        }
    }
    // Eleven commits within the debounce window: the last state (no backends) arrives, in one push.
    let pushed = envoy.recv().await.unwrap();
    assert_eq!(
        egress_ports(&pushed),
        [Some(443)],
        "only the AWS API pass-through is left"
    );
    envoy.ack(&pushed, &[]).await;
    envoy.expect_silence(QUIET).await;
}

/// A fake Envoy of `front` holding clusters, listeners and the egress route config, all ACKed.
pub(super) async fn sotw_subscribed_to_everything(h: &Harness) -> FakeEnvoy {
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds, &[]).await;
    take_listeners_and_routes(&mut envoy).await;
    envoy
}

/// Has `envoy` subscribe to listeners and the egress route config and ACK both, as an Envoy does
/// once its clusters are in; nothing else is pending afterwards.
pub(super) async fn take_listeners_and_routes(envoy: &mut FakeEnvoy) {
    envoy.send(request(LISTENER, &[], "", "")).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds, &[]).await;
    envoy
        .send(request(ROUTE, &["rds_egress_http_8080"], "", ""))
        .await;
    let rds = envoy.recv().await.unwrap();
    envoy.ack(&rds, &["rds_egress_http_8080"]).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cluster_stays_until_the_pushes_that_stop_using_it_are_acked() {
    let h = harness().await;
    let mut envoy = sotw_subscribed_to_everything(&h).await;
    front_drops_back(&h);
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    assert_eq!(
        cds.resources.len(),
        2,
        "the backend's cluster is kept while the listener and routes still use it"
    );
    let lds = envoy.recv().await.unwrap();
    assert_eq!(lds.type_url, LISTENER);
    let rds = envoy.recv().await.unwrap();
    assert_eq!(rds.type_url, ROUTE);
    envoy.ack(&cds, &[]).await;
    envoy.ack(&lds, &[]).await;
    envoy.expect_silence(QUIET).await;
    envoy.ack(&rds, &["rds_egress_http_8080"]).await;
    let exact = envoy.recv().await.unwrap();
    assert_eq!(exact.type_url, CLUSTER);
    assert_eq!(
        exact.resources.len(),
        1,
        "only the AWS API pass-through is left"
    );
    envoy.ack(&exact, &[]).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_listener_keeps_the_clusters_its_previous_version_uses() {
    let h = harness().await;
    let mut envoy = sotw_subscribed_to_everything(&h).await;
    front_drops_back(&h);
    let cds = envoy.recv().await.unwrap();
    let lds = envoy.recv().await.unwrap();
    let rds = envoy.recv().await.unwrap();
    envoy.ack(&cds, &[]).await;
    envoy.nack(&lds, &[], "listener rejected").await;
    envoy.ack(&rds, &["rds_egress_http_8080"]).await;
    // The Envoy still runs the old listener: the backend's cluster is not taken away.
    envoy.expect_silence(QUIET).await;
    // A new listener, ACKed, lets the exact clusters go out.
    front_calls_back(&h);
    let mut types = Vec::new();
    loop {
        let Ok(r) = tokio::time::timeout(QUIET, envoy.recv()).await else {
            break;
        };
        let r = r.unwrap();
        let names: &[&str] = if r.type_url == ROUTE {
            &["rds_egress_http_8080"]
        } else {
            &[]
        };
        envoy.ack(&r, names).await;
        types.push((r.type_url.clone(), r.resources.len()));
    }
    assert!(
        types.contains(&(LISTENER.to_string(), 1)),
        "the listener is pushed again: {types:?}"
    );
    assert_eq!(
        types
            .iter()
            .rev()
            .find(|(t, _)| t == CLUSTER)
            .map(|(_, n)| *n),
        Some(2),
        "the backend's cluster is in the exact set again: {types:?}"
    );
}

/// Cloud Map endpoints only change the ClusterLoadAssignment: no CDS, LDS or RDS is resent, and
/// the connected-proxy set that drives discovery follows the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_resends_only_the_assignment() {
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use trellis_translate::{CloudMapKey, Instance};
    const CLA: &str = "cds_egress_m_back_http_8080";

    let h = harness_with(
        FAST,
        json!({"awsCloudMap": {"namespaceName": "ns", "serviceName": "back"}}),
    )
    .await;
    let mut connected = h.connected.clone();
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds, &[]).await;
    envoy
        .send(request(ENDPOINT, &[CLA, "local_cluster"], "", ""))
        .await;
    let eds = envoy.recv().await.unwrap();
    assert_eq!(eds.type_url, ENDPOINT);
    let names: Vec<String> = eds
        .resources
        .iter()
        .map(|a| {
            <ClusterLoadAssignment as prost::Message>::decode(a.value.as_slice())
                .unwrap()
                .cluster_name
        })
        .collect();
    assert_eq!(
        names,
        ["local_cluster"],
        "not yet discovered: no assignment (an Envoy keeps its own); unmanaged: an empty one"
    );
    envoy.ack(&eds, &[CLA, "local_cluster"]).await;
    take_listeners_and_routes(&mut envoy).await;
    assert!(
        connected
            .borrow_and_update()
            .contains(&ProxyIdentity::parse(FRONT).unwrap())
    );

    let key = CloudMapKey {
        namespace: "ns".into(),
        service: "back".into(),
        attributes: Default::default(),
    };
    let mut e = Endpoints::new();
    e.generation = 1;
    e.cloud_map.insert(
        key,
        vec![Instance {
            id: "i-1".into(),
            ipv4: Some(std::net::Ipv4Addr::new(10, 1, 2, 3)),
            ipv6: None,
        }]
        .into(),
    );
    h.endpoints.send_replace(crate::discovery::Found {
        endpoints: Arc::new(e),
        unanswered: Arc::default(),
        secrets: Arc::default(),
    });
    let update = envoy.recv().await.unwrap();
    assert_eq!(update.type_url, ENDPOINT, "only the assignment is pushed");
    assert_ne!(update.version_info, eds.version_info);
    let cla =
        <ClusterLoadAssignment as prost::Message>::decode(update.resources[0].value.as_slice())
            .unwrap();
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
    envoy.ack(&update, &[CLA, "local_cluster"]).await;
    envoy.expect_silence(QUIET).await;

    drop(envoy);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !connected.borrow_and_update().is_empty() {
            connected.changed().await.unwrap();
        }
    })
    .await
    .expect("the proxy leaves the connected set when its stream ends");
}

#[tokio::test]
async fn the_socket_is_open_to_every_uid_or_to_one_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("xds-socket");
    let open = dir.path().join("open.sock");
    let _l = bind_unix(&open, None).unwrap();
    let meta = std::fs::metadata(&open).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    // A group this process may give its files (its own), as the operator's Envoy group would be.
    let gid = std::fs::metadata(dir.path()).unwrap().gid();
    let grouped = dir.path().join("grouped.sock");
    let _g = bind_unix(&grouped, Some(gid)).unwrap();
    let meta = std::fs::metadata(&grouped).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
}

#[tokio::test]
async fn an_unattested_stream_counts_as_connected_but_never_as_attested() {
    let h = harness_with(FAST, json!({"dns": {"hostname": "back.local"}})).await;
    let (mut connected, attested) = (h.connected.clone(), h.attested.clone());
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    envoy.recv().await.unwrap();
    connected
        .wait_for(|c| c.iter().any(|p| p.name == "front"))
        .await
        .unwrap();
    // Plain TCP, no attestor: its node's ACM certificates are not exported for it.
    assert!(attested.borrow().is_empty(), "{:?}", *attested.borrow());
}

/// Responses bypass tonic's encoder (`grpc.rs`), so its checks are ours: a request stream in a
/// compression this server does not take is refused as the generated server refuses it, before
/// anything is decoded; an identity-encoded one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_request_streams_are_refused_as_unimplemented() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

    let h = harness().await;
    let addr = h.addr;
    let open = move |encoding: &'static str| async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            move |mut r: tonic::Request<()>| {
                r.metadata_mut()
                    .insert("grpc-encoding", encoding.parse().unwrap());
                Ok(r)
            },
        );
        let first = DiscoveryRequest {
            node: Some(Node {
                id: "mesh/m/virtualNode/front".into(),
                ..Default::default()
            }),
            ..request(CLUSTER, &[], "", "")
        };
        let mut inbound = client
            .stream_aggregated_resources(tokio_stream::iter([first]))
            .await?
            .into_inner();
        inbound.message().await
    };
    let status = open("gzip").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("gzip"), "{}", status.message());
    let first = open("identity").await.unwrap().unwrap();
    assert_eq!(first.type_url, CLUSTER);
}
