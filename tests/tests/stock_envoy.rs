//! Teams that keep AWS's aws-appmesh-envoy image and only point `APPMESH_XDS_ENDPOINT` at the
//! agent's socket: real Envoy started from the bootstrap that image writes for a `unix://`
//! endpoint (`fixtures/stock-envoy/bootstrap-unix.yaml`, reproduced from the image's public
//! agent) gets its configuration from Trellis, traffic flows, and its X-Ray traces arrive. And a
//! gRPC client on grpc-core (the Python `grpcio` package) speaks ADS on the socket.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::collector::Collector;
use trellis_tests::mesh::{Agent, Vpc, rewrite, run_route_manager};
use trellis_tests::scenario::{
    BACK_BODY, BACK_URL, TaskSpec, app_taskdef, back_front_items, back_spec, resources_file,
    start_tasks,
};
use trellis_tests::{
    Proc, Workdir, can_run_privileged, check, envoy, eventually, venv, workspace_root,
};

const ADMIN: u16 = 9901;

#[test]
fn the_stock_app_mesh_image_bootstrap_gets_its_configuration_and_traffic_flows() {
    if !can_run_privileged(
        "the_stock_app_mesh_image_bootstrap_gets_its_configuration_and_traffic_flows",
    ) {
        return;
    }
    let work = Workdir::new("stock-envoy");
    let resources = resources_file(&work, &back_front_items(back_spec(), true));
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 45);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let back_spec = TaskSpec {
        name: "back",
        node: "back-vn",
        app: Some((8080, BACK_BODY)),
    };
    let _back = start_tasks(&work, &agent, "m", &[(&back, &back_spec)], &|_| {});

    // Front: the route manager as the rewriter configures it, then the stock image's Envoy.
    let def = rewrite(
        &work,
        &app_taskdef("front", &[]),
        "m",
        "front-vn",
        &agent.socket_dir,
    );
    run_route_manager(&front, &def);
    let daemon = Collector::udp(&work, &front, 2000);
    let rules = work.join("sampling-rules.json");
    std::fs::write(
        &rules,
        r#"{"version":2,"default":{"fixed_target":1,"rate":1},"rules":[]}"#,
    )
    .expect("write rules");
    let fixture = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/stock-envoy/bootstrap-unix.yaml"),
    )
    .expect("read the fixture");
    let socket = agent.socket_dir.join("xds.sock");
    let bootstrap = fixture
        .replace("${NODE_ID}", "mesh/m/virtualNode/front-vn")
        .replace("${MESH}", "m")
        .replace("${NODE}", "front-vn")
        .replace("${XDS_SOCKET}", &socket.display().to_string())
        .replace("${ADMIN_PORT}", &ADMIN.to_string())
        .replace("${SAMPLING_RULES}", &rules.display().to_string());
    let path = work.join("stock-bootstrap.yaml");
    std::fs::write(&path, bootstrap).expect("write bootstrap");
    let envoy = work.stage(&envoy());
    let (envoy_s, path_s) = (envoy.display().to_string(), path.display().to_string());
    let mut proc = Proc::spawn(
        "stock Envoy in front",
        &mut front.cmd_as(
            "1337",
            &[
                &envoy_s,
                "-c",
                &path_s,
                "--disable-hot-restart",
                "--concurrency",
                "1",
            ],
        ),
        work.join("envoy-stock-front.log"),
    );
    eventually(
        "the stock Envoy's listeners from Trellis",
        Duration::from_secs(30),
        || {
            if !proc.is_running() {
                panic!("Envoy exited:\n{}", proc.log_text());
            }
            let lds = front.envoy_stat(ADMIN, "listener_manager.lds.update_success");
            let eds = front.envoy_stat(ADMIN, "cluster.local_cluster.update_success");
            let connected = front.envoy_stat(ADMIN, "control_plane.connected_state");
            if lds > 0 && eds > 0 && connected == 1 {
                Ok(())
            } else {
                Err(format!(
                    "lds {lds}, local_cluster eds {eds}, connected {connected}"
                ))
            }
        },
    );
    let stream = agent
        .xds_stream("mesh/m/virtualNode/front-vn")
        .expect("the agent serves the stock Envoy's stream");
    assert_eq!(
        stream["types"]["Listener"]["sent_version"], stream["types"]["Listener"]["acked_version"],
        "{stream}"
    );

    let body = eventually("front reaches back", Duration::from_secs(20), || {
        front.http_get(None, BACK_URL)
    });
    assert_eq!(body, BACK_BODY);
    // The stock image's tracing works on Trellis's connection managers.
    let segment = eventually("an X-Ray segment", Duration::from_secs(20), || {
        daemon
            .datagrams()
            .iter()
            .filter_map(|d| d.split_once('\n'))
            .filter_map(|(_, s)| serde_json::from_str::<Value>(s).ok())
            .next()
            .ok_or("none yet".to_string())
    });
    assert_eq!(segment["name"], "m/front-vn", "{segment}");
    // Its stats tags too.
    let prom = front
        .http_get(None, &format!("http://127.0.0.1:{ADMIN}/stats/prometheus"))
        .expect("prometheus stats");
    assert!(
        prom.lines().any(|l| l.contains("appmesh_mesh=\"m\"")
            && l.contains("appmesh_virtual_node=\"front-vn\"")
            && l.contains("cds_egress_m_back-vn_http_8080")),
        "no tagged egress stats"
    );
    drop(proc);
}

/// `grpcio` (grpc-core) subscribing to clusters over the socket, the way a stock-image Envoy or
/// any other grpc-core or grpc-java ADS client does; `authority` overrides the `:authority` it
/// sends (grpc-java, and grpc-core before 1.4x, sent the socket path itself).
fn grpcio_ads(
    work: &Workdir,
    socket: &std::path::Path,
    authority: Option<&str>,
) -> Result<String, String> {
    let script = r#"
import sys, grpc
sock, node, authority = sys.argv[1], sys.argv[2], sys.argv[3]
def field(num, wire, payload):
    key = bytes([(num << 3) | wire])
    return key + bytes([len(payload)]) + payload if wire == 2 else key + payload
node_msg = field(1, 2, node.encode())
req = field(1, 2, b"") + field(2, 2, node_msg) + field(4, 2, b"type.googleapis.com/envoy.config.cluster.v3.Cluster")
opts = [("grpc.default_authority", authority)] if authority else []
ch = grpc.insecure_channel("unix://" + sock, options=opts)
call = ch.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    for resp in call(iter([req]), timeout=10):
        print("response", len(resp), b"cds_egress_m_back-vn_http_8080" in resp)
        break
except grpc.RpcError as e:
    print("error", e.code(), e.details())
    sys.exit(1)
"#;
    let path = work.join("ads_client.py");
    std::fs::write(&path, script).expect("write client");
    let out = Command::new(venv().join("bin/python"))
        .arg(&path)
        .arg(socket)
        .arg("mesh/m/virtualNode/front-vn")
        .arg(authority.unwrap_or(""))
        .output()
        .expect("run grpcio");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn grpc_core_clients_speak_ads_on_the_socket_whatever_authority_they_send() {
    let work = Workdir::new("stock-grpcio");
    let resources = resources_file(&work, &back_front_items(back_spec(), true));
    let agent = Agent::start(&work, Some(&resources));
    let socket = agent.socket_dir.join("xds.sock");
    check(Command::new(venv().join("bin/python")).args(["-c", "import grpc"]));
    for authority in [
        None,
        Some("localhost"),
        Some(socket.to_str().expect("utf-8 path")),
    ] {
        let out = grpcio_ads(&work, &socket, authority)
            .unwrap_or_else(|e| panic!("authority {authority:?}: {e}"));
        assert!(
            out.contains("response") && out.contains("True"),
            "authority {authority:?}: {out}"
        );
    }
}
