//! What the CLI does with a definition it refuses: the rule on stderr (naming the field and the
//! flag), a failure exit, and nothing written: no output, no diff, and with `--register` no new
//! revision in ECS (a moto server, read back with the AWS CLI). The case is the Fargate fixture
//! with `--sds-socket-path`: Fargate has no host volume to carry the SPIRE agent's socket. Also: a
//! Windows definition is refused the same way, and what the output does differently from ECS is a
//! warning on stderr beside the JSON.

mod support;

use std::path::PathBuf;

use support::{Moto, fails, fixture_args, rewrite_cmd};

const SDS_FLAGS: [&str; 2] = ["--sds-socket-path", "/run/spire/sockets/agent.sock"];
const REFUSED: &str = "trellis-rewrite: requiresCompatibilities[0]: \"FARGATE\" is not valid: \
     Fargate has no host volumes for the SDS socket; drop --sds-socket-path\n";

/// The `fargate-web` fixture (meshable on Fargate: TCP endpoint, proxyConfiguration) and its flags.
fn fargate_fixture() -> (PathBuf, Vec<String>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fargate-web");
    (dir.join("input.json"), fixture_args(&dir))
}

/// Asserts `out` is the refusal: failure exit (from `fails`), the rule on stderr, empty stdout.
#[track_caller]
fn assert_refused(out: &std::process::Output) {
    assert_eq!(String::from_utf8_lossy(&out.stderr), REFUSED);
    assert!(
        out.stdout.is_empty(),
        "nothing is printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_fargate_definition_with_an_sds_socket_is_refused_and_nothing_is_printed() {
    let (input, args) = fargate_fixture();
    for mode in [&[][..], &["--diff"]] {
        let out = fails(
            rewrite_cmd()
                .args(&args)
                .args(SDS_FLAGS)
                .args(mode)
                .arg(&input),
        );
        assert_refused(&out);
    }
}

#[test]
fn a_fargate_definition_with_an_sds_socket_is_not_registered() {
    let Some(moto) = Moto::start() else { return };
    let (input, args) = fargate_fixture();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let path = input.to_str().expect("UTF-8 path");
    let text = std::fs::read_to_string(&input).expect("fixture input");
    moto.aws_ecs(&["register-task-definition", "--cli-input-json", &text]);

    // From a file and from ECS itself: refused before anything reaches ECS.
    assert_refused(&fails(
        moto.rewrite(&args)
            .args(SDS_FLAGS)
            .args(["--register", path]),
    ));
    assert_refused(&fails(moto.rewrite(&args).args(SDS_FLAGS).args([
        "--from-ecs",
        "checkout",
        "--register",
    ])));
    let listed = moto.aws_ecs(&["list-task-definitions", "--family-prefix", "checkout"]);
    let arns = listed["taskDefinitionArns"].as_array().expect("a list");
    assert_eq!(arns.len(), 1, "only the plain revision: {listed}");
    assert!(
        arns[0]
            .as_str()
            .is_some_and(|a| a.ends_with(":task-definition/checkout:1")),
        "{listed}"
    );
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn a_windows_definition_is_refused_and_nothing_is_printed() {
    let dir = fixture("appmesh-ec2");
    let mut input: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input.json")).expect("input"))
            .expect("JSON");
    input["runtimePlatform"] =
        serde_json::json!({"operatingSystemFamily": "WINDOWS_SERVER_2022_CORE"});
    let work = std::env::temp_dir().join(format!("trellis-rewrite-windows-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("temp dir");
    let path = work.join("windows.json");
    std::fs::write(&path, input.to_string()).expect("write input");
    for (args_of, extra) in [
        ("appmesh-ec2", &[][..]),
        ("appmesh-stock-envoy", &[]),
        ("appmesh-ec2", &["--diff"]),
    ] {
        let out = fails(
            rewrite_cmd()
                .args(fixture_args(&fixture(args_of)))
                .args(extra)
                .arg(&path),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(
                "trellis-rewrite: runtimePlatform.operatingSystemFamily: \"WINDOWS_SERVER_2022_CORE\" is not valid: Windows tasks cannot be meshed"
            ),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&work).expect("remove temp dir");
}

#[test]
fn deliberate_differences_from_ecs_are_warned_about_on_stderr() {
    // The App Mesh definition's proxyConfiguration becomes the route manager, and AWS's colorapp runs
    // its X-Ray daemon as Envoy's UID, so its traffic bypasses Envoy.
    let dir = fixture("appmesh-ec2");
    let out = rewrite_cmd()
        .args(fixture_args(&dir))
        .arg(dir.join("input.json"))
        .output()
        .expect("run trellis-rewrite");
    assert!(out.status.success());
    let expected = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "trellis-rewrite: warning: proxyConfiguration: ECS's redirect is replaced by the proxy-route-manager init container (pass --proxy-configuration to keep it): ECS installed its rules before any container started, the route manager installs them when it runs, so containers that start before it (a FireLens log router, init containers Envoy waits for) connect directly until then\n\
         trellis-rewrite: warning: containerDefinitions[2].user: \"1337\" runs as UID 1337, the identity the redirect ignores (Envoy's own), so all of this container's outbound traffic bypasses Envoy: no mesh routing, TLS, policies or metrics. Right for an agent that must reach its endpoint directly (the X-Ray daemon); for an application, run it as another user\n"
    );
}

#[test]
fn keep_envoy_image_takes_no_flag_that_would_change_the_envoy_container() {
    let dir = fixture("appmesh-stock-envoy");
    for flag in [
        &["--envoy-image", "x"][..],
        &["--proxy-configuration"],
        &["--envoy-env", "A=1"],
        &["--egress-ignored-ports", "5432"],
    ] {
        let out = fails(
            rewrite_cmd()
                .args(fixture_args(&dir))
                .args(flag)
                .arg(dir.join("input.json")),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot be used with") && stderr.contains("--keep-envoy-image"),
            "{flag:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}
