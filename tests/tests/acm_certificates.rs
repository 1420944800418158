//! ACM certificates and ACM PCA trust, served by the agent over ADS (SDS on the same stream) to
//! the attested Envoy of the node whose spec names them: real Envoys in ECS container cgroups
//! (as in xds_attestation.rs), the agent's real AWS SDK client against an ACM / ACM PCA
//! stand-in (`py/acm_standin.py`: moto's ACM has no usable ExportCertificate nor an ACM PCA to
//! chain to) that really encrypts each exported key with the passphrase the agent sent. The
//! callers present client certificates from files, so the TLS is mutual. A virtual gateway's
//! listener terminates TLS with an ACM certificate too.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::acm::{AcmStandin, serial};
use trellis_tests::apps::Pki;
use trellis_tests::dynamo::{Moto, aws_env};
use trellis_tests::ecs::{Cgroups, Container, Introspection, in_cgroup, register_task_definition};
use trellis_tests::mesh::{
    Agent, AgentOpts, Task, Vpc, rewrite, run_route_manager, start_envoy_in,
};
use trellis_tests::scenario::{ADMIN_PORT, BACK_BODY, BACK_URL, app_taskdef, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually, run};

const CERT_ARN: &str =
    "arn:aws:acm:us-east-1:000000000000:certificate/11111111-2222-3333-4444-555555555555";
const PCA_ARN: &str = "arn:aws:acm-pca:us-east-1:000000000000:certificate-authority/abcd-ef01";
const BACK_NODE: &str = "mesh/m/virtualNode/back-vn";
const EXPORT: &str = "CertificateManager.ExportCertificate";

/// Mesh `m`: `back-vn` provides `back.local` on a STRICT listener with the ACM certificate and
/// requires a client certificate from `clients` naming a caller (mutual TLS; App Mesh takes client
/// certificates and their validation from files or SDS only, so those are files);
/// `front-vn` and `wrong-vn` call it with their own client certificates, trusting the ACM PCA and
/// expecting back's name and another.
fn items(clients: &Pki) -> Value {
    let caller = |name: &str, san: &str| {
        let (chain, key) = clients.issue(name, &[&format!("{name}.trellis.test")]);
        json!({"meshName": "m", "virtualNodeName": name, "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "back.local"}}],
            "backendDefaults": {"clientPolicy": {"tls": {
                "certificate": {"file": {"certificateChain": chain, "privateKey": key}},
                "validation": {
                "trust": {"acm": {"certificateAuthorityArns": [PCA_ARN]}},
                "subjectAlternativeNames": {"match": {"exact": [san]}}}}}}}})
    };
    json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualServiceName": "back.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "back-vn"}}}},
        {"meshName": "m", "virtualNodeName": "back-vn", "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"},
                "tls": {"mode": "STRICT", "certificate": {"acm": {"certificateArn": CERT_ARN}},
                    "validation": {"trust": {"file": {"certificateChain": clients.ca()}},
                        "subjectAlternativeNames": {"match": {"exact": ["front-vn.trellis.test", "wrong-vn.trellis.test"]}}}}}],
            "serviceDiscovery": {"dns": {"hostname": "back-vn.trellis.test"}}}},
        caller("front-vn", "back-vn.trellis.test"),
        caller("wrong-vn", "other.local"),
    ])
}

/// `ads-probe` asking for `names` as `node` over `target`, run as given by `argv_of`: its output.
fn probe(
    argv_of: impl FnOnce(&[&str]) -> Vec<String>,
    target: &str,
    node: &str,
    name: &str,
) -> String {
    let exe = env!("CARGO_BIN_EXE_ads-probe");
    let argv = argv_of(&[exe, target, node, name]);
    let out = run(Command::new(&argv[0]).args(&argv[1..]));
    assert!(
        out.status.success(),
        "ads-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent's first log line with `what` about `about`, waited for.
fn logged(agent: &Agent, what: &str, about: &str, timeout: Duration) -> String {
    eventually(
        &format!("the agent logs {what:?} for {about}"),
        timeout,
        || {
            agent
                .proc
                .log_text()
                .lines()
                .find(|l| l.contains(what) && l.contains(about))
                .map(str::to_string)
                .ok_or_else(|| "not yet".to_string())
        },
    )
}

fn plain(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// ECS as the agent sees it in these tests: container cgroups, moto's ECS for task definitions
/// and the introspection stand-in. Dropped after the processes in its cgroups.
struct Ecs {
    cgroups: Cgroups,
    moto: Moto,
    intro: Introspection,
}

impl Ecs {
    fn start(work: &Workdir, name: &str) -> Ecs {
        Ecs {
            cgroups: Cgroups::new(name),
            moto: Moto::start(work, "moto-ecs"),
            intro: Introspection::start(work),
        }
    }

    /// An agent attesting through this ECS, exporting from `acm` every 2 s, with `extra` flags.
    fn agent(&self, work: &Workdir, resources: &Path, acm: &AcmStandin, extra: &[&str]) -> Agent {
        let mut args: Vec<String> = [
            "--xds-attestation",
            "ecs",
            "--ecs-agent-uri",
            &self.intro.uri,
            "--ecs-endpoint",
            &self.moto.endpoint,
            "--acm-endpoint",
            &acm.endpoint,
            "--acm-refresh-interval-s",
            "2",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        Agent::start_with(
            work,
            &AgentOpts {
                resources: Some(resources),
                args,
                env: aws_env(),
                ..AgentOpts::default()
            },
        )
    }

    /// Registers `def` (task family `name`), puts a container of it in a cgroup that the
    /// introspection stand-in knows, and starts its Envoy there with `extra` variables.
    fn envoy(
        &self,
        work: &Workdir,
        task: &Task,
        def: &Value,
        name: &str,
        extra: &[(&str, &str)],
    ) -> (Proc, Container) {
        let revision = register_task_definition(work, &self.moto.endpoint, def);
        let container = self.cgroups.container(name);
        self.intro.add(&container, name, revision, "envoy");
        let envoy = start_envoy_in(work, task, def, extra, Some(&container.dir));
        (envoy, container)
    }
}

/// The serial of the certificate the TLS server at `ip:8080` presents, seen from the VPC by an
/// unmeshed client with no client certificate (the server's certificate comes first; the
/// handshake then fails, as `unmeshed_tls_status` shows).
fn presented_serial(vpc: &Vpc, ip: &str) -> Result<String, String> {
    let script = format!(
        "echo | openssl s_client -connect {ip}:8080 -servername back-vn.trellis.test 2>/dev/null \
         | openssl x509 -noout -serial"
    );
    let out = run(Command::new("ip").args(["netns", "exec", &vpc.ns, "sh", "-c", &script]));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.strip_prefix("serial=")
        .map(str::to_ascii_uppercase)
        .ok_or_else(|| format!("no certificate presented ({text:?})"))
}

/// The HTTP status an unmeshed HTTPS client without a client certificate gets from back's
/// STRICT port (`000`: no answer).
fn unmeshed_tls_status(vpc: &Vpc, ip: &str) -> String {
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        &vpc.ns,
        "curl",
        "-sk",
        "-o",
        "/dev/null",
        "-m",
        "5",
        "-w",
        "%{http_code}",
        &format!("https://{ip}:8080/"),
    ]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// HTTP status of a GET from `task` (0 when the connection fails).
fn status(task: &Task, url: &str) -> u16 {
    let out = run(&mut task.cmd(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "10",
        "-w",
        "%{http_code}",
        url,
    ]));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn acm_certificates_reach_only_the_attested_envoy_of_their_node_renew_in_place_and_a_wrong_san_is_refused()
 {
    if !can_run_privileged("acm_certificates") {
        return;
    }
    let work = Workdir::new("acm");
    let ecs = Ecs::start(&work, "acm");
    let pca = Pki::new(&work, "pca");
    let (cert1, key1) = pca.issue("back1", &["back-vn.trellis.test"]);
    let acm = AcmStandin::start(&work);
    acm.certificate(CERT_ARN, &cert1, &key1, &pca.ca());
    acm.authority(PCA_ARN, &pca.ca());
    // Until the role may export it, the certificate is not served: back's port stays closed.
    acm.deny(CERT_ARN, true);
    let clients = Pki::new(&work, "clients");
    let resources = resources_file(&work, &items(&clients));
    // A door no stream is attested through, to show it is handed no secret.
    let agent = ecs.agent(
        &work,
        &resources,
        &acm,
        &["--xds-addr", "127.0.0.1:0", "--xds-tcp-insecure"],
    );
    let tcp = {
        let mut p = agent.proc.log_text();
        let at = p
            .find("xds_tcp=Some(")
            .expect("agent ready names its TCP ADS address");
        p = p[at + "xds_tcp=Some(".len()..].to_string();
        p[..p.find(')').expect("closing paren")].to_string()
    };
    let socket = agent.socket_dir.join("xds.sock");

    let mut vpc = Vpc::new(&work, 78);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    let wrong = vpc.task("wrong", 4);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let mut procs: Vec<Proc> = Vec::new();
    // Back speaks incremental ADS, the callers state of the world: both carry the secrets.
    let start = |task: &Task,
                 name: &str,
                 node: &str,
                 ports: &[u16],
                 procs: &mut Vec<Proc>,
                 extra: &[(&str, &str)]| {
        let def: Value = rewrite(
            &work,
            &app_taskdef(name, ports),
            "m",
            node,
            &agent.socket_dir,
        );
        run_route_manager(task, &def);
        let (envoy, container) = ecs.envoy(&work, task, &def, name, extra);
        procs.push(envoy);
        container
    };
    let back_container = start(
        &back,
        "back",
        "back-vn",
        &[8080],
        &mut procs,
        &[("TRELLIS_XDS_API_TYPE", "DELTA_GRPC")],
    );
    let back_envoy_pid = procs[0].pid();
    procs.push(back.start_http_app(&work, 8080, BACK_BODY));
    let front_container = start(&front, "front", "front-vn", &[], &mut procs, &[]);
    start(&wrong, "wrong", "wrong-vn", &[], &mut procs, &[]);

    // The failed export is named with its ARN and AWS error code, and nothing gets through.
    let warned = logged(
        &agent,
        "acm export failed",
        CERT_ARN,
        Duration::from_secs(20),
    );
    assert!(warned.contains("AccessDeniedException"), "{warned}");
    assert_ne!(
        status(&front, BACK_URL),
        200,
        "no TLS certificate, no traffic"
    );
    assert!(
        presented_serial(&vpc, &back.ip).is_err(),
        "back's STRICT port serves nothing"
    );
    acm.deny(CERT_ARN, false);

    // Happy path: back presents the exported certificate, front validates it against the PCA.
    let body = eventually(
        "front reaches back over TLS with ACM certificate and ACM PCA trust",
        Duration::from_secs(40),
        || front.http_get(None, BACK_URL),
    );
    assert_eq!(body, BACK_BODY);
    assert!(
        front.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back-vn_http_8080.ssl.handshake"
        ) >= 1
    );
    assert!(back.envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.handshake") >= 1);
    assert_eq!(presented_serial(&vpc, &back.ip), Ok(serial(&cert1)));
    // Both ADS variants carried (and Envoy accepted) their secrets.
    let streams = agent.debug_xds();
    for (node, variant) in [
        (BACK_NODE, "delta"),
        ("mesh/m/virtualNode/front-vn", "sotw"),
    ] {
        let acked = streams
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .any(|s| {
                s["node"] == node
                    && s["variant"] == variant
                    && s["types"]["Secret"]["acked_version"].is_string()
            });
        assert!(
            acked,
            "no {variant} stream of {node} acked a secret: {streams:#}"
        );
    }
    // Plaintext straight at the STRICT port gets nothing.
    let plain_status = run(Command::new("ip").args([
        "netns",
        "exec",
        &vpc.ns,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "5",
        "-w",
        "%{http_code}",
        &format!("http://{}:8080/", back.ip),
    ]));
    assert_eq!(String::from_utf8_lossy(&plain_status.stdout).trim(), "000");
    // Mutual: TLS without a client certificate gets nothing either, and back's Envoy counts it.
    assert_eq!(unmeshed_tls_status(&vpc, &back.ip), "000");
    assert!(back.envoy_stat(ADMIN_PORT, "listener.0.0.0.0_15000.ssl.fail_verify_no_cert") >= 1);

    // A caller expecting another name refuses back's certificate.
    let url = "http://back.local:8080/";
    assert_eq!(
        status(&wrong, url),
        503,
        "back's certificate does not name other.local"
    );
    assert!(
        wrong.envoy_stat(
            ADMIN_PORT,
            "cluster.cds_egress_m_back-vn_http_8080.ssl.fail_verify_san"
        ) >= 1
    );

    // Who is handed the secret: back's own attested container, by name; nobody else.
    let sock = format!("unix:{}", socket.display());
    let name = format!("acm:{CERT_ARN}");
    let own = probe(
        |a| in_cgroup(&back_container.dir, a),
        &sock,
        BACK_NODE,
        &name,
    );
    assert!(
        own.contains("secrets=1") && own.contains(&format!("secret {name} certificate")),
        "{own}"
    );
    let other = probe(
        |a| in_cgroup(&front_container.dir, a),
        &sock,
        "mesh/m/virtualNode/front-vn",
        &name,
    );
    assert!(
        other.contains("secrets=0"),
        "another node's stream: {other}"
    );
    let unattested = probe(plain, &format!("http://{tcp}"), BACK_NODE, &name);
    assert!(
        unattested.contains("secrets=0"),
        "an unattested stream: {unattested}"
    );

    // Renewal: ACM now exports a new certificate; the agent's refresh pushes it and back's
    // Envoy presents it without a restart.
    let (cert2, key2) = pca.issue("back2", &["back-vn.trellis.test"]);
    assert_ne!(serial(&cert1), serial(&cert2));
    let exports = acm.calls(EXPORT, CERT_ARN);
    acm.certificate(CERT_ARN, &cert2, &key2, &pca.ca());
    let renewed = serial(&cert2);
    eventually(
        "back presents the renewed certificate",
        Duration::from_secs(30),
        || match presented_serial(&vpc, &back.ip)? {
            s if s == renewed => Ok(()),
            s => Err(format!("still {s}")),
        },
    );
    assert!(acm.calls(EXPORT, CERT_ARN) > exports);
    assert!(
        procs[0].is_running() && procs[0].pid() == back_envoy_pid,
        "the same Envoy"
    );
    assert_eq!(
        status(&front, url),
        200,
        "front trusts the renewed certificate"
    );

    // No key material in the agent's log.
    let log = agent.proc.log_text();
    let key = std::fs::read_to_string(&key2).expect("key");
    let key_line = key.lines().nth(1).expect("a base64 line of the key");
    assert!(!log.contains(key_line), "the agent logged key material");
    drop(procs);
}

#[test]
fn without_attestation_acm_stays_fail_closed_nothing_is_exported_and_the_warning_says_why() {
    let work = Workdir::new("acm-none");
    let acm = AcmStandin::start(&work);
    let pca = Pki::new(&work, "pca");
    let (cert, key) = pca.issue("back", &["back-vn.trellis.test"]);
    acm.certificate(CERT_ARN, &cert, &key, &pca.ca());
    let clients = Pki::new(&work, "clients");
    let resources = resources_file(&work, &items(&clients));
    // The helpers start agents with --xds-attestation none unless told otherwise.
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            resources: Some(&resources),
            args: [
                "--acm-endpoint",
                &acm.endpoint,
                "--acm-refresh-interval-s",
                "1",
            ]
            .map(String::from)
            .to_vec(),
            env: aws_env(),
            ..AgentOpts::default()
        },
    );
    let sock = format!("unix:{}", agent.socket_dir.join("xds.sock").display());
    let name = format!("acm:{CERT_ARN}");
    let got = probe(plain, &sock, BACK_NODE, &name);
    assert!(got.contains("secrets=0"), "{got}");
    let warned = logged(
        &agent,
        "configuration not served",
        BACK_NODE,
        Duration::from_secs(10),
    );
    assert!(warned.contains("served only to attested"), "{warned}");
    assert!(warned.contains("TLS STRICT not served"), "{warned}");
    // No exporter runs at all (said once at start), so no stream's demand can start one.
    assert!(
        agent
            .proc
            .log_text()
            .contains("ACM certificates and trust are not served: no stream is attested"),
        "the agent says it serves no ACM"
    );
    assert_eq!(
        acm.calls(EXPORT, CERT_ARN),
        0,
        "no export without attestation"
    );
}

/// A virtual gateway's listener with an ACM certificate: the gateway's own attested Envoy gets it
/// and terminates TLS for a client outside the mesh, routing to a node behind it.
#[test]
fn an_attested_virtual_gateway_terminates_tls_with_its_acm_certificate() {
    if !can_run_privileged("acm on a gateway") {
        return;
    }
    let work = Workdir::new("acm-gw");
    let ecs = Ecs::start(&work, "acm-gw");
    let pca = Pki::new(&work, "pca");
    let (cert, key) = pca.issue("gw", &["gw.example.com"]);
    let acm = AcmStandin::start(&work);
    acm.certificate(CERT_ARN, &cert, &key, &pca.ca());
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            {"meshName": "m", "virtualServiceName": "back.local",
             "spec": {"provider": {"virtualNode": {"virtualNodeName": "back-vn"}}}},
            {"meshName": "m", "virtualNodeName": "back-vn", "spec": {
                "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "back-vn.trellis.test"}}}},
            {"meshName": "m", "virtualGatewayName": "gw", "spec": {
                "listeners": [{"portMapping": {"port": 8443, "protocol": "http"},
                    "tls": {"mode": "STRICT", "certificate": {"acm": {"certificateArn": CERT_ARN}}}}]}},
            {"meshName": "m", "virtualGatewayName": "gw", "gatewayRouteName": "to-back", "spec": {
                "httpRoute": {"match": {"prefix": "/"},
                    "action": {"target": {"virtualService": {"virtualServiceName": "back.local"}}}}}},
        ]),
    );
    let agent = ecs.agent(&work, &resources, &acm, &[]);
    let mut vpc = Vpc::new(&work, 79);
    let gw = vpc.task("gw", 2);
    let back = vpc.task("back", 3);
    let client = vpc.task("client", 4);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let mut procs: Vec<Proc> = Vec::new();

    // back-vn: an ordinary meshed task, attested like any other.
    let def = rewrite(
        &work,
        &app_taskdef("back", &[8080]),
        "m",
        "back-vn",
        &agent.socket_dir,
    );
    run_route_manager(&back, &def);
    procs.push(ecs.envoy(&work, &back, &def, "back", &[]).0);
    procs.push(back.start_http_app(&work, 8080, BACK_BODY));

    // The gateway: trellis-rewrite's gateway task (Envoy only), registered and attested.
    let input = work.join("taskdef-gw.json");
    std::fs::write(&input, app_taskdef("gw", &[]).to_string()).expect("write taskdef");
    let out = run(Command::new(trellis_tests::bin("trellis-rewrite"))
        .args([
            "--mesh",
            "m",
            "--virtual-gateway",
            "gw",
            "--socket-host-path",
        ])
        .arg(&agent.socket_dir)
        .arg(&input));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut def: Value =
        serde_json::from_slice(&out.stdout).expect("the gateway's task definition");
    // A gateway's Envoy needs no uid of its own (nothing is redirected); the helper runs every
    // Envoy as one.
    for c in def["containerDefinitions"]
        .as_array_mut()
        .expect("containers")
    {
        if c["name"] == "envoy" && c["user"].is_null() {
            c["user"] = json!("1337");
        }
    }
    procs.push(ecs.envoy(&work, &gw, &def, "gw", &[]).0);

    let call = || {
        let out = run(&mut client.cmd(&[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &pca.ca(),
            "--resolve",
            &format!("gw.example.com:8443:{}", gw.ip),
            "-w",
            "\n%{http_code}",
            "https://gw.example.com:8443/",
        ]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().to_string(), body.to_string())
    };
    let body = eventually(
        "the gateway terminates TLS with its ACM certificate",
        Duration::from_secs(60),
        || match call() {
            (s, b) if s == "200" => Ok(b),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(body, BACK_BODY);
    assert!(acm.calls(EXPORT, CERT_ARN) >= 1);
    let streams = agent.debug_xds();
    let acked = streams
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .any(|s| {
            s["node"] == "mesh/m/virtualGateway/gw"
                && s["types"]["Secret"]["acked_version"].is_string()
        });
    assert!(acked, "the gateway's stream acked its secret: {streams:#}");
    drop(procs);
}
