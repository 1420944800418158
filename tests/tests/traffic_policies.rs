//! Virtual-node policies proven on real Envoy traffic in task namespaces: a listener timeout
//! answering 504, a health check marking an endpoint unhealthy on the caller, outlier detection
//! ejecting a failing endpoint, TLS and mTLS between two nodes, access logs written; and every
//! policy accepted by a real Envoy.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{
    Behaviour, Pki, envoy_accepts, file_has, health_flags, http_status, start_app,
    start_meshed_with, writable_dir,
};
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{ADMIN_PORT, resources_file};
use trellis_tests::sds::{SdsSecret, SdsServer};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually, run};

const PORT: u16 = 8080;

fn node(name: &str, listener: Value, extra: Value) -> Value {
    let mut spec = json!({"listeners": [listener],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}});
    merge(&mut spec, extra);
    json!({"meshName": "m", "virtualNodeName": name, "spec": spec})
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(o), Value::Object(e)) = (into.as_object_mut(), extra) {
        o.extend(e);
    }
}

fn http_listener(extra: Value) -> Value {
    let mut l = json!({"portMapping": {"port": PORT, "protocol": "http"}});
    merge(&mut l, extra);
    l
}

fn caller(name: &str, services: &[&str], extra: Value) -> Value {
    let backends: Vec<Value> = services
        .iter()
        .map(|s| json!({"virtualService": {"virtualServiceName": s}}))
        .collect();
    let mut spec = json!({"backends": backends});
    merge(&mut spec, extra);
    json!({"meshName": "m", "virtualNodeName": name, "spec": spec})
}

fn service(name: &str, node: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": name,
        "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
}

/// DNS lines (`IP`, `NAMES`) for the tasks, once their addresses are known.
type Hosts<'a> = &'a dyn Fn(&[Task]) -> Vec<(String, String)>;

/// Everything a test runs; field order is drop order (processes before namespaces).
struct Running {
    _procs: Vec<Proc>,
    vpc: Vpc,
    _agent: Agent,
}

/// Starts the agent with `items`, a VPC with `tasks` (name, host byte), DNS `hosts`, then meshes
/// each (task, node, app) in order, Envoys with `envoy_env` added; callers (no app) go last.
fn start(
    work: &Workdir,
    id: u8,
    items: &Value,
    tasks: &[(&str, u8)],
    hosts: Hosts<'_>,
    meshed: &[(usize, &str, Option<Behaviour<'_>>)],
    envoy_env: &[(&str, &str)],
) -> (Running, Vec<Task>) {
    let agent = Agent::start(work, Some(&resources_file(work, items)));
    let mut vpc = Vpc::new(work, id);
    let ts: Vec<Task> = tasks.iter().map(|(n, h)| vpc.task(n, *h)).collect();
    let lines = hosts(&ts);
    let refs: Vec<(&str, &str)> = lines
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    vpc.start_dns(work, &refs);
    let mut procs = Vec::new();
    for (i, node, app) in meshed {
        let ports: &[u16] = if app.is_some() { &[PORT] } else { &[] };
        procs.push(start_meshed_with(
            work, &agent, "m", &ts[*i], node, ports, envoy_env,
        ));
        if let Some(b) = app {
            procs.push(start_app(work, &ts[*i], PORT, b));
        }
    }
    (
        Running {
            _procs: procs,
            vpc,
            _agent: agent,
        },
        ts,
    )
}

/// A GET from the VPC itself (outside every task): reaches a task's ingress like an unmeshed
/// client or a load balancer would.
fn from_vpc(vpc: &Vpc, url: &str) -> (u16, String) {
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        &vpc.ns,
        "curl",
        "-sS",
        "-m",
        "10",
        "-w",
        "\n%{http_code}",
        url,
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Resolves `back.local` (and back's DNS name) to the first task, `back`.
fn back_hosts(t: &[Task]) -> Vec<(String, String)> {
    vec![(t[0].ip.clone(), "back.local back.trellis.test".into())]
}

/// Mesh `m` where `front` calls `back.local`, served by `back`'s HTTP listener with
/// `listener_policy` and node fields `extra`.
fn front_calls_back(listener_policy: Value, extra: Value) -> Value {
    json!([
        {"meshName": "m"},
        node("back", http_listener(listener_policy), extra),
        service("back.local", "back"),
        caller("front", &["back.local"], json!({})),
    ])
}

/// `start` with the first of `tasks` as `back` (its app answering `back_says`, reached as
/// `back.local`) and the rest as callers without an app, each meshed as the node of its name.
fn start_back_and_callers(
    work: &Workdir,
    id: u8,
    items: &Value,
    tasks: &[(&str, u8)],
    back_says: &str,
    envoy_env: &[(&str, &str)],
) -> (Running, Vec<Task>) {
    let meshed: Vec<(usize, &str, Option<Behaviour<'_>>)> = tasks
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (i, *name, (i == 0).then(|| Behaviour::ok(back_says))))
        .collect();
    start(work, id, items, tasks, &back_hosts, &meshed, envoy_env)
}

/// Polls until `front` gets `body` from `url` on back over TLS, then checks both Envoys counted a
/// handshake: front's on back's egress cluster, back's on its ingress listener.
fn assert_front_reaches_back_over_tls(
    front: &Task,
    back: &Task,
    url: &str,
    what: &str,
    body: &str,
) {
    let got = eventually(what, Duration::from_secs(30), || front.http_get(None, url));
    assert_eq!(got, body);
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back_http_8080.ssl.handshake"
        ) >= 1
    );
    assert!(back.envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.handshake") >= 1);
}

#[test]
fn a_listener_per_request_timeout_answers_504_when_the_app_is_slower() {
    if !can_run_privileged("listener timeout") {
        return;
    }
    let work = Workdir::new("pol-timeout");
    let items = front_calls_back(
        json!({"timeout": {"http": {"perRequest": {"unit": "s", "value": 1}}}}),
        json!({}),
    );
    let (env, t) =
        start_back_and_callers(&work, 31, &items, &[("back", 3), ("front", 2)], "back", &[]);
    let (back, front) = (&t[0], &t[1]);
    let url = |p: &str| format!("http://back.local:{PORT}{p}");
    eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, &url("/"))
    });
    assert_eq!(
        http_status(front, None, &url("/sleep/0.2")),
        (200, "slept".into()),
        "faster than the timeout"
    );
    let (code, body) = http_status(front, None, &url("/sleep/3"));
    assert_eq!(
        (code, body.as_str()),
        (504, "upstream request timeout"),
        "caller side"
    );

    // Straight at back's ingress (an unmeshed client): back's own Envoy times out.
    let (code, body) = from_vpc(&env.vpc, &format!("http://{}:{PORT}/sleep/3", back.ip));
    assert_eq!((code, body.as_str()), (504, "upstream request timeout"));
    assert!(
        back.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_ingress_m_back_http_8080.upstream_rq_timeout"
        ) >= 1
    );
    drop(env);
}

/// A node with DNS ENDPOINTS discovery answered by two tasks: `good` and `bad`.
fn two_endpoints(listener_policy: Value) -> Value {
    let mut n = node("pair", http_listener(listener_policy), json!({}));
    n["spec"]["serviceDiscovery"]["dns"]["responseType"] = json!("ENDPOINTS");
    json!([
        {"meshName": "m"},
        n,
        service("pair.local", "pair"),
        caller("front", &["pair.local"], json!({})),
    ])
}

const PAIR_CLUSTER: &str = "cds_egress_m_pair_http_8080";

fn pair_hosts(t: &[Task]) -> Vec<(String, String)> {
    vec![
        (t[0].ip.clone(), "pair.trellis.test pair.local".into()),
        (t[1].ip.clone(), "pair.trellis.test".into()),
    ]
}

fn bodies(front: &Task, n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|_| http_status(front, None, &format!("http://pair.local:{PORT}/")))
        .collect()
}

/// `start` for the pair: tasks `good` (its app answering "good") and `bad` (answering as `bad`
/// says) both serve `pair`, and `front` calls it; on host bytes `hosts`.
fn start_good_bad_and_front(
    work: &Workdir,
    id: u8,
    items: &Value,
    bad: Behaviour<'_>,
    hosts: [u8; 3],
) -> (Running, Vec<Task>) {
    start(
        work,
        id,
        items,
        &[("good", hosts[0]), ("bad", hosts[1]), ("front", hosts[2])],
        &pair_hosts,
        &[
            (0, "pair", Some(Behaviour::ok("good"))),
            (1, "pair", Some(bad)),
            (2, "front", None),
        ],
        &[],
    )
}

/// Asserts that 20 requests from `front` to `pair.local` all get `good`'s answer.
fn assert_only_good_serves(front: &Task, why: &str) {
    let answers = bodies(front, 20);
    assert!(
        answers.iter().all(|(c, b)| *c == 200 && b == "good"),
        "{why}: {answers:?}"
    );
}

#[test]
fn a_listener_health_check_marks_the_failing_endpoint_unhealthy_on_the_caller() {
    if !can_run_privileged("health check") {
        return;
    }
    let work = Workdir::new("pol-health");
    let items = two_endpoints(
        json!({"healthCheck": {"protocol": "http", "path": "/health",
        "healthyThreshold": 2, "unhealthyThreshold": 2, "intervalMillis": 5000, "timeoutMillis": 2000}}),
    );
    let sick = Behaviour {
        health_status: 503,
        ..Behaviour::ok("bad")
    };
    let (env, t) = start_good_bad_and_front(&work, 32, &items, sick, [4, 5, 6]);
    let (good, bad, front) = (&t[0], &t[1], &t[2]);
    let (good_host, bad_host) = (format!("{}:{PORT}", good.ip), format!("{}:{PORT}", bad.ip));
    let flags = eventually(
        "front's health checks pass good and fail bad",
        Duration::from_secs(40),
        || {
            let flags = health_flags(front, ADMIN_PORT, PAIR_CLUSTER);
            let of = |h: &str| flags.iter().find(|(a, _)| a == h).map(|(_, f)| f.clone());
            match (of(&good_host), of(&bad_host)) {
                (Some(g), Some(b)) if g == "healthy" && b.contains("/failed_active_hc") => {
                    Ok(flags)
                }
                _ => Err(format!("{flags:?}")),
            }
        },
    );
    eprintln!("health flags: {flags:?}");
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            &format!("cluster.{PAIR_CLUSTER}.health_check.failure")
        ) >= 1
    );
    // The check itself crossed bad's Envoy: its ingress saw the /health requests.
    assert!(bad.envoy_stat(ADMIN_PORT, "http.ingress.http.8080.downstream_rq_5xx") >= 1);
    assert_only_good_serves(front, "only the healthy endpoint serves");
    drop(env);
}

#[test]
fn outlier_detection_ejects_the_endpoint_returning_server_errors() {
    if !can_run_privileged("outlier detection") {
        return;
    }
    let work = Workdir::new("pol-outlier");
    let items = two_endpoints(json!({"outlierDetection": {"maxServerErrors": 2,
        "interval": {"unit": "s", "value": 1}, "baseEjectionDuration": {"unit": "s", "value": 60},
        "maxEjectionPercent": 50}}));
    let failing = Behaviour {
        status: 500,
        ..Behaviour::ok("bad")
    };
    let (env, t) = start_good_bad_and_front(&work, 33, &items, failing, [7, 8, 9]);
    let (bad, front) = (&t[1], &t[2]);
    eventually("front reaches pair", Duration::from_secs(20), || {
        front.http_get(None, &format!("http://pair.local:{PORT}/health"))
    });
    let bad_host = format!("{}:{PORT}", bad.ip);
    eventually(
        "bad is ejected after its server errors",
        Duration::from_secs(20),
        || {
            let answers = bodies(front, 5);
            let ejected = front.envoy_stat(
                ADMIN_PORT,
                &format!("cluster.{PAIR_CLUSTER}.outlier_detection.ejections_enforced_total"),
            );
            let flags = health_flags(front, ADMIN_PORT, PAIR_CLUSTER);
            let out = flags
                .iter()
                .any(|(h, f)| *h == bad_host && f.contains("/failed_outlier_check"));
            if ejected >= 1 && out {
                Ok(())
            } else {
                Err(format!(
                    "ejections {ejected}, flags {flags:?}, answers {answers:?}"
                ))
            }
        },
    );
    assert_only_good_serves(front, "the ejected endpoint gets nothing");
    drop(env);
}

#[test]
fn tls_and_mtls_between_two_nodes_with_certificates_made_here() {
    if !can_run_privileged("tls") {
        return;
    }
    let work = Workdir::new("pol-tls");
    let pki = Pki::new(&work, "mesh");
    let (back_chain, back_key) = pki.issue("back", &["back.local"]);
    let (front_chain, front_key) = pki.issue("front", &["front.local"]);
    let ca = pki.ca();
    let back_listener = http_listener(json!({"tls": {"mode": "STRICT",
        "certificate": {"file": {"certificateChain": back_chain, "privateKey": back_key}},
        "validation": {"trust": {"file": {"certificateChain": ca}},
            "subjectAlternativeNames": {"match": {"exact": ["front.local"]}}}}}));
    let trust = json!({"trust": {"file": {"certificateChain": ca}},
        "subjectAlternativeNames": {"match": {"exact": ["back.local"]}}});
    let items = json!([
        {"meshName": "m"},
        node("back", back_listener, json!({})),
        service("back.local", "back"),
        // mTLS: front verifies back and presents its own certificate.
        caller("front", &["back.local"], json!({"backendDefaults": {"clientPolicy": {"tls": {
            "certificate": {"file": {"certificateChain": front_chain, "privateKey": front_key}},
            "validation": trust}}}})),
        // TLS without a client certificate: back's listener validation turns it away.
        caller("anon", &["back.local"], json!({"backendDefaults": {"clientPolicy": {"tls": {"validation": trust}}}})),
    ]);
    let (env, t) = start_back_and_callers(
        &work,
        34,
        &items,
        &[("back", 10), ("front", 11), ("anon", 12)],
        "back over tls",
        &[],
    );
    let (back, front, anon) = (&t[0], &t[1], &t[2]);
    let url = format!("http://back.local:{PORT}/");
    assert_front_reaches_back_over_tls(
        front,
        back,
        &url,
        "front reaches back over mTLS",
        "back over tls",
    );

    let (code, _) = http_status(anon, None, &url);
    assert_eq!(code, 503, "no client certificate, no connection");
    assert!(
        back.envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.fail_verify_no_cert")
            + back.envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.connection_error")
            >= 1
    );
    // Plaintext straight at the STRICT port (Envoy's uid skips the egress redirect) is refused.
    let (code, _) = http_status(front, Some("1337"), &url);
    assert_eq!(code, 0, "a STRICT listener never answers plaintext");
    drop(env);
}

#[test]
fn access_logs_are_written_in_the_configured_formats() {
    if !can_run_privileged("access logs") {
        return;
    }
    let work = Workdir::new("pol-logs");
    let logs = writable_dir(&work, "logs");
    let (back_log, front_log) = (logs.join("back.log"), logs.join("front.log"));
    let items = json!([
        {"meshName": "m"},
        node("back", http_listener(json!({})), json!({"logging": {"accessLog": {"file": {
            "path": back_log, "format": {"json": [
                {"key": "path", "value": "%REQ(:PATH)%"}, {"key": "code", "value": "%RESPONSE_CODE%"}]}}}}})),
        service("back.local", "back"),
        caller("front", &["back.local"], json!({"logging": {"accessLog": {"file": {
            "path": front_log, "format": {"text": "front %REQ(:PATH)% %RESPONSE_CODE%"}}}}})),
    ]);
    let (env, t) = start_back_and_callers(
        &work,
        35,
        &items,
        &[("back", 13), ("front", 14)],
        "back",
        &[],
    );
    let front = &t[1];
    eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, &format!("http://back.local:{PORT}/logged"))
    });
    let text = eventually("front's text access log", Duration::from_secs(10), || {
        file_has(&front_log, "front /logged 200")
    });
    assert!(text.ends_with('\n'), "one line per request: {text:?}");
    let json_text = eventually("back's JSON access log", Duration::from_secs(10), || {
        file_has(&back_log, "/logged")
    });
    let line = json_text
        .lines()
        .find(|l| l.contains("/logged"))
        .unwrap_or_default();
    let entry: Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(entry["path"], "/logged");
    assert_eq!(entry["code"], 200);
    drop(env);
}

/// SDS as App Mesh used it with SPIRE: every Envoy fetches its certificate and the trust bundle
/// from a local SDS server over the Unix socket `APPMESH_SDS_SOCKET_PATH`, and matches the peer's
/// SANs against the bundle-verified certificate.
#[test]
fn sds_certificates_and_trust_give_mtls_and_a_wrong_san_is_refused() {
    if !can_run_privileged("sds") {
        return;
    }
    let work = Workdir::new("pol-sds");
    let pki = Pki::new(&work, "spire");
    let (back_chain, back_key) = pki.issue("back", &["back.local"]);
    let (front_chain, front_key) = pki.issue("front", &["front.local"]);
    const BUNDLE: &str = "spiffe://trellis.test";
    let sds = SdsServer::start(
        &work,
        BTreeMap::from([
            (
                "spiffe://trellis.test/back".to_string(),
                SdsSecret::cert(&back_chain, &back_key),
            ),
            (
                "spiffe://trellis.test/front".to_string(),
                SdsSecret::cert(&front_chain, &front_key),
            ),
            (BUNDLE.to_string(), SdsSecret::trust(&pki.ca())),
        ]),
    );
    let socket = sds.socket.display().to_string();
    let trust = |san: &str| {
        json!({"trust": {"sds": {"secretName": BUNDLE}},
            "subjectAlternativeNames": {"match": {"exact": [san]}}})
    };
    let client = |san: &str| {
        json!({"backendDefaults": {"clientPolicy": {"tls": {
            "certificate": {"sds": {"secretName": "spiffe://trellis.test/front"}},
            "validation": trust(san)}}}})
    };
    let items = json!([
        {"meshName": "m"},
        node("back", http_listener(json!({"tls": {"mode": "STRICT",
            "certificate": {"sds": {"secretName": "spiffe://trellis.test/back"}},
            "validation": trust("front.local")}})), json!({})),
        service("back.local", "back"),
        caller("front", &["back.local"], client("back.local")),
        // Expects another name than back's certificate carries.
        caller("wrong", &["back.local"], client("other.local")),
    ]);
    let (env, t) = start_back_and_callers(
        &work,
        36,
        &items,
        &[("back", 15), ("front", 16), ("wrong", 17)],
        "back over sds mtls",
        &[("APPMESH_SDS_SOCKET_PATH", &socket)],
    );
    let (back, front, wrong) = (&t[0], &t[1], &t[2]);
    let url = format!("http://back.local:{PORT}/");
    assert_front_reaches_back_over_tls(
        front,
        back,
        &url,
        "front reaches back over mTLS with SDS secrets",
        "back over sds mtls",
    );

    let (code, _) = http_status(wrong, None, &url);
    assert_eq!(code, 503, "back's certificate does not name other.local");
    assert!(
        wrong.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back_http_8080.ssl.fail_verify_san"
        ) >= 1
    );
    // Plaintext straight at the STRICT port is refused.
    assert_eq!(http_status(front, Some("1337"), &url).0, 0);
    let asked = sds.requested();
    for name in [
        BUNDLE,
        "spiffe://trellis.test/back",
        "spiffe://trellis.test/front",
    ] {
        assert!(
            asked.iter().any(|n| n == name),
            "{name} not asked: {asked:?}"
        );
    }
    drop(env);
}

/// The listener's connection pool is back's circuit breaker: one connection and one queued
/// request; concurrent slow requests beyond that overflow with 503s, counted by back's Envoy.
#[test]
fn a_listener_connection_pool_overflows_concurrent_requests_with_503() {
    if !can_run_privileged("connection pool") {
        return;
    }
    let work = Workdir::new("pol-pool");
    let items = front_calls_back(
        json!({"connectionPool": {"http": {"maxConnections": 1, "maxPendingRequests": 1}}}),
        json!({}),
    );
    let (env, t) = start_back_and_callers(
        &work,
        37,
        &items,
        &[("back", 18), ("front", 19)],
        "back",
        &[],
    );
    let (back, front) = (&t[0], &t[1]);
    let url = format!("http://back.local:{PORT}");
    eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, &format!("{url}/"))
    });
    // Six requests at once, each holding the one connection for 4 s.
    let script = format!(
        "for i in 1 2 3 4 5 6; do curl -s -o /dev/null -m 20 -w '%{{http_code}}\\n' {url}/sleep/4 & done; wait"
    );
    let out = run(&mut front.cmd(&["sh", "-c", &script]));
    let codes: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    eprintln!("status codes: {codes:?}");
    assert_eq!(codes.len(), 6, "{codes:?}");
    let ok = codes.iter().filter(|c| **c == 200).count();
    let overflow = codes.iter().filter(|c| **c == 503).count();
    assert!(ok >= 1, "the admitted requests are served: {codes:?}");
    assert!(overflow >= 1, "the rest overflow: {codes:?}");
    assert_eq!(ok + overflow, 6, "{codes:?}");
    let cluster = "cluster.cds_ingress_m_back_http_8080";
    let pending_overflow = back.envoy_stat(
        ADMIN_PORT,
        &format!("{cluster}.upstream_rq_pending_overflow"),
    );
    assert!(pending_overflow >= 1, "back's breaker tripped");
    // Front's Envoy retried each overflow 503 twice (App Mesh's default retry policy applies to
    // a node-provided service), and back was still full each time.
    assert_eq!(
        pending_overflow as usize,
        3 * overflow,
        "every 503 is three of back's overflows"
    );
    drop(env);
}

/// Every policy at once, served to real Envoys that must ACK it all (no root needed).
#[test]
fn every_virtual_node_policy_is_accepted_by_real_envoy() {
    let work = Workdir::new("pol-accept");
    let pki = Pki::new(&work, "accept");
    let (chain, key) = pki.issue("svc", &["svc.local", "front.local"]);
    let ca = pki.ca();
    let cert = json!({"file": {"certificateChain": chain, "privateKey": key}});
    let trust = json!({"trust": {"file": {"certificateChain": ca}},
        "subjectAlternativeNames": {"match": {"exact": ["svc.local"]}}});
    let logs = writable_dir(&work, "logs");
    let log = |name: &str, format: Value| json!({"accessLog": {"file": {"path": logs.join(name), "format": format}}});
    let hc = |protocol: &str| {
        json!({"protocol": protocol, "path": "/health", "healthyThreshold": 2, "unhealthyThreshold": 3,
            "intervalMillis": 5000, "timeoutMillis": 2000, "port": 8080})
    };
    let outlier = json!({"maxServerErrors": 5, "interval": {"unit": "s", "value": 10},
        "baseEjectionDuration": {"unit": "s", "value": 30}, "maxEjectionPercent": 20});
    let items = json!([
        {"meshName": "m", "spec": {"egressFilter": {"type": "ALLOW_ALL"},
            "serviceDiscovery": {"ipPreference": "IPv6_PREFERRED"}}},
        node("web", http_listener(json!({"tls": {"mode": "STRICT", "certificate": cert,
                "validation": {"trust": {"file": {"certificateChain": ca}},
                    "subjectAlternativeNames": {"match": {"exact": ["front.local"]}}}},
            "healthCheck": hc("http"), "outlierDetection": outlier,
            "connectionPool": {"http": {"maxConnections": 50, "maxPendingRequests": 10}},
            "timeout": {"http": {"perRequest": {"unit": "s", "value": 30}, "idle": {"unit": "s", "value": 60}}}})),
            json!({"logging": log("web.log", json!({"json": [{"key": "code", "value": "%RESPONSE_CODE%"}]}))})),
        node("rpc", json!({"portMapping": {"port": 9090, "protocol": "grpc"},
            "tls": {"mode": "PERMISSIVE", "certificate": cert},
            "healthCheck": {"protocol": "grpc", "healthyThreshold": 2, "unhealthyThreshold": 2,
                "intervalMillis": 5000, "timeoutMillis": 2000},
            "connectionPool": {"grpc": {"maxRequests": 100}},
            "timeout": {"grpc": {"perRequest": {"unit": "s", "value": 5}}}}), json!({})),
        node("h2", json!({"portMapping": {"port": 8443, "protocol": "http2"},
            "healthCheck": hc("http2"), "connectionPool": {"http2": {"maxRequests": 10}}}), json!({})),
        node("db", json!({"portMapping": {"port": 5432, "protocol": "tcp"},
            "tls": {"mode": "PERMISSIVE", "certificate": cert},
            "healthCheck": {"protocol": "tcp", "healthyThreshold": 2, "unhealthyThreshold": 2,
                "intervalMillis": 5000, "timeoutMillis": 2000},
            "connectionPool": {"tcp": {"maxConnections": 5}},
            "timeout": {"tcp": {"idle": {"unit": "s", "value": 600}}}}),
            json!({"logging": log("db.log", json!({"text": "%DOWNSTREAM_REMOTE_ADDRESS%"}))})),
        service("web.local", "web"), service("rpc.local", "rpc"), service("h2.local", "h2"), service("db.local", "db"),
        caller("front", &["web.local", "rpc.local", "h2.local", "db.local"], json!({
            "logging": log("front.log", json!(null)),
            "backendDefaults": {"clientPolicy": {"tls": {"validation": trust, "ports": [8080, 9090]}}},
            "backends": [
                {"virtualService": {"virtualServiceName": "web.local", "clientPolicy": {"tls": {
                    "certificate": cert, "validation": trust}}}},
                {"virtualService": {"virtualServiceName": "rpc.local"}},
                {"virtualService": {"virtualServiceName": "h2.local"}},
                {"virtualService": {"virtualServiceName": "db.local"}}]})),
    ]);
    let agent = Agent::start(&work, Some(&resources_file(&work, &items)));
    for n in ["front", "web", "rpc", "db"] {
        let dump = envoy_accepts(&work, &agent, &format!("mesh/m/virtualNode/{n}"));
        assert!(dump["configs"].is_array(), "{n}: no config dump");
    }
    assert!(Path::new(&chain).exists());
}

/// `pair` (two endpoints) behind router `pair-router`: `/` by a route without a retry policy
/// (App Mesh's default, carried by the virtual host), `/once` by one that allows no retry.
fn routed_pair() -> Value {
    let mut n = node("pair", http_listener(json!({})), json!({}));
    n["spec"]["serviceDiscovery"]["dns"]["responseType"] = json!("ENDPOINTS");
    let route = |name: &str, spec: Value| json!({"meshName": "m", "virtualRouterName": "pair-router", "routeName": name, "spec": spec});
    let target = json!({"weightedTargets": [{"virtualNode": "pair", "weight": 1}]});
    json!([
        {"meshName": "m"},
        n,
        {"meshName": "m", "virtualRouterName": "pair-router",
         "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
        route("default", json!({"httpRoute": {"match": {"prefix": "/"}, "action": target}})),
        route("once", json!({"httpRoute": {"match": {"prefix": "/once"}, "action": target,
            "retryPolicy": {"maxRetries": 0, "perRetryTimeout": {"unit": "s", "value": 5},
                "httpRetryEvents": ["server-error"]}}})),
        {"meshName": "m", "virtualServiceName": "pair.local",
         "spec": {"provider": {"virtualRouter": {"virtualRouterName": "pair-router"}}}},
        caller("front", &["pair.local"], json!({})),
    ])
}

#[test]
fn default_retries_turn_one_endpoints_503s_into_200s_and_a_route_without_retries_shows_them() {
    if !can_run_privileged("retries") {
        return;
    }
    let work = Workdir::new("pol-retry");
    let unavailable = Behaviour {
        status: 503,
        ..Behaviour::ok("bad")
    };
    let (env, t) = start_good_bad_and_front(&work, 39, &routed_pair(), unavailable, [20, 21, 22]);
    let front = &t[2];
    let get = |path: &str| http_status(front, None, &format!("http://pair.local:{PORT}{path}"));
    eventually(
        "front reaches good",
        Duration::from_secs(20),
        || match get("/") {
            (200, b) if b == "good" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let retries = || {
        front.envoy_stat(
            ADMIN_PORT,
            &format!("cluster.{PAIR_CLUSTER}.upstream_rq_retry"),
        )
    };
    let before = retries();
    let answers: Vec<(u16, String)> = (0..30).map(|_| get("/")).collect();
    assert!(
        answers.iter().all(|(c, b)| *c == 200 && b == "good"),
        "every 503 from bad is retried on good: {answers:?}"
    );
    assert!(
        retries() > before,
        "the 200s came through retries, not because bad was never picked"
    );
    // maxRetries 0 on its own route: bad's 503s reach the caller.
    let once: Vec<u16> = (0..30).map(|_| get("/once").0).collect();
    assert!(once.contains(&503), "no retry on /once: {once:?}");
    assert!(once.contains(&200), "good still answers /once: {once:?}");
    drop(env);
}

#[test]
fn a_route_per_request_timeout_answers_504_on_its_route_only() {
    if !can_run_privileged("route timeout") {
        return;
    }
    let work = Workdir::new("pol-route-timeout");
    let route = |name: &str, spec: Value| json!({"meshName": "m", "virtualRouterName": "back-router", "routeName": name, "spec": spec});
    let target = json!({"weightedTargets": [{"virtualNode": "back", "weight": 1}]});
    let items = json!([
        {"meshName": "m"},
        node("back", http_listener(json!({})), json!({})),
        {"meshName": "m", "virtualRouterName": "back-router",
         "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
        route("patient", json!({"httpRoute": {"match": {"prefix": "/"}, "action": target}})),
        route("hasty", json!({"httpRoute": {"match": {"prefix": "/sleep/3"}, "action": target,
            "timeout": {"perRequest": {"unit": "ms", "value": 1000}}}})),
        {"meshName": "m", "virtualServiceName": "back.local",
         "spec": {"provider": {"virtualRouter": {"virtualRouterName": "back-router"}}}},
        caller("front", &["back.local"], json!({})),
    ]);
    let (env, t) = start_back_and_callers(
        &work,
        40,
        &items,
        &[("back", 23), ("front", 24)],
        "back",
        &[],
    );
    let front = &t[1];
    let url = |p: &str| format!("http://back.local:{PORT}{p}");
    eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, &url("/"))
    });
    assert_eq!(
        http_status(front, None, &url("/sleep/2")),
        (200, "slept".into()),
        "another route keeps the 15 s default"
    );
    assert_eq!(
        http_status(front, None, &url("/sleep/3")),
        (504, "upstream request timeout".into()),
        "the route's 1 s, not the 15 s default"
    );
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back_http_8080.upstream_rq_timeout"
        ) >= 1
    );
    drop(env);
}
