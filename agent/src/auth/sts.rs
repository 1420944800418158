//! Proving an IAM identity without long-lived Trellis secrets, as HashiCorp Vault's AWS auth
//! method and aws-iam-authenticator do: the caller signs an `sts:GetCallerIdentity` request with
//! its own AWS credentials (task role, instance profile, SSO…) and hands the signed request to the
//! agent, which sends it to STS and learns from STS's answer who signed it.
//!
//! The agent only ever sends it to its own STS endpoint (`--sts-endpoint`, by default the region's),
//! never to a URL from the request, and only an exact `GetCallerIdentity` (it is no proxy for other
//! STS calls). The signed headers must include `x-trellis-server-id` naming this deployment
//! (`--api-server-id`), so a proof captured by, or sent to, another deployment is refused here.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use super::Refusal;
use super::sigv4::{MAX_SKEW, parse_amz_date};
use crate::tls::{self, HttpClient};

/// The signed header that names the Trellis deployment a proof is meant for.
pub const SERVER_ID_HEADER: &str = "x-trellis-server-id";
/// The only request body the agent forwards.
pub const GET_CALLER_IDENTITY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The whole exchange with STS.
const STS_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger answers are not STS's.
const MAX_ANSWER: usize = 64 * 1024;

/// A signed `GetCallerIdentity`: its headers (lower- or mixed-case names) and its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proof {
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// What a client signs for: STS's host and region, and the header naming the deployment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StsTarget {
    pub host: String,
    pub region: String,
    pub server_id_header: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--sts-endpoint {0:?} must be an http(s) URL with a host")]
    Endpoint(String),
    #[error(transparent)]
    Tls(#[from] tls::Error),
}

/// This agent's STS: where proofs go and which deployment names it answers to.
#[derive(Clone)]
pub struct Sts {
    endpoint: http::Uri,
    host: String,
    region: String,
    server_ids: Vec<String>,
    client: HttpClient,
}

impl std::fmt::Debug for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sts")
            .field("endpoint", &self.endpoint)
            .field("server_ids", &self.server_ids)
            .finish()
    }
}

impl Sts {
    /// `endpoint` overrides `https://sts.REGION.amazonaws.com` (a VPC endpoint, or a test STS).
    pub fn new(
        endpoint: Option<&str>,
        region: &str,
        server_ids: Vec<String>,
    ) -> Result<Sts, Error> {
        let url = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
        let endpoint: http::Uri = url.parse().map_err(|_| Error::Endpoint(url.clone()))?;
        let host = endpoint
            .authority()
            .map(|a| a.as_str().to_string())
            .filter(|_| matches!(endpoint.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| Error::Endpoint(url.clone()))?;
        Ok(Sts {
            endpoint,
            host,
            region: region.to_string(),
            server_ids,
            client: tls::http_client(None)?,
        })
    }

    pub fn target(&self) -> StsTarget {
        StsTarget {
            host: self.host.clone(),
            region: self.region.clone(),
            server_id_header: SERVER_ID_HEADER.into(),
        }
    }

    /// Checks a proof and asks STS whose it is: the caller's ARN.
    pub async fn caller(&self, proof: &Proof, now: u64) -> Result<String, Refusal> {
        let headers: BTreeMap<String, &str> = proof
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        self.check(proof, &headers, now)?;
        let mut req = http::Request::builder()
            .method("POST")
            .uri(self.endpoint.clone());
        for (k, v) in &headers {
            // Framing is the connection's business; everything signed goes as it was signed.
            if !matches!(
                k.as_str(),
                "content-length" | "connection" | "transfer-encoding" | "keep-alive" | "te"
            ) {
                req = req.header(k.as_str(), *v);
            }
        }
        let req = req
            .body(Full::new(Bytes::from(proof.body.clone())))
            .map_err(|_| Refusal::BadRequest("the proof's headers are not valid HTTP".into()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                Refusal::Unavailable(format!("STS at {}: {}", self.host, tls::chain(&e)))
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Refusal::Unavailable(format!("STS at {}: {e}", self.host)))?
                .to_bytes();
            Ok::<_, Refusal>((status, body))
        };
        let (status, body) = tokio::time::timeout(STS_TIMEOUT, exchange)
            .await
            .map_err(|_| Refusal::Unavailable(format!("STS at {} did not answer", self.host)))??;
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ANSWER)]).into_owned();
        if status.is_success() {
            return xml_text(&text, "Arn").ok_or_else(|| {
                Refusal::Unavailable("STS answered without the caller's Arn".into())
            });
        }
        // STS's message can quote the canonical request, with the session token: only the code.
        let code = xml_text(&text, "Code").unwrap_or_else(|| format!("HTTP {status}"));
        if status.is_server_error() || code == "Throttling" {
            return Err(Refusal::Unavailable(format!("STS answered {code}")));
        }
        Err(Refusal::AccessDenied(format!(
            "STS did not accept the identity proof ({code}): sign sts:GetCallerIdentity with valid AWS credentials"
        )))
    }

    fn check(
        &self,
        proof: &Proof,
        headers: &BTreeMap<String, &str>,
        now: u64,
    ) -> Result<(), Refusal> {
        let mut params: Vec<(Vec<u8>, Vec<u8>)> = proof
            .body
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (super::sigv4::decode(k), super::sigv4::decode(v))
            })
            .collect();
        params.sort();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"Action".to_vec(), b"GetCallerIdentity".to_vec()),
            (b"Version".to_vec(), b"2011-06-15".to_vec()),
        ];
        if params != expected {
            return Err(Refusal::BadRequest(format!(
                "body: the proof must be a signed sts:GetCallerIdentity ({GET_CALLER_IDENTITY})"
            )));
        }
        let auth = headers.get("authorization").copied().unwrap_or_default();
        let signed: Vec<&str> = auth
            .split(',')
            .find_map(|p| p.trim().strip_prefix("SignedHeaders="))
            .map(|s| s.split(';').collect())
            .unwrap_or_default();
        if !auth.starts_with("AWS4-HMAC-SHA256 ") || signed.is_empty() {
            return Err(Refusal::BadRequest(
                "headers.Authorization: the proof must be signed with SigV4".into(),
            ));
        }
        for required in ["host", SERVER_ID_HEADER] {
            if !signed.iter().any(|h| h.eq_ignore_ascii_case(required)) {
                return Err(Refusal::BadRequest(format!(
                    "headers.Authorization: {required} must be a signed header of the proof"
                )));
            }
        }
        if headers.get("host").copied() != Some(self.host.as_str()) {
            return Err(Refusal::BadRequest(format!(
                "headers.host: sign the proof for this agent's STS, {}",
                self.host
            )));
        }
        let server_id = headers.get(SERVER_ID_HEADER).copied().unwrap_or_default();
        if self.server_ids.is_empty() {
            return Err(Refusal::AccessDenied(
                "this agent accepts no IAM identities: it was started without --api-server-id"
                    .into(),
            ));
        }
        if !self.server_ids.iter().any(|s| s == server_id) {
            return Err(Refusal::AccessDenied(format!(
                "the proof names Trellis deployment {server_id:?} in {SERVER_ID_HEADER}, not this one"
            )));
        }
        let signed_at = headers
            .get("x-amz-date")
            .and_then(|d| parse_amz_date(d))
            .ok_or_else(|| {
                Refusal::BadRequest("headers.x-amz-date: the proof needs its signing time".into())
            })?;
        if signed_at.abs_diff(now) > MAX_SKEW.as_secs() {
            return Err(Refusal::InvalidSignature(
                "Signature expired: the proof was signed more than 15 minutes from now".into(),
            ));
        }
        Ok(())
    }
}

/// The text of the first element named `tag`.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let mut doc = aws_smithy_xml::decode::Document::new(xml);
    while let Some(el) = doc.next_start_element() {
        if el.matches(tag) {
            let mut scoped = doc.scoped_to(el);
            return aws_smithy_xml::decode::try_data(&mut scoped)
                .ok()
                .map(|s| s.trim().to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof(server_id: &str, host: &str, body: &str) -> Proof {
        let mut headers = BTreeMap::new();
        headers.insert(
            "Authorization".into(),
            "AWS4-HMAC-SHA256 Credential=ASIA/20300101/us-east-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-trellis-server-id, Signature=00".into(),
        );
        headers.insert("Host".into(), host.into());
        headers.insert("X-Amz-Date".into(), "20300101T000000Z".into());
        headers.insert("X-Trellis-Server-Id".into(), server_id.into());
        Proof {
            headers,
            body: body.into(),
        }
    }

    #[test]
    fn proofs_for_another_deployment_or_another_call_are_refused_before_sts() {
        let sts = Sts::new(Some("http://127.0.0.1:1"), "us-east-1", vec!["prod".into()]).unwrap();
        let now = parse_amz_date("20300101T000100Z").unwrap();
        let headers = |p: &Proof| {
            p.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let check = |p: &Proof, now: u64| {
            let h = headers(p);
            let h = h.iter().map(|(k, v)| (k.clone(), v.as_str())).collect();
            sts.check(p, &h, now)
        };
        check(&proof("prod", "127.0.0.1:1", GET_CALLER_IDENTITY), now).unwrap();
        check(
            &proof(
                "prod",
                "127.0.0.1:1",
                "Version=2011-06-15&Action=GetCallerIdentity",
            ),
            now,
        )
        .unwrap();
        assert!(matches!(
            check(&proof("staging", "127.0.0.1:1", GET_CALLER_IDENTITY), now),
            Err(Refusal::AccessDenied(m)) if m.contains("\"staging\"")
        ));
        assert!(matches!(
            check(&proof("prod", "sts.amazonaws.com", GET_CALLER_IDENTITY), now),
            Err(Refusal::BadRequest(m)) if m.contains("headers.host")
        ));
        assert!(matches!(
            check(&proof("prod", "127.0.0.1:1", "Action=AssumeRole&Version=2011-06-15"), now),
            Err(Refusal::BadRequest(m)) if m.starts_with("body:")
        ));
        assert!(matches!(
            check(
                &proof("prod", "127.0.0.1:1", GET_CALLER_IDENTITY),
                now + 16 * 60
            ),
            Err(Refusal::InvalidSignature(_))
        ));
        let mut unsigned_id = proof("prod", "127.0.0.1:1", GET_CALLER_IDENTITY);
        unsigned_id.headers.insert(
            "Authorization".into(),
            "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host;x-amz-date, Signature=00".into(),
        );
        assert!(matches!(
            check(&unsigned_id, now),
            Err(Refusal::BadRequest(m)) if m.contains("x-trellis-server-id must be a signed header")
        ));
    }

    #[test]
    fn sts_answers_are_read_for_the_arn_or_the_code() {
        let ok = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
          <GetCallerIdentityResult><Arn>arn:aws:sts::111122223333:assumed-role/ci/run</Arn>
          <UserId>AROA:run</UserId><Account>111122223333</Account></GetCallerIdentityResult>
          </GetCallerIdentityResponse>"#;
        assert_eq!(
            xml_text(ok, "Arn").as_deref(),
            Some("arn:aws:sts::111122223333:assumed-role/ci/run")
        );
        let err = r#"<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>
          <Message>The Canonical String ... x-amz-security-token:SECRET</Message></Error></ErrorResponse>"#;
        assert_eq!(
            xml_text(err, "Code").as_deref(),
            Some("SignatureDoesNotMatch")
        );
        assert_eq!(xml_text("not xml", "Arn"), None);
    }
}
