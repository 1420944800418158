//! The embedded backend: the whole App Mesh state in memory, persisted to one file, published to
//! watchers after every committed write.
//!
//! A write runs against a copy of the state; only if it succeeds and the copy is durably on disk
//! (temporary file, fsync, rename, fsync of the directory) does it become current. A rejected write
//! therefore changes nothing, and a crash mid-write leaves the previous file in place.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::Error;
use trellis_model::State;

pub(super) const STATE_FILE: &str = "state.json";

/// The embedded, single-agent backend.
#[derive(Debug)]
pub(super) struct Embedded {
    dir: PathBuf,
    /// Serialises writers; readers never take it.
    write_lock: Mutex<()>,
}

impl Embedded {
    /// Opens (or creates) the store in `dir`, loading the last committed state.
    pub(super) fn open(dir: &Path) -> Result<(Self, State), Error> {
        let state = load(dir)?.unwrap_or_default();
        let store = Embedded {
            dir: dir.to_path_buf(),
            write_lock: Mutex::new(()),
        };
        Ok((store, state))
    }

    /// Runs `f` on a copy of the state and commits the copy if `f` succeeds and changed something.
    pub(super) fn write<T, E>(
        &self,
        tx: &watch::Sender<Arc<State>>,
        mut f: impl FnMut(&mut State) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<Error>,
    {
        // A poisoned lock only means another writer panicked; the committed state is still whole.
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = tx.borrow().clone();
        let mut next = (*current).clone();
        let out = f(&mut next)?;
        if next == *current {
            return Ok(out);
        }
        next.generation = current.generation + 1;
        persist(&self.dir, &next)?;
        tx.send_replace(Arc::new(next));
        Ok(out)
    }
}

/// The state file in `dir`, if there is one (creating `dir` if needed).
pub(super) fn load(dir: &Path) -> Result<Option<State>, Error> {
    load_file(dir, STATE_FILE)
}

/// The JSON in `dir/name`, if there is one (creating `dir` if needed).
pub(super) fn load_file<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, Error> {
    fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// Writes `state` to `dir/state.json`: temporary file, fsync, rename, fsync of the directory.
pub(super) fn persist(dir: &Path, state: &State) -> Result<(), Error> {
    persist_file(dir, STATE_FILE, state)
}

/// Writes `state` to `dir/name` crash-safely.
pub(super) fn persist_file<T: Serialize>(dir: &Path, name: &str, state: &T) -> Result<(), Error> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(state).map_err(Error::Encode)?;
    let write_err = |source| Error::Write {
        path: path.clone(),
        source,
    };
    let mut file = File::create(&tmp).map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(write_err)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::store::Store;
    use crate::test_helpers::{TempDir, mesh_resource};

    #[derive(Debug)]
    enum TestError {
        Store(#[allow(dead_code)] Error),
        Rejected,
    }
    impl From<Error> for TestError {
        fn from(e: Error) -> Self {
            TestError::Store(e)
        }
    }

    #[test]
    fn committed_writes_survive_reopen_and_bump_the_generation() {
        let dir = TempDir::new("store-reopen");
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|s| {
                s.meshes.insert("m".into(), mesh_resource("m"));
                Ok::<_, TestError>(())
            })
            .unwrap();
        assert_eq!(store.current().generation, 1);
        drop(store);
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.current().meshes.contains_key("m"));
        assert_eq!(reopened.current().generation, 1);
    }

    #[test]
    fn a_rejected_write_changes_nothing_in_memory_or_on_disk() {
        let dir = TempDir::new("store-reject");
        let store = Store::open(dir.path()).unwrap();
        let mut rx = store.subscribe();
        rx.mark_unchanged();
        let res: Result<(), TestError> = store.write(|s| {
            s.meshes.insert("m".into(), mesh_resource("m"));
            Err(TestError::Rejected)
        });
        assert!(matches!(res, Err(TestError::Rejected)));
        assert!(store.current().meshes.is_empty());
        assert!(!rx.has_changed().unwrap());
        assert!(!dir.path().join(STATE_FILE).exists());
    }

    #[test]
    fn a_leftover_temporary_file_from_a_crash_does_not_replace_the_last_good_state() {
        let dir = TempDir::new("store-crash");
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|s| {
                s.meshes.insert("m".into(), mesh_resource("m"));
                Ok::<_, TestError>(())
            })
            .unwrap();
        drop(store);
        // A crash between writing the temporary file and the rename.
        fs::write(
            dir.path().join("state.json.tmp"),
            b"{\"generation\": 9, \"mes",
        )
        .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.current().generation, 1);
        assert!(reopened.current().meshes.contains_key("m"));
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_the_file_not_an_empty_mesh() {
        let dir = TempDir::new("store-corrupt");
        fs::write(dir.path().join(STATE_FILE), b"not json").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
