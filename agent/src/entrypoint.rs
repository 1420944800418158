//! `trellis-agent envoy`: the Envoy image's entrypoint. It writes the bootstrap from the App Mesh
//! Envoy variables, runs Envoy as a child, and owns its shutdown: SIGINT (and a second SIGTERM) is
//! forwarded at once; a first SIGTERM first drains Envoy's inbound listeners and holds Envoy while
//! the task's app containers are still running (read from the ECS task metadata endpoint v4), up to
//! `ENVOY_DRAIN_TIMEOUT` seconds. Then Envoy gets SIGTERM and its exit status becomes ours, so ECS
//! sees what Envoy did.
//!
//! Why: ECS stops a task's containers concurrently unless `dependsOn` orders them, and an app that
//! still serves or calls out during its own shutdown needs its sidecar until it is gone (the
//! connection draining App Mesh users asked for).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bootstrap::{self, EnvoySettings, Vars};
use crate::probe::http;

/// How long Envoy is held after SIGTERM at most, in whole seconds (default 20: below ECS's default
/// 30 s `stopTimeout`, so Envoy exits on its own terms before ECS sends SIGKILL).
pub const ENV_DRAIN_TIMEOUT: &str = "ENVOY_DRAIN_TIMEOUT";
/// Set by the ECS agent in every container: the task metadata endpoint v4 for this container.
pub const ENV_METADATA_URI: &str = "ECS_CONTAINER_METADATA_URI_V4";
/// App Mesh's name for the drain wait (5 to 110 s); `ENVOY_DRAIN_TIMEOUT` wins when both are set.
pub const ENV_LISTENER_DRAIN_WAIT: &str = "LISTENER_DRAIN_WAIT_TIME_S";
pub const ENV_RESTART_COUNT: &str = "APPNET_ENVOY_RESTART_COUNT";
pub const ENV_PID_POLL: &str = "PID_POLL_INTERVAL_MS";
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 20;
/// How often the task metadata is read while holding Envoy.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, clap::Args)]
pub struct EnvoyArgs {
    /// The Envoy binary to run.
    #[arg(
        long,
        env = "TRELLIS_ENVOY_BIN",
        default_value = "/usr/local/bin/envoy"
    )]
    pub envoy: PathBuf,
    /// Where to write the bootstrap (must be writable by Envoy's user, 1337 in the image).
    #[arg(long, default_value = "/tmp/envoy-bootstrap.json")]
    pub bootstrap: PathBuf,
    /// Extra Envoy flags, after `--` (for example `-- --base-id 7`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::Error),
    #[error("{var}={value:?}: {rule}")]
    Invalid {
        var: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("cannot write the bootstrap to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start Envoy at {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the shutdown needs besides Envoy's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSettings {
    pub timeout: Duration,
    /// `http://169.254.170.2/v4/ID` on ECS; absent elsewhere, and then Envoy is held for the whole
    /// timeout (nothing tells when the app is gone).
    pub metadata: Option<MetadataUri>,
}

/// An `http://host:port/path` URI (the metadata endpoint is plain HTTP on a link-local address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataUri {
    pub authority: String,
    pub path: String,
}

impl DrainSettings {
    pub fn from_vars(vars: &impl Vars) -> Result<Self, Error> {
        let nonempty = |n: &str| vars.get(n).filter(|v| !v.trim().is_empty());
        let seconds = |var: &'static str, rule: &'static str| {
            nonempty(var)
                .map(|v| {
                    v.trim()
                        .trim_end_matches('s')
                        .parse::<u64>()
                        .map_err(|_| Error::Invalid {
                            var,
                            value: v.clone(),
                            rule,
                        })
                })
                .transpose()
        };
        let ours = seconds(
            ENV_DRAIN_TIMEOUT,
            "must be a whole number of seconds (0 stops Envoy without holding it)",
        )?;
        // App Mesh's name for the same wait, with its bounds (ECS allows a stopTimeout of 120 s).
        let app_mesh = seconds(
            ENV_LISTENER_DRAIN_WAIT,
            "must be a whole number of seconds from 5 to 110",
        )?;
        if let (Some(v), None) = (app_mesh, ours)
            && !(5..=110).contains(&v)
        {
            return Err(Error::Invalid {
                var: ENV_LISTENER_DRAIN_WAIT,
                value: v.to_string(),
                rule: "must be a whole number of seconds from 5 to 110",
            });
        }
        let timeout = ours.or(app_mesh).unwrap_or(DEFAULT_DRAIN_TIMEOUT_S);
        let metadata = match nonempty(ENV_METADATA_URI) {
            None => None,
            Some(v) => Some(MetadataUri::parse(&v).ok_or(Error::Invalid {
                var: ENV_METADATA_URI,
                value: v.clone(),
                rule: "must be an http://host[:port]/path URI",
            })?),
        };
        Ok(DrainSettings {
            timeout: Duration::from_secs(timeout),
            metadata,
        })
    }
}

/// How the entrypoint runs Envoy, from the App Mesh agent's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// `APPNET_ENVOY_RESTART_COUNT`: how often an Envoy that exits on its own is started again.
    pub restarts: u32,
    /// `DISABLE_HOT_RESTART` (true): Envoy's `--disable-hot-restart`.
    pub disable_hot_restart: bool,
    /// `ENVOY_SKIP_DEPRECATED_LOGS` (true): Envoy's deprecation warnings are not logged.
    pub skip_deprecated_logs: bool,
    /// `ENVOY_CONFIG_FILE`: the operator's whole bootstrap, used instead of a generated one.
    pub config_file: Option<PathBuf>,
}

impl RunSettings {
    pub fn from_vars(vars: &impl Vars) -> Result<Self, Error> {
        let env = bootstrap::Env::new(vars);
        let restarts = match env.get(ENV_RESTART_COUNT) {
            None => 0,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= 10)
                .ok_or(Error::Invalid {
                    var: ENV_RESTART_COUNT,
                    value: v,
                    rule: "must be a whole number from 0 to 10",
                })?,
        };
        if let Some(v) = env.get(ENV_PID_POLL) {
            // Envoy's exit is seen at once (it is our child); the value is checked, not needed.
            if !v.parse::<u32>().is_ok_and(|ms| (100..=1000).contains(&ms)) {
                return Err(Error::Invalid {
                    var: ENV_PID_POLL,
                    value: v,
                    rule: "must be a whole number of milliseconds from 100 to 1000",
                });
            }
        }
        Ok(RunSettings {
            restarts,
            disable_hot_restart: env.flag("DISABLE_HOT_RESTART", true)?,
            skip_deprecated_logs: env.flag("ENVOY_SKIP_DEPRECATED_LOGS", true)?,
            config_file: env.get("ENVOY_CONFIG_FILE").map(PathBuf::from),
        })
    }

    /// Flags added to Envoy's (unless the operator's extra flags already say them).
    fn envoy_flags(&self, log_level: &str, extra: &[String]) -> Vec<String> {
        let mut flags = Vec::new();
        if self.disable_hot_restart && !extra.iter().any(|a| a == "--disable-hot-restart") {
            flags.push("--disable-hot-restart".to_string());
        }
        // Deprecation warnings are logged by Envoy's `misc` logger; quieting it only ever lowers
        // what is logged.
        if self.skip_deprecated_logs
            && ["trace", "debug", "info", "warning", "warn"].contains(&log_level)
        {
            flags.extend([
                "--component-log-level".to_string(),
                "misc:error".to_string(),
            ]);
        }
        flags
    }
}

impl MetadataUri {
    fn parse(v: &str) -> Option<Self> {
        let rest = v.trim().strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return None;
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Some(MetadataUri {
            authority,
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

/// Runs Envoy to completion and returns the exit code to leave with.
pub fn run(args: &EnvoyArgs, vars: &impl Vars) -> Result<i32, Error> {
    let settings = EnvoySettings::from_vars(vars)?;
    for note in &settings.notes {
        match note.level {
            bootstrap::Level::Warn => {
                warn!(variable = %note.var, detail = %note.text, "Envoy variable")
            }
            bootstrap::Level::Info => {
                info!(variable = %note.var, detail = %note.text, "Envoy variable")
            }
        }
    }
    let drain = DrainSettings::from_vars(vars)?;
    if let (Some(_), Some(_)) = (
        vars.get(ENV_DRAIN_TIMEOUT).filter(|v| !v.trim().is_empty()),
        vars.get(ENV_LISTENER_DRAIN_WAIT)
            .filter(|v| !v.trim().is_empty()),
    ) {
        warn!(
            variable = ENV_LISTENER_DRAIN_WAIT,
            detail = "ENVOY_DRAIN_TIMEOUT is set too and wins",
            "Envoy variable"
        );
    }
    let run = RunSettings::from_vars(vars)?;
    let config = match &run.config_file {
        // App Mesh's image: a non-empty ENVOY_CONFIG_FILE is the operator's whole bootstrap.
        Some(path) if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) => {
            info!(path = %path.display(), "ENVOY_CONFIG_FILE: using the operator's bootstrap");
            path.clone()
        }
        other => {
            let path = other.clone().unwrap_or_else(|| args.bootstrap.clone());
            let doc = serde_json::to_string_pretty(&settings.bootstrap()).unwrap_or_default();
            std::fs::write(&path, doc + "\n").map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
            path
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "start the runtime",
            source,
        })?;
    rt.block_on(async {
        let mut restarts = 0;
        loop {
            match supervise(args, &config, &settings, &drain, &run).await? {
                Exit::Signalled(code) => return Ok(code),
                Exit::OnItsOwn(code) if restarts < run.restarts => {
                    restarts += 1;
                    warn!(
                        code,
                        restart = restarts,
                        of = run.restarts,
                        "Envoy exited: starting it again (APPNET_ENVOY_RESTART_COUNT)"
                    );
                }
                Exit::OnItsOwn(code) => return Ok(code),
            }
        }
    })
}

/// How an Envoy run ended.
enum Exit {
    /// We stopped it (a signal to the entrypoint).
    Signalled(i32),
    /// It exited by itself (crash, bad configuration, /quitquitquit).
    OnItsOwn(i32),
}

async fn supervise(
    args: &EnvoyArgs,
    config: &std::path::Path,
    settings: &EnvoySettings,
    drain: &DrainSettings,
    run: &RunSettings,
) -> Result<Exit, Error> {
    let sig = |kind, what| signal(kind).map_err(|source| Error::Io { what, source });
    let mut sigterm = sig(SignalKind::terminate(), "listen for SIGTERM")?;
    let mut sigint = sig(SignalKind::interrupt(), "listen for SIGINT")?;

    let mut envoy_args = settings.envoy_args(&config.to_string_lossy());
    // Envoy's graceful drain period matches our hold, so listeners close no later than we stop it.
    envoy_args.extend([
        "--drain-time-s".to_string(),
        drain.timeout.as_secs().max(1).to_string(),
    ]);
    envoy_args.extend(run.envoy_flags(&settings.log_level, &args.extra));
    envoy_args.extend(args.extra.iter().cloned());
    let mut child = Command::new(&args.envoy)
        .args(&envoy_args)
        .spawn()
        .map_err(|source| Error::Spawn {
            path: args.envoy.clone(),
            source,
        })?;
    info!(envoy = %args.envoy.display(), args = ?envoy_args, "Envoy started");

    let first = tokio::select! {
        status = child.wait() => return finish(status).map(Exit::OnItsOwn),
        _ = sigint.recv() => Signal::SIGINT,
        _ = sigterm.recv() => Signal::SIGTERM,
    };
    if first == Signal::SIGTERM && !drain.timeout.is_zero() {
        let deadline = Instant::now() + drain.timeout;
        info!(
            timeout_s = drain.timeout.as_secs(),
            "SIGTERM: draining Envoy"
        );
        admin_drain(&settings.admin).await;
        tokio::select! {
            status = child.wait() => return finish(status).map(Exit::Signalled),
            _ = sigint.recv() => info!("SIGINT while draining: stopping Envoy now"),
            _ = sigterm.recv() => info!("second SIGTERM while draining: stopping Envoy now"),
            why = hold(drain, deadline) => info!(reason = why, "drain over: stopping Envoy"),
        }
    }
    forward(&child, first);
    finish(child.wait().await).map(Exit::Signalled)
}

fn forward(child: &Child, sig: Signal) {
    let Some(pid) = child.id() else { return };
    let Ok(pid) = i32::try_from(pid) else { return };
    if let Err(error) = kill(Pid::from_raw(pid), sig) {
        warn!(%error, signal = %sig, "cannot signal Envoy");
    }
}

fn finish(status: std::io::Result<ExitStatus>) -> Result<i32, Error> {
    let status = status.map_err(|source| Error::Io {
        what: "wait for Envoy",
        source,
    })?;
    let code = exit_code(status);
    info!(code, %status, "Envoy exited");
    Ok(code)
}

/// A shell's convention: the code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Asks Envoy to drain its inbound listeners gracefully: new inbound connections are refused and
/// keep-alive ones are told to close, while outbound (egress) keeps serving the app's shutdown.
async fn admin_drain(admin: &bootstrap::Admin) {
    const DRAIN: &str = "/drain_listeners?inboundonly&graceful";
    let answer = match admin {
        bootstrap::Admin::Tcp { port, .. } => {
            http(&format!("127.0.0.1:{port}"), "POST", DRAIN).await
        }
        bootstrap::Admin::Uds(path) => unix_post(path, DRAIN).await,
    };
    match answer {
        Ok((200, _)) => info!("Envoy is draining its inbound listeners"),
        Ok((status, body)) => warn!(status, body, "Envoy refused to drain"),
        Err(error) => warn!(%error, "cannot reach Envoy's admin to drain"),
    }
}

/// A POST to Envoy's admin on its Unix socket (`ENVOY_ADMIN_MODE=uds`).
async fn unix_post(path: &str, target: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "POST {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no HTTP status")?;
        Ok((
            status,
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5s".to_string())?
}

/// Returns when the task's other containers have all stopped, or at the deadline.
async fn hold(drain: &DrainSettings, deadline: Instant) -> &'static str {
    let Some(uri) = &drain.metadata else {
        tokio::time::sleep_until(deadline).await;
        return "deadline (no task metadata endpoint)";
    };
    let own = own_identity(uri).await;
    loop {
        if Instant::now() >= deadline {
            return "deadline";
        }
        match task_containers(uri).await {
            Ok(containers) => {
                let running = others_running(&containers, &own);
                if running.is_empty() {
                    return "app containers stopped";
                }
                tracing::debug!(?running, "waiting for app containers");
            }
            Err(error) => warn!(%error, "cannot read the task metadata; holding Envoy"),
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + POLL)).await;
    }
}

/// The task's other containers that still run. Only RUNNING counts: a container that never started
/// (CREATED, waiting on a dependency) or has stopped serves no traffic through Envoy.
fn others_running<'a>(containers: &'a [Container], own: &Own) -> Vec<&'a str> {
    containers
        .iter()
        .filter(|c| !c.is(own) && c.status == "RUNNING")
        .map(|c| c.name.as_str())
        .collect()
}

/// This container as the task metadata names it (`${ECS_CONTAINER_METADATA_URI_V4}` returns it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Own {
    docker_id: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    docker_id: Option<String>,
    name: String,
    status: String,
}

impl Container {
    fn is(&self, own: &Own) -> bool {
        match (&own.docker_id, &self.docker_id) {
            (Some(a), Some(b)) => a == b,
            _ => own.name.as_deref() == Some(self.name.as_str()),
        }
    }
}

async fn own_identity(uri: &MetadataUri) -> Own {
    match get_json(uri, "").await {
        Ok(v) => Own {
            docker_id: v["DockerId"].as_str().map(str::to_string),
            name: v["Name"].as_str().map(str::to_string),
        },
        Err(error) => {
            warn!(%error, "cannot read this container's metadata; counting every container");
            Own::default()
        }
    }
}

/// The task's containers (Task metadata v4 `Containers[]`: `DockerId`, `Name`, `KnownStatus`).
/// Containers of another `Type` than NORMAL (ECS's own pause or relay containers) are skipped.
async fn task_containers(uri: &MetadataUri) -> Result<Vec<Container>, String> {
    let v = get_json(uri, "/task").await?;
    parse_task(&v)
}

fn parse_task(v: &Value) -> Result<Vec<Container>, String> {
    let list = v["Containers"]
        .as_array()
        .ok_or("task metadata has no Containers list")?;
    Ok(list
        .iter()
        .filter(|c| c["Type"].as_str().is_none_or(|t| t == "NORMAL"))
        .map(|c| Container {
            docker_id: c["DockerId"].as_str().map(str::to_string),
            name: c["Name"].as_str().unwrap_or_default().to_string(),
            status: c["KnownStatus"].as_str().unwrap_or("UNKNOWN").to_string(),
        })
        .collect())
}

async fn get_json(uri: &MetadataUri, suffix: &str) -> Result<Value, String> {
    let path = format!("{}{suffix}", uri.path);
    let (status, body) = http(&uri.authority, "GET", &path)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if status != 200 {
        return Err(format!("GET {path}: HTTP {status}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn drain_defaults_to_twenty_seconds_without_metadata() {
        let d = DrainSettings::from_vars(&vars(&[])).unwrap();
        assert_eq!(d.timeout, Duration::from_secs(20));
        assert_eq!(d.metadata, None);
    }

    #[test]
    fn metadata_uri_and_timeout_are_read_and_bad_ones_name_the_variable() {
        let d = DrainSettings::from_vars(&vars(&[
            (ENV_DRAIN_TIMEOUT, "45s"),
            (ENV_METADATA_URI, "http://169.254.170.2/v4/abc-123/"),
        ]))
        .unwrap();
        assert_eq!(d.timeout, Duration::from_secs(45));
        assert_eq!(
            d.metadata,
            Some(MetadataUri {
                authority: "169.254.170.2:80".into(),
                path: "/v4/abc-123".into()
            })
        );
        for (var, value) in [
            (ENV_DRAIN_TIMEOUT, "soon"),
            (ENV_METADATA_URI, "https://x/v4"),
            (ENV_METADATA_URI, "http:///v4"),
        ] {
            let err = DrainSettings::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn task_metadata_lists_normal_containers_with_their_status() {
        // The shape documented for the task metadata endpoint v4 `/task` response.
        let v = serde_json::json!({
            "Cluster": "c", "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/c/1",
            "Containers": [
                {"DockerId": "e1", "Name": "envoy", "KnownStatus": "RUNNING", "Type": "NORMAL"},
                {"DockerId": "a1", "Name": "app", "KnownStatus": "STOPPED", "Type": "NORMAL"},
                {"DockerId": "p1", "Name": "~internal~ecs~pause", "KnownStatus": "RUNNING", "Type": "CNI_PAUSE"}
            ]
        });
        let cs = parse_task(&v).unwrap();
        assert_eq!(cs.len(), 2);
        let own = Own {
            docker_id: Some("e1".into()),
            name: Some("envoy".into()),
        };
        assert!(cs[0].is(&own));
        assert!(!cs[1].is(&own));
        assert_eq!(cs[1].status, "STOPPED");
        assert!(parse_task(&serde_json::json!({})).is_err());
    }

    #[test]
    fn only_other_running_containers_hold_envoy() {
        let c = |id: &str, name: &str, status: &str| Container {
            docker_id: Some(id.into()),
            name: name.into(),
            status: status.into(),
        };
        let own = Own {
            docker_id: Some("e1".into()),
            name: Some("envoy".into()),
        };
        let task = [
            c("e1", "envoy", "RUNNING"),
            c("a1", "app", "RUNNING"),
            c("w1", "worker", "CREATED"),
            c("r1", "proxy-route-manager", "STOPPED"),
        ];
        assert_eq!(others_running(&task, &own), ["app"]);
        // Without this container's own identity, it is matched by name.
        let by_name = Own {
            docker_id: None,
            name: Some("envoy".into()),
        };
        assert_eq!(others_running(&task[..1], &by_name), Vec::<&str>::new());
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
