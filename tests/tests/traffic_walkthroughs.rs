//! AWS's App Mesh walkthroughs (aws/aws-app-mesh-examples, `walkthroughs/howto-*`) replayed on
//! Trellis: their resources, made through the real AWS CLI where they change, and the answers
//! their READMEs say a user sees. The colour tellers are the echo app (it answers its colour
//! first); the walkthroughs' load balancer is a client in the VPC; ECS tasks are namespaces.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::apps::{
    Pki, echo_number, start_echo, start_forwarder, start_h2c_front, start_load, start_meshed,
};
use trellis_tests::mesh::{Agent, Task, Vpc, start_gateway_envoy};
use trellis_tests::scenario::{ADMIN_PORT, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

/// The walkthroughs' `SERVICES_DOMAIN`.
const DOMAIN: &str = "default.svc.cluster.local";
const GW_ADMIN: u16 = 9902;

fn fqdn(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

fn vnode(name: &str, spec: Value) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": spec})
}

/// A colour teller's node: one listener (with the walkthroughs' /ping health check), found by
/// DNS as `HOST.DOMAIN`.
fn teller(name: &str, host: &str, port: u16, protocol: &str) -> Value {
    vnode(
        name,
        json!({"listeners": [{"portMapping": {"port": port, "protocol": protocol},
            "healthCheck": {"protocol": protocol, "path": "/ping", "healthyThreshold": 2,
                "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}],
            "serviceDiscovery": {"dns": {"hostname": fqdn(host)}}}),
    )
}

fn router(name: &str, port: u16, protocol: &str) -> Value {
    json!({"meshName": "m", "virtualRouterName": name,
        "spec": {"listeners": [{"portMapping": {"port": port, "protocol": protocol}}]}})
}

fn route(router: &str, name: &str, spec: Value) -> Value {
    json!({"meshName": "m", "virtualRouterName": router, "routeName": name, "spec": spec})
}

fn http_route(prefix: &str, targets: &[(&str, i64)]) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|(n, w)| json!({"virtualNode": n, "weight": w}))
        .collect();
    json!({"httpRoute": {"match": {"prefix": prefix}, "action": {"weightedTargets": targets}}})
}

fn routed(service: &str, router: &str) -> Value {
    json!({"meshName": "m", "virtualServiceName": service,
        "spec": {"provider": {"virtualRouter": {"virtualRouterName": router}}}})
}

fn gateway(name: &str, spec: Value) -> Value {
    json!({"meshName": "m", "virtualGatewayName": name, "spec": spec})
}

fn gateway_route(gateway: &str, name: &str, spec: Value) -> Value {
    json!({"meshName": "m", "virtualGatewayName": gateway, "gatewayRouteName": name, "spec": spec})
}

fn to_service(prefix: &str, service: &str) -> Value {
    json!({"httpRoute": {"match": {"prefix": prefix},
        "action": {"target": {"virtualService": {"virtualServiceName": service}}}}})
}

/// `aws appmesh update-… --spec` for a resource of `kind` named by `ids` (flag, value pairs).
fn update(agent: &Agent, kind: &str, ids: &[(&str, &str)], spec: &Value) {
    let mut args = vec![format!("update-{kind}"), "--mesh-name".into(), "m".into()];
    for (flag, value) in ids {
        args.push(format!("--{flag}"));
        args.push(value.to_string());
    }
    args.extend(["--spec".into(), spec.to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.appmesh(&refs);
}

/// Everything running; field order is drop order (processes before namespaces).
struct Env {
    procs: Vec<Proc>,
    tasks: Vec<(String, Task)>,
    vpc: Vpc,
    agent: Agent,
}

impl Env {
    /// The agent with `items` and VPC `id` with a task per name (host bytes from 2), each also
    /// answering to `aliases` in DNS.
    fn new(work: &Workdir, id: u8, items: &Value, tasks: &[(&str, &[String])]) -> Self {
        let agent = Agent::start(work, Some(&resources_file(work, items)));
        let mut vpc = Vpc::new(work, id);
        let tasks: Vec<(String, Task)> = tasks
            .iter()
            .zip(2u8..)
            .map(|((name, _), host)| (name.to_string(), vpc.task(name, host)))
            .collect();
        Env {
            procs: vec![],
            tasks,
            vpc,
            agent,
        }
    }

    fn dns(&mut self, work: &Workdir, aliases: &[(&str, Vec<String>)]) {
        let lines: Vec<(String, String)> = aliases
            .iter()
            .map(|(name, names)| (self.task(name).ip.clone(), names.join(" ")))
            .collect();
        let refs: Vec<(&str, &str)> = lines
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        self.vpc.start_dns(work, &refs);
    }

    fn task(&self, name: &str) -> &Task {
        self.tasks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("no task {name}"))
    }

    /// Meshes task `name` as virtual node `node` and starts the echo app on `port` answering
    /// `colour`.
    fn teller(&mut self, work: &Workdir, name: &str, node: &str, port: u16, colour: &str) {
        let p = start_meshed(work, &self.agent, "m", self.task(name), node, &[port]);
        self.procs.push(p);
        let p = start_echo(work, self.task(name), port, colour);
        self.procs.push(p);
    }

    /// Starts gateway `gateway`'s Envoy in task `name`, allowed to bind ports under 1024 as the
    /// walkthroughs' gateways did (Docker sets `ip_unprivileged_port_start=0` in containers).
    fn gateway(&mut self, work: &Workdir, name: &str, gateway: &str) {
        self.task(name)
            .exec(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
        let p = start_gateway_envoy(work, self.task(name), &self.agent, "m", gateway, GW_ADMIN);
        self.procs.push(p);
    }

    /// A GET from the VPC itself (the walkthroughs' load balancer): (status, body).
    fn get(&self, url: &str, headers: &[&str]) -> (u16, String) {
        let mut args = vec![
            "netns",
            "exec",
            &self.vpc.ns,
            "curl",
            "-sS",
            "-m",
            "40",
            "-w",
            "\n%{http_code}",
        ];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(url);
        let out = run(std::process::Command::new("ip").args(&args));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until `url` answers 200 with a body starting with `colour`.
    fn answers(&self, url: &str, headers: &[&str], colour: &str) {
        eventually(
            &format!("{url} {headers:?} answered by {colour}"),
            Duration::from_secs(30),
            || match self.get(url, headers) {
                (200, body) if body.starts_with(&format!("{colour} ")) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
}

/// howto-match-and-rewrite-at-ingress: gateway routes by prefix, hostname and query parameter,
/// with the default, disabled and custom prefix rewrites, in front of routers matching `/tell`
/// (then `/red/tell`).
#[test]
fn howto_match_and_rewrite_at_ingress() {
    if !can_run_privileged("walkthrough match and rewrite") {
        return;
    }
    let work = Workdir::new("wt-rewrite");
    let items = json!([
        {"meshName": "m"},
        teller("colorteller-red-vn", "colorteller-red", 9080, "http"),
        router("colorteller-vr-1", 9080, "http"),
        route("colorteller-vr-1", "colorteller-route-1", http_route("/tell", &[("colorteller-red-vn", 1)])),
        routed(&fqdn("colorteller-1"), "colorteller-vr-1"),
        teller("colorteller-yellow-vn", "colorteller-yellow", 9080, "http"),
        router("colorteller-vr-2", 9080, "http"),
        route("colorteller-vr-2", "colorteller-route-2", http_route("/tell", &[("colorteller-yellow-vn", 1)])),
        routed(&fqdn("colorteller-2"), "colorteller-vr-2"),
        gateway("colorgateway-vg", json!({"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]})),
        gateway_route("colorgateway-vg", "colorgateway-route-1", to_service("/red", &fqdn("colorteller-1"))),
        gateway_route("colorgateway-vg", "colorgateway-route-2", to_service("/yellow", &fqdn("colorteller-2"))),
    ]);
    let mut env = Env::new(
        &work,
        61,
        &items,
        &[("red", &[]), ("yellow", &[]), ("gw", &[])],
    );
    env.dns(
        &work,
        &[
            ("red", vec![fqdn("colorteller-red"), fqdn("colorteller-1")]),
            (
                "yellow",
                vec![fqdn("colorteller-yellow"), fqdn("colorteller-2")],
            ),
        ],
    );
    env.teller(&work, "red", "colorteller-red-vn", 9080, "red");
    env.teller(&work, "yellow", "colorteller-yellow-vn", 9080, "yellow");
    env.gateway(&work, "gw", "colorgateway-vg");
    let gw = format!("http://{}:9080", env.task("gw").ip);

    // `curl "${COLORAPP_ENDPOINT}/red/tell"`: red (prefix /red rewritten to /, not //).
    env.answers(&format!("{gw}/red/tell"), &[], "red");
    env.answers(&format!("{gw}/yellow/tell"), &[], "yellow");
    let (_, body) = env.get(&format!("{gw}/red/tell"), &[]);
    assert_eq!(body, format!("red GET /tell {}", fqdn("colorteller-1")));

    let gateway_route_1 = [
        ("virtual-gateway-name", "colorgateway-vg"),
        ("gateway-route-name", "colorgateway-route-1"),
    ];
    let route_1 = [
        ("virtual-router-name", "colorteller-vr-1"),
        ("route-name", "colorteller-route-1"),
    ];
    let target = json!({"virtualService": {"virtualServiceName": fqdn("colorteller-1")}});

    // configure-hostname-match: `-H "Host: www.example.com"` gives red.
    update(
        &env.agent,
        "gateway-route",
        &gateway_route_1,
        &json!({"httpRoute": {"match": {"prefix": "/red", "hostname": {"exact": "www.example.com"}},
            "action": {"target": target}}}),
    );
    env.answers(&format!("{gw}/red/tell"), &["Host: www.example.com"], "red");

    // disable-default-prefix-rewrite: `/red/` kept, the route matches `/red/tell`.
    update(
        &env.agent,
        "gateway-route",
        &gateway_route_1,
        &json!({"httpRoute": {"match": {"prefix": "/red/"},
            "action": {"target": target, "rewrite": {"prefix": {"defaultPrefix": "DISABLED"}}}}}),
    );
    update(
        &env.agent,
        "route",
        &route_1,
        &http_route("/red/tell", &[("colorteller-red-vn", 1)]),
    );
    env.answers(&format!("{gw}/red/tell"), &[], "red");
    let (_, body) = env.get(&format!("{gw}/red/tell"), &[]);
    assert!(body.starts_with("red GET /red/tell "), "{body}");

    // configure-query-parameter-match-rewrite: `/maroon/tell?fishes=nemo` → `/red/tell`: red.
    update(
        &env.agent,
        "gateway-route",
        &gateway_route_1,
        &json!({"httpRoute": {"match": {"prefix": "/maroon/",
                "queryParameters": [{"name": "fishes", "match": {"exact": "nemo"}}]},
            "action": {"target": target, "rewrite": {"prefix": {"value": "/red/"}}}}}),
    );
    env.answers(&format!("{gw}/maroon/tell?fishes=nemo"), &[], "red");
    let (_, body) = env.get(&format!("{gw}/maroon/tell?fishes=nemo"), &[]);
    assert!(body.starts_with("red GET /red/tell?fishes=nemo "), "{body}");
    drop(env);
}

/// howto-k8s-ingress-gateway: gateway routes `/paths` and `/headers` (no trailing slash) to two
/// routers choosing a colour by path prefix and by header.
#[test]
fn howto_k8s_ingress_gateway() {
    if !can_run_privileged("walkthrough ingress gateway") {
        return;
    }
    let work = Workdir::new("wt-ingress");
    let colours = ["white", "blue", "red", "yellow", "green"];
    let host = |c: &str| format!("color-{c}.howto-k8s-ingress-gateway.svc.cluster.local");
    let node_of = |c: &str| {
        vnode(
            c,
            json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                    "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000}}],
                "serviceDiscovery": {"dns": {"hostname": host(c)}}}),
        )
    };
    let header_route = |name: &str, priority: Option<i64>, m: Value, colour: &str| {
        let mut spec = json!({"httpRoute": {"match": {"prefix": "/"},
            "action": {"weightedTargets": [{"virtualNode": colour, "weight": 1}]}}});
        if !m.is_null() {
            spec["httpRoute"]["match"]["headers"] = json!([m]);
        }
        if let Some(p) = priority {
            spec["priority"] = json!(p);
        }
        route("color-headers", name, spec)
    };
    let path_route = |name: &str, priority: Option<i64>, prefix: &str, colour: &str| {
        let mut spec = http_route(prefix, &[(colour, 1)]);
        if let Some(p) = priority {
            spec["priority"] = json!(p);
        }
        route("color-paths", name, spec)
    };
    let ns = "howto-k8s-ingress-gateway.svc.cluster.local";
    let mut items = vec![json!({"meshName": "m"})];
    items.extend(colours.iter().map(|c| node_of(c)));
    items.extend([
        router("color-headers", 8080, "http"),
        header_route(
            "color-route-blue",
            Some(10),
            json!({"name": "color_header", "match": {"exact": "blue"}}),
            "blue",
        ),
        header_route(
            "color-route-green",
            Some(20),
            json!({"name": "color_header", "match": {"regex": ".*green.*"}}),
            "green",
        ),
        header_route(
            "color-route-red",
            Some(30),
            json!({"name": "color_header", "match": {"prefix": "red"}}),
            "red",
        ),
        header_route(
            "color-route-yellow",
            Some(40),
            json!({"name": "color_header"}),
            "yellow",
        ),
        header_route("color-route-white", None, Value::Null, "white"),
        router("color-paths", 8080, "http"),
        path_route("color-route-blue", Some(10), "/blue", "blue"),
        path_route("color-route-green", Some(20), "/green", "green"),
        path_route("color-route-red", Some(30), "/red", "red"),
        path_route("color-route-yellow", Some(40), "/yellow", "yellow"),
        path_route("color-route-white", None, "/", "white"),
        routed(&format!("color-headers.{ns}"), "color-headers"),
        routed(&format!("color-paths.{ns}"), "color-paths"),
        gateway(
            "ingress-gw",
            json!({"listeners": [{"portMapping": {"port": 8088, "protocol": "http"}}]}),
        ),
        gateway_route(
            "ingress-gw",
            "gateway-route-headers",
            to_service("/headers", &format!("color-headers.{ns}")),
        ),
        gateway_route(
            "ingress-gw",
            "gateway-route-paths",
            to_service("/paths", &format!("color-paths.{ns}")),
        ),
    ]);
    let mut names: Vec<(&str, &[String])> = colours.iter().map(|c| (*c, &[][..])).collect();
    names.push(("gw", &[]));
    let mut env = Env::new(&work, 62, &Value::Array(items), &names);
    let dns: Vec<(&str, Vec<String>)> = colours.iter().map(|c| (*c, vec![host(c)])).collect();
    env.dns(&work, &dns);
    for c in colours {
        env.teller(&work, c, c, 8080, c);
    }
    env.gateway(&work, "gw", "ingress-gw");
    let gw = format!("http://{}:8088", env.task("gw").ip);

    // `curl ${GW_ENDPOINT}/paths/red` → red, `/paths/blue` → blue, `/paths/yellow` → yellow.
    for c in ["red", "blue", "yellow"] {
        env.answers(&format!("{gw}/paths/{c}"), &[], c);
    }
    // `curl -H "color_header: blue" ${GW_ENDPOINT}/headers` → blue; `red` → red.
    for c in ["blue", "red"] {
        env.answers(
            &format!("{gw}/headers"),
            &[&format!("color_header: {c}")],
            c,
        );
    }
    drop(env);
}

/// howto-tls-file-provided: STRICT listeners with file certificates from two CAs; the gateway has
/// no client policy (TLS, unvalidated), then trusts CA 1 only (green's CA 2 certificate is
/// refused), then both.
#[test]
fn howto_tls_file_provided() {
    if !can_run_privileged("walkthrough tls file provided") {
        return;
    }
    let work = Workdir::new("wt-tls");
    let (ca1, ca2) = (Pki::new(&work, "ca_1"), Pki::new(&work, "ca_2"));
    let (white_chain, white_key) = ca1.issue("colorteller_white", &[&fqdn("colorteller")]);
    let (green_chain, green_key) = ca2.issue("colorteller_green", &[&fqdn("colorteller-green")]);
    let bundle = work.join("ca_1_ca_2_bundle.pem");
    let text =
        fs::read_to_string(ca1.ca()).expect("ca 1") + &fs::read_to_string(ca2.ca()).expect("ca 2");
    fs::write(&bundle, text).expect("write bundle");
    check(std::process::Command::new("chmod").arg("644").arg(&bundle));
    let strict = |name: &str, host: &str, chain: &str, key: &str| {
        vnode(
            name,
            json!({"listeners": [{"portMapping": {"port": 80, "protocol": "http"},
                "healthCheck": {"protocol": "http", "path": "/ping", "healthyThreshold": 2,
                    "unhealthyThreshold": 3, "timeoutMillis": 2000, "intervalMillis": 5000},
                "tls": {"mode": "STRICT",
                    "certificate": {"file": {"certificateChain": chain, "privateKey": key}}}}],
                "serviceDiscovery": {"dns": {"hostname": fqdn(host)}}}),
        )
    };
    let listeners = json!([{"portMapping": {"port": 80, "protocol": "http"}}]);
    let items = json!([
        {"meshName": "m"},
        gateway("ColorGateway", json!({"listeners": listeners})),
        gateway_route("ColorGateway", "gateway-gr", to_service("/", &fqdn("colorteller"))),
        strict("ColorTellerWhite", "colorteller", &white_chain, &white_key),
        strict("ColorTellerGreen", "colorteller-green", &green_chain, &green_key),
        router("ColorTellerVirtualRouter", 80, "http"),
        route("ColorTellerVirtualRouter", "ColorTellerRoute",
            http_route("/", &[("ColorTellerWhite", 1), ("ColorTellerGreen", 0)])),
        routed(&fqdn("colorteller"), "ColorTellerVirtualRouter"),
    ]);
    let mut env = Env::new(
        &work,
        63,
        &items,
        &[("white", &[]), ("green", &[]), ("gw", &[])],
    );
    env.dns(
        &work,
        &[
            ("white", vec![fqdn("colorteller")]),
            ("green", vec![fqdn("colorteller-green")]),
        ],
    );
    env.teller(&work, "white", "ColorTellerWhite", 80, "white");
    env.teller(&work, "green", "ColorTellerGreen", 80, "green");
    env.gateway(&work, "gw", "ColorGateway");
    let url = format!("http://{}:80/color", env.task("gw").ip);

    // Step 5: white, over TLS ("listener.0.0.0.0_15000.ssl.handshake: 1").
    env.answers(&url, &[], "white");
    assert!(
        env.task("white")
            .envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.handshake")
            >= 1
    );
    let colours = |n: usize| -> Vec<(u16, String)> {
        (0..n)
            .map(|_| {
                let (code, body) = env.get(&url, &[]);
                (code, body.split(' ').next().unwrap_or_default().to_string())
            })
            .collect()
    };
    let seen = |answers: &[(u16, String)]| -> BTreeSet<String> {
        answers
            .iter()
            .map(|(c, b)| if *c == 200 { b.clone() } else { c.to_string() })
            .collect()
    };
    let update_route = |green: i64| {
        update(
            &env.agent,
            "route",
            &[
                ("virtual-router-name", "ColorTellerVirtualRouter"),
                ("route-name", "ColorTellerRoute"),
            ],
            &http_route("/", &[("ColorTellerWhite", 1), ("ColorTellerGreen", green)]),
        );
    };
    let update_gateway = |trust: &str| {
        update(
            &env.agent,
            "virtual-gateway",
            &[("virtual-gateway-name", "ColorGateway")],
            &json!({"listeners": listeners, "backendDefaults": {"clientPolicy": {"tls": {
                "enforce": true, "validation": {"trust": {"file": {"certificateChain": trust}}}}}}}),
        );
    };

    // Step 6, addGreen: both white and green (green's CA 2 is not validated: no client policy).
    update_route(1);
    eventually(
        "white and green both answer",
        Duration::from_secs(30),
        || match seen(&colours(20)) {
            s if s == BTreeSet::from(["white".into(), "green".into()]) => Ok(()),
            s => Err(format!("{s:?}")),
        },
    );

    // Step 7, updateGateway: only CA 1 trusted: white works, green fails.
    update_gateway(&ca1.ca());
    eventually(
        "green refused, white served",
        Duration::from_secs(30),
        || match seen(&colours(20)) {
            s if s == BTreeSet::from(["white".into(), "503".into()]) => Ok(()),
            s => Err(format!("{s:?}")),
        },
    );
    let gw = env.task("gw");
    assert!(
        gw.envoy_stat(
            GW_ADMIN,
            "cluster.cds_egress_m_ColorTellerGreen_http_80.ssl.fail_verify_error"
        ) >= 1
    );

    // Step 8, updateGateway2: the bundle of both CAs: white and green again. The client policy
    // names no SAN: each certificate names its own node's DNS hostname.
    update_gateway(&bundle.display().to_string());
    eventually(
        "white and green both answer again",
        Duration::from_secs(30),
        || match seen(&colours(20)) {
            s if s == BTreeSet::from(["white".into(), "green".into()]) => Ok(()),
            s => Err(format!("{s:?}")),
        },
    );
    drop(env);
}

/// `n` slow GETs at once from the VPC: (url, headers) each; their statuses, in order.
fn at_once(env: &Env, calls: &[(String, Vec<String>)]) -> Vec<u16> {
    std::thread::scope(|s| {
        let handles: Vec<_> = calls
            .iter()
            .map(|(url, headers)| {
                s.spawn(move || {
                    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
                    env.get(url, &h).0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    })
}

/// howto-timeout-policy: the 15 s default, a route's 5 s, 20 s on the route and both listeners
/// (a 17 s request succeeds once: no per-try timeout cuts it), the same through a virtual gateway,
/// then two routes with 18 s and 10 s.
#[test]
fn howto_timeout_policy() {
    if !can_run_privileged("walkthrough timeout policy") {
        return;
    }
    let work = Workdir::new("wt-timeout");
    let vs = fqdn("colorteller");
    let http80 = |timeout: Option<i64>| {
        let mut l = json!({"portMapping": {"port": 80, "protocol": "http"}});
        if let Some(s) = timeout {
            l["timeout"] = json!({"http": {"perRequest": {"value": s, "unit": "s"}}});
        }
        l
    };
    let colorgateway = |timeout: Option<i64>| {
        json!({"listeners": [http80(timeout)],
            "serviceDiscovery": {"dns": {"hostname": fqdn("colorgateway")}},
            "backends": [{"virtualService": {"virtualServiceName": vs}}]})
    };
    let white = |timeout: Option<i64>| {
        let mut l = http80(timeout);
        l["healthCheck"] = json!({"protocol": "http", "path": "/ping", "healthyThreshold": 2,
            "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000});
        json!({"listeners": [l], "serviceDiscovery": {"dns": {"hostname": fqdn("colorteller-white")}}})
    };
    let teller_route = |prefix: &str, node: &str, timeout: Option<i64>| {
        let mut r = json!({"httpRoute": {"action": {"weightedTargets": [{"virtualNode": node, "weight": 1}]},
            "match": {"prefix": prefix}}});
        if let Some(s) = timeout {
            r["httpRoute"]["timeout"] = json!({"perRequest": {"value": s, "unit": "s"}});
        }
        r
    };
    let items = json!([
        {"meshName": "m"},
        vnode("ColorGateway", colorgateway(None)),
        vnode("ColorTellerWhite", white(None)),
        router("colorteller-vr", 80, "http"),
        route("colorteller-vr", "colorteller-route", teller_route("/", "ColorTellerWhite", None)),
        routed(&vs, "colorteller-vr"),
    ]);
    let mut env = Env::new(
        &work,
        64,
        &items,
        &[
            ("colorgateway", &[]),
            ("white", &[]),
            ("red", &[]),
            ("publicgw", &[]),
        ],
    );
    env.dns(
        &work,
        &[
            ("colorgateway", vec![fqdn("colorgateway")]),
            ("white", vec![fqdn("colorteller-white"), vs.clone()]),
            ("red", vec![fqdn("colorteller-red")]),
        ],
    );
    env.teller(&work, "white", "ColorTellerWhite", 80, "white");
    let p = start_meshed(
        &work,
        &env.agent,
        "m",
        env.task("colorgateway"),
        "ColorGateway",
        &[80],
    );
    env.procs.push(p);
    let p = start_forwarder(
        &work,
        env.task("colorgateway"),
        80,
        &format!("http://{vs}:80"),
    );
    env.procs.push(p);
    let app = format!("http://{}:80/color", env.task("colorgateway").ip);
    let latency = |s: u32| vec![format!("Latency: {s}")];

    // Step 6: 7 s succeeds, 17 s times out (the 15 s default).
    env.answers(&app, &[], "white");
    let codes = at_once(
        &env,
        &[(app.clone(), latency(7)), (app.clone(), latency(17))],
    );
    assert_eq!(codes, [200, 504], "7 s fine, 17 s past the 15 s default");

    // The route at 5 s: 7 s times out.
    let route_id = [
        ("virtual-router-name", "colorteller-vr"),
        ("route-name", "colorteller-route"),
    ];
    update(
        &env.agent,
        "route",
        &route_id,
        &teller_route("/", "ColorTellerWhite", Some(5)),
    );
    eventually(
        "the 5 s route timeout",
        Duration::from_secs(30),
        || match env.get(&app, &["Latency: 7"]).0 {
            504 => Ok(()),
            other => Err(format!("{other}")),
        },
    );

    // 20 s on the route and on both nodes' listeners: 17 s succeeds (once: no per-try timeout).
    update(
        &env.agent,
        "route",
        &route_id,
        &teller_route("/", "ColorTellerWhite", Some(20)),
    );
    update(
        &env.agent,
        "virtual-node",
        &[("virtual-node-name", "ColorGateway")],
        &colorgateway(Some(20)),
    );
    update(
        &env.agent,
        "virtual-node",
        &[("virtual-node-name", "ColorTellerWhite")],
        &white(Some(20)),
    );
    let before = echo_number(env.task("white"), 80, "/count/color");
    let tries = std::cell::Cell::new(0);
    eventually("17 s within 20 s", Duration::from_secs(90), || {
        tries.set(tries.get() + 1);
        match env.get(&app, &["Latency: 17"]) {
            (200, body) if body.starts_with("white ") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(
        echo_number(env.task("white"), 80, "/count/color") - before,
        tries.get(),
        "one attempt per request: no per-try timeout cut the 17 s short"
    );

    // A virtual gateway in front instead: the same timeouts hold.
    for item in [
        gateway(
            "publicgateway-vg",
            json!({"listeners": [{"portMapping": {"port": 80, "protocol": "http"}}]}),
        ),
        gateway_route(
            "publicgateway-vg",
            "publicgateway-route",
            to_service("/", &vs),
        ),
    ] {
        create(&env.agent, &item);
    }
    env.gateway(&work, "publicgw", "publicgateway-vg");
    let vg = format!("http://{}:80", env.task("publicgw").ip);
    env.answers(&format!("{vg}/color"), &[], "white");
    assert_eq!(env.get(&format!("{vg}/color"), &["Latency: 17"]).0, 200);

    // add_red_node_and_routes: /color1 → white, /color2 → red.
    create(
        &env.agent,
        &vnode(
            "ColorTellerRed",
            json!({"listeners": [http80(None)],
        "serviceDiscovery": {"dns": {"hostname": fqdn("colorteller-red")}}}),
        ),
    );
    env.teller(&work, "red", "ColorTellerRed", 80, "red");
    env.agent.appmesh(&[
        "delete-route",
        "--mesh-name",
        "m",
        "--virtual-router-name",
        "colorteller-vr",
        "--route-name",
        "colorteller-route",
    ]);
    create(
        &env.agent,
        &route(
            "colorteller-vr",
            "colorteller-route",
            teller_route("/color1", "ColorTellerWhite", None),
        ),
    );
    create(
        &env.agent,
        &route(
            "colorteller-vr",
            "colorteller-route2",
            teller_route("/color2", "ColorTellerRed", None),
        ),
    );
    env.answers(&format!("{vg}/color1"), &[], "white");
    env.answers(&format!("{vg}/color2"), &[], "red");

    // 18 s for /color1 (route and white's listener), 10 s for /color2.
    update(
        &env.agent,
        "route",
        &route_id,
        &teller_route("/color1", "ColorTellerWhite", Some(18)),
    );
    update(
        &env.agent,
        "virtual-node",
        &[("virtual-node-name", "ColorTellerWhite")],
        &white(Some(18)),
    );
    update(
        &env.agent,
        "route",
        &[
            ("virtual-router-name", "colorteller-vr"),
            ("route-name", "colorteller-route2"),
        ],
        &teller_route("/color2", "ColorTellerRed", Some(10)),
    );
    eventually(
        "/color2 times out at 10 s",
        Duration::from_secs(60),
        || match env.get(&format!("{vg}/color2"), &["Latency: 12"]).0 {
            504 => Ok(()),
            other => Err(format!("{other}")),
        },
    );
    let codes = at_once(
        &env,
        &[
            (format!("{vg}/color1"), latency(17)),
            (format!("{vg}/color2"), latency(5)),
            (format!("{vg}/color1"), latency(20)),
            (format!("{vg}/color2"), latency(12)),
        ],
    );
    assert_eq!(codes, [200, 200, 504, 504]);
    drop(env);
}

/// `aws appmesh create-…` for one resources-file item.
fn create(agent: &Agent, item: &Value) {
    let obj = item.as_object().expect("an item");
    let (kind, ids): (&str, Vec<(&str, &str)>) = if obj.contains_key("gatewayRouteName") {
        (
            "gateway-route",
            vec![
                ("virtual-gateway-name", "virtualGatewayName"),
                ("gateway-route-name", "gatewayRouteName"),
            ],
        )
    } else if obj.contains_key("routeName") {
        (
            "route",
            vec![
                ("virtual-router-name", "virtualRouterName"),
                ("route-name", "routeName"),
            ],
        )
    } else if obj.contains_key("virtualGatewayName") {
        (
            "virtual-gateway",
            vec![("virtual-gateway-name", "virtualGatewayName")],
        )
    } else if obj.contains_key("virtualNodeName") {
        (
            "virtual-node",
            vec![("virtual-node-name", "virtualNodeName")],
        )
    } else {
        panic!("no create for {item}")
    };
    let mut args = vec![format!("create-{kind}"), "--mesh-name".into(), "m".into()];
    for (flag, key) in ids {
        args.push(format!("--{flag}"));
        args.push(obj[key].as_str().expect("a name").to_string());
    }
    args.extend(["--spec".into(), obj["spec"].to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.appmesh(&refs);
}

/// howto-circuit-breakers: a gateway in front of white (http) and black (http2). The gateway's
/// pool (100 connections, 10,000 queued) opens its connection breaker at the 101st connection on
/// its `self_redirect` cluster; white's pool (10 connections, 5 queued) and black's (10
/// requests) open theirs on their ingress clusters.
#[test]
fn howto_circuit_breakers() {
    if !can_run_privileged("walkthrough circuit breakers") {
        return;
    }
    let work = Workdir::new("wt-breakers");
    let white = |pool: Value| {
        let mut n = teller("colorteller-white-vn", "colorteller-white", 9080, "http");
        if !pool.is_null() {
            n["spec"]["listeners"][0]["connectionPool"] = pool;
        }
        n
    };
    let black = |pool: Value| {
        let mut n = teller("colorteller-black-vn", "colorteller-black", 9080, "http2");
        if !pool.is_null() {
            n["spec"]["listeners"][0]["connectionPool"] = pool;
        }
        n
    };
    let vg = |pool: Value| {
        let mut l = json!({"portMapping": {"port": 9080, "protocol": "http"}});
        if !pool.is_null() {
            l["connectionPool"] = pool;
        }
        json!({"listeners": [l]})
    };
    let items = json!([
        {"meshName": "m"},
        white(Value::Null),
        black(Value::Null),
        router("colorteller-vr-1", 9080, "http"),
        route("colorteller-vr-1", "colorteller-route-1", http_route("/tell", &[("colorteller-white-vn", 1)])),
        router("colorteller-vr-2", 9080, "http2"),
        route("colorteller-vr-2", "colorteller-route-2", json!({"http2Route": {"match": {"prefix": "/tell"},
            "action": {"weightedTargets": [{"virtualNode": "colorteller-black-vn", "weight": 1}]}}})),
        routed(&fqdn("colorteller-1"), "colorteller-vr-1"),
        routed(&fqdn("colorteller-2"), "colorteller-vr-2"),
        gateway("colorgateway-vg", vg(Value::Null)),
        gateway_route("colorgateway-vg", "colorgateway-route-1", to_service("/color1", &fqdn("colorteller-1"))),
        gateway_route("colorgateway-vg", "colorgateway-route-2", to_service("/color2", &fqdn("colorteller-2"))),
    ]);
    let mut env = Env::new(
        &work,
        65,
        &items,
        &[("white", &[]), ("black", &[]), ("gw", &[]), ("wrk", &[])],
    );
    env.dns(
        &work,
        &[
            (
                "white",
                vec![fqdn("colorteller-white"), fqdn("colorteller-1")],
            ),
            (
                "black",
                vec![fqdn("colorteller-black"), fqdn("colorteller-2")],
            ),
        ],
    );
    env.teller(&work, "white", "colorteller-white-vn", 9080, "white");
    // Black serves HTTP/2: an h2c front on 9080 before the echo app on 9081.
    let p = start_meshed(
        &work,
        &env.agent,
        "m",
        env.task("black"),
        "colorteller-black-vn",
        &[9080],
    );
    env.procs.push(p);
    let p = start_echo(&work, env.task("black"), 9081, "black");
    env.procs.push(p);
    let p = start_h2c_front(&work, env.task("black"), 9080, 9903, 9081);
    env.procs.push(p);
    env.gateway(&work, "gw", "colorgateway-vg");
    let gw_ip = env.task("gw").ip.clone();
    let gw = format!("http://{gw_ip}:9080");
    // Step 4 of the README: `/color1/tell` → white, `/color2/tell` → black.
    env.answers(&format!("{gw}/color1/tell"), &[], "white");
    env.answers(&format!("{gw}/color2/tell"), &[], "black");

    let (gw_task, white_task, black_task, wrk) = (
        env.task("gw"),
        env.task("white"),
        env.task("black"),
        env.task("wrk"),
    );
    // Waits until every gauge of `task`'s Envoy has its value: the breaker is open.
    let saturated = |task: &Task, admin: u16, want: &[(String, u64)]| {
        eventually("the breaker open", Duration::from_secs(60), || {
            let got: Vec<u64> = want
                .iter()
                .map(|(n, _)| task.envoy_stat(admin, n))
                .collect();
            if got.iter().zip(want).all(|(g, (_, w))| g == w) {
                Ok(())
            } else {
                Err(format!("{want:?}: {got:?}"))
            }
        });
    };
    // Waits until `task`'s Envoy has a cluster with `needle` in its config.
    let in_place = |task: &Task, needle: &str| {
        eventually("the pool in place", Duration::from_secs(30), || {
            let dump = check(&mut task.cmd(&[
                "curl",
                "-sf",
                &format!(
                    "http://127.0.0.1:{ADMIN_PORT}/config_dump?resource=dynamic_active_clusters"
                ),
            ]));
            if dump.contains(needle) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        });
    };

    // Step 5.3: the gateway's pool (100 connections, 10,000 queued) and 101 connections: 100
    // upstream connections, the connection breaker open, the 101st queued and served.
    update(
        &env.agent,
        "virtual-gateway",
        &[("virtual-gateway-name", "colorgateway-vg")],
        &vg(json!({"http": {"maxConnections": 100, "maxPendingRequests": 10000}})),
    );
    let redirect = "cluster.cds_ingress_m_colorgateway-vg_self_redirect_http_15001";
    eventually(
        "the gateway's pool in place",
        Duration::from_secs(30),
        || {
            let through = gw_task.envoy_stat(GW_ADMIN, &format!("{redirect}.upstream_rq_total"));
            match env.get(&format!("{gw}/color1/tell"), &[]).0 {
                200 if through > 0 => Ok(()),
                other => Err(format!("{other}, {through} through the pool")),
            }
        },
    );
    let load = start_load(&work, wrk, (&gw_ip, 9080), "gw", "/color1/tell/hold", 101);
    saturated(
        gw_task,
        GW_ADMIN,
        &[
            (format!("{redirect}.upstream_cx_active"), 100),
            (format!("{redirect}.circuit_breakers.default.cx_open"), 1),
        ],
    );
    echo_number(white_task, 9080, "/release");
    assert_eq!(
        load.statuses(Duration::from_secs(60))
            .into_iter()
            .collect::<Vec<_>>(),
        [(200, 101)],
        "the 101st waits in the 10,000-request queue"
    );

    // Step 5.4: white's pool (10 connections, 5 queued) and 50 connections: its ingress cluster
    // holds 5 pending requests with both breakers open; the rest overflow (503).
    echo_number(white_task, 9080, "/arm");
    update(
        &env.agent,
        "virtual-node",
        &[("virtual-node-name", "colorteller-white-vn")],
        &white(json!({"http": {"maxConnections": 10, "maxPendingRequests": 5}}))["spec"],
    );
    in_place(white_task, "\"max_pending_requests\": 5");
    let load = start_load(&work, wrk, (&gw_ip, 9080), "gw", "/color1/tell/hold", 50);
    let white_ingress = "cluster.cds_ingress_m_colorteller-white-vn_http_9080";
    saturated(
        white_task,
        ADMIN_PORT,
        &[
            (format!("{white_ingress}.upstream_rq_pending_active"), 5),
            (
                format!("{white_ingress}.circuit_breakers.default.cx_open"),
                1,
            ),
            (
                format!("{white_ingress}.circuit_breakers.default.rq_pending_open"),
                1,
            ),
        ],
    );
    echo_number(white_task, 9080, "/release");
    let statuses = load.statuses(Duration::from_secs(60));
    assert!(
        statuses.keys().all(|c| [200, 503].contains(c))
            && statuses.get(&200).is_some_and(|n| *n >= 15)
            && statuses.contains_key(&503),
        "15 admitted at least, the rest overflow: {statuses:?}"
    );

    // Step 5.5: black's http2 pool (10 requests) and 50 connections: 10 requests active, the
    // request breaker open.
    echo_number(black_task, 9081, "/arm");
    update(
        &env.agent,
        "virtual-node",
        &[("virtual-node-name", "colorteller-black-vn")],
        &black(json!({"http2": {"maxRequests": 10}}))["spec"],
    );
    in_place(black_task, "\"max_requests\": 10");
    let load = start_load(&work, wrk, (&gw_ip, 9080), "gw", "/color2/tell/hold", 50);
    let black_ingress = "cluster.cds_ingress_m_colorteller-black-vn_http2_9080";
    saturated(
        black_task,
        ADMIN_PORT,
        &[
            (format!("{black_ingress}.upstream_rq_active"), 10),
            (
                format!("{black_ingress}.circuit_breakers.default.rq_open"),
                1,
            ),
        ],
    );
    echo_number(black_task, 9081, "/release");
    let statuses = load.statuses(Duration::from_secs(60));
    assert!(
        statuses.keys().all(|c| [200, 503].contains(c))
            && statuses.get(&200).is_some_and(|n| *n >= 10)
            && statuses.contains_key(&503),
        "10 admitted at least, the rest overflow: {statuses:?}"
    );
    drop(env);
}
