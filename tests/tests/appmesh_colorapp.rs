//! App Mesh's public colorapp example (a mesh, four virtual nodes, a router with weighted routes,
//! virtual services, an ingress gateway with a gateway route) run unchanged through the AWS CLI,
//! then exported and re-imported, then torn down in the order App Mesh requires.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use trellis_tests::mesh::Agent;
use trellis_tests::{Workdir, bin, check};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/colorapp")
        .join(name);
    format!("file://{}", p.display())
}

/// The order an operator follows: what a resource references exists before it.
const CREATES: [(&str, &str); 11] = [
    ("create-mesh", "mesh.json"),
    ("create-virtual-node", "colorteller-white-vn.json"),
    ("create-virtual-node", "colorteller-blue-vn.json"),
    ("create-virtual-node", "colorteller-red-vn.json"),
    ("create-virtual-node", "colorgateway-vn.json"),
    ("create-virtual-router", "colorteller-vr.json"),
    ("create-route", "colorteller-route.json"),
    ("create-virtual-service", "colorteller-vs.json"),
    ("create-virtual-service", "colorgateway-vs.json"),
    ("create-virtual-gateway", "ingress-gw.json"),
    ("create-gateway-route", "gateway-route.json"),
];

const M: &str = "appmesh-mesh";

fn create_colorapp(agent: &Agent) {
    for (op, file) in CREATES {
        let out = agent.appmesh(&[op, "--cli-input-json", &fixture(file)]);
        let data = out
            .as_object()
            .and_then(|o| o.values().next())
            .expect("payload");
        assert_eq!(data["status"]["status"], "ACTIVE", "{op} {file}: {out}");
        assert_eq!(data["metadata"]["version"], 1, "{op} {file}");
    }
}

#[test]
fn the_colorapp_walkthrough_runs_unchanged_through_the_aws_cli() {
    let work = Workdir::new("colorapp");
    let agent = Agent::start(&work, None);
    create_colorapp(&agent);

    let route = agent.appmesh(&[
        "describe-route",
        "--mesh-name",
        M,
        "--virtual-router-name",
        "colorteller-vr",
        "--route-name",
        "colorteller-route",
    ]);
    assert_eq!(
        route["route"]["metadata"]["arn"],
        "arn:aws:appmesh:us-east-1:000000000000:mesh/appmesh-mesh/virtualRouter/colorteller-vr/route/colorteller-route"
    );
    assert_eq!(
        route["route"]["spec"]["httpRoute"]["action"]["weightedTargets"][1]["virtualNode"],
        "colorteller-blue-vn"
    );
    let gr = agent.appmesh(&[
        "describe-gateway-route",
        "--mesh-name",
        M,
        "--virtual-gateway-name",
        "ingress-gw",
        "--gateway-route-name",
        "colorgateway-route",
    ]);
    assert_eq!(
        gr["gatewayRoute"]["metadata"]["arn"],
        "arn:aws:appmesh:us-east-1:000000000000:mesh/appmesh-mesh/virtualGateway/ingress-gw/gatewayRoute/colorgateway-route"
    );
    let nodes = agent.appmesh(&["list-virtual-nodes", "--mesh-name", M]);
    assert_eq!(nodes["virtualNodes"].as_array().unwrap().len(), 4);
    let routes = agent.appmesh(&[
        "list-routes",
        "--mesh-name",
        M,
        "--virtual-router-name",
        "colorteller-vr",
    ]);
    assert_eq!(routes["routes"][0]["routeName"], "colorteller-route");
    assert_eq!(routes["routes"][0]["virtualRouterName"], "colorteller-vr");

    // Shift all traffic to blue, as the walkthrough does.
    let updated = agent.appmesh(&[
        "update-route", "--mesh-name", M, "--virtual-router-name", "colorteller-vr", "--route-name", "colorteller-route",
        "--spec", r#"{"httpRoute":{"match":{"prefix":"/"},"action":{"weightedTargets":[{"virtualNode":"colorteller-blue-vn","weight":1}]}}}"#,
    ]);
    assert_eq!(updated["route"]["metadata"]["version"], 2);

    // Tags.
    let mesh_arn = "arn:aws:appmesh:us-east-1:000000000000:mesh/appmesh-mesh";
    let tags = agent.appmesh(&["list-tags-for-resource", "--resource-arn", mesh_arn]);
    assert_eq!(tags["tags"][0]["key"], "app");
    check(&mut agent.aws(&[
        "appmesh",
        "tag-resource",
        "--resource-arn",
        mesh_arn,
        "--tags",
        "key=team,value=colors",
    ]));
    let tags = agent.appmesh(&["list-tags-for-resource", "--resource-arn", mesh_arn]);
    assert_eq!(tags["tags"].as_array().unwrap().len(), 2);
    check(&mut agent.aws(&[
        "appmesh",
        "untag-resource",
        "--resource-arn",
        mesh_arn,
        "--tag-keys",
        "app",
    ]));
    let tags = agent.appmesh(&["list-tags-for-resource", "--resource-arn", mesh_arn]);
    assert_eq!(tags["tags"][0]["key"], "team");

    // Teardown in the order App Mesh requires; each premature delete is ResourceInUse.
    let in_use = |args: &[&str]| {
        let err = agent.appmesh_err(args);
        assert!(err.contains("ResourceInUseException"), "{args:?}: {err}");
    };
    in_use(&[
        "delete-virtual-service",
        "--mesh-name",
        M,
        "--virtual-service-name",
        "colorgateway.default.svc.cluster.local",
    ]);
    in_use(&[
        "delete-virtual-gateway",
        "--mesh-name",
        M,
        "--virtual-gateway-name",
        "ingress-gw",
    ]);
    in_use(&[
        "delete-virtual-router",
        "--mesh-name",
        M,
        "--virtual-router-name",
        "colorteller-vr",
    ]);
    in_use(&[
        "delete-virtual-node",
        "--mesh-name",
        M,
        "--virtual-node-name",
        "colorteller-blue-vn",
    ]);
    in_use(&["delete-mesh", "--mesh-name", M]);
    for args in [
        vec![
            "delete-gateway-route",
            "--mesh-name",
            M,
            "--virtual-gateway-name",
            "ingress-gw",
            "--gateway-route-name",
            "colorgateway-route",
        ],
        vec![
            "delete-virtual-gateway",
            "--mesh-name",
            M,
            "--virtual-gateway-name",
            "ingress-gw",
        ],
        vec![
            "delete-virtual-service",
            "--mesh-name",
            M,
            "--virtual-service-name",
            "colorgateway.default.svc.cluster.local",
        ],
        vec![
            "delete-virtual-service",
            "--mesh-name",
            M,
            "--virtual-service-name",
            "colorteller.default.svc.cluster.local",
        ],
        vec![
            "delete-route",
            "--mesh-name",
            M,
            "--virtual-router-name",
            "colorteller-vr",
            "--route-name",
            "colorteller-route",
        ],
        vec![
            "delete-virtual-router",
            "--mesh-name",
            M,
            "--virtual-router-name",
            "colorteller-vr",
        ],
        vec![
            "delete-virtual-node",
            "--mesh-name",
            M,
            "--virtual-node-name",
            "colorgateway-vn",
        ],
        vec![
            "delete-virtual-node",
            "--mesh-name",
            M,
            "--virtual-node-name",
            "colorteller-white-vn",
        ],
        vec![
            "delete-virtual-node",
            "--mesh-name",
            M,
            "--virtual-node-name",
            "colorteller-blue-vn",
        ],
        vec![
            "delete-virtual-node",
            "--mesh-name",
            M,
            "--virtual-node-name",
            "colorteller-red-vn",
        ],
        vec!["delete-mesh", "--mesh-name", M],
    ] {
        let out = agent.appmesh(&args);
        let data = out
            .as_object()
            .and_then(|o| o.values().next())
            .expect("payload");
        assert_eq!(data["status"]["status"], "DELETED", "{args:?}");
    }
    assert_eq!(
        agent.appmesh(&["list-meshes"])["meshes"],
        Value::Array(vec![])
    );
}

#[test]
fn export_then_resources_reimports_the_same_mesh() {
    let work = Workdir::new("colorapp-export");
    let agent = Agent::start(&work, None);
    create_colorapp(&agent);
    let exported = check(
        Command::new(bin("trellis-agent"))
            .args(["export", "--data-dir"])
            .arg(work.join("agent-data")),
    );
    let file = work.join("exported.json");
    std::fs::write(&file, &exported).unwrap();
    drop(agent);

    let other = Workdir::new("colorapp-import");
    let imported = Agent::start(&other, Some(&file));
    let again = check(
        Command::new(bin("trellis-agent"))
            .args(["export", "--data-dir"])
            .arg(other.join("agent-data")),
    );
    let a: Value = serde_json::from_str(&exported).unwrap();
    let b: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(a, b, "export → --resources → export is the identity");
    assert_eq!(a.as_array().unwrap().len(), CREATES.len());
    // Re-applying the same file on restart changes nothing (no version bump).
    let before = imported.appmesh(&[
        "describe-route",
        "--mesh-name",
        M,
        "--virtual-router-name",
        "colorteller-vr",
        "--route-name",
        "colorteller-route",
    ]);
    drop(imported);
    let restarted = Agent::start(&other, Some(&file));
    let after = restarted.appmesh(&[
        "describe-route",
        "--mesh-name",
        M,
        "--virtual-router-name",
        "colorteller-vr",
        "--route-name",
        "colorteller-route",
    ]);
    assert_eq!(before["route"]["metadata"], after["route"]["metadata"]);
}
