//! A local stand-in for an ECS VPC: a bridge in its own namespace, one namespace per awsvpc task,
//! a resolver (dnsmasq) for service names, and the agent. Tasks run exactly the containers that
//! `trellis-rewrite` put in their task definition: the route manager, then Envoy (as its `user`,
//! with its `environment`), health-checked with the definition's own command.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::auth::{ApiAuth, AuthFile, REGION, encode_query};
use crate::dynamo::{Moto, aws_env};
use crate::{Proc, Workdir, bin, check, eventually, run, wait_for_http};

/// A bridge in its own namespace, with dnsmasq on the bridge address.
#[derive(Debug)]
pub struct Vpc {
    pub ns: String,
    pub prefix: String,
    hosts_file: PathBuf,
    dns: Option<Proc>,
    tasks: Vec<String>,
}

impl Vpc {
    /// `id` tells apart the VPCs of one test process. Namespace names carry the whole pid, which
    /// is how `scripts/test.sh`'s leak check knows them for its run's.
    pub fn new(work: &Workdir, id: u8) -> Self {
        let ns = format!("trv{}-{id}", std::process::id());
        let prefix = format!("10.213.{id}");
        check(Command::new("ip").args(["netns", "add", &ns]));
        let vpc = Vpc {
            ns: ns.clone(),
            prefix: prefix.clone(),
            hosts_file: work.join("vpc-hosts"),
            dns: None,
            tasks: vec![],
        };
        vpc.exec(&["ip", "link", "set", "lo", "up"]);
        vpc.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        vpc.exec(&["ip", "addr", "add", &format!("{prefix}.1/24"), "dev", "br0"]);
        vpc.exec(&["ip", "link", "set", "br0", "up"]);
        vpc
    }

    fn exec(&self, args: &[&str]) -> String {
        check(
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .args(args),
        )
    }

    pub fn resolver(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Starts the resolver stand-in with `hosts` lines (`IP NAME...`), as Cloud Map private DNS would answer.
    pub fn start_dns(&mut self, work: &Workdir, hosts: &[(&str, &str)]) {
        let text: String = hosts
            .iter()
            .map(|(ip, names)| format!("{ip} {names}\n"))
            .collect();
        fs::write(&self.hosts_file, text).expect("write hosts");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .arg(format!("--addn-hosts={}", self.hosts_file.display()))
        .args(["--bind-interfaces", "--user=root", "--log-facility=-"])
        .arg(format!("--listen-address={}", self.resolver()))
        .arg(format!("--pid-file={}", work.join("dnsmasq.pid").display()));
        self.dns = Some(Proc::spawn("dnsmasq", &mut cmd, work.join("dnsmasq.log")));
    }

    /// Gives the bridge and `task` IPv6 addresses in `fd00:213:ID::/64` (dual stack, as an awsvpc ENI
    /// with an IPv6 address); returns the task's. Without duplicate-address detection, so the
    /// address is usable at once.
    pub fn add_ipv6(&self, task: &Task) -> String {
        let host = task.ip.rsplit('.').next().unwrap_or("0");
        let prefix = self.prefix.replace("10.213.", "fd00:213:");
        let bridge = format!("{prefix}::1/64");
        if !self
            .exec(&["ip", "-6", "addr", "show", "dev", "br0"])
            .contains(&bridge)
        {
            self.exec(&["ip", "-6", "addr", "add", &bridge, "dev", "br0", "nodad"]);
        }
        let ip = format!("{prefix}::{host}");
        task.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        task.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{prefix}::1"),
        ]);
        ip
    }

    /// A task namespace with address `PREFIX.host` on the bridge, resolving through the VPC resolver.
    pub fn task(&mut self, name: &str, host: u8) -> Task {
        let ns = format!("{}-{name}", self.ns);
        let ip = format!("{}.{host}", self.prefix);
        check(Command::new("ip").args(["netns", "add", &ns]));
        self.tasks.push(ns.clone());
        let etc = PathBuf::from(format!("/etc/netns/{ns}"));
        fs::create_dir_all(&etc).expect("create /etc/netns dir");
        fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {}\n", self.resolver()),
        )
        .expect("resolv.conf");
        // veth: eth0 in the task, its peer on the VPC bridge. Made inside the namespaces, so it
        // never exists in the host's, where a failed test could leave it.
        let outside = format!("veth{host}");
        check(Command::new("ip").args([
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &outside, "netns",
            &self.ns,
        ]));
        self.exec(&["ip", "link", "set", &outside, "master", "br0"]);
        self.exec(&["ip", "link", "set", &outside, "up"]);
        let task = Task { ns, ip: ip.clone() };
        task.exec(&["ip", "link", "set", "lo", "up"]);
        task.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        task.exec(&["ip", "link", "set", "eth0", "up"]);
        task.exec(&["ip", "route", "add", "default", "via", &self.resolver()]);
        task
    }
}

impl Drop for Vpc {
    fn drop(&mut self) {
        self.dns.take();
        for ns in self.tasks.iter().chain(std::iter::once(&self.ns)) {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
            let _ = fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

/// One awsvpc task's network namespace.
#[derive(Debug)]
pub struct Task {
    pub ns: String,
    pub ip: String,
}

impl Task {
    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(args);
        c
    }

    pub fn exec(&self, args: &[&str]) -> String {
        check(&mut self.cmd(args))
    }

    /// Runs `args` in the task as `uid` (what an ECS container `user` does).
    pub fn cmd_as(&self, uid: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--"])
            .args(args);
        c
    }

    /// An HTTP GET from inside the task: `Ok(body)` or `Err(curl's complaint)`.
    pub fn http_get(&self, uid: Option<&str>, url: &str) -> Result<String, String> {
        let args = ["curl", "-sS", "--fail", "-m", "3", url];
        let mut cmd = match uid {
            Some(u) => self.cmd_as(u, &args),
            None => self.cmd(&args),
        };
        let out = run(&mut cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A counter from the Envoy admin `/stats` inside the task (0 when absent).
    pub fn envoy_stat(&self, admin_port: u16, name: &str) -> u64 {
        let url = format!(
            "http://127.0.0.1:{admin_port}/stats?filter=^{}$",
            name.replace('.', "\\.")
        );
        self.http_get(None, &url)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    l.strip_prefix(&format!("{name}: "))
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// A small HTTP app answering `body` on `port`.
    pub fn start_http_app(&self, work: &Workdir, port: u16, body: &str) -> Proc {
        self.spawn_app(
            work,
            port,
            &format!("{body:?}"),
            "http.server.ThreadingHTTPServer",
        )
    }

    /// Like [`Task::start_http_app`], but listening on `::` for IPv4 and IPv6 alike, and answering
    /// `body` followed by ` from ADDRESS`, the peer it saw (so a test sees which local address
    /// Envoy used).
    pub fn start_http_app_dual_stack(&self, work: &Workdir, port: u16, body: &str) -> Proc {
        let server = "type('Dual', (http.server.ThreadingHTTPServer,), \
                      {'address_family': socket.AF_INET6, 'server_bind': lambda s: \
                      (s.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0), \
                      http.server.ThreadingHTTPServer.server_bind(s))})";
        let body = format!("{body:?} + ' from ' + self.client_address[0]");
        self.spawn_app(work, port, &body, server)
    }

    /// Runs the Python app: `body_expr` is evaluated per request, `server` is the server class.
    fn spawn_app(&self, work: &Workdir, port: u16, body_expr: &str, server: &str) -> Proc {
        let bind = if server.contains("AF_INET6") {
            "::"
        } else {
            "0.0.0.0"
        };
        let script = format!(
            "import http.server, socket\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       b = ({body_expr}).encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(b)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b)\n\
             \x20   def log_message(self, *a):\n\
             \x20       pass\n\
             ({server})(({bind:?}, {port}), H).serve_forever()\n"
        );
        let path = work.join(&format!("app-{}.py", self.ns));
        fs::write(&path, script).expect("write app");
        let path_s = path.display().to_string();
        let proc = Proc::spawn(
            &format!("app in {}", self.ns),
            &mut self.cmd(&["/usr/bin/python3", &path_s]),
            work.join(&format!("app-{}.log", self.ns)),
        );
        eventually("app listening", Duration::from_secs(10), || {
            self.http_get(None, &format!("http://127.0.0.1:{port}/"))
                .map(|_| ())
        });
        proc
    }
}

/// A running `trellis-agent serve`.
#[derive(Debug)]
pub struct Agent {
    pub proc: Proc,
    pub api: String,
    pub socket_dir: PathBuf,
    /// The agent's own moto server when the suite runs on the DynamoDB store (see [`Agent::start`]).
    pub moto: Option<Moto>,
    /// With `--api-auth`: the key the helpers sign with, TLS, the audit log.
    pub auth: Option<ApiAuth>,
    /// How it was started, for [`Agent::restart`].
    started: Started,
}

#[derive(Debug, Clone)]
struct Started {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    resources: Option<PathBuf>,
    hosts: Option<PathBuf>,
    auth: Option<ApiAuth>,
}

/// How to start an agent beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct AgentOpts<'a> {
    /// Names its data directory, socket directory and log (`agent` when empty).
    pub name: &'a str,
    pub resources: Option<&'a Path>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A hosts file the agent's name lookups see as `/etc/hosts` (a private mount namespace), as
    /// an instance's VPC resolver would answer for the test's names.
    pub hosts: Option<PathBuf>,
    /// `--api-auth` (and TLS, audit log): the helpers then sign with its key.
    pub auth: Option<ApiAuth>,
}

impl Agent {
    /// An agent on the embedded store; with `TRELLIS_TEST_STORE=dynamodb`, on a DynamoDB table
    /// of its own moto server instead, so a suite written for one agent runs on either store.
    pub fn start(work: &Workdir, resources: Option<&Path>) -> Self {
        Agent::start_on_test_store(
            work,
            AgentOpts {
                resources,
                ..AgentOpts::default()
            },
        )
    }

    /// [`Agent::start`] with `--api-auth`: an auth file whose administrator key the helpers
    /// (`aws`, `raw`, `metric`, `debug_xds`) sign every request with, as a CI pipeline would.
    pub fn start_secured(work: &Workdir, resources: Option<&Path>) -> Self {
        Agent::start_on_test_store(
            work,
            AgentOpts {
                resources,
                auth: Some(ApiAuth::admin(work, "agent", AuthFile::default())),
                ..AgentOpts::default()
            },
        )
    }

    fn start_on_test_store(work: &Workdir, mut opts: AgentOpts<'_>) -> Self {
        let moto = match std::env::var("TRELLIS_TEST_STORE").as_deref() {
            Ok("dynamodb") => {
                let moto = Moto::start(work, "moto");
                moto.create_table("trellis");
                opts.args = moto.store_args("trellis");
                opts.env = aws_env();
                Some(moto)
            }
            Ok("embedded") | Err(_) => None,
            Ok(other) => panic!("TRELLIS_TEST_STORE={other}: expected embedded or dynamodb"),
        };
        let mut agent = Agent::start_with(work, &opts);
        agent.moto = moto;
        agent
    }

    /// `start` with extra environment (`TRELLIS_*` settings, AWS credentials for discovery).
    pub fn start_with_env(work: &Workdir, resources: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Agent::start_with(
            work,
            &AgentOpts {
                resources,
                env,
                ..AgentOpts::default()
            },
        )
    }

    pub fn start_with(work: &Workdir, opts: &AgentOpts<'_>) -> Self {
        let name = if opts.name.is_empty() {
            "agent"
        } else {
            opts.name
        };
        let socket_dir = work.join(&format!("{name}-socket"));
        let mut cmd = match &opts.hosts {
            None => Command::new(bin("trellis-agent")),
            Some(hosts) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
                    .arg(hosts)
                    .arg(bin("trellis-agent"));
                c
            }
        };
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(work.join(&format!("{name}-data")))
            // The agent binds port 0 and logs the port it got ("agent ready api=…").
            .args(["--api-addr", "127.0.0.1:0"])
            .arg("--xds-socket")
            .arg(socket_dir.join("xds.sock"))
            .args(&opts.args)
            .args(opts.auth.iter().flat_map(ApiAuth::args))
            .env("TRELLIS_LOG", "info,trellis_agent=debug");
        // Test Envoys run in no ECS task: a lab's setting, unless the test attests on purpose.
        if !opts.args.iter().any(|a| a == "--xds-attestation") {
            cmd.args(["--xds-attestation", "none"]);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(r) = opts.resources {
            cmd.arg("--resources").arg(r);
        }
        let mut proc = Proc::spawn(
            &format!("trellis-agent {name}"),
            &mut cmd,
            work.join(&format!("{name}.log")),
        );
        // Generous: a large `--resources` file is applied before the API answers.
        let addr = proc.wait_for_log(" api=", Duration::from_secs(90));
        let tls = opts.auth.as_ref().is_some_and(|a| a.tls.is_some());
        let api = if tls {
            // The certificate names localhost.
            let port = addr.rsplit(':').next().unwrap_or_default();
            format!("https://localhost:{port}")
        } else {
            format!("http://{addr}")
        };
        if opts.auth.is_some() {
            eventually("agent API up", Duration::from_secs(90), || {
                if !proc.is_running() {
                    panic!("{} exited:\n{}", proc.name, proc.log_text());
                }
                let out = run(curl(opts.auth.as_ref())
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .arg(format!("{api}/v20190125/meshes")));
                match String::from_utf8_lossy(&out.stdout).as_ref() {
                    "200" => Ok(()),
                    code => Err(format!("status {code}")),
                }
            });
        } else {
            wait_for_http(
                &mut proc,
                "agent API up",
                &format!("{api}/v20190125/meshes"),
                Duration::from_secs(90),
                |code| code == "200",
            );
        }
        Agent {
            proc,
            api,
            socket_dir,
            moto: None,
            auth: opts.auth.clone(),
            started: Started {
                name: name.to_string(),
                args: opts.args.clone(),
                env: opts.env.clone(),
                resources: opts.resources.map(Path::to_path_buf),
                hosts: opts.hosts.clone(),
                auth: opts.auth.clone(),
            },
        }
    }

    /// curl as a client of this agent: signing with the helpers' key and trusting its CA when
    /// the API is secured.
    pub fn curl(&self) -> Command {
        curl(self.auth.as_ref())
    }

    /// Stops the agent and starts it again as it was started, on the same store (and moto).
    pub fn restart(mut self, work: &Workdir) -> Self {
        let moto = self.moto.take();
        let started = self.started.clone();
        drop(self);
        let mut agent = Agent::start_with(
            work,
            &AgentOpts {
                name: &started.name,
                resources: started.resources.as_deref(),
                args: started.args,
                env: started.env,
                hosts: started.hosts,
                auth: started.auth,
            },
        );
        agent.moto = moto;
        agent
    }

    /// A Prometheus sample from the agent's `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let out = run(self.curl().args(["-s", &format!("{}/metrics", self.api)]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `/debug/xds`: every connected Envoy's ADS stream (node, variant, per-type versions and
    /// last NACK), by stream id.
    pub fn debug_xds(&self) -> Value {
        let text = check(
            self.curl()
                .args(["-sf", &format!("{}/debug/xds", self.api)]),
        );
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("/debug/xds is not JSON ({e}): {text}"))
    }

    /// The stream of the Envoy with node id `node` in `/debug/xds`.
    pub fn xds_stream(&self, node: &str) -> Result<Value, String> {
        let debug = self.debug_xds();
        debug
            .as_object()
            .and_then(|s| s.values().find(|s| s["node"] == node))
            .cloned()
            .ok_or_else(|| format!("no stream of {node} in {debug}"))
    }

    /// The real AWS CLI pointed at this agent.
    pub fn aws(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crate::aws());
        c.args(args)
            .args(["--endpoint-url", &self.api, "--output", "json"])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-west-2")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_MAX_ATTEMPTS", "1");
        if let Some(a) = &self.auth {
            // Signed for the agent's region with the administrator key.
            c.env("AWS_ACCESS_KEY_ID", &a.key.id)
                .env("AWS_SECRET_ACCESS_KEY", &a.key.secret)
                .env("AWS_DEFAULT_REGION", REGION);
            if let Some(t) = &a.tls {
                c.arg("--ca-bundle").arg(&t.ca);
            }
        }
        c
    }

    /// A raw HTTP request to the API: (status, `x-amzn-ErrorType` header, body).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Option<String>, String) {
        let path = match (&self.auth, path.split_once('?')) {
            (Some(_), Some((p, q))) => format!("{p}?{}", encode_query(q)),
            _ => path.to_string(),
        };
        let mut cmd = self.curl();
        cmd.args([
            "-s",
            "-D",
            "-",
            "-X",
            method,
            &format!("{}{path}", self.api),
        ]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        let out = String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let error_type = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-amzn-errortype")
                .then(|| v.trim().to_string())
        });
        (status, error_type, body.to_string())
    }

    /// Runs an `aws appmesh` command that must succeed and returns its JSON output.
    pub fn appmesh(&self, args: &[&str]) -> Value {
        let mut full = vec!["appmesh"];
        full.extend_from_slice(args);
        let out = check(&mut self.aws(&full));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("aws output is not JSON ({e}): {out}"))
    }

    /// Runs an `aws appmesh` command that must fail; returns its stderr.
    pub fn appmesh_err(&self, args: &[&str]) -> String {
        let mut full = vec!["appmesh"];
        full.extend_from_slice(args);
        let out = run(&mut self.aws(&full));
        assert!(
            !out.status.success(),
            "aws {full:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// curl, signing with `auth`'s key for the agent's region and service and trusting its CA.
fn curl(auth: Option<&ApiAuth>) -> Command {
    let mut c = Command::new("curl");
    if let Some(a) = auth {
        c.arg("--aws-sigv4")
            .arg(format!("aws:amz:{REGION}:appmesh"))
            .arg("--user")
            .arg(format!("{}:{}", a.key.id, a.key.secret));
        if let Some(t) = &a.tls {
            c.arg("--cacert").arg(&t.ca);
        }
    }
    c
}

/// The task definition `trellis-rewrite` makes of `input` for a virtual node.
pub fn rewrite(
    work: &Workdir,
    input: &Value,
    mesh: &str,
    node: &str,
    socket_host_path: &Path,
) -> Value {
    rewrite_with(work, input, mesh, node, socket_host_path, &[])
}

/// [`rewrite`] with extra flags (e.g. `--explicit-backends`).
pub fn rewrite_with(
    work: &Workdir,
    input: &Value,
    mesh: &str,
    node: &str,
    socket_host_path: &Path,
    flags: &[&str],
) -> Value {
    let path = work.join(&format!("taskdef-{node}.json"));
    fs::write(&path, serde_json::to_vec_pretty(input).expect("encode")).expect("write taskdef");
    let out = check(
        Command::new(bin("trellis-rewrite"))
            .args(["--mesh", mesh, "--virtual-node", node, "--socket-host-path"])
            .arg(socket_host_path)
            .args(flags)
            .arg(&path),
    );
    serde_json::from_str(&out).expect("rewrite output is JSON")
}

pub fn container<'a>(taskdef: &'a Value, name: &str) -> &'a Value {
    taskdef["containerDefinitions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("task definition has no container {name}"))
}

pub fn env_of(c: &Value) -> Vec<(String, String)> {
    c["environment"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    (
                        v["name"].as_str().unwrap_or_default().to_string(),
                        v["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the task's route manager container: its environment, against the task's namespace.
pub fn run_route_manager(task: &Task, taskdef: &Value) -> String {
    let c = container(taskdef, "proxy-route-manager");
    let mut cmd = Command::new(bin("trellis-proxy-route-manager"));
    cmd.arg("--netns")
        .arg(task.netns_path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env_of(c) {
        cmd.env(k, v);
    }
    check(&mut cmd)
}

/// Starts the task's Envoy container as the definition says: `trellis-agent bootstrap` from its
/// environment (the socket path mapped from the container mount to the host directory), then
/// Envoy as its `user`, and waits until the definition's own health check passes.
pub fn start_envoy(work: &Workdir, task: &Task, taskdef: &Value) -> Proc {
    start_envoy_with(work, task, taskdef, &[])
}

/// [`start_envoy`] with `extra` variables added to the Envoy container's environment (what an
/// operator adds to the task definition, e.g. `APPMESH_SDS_SOCKET_PATH`).
pub fn start_envoy_with(
    work: &Workdir,
    task: &Task,
    taskdef: &Value,
    extra: &[(&str, &str)],
) -> Proc {
    start_envoy_in(work, task, taskdef, extra, None)
}

/// [`start_envoy_with`], the Envoy in container cgroup `cgroup` from its start when given (as a
/// container runtime starts it).
pub fn start_envoy_in(
    work: &Workdir,
    task: &Task,
    taskdef: &Value,
    extra: &[(&str, &str)],
    cgroup: Option<&Path>,
) -> Proc {
    let c = container(taskdef, "envoy");
    let user = c["user"]
        .as_str()
        .expect("envoy container has a user")
        .to_string();
    let mut env = env_of(c);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // The container sees the host socket directory at its mount's containerPath.
    let mount = &c["mountPoints"][0];
    let volume = taskdef["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["sourceVolume"]))
        .expect("socket volume");
    let host_dir = volume["host"]["sourcePath"].as_str().expect("host path");
    let container_dir = mount["containerPath"].as_str().expect("container path");
    for (k, v) in env.iter_mut() {
        if k == "APPMESH_XDS_ENDPOINT" {
            *v = v.replacen(container_dir, host_dir, 1);
        }
    }
    let bootstrap_path = work.join(&format!("bootstrap-{}.json", task.ns));
    let mut boot = Command::new(bin("trellis-agent"));
    boot.args(["bootstrap", "--output"])
        .arg(&bootstrap_path)
        .env_clear();
    for (k, v) in &env {
        boot.env(k, v);
    }
    boot.env("ENVOY_ADMIN_ACCESS_LOG_FILE", "/dev/null");
    check(&mut boot);
    let envoy = work.stage(&crate::envoy());
    let log_level = env
        .iter()
        .find(|(k, _)| k == "ENVOY_LOG_LEVEL")
        .map(|(_, v)| v.clone())
        .unwrap_or("info".into());
    let boot_s = bootstrap_path.display().to_string();
    let envoy_s = envoy.display().to_string();
    let envoy_args = [
        envoy_s.as_str(),
        "-c",
        &boot_s,
        "-l",
        &log_level,
        "--disable-hot-restart",
        "--concurrency",
        "1",
    ];
    let mut cmd = match cgroup {
        None => task.cmd_as(&user, &envoy_args),
        Some(cg) => {
            let (reuid, regid) = (format!("--reuid={user}"), format!("--regid={user}"));
            // Into the cgroup before `ip netns exec`, whose fresh /sys hides the cgroup mounts.
            let mut args = vec!["ip", "netns", "exec", &task.ns, "setpriv"];
            args.extend([reuid.as_str(), &regid, "--clear-groups", "--"]);
            args.extend(envoy_args);
            let argv = crate::ecs::in_cgroup(cg, &args);
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    let proc = Proc::spawn(
        &format!("envoy in {}", task.ns),
        &mut cmd,
        work.join(&format!("envoy-{}.log", task.ns)),
    );
    let health = c["healthCheck"]["command"]
        .as_array()
        .and_then(|cmd| cmd.get(1))
        .and_then(Value::as_str)
        .expect("CMD-SHELL health check")
        .to_string();
    eventually(
        "envoy health check (from the task definition)",
        Duration::from_secs(30),
        || {
            let out = run(&mut task.cmd(&["sh", "-c", &health]));
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("health check {health:?} failed"))
            }
        },
    );
    proc
}

/// Starts a virtual gateway's Envoy in `task` as the App Mesh gateway image ran it: no route
/// manager (a gateway has no iptables redirect), `trellis-agent bootstrap` from
/// `APPMESH_RESOURCE_ARN=mesh/MESH/virtualGateway/GATEWAY` and the agent's socket, then Envoy as
/// uid 1337. Returns once the admin port answers `/ready` LIVE and listeners have arrived.
pub fn start_gateway_envoy(
    work: &Workdir,
    task: &Task,
    agent: &Agent,
    mesh: &str,
    gateway: &str,
    admin_port: u16,
) -> Proc {
    start_proxy_envoy(
        work,
        task,
        agent,
        &format!("mesh/{mesh}/virtualGateway/{gateway}"),
        admin_port,
    )
}

/// An Envoy for any proxy identity (`mesh/M/virtualNode/N`, `mesh/M/virtualGateway/G`) in `task`,
/// as uid 1337 against the agent's socket, waited on until LIVE with its listeners.
pub fn start_proxy_envoy(
    work: &Workdir,
    task: &Task,
    agent: &Agent,
    resource: &str,
    admin_port: u16,
) -> Proc {
    start_proxy_envoy_with(work, task, agent, resource, admin_port, &[])
}

/// [`start_proxy_envoy`] with `extra` variables for the bootstrap (e.g. `APPMESH_SDS_SOCKET_PATH`).
pub fn start_proxy_envoy_with(
    work: &Workdir,
    task: &Task,
    agent: &Agent,
    resource: &str,
    admin_port: u16,
    extra: &[(&str, &str)],
) -> Proc {
    let bootstrap_path = work.join(&format!("bootstrap-{}.json", task.ns));
    check(
        Command::new(bin("trellis-agent"))
            .args(["bootstrap", "--output"])
            .arg(&bootstrap_path)
            .env_clear()
            .envs(extra.iter().copied())
            .env("APPMESH_RESOURCE_ARN", resource)
            .env(
                "APPMESH_XDS_ENDPOINT",
                format!("unix://{}", agent.socket_dir.join("xds.sock").display()),
            )
            .env("ENVOY_ADMIN_ACCESS_PORT", admin_port.to_string())
            .env("ENVOY_ADMIN_ACCESS_LOG_FILE", "/dev/null"),
    );
    let envoy = work.stage(&crate::envoy());
    let (boot_s, envoy_s) = (
        bootstrap_path.display().to_string(),
        envoy.display().to_string(),
    );
    let mut cmd = task.cmd_as(
        "1337",
        &[
            &envoy_s,
            "-c",
            &boot_s,
            "-l",
            "info",
            "--disable-hot-restart",
            "--concurrency",
            "1",
        ],
    );
    let mut proc = Proc::spawn(
        &format!("envoy {resource} in {}", task.ns),
        &mut cmd,
        work.join(&format!("envoy-{}.log", task.ns)),
    );
    eventually(
        "Envoy LIVE with its listeners",
        Duration::from_secs(30),
        || {
            if !proc.is_running() {
                panic!("Envoy exited:\n{}", proc.log_text());
            }
            let ready = task.http_get(None, &format!("http://127.0.0.1:{admin_port}/ready"));
            let lds = task.envoy_stat(admin_port, "listener_manager.lds.update_success");
            match ready {
                Ok(body) if body.trim() == "LIVE" && lds > 0 => Ok(()),
                other => Err(format!("ready: {other:?}, lds updates: {lds}")),
            }
        },
    );
    proc
}
