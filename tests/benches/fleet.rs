//! `cargo bench -p trellis-tests --bench fleet [-- N... [--envoys M]]`: a fleet of N agent
//! processes on one DynamoDB table (moto), each with M simulated Envoys (ADS streams of node
//! `front`, CDS and EDS, in this process), all needing the same Cloud Map services (moto behind a
//! counting proxy). For each N (default 1, 5, 20; M default 50) it prints Cloud Map calls per
//! minute (all agents together), DynamoDB reads per agent per minute (the store's poll and
//! catch-ups, and the shared pollers' lease and answer reads), the time from a Cloud Map change
//! until every Envoy of every agent has it (p50/p99/max over three changes), and the agents'
//! memory per stream (resident memory with the streams connected minus before, per stream).
//!
//! The agents are the tests' debug build (`bin`), polling Cloud Map every second; figures depend
//! on the machine and its load: report them with it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_tests::cloudmap::{FaultProxy, Moto as CloudMap};
use trellis_tests::dynamo::{Moto as Dynamo, aws_env, store_args};
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::scenario::resources_file;
use trellis_tests::{Workdir, bin, check, eventually, free_port};

/// Cloud Map services every Envoy needs (one key each).
const SERVICES: usize = 4;
const POLL_MS: u64 = 1000;
/// The Envoys watch the first service's cluster.
const WATCHED: &str = "cds_egress_m_back0_http_8080";
/// Calls and reads are counted over this window.
const WINDOW: Duration = Duration::from_secs(30);
const CHANGES: usize = 3;
const REGION: &str = "us-west-2";

fn mesh() -> Value {
    let mut items = vec![json!({"meshName": "m"})];
    let mut backends = Vec::new();
    for i in 0..SERVICES {
        items.push(json!({"meshName": "m", "virtualNodeName": format!("back{i}"), "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": format!("back{i}")}}}}));
        items.push(
            json!({"meshName": "m", "virtualServiceName": format!("back{i}.local"),
            "spec": {"provider": {"virtualNode": {"virtualNodeName": format!("back{i}")}}}}),
        );
        backends.push(json!({"virtualService": {"virtualServiceName": format!("back{i}.local")}}));
    }
    items
        .push(json!({"meshName": "m", "virtualNodeName": "front", "spec": {"backends": backends}}));
    Value::Array(items)
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What the Envoys have seen: whether each has had an assignment, and when each first had the
/// instance of the change under way.
#[derive(Default)]
struct Board {
    answered: Vec<bool>,
    target: Option<String>,
    seen_at: Vec<Option<Instant>>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// DynamoDB reads an agent made so far.
fn reads(agent: &Agent) -> f64 {
    [
        "trellis_store_dynamodb_requests_total{operation=\"GetItem\"}",
        "trellis_store_dynamodb_requests_total{operation=\"TransactGetItems\"}",
        "trellis_store_dynamodb_requests_total{operation=\"Query\"}",
        "trellis_cloudmap_table_requests_total{operation=\"BatchGetItem\"}",
    ]
    .iter()
    .map(|m| agent.metric(m))
    .sum()
}

/// Agent `i` of the fleet (the first one imports the mesh), with its TCP ADS address.
fn start_agent(
    work: &Workdir,
    dynamo: &Dynamo,
    proxy: &FaultProxy,
    resources: &std::path::Path,
    i: usize,
    m: usize,
) -> (Agent, String) {
    let mut args = store_args(&dynamo.endpoint, "mesh");
    args.extend(
        [
            "--xds-addr",
            "127.0.0.1:0",
            // The simulated Envoys are plain-text ADS clients on loopback.
            "--xds-tcp-insecure",
            "--max-connections-per-proxy",
            &m.to_string(),
        ]
        .map(String::from),
    );
    let mut env = aws_env();
    for (k, v) in [
        ("AWS_REGION", REGION.to_string()),
        ("TRELLIS_CLOUDMAP_ENDPOINT", proxy.url.clone()),
        ("TRELLIS_CLOUDMAP_POLL_INTERVAL_MS", POLL_MS.to_string()),
        // Not the tests' debug log: at thousands of streams it would be the load.
        ("TRELLIS_LOG", "info".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let name = format!("agent{i}");
    let mut agent = Agent::start_with(
        work,
        &AgentOpts {
            name: &name,
            args,
            env,
            resources: (i == 0).then_some(resources),
            ..AgentOpts::default()
        },
    );
    let addr = agent
        .proc
        .wait_for_log("xds_tcp=Some(", Duration::from_secs(120))
        .trim_end_matches(')')
        .to_string();
    (agent, addr)
}

fn run(n: usize, m: usize, rt: &tokio::runtime::Runtime) {
    let work = Workdir::new(&format!("bench-fleet-{n}"));
    let cloudmap = CloudMap::start(&work, free_port());
    let mut services = Vec::new();
    for i in 0..SERVICES {
        let s = cloudmap.create_service("ns", &format!("back{i}"));
        cloudmap.register(&s, "i-0", &[("AWS_INSTANCE_IPV4", "10.9.0.1")]);
        services.push(s);
    }
    let proxy = FaultProxy::start(cloudmap.port);
    let dynamo = Dynamo::start(&work, "dynamo");
    let mut init = std::process::Command::new(bin("trellis-agent"));
    init.arg("init-store")
        .args(store_args(&dynamo.endpoint, "mesh"));
    for (k, v) in aws_env() {
        init.env(k, v);
    }
    check(init.env("AWS_REGION", REGION));
    let resources = resources_file(&work, &mesh());

    // Started side by side: twenty debug agents one after the other take minutes.
    let started: Vec<(Agent, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (work, dynamo, proxy, resources) = (&work, &dynamo, &proxy, &resources);
                scope.spawn(move || start_agent(work, dynamo, proxy, resources, i, m))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("agent started"))
            .collect()
    });
    let (agents, addrs): (Vec<Agent>, Vec<String>) = started.into_iter().unzip();
    let before_streams: Vec<u64> = agents.iter().map(|a| rss_kib(a.proc.pid())).collect();

    let board = Arc::new(Mutex::new(Board {
        answered: vec![false; n * m],
        seen_at: vec![None; n * m],
        target: None,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    for (a, addr) in addrs.iter().enumerate() {
        for e in 0..m {
            let (addr, board, me) = (addr.clone(), board.clone(), a * m + e);
            let stop = stop.clone();
            rt.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let _ = trellis_tests::eds::watch(
                        &addr,
                        "mesh/m/virtualNode/front",
                        WATCHED,
                        |set: BTreeSet<String>| {
                            let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                            b.answered[me] = true;
                            if let Some(t) = &b.target
                                && b.seen_at[me].is_none()
                                && set.contains(t)
                            {
                                b.seen_at[me] = Some(Instant::now());
                            }
                        },
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
    }
    eventually(
        "every Envoy has its endpoints",
        Duration::from_secs(300),
        || {
            let b = board.lock().unwrap_or_else(|p| p.into_inner());
            match b.answered.iter().filter(|x| !**x).count() {
                0 => Ok(()),
                missing => Err(format!("{missing} without")),
            }
        },
    );
    let per_stream: f64 = agents
        .iter()
        .zip(&before_streams)
        .map(|(a, b)| rss_kib(a.proc.pid()).saturating_sub(*b) as f64 / m as f64)
        .sum::<f64>()
        / n as f64;

    let calls = || proxy.calls("DiscoverInstances") + proxy.calls("DiscoverInstancesRevision");
    let (calls0, reads0) = (calls(), agents.iter().map(reads).sum::<f64>());
    let t0 = Instant::now();
    // The counting window: what the fleet does in it is the measure.
    std::thread::sleep(WINDOW);
    let (calls1, reads1) = (calls(), agents.iter().map(reads).sum::<f64>());
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    let calls_per_min = (calls1 - calls0) as f64 / minutes;
    let reads_per_agent_min = (reads1 - reads0) / n as f64 / minutes;

    let mut lat = Vec::new();
    for c in 0..CHANGES {
        let ip = format!("10.9.1.{}", c + 1);
        {
            let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
            b.target = Some(format!("{ip}:8080"));
            b.seen_at = vec![None; n * m];
        }
        cloudmap.register(
            &services[0],
            &format!("i-{}", c + 1),
            &[("AWS_INSTANCE_IPV4", ip.as_str())],
        );
        // From Cloud Map's acknowledgement (the CLI's own start-up is not the fleet's time).
        let start = Instant::now();
        eventually(
            "every Envoy has the change",
            Duration::from_secs(120),
            || {
                let b = board.lock().unwrap_or_else(|p| p.into_inner());
                match b.seen_at.iter().filter(|x| x.is_none()).count() {
                    0 => Ok(()),
                    missing => Err(format!("{missing} without it")),
                }
            },
        );
        let b = board.lock().unwrap_or_else(|p| p.into_inner());
        lat.extend(b.seen_at.iter().flatten().map(|t| t.duration_since(start)));
    }
    // The agents go with this run; their Envoys stop reconnecting.
    stop.store(true, Ordering::SeqCst);
    lat.sort();
    println!(
        "| {n:>2} | {m:>3} | {calls_per_min:>7.0} | {reads_per_agent_min:>7.0} | {:>5} ms | {:>5} ms | {:>5} ms | {per_stream:>6.1} KiB |",
        pct(&lat, 0.5).as_millis(),
        pct(&lat, 0.99).as_millis(),
        lat.last().copied().unwrap_or_default().as_millis(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let m = args
        .iter()
        .position(|a| a == "--envoys")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(50);
    let counts: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--envoys")
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1, 5, 20]
    } else {
        counts
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "Fleet: N agents x M Envoys, {SERVICES} Cloud Map services, poll {POLL_MS} ms; calls and reads over {WINDOW:?}, {CHANGES} changes"
    );
    println!(
        "|  N |   M | Cloud Map calls/min | DynamoDB reads/agent/min | change→all Envoys p50 | p99 | max | agent memory/stream |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in counts {
        run(n, m, &rt);
    }
}
