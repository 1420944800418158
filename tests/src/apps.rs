//! Test apps with controllable behaviour (slow, failing, unhealthy), meshed tasks whose app is
//! started separately, certificates made with the openssl CLI, and Envoy admin helpers for the
//! policy suites.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::mesh::{Agent, Task, rewrite, run_route_manager, start_envoy_with};
use crate::scenario::app_taskdef;
use crate::{Proc, Workdir, bin, check, eventually, run};

/// How the app answers: `/sleep/SECONDS` sleeps then answers 200; `/health` answers
/// `health_status`; anything else answers `status` with `body`.
#[derive(Debug, Clone)]
pub struct Behaviour<'a> {
    pub body: &'a str,
    pub status: u16,
    pub health_status: u16,
}

impl<'a> Behaviour<'a> {
    pub fn ok(body: &'a str) -> Self {
        Behaviour {
            body,
            status: 200,
            health_status: 200,
        }
    }
}

/// Starts the app on `port` in `task` (as root, like an app container) and waits until it answers.
pub fn start_app(work: &Workdir, task: &Task, port: u16, b: &Behaviour<'_>) -> Proc {
    let script = format!(
        "import http.server, time\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   protocol_version = 'HTTP/1.1'\n\
         \x20   def do_GET(self):\n\
         \x20       status, body = {status}, {body:?}\n\
         \x20       if self.path.startswith('/sleep/'):\n\
         \x20           time.sleep(float(self.path[7:]))\n\
         \x20           status, body = 200, 'slept'\n\
         \x20       elif self.path == '/health':\n\
         \x20           status, body = {health}, 'health'\n\
         \x20       b = body.encode()\n\
         \x20       self.send_response(status)\n\
         \x20       self.send_header('Content-Length', str(len(b)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(b)\n\
         \x20   def log_message(self, *a):\n\
         \x20       pass\n\
         http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n",
        status = b.status,
        body = b.body,
        health = b.health_status,
    );
    let path = work.join(&format!("policy-app-{}.py", task.ns));
    fs::write(&path, script).expect("write app");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("app in {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("policy-app-{}.log", task.ns)),
    );
    eventually("app listening", Duration::from_secs(10), || {
        let (code, _) = http_status(task, None, &format!("http://127.0.0.1:{port}/health"));
        if code > 0 {
            Ok(())
        } else {
            Err("no answer".to_string())
        }
    });
    proc
}

/// Meshes `task` as virtual node `node` with app ports `ports` (route manager, then Envoy
/// HEALTHY) without starting an app: the caller starts its own.
pub fn start_meshed(
    work: &Workdir,
    agent: &Agent,
    mesh: &str,
    task: &Task,
    node: &str,
    ports: &[u16],
) -> Proc {
    start_meshed_with(work, agent, mesh, task, node, ports, &[])
}

/// [`start_meshed`] with `extra` variables in the Envoy container's environment.
pub fn start_meshed_with(
    work: &Workdir,
    agent: &Agent,
    mesh: &str,
    task: &Task,
    node: &str,
    ports: &[u16],
    extra: &[(&str, &str)],
) -> Proc {
    let def = rewrite(
        work,
        &app_taskdef(&task.ns, ports),
        mesh,
        node,
        &agent.socket_dir,
    );
    run_route_manager(task, &def);
    start_envoy_with(work, task, &def, extra)
}

/// An HTTP GET from inside the task that does not fail on error statuses: (status, body);
/// status 0 when no answer came.
pub fn http_status(task: &Task, uid: Option<&str>, url: &str) -> (u16, String) {
    let args = [
        "curl",
        "-sS",
        "-m",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ];
    let mut cmd = match uid {
        Some(u) => task.cmd_as(u, &args),
        None => task.cmd(&args),
    };
    let out = String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The Envoy admin `/clusters` lines of `cluster` inside the task.
pub fn envoy_clusters(task: &Task, admin_port: u16, cluster: &str) -> Vec<String> {
    task.http_get(None, &format!("http://127.0.0.1:{admin_port}/clusters"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("{cluster}::")))
        .map(str::to_string)
        .collect()
}

/// `health_flags` of each host of `cluster`, by address (`IP:PORT`).
pub fn health_flags(task: &Task, admin_port: u16, cluster: &str) -> Vec<(String, String)> {
    envoy_clusters(task, admin_port, cluster)
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("{cluster}::"))?;
            let (host, tail) = rest.split_once("::")?;
            let flags = tail.strip_prefix("health_flags::")?;
            Some((host.to_string(), flags.to_string()))
        })
        .collect()
}

/// A CA and certificates it signs, made with the openssl CLI; files readable by Envoy's uid.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A new CA named `name` in `work/pki-NAME`.
    pub fn new(work: &Workdir, name: &str) -> Self {
        let dir = work.join(&format!("pki-{name}"));
        fs::create_dir_all(&dir).expect("pki dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod pki");
        let pki = Pki { dir };
        check(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                ])
                .arg("-subj")
                .arg(format!("/CN={name} test CA"))
                .arg("-keyout")
                .arg(pki.path("ca.key"))
                .arg("-out")
                .arg(pki.path("ca.pem")),
        );
        pki.readable();
        pki
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    /// Issues `NAME.pem` / `NAME.key` for DNS names `sans`; returns (chain, key) paths.
    pub fn issue(&self, name: &str, sans: &[&str]) -> (String, String) {
        let (key, csr, pem, ext) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.ext")),
        );
        let alt: Vec<String> = sans.iter().map(|s| format!("DNS:{s}")).collect();
        fs::write(
            &ext,
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                alt.join(",")
            ),
        )
        .expect("write ext");
        check(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                ])
                .arg("-subj")
                .arg(format!("/CN={name}"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        check(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(self.path("ca.pem"))
                .arg("-CAkey")
                .arg(self.path("ca.key"))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&pem),
        );
        self.readable();
        (pem.display().to_string(), key.display().to_string())
    }

    /// Envoy runs as uid 1337: test keys are made world-readable (they protect nothing).
    fn readable(&self) {
        for e in fs::read_dir(&self.dir).expect("read pki").flatten() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o644));
        }
    }
}

/// A directory Envoy (uid 1337) may create files in, for access logs.
pub fn writable_dir(work: &Workdir, name: &str) -> PathBuf {
    let dir = work.join(name);
    fs::create_dir_all(&dir).expect("create dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod dir");
    dir
}

/// Runs a real Envoy (outside any namespace) as `node` against the agent until listeners and
/// clusters are applied; fails on any rejection; returns its config dump.
pub fn envoy_accepts(work: &Workdir, agent: &Agent, node: &str) -> Value {
    envoy_accepts_with(work, agent, node, &[])
}

/// [`envoy_accepts`] with `extra` bootstrap variables (e.g. `APPMESH_SDS_SOCKET_PATH`).
pub fn envoy_accepts_with(
    work: &Workdir,
    agent: &Agent,
    node: &str,
    extra: &[(&str, &str)],
) -> Value {
    let tag = node.replace('/', "_");
    let boot = work.join(&format!("boot-{tag}.json"));
    check(
        Command::new(bin("trellis-agent"))
            .args(["bootstrap", "--output"])
            .arg(&boot)
            .env_clear()
            .env("APPMESH_RESOURCE_ARN", node)
            .env(
                "APPMESH_XDS_ENDPOINT",
                format!("unix://{}", agent.socket_dir.join("xds.sock").display()),
            )
            .env("ENVOY_ADMIN_ACCESS_LOG_FILE", "/dev/null")
            .envs(extra.iter().copied()),
    );
    // This Envoy runs on the host, beside other tests' Envoys: its admin binds a port the kernel
    // picks (port 0, which the App Mesh variable does not allow) and Envoy writes down which.
    let mut config: Value =
        serde_json::from_str(&fs::read_to_string(&boot).expect("read bootstrap"))
            .expect("bootstrap JSON");
    config["admin"]["address"]["socket_address"]["port_value"] = 0.into();
    fs::write(&boot, config.to_string()).expect("write bootstrap");
    let admin_path = work.join(&format!("admin-{tag}.address"));
    let envoy = work.stage(&crate::envoy());
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(&boot)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ]);
    let mut proc = Proc::spawn("envoy", &mut cmd, work.join(&format!("envoy-{tag}.log")));
    let admin = eventually("envoy admin bound", Duration::from_secs(30), || {
        if !proc.is_running() {
            panic!("envoy exited:\n{}", proc.log_text());
        }
        fs::read_to_string(&admin_path)
            .ok()
            .and_then(|a| {
                a.trim()
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
            })
            .ok_or_else(|| "no admin address yet".to_string())
    });
    let stat = |name: &str| -> u64 {
        let out = run(Command::new("curl").args([
            "-s",
            &format!("http://127.0.0.1:{admin}/stats?filter=^{name}$"),
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.split_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    eventually(
        &format!("{node}: listeners and clusters applied"),
        Duration::from_secs(30),
        || {
            let (cds, lds) = (
                stat("cluster_manager.cds.update_success"),
                stat("listener_manager.lds.update_success"),
            );
            let rejected = stat("cluster_manager.cds.update_rejected")
                + stat("listener_manager.lds.update_rejected");
            assert_eq!(rejected, 0, "{node}: Envoy rejected an update");
            if cds >= 1 && lds >= 1 {
                Ok(())
            } else {
                Err(format!("cds {cds} lds {lds}"))
            }
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    for rejected in [
        "cluster_manager.cds.update_rejected",
        "listener_manager.lds.update_rejected",
    ] {
        assert_eq!(stat(rejected), 0, "{node}: {rejected}");
    }
    let log = agent.proc.log_text();
    assert!(
        !log.contains("envoy rejected configuration"),
        "{node}: a NACK:\n{log}"
    );
    let dump =
        run(Command::new("curl").args(["-s", &format!("http://127.0.0.1:{admin}/config_dump")]));
    serde_json::from_slice(&dump.stdout).expect("config_dump is JSON")
}

/// Whether `path` exists and has at least one line containing `needle`.
pub fn file_has(path: &Path, needle: &str) -> Result<String, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.lines().any(|l| l.contains(needle)) {
        Ok(text)
    } else {
        Err(format!("no line with {needle:?} in:\n{text}"))
    }
}

/// A TCP server on `port` in `task` that greets every connection with `name` and a newline, then
/// closes it: which server a connection reached, told by its first line.
pub fn start_banner(work: &Workdir, task: &Task, port: u16, name: &str) -> Proc {
    let script = format!(
        "import socketserver\n\
         class H(socketserver.BaseRequestHandler):\n\
         \x20   def handle(self):\n\
         \x20       self.request.sendall(b'{name}\\n')\n\
         socketserver.ThreadingTCPServer.allow_reuse_address = True\n\
         socketserver.ThreadingTCPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let path = work.join(&format!("banner-{}.py", task.ns));
    fs::write(&path, script).expect("write banner");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("banner {name} in {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("banner-{}.log", task.ns)),
    );
    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && head -n1 <&3");
    eventually("banner listening", Duration::from_secs(10), || {
        let out = run(&mut task.cmd(&["timeout", "3", "bash", "-c", &probe]));
        match String::from_utf8_lossy(&out.stdout).trim() {
            got if got == name => Ok(()),
            got => Err(format!("greeted with {got:?}")),
        }
    });
    proc
}

/// A plain static Envoy (no mesh) in `task` as an h2c app: on `port`, with codec AUTO (HTTP/1.1 or
/// HTTP/2 with prior knowledge, as a gRPC server takes), it answers every request 200 with the
/// headers `app-node: NAME` and `grpc-status: 0` and the body `NAME` (which Envoy moves into
/// `grpc-message` when the request is gRPC); its admin is on 127.0.0.1:`admin_port` (stats prefix
/// `http.app.`). Waits until it answers HTTP/2 on `port`.
pub fn start_h2c_app(work: &Workdir, task: &Task, port: u16, admin_port: u16, name: &str) -> Proc {
    let config = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "app",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "app",
                    "codec_type": "AUTO",
                    "route_config": {"virtual_hosts": [{
                        "name": "app",
                        "domains": ["*"],
                        "routes": [{
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": name}},
                            "response_headers_to_add": [
                                {"header": {"key": "app-node", "value": name}},
                                {"header": {"key": "grpc-status", "value": "0"}}
                            ]
                        }]
                    }]},
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                    }]
                }
            }]}]
        }]}
    });
    let path = work.join(&format!("h2c-app-{}.json", task.ns));
    fs::write(&path, config.to_string()).expect("write h2c app config");
    let envoy = work.stage(&crate::envoy());
    let (envoy_s, path_s) = (envoy.display().to_string(), path.display().to_string());
    let mut proc = Proc::spawn(
        &format!("h2c app in {}", task.ns),
        &mut task.cmd(&[
            &envoy_s,
            "-c",
            &path_s,
            "-l",
            "warning",
            "--disable-hot-restart",
            "--concurrency",
            "1",
        ]),
        work.join(&format!("h2c-app-{}.log", task.ns)),
    );
    let url = format!("http://127.0.0.1:{port}/");
    eventually("h2c app answering", Duration::from_secs(30), || {
        if !proc.is_running() {
            panic!("h2c app exited:\n{}", proc.log_text());
        }
        let out = run(&mut task.cmd(&["curl", "-sS", "-m", "3", "--http2-prior-knowledge", &url]));
        match String::from_utf8_lossy(&out.stdout).as_ref() {
            got if got == name => Ok(()),
            got => Err(format!("{got:?} {}", String::from_utf8_lossy(&out.stderr))),
        }
    });
    proc
}

/// A colour-teller-like app for the App Mesh walkthroughs and the routing suites, on `port` in
/// `task` (as root, like an app container), answering `NAME METHOD PATH HOST` — what reached it
/// after every rewrite — unless a path below says otherwise:
/// - a `Latency: SECONDS` request header delays the answer (the walkthroughs' colour tellers);
/// - `/status/CODE…` answers CODE;
/// - a path with `/hold` waits until `/release` is called (or two minutes pass; `/arm` makes it
///   hold again), so a test can hold many requests in flight at once and count them with `/peak`
///   (the most held at once) and `/active`;
/// - `/count/PATH` answers how many requests for `/PATH` arrived (retries included).
///
/// Threads per request, a deep accept queue: thousands of requests may be in flight.
pub fn start_echo(work: &Workdir, task: &Task, port: u16, name: &str) -> Proc {
    let script = format!(
        r#"import http.server, socketserver, threading, time
NAME = {name:?}
lock = threading.Lock()
counts, held = {{}}, {{'active': 0, 'peak': 0}}
release = threading.Event()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def answer(self):
        # The path as sent: http.server collapses a leading '//' in self.path.
        path = self.raw_requestline.split()[1].decode()
        status, body = 200, '%s %s %s %s' % (NAME, self.command, path, self.headers.get('Host'))
        if path.startswith('/count/'):
            with lock:
                body = str(counts.get(path[len('/count'):], 0))
        elif path == '/peak':
            body = str(held['peak'])
        elif path == '/active':
            body = str(held['active'])
        elif path == '/release':
            release.set()
            body = 'released'
        elif path == '/arm':
            release.clear()
            body = 'armed'
        else:
            with lock:
                counts[path] = counts.get(path, 0) + 1
            length = int(self.headers.get('Content-Length') or 0)
            if length:
                self.rfile.read(length)
            delay = float(self.headers.get('Latency') or 0)
            if delay:
                time.sleep(delay)
            if path.startswith('/status/'):
                status = int(path.split('/')[2])
            elif '/hold' in path:
                with lock:
                    held['active'] += 1
                    held['peak'] = max(held['peak'], held['active'])
                release.wait(120)
                with lock:
                    held['active'] -= 1
        b = body.encode()
        self.send_response(status)
        self.send_header('Content-Length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 4096
    daemon_threads = True
S(('0.0.0.0', {port}), H).serve_forever()
"#
    );
    let path = work.join(&format!("echo-{}.py", task.ns));
    fs::write(&path, script).expect("write echo app");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("echo {name} in {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("echo-{}.log", task.ns)),
    );
    eventually("echo app listening", Duration::from_secs(10), || {
        task.http_get(None, &format!("http://127.0.0.1:{port}/peak"))
            .map(|_| ())
    });
    proc
}

/// A number the [`start_echo`] app in `task` on `port` answers at `path` (asked directly, not
/// through Envoy).
pub fn echo_number(task: &Task, port: u16, path: &str) -> u64 {
    task.http_get(None, &format!("http://127.0.0.1:{port}{path}"))
        .ok()
        .and_then(|b| b.trim().parse().ok())
        .unwrap_or(0)
}

/// `n` HTTP/1.1 requests at once from `task` (as root: through its Envoy like the app's own),
/// each on its own connection to `host`:`port` with `path` and `Host: host_header`, started in the
/// background; [`Load::statuses`] waits for them. What a load tool (wrk) did in the walkthroughs,
/// with every request in flight at the same time.
pub fn start_load(
    work: &Workdir,
    task: &Task,
    (host, port): (&str, u16),
    host_header: &str,
    path: &str,
    n: usize,
) -> Load {
    static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n_load = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("{}-{n_load}", task.ns);
    let out = work.join(&format!("load-{id}.json"));
    let script = format!(
        r#"import asyncio, json, socket, sys
async def one():
    try:
        r, w = await asyncio.open_connection({host:?}, {port})
        w.write(b'GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n')
        await w.drain()
        head = await r.readuntil(b'\r\n')
        w.close()
        return int(head.split(b' ')[1])
    except Exception:
        return 0
async def main():
    codes = await asyncio.gather(*[one() for _ in range({n})])
    counts = {{}}
    for c in codes:
        counts[str(c)] = counts.get(str(c), 0) + 1
    with open({out:?}, 'w') as f:
        json.dump(counts, f)
asyncio.run(main())
"#,
        out = out.display().to_string()
    );
    let path_py = work.join(&format!("load-{id}.py"));
    fs::write(&path_py, script).expect("write load client");
    let path_s = path_py.display().to_string();
    let proc = Proc::spawn(
        &format!("load from {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("load-{id}.log")),
    );
    Load { proc, out }
}

/// Requests started by [`start_load`].
#[derive(Debug)]
pub struct Load {
    proc: Proc,
    out: PathBuf,
}

impl Load {
    /// Waits (up to `timeout`) for every request to be answered: how many got each status (0:
    /// no HTTP answer).
    pub fn statuses(mut self, timeout: Duration) -> std::collections::BTreeMap<u16, usize> {
        let text = eventually("every request answered", timeout, || {
            if let Some(status) = self.proc.exited() {
                return fs::read_to_string(&self.out)
                    .map_err(|e| format!("load exited {status}: {e}\n{}", self.proc.log_text()));
            }
            Err("requests still in flight".into())
        });
        let counts: std::collections::BTreeMap<String, usize> =
            serde_json::from_str(&text).expect("load result is JSON");
        counts
            .into_iter()
            .map(|(k, v)| (k.parse().unwrap_or(0), v))
            .collect()
    }
}

/// A plain static Envoy in `task` as an h2c app in front of an HTTP/1.1 app on `upstream`: on
/// `port`, codec AUTO (HTTP/2 with prior knowledge as a meshed http2 listener sends it), every
/// request passed on with no timeout and no circuit breaker of its own; admin on
/// 127.0.0.1:`admin_port`. So an http2 virtual node's app can hold requests ([`start_echo`]).
pub fn start_h2c_front(
    work: &Workdir,
    task: &Task,
    port: u16,
    admin_port: u16,
    upstream: u16,
) -> Proc {
    const BIG: u32 = i32::MAX as u32;
    let config = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "app",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "app",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "app",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "app", "timeout": "0s"}}]
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": [{
                "name": "app",
                "type": "STATIC",
                "connect_timeout": "1s",
                "circuit_breakers": {"thresholds": [{"max_connections": BIG,
                    "max_pending_requests": BIG, "max_requests": BIG, "max_retries": BIG}]},
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}
                }]}]}
            }]
        }
    });
    let path = work.join(&format!("h2c-front-{}.json", task.ns));
    fs::write(&path, config.to_string()).expect("write h2c front config");
    let envoy = work.stage(&crate::envoy());
    let (envoy_s, path_s) = (envoy.display().to_string(), path.display().to_string());
    let mut proc = Proc::spawn(
        &format!("h2c front in {}", task.ns),
        &mut task.cmd(&[
            &envoy_s,
            "-c",
            &path_s,
            "-l",
            "warning",
            "--disable-hot-restart",
            "--concurrency",
            "1",
        ]),
        work.join(&format!("h2c-front-{}.log", task.ns)),
    );
    let url = format!("http://127.0.0.1:{port}/peak");
    eventually("h2c front answering", Duration::from_secs(30), || {
        if !proc.is_running() {
            panic!("h2c front exited:\n{}", proc.log_text());
        }
        let out = run(&mut task.cmd(&["curl", "-sS", "-m", "3", "--http2-prior-knowledge", &url]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    proc
}

/// A TCP server on `port` in `task` that greets every connection with `name` and a newline and
/// then keeps it open, silent, until the peer closes it: a server that never ends an idle
/// connection itself.
pub fn start_silent_tcp(work: &Workdir, task: &Task, port: u16, name: &str) -> Proc {
    let script = format!(
        "import socketserver\n\
         class H(socketserver.BaseRequestHandler):\n\
         \x20   def handle(self):\n\
         \x20       self.request.sendall(b'{name}\\n')\n\
         \x20       while self.request.recv(4096):\n\
         \x20           pass\n\
         class S(socketserver.ThreadingTCPServer):\n\
         \x20   allow_reuse_address = True\n\
         \x20   daemon_threads = True\n\
         S(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let path = work.join(&format!("silent-{}.py", task.ns));
    fs::write(&path, script).expect("write silent server");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("silent tcp {name} in {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("silent-{}.log", task.ns)),
    );
    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && head -n1 <&3");
    eventually("silent server listening", Duration::from_secs(10), || {
        let out = run(&mut task.cmd(&["timeout", "3", "bash", "-c", &probe]));
        match String::from_utf8_lossy(&out.stdout).trim() {
            got if got == name => Ok(()),
            got => Err(format!("greeted with {got:?}")),
        }
    });
    proc
}

/// The walkthroughs' "colour gateway" app (howto-timeout-policy): every GET on `port` in `task` is
/// passed on to `upstream` (`http://NAME:PORT`, through the task's Envoy like any app's call) with
/// the same path and `Latency` header; the upstream's status and body come back.
pub fn start_forwarder(work: &Workdir, task: &Task, port: u16, upstream: &str) -> Proc {
    let script = format!(
        r#"import http.server, urllib.request, urllib.error
UP = {upstream:?}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        req = urllib.request.Request(UP + self.path)
        if self.headers.get('Latency'):
            req.add_header('Latency', self.headers.get('Latency'))
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        except Exception as e:
            status, body = 502, str(e).encode()
        self.send_response(status)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
S(('0.0.0.0', {port}), H).serve_forever()
"#
    );
    let path = work.join(&format!("forwarder-{}.py", task.ns));
    fs::write(&path, script).expect("write forwarder");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("forwarder in {}", task.ns),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("forwarder-{}.log", task.ns)),
    );
    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
    eventually("forwarder listening", Duration::from_secs(10), || {
        let out = run(&mut task.cmd(&["bash", "-c", &probe]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    proc
}

/// A plain static Envoy in `task` as a gRPC app that fails on demand: on `port` (h2c, codec
/// AUTO) a request for `/fail.CODE/…` is answered HTTP 200 with `grpc-status: CODE` (a
/// trailers-only gRPC error, CODE 0 to 16), anything else with `grpc-status: 0`; admin on
/// 127.0.0.1:`admin_port`, where `http.app.downstream_rq_total` counts the attempts that reached
/// it.
pub fn start_grpc_status_app(work: &Workdir, task: &Task, port: u16, admin_port: u16) -> Proc {
    let answer = |prefix: String, code: u32| {
        serde_json::json!({
            "match": {"prefix": prefix},
            "direct_response": {"status": 200},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": "application/grpc"}},
                {"header": {"key": "grpc-status", "value": code.to_string()}}
            ]
        })
    };
    let mut routes: Vec<Value> = (0..=16).map(|c| answer(format!("/fail.{c}/"), c)).collect();
    routes.push(answer("/".into(), 0));
    let config = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "app",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "app",
                    "codec_type": "AUTO",
                    "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": routes}]},
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                    }]
                }
            }]}]
        }]}
    });
    let path = work.join(&format!("grpc-status-app-{}.json", task.ns));
    fs::write(&path, config.to_string()).expect("write grpc status app config");
    let envoy = work.stage(&crate::envoy());
    let (envoy_s, path_s) = (envoy.display().to_string(), path.display().to_string());
    let mut proc = Proc::spawn(
        &format!("grpc status app in {}", task.ns),
        &mut task.cmd(&[
            &envoy_s,
            "-c",
            &path_s,
            "-l",
            "warning",
            "--disable-hot-restart",
            "--concurrency",
            "1",
        ]),
        work.join(&format!("grpc-status-app-{}.log", task.ns)),
    );
    let url = format!("http://127.0.0.1:{port}/");
    eventually("grpc status app answering", Duration::from_secs(30), || {
        if !proc.is_running() {
            panic!("grpc status app exited:\n{}", proc.log_text());
        }
        let out = run(&mut task.cmd(&["curl", "-sS", "-m", "3", "--http2-prior-knowledge", &url]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    proc
}
