//! `trellis-agent explain` agrees with real Envoy: requests over App Mesh's colorapp mesh and over
//! a randomly generated mesh are explained (online, signed, against the agent the Envoys run
//! from; and offline on the same resources file) and then sent through the caller's real Envoy.
//! The upstream that answered must be the one explain predicted — for a weighted route, every
//! answer from one of the predicted targets, in the predicted shares — and a local reply must
//! carry the predicted status.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::auth::REGION;
use trellis_tests::mesh::{Agent, Task, Vpc, start_gateway_envoy};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Proc, Workdir, bin, can_run_privileged, check, eventually, run};

const PORT: u16 = 9080;
/// Requests sent per weighted prediction; per single-target or refused prediction, a few.
const WEIGHTED_SAMPLES: usize = 600;
const PLAIN_SAMPLES: usize = 3;

/// What explain says the request comes to.
#[derive(Debug, Clone, PartialEq)]
enum Predicted {
    /// Answered by one of these virtual nodes, with these shares.
    Nodes(BTreeMap<String, f64>),
    /// Envoy answers itself with this status.
    Status(u16),
    /// Envoy closes the connection.
    Closed,
}

fn predicted(e: &Value) -> Predicted {
    let o = &e["outcome"];
    match o["kind"].as_str() {
        Some("forwarded") => {
            let mut nodes = BTreeMap::new();
            for t in o["targets"].as_array().expect("targets") {
                let node = t["virtualNode"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a target without a virtual node: {t}"));
                *nodes.entry(node.to_string()).or_insert(0.0) +=
                    t["share"].as_f64().expect("share");
            }
            Predicted::Nodes(nodes)
        }
        Some("localReply") => Predicted::Status(o["status"].as_u64().expect("status") as u16),
        Some("closed") => Predicted::Closed,
        _ => panic!("unexpected outcome: {o}"),
    }
}

/// The proxy explain is asked about: `--virtual-node N` or `--virtual-gateway G`.
#[derive(Clone, Copy)]
enum Proxy<'a> {
    Node(&'a str),
    Gateway(&'a str),
}

/// `trellis-agent explain … --output json`: online against `agent` (signed with its
/// administrator key when it runs with `--api-auth`), or offline on `resources`.
fn explain(
    agent: &Agent,
    resources: Option<&std::path::Path>,
    mesh: &str,
    proxy: Proxy<'_>,
    url: &str,
    headers: &[String],
) -> Value {
    let mut c = Command::new(bin("trellis-agent"));
    c.args(["explain", "--mesh", mesh]);
    match proxy {
        Proxy::Node(n) => c.args(["--virtual-node", n]),
        Proxy::Gateway(g) => c.args(["--virtual-gateway", g]),
    };
    c.args([url, "--output", "json", "--api-addr", &agent.api]);
    for h in headers {
        c.args(["-H", h]);
    }
    if let Some(r) = resources {
        c.arg("--resources").arg(r);
    }
    c.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_REGION", REGION);
    if let Some(a) = &agent.auth {
        c.env("AWS_ACCESS_KEY_ID", &a.key.id)
            .env("AWS_SECRET_ACCESS_KEY", &a.key.secret);
    }
    let out = check(&mut c);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain printed no JSON ({e}): {out}"))
}

/// Sends the request `n` times from `task` (one curl): (status, body) per request, status 0 when
/// the connection failed.
fn send(task: &Task, url: &str, headers: &[String], n: usize) -> Vec<(u16, String)> {
    let mut args = vec!["curl", "-s", "-m", "10", "-w", " %{http_code}\\n"];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    args.extend(std::iter::repeat_n(url, n));
    let out = run(&mut task.cmd(&args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let answers: Vec<(u16, String)> = text
        .lines()
        .map(|l| {
            let (body, status) = l.rsplit_once(' ').unwrap_or(("", l));
            (status.trim().parse().unwrap_or(0), body.to_string())
        })
        .collect();
    assert_eq!(answers.len(), n, "one answer per request:\n{text}");
    answers
}

/// Sends the request through the caller's Envoy and checks the answers against `p`.
fn agrees(task: &Task, url: &str, headers: &[String], p: &Predicted, what: &str) {
    match p {
        Predicted::Nodes(nodes) if nodes.len() > 1 => {
            let n = WEIGHTED_SAMPLES;
            let answers = send(task, url, headers, n);
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (status, body) in &answers {
                assert!(
                    *status == 200 && nodes.contains_key(body),
                    "{what}: explain predicted {nodes:?}, Envoy answered {status} {body:?}"
                );
                *counts.entry(body.as_str()).or_default() += 1;
            }
            for (node, share) in nodes {
                let got = counts.get(node.as_str()).copied().unwrap_or(0) as f64;
                let expected = share * n as f64;
                // Binomial: five standard deviations, so a correct prediction fails about once
                // in 1.7 million checks.
                let sd = (n as f64 * share * (1.0 - share)).sqrt();
                assert!(
                    (got - expected).abs() <= 5.0 * sd + 1.0,
                    "{what}: {node} answered {got} of {n}, explain predicted a share of {share} \
                     ({expected:.0}); all answers: {counts:?}"
                );
            }
        }
        Predicted::Nodes(nodes) => {
            let node = nodes.keys().next().expect("a target");
            for (status, body) in send(task, url, headers, PLAIN_SAMPLES) {
                assert_eq!(
                    (status, body.as_str()),
                    (200, node.as_str()),
                    "{what}: explain predicted {node}"
                );
            }
        }
        Predicted::Status(s) => {
            for (status, body) in send(task, url, headers, PLAIN_SAMPLES) {
                assert_eq!(
                    status, *s,
                    "{what}: explain predicted Envoy's own {s}, got {status} {body:?}"
                );
            }
        }
        Predicted::Closed => {
            for (status, body) in send(task, url, headers, PLAIN_SAMPLES) {
                assert_eq!(
                    status, 0,
                    "{what}: explain predicted a closed connection, got {status} {body:?}"
                );
            }
        }
    }
}

/// A node serving HTTP on `PORT`, found by DNS as `NAME.trellis.test`.
fn serving_node(mesh: &str, name: &str, extra: Value) -> Value {
    let mut spec = json!({
        "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"meshName": mesh, "virtualNodeName": name, "spec": spec})
}

fn fixture(name: &str) -> Value {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/colorapp")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).expect("read fixture")).expect("fixture JSON")
}

/// Waits until the caller's Envoy reaches every node through its own service.
fn warm(task: &Task, services: &[(&str, &str)]) {
    for (url, node) in services {
        eventually(
            &format!("{url} answered by {node}"),
            Duration::from_secs(30),
            || match task.http_get(None, url) {
                Ok(body) if body == *node => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
}

#[test]
fn explain_predicts_what_envoy_does_over_the_colorapp_mesh() {
    if !can_run_privileged("explain over colorapp") {
        return;
    }
    let work = Workdir::new("explain-colorapp");
    const M: &str = "appmesh-mesh";
    // App Mesh's colorapp fixtures as they are, but each node found by DNS in the test VPC.
    let mut items = vec![fixture("mesh.json")];
    for node in ["white", "blue", "red"] {
        let mut vn = fixture(&format!("colorteller-{node}-vn.json"));
        vn["spec"]["serviceDiscovery"]["dns"]["hostname"] =
            json!(format!("colorteller-{node}-vn.trellis.test"));
        items.push(vn);
    }
    let mut gw_vn = fixture("colorgateway-vn.json");
    gw_vn["spec"]["serviceDiscovery"]["dns"]["hostname"] = json!("colorgateway-vn.trellis.test");
    items.push(gw_vn);
    for f in [
        "colorteller-vr.json",
        "colorteller-route.json",
        "colorteller-vs.json",
        "colorgateway-vs.json",
        "ingress-gw.json",
        "gateway-route.json",
    ] {
        items.push(fixture(f));
    }
    let resources = resources_file(&work, &Value::Array(items));
    let agent = Agent::start_secured(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 71);
    let white = vpc.task("white", 3);
    let blue = vpc.task("blue", 4);
    let red = vpc.task("red", 5);
    let colorgw = vpc.task("colorgw", 6);
    let ingress = vpc.task("ingress", 7);
    let client = vpc.task("client", 8);
    vpc.start_dns(
        &work,
        &[
            (
                &white.ip,
                "colorteller-white-vn.trellis.test colorteller.default.svc.cluster.local",
            ),
            // Not colorgateway's own address: a task's calls to itself take the loopback
            // interface, which App Mesh's iptables rules leave alone (Envoy never sees them).
            (
                &blue.ip,
                "colorteller-blue-vn.trellis.test colorgateway.default.svc.cluster.local",
            ),
            (&red.ip, "colorteller-red-vn.trellis.test"),
            (&colorgw.ip, "colorgateway-vn.trellis.test"),
        ],
    );
    let specs = [
        ("colorteller-white-vn", &white),
        ("colorteller-blue-vn", &blue),
        ("colorteller-red-vn", &red),
        ("colorgateway-vn", &colorgw),
    ]
    .map(|(node, task)| {
        (
            task,
            TaskSpec {
                name: node,
                node,
                app: Some((PORT, node)),
            },
        )
    });
    let tasks: Vec<(&Task, &TaskSpec<'_>)> = specs.iter().map(|(t, s)| (*t, s)).collect();
    let mut procs: Vec<Proc> = start_tasks(&work, &agent, M, &tasks, &|_| {});
    procs.push(start_gateway_envoy(
        &work,
        &ingress,
        &agent,
        M,
        "ingress-gw",
        9901,
    ));

    let teller = "http://colorteller.default.svc.cluster.local:9080/";
    eventually(
        "colorgateway reaches the colortellers",
        Duration::from_secs(30),
        || colorgw.http_get(None, teller).map(|_| ()),
    );
    let gw_url = format!("http://{}:8080/color", ingress.ip);
    eventually(
        "the ingress gateway reaches colorgateway",
        Duration::from_secs(30),
        || match client.http_get(None, &gw_url) {
            Ok(b) if b == "colorgateway-vn" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let node_cases: &[(&str, &[&str])] = &[
        (teller, &[]),
        (
            "http://colorteller.default.svc.cluster.local:9080/ping",
            &["x-any: 1"],
        ),
        // Not a backend of colorgateway-vn: refused under the mesh's DROP_ALL.
        ("http://colorgateway.default.svc.cluster.local:9080/", &[]),
    ];
    let mut forwarded = 0;
    for (url, headers) in node_cases {
        let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        let online = explain(
            &agent,
            None,
            M,
            Proxy::Node("colorgateway-vn"),
            url,
            &headers,
        );
        let offline = explain(
            &agent,
            Some(&resources),
            M,
            Proxy::Node("colorgateway-vn"),
            url,
            &headers,
        );
        let p = predicted(&online);
        assert_eq!(p, predicted(&offline), "online and offline agree on {url}");
        if let Predicted::Nodes(n) = &p {
            forwarded += 1;
            assert_eq!(n.len(), 3, "the route's three colortellers: {online}");
        }
        agrees(
            &colorgw,
            url,
            &headers,
            &p,
            &format!("colorgateway-vn → {url}"),
        );
    }
    assert_eq!(forwarded, 2, "both colorteller requests are forwarded");

    let gw_cases = [
        format!("http://{}:8080/color", ingress.ip),
        format!("http://{}:8080/other", ingress.ip),
    ];
    let mut seen = Vec::new();
    for url in &gw_cases {
        let e = explain(&agent, None, M, Proxy::Gateway("ingress-gw"), url, &[]);
        let p = predicted(&e);
        agrees(&client, url, &[], &p, &format!("ingress-gw ← {url}"));
        seen.push(p);
    }
    assert_eq!(
        seen[0],
        Predicted::Nodes(BTreeMap::from([("colorgateway-vn".to_string(), 1.0)])),
        "/color goes to colorgateway"
    );
    drop(procs);
}

/// splitmix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len())]
    }
}

const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];

/// A router route with random matches, priority and weighted targets.
fn random_route(rng: &mut Rng) -> Value {
    let mut m = serde_json::Map::new();
    if rng.chance(20) {
        m.insert(
            "path".into(),
            json!({"exact": rng.pick(&["/a", "/b/c", "/"])}),
        );
    } else {
        m.insert("prefix".into(), json!(rng.pick(&["/", "/a", "/a/b", "/b"])));
    }
    if rng.chance(40) {
        let how = match rng.below(3) {
            0 => json!({"exact": rng.pick(&["v1", "v2"])}),
            1 => json!({"prefix": "v"}),
            _ => json!({"suffix": "2"}),
        };
        m.insert(
            "headers".into(),
            json!([{"name": "x-h", "invert": rng.chance(25), "match": how}]),
        );
    }
    if rng.chance(15) {
        m.insert("method".into(), json!(rng.pick(&["GET", "POST"])));
    }
    if rng.chance(20) {
        m.insert(
            "queryParameters".into(),
            json!([{"name": "q", "match": {"exact": rng.pick(&["1", "2"])}}]),
        );
    }
    let mut nodes = NODES.to_vec();
    let k = 1 + rng.below(3);
    let targets: Vec<Value> = (0..k)
        .map(|_| {
            let node = nodes.remove(rng.below(nodes.len()));
            json!({"virtualNode": node, "weight": 1 + rng.below(4)})
        })
        .collect();
    let mut spec = json!({"httpRoute": {"match": m, "action": {"weightedTargets": targets}}});
    if rng.chance(50) {
        spec["priority"] = json!(rng.below(4));
    }
    spec
}

#[test]
fn explain_predicts_what_envoy_does_over_a_random_mesh() {
    if !can_run_privileged("explain over a random mesh") {
        return;
    }
    let seed = std::env::var("TRELLIS_EXPLAIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("random mesh seed {seed} (rerun with TRELLIS_EXPLAIN_SEED={seed})");
    let mut rng = Rng(seed);
    let work = Workdir::new("explain-random");
    let mut items = vec![json!({"meshName": "m"})];
    let mut backends = vec![json!({"virtualService": {"virtualServiceName": "svc.local"}})];
    for n in NODES {
        items.push(serving_node("m", n, json!({})));
        let service = format!("{n}.local");
        items.push(json!({"meshName": "m", "virtualServiceName": service,
            "spec": {"provider": {"virtualNode": {"virtualNodeName": n}}}}));
        backends.push(json!({"virtualService": {"virtualServiceName": service}}));
    }
    items
        .push(json!({"meshName": "m", "virtualNodeName": "front", "spec": {"backends": backends}}));
    items.push(json!({"meshName": "m", "virtualRouterName": "vr",
        "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}}));
    items.push(json!({"meshName": "m", "virtualServiceName": "svc.local",
        "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}}));
    let routes = 2 + rng.below(4);
    for i in 0..routes {
        items.push(json!({"meshName": "m", "virtualRouterName": "vr",
            "routeName": format!("r{i}"), "spec": random_route(&mut rng)}));
    }
    eprintln!(
        "routes: {}",
        serde_json::to_string_pretty(&items[items.len() - routes..]).unwrap_or_default()
    );
    let resources = resources_file(&work, &Value::Array(items));
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 72);
    let front = vpc.task("front", 2);
    let tasks: Vec<Task> = NODES
        .iter()
        .enumerate()
        .map(|(i, n)| vpc.task(n, 3 + i as u8))
        .collect();
    let mut hosts: Vec<(String, String)> = NODES
        .iter()
        .zip(&tasks)
        .map(|(n, t)| (t.ip.clone(), format!("{n}.trellis.test {n}.local")))
        .collect();
    hosts[0].1.push_str(" svc.local nowhere.local");
    let host_refs: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    vpc.start_dns(&work, &host_refs);
    let specs: Vec<TaskSpec<'_>> = NODES
        .iter()
        .map(|n| TaskSpec {
            name: n,
            node: n,
            app: Some((PORT, n)),
        })
        .chain([TaskSpec {
            name: "front",
            node: "front",
            app: None,
        }])
        .collect();
    let mut order: Vec<(&Task, &TaskSpec<'_>)> = tasks.iter().zip(&specs).collect();
    order.push((&front, &specs[NODES.len()]));
    let procs = start_tasks(&work, &agent, "m", &order, &|_| {});
    let direct: Vec<(String, &str)> = NODES
        .iter()
        .map(|n| (format!("http://{n}.local:{PORT}/"), *n))
        .collect();
    let direct_refs: Vec<(&str, &str)> = direct.iter().map(|(u, n)| (u.as_str(), *n)).collect();
    warm(&front, &direct_refs);

    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..16 {
        let host = match rng.below(10) {
            0 => "n2.local",
            1 => "nowhere.local",
            _ => "svc.local",
        };
        let path = rng.pick(&["/", "/a", "/a/b", "/a/bc", "/b", "/b/c", "/c"]);
        let query = match rng.below(4) {
            0 => "?q=1",
            1 => "?q=2",
            _ => "",
        };
        let url = format!("http://{host}:{PORT}{path}{query}");
        let headers: Vec<String> = if rng.chance(50) {
            vec![format!("x-h: {}", rng.pick(&["v1", "v2", "w"]))]
        } else {
            vec![]
        };
        let online = explain(&agent, None, "m", Proxy::Node("front"), &url, &headers);
        let offline = explain(
            &agent,
            Some(&resources),
            "m",
            Proxy::Node("front"),
            &url,
            &headers,
        );
        let p = predicted(&online);
        assert_eq!(
            p,
            predicted(&offline),
            "seed {seed}: online and offline agree on {url}"
        );
        *outcomes
            .entry(match &p {
                Predicted::Nodes(n) if n.len() > 1 => "weighted",
                Predicted::Nodes(_) => "single",
                Predicted::Status(_) => "local reply",
                Predicted::Closed => "closed",
            })
            .or_default() += 1;
        agrees(
            &front,
            &url,
            &headers,
            &p,
            &format!("seed {seed}, request {i}: {url} {headers:?}"),
        );
    }
    eprintln!("outcomes: {outcomes:?}");
    drop(procs);
}
