//! Shared helpers of the integration tests: the project venv with the real peers (botocore, the AWS CLI,
//! moto server), botocore's own `RegisterTaskDefinition` shape validation, and the CLI binary.
//!
//! A peer that is missing skips the test locally (with a message) and fails it under CI.

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset of these helpers.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The venv `scripts/setup.sh` makes: `TRELLIS_VENV`, else the workspace root's `.venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("TRELLIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

/// `path` if it exists; `None` (after saying why) when it does not and CI does not require it.
pub fn peer(path: PathBuf, what: &str, required: bool) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let required = required || std::env::var_os("CI").is_some();
    assert!(
        !required,
        "{what} not found at {} (CI requires it): run scripts/setup.sh or set TRELLIS_VENV",
        path.display()
    );
    eprintln!(
        "skipping: {what} not found at {} (run scripts/setup.sh or set TRELLIS_VENV)",
        path.display()
    );
    None
}

/// The python that has botocore: `TRELLIS_BOTOCORE_PYTHON`, else the venv's.
pub fn botocore_python() -> Option<PathBuf> {
    let path = std::env::var_os("TRELLIS_BOTOCORE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| venv().join("bin/python"));
    let required = std::env::var_os("TRELLIS_REQUIRE_BOTOCORE").is_some();
    peer(path, "python with botocore", required)
}

/// Checks each request against botocore's `RegisterTaskDefinition` input shape (botocore's own parameter
/// validation, as the AWS CLI runs it before sending). Panics naming the first rejected one.
pub fn botocore_validate(requests: &[(String, Value)]) {
    let Some(python) = botocore_python() else {
        return;
    };
    let script = r#"
import json, sys
import botocore.session
from botocore.validate import validate_parameters
model = botocore.session.get_session().get_service_model("ecs")
shape = model.operation_model("RegisterTaskDefinition").input_shape
for name, params in json.load(sys.stdin):
    try:
        validate_parameters(params, shape)
    except Exception as e:
        print(f"{name}: {e}")
        sys.exit(1)
"#;
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python");
    let input = serde_json::to_vec(requests).expect("serialise requests");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&input)
        .expect("write requests to python");
    let out = child.wait_with_output().expect("wait for python");
    assert!(
        out.status.success(),
        "botocore rejected a RegisterTaskDefinition request: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The golden fixtures: every `tests/fixtures/NAME/` with an `input.json`, sorted.
pub fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.join("input.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// A fixture's CLI flags: its `args` file, one argument per line.
pub fn fixture_args(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("args"))
        .expect("fixture args")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The `trellis-rewrite` binary with a clean environment: no AWS settings leak in from the host.
pub fn rewrite_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-rewrite"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// Runs a command, returning stdout; panics with stderr if it fails.
#[track_caller]
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

/// Runs a command that must fail; returns its output.
#[track_caller]
pub fn fails(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// A moto server of our own on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    /// Starts `moto_server` from the venv and waits until it accepts connections; `None` when the venv
    /// has no moto (and CI is not set).
    pub fn start() -> Option<Self> {
        Self::start_with(&[], "http")
    }

    /// Like [`Moto::start`], serving HTTPS with a fresh self-signed certificate for 127.0.0.1 (made
    /// with the venv's `cryptography`); returns the certificate's path too, for `SSL_CERT_FILE`.
    pub fn start_tls(dir: &Path) -> Option<(Self, PathBuf)> {
        let python = peer(venv().join("bin/python"), "the venv's python", false)?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let script = r#"
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
    .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .sign(key, hashes.SHA256()))
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
"#;
        let mut gen_cmd = Command::new(python);
        gen_cmd.args(["-c", script]).arg(&cert).arg(&key);
        ok(&mut gen_cmd);
        let (c, k) = (cert.to_str()?, key.to_str()?);
        let moto = Self::start_with(&["-c", c, "-k", k], "https")?;
        Some((moto, cert))
    }

    fn start_with(extra: &[&str], scheme: &str) -> Option<Self> {
        let bin = peer(venv().join("bin/moto_server"), "moto_server", false)?;
        // Port 0: moto binds a port the kernel picks and names it (" * Running on URL"), so no
        // other process can take it between choosing and binding.
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moto_server");
        let stderr = child.stderr.take().expect("moto's stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads moto's log to the end, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, url)) = line.split_once(" * Running on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "moto_server did not say where it listens within 30 s ({:?})",
                    child.try_wait()
                );
            }
        };
        assert!(url.starts_with(scheme), "{url} is not {scheme}");
        let moto = Self { child, url };
        Some(moto)
    }

    /// Environment for clients of this server (what HARNESS.md's recipe uses).
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-west-2")
            .env("AWS_DEFAULT_REGION", "us-west-2")
            .env("AWS_EC2_METADATA_DISABLED", "true");
    }

    /// `trellis-rewrite --endpoint-url URL ARGS...` against this server.
    pub fn rewrite(&self, args: &[&str]) -> Command {
        let mut cmd = rewrite_cmd();
        self.env(&mut cmd);
        cmd.arg("--endpoint-url").arg(&self.url).args(args);
        cmd
    }

    /// The real AWS CLI against this server: `aws ecs ARGS... --output json`.
    pub fn aws_ecs(&self, args: &[&str]) -> Value {
        let mut cmd = Command::new(venv().join("bin/aws"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        self.env(&mut cmd);
        cmd.args(["--endpoint-url", &self.url, "--output", "json", "ecs"])
            .args(args);
        serde_json::from_str(&ok(&mut cmd)).expect("the AWS CLI prints JSON")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What ECS itself fills in when it stores a definition: fields it adds with these values may appear on
/// read-back though they were never sent.
fn ecs_default(path: &[&str], key: &str, value: &Value) -> bool {
    let empty = value.as_array().is_some_and(Vec::is_empty);
    match (path, key) {
        ([], "placementConstraints" | "volumes" | "requiresAttributes") => empty,
        (["containerDefinitions", _], "cpu") => value == 0,
        (["containerDefinitions", _], "essential") => value == true,
        (
            ["containerDefinitions", _],
            "environment" | "mountPoints" | "volumesFrom" | "portMappings",
        ) => empty,
        _ => false,
    }
}

/// Asserts that `read_back` (a normalised `DescribeTaskDefinition`) is `sent` as registered: every field
/// sent is there with the same value, and anything else is one of ECS's own defaults.
#[track_caller]
pub fn assert_read_back_unchanged(sent: &Value, read_back: &Value) {
    let mut problems = Vec::new();
    compare(sent, read_back, &mut Vec::new(), &mut problems);
    assert!(
        problems.is_empty(),
        "read back differs from what was registered:\n{}\n--- sent\n{}\n--- read back\n{}",
        problems.join("\n"),
        serde_json::to_string_pretty(sent).unwrap_or_default(),
        serde_json::to_string_pretty(read_back).unwrap_or_default()
    );
}

fn compare<'a>(sent: &'a Value, got: &'a Value, path: &mut Vec<&'a str>, out: &mut Vec<String>) {
    let here = |path: &[&str]| format!("/{}", path.join("/"));
    match (sent, got) {
        (Value::Object(s), Value::Object(g)) => {
            for (k, v) in s {
                path.push(k);
                match g.get(k) {
                    Some(gv) => compare(v, gv, path, out),
                    None => out.push(format!("{}: missing", here(path))),
                }
                path.pop();
            }
            for (k, v) in g {
                if !s.contains_key(k) && !ecs_default(path, k, v) {
                    out.push(format!("{}/{k}: added {v}", here(path)));
                }
            }
        }
        (Value::Array(s), Value::Array(g)) if s.len() == g.len() => {
            // Indices are not path segments of `ecs_default`; keep them out of the borrowed path by
            // using a placeholder.
            for (sv, gv) in s.iter().zip(g) {
                path.push("*");
                compare(sv, gv, path, out);
                path.pop();
            }
        }
        _ if sent == got => {}
        _ => out.push(format!("{}: sent {sent}, read back {got}", here(path))),
    }
}
