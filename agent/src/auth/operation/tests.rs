use super::*;

const SCOPE: Scope<'static> = Scope {
    partition: "aws",
    region: "us-east-1",
    account: "111122223333",
};

fn arn(path: &str) -> String {
    format!("arn:aws:appmesh:us-east-1:111122223333:{path}")
}

fn op(method: &str, path: &str, query: Option<&str>, body: &str) -> Operation {
    appmesh(method, path, query, body.as_bytes(), &SCOPE)
        .unwrap_or_else(|| panic!("{method} {path}: no operation"))
}

const SHOP_ARN_QUERY: &str =
    "resourceArn=arn%3Aaws%3Aappmesh%3Aus-east-1%3A111122223333%3Amesh%2Fshop";

#[test]
fn every_kind_maps_to_its_action_and_arn() {
    let m = "/v20190125/meshes";
    // (method, path, query, body, operation, resources)
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        &'a str,
        &'a str,
        Vec<String>,
    );
    let cases: Vec<Case<'_>> = vec![
        ("GET", m.into(), None, "", "ListMeshes", vec!["*".into()]),
        (
            "PUT",
            m.into(),
            None,
            r#"{"meshName":"shop"}"#,
            "CreateMesh",
            vec![arn("mesh/shop")],
        ),
        (
            "GET",
            format!("{m}/shop"),
            None,
            "",
            "DescribeMesh",
            vec![arn("mesh/shop")],
        ),
        (
            "PUT",
            format!("{m}/shop"),
            None,
            "{}",
            "UpdateMesh",
            vec![arn("mesh/shop")],
        ),
        (
            "DELETE",
            format!("{m}/shop"),
            None,
            "",
            "DeleteMesh",
            vec![arn("mesh/shop")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualNodes"),
            None,
            "",
            "ListVirtualNodes",
            vec![arn("mesh/shop")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualNodes/web"),
            None,
            "",
            "DescribeVirtualNode",
            vec![arn("mesh/shop/virtualNode/web")],
        ),
        (
            "DELETE",
            format!("{m}/shop/virtualServices/web.local"),
            None,
            "",
            "DeleteVirtualService",
            vec![arn("mesh/shop/virtualService/web.local")],
        ),
        (
            "PUT",
            format!("{m}/shop/virtualRouters"),
            None,
            r#"{"virtualRouterName":"r"}"#,
            "CreateVirtualRouter",
            vec![arn("mesh/shop/virtualRouter/r")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualGateways"),
            None,
            "",
            "ListVirtualGateways",
            vec![arn("mesh/shop")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualRouter/r/routes"),
            None,
            "",
            "ListRoutes",
            vec![arn("mesh/shop/virtualRouter/r")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualRouter/r/routes/a"),
            None,
            "",
            "DescribeRoute",
            vec![arn("mesh/shop/virtualRouter/r/route/a")],
        ),
        (
            "GET",
            format!("{m}/shop/virtualGateway/g/gatewayRoutes"),
            None,
            "",
            "ListGatewayRoutes",
            vec![arn("mesh/shop/virtualGateway/g")],
        ),
        (
            "DELETE",
            format!("{m}/shop/virtualGateway/g/gatewayRoutes/x"),
            None,
            "",
            "DeleteGatewayRoute",
            vec![arn("mesh/shop/virtualGateway/g/gatewayRoute/x")],
        ),
        (
            "GET",
            "/v20190125/tags".into(),
            Some(SHOP_ARN_QUERY),
            "",
            "ListTagsForResource",
            vec![arn("mesh/shop")],
        ),
        (
            "PUT",
            "/v20190125/tag".into(),
            Some(SHOP_ARN_QUERY),
            "{}",
            "TagResource",
            vec![arn("mesh/shop")],
        ),
        (
            "PUT",
            "/v20190125/untag".into(),
            Some(SHOP_ARN_QUERY),
            "{}",
            "UntagResource",
            vec![arn("mesh/shop")],
        ),
    ];
    for (method, path, query, body, name, resources) in cases {
        let o = op(method, &path, query, body);
        assert_eq!(
            (o.name, &o.resources),
            (name, &resources),
            "{method} {path}"
        );
        assert_eq!(o.action, format!("appmesh:{name}"));
        assert_eq!(
            o.mutating,
            !(name.starts_with("List") || name.starts_with("Describe"))
        );
    }
    assert_eq!(appmesh("POST", m, None, b"", &SCOPE), None);
    assert_eq!(
        appmesh("GET", "/v20190125/meshes/m/widgets", None, b"", &SCOPE),
        None
    );
    assert_eq!(appmesh("GET", "/healthz", None, b"", &SCOPE), None);
    let t = |path, query, body: &str| trellis(path, query, body.as_bytes(), &SCOPE).unwrap();
    assert_eq!(t("/metrics", None, "").action, "trellis:ReadMetrics");
    assert_eq!(
        t("/trellis/v1/load", None, "").action,
        "trellis:ReadMetrics"
    );
    assert_eq!(t("/debug/xds", None, "").action, "trellis:ReadDebug");
    let topology = t("/trellis/v1/topology", Some("mesh=shop"), "");
    assert_eq!(topology.action, "trellis:ReadTopology");
    assert_eq!(topology.resources, vec![arn("mesh/shop")]);
    let explain = t(
        "/trellis/v1/explain",
        None,
        r#"{"meshName":"shop","virtualNodeName":"web","url":"http://a/"}"#,
    );
    assert_eq!(explain.action, "trellis:Explain");
    assert_eq!(explain.resources, vec![arn("mesh/shop/virtualNode/web")]);
    let gw = t(
        "/trellis/v1/explain",
        None,
        r#"{"meshName":"shop","virtualGatewayName":"in","url":"http://a/"}"#,
    );
    assert_eq!(gw.resources, vec![arn("mesh/shop/virtualGateway/in")]);
    assert!(!explain.mutating && !topology.mutating);
    assert_eq!(trellis("/ui", None, b"", &SCOPE), None);
}

#[test]
fn writes_also_need_the_action_on_what_they_reference() {
    let node = op(
        "PUT",
        "/v20190125/meshes/shop/virtualNodes",
        None,
        r#"{"virtualNodeName":"web","spec":{"backends":[
            {"virtualService":{"virtualServiceName":"db.local"}},
            {"virtualService":{"virtualServiceName":"db.local"}}]}}"#,
    );
    assert_eq!(node.name, "CreateVirtualNode");
    assert_eq!(
        node.resources,
        vec![
            arn("mesh/shop/virtualNode/web"),
            arn("mesh/shop/virtualService/db.local")
        ]
    );
    let route = op(
        "PUT",
        "/v20190125/meshes/shop/virtualRouter/r/routes/a",
        None,
        r#"{"spec":{"httpRoute":{"action":{"weightedTargets":[
            {"virtualNode":"v1","weight":1},{"virtualNode":"v2","weight":1}]}}}}"#,
    );
    assert_eq!(route.name, "UpdateRoute");
    assert_eq!(
        route.resources,
        vec![
            arn("mesh/shop/virtualRouter/r/route/a"),
            arn("mesh/shop/virtualNode/v1"),
            arn("mesh/shop/virtualNode/v2")
        ]
    );
    let service = op(
        "PUT",
        "/v20190125/meshes/shop/virtualServices",
        None,
        r#"{"virtualServiceName":"web.local","spec":{"provider":{"virtualRouter":{"virtualRouterName":"r"}}}}"#,
    );
    assert_eq!(
        service.resources,
        vec![
            arn("mesh/shop/virtualService/web.local"),
            arn("mesh/shop/virtualRouter/r")
        ]
    );
    let gateway_route = op(
        "PUT",
        "/v20190125/meshes/shop/virtualGateway/g/gatewayRoutes",
        None,
        r#"{"gatewayRouteName":"x","spec":{"grpcRoute":{"action":{"target":{"virtualService":{"virtualServiceName":"web.local"}}}}}}"#,
    );
    assert_eq!(gateway_route.name, "CreateGatewayRoute");
    assert_eq!(
        gateway_route.resources,
        vec![
            arn("mesh/shop/virtualGateway/g/gatewayRoute/x"),
            arn("mesh/shop/virtualService/web.local")
        ]
    );
}

#[test]
fn shared_meshes_and_encoded_names_land_in_the_arn() {
    let o = op(
        "GET",
        "/v20190125/meshes/my%20mesh/virtualNodes/a%2Fb",
        Some("meshOwner=444455556666"),
        "",
    );
    assert_eq!(
        o.resources,
        vec!["arn:aws:appmesh:us-east-1:444455556666:mesh/my mesh/virtualNode/a/b".to_string()]
    );
}
