use serde_json::json;
use trellis_model::testing::mesh_state;

use super::{ExplainBody, PAGE, content_security_policy, topology};
use crate::lrs::{EdgeKey, EdgeView, LoadView};

#[test]
fn the_page_loads_nothing_from_elsewhere_and_its_policy_pins_its_own_script_and_style() {
    for outside in ["src=\"http", "href=\"http", "@import", "url(http", "//cdn"] {
        assert!(
            !PAGE.contains(outside),
            "the page must embed everything: {outside}"
        );
    }
    let csp = content_security_policy(PAGE);
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("'sha256-'"), "both hashes found: {csp}");
    assert!(csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"));
    // Changing the script changes its hash: an injected script would not run.
    let other = content_security_policy(&PAGE.replacen("<script>", "<script>let x=1;", 1));
    assert_ne!(csp, other);
}

#[test]
fn an_explain_body_names_exactly_one_proxy_and_a_valid_request() {
    let body = |v: serde_json::Value| serde_json::from_value::<ExplainBody>(v).unwrap();
    let both = body(
        json!({"meshName": "m", "virtualNodeName": "a", "virtualGatewayName": "g",
                           "url": "http://x/"}),
    );
    assert!(
        both.proxy()
            .unwrap_err()
            .to_string()
            .contains("give exactly one")
    );
    let gw_inbound = body(
        json!({"meshName": "m", "virtualGatewayName": "g", "url": "http://x/",
                                 "inbound": true}),
    );
    assert!(
        gw_inbound
            .proxy()
            .unwrap_err()
            .to_string()
            .contains("inbound")
    );
    let bad_url = body(json!({"meshName": "m", "virtualNodeName": "a", "url": "ftp://x/"}));
    assert!(
        bad_url
            .request()
            .unwrap_err()
            .to_string()
            .starts_with("url: ")
    );
    let bad_header = body(
        json!({"meshName": "m", "virtualNodeName": "a", "url": "http://x/",
                                 "headers": ["no colon"]}),
    );
    assert!(
        bad_header
            .request()
            .unwrap_err()
            .to_string()
            .starts_with("headers: ")
    );
}

#[test]
fn the_topology_carries_each_load_edge_on_the_links_it_crosses() {
    let node = json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                      "serviceDiscovery": {"dns": {"hostname": "back.test"}}});
    let state = mesh_state(
        json!({}),
        &[
            ("back", node),
            (
                "front",
                json!({"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}),
            ),
        ],
        &[("back.local", "back")],
    );
    let edge = EdgeView {
        key: EdgeKey {
            mesh: "m".into(),
            caller: "virtualNode/front".into(),
            service: "back.local".into(),
            target: "back".into(),
        },
        requests: 40,
        success: 38,
        errors: 2,
        dropped: 0,
        in_progress: 0,
        rps: 4.0,
        errors_per_second: 0.2,
    };
    let load = LoadView {
        interval_ms: 1000,
        edges: vec![edge],
        inbound: vec![],
    };
    let t = topology::build(&state, "m", &load).unwrap();
    let ids: Vec<&str> = t.vertices.iter().map(|v| v.id.as_str()).collect();
    for id in [
        "virtualNode/back",
        "virtualNode/front",
        "virtualService/back.local",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    let link = |from: &str, to: &str| {
        t.links
            .iter()
            .find(|l| l.from == from && l.to == to)
            .unwrap_or_else(|| panic!("{from} → {to} in {:?}", t.links))
    };
    let backend = link("virtualNode/front", "virtualService/back.local");
    assert_eq!(
        (backend.rps, backend.requests, backend.errors),
        (4.0, 40, 2)
    );
    let provider = link("virtualService/back.local", "virtualNode/back");
    assert_eq!(provider.rps, 4.0);
    assert!(topology::build(&state, "nope", &load).is_none());
}
