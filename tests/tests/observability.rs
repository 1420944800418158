//! Tracing and stats from the App Mesh Envoy image's variables, end to end: two meshed tasks
//! (front calls back.local through both Envoys), each Envoy configured only by the variables an
//! App Mesh task definition set, and stand-in collectors where App Mesh users ran the real ones
//! (in the task, on the default port). Each test asserts on the payload that arrived: X-Ray
//! segments, Datadog and Zipkin (Jaeger) spans with one trace id across both Envoys, DogStatsD
//! lines with App Mesh's tags.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::collector::Collector;
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{
    BACK_BODY, BACK_URL, TaskSpec, back_front_items, back_spec, resources_file,
    start_tasks_with_envoy_env,
};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually};

/// The mesh, with each task's Envoy variables; collectors are started by the test (before the
/// Envoys, as a daemon sidecar the Envoy depends on would be).
struct Mesh {
    _procs: Vec<Proc>,
    front: Task,
    _back: Task,
    _vpc: Vpc,
    _agent: Agent,
}

fn vpc_and_agent(work: &Workdir, id: u8) -> (Agent, Vpc, Task, Task) {
    let resources = resources_file(work, &back_front_items(back_spec(), true));
    let agent = Agent::start(work, Some(&resources));
    let mut vpc = Vpc::new(work, id);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.start_dns(work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    (agent, vpc, front, back)
}

fn start(
    work: &Workdir,
    (agent, vpc, front, back): (Agent, Vpc, Task, Task),
    back_env: &[(&str, &str)],
    front_env: &[(&str, &str)],
) -> Mesh {
    let back_spec = TaskSpec {
        name: "back",
        node: "back-vn",
        app: Some((8080, BACK_BODY)),
    };
    let front_spec = TaskSpec {
        name: "front",
        node: "front-vn",
        app: None,
    };
    let mut procs =
        start_tasks_with_envoy_env(work, &agent, "m", &[(&back, &back_spec)], back_env, &|_| {});
    procs.extend(start_tasks_with_envoy_env(
        work,
        &agent,
        "m",
        &[(&front, &front_spec)],
        front_env,
        &|_| {},
    ));
    Mesh {
        _procs: procs,
        front,
        _back: back,
        _vpc: vpc,
        _agent: agent,
    }
}

impl Mesh {
    /// Front's app calls back.local through both Envoys, `n` times.
    fn traffic(&self, n: usize) {
        for _ in 0..n {
            let body = eventually("front reaches back", Duration::from_secs(20), || {
                self.front.http_get(None, BACK_URL)
            });
            assert_eq!(body, BACK_BODY);
        }
    }
}

/// X-Ray segments (the daemon's UDP format: a JSON header line, then the segment).
fn segments(c: &Collector) -> Vec<Value> {
    c.datagrams()
        .iter()
        .filter_map(|d| d.split_once('\n'))
        .filter_map(|(_, seg)| serde_json::from_str(seg).ok())
        .collect()
}

#[test]
fn xray_segments_from_both_envoys_carry_one_trace() {
    if !can_run_privileged("xray_segments_from_both_envoys_carry_one_trace") {
        return;
    }
    let work = Workdir::new("obs-xray");
    let parts = vpc_and_agent(&work, 41);
    // App Mesh's default daemon endpoint, 127.0.0.1:2000, in each task.
    let front_daemon = Collector::udp(&work, &parts.2, 2000);
    let back_daemon = Collector::udp(&work, &parts.3, 2000);
    let env = [
        ("ENABLE_ENVOY_XRAY_TRACING", "1"),
        // Every request (X-Ray's default samples 5 % after one a second).
        ("XRAY_SAMPLING_RATE", "1.00"),
    ];
    let mesh = start(&work, parts, &env, &env);
    mesh.traffic(3);
    let front = eventually("front's segments", Duration::from_secs(20), || {
        let s = segments(&front_daemon);
        if s.len() >= 3 {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    let back = eventually("back's segments", Duration::from_secs(20), || {
        let s = segments(&back_daemon);
        if s.len() >= 3 {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    for s in &front {
        assert_eq!(s["name"], "m/front-vn", "segment name is mesh/node: {s}");
        assert_eq!(s["origin"], "AWS::AppMesh::Proxy", "{s}");
        assert_eq!(s["aws"]["app_mesh"]["virtual_node_name"], "front-vn", "{s}");
    }
    for s in &back {
        assert_eq!(s["name"], "m/back-vn", "{s}");
    }
    // Each call is one trace across both Envoys: back's segment is a child of front's.
    for f in &front {
        let child = back
            .iter()
            .find(|b| b["trace_id"] == f["trace_id"])
            .unwrap_or_else(|| panic!("no back segment in trace {}: {back:?}", f["trace_id"]));
        assert_eq!(child["parent_id"], f["id"], "front {f}\nback {child}");
    }
}

#[test]
fn datadog_spans_from_both_envoys_carry_one_trace() {
    if !can_run_privileged("datadog_spans_from_both_envoys_carry_one_trace") {
        return;
    }
    let work = Workdir::new("obs-datadog");
    let parts = vpc_and_agent(&work, 42);
    let mut front_agent = Collector::http(&work, &parts.2, 8126);
    let mut back_agent = Collector::http(&work, &parts.3, 8126);
    let mesh = start(
        &work,
        parts,
        &[("ENABLE_ENVOY_DATADOG_TRACING", "1")],
        &[
            ("ENABLE_ENVOY_DATADOG_TRACING", "1"),
            ("DD_SERVICE", "front-service"),
        ],
    );
    mesh.traffic(3);
    let spans = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/traces")))
            .filter_map(|r| r["body"].as_array())
            .flatten()
            .filter_map(Value::as_array)
            .flatten()
            .cloned()
            .collect()
    };
    let front = front_agent.wait_for("front's spans", Duration::from_secs(30), |r| {
        let s = spans(r);
        (s.len() >= 3).then_some(s)
    });
    let back = back_agent.wait_for("back's spans", Duration::from_secs(30), |r| {
        let s = spans(r);
        (s.len() >= 3).then_some(s)
    });
    for s in &front {
        assert_eq!(s["service"], "front-service", "DD_SERVICE names it: {s}");
    }
    for s in &back {
        assert_eq!(s["service"], "envoy-m/back-vn", "App Mesh's default: {s}");
    }
    for f in &front {
        let child = back
            .iter()
            .find(|b| b["trace_id"] == f["trace_id"])
            .unwrap_or_else(|| panic!("no back span in trace {}: {back:?}", f["trace_id"]));
        assert_eq!(child["parent_id"], f["span_id"], "front {f}\nback {child}");
    }
}

/// Zipkin spans as Jaeger's collector receives them from Envoy's Zipkin tracer.
fn zipkin_spans(records: &[Value]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["path"] == "/api/v2/spans")
        .filter_map(|r| r["body"].as_array())
        .flatten()
        .cloned()
        .collect()
}

#[test]
fn jaeger_spans_in_protobuf_and_json_carry_one_trace() {
    if !can_run_privileged("jaeger_spans_in_protobuf_and_json_carry_one_trace") {
        return;
    }
    let work = Workdir::new("obs-jaeger");
    let parts = vpc_and_agent(&work, 43);
    let mut front_jaeger = Collector::http(&work, &parts.2, 9411);
    let mut back_jaeger = Collector::http(&work, &parts.3, 9411);
    let mesh = start(
        &work,
        parts,
        // App Mesh's default encoding, protobuf; Envoy names itself by its node cluster.
        &[
            ("ENABLE_ENVOY_JAEGER_TRACING", "1"),
            ("APPMESH_RESOURCE_CLUSTER", "back-cluster"),
        ],
        &[
            ("ENABLE_ENVOY_JAEGER_TRACING", "1"),
            ("JAEGER_TRACER_VERSION", "JSON"),
        ],
    );
    // Envoy's Zipkin tracer sends once five spans are buffered (or on its flush timer).
    mesh.traffic(6);
    let front = front_jaeger.wait_for("front's spans", Duration::from_secs(30), |r| {
        let s = zipkin_spans(r);
        (s.len() >= 5).then_some(s)
    });
    let back = back_jaeger.wait_for("back's spans", Duration::from_secs(30), |r| {
        let s = zipkin_spans(r);
        (s.len() >= 5).then_some(s)
    });
    let types: Vec<_> = [&front_jaeger, &back_jaeger]
        .iter()
        .map(|c| {
            c.records()
                .iter()
                .find(|r| r["path"] == "/api/v2/spans")
                .map(|r| r["headers"]["content-type"].clone())
        })
        .collect();
    assert_eq!(
        types,
        [
            Some(Value::from("application/json")),
            Some(Value::from("application/x-protobuf"))
        ]
    );
    for s in &front {
        assert_eq!(
            s["localEndpoint"]["serviceName"], "mesh/m/virtualNode/front-vn",
            "{s}"
        );
    }
    for s in &back {
        assert_eq!(s["localEndpoint"]["serviceName"], "back-cluster", "{s}");
    }
    for f in &front {
        let child = back
            .iter()
            .find(|b| b["traceId"] == f["traceId"])
            .unwrap_or_else(|| panic!("no back span in trace {}: {back:?}", f["traceId"]));
        // Envoy writes span ids into Zipkin's protobuf in little-endian byte order (the JSON
        // ids are big-endian hex): the same id either way.
        let parent = child["parentId"].as_str().unwrap_or_default();
        let reversed: String = (0..parent.len() / 2)
            .rev()
            .map(|i| &parent[2 * i..2 * i + 2])
            .collect();
        assert!(
            f["id"] == parent || f["id"] == reversed.as_str(),
            "front {f}\nback {child}"
        );
    }
}

/// `envoy.NAME:VALUE|TYPE|#tag:value,...` lines for the stat `name`, as tag maps.
fn statsd_lines(c: &Collector, name: &str) -> Vec<Vec<(String, String)>> {
    c.datagrams()
        .iter()
        .flat_map(|d| d.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.starts_with(&format!("{name}:")))
        .map(|l| {
            l.split_once("|#")
                .map(|(_, tags)| {
                    tags.split(',')
                        .filter_map(|t| t.split_once(':'))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn dogstatsd_lines_carry_app_mesh_tags_over_udp_and_a_unix_socket() {
    if !can_run_privileged("dogstatsd_lines_carry_app_mesh_tags_over_udp_and_a_unix_socket") {
        return;
    }
    let work = Workdir::new("obs-statsd");
    let parts = vpc_and_agent(&work, 44);
    let front_statsd = Collector::udp(&work, &parts.2, 8125);
    let socket = work.join("dsd.socket");
    let back_statsd = Collector::unix(&work, &parts.3, &socket);
    let socket = socket.display().to_string();
    let mesh = start(
        &work,
        parts,
        &[
            ("ENABLE_ENVOY_DOG_STATSD", "1"),
            ("STATSD_SOCKET_PATH", &socket),
            ("ENABLE_ENVOY_STATS_TAGS", "1"),
            ("ENVOY_STATS_FLUSH_INTERVAL", "1s"),
        ],
        &[
            ("ENABLE_ENVOY_DOG_STATSD", "1"),
            ("ENABLE_ENVOY_STATS_TAGS", "1"),
            ("APPMESH_METRIC_EXTENSION_VERSION", "1"),
            ("ENVOY_STATS_FLUSH_INTERVAL", "1s"),
        ],
    );
    mesh.traffic(2);
    let has =
        |tags: &[(String, String)], k: &str, v: &str| tags.iter().any(|(a, b)| a == k && b == v);
    let front = eventually("front's upstream requests", Duration::from_secs(20), || {
        statsd_lines(&front_statsd, "envoy.cluster.upstream_rq_total")
            .into_iter()
            .find(|t| has(t, "envoy.cluster_name", "cds_egress_m_back-vn_http_8080"))
            .ok_or_else(|| format!("{:?}", front_statsd.datagrams().last()))
    });
    assert!(has(&front, "appmesh.mesh", "m"), "{front:?}");
    assert!(has(&front, "appmesh.virtual_node", "front-vn"), "{front:?}");
    // The metric extension's tags, on every stat.
    assert!(has(&front, "Mesh", "m"), "{front:?}");
    assert!(has(&front, "VirtualNode", "front-vn"), "{front:?}");
    let back = eventually("back's ingress requests", Duration::from_secs(20), || {
        statsd_lines(&back_statsd, "envoy.cluster.upstream_rq_total")
            .into_iter()
            .find(|t| has(t, "envoy.cluster_name", "cds_ingress_m_back-vn_http_8080"))
            .ok_or_else(|| format!("{:?}", back_statsd.datagrams().last()))
    });
    assert!(has(&back, "appmesh.virtual_node", "back-vn"), "{back:?}");
    assert!(
        !back.iter().any(|(k, _)| k == "Mesh"),
        "no extension on back: {back:?}"
    );
    // ENVOY_STATS_FLUSH_INTERVAL=1s: under steady traffic, flushes (bursts of datagrams) arrive
    // about every second; Envoy's default would send one in five seconds.
    let start = front_statsd.records().len();
    for _ in 0..12 {
        mesh.traffic(1);
        std::thread::sleep(Duration::from_millis(400));
    }
    // Counters come only with a flush (timings are sent as each request ends).
    let times: Vec<f64> = front_statsd.records()[start..]
        .iter()
        .filter(|r| r["data"].as_str().is_some_and(|d| d.contains("|c|")))
        .filter_map(|r| r["at"].as_f64())
        .collect();
    let bursts = 1 + times.windows(2).filter(|w| w[1] - w[0] > 0.5).count();
    assert!(
        bursts >= 3,
        "{bursts} flushes in about 5 s ({} counter datagrams)",
        times.len()
    );
    drop(mesh);
}
