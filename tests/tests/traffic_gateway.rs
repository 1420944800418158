//! Virtual gateways proven on real Envoy traffic: a client outside the mesh calls the gateway's
//! listener; gateway routes pick a virtual service by path or hostname, rewrite prefix, path and
//! Host as App Mesh did, and reach meshed echo apps directly (node-provided services) or through
//! a virtual router's routes (router-provided service).

use std::fs;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::mesh::{
    Agent, Task, Vpc, rewrite, run_route_manager, start_envoy, start_gateway_envoy,
};
use trellis_tests::scenario::{app_taskdef, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually};

const GATEWAY_PORT: u16 = 8088;
const GATEWAY_ADMIN_PORT: u16 = 9901;
const APP_PORT: u16 = 8080;

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
/// gateway's rewrites.
fn start_echo_app(work: &Workdir, task: &Task, name: &str) -> Proc {
    let script = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def answer(self):\n\
         \x20       b = ('{name} %s %s %s' % (self.command, self.path, self.headers.get('Host'))).encode()\n\
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
                "match": {"prefix": "/r/"}, "action": {"target": to("r.local")}}}))
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

    // No gateway route matches: 404 from the gateway.
    assert_eq!(get("shop.example.com", "/nowhere").0, 404);

    drop(procs);
}
