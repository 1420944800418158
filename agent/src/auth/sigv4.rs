//! AWS Signature Version 4 verification, as the AWS CLI (botocore), boto3 and the Rust SDK sign:
//! the `Authorization` header form and the presigned query form, the canonical request (double
//! percent-encoded, dot-segment-normalised path; sorted, re-encoded query; trimmed signed
//! headers; the payload's SHA-256), the credential scope (date, region, service `appmesh`) and a
//! signing time within 15 minutes of ours.
//!
//! HMAC-SHA256 and SHA-256 come from the `hmac`/`sha2` crates, and the signature is compared in
//! constant time (`subtle`). Nothing here logs; errors never carry a signature, a secret or a
//! session token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Refusal;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const SERVICE: &str = "appmesh";
/// How far a signing time may be from ours (AWS's window).
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);
/// The longest a presigned URL may be valid (AWS's limit: a week).
pub const MAX_PRESIGNED_EXPIRES: u64 = 7 * 24 * 3600;
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The parts of an HTTP request a signature covers, as received.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The raw (percent-encoded) path.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The URI's authority (HTTP/2 requests carry no `Host` header).
    pub authority: Option<&'a str>,
    pub body: &'a [u8],
}

/// What a request claims: who signed it, when, for which scope, over which headers.
#[derive(Debug, Clone)]
pub struct Claim {
    pub access_key_id: String,
    /// `YYYYMMDD` of the credential scope.
    pub scope_date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    signature: Vec<u8>,
    /// The signing time as sent (`YYYYMMDDTHHMMSSZ`) and in seconds since the epoch.
    pub timestamp: String,
    pub time: u64,
    pub security_token: Option<String>,
    /// Seconds a presigned URL is valid for; `None` for the `Authorization` header form.
    pub presigned_expires: Option<u64>,
}

impl Request<'_> {
    /// Whether the request carries any SigV4 material at all.
    pub fn is_signed(&self) -> bool {
        self.headers.contains_key(http::header::AUTHORIZATION)
            || self
                .query_pairs()
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(b"X-Amz-Algorithm"))
    }

    /// The query's pairs, percent-decoded (bytes: a value need not be UTF-8).
    fn query_pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect()
    }

    fn query_value(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
    }
}

/// Reads the signature's claim and checks what needs no secret: the form, the scope (`region`,
/// service `appmesh`) and the time (`now`).
pub fn parse(req: &Request<'_>, region: &str, now: SystemTime) -> Result<Claim, Refusal> {
    let claim = read(req)?;
    check(&claim, region, now)?;
    Ok(claim)
}

/// The scope and time checks of [`parse`], for a claim already read.
pub fn check(claim: &Claim, region: &str, now: SystemTime) -> Result<(), Refusal> {
    check_scope(claim, region)?;
    check_time(claim, now)
}

/// Reads what the request claims (header or presigned form), checking only its shape.
pub fn read(req: &Request<'_>) -> Result<Claim, Refusal> {
    if let Some(h) = req.headers.get(http::header::AUTHORIZATION) {
        let h = h
            .to_str()
            .map_err(|_| Refusal::Incomplete("the Authorization header is not ASCII".into()))?;
        parse_header(req, h)
    } else if req.query_value("X-Amz-Algorithm").is_some() {
        parse_presigned(req)
    } else {
        Err(Refusal::MissingToken)
    }
}

fn parse_header(req: &Request<'_>, header: &str) -> Result<Claim, Refusal> {
    let (algorithm, params) = header.split_once(' ').unwrap_or((header, ""));
    if algorithm != ALGORITHM {
        return Err(Refusal::Incomplete(format!(
            "unsupported signing algorithm {algorithm:?}: only {ALGORITHM} (SigV4) is accepted"
        )));
    }
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in params.split(',') {
        let part = part.trim();
        match part.split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let missing: Vec<&str> = [
        ("Credential", credential.is_none()),
        ("Signature", signature.is_none()),
        ("SignedHeaders", signed.is_none()),
    ]
    .into_iter()
    .filter(|(_, absent)| *absent)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(Refusal::Incomplete(
            missing
                .iter()
                .map(|m| format!("Authorization header requires '{m}' parameter."))
                .collect::<Vec<_>>()
                .join(" "),
        ));
    }
    let timestamp = req
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Refusal::Incomplete(
                "Authorization header requires existence of a 'X-Amz-Date' header.".into(),
            )
        })?;
    let token = req
        .headers
        .get("x-amz-security-token")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| Refusal::UnrecognizedClient)
        })
        .transpose()?;
    claim(
        credential.unwrap_or_default(),
        signed.unwrap_or_default(),
        signature.unwrap_or_default(),
        timestamp,
        token,
        None,
    )
}

fn parse_presigned(req: &Request<'_>) -> Result<Claim, Refusal> {
    let get = |name: &str| {
        req.query_value(name).ok_or_else(|| {
            Refusal::Incomplete(format!("a presigned URL requires the '{name}' parameter."))
        })
    };
    let algorithm = get("X-Amz-Algorithm")?;
    if algorithm != ALGORITHM {
        return Err(Refusal::Incomplete(format!(
            "unsupported signing algorithm {algorithm:?}: only {ALGORITHM} (SigV4) is accepted"
        )));
    }
    let expires: u64 = get("X-Amz-Expires")?
        .parse()
        .map_err(|_| Refusal::Incomplete("X-Amz-Expires must be a number of seconds.".into()))?;
    if expires == 0 || expires > MAX_PRESIGNED_EXPIRES {
        return Err(Refusal::Incomplete(format!(
            "X-Amz-Expires must be between 1 and {MAX_PRESIGNED_EXPIRES} seconds (a week)."
        )));
    }
    claim(
        &get("X-Amz-Credential")?,
        &get("X-Amz-SignedHeaders")?,
        &get("X-Amz-Signature")?,
        &get("X-Amz-Date")?,
        req.query_value("X-Amz-Security-Token"),
        Some(expires),
    )
}

fn claim(
    credential: &str,
    signed: &str,
    signature: &str,
    timestamp: &str,
    security_token: Option<String>,
    presigned_expires: Option<u64>,
) -> Result<Claim, Refusal> {
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = parts[..] else {
        return Err(Refusal::Incomplete(format!(
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/aws4_request, got '{credential}'."
        )));
    };
    if access_key_id.is_empty() {
        return Err(Refusal::UnrecognizedClient);
    }
    let signature = hex::decode(signature)
        .ok()
        .filter(|s| s.len() == 32)
        .ok_or_else(|| {
            Refusal::Incomplete("the Signature must be 64 hexadecimal digits.".into())
        })?;
    let signed_headers: Vec<String> = signed.split(';').map(str::to_ascii_lowercase).collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(Refusal::InvalidSignature(
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    let time = parse_amz_date(timestamp).ok_or_else(|| {
        Refusal::Incomplete(format!(
            "X-Amz-Date must be in the ISO-8601 basic format YYYYMMDD'T'HHMMSS'Z', got '{timestamp}'."
        ))
    })?;
    Ok(Claim {
        access_key_id: access_key_id.to_string(),
        scope_date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
        signature,
        timestamp: timestamp.to_string(),
        time,
        security_token,
        presigned_expires,
    })
}

fn check_scope(c: &Claim, region: &str) -> Result<(), Refusal> {
    if c.service != SERVICE {
        return Err(Refusal::InvalidSignature(format!(
            "Credential should be scoped to correct service: '{SERVICE}'."
        )));
    }
    if c.region != region {
        return Err(Refusal::InvalidSignature(format!(
            "Credential should be scoped to a valid region, not '{}'. This endpoint serves '{region}'.",
            c.region
        )));
    }
    if !c.timestamp.starts_with(&c.scope_date) || c.scope_date.len() != 8 {
        return Err(Refusal::InvalidSignature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{}'.",
            c.scope_date,
            c.timestamp.get(..8).unwrap_or_default(),
            c.timestamp
        )));
    }
    Ok(())
}

fn check_time(c: &Claim, now: SystemTime) -> Result<(), Refusal> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skew = MAX_SKEW.as_secs();
    if c.time > now + skew {
        return Err(Refusal::InvalidSignature(format!(
            "Signature not yet current: {} is still later than {} ({} + 15 min.)",
            c.timestamp,
            format_amz_date(now + skew),
            format_amz_date(now)
        )));
    }
    let valid_until = match c.presigned_expires {
        Some(expires) => c.time.saturating_add(expires),
        None => c.time + skew,
    };
    if now > valid_until {
        return Err(Refusal::InvalidSignature(match c.presigned_expires {
            Some(expires) => format!(
                "Signature expired: the URL was presigned at {} for {expires} seconds; it is now {}.",
                c.timestamp,
                format_amz_date(now)
            ),
            None => format!(
                "Signature expired: {} is now earlier than {} ({} - 15 min.)",
                c.timestamp,
                format_amz_date(now.saturating_sub(skew)),
                format_amz_date(now)
            ),
        }));
    }
    Ok(())
}

/// Checks the signature with the caller's secret access key.
pub fn verify(req: &Request<'_>, claim: &Claim, secret: &str) -> Result<(), Refusal> {
    let body_hash = hex::encode(Sha256::digest(req.body));
    let mut payloads = vec![body_hash.clone()];
    match claim.presigned_expires {
        None => {
            if let Some(sent) = req.headers.get("x-amz-content-sha256")
                && sent.as_bytes() != body_hash.as_bytes()
            {
                return Err(Refusal::InvalidSignature(
                    "The provided 'x-amz-content-sha256' header does not match what was computed: the payload must be signed.".into(),
                ));
            }
        }
        // A presigned URL may leave the payload unsigned; only an empty one, so nothing unsigned
        // reaches an operation.
        Some(_) if req.body.is_empty() => payloads.push(UNSIGNED_PAYLOAD.into()),
        Some(_) => {}
    }
    let key = signing_key(secret, &claim.scope_date, &claim.region, &claim.service);
    let mut ok = subtle::Choice::from(0);
    for payload in &payloads {
        let canonical = canonical_request(req, claim, payload);
        let expected = hmac(&key, string_to_sign(claim, &canonical).as_bytes());
        ok |= expected.as_slice().ct_eq(&claim.signature);
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(Refusal::InvalidSignature(
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.".into(),
        ))
    }
}

/// The canonical request (SigV4 step 1).
pub fn canonical_request(req: &Request<'_>, claim: &Claim, payload_hash: &str) -> String {
    let mut out = String::with_capacity(512);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&encode(normalize_path(req.path).as_bytes(), true));
    out.push('\n');
    let mut pairs: Vec<(String, String)> = req
        .query_pairs()
        .into_iter()
        .filter(|(k, _)| claim.presigned_expires.is_none() || k != b"X-Amz-Signature")
        .map(|(k, v)| (encode(&k, false), encode(&v, false)))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&query.join("&"));
    out.push('\n');
    for name in &claim.signed_headers {
        out.push_str(name);
        out.push(':');
        let values: Vec<String> = req
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| trim_all(&String::from_utf8_lossy(v.as_bytes())))
            .collect();
        if values.is_empty() && name == "host" {
            out.push_str(req.authority.unwrap_or_default());
        } else {
            out.push_str(&values.join(","));
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&claim.signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

fn string_to_sign(claim: &Claim, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{}\n{}/{}/{}/aws4_request\n{}",
        claim.timestamp,
        claim.scope_date,
        claim.region,
        claim.service,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// `kSigning` = HMAC chain over date, region, service and `aws4_request`.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

pub fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// RFC 3986 dot-segment removal plus collapsed slashes, as botocore and the Rust SDK normalise.
fn normalize_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    let trailing = ["/", "/.", "/.."].iter().any(|t| path.ends_with(t));
    if trailing && !s.ends_with('/') {
        s.push('/');
    }
    s
}

/// Percent-encodes all but RFC 3986's unreserved characters (and `/` in paths), uppercase hex.
fn encode(s: &[u8], keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

/// Percent-decodes (a malformed escape stays as it is); `+` is a literal plus, as in SigV4.
pub(super) fn decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Trims and collapses runs of whitespace to one space.
fn trim_all(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `YYYYMMDDTHHMMSSZ` → seconds since the epoch.
pub fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits =
        |r: std::ops::Range<usize>| s.get(r).filter(|d| d.bytes().all(|c| c.is_ascii_digit()));
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        digits(0..4)?,
        digits(4..6)?,
        digits(6..8)?,
        digits(9..11)?,
        digits(11..13)?,
        digits(13..15)?
    );
    let t =
        aws_smithy_types::DateTime::from_str(&iso, aws_smithy_types::date_time::Format::DateTime)
            .ok()?;
    u64::try_from(t.secs()).ok()
}

/// Seconds since the epoch → `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(secs: u64) -> String {
    iso8601(secs).replace(['-', ':'], "")
}

/// Seconds since the epoch → `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(secs: u64) -> String {
    let t = aws_smithy_types::DateTime::from_secs(i64::try_from(secs).unwrap_or(i64::MAX));
    t.fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
