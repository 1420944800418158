//! gRPC, HTTP/2 and TCP routes of a virtual router proven on real traffic: real Envoys in task
//! namespaces, a gRPC call per method and an HTTP/2 request per prefix over HTTP/2 end to end,
//! and TCP connections split by weight.

use std::fs;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{start_banner, start_h2c_app, start_meshed};
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{ADMIN_PORT, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

/// The app Envoys' admin port (the sidecar's is [`ADMIN_PORT`]).
const APP_ADMIN: u16 = 9902;

/// Mesh `m`: `nodes` (name, protocol, port, found as NAME.trellis.test), router `vr` with one
/// listener (protocol, port) and `routes`, service `service` provided by the router, and `front`
/// whose one backend is that service.
fn routed_mesh(
    service: &str,
    listener: (&str, u16),
    nodes: &[&str],
    routes: &[(&str, Value)],
) -> Value {
    let (proto, port) = listener;
    let mut items = vec![
        json!({"meshName": "m"}),
        json!({"meshName": "m", "virtualNodeName": "front", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": service}}]}}),
        json!({"meshName": "m", "virtualRouterName": "vr",
               "spec": {"listeners": [{"portMapping": {"port": port, "protocol": proto}}]}}),
        json!({"meshName": "m", "virtualServiceName": service,
               "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}}),
    ];
    items.extend(nodes.iter().map(|name| {
        json!({"meshName": "m", "virtualNodeName": name, "spec": {
            "listeners": [{"portMapping": {"port": port, "protocol": proto}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
    }));
    items.extend(routes.iter().map(|(name, spec)| {
        json!({"meshName": "m", "virtualRouterName": "vr", "routeName": name, "spec": spec})
    }));
    Value::Array(items)
}

/// A status and the response headers.
type Answer = (u16, Vec<(String, String)>);

/// A request from `task` over HTTP/2 with prior knowledge: with `frame` (a file holding one
/// empty, uncompressed gRPC message), a unary gRPC call as a gRPC client makes it, else a plain
/// GET. The status and response headers (names in lower case), or curl's complaint when no
/// answer came.
fn h2_request(task: &Task, url: &str, frame: Option<&str>) -> Result<Answer, String> {
    let mut args = vec!["curl", "-sS", "-m", "10", "--http2-prior-knowledge"];
    let data = frame.map(|f| format!("@{f}"));
    if let Some(data) = &data {
        args.extend([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            data,
        ]);
    }
    args.extend(["-D", "-", "-o", "/dev/null", url]);
    let out = run(&mut task.cmd(&args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/2 "))
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("{text} {}", String::from_utf8_lossy(&out.stderr)))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// The first answer to [`h2_request`], retried only while none comes: when Envoy answers before
/// the upload is over it resets the stream, which curl may report instead of the answer.
fn answer(task: &Task, url: &str, frame: Option<&str>) -> Answer {
    eventually(
        &format!("an answer from {url}"),
        Duration::from_secs(30),
        || h2_request(task, url, frame),
    )
}

/// The value of header `name` in `headers`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A running mesh of `front` and two target nodes, each target's app an h2c Envoy on 8080. Field
/// order is drop order: processes, then namespaces, then the agent.
struct H2Mesh {
    _procs: Vec<Proc>,
    front: Task,
    targets: Vec<Task>,
    _vpc: Vpc,
    _agent: Agent,
}

impl H2Mesh {
    /// The agent with `items` and VPC `id`; `service` resolves to the first target's address
    /// (any address does, as with App Mesh: Envoy routes by authority).
    fn start(work: &Workdir, id: u8, items: &Value, service: &str, nodes: [&str; 2]) -> Self {
        let agent = Agent::start(work, Some(&resources_file(work, items)));
        let mut vpc = Vpc::new(work, id);
        let front = vpc.task("front", 2);
        let targets = [vpc.task(nodes[0], 3), vpc.task(nodes[1], 4)];
        let first = format!("{}.trellis.test {service}", nodes[0]);
        let second = format!("{}.trellis.test", nodes[1]);
        vpc.start_dns(work, &[(&targets[0].ip, &first), (&targets[1].ip, &second)]);
        let mut procs = Vec::new();
        for (task, node) in targets.iter().zip(nodes) {
            procs.push(start_meshed(work, &agent, "m", task, node, &[8080]));
            procs.push(start_h2c_app(work, task, 8080, APP_ADMIN, node));
        }
        procs.push(start_meshed(work, &agent, "m", &front, "front", &[]));
        H2Mesh {
            _procs: procs,
            front,
            targets: targets.into(),
            _vpc: vpc,
            _agent: agent,
        }
    }
}

#[test]
fn grpc_routes_send_each_method_to_its_target_and_only_grpc_requests() {
    if !can_run_privileged("gRPC routes") {
        return;
    }
    let work = Workdir::new("route-grpc");
    let route = |method: &str, node: &str| {
        json!({"grpcRoute": {"match": {"serviceName": "shop.Cart", "methodName": method},
            "action": {"weightedTargets": [{"virtualNode": node, "weight": 1}]}}})
    };
    let items = routed_mesh(
        "cart.local",
        ("grpc", 8080),
        &["add", "remove"],
        &[
            ("add", route("Add", "add")),
            ("remove", route("Remove", "remove")),
        ],
    );
    let mesh = H2Mesh::start(&work, 51, &items, "cart.local", ["add", "remove"]);
    let (front, add, remove) = (&mesh.front, &mesh.targets[0], &mesh.targets[1]);
    // An empty gRPC message: not compressed, length 0.
    let frame = work.join("empty-grpc-frame");
    fs::write(&frame, [0u8; 5]).expect("write frame");
    let frame = frame.display().to_string();

    for (method, node) in [("Add", "add"), ("Remove", "remove")] {
        let url = format!("http://cart.local:8080/shop.Cart/{method}");
        let h = eventually(
            &format!("shop.Cart/{method} answered by {node}"),
            Duration::from_secs(30),
            || match h2_request(front, &url, Some(&frame)) {
                Ok((200, h)) if header(&h, "app-node") == Some(node) => Ok(h),
                other => Err(format!("{other:?}")),
            },
        );
        assert_eq!(header(&h, "grpc-status"), Some("0"), "{h:?}");
    }
    // The same path without gRPC's content type matches no route: plain HTTP's 404.
    let add_url = "http://cart.local:8080/shop.Cart/Add";
    let (code, h) = answer(front, add_url, None);
    assert_eq!(code, 404, "a non-gRPC request to a gRPC route: {h:?}");
    assert_eq!(header(&h, "app-node"), None, "{h:?}");
    // A method no route names matches none either: Envoy answers a gRPC caller UNIMPLEMENTED (12).
    let list_url = "http://cart.local:8080/shop.Cart/List";
    let (code, h) = answer(front, list_url, Some(&frame));
    assert_eq!(
        (code, header(&h, "grpc-status"), header(&h, "app-node")),
        (200, Some("12"), None),
        "a method no route names: {h:?}"
    );

    // HTTP/2 all the way: front's upstream to each node, each node's sidecar to its app.
    for (task, node) in [(&add, "add"), (&remove, "remove")] {
        let egress = format!("cluster.cds_egress_m_{node}_grpc_8080.upstream_cx_http2_total");
        assert!(front.envoy_stat(ADMIN_PORT, &egress) >= 1, "{egress}");
        let ingress = format!("cluster.cds_ingress_m_{node}_grpc_8080.upstream_cx_http2_total");
        assert!(task.envoy_stat(ADMIN_PORT, &ingress) >= 1, "{ingress}");
        let app = "http.app.downstream_cx_http2_total";
        assert!(task.envoy_stat(APP_ADMIN, app) >= 2, "{node}'s {app}");
    }
    drop(mesh);
}

#[test]
fn http2_routes_send_each_prefix_to_its_target_over_http2() {
    if !can_run_privileged("http2 routes") {
        return;
    }
    let work = Workdir::new("route-http2");
    let route = |prefix: &str, node: &str| {
        json!({"http2Route": {"match": {"prefix": prefix},
            "action": {"weightedTargets": [{"virtualNode": node, "weight": 1}]}}})
    };
    let items = routed_mesh(
        "web.local",
        ("http2", 8080),
        &["v1", "v2"],
        &[("all", route("/", "v1")), ("beta", route("/beta", "v2"))],
    );
    let mesh = H2Mesh::start(&work, 53, &items, "web.local", ["v1", "v2"]);
    let (front, v1, v2) = (&mesh.front, &mesh.targets[0], &mesh.targets[1]);

    // The longer prefix first (App Mesh's order), whatever the route names.
    for (path, node) in [("/beta/cart", "v2"), ("/cart", "v1")] {
        let url = format!("http://web.local:8080{path}");
        eventually(
            &format!("{path} answered by {node}"),
            Duration::from_secs(30),
            || match h2_request(front, &url, None) {
                Ok((200, h)) if header(&h, "app-node") == Some(node) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    // HTTP/2 at every hop: front to each node, each sidecar to its app.
    for (task, node) in [(&v1, "v1"), (&v2, "v2")] {
        let egress = format!("cluster.cds_egress_m_{node}_http2_8080.upstream_cx_http2_total");
        assert!(front.envoy_stat(ADMIN_PORT, &egress) >= 1, "{egress}");
        let ingress = format!("cluster.cds_ingress_m_{node}_http2_8080.upstream_cx_http2_total");
        assert!(task.envoy_stat(ADMIN_PORT, &ingress) >= 1, "{ingress}");
    }
    drop(mesh);
}

/// Opens `n` connections from `task` to `host:port` one after another and returns the first line
/// each was greeted with (an empty line for a connection that got none).
fn greetings(task: &Task, host: &str, port: u16, n: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq 1 {n}); do \
           if exec 3<>/dev/tcp/{host}/{port}; then timeout 10 head -n1 <&3 || echo; exec 3<&-; \
           else echo; fi; \
         done"
    );
    check(&mut task.cmd(&["bash", "-c", &script]))
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn a_tcp_route_splits_connections_by_weight_through_a_router_and_never_to_weight_0() {
    if !can_run_privileged("TCP routes") {
        return;
    }
    let work = Workdir::new("route-tcp");
    let split = json!({"tcpRoute": {"action": {"weightedTargets": [
        {"virtualNode": "db-a", "weight": 70},
        {"virtualNode": "db-b", "weight": 30},
        {"virtualNode": "db-c", "weight": 0}]}}});
    // db-c has no task: a connection sent its way would get no greeting.
    let items = routed_mesh(
        "db.local",
        ("tcp", 5432),
        &["db-a", "db-b", "db-c"],
        &[("split", split)],
    );
    let agent = Agent::start(&work, Some(&resources_file(&work, &items)));
    let mut vpc = Vpc::new(&work, 52);
    let front = vpc.task("front", 2);
    let a = vpc.task("db-a", 3);
    let b = vpc.task("db-b", 4);
    vpc.start_dns(
        &work,
        &[
            (&a.ip, "db-a.trellis.test db.local"),
            (&b.ip, "db-b.trellis.test"),
        ],
    );
    let mut procs = Vec::new();
    for (task, node) in [(&a, "db-a"), (&b, "db-b")] {
        procs.push(start_meshed(&work, &agent, "m", task, node, &[5432]));
        procs.push(start_banner(&work, task, 5432, node));
    }
    procs.push(start_meshed(&work, &agent, "m", &front, "front", &[]));

    eventually(
        "front's connections to db.local reach a database",
        Duration::from_secs(30),
        || match greetings(&front, "db.local", 5432, 1).as_slice() {
            [g] if g == "db-a" || g == "db-b" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let n = 200;
    let got = greetings(&front, "db.local", 5432, n);
    let count = |name: &str| got.iter().filter(|g| *g == name).count();
    let (to_a, to_b) = (count("db-a"), count("db-b"));
    assert_eq!(
        to_a + to_b,
        n,
        "every connection greeted by db-a or db-b: {got:?}"
    );
    // 70/30 of 200: the standard deviation is about 6.5 connections, so ±30 is over four of them.
    assert!(
        (110..=170).contains(&to_a),
        "db-a got {to_a} of {n} connections (db-b {to_b}); expected about 140"
    );
    // Each connection went through front's Envoy, to the target's own cluster.
    for (node, expected) in [("db-a", to_a), ("db-b", to_b)] {
        let stat = format!("cluster.cds_egress_m_{node}_tcp_5432.upstream_cx_total");
        let cx = front.envoy_stat(ADMIN_PORT, &stat);
        assert!(cx >= expected as u64, "{stat} = {cx}, {expected} greetings");
    }
    drop(procs);
}
