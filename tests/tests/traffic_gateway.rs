//! Virtual gateways proven on real Envoy traffic: a client outside the mesh calls the gateway's
//! listener; gateway routes pick a virtual service by path or hostname, rewrite prefix, path and
//! Host as App Mesh did, and reach meshed echo apps directly (node-provided services) or through
//! a virtual router's routes (router-provided service). A gateway listener's policies: TLS from
//! SDS, its health path, its connection pool, backend-defaults client TLS and its access log.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{Behaviour, Pki, file_has, start_app, writable_dir};
use trellis_tests::mesh::{
    Agent, Task, Vpc, rewrite, run_route_manager, start_envoy, start_gateway_envoy,
    start_proxy_envoy_with,
};
use trellis_tests::scenario::{app_taskdef, resources_file};
use trellis_tests::sds::{SdsSecret, SdsServer};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

const GATEWAY_PORT: u16 = 8088;
const GATEWAY_ADMIN_PORT: u16 = 9901;
const APP_PORT: u16 = 8080;
/// A second gateway listener, PERMISSIVE.
const PERMISSIVE_PORT: u16 = 8089;

fn echo_node(name: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": APP_PORT, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
}

fn node_service(service: &str, node: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": service,
           "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
}

fn gateway_route(name: &str, spec: Value) -> Value {
    json!({"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": name, "spec": spec})
}

fn to(service: &str) -> Value {
    json!({"virtualService": {"virtualServiceName": service}})
}

/// An app answering every request with `NAME METHOD PATH HOST`: what reached it, after the
/// gateway's rewrites (the path as sent: `self.path` would hide a leading `//`).
fn start_echo_app(work: &Workdir, task: &Task, name: &str) -> Proc {
    let script = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def answer(self):\n\
         \x20       path = self.raw_requestline.split()[1].decode()\n\
         \x20       b = ('{name} %s %s %s' % (self.command, path, self.headers.get('Host'))).encode()\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Length', str(len(b)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(b)\n\
         \x20   do_GET = do_POST = do_PUT = do_DELETE = answer\n\
         \x20   def log_message(self, *a):\n\
         \x20       pass\n\
         http.server.ThreadingHTTPServer(('0.0.0.0', {APP_PORT}), H).serve_forever()\n"
    );
    let path = work.join(&format!("echo-{name}.py"));
    fs::write(&path, script).expect("write echo app");
    let path_s = path.display().to_string();
    let proc = Proc::spawn(
        &format!("echo app {name}"),
        &mut task.cmd(&["/usr/bin/python3", &path_s]),
        work.join(&format!("echo-{name}.log")),
    );
    eventually("echo app listening", Duration::from_secs(10), || {
        task.http_get(None, &format!("http://127.0.0.1:{APP_PORT}/"))
            .map(|_| ())
    });
    proc
}

/// One request from `client` to the gateway: (status, body).
fn call(client: &Task, gateway_ip: &str, method: &str, host: &str, path: &str) -> (u16, String) {
    let url = format!("http://{gateway_ip}:{GATEWAY_PORT}{path}");
    let out = check(&mut client.cmd(&[
        "curl",
        "-sS",
        "-m",
        "5",
        "-X",
        method,
        "-H",
        &format!("Host: {host}"),
        "-w",
        "\n%{http_code}",
        &url,
    ]));
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn gateway_routes_rewrite_prefix_path_and_host_and_reach_node_and_router_provided_services() {
    if !can_run_privileged("gateway traffic") {
        return;
    }
    let work = Workdir::new("gateway");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            echo_node("a-vn"),
            echo_node("b-vn"),
            echo_node("c-vn"),
            node_service("a.local", "a-vn"),
            node_service("b.local", "b-vn"),
            {"meshName": "m", "virtualRouterName": "vr",
             "spec": {"listeners": [{"portMapping": {"port": APP_PORT, "protocol": "http"}}]}},
            {"meshName": "m", "virtualServiceName": "r.local",
             "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "v2", "spec": {"httpRoute": {
                "match": {"prefix": "/v2"},
                "action": {"weightedTargets": [{"virtualNode": "c-vn", "weight": 1}]}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "rest", "spec": {"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [{"virtualNode": "a-vn", "weight": 1}]}}}},
            {"meshName": "m", "virtualGatewayName": "gw", "spec": {
                "listeners": [{"portMapping": {"port": GATEWAY_PORT, "protocol": "http"}}]}},
            gateway_route("to-a", json!({"httpRoute": {
                "match": {"prefix": "/a/"}, "action": {"target": to("a.local")}}})),
            gateway_route("renamed", json!({"httpRoute": {
                "match": {"prefix": "/old/"},
                "action": {"target": to("a.local"), "rewrite": {"prefix": {"value": "/new/"}}}}})),
            gateway_route("by-host", json!({"httpRoute": {
                "match": {"prefix": "/", "hostname": {"exact": "b.example.com"}},
                "action": {"target": to("b.local"),
                           "rewrite": {"hostname": {"defaultTargetHostname": "DISABLED"}}}}})),
            gateway_route("health", json!({"httpRoute": {
                "match": {"path": {"exact": "/health"}},
                "action": {"target": to("b.local"), "rewrite": {"path": {"exact": "/status"}}}}})),
            gateway_route("to-router", json!({"httpRoute": {
                "match": {"prefix": "/r/"}, "action": {"target": to("r.local")}}})),
            gateway_route("chapter", json!({"httpRoute": {
                "match": {"prefix": "/chapter"}, "action": {"target": to("b.local")}}}))
        ]),
    );
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 23);
    let gw = vpc.task("gw", 2);
    let client = vpc.task("client", 3);
    let backends: Vec<(&str, Task)> = ["a", "b", "c"]
        .into_iter()
        .zip(4u8..)
        .map(|(name, host)| (name, vpc.task(name, host)))
        .collect();
    let hosts: Vec<(String, String)> = backends
        .iter()
        .map(|(name, t)| (t.ip.clone(), format!("{name}-vn.trellis.test {name}.local")))
        .collect();
    let hosts: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(ip, names)| (ip.as_str(), names.as_str()))
        .collect();
    vpc.start_dns(&work, &hosts);

    // Backends: meshed as trellis-rewrite meshes them (route manager, Envoy HEALTHY, then app).
    let mut procs = Vec::new();
    for (name, task) in &backends {
        let node = format!("{name}-vn");
        let def = rewrite(
            &work,
            &app_taskdef(name, &[APP_PORT]),
            "m",
            &node,
            &agent.socket_dir,
        );
        run_route_manager(task, &def);
        procs.push(start_envoy(&work, task, &def));
        procs.push(start_echo_app(&work, task, name));
    }
    procs.push(start_gateway_envoy(
        &work,
        &gw,
        &agent,
        "m",
        "gw",
        GATEWAY_ADMIN_PORT,
    ));

    let get = |host: &str, path: &str| call(&client, &gw.ip, "GET", host, path);
    // The default rewrites: matched prefix → "/", Host → the target virtual service.
    let first = eventually(
        "the gateway reaches a.local",
        Duration::from_secs(20),
        || match get("shop.example.com", "/a/hello?x=1") {
            (200, body) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(first, "a GET /hello?x=1 a.local");
    assert_eq!(
        call(&client, &gw.ip, "POST", "shop.example.com", "/a/items"),
        (200, "a POST /items a.local".to_string())
    );

    // A prefix rewrite to a value.
    assert_eq!(
        get("shop.example.com", "/old/page"),
        (200, "a GET /new/page a.local".to_string())
    );

    // A hostname match (any case, any port) goes to another service, Host kept (DISABLED), and
    // ranks before path-only routes: /a/ here does not go to a.local.
    assert_eq!(
        get("B.Example.com:8088", "/a/hello"),
        (200, "b GET /a/hello B.Example.com".to_string())
    );

    // An exact path rewritten to another exact path.
    assert_eq!(
        get("shop.example.com", "/health"),
        (200, "b GET /status b.local".to_string())
    );

    // A router-provided service: the router's routes see the rewritten path.
    assert_eq!(
        get("shop.example.com", "/r/v2/items"),
        (200, "c GET /v2/items r.local".to_string())
    );
    assert_eq!(
        get("shop.example.com", "/r/other"),
        (200, "a GET /other r.local".to_string())
    );

    // A prefix without a trailing slash, as virtual_gateways.md tells it: "/chapter/1" is
    // rewritten to "/1" (not "//1"), and "/chapter1" to "/1" too.
    for (sent, seen) in [("/chapter/1", "/1"), ("/chapter1", "/1"), ("/chapter", "/")] {
        assert_eq!(
            get("shop.example.com", sent),
            (200, format!("b GET {seen} b.local")),
            "{sent}"
        );
    }

    // No gateway route matches: 404 from the gateway.
    assert_eq!(get("shop.example.com", "/nowhere").0, 404);

    drop(procs);
}

/// An HTTPS request from `client` to the gateway's TLS listener (trusting `ca`, the gateway's
/// name resolved to its address): (status, body); status 0 when no TLS answer came.
fn call_tls(client: &Task, gateway_ip: &str, ca: &str, path: &str) -> (u16, String) {
    call_tls_on(client, gateway_ip, GATEWAY_PORT, ca, path)
}

fn call_tls_on(client: &Task, gateway_ip: &str, port: u16, ca: &str, path: &str) -> (u16, String) {
    let out = run(&mut client.cmd(&[
        "curl",
        "-sS",
        "-m",
        "20",
        "--cacert",
        ca,
        "--resolve",
        &format!("gw.example.com:{port}:{gateway_ip}"),
        "-w",
        "\n%{http_code}",
        &format!("https://gw.example.com:{port}{path}"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// A gateway listener with App Mesh's listener policies: TLS (STRICT, its certificate from the
/// local SDS server; a second listener PERMISSIVE with a file certificate), its own health path, a connection pool of one connection and one queued
/// request to the services behind it; backend defaults' client TLS to a STRICT node; access log.
#[test]
fn a_gateway_listener_terminates_sds_tls_answers_health_limits_with_its_pool_and_logs() {
    if !can_run_privileged("gateway policies") {
        return;
    }
    let work = Workdir::new("gateway-policies");
    let pki = Pki::new(&work, "gw");
    let (gw_chain, gw_key) = pki.issue("gw", &["gw.example.com"]);
    let (a_chain, a_key) = pki.issue("a", &["a.local"]);
    let ca = pki.ca();
    let sds = SdsServer::start(
        &work,
        BTreeMap::from([(
            "spiffe://trellis.test/gw".to_string(),
            SdsSecret::cert(&gw_chain, &gw_key),
        )]),
    );
    let socket = sds.socket.display().to_string();
    let logs = writable_dir(&work, "logs");
    let log = logs.join("gw.log");
    let mut a_node = echo_node("a-vn");
    a_node["spec"]["listeners"][0]["tls"] = json!({"mode": "STRICT",
        "certificate": {"file": {"certificateChain": a_chain, "privateKey": a_key}}});
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            a_node,
            node_service("a.local", "a-vn"),
            {"meshName": "m", "virtualGatewayName": "gw", "spec": {
                "listeners": [{"portMapping": {"port": GATEWAY_PORT, "protocol": "http"},
                    "tls": {"mode": "STRICT",
                        "certificate": {"sds": {"secretName": "spiffe://trellis.test/gw"}}},
                    "connectionPool": {"http": {"maxConnections": 1, "maxPendingRequests": 1}},
                    "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                        "unhealthyThreshold": 2, "intervalMillis": 5000, "timeoutMillis": 2000}},
                    {"portMapping": {"port": PERMISSIVE_PORT, "protocol": "http"},
                    "tls": {"mode": "PERMISSIVE", "certificate": {"file": {
                        "certificateChain": gw_chain, "privateKey": gw_key}}}}],
                "backendDefaults": {"clientPolicy": {"tls": {"validation": {
                    "trust": {"file": {"certificateChain": ca}},
                    "subjectAlternativeNames": {"match": {"exact": ["a.local"]}}}}}},
                "logging": {"accessLog": {"file": {"path": log,
                    "format": {"text": "gw %REQ(:PATH)% %RESPONSE_CODE%"}}}}}},
            gateway_route("to-a", json!({"httpRoute": {
                "match": {"prefix": "/", "port": GATEWAY_PORT}, "action": {"target": to("a.local")}}})),
            gateway_route("to-a-permissive", json!({"httpRoute": {
                "match": {"prefix": "/", "port": PERMISSIVE_PORT}, "action": {"target": to("a.local")}}})),
        ]),
    );
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 24);
    let gw = vpc.task("gw", 2);
    let client = vpc.task("client", 3);
    let a = vpc.task("a", 4);
    vpc.start_dns(&work, &[(&a.ip, "a-vn.trellis.test a.local")]);
    let def = rewrite(
        &work,
        &app_taskdef("a", &[APP_PORT]),
        "m",
        "a-vn",
        &agent.socket_dir,
    );
    run_route_manager(&a, &def);
    let mut procs = vec![start_envoy(&work, &a, &def)];
    procs.push(start_app(&work, &a, APP_PORT, &Behaviour::ok("a")));
    procs.push(start_proxy_envoy_with(
        &work,
        &gw,
        &agent,
        "mesh/m/virtualGateway/gw",
        GATEWAY_ADMIN_PORT,
        &[("APPMESH_SDS_SOCKET_PATH", &socket)],
    ));

    let first = eventually(
        "the gateway serves TLS with its SDS certificate",
        Duration::from_secs(30),
        || match call_tls(&client, &gw.ip, &ca, "/hello") {
            (200, body) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(first, "a");
    assert!(
        sds.requested()
            .iter()
            .any(|n| n == "spiffe://trellis.test/gw")
    );
    let stat = |name: &str| gw.envoy_stat(GATEWAY_ADMIN_PORT, name);
    assert!(stat("listener.0.0.0.0_8088.ssl.handshake") >= 1);
    // Backend defaults: TLS from the gateway to a's STRICT listener, a.local verified.
    assert!(stat("cluster.cds_egress_m_a-vn_http_8080.ssl.handshake") >= 1);
    // STRICT: no plaintext.
    let plain = run(&mut client.cmd(&[
        "curl",
        "-sS",
        "-m",
        "5",
        &format!("http://{}:{GATEWAY_PORT}/hello", gw.ip),
    ]));
    assert!(
        !plain.status.success(),
        "a STRICT gateway listener never answers plaintext"
    );
    // PERMISSIVE (file certificate): TLS and plaintext on the same port.
    assert_eq!(
        call_tls_on(&client, &gw.ip, PERMISSIVE_PORT, &ca, "/hello"),
        (200, "a".to_string())
    );
    assert!(stat("listener.0.0.0.0_8089.ssl.handshake") >= 1);
    assert_eq!(
        check(&mut client.cmd(&[
            "curl",
            "-sS",
            "-m",
            "5",
            &format!("http://{}:{PERMISSIVE_PORT}/hello", gw.ip),
        ])),
        "a"
    );
    // The health path is the gateway's own answer (the app would say "a").
    assert_eq!(
        call_tls(&client, &gw.ip, &ca, "/ping"),
        (200, String::new())
    );

    // The pool: six slow requests at once, one connection and one queued request admitted.
    let script = format!(
        "for i in 1 2 3 4 5 6; do curl -s -o /dev/null -m 20 --cacert {ca} \
         --resolve gw.example.com:{GATEWAY_PORT}:{ip} -w '%{{http_code}}\\n' \
         https://gw.example.com:{GATEWAY_PORT}/sleep/4 & done; wait",
        ip = gw.ip
    );
    let out = run(&mut client.cmd(&["sh", "-c", &script]));
    let codes: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    eprintln!("status codes: {codes:?}");
    let ok = codes.iter().filter(|c| **c == 200).count();
    let overflow = codes.iter().filter(|c| **c == 503).count();
    assert!(ok >= 1 && overflow >= 1 && ok + overflow == 6, "{codes:?}");
    assert_eq!(
        stat("cluster.cds_ingress_m_gw_self_redirect_http_15001.upstream_rq_pending_overflow")
            as usize,
        overflow,
        "every 503 is the gateway's pool overflowing"
    );

    eventually("the gateway's access log", Duration::from_secs(10), || {
        file_has(&log, "gw /hello 200")
    });
    drop(procs);
}
