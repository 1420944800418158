//! `trellis-agent envoy`, the Envoy image's entrypoint, against the real Envoy 1.40 and a stand-in
//! for the ECS task metadata endpoint v4: SIGTERM drains Envoy and holds it while an app container
//! runs, the drain deadline is honoured, SIGINT is forwarded at once, and Envoy's exit status
//! becomes the entrypoint's.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_tests::{Proc, Workdir, bin, envoy, eventually, free_port};

/// Serves the two task metadata v4 paths the entrypoint reads, with the app container's
/// `KnownStatus` under the test's control. Shapes as documented in "Task metadata v4 JSON response"
/// (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v4-response.html):
/// `${ECS_CONTAINER_METADATA_URI_V4}` is this container's object, `/task` the task with `Containers`.
struct TaskMetadata {
    uri: String,
    app_status: Arc<Mutex<String>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TaskMetadata {
    fn start(app_status: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind metadata");
        let port = listener.local_addr().expect("addr").port();
        let app_status = Arc::new(Mutex::new(app_status.to_string()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (status, log) = (app_status.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut line = String::new();
                let mut reader = BufReader::new(conn.try_clone().expect("clone conn"));
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Skip the headers.
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().expect("lock").push(path.clone());
                let envoy = serde_json::json!({
                    "DockerId": "c0ffee-envoy", "Name": "envoy", "DockerName": "ecs-web-1-envoy",
                    "Image": "trellis-envoy:0.1.0", "KnownStatus": "RUNNING", "DesiredStatus": "RUNNING",
                    "Type": "NORMAL", "Labels": {}, "Networks": []
                });
                let body = match path.as_str() {
                    "/v4/c0ffee-envoy" => envoy.to_string(),
                    "/v4/c0ffee-envoy/task" => {
                        let app = status.lock().expect("lock").clone();
                        serde_json::json!({
                            "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/default",
                            "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/default/0123456789abcdef",
                            "Family": "web", "Revision": "3",
                            "DesiredStatus": "STOPPED", "KnownStatus": "RUNNING",
                            "Containers": [
                                envoy,
                                {"DockerId": "c0ffee-app", "Name": "app", "KnownStatus": app,
                                 "DesiredStatus": "STOPPED", "Type": "NORMAL"},
                                {"DockerId": "c0ffee-rm", "Name": "proxy-route-manager",
                                 "KnownStatus": "STOPPED", "DesiredStatus": "STOPPED",
                                 "Type": "NORMAL", "ExitCode": 0}
                            ]
                        })
                        .to_string()
                    }
                    _ => {
                        let _ =
                            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                        continue;
                    }
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TaskMetadata {
            uri: format!("http://127.0.0.1:{port}/v4/c0ffee-envoy"),
            app_status,
            requests,
        }
    }

    fn set_app(&self, status: &str) {
        *self.app_status.lock().expect("lock") = status.to_string();
    }

    fn task_reads(&self) -> usize {
        let reqs = self.requests.lock().expect("lock");
        reqs.iter().filter(|p| p.ends_with("/task")).count()
    }
}

/// The entrypoint running the real Envoy with an admin port of its own and an access log for the
/// admin requests (which is how the test sees the drain call arrive). Its Envoy child ends with it:
/// a [`Proc`] ends the whole tree on drop.
struct Entrypoint {
    proc: Proc,
    admin: u16,
    admin_log: std::path::PathBuf,
}

impl Entrypoint {
    fn start(dir: &Workdir, extra_env: &[(&str, String)]) -> Self {
        let admin = free_port();
        let admin_log = dir.join("admin.log");
        let mut cmd = Command::new(bin("trellis-agent"));
        cmd.args(["envoy", "--bootstrap"])
            .arg(dir.join("bootstrap.json"))
            .arg("--envoy")
            .arg(envoy())
            .args(["--", "--disable-hot-restart"])
            .env("APPMESH_RESOURCE_ARN", "mesh/shop/virtualNode/web")
            // Nothing listens there: Envoy starts and retries, its admin serves meanwhile.
            .env(
                "APPMESH_XDS_ENDPOINT",
                format!("unix://{}", dir.join("absent.sock").display()),
            )
            .env("ENVOY_ADMIN_ACCESS_PORT", admin.to_string())
            .env("ENVOY_ADMIN_ACCESS_LOG_FILE", &admin_log)
            .env_remove("ECS_CONTAINER_METADATA_URI_V4")
            .env_remove("ENVOY_DRAIN_TIMEOUT");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("entrypoint", &mut cmd, dir.join("entrypoint.log"));
        let ep = Entrypoint {
            proc,
            admin,
            admin_log,
        };
        eventually("Envoy admin answers", Duration::from_secs(60), || {
            ep.admin_get("/server_info").map(|_| ())
        });
        ep
    }

    fn admin_get(&self, path: &str) -> Result<String, String> {
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", self.admin)).map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).map_err(|e| e.to_string())?;
        if out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200") {
            Ok(out)
        } else {
            Err(out)
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.proc.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Envoy's pid: the entrypoint's only child.
    fn envoy_pid(&self) -> String {
        let pid = self.proc.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn drain_requested(&self) -> bool {
        std::fs::read_to_string(&self.admin_log)
            .unwrap_or_default()
            .contains("/drain_listeners?inboundonly&graceful")
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        eventually("the entrypoint exits", within, || {
            self.proc
                .exited()
                .ok_or_else(|| "still running".to_string())
        })
    }
}

#[test]
fn sigterm_holds_envoy_while_an_app_container_runs_and_stops_it_once_the_app_stopped() {
    let dir = Workdir::new("entrypoint-hold");
    let meta = TaskMetadata::start("RUNNING");
    let mut ep = Entrypoint::start(
        &dir,
        &[
            ("ECS_CONTAINER_METADATA_URI_V4", meta.uri.clone()),
            ("ENVOY_DRAIN_TIMEOUT", "120".into()),
        ],
    );
    ep.signal("-TERM");
    eventually(
        "drain_listeners reaches Envoy",
        Duration::from_secs(30),
        || {
            ep.drain_requested()
                .then_some(())
                .ok_or_else(|| std::fs::read_to_string(&ep.admin_log).unwrap_or_default())
        },
    );
    // While the app runs, the entrypoint keeps polling the task and Envoy keeps serving.
    let reads = meta.task_reads();
    eventually(
        "the task metadata is read again",
        Duration::from_secs(30),
        || {
            (meta.task_reads() >= reads + 3)
                .then_some(())
                .ok_or("not yet".to_string())
        },
    );
    assert!(
        ep.proc.exited().is_none(),
        "the entrypoint left while the app container was RUNNING:\n{}",
        ep.proc.log_text()
    );
    ep.admin_get("/server_info")
        .expect("Envoy still serves its admin while the app runs");

    meta.set_app("STOPPED");
    let status = ep.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(0),
        "Envoy stopped by SIGTERM exits 0, and so does the entrypoint:\n{}",
        ep.proc.log_text()
    );
    assert!(ep.proc.log_text().contains("app containers stopped"));
}

#[test]
fn the_drain_deadline_ends_the_hold_even_if_the_app_keeps_running() {
    let dir = Workdir::new("entrypoint-deadline");
    let meta = TaskMetadata::start("RUNNING");
    let mut ep = Entrypoint::start(
        &dir,
        &[
            ("ECS_CONTAINER_METADATA_URI_V4", meta.uri.clone()),
            ("ENVOY_DRAIN_TIMEOUT", "3".into()),
        ],
    );
    let sent = Instant::now();
    ep.signal("-TERM");
    let status = ep.wait_exit(Duration::from_secs(60));
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "left after {:?}, before the 3 s deadline",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", ep.proc.log_text());
    assert!(ep.drain_requested(), "Envoy was not asked to drain");
    assert!(
        ep.proc.log_text().contains("\"deadline\""),
        "{}",
        ep.proc.log_text()
    );
}

#[test]
fn sigint_is_forwarded_at_once_without_draining() {
    let dir = Workdir::new("entrypoint-sigint");
    let meta = TaskMetadata::start("RUNNING");
    let mut ep = Entrypoint::start(
        &dir,
        &[
            ("ECS_CONTAINER_METADATA_URI_V4", meta.uri.clone()),
            ("ENVOY_DRAIN_TIMEOUT", "300".into()),
        ],
    );
    ep.signal("-INT");
    // Well under the 300 s drain time: SIGINT means stop now.
    let status = ep.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", ep.proc.log_text());
    assert!(!ep.drain_requested(), "SIGINT must not drain");
}

#[test]
fn envoys_exit_status_becomes_the_entrypoints() {
    let dir = Workdir::new("entrypoint-status");
    let mut ep = Entrypoint::start(&dir, &[]);
    let envoy = ep.envoy_pid();
    assert!(!envoy.is_empty(), "no Envoy child found");
    let ok = Command::new("kill")
        .args(["-KILL", &envoy])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let status = ep.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "Envoy killed by SIGKILL: the entrypoint exits 137\n{}",
        ep.proc.log_text()
    );
}

#[test]
fn a_missing_identity_fails_before_envoy_starts_and_names_the_variable() {
    let out = Command::new(bin("trellis-agent"))
        .args(["envoy", "--envoy", "/nonexistent/envoy", "--bootstrap"])
        .arg(std::env::temp_dir().join("trellis-entrypoint-noid.json"))
        .env_remove("APPMESH_RESOURCE_ARN")
        .env_remove("APPMESH_RESOURCE_NAME")
        .env_remove("APPMESH_VIRTUAL_NODE_NAME")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("APPMESH_RESOURCE_ARN"), "{err}");
}

#[test]
fn envoy_log_level_off_starts_envoy_as_app_mesh_allowed() {
    let dir = Workdir::new("entrypoint-log-off");
    let mut ep = Entrypoint::start(&dir, &[("ENVOY_LOG_LEVEL", "off".into())]);
    ep.admin_get("/server_info")
        .expect("Envoy serves its admin with logging off");
    let args = ep.proc.log_text();
    assert!(args.contains("\"-l\", \"off\""), "{args}");
    assert!(ep.proc.exited().is_none(), "{args}");
}

#[test]
fn listener_drain_wait_time_s_is_app_mesh_name_for_the_drain_deadline() {
    let dir = Workdir::new("entrypoint-listener-drain");
    let meta = TaskMetadata::start("RUNNING");
    let mut ep = Entrypoint::start(
        &dir,
        &[
            ("ECS_CONTAINER_METADATA_URI_V4", meta.uri.clone()),
            ("LISTENER_DRAIN_WAIT_TIME_S", "5".into()),
        ],
    );
    let sent = Instant::now();
    ep.signal("-TERM");
    let status = ep.wait_exit(Duration::from_secs(60));
    assert!(
        sent.elapsed() >= Duration::from_secs(5),
        "left after {:?}, before App Mesh's 5 s wait",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", ep.proc.log_text());
    assert!(ep.drain_requested(), "Envoy was not asked to drain");
}

#[test]
fn appnet_envoy_restart_count_starts_a_dead_envoy_again_then_gives_up() {
    let dir = Workdir::new("entrypoint-restart");
    let mut ep = Entrypoint::start(&dir, &[("APPNET_ENVOY_RESTART_COUNT", "1".into())]);
    let first = ep.envoy_pid();
    assert!(!first.is_empty(), "no Envoy child found");
    let kill = |pid: &str| {
        assert!(
            Command::new("kill")
                .args(["-KILL", pid])
                .status()
                .expect("kill")
                .success()
        );
    };
    kill(&first);
    let second = eventually("a second Envoy", Duration::from_secs(30), || {
        let pid = ep.envoy_pid();
        (!pid.is_empty() && pid != first)
            .then_some(pid)
            .ok_or_else(|| "not yet".to_string())
    });
    eventually("the second Envoy serves", Duration::from_secs(60), || {
        ep.admin_get("/server_info").map(|_| ())
    });
    kill(&second);
    let status = ep.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(128 + 9), "{}", ep.proc.log_text());
    assert!(ep.proc.log_text().contains("starting it again"));
}

#[test]
fn an_unknown_variable_of_the_image_families_is_a_warning_that_names_it() {
    let dir = Workdir::new("entrypoint-unknown-var");
    let ep = Entrypoint::start(&dir, &[("ENABLE_ENVOY_ZIPKIN_TRACING", "1".into())]);
    let log = ep.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ENABLE_ENVOY_ZIPKIN_TRACING"))
        .unwrap_or_else(|| panic!("not named:\n{log}"));
    assert!(line.contains("WARN") && line.contains("unknown"), "{line}");
}

#[test]
fn a_bad_value_fails_before_envoy_starts_naming_the_variable_and_the_rule() {
    let out = Command::new(bin("trellis-agent"))
        .args(["envoy", "--envoy", "/nonexistent/envoy", "--bootstrap"])
        .arg(std::env::temp_dir().join("trellis-entrypoint-badvalue.json"))
        .env("APPMESH_RESOURCE_ARN", "mesh/shop/virtualNode/web")
        .env("XRAY_SAMPLING_RATE", "2")
        .env("ENABLE_ENVOY_XRAY_TRACING", "1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("XRAY_SAMPLING_RATE=\"2\": must be a decimal between 0 and 1.00"),
        "{err}"
    );
}
