//! One HTTP request crosses the mesh: App Mesh resources → trellis-agent → ADS → real Envoy in a
//! task namespace whose traffic the route manager redirects → the other task's app.

use std::time::Duration;

use trellis_tests::scenario::{
    ADMIN_PORT, BACK_BODY, BACK_URL, EGRESS_CLUSTER, INGRESS_CLUSTER, two_tasks,
};
use trellis_tests::{Workdir, can_run_privileged, eventually};

#[test]
fn an_http_request_crosses_two_envoys_and_drop_all_refuses_it_once_the_backend_is_removed() {
    if !can_run_privileged("walking skeleton") {
        return;
    }
    let work = Workdir::new("skeleton");
    let mesh = two_tasks(&work, &|_| {});
    let (front, back, agent) = (&mesh.front, &mesh.back, &mesh.agent);

    // Front's app (root, not the Envoy uid) calls the virtual service by name.
    let body = eventually(
        "front reaches back through the mesh",
        Duration::from_secs(20),
        || front.http_get(None, BACK_URL),
    );
    assert_eq!(body, BACK_BODY);
    assert!(
        front.envoy_stat(ADMIN_PORT, EGRESS_CLUSTER) >= 1,
        "front's egress cluster saw no request"
    );
    assert!(front.envoy_stat(ADMIN_PORT, "http.egress.downstream_rq_total") >= 1);
    assert!(
        back.envoy_stat(ADMIN_PORT, INGRESS_CLUSTER) >= 1,
        "back's ingress cluster saw no request"
    );
    assert!(back.envoy_stat(ADMIN_PORT, "http.ingress.http.8080.downstream_rq_total") >= 1);

    // The Envoy uid bypasses the egress redirect: front's Envoy sees nothing more, back's ingress
    // (which redirects every non-local source) still answers.
    let egress_before = front.envoy_stat(ADMIN_PORT, "http.egress.downstream_rq_total");
    let ingress_before = back.envoy_stat(ADMIN_PORT, "http.ingress.http.8080.downstream_rq_total");
    let direct = front
        .http_get(Some("1337"), BACK_URL)
        .expect("uid 1337 reaches back directly");
    assert_eq!(direct, BACK_BODY);
    assert_eq!(
        front.envoy_stat(ADMIN_PORT, "http.egress.downstream_rq_total"),
        egress_before
    );
    eventually(
        "back's ingress counted the direct request",
        Duration::from_secs(5),
        || {
            let now = back.envoy_stat(ADMIN_PORT, "http.ingress.http.8080.downstream_rq_total");
            if now > ingress_before {
                Ok(())
            } else {
                Err(format!("still {now}"))
            }
        },
    );

    // DROP_ALL (the default): a destination that is no virtual service gets nothing, even on a
    // port the egress listener serves. ALLOW_ALL passes it through to the original destination.
    let by_ip = format!("http://{}:8080/", back.ip);
    assert!(
        front.http_get(None, &by_ip).is_err(),
        "DROP_ALL let an unknown destination through"
    );
    agent.appmesh(&[
        "update-mesh",
        "--mesh-name",
        "m",
        "--spec",
        r#"{"egressFilter": {"type": "ALLOW_ALL"}}"#,
    ]);
    let passed = eventually(
        "ALLOW_ALL passes traffic to an unknown destination",
        Duration::from_secs(10),
        || front.http_get(None, &by_ip),
    );
    assert_eq!(passed, BACK_BODY);
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_allow_all.upstream_rq_total"
        ) >= 1
    );
    agent.appmesh(&[
        "update-mesh",
        "--mesh-name",
        "m",
        "--spec",
        r#"{"egressFilter": {"type": "DROP_ALL"}}"#,
    ]);
    eventually("DROP_ALL again", Duration::from_secs(10), || {
        match front.http_get(None, &by_ip) {
            Ok(body) => Err(format!("still passed through: {body}")),
            Err(_) => Ok(()),
        }
    });

    // Remove the backend through the REST API: DROP_ALL (the default) must refuse the request.
    agent.appmesh(&[
        "update-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "front-vn",
        "--spec",
        "{}",
    ]);
    let refusal = eventually(
        "request refused after the backend is removed",
        Duration::from_secs(10),
        || match front.http_get(None, BACK_URL) {
            Ok(body) => Err(format!("still answered: {body}")),
            Err(e) => Ok(e),
        },
    );
    assert!(refusal.contains("exit status"), "{refusal}");

    // DROP_ALL still lets AWS API calls out (TLS to *.amazonaws.com on 443), and nothing else on 443.
    let pki = trellis_tests::apps::Pki::new(&work, "aws");
    let (cert, key) = pki.issue("sts", &["sts.us-east-1.amazonaws.com", "example.org"]);
    let _tls = trellis_tests::Proc::spawn(
        "tls server in back",
        &mut back.cmd(&[
            "openssl", "s_server", "-accept", "443", "-cert", &cert, "-key", &key, "-www", "-quiet",
        ]),
        work.join("s_server.log"),
    );
    let https = |host: &str| {
        let resolve = format!("{host}:443:{}", back.ip);
        let url = format!("https://{host}/");
        trellis_tests::run(&mut front.cmd(&[
            "curl",
            "-sk",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &resolve,
            &url,
        ]))
    };
    eventually(
        "an AWS API name passes DROP_ALL",
        Duration::from_secs(10),
        || {
            let out = https("sts.us-east-1.amazonaws.com");
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            if code == "200" {
                Ok(())
            } else {
                Err(format!("status {code:?}"))
            }
        },
    );
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_amazonaws.upstream_cx_total"
        ) >= 1
    );
    let other = https("example.org");
    assert!(
        !other.status.success(),
        "DROP_ALL let TLS to example.org:443 through"
    );
    // The agent's own view: ready, both Envoys connected, every push acknowledged.
    // Signed as the helpers sign every API call when the agent runs with `--api-auth`.
    let get = |path: &str| {
        trellis_tests::check(agent.curl().args(["-sf", &format!("{}{path}", agent.api)]))
    };
    assert_eq!(get("/readyz"), "ready\n");
    let metrics = get("/metrics");
    assert!(
        metrics.contains("trellis_xds_connected_streams{node=\"mesh/m/virtualNode/front-vn\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_xds_acks_total{type=\"Listener\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_xds_change_to_ack_seconds_count"),
        "{metrics}"
    );
    let debug: serde_json::Value = serde_json::from_str(&get("/debug/xds")).unwrap();
    let front_view = debug
        .as_object()
        .unwrap()
        .values()
        .find(|s| s["node"] == "mesh/m/virtualNode/front-vn")
        .expect("front's stream in /debug/xds");
    let listener = &front_view["types"]["Listener"];
    assert_eq!(
        listener["sent_version"], listener["acked_version"],
        "{front_view}"
    );
    assert!(listener["last_nack"].is_null());
    // Envoy accepted every configuration it was sent.
    assert!(
        !agent
            .proc
            .log_text()
            .contains("envoy rejected configuration"),
        "{}",
        agent.proc.log_text()
    );
}
