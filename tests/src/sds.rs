//! A local Secret Discovery Service: what a SPIRE agent is to App Mesh's Envoy. Serves named
//! certificates and trust bundles (made by [`crate::apps::Pki`]) over a Unix socket, SotW SDS v3,
//! from a tokio runtime on its own thread; stops on drop.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::util::pack_any;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::Workdir;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// One secret, as PEM text read from the files the PKI wrote.
#[derive(Clone, Debug)]
pub enum SdsSecret {
    /// A certificate chain and its private key.
    Cert { chain: String, key: String },
    /// A trust bundle: the CA certificates peers must chain to.
    Trust { ca: String },
}

impl SdsSecret {
    pub fn cert(chain: &str, key: &str) -> Self {
        SdsSecret::Cert {
            chain: read(chain),
            key: read(key),
        }
    }

    pub fn trust(ca: &str) -> Self {
        SdsSecret::Trust { ca: read(ca) }
    }

    fn to_secret(&self, name: &str) -> Secret {
        let inline = |s: &str| {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(s.to_string())),
                ..Default::default()
            })
        };
        let kind = match self {
            SdsSecret::Cert { chain, key } => secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain),
                private_key: inline(key),
                ..Default::default()
            }),
            SdsSecret::Trust { ca } => {
                secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(ca),
                    ..Default::default()
                })
            }
        };
        Secret {
            name: name.to_string(),
            r#type: Some(kind),
        }
    }
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A running SDS server on `socket`.
#[derive(Debug)]
pub struct SdsServer {
    pub socket: PathBuf,
    requested: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SdsServer {
    /// Serves `secrets` by name on `work/sds/agent.sock`, connectable by Envoy's uid 1337.
    pub fn start(work: &Workdir, secrets: BTreeMap<String, SdsSecret>) -> Self {
        let dir = work.join("sds");
        fs::create_dir_all(&dir).expect("sds dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod sds dir");
        let socket = dir.join("agent.sock");
        let requested = Arc::new(Mutex::new(Vec::new()));
        let service = Sds {
            secrets: Arc::new(secrets),
            requested: requested.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sds runtime");
            rt.block_on(async move {
                let listener = bind(&path);
                let _ = ready_tx.send(());
                let _ = tonic::transport::Server::builder()
                    .add_service(SecretDiscoveryServiceServer::new(service))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready_rx.recv().expect("SDS server started");
        SdsServer {
            socket,
            requested,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every secret name Envoys have asked for so far.
    pub fn requested(&self) -> Vec<String> {
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for SdsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bind(path: &Path) -> tokio::net::UnixListener {
    let _ = fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).expect("bind SDS socket");
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod SDS socket");
    l
}

struct Sds {
    secrets: Arc<BTreeMap<String, SdsSecret>>,
    requested: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("delta SDS"))
    }

    /// SotW: answer each new set of names (a first request, or a changed subscription) with those
    /// secrets; an ACK or NACK of what was sent gets nothing.
    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut inbound = request.into_inner();
        let (secrets, requested) = (self.secrets.clone(), self.requested.clone());
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut sent: Option<Vec<String>> = None;
            let mut nonce = 0u64;
            while let Ok(Some(r)) = inbound.message().await {
                let mut names = r.resource_names.clone();
                names.sort();
                if sent.as_ref() == Some(&names) {
                    continue;
                }
                requested
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(names.iter().cloned());
                nonce += 1;
                let resources = names
                    .iter()
                    .filter_map(|n| secrets.get(n).map(|s| pack_any(s.to_secret(n))))
                    .collect();
                let response = DiscoveryResponse {
                    version_info: "1".into(),
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                sent = Some(names);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("REST SDS"))
    }
}
