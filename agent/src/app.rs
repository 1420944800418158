//! Assembles the agent from its parts and returns the bound addresses, so tests can bind port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::acm;
use crate::admin;
use crate::api::{self, Account, Ops, Quotas};
use crate::attest::{self, Attestor};
use crate::auth::{self, Auth};
use crate::config::{CloudMapArgs, ServeConfig};
use crate::discovery::{self, SdkCloudMap};
use crate::lrs::Lrs;
use crate::store::{self, Store};
use crate::tls::{self, ReloadingCert, TlsListener};
use crate::ui;
use crate::xds::{self, Ads};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("--resources: {0}")]
    Resources(#[source] api::Error),
    #[error("cannot bind the API address {addr}: {source}")]
    BindApi {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Xds(#[from] xds::Error),
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error("--api-tls-cert/--api-tls-key: {0}")]
    Tls(#[from] tls::Error),
    #[error(
        "the API address {0} is not loopback: give --api-auth FILE (keys and roles allowed to call it), \
         or --api-auth-disabled to serve it to anyone who can reach the port"
    )]
    OpenApi(SocketAddr),
    #[error(
        "--xds-addr {0}: TCP ADS needs --xds-tls-cert, --xds-tls-key and --xds-tls-client-ca (each \
         Envoy proves its node with a client certificate), or --xds-tcp-insecure to serve any node's \
         configuration in plain text to anyone who can reach the port"
    )]
    OpenXds(SocketAddr),
    #[error("--xds-tls-cert/--xds-tls-key/--xds-tls-client-ca: {0}")]
    XdsTls(#[source] tls::Error),
    #[error(transparent)]
    Pattern(#[from] attest::cgroup::PatternError),
}

/// A running agent.
#[derive(Debug)]
pub struct Bound {
    pub api_addr: SocketAddr,
    /// Whether the API speaks HTTPS.
    pub api_tls: bool,
    pub xds_socket: PathBuf,
    pub xds_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    tasks: Tasks,
}

/// The agent's long-running tasks: each named and in its own span, all stopped by one
/// cancellation token; the first to end (or fail) ends the agent.
#[derive(Debug, Default)]
struct Tasks {
    cancel: CancellationToken,
    set: JoinSet<(&'static str, Result<(), String>)>,
}

impl Tasks {
    /// Runs the future `task` makes from the agent's cancellation token as the task `name`.
    fn spawn<F>(&mut self, name: &'static str, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output: Outcome> + Send + 'static,
    {
        let run = task(self.cancel.clone());
        self.set.spawn(
            async move { (name, run.await.into_result()) }.instrument(info_span!("task", name)),
        );
    }
}

/// How a task ends: a task that returns nothing cannot fail; an error ends the agent.
trait Outcome {
    fn into_result(self) -> Result<(), String>;
}

impl Outcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> Outcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

pub async fn build(cfg: ServeConfig) -> Result<Bound, Error> {
    let sec = &cfg.api;
    // Secure by default: a door to the network needs its lock, or an explicit "leave it open".
    if !cfg.api_addr.ip().is_loopback() && sec.api_auth.is_none() && !sec.api_auth_disabled {
        return Err(Error::OpenApi(cfg.api_addr));
    }
    let xsec = &cfg.xds_security;
    let xds_tls = match (
        &cfg.xds_addr,
        &xsec.xds_tls_cert,
        &xsec.xds_tls_key,
        &xsec.xds_tls_client_ca,
    ) {
        (Some(_), Some(c), Some(k), Some(ca)) => {
            let cert = ReloadingCert::load(c, k).map_err(Error::XdsTls)?;
            let config = cert.mtls_server_config(ca).map_err(Error::XdsTls)?;
            Some((cert, config))
        }
        (Some(addr), ..) if !xsec.xds_tcp_insecure => return Err(Error::OpenXds(*addr)),
        _ => None,
    };
    let attestor = attestor(&cfg)?;
    let cert = match (&sec.api_tls_cert, &sec.api_tls_key) {
        (Some(c), Some(k)) => Some(ReloadingCert::load(c, k)?),
        _ => None,
    };
    let store = Arc::new(Store::serve(&cfg.data_dir, &cfg.store, &cfg.region).await?);
    let ops = Arc::new(ops(&cfg));
    let mut tasks = Tasks::default();
    if let Some(path) = cfg.resources.clone() {
        match tokio::task::block_in_place(|| api::apply_resources_file(&ops, &store, &path)) {
            Ok(n) => info!(file = %path.display(), resources = n, "applied resources file"),
            // The shared store cannot confirm the import now: serve the last good state and
            // apply the file once the store answers; an agent that can serve never exits for it.
            Err(api::Error::Store(e)) if e.is_retryable() => {
                warn!(file = %path.display(), error = %e,
                    "cannot apply the resources file now; serving, and applying it once the store answers");
                let (ops, store) = (ops.clone(), store.clone());
                tasks.spawn("resources", |cancel| {
                    apply_resources_later(ops, store, path, cancel)
                });
            }
            Err(e) => return Err(Error::Resources(e)),
        }
    }
    let cancel = tasks.cancel.clone();
    let s = store.clone();
    tasks.spawn("store", |cancel| async move { s.run(cancel).await });

    let auth = api_auth(&cfg, &mut tasks).await?;
    if let Some(cert) = &cert {
        let (c, a) = (cert.clone(), auth.clone());
        let every = Duration::from_millis(sec.api_reload_ms);
        tasks.spawn("api-tls-reload", |cancel| {
            c.watch(
                every,
                move |ok| {
                    let m = &a.metrics;
                    let n = if ok {
                        &m.tls_reloads_ok
                    } else {
                        &m.tls_reloads_failed
                    };
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                },
                cancel,
            )
        });
    } else if !cfg.api_addr.ip().is_loopback() {
        warn!(api_addr = %cfg.api_addr, "the API is served without TLS beyond loopback: responses cross the network in clear text, and IAM roles get no credentials");
    }

    let listener = tokio::net::TcpListener::bind(cfg.api_addr)
        .await
        .map_err(|source| Error::BindApi {
            addr: cfg.api_addr,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| Error::BindApi {
        addr: cfg.api_addr,
        source,
    })?;
    let metrics = Arc::new(xds::Metrics::default());
    let discovery_metrics = Arc::new(discovery::Metrics::default());
    let ready = admin::Readiness::default();
    // What the ADS streams serve: also what `explain` explains and load reports are read against.
    let (published_tx, published_rx) = xds::debounce::channel(store.current());
    let lrs = Lrs::new(
        Duration::from_millis(cfg.load_report_interval_ms),
        published_rx.clone(),
        cancel.clone(),
    );
    let router = api::router(ops, store.clone())
        .merge(admin::router(
            metrics.clone(),
            discovery_metrics.clone(),
            ready.clone(),
            store.clone(),
            auth.clone(),
            lrs.clone(),
        ))
        .merge(ui::router(
            published_rx.clone(),
            lrs.clone(),
            &cfg.region,
            auth.enforced(),
        ))
        .merge(auth::http::routes(auth.clone()))
        .layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::http::layer,
        ));
    let app = router.into_make_service_with_connect_info::<auth::http::Conn>();
    let api_tls = cert.is_some();
    match &cert {
        None => tasks.spawn("api", |cancel| async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
        }),
        Some(cert) => {
            let listener = TlsListener::new(listener, cert.server_config()?);
            tasks.spawn("api", |cancel| async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
            })
        }
    }

    let (endpoints_tx, endpoints_rx) = tokio::sync::watch::channel(discovery::Found::default());
    // Cloud Map pollers and the service-address resolver both publish here.
    let endpoints_tx = Arc::new(endpoints_tx);
    let store_rx = store.subscribe();
    let debounce = xds::Debounce {
        quiet: Duration::from_millis(cfg.xds_debounce_ms),
        max_delay: Duration::from_millis(cfg.xds_debounce_max_ms),
    };
    tasks.spawn("debounce", |cancel| {
        xds::debounce::run_with_endpoints(store_rx, endpoints_rx, published_tx, debounce, cancel)
    });
    // What SotW Envoys were sent, so a restart keeps the clusters their listeners still use.
    let served = Arc::new(xds::Served::load(&cfg.data_dir.join(xds::SERVED_FILE)));
    let s = served.clone();
    tasks.spawn("xds-served", |cancel| s.run(cancel));
    let ads = Ads::new(
        published_rx,
        store.subscribe(),
        metrics.clone(),
        xds::Settings {
            served,
            attestor,
            ..xds::Settings::new(cfg.max_connections_per_proxy)
        },
        cancel.clone(),
    );
    let (client, settings) = cloud_map(&cfg.cloudmap, &cfg.region);
    let (state, proxies) = (store.subscribe(), ads.connected_proxies());
    let out = endpoints_tx.clone();
    let fleet = fleet(&cfg, discovery_metrics.clone()).await?;
    tasks.spawn("discovery", |cancel| async move {
        match fleet {
            Some(fleet) => {
                discovery::fleet::run(
                    fleet,
                    client,
                    state,
                    proxies,
                    out,
                    discovery_metrics,
                    settings,
                    cancel,
                )
                .await
            }
            None => {
                discovery::run(
                    client,
                    state,
                    proxies,
                    out,
                    discovery_metrics,
                    settings,
                    cancel,
                )
                .await
            }
        }
    });
    let (state, proxies) = (store.subscribe(), ads.connected_proxies());
    let every = Duration::from_millis(cfg.address_poll_ms);
    let acm_out = endpoints_tx.clone();
    tasks.spawn("service-addresses", |cancel| {
        let resolver = Arc::new(discovery::addresses::SystemResolver);
        discovery::addresses::run(resolver, state, proxies, endpoints_tx, every, cancel)
    });
    // ACM keys go only to streams that proved their node: without attestation on the socket
    // nor mTLS on TCP, no stream could be handed one, so none is exported.
    let attested = xsec.xds_attestation == attest::Mode::Ecs || xds_tls.is_some();
    if attested {
        let source = Arc::new(acm::SdkAcm::new(acm::sdk::Settings {
            endpoint: cfg.acm_endpoint.clone(),
            fallback_region: cfg.region.clone(),
        }));
        let (state, proxies) = (store.subscribe(), ads.attested_proxies());
        let every = Duration::from_secs(cfg.acm_refresh_interval_s.max(1));
        tasks.spawn("acm", |cancel| {
            acm::run(source, state, proxies, acm_out, every, cancel)
        });
    } else {
        info!(
            "ACM certificates and trust are not served: no stream is attested (--xds-attestation none, no TCP mTLS)"
        );
    }
    let unix = xds::bind_unix(&cfg.xds_socket, xsec.xds_socket_group)?;
    let (a, l) = (ads.clone(), lrs.clone());
    tasks.spawn("xds-unix", |_| xds::serve_unix(a, l, unix));
    let xds_addr = match cfg.xds_addr {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| xds::Error::BindTcp {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| xds::Error::BindTcp {
                addr: addr.to_string(),
                source,
            })?;
            match xds_tls {
                Some((cert, config)) => {
                    let every = Duration::from_millis(sec.api_reload_ms);
                    let c = cert.clone();
                    tasks.spawn("xds-tls-reload", |cancel| c.watch(every, |_| {}, cancel));
                    let l = TlsListener::new(l, config);
                    tasks.spawn("xds-tcp", |_| xds::serve_tls(ads, lrs, l));
                }
                None => {
                    warn!(xds_addr = %bound, "--xds-tcp-insecure: anyone who can reach this port gets any node's configuration");
                    tasks.spawn("xds-tcp", |_| xds::serve_tcp(ads, lrs, l));
                }
            }
            Some(bound)
        }
    };
    ready.set_ready();
    info!(api = %api_addr, api_tls, api_auth = auth.enforced(), xds_socket = %cfg.xds_socket.display(), xds_tcp = ?xds_addr, "agent ready");
    Ok(Bound {
        api_addr,
        api_tls,
        xds_socket: cfg.xds_socket,
        xds_addr,
        store,
        tasks,
    })
}

/// `--resources` once the store answers: retried with jittered backoff (up to 30 s) while it is
/// unavailable; a file it rejects ends the agent, as it would have at start. Then idle until
/// `cancel` (a task that ends stops the agent).
async fn apply_resources_later(
    ops: Arc<Ops>,
    store: Arc<Store>,
    path: PathBuf,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait.mul_f64(0.5 + fastrand::f64())) => {}
        }
        match tokio::task::block_in_place(|| api::apply_resources_file(&ops, &store, &path)) {
            Ok(n) => {
                info!(file = %path.display(), resources = n, "applied resources file");
                cancel.cancelled().await;
                return Ok(());
            }
            Err(api::Error::Store(e)) if e.is_retryable() => {
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(Error::Resources(e)),
        }
    }
}

/// The API's gatekeeper: the auth file (reloaded by a task), the audit log (written by a task), and
/// session keys in the store, so every agent of a shared store verifies every agent's sessions.
async fn api_auth(cfg: &ServeConfig, tasks: &mut Tasks) -> Result<Arc<Auth>, Error> {
    let sec = &cfg.api;
    let secrets = match &sec.api_auth {
        Some(_) => {
            Some(store::secret::Secrets::connect(&cfg.data_dir, &cfg.store, &cfg.region).await?)
        }
        None => None,
    };
    let settings = auth::Settings {
        file: sec.api_auth.clone(),
        region: cfg.region.clone(),
        account: cfg.account_id.clone(),
        audit_log: sec.audit_log.clone(),
        sts_endpoint: sec.sts_endpoint.clone(),
        server_ids: sec.api_server_id.clone(),
        session_duration: Duration::from_secs(sec.api_session_seconds),
    };
    let (auth, writer) = Auth::new(&settings, secrets).await?;
    if let Some(w) = writer {
        tasks.spawn("audit-log", |cancel| w.run(cancel));
    }
    if auth.enforced() {
        let (a, every) = (auth.clone(), Duration::from_millis(sec.api_reload_ms));
        tasks.spawn("auth-file-reload", |cancel| a.watch_file(every, cancel));
    } else if !cfg.api_addr.ip().is_loopback() {
        warn!(api_addr = %cfg.api_addr, "--api-auth-disabled: anyone who can reach the API owns the mesh");
    }
    Ok(auth)
}

/// Who may claim which node on the Unix socket (`--xds-attestation`).
fn attestor(cfg: &ServeConfig) -> Result<Arc<Attestor>, Error> {
    let x = &cfg.xds_security;
    match x.xds_attestation {
        attest::Mode::None => {
            warn!(socket = %cfg.xds_socket.display(), "--xds-attestation none: any process that can open the ADS socket gets any node's configuration");
            Ok(Arc::new(Attestor::none()))
        }
        attest::Mode::Ecs => {
            let ecs = attest::Ecs::new(attest::EcsSettings {
                agent_uri: x.ecs_agent_uri.clone(),
                endpoint: x.ecs_endpoint.clone(),
                fallback_region: cfg.region.clone(),
                cache_file: Some(cfg.data_dir.join(attest::ecs::CACHE_FILE)),
                pattern: attest::cgroup::ContainerPattern::new(
                    &x.xds_attestation_container_pattern,
                )?,
            })
            .map_err(Error::XdsTls)?;
            Ok(Arc::new(Attestor::ecs(ecs)))
        }
    }
}

/// The API's operations, for this account and region with the configured quotas.
fn ops(cfg: &ServeConfig) -> Ops {
    Ops {
        account: Account {
            account_id: cfg.account_id.clone(),
            region: cfg.region.clone(),
        },
        quotas: Quotas {
            meshes: cfg.quota_meshes,
            virtual_nodes_per_mesh: cfg.quota_virtual_nodes,
            virtual_services_per_mesh: cfg.quota_virtual_services,
            backends_per_virtual_node: cfg.quota_backends,
            virtual_routers_per_mesh: cfg.quota_virtual_routers,
            routes_per_router: cfg.quota_routes,
            weighted_targets_per_route: cfg.quota_weighted_targets,
            virtual_gateways_per_mesh: cfg.quota_virtual_gateways,
            gateway_routes_per_gateway: cfg.quota_gateway_routes,
            tags_per_resource: cfg.quota_tags,
        },
    }
}

/// With the DynamoDB store (unless `--cloudmap-shared-pollers false`): this agent's part in the
/// pollers shared by every agent of the table.
async fn fleet(
    cfg: &ServeConfig,
    metrics: Arc<discovery::Metrics>,
) -> Result<Option<discovery::fleet::Fleet>, Error> {
    if cfg.store.backend != store::Backend::Dynamodb || !cfg.cloudmap.shared_pollers {
        return Ok(None);
    }
    let table = store::dynamodb::FleetTable::connect(
        &cfg.store,
        &cfg.region,
        &cfg.cloudmap.health_status,
        metrics,
    )
    .await?;
    Ok(Some(discovery::fleet::Fleet::new(Arc::new(table))))
}

/// The Cloud Map client (connected on first use) and the pollers' timing.
fn cloud_map(
    args: &CloudMapArgs,
    region: &str,
) -> (Arc<dyn discovery::CloudMap>, discovery::Config) {
    let client = SdkCloudMap::new(discovery::sdk::Settings {
        endpoint: args.endpoint.clone(),
        fallback_region: region.to_string(),
        health: args.health_status.as_str().into(),
    });
    let cfg = discovery::Config {
        poll: Duration::from_millis(args.poll_ms),
        refresh: Duration::from_millis(args.refresh_ms),
        jitter: f64::from(args.jitter_percent) / 100.0,
        backoff_max: Duration::from_millis(args.backoff_max_ms),
        linger: Duration::from_millis(args.linger_ms),
        churn_poll: Duration::from_millis(args.churn_poll_ms),
        churn_window: Duration::from_millis(args.churn_window_ms),
    };
    (Arc::new(client), cfg)
}

impl Bound {
    /// Stops every task (also when one of them fails) and waits up to `deadline` for them.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<(), String> {
        self.tasks.cancel.cancel();
        let drain = async {
            let mut first_err = None;
            while let Some(res) = self.tasks.set.join_next().await {
                match res {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => {
                        first_err.get_or_insert(format!("{name}: {e}"));
                    }
                    Err(e) => {
                        first_err.get_or_insert(format!("task panicked: {e}"));
                    }
                }
            }
            first_err
        };
        match tokio::time::timeout(deadline, drain).await {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err("tasks did not stop within the deadline".into()),
        }
    }

    /// Runs until SIGINT/SIGTERM or until any task ends, then shuts everything down.
    pub async fn wait_termination(mut self) -> Result<(), String> {
        let failed = tokio::select! {
            () = shutdown_signal() => None,
            res = self.tasks.set.join_next() => Some(match res {
                Some(Ok((name, Ok(())))) => format!("{name} stopped unexpectedly"),
                Some(Ok((name, Err(e)))) => format!("{name}: {e}"),
                Some(Err(e)) => format!("task panicked: {e}"),
                None => "no tasks".to_string(),
            }),
        };
        if let Some(e) = &failed {
            error!(error = %e, "a component failed; shutting down");
        } else {
            info!("shutting down");
        }
        let res = self.shutdown(Duration::from_secs(10)).await;
        match failed {
            Some(e) => Err(e),
            None => res,
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
