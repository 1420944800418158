//! ECS attestation of a Unix socket peer: pid → cgroup → container id → the ECS agent's
//! introspection API (task and container name) → the task definition (`DescribeTaskDefinition`
//! of family:revision, cached: a revision never changes) → the node that container's
//! `APPMESH_RESOURCE_ARN` (or `APPMESH_VIRTUAL_NODE_NAME`) names.
//!
//! What a container may claim is fixed when it is created (its task definition revision), so the
//! answer is kept per container id, in memory and in a 0600 file of the data directory: an agent
//! restart or an ECS outage does not cut off tasks already attested, and an unknown container is
//! refused while ECS cannot be asked (fail closed). Container overrides at `RunTask` are not seen
//! by the introspection API; a node given only by an override is refused.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ecs::Client;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{info, warn};
use trellis_model::ProxyIdentity;

use super::Refusal;
use super::cgroup::ContainerPattern;
use crate::bootstrap::{ENV_RESOURCE_ARN, ENV_RESOURCE_NAME, ENV_VIRTUAL_NODE_NAME};

/// The ECS agent's introspection API on a container instance.
pub const DEFAULT_AGENT_URI: &str = "http://localhost:51678";
/// The file in the data directory that keeps attested containers across restarts.
pub const CACHE_FILE: &str = "xds-attested.json";
/// Containers remembered; the oldest attested is forgotten first (it is asked for again).
const MAX_CONTAINERS: usize = 10_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EcsSettings {
    /// `--ecs-agent-uri`.
    pub agent_uri: String,
    /// `--ecs-endpoint` (tests, VPC endpoints); the region's when `None`.
    pub endpoint: Option<String>,
    pub fallback_region: String,
    /// Where attested containers are kept; in memory only when `None`.
    pub cache_file: Option<PathBuf>,
    pub pattern: ContainerPattern,
}

/// One attested container.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Known {
    node: String,
    task: String,
    container: String,
    /// Attestation order, for eviction.
    seq: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Containers {
    containers: BTreeMap<String, Known>,
    #[serde(default)]
    next_seq: u64,
}

/// The task definition's App Mesh identity per container name.
type Nodes = HashMap<String, Option<String>>;

#[derive(Debug)]
pub struct Ecs {
    settings: EcsSettings,
    http: crate::tls::HttpClient,
    client: OnceCell<Client>,
    revisions: Mutex<HashMap<String, Arc<Nodes>>>,
    known: Mutex<Containers>,
}

/// The introspection API's task (`GET /v1/tasks?dockerid=ID`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IntrospectedTask {
    arn: String,
    family: String,
    version: String,
    #[serde(default)]
    containers: Vec<IntrospectedContainer>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IntrospectedContainer {
    docker_id: String,
    name: String,
}

impl Ecs {
    /// Loads the containers attested before (a missing or unreadable file is an empty cache).
    pub fn new(settings: EcsSettings) -> Result<Self, crate::tls::Error> {
        let known = match &settings.cache_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    warn!(file = %path.display(), error = %e, "attested containers unreadable; starting afresh");
                    Containers::default()
                }),
                Err(_) => Containers::default(),
            },
            None => Containers::default(),
        };
        info!(
            containers = known.containers.len(),
            agent = settings.agent_uri,
            "ECS attestation ready"
        );
        Ok(Ecs {
            http: crate::tls::http_client(None)?,
            settings,
            client: OnceCell::new(),
            revisions: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
        })
    }

    /// The node the process `pid` may claim.
    pub async fn identify(&self, pid: i32) -> Result<ProxyIdentity, Refusal> {
        let text = tokio::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .await
            .map_err(|e| Refusal::NoCgroup {
                pid,
                detail: e.to_string(),
            })?;
        let container = self
            .settings
            .pattern
            .container_id(&text)
            .ok_or(Refusal::NotAContainer { pid })?;
        let known = self
            .lock()
            .containers
            .get(&container)
            .map(|k| k.node.clone());
        if let Some(Ok(id)) = known.map(|n| ProxyIdentity::parse(&n)) {
            return Ok(id);
        }
        let task = self.introspect(&container).await?;
        let name = task
            .containers
            .iter()
            .find(|c| c.docker_id == container)
            .map(|c| c.name.clone())
            .ok_or_else(|| Refusal::UnknownTask {
                container: container.clone(),
                detail: format!("task {} does not list it", task.arn),
            })?;
        let revision = format!("{}:{}", task.family, task.version);
        let nodes = self.nodes(&revision, &container).await?;
        let no_node = || Refusal::NoNode {
            task_definition: revision.clone(),
            container_name: name.clone(),
        };
        let node = nodes.get(&name).cloned().flatten().ok_or_else(no_node)?;
        let id = ProxyIdentity::parse(&node).map_err(|_| no_node())?;
        info!(container = %container, task = %task.arn, container_name = %name, node = %id, "container attested");
        self.remember(
            container,
            Known {
                node,
                task: task.arn,
                container: name,
                seq: 0,
            },
        );
        Ok(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Containers> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn introspect(&self, container: &str) -> Result<IntrospectedTask, Refusal> {
        let unavailable = |detail: String| Refusal::EcsUnavailable {
            container: container.to_string(),
            detail,
        };
        let uri = format!(
            "{}/v1/tasks?dockerid={container}",
            self.settings.agent_uri.trim_end_matches('/')
        );
        let req = http::Request::get(&uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| unavailable(format!("--ecs-agent-uri: {e}")))?;
        let res = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unavailable("the ECS agent did not answer in time".into()))?
            .map_err(|e| unavailable(format!("the ECS agent: {}", crate::tls::chain(&e))))?;
        let status = res.status();
        let body = tokio::time::timeout(CALL_TIMEOUT, res.into_body().collect())
            .await
            .map_err(|_| unavailable("the ECS agent did not answer in time".into()))?
            .map_err(|e| unavailable(format!("the ECS agent: {e}")))?
            .to_bytes();
        if status.is_server_error() {
            return Err(unavailable(format!("the ECS agent answered {status}")));
        }
        if !status.is_success() {
            return Err(Refusal::UnknownTask {
                container: container.to_string(),
                detail: format!("the ECS agent answered {status}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Refusal::UnknownTask {
            container: container.to_string(),
            detail: format!("unexpected introspection answer: {e}"),
        })
    }

    /// The App Mesh identity per container of a task definition revision.
    async fn nodes(&self, revision: &str, container: &str) -> Result<Arc<Nodes>, Refusal> {
        if let Some(n) = self.revisions_lock().get(revision) {
            return Ok(n.clone());
        }
        let out = self
            .client()
            .await
            .describe_task_definition()
            .task_definition(revision)
            .send()
            .await
            .map_err(|e| Refusal::EcsUnavailable {
                container: container.to_string(),
                detail: format!(
                    "DescribeTaskDefinition {revision}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ),
            })?;
        let mut nodes = Nodes::new();
        for c in out
            .task_definition()
            .map(|t| t.container_definitions())
            .unwrap_or_default()
        {
            let env: HashMap<&str, &str> = c
                .environment()
                .iter()
                .filter_map(|kv| Some((kv.name()?, kv.value()?)))
                .collect();
            // The bootstrap's own order of precedence.
            let node = [ENV_RESOURCE_ARN, ENV_RESOURCE_NAME, ENV_VIRTUAL_NODE_NAME]
                .iter()
                .find_map(|v| env.get(v).map(|s| (*s).to_string()));
            if let Some(name) = c.name() {
                nodes.insert(name.to_string(), node);
            }
        }
        let nodes = Arc::new(nodes);
        self.revisions_lock()
            .insert(revision.to_string(), nodes.clone());
        Ok(nodes)
    }

    fn revisions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Nodes>>> {
        self.revisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps an attested container (and writes the cache file; a write failure only logs).
    fn remember(&self, container: String, mut known: Known) {
        let bytes = {
            let mut k = self.lock();
            known.seq = k.next_seq;
            k.next_seq += 1;
            k.containers.insert(container, known);
            while k.containers.len() > MAX_CONTAINERS {
                let oldest = k
                    .containers
                    .iter()
                    .min_by_key(|(_, v)| v.seq)
                    .map(|(id, _)| id.clone());
                match oldest {
                    Some(id) => k.containers.remove(&id),
                    None => break,
                };
            }
            serde_json::to_vec(&*k)
        };
        let (Some(path), Ok(bytes)) = (&self.settings.cache_file, bytes) else {
            return;
        };
        if let Err(e) = crate::store::write_private(path, &bytes) {
            warn!(file = %path.display(), error = %e, "cannot keep attested containers; they are asked for again after a restart");
        }
    }

    async fn client(&self) -> &Client {
        self.client.get_or_init(|| connect(&self.settings)).await
    }
}

async fn connect(s: &EcsSettings) -> Client {
    let shared = crate::sdk::load(crate::sdk::Loading {
        endpoint: s.endpoint.as_deref(),
        fallback_region: &s.fallback_region,
        attempt_timeout: CALL_TIMEOUT,
        sdk_retries: true,
    })
    .await;
    Client::new(&shared)
}
