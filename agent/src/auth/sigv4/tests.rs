//! The verifier against AWS's published example and against the Rust SDK's own signer
//! (`aws-sigv4`) over the request shapes of AWS's signing test suite: dot segments, doubled
//! slashes, spaces and UTF-8 in paths, query order and encoding, repeated and padded headers,
//! session tokens, bodies, and the presigned form.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2015-08-30T12:36:00Z, the time of AWS's examples.
const EXAMPLE_TIME: u64 = 1_440_938_160;

/// A request signed by the SDK's signer, as (method, path, query, headers, body).
struct Signed {
    method: &'static str,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Signed {
    fn request(&self) -> Request<'_> {
        Request {
            method: self.method,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            authority: None,
            body: &self.body,
        }
    }
}

fn sdk_sign(
    method: &'static str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    token: Option<&str>,
    presign: bool,
    time: SystemTime,
) -> Signed {
    let identity = Credentials::new(
        "AKIDEXAMPLE",
        SECRET,
        token.map(str::to_string),
        None,
        "test",
    )
    .into();
    let mut settings = SigningSettings::default();
    if presign {
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(Duration::from_secs(900));
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("appmesh")
        .time(time)
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let mut all: Vec<(&str, &str)> = vec![("host", "trellis.example:9443")];
    all.extend_from_slice(headers);
    let signable =
        SignableRequest::new(method, uri, all.iter().copied(), SignableBody::Bytes(body)).unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in &all {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).unwrap();
    instructions.apply_to_request_http1x(&mut req);
    Signed {
        method,
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        headers: req.headers().clone(),
        body: body.to_vec(),
    }
}

fn check(s: &Signed, now: SystemTime, secret: &str) -> Result<Claim, Refusal> {
    let claim = parse(&s.request(), "us-east-1", now)?;
    verify(&s.request(), &claim, secret)?;
    Ok(claim)
}

#[test]
fn aws_published_example_get_vanilla() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("example.amazonaws.com"));
    headers.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
    headers.insert(
        "authorization",
        HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
    );
    let req = Request {
        method: "GET",
        path: "/",
        query: None,
        headers: &headers,
        authority: None,
        body: b"",
    };
    let auth = headers["authorization"].to_str().unwrap();
    let c = parse_header(&req, auth).unwrap();
    assert_eq!(c.time, EXAMPLE_TIME);
    verify(&req, &c, SECRET).unwrap();
    assert!(matches!(
        verify(&req, &c, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEX"),
        Err(Refusal::InvalidSignature(_))
    ));
}

#[test]
fn every_shape_the_sdk_signs_verifies_and_any_change_breaks_it() {
    let now = SystemTime::now();
    let json = br#"{"spec":{"listeners":[]}}"#.as_slice();
    // (method, URI, headers, body)
    type Shape<'a> = (&'static str, &'a str, Vec<(&'a str, &'a str)>, &'a [u8]);
    let shapes: Vec<Shape<'_>> = vec![
        ("GET", "/v20190125/meshes", vec![], b""),
        (
            "GET",
            "/v20190125/meshes?limit=5&nextToken=a%2Fb%3D%3D",
            vec![],
            b"",
        ),
        (
            "GET",
            "/?Param2=value2&Param1=value1&param1=value0",
            vec![],
            b"",
        ),
        ("GET", "/?a=b%20c&x=%E1%88%B4&empty=", vec![], b""),
        ("GET", "/example/../v20190125/./meshes//m", vec![], b""),
        ("GET", "/example%20space/%E1%88%B4/", vec![], b""),
        ("GET", "/-._~0-9A-Za-z", vec![], b""),
        (
            "GET",
            "/v20190125/tags?resourceArn=arn%3Aaws%3Aappmesh%3Aus-east-1%3A000000000000%3Amesh%2Fm",
            vec![],
            b"",
        ),
        (
            "PUT",
            "/v20190125/meshes/m/virtualNodes/n?meshOwner=000000000000",
            vec![("content-type", "application/json")],
            json,
        ),
        (
            "POST",
            "/",
            vec![
                ("my-header1", "  value1   with  spaces "),
                ("x-custom", "a"),
            ],
            b"Param1=value1",
        ),
        ("DELETE", "/v20190125/meshes/m", vec![], b""),
    ];
    for (method, uri, headers, body) in shapes {
        for token in [None, Some("session-token/with+chars==")] {
            for presign in [false, true] {
                let s = sdk_sign(method, uri, &headers, body, token, presign, now);
                let what = format!("{method} {uri} token={token:?} presign={presign}");
                let c = check(&s, now, SECRET).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                assert_eq!(c.security_token.as_deref(), token, "{what}");
                assert_eq!(c.presigned_expires.is_some(), presign, "{what}");
                // Wrong secret, changed body, changed path, changed query: all refused.
                assert!(check(&s, now, "not-the-secret").is_err(), "{what}");
                let mut t = Signed {
                    body: b"{}x".to_vec(),
                    ..s.clone()
                };
                if !body.is_empty() || !presign {
                    assert!(check(&t, now, SECRET).is_err(), "{what}: body changed");
                }
                t = Signed {
                    path: format!("{}x", s.path),
                    body: s.body.clone(),
                    ..s.clone()
                };
                assert!(check(&t, now, SECRET).is_err(), "{what}: path changed");
                t = Signed {
                    query: Some(format!("{}&extra=1", s.query.clone().unwrap_or_default())),
                    ..s.clone()
                };
                assert!(check(&t, now, SECRET).is_err(), "{what}: query changed");
            }
        }
    }
}

impl Clone for Signed {
    fn clone(&self) -> Self {
        Signed {
            method: self.method,
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }
}

#[test]
fn repeated_signed_headers_are_joined_in_order() {
    let now = SystemTime::now();
    let s = sdk_sign(
        "GET",
        "/",
        &[
            ("my-header1", "value4"),
            ("my-header1", "value1"),
            ("my-header1", "value3"),
        ],
        b"",
        None,
        false,
        now,
    );
    check(&s, now, SECRET).unwrap();
    let mut reordered = s.clone();
    reordered.headers.remove("my-header1");
    for v in ["value1", "value4", "value3"] {
        reordered.headers.append(
            HeaderName::from_static("my-header1"),
            HeaderValue::from_static(v),
        );
    }
    assert!(check(&reordered, now, SECRET).is_err());
}

#[test]
fn signing_time_must_be_within_fifteen_minutes_and_scope_must_match() {
    let signed_at = SystemTime::now() - Duration::from_secs(16 * 60);
    let s = sdk_sign("GET", "/v20190125/meshes", &[], b"", None, false, signed_at);
    match parse(&s.request(), "us-east-1", SystemTime::now()) {
        Err(Refusal::InvalidSignature(m)) => {
            assert!(m.starts_with("Signature expired: "), "{m}");
            assert!(m.ends_with(" - 15 min.)"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 14 minutes either way is fine; 16 ahead is not.
    let now = SystemTime::now();
    let offset = Duration::from_secs(14 * 60);
    let early = sdk_sign("GET", "/", &[], b"", None, false, now - offset);
    check(&early, now, SECRET).unwrap();
    let late = sdk_sign("GET", "/", &[], b"", None, false, now + offset);
    check(&late, now, SECRET).unwrap();
    let future = sdk_sign(
        "GET",
        "/",
        &[],
        b"",
        None,
        false,
        now + Duration::from_secs(16 * 60),
    );
    assert!(matches!(
        parse(&future.request(), "us-east-1", now),
        Err(Refusal::InvalidSignature(m)) if m.starts_with("Signature not yet current")
    ));
    // A presigned URL lives for its X-Amz-Expires (900 s here), not for 15 minutes.
    let url = sdk_sign(
        "GET",
        "/",
        &[],
        b"",
        None,
        true,
        now - Duration::from_secs(800),
    );
    check(&url, now, SECRET).unwrap();
    let url = sdk_sign(
        "GET",
        "/",
        &[],
        b"",
        None,
        true,
        now - Duration::from_secs(1000),
    );
    assert!(parse(&url.request(), "us-east-1", now).is_err());
    // Another region's scope.
    let s = sdk_sign("GET", "/", &[], b"", None, false, now);
    assert!(matches!(
        parse(&s.request(), "us-west-2", now),
        Err(Refusal::InvalidSignature(m)) if m.contains("scoped to a valid region, not 'us-east-1'")
    ));
}

#[test]
fn malformed_and_missing_signatures_are_told_apart() {
    let now = SystemTime::now();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("h"));
    let req = |h: &HeaderMap| {
        parse(
            &Request {
                method: "GET",
                path: "/",
                query: None,
                headers: h,
                authority: None,
                body: b"",
            },
            "us-east-1",
            now,
        )
    };
    assert!(matches!(req(&headers), Err(Refusal::MissingToken)));
    headers.insert(
        "authorization",
        HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/appmesh/aws4_request",
        ),
    );
    assert!(
        matches!(req(&headers), Err(Refusal::Incomplete(m)) if m.contains("'Signature'") && m.contains("'SignedHeaders'"))
    );
    headers.insert("authorization", HeaderValue::from_static("Bearer x"));
    assert!(
        matches!(req(&headers), Err(Refusal::Incomplete(m)) if m.contains("unsupported signing algorithm"))
    );
    let s = sdk_sign("GET", "/", &[], b"", None, false, now);
    let mut other_service = s.clone();
    let auth = s.headers["authorization"]
        .to_str()
        .unwrap()
        .replace("/appmesh/", "/sts/");
    other_service
        .headers
        .insert("authorization", HeaderValue::from_str(&auth).unwrap());
    assert!(matches!(
        parse(&other_service.request(), "us-east-1", now),
        Err(Refusal::InvalidSignature(m)) if m.contains("correct service: 'appmesh'")
    ));
}

#[test]
fn dates_round_trip() {
    assert_eq!(parse_amz_date("20150830T123600Z"), Some(EXAMPLE_TIME));
    assert_eq!(format_amz_date(EXAMPLE_TIME), "20150830T123600Z");
    assert_eq!(iso8601(EXAMPLE_TIME), "2015-08-30T12:36:00Z");
    for bad in [
        "2015-08-30T12:36:00Z",
        "20150830T123600",
        "20151330T123600Z",
        "2015083XT123600Z",
    ] {
        assert_eq!(parse_amz_date(bad), None, "{bad}");
    }
    assert_eq!(at(0), UNIX_EPOCH);
}
