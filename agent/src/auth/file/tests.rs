//! The auth file's checks: what a good file yields, and the field and rule a bad one names.

use super::*;

const ALLOW_ALL: &str = r#"{"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}}"#;

fn parse(text: &str) -> Result<AuthFile, String> {
    AuthFile::parse(text.as_bytes(), "auth.json").map_err(|e| e.to_string())
}

#[test]
fn a_good_file_names_keys_and_roles() {
    let f = parse(&format!(
        r#"{{"keys": [{{"accessKeyId": "AKIAEXAMPLEKEY000001", "secretAccessKey": "s3cr3t-s3cr3t-s3cr3t", "policy": {ALLOW_ALL}}}],
            "roles": [{{"arn": "arn:aws:iam::111122223333:role/ci/deployer", "policy": {ALLOW_ALL}}}]}}"#
    ))
    .unwrap();
    assert_eq!(f.summary(), (1, 1, 0));
    assert!(f.key("AKIAEXAMPLEKEY000001").is_some());
    let role = f
        .role_for_caller("arn:aws:sts::111122223333:assumed-role/deployer/run-1")
        .unwrap();
    assert_eq!(role.arn, "arn:aws:iam::111122223333:role/ci/deployer");
    assert!(f.role(&role.arn).is_some());
}

#[test]
fn a_bad_file_names_the_field_and_never_quotes_a_secret() {
    let key = |id: &str, secret: &str| {
        format!(
            r#"{{"keys": [{{"accessKeyId": "{id}", "secretAccessKey": "{secret}", "policy": {ALLOW_ALL}}}]}}"#
        )
    };
    let cases = [
        (key("short", "s3cr3t-s3cr3t-s3cr3t"), "keys[0].accessKeyId: must be 16"),
        (key("ASIAEXAMPLEKEY000001", "s3cr3t-s3cr3t-s3cr3t"), "must not start with ASIA"),
        (key("AKIAEXAMPLEKEY000001", "with space s3cr3t s3cr3t"), "keys[0].secretAccessKey"),
        (r#"{"keys": {}}"#.into(), "keys: must be a list"),
        (r#"{"users": []}"#.into(), "users: is not an auth file member"),
        (
            r#"{"roles": [{"arn": "arn:aws:iam::111122223333:role/x"}]}"#.into(),
            "roles[0].policy: is required",
        ),
        (
            format!(r#"{{"roles": [{{"arn": "arn:aws:iam::1:role/x", "policy": {ALLOW_ALL}}}]}}"#),
            "roles[0].arn: must be an IAM role",
        ),
        (
            r#"{"roles": [{"arn": "arn:aws:iam::111122223333:role/x", "policy": {"Statement": {"Effect": "Allow", "Action": "*"}}}]}"#.into(),
            "roles[0].policy.Statement.Resource: Resource or NotResource is required",
        ),
        ("{".into(), "is not JSON"),
    ];
    for (text, want) in cases {
        let got = parse(&text).unwrap_err();
        assert!(got.contains(want), "{text}: {got:?} lacks {want:?}");
        assert!(!got.contains("s3cr3t"), "a secret in {got:?}");
    }
    let dup = format!(
        r#"{{"keys": [{{"accessKeyId": "AKIAEXAMPLEKEY000001", "secretAccessKey": "s3cr3t-s3cr3t-s3cr3t", "policy": {ALLOW_ALL}}},
                      {{"accessKeyId": "AKIAEXAMPLEKEY000001", "secretAccessKey": "s3cr3t-s3cr3t-s3cr3t", "policy": {ALLOW_ALL}}}]}}"#
    );
    assert!(
        parse(&dup)
            .unwrap_err()
            .contains("keys[1].accessKeyId: duplicates")
    );
    assert!(
        !format!(
            "{:?}",
            parse(&key("AKIAEXAMPLEKEY000001", "s3cr3t-s3cr3t-s3cr3t")).unwrap()
        )
        .contains("s3cr3t")
    );
}

#[test]
fn a_scraper_is_found_by_its_token_digest_and_only_by_it() {
    use sha2::{Digest, Sha256};
    let digest = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
    let f = parse(&format!(
        r#"{{"scrapers": [{{"name": "prometheus", "tokenSha256": "{}"}},
                          {{"name": "grafana-agent", "tokenSha256": "{}", "description": "d"}}]}}"#,
        hex::encode(digest("token-one")),
        hex::encode(digest("token-two"))
    ))
    .unwrap();
    assert_eq!(f.summary(), (0, 0, 2));
    assert_eq!(
        f.scraper(&digest("token-two")).unwrap().name,
        "grafana-agent"
    );
    assert_eq!(f.scraper(&digest("token-one")).unwrap().name, "prometheus");
    assert!(f.scraper(&digest("token-three")).is_none());
}

#[test]
fn a_bad_scraper_names_the_field_and_the_rule() {
    let good = "ab".repeat(32);
    let cases = [
        (format!(r#"{{"scrapers": [{{"name": "p", "tokenSha256": "{}"}}]}}"#, "ab".repeat(31)), "scrapers[0].tokenSha256: must be the SHA-256"),
        (r#"{"scrapers": [{"name": "p", "tokenSha256": "not hex at all, not hex at all, not hex at all, not hex at all!!"}]}"#.into(), "scrapers[0].tokenSha256: must be the SHA-256"),
        (format!(r#"{{"scrapers": [{{"name": "a b", "tokenSha256": "{good}"}}]}}"#), "scrapers[0].name: must be 1 to 64"),
        (format!(r#"{{"scrapers": [{{"tokenSha256": "{good}"}}]}}"#), "scrapers[0].name: is required"),
        (format!(r#"{{"scrapers": [{{"name": "p", "tokenSha256": "{good}", "policy": {{}}}}]}}"#), "scrapers[0].policy: is not a member here"),
        (format!(r#"{{"scrapers": [{{"name": "p", "tokenSha256": "{good}"}}, {{"name": "p", "tokenSha256": "{}"}}]}}"#, "cd".repeat(32)), "scrapers[1].name: duplicates"),
        (format!(r#"{{"scrapers": [{{"name": "p", "tokenSha256": "{good}"}}, {{"name": "q", "tokenSha256": "{good}"}}]}}"#), "scrapers[1].tokenSha256: is the same token"),
        (r#"{"scrapers": {}}"#.into(), "scrapers: must be a list"),
    ];
    for (text, want) in cases {
        let got = parse(&text).unwrap_err();
        assert!(got.contains(want), "{text}: {got:?} lacks {want:?}");
    }
}
