//! What the API's authentication tests need: auth files with keys and IAM roles, a private CA
//! that issues the API's certificates (the `openssl` CLI), random secrets, and policy documents.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::{Workdir, check};

/// The region test agents run in (their `--region` default): what clients sign for.
pub const REGION: &str = "us-east-1";

/// A key of the auth file, as a client holds it.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub secret: String,
}

impl Key {
    /// A fresh key: an AWS-shaped access key id with `tag` in it, and a random secret.
    pub fn new(tag: &str) -> Self {
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let id = format!("AKIA{tag}{}", random_hex(8).to_uppercase());
        Key {
            id,
            secret: random_hex(20),
        }
    }
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A policy document of one statement.
pub fn policy(effect: &str, actions: &[&str], resources: &[&str]) -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": effect, "Action": actions, "Resource": resources}]})
}

/// Everything: App Mesh and Trellis's own actions.
pub fn admin_policy() -> Value {
    policy("Allow", &["appmesh:*", "trellis:*"], &["*"])
}

/// An auth file under construction.
#[derive(Debug, Default, Clone)]
pub struct AuthFile {
    keys: Vec<Value>,
    roles: Vec<Value>,
    scrapers: Vec<Value>,
}

impl AuthFile {
    pub fn key(mut self, key: &Key, policy: Value) -> Self {
        self.keys
            .push(json!({"accessKeyId": key.id, "secretAccessKey": key.secret, "policy": policy}));
        self
    }

    pub fn role(mut self, arn: &str, policy: Value) -> Self {
        self.roles.push(json!({"arn": arn, "policy": policy}));
        self
    }

    /// A metrics scraper whose bearer token is in `token_file` (the auth file holds its SHA-256
    /// only, taken with `sha256sum` as the operator's guide says).
    pub fn scraper(mut self, name: &str, token_file: &Path) -> Self {
        let out = check(Command::new("sha256sum").arg(token_file));
        let digest = out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        self.scrapers
            .push(json!({"name": name, "tokenSha256": digest}));
        self
    }

    pub fn to_json(&self) -> Value {
        json!({"keys": self.keys, "roles": self.roles, "scrapers": self.scrapers})
    }

    /// Writes it to `path` in one rename, as an operator's config management would.
    pub fn write(&self, path: &Path) {
        write_atomically(
            path,
            &serde_json::to_vec_pretty(&self.to_json()).expect("encode"),
        );
    }
}

/// Replaces `path`'s content at once (temp file + rename), so a reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).expect("write temp file");
    fs::rename(&tmp, path).expect("rename into place");
}

/// A private CA (the `openssl` CLI) that issues server and client certificates.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

impl Pki {
    pub fn new(work: &Workdir, name: &str) -> Self {
        let dir = work.join(&format!("pki-{name}"));
        fs::create_dir_all(&dir).expect("pki dir");
        let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        check(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", &format!("/CN=Trellis test CA {name}")])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
        );
        Pki { dir, ca, ca_key }
    }

    /// A certificate for `localhost` and 127.0.0.1 signed by this CA: (cert, key) paths.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue_with(name, "DNS:localhost,IP:127.0.0.1", "serverAuth")
    }

    /// A client certificate whose one SAN is the URI `uri`: (cert, key) paths.
    pub fn issue_client(&self, name: &str, uri: &str) -> (PathBuf, PathBuf) {
        self.issue_with(name, &format!("URI:{uri}"), "clientAuth")
    }

    /// A certificate with subjectAltName `san` and extendedKeyUsage `usage`: (cert, key) paths.
    fn issue_with(&self, name: &str, san: &str, usage: &str) -> (PathBuf, PathBuf) {
        let (cert, key, csr, ext) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
            self.dir.join(format!("{name}.csr")),
            self.dir.join(format!("{name}.ext")),
        );
        check(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                ])
                .args(["-nodes", "-subj", "/CN=localhost", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        fs::write(
            &ext,
            format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"),
        )
        .expect("write ext");
        check(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-set_serial"])
                .arg(format!("0x{}", random_hex(8)))
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&self.ca)
                .arg("-CAkey")
                .arg(&self.ca_key)
                .arg("-out")
                .arg(&cert)
                .arg("-extfile")
                .arg(&ext),
        );
        (cert, key)
    }
}

/// TLS for an agent's API: its certificate and key, and the CA a client trusts.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How a test agent's API is secured, and the key its helpers sign with.
#[derive(Debug, Clone)]
pub struct ApiAuth {
    /// The `--api-auth` file.
    pub file: PathBuf,
    /// What `Agent::aws`, `raw`, `metric` and `debug_xds` sign with.
    pub key: Key,
    pub tls: Option<Tls>,
    /// `--audit-log`.
    pub audit_log: Option<PathBuf>,
}

impl ApiAuth {
    /// An auth file with one administrator key (`appmesh:*`, `trellis:*`) that the helpers use,
    /// plus whatever `extra` adds; an audit log beside it.
    pub fn admin(work: &Workdir, name: &str, extra: AuthFile) -> Self {
        let key = Key::new("admin");
        let file = work.join(&format!("{name}-auth.json"));
        extra.key(&key, admin_policy()).write(&file);
        ApiAuth {
            file,
            key,
            tls: None,
            audit_log: Some(work.join(&format!("{name}-audit.log"))),
        }
    }

    /// The `serve` flags for it.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--api-auth".to_string(), self.file.display().to_string()];
        if let Some(t) = &self.tls {
            a.extend([
                "--api-tls-cert".into(),
                t.cert.display().to_string(),
                "--api-tls-key".into(),
                t.key.display().to_string(),
            ]);
        }
        if let Some(log) = &self.audit_log {
            a.extend(["--audit-log".into(), log.display().to_string()]);
        }
        a
    }

    /// The audit log's lines as JSON.
    pub fn audit_lines(&self) -> Vec<Value> {
        let Some(path) = &self.audit_log else {
            return vec![];
        };
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }
}

/// Percent-encodes a query string's names and values (keeping existing escapes), as SDKs send
/// them: curl's SigV4 (7.88) signs the query as given, so it must already be canonical.
pub fn encode_query(query: &str) -> String {
    let enc = |s: &str| -> String {
        let b = s.as_bytes();
        let mut out = String::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let escape = c == b'%'
                && b.get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
                out.push(c as char);
            } else if escape {
                out.push_str(&s[i..i + 3].to_ascii_uppercase());
                i += 3;
                continue;
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
            i += 1;
        }
        out
    };
    query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, v)) => format!("{}={}", enc(k), enc(v)),
            None => enc(p),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// One boto3 call to `agent`, signed with `key` for [`REGION`] (`extra` overrides or adds request
/// fields: `token`, `region`, `secret`, `presign`, `signedSecondsAgo`; see `py/appmesh_call.py`).
/// Returns `{"result": …}` or `{"error": {"code", "message", "status"}}`.
pub fn boto(agent: &crate::mesh::Agent, key: &Key, op: &str, params: Value, extra: Value) -> Value {
    let mut req = json!({
        "endpoint": agent.api, "region": REGION, "key": key.id, "secret": key.secret,
        "operation": op, "params": params,
    });
    if let Some(t) = agent.auth.as_ref().and_then(|a| a.tls.as_ref()) {
        req["caBundle"] = json!(t.ca);
    }
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            req[k] = v;
        }
    }
    let mut child = Command::new(crate::venv().join("bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/appmesh_call.py"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run appmesh_call.py from the venv (scripts/setup.sh)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(req.to_string().as_bytes())
        .expect("write the request");
    let out = child.wait_with_output().expect("appmesh_call.py ran");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "appmesh_call.py: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The (code, status) of a boto3 call that must have failed.
pub fn refused(answer: &Value) -> (String, u16) {
    let e = &answer["error"];
    assert!(e.is_object(), "expected an error, got {answer}");
    (
        e["code"].as_str().unwrap_or_default().to_string(),
        e["status"].as_u64().unwrap_or_default() as u16,
    )
}

/// A moto server (IAM, STS, SSM…) with `env` (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`, which makes it
/// verify signatures as AWS does, or `MOTO_ACCOUNT_ID`), on a port it binds and names: the
/// process and its endpoint URL.
pub fn moto_with(work: &Workdir, name: &str, env: &[(&str, &str)]) -> (crate::Proc, String) {
    let mut cmd = Command::new(crate::venv().join("bin/python"));
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/moto_serial.py"))
        .args(["127.0.0.1", "0"])
        .envs(env.iter().copied());
    let mut proc = crate::Proc::spawn(name, &mut cmd, work.join(&format!("{name}.log")));
    let addr = proc.wait_for_log("moto listening on ", std::time::Duration::from_secs(30));
    (proc, format!("http://{addr}"))
}
