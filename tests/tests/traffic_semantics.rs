//! Routing exactly as App Mesh routed, on real Envoy traffic: TLS negotiated toward STRICT and
//! PERMISSIVE listeners without a client policy, and the server's identity checked against its
//! service-discovery name when a client policy names no SAN (tls.md); paths normalized before a
//! caller routes them (routes.md); a tcp route's idle timeout; a node-provided service keeping
//! the 15 s default on the caller's side (virtual_nodes.md); a gateway listener's connection pool
//! limiting all its services together (howto-circuit-breakers).

use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{
    Pki, echo_number, http_status, start_echo, start_load, start_meshed, start_silent_tcp,
};
use trellis_tests::mesh::{Agent, Task, Vpc, start_gateway_envoy};
use trellis_tests::scenario::{ADMIN_PORT, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually, run};

const PORT: u16 = 8080;

/// A virtual node `name` on `listener`, found by DNS as `NAME.trellis.test`.
fn node(name: &str, listener: Value) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [listener],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
}

fn http_listener(extra: Value) -> Value {
    let mut l = json!({"portMapping": {"port": PORT, "protocol": "http"}});
    if let (Some(o), Value::Object(e)) = (l.as_object_mut(), extra) {
        o.extend(e);
    }
    l
}

fn service(name: &str, node: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": name,
        "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
}

fn routed_service(name: &str, router: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": name,
        "spec": {"provider": {"virtualRouter": {"virtualRouterName": router}}}})
}

fn caller(name: &str, services: &[&str], extra: Value) -> Value {
    let backends: Vec<Value> = services
        .iter()
        .map(|s| json!({"virtualService": {"virtualServiceName": s}}))
        .collect();
    let mut spec = json!({"backends": backends});
    if let (Some(o), Value::Object(e)) = (spec.as_object_mut(), extra) {
        o.extend(e);
    }
    json!({"meshName": "m", "virtualNodeName": name, "spec": spec})
}

/// What runs in a task: nothing but its Envoy (a caller), the echo app, or a silent TCP server.
#[derive(Clone, Copy)]
enum App {
    Caller,
    Echo,
    Silent(u16),
    /// Not meshed: a client outside the mesh, or a gateway's task.
    Unmeshed,
}

/// Everything running; field order is drop order (processes before namespaces).
struct Running {
    procs: Vec<Proc>,
    tasks: Vec<Task>,
    vpc: Vpc,
    agent: Agent,
}

impl Running {
    fn task(&self, name: &str) -> &Task {
        self.tasks
            .iter()
            .find(|t| t.ns.ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("no task {name}"))
    }
}

/// The agent with `items`, VPC `id` with one task per (name, host byte, app) — meshed as the
/// virtual node of its name unless unmeshed — and DNS names per task (`NAME.trellis.test` and
/// `aliases`). Providers start before callers.
fn start(
    work: &Workdir,
    id: u8,
    items: &Value,
    tasks: &[(&str, u8, App)],
    aliases: &[(&str, &str)],
) -> Running {
    let agent = Agent::start(work, Some(&resources_file(work, items)));
    let mut vpc = Vpc::new(work, id);
    let ts: Vec<Task> = tasks.iter().map(|(n, h, _)| vpc.task(n, *h)).collect();
    let lines: Vec<(String, String)> = tasks
        .iter()
        .zip(&ts)
        .map(|((name, _, _), t)| {
            let extra: Vec<&str> = aliases
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, a)| *a)
                .collect();
            (
                t.ip.clone(),
                format!("{name}.trellis.test {}", extra.join(" ")),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = lines
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    vpc.start_dns(work, &refs);
    let mut procs = Vec::new();
    let order = tasks
        .iter()
        .zip(&ts)
        .filter(|((_, _, app), _)| !matches!(app, App::Caller))
        .chain(
            tasks
                .iter()
                .zip(&ts)
                .filter(|((_, _, app), _)| matches!(app, App::Caller)),
        );
    for ((name, _, app), task) in order {
        match app {
            App::Unmeshed => {}
            App::Caller => procs.push(start_meshed(work, &agent, "m", task, name, &[])),
            App::Echo => {
                procs.push(start_meshed(work, &agent, "m", task, name, &[PORT]));
                procs.push(start_echo(work, task, PORT, name));
            }
            App::Silent(port) => {
                procs.push(start_meshed(work, &agent, "m", task, name, &[*port]));
                procs.push(start_silent_tcp(work, task, *port, name));
            }
        }
    }
    Running {
        procs,
        tasks: ts,
        vpc,
        agent,
    }
}

/// Waits until `task` gets a 200 from `url` through its Envoy; returns the body.
fn reached(task: &Task, url: &str) -> String {
    eventually(
        &format!("{} reaches {url}", task.ns),
        Duration::from_secs(30),
        || match http_status(task, None, url) {
            (200, body) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    )
}

/// tls.md, "Without client policies": a caller with no client policy negotiates TLS with a
/// STRICT or PERMISSIVE listener and does not validate a file certificate. "Subject alternative
/// names": a client policy without SANs accepts only a certificate naming the target's
/// service-discovery name ("or a certificate with the wild card").
#[test]
fn tls_is_negotiated_without_a_client_policy_and_a_policy_without_sans_checks_the_discovery_name() {
    if !can_run_privileged("tls negotiation") {
        return;
    }
    let work = Workdir::new("sem-tls");
    let pki = Pki::new(&work, "mesh");
    let cert = |name: &str, sans: &[&str]| {
        let (chain, key) = pki.issue(name, sans);
        json!({"file": {"certificateChain": chain, "privateKey": key}})
    };
    let tls = |mode: &str, certificate: Value| {
        http_listener(json!({"tls": {"mode": mode, "certificate": certificate}}))
    };
    let items = json!([
        {"meshName": "m"},
        node("strict", tls("STRICT", cert("strict", &["strict.trellis.test"]))),
        node("perm", tls("PERMISSIVE", cert("perm", &["perm.trellis.test"]))),
        node("wild", tls("STRICT", cert("wild", &["*.trellis.test"]))),
        // A certificate from the trusted CA, but for another name than fake's DNS hostname.
        node("fake", tls("STRICT", cert("fake", &["someone-else.trellis.test"]))),
        service("strict.local", "strict"),
        service("perm.local", "perm"),
        service("wild.local", "wild"),
        service("fake.local", "fake"),
        caller("plain", &["strict.local", "perm.local", "fake.local"], json!({})),
        caller("checked", &["strict.local", "wild.local", "fake.local"],
            json!({"backendDefaults": {"clientPolicy": {"tls": {"validation": {
                "trust": {"file": {"certificateChain": pki.ca()}}}}}}})),
    ]);
    let env = start(
        &work,
        51,
        &items,
        &[
            ("strict", 2, App::Echo),
            ("perm", 3, App::Echo),
            ("wild", 4, App::Echo),
            ("fake", 5, App::Echo),
            ("plain", 6, App::Caller),
            ("checked", 7, App::Caller),
        ],
        &[
            ("strict", "strict.local"),
            ("perm", "perm.local"),
            ("wild", "wild.local"),
            ("fake", "fake.local"),
        ],
    );
    let url = |svc: &str| format!("http://{svc}.local:{PORT}/hello");
    let handshakes = |name: &str| {
        env.task(name)
            .envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.handshake")
    };

    // No client policy: TLS toward STRICT (else no answer at all) and PERMISSIVE (else plain).
    let plain = env.task("plain");
    for svc in ["strict", "perm", "fake"] {
        let body = reached(plain, &url(svc));
        assert!(body.starts_with(&format!("{svc} GET /hello")), "{body}");
    }
    assert!(handshakes("strict") >= 1);
    assert!(handshakes("perm") >= 1, "PERMISSIVE is encrypted too");
    assert!(
        plain.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_perm_http_8080.ssl.handshake"
        ) >= 1
    );

    // A client policy without SANs: the name the target is discovered by, wildcards included.
    let checked = env.task("checked");
    reached(checked, &url("strict"));
    reached(checked, &url("wild"));
    let (code, _) = http_status(checked, None, &url("fake"));
    assert_eq!(
        code, 503,
        "fake's certificate does not name fake.trellis.test"
    );
    assert!(
        checked.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_fake_http_8080.ssl.fail_verify_san"
        ) >= 1
    );
    assert_eq!(
        echo_number(env.task("fake"), PORT, "/count/hello"),
        1,
        "only plain's request"
    );
    drop(env);
}

/// routes.md: "If you enable Path/Prefix based matching, App Mesh enables path normalization
/// (normalize_path and merge_slashes)": `//admin/x` is routed as `/admin/x`.
#[test]
fn a_callers_envoy_normalizes_paths_before_routing_them() {
    if !can_run_privileged("path normalization") {
        return;
    }
    let work = Workdir::new("sem-paths");
    let route = |name: &str, prefix: &str, target: &str| {
        json!({"meshName": "m", "virtualRouterName": "vr", "routeName": name, "spec": {
            "httpRoute": {"match": {"prefix": prefix},
                "action": {"weightedTargets": [{"virtualNode": target, "weight": 1}]}}}})
    };
    let items = json!([
        {"meshName": "m"},
        node("admin", http_listener(json!({}))),
        node("web", http_listener(json!({}))),
        {"meshName": "m", "virtualRouterName": "vr",
         "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
        route("admin", "/admin", "admin"),
        route("rest", "/", "web"),
        routed_service("site.local", "vr"),
        caller("front", &["site.local"], json!({})),
    ]);
    let env = start(
        &work,
        52,
        &items,
        &[
            ("admin", 2, App::Echo),
            ("web", 3, App::Echo),
            ("front", 4, App::Caller),
        ],
        &[("web", "site.local")],
    );
    let front = env.task("front");
    reached(front, &format!("http://site.local:{PORT}/"));
    let get = |path: &str| {
        let out = run(&mut front.cmd(&[
            "curl",
            "-sS",
            "-m",
            "10",
            "--path-as-is",
            &format!("http://site.local:{PORT}{path}"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get("//admin/x"), "admin GET /admin/x site.local:8080");
    assert_eq!(
        get("/web/./../admin//y"),
        "admin GET /admin/y site.local:8080"
    );
    assert_eq!(get("/other"), "web GET /other site.local:8080");
    drop(env);
}

/// routes.md, tcp route timeout: "Idle duration" closes a connection nobody uses; the caller's
/// Envoy does it, whatever the server does.
#[test]
fn a_tcp_routes_idle_timeout_closes_an_idle_connection_on_the_caller() {
    if !can_run_privileged("tcp idle") {
        return;
    }
    let work = Workdir::new("sem-tcp-idle");
    const DB: u16 = 5432;
    let items = json!([
        {"meshName": "m"},
        node("db", json!({"portMapping": {"port": DB, "protocol": "tcp"}})),
        {"meshName": "m", "virtualRouterName": "vr",
         "spec": {"listeners": [{"portMapping": {"port": DB, "protocol": "tcp"}}]}},
        {"meshName": "m", "virtualRouterName": "vr", "routeName": "t", "spec": {"tcpRoute": {
            "action": {"weightedTargets": [{"virtualNode": "db", "weight": 1}]},
            "timeout": {"idle": {"unit": "s", "value": 2}}}}},
        routed_service("db.local", "vr"),
        caller("front", &["db.local"], json!({})),
    ]);
    let env = start(
        &work,
        53,
        &items,
        &[("db", 2, App::Silent(DB)), ("front", 3, App::Caller)],
        &[("db", "db.local")],
    );
    let front = env.task("front");
    // Reads until the connection closes; the guard ends it after 60 s if nobody does.
    let open = format!("exec 3<>/dev/tcp/db.local/{DB} && cat <&3");
    let out = eventually("front reaches db", Duration::from_secs(30), || {
        let out = run(&mut front.cmd(&["timeout", "60", "bash", "-c", &open]));
        match String::from_utf8_lossy(&out.stdout).trim() {
            "db" => Ok(out),
            got => Err(format!("{got:?} {}", String::from_utf8_lossy(&out.stderr))),
        }
    });
    assert!(
        out.status.success(),
        "the connection was closed for us, not by the 60 s guard: {:?}",
        out.status
    );
    assert!(front.envoy_stat(ADMIN_PORT, "tcp.egress.idle_timeout") >= 1);
    drop(env);
}

/// virtual_nodes.md: "If you specify a timeout greater than the default, make sure to set up a
/// virtual router and a route with a timeout greater than the default". A node-provided service:
/// the provider's own Envoy waits its listener's 20 s, a caller's still stops at 15 s.
#[test]
fn a_node_provided_service_keeps_the_15s_default_on_the_callers_side() {
    if !can_run_privileged("caller default timeout") {
        return;
    }
    let work = Workdir::new("sem-node-timeout");
    let items = json!([
        {"meshName": "m"},
        node("back", http_listener(json!({"timeout": {"http": {"perRequest": {"unit": "s", "value": 20}}}}))),
        service("back.local", "back"),
        caller("front", &["back.local"], json!({})),
    ]);
    let env = start(
        &work,
        54,
        &items,
        &[("back", 2, App::Echo), ("front", 3, App::Caller)],
        &[("back", "back.local")],
    );
    let (front, back) = (env.task("front"), env.task("back"));
    reached(front, &format!("http://back.local:{PORT}/"));
    let slow = |task: &Task, url: String| {
        let out = run(&mut task.cmd(&[
            "curl",
            "-s",
            "-m",
            "30",
            "-H",
            "Latency: 17",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (via_caller, direct) = std::thread::scope(|s| {
        let a = s.spawn(|| slow(front, format!("http://back.local:{PORT}/slow")));
        // Straight at back's ingress, as an unmeshed client: back's Envoy allows 20 s.
        let b = s.spawn(|| {
            let out = run(std::process::Command::new("ip").args([
                "netns",
                "exec",
                &env.vpc.ns,
                "curl",
                "-s",
                "-m",
                "30",
                "-H",
                "Latency: 17",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}:{PORT}/direct", back.ip),
            ]));
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        (a.join().expect("caller"), b.join().expect("direct"))
    });
    assert_eq!(
        via_caller, "504",
        "the caller's route keeps App Mesh's 15 s"
    );
    assert_eq!(direct, "200", "back's own listener allows 20 s");
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back_http_8080.upstream_rq_timeout"
        ) >= 1
    );
    drop(env);
}

/// howto-circuit-breakers: a gateway listener's connection pool limits everything behind the
/// listener together (App Mesh counted it on the gateway's `self_redirect` cluster), not each
/// service on its own.
#[test]
fn a_gateway_listeners_pool_limits_all_its_services_together() {
    if !can_run_privileged("gateway pool") {
        return;
    }
    let work = Workdir::new("sem-gw-pool");
    const GW_PORT: u16 = 8088;
    const GW_ADMIN: u16 = 9902;
    let gateway_route = |name: &str, prefix: &str, target: &str| {
        json!({"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": name, "spec": {
            "httpRoute": {"match": {"prefix": prefix},
                "action": {"target": {"virtualService": {"virtualServiceName": target}}}}}})
    };
    let items = json!([
        {"meshName": "m"},
        node("a", http_listener(json!({}))),
        node("b", http_listener(json!({}))),
        service("a.local", "a"),
        service("b.local", "b"),
        {"meshName": "m", "virtualGatewayName": "gw", "spec": {"listeners": [{
            "portMapping": {"port": GW_PORT, "protocol": "http"},
            "connectionPool": {"http": {"maxConnections": 1, "maxPendingRequests": 1}}}]}},
        gateway_route("a", "/a/", "a.local"),
        gateway_route("b", "/b/", "b.local"),
    ]);
    let mut env = start(
        &work,
        55,
        &items,
        &[
            ("a", 2, App::Echo),
            ("b", 3, App::Echo),
            ("gw", 4, App::Unmeshed),
            ("client", 5, App::Unmeshed),
        ],
        &[("a", "a.local"), ("b", "b.local")],
    );
    let gw_proc = start_gateway_envoy(&work, env.task("gw"), &env.agent, "m", "gw", GW_ADMIN);
    env.procs.push(gw_proc);
    let (gw, client) = (env.task("gw"), env.task("client"));
    for path in ["/a/", "/b/"] {
        reached(client, &format!("http://{}:{GW_PORT}{path}", gw.ip));
    }
    // Two held requests for each service at once: one connection and one queued request in all.
    let loads = [
        start_load(&work, client, (&gw.ip, GW_PORT), "gw", "/a/hold", 2),
        start_load(&work, client, (&gw.ip, GW_PORT), "gw", "/b/hold", 2),
    ];
    let overflow = "cluster.cds_ingress_m_gw_self_redirect_http_15001.upstream_rq_pending_overflow";
    eventually(
        "the pool turns two requests away",
        Duration::from_secs(30),
        || match gw.envoy_stat(GW_ADMIN, overflow) {
            2 => Ok(()),
            n => Err(format!("{n} overflows")),
        },
    );
    for name in ["a", "b"] {
        echo_number(env.task(name), PORT, "/release");
    }
    let mut statuses = std::collections::BTreeMap::new();
    for load in loads {
        for (code, n) in load.statuses(Duration::from_secs(30)) {
            *statuses.entry(code).or_insert(0) += n;
        }
    }
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        [(200, 2), (503, 2)],
        "two admitted in all, whatever the service"
    );
    for c in ["cds_egress_m_a_http_8080", "cds_egress_m_b_http_8080"] {
        assert_eq!(
            gw.envoy_stat(
                GW_ADMIN,
                &format!("cluster.{c}.upstream_rq_pending_overflow")
            ),
            0,
            "{c}: the services' own clusters are not limited"
        );
    }
    drop(env);
}
