//! Fixtures shared by this crate's unit tests and the `tests` package.

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "trellis-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    /// Retried: a blocking write the runtime abandoned at shutdown (the cluster-set writer's last
    /// one) can add a file while the directory is being removed, which then fails as not empty.
    fn drop(&mut self) {
        for _ in 0..50 {
            match std::fs::remove_dir_all(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

pub use trellis_model::testing::{mesh_resource, mesh_state, metadata, resource};

/// The request type of one ADS variant: how its first request carries the node and which RPC
/// opens its stream. All else a fake Envoy does is the same for both ([`ScriptedEnvoy`]).
pub trait AdsRequest: Sized + Send + 'static {
    type Response: std::fmt::Debug;

    fn with_node(self, node: Node) -> Self;

    fn open(
        client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self>,
    ) -> impl Future<Output = Result<tonic::Response<Streaming<Self::Response>>, Status>> + Send;
}

/// The client side of one ADS stream, whichever variant: `ads::FakeEnvoy` (state of the world)
/// and `delta::DeltaEnvoy` (incremental) connect, send and receive alike and differ only in their
/// message types, their RPC and what an ACK looks like.
#[derive(Debug)]
pub struct ScriptedEnvoy<Req: AdsRequest> {
    pub node_id: String,
    tx: mpsc::Sender<Req>,
    rx: Streaming<Req::Response>,
}

impl<Req: AdsRequest> ScriptedEnvoy<Req> {
    /// Opens a stream and sends the first request (which carries the node).
    pub async fn connect(
        addr: std::net::SocketAddr,
        node_id: &str,
        first: Req,
    ) -> Result<Self, Status> {
        let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(16);
        let first = first.with_node(Node {
            id: node_id.to_string(),
            ..Default::default()
        });
        tx.send(first).await.expect("queue first request");
        let rx = Req::open(client, ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(ScriptedEnvoy {
            node_id: node_id.to_string(),
            tx,
            rx,
        })
    }

    pub async fn send(&self, req: Req) {
        self.tx.send(req).await.expect("stream open");
    }

    /// The next response, or the stream's error status.
    pub async fn recv(&mut self) -> Result<Req::Response, Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(Status::aborted("stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded("no response within 5 s")),
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(r) = tokio::time::timeout(wait, self.rx.message()).await {
            panic!("expected no response, got {r:?}");
        }
    }
}

/// A NACK's error detail.
fn rejection(message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: 3,
        message: message.to_string(),
        details: vec![],
    })
}

/// A scripted Envoy: the client side of one ADS stream.
pub mod ads {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::Channel;
    use tonic::{Status, Streaming};

    use super::{AdsRequest, ScriptedEnvoy, rejection};

    pub type FakeEnvoy = ScriptedEnvoy<DiscoveryRequest>;

    impl AdsRequest for DiscoveryRequest {
        type Response = DiscoveryResponse;

        fn with_node(self, node: Node) -> Self {
            DiscoveryRequest {
                node: Some(node),
                ..self
            }
        }

        async fn open(
            mut client: AggregatedDiscoveryServiceClient<Channel>,
            requests: ReceiverStream<Self>,
        ) -> Result<tonic::Response<Streaming<DiscoveryResponse>>, Status> {
            client.stream_aggregated_resources(requests).await
        }
    }

    impl FakeEnvoy {
        pub async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) {
            self.send(request(
                &resp.type_url,
                names,
                &resp.version_info,
                &resp.nonce,
            ))
            .await;
        }

        pub async fn nack(&self, resp: &DiscoveryResponse, names: &[&str], message: &str) {
            let mut r = request(&resp.type_url, names, "", &resp.nonce);
            r.error_detail = rejection(message);
            self.send(r).await;
        }
    }

    pub fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.to_string(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }
}

/// A scripted Envoy on incremental ADS: the client side of one delta stream.
pub mod delta {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    };
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::Channel;
    use tonic::{Status, Streaming};

    use super::{AdsRequest, ScriptedEnvoy, rejection};

    pub type DeltaEnvoy = ScriptedEnvoy<DeltaDiscoveryRequest>;

    impl AdsRequest for DeltaDiscoveryRequest {
        type Response = DeltaDiscoveryResponse;

        fn with_node(self, node: Node) -> Self {
            DeltaDiscoveryRequest {
                node: Some(node),
                ..self
            }
        }

        async fn open(
            mut client: AggregatedDiscoveryServiceClient<Channel>,
            requests: ReceiverStream<Self>,
        ) -> Result<tonic::Response<Streaming<DeltaDiscoveryResponse>>, Status> {
            client.delta_aggregated_resources(requests).await
        }
    }

    impl DeltaEnvoy {
        pub async fn ack(&self, resp: &DeltaDiscoveryResponse) {
            self.send(reply(&resp.type_url, &resp.nonce)).await;
        }

        pub async fn nack(&self, resp: &DeltaDiscoveryResponse, message: &str) {
            let mut r = reply(&resp.type_url, &resp.nonce);
            r.error_detail = rejection(message);
            self.send(r).await;
        }
    }

    /// A request that changes the subscription (no nonce: not an answer to a response).
    pub fn subscribe(
        type_url: &str,
        subscribe: &[&str],
        unsubscribe: &[&str],
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The first request of a reconnecting Envoy: what it holds, by name and version.
    pub fn resume(
        type_url: &str,
        names: &[&str],
        held: HashMap<String, String>,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            initial_resource_versions: held,
            ..subscribe(type_url, names, &[])
        }
    }

    /// An ACK of the response with this nonce.
    pub fn reply(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }

    /// Resource names of a response, in order.
    pub fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
        resp.resources.iter().map(|r| r.name.as_str()).collect()
    }

    /// What a response gave the client: name → version.
    pub fn versions(resp: &DeltaDiscoveryResponse) -> HashMap<String, String> {
        resp.resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    }
}

/// An agent configuration for benches and tests: the defaults of `serve`, state and socket in
/// `dir`, the API and ADS (also over plain TCP, for load generators) on free loopback ports,
/// without attestation.
pub fn serve_config(dir: &Path) -> crate::config::ServeConfig {
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    crate::config::ServeConfig {
        data_dir: dir.join("data"),
        store: Default::default(),
        api_addr: any_port,
        api: Default::default(),
        xds_socket: dir.join("xds.sock"),
        xds_addr: Some(any_port),
        // Load generators and in-process tests are no ECS tasks: a lab's settings.
        xds_security: crate::config::XdsSecurityArgs {
            xds_attestation: crate::attest::Mode::None,
            xds_tcp_insecure: true,
            ..Default::default()
        },
        resources: None,
        account_id: "000000000000".into(),
        region: "us-east-1".into(),
        quota_meshes: 15,
        quota_virtual_nodes: 200,
        quota_virtual_services: 200,
        quota_backends: 50,
        quota_virtual_routers: 200,
        quota_routes: 50,
        quota_weighted_targets: 10,
        quota_virtual_gateways: 3,
        quota_gateway_routes: 10,
        quota_tags: 50,
        max_connections_per_proxy: crate::xds::DEFAULT_CONNECTIONS_PER_PROXY,
        xds_debounce_ms: 20,
        xds_debounce_max_ms: 500,
        log_format: "text".into(),
        cloudmap: Default::default(),
        address_poll_ms: 5000,
        load_report_interval_ms: 5000,
        acm_endpoint: None,
        acm_refresh_interval_s: 3600,
    }
}

/// API operations with App Mesh's default quotas, after creating mesh `m` in `store`.
pub fn ops_with_mesh(store: &crate::store::Store) -> crate::api::Ops {
    let ops = crate::api::Ops {
        account: crate::api::Account {
            account_id: "000000000000".into(),
            region: "us-west-2".into(),
        },
        quotas: crate::api::Quotas::default(),
    };
    let mesh = serde_json::from_value(serde_json::json!({"meshName": "m"})).expect("mesh body");
    ops.create_mesh(store, mesh).expect("mesh m");
    ops
}

/// Publishes `state` with the Cloud Map service `ns/service` answering one IPv4 instance (the
/// other keys as published before), at endpoints generation `generation`.
pub fn publish_one_instance(
    tx: &tokio::sync::watch::Sender<crate::xds::debounce::Published>,
    state: &std::sync::Arc<trellis_model::State>,
    service: &str,
    ipv4: std::net::Ipv4Addr,
    generation: u64,
) {
    let mut e = (*tx.borrow().endpoints).clone();
    let key = trellis_translate::CloudMapKey {
        namespace: "ns".into(),
        service: service.into(),
        attributes: Default::default(),
    };
    let one = trellis_translate::Instance {
        id: format!("i-{ipv4}"),
        ipv4: Some(ipv4),
        ipv6: None,
    };
    e.cloud_map.insert(key, vec![one].into());
    e.generation = generation;
    tx.send_replace(crate::xds::debounce::Published {
        state: state.clone(),
        endpoints: std::sync::Arc::new(e),
        unanswered: Default::default(),
        secrets: Default::default(),
        changed_at: tokio::time::Instant::now(),
    });
}
