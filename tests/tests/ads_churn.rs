//! The ADS server under churn, with real Envoys and real traffic: four keep-alive clients call
//! `color.local`, a virtual router's service whose targets `blue` and `red` are found through
//! Cloud Map (moto, behind a fault proxy that can throttle), while the route is retargeted, the
//! agent restarts with a changed state, and the agent restarts while Cloud Map throttles its
//! first calls. No request may fail in any of them. Each test prints its failed/total figure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::cloudmap::{AWS_ENV, FaultProxy, Moto};
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks_with_envoy_env};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually, free_port, run};

const PORT: u16 = 9080;
const WAIT: Duration = Duration::from_secs(30);

/// Keep-alive clients in a loop until a stop file appears, writing what they saw (status codes,
/// bodies of answers, reasons of failures, the last body) to a status file every 100 ms.
const LOAD: &str = r#"
import http.client, json, os, sys, threading, time
host, port, stop, status, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
lock = threading.Lock()
seen = {"ok": 0, "failed": 0, "bodies": {}, "failures": {}, "last": ""}
def count(ok, what):
    with lock:
        if ok:
            seen["ok"] += 1
            seen["bodies"][what] = seen["bodies"].get(what, 0) + 1
            seen["last"] = what
        else:
            seen["failed"] += 1
            seen["failures"][what] = seen["failures"].get(what, 0) + 1
def work():
    conn = None
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/")
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            if r.status == 200:
                count(True, body)
            else:
                flags = r.getheader("x-envoy-response-flags", "")
                count(False, "%d %s %s" % (r.status, flags, body[:60]))
            if r.will_close:
                conn.close()
                conn = None
        except Exception as e:
            count(False, "%s: %s" % (type(e).__name__, str(e)[:60]))
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(0.002)
def report():
    while True:
        with lock:
            text = json.dumps(seen)
        with open(status + ".tmp", "w") as f:
            f.write(text)
        os.replace(status + ".tmp", status)
        if os.path.exists(stop) and not any(t.is_alive() for t in threads):
            return
        time.sleep(0.1)
threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads:
    t.start()
report()
"#;

/// Steady load from a task's app side through its Envoy.
struct Load {
    _proc: Proc,
    stop: PathBuf,
    status: PathBuf,
}

impl Load {
    fn start(work: &Workdir, task: &Task, url_host: &str) -> Self {
        let script = work.join("load.py");
        std::fs::write(&script, LOAD).expect("write load script");
        let stop = work.join("load.stop");
        let status = work.join("load.json");
        let _ = std::fs::remove_file(&stop);
        let _ = std::fs::remove_file(&status);
        let (script_s, stop_s, status_s) = (
            script.display().to_string(),
            stop.display().to_string(),
            status.display().to_string(),
        );
        let port = PORT.to_string();
        let proc = Proc::spawn(
            "load",
            &mut task.cmd(&[
                "/usr/bin/python3",
                &script_s,
                url_host,
                &port,
                &stop_s,
                &status_s,
                "4",
            ]),
            work.join("load.log"),
        );
        let load = Load {
            _proc: proc,
            stop,
            status,
        };
        load.until("load running", |s| s["ok"].as_u64() >= Some(50));
        load
    }

    fn seen(&self) -> Result<Value, String> {
        let text = std::fs::read_to_string(&self.status).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    }

    fn until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        eventually(what, WAIT, || {
            let s = self.seen()?;
            if done(&s) { Ok(s) } else { Err(s.to_string()) }
        })
    }

    /// Waits until `color` answers steadily: the last answer is it, and `n` more have come.
    fn answered_by(&self, color: &str, n: u64) {
        let before = self
            .seen()
            .ok()
            .and_then(|s| s["bodies"][color].as_u64())
            .unwrap_or(0);
        self.until(&format!("traffic answered by {color}"), |s| {
            s["last"] == color && s["bodies"][color].as_u64().unwrap_or(0) >= before + n
        });
    }

    /// Stops the clients; returns (failed, total, failures by reason).
    fn finish(self, scenario: &str) -> (u64, u64, BTreeMap<String, u64>) {
        std::fs::write(&self.stop, "").expect("stop load");
        let s = self.until("load stopped", |_| true);
        // The status file is rewritten until every client has stopped: wait for the final one.
        let s = eventually("final load status", WAIT, || {
            let now = self.seen()?;
            if now == s {
                Ok(now)
            } else {
                Err("still writing".into())
            }
        });
        let failed = s["failed"].as_u64().unwrap_or(0);
        let total = failed + s["ok"].as_u64().unwrap_or(0);
        let failures: BTreeMap<String, u64> = s["failures"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("CHURN {scenario}: failed/total = {failed}/{total} {failures:?}");
        (failed, total, failures)
    }
}

fn color_node(name: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
        "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": name}}}})
}

fn items(target: &str) -> Value {
    json!([
        {"meshName": "m"},
        color_node("blue"),
        color_node("red"),
        {"meshName": "m", "virtualNodeName": "front", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}},
        {"meshName": "m", "virtualRouterName": "vr",
         "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
        {"meshName": "m", "virtualServiceName": "color.local",
         "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
        {"meshName": "m", "virtualRouterName": "vr", "routeName": "rt", "spec": route(target)},
    ])
}

fn route(target: &str) -> Value {
    json!({"httpRoute": {"match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNode": target, "weight": 1}]}}})
}

/// Everything running; fields drop in order (processes before their namespaces).
struct Churn {
    agent: Agent,
    _procs: Vec<Proc>,
    front: Task,
    _blue: Task,
    _red: Task,
    _vpc: Vpc,
    proxy: FaultProxy,
    _moto: Moto,
    env: Vec<(String, String)>,
    api_type: String,
}

/// The mesh with the route on `blue`, front's Envoy on ADS variant `api_type`.
fn churn_mesh(work: &Workdir, vpc_id: u8, api_type: &str) -> Churn {
    let moto = Moto::start(work, free_port());
    let proxy = FaultProxy::start(moto.port);
    let mut vpc = Vpc::new(work, vpc_id);
    let front = vpc.task("front", 2);
    let blue = vpc.task("blue", 3);
    let red = vpc.task("red", 4);
    vpc.start_dns(work, &[(&blue.ip, "color.local")]);
    let mut procs = vec![
        blue.start_http_app(work, PORT, "blue"),
        red.start_http_app(work, PORT, "red"),
    ];
    for (name, task) in [("blue", &blue), ("red", &red)] {
        let svc = moto.create_service("ns", name);
        moto.register(
            &svc,
            &format!("i-{name}"),
            &[("AWS_INSTANCE_IPV4", &task.ip)],
        );
    }
    let mut env: Vec<(String, String)> = AWS_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("TRELLIS_CLOUDMAP_ENDPOINT", proxy.url.as_str()),
        ("TRELLIS_CLOUDMAP_POLL_INTERVAL_MS", "200"),
        ("TRELLIS_CLOUDMAP_REFRESH_INTERVAL_MS", "1000"),
        ("TRELLIS_CLOUDMAP_BACKOFF_MAX_MS", "2000"),
        ("TRELLIS_CLOUDMAP_LINGER_MS", "2000"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let agent = start_agent(work, &items("blue"), &env);
    let spec = TaskSpec {
        name: "front",
        node: "front",
        app: None,
    };
    procs.extend(start_tasks_with_envoy_env(
        work,
        &agent,
        "m",
        &[(&front, &spec)],
        &[("TRELLIS_XDS_API_TYPE", api_type)],
        &|_| {},
    ));
    Churn {
        agent,
        _procs: procs,
        front,
        _blue: blue,
        _red: red,
        _vpc: vpc,
        proxy,
        _moto: moto,
        env,
        api_type: api_type.to_string(),
    }
}

fn start_agent(work: &Workdir, items: &Value, env: &[(String, String)]) -> Agent {
    let file = resources_file(work, items);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start_with_env(work, Some(&file), &env)
}

impl Churn {
    fn set_route(&self, target: &str) {
        self.agent.appmesh(&[
            "update-route",
            "--mesh-name",
            "m",
            "--virtual-router-name",
            "vr",
            "--route-name",
            "rt",
            "--spec",
            &route(target).to_string(),
        ]);
    }

    /// Kills the agent (no goodbye to its streams) and starts it again with the route on
    /// `target`, as a daemon restarted onto a state that moved while it was down.
    fn restart_agent(&mut self, work: &Workdir, target: &str) {
        // A daemon restarts long after its Envoys connected: by then the agent has written the
        // cluster sets it sent them on SotW (at once, but not within the same instant). Delta
        // Envoys say what they hold themselves.
        let served = work.join("agent-data/xds-served.pb");
        if self.api_type == "GRPC" {
            eventually(
                "the agent recorded what it sent",
                WAIT,
                || match std::fs::metadata(&served) {
                    Ok(m) if m.len() > 0 => Ok(()),
                    other => Err(format!("{other:?}")),
                },
            );
        }
        run(Command::new("kill").args(["-9", &self.agent.proc.pid().to_string()]));
        eventually("agent gone", WAIT, || {
            self.agent
                .proc
                .exited()
                .map(|_| ())
                .ok_or("still running".to_string())
        });
        self.agent = start_agent(work, &items(target), &self.env);
    }

    /// Waits until front's Envoy is connected to the (new) agent.
    fn front_connected(&self) {
        eventually("front reconnected", WAIT, || {
            self.agent
                .xds_stream("mesh/m/virtualNode/front")
                .map(|_| ())
        });
    }
}

fn a_retargeted_route_loses_no_request(api_type: &str, vpc_id: u8) {
    let work = Workdir::new(&format!("churn-retarget-{}", api_type.to_ascii_lowercase()));
    let mesh = churn_mesh(&work, vpc_id, api_type);
    let load = Load::start(&work, &mesh.front, "color.local");
    load.answered_by("blue", 50);
    for _ in 0..3 {
        mesh.set_route("red");
        load.answered_by("red", 200);
        mesh.set_route("blue");
        load.answered_by("blue", 200);
    }
    let (failed, total, failures) = load.finish(&format!("retarget x6 {api_type}"));
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed across six retargets: {failures:?}"
    );
}

#[test]
fn state_of_the_world_a_retargeted_route_loses_no_request() {
    if !can_run_privileged("route retarget under load (SotW)") {
        return;
    }
    a_retargeted_route_loses_no_request("GRPC", 71);
}

#[test]
fn delta_a_retargeted_route_loses_no_request() {
    if !can_run_privileged("route retarget under load (delta)") {
        return;
    }
    a_retargeted_route_loses_no_request("DELTA_GRPC", 72);
}

fn an_agent_restarted_onto_a_changed_state_loses_no_request(api_type: &str, vpc_id: u8) {
    let work = Workdir::new(&format!("churn-restart-{}", api_type.to_ascii_lowercase()));
    let mut mesh = churn_mesh(&work, vpc_id, api_type);
    let load = Load::start(&work, &mesh.front, "color.local");
    load.answered_by("blue", 50);
    mesh.restart_agent(&work, "red");
    load.answered_by("red", 200);
    mesh.front_connected();
    let (failed, total, failures) = load.finish(&format!("restart onto red {api_type}"));
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed across the restart: {failures:?}"
    );
}

#[test]
fn state_of_the_world_an_agent_restarted_onto_a_changed_state_loses_no_request() {
    if !can_run_privileged("agent restart with changed state (SotW)") {
        return;
    }
    an_agent_restarted_onto_a_changed_state_loses_no_request("GRPC", 73);
}

#[test]
fn delta_an_agent_restarted_onto_a_changed_state_loses_no_request() {
    if !can_run_privileged("agent restart with changed state (delta)") {
        return;
    }
    an_agent_restarted_onto_a_changed_state_loses_no_request("DELTA_GRPC", 74);
}

#[test]
fn an_agent_restarted_while_cloud_map_throttles_loses_no_request() {
    if !can_run_privileged("agent restart while Cloud Map throttles") {
        return;
    }
    let work = Workdir::new("churn-throttled");
    let mut mesh = churn_mesh(&work, 75, "GRPC");
    let load = Load::start(&work, &mesh.front, "color.local");
    load.answered_by("blue", 50);
    mesh.proxy.set_throttling(true);
    mesh.restart_agent(&work, "blue");
    mesh.front_connected();
    // The restarted agent's first calls are throttled, and so are its retries.
    let throttled = mesh.proxy.throttled();
    eventually("the restarted agent's calls are throttled", WAIT, || {
        let n = mesh.proxy.throttled() - throttled;
        (n >= 6)
            .then_some(())
            .ok_or(format!("{n} throttled so far"))
    });
    load.answered_by("blue", 200);
    mesh.proxy.set_throttling(false);
    let requests = mesh.proxy.requests();
    eventually("Cloud Map answers again", WAIT, || {
        let n = mesh.proxy.requests() - requests;
        (n >= 4).then_some(()).ok_or(format!("{n} calls since"))
    });
    load.answered_by("blue", 200);
    let (failed, total, failures) = load.finish("restart while throttled");
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed across a restart with Cloud Map throttling: {failures:?}"
    );
}
