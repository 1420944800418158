//! Fixtures for the tests of this crate and the crates built on it (`testing` feature).

use crate::{MeshSpec, MeshState, Metadata, Resource, State};

/// Metadata at version 1 with a fixed uid and times.
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
    MeshState::new(resource(&format!("mesh/{name}"), MeshSpec::default()))
}

/// Mesh `m` with the given spec, virtual nodes (name, spec) and virtual services provided by a
/// node (name, provider): the fixture of the translation tests.
pub fn mesh_state(
    mesh_spec: serde_json::Value,
    nodes: &[(&str, serde_json::Value)],
    services: &[(&str, &str)],
) -> State {
    let mut m = mesh_resource("m");
    m.mesh.spec = serde_json::from_value(mesh_spec).expect("mesh spec");
    for (name, spec) in nodes {
        let spec = serde_json::from_value(spec.clone()).expect("virtual node spec");
        m.virtual_nodes
            .insert(name.to_string(), resource(name, spec));
    }
    for (name, provider) in services {
        let spec = serde_json::json!({"provider": {"virtualNode": {"virtualNodeName": provider}}});
        let spec = serde_json::from_value(spec).expect("virtual service spec");
        m.virtual_services
            .insert(name.to_string(), resource(name, spec));
    }
    let mut s = State::default();
    s.meshes.insert("m".into(), m);
    s
}
