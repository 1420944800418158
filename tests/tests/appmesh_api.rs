//! The App Mesh REST API against its real clients: the AWS CLI, and raw HTTP checked against the
//! botocore model's output shapes.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;
use trellis_tests::mesh::Agent;
use trellis_tests::{Workdir, venv};

const NODE_SPEC: &str = r#"{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}],"serviceDiscovery":{"dns":{"hostname":"a.internal"}}}"#;

/// Fails with the field path when `body` does not fit the operation's output shape.
fn assert_shape(operation: &str, body: &str) {
    let mut child = Command::new(venv().join("bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/check_shape.py"))
        .arg(operation)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run check_shape.py from the venv (scripts/setup.sh)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(body.as_bytes())
        .expect("write the body to check_shape.py");
    let out = child.wait_with_output().expect("check_shape.py ran");
    assert!(
        out.status.success(),
        "{operation} response does not fit the botocore model:\n{}{}\nbody: {body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cli_error(stderr: &str, kind: &str, operation: &str) {
    assert!(
        stderr.contains(&format!(
            "An error occurred ({kind}) when calling the {operation} operation"
        )),
        "expected {kind} from {operation}, got: {stderr}"
    );
}

#[test]
fn aws_cli_creates_describes_lists_updates_and_deletes_meshes_nodes_and_services() {
    let work = Workdir::new("api-cli");
    let agent = Agent::start_secured(&work, None);
    let mesh = agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    assert_eq!(
        mesh["mesh"]["spec"]["egressFilter"]["type"], "DROP_ALL",
        "App Mesh fills the default"
    );
    assert_eq!(mesh["mesh"]["status"]["status"], "ACTIVE");
    let arn = mesh["mesh"]["metadata"]["arn"].as_str().unwrap();
    assert_eq!(arn, "arn:aws:appmesh:us-east-1:000000000000:mesh/shop");
    assert!(
        mesh["mesh"]["metadata"]["createdAt"].is_number(),
        "epoch seconds, which the CLI (v1) shows as received"
    );

    let vn = agent.appmesh(&[
        "create-virtual-node",
        "--mesh-name",
        "shop",
        "--virtual-node-name",
        "a",
        "--spec",
        NODE_SPEC,
    ]);
    assert_eq!(
        vn["virtualNode"]["metadata"]["arn"],
        "arn:aws:appmesh:us-east-1:000000000000:mesh/shop/virtualNode/a"
    );
    assert_eq!(
        vn["virtualNode"]["spec"]["listeners"][0]["portMapping"]["port"],
        8080
    );
    let vs = agent.appmesh(&[
        "create-virtual-service",
        "--mesh-name",
        "shop",
        "--virtual-service-name",
        "a.shop.local",
        "--spec",
        r#"{"provider":{"virtualNode":{"virtualNodeName":"a"}}}"#,
    ]);
    assert_eq!(vs["virtualService"]["virtualServiceName"], "a.shop.local");

    let described = agent.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "shop",
        "--virtual-node-name",
        "a",
    ]);
    assert_eq!(
        described["virtualNode"]["metadata"]["uid"],
        vn["virtualNode"]["metadata"]["uid"]
    );
    let listed = agent.appmesh(&["list-virtual-nodes", "--mesh-name", "shop"]);
    assert_eq!(listed["virtualNodes"][0]["virtualNodeName"], "a");
    let listed = agent.appmesh(&["list-virtual-services", "--mesh-name", "shop"]);
    assert_eq!(
        listed["virtualServices"][0]["virtualServiceName"],
        "a.shop.local"
    );
    let meshes = agent.appmesh(&["list-meshes"]);
    assert_eq!(meshes["meshes"][0]["meshName"], "shop");

    let updated = agent.appmesh(&[
        "update-virtual-node", "--mesh-name", "shop", "--virtual-node-name", "a", "--spec",
        r#"{"listeners":[{"portMapping":{"port":9090,"protocol":"grpc"}}],"serviceDiscovery":{"dns":{"hostname":"a.internal"}}}"#,
    ]);
    assert_eq!(
        updated["virtualNode"]["metadata"]["version"], 2,
        "version increments on update"
    );

    // References hold: the node provides the service, the mesh holds both.
    cli_error(
        &agent.appmesh_err(&[
            "delete-virtual-node",
            "--mesh-name",
            "shop",
            "--virtual-node-name",
            "a",
        ]),
        "ResourceInUseException",
        "DeleteVirtualNode",
    );
    cli_error(
        &agent.appmesh_err(&["delete-mesh", "--mesh-name", "shop"]),
        "ResourceInUseException",
        "DeleteMesh",
    );
    let deleted = agent.appmesh(&[
        "delete-virtual-service",
        "--mesh-name",
        "shop",
        "--virtual-service-name",
        "a.shop.local",
    ]);
    assert_eq!(deleted["virtualService"]["status"]["status"], "DELETED");
    agent.appmesh(&[
        "delete-virtual-node",
        "--mesh-name",
        "shop",
        "--virtual-node-name",
        "a",
    ]);
    agent.appmesh(&["delete-mesh", "--mesh-name", "shop"]);
    assert_eq!(
        agent.appmesh(&["list-meshes"])["meshes"],
        Value::Array(vec![])
    );
}

#[test]
fn responses_fit_the_botocore_output_shapes() {
    let work = Workdir::new("api-shapes");
    let agent = Agent::start_secured(&work, None);
    let p = "/v20190125/meshes";
    let cases: Vec<(&str, &str, String, Option<String>)> = vec![
        ("CreateMesh", "PUT", p.into(), Some(r#"{"meshName":"m","spec":{"egressFilter":{"type":"ALLOW_ALL"}}}"#.into())),
        ("DescribeMesh", "GET", format!("{p}/m"), None),
        ("UpdateMesh", "PUT", format!("{p}/m"), Some(r#"{"spec":{}}"#.into())),
        ("ListMeshes", "GET", p.into(), None),
        ("CreateVirtualNode", "PUT", format!("{p}/m/virtualNodes"), Some(format!(r#"{{"virtualNodeName":"a","spec":{NODE_SPEC}}}"#))),
        ("DescribeVirtualNode", "GET", format!("{p}/m/virtualNodes/a"), None),
        ("UpdateVirtualNode", "PUT", format!("{p}/m/virtualNodes/a"), Some(format!(r#"{{"spec":{NODE_SPEC}}}"#))),
        ("ListVirtualNodes", "GET", format!("{p}/m/virtualNodes"), None),
        ("CreateVirtualService", "PUT", format!("{p}/m/virtualServices"),
            Some(r#"{"virtualServiceName":"s","spec":{"provider":{"virtualNode":{"virtualNodeName":"a"}}}}"#.into())),
        ("DescribeVirtualService", "GET", format!("{p}/m/virtualServices/s"), None),
        ("UpdateVirtualService", "PUT", format!("{p}/m/virtualServices/s"), Some(r#"{"spec":{}}"#.into())),
        ("ListVirtualServices", "GET", format!("{p}/m/virtualServices?limit=1"), None),
        ("CreateVirtualRouter", "PUT", format!("{p}/m/virtualRouters"),
            Some(r#"{"virtualRouterName":"r","spec":{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}]}}"#.into())),
        ("DescribeVirtualRouter", "GET", format!("{p}/m/virtualRouters/r"), None),
        ("UpdateVirtualRouter", "PUT", format!("{p}/m/virtualRouters/r"),
            Some(r#"{"spec":{"listeners":[{"portMapping":{"port":8080,"protocol":"http"}}]}}"#.into())),
        ("ListVirtualRouters", "GET", format!("{p}/m/virtualRouters"), None),
        ("CreateRoute", "PUT", format!("{p}/m/virtualRouter/r/routes"),
            Some(r#"{"routeName":"rt","spec":{"priority":1,"httpRoute":{"match":{"prefix":"/","headers":[{"name":"x","match":{"exact":"1"}}]},"action":{"weightedTargets":[{"virtualNode":"a","weight":1}]},"timeout":{"perRequest":{"unit":"s","value":5}}}}}"#.into())),
        ("DescribeRoute", "GET", format!("{p}/m/virtualRouter/r/routes/rt"), None),
        ("UpdateRoute", "PUT", format!("{p}/m/virtualRouter/r/routes/rt"),
            Some(r#"{"spec":{"httpRoute":{"match":{"path":{"exact":"/a"}},"action":{"weightedTargets":[{"virtualNode":"a","weight":0}]}}}}"#.into())),
        ("ListRoutes", "GET", format!("{p}/m/virtualRouter/r/routes"), None),
        ("CreateVirtualGateway", "PUT", format!("{p}/m/virtualGateways"),
            Some(r#"{"virtualGatewayName":"g","spec":{"listeners":[{"portMapping":{"port":8443,"protocol":"http2"}}]}}"#.into())),
        ("DescribeVirtualGateway", "GET", format!("{p}/m/virtualGateways/g"), None),
        ("UpdateVirtualGateway", "PUT", format!("{p}/m/virtualGateways/g"),
            Some(r#"{"spec":{"listeners":[{"portMapping":{"port":8443,"protocol":"http2"}}],"logging":{"accessLog":{"file":{"path":"/dev/stdout"}}}}}"#.into())),
        ("ListVirtualGateways", "GET", format!("{p}/m/virtualGateways"), None),
        ("CreateGatewayRoute", "PUT", format!("{p}/m/virtualGateway/g/gatewayRoutes"),
            Some(r#"{"gatewayRouteName":"gr","spec":{"http2Route":{"match":{"prefix":"/s"},"action":{"target":{"virtualService":{"virtualServiceName":"s"}}}}}}"#.into())),
        ("DescribeGatewayRoute", "GET", format!("{p}/m/virtualGateway/g/gatewayRoutes/gr"), None),
        ("UpdateGatewayRoute", "PUT", format!("{p}/m/virtualGateway/g/gatewayRoutes/gr"),
            Some(r#"{"spec":{"http2Route":{"match":{"prefix":"/t"},"action":{"target":{"virtualService":{"virtualServiceName":"s"}}}}}}"#.into())),
        ("ListGatewayRoutes", "GET", format!("{p}/m/virtualGateway/g/gatewayRoutes"), None),
        ("TagResource", "PUT", "/v20190125/tag?resourceArn=arn:aws:appmesh:us-east-1:000000000000:mesh/m/virtualGateway/g".into(),
            Some(r#"{"tags":[{"key":"k","value":"v"}]}"#.into())),
        ("ListTagsForResource", "GET", "/v20190125/tags?resourceArn=arn:aws:appmesh:us-east-1:000000000000:mesh/m/virtualGateway/g".into(), None),
        ("UntagResource", "PUT", "/v20190125/untag?resourceArn=arn:aws:appmesh:us-east-1:000000000000:mesh/m/virtualGateway/g".into(),
            Some(r#"{"tagKeys":["k"]}"#.into())),
        ("DeleteGatewayRoute", "DELETE", format!("{p}/m/virtualGateway/g/gatewayRoutes/gr"), None),
        ("DeleteVirtualGateway", "DELETE", format!("{p}/m/virtualGateways/g"), None),
        ("DeleteRoute", "DELETE", format!("{p}/m/virtualRouter/r/routes/rt"), None),
        ("DeleteVirtualService", "DELETE", format!("{p}/m/virtualServices/s"), None),
        ("DeleteVirtualRouter", "DELETE", format!("{p}/m/virtualRouters/r"), None),
        ("DeleteVirtualNode", "DELETE", format!("{p}/m/virtualNodes/a"), None),
        ("DeleteMesh", "DELETE", format!("{p}/m"), None),
    ];
    let mut ops: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ops.sort_unstable();
    ops.dedup();
    assert_eq!(ops.len(), 38, "every App Mesh operation is covered");
    for (op, method, path, body) in cases {
        let (status, err, text) = agent.raw(method, &path, body.as_deref());
        assert_eq!(status, 200, "{op}: {err:?} {text}");
        assert_shape(op, &text);
    }
}

#[test]
fn bad_input_gets_app_mesh_error_types_that_name_the_field() {
    let work = Workdir::new("api-errors");
    let agent = Agent::start_secured(&work, None);
    let p = "/v20190125/meshes";

    cli_error(
        &agent.appmesh_err(&["describe-mesh", "--mesh-name", "nope"]),
        "NotFoundException",
        "DescribeMesh",
    );
    let stderr = agent.appmesh_err(&[
        "create-virtual-node",
        "--mesh-name",
        "nope",
        "--virtual-node-name",
        "a",
        "--spec",
        NODE_SPEC,
    ]);
    cli_error(&stderr, "NotFoundException", "CreateVirtualNode");
    assert!(stderr.contains("mesh nope not found"), "{stderr}");

    let (status, kind, body) = agent.raw("PUT", p, Some(r#"{"meshName": "m""#));
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("BadRequestException")),
        "{body}"
    );
    assert!(body.contains("not valid JSON"), "{body}");

    agent.appmesh(&["create-mesh", "--mesh-name", "m"]);
    // SDKs without client-side range checks (the Rust SDK) send port 0 as is; the CLI stops it first.
    let bad_port = r#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"port":0,"protocol":"http"}}],"serviceDiscovery":{"dns":{"hostname":"h"}}}}"#;
    let (status, kind, body) = agent.raw("PUT", &format!("{p}/m/virtualNodes"), Some(bad_port));
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("BadRequestException")),
        "{body}"
    );
    let msg: Value = serde_json::from_str(&body).unwrap();
    assert!(
        msg["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.listeners[0].portMapping.port: 0 is out of range"),
        "{body}"
    );

    let bad_enum = r#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"port":80,"protocol":"udp"}}]}}"#;
    let (status, _, body) = agent.raw("PUT", &format!("{p}/m/virtualNodes"), Some(bad_enum));
    assert_eq!(status, 400);
    assert!(
        body.contains("spec.listeners[0].portMapping.protocol"),
        "{body}"
    );

    let missing = r#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"port":80,"protocol":"http"}}]}}"#;
    let (_, _, body) = agent.raw("PUT", &format!("{p}/m/virtualNodes"), Some(missing));
    assert!(
        body.contains("spec.serviceDiscovery"),
        "a listener needs service discovery: {body}"
    );

    let stderr = agent.appmesh_err(&[
        "create-virtual-service",
        "--mesh-name",
        "m",
        "--virtual-service-name",
        "s",
        "--spec",
        r#"{"provider":{"virtualNode":{"virtualNodeName":"ghost"}}}"#,
    ]);
    cli_error(&stderr, "BadRequestException", "CreateVirtualService");
    assert!(
        stderr.contains("spec.provider.virtualNode.virtualNodeName"),
        "{stderr}"
    );

    cli_error(
        &agent.appmesh_err(&["create-mesh", "--mesh-name", "m"]),
        "ConflictException",
        "CreateMesh",
    );
    // A retry with the same clientToken is the same request, not a conflict.
    let retry = r#"{"meshName":"r","clientToken":"t-1"}"#;
    assert_eq!(agent.raw("PUT", p, Some(retry)).0, 200);
    assert_eq!(agent.raw("PUT", p, Some(retry)).0, 200);
    let (status, kind, _) = agent.raw(
        "PUT",
        p,
        Some(
            r#"{"meshName":"r","clientToken":"t-1","spec":{"egressFilter":{"type":"ALLOW_ALL"}}}"#,
        ),
    );
    assert_eq!((status, kind.as_deref()), (409, Some("ConflictException")));

    let (status, kind, body) = agent.raw("GET", &format!("{p}?limit=0"), None);
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("BadRequestException"))
    );
    assert!(body.contains("limit"), "{body}");
}

#[test]
fn a_rejected_write_changes_nothing_and_committed_state_survives_a_restart() {
    let work = Workdir::new("api-restart");
    let agent = Agent::start_secured(&work, None);
    agent.appmesh(&["create-mesh", "--mesh-name", "m"]);
    let created = agent.appmesh(&[
        "create-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "a",
        "--spec",
        NODE_SPEC,
    ]);
    let bad = r#"{"spec":{"listeners":[{"portMapping":{"port":70000,"protocol":"http"}}],"serviceDiscovery":{"dns":{"hostname":"h"}}}}"#;
    let (status, _, _) = agent.raw("PUT", "/v20190125/meshes/m/virtualNodes/a", Some(bad));
    assert_eq!(status, 400);
    let after = agent.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "a",
    ]);
    assert_eq!(after["virtualNode"]["metadata"]["version"], 1);
    assert_eq!(after["virtualNode"]["spec"], created["virtualNode"]["spec"]);
    let agent = agent.restart(&work);
    let restarted = agent.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "a",
    ]);
    assert_eq!(
        restarted["virtualNode"]["metadata"],
        created["virtualNode"]["metadata"]
    );
}

#[test]
fn lists_paginate_with_limit_and_next_token_and_the_cli_follows_them() {
    let work = Workdir::new("api-pages");
    let agent = Agent::start_secured(&work, None);
    for i in 0..5 {
        agent.appmesh(&["create-mesh", "--mesh-name", &format!("m{i}")]);
    }
    let (status, _, body) = agent.raw("GET", "/v20190125/meshes?limit=2", None);
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["meshes"].as_array().unwrap().len(), 2);
    let token = page["nextToken"]
        .as_str()
        .expect("a next token when more remain")
        .to_string();
    // A mesh created between pages sorts before the boundary and does not shift it.
    agent.appmesh(&["create-mesh", "--mesh-name", "a-late"]);
    let (_, _, body) = agent.raw(
        "GET",
        &format!("/v20190125/meshes?limit=2&nextToken={token}"),
        None,
    );
    let page2: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page2["meshes"][0]["meshName"], "m2");
    // The CLI's own pagination (small pages) collects every mesh exactly once.
    let all = agent.appmesh(&["list-meshes", "--page-size", "2"]);
    let names: Vec<&str> = all["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["meshName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-late", "m0", "m1", "m2", "m3", "m4"]);
    let (status, kind, _) = agent.raw("GET", "/v20190125/meshes?nextToken=zz", None);
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("BadRequestException"))
    );
}

#[test]
fn concurrent_updates_through_the_api_never_lose_one_another() {
    let work = Workdir::new("api-concurrent");
    let agent = Agent::start_secured(&work, None);
    agent.appmesh(&["create-mesh", "--mesh-name", "m"]);
    agent.appmesh(&[
        "create-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "a",
        "--spec",
        "{}",
    ]);
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let (api, mut curl) = (agent.api.clone(), agent.curl());
            std::thread::spawn(move || {
                let body = format!(r#"{{"spec":{{"backends":[{{"virtualService":{{"virtualServiceName":"s{i}.local"}}}}]}}}}"#);
                let out = curl
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H", "content-type: application/json"])
                    .args(["--data-binary", &body, &format!("{api}/v20190125/meshes/m/virtualNodes/a")])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
        })
        .collect();
    for w in writers {
        assert_eq!(w.join().unwrap(), "200");
    }
    let d = agent.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "a",
    ]);
    assert_eq!(
        d["virtualNode"]["metadata"]["version"], 9,
        "1 create + 8 distinct updates, none lost"
    );
}
