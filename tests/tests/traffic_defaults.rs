//! App Mesh's Envoy defaults (envoy-defaults.md) on real Envoy traffic: circuit breakers that
//! never bind (2147483647 on every cluster without a connection pool), so more than Envoy's
//! 1,024 requests pass one caller at once; the default retry policy (2 retries on 503, none on
//! 502 or 504, no per-try timeout) wherever no retry policy is set, node-provided services and
//! gateway routes included; App Mesh's ingress stat prefixes.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{
    echo_number, http_status, start_echo, start_grpc_status_app, start_load, start_meshed,
};
use trellis_tests::mesh::{Agent, Task, Vpc, start_gateway_envoy};
use trellis_tests::scenario::{ADMIN_PORT, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

const PORT: u16 = 8080;
const GATEWAY_PORT: u16 = 8088;
const GATEWAY_ADMIN: u16 = 9902;
const UNLIMITED: u64 = 2_147_483_647;

/// Mesh `m`: `back` (http 8080) provides `back.local` and, through router `vr`, `routed.local`;
/// `front` calls both; gateway `gw` sends `/n/` to back.local and `/r/` to routed.local.
fn items() -> Value {
    json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualNodeName": "back", "spec": {
            "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": "back.trellis.test"}}}},
        {"meshName": "m", "virtualServiceName": "back.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "back"}}}},
        {"meshName": "m", "virtualRouterName": "vr",
         "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
        {"meshName": "m", "virtualRouterName": "vr", "routeName": "all", "spec": {"httpRoute": {
            "match": {"prefix": "/"},
            "action": {"weightedTargets": [{"virtualNode": "back", "weight": 1}]}}}},
        {"meshName": "m", "virtualServiceName": "routed.local",
         "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
        {"meshName": "m", "virtualNodeName": "front", "spec": {"backends": [
            {"virtualService": {"virtualServiceName": "back.local"}},
            {"virtualService": {"virtualServiceName": "routed.local"}}]}},
        {"meshName": "m", "virtualGatewayName": "gw", "spec": {
            "listeners": [{"portMapping": {"port": GATEWAY_PORT, "protocol": "http"}}]}},
        {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "n", "spec": {
            "httpRoute": {"match": {"prefix": "/n/"},
                "action": {"target": {"virtualService": {"virtualServiceName": "back.local"}}}}}},
        {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "r", "spec": {
            "httpRoute": {"match": {"prefix": "/r/"},
                "action": {"target": {"virtualService": {"virtualServiceName": "routed.local"}}}}}}
    ])
}

/// Everything running; field order is drop order (processes before namespaces).
struct Mesh {
    _procs: Vec<Proc>,
    back: Task,
    front: Task,
    gw: Task,
    client: Task,
    _vpc: Vpc,
    _agent: Agent,
}

/// The agent with [`items`], back (meshed, with the echo app), front (meshed), the gateway, and
/// an unmeshed client task, in VPC `id`.
fn start(work: &Workdir, id: u8) -> Mesh {
    let agent = Agent::start(work, Some(&resources_file(work, &items())));
    let mut vpc = Vpc::new(work, id);
    let back = vpc.task("back", 2);
    let front = vpc.task("front", 3);
    let gw = vpc.task("gw", 4);
    let client = vpc.task("client", 5);
    vpc.start_dns(
        work,
        &[(&back.ip, "back.trellis.test back.local routed.local")],
    );
    let procs = vec![
        start_meshed(work, &agent, "m", &back, "back", &[PORT]),
        start_echo(work, &back, PORT, "back"),
        start_meshed(work, &agent, "m", &front, "front", &[]),
        start_gateway_envoy(work, &gw, &agent, "m", "gw", GATEWAY_ADMIN),
    ];
    eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, &format!("http://back.local:{PORT}/"))
    });
    Mesh {
        _procs: procs,
        back,
        front,
        gw,
        client,
        _vpc: vpc,
        _agent: agent,
    }
}

/// Every dynamic cluster in an Envoy's `/config_dump`, with its default-priority thresholds
/// (connections, pending, requests, retries).
fn cluster_thresholds(task: &Task, admin: u16) -> Vec<(String, [u64; 4])> {
    let text = check(&mut task.cmd(&[
        "curl",
        "-sf",
        &format!("http://127.0.0.1:{admin}/config_dump?resource=dynamic_active_clusters"),
    ]));
    let dump: Value = serde_json::from_str(&text).expect("config_dump is JSON");
    dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .map(|c| {
            let cluster = &c["cluster"];
            let t = &cluster["circuit_breakers"]["thresholds"][0];
            let v = |k: &str| t[k].as_u64().unwrap_or(0);
            (
                cluster["name"].as_str().unwrap_or_default().to_string(),
                [
                    v("max_connections"),
                    v("max_pending_requests"),
                    v("max_requests"),
                    v("max_retries"),
                ],
            )
        })
        .collect()
}

#[test]
fn more_than_1024_requests_pass_one_caller_at_once_and_every_cluster_shows_app_mesh_breakers() {
    if !can_run_privileged("default circuit breakers") {
        return;
    }
    let work = Workdir::new("defaults-breakers");
    let mesh = start(&work, 41);
    const N: usize = 1_100;
    // Every request is held by back's app until all of them are in flight there: past Envoy's
    // own limits (1,024 connections, pending requests, requests) nothing would get through.
    let load = start_load(
        &work,
        &mesh.front,
        ("back.local", PORT),
        "back.local:8080",
        "/hold",
        N,
    );
    eventually(
        "every request in flight at back's app at once",
        Duration::from_secs(90),
        || match echo_number(&mesh.back, PORT, "/peak") as usize {
            peak if peak >= N => Ok(()),
            peak => Err(format!("{peak} at most")),
        },
    );
    echo_number(&mesh.back, PORT, "/release");
    let statuses = load.statuses(Duration::from_secs(90));
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        [(200, N)],
        "every request answered 200: no overflow 503, none stuck behind a limit"
    );
    let stat = |t: &Task, name: &str| t.envoy_stat(ADMIN_PORT, name);
    for overflow in ["upstream_cx_overflow", "upstream_rq_pending_overflow"] {
        let name = format!("cluster.cds_egress_m_back_http_8080.{overflow}");
        assert_eq!(stat(&mesh.front, &name), 0, "{name}");
    }
    // App Mesh's stat prefix on back's ingress: `ingress.PROTOCOL.PORT`.
    assert!(stat(&mesh.back, "http.ingress.http.8080.downstream_rq_total") >= N as u64);

    // The thresholds on every cluster of a caller, a provider and a gateway, in /config_dump.
    for (task, admin, at_least) in [
        (&mesh.front, ADMIN_PORT, 2),
        (&mesh.back, ADMIN_PORT, 2),
        (&mesh.gw, GATEWAY_ADMIN, 1),
    ] {
        let clusters = cluster_thresholds(task, admin);
        assert!(clusters.len() >= at_least, "{clusters:?}");
        for (name, t) in &clusters {
            assert_eq!(*t, [UNLIMITED; 4], "{} {name}", task.ns);
        }
    }
    drop(mesh);
}

/// What back's app saw for `path`: how many attempts reached it.
fn attempts(back: &Task, path: &str) -> u64 {
    echo_number(back, PORT, &format!("/count{path}"))
}

#[test]
fn default_retries_retry_503_twice_and_never_502_or_504_for_every_kind_of_target() {
    if !can_run_privileged("default retries") {
        return;
    }
    let work = Workdir::new("defaults-retries");
    let mesh = start(&work, 42);
    let front = |service: &str, path: &str| {
        http_status(&mesh.front, None, &format!("http://{service}:{PORT}{path}")).0
    };
    // A node-provided service, then a router's route without a retry policy.
    for (service, tag) in [("back.local", "node"), ("routed.local", "router")] {
        for (code, tries) in [(503, 3), (502, 1), (504, 1)] {
            let path = format!("/status/{code}/{tag}");
            assert_eq!(front(service, &path), code, "{service}{path}");
            assert_eq!(attempts(&mesh.back, &path), tries, "{service}{path}");
        }
    }
    // A POST answered 502 runs once (the old default retried gateway errors).
    let post = run(&mut mesh.front.cmd(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-d",
        "x=1",
        &format!("http://back.local:{PORT}/status/502/post"),
    ]));
    assert_eq!(String::from_utf8_lossy(&post.stdout), "502");
    assert_eq!(attempts(&mesh.back, "/status/502/post"), 1);
    assert!(
        mesh.front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back_http_8080.upstream_rq_retry"
        ) >= 4,
        "the caller's Envoy retried"
    );

    // Gateway routes: to the node-provided service directly, and through the router.
    let gateway = |path: &str| {
        let url = format!("http://{}:{GATEWAY_PORT}{path}", mesh.gw.ip);
        http_status(&mesh.client, None, &url).0
    };
    for prefix in ["/n/", "/r/"] {
        eventually(
            "the gateway reaches back",
            Duration::from_secs(20),
            || match gateway(prefix) {
                200 => Ok(()),
                other => Err(format!("{other}")),
            },
        );
    }
    for (prefix, tag) in [("/n", "gw-node"), ("/r", "gw-router")] {
        for (code, tries) in [(503, 3), (504, 1)] {
            let path = format!("/status/{code}/{tag}");
            assert_eq!(gateway(&format!("{prefix}{path}")), code, "{prefix}{path}");
            assert_eq!(attempts(&mesh.back, &path), tries, "{prefix}{path}");
        }
    }
    drop(mesh);
}

/// envoy-defaults.md: "gRPC retry events – UNAVAILABLE". A gRPC call answered UNAVAILABLE (14)
/// is tried three times, one answered INTERNAL (13) once.
#[test]
fn default_retries_retry_grpc_unavailable_twice_and_not_internal() {
    if !can_run_privileged("default grpc retries") {
        return;
    }
    let work = Workdir::new("defaults-grpc");
    const RPC: u16 = 9090;
    const APP_ADMIN: u16 = 9903;
    let items = json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualNodeName": "rpc", "spec": {
            "listeners": [{"portMapping": {"port": RPC, "protocol": "grpc"}}],
            "serviceDiscovery": {"dns": {"hostname": "rpc.trellis.test"}}}},
        {"meshName": "m", "virtualServiceName": "rpc.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "rpc"}}}},
        {"meshName": "m", "virtualNodeName": "front", "spec": {"backends": [
            {"virtualService": {"virtualServiceName": "rpc.local"}}]}},
    ]);
    let agent = Agent::start(&work, Some(&resources_file(&work, &items)));
    let mut vpc = Vpc::new(&work, 43);
    let rpc = vpc.task("rpc", 2);
    let front = vpc.task("front", 3);
    vpc.start_dns(&work, &[(&rpc.ip, "rpc.trellis.test rpc.local")]);
    let _procs = [
        start_meshed(&work, &agent, "m", &rpc, "rpc", &[RPC]),
        start_grpc_status_app(&work, &rpc, RPC, APP_ADMIN),
        start_meshed(&work, &agent, "m", &front, "front", &[]),
    ];
    // A unary gRPC call's framing over HTTP/2 (h2c); the answer's grpc-status.
    let call = |method: &str| {
        let out = run(&mut front.cmd(&[
            "curl",
            "-sS",
            "-m",
            "10",
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-o",
            "/dev/null",
            "-D",
            "-",
            &format!("http://rpc.local:{RPC}{method}"),
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("grpc-status: "))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    eventually("front calls rpc", Duration::from_secs(30), || {
        match call("/shop.Cart/Ok").as_str() {
            "0" => Ok(()),
            other => Err(format!("grpc-status {other:?}")),
        }
    });
    let attempts = |method: &str, status: &str| {
        let before = rpc.envoy_stat(APP_ADMIN, "http.app.downstream_rq_total");
        assert_eq!(call(method), status, "{method}");
        rpc.envoy_stat(APP_ADMIN, "http.app.downstream_rq_total") - before
    };
    assert_eq!(
        attempts("/fail.14/Unavailable", "14"),
        3,
        "UNAVAILABLE is retried twice"
    );
    assert_eq!(
        attempts("/fail.13/Internal", "13"),
        1,
        "INTERNAL is not retried"
    );
    assert_eq!(attempts("/fail.4/DeadlineExceeded", "4"), 1);
}
