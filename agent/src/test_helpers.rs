//! Fixtures shared by this crate's unit tests and the `tests` package.

use std::path::{Path, PathBuf};

use crate::model::{MeshSpec, MeshState, Metadata, Resource};

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "trellis-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn metadata(arn: &str) -> Metadata {
    Metadata {
        arn: arn.to_string(),
        created_at: 1.0,
        last_updated_at: 1.0,
        mesh_owner: "000000000000".into(),
        resource_owner: "000000000000".into(),
        uid: "u".into(),
        version: 1,
    }
}

pub fn resource<S>(arn: &str, spec: S) -> Resource<S> {
    Resource {
        metadata: metadata(arn),
        spec,
        tags: vec![],
        client_token: None,
    }
}

pub fn mesh_resource(name: &str) -> MeshState {
    MeshState {
        mesh: resource(&format!("mesh/{name}"), MeshSpec::default()),
        virtual_nodes: Default::default(),
        virtual_services: Default::default(),
    }
}
