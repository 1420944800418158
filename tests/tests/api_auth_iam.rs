//! IAM identities without long-lived Trellis keys: `trellis-agent credentials` as the AWS CLI's
//! `credential_process`, proving an assumed role with a signed `sts:GetCallerIdentity` that the
//! agent sends to STS (moto's, which verifies signatures as STS does), over HTTPS; and session
//! credentials issued by one agent verifying on another agent of the same DynamoDB store.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::auth::{
    ApiAuth, AuthFile, Key, Pki, Tls, admin_policy, boto, moto_with, policy, refused,
};
use trellis_tests::dynamo::{Moto, aws_env};
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::{Workdir, aws, bin, check, eventually, run};

const ACCOUNT: &str = "123456789012";
const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;

/// The AWS CLI against moto (IAM, STS) with moto's test credentials.
fn moto_cli(endpoint: &str, args: &[&str]) -> Value {
    let mut c = Command::new(aws());
    c.args(args)
        .args(["--endpoint-url", endpoint, "--output", "json"]);
    for (k, v) in aws_env() {
        c.env(k, v);
    }
    c.env("AWS_DEFAULT_REGION", "us-east-1");
    serde_json::from_str(&check(&mut c)).expect("moto answers JSON")
}

/// Credentials of `role` (created on the way), assumed as session `session`: what a CI job's
/// task role or an SSO login gives it.
fn assume(endpoint: &str, role: &str, session: &str) -> Key2 {
    moto_cli(
        endpoint,
        &[
            "iam",
            "create-role",
            "--role-name",
            role,
            "--assume-role-policy-document",
            TRUST,
        ],
    );
    let out = moto_cli(
        endpoint,
        &[
            "sts",
            "assume-role",
            "--role-arn",
            &format!("arn:aws:iam::{ACCOUNT}:role/{role}"),
            "--role-session-name",
            session,
        ],
    );
    let c = &out["Credentials"];
    Key2 {
        id: c["AccessKeyId"].as_str().expect("AccessKeyId").into(),
        secret: c["SecretAccessKey"]
            .as_str()
            .expect("SecretAccessKey")
            .into(),
        token: c["SessionToken"].as_str().expect("SessionToken").into(),
    }
}

/// Temporary AWS credentials.
#[derive(Debug, Clone)]
struct Key2 {
    id: String,
    secret: String,
    token: String,
}

impl Key2 {
    /// The environment of a process whose ambient credentials these are (and nothing else).
    fn env(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", &self.id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_SESSION_TOKEN", &self.token)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("RUST_BACKTRACE", "0");
    }
}

/// `trellis-agent credentials` with `who`'s ambient credentials: (success, stdout, stderr).
fn credentials(who: &Key2, endpoint: &str, extra: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(bin("trellis-agent"));
    c.args(["credentials", "--endpoint", endpoint]).args(extra);
    who.env(&mut c);
    c.env("AWS_CONFIG_FILE", "/dev/null");
    let out = run(&mut c);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn session_key(json_text: &str) -> (Key, String, Value) {
    let v: Value = serde_json::from_str(json_text.trim()).expect("credential_process JSON");
    let key = Key {
        id: v["AccessKeyId"].as_str().expect("AccessKeyId").into(),
        secret: v["SecretAccessKey"]
            .as_str()
            .expect("SecretAccessKey")
            .into(),
    };
    let token = v["SessionToken"].as_str().expect("SessionToken").into();
    (key, token, v)
}

fn audit_of(agent: &Agent) -> Vec<Value> {
    agent.auth.as_ref().expect("a secured agent").audit_lines()
}

#[test]
fn credential_process_turns_an_assumed_role_into_trellis_credentials_over_https() {
    let work = Workdir::new("iam-credentials");
    // moto as IAM and STS: the first four calls (two roles created and assumed) go unsigned; from
    // then on it verifies every signature, as STS does.
    let (_moto, sts) = moto_with(&work, "moto", &[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
    let ci = assume(&sts, "ci-deployer", "build-7");
    let intruder = assume(&sts, "intruder", "x1");

    let pki = Pki::new(&work, "api");
    let (cert, key) = pki.issue("api");
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/ci-deployer");
    let shop = "arn:aws:appmesh:us-east-1:000000000000:mesh/shop";
    let role_policy = policy("Allow", &["appmesh:*"], &[shop, &format!("{shop}/*")]);
    let mut api_auth = ApiAuth::admin(
        &work,
        "agent",
        AuthFile::default().role(&role_arn, role_policy.clone()),
    );
    api_auth.tls = Some(Tls {
        cert,
        key,
        ca: pki.ca.clone(),
    });
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            auth: Some(api_auth.clone()),
            args: vec![
                "--sts-endpoint".into(),
                sts.clone(),
                "--api-server-id".into(),
                "localhost".into(),
            ],
            ..AgentOpts::default()
        },
    );
    agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    agent.appmesh(&["create-mesh", "--mesh-name", "lab"]);

    // An AWS CLI profile whose credentials come from `trellis-agent credentials`.
    let config = work.join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile mesh]\nregion = us-east-1\ncredential_process = {} credentials --endpoint {} --ca-bundle {}\n",
            bin("trellis-agent").display(),
            agent.api,
            pki.ca.display()
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut c = Command::new(aws());
        c.args([
            "--profile",
            "mesh",
            "--endpoint-url",
            &agent.api,
            "--output",
            "json",
        ])
        .arg("--ca-bundle")
        .arg(&pki.ca)
        .args(args)
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_MAX_ATTEMPTS", "1");
        ci.env(&mut c);
        run(&mut c)
    };
    let out = cli(&["appmesh", "describe-mesh", "--mesh-name", "shop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "appmesh",
        "create-virtual-node",
        "--mesh-name",
        "shop",
        "--virtual-node-name",
        "web",
        "--spec",
        "{}",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["appmesh", "describe-mesh", "--mesh-name", "lab"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(AccessDeniedException)")
            && err.contains(&format!(
                "User: {role_arn} is not authorized to perform: appmesh:DescribeMesh"
            )),
        "{err}"
    );

    // What the exchange refuses: a role the auth file does not name, a forged proof (STS says
    // so), a proof for another Trellis deployment.
    let ca = pki.ca.display().to_string();
    let (ok, _, err) = credentials(&intruder, &agent.api, &["--ca-bundle", &ca]);
    assert!(!ok);
    assert!(
        err.contains("AccessDeniedException")
            && err.contains(&format!(
                "no role of the auth file matches arn:aws:sts::{ACCOUNT}:assumed-role/intruder/x1"
            )),
        "{err}"
    );
    let forged = Key2 {
        secret: format!("{}x", ci.secret),
        ..ci.clone()
    };
    let (ok, _, err) = credentials(&forged, &agent.api, &["--ca-bundle", &ca]);
    assert!(!ok);
    assert!(
        err.contains("STS did not accept the identity proof (SignatureDoesNotMatch)"),
        "{err}"
    );
    let (ok, _, err) = credentials(
        &ci,
        &agent.api,
        &["--ca-bundle", &ca, "--server-id", "staging"],
    );
    assert!(!ok);
    assert!(
        err.contains("names Trellis deployment \"staging\""),
        "{err}"
    );

    // The credentials themselves: short-lived, usable by any SDK, revoked with the role.
    let (ok, out, err) = credentials(&ci, &agent.api, &["--ca-bundle", &ca]);
    assert!(ok, "{err}");
    let (session, token, json) = session_key(&out);
    assert_eq!(json["Version"], 1);
    assert!(session.id.starts_with("ASIA"));
    assert!(json["Expiration"].as_str().unwrap().ends_with('Z'));
    let call = |extra: Value| {
        boto(
            &agent,
            &session,
            "describe_mesh",
            json!({"meshName": "shop"}),
            extra,
        )
    };
    assert!(call(json!({"token": token}))["result"].is_object());
    assert_eq!(
        refused(&call(json!({"token": format!("{token}x")}))),
        ("UnrecognizedClientException".into(), 403)
    );
    api_auth.file.exists().then_some(()).expect("auth file");
    AuthFile::default()
        .key(&api_auth.key, admin_policy())
        .write(&api_auth.file);
    eventually(
        "the removed role's session is refused",
        Duration::from_secs(15),
        || {
            let a = call(json!({"token": token}));
            match a["error"]["message"].as_str() {
                Some(m) if m.contains("no longer in the auth file") => Ok(()),
                _ => Err(a.to_string()),
            }
        },
    );

    // The audit log has who proved what, and what they did.
    let lines = audit_of(&agent);
    let issued: Vec<&Value> = lines
        .iter()
        .filter(|l| l["operation"] == "GetCredentials" && l["outcome"] == "allowed")
        .collect();
    assert!(!issued.is_empty(), "{lines:#?}");
    assert_eq!(issued[0]["principal"], role_arn.as_str());
    assert_eq!(
        issued[0]["caller"],
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/ci-deployer/build-7").as_str()
    );
    assert!(lines.iter().any(|l| l["operation"] == "CreateVirtualNode"
        && l["principal"] == role_arn.as_str()
        && l["outcome"] == "allowed"));
    assert!(lines.iter().any(|l| l["operation"] == "GetCredentials"
        && l["outcome"] == "denied"
        && l["caller"].as_str().is_some_and(|c| c.contains("intruder"))));
    let log = agent.proc.log_text()
        + &std::fs::read_to_string(api_auth.audit_log.as_ref().unwrap()).unwrap();
    for secret in [&ci.secret, &ci.token, &session.secret, &token] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret or token was logged"
        );
    }
}

#[test]
fn credentials_issued_by_one_agent_verify_on_every_agent_of_the_store() {
    let work = Workdir::new("iam-shared");
    // One moto: DynamoDB for the shared store, IAM and STS for the identity.
    let moto = Moto::start(&work, "moto");
    moto.create_table("trellis");
    let ci = assume(&moto.endpoint, "ci-deployer", "build-9");
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/ci-deployer");
    let file = AuthFile::default().role(&role_arn, policy("Allow", &["appmesh:*"], &["*"]));
    let base = ApiAuth::admin(&work, "a", file);
    let start = |name: &str, store: Vec<String>| {
        let mut auth = base.clone();
        auth.audit_log = Some(work.join(&format!("{name}-audit.log")));
        let mut args = store;
        args.extend([
            "--sts-endpoint".into(),
            moto.endpoint.clone(),
            "--api-server-id".into(),
            "127.0.0.1".into(),
        ]);
        Agent::start_with(
            &work,
            &AgentOpts {
                name,
                auth: Some(auth),
                args,
                env: aws_env(),
                ..AgentOpts::default()
            },
        )
    };
    let a = start("a", moto.store_args("trellis"));
    let b = start("b", moto.store_args("trellis"));
    // Another deployment: same auth file, its own store.
    let c = start("c", vec![]);
    a.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    c.appmesh(&["create-mesh", "--mesh-name", "shop"]);

    let describe = |agent: &Agent, key: &Key, token: &str| {
        boto(
            agent,
            key,
            "describe_mesh",
            json!({"meshName": "shop"}),
            json!({"token": token}),
        )
    };
    for (issuer, other) in [(&a, &b), (&b, &a)] {
        let (ok, out, err) = credentials(&ci, &issuer.api, &[]);
        assert!(ok, "{err}");
        let (key, token, _) = session_key(&out);
        eventually(
            "the other agent sees the mesh",
            Duration::from_secs(15),
            || {
                let answer = describe(other, &key, &token);
                answer["result"]
                    .is_object()
                    .then_some(())
                    .ok_or(answer.to_string())
            },
        );
        assert!(describe(issuer, &key, &token)["result"].is_object());
        assert_eq!(
            refused(&describe(&c, &key, &token)),
            ("UnrecognizedClientException".into(), 403),
            "another store's agent does not know these sessions"
        );
    }
}
