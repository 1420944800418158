//! The ECS deployment kit in `deploy/ecs/`: every request file fits botocore's ECS/IAM input shapes,
//! the meshed examples are exactly what `trellis-rewrite` makes of their inputs today, the agent's
//! daemon task agrees with what the rewriter mounts into tasks, and the README's deploy commands
//! (`aws iam create-role`/`put-role-policy`, `aws ecs register-task-definition`/`create-service`)
//! run through the real AWS CLI against moto.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Proc, Workdir, aws, bin, check, run, venv, workspace_root};

fn kit(rel: &str) -> PathBuf {
    workspace_root().join("deploy/ecs").join(rel)
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `check_request.py SERVICE OPERATION FILES...`: botocore's validation plus unknown members.
fn check_request(service: &str, op: &str, files: &[PathBuf]) -> Result<(), String> {
    let out = run(Command::new(venv().join("bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/check_request.py"))
        .args([service, op])
        .args(files));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn every_kit_file_fits_botocores_request_shapes() {
    let task_defs = vec![
        kit("agent-task-definition.json"),
        kit("examples/web.json"),
        kit("examples/web-meshed.json"),
        kit("examples/appmesh-colorteller.json"),
        kit("examples/appmesh-colorteller-meshed.json"),
        kit("examples/appmesh-colorteller-stock-envoy.json"),
    ];
    check_request("ecs", "RegisterTaskDefinition", &task_defs).unwrap_or_else(|e| panic!("{e}"));
    check_request("ecs", "CreateService", &[kit("agent-service.json")])
        .unwrap_or_else(|e| panic!("{e}"));

    // IAM takes policy documents as strings: wrap them as the PutRolePolicy / CreateRole requests
    // the README's commands send.
    let work = Workdir::new("kit-iam");
    let doc = |name: &str| std::fs::read_to_string(kit(name)).expect("read policy");
    let policy = work.join("put-role-policy.json");
    std::fs::write(
        &policy,
        serde_json::json!({"RoleName": "trellis-agent-task", "PolicyName": "trellis-agent", "PolicyDocument": doc("agent-task-role-policy.json")})
            .to_string(),
    )
    .expect("write");
    check_request("iam", "PutRolePolicy", std::slice::from_ref(&policy))
        .unwrap_or_else(|e| panic!("{e}"));
    let role = work.join("create-role.json");
    std::fs::write(
        &role,
        serde_json::json!({"RoleName": "trellis-agent-task", "AssumeRolePolicyDocument": doc("agent-task-role-trust.json")})
            .to_string(),
    )
    .expect("write");
    check_request("iam", "CreateRole", std::slice::from_ref(&role))
        .unwrap_or_else(|e| panic!("{e}"));

    // The oracle bites: a misspelt enum and an unknown member are both reported.
    let mut bad = read_json(&kit("agent-service.json"));
    bad["schedulingStrategy"] = "DAEMONS".into();
    bad["placementStrategy "] = serde_json::json!([]);
    let bad_file = work.join("bad-service.json");
    std::fs::write(&bad_file, bad.to_string()).expect("write");
    let err = check_request("ecs", "CreateService", &[bad_file]).expect_err("bad file passed");
    assert!(
        err.contains("DAEMONS") && err.contains("placementStrategy "),
        "{err}"
    );
}

#[test]
fn the_iam_policy_grants_cloud_map_discovery_the_shared_store_and_attestation() {
    let policy = read_json(&kit("agent-task-role-policy.json"));
    let actions: Vec<String> = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| s["Action"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    for needed in [
        "servicediscovery:DiscoverInstances",
        "servicediscovery:DiscoverInstancesRevision",
        "dynamodb:GetItem",
        // The shared Cloud Map pollers read leases and answers in batches.
        "dynamodb:BatchGetItem",
        "dynamodb:PutItem",
        "dynamodb:Query",
        "dynamodb:TransactWriteItems",
        // Envoy attestation reads the task definition of the container that connects.
        "ecs:DescribeTaskDefinition",
        // ACM certificates and ACM PCA trust for attested Envoys.
        "acm:ExportCertificate",
        "acm-pca:GetCertificateAuthorityCertificate",
    ] {
        assert!(actions.iter().any(|a| a == needed), "policy lacks {needed}");
    }
    assert!(
        !actions.iter().any(|a| a.ends_with(":*") || a == "*"),
        "wildcard actions: {actions:?}"
    );
}

#[test]
fn the_daemon_task_runs_unprivileged_on_host_networking_with_the_socket_dir_tasks_mount() {
    let td = read_json(&kit("agent-task-definition.json"));
    assert_eq!(td["networkMode"], "host");
    // Attestation: the pids of other tasks' Envoys (SO_PEERCRED) are the host's.
    assert_eq!(td["pidMode"], "host");
    let c = &td["containerDefinitions"][0];
    let user = c["user"].as_str().expect("user");
    assert!(
        !user.starts_with("0") && user != "root",
        "agent runs as {user}"
    );
    // The host directory the agent's socket lives in is the one trellis-rewrite mounts into Envoy.
    let meshed = read_json(&kit("examples/web-meshed.json"));
    let host_path = |def: &Value, volume: &str| {
        def["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
            .map(|v| v["host"]["sourcePath"].clone())
            .unwrap_or(Value::Null)
    };
    let envoy = meshed["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "envoy")
        .expect("envoy container");
    let envoy_volume = envoy["mountPoints"][0]["sourceVolume"]
        .as_str()
        .expect("mount");
    assert_eq!(
        host_path(&td, "trellis-socket"),
        host_path(&meshed, envoy_volume),
        "the agent's socket directory and the tasks' mount differ"
    );
    let env: Vec<(String, String)> = c["environment"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").into(),
                e["value"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let socket = env
        .iter()
        .find(|(k, _)| k == "TRELLIS_XDS_SOCKET")
        .map(|(_, v)| v.clone())
        .expect("TRELLIS_XDS_SOCKET");
    let mount = c["mountPoints"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["sourceVolume"] == "trellis-socket")
        .expect("socket mount");
    assert!(
        socket.starts_with(mount["containerPath"].as_str().expect("path")),
        "the socket {socket} is not in the mounted directory"
    );
    // The health check is the agent's own probe (the image has no curl), and it passes against a
    // live agent while it fails against a dead one.
    assert_eq!(
        c["healthCheck"]["command"],
        serde_json::json!(["CMD", "/usr/local/bin/trellis-agent", "health"])
    );
    let work = Workdir::new("kit-health");
    let agent = trellis_tests::mesh::Agent::start(&work, None);
    let addr = agent.api.trim_start_matches("http://").to_string();
    let addr = addr.as_str();
    check(Command::new(bin("trellis-agent")).args(["health", "--api-addr", addr]));
    drop(agent);
    let dead = run(Command::new(bin("trellis-agent")).args(["health", "--api-addr", addr]));
    assert!(
        !dead.status.success(),
        "health passed with the agent stopped"
    );
}

#[test]
fn the_meshed_examples_are_what_trellis_rewrite_makes_of_their_inputs() {
    let work = Workdir::new("kit-regenerate");
    check(
        Command::new("bash")
            .arg(kit("examples/regenerate.sh"))
            .arg(work.path())
            .env("TRELLIS_REWRITE", bin("trellis-rewrite")),
    );
    for name in [
        "web-meshed.json",
        "appmesh-colorteller-meshed.json",
        "appmesh-colorteller-stock-envoy.json",
    ] {
        let fresh = std::fs::read_to_string(work.join(name)).expect("regenerated");
        let committed =
            std::fs::read_to_string(kit(&format!("examples/{name}"))).expect("committed");
        assert!(
            fresh == committed,
            "deploy/ecs/examples/{name} is stale: run deploy/ecs/examples/regenerate.sh\n--- committed\n{committed}\n--- fresh\n{fresh}"
        );
    }
    // The migrated App Mesh definition runs Trellis's Envoy and no longer uses proxyConfiguration.
    let migrated = read_json(&kit("examples/appmesh-colorteller-meshed.json"));
    assert!(migrated.get("proxyConfiguration").is_none());
    let images: Vec<&str> = migrated["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["image"].as_str())
        .collect();
    assert!(
        !images.iter().any(|i| i.contains("aws-appmesh-envoy")),
        "{images:?}"
    );
}

/// moto's ECS on a port it binds and names, stopped on drop.
fn moto(work: &Workdir) -> (Proc, String) {
    let server = venv().join("bin/moto_server");
    assert!(
        server.exists(),
        "moto_server not in the venv: run scripts/setup.sh"
    );
    let mut proc = Proc::spawn(
        "moto",
        Command::new(server).args(["-H", "127.0.0.1", "-p", "0"]),
        work.join("moto.log"),
    );
    let url = proc.wait_for_log(" * Running on ", Duration::from_secs(30));
    (proc, url)
}

fn aws_ecs(endpoint: &str, args: &[&str]) -> Value {
    aws_json(endpoint, "ecs", args)
}

fn aws_json(endpoint: &str, service: &str, args: &[&str]) -> Value {
    let out = check(
        Command::new(aws())
            .arg(service)
            .args(args)
            .args(["--endpoint-url", endpoint, "--output", "json"])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-west-2")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .current_dir(workspace_root()),
    );
    if out.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("aws output is not JSON ({e}): {out}"))
}

#[test]
fn the_readme_deploy_commands_register_the_daemon_and_the_meshed_task_through_the_aws_cli() {
    let work = Workdir::new("kit-moto");
    let (_moto, url) = moto(&work);
    // The task role, as the README creates it.
    let role = aws_json(
        &url,
        "iam",
        &[
            "create-role",
            "--role-name",
            "trellis-agent-task",
            "--assume-role-policy-document",
            "file://deploy/ecs/agent-task-role-trust.json",
        ],
    );
    assert_eq!(role["Role"]["RoleName"], "trellis-agent-task");
    aws_json(
        &url,
        "iam",
        &[
            "put-role-policy",
            "--role-name",
            "trellis-agent-task",
            "--policy-name",
            "trellis-agent",
            "--policy-document",
            "file://deploy/ecs/agent-task-role-policy.json",
        ],
    );
    let policy = aws_json(
        &url,
        "iam",
        &[
            "get-role-policy",
            "--role-name",
            "trellis-agent-task",
            "--policy-name",
            "trellis-agent",
        ],
    );
    assert_eq!(
        policy["PolicyDocument"],
        read_json(&kit("agent-task-role-policy.json")),
        "the stored policy differs from the file"
    );
    aws_ecs(&url, &["create-cluster", "--cluster-name", "default"]);
    let td = aws_ecs(
        &url,
        &[
            "register-task-definition",
            "--cli-input-json",
            "file://deploy/ecs/agent-task-definition.json",
        ],
    );
    assert_eq!(td["taskDefinition"]["networkMode"], "host");
    let svc = aws_ecs(
        &url,
        &[
            "create-service",
            "--cli-input-json",
            "file://deploy/ecs/agent-service.json",
        ],
    );
    assert_eq!(svc["service"]["schedulingStrategy"], "DAEMON");
    assert_eq!(svc["service"]["serviceName"], "trellis-agent");
    let meshed = aws_ecs(
        &url,
        &[
            "register-task-definition",
            "--cli-input-json",
            "file://deploy/ecs/examples/web-meshed.json",
        ],
    );
    let names: Vec<&str> = meshed["taskDefinition"]["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"envoy") && names.contains(&"proxy-route-manager"),
        "{names:?}"
    );
    // The guide's last step: a service moves onto the meshed revision.
    aws_ecs(
        &url,
        &[
            "register-task-definition",
            "--cli-input-json",
            "file://deploy/ecs/examples/web.json",
        ],
    );
    aws_ecs(
        &url,
        &[
            "create-service",
            "--cluster",
            "default",
            "--service-name",
            "web",
            "--task-definition",
            "web:2",
            "--desired-count",
            "0",
        ],
    );
    let updated = aws_ecs(
        &url,
        &[
            "update-service",
            "--cluster",
            "default",
            "--service",
            "web",
            "--task-definition",
            "web:1",
        ],
    );
    assert!(
        updated["service"]["taskDefinition"]
            .as_str()
            .is_some_and(|t| t == "web:1" || t.ends_with("task-definition/web:1")),
        "the service is not on the meshed revision: {updated}"
    );
}
