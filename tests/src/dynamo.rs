//! moto server's DynamoDB as the shared store of several agents: start it (one request at a time,
//! as `py/moto_serial.py` explains), create a table with `trellis-agent init-store`, and make it
//! unreachable (SIGSTOP: requests hang and time out, as on a lost network) and reachable again
//! (SIGCONT) without losing its in-memory tables. [`standin`] puts DynamoDB's weaker guarantees
//! (and faults) between the agents and moto.

use std::process::Command;
use std::time::Duration;

use crate::{Proc, Workdir, bin, check, venv, wait_for_http};

pub mod standin;

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    proc: Proc,
    pub endpoint: String,
}

impl Moto {
    pub fn start(work: &Workdir, name: &str) -> Self {
        // moto's own server, with request handling serialised (see the script), on a port it
        // binds and then names.
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/moto_serial.py"))
            .args(["127.0.0.1", "0"]);
        let mut proc = Proc::spawn(name, &mut cmd, work.join(&format!("{name}.log")));
        let addr = proc.wait_for_log("moto listening on ", Duration::from_secs(30));
        let endpoint = format!("http://{addr}");
        wait_for_http(
            &mut proc,
            "moto server up",
            &format!("{endpoint}/moto-api/"),
            Duration::from_secs(30),
            |code| !matches!(code, "000" | ""),
        );
        Moto { proc, endpoint }
    }

    /// `--store dynamodb` flags for an agent (or `export`) on `table`.
    pub fn store_args(&self, table: &str) -> Vec<String> {
        store_args(&self.endpoint, table)
    }

    /// Creates `table` the way an operator would: `trellis-agent init-store`.
    pub fn create_table(&self, table: &str) -> String {
        create_table(&self.endpoint, table)
    }

    /// DynamoDB stops answering (the process is frozen; connections hang).
    pub fn pause(&self) {
        check(Command::new("kill").args(["-STOP", &self.proc.pid().to_string()]));
    }

    pub fn resume(&self) {
        check(Command::new("kill").args(["-CONT", &self.proc.pid().to_string()]));
    }
}

/// `--store dynamodb` flags for `table` at the DynamoDB `endpoint`.
pub fn store_args(endpoint: &str, table: &str) -> Vec<String> {
    [
        "--store",
        "dynamodb",
        "--dynamodb-table",
        table,
        "--dynamodb-endpoint",
        endpoint,
    ]
    .map(String::from)
    .to_vec()
}

/// `trellis-agent init-store` for `table` at `endpoint`: its one-line report.
pub fn create_table(endpoint: &str, table: &str) -> String {
    let mut cmd = Command::new(bin("trellis-agent"));
    cmd.arg("init-store").args(store_args(endpoint, table));
    for (k, v) in aws_env() {
        cmd.env(k, v);
    }
    check(&mut cmd)
}

/// Credentials for moto, and nothing from the host's AWS configuration or instance metadata.
pub fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}
