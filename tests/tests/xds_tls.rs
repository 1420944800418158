//! TCP ADS (`--xds-addr`): no plain, unauthenticated door unless a lab asks for one
//! (`--xds-tcp-insecure`); with `--xds-tls-*`, mutual TLS where the node id must be a URI SAN of
//! the Envoy's client certificate. A real Envoy bootstrapped by `trellis-agent bootstrap` with
//! `TRELLIS_XDS_CLIENT_CERT`/`_CLIENT_KEY`/`_SERVER_CA` gets its configuration; one whose certificate names another node does not.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use trellis_tests::auth::Pki;
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::scenario::resources_file;
use trellis_tests::{Proc, Workdir, bin, check, eventually, free_port, run};

const NODE: &str = "mesh/m/virtualNode/lonely";

/// A real Envoy for `NODE` on TCP ADS at `addr`, presenting `cert`/`key`, trusting `ca`; its
/// admin port.
fn envoy(
    work: &Workdir,
    name: &str,
    addr: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> (Proc, u16) {
    let boot = work.join(&format!("bootstrap-{name}.json"));
    let admin = free_port();
    check(
        Command::new(bin("trellis-agent"))
            .args(["bootstrap", "--output"])
            .arg(&boot)
            .env_clear()
            .env("APPMESH_RESOURCE_ARN", NODE)
            .env("APPMESH_XDS_ENDPOINT", addr)
            .env("TRELLIS_XDS_CLIENT_CERT", cert)
            .env("TRELLIS_XDS_CLIENT_KEY", key)
            .env("TRELLIS_XDS_SERVER_CA", ca)
            .env("ENVOY_ADMIN_ACCESS_PORT", admin.to_string())
            .env("ENVOY_ADMIN_ACCESS_LOG_FILE", "/dev/null"),
    );
    let proc = Proc::spawn(
        &format!("envoy {name}"),
        Command::new(trellis_tests::envoy())
            .arg("-c")
            .arg(&boot)
            .args(["--disable-hot-restart", "--concurrency", "1"]),
        work.join(&format!("envoy-{name}.log")),
    );
    (proc, admin)
}

fn envoy_stat(admin: u16, name: &str) -> u64 {
    let out = run(Command::new("curl").args([
        "-s",
        &format!("http://127.0.0.1:{admin}/stats?filter=^{name}$"),
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn tcp_ads_needs_mutual_tls_and_serves_only_the_node_its_certificate_names() {
    let work = Workdir::new("xds-tls");

    // No lock, no door: --xds-addr alone refuses to start, naming both ways out.
    let mut open = Proc::spawn(
        "open agent",
        Command::new(bin("trellis-agent"))
            .arg("serve")
            .arg("--data-dir")
            .arg(work.join("open-data"))
            .args(["--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
            .args(["--xds-attestation", "none"])
            .arg("--xds-socket")
            .arg(work.join("open.sock")),
        work.join("open.log"),
    );
    let status = eventually("serve refuses", Duration::from_secs(20), || {
        open.exited().ok_or("still running".to_string())
    });
    assert!(!status.success());
    let log = open.log_text();
    assert!(
        log.contains("--xds-tls-client-ca") && log.contains("--xds-tcp-insecure"),
        "{log}"
    );

    let pki = Pki::new(&work, "xds");
    let (server_cert, server_key) = pki.issue("agent");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            {"meshName": "m", "virtualNodeName": "lonely", "spec": {}},
            {"meshName": "m", "virtualNodeName": "other", "spec": {}},
        ]),
    );
    let s = |p: &Path| p.display().to_string();
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            resources: Some(&resources),
            args: vec![
                "--xds-addr".into(),
                "127.0.0.1:0".into(),
                "--xds-tls-cert".into(),
                s(&server_cert),
                "--xds-tls-key".into(),
                s(&server_key),
                "--xds-tls-client-ca".into(),
                s(&pki.ca),
            ],
            ..AgentOpts::default()
        },
    );
    let log = agent.proc.log_text();
    let addr = log
        .split("xds_tcp=Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("the agent logs its TCP ADS address")
        .to_string();
    let port = addr.rsplit(':').next().expect("port");

    // TLS without a client certificate ends at the handshake.
    let no_cert = run(Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--http2-prior-knowledge",
            "--cacert",
        ])
        .arg(&pki.ca)
        .arg(format!("https://localhost:{port}/")));
    assert!(
        !no_cert.status.success(),
        "a client without a certificate got through the handshake"
    );

    // The node's own certificate: configuration arrives over mutual TLS.
    let (cert, key) = pki.issue_client(
        "lonely",
        "arn:aws:appmesh:us-east-1:000000000000:mesh/m/virtualNode/lonely",
    );
    let (_envoy, admin) = envoy(&work, "lonely", &addr, &cert, &key, &pki.ca);
    eventually(
        "the Envoy gets its clusters over mutual TLS",
        Duration::from_secs(30),
        || match envoy_stat(admin, "cluster_manager.cds.update_success") {
            0 => Err("no CDS update yet".to_string()),
            n => Ok(n),
        },
    );
    agent.xds_stream(NODE).expect("the stream is served");

    // Another node's certificate claiming this node: refused, with the reason counted.
    let (cert, key) = pki.issue_client("other", "spiffe://mesh.internal/mesh/m/virtualNode/other");
    let (_impostor, admin) = envoy(&work, "impostor", &addr, &cert, &key, &pki.ca);
    let reason = "trellis_xds_refused_streams_total{reason=\"attestation_san_mismatch\"}";
    eventually(
        "the impostor is refused",
        Duration::from_secs(30),
        || match agent.metric(reason) {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{reason} {n}")),
        },
    );
    assert_eq!(envoy_stat(admin, "cluster_manager.cds.update_success"), 0);
    let streams = agent.debug_xds();
    let of_node = streams
        .as_object()
        .map(|s| s.values().filter(|s| s["node"] == NODE).count());
    assert_eq!(of_node, Some(1), "{streams}");
}
