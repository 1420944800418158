use serde_json::json;

use super::*;

const MESH: &str = "arn:aws:appmesh:us-east-1:111122223333:mesh/shop";
const NODE: &str = "arn:aws:appmesh:us-east-1:111122223333:mesh/shop/virtualNode/web";
const OTHER_NODE: &str = "arn:aws:appmesh:us-east-1:111122223333:mesh/lab/virtualNode/web";

fn policy(doc: serde_json::Value) -> Policy {
    Policy::parse(&doc, "policy").unwrap()
}

fn refused(doc: serde_json::Value) -> String {
    Policy::parse(&doc, "keys[0].policy")
        .unwrap_err()
        .to_string()
}

#[test]
fn wildcards_match_as_in_iam() {
    assert!(wildcard_match(
        "appmesh:Describe*",
        "appmesh:DescribeMesh",
        true
    ));
    assert!(wildcard_match(
        "APPMESH:describe*",
        "appmesh:DescribeMesh",
        true
    ));
    assert!(!wildcard_match(
        "appmesh:Describe*",
        "appmesh:ListMeshes",
        true
    ));
    assert!(wildcard_match("*", "", false));
    assert!(wildcard_match("a*b*c", "axxbyyc", false));
    assert!(!wildcard_match("a*b*c", "axxbyy", false));
    assert!(wildcard_match("mesh/?hop", "mesh/shop", false));
    assert!(!wildcard_match("mesh/?hop", "mesh/hop", false));
    // `*` spans `/` and `:`, and resources are case-sensitive.
    assert!(wildcard_match(
        "arn:aws:appmesh:*:111122223333:mesh/shop/*",
        NODE,
        false
    ));
    assert!(!wildcard_match(
        "arn:aws:appmesh:*:111122223333:mesh/Shop/*",
        NODE,
        false
    ));
    assert!(wildcard_match("a**", "a", false));
    assert!(wildcard_match("*x*x*", "axbxc", false));
}

#[test]
fn read_only_allows_reads_and_nothing_else() {
    let p = policy(json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["appmesh:Describe*", "appmesh:List*"], "Resource": "*"}]}));
    assert_eq!(
        p.evaluate("appmesh:DescribeVirtualNode", NODE),
        Decision::Allow
    );
    assert_eq!(p.evaluate("appmesh:ListMeshes", "*"), Decision::Allow);
    assert_eq!(
        p.evaluate("appmesh:CreateVirtualNode", NODE),
        Decision::ImplicitDeny
    );
}

#[test]
fn one_mesh_only() {
    let p = policy(
        json!({"Statement": {"Effect": "Allow", "Action": "appmesh:*",
        "Resource": [MESH, format!("{MESH}/*")]}}),
    );
    assert!(p.evaluate("appmesh:UpdateVirtualNode", NODE).is_allowed());
    assert!(p.evaluate("appmesh:DescribeMesh", MESH).is_allowed());
    assert!(
        !p.evaluate("appmesh:UpdateVirtualNode", OTHER_NODE)
            .is_allowed()
    );
    assert!(!p.evaluate("appmesh:ListMeshes", "*").is_allowed());
}

#[test]
fn an_explicit_deny_wins_over_any_allow() {
    let p = policy(json!({"Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "appmesh:Delete*", "Resource": format!("{MESH}*")}]}));
    assert_eq!(
        p.evaluate("appmesh:DeleteVirtualNode", NODE),
        Decision::ExplicitDeny
    );
    assert_eq!(
        p.evaluate("appmesh:DeleteMesh", MESH),
        Decision::ExplicitDeny
    );
    assert_eq!(
        p.evaluate("appmesh:DeleteVirtualNode", OTHER_NODE),
        Decision::Allow
    );
    // Across documents too.
    let allow = policy(json!({"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}}));
    let deny = policy(
        json!({"Statement": {"Effect": "Deny", "Action": "appmesh:CreateMesh", "Resource": "*"}}),
    );
    assert_eq!(
        evaluate_all([&allow, &deny], "appmesh:CreateMesh", MESH),
        Decision::ExplicitDeny
    );
    assert_eq!(
        evaluate_all([&allow, &deny], "appmesh:DescribeMesh", MESH),
        Decision::Allow
    );
    assert_eq!(
        evaluate_all(std::iter::empty(), "appmesh:DescribeMesh", MESH),
        Decision::ImplicitDeny
    );
}

#[test]
fn not_action_and_not_resource_invert_the_match() {
    let p = policy(json!({"Statement": [
        {"Effect": "Allow", "NotAction": "appmesh:Delete*", "NotResource": format!("{MESH}/*")}]}));
    assert!(
        p.evaluate("appmesh:UpdateVirtualNode", OTHER_NODE)
            .is_allowed()
    );
    assert!(!p.evaluate("appmesh:UpdateVirtualNode", NODE).is_allowed());
    assert!(
        !p.evaluate("appmesh:DeleteVirtualNode", OTHER_NODE)
            .is_allowed()
    );
}

#[test]
fn bad_documents_are_refused_naming_the_field_and_the_rule() {
    let cases = [
        (json!([]), "keys[0].policy: must be a policy document"),
        (
            json!({"Statement": []}),
            "keys[0].policy.Statement: must hold",
        ),
        (
            json!({"Version": "2020-01-01", "Statement": []}),
            "keys[0].policy.Version",
        ),
        (
            json!({"Statment": []}),
            "keys[0].policy.Statment: is not a policy element",
        ),
        (
            json!({"Statement": [{"Effect": "allow", "Action": "*", "Resource": "*"}]}),
            "keys[0].policy.Statement[0].Effect: must be Allow or Deny",
        ),
        (
            json!({"Statement": [{"Action": "*", "Resource": "*"}]}),
            "keys[0].policy.Statement[0].Effect: is required",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Resource": "*"}]}),
            "keys[0].policy.Statement[0].Action: Action or NotAction is required",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "*", "NotAction": "*", "Resource": "*"}]}),
            "keys[0].policy.Statement[0].NotAction: only one",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": ["appmesh:DescribeMesh", "appmesh:DescribeVirtualNodes"], "Resource": "*"}]}),
            "keys[0].policy.Statement[0].Action[1]: \"appmesh:DescribeVirtualNodes\" is not an action",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "appmesh:Descirbe*", "Resource": "*"}]}),
            "matches no action",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "DescribeMesh", "Resource": "*"}]}),
            "must be service:Action",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "mesh/shop"}]}),
            "keys[0].policy.Statement[0].Resource: \"mesh/shop\" must be * or an ARN",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {}}]}),
            "keys[0].policy.Statement[0].Condition: conditions are not supported",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Principal": "*"}]}),
            "keys[0].policy.Statement[0].Principal",
        ),
        (
            json!({"Statement": [{"Effect": "Deny", "Action": "*", "Resource": "arn:aws:appmesh:*:*:mesh/${aws:username}"}]}),
            "policy variables",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": [], "Resource": "*"}]}),
            "keys[0].policy.Statement[0].Action: must be a string or a non-empty list",
        ),
    ];
    for (doc, want) in cases {
        let got = refused(doc.clone());
        assert!(got.contains(want), "{doc}: {got:?} lacks {want:?}");
    }
    // Actions of other services are accepted (a shared IAM document) and never match ours.
    let p = policy(
        json!({"Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}}),
    );
    assert!(!p.evaluate("appmesh:DescribeMesh", MESH).is_allowed());
}
