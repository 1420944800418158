//! The API with `--api-auth`: every request SigV4-verified as the AWS CLI, boto3 and the Rust SDK
//! sign it, refusals with AWS's codes and statuses in App Mesh's error shape, IAM policies
//! scoping keys (read-only, one mesh, Deny over Allow, wildcard actions, referenced resources), the
//! 15-minute window, `/metrics`, `/debug/xds`, explain and the topology behind their actions, the audit log, the auth file
//! reloaded under load, HTTPS with `--ca-bundle` and a reloaded certificate, and the refusal to
//! open the API beyond loopback without a lock.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::auth::{
    ApiAuth, AuthFile, Key, Pki, Tls, admin_policy, boto, policy, refused, write_atomically,
};
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::{Proc, Workdir, bin, eventually, run};

fn start(work: &Workdir, name: &str, extra: AuthFile) -> Agent {
    let auth = ApiAuth::admin(work, name, extra);
    Agent::start_with(
        work,
        &AgentOpts {
            name,
            auth: Some(auth),
            ..AgentOpts::default()
        },
    )
}

fn auth(agent: &Agent) -> &ApiAuth {
    agent.auth.as_ref().expect("a secured agent")
}

/// Nothing secret may reach the agent's log or the audit log.
fn assert_no_secrets(agent: &Agent, secrets: &[&str]) {
    let log = agent.proc.log_text();
    let audit = auth(agent)
        .audit_log
        .as_ref()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .unwrap_or_default();
    for s in secrets.iter().chain([&auth(agent).key.secret.as_str()]) {
        assert!(!log.contains(s), "a secret in the agent's log");
        assert!(!audit.contains(s), "a secret in the audit log");
    }
    assert!(
        !log.contains("Signature="),
        "a signature in the agent's log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_boto3_and_the_rust_sdk_sign_with_keys_and_are_served() {
    let work = Workdir::new("auth-clients");
    let reader = Key::new("reader");
    let agent = start(
        &work,
        "agent",
        AuthFile::default().key(
            &reader,
            policy("Allow", &["appmesh:Describe*", "appmesh:List*"], &["*"]),
        ),
    );
    // The AWS CLI (botocore, Authorization header).
    let mesh = agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    assert_eq!(mesh["mesh"]["meshName"], "shop");
    // boto3, header form and presigned query form.
    let listed = boto(&agent, &reader, "list_meshes", json!({}), json!({}));
    assert_eq!(
        listed["result"]["meshes"][0]["meshName"], "shop",
        "{listed}"
    );
    let presigned = boto(
        &agent,
        &reader,
        "describe_mesh",
        json!({"meshName": "shop"}),
        json!({"presign": true}),
    );
    assert!(
        presigned["url"]
            .as_str()
            .unwrap()
            .contains("X-Amz-Signature="),
        "{presigned}"
    );
    // The raw HTTP answer: the payload is the mesh itself.
    assert_eq!(presigned["result"]["meshName"], "shop", "{presigned}");
    let forged = boto(
        &agent,
        &reader,
        "describe_mesh",
        json!({"meshName": "shop"}),
        json!({"presign": true, "secret": "not-the-secret-at-all"}),
    );
    assert_eq!(
        refused(&forged),
        ("InvalidSignatureException".into(), 403),
        "{forged}"
    );

    // The Rust SDK.
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .endpoint_url(&agent.api)
        .region(aws_sdk_appmesh::config::Region::new(
            trellis_tests::auth::REGION,
        ))
        .credentials_provider(aws_sdk_appmesh::config::Credentials::new(
            reader.id.clone(),
            reader.secret.clone(),
            None,
            None,
            "test",
        ))
        .retry_config(aws_sdk_appmesh::config::retry::RetryConfig::disabled())
        .load()
        .await;
    let sdk = aws_sdk_appmesh::Client::new(&config);
    let meshes = sdk
        .list_meshes()
        .send()
        .await
        .expect("list through the SDK");
    assert_eq!(meshes.meshes()[0].mesh_name(), "shop");
    let denied = sdk
        .create_mesh()
        .mesh_name("lab")
        .send()
        .await
        .expect_err("a reader cannot create");
    use aws_sdk_appmesh::error::ProvideErrorMetadata;
    let status = denied.raw_response().map(|r| r.status().as_u16());
    assert_eq!(
        (denied.code(), status),
        (Some("AccessDeniedException"), Some(403))
    );
    assert_no_secrets(&agent, &[&reader.secret]);
}

#[test]
fn every_refusal_has_its_aws_code_and_status_in_app_meshs_error_shape() {
    let work = Workdir::new("auth-refusals");
    let reader = Key::new("reader");
    let agent = start(
        &work,
        "agent",
        AuthFile::default().key(&reader, policy("Allow", &["appmesh:List*"], &["*"])),
    );
    // Unsigned: no Authorization header at all.
    let out = run(Command::new("curl").args([
        "-s",
        "-D",
        "-",
        &format!("{}/v20190125/meshes", agent.api),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-amzn-errortype: missingauthenticationtokenexception"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["__type"], "MissingAuthenticationTokenException");
    assert_eq!(body["message"], "Missing Authentication Token");

    let stranger = Key::new("stranger");
    let wrong_secret = Key {
        id: reader.id.clone(),
        secret: "0123456789abcdef0123".into(),
    };
    let call = |key: &Key, op: &str, params: Value, extra: Value| {
        let answer = boto(&agent, key, op, params, extra);
        (refused(&answer), answer["error"]["message"].to_string())
    };
    let (code, msg) = call(&stranger, "list_meshes", json!({}), json!({}));
    assert_eq!(code, ("UnrecognizedClientException".into(), 403), "{msg}");
    assert!(msg.contains("The security token included in the request is invalid"));
    let (code, msg) = call(&wrong_secret, "list_meshes", json!({}), json!({}));
    assert_eq!(code, ("InvalidSignatureException".into(), 403), "{msg}");
    assert!(
        msg.contains("signature we calculated does not match"),
        "{msg}"
    );
    let (code, msg) = call(
        &reader,
        "list_meshes",
        json!({}),
        json!({"region": "eu-west-1"}),
    );
    assert_eq!(code, ("InvalidSignatureException".into(), 403), "{msg}");
    assert!(msg.contains("not 'eu-west-1'"), "{msg}");
    let (code, msg) = call(
        &Key {
            id: "ASIAAAAAAAAAAAAAAAAA".into(),
            secret: reader.secret.clone(),
        },
        "list_meshes",
        json!({}),
        json!({"token": "not-a-trellis-session-token"}),
    );
    assert_eq!(code, ("UnrecognizedClientException".into(), 403), "{msg}");
    let (code, msg) = call(
        &reader,
        "create_mesh",
        json!({"meshName": "shop"}),
        json!({}),
    );
    assert_eq!(code, ("AccessDeniedException".into(), 403), "{msg}");
    assert!(
        msg.contains(&format!(
            "User: {} is not authorized to perform: appmesh:CreateMesh on resource: arn:aws:appmesh:us-east-1:000000000000:mesh/shop",
            reader.id
        )),
        "{msg}"
    );
    // A malformed Authorization header.
    let out = run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/20300101/us-east-1/appmesh/aws4_request",
        "-H",
        "X-Amz-Date: 20300101T000000Z",
        &format!("{}/v20190125/meshes", agent.api),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    // The AWS CLI reports them as it reports AWS's own.
    let err = {
        let mut c = agent.aws(&["appmesh", "list-meshes"]);
        c.env("AWS_ACCESS_KEY_ID", &stranger.id)
            .env("AWS_SECRET_ACCESS_KEY", &stranger.secret);
        String::from_utf8_lossy(&run(&mut c).stderr).into_owned()
    };
    assert!(
        err.contains(
            "An error occurred (UnrecognizedClientException) when calling the ListMeshes operation"
        ),
        "{err}"
    );
    assert_no_secrets(&agent, &[&reader.secret, &stranger.secret]);
}

#[test]
fn policies_scope_reads_one_mesh_deny_over_allow_wildcards_and_referenced_resources() {
    let work = Workdir::new("auth-policies");
    let arn = |p: &str| format!("arn:aws:appmesh:us-east-1:000000000000:{p}");
    let reader = Key::new("reader");
    let shop = Key::new("shop");
    let no_delete = Key::new("nodelete");
    let creator = Key::new("creator");
    let nodes_only = Key::new("nodes");
    let file = AuthFile::default()
        .key(
            &reader,
            policy("Allow", &["appmesh:Describe*", "appmesh:List*"], &["*"]),
        )
        .key(
            &shop,
            policy(
                "Allow",
                &["appmesh:*"],
                &[&arn("mesh/shop"), &arn("mesh/shop/*")],
            ),
        )
        .key(
            &no_delete,
            json!({"Statement": [
                {"Effect": "Allow", "Action": "appmesh:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "appmesh:Delete*", "Resource": "*"}]}),
        )
        .key(&creator, policy("Allow", &["appmesh:Create*"], &["*"]))
        .key(
            &nodes_only,
            policy(
                "Allow",
                &["appmesh:CreateVirtualNode"],
                &[&arn("mesh/shop/virtualNode/*")],
            ),
        );
    let agent = start(&work, "agent", file);
    agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    agent.appmesh(&["create-mesh", "--mesh-name", "lab"]);
    let ok = |key: &Key, op: &str, params: Value| {
        let a = boto(&agent, key, op, params, json!({}));
        assert!(a["result"].is_object(), "{} {op}: {a}", key.id);
    };
    let denied = |key: &Key, op: &str, params: Value| -> String {
        let a = boto(&agent, key, op, params, json!({}));
        assert_eq!(
            refused(&a),
            ("AccessDeniedException".into(), 403),
            "{} {op}: {a}",
            key.id
        );
        a["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let node =
        |mesh: &str, name: &str| json!({"meshName": mesh, "virtualNodeName": name, "spec": {}});

    // Read-only.
    ok(&reader, "list_meshes", json!({}));
    ok(&reader, "describe_mesh", json!({"meshName": "lab"}));
    denied(&reader, "create_virtual_node", node("shop", "a"));

    // One mesh only: its resources, not another mesh's, not ListMeshes (on `*`).
    ok(&shop, "create_virtual_node", node("shop", "a"));
    ok(&shop, "describe_mesh", json!({"meshName": "shop"}));
    let msg = denied(&shop, "create_virtual_node", node("lab", "a"));
    assert!(msg.contains(&arn("mesh/lab/virtualNode/a")), "{msg}");
    denied(&shop, "list_meshes", json!({}));

    // Deny over Allow.
    ok(&no_delete, "create_virtual_node", node("lab", "b"));
    let msg = denied(
        &no_delete,
        "delete_virtual_node",
        json!({"meshName": "lab", "virtualNodeName": "b"}),
    );
    assert!(msg.contains("with an explicit deny"), "{msg}");

    // Wildcard actions: Create* creates and nothing else.
    ok(
        &creator,
        "create_virtual_router",
        json!({"meshName": "lab", "virtualRouterName": "r",
        "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]}}),
    );
    denied(
        &creator,
        "describe_virtual_router",
        json!({"meshName": "lab", "virtualRouterName": "r"}),
    );

    // What a write references needs the action too (App Mesh's IAM reference): a node's backend.
    ok(&nodes_only, "create_virtual_node", node("shop", "c"));
    let with_backend = json!({"meshName": "shop", "virtualNodeName": "d", "spec": {"backends": [
        {"virtualService": {"virtualServiceName": "db.local"}}]}});
    let msg = denied(&nodes_only, "create_virtual_node", with_backend.clone());
    assert!(
        msg.contains(&arn("mesh/shop/virtualService/db.local")),
        "{msg}"
    );
    ok(&shop, "create_virtual_node", with_backend);
    // Nothing a denied request asked for happened.
    let nodes = agent.appmesh(&["list-virtual-nodes", "--mesh-name", "lab"]);
    let names: Vec<&str> = nodes["virtualNodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["virtualNodeName"].as_str())
        .collect();
    assert_eq!(names, ["b"]);
}

#[test]
fn a_request_signed_more_than_fifteen_minutes_ago_is_refused() {
    let work = Workdir::new("auth-replay");
    let agent = start(&work, "agent", AuthFile::default());
    let key = auth(&agent).key.clone();
    agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    for (ago, allowed) in [(14 * 60, true), (16 * 60, false)] {
        let a = boto(
            &agent,
            &key,
            "describe_mesh",
            json!({"meshName": "shop"}),
            json!({"signedSecondsAgo": ago}),
        );
        if allowed {
            assert!(a["result"].is_object(), "{a}");
        } else {
            assert_eq!(
                refused(&a),
                ("InvalidSignatureException".into(), 403),
                "{a}"
            );
            let msg = a["error"]["message"].as_str().unwrap();
            assert!(
                msg.starts_with("Signature expired: ") && msg.ends_with(" - 15 min.)"),
                "{msg}"
            );
        }
    }
    // A presigned URL lives for its X-Amz-Expires, from its signing time.
    let a = boto(
        &agent,
        &key,
        "describe_mesh",
        json!({"meshName": "shop"}),
        json!({"presign": true, "expiresIn": 60, "signedSecondsAgo": 120}),
    );
    assert_eq!(
        refused(&a),
        ("InvalidSignatureException".into(), 403),
        "{a}"
    );
}

#[test]
fn metrics_and_debug_need_their_action_and_health_stays_open() {
    let work = Workdir::new("auth-admin");
    let reader = Key::new("reader");
    let scraper = Key::new("scraper");
    let agent = start(
        &work,
        "agent",
        AuthFile::default()
            .key(&reader, policy("Allow", &["appmesh:*"], &["*"]))
            .key(&scraper, policy("Allow", &["trellis:ReadMetrics"], &["*"])),
    );
    let status = |key: Option<&Key>, path: &str| {
        let mut c = Command::new("curl");
        if let Some(k) = key {
            c.args(["--aws-sigv4", "aws:amz:us-east-1:appmesh", "--user"])
                .arg(format!("{}:{}", k.id, k.secret));
        }
        let out = run(c
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}{path}", agent.api)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(None, path), "200", "{path} is open");
    }
    assert_eq!(status(None, "/metrics"), "403");
    assert_eq!(status(Some(&reader), "/metrics"), "403");
    assert_eq!(status(Some(&reader), "/debug/xds"), "403");
    assert_eq!(status(Some(&scraper), "/metrics"), "200");
    assert_eq!(status(Some(&scraper), "/debug/xds"), "403");
    // The helpers sign with the administrator key (`trellis:*`).
    assert!(agent.metric("trellis_api_requests_total{outcome=\"unauthenticated\"}") >= 1.0);
    assert!(agent.debug_xds().is_object());
}

/// `trellis:Explain` is checked on the explained proxy's ARN and `trellis:ReadTopology` on the
/// mesh's, end to end: a principal allowed one node and one mesh is refused the others, with the
/// action and the ARN named, through the `explain` command and the topology endpoint.
#[test]
fn explain_and_the_topology_need_their_action_on_the_proxy_and_the_mesh_they_show() {
    let work = Workdir::new("auth-explain");
    let arn = |p: &str| format!("arn:aws:appmesh:us-east-1:000000000000:{p}");
    let viewer = Key::new("viewer");
    let agent = start(
        &work,
        "agent",
        AuthFile::default().key(
            &viewer,
            json!({"Statement": [
                {"Effect": "Allow", "Action": "trellis:Explain", "Resource": arn("mesh/shop/virtualNode/front")},
                {"Effect": "Allow", "Action": "trellis:ReadTopology", "Resource": arn("mesh/shop")}]}),
        ),
    );
    for mesh in ["shop", "lab"] {
        agent.appmesh(&["create-mesh", "--mesh-name", mesh]);
    }
    for node in ["front", "back"] {
        agent.appmesh(&[
            "create-virtual-node",
            "--mesh-name",
            "shop",
            "--virtual-node-name",
            node,
            "--spec",
            r#"{"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}], "serviceDiscovery": {"dns": {"hostname": "x.local"}}}"#,
        ]);
    }
    let explain = |node: &str| {
        run(Command::new(bin("trellis-agent"))
            .args(["explain", "--mesh", "shop", "--virtual-node", node])
            .args([
                "http://back.local:8080/",
                "--output",
                "json",
                "--api-addr",
                &agent.api,
            ])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &viewer.id)
            .env("AWS_SECRET_ACCESS_KEY", &viewer.secret))
    };
    let allowed = explain("front");
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let answer: Value = serde_json::from_slice(&allowed.stdout).expect("explain's JSON");
    assert!(answer.is_object(), "{answer}");
    let refused_node = explain("back");
    assert!(!refused_node.status.success());
    let err = String::from_utf8_lossy(&refused_node.stderr);
    assert!(
        err.contains("AccessDenied")
            && err.contains("trellis:Explain")
            && err.contains(&arn("mesh/shop/virtualNode/back")),
        "{err}"
    );
    let topology = |mesh: &str| {
        let out = run(Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "--aws-sigv4",
                "aws:amz:us-east-1:appmesh",
            ])
            .arg("--user")
            .arg(format!("{}:{}", viewer.id, viewer.secret))
            .arg(format!("{}/trellis/v1/topology?mesh={mesh}", agent.api)));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
        (status.to_string(), body.to_string())
    };
    let (status, body) = topology("shop");
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("front") && body.contains("back"), "{body}");
    let (status, body) = topology("lab");
    assert_eq!(status, "403", "{body}");
    assert!(
        body.contains("trellis:ReadTopology") && body.contains(&arn("mesh/lab")),
        "{body}"
    );
    // What it may see does not include the App Mesh API itself.
    let a = boto(
        &agent,
        &viewer,
        "describe_mesh",
        json!({"meshName": "shop"}),
        json!({}),
    );
    assert_eq!(refused(&a), ("AccessDeniedException".into(), 403), "{a}");
}

#[test]
fn the_audit_log_has_a_line_per_write_and_per_refusal_and_no_reads() {
    let work = Workdir::new("auth-audit");
    let reader = Key::new("reader");
    let agent = start(
        &work,
        "agent",
        AuthFile::default().key(&reader, policy("Allow", &["appmesh:Describe*"], &["*"])),
    );
    let admin = auth(&agent).key.clone();
    // An allowed write, seen by its request id.
    let (status, _, _) = agent.raw("PUT", "/v20190125/meshes", Some(r#"{"meshName":"shop"}"#));
    assert_eq!(status, 200);
    let out = run(agent.curl().args([
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "--data-binary",
        r#"{"meshName":"lab"}"#,
        &format!("{}/v20190125/meshes", agent.api),
    ]));
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-amzn-requestid: "))
        .expect("x-amzn-RequestId")
        .trim()
        .to_string();
    // A failed write (the name is taken), a denied one, an unauthenticated one, and a read.
    let (status, kind, _) = agent.raw(
        "PUT",
        "/v20190125/meshes",
        Some(r#"{"meshName":"shop","spec":{"egressFilter":{"type":"ALLOW_ALL"}}}"#),
    );
    assert_eq!((status, kind.as_deref()), (409, Some("ConflictException")));
    boto(
        &agent,
        &reader,
        "delete_mesh",
        json!({"meshName": "lab"}),
        json!({}),
    );
    boto(
        &agent,
        &Key::new("nobody"),
        "delete_mesh",
        json!({"meshName": "lab"}),
        json!({}),
    );
    boto(
        &agent,
        &reader,
        "describe_mesh",
        json!({"meshName": "lab"}),
        json!({}),
    );

    let lines = eventually("five audit lines", Duration::from_secs(10), || {
        let lines = auth(&agent).audit_lines();
        if lines.len() >= 5 {
            Ok(lines)
        } else {
            Err(format!("{} lines", lines.len()))
        }
    });
    let summary: Vec<(String, String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["operation"].as_str().unwrap_or_default().to_string(),
                l["principal"].as_str().unwrap_or_default().to_string(),
                l["outcome"].as_str().unwrap_or_default().to_string(),
                l["resource"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let mesh_arn = |m: &str| format!("arn:aws:appmesh:us-east-1:000000000000:mesh/{m}");
    assert_eq!(
        summary,
        vec![
            (
                "CreateMesh".into(),
                admin.id.clone(),
                "allowed".into(),
                mesh_arn("shop")
            ),
            (
                "CreateMesh".into(),
                admin.id.clone(),
                "allowed".into(),
                mesh_arn("lab")
            ),
            (
                "CreateMesh".into(),
                admin.id.clone(),
                "failed".into(),
                mesh_arn("shop")
            ),
            (
                "DeleteMesh".into(),
                reader.id.clone(),
                "denied".into(),
                mesh_arn("lab")
            ),
            (
                "DeleteMesh".into(),
                lines[4]["principal"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                "unauthenticated".into(),
                mesh_arn("lab")
            ),
        ],
        "{lines:#?}"
    );
    assert!(
        lines[4]["principal"]
            .as_str()
            .unwrap()
            .starts_with("AKIANOBODY")
    );
    assert_eq!(lines[1]["requestId"], request_id.as_str());
    assert_eq!(lines[2]["errorCode"], "ConflictException");
    assert_eq!(lines[3]["errorCode"], "AccessDeniedException");
    assert_eq!(lines[4]["errorCode"], "UnrecognizedClientException");
    for l in &lines {
        let t = l["time"].as_str().unwrap();
        assert!(t.len() == 20 && t.ends_with('Z'), "{t}");
        assert_eq!(l["sourceIp"], "127.0.0.1");
    }
    assert_no_secrets(&agent, &[&reader.secret]);
}

#[test]
fn the_auth_file_reloads_without_dropping_requests_and_a_bad_file_keeps_the_last_good_one() {
    let work = Workdir::new("auth-reload");
    let agent = start(&work, "agent", AuthFile::default());
    let file = auth(&agent).file.clone();
    let admin = auth(&agent).key.clone();
    let base = AuthFile::default().key(&admin, admin_policy());

    // Signed reads all the time, from two threads.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            let (mut curl, url) = (agent.curl(), format!("{}/v20190125/meshes", agent.api));
            std::thread::spawn(move || {
                curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
                while !stop.load(Ordering::Relaxed) {
                    let out = run(&mut curl);
                    if out.stdout != b"200" {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // A new key takes effect without a restart.
    let writer = Key::new("writer");
    base.clone()
        .key(&writer, policy("Allow", &["appmesh:CreateMesh"], &["*"]))
        .write(&file);
    eventually("the new key works", Duration::from_secs(15), || {
        let a = boto(
            &agent,
            &writer,
            "create_mesh",
            json!({"meshName": "m1"}),
            json!({}),
        );
        a["result"].is_object().then_some(()).ok_or(a.to_string())
    });
    // A few more rewrites while the readers run.
    for i in 0..4 {
        base.clone()
            .key(&writer, policy("Allow", &["appmesh:CreateMesh"], &["*"]))
            .role(
                &format!("arn:aws:iam::111122223333:role/r{i}"),
                admin_policy(),
            )
            .write(&file);
        let before = agent.metric("trellis_api_auth_reloads_total{result=\"ok\"}");
        eventually("the rewrite is loaded", Duration::from_secs(15), || {
            let now = agent.metric("trellis_api_auth_reloads_total{result=\"ok\"}");
            (now > before).then_some(()).ok_or(format!("{now} reloads"))
        });
    }

    // A bad file is refused, naming the field; the last good one stays in force.
    let mut bad = base.to_json();
    bad["keys"][0]["policy"]["Statement"][0]["Effect"] = json!("allow");
    write_atomically(&file, bad.to_string().as_bytes());
    eventually("the bad file is refused", Duration::from_secs(15), || {
        let log = agent.proc.log_text();
        log.contains("keys[0].policy.Statement[0].Effect: must be Allow or Deny")
            .then_some(())
            .ok_or("not yet".to_string())
    });
    assert!(agent.metric("trellis_api_auth_reloads_total{result=\"refused\"}") >= 1.0);
    let a = boto(
        &agent,
        &writer,
        "create_mesh",
        json!({"meshName": "m2"}),
        json!({}),
    );
    assert!(
        a["result"].is_object(),
        "the last good file is in force: {a}"
    );

    // A good file again: the writer is gone.
    base.write(&file);
    eventually(
        "the writer's key is removed",
        Duration::from_secs(15),
        || {
            let a = boto(
                &agent,
                &writer,
                "create_mesh",
                json!({"meshName": "m3"}),
                json!({}),
            );
            match refused_or_ok(&a) {
                Some(code) if code == "UnrecognizedClientException" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 10, "the readers ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no signed request failed across {} reloads",
        6
    );
    assert_no_secrets(&agent, &[&writer.secret]);
}

fn refused_or_ok(a: &Value) -> Option<String> {
    a["error"]["code"].as_str().map(str::to_string)
}

#[test]
fn https_with_a_ca_bundle_and_a_certificate_reloaded_in_place() {
    let work = Workdir::new("auth-tls");
    let pki = Pki::new(&work, "api");
    let (cert1, key1) = pki.issue("api1");
    let (cert, key) = (work.join("api.pem"), work.join("api.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let mut api_auth = ApiAuth::admin(&work, "agent", AuthFile::default());
    api_auth.tls = Some(Tls {
        cert: cert.clone(),
        key: key.clone(),
        ca: pki.ca.clone(),
    });
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            auth: Some(api_auth),
            ..AgentOpts::default()
        },
    );
    assert!(agent.api.starts_with("https://localhost:"));
    // The AWS CLI with --ca-bundle (the helper passes it), and without it.
    agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    let mut c = Command::new(trellis_tests::aws());
    let key_pair = auth(&agent).key.clone();
    c.args(["appmesh", "list-meshes", "--endpoint-url", &agent.api])
        .env("AWS_ACCESS_KEY_ID", &key_pair.id)
        .env("AWS_SECRET_ACCESS_KEY", &key_pair.secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let out = run(&mut c);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP on the TLS port gets nothing.
    let port = agent.api.rsplit(':').next().unwrap().to_string();
    let plain = run(Command::new("curl").args([
        "-s",
        "-m",
        "3",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{port}/healthz"),
    ]));
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    // The container health check speaks TLS, pinned to the certificate file.
    let health = |pem: &std::path::Path| {
        run(Command::new(bin("trellis-agent"))
            .args(["health", "--api-addr", &format!("127.0.0.1:{port}")])
            .arg("--api-tls-cert")
            .arg(pem))
        .status
        .success()
    };
    assert!(health(&cert1));

    // A new certificate in place (key first, then the chain): served without a restart.
    let (cert2, key2) = pki.issue("api2");
    write_atomically(&key, &std::fs::read(&key2).unwrap());
    write_atomically(&cert, &std::fs::read(&cert2).unwrap());
    eventually(
        "the new certificate is served",
        Duration::from_secs(15),
        || {
            health(&cert2)
                .then_some(())
                .ok_or("old one still".to_string())
        },
    );
    assert!(!health(&cert1));
    agent.appmesh(&["describe-mesh", "--mesh-name", "shop"]);
    // A broken file is refused; the current certificate stays.
    let refused_before = agent.metric("trellis_api_tls_reloads_total{result=\"refused\"}");
    write_atomically(&cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    eventually(
        "the broken certificate is refused",
        Duration::from_secs(15),
        || {
            let n = agent.metric("trellis_api_tls_reloads_total{result=\"refused\"}");
            (n > refused_before).then_some(()).ok_or(format!("{n}"))
        },
    );
    assert!(health(&cert2));
    agent.appmesh(&["describe-mesh", "--mesh-name", "shop"]);
}

#[test]
fn an_api_beyond_loopback_needs_auth_or_an_explicit_opt_out() {
    let work = Workdir::new("auth-open");
    let serve = |name: &str, extra: &[String]| {
        let mut cmd = Command::new(bin("trellis-agent"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(work.join(&format!("{name}-data")))
            .args(["--api-addr", "0.0.0.0:0"])
            .arg("--xds-socket")
            .arg(work.join(&format!("{name}.sock")))
            .args(extra);
        Proc::spawn(name, &mut cmd, work.join(&format!("{name}.log")))
    };
    // The port a running agent bound (it logs "agent ready api=0.0.0.0:PORT").
    let port_of = |agent: &mut Proc| -> u16 {
        let addr = agent.wait_for_log(" api=", Duration::from_secs(30));
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port")
    };
    let mut open = serve("open", &[]);
    let status = eventually("serve refuses", Duration::from_secs(20), || {
        open.exited().ok_or("still running".to_string())
    });
    assert!(!status.success());
    let log = open.log_text();
    assert!(
        log.contains("is not loopback: give --api-auth FILE")
            && log.contains("--api-auth-disabled"),
        "{log}"
    );
    let readyz = |port: u16| {
        let out = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/v20190125/meshes"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut disabled = serve("disabled", &["--api-auth-disabled".into()]);
    let port = port_of(&mut disabled);
    eventually("opted out: open to all", Duration::from_secs(30), || {
        assert!(disabled.is_running(), "{}", disabled.log_text());
        (readyz(port) == "200").then_some(()).ok_or(readyz(port))
    });
    let auth_file = work.join("auth.json");
    AuthFile::default()
        .key(&Key::new("admin"), admin_policy())
        .write(&auth_file);
    let mut locked = serve(
        "locked",
        &["--api-auth".into(), auth_file.display().to_string()],
    );
    let port = port_of(&mut locked);
    eventually(
        "locked: signatures required",
        Duration::from_secs(30),
        || {
            assert!(locked.is_running(), "{}", locked.log_text());
            (readyz(port) == "403").then_some(()).ok_or(readyz(port))
        },
    );
    // Both at once is a contradiction.
    let both = run(Command::new(bin("trellis-agent")).args([
        "serve",
        "--api-auth",
        "x.json",
        "--api-auth-disabled",
    ]));
    assert!(!both.status.success());
}

/// The deploy kit's authenticated path, as an operator and a CI pipeline walk it: the auth file
/// and the API's certificate go into SSM Parameter Store; `trellis-config-sync.sh` (embedded in
/// the user data) puts them where the daemon task mounts them; the agent runs with the task
/// definition's environment (API on 0.0.0.0 with TLS, auth, audit log) and its own health check;
/// the CI role of `api-auth.example.json` gets credentials through `credential_process` and may
/// change its mesh only.
#[test]
fn the_deploy_kit_serves_the_api_beyond_loopback_over_https_with_a_ci_role() {
    if !trellis_tests::can_run_privileged("the deploy kit's config sync (chown root:1338)") {
        return;
    }
    let work = Workdir::new("auth-kit");
    let kit = trellis_tests::workspace_root().join("deploy/ecs");
    let read = |name: &str| std::fs::read_to_string(kit.join(name)).unwrap();
    let sync = read("trellis-config-sync.sh");
    assert!(
        read("user-data.sh").contains(&format!("<<'SYNC'\n{sync}SYNC\n")),
        "user-data.sh must carry trellis-config-sync.sh verbatim"
    );
    // The instance role's extra policy fits IAM's request shape.
    let put = work.join("put-role-policy.json");
    std::fs::write(
        &put,
        json!({"RoleName": "ecsInstanceRole", "PolicyName": "trellis-config",
            "PolicyDocument": read("instance-role-trellis-config-policy.json")})
        .to_string(),
    )
    .unwrap();
    trellis_tests::check(
        Command::new(trellis_tests::venv().join("bin/python"))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/check_request.py"))
            .args(["iam", "PutRolePolicy"])
            .arg(&put),
    );
    // moto as SSM, IAM and STS, in the kit's account.
    let (_moto, moto_url) =
        trellis_tests::auth::moto_with(&work, "moto", &[("MOTO_ACCOUNT_ID", "111122223333")]);
    let moto_cli = |args: &[&str]| -> Value {
        let mut c = Command::new(trellis_tests::aws());
        c.args(args)
            .args(["--endpoint-url", &moto_url, "--output", "json"])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-west-2")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        let out = trellis_tests::check(&mut c);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    };

    // The operator: the auth file and the certificate into Parameter Store.
    let pki = Pki::new(&work, "api");
    let (cert, key) = pki.issue("api");
    let file_arg = |p: &std::path::Path| format!("file://{}", p.display());
    for (name, kind, path) in [
        (
            "/trellis/api-auth",
            "SecureString",
            kit.join("api-auth.example.json"),
        ),
        ("/trellis/api-tls-cert", "String", cert.clone()),
        ("/trellis/api-tls-key", "SecureString", key.clone()),
    ] {
        moto_cli(&[
            "ssm",
            "put-parameter",
            "--name",
            name,
            "--type",
            kind,
            "--value",
            &file_arg(&path),
        ]);
    }
    // The instance: the config sync of its user data.
    let etc = work.join("etc-trellis");
    trellis_tests::check(
        Command::new("bash")
            .arg(kit.join("trellis-config-sync.sh"))
            .env("TRELLIS_CONFIG_DIR", &etc)
            .env("AWS_ENDPOINT_URL", &moto_url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-west-2")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    trellis_tests::venv().join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
    );
    let pem = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(pem(&etc.join("tls/api.pem")), pem(&cert));

    // The daemon task: its environment, host paths mapped into the work directory.
    let td: Value = serde_json::from_str(&read("agent-task-definition.json")).unwrap();
    let c = &td["containerDefinitions"][0];
    let env: Vec<(String, String)> = c["environment"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let (k, v) = (e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
            let v = match k {
                "TRELLIS_API_ADDR" => {
                    assert!(v.starts_with("0.0.0.0:"), "the kit serves the VPC: {v}");
                    // Port 0: the agent says which port it bound.
                    "0.0.0.0:0".to_string()
                }
                _ => v
                    .replace("/etc/trellis", &etc.display().to_string())
                    .replace("/var/log/trellis", &work.join("log").display().to_string())
                    .replace("/var/lib/trellis", &work.join("data").display().to_string())
                    .replace("/var/run/trellis", &work.join("run").display().to_string()),
            };
            (k.to_string(), v)
        })
        .collect();
    for needed in [
        "TRELLIS_API_AUTH",
        "TRELLIS_API_TLS_CERT",
        "TRELLIS_API_TLS_KEY",
        "TRELLIS_AUDIT_LOG",
        "TRELLIS_API_SERVER_ID",
    ] {
        assert!(
            env.iter().any(|(k, _)| k == needed),
            "the task definition sets {needed}"
        );
    }
    std::fs::create_dir_all(work.join("log")).unwrap();
    let mut serve = Command::new(bin("trellis-agent"));
    serve
        .args(
            c["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap()),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("TRELLIS_STS_ENDPOINT", &moto_url)
        // Clients here reach it as localhost, not as the kit's DNS name.
        .env("TRELLIS_API_SERVER_ID", "trellis.mesh.internal,localhost")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let mut agent = Proc::spawn("agent", &mut serve, work.join("agent.log"));
    // JSON logs (the kit's TRELLIS_LOG_FORMAT): `"api":"0.0.0.0:PORT"` on the ready line.
    let bound = agent.wait_for_log("\"api\":\"", Duration::from_secs(60));
    let api_port = bound
        .split('"')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("the API's port");
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "TRELLIS_API_ADDR" => (k, format!("0.0.0.0:{api_port}")),
            _ => (k, v),
        })
        .collect();
    // Its container health check, with the container's environment.
    let health = c["healthCheck"]["command"].as_array().unwrap()[2]
        .as_str()
        .unwrap()
        .to_string();
    eventually(
        "the health check passes over TLS",
        Duration::from_secs(60),
        || {
            assert!(agent.is_running(), "{}", agent.log_text());
            let out = run(Command::new(bin("trellis-agent"))
                .arg(&health)
                .envs(env.iter().map(|(k, v)| (k, v))));
            out.status
                .success()
                .then_some(())
                .ok_or(String::from_utf8_lossy(&out.stderr).into_owned())
        },
    );
    let api = format!("https://localhost:{api_port}");
    let unsigned = run(Command::new("curl").arg("--cacert").arg(&pki.ca).args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{api}/v20190125/meshes"),
    ]));
    assert_eq!(String::from_utf8_lossy(&unsigned.stdout), "403");

    // The CI pipeline: its role, a profile with credential_process, the AWS CLI.
    moto_cli(&[
        "iam",
        "create-role",
        "--role-name",
        "trellis-ci",
        "--assume-role-policy-document",
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#,
    ]);
    let assumed = moto_cli(&[
        "sts",
        "assume-role",
        "--role-arn",
        "arn:aws:iam::111122223333:role/trellis-ci",
        "--role-session-name",
        "pipeline-1",
    ]);
    let creds = &assumed["Credentials"];
    let config = work.join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile trellis]\nregion = us-west-2\ncredential_process = {} credentials --endpoint {api} --server-id trellis.mesh.internal --ca-bundle {}\n",
            bin("trellis-agent").display(),
            pki.ca.display()
        ),
    )
    .unwrap();
    let ci = |args: &[&str]| {
        let mut c = Command::new(trellis_tests::aws());
        c.args([
            "--profile",
            "trellis",
            "--endpoint-url",
            &api,
            "--output",
            "json",
        ])
        .arg("--ca-bundle")
        .arg(&pki.ca)
        .args(args)
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_ACCESS_KEY_ID", creds["AccessKeyId"].as_str().unwrap())
        .env(
            "AWS_SECRET_ACCESS_KEY",
            creds["SecretAccessKey"].as_str().unwrap(),
        )
        .env("AWS_SESSION_TOKEN", creds["SessionToken"].as_str().unwrap())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_MAX_ATTEMPTS", "1");
        run(&mut c)
    };
    let out = ci(&["appmesh", "create-mesh", "--mesh-name", "shop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mesh: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        mesh["mesh"]["metadata"]["arn"],
        "arn:aws:appmesh:us-west-2:111122223333:mesh/shop"
    );
    let out = ci(&["appmesh", "create-mesh", "--mesh-name", "lab"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(AccessDeniedException)"));
    let out = ci(&["appmesh", "delete-mesh", "--mesh-name", "shop"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("with an explicit deny"));

    // The README's first hour, as written: an operator's profile (credentials from their SSO
    // role through `trellis-agent credentials --aws-profile`), then the colorapp walkthrough.
    moto_cli(&[
        "iam",
        "create-role",
        "--path",
        "/aws-reserved/sso.amazonaws.com/",
        "--role-name",
        "AWSReservedSSO_MeshAdmin_0123456789abcdef",
        "--assume-role-policy-document",
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#,
    ]);
    let sso = moto_cli(&[
        "sts",
        "assume-role",
        "--role-arn",
        "arn:aws:iam::111122223333:role/aws-reserved/sso.amazonaws.com/AWSReservedSSO_MeshAdmin_0123456789abcdef",
        "--role-session-name",
        "alice@example.com",
    ]);
    let sso = &sso["Credentials"];
    let readme =
        std::fs::read_to_string(trellis_tests::workspace_root().join("README.md")).unwrap();
    let profile = readme_block(&readme, "first-hour: profile")
        .replace("https://trellis.mesh.internal:9443", &api)
        .replace("/etc/trellis/ca.pem", &pki.ca.display().to_string())
        .replace(
            "trellis-agent credentials",
            &format!("{} credentials", bin("trellis-agent").display()),
        );
    let operator_config = work.join("operator-config");
    std::fs::write(
        &operator_config,
        format!(
            "{profile}\n[profile sso-admin]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
            sso["AccessKeyId"].as_str().unwrap(),
            sso["SecretAccessKey"].as_str().unwrap(),
            sso["SessionToken"].as_str().unwrap()
        ),
    )
    .unwrap();
    let walkthrough = readme_block(&readme, "first-hour: colorapp");
    let out = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &walkthrough])
        .current_dir(trellis_tests::workspace_root())
        .env(
            "PATH",
            format!(
                "{}:{}",
                trellis_tests::venv().join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("AWS_CONFIG_FILE", &operator_config)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // An operator's shell: the profile's ca_bundle, not a machine-wide one.
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README's walkthrough failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let targets: Value = serde_json::from_str(&stdout).expect("weighted targets");
    assert_eq!(targets.as_array().map(Vec::len), Some(3), "{targets}");
    let audit = std::fs::read_to_string(work.join("log/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"operation\":\"CreateMesh\"")
                && l.contains("\"principal\":\"arn:aws:iam::111122223333:role/trellis-ci\"")
                && l.contains("\"outcome\":\"allowed\"")),
        "{audit}"
    );
}

/// The fenced block after `<!-- MARKER -->` in the README, unindented.
fn readme_block(readme: &str, marker: &str) -> String {
    let start = readme
        .find(&format!("<!-- {marker} -->"))
        .unwrap_or_else(|| panic!("README has no {marker} block"));
    let block = &readme[start..];
    let mut lines = block.lines().skip(1);
    let fence = lines.next().expect("a fence");
    assert!(fence.trim_start().starts_with("```"), "{marker}: {fence}");
    let indent = fence.len() - fence.trim_start().len();
    lines
        .take_while(|l| !l.trim_start().starts_with("```"))
        .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n")
}
