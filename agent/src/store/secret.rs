//! Random keys every agent of one store shares, created by whichever agent needs one first: the
//! keys that sign session credentials, so credentials issued by one agent verify on all of them.
//!
//! Separate from the mesh state (no generation, no change log, never exported): with DynamoDB one
//! item per key in partition `secret` (`sk` = the key's name, `key` = 32 random bytes,
//! `expiresAt` for the table's time to live), created with a conditional `PutItem` so concurrent
//! agents agree on one value; with the embedded store one file per key under
//! `DATA_DIR/secrets/`, mode 0600. Whoever can read these can mint credentials, which is no more
//! than the agents' store access already grants (they write the mesh).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use super::{Backend, Error, StoreArgs, dynamodb};

const PARTITION: &str = "secret";
const ATTR_KEY: &str = "key";
const ATTR_EXPIRES: &str = "expiresAt";

/// Where the shared keys live.
#[derive(Debug, Clone)]
pub struct Secrets {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Files(PathBuf),
    Dynamodb { client: Client, table: String },
}

impl Secrets {
    /// The secrets of the store `args` names (`dir` is the embedded store's data directory).
    pub async fn connect(dir: &Path, args: &StoreArgs, region: &str) -> Result<Secrets, Error> {
        let inner = match args.backend {
            Backend::Embedded => Inner::Files(dir.join("secrets")),
            Backend::Dynamodb => Inner::Dynamodb {
                client: dynamodb::client(args, region).await,
                table: dynamodb::table_name(args)?,
            },
        };
        Ok(Secrets { inner })
    }

    /// Secrets in a directory of files (tests and benches).
    pub fn in_dir(dir: &Path) -> Secrets {
        Secrets {
            inner: Inner::Files(dir.to_path_buf()),
        }
    }

    /// The key `name`, made from 32 random bytes by the first agent that asks; `lifetime` after
    /// now it may be discarded.
    pub async fn get_or_create(&self, name: &str, lifetime: Duration) -> Result<[u8; 32], Error> {
        if let Some(k) = self.get(name).await? {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| Error::Config(format!("no randomness: {e}")))?;
        let expires = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        match &self.inner {
            Inner::Files(dir) => create_file(dir, name, &key, expires)?,
            Inner::Dynamodb { client, table } => {
                let put = client
                    .put_item()
                    .table_name(table)
                    .item("pk", AttributeValue::S(PARTITION.into()))
                    .item("sk", AttributeValue::S(name.into()))
                    .item(ATTR_KEY, AttributeValue::B(Blob::new(key.to_vec())))
                    .item(ATTR_EXPIRES, AttributeValue::N(expires.to_string()))
                    .condition_expression("attribute_not_exists(pk)")
                    .send()
                    .await;
                match put {
                    Ok(_) => {}
                    // Another agent made it first: everyone uses that one.
                    Err(e) if e.code() == Some("ConditionalCheckFailedException") => {}
                    Err(e) => return Err(unavailable(table, "PutItem", &e)),
                }
            }
        }
        self.get(name).await?.ok_or_else(|| {
            Error::Config(format!(
                "the shared key {name} vanished right after it was created"
            ))
        })
    }

    /// The key `name`, if some agent made it (consistent read).
    pub async fn get(&self, name: &str) -> Result<Option<[u8; 32]>, Error> {
        match &self.inner {
            Inner::Files(dir) => read_file(dir, name),
            Inner::Dynamodb { client, table } => {
                let out = client
                    .get_item()
                    .table_name(table)
                    .key("pk", AttributeValue::S(PARTITION.into()))
                    .key("sk", AttributeValue::S(name.into()))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| unavailable(table, "GetItem", &e))?;
                let Some(item) = out.item() else {
                    return Ok(None);
                };
                match item.get(ATTR_KEY) {
                    Some(AttributeValue::B(b)) => {
                        key_bytes(b.as_ref()).map(Some).ok_or_else(|| {
                            Error::Config(format!(
                                "the shared key {name} in {table} is not 32 bytes"
                            ))
                        })
                    }
                    _ => Err(Error::Config(format!(
                        "the shared key {name} in {table} has no {ATTR_KEY} attribute"
                    ))),
                }
            }
        }
    }
}

fn unavailable<E: ProvideErrorMetadata>(table: &str, op: &str, e: &E) -> Error {
    Error::Unavailable {
        table: table.to_string(),
        detail: format!("{op}: {}", e.code().unwrap_or("no answer")),
    }
}

fn key_bytes(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

/// Names become file names: only letters, digits, `-` and `.`.
fn file_for(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(safe)
}

fn read_file(dir: &Path, name: &str) -> Result<Option<[u8; 32]>, Error> {
    let path = file_for(dir, name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key = bytes
                .get(..32)
                .and_then(key_bytes)
                .ok_or_else(|| Error::Read {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a 32-byte key",
                    ),
                })?;
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// Writes the key (then its expiry, as text) to a new file, mode 0600; losing a race to another
/// writer is fine (its key wins). Drops keys whose expiry has passed.
fn create_file(dir: &Path, name: &str, key: &[u8; 32], expires: u64) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = file_for(dir, name);
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(key)?;
        f.write_all(format!("\n{expires}\n").as_bytes())?;
        f.sync_all()?;
        // A hard link fails if another agent's key is already there: first one wins.
        match std::fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        std::fs::remove_file(&tmp)
    };
    write().map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    prune(dir);
    Ok(())
}

/// Removes key files past their expiry (best effort).
fn prune(dir: &Path) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let expired = std::fs::read(e.path()).ok().and_then(|b| {
            let text = String::from_utf8_lossy(b.get(33..)?).trim().to_string();
            text.parse::<u64>().ok().map(|x| x < now)
        });
        if expired == Some(true) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::TempDir;

    #[tokio::test]
    async fn a_key_is_made_once_and_read_back_by_everyone() {
        let dir = TempDir::new("secrets");
        let a = Secrets::in_dir(dir.path());
        let b = Secrets::in_dir(dir.path());
        assert_eq!(a.get("k1").await.unwrap(), None);
        let k = a
            .get_or_create("k1", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            b.get_or_create("k1", Duration::from_secs(60))
                .await
                .unwrap(),
            k
        );
        assert_ne!(
            a.get_or_create("k2", Duration::from_secs(60))
                .await
                .unwrap(),
            k
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("k1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Expired keys go when the next one is made.
        create_file(dir.path(), "old", &[7; 32], 1).unwrap();
        a.get_or_create("k3", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(a.get("old").await.unwrap(), None);
        assert_eq!(a.get("k1").await.unwrap(), Some(k));
    }
}
