//! What the operator can choose when meshing a task definition, with App Mesh's defaults. The CLI maps
//! its flags onto [`Options`]; the library never reads flags or the environment itself.

/// Name of the Envoy container the tool owns.
pub const ENVOY_CONTAINER: &str = "envoy";
/// Name of the route manager container the tool owns.
pub const ROUTE_MANAGER_CONTAINER: &str = "proxy-route-manager";
/// Name of the host volume that carries the agent's ADS socket.
pub const SOCKET_VOLUME: &str = "trellis-agent-socket";
/// Where the socket directory is mounted inside the Envoy container.
pub const SOCKET_CONTAINER_PATH: &str = "/var/run/trellis";
/// Name of the host volume that carries the task's SDS server socket (a SPIRE agent's).
pub(crate) const SDS_VOLUME: &str = "trellis-sds-socket";
/// File name of the agent's ADS socket inside the socket directory.
pub const SOCKET_FILE: &str = "xds.sock";

pub const DEFAULT_ENVOY_IMAGE: &str = "trellis-envoy:0.1.0";
pub const DEFAULT_ROUTE_MANAGER_IMAGE: &str = "trellis-proxy-route-manager:0.1.0";
pub const DEFAULT_SOCKET_HOST_PATH: &str = "/var/run/trellis";
/// Envoy's UID; the redirect ignores its traffic so Envoy's own egress is not looped back into it.
pub const DEFAULT_IGNORED_UID: u32 = 1337;
pub const ENVOY_INGRESS_PORT: u16 = 15000;
pub const ENVOY_EGRESS_PORT: u16 = 15001;
pub const ENVOY_ADMIN_PORT: u16 = 9901;
/// The ECS task metadata/credentials endpoint and the EC2 instance metadata service: always bypass Envoy.
pub const ALWAYS_IGNORED_IPS: [&str; 2] = ["169.254.170.2", "169.254.169.254"];
/// Destination ports that bypass Envoy even when none are listed: SSH, as App Mesh on ECS did ("Even if
/// you list no ports, port 22 is ignored").
pub const ALWAYS_IGNORED_PORTS: [u16; 1] = [22];
/// ECS's App Mesh CNI plugin applies at most this many app ports and ignored egress ports (one iptables
/// multiport rule each) and silently drops the rest; App Mesh documents the limit for ignored ports.
pub const PROXY_CONFIGURATION_MAX_PORTS: usize = 15;
pub(crate) const ENVOY_NOFILE: u32 = 15000;

/// Which App Mesh resource the Envoy in this task represents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An application task: Envoy sidecar plus transparent redirect.
    VirtualNode(String),
    /// An Envoy-only ingress task: no redirect, no route manager.
    VirtualGateway(String),
}

/// How traffic is redirected into Envoy for a virtual node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The `proxy-route-manager` init container programs iptables (works on any ECS agent).
    RouteManager,
    /// ECS's native `proxyConfiguration` (type APPMESH): the ECS agent's CNI plugin programs iptables.
    ProxyConfiguration,
    /// No redirect: the app containers name Envoy's egress port as their HTTP proxy (`HTTP_PROXY`),
    /// and Envoy routes each request by its `Host: NAME:PORT`. For `bridge` and `host` network
    /// modes, where no per-task network namespace can carry a redirect. Inbound traffic reaches
    /// the app directly (its own port), so the node's listener policies do not apply to it.
    Explicit,
}

/// Everything [`crate::rewrite`] needs besides the task definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mesh: String,
    pub target: Target,
    pub redirect: Redirect,
    /// `None`: keep the image of a task Trellis already meshed (one whose Envoy has
    /// `APPMESH_XDS_ENDPOINT`), else [`DEFAULT_ENVOY_IMAGE`]. A re-run never resets a pinned image.
    pub envoy_image: Option<String>,
    /// `None`: keep the image of an already meshed task's route manager, else
    /// [`DEFAULT_ROUTE_MANAGER_IMAGE`].
    pub route_manager_image: Option<String>,
    /// Keep the task's own Envoy container (AWS's `aws-appmesh-envoy` image, say) exactly as it is and
    /// only point it at the agent: `APPMESH_XDS_ENDPOINT` plus the socket mount and volume. Nothing
    /// else in the task changes; the redirect stays whatever the task had. The options that would
    /// change Envoy or the redirect are not used (the CLI refuses them with this mode).
    pub keep_envoy: bool,
    /// Host directory holding the agent's `xds.sock`.
    pub socket_host_path: String,
    /// `host:port` of an agent reachable over TCP; replaces the socket mount (needed on Fargate).
    pub xds_endpoint: Option<String>,
    /// `None`: keep the task's existing redirect setting, else the app containers' container ports.
    pub app_ports: Option<Vec<u16>>,
    /// `None`: keep the existing setting, else [`DEFAULT_IGNORED_UID`].
    pub ignored_uid: Option<u32>,
    pub ignored_gid: Option<u32>,
    /// Added to [`ALWAYS_IGNORED_IPS`] and to whatever the task already ignores.
    pub egress_ignored_ips: Vec<String>,
    /// Added to whatever the task already ignores.
    pub egress_ignored_ports: Vec<u16>,
    pub enable_ipv6: bool,
    pub envoy_log_level: Option<String>,
    pub envoy_cpu: Option<u32>,
    /// Hard memory limit of the Envoy container, MiB.
    pub envoy_memory: Option<u32>,
    /// Extra Envoy variables (`ENABLE_ENVOY_STATS_TAGS`, `ENABLE_ENVOY_XRAY_TRACING`, ...).
    pub envoy_env: Vec<(String, String)>,
    /// The instance's SDS server socket (e.g. a SPIRE agent's `/run/spire/sockets/agent.sock`), for
    /// SDS certificates: its directory is mounted read-only into Envoy at the same path and
    /// `APPMESH_SDS_SOCKET_PATH` names it, as App Mesh's SPIRE setup did.
    pub sds_socket_path: Option<String>,
}

// === impl Options ===

impl Options {
    /// Options with every default, for `target` in `mesh`.
    pub fn new(mesh: impl Into<String>, target: Target) -> Self {
        Self {
            mesh: mesh.into(),
            target,
            redirect: Redirect::RouteManager,
            envoy_image: None,
            route_manager_image: None,
            keep_envoy: false,
            socket_host_path: DEFAULT_SOCKET_HOST_PATH.to_string(),
            xds_endpoint: None,
            app_ports: None,
            ignored_uid: None,
            ignored_gid: None,
            egress_ignored_ips: Vec::new(),
            egress_ignored_ports: Vec::new(),
            enable_ipv6: false,
            envoy_log_level: None,
            envoy_cpu: None,
            envoy_memory: None,
            envoy_env: Vec::new(),
            sds_socket_path: None,
        }
    }

    /// `mesh/M/virtualNode/N` or `mesh/M/virtualGateway/N`: the Envoy node id the agent expects.
    pub fn resource_arn(&self) -> String {
        match &self.target {
            Target::VirtualNode(n) => format!("mesh/{}/virtualNode/{n}", self.mesh),
            Target::VirtualGateway(n) => format!("mesh/{}/virtualGateway/{n}", self.mesh),
        }
    }

    pub fn xds_endpoint_value(&self) -> String {
        match &self.xds_endpoint {
            Some(e) => e.clone(),
            None => format!("unix://{SOCKET_CONTAINER_PATH}/{SOCKET_FILE}"),
        }
    }

    pub fn is_gateway(&self) -> bool {
        matches!(self.target, Target::VirtualGateway(_))
    }

    /// The directory of the SDS socket, mounted into Envoy.
    pub fn sds_socket_dir(&self) -> Option<&str> {
        let path = self.sds_socket_path.as_deref()?;
        path.rsplit_once('/')
            .map(|(dir, _)| dir)
            .filter(|d| !d.is_empty())
    }

    /// The redirect in use, or `None` for a gateway (which has none).
    pub fn redirect(&self) -> Option<Redirect> {
        (!self.is_gateway()).then_some(self.redirect)
    }
}
