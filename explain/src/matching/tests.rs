//! Envoy's matcher semantics, case by case.

use super::*;
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::RegexMatcher;
use trellis_envoy_api::pb::envoy::r#type::v3::Int64Range;

fn hm(
    name: &str,
    spec: Option<header_matcher::HeaderMatchSpecifier>,
    invert: bool,
) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        invert_match: invert,
        header_match_specifier: spec,
        ..Default::default()
    }
}

fn exact(v: &str) -> Option<header_matcher::HeaderMatchSpecifier> {
    Some(header_matcher::HeaderMatchSpecifier::StringMatch(
        StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(v.into())),
            ..Default::default()
        },
    ))
}

#[test]
fn headers_follow_envoys_rules_for_missing_inverted_and_repeated_headers() {
    use header_matcher::HeaderMatchSpecifier as S;
    let h = Headers(vec![
        ("x-a".into(), "1".into()),
        ("x-r".into(), "a".into()),
        ("x-r".into(), "b".into()),
    ]);
    assert!(header(&hm("x-a", exact("1"), false), &h).is_ok());
    assert!(header(&hm("x-a", exact("2"), false), &h).is_err());
    // Inverted: holds when the value differs, and never when the header is missing.
    assert!(header(&hm("x-a", exact("2"), true), &h).is_ok());
    assert!(header(&hm("x-missing", exact("2"), true), &h).is_err());
    // Presence.
    assert!(header(&hm("x-a", None, false), &h).is_ok());
    assert!(header(&hm("x-missing", Some(S::PresentMatch(false)), false), &h).is_ok());
    assert!(header(&hm("x-missing", Some(S::PresentMatch(true)), true), &h).is_ok());
    assert!(header(&hm("x-a", Some(S::PresentMatch(true)), true), &h).is_err());
    // Repeated headers are joined with commas.
    assert!(header(&hm("x-r", exact("a,b"), false), &h).is_ok());
    // Range: half open, integers only.
    let range = |s, e| Some(S::RangeMatch(Int64Range { start: s, end: e }));
    assert!(header(&hm("x-a", range(1, 2), false), &h).is_ok());
    assert!(header(&hm("x-a", range(0, 1), false), &h).is_err());
    assert!(header(&hm("x-r", range(0, 9), false), &h).is_err());
    // A regex must match the whole value.
    let re = |r: &str| {
        Some(S::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: r.into(),
                ..Default::default()
            })),
            ..Default::default()
        }))
    };
    assert!(header(&hm("x-r", re("a,.*"), false), &h).is_ok());
    assert!(header(&hm("x-r", re("a"), false), &h).is_err());
    // Missing, but treated as empty.
    let mut empty = hm("x-missing", exact(""), false);
    empty.treat_missing_header_as_empty = true;
    assert!(header(&empty, &h).is_ok());
}

#[test]
fn paths_match_without_the_query_and_virtual_hosts_by_specificity() {
    use route_match::PathSpecifier as P;
    assert!(path(Some(&P::Prefix("/a".into())), true, "/ab?x=1").is_ok());
    assert!(path(Some(&P::Prefix("/A".into())), true, "/ab").is_err());
    assert!(path(Some(&P::Prefix("/A".into())), false, "/ab").is_ok());
    assert!(path(Some(&P::Path("/a".into())), true, "/a?q").is_ok());
    assert!(path(Some(&P::Path("/a".into())), true, "/a/").is_err());
    assert!(path(Some(&P::PathSeparatedPrefix("/a".into())), true, "/a/b").is_ok());
    assert!(path(Some(&P::PathSeparatedPrefix("/a".into())), true, "/ab").is_err());
    assert_eq!(domain("a.local", "a.local"), Some(DomainMatch::Exact));
    assert_eq!(domain("A.local:80", "a.local:80"), Some(DomainMatch::Exact));
    assert_eq!(
        domain("*.local", ".local"),
        None,
        "a wildcard never matches empty"
    );
    assert!(domain("*.local", "x.local") < domain("*", "x.local"));
    assert!(domain("*.b.local", "a.b.local") < domain("*.local", "a.b.local"));
    assert!(domain("*.local", "a.local") < domain("a.*", "a.local"));
}

#[test]
fn normalization_resolves_dots_decodes_unreserved_and_merges_slashes() {
    assert_eq!(normalize("/a/./b/../c?x=/../"), "/a/c?x=/../");
    assert_eq!(normalize("/../../a"), "/a");
    assert_eq!(normalize("/a/%41%2fb"), "/a/A%2fb");
    assert_eq!(normalize("/a\\b"), "/a/b");
    assert_eq!(normalize("/a/b/.."), "/a/");
    assert_eq!(merge_slashes("//a///b?c=//"), "/a/b?c=//");
    assert_eq!(
        query_params("/p?a=1&b=x%20y&a=2&c"),
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "x y".into()),
            ("a".into(), "2".into()),
            ("c".into(), String::new())
        ]
    );
}

#[test]
fn cidr_ranges_hold_addresses_by_prefix() {
    let r = |a: &str, l: u32| CidrRange {
        address_prefix: a.into(),
        prefix_len: Some(trellis_envoy_api::pb::google::protobuf::UInt32Value { value: l }),
    };
    let ip = |s: &str| s.parse().unwrap();
    assert_eq!(cidr(&r("10.0.0.5", 32), ip("10.0.0.5")), Some(32));
    assert_eq!(cidr(&r("10.0.0.0", 8), ip("10.9.9.9")), Some(8));
    assert_eq!(cidr(&r("10.0.0.0", 8), ip("11.0.0.1")), None);
    assert_eq!(cidr(&r("fd00::1", 128), ip("fd00::1")), Some(128));
    assert_eq!(cidr(&r("fd00::1", 128), ip("10.0.0.1")), None);
}
