//! What the CLI does with a definition it refuses: the rule on stderr (naming the field and the
//! flag), a failure exit, and nothing written: no output, no diff, and with `--register` no new
//! revision in ECS (a moto server, read back with the AWS CLI). The case is the Fargate fixture
//! with `--sds-socket-path`: Fargate has no host volume to carry the SPIRE agent's socket.

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
