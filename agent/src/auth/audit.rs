//! The audit log (`--audit-log FILE`), the mesh's CloudTrail: one JSON line per mutating request
//! (whatever its outcome) and per refused request, with the time, the principal (key id or role
//! ARN), the operation, the resource ARN, the outcome and the request id the client saw in
//! `x-amzn-RequestId`. Never a secret, signature or token.
//!
//! Lines go through a bounded queue to one writer task, which appends and flushes each line and
//! reopens the file when it was rotated away (logrotate's `create` or a `mv`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Lines waiting for the writer; a request waits when it is full (nothing is dropped).
const QUEUE: usize = 4096;

/// How a request ended, for the audit log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Authorised, and the operation succeeded.
    Allowed,
    /// Authorised, and the operation answered an error (a conflict, a bad field…).
    Failed,
    /// Authenticated, but no policy allows it.
    Denied,
    /// Not authenticated (unsigned, unknown key, bad or expired signature).
    Unauthenticated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Failed => "failed",
            Outcome::Denied => "denied",
            Outcome::Unauthenticated => "unauthenticated",
        }
    }
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub time: String,
    pub request_id: String,
    /// The key id or role ARN; for an unauthenticated request, the access key id it claimed.
    pub principal: Option<String>,
    /// STS's ARN for a role's caller (the session behind it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    pub operation: String,
    /// The resource the operation acts on (the first of `resources`).
    pub resource: Option<String>,
    /// Every ARN the operation was authorised on (its resource and what it references).
    pub resources: Vec<String>,
    pub outcome: Outcome,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
}

/// Where requests hand their lines.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<String>,
    pub failures: Arc<AtomicU64>,
}

/// The task that writes them.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    rx: mpsc::Receiver<String>,
    file: tokio::fs::File,
    inode: u64,
    failures: Arc<AtomicU64>,
}

impl Audit {
    /// Opens (creates, mode 0600) the log for appending; the writer must be run.
    pub async fn open(path: &Path) -> std::io::Result<(Audit, Writer)> {
        let (file, inode) = open(path).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let failures = Arc::new(AtomicU64::new(0));
        Ok((
            Audit {
                tx,
                failures: failures.clone(),
            },
            Writer {
                path: path.to_path_buf(),
                rx,
                file,
                inode,
                failures,
            },
        ))
    }

    pub async fn record(&self, r: &Record) {
        match serde_json::to_string(r) {
            Ok(line) => {
                if self.tx.send(line).await.is_err() {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn open(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await?;
    let inode = file.metadata().await?.ino();
    Ok((file, inode))
}

impl Writer {
    /// Writes lines until `cancel`, then what is still queued.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let line = tokio::select! {
                biased;
                line = self.rx.recv() => line,
                () = cancel.cancelled() => break,
            };
            match line {
                Some(line) => self.write(&line).await,
                None => return,
            }
        }
        self.rx.close();
        while let Some(line) = self.rx.recv().await {
            self.write(&line).await;
        }
    }

    async fn write(&mut self, line: &str) {
        let rotated = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m.ino() != self.inode,
            Err(_) => true,
        };
        if rotated {
            match open(&self.path).await {
                Ok((file, inode)) => {
                    self.file = file;
                    self.inode = inode;
                }
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot reopen the audit log")
                }
            }
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let written = async {
            self.file.write_all(&buf).await?;
            self.file.flush().await
        };
        if let Err(e) = written.await {
            self.failures.fetch_add(1, Ordering::Relaxed);
            warn!(path = %self.path.display(), error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::TempDir;

    fn record(op: &str) -> Record {
        Record {
            time: "2030-01-01T00:00:00Z".into(),
            request_id: "r".into(),
            principal: Some("AKIAEXAMPLE".into()),
            caller: None,
            operation: op.into(),
            resource: None,
            resources: vec![],
            outcome: Outcome::Allowed,
            status: 200,
            error_code: None,
            source_ip: None,
        }
    }

    #[tokio::test]
    async fn lines_are_appended_and_a_rotated_file_is_reopened() {
        let dir = TempDir::new("audit");
        let path = dir.path().join("audit.log");
        let (audit, writer) = Audit::open(&path).await.unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(writer.run(cancel.clone()));
        audit.record(&record("CreateMesh")).await;
        // Rotation: the old file moves away; the next line starts a new one.
        let lines = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        };
        while lines(&path) < 1 {
            tokio::task::yield_now().await;
        }
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        audit.record(&record("DeleteMesh")).await;
        cancel.cancel();
        task.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["operation"], "DeleteMesh");
        assert_eq!(v["outcome"], "allowed");
        assert_eq!(lines(&dir.path().join("audit.log.1")), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
