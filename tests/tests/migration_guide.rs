//! docs/migration.md, run: an App Mesh account (here a Trellis agent loaded with App Mesh's colorapp
//! through `aws appmesh create-*`, which answers list-*/describe-* as App Mesh did) is exported with
//! `deploy/migrate/appmesh-export.sh`, then imported twice — `trellis-agent serve --resources` and
//! `deploy/migrate/appmesh-replay.sh` through the AWS CLI — and both targets answer list/describe
//! with the same resources, specs and tags as the source.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use trellis_tests::mesh::Agent;
use trellis_tests::{Workdir, bin, check, venv, workspace_root};

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

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/colorapp")
        .join(name);
    format!("file://{}", p.display())
}

/// A guide script run with the AWS CLI's environment pointed at `agent` (AWS_ENDPOINT_URL), the
/// way a user runs it against App Mesh or Trellis.
fn script(agent: &Agent, name: &str) -> Command {
    let path = format!(
        "{}:{}",
        venv().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg(workspace_root().join("deploy/migrate").join(name))
        .env("PATH", path)
        .env("AWS_ENDPOINT_URL", &agent.api)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-west-2")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_MAX_ATTEMPTS", "1");
    c
}

fn export(agent: &Agent) -> Value {
    let out = check(&mut script(agent, "appmesh-export.sh"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("export is not JSON ({e}): {out}"))
}

/// Items keyed by their names, so order does not matter.
fn by_name(items: &Value) -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = items
        .as_array()
        .expect("a list")
        .iter()
        .map(|i| {
            let key: Vec<&str> = [
                "meshName",
                "virtualNodeName",
                "virtualServiceName",
                "virtualRouterName",
                "virtualGatewayName",
                "routeName",
                "gatewayRouteName",
            ]
            .iter()
            .filter_map(|k| i[*k].as_str())
            .collect();
            (key.join("/"), i.clone())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn data_dir_export(dir: &Path) -> Value {
    let out = check(
        Command::new(bin("trellis-agent"))
            .args(["export", "--data-dir"])
            .arg(dir),
    );
    serde_json::from_str(&out).expect("export JSON")
}

#[test]
fn an_app_mesh_export_imports_into_trellis_with_the_same_resources_specs_and_tags() {
    let work = Workdir::new("migration-source");
    let source = Agent::start(&work, None);
    for (op, file) in CREATES {
        source.appmesh(&[op, "--cli-input-json", &fixture(file)]);
    }
    // A tag on a child resource too, as App Mesh accounts have.
    let arn = source.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "appmesh-mesh",
        "--virtual-node-name",
        "colorteller-blue-vn",
    ])["virtualNode"]["metadata"]["arn"]
        .as_str()
        .expect("arn")
        .to_string();
    // tag-resource answers with an empty body, so no JSON to parse.
    check(&mut source.aws(&[
        "appmesh",
        "tag-resource",
        "--resource-arn",
        &arn,
        "--tags",
        "key=team,value=color",
    ]));

    // Step 1 of the guide: export.
    let exported = export(&source);
    let items = exported.as_array().expect("list");
    assert_eq!(items.len(), CREATES.len(), "{exported:#}");
    assert!(
        items
            .iter()
            .all(|i| i.get("metadata").is_none() && i.get("status").is_none()),
        "computed fields leaked into the export"
    );
    // The export says what the source itself holds (its own authoritative export).
    assert_eq!(
        by_name(&exported),
        by_name(&data_dir_export(&work.join("agent-data"))),
        "the CLI export differs from the source's data"
    );
    let file = work.join("mesh-resources.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&exported).expect("json"),
    )
    .expect("write");

    // Step 2a: import at start-up.
    let work_b = Workdir::new("migration-target-serve");
    let target = Agent::start(&work_b, Some(&file));
    assert_eq!(
        by_name(&export(&target)),
        by_name(&exported),
        "serve --resources"
    );

    // Step 2b: replay through the AWS CLI into a running agent.
    let work_c = Workdir::new("migration-target-replay");
    let replayed = Agent::start(&work_c, None);
    check(script(&replayed, "appmesh-replay.sh").arg(&file));
    assert_eq!(
        by_name(&data_dir_export(&work_c.join("agent-data"))),
        by_name(&exported),
        "replay"
    );

    // Tags and a describe on the target read the same as on the source.
    let tagged = |a: &Agent| {
        let arn = a.appmesh(&[
            "describe-virtual-node",
            "--mesh-name",
            "appmesh-mesh",
            "--virtual-node-name",
            "colorteller-blue-vn",
        ])["virtualNode"]["metadata"]["arn"]
            .as_str()
            .expect("arn")
            .to_string();
        a.appmesh(&["list-tags-for-resource", "--resource-arn", &arn])["tags"].clone()
    };
    assert_eq!(tagged(&target), tagged(&source));
    assert_eq!(
        tagged(&replayed),
        serde_json::json!([{"key": "team", "value": "color"}])
    );
    let route = |a: &Agent| {
        a.appmesh(&[
            "describe-route",
            "--mesh-name",
            "appmesh-mesh",
            "--virtual-router-name",
            "colorteller-vr",
            "--route-name",
            "colorteller-route",
        ])["route"]["spec"]
            .clone()
    };
    assert_eq!(route(&target), route(&source));
    assert_eq!(route(&replayed), route(&source));
}

#[test]
fn replaying_onto_existing_resources_fails_loudly_and_serve_resources_stays_idempotent() {
    let work = Workdir::new("migration-idempotent");
    let source = Agent::start(&work, None);
    source.appmesh(&["create-mesh", "--cli-input-json", &fixture("mesh.json")]);
    let file = work.join("mesh-resources.json");
    std::fs::write(&file, export(&source).to_string()).expect("write");
    // The same mesh already exists in the source: replay refuses (ConflictException), naming it.
    let out = trellis_tests::run(script(&source, "appmesh-replay.sh").arg(&file));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ConflictException"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
