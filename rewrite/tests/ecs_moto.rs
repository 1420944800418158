//! `--from-ecs`, `--register` and `--diff` against a real ECS API (moto server), with the AWS CLI as the
//! independent writer and reader: a definition registered plainly, meshed from ECS, registered as a new
//! revision, and read back unchanged.

mod support;

use serde_json::{Value, json};
use support::{Moto, assert_read_back_unchanged, fails, ok};

fn plain() -> Value {
    json!({
        "family": "web",
        "networkMode": "awsvpc",
        "memory": "1024",
        "containerDefinitions": [{
            "name": "app",
            "image": "public.ecr.aws/nginx/nginx:1.27",
            "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
            "secrets": [{"name": "DB_PASSWORD", "valueFrom": "arn:aws:ssm:us-west-2:123456789012:parameter/db"}],
            "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "/ecs/web", "awslogs-region": "us-west-2", "awslogs-stream-prefix": "web"}}
        }],
        "requiresCompatibilities": ["EC2"],
        "tags": [{"key": "team", "value": "shop"}]
    })
}

/// Registers `td` with the AWS CLI; returns the new ARN.
fn register_plain(moto: &Moto, td: &Value) -> String {
    let out = moto.aws_ecs(&[
        "register-task-definition",
        "--cli-input-json",
        &td.to_string(),
    ]);
    out["taskDefinition"]["taskDefinitionArn"]
        .as_str()
        .expect("an ARN")
        .to_string()
}

/// `DescribeTaskDefinition` (with tags) through the AWS CLI, as a `RegisterTaskDefinition` request.
fn read_back(moto: &Moto, id: &str) -> Value {
    let described = moto.aws_ecs(&[
        "describe-task-definition",
        "--task-definition",
        id,
        "--include",
        "TAGS",
    ]);
    trellis_rewrite::normalize(described).expect("a task definition")
}

const MESH: [&str; 4] = ["--mesh", "shop", "--virtual-node", "web"];

#[test]
fn from_ecs_register_is_read_back_unchanged() {
    let Some(moto) = Moto::start() else { return };
    let first = register_plain(&moto, &plain());
    assert!(first.ends_with(":task-definition/web:1"), "{first}");

    // What the tool makes of revision 1, printed rather than registered.
    let printed = ok(moto.rewrite(&MESH).args(["--from-ecs", "web:1"]));
    let expected: Value = serde_json::from_str(&printed).expect("JSON output");
    assert_eq!(expected["tags"], json!([{"key": "team", "value": "shop"}]));

    let arn = ok(moto
        .rewrite(&MESH)
        .args(["--from-ecs", "web", "--register"]));
    assert_eq!(arn.trim(), first.replace("web:1", "web:2"));
    assert_read_back_unchanged(&expected, &read_back(&moto, "web:2"));

    // Already meshed: no third revision, and the existing ARN is printed.
    let out = moto
        .rewrite(&MESH)
        .args(["--from-ecs", "web", "--register"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), arn.trim());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already meshed this way"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = moto.aws_ecs(&["list-task-definitions", "--family-prefix", "web"]);
    assert_eq!(
        listed["taskDefinitionArns"].as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn diff_shows_the_changes_and_registers_nothing() {
    let Some(moto) = Moto::start() else { return };
    register_plain(&moto, &plain());
    // The endpoint from AWS_ENDPOINT_URL this time, as aws-config reads it.
    let mut cmd = support::rewrite_cmd();
    moto.env(&mut cmd);
    cmd.env("AWS_ENDPOINT_URL", &moto.url)
        .args(MESH)
        .args(["--from-ecs", "web", "--diff"]);
    let diff = ok(&mut cmd);
    assert!(
        diff.starts_with("--- web (ECS)\n+++ meshed\n@@ "),
        "unexpected diff header:\n{diff}"
    );
    for added in [
        "+      \"dependsOn\": [",
        "+          \"containerName\": \"envoy\",",
        "+      \"name\": \"envoy\",",
        "+      \"name\": \"proxy-route-manager\",",
        "+      \"name\": \"trellis-agent-socket\",",
    ] {
        assert!(
            diff.lines().any(|l| l == added),
            "diff lacks {added:?}:\n{diff}"
        );
    }
    // Nothing of the user's is removed: the only `-` lines are closing brackets that gain a comma or
    // move below new entries, and empty lists that gain entries.
    for line in diff
        .lines()
        .filter(|l| l.starts_with('-') && !l.starts_with("---"))
    {
        let rest = line[1..].trim().trim_end_matches(',');
        assert!(
            ["]", "}"].contains(&rest) || rest.ends_with(": []"),
            "diff removes {line:?}:\n{diff}"
        );
    }
    let listed = moto.aws_ecs(&["list-task-definitions", "--family-prefix", "web"]);
    assert_eq!(
        listed["taskDefinitionArns"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn register_from_a_file_keeps_tags_and_every_field() {
    let Some(moto) = Moto::start() else { return };
    let dir = std::env::temp_dir().join(format!("trellis-rewrite-moto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("web.json");
    std::fs::write(&file, plain().to_string()).expect("write input");
    let path = file.to_str().expect("UTF-8 path");

    let expected: Value =
        serde_json::from_str(&ok(support::rewrite_cmd().args(MESH).arg(path))).expect("JSON");
    let arn = ok(moto.rewrite(&MESH).args(["--register", path]));
    assert!(arn.trim().ends_with(":task-definition/web:1"), "{arn}");
    assert_read_back_unchanged(&expected, &read_back(&moto, "web:1"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn https_endpoints_work() {
    // The SDK gets our rustls + ring client; a certificate trusted through SSL_CERT_FILE (read by
    // rustls-native-certs) proves the whole TLS path, a self-signed one unknown to it is refused.
    let dir = std::env::temp_dir().join(format!("trellis-rewrite-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let Some((moto, cert)) = Moto::start_tls(&dir) else {
        return;
    };
    let file = dir.join("web.json");
    std::fs::write(&file, plain().to_string()).expect("write input");
    let path = file.to_str().expect("UTF-8 path");

    let arn = ok(moto
        .rewrite(&MESH)
        .env("SSL_CERT_FILE", &cert)
        .args(["--register", path]));
    assert!(arn.trim().ends_with(":task-definition/web:1"), "{arn}");

    let out = fails(moto.rewrite(&MESH).args(["--from-ecs", "web"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn from_ecs_of_a_missing_family_is_a_clear_error() {
    let Some(moto) = Moto::start() else { return };
    let out = fails(
        moto.rewrite(&MESH)
            .args(["--from-ecs", "nope:3", "--register"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "trellis-rewrite: --from-ecs nope:3: ECS answered ClientException: Unable to describe task \
         definition. (check the family, the revision and the region)\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn unreachable_endpoint_is_a_clear_error() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cmd = support::rewrite_cmd();
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_MAX_ATTEMPTS", "1")
        .args(MESH)
        .args(["--region", "us-west-2", "--from-ecs", "web"])
        .args(["--endpoint-url", &format!("http://127.0.0.1:{port}")]);
    let stderr = String::from_utf8_lossy(&fails(&mut cmd).stderr).into_owned();
    assert!(
        stderr.starts_with("trellis-rewrite: --from-ecs web: calling ECS failed: dispatch failure"),
        "{stderr}"
    );
}

#[test]
fn no_region_is_a_clear_error() {
    let mut cmd = support::rewrite_cmd();
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .args(MESH)
        .args(["--from-ecs", "web"]);
    assert_eq!(
        String::from_utf8_lossy(&fails(&mut cmd).stderr),
        "trellis-rewrite: no AWS region: pass --region or set AWS_REGION\n"
    );
}

/// Fixtures moto refuses though real ECS accepts them: moto wants a hard `memory` on every EC2 container
/// when the task has none, where ECS (botocore's model: `memoryReservation` docs) takes `memory` or
/// `memoryReservation`. Asserted to be refused for exactly that, so a fixed moto shows up here.
const MOTO_WANTS_HARD_MEMORY: [&str; 2] = ["describe-output", "gateway-bridge"];

#[test]
fn golden_outputs_are_registered_and_read_back_unchanged() {
    let Some(moto) = Moto::start() else { return };
    let fixtures = support::fixtures();
    assert!(fixtures.len() > MOTO_WANTS_HARD_MEMORY.len());
    for dir in fixtures {
        let name = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let expected_path = dir.join("expected.json");
        let text = std::fs::read_to_string(&expected_path).expect("expected.json");
        let expected: Value = serde_json::from_str(&text).expect("JSON");
        let args = support::fixture_args(&dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let path = expected_path.to_str().expect("UTF-8 path");
        if MOTO_WANTS_HARD_MEMORY.contains(&name.as_str()) {
            assert!(expected.get("memory").is_none(), "{name}: has task memory");
            let out = fails(moto.rewrite(&args).args(["--register", path]));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr
                    .contains("At least one of 'memory' or 'memoryReservation' must be specified"),
                "{name}: {stderr}"
            );
            continue;
        }
        let arn = ok(moto.rewrite(&args).args(["--register", path]));
        assert_read_back_unchanged(&expected, &read_back(&moto, arn.trim()));
    }
}
