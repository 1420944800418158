//! A fleet of agents on one DynamoDB table (moto): one Cloud Map poller per service for all of
//! them, elected with a lease in the table, whose answers reach every agent's Envoys through it.
//! Counted by a proxy in front of Cloud Map (moto): five agents cost what one costs. A killed
//! lease holder is replaced and a table that fails (the fault-injecting stand-in) makes every
//! agent poll for itself until it answers again, without an endpoint ever leaving an Envoy; and a
//! read on one agent right after a write acknowledged by another returns it, at one consistent
//! read at most. Envoys here are ADS watchers (CDS and EDS over the agents' TCP ADS port).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::auth::{ApiAuth, AuthFile};
use trellis_tests::cloudmap::{FaultProxy, Moto as CloudMap};
use trellis_tests::dynamo::standin::{Fault, StandIn};
use trellis_tests::dynamo::{Moto as Dynamo, aws_env};
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::scenario::resources_file;
use trellis_tests::{Workdir, check, eventually, free_port, run};

const BACK: &str = "cds_egress_m_back_http_8080";
const POLL_MS: u64 = 500;
const WAIT: Duration = Duration::from_secs(60);

fn mesh() -> Value {
    json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualNodeName": "back", "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "back"}}}},
        {"meshName": "m", "virtualServiceName": "back.local",
            "spec": {"provider": {"virtualNode": {"virtualNodeName": "back"}}}},
        {"meshName": "m", "virtualNodeName": "front", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}}
    ])
}

/// What an Envoy's watcher has seen of `BACK`'s endpoints: the newest set and every set, in order.
#[derive(Debug, Default)]
struct Seen {
    now: Option<BTreeSet<String>>,
    history: Vec<BTreeSet<String>>,
}

/// An ADS client of node `front` on one agent: CDS wildcard, EDS for `BACK`, ACKing everything.
#[derive(Debug, Clone)]
struct Watcher(Arc<Mutex<Seen>>);

impl Watcher {
    fn start(rt: &tokio::runtime::Runtime, addr: String) -> Self {
        let w = Watcher(Arc::default());
        let seen = w.0.clone();
        rt.spawn(async move {
            // The agent is up (it logged its address); a stream that ends is opened again.
            loop {
                let _ = watch(&addr, &seen).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        w
    }

    fn endpoints(&self) -> Option<BTreeSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).now.clone()
    }

    /// Waits until the endpoints are exactly `ips` (port 8080).
    fn expect(&self, what: &str, ips: &[&str]) {
        let want: BTreeSet<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
        eventually(what, WAIT, || match self.endpoints() {
            Some(e) if e == want => Ok(()),
            other => Err(format!("has {other:?}, want {want:?}")),
        });
    }

    /// Every set seen after the first answer held `ip`: it never left the Envoy.
    fn never_lost(&self, ip: &str) {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let want = format!("{ip}:8080");
        for (i, set) in seen.history.iter().enumerate() {
            assert!(
                set.contains(&want),
                "{want} left at update {i}: {:?}",
                seen.history
            );
        }
    }
}

async fn watch(addr: &str, seen: &Arc<Mutex<Seen>>) -> Result<(), tonic::Status> {
    trellis_tests::eds::watch(addr, "mesh/m/virtualNode/front", BACK, |set| {
        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
        s.now = Some(set.clone());
        s.history.push(set);
    })
    .await
}

/// Cloud Map (moto, behind a counting proxy) with service ns/back, and DynamoDB (moto, behind
/// the stand-in when asked) with a table: what every agent of a test shares.
struct World {
    work: Workdir,
    cloudmap: CloudMap,
    service: String,
    proxy: FaultProxy,
    _dynamo: Dynamo,
    standin: Option<StandIn>,
    table_endpoint: String,
    /// The agents' region (the table is created in it: moto keeps tables per region).
    region: &'static str,
    rt: tokio::runtime::Runtime,
}

impl World {
    /// Agents in us-west-2, where the Cloud Map suites register instances.
    fn new(name: &str, standin: bool) -> Self {
        Self::in_region(name, standin, "us-west-2")
    }

    fn in_region(name: &str, standin: bool, region: &'static str) -> Self {
        let work = Workdir::new(name);
        let cloudmap = CloudMap::start(&work, free_port());
        let service = cloudmap.create_service("ns", "back");
        cloudmap.register(&service, "i-1", &[("AWS_INSTANCE_IPV4", "10.9.0.1")]);
        let proxy = FaultProxy::start(cloudmap.port);
        let dynamo = Dynamo::start(&work, "dynamo");
        let standin = standin.then(|| StandIn::start(&dynamo));
        let table_endpoint = standin
            .as_ref()
            .map_or(dynamo.endpoint.clone(), |s| s.endpoint.clone());
        let mut init = std::process::Command::new(trellis_tests::bin("trellis-agent"));
        init.arg("init-store")
            .args(trellis_tests::dynamo::store_args(&table_endpoint, "mesh"));
        for (k, v) in aws_env() {
            init.env(k, v);
        }
        check(init.env("AWS_REGION", region));
        World {
            cloudmap,
            service,
            proxy,
            _dynamo: dynamo,
            standin,
            table_endpoint,
            region,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
            work,
        }
    }

    /// Agent `name` on the table with an ADS port, Cloud Map through the proxy, polling every
    /// 500 ms; the first one imports the mesh. Its Envoy watcher is connected.
    fn agent(&self, name: &str, extra: &[&str], auth: Option<ApiAuth>) -> (Agent, Watcher) {
        let resources = resources_file(&self.work, &mesh());
        let mut args = trellis_tests::dynamo::store_args(&self.table_endpoint, "mesh");
        args.extend(
            // Plain-text ADS on loopback for the watchers.
            ["--xds-addr", "127.0.0.1:0", "--xds-tcp-insecure"]
                .iter()
                .chain(extra)
                .map(|a| a.to_string()),
        );
        let mut env = aws_env();
        for (k, v) in [
            ("AWS_REGION", self.region.to_string()),
            ("TRELLIS_CLOUDMAP_ENDPOINT", self.proxy.url.clone()),
            ("TRELLIS_CLOUDMAP_POLL_INTERVAL_MS", POLL_MS.to_string()),
            ("TRELLIS_CLOUDMAP_REFRESH_INTERVAL_MS", "5000".into()),
            ("TRELLIS_CLOUDMAP_BACKOFF_MAX_MS", "2000".into()),
            ("TRELLIS_CLOUDMAP_LINGER_MS", "5000".into()),
        ] {
            env.push((k.to_string(), v));
        }
        let mut agent = Agent::start_with(
            &self.work,
            &AgentOpts {
                name,
                args,
                env,
                resources: Some(&resources),
                auth,
                ..AgentOpts::default()
            },
        );
        let addr = agent
            .proc
            .wait_for_log("xds_tcp=Some(", Duration::from_secs(30))
            .trim_end_matches(')')
            .to_string();
        let watcher = Watcher::start(&self.rt, addr);
        (agent, watcher)
    }

    /// Cloud Map calls the proxy counted.
    fn cloud_map_calls(&self) -> u64 {
        self.proxy.calls("DiscoverInstancesRevision") + self.proxy.calls("DiscoverInstances")
    }
}

/// An agent's metric `series` (name with labels, as rendered); 0 when absent.
fn metric(agent: &Agent, series: &str) -> f64 {
    let text = String::from_utf8_lossy(
        &run(agent.curl().args(["-s", &format!("{}/metrics", agent.api)])).stdout,
    )
    .into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn revisions(agent: &Agent) -> f64 {
    metric(
        agent,
        "trellis_cloudmap_calls_total{op=\"DiscoverInstancesRevision\"}",
    )
}

/// The index of the agent holding the lease, once exactly one does.
fn holder(agents: &[&Agent]) -> usize {
    eventually("one lease holder", WAIT, || {
        let held: Vec<usize> = agents
            .iter()
            .enumerate()
            .filter(|(_, a)| metric(a, "trellis_cloudmap_leases_held") == 1.0)
            .map(|(i, _)| i)
            .collect();
        match held.as_slice() {
            [one] => Ok(*one),
            other => Err(format!("holders {other:?}")),
        }
    })
}

/// The window Cloud Map calls are counted over.
const WINDOW: Duration = Duration::from_secs(10);

#[test]
fn five_agents_make_the_cloud_map_calls_of_one_and_every_envoy_gets_the_answer_through_the_table() {
    let w = World::new("fleet-calls", false);
    let (one, one_envoy) = w.agent("agent1", &[], None);
    one_envoy.expect("agent1's Envoy has the instance", &["10.9.0.1"]);
    let before = w.cloud_map_calls();
    // A counting window: the calls made in it are the measure, nothing is waited for.
    std::thread::sleep(WINDOW);
    let alone = w.cloud_map_calls() - before;

    let mut agents = vec![one];
    let mut envoys = vec![one_envoy];
    for i in 2..=5 {
        let (a, e) = w.agent(&format!("agent{i}"), &[], None);
        agents.push(a);
        envoys.push(e);
    }
    for (i, e) in envoys.iter().enumerate() {
        e.expect(
            &format!("agent{}'s Envoy has the instance", i + 1),
            &["10.9.0.1"],
        );
    }
    let before = w.cloud_map_calls();
    std::thread::sleep(WINDOW);
    let five = w.cloud_map_calls() - before;
    eprintln!("Cloud Map calls in {WINDOW:?}: one agent {alone}, five agents {five}");
    assert!(alone > 0, "one agent polls Cloud Map");
    assert!(
        five as f64 <= 1.3 * alone as f64,
        "five agents made {five} Cloud Map calls where one made {alone}"
    );

    // One agent polls and publishes; the other four serve what they read from the table.
    let all: Vec<&Agent> = agents.iter().collect();
    let h = holder(&all);
    for (i, a) in agents.iter().enumerate() {
        if i != h {
            assert_eq!(revisions(a), 0.0, "agent{} never called Cloud Map", i + 1);
            assert!(
                metric(a, "trellis_cloudmap_answers_applied_total") >= 1.0,
                "agent{} served the table's answer",
                i + 1
            );
        }
    }
    // Changes in Cloud Map reach every agent's Envoy through the table.
    w.cloudmap
        .register(&w.service, "i-2", &[("AWS_INSTANCE_IPV4", "10.9.0.2")]);
    for e in &envoys {
        e.expect(
            "every Envoy has the new instance",
            &["10.9.0.1", "10.9.0.2"],
        );
    }
    w.cloudmap.deregister(&w.service, "i-1");
    for e in &envoys {
        e.expect("every Envoy lost the deregistered one", &["10.9.0.2"]);
    }
}

#[test]
fn a_killed_lease_holder_is_replaced_and_no_envoy_loses_an_endpoint() {
    let w = World::new("fleet-takeover", false);
    let started: Vec<(Agent, Watcher)> = (1..=3)
        .map(|i| w.agent(&format!("agent{i}"), &[], None))
        .collect();
    for (_, e) in &started {
        e.expect("every Envoy has the instance", &["10.9.0.1"]);
    }
    let agents: Vec<&Agent> = started.iter().map(|(a, _)| a).collect();
    let h = holder(&agents);
    let mut started = started;
    // Killed (SIGKILL): it gives nothing back, its lease just stops being renewed.
    let (dead, _) = started.remove(h);
    drop(dead);
    w.cloudmap
        .register(&w.service, "i-2", &[("AWS_INSTANCE_IPV4", "10.9.0.2")]);
    for (_, e) in &started {
        e.expect(
            "the new holder's answer reaches every Envoy",
            &["10.9.0.1", "10.9.0.2"],
        );
    }
    let living: Vec<&Agent> = started.iter().map(|(a, _)| a).collect();
    let next = holder(&living);
    assert!(metric(living[next], "trellis_cloudmap_lease_takeovers_total") >= 1.0);
    for (_, e) in &started {
        e.never_lost("10.9.0.1");
    }
}

#[test]
fn while_the_table_fails_every_agent_polls_for_its_own_envoys_then_follows_the_table_again() {
    let w = World::new("fleet-fallback", true);
    let started: Vec<(Agent, Watcher)> = (1..=3)
        .map(|i| w.agent(&format!("agent{i}"), &[], None))
        .collect();
    for (_, e) in &started {
        e.expect("every Envoy has the instance", &["10.9.0.1"]);
    }
    let agents: Vec<&Agent> = started.iter().map(|(a, _)| a).collect();
    holder(&agents);
    let standin = w.standin.as_ref().expect("stand-in");

    standin.fail(Fault::Outage);
    // Each agent polls Cloud Map itself (the holder did already).
    for (i, a) in agents.iter().enumerate() {
        let from = revisions(a);
        eventually(
            &format!("agent{} polls Cloud Map for its own Envoys", i + 1),
            WAIT,
            || {
                let now = revisions(a);
                if now > from + 1.0 {
                    Ok(())
                } else {
                    Err(format!("{now} revision calls"))
                }
            },
        );
    }
    w.cloudmap
        .register(&w.service, "i-2", &[("AWS_INSTANCE_IPV4", "10.9.0.2")]);
    for (_, e) in &started {
        e.expect(
            "a change while the table fails reaches every Envoy",
            &["10.9.0.1", "10.9.0.2"],
        );
    }

    standin.heal();
    for (i, a) in agents.iter().enumerate() {
        eventually(
            &format!("agent{} follows the table again", i + 1),
            WAIT,
            || match metric(a, "trellis_cloudmap_fallback") {
                0.0 => Ok(()),
                v => Err(format!("fallback {v}")),
            },
        );
    }
    let h = holder(&agents);
    let before: Vec<f64> = agents.iter().map(|a| revisions(a)).collect();
    std::thread::sleep(WINDOW);
    for (i, a) in agents.iter().enumerate() {
        if i != h {
            assert_eq!(revisions(a), before[i], "agent{} polls no more", i + 1);
        }
    }
    w.cloudmap.deregister(&w.service, "i-1");
    for (_, e) in &started {
        e.expect("the table's answers again", &["10.9.0.2"]);
    }
    for (_, e) in &started {
        let seen = e.0.lock().unwrap_or_else(|p| p.into_inner());
        // 10.9.0.1 left only when it was deregistered, at the very end.
        let until = seen.history.len().saturating_sub(1);
        for set in &seen.history[..until] {
            assert!(set.contains("10.9.0.1:8080"), "{:?}", seen.history);
        }
    }
}

#[test]
fn a_read_on_another_agent_right_after_a_write_returns_it_at_one_consistent_read_at_most() {
    // In the region signed requests are made for; Cloud Map plays no part here.
    let w = World::in_region("fleet-ryw", false, trellis_tests::auth::REGION);
    let auth = ApiAuth::admin(&w.work, "fleet", AuthFile::default());
    // The table poll is off (ten minutes): only the read itself can bring the write in.
    let slow = ["--dynamodb-poll-ms", "600000"];
    let (a, _) = w.agent("agent1", &slow, Some(auth.clone()));
    let (b, _) = w.agent("agent2", &slow, Some(auth));
    let checks = metric(&b, "trellis_store_read_checks_total");
    let gets = metric(
        &b,
        "trellis_store_dynamodb_requests_total{operation=\"GetItem\"}",
    );
    let mut reads = 0.0;
    for i in 0..3 {
        let name = format!("vn{i}");
        a.appmesh(&[
            "create-virtual-node",
            "--mesh-name",
            "m",
            "--virtual-node-name",
            &name,
            "--spec",
            "{}",
        ]);
        let d = b.appmesh(&[
            "describe-virtual-node",
            "--mesh-name",
            "m",
            "--virtual-node-name",
            &name,
        ]);
        assert_eq!(d["virtualNode"]["metadata"]["version"], 1, "{d}");
        let list = b.appmesh(&["list-virtual-nodes", "--mesh-name", "m"]);
        assert!(
            list["virtualNodes"]
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["virtualNodeName"] == name.as_str())),
            "{list}"
        );
        reads += 2.0;
    }
    a.appmesh(&[
        "update-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "vn0",
        "--spec",
        r#"{"listeners":[{"portMapping":{"port":9090,"protocol":"http"}}],
            "serviceDiscovery":{"dns":{"hostname":"vn0.local"}}}"#,
    ]);
    let d = b.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "vn0",
    ]);
    assert_eq!(d["virtualNode"]["metadata"]["version"], 2, "{d}");
    reads += 1.0;
    let checks = metric(&b, "trellis_store_read_checks_total") - checks;
    let gets = metric(
        &b,
        "trellis_store_dynamodb_requests_total{operation=\"GetItem\"}",
    ) - gets;
    eprintln!("{reads} API reads on agent2: {checks} read checks, {gets} GetItem");
    assert!(
        checks >= 1.0 && checks <= reads,
        "{checks} checks for {reads} reads"
    );
    assert!(gets <= reads, "{gets} GetItem for {reads} reads");
    // Unsigned, the read is refused before it costs the table anything.
    let before = metric(&b, "trellis_store_read_checks_total");
    let out = check(
        std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}/v20190125/meshes/m/virtualNodes", b.api)),
    );
    assert!(out.starts_with('4'), "unsigned read answered {out}");
    assert_eq!(metric(&b, "trellis_store_read_checks_total"), before);
}
