//! The ACM / ACM PCA stand-in (`py/acm_standin.py`, see there why it is one): the certificates
//! and authorities it serves, by ARN, from files the PKI made; rewritten to rotate.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Proc, Workdir, check};

#[derive(Debug)]
pub struct AcmStandin {
    proc: Proc,
    state: PathBuf,
    pub endpoint: String,
}

impl AcmStandin {
    pub fn start(work: &Workdir) -> Self {
        let state = work.join("acm-standin.json");
        fs::write(
            &state,
            r#"{"certificates": {}, "authorities": {}, "denied": []}"#,
        )
        .expect("write the stand-in's state");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/acm_standin.py"))
            .arg(&state);
        let mut proc = Proc::spawn("acm stand-in", &mut cmd, work.join("acm-standin.log"));
        let addr = proc.wait_for_log("acm stand-in listening on ", Duration::from_secs(20));
        AcmStandin {
            proc,
            state,
            endpoint: format!("http://{addr}"),
        }
    }

    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut v: Value =
            serde_json::from_slice(&fs::read(&self.state).expect("read state")).expect("state");
        f(&mut v);
        let tmp = self.state.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&v).expect("encode")).expect("write state");
        fs::rename(&tmp, &self.state).expect("rename state");
    }

    /// `arn` exports `cert` (PEM path), its `key` and `chain` (the issuing CA).
    pub fn certificate(&self, arn: &str, cert: &str, key: &str, chain: &str) {
        self.edit(|v| {
            v["certificates"][arn] = json!({"cert": cert, "key": key, "chain": chain});
        });
    }

    /// `arn` is a root authority whose certificate is `cert`.
    pub fn authority(&self, arn: &str, cert: &str) {
        self.edit(|v| v["authorities"][arn] = json!({"cert": cert}));
    }

    /// Exporting `arn` is denied (AccessDeniedException, as without the IAM permission) or,
    /// with `denied` false, allowed again.
    pub fn deny(&self, arn: &str, denied: bool) {
        self.edit(|v| {
            let mut list: Vec<Value> = v["denied"].as_array().cloned().unwrap_or_default();
            list.retain(|a| a != arn);
            if denied {
                list.push(json!(arn));
            }
            v["denied"] = Value::Array(list);
        });
    }

    /// Calls of `target` (e.g. `CertificateManager.ExportCertificate`) for `arn` so far.
    pub fn calls(&self, target: &str, arn: &str) -> usize {
        let line = format!("call {target} {arn}");
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.trim_end() == line)
            .count()
    }
}

/// A certificate's serial number as openssl prints it (upper-case hex).
pub fn serial(pem: &str) -> String {
    let out = check(Command::new("openssl").args(["x509", "-noout", "-serial", "-in", pem]));
    out.trim()
        .trim_start_matches("serial=")
        .to_ascii_uppercase()
}
