//! The churn harness (issue 17): a front task sends steady closed-loop keep-alive load through
//! its Envoy to `back.local`, a Cloud Map service of back tasks, while tasks come and go the way
//! ECS moves them. Shared by the bench (`cargo bench -p trellis-tests --bench churn`, full size)
//! and the CI suite (`tests/tests/churn.rs`, reduced size); each scenario ends in a [`Tally`].
//!
//! What ECS does, reproduced here:
//! - start: route manager (SUCCESS) → Envoy through the project's entrypoint (`trellis-agent
//!   envoy`, as uid 1337) until the task definition's own health check passes → app → the task is
//!   RUNNING and registered in Cloud Map (moto);
//! - stop: the Cloud Map instance deregistered at task stop, then SIGTERM to the containers in
//!   reverse `dependsOn` order (the app; once it is gone, Envoy's entrypoint), each SIGKILLed after
//!   `stopTimeout`; then the ENI goes (the task's link is set down).
//!
//! The entrypoint reads the task's container states from a task metadata v4 stand-in served in
//! the VPC namespace, as ECS's agent serves it at 169.254.170.2.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::chown;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cloudmap::{AWS_ENV, FaultProxy, Moto};
use crate::dynamo::standin::{Fault, StandIn};
use crate::mesh::{Agent, AgentOpts, Task, Vpc, container, env_of, rewrite, run_route_manager};
use crate::scenario::{app_taskdef, resources_file};
use crate::{Proc, Workdir, bin, eventually, free_port, run};

const PORT: u16 = 8080;
const ADMIN: u16 = 9901;
const HOST: &str = "back.local:8080";
/// Where the metadata stand-in listens in the VPC namespace (on the bridge address).
const METADATA_PORT: u16 = 51678;

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Size {
    /// Closed-loop clients in the front task, each on its own keep-alive connection.
    pub clients: usize,
    /// Load before, between and after the steps of a scenario.
    pub settle: Duration,
    /// How long the DynamoDB store is unreachable (scenario 5).
    pub outage: Duration,
    /// ECS's `stopTimeout` (30 s by default): SIGTERM, then SIGKILL after this.
    pub stop_timeout: Duration,
}

impl Size {
    /// CI: a few seconds of load around each step.
    pub fn ci() -> Self {
        Size {
            clients: 4,
            settle: Duration::from_secs(2),
            outage: Duration::from_secs(8),
            stop_timeout: Duration::from_secs(30),
        }
    }

    /// The bench: longer steady phases and the issue's 30 s store outage.
    pub fn full() -> Self {
        Size {
            clients: 8,
            settle: Duration::from_secs(20),
            outage: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(30),
        }
    }
}

/// Requests answered and failed during one scenario, with why they failed.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Answered requests that took over 500 ms (a try on a gone task waits out the connect
    /// timeout before the retry), and the slowest answer.
    pub slow: u64,
    pub worst_ms: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} failed, {} over 500 ms, slowest {} ms",
            self.failed,
            self.total(),
            self.slow,
            self.worst_ms
        )?;
        if !self.reasons.is_empty() {
            write!(f, " {:?}", self.reasons)?;
        }
        Ok(())
    }
}

/// The closed-loop load: a Python client in the front task, each thread one keep-alive
/// connection to `back.local:8080` (redirected into front's Envoy). Every answer that is not a
/// 200, and every connection error, counts as a failed request.
const LOAD: &str = r#"
import http.client, json, os, sys, threading, time
target, clients, stop, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()
ok = [0]; failed = [0]; reasons = {}; slow = [0]; worst = [0.0]
done = [False]
def fail(why):
    with lock:
        failed[0] += 1
        reasons[why] = reasons.get(why, 0) + 1
def client():
    conn = None
    while not done[0]:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(target, 8080, timeout=30)
            t = time.monotonic()
            conn.request('GET', '/', headers={'Host': 'back.local:8080'})
            r = conn.getresponse()
            body = r.read()
            ms = (time.monotonic() - t) * 1000
            if r.status == 200:
                with lock:
                    ok[0] += 1
                    slow[0] += ms > 500
                    worst[0] = max(worst[0], ms)
            else:
                fail('%d %s' % (r.status, body[:100].decode(errors='replace')))
            if r.getheader('connection', '').lower() == 'close':
                conn.close(); conn = None
        except Exception as e:
            fail(type(e).__name__)
            try:
                conn.close()
            except Exception:
                pass
            conn = None
threads = [threading.Thread(target=client) for _ in range(clients)]
for t in threads: t.start()
while not os.path.exists(stop):
    with lock:
        line = json.dumps({'ok': ok[0], 'failed': failed[0]})
    with open(progress + '.tmp', 'w') as f: f.write(line)
    os.replace(progress + '.tmp', progress)
    time.sleep(0.1)
done[0] = True
for t in threads: t.join()
print('TALLY ' + json.dumps({'ok': ok[0], 'failed': failed[0], 'reasons': reasons,
      'slow': slow[0], 'worst_ms': round(worst[0])}), flush=True)
"#;

/// Task metadata v4 stand-in: `/v4/ID` is the Envoy container, `/v4/ID/task` the task with its
/// app container in the state the file `DIR/ID` holds (RUNNING until the harness stops the app).
const METADATA: &str = r#"
import http.server, json, os, sys
d = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.strip('/').split('/')
        tid = parts[1] if len(parts) > 1 else ''
        envoy = {'DockerId': tid + '-envoy', 'Name': 'envoy', 'KnownStatus': 'RUNNING', 'Type': 'NORMAL'}
        if len(parts) == 3 and parts[2] == 'task':
            try:
                app = open(os.path.join(d, tid)).read().strip()
            except OSError:
                app = 'RUNNING'
            body = {'Family': tid, 'KnownStatus': 'RUNNING', 'Containers': [envoy,
                    {'DockerId': tid + '-app', 'Name': 'app', 'KnownStatus': app, 'Type': 'NORMAL'}]}
        else:
            body = envoy
        b = json.dumps(body).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 51678), H).serve_forever()
"#;

/// The back tasks' app: answers its task's name, and on SIGTERM stops accepting, finishes the
/// requests in flight and exits, as web servers do (gunicorn, nginx, Go's `Server.Shutdown`). A
/// response cut off by an app that dies mid-write is lost in any mesh.
const APP: &str = r#"
import http.server, signal, sys, threading
body = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = False
s = S(('0.0.0.0', 8080), H)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=s.shutdown).start())
s.serve_forever()
s.server_close()
"#;

/// A running load; [`Load::finish`] stops it and returns its tally.
#[derive(Debug)]
pub struct Load {
    proc: Proc,
    stop: PathBuf,
    progress: PathBuf,
}

impl Load {
    /// Requests answered so far (failed ones included).
    pub fn done(&self) -> (u64, u64) {
        let text = fs::read_to_string(&self.progress).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (
            v["ok"].as_u64().unwrap_or(0),
            v["failed"].as_u64().unwrap_or(0),
        )
    }

    pub fn finish(mut self) -> Tally {
        fs::write(&self.stop, "").expect("write stop file");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.proc.is_running() {
            assert!(Instant::now() < deadline, "load client did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.proc.log_text();
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix("TALLY "))
            .unwrap_or_else(|| panic!("load client ended without a tally:\n{log}"));
        let v: Value = serde_json::from_str(line).expect("tally is JSON");
        Tally {
            ok: v["ok"].as_u64().unwrap_or(0),
            failed: v["failed"].as_u64().unwrap_or(0),
            slow: v["slow"].as_u64().unwrap_or(0),
            worst_ms: v["worst_ms"].as_u64().unwrap_or(0),
            reasons: v["reasons"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// One back task: its namespace, Envoy's entrypoint, its app, its Cloud Map instance.
#[derive(Debug)]
pub struct Back {
    pub name: String,
    pub task: Task,
    envoy: Proc,
    app: Proc,
    instance: String,
}

/// A back task being stopped the way ECS stops it, on its own thread.
#[derive(Debug)]
pub struct Stopping(JoinHandle<()>);

impl Stopping {
    pub fn wait(self) {
        self.0.join().expect("stop sequence");
    }
}

/// Which agent a task's Envoy connects to.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    First,
    Second,
}

/// The world of a churn scenario. Field order is drop order: processes before namespaces.
#[derive(Debug)]
pub struct Churn {
    pub backs: Vec<Back>,
    front_envoy: Option<Proc>,
    _metadata: Option<Proc>,
    pub front: Task,
    pub vpc: Vpc,
    pub agent: Option<Agent>,
    pub second: Option<Agent>,
    pub standin: Option<StandIn>,
    pub dynamo: Option<crate::dynamo::Moto>,
    pub cloudmap: Moto,
    service: String,
    next_host: u8,
    pub size: Size,
    work: Workdir,
}

fn resources() -> Value {
    json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualNodeName": "back-vn", "spec": {
            "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
            "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "back"}}}},
        {"meshName": "m", "virtualServiceName": "back.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "back-vn"}}}},
        {"meshName": "m", "virtualNodeName": "front-vn", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}}
    ])
}

impl Churn {
    /// The agent (embedded store) with Cloud Map at its default poll, a front task and `backs`
    /// back tasks; with `two_agents`, two agents sharing a DynamoDB table through the fault
    /// stand-in, the front on the first and the back tasks alternating between them.
    pub fn start(name: &str, vpc_id: u8, size: Size, backs: usize, two_agents: bool) -> Self {
        let work = Workdir::new(name);
        let mut cloudmap = Moto::start(&work, free_port());
        // Everyone (the CLI registering, the agents polling) goes through the proxy, whose
        // revision moves on every change as Cloud Map's does.
        let proxy = FaultProxy::start(cloudmap.port);
        proxy.documented_revision();
        cloudmap.url = proxy.url.clone();
        let service = cloudmap.create_service("ns", "back");
        let file = resources_file(&work, &resources());
        let mut env: Vec<(String, String)> = AWS_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("TRELLIS_CLOUDMAP_ENDPOINT".into(), cloudmap.url.clone()));
        let (dynamo, standin, store) = if two_agents {
            let dynamo = crate::dynamo::Moto::start(&work, "dynamo");
            let standin = StandIn::start(&dynamo);
            let store = standin.store_args("mesh");
            // In the agents' region (moto keeps tables per region).
            let mut init = Command::new(bin("trellis-agent"));
            init.arg("init-store").args(&store).envs(AWS_ENV);
            let out = run(&mut init);
            assert!(out.status.success(), "init-store: {out:?}");
            (Some(dynamo), Some(standin), store)
        } else {
            (None, None, vec![])
        };
        let agent = Agent::start_with(
            &work,
            &AgentOpts {
                name: "agent",
                resources: Some(&file),
                args: store.clone(),
                env: env.clone(),
                ..AgentOpts::default()
            },
        );
        let second = two_agents.then(|| {
            Agent::start_with(
                &work,
                &AgentOpts {
                    name: "agent2",
                    args: store.clone(),
                    env: env.clone(),
                    ..AgentOpts::default()
                },
            )
        });
        let mut vpc = Vpc::new(&work, vpc_id);
        let meta_dir = work.join("metadata");
        fs::create_dir_all(&meta_dir).expect("metadata dir");
        let script = work.join("metadata.py");
        fs::write(&script, METADATA).expect("write metadata stand-in");
        let mut meta_cmd = Command::new("ip");
        meta_cmd
            .args(["netns", "exec", &vpc.ns, "/usr/bin/python3"])
            .arg(&script)
            .arg(vpc.resolver())
            .arg(&meta_dir);
        let metadata = Proc::spawn("task metadata", &mut meta_cmd, work.join("metadata.log"));
        let front = vpc.task("front", 2);
        let mut churn = Churn {
            backs: vec![],
            front_envoy: None,
            _metadata: Some(metadata),
            front,
            vpc,
            agent: Some(agent),
            second,
            standin,
            dynamo,
            cloudmap,
            service,
            next_host: 10,
            size,
            work,
        };
        eventually("task metadata up", Duration::from_secs(10), || {
            churn
                .front
                .http_get(None, &churn.metadata_uri("probe"))
                .map(|_| ())
        });
        let def = churn.taskdef("front-vn", &[]);
        run_route_manager(&churn.front, &def);
        churn.front_envoy = Some(churn.start_envoy(&churn.front, "front", &def, Via::First));
        for i in 0..backs {
            let via = if two_agents && i % 2 == 1 {
                Via::Second
            } else {
                Via::First
            };
            let b = churn.start_back(via);
            churn.backs.push(b);
        }
        churn.wait_for_backs();
        churn
    }

    fn metadata_uri(&self, task: &str) -> String {
        format!("http://{}:{METADATA_PORT}/v4/{task}", self.vpc.resolver())
    }

    fn agent(&self, via: Via) -> &Agent {
        match via {
            Via::First => self.agent.as_ref().expect("agent running"),
            Via::Second => self.second.as_ref().expect("second agent"),
        }
    }

    fn taskdef(&self, node: &str, ports: &[u16]) -> Value {
        let socket = &self.agent(Via::First).socket_dir;
        rewrite(&self.work, &app_taskdef(node, ports), "m", node, socket)
    }

    /// Envoy's container as ECS runs it: the image's entrypoint (`trellis-agent envoy`) as the
    /// container's user with the container's environment, waited on by its own health check.
    fn start_envoy(&self, task: &Task, name: &str, def: &Value, via: Via) -> Proc {
        let c = container(def, "envoy");
        let user = c["user"].as_str().expect("envoy user").to_string();
        let socket = self.agent(via).socket_dir.join("xds.sock");
        let dir = self.work.join(&format!("envoy-{name}"));
        fs::create_dir_all(&dir).expect("envoy dir");
        chown(&dir, Some(1337), Some(1337)).expect("chown envoy dir");
        let agent_bin = self.work.stage(&bin("trellis-agent"));
        let envoy_bin = self.work.stage(&crate::envoy());
        // The container's environment only (`env -i`), as ECS gives it.
        let mut args: Vec<String> = vec!["env".into(), "-i".into(), "PATH=/usr/bin:/bin".into()];
        for (k, v) in env_of(c) {
            let v = if k == "APPMESH_XDS_ENDPOINT" {
                format!("unix://{}", socket.display())
            } else {
                v
            };
            args.push(format!("{k}={v}"));
        }
        args.push("ENVOY_ADMIN_ACCESS_LOG_FILE=/dev/null".into());
        args.push(format!(
            "ECS_CONTAINER_METADATA_URI_V4={}",
            self.metadata_uri(name)
        ));
        args.extend([
            agent_bin.display().to_string(),
            "envoy".into(),
            "--envoy".into(),
            envoy_bin.display().to_string(),
            "--bootstrap".into(),
            dir.join("bootstrap.json").display().to_string(),
            "--".into(),
            "--concurrency".into(),
            "1".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = task.cmd_as(&user, &args);
        let proc = Proc::spawn(
            &format!("envoy entrypoint in {}", task.ns),
            &mut cmd,
            self.work.join(&format!("envoy-{name}.log")),
        );
        let health = c["healthCheck"]["command"][1]
            .as_str()
            .expect("CMD-SHELL health check")
            .to_string();
        eventually(
            &format!("{name}: Envoy HEALTHY by the task definition's check"),
            Duration::from_secs(60),
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

    fn start_app(&self, task: &Task, name: &str) -> Proc {
        let script = self.work.join("app.py");
        fs::write(&script, APP).expect("write app");
        let proc = Proc::spawn(
            &format!("app in {}", task.ns),
            &mut task.cmd(&["/usr/bin/python3", &script.display().to_string(), name]),
            self.work.join(&format!("app-{name}.log")),
        );
        eventually("app listening", Duration::from_secs(10), || {
            task.http_get(None, &format!("http://127.0.0.1:{PORT}/"))
                .map(|_| ())
        });
        proc
    }

    /// Starts a back task in ECS order and registers it in Cloud Map once it is RUNNING.
    pub fn start_back(&mut self, via: Via) -> Back {
        let host = self.next_host;
        self.next_host += 1;
        let name = format!("b{host}");
        let task = self.vpc.task(&name, host);
        let def = self.taskdef("back-vn", &[PORT]);
        run_route_manager(&task, &def);
        let envoy = self.start_envoy(&task, &name, &def, via);
        let app = self.start_app(&task, &name);
        let instance = format!("i-{name}");
        self.cloudmap
            .register(&self.service, &instance, &[("AWS_INSTANCE_IPV4", &task.ip)]);
        Back {
            name,
            task,
            envoy,
            app,
            instance,
        }
    }

    /// Waits until every back task is an endpoint in front's Envoy and has served a request.
    pub fn wait_for_backs(&self) {
        eventually(
            "front reaches every back task",
            Duration::from_secs(60),
            || {
                for b in &self.backs {
                    let served = b
                        .task
                        .envoy_stat(ADMIN, "http.ingress.http.8080.downstream_rq_completed");
                    if served == 0 {
                        // Nudge with one request of our own: the load may not be running yet.
                        let _ = run(&mut self.front.cmd(&[
                            "curl",
                            "-s",
                            "-m",
                            "3",
                            "-H",
                            &format!("Host: {HOST}"),
                            &format!("http://{}:{PORT}/", self.vpc.resolver()),
                        ]));
                        return Err(format!("{} has served nothing yet", b.name));
                    }
                }
                Ok(())
            },
        );
    }

    /// Starts the closed-loop load and waits until it flows.
    pub fn load(&self) -> Load {
        let n = fs::read_dir(self.work.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let script = self.work.join("load.py");
        fs::write(&script, LOAD).expect("write load client");
        let stop = self.work.join(&format!("load-stop-{n}"));
        let progress = self.work.join(&format!("load-progress-{n}"));
        let mut cmd = self.front.cmd(&[
            "/usr/bin/python3",
            &script.display().to_string(),
            &self.vpc.resolver(),
            &self.size.clients.to_string(),
            &stop.display().to_string(),
            &progress.display().to_string(),
        ]);
        let load = Load {
            proc: Proc::spawn("load", &mut cmd, self.work.join(&format!("load-{n}.log"))),
            stop,
            progress,
        };
        eventually("load flowing", Duration::from_secs(20), || {
            match load.done() {
                (ok, _) if ok > 0 => Ok(()),
                d => Err(format!("{d:?}")),
            }
        });
        load
    }

    /// Lets the load run for the settle time.
    pub fn settle(&self) {
        std::thread::sleep(self.size.settle);
    }

    /// Stops back task `i` as ECS stops a task: deregistered from Cloud Map, SIGTERM to the app,
    /// then (once the app is gone, as `dependsOn` orders it) to Envoy's entrypoint, each
    /// SIGKILLed after `stopTimeout`; then its ENI is gone.
    pub fn stop_back(&mut self, i: usize) -> Stopping {
        let b = self.backs.remove(i);
        self.cloudmap.deregister(&self.service, &b.instance);
        let stop_timeout = self.size.stop_timeout;
        let status = self.work.join(&format!("metadata/{}", b.name));
        Stopping(std::thread::spawn(move || {
            let Back {
                task,
                mut envoy,
                mut app,
                ..
            } = b;
            stop_container(&mut app, stop_timeout);
            fs::write(&status, "STOPPED").expect("app status");
            stop_container(&mut envoy, stop_timeout);
            task.exec(&["ip", "link", "set", "eth0", "down"]);
        }))
    }

    /// Kills back task `i` outright (an instance lost): SIGKILL to every container, no
    /// deregistration, the ENI gone.
    pub fn kill_back(&mut self, i: usize) {
        let b = self.backs.remove(i);
        // Every process of every container (the entrypoint's Envoy too).
        for p in [&b.app, &b.envoy] {
            crate::reap::kill_tree(p.pid());
        }
        b.task.exec(&["ip", "link", "set", "eth0", "down"]);
    }

    /// `kill -9` of the first agent, then its restart (same flags, data and socket).
    pub fn kill_and_restart_agent(&mut self) {
        let agent = self.agent.take().expect("agent running");
        signal(&agent.proc, "KILL");
        self.agent = Some(agent.restart(&self.work));
    }

    /// Makes the DynamoDB store unreachable (every call fails) for the outage time.
    pub fn store_outage(&self) {
        let standin = self.standin.as_ref().expect("two agents on DynamoDB");
        standin.fail(Fault::Outage);
        std::thread::sleep(self.size.outage);
        standin.heal();
    }

    /// Requests each current back task's Envoy has taken in.
    pub fn served(&self, b: &Back) -> u64 {
        b.task
            .envoy_stat(ADMIN, "http.ingress.http.8080.downstream_rq_completed")
    }

    /// Keeps the logs when a scenario fails.
    pub fn keep_logs(self) -> PathBuf {
        let Churn { work, .. } = self;
        work.keep()
    }
}

fn signal(p: &Proc, sig: &str) {
    let _ = run(Command::new("kill").args([&format!("-{sig}"), &p.pid().to_string()]));
}

/// SIGTERM, then SIGKILL if it is still running after `timeout` (`docker stop`'s sequence).
fn stop_container(p: &mut Proc, timeout: Duration) {
    signal(p, "TERM");
    let deadline = Instant::now() + timeout;
    while p.is_running() {
        if Instant::now() >= deadline {
            // The whole container: an entrypoint's Envoy too.
            crate::reap::kill_tree(p.pid());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The six scenarios of issue 17 in the issue's order: (name, whether it must lose nothing).
pub fn scenarios() -> Vec<(&'static str, bool)> {
    vec![
        ("rolling replacement of 3 back tasks", true),
        ("scale-in 3 -> 1", true),
        ("scale-out 1 -> 3", true),
        ("agent kill -9 and restart", true),
        ("DynamoDB store unreachable, two agents", true),
        ("a back task SIGKILLed (no deregistration)", false),
    ]
}

/// Runs scenario `n` (1-based, as the issue numbers them) and returns its tally.
pub fn run_scenario(n: usize, size: &Size) -> Tally {
    let vpc_id = 40 + n as u8;
    let name = format!("churn-{n}");
    match n {
        1 => {
            let mut c = Churn::start(&name, vpc_id, size.clone(), 3, false);
            let load = c.load();
            c.settle();
            let mut stopping = vec![];
            // ECS's rolling deployment at minimumHealthyPercent 100: a new task, HEALTHY and
            // registered, then an old one stopped.
            for _ in 0..3 {
                let b = c.start_back(Via::First);
                c.backs.push(b);
                stopping.push(c.stop_back(0));
                c.settle();
            }
            stopping.into_iter().for_each(Stopping::wait);
            // Every new task takes its share of the load.
            c.wait_for_backs();
            c.settle();
            load.finish()
        }
        2 => {
            let mut c = Churn::start(&name, vpc_id, size.clone(), 3, false);
            let load = c.load();
            c.settle();
            // ECS stops the tasks of a scale-in at once.
            let a = c.stop_back(0);
            let b = c.stop_back(0);
            a.wait();
            b.wait();
            c.settle();
            load.finish()
        }
        3 => {
            let mut c = Churn::start(&name, vpc_id, size.clone(), 1, false);
            let load = c.load();
            c.settle();
            for _ in 0..2 {
                let b = c.start_back(Via::First);
                c.backs.push(b);
            }
            c.wait_for_backs();
            c.settle();
            load.finish()
        }
        4 => {
            let mut c = Churn::start(&name, vpc_id, size.clone(), 3, false);
            let load = c.load();
            c.settle();
            c.kill_and_restart_agent();
            c.settle();
            // Discovery after the restart still follows the service.
            let s = c.stop_back(0);
            let b = c.start_back(Via::First);
            c.backs.push(b);
            s.wait();
            c.wait_for_backs();
            c.settle();
            load.finish()
        }
        5 => {
            let c = Churn::start(&name, vpc_id, size.clone(), 3, true);
            let load = c.load();
            c.settle();
            c.store_outage();
            c.settle();
            let t = load.finish();
            assert!(
                c.standin.as_ref().is_some_and(|s| s.calls("Query") > 0),
                "the agents used the store"
            );
            t
        }
        6 => {
            let mut c = Churn::start(&name, vpc_id, size.clone(), 3, false);
            let load = c.load();
            c.settle();
            c.kill_back(0);
            c.settle();
            load.finish()
        }
        _ => panic!("scenario {n}: there are six"),
    }
}
