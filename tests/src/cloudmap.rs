//! Cloud Map for the discovery suites: moto server as the real peer, driven with the real AWS
//! CLI, and a fault proxy in front of it that can answer `ThrottlingException` the way Cloud Map
//! does (HTTP 400, awsJson 1.1 body with `__type`), or forward to whatever moto is doing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::{Proc, Workdir, check, venv, wait_for_http};

/// Credentials and region moto accepts, for the CLI and for the agent's SDK.
pub const AWS_ENV: [(&str, &str); 7] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-west-2"),
    ("AWS_DEFAULT_REGION", "us-west-2"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

/// A moto server on a fixed port (so it can be restarted at the same address).
#[derive(Debug)]
pub struct Moto {
    proc: Option<Proc>,
    pub port: u16,
    pub url: String,
    log: std::path::PathBuf,
}

impl Moto {
    pub fn start(work: &Workdir, port: u16) -> Self {
        let mut m = Moto {
            proc: None,
            port,
            url: format!("http://127.0.0.1:{port}"),
            log: work.join(&format!("moto-{port}.log")),
        };
        m.restart();
        m
    }

    /// Starts it again after `stop` (moto keeps no state: everything is registered anew).
    pub fn restart(&mut self) {
        let mut cmd = Command::new(venv().join("bin/moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()]);
        let mut proc = Proc::spawn("moto_server", &mut cmd, self.log.clone());
        let url = format!("{}/moto-api/", self.url);
        wait_for_http(
            &mut proc,
            "moto up",
            &url,
            Duration::from_secs(30),
            |code| code == "200",
        );
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        self.proc.take();
    }

    /// `aws servicediscovery ARGS` against moto; the JSON output (or Null when there is none).
    pub fn sd(&self, args: &[&str]) -> Value {
        let mut c = Command::new(crate::aws());
        c.arg("servicediscovery")
            .args(args)
            .args(["--endpoint-url", &self.url, "--output", "json"])
            // The CLI would send DiscoverInstances to data-127.0.0.1 otherwise.
            .env("AWS_DISABLE_HOST_PREFIX_INJECTION", "true")
            .env("AWS_MAX_ATTEMPTS", "1");
        for (k, v) in AWS_ENV {
            c.env(k, v);
        }
        let out = check(&mut c);
        if out.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("CLI output {out:?}: {e}"))
        }
    }

    /// Creates HTTP namespace `ns` and service `service` in it (with a custom health check, so
    /// health status is the registrant's to set); returns the service id.
    pub fn create_service(&self, ns: &str, service: &str) -> String {
        let namespaces = self.sd(&["list-namespaces"]);
        let existing = namespaces["Namespaces"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["Name"] == ns))
            .and_then(|n| n["Id"].as_str())
            .map(str::to_string);
        let ns_id = existing.unwrap_or_else(|| {
            self.sd(&["create-http-namespace", "--name", ns]);
            let namespaces = self.sd(&["list-namespaces"]);
            namespaces["Namespaces"]
                .as_array()
                .and_then(|l| l.iter().find(|n| n["Name"] == ns))
                .and_then(|n| n["Id"].as_str())
                .expect("namespace created")
                .to_string()
        });
        let created = self.sd(&[
            "create-service",
            "--name",
            service,
            "--namespace-id",
            &ns_id,
            "--health-check-custom-config",
            "FailureThreshold=1",
        ]);
        created["Service"]["Id"]
            .as_str()
            .expect("service id")
            .to_string()
    }

    /// Registers an instance (deregister first to change one: moto duplicates re-registered ids).
    pub fn register(&self, service_id: &str, id: &str, attributes: &[(&str, &str)]) {
        let attrs: BTreeMap<&str, &str> = attributes.iter().copied().collect();
        let attrs = serde_json::to_string(&attrs).expect("encode");
        self.sd(&[
            "register-instance",
            "--service-id",
            service_id,
            "--instance-id",
            id,
            "--attributes",
            &attrs,
        ]);
    }

    pub fn deregister(&self, service_id: &str, id: &str) {
        self.sd(&[
            "deregister-instance",
            "--service-id",
            service_id,
            "--instance-id",
            id,
        ]);
    }

    pub fn set_health(&self, service_id: &str, id: &str, status: &str) {
        self.sd(&[
            "update-instance-custom-health-status",
            "--service-id",
            service_id,
            "--instance-id",
            id,
            "--status",
            status,
        ]);
    }
}

/// An HTTP/1.1 proxy in front of moto that throttles on demand. Each request is forwarded on a
/// fresh upstream connection; when moto is down the client connection is closed unanswered, as a
/// dead endpoint would leave it.
///
/// With [`FaultProxy::documented_revision`] it also answers `DiscoverInstancesRevision` as Cloud
/// Map documents it ("If a new instance is registered or deregistered, the InstancesRevision
/// updates"), where moto answers the sum of its current instances' revisions: one instance
/// registered and another deregistered between two polls leave moto's sum unchanged.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    pub url: String,
    throttle: Arc<AtomicBool>,
    throttled: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    documented_revision: Arc<AtomicBool>,
    /// Registrations and deregistrations moto accepted through this proxy.
    changes: Arc<AtomicU64>,
    /// Requests by operation (`X-Amz-Target`'s last part: `DiscoverInstances`, …).
    by_op: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

/// Cloud Map's throttling answer (awsJson 1.1).
const THROTTLED_BODY: &str = r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#;

impl FaultProxy {
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let port = listener.local_addr().expect("addr").port();
        let p = FaultProxy {
            url: format!("http://127.0.0.1:{port}"),
            throttle: Arc::default(),
            throttled: Arc::default(),
            requests: Arc::default(),
            documented_revision: Arc::default(),
            changes: Arc::default(),
            by_op: Arc::default(),
        };
        let shared = p.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let p = shared.clone();
                std::thread::spawn(move || p.serve(conn, upstream_port));
            }
        });
        p
    }

    /// Answers `DiscoverInstancesRevision` with a revision that moves on every registration and
    /// deregistration sent through this proxy (so send them through [`FaultProxy::url`]).
    pub fn documented_revision(&self) {
        self.documented_revision.store(true, Ordering::SeqCst);
    }

    pub fn set_throttling(&self, on: bool) {
        self.throttle.store(on, Ordering::SeqCst);
    }

    /// Requests answered with ThrottlingException so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests of operation `op` (`DiscoverInstances`, `DiscoverInstancesRevision`) so far.
    pub fn calls(&self, op: &str) -> u64 {
        let by_op = self.by_op.lock().unwrap_or_else(|p| p.into_inner());
        by_op.get(op).copied().unwrap_or(0)
    }

    fn serve(&self, conn: TcpStream, upstream_port: u16) {
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut client = conn;
        while let Some(request) = read_message(&mut reader) {
            self.requests.fetch_add(1, Ordering::SeqCst);
            {
                let mut by_op = self.by_op.lock().unwrap_or_else(|p| p.into_inner());
                *by_op.entry(target(&request)).or_default() += 1;
            }
            if self.throttle.load(Ordering::SeqCst) {
                self.throttled.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
                     x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n\
                     Content-Length: {}\r\n\r\n{THROTTLED_BODY}",
                    THROTTLED_BODY.len()
                );
                if client.write_all(resp.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            let answer = TcpStream::connect(("127.0.0.1", upstream_port))
                .ok()
                .and_then(|mut up| {
                    up.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                    up.write_all(&request).ok()?;
                    read_message(&mut BufReader::new(up))
                });
            let op = target(&request);
            let answer = answer.map(|resp| {
                let ok = resp.starts_with(b"HTTP/1.1 200");
                if ok && matches!(op.as_str(), "RegisterInstance" | "DeregisterInstance") {
                    self.changes.fetch_add(1, Ordering::SeqCst);
                }
                if ok
                    && op == "DiscoverInstancesRevision"
                    && self.documented_revision.load(Ordering::SeqCst)
                {
                    let body = format!(
                        r#"{{"InstancesRevision": {}}}"#,
                        self.changes.load(Ordering::SeqCst)
                    );
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                         Content-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                } else {
                    resp
                }
            });
            match answer {
                Some(resp) if client.write_all(&resp).is_ok() => {}
                _ => {
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

/// The operation of an awsJson request (`X-Amz-Target: Service.Operation`), or "".
fn target(request: &[u8]) -> String {
    String::from_utf8_lossy(request)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("x-amz-target")
                .then(|| v.trim().rsplit('.').next().unwrap_or("").to_string())
        })
        .unwrap_or_default()
}

/// One HTTP/1.1 message (head and a Content-Length body), as raw bytes; None at end of stream.
fn read_message(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        raw.extend_from_slice(line.as_bytes());
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    raw.extend_from_slice(&body);
    Some(raw)
}
