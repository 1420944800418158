//! Short-lived credentials for IAM identities: an access key id (`ASIA…`), a secret access key and
//! a session token, as STS hands out. Nothing is stored per session. The token carries who it was
//! issued to (the auth file's role, STS's caller ARN), when it expires and its access key id,
//! sealed with HMAC-SHA256 under a key shared by every agent of the store (one per day, made by
//! the first agent that needs it, see [`crate::store::secret`]); the secret is an HMAC of the
//! access key id under the same key. Any agent of the store can therefore verify a session issued
//! by another, and the caller's policy is looked up in the auth file on every request, so editing
//! or removing the role takes effect on sessions already out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::Refusal;
use super::file::{SESSION_KEY_PREFIX, Secret};
use super::sigv4::hmac;
use crate::store::secret::Secrets;

/// One signing key per day: a session lives at most [`MAX_DURATION`], so two keys cover it.
const EPOCH_SECS: u64 = 24 * 3600;
/// The longest session (as STS's role sessions).
pub const MAX_DURATION: Duration = Duration::from_secs(12 * 3600);
/// A key not found is not asked for again sooner than this (forged tokens cost no store reads).
const MISS_BACKOFF: Duration = Duration::from_secs(1);

/// Fresh credentials for a proven identity.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_key_id: String,
    pub secret: Secret,
    pub token: Secret,
    /// Seconds since the epoch.
    pub expires: u64,
}

/// What a valid session token says.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The auth file's role ARN.
    pub role: String,
    /// STS's ARN for the caller.
    pub caller: String,
    pub secret: Secret,
}

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    /// Format version.
    v: u8,
    /// The signing key's day.
    e: u64,
    k: String,
    r: String,
    c: String,
    x: u64,
}

/// Issues and verifies session credentials.
#[derive(Debug)]
pub struct Sessions {
    secrets: Secrets,
    duration: Duration,
    keys: Mutex<HashMap<u64, [u8; 32]>>,
    misses: Mutex<HashMap<u64, Instant>>,
}

impl Sessions {
    pub fn new(secrets: Secrets, duration: Duration) -> Self {
        Sessions {
            secrets,
            duration: duration.min(MAX_DURATION),
            keys: Mutex::default(),
            misses: Mutex::default(),
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// New credentials for `caller`, acting as the auth file's `role`, from `now` (epoch seconds).
    pub async fn issue(&self, role: &str, caller: &str, now: u64) -> Result<Issued, Refusal> {
        let epoch = now / EPOCH_SECS;
        let key = match self.cached(epoch) {
            Some(k) => k,
            None => {
                let lifetime = Duration::from_secs((epoch + 3) * EPOCH_SECS - now);
                let k = self
                    .secrets
                    .get_or_create(&key_name(epoch), lifetime)
                    .await
                    .map_err(|e| Refusal::Unavailable(format!("session keys: {e}")))?;
                self.remember(epoch, k);
                k
            }
        };
        let access_key_id = new_access_key_id()?;
        let body = Body {
            v: 1,
            e: epoch,
            k: access_key_id.clone(),
            r: role.to_string(),
            c: caller.to_string(),
            x: now + self.duration.as_secs(),
        };
        let payload = serde_json::to_vec(&body).map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let mac = hmac(
            &key,
            &[b"trellis-session-token:".as_slice(), &payload].concat(),
        );
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(mac)
        );
        Ok(Issued {
            secret: secret_for(&key, &access_key_id),
            access_key_id,
            token: Secret::new(token),
            expires: body.x,
        })
    }

    /// Checks a session token presented with `access_key_id` at `now`.
    pub async fn verify(
        &self,
        access_key_id: &str,
        token: &str,
        now: u64,
    ) -> Result<Verified, Refusal> {
        let (payload, mac) = token.split_once('.').ok_or(Refusal::UnrecognizedClient)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Refusal::UnrecognizedClient)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| Refusal::UnrecognizedClient)?;
        let body: Body =
            serde_json::from_slice(&payload).map_err(|_| Refusal::UnrecognizedClient)?;
        let epoch = now / EPOCH_SECS;
        // Only today's and yesterday's keys can have signed a live session.
        if body.v != 1 || body.e > epoch || body.e + 1 < epoch {
            return Err(if body.e + 1 < epoch {
                Refusal::ExpiredToken
            } else {
                Refusal::UnrecognizedClient
            });
        }
        let key = self.key(body.e).await?;
        let expected = hmac(
            &key,
            &[b"trellis-session-token:".as_slice(), &payload].concat(),
        );
        let token_ok: bool = expected.as_slice().ct_eq(&mac).into();
        if !token_ok || body.k != access_key_id {
            return Err(Refusal::UnrecognizedClient);
        }
        if now >= body.x {
            return Err(Refusal::ExpiredToken);
        }
        Ok(Verified {
            secret: secret_for(&key, &body.k),
            role: body.r,
            caller: body.c,
        })
    }

    fn cached(&self, epoch: u64) -> Option<[u8; 32]> {
        self.keys.lock().ok()?.get(&epoch).copied()
    }

    fn remember(&self, epoch: u64, key: [u8; 32]) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.retain(|e, _| *e + 1 >= epoch);
            keys.insert(epoch, key);
        }
    }

    /// The key of `epoch`, from memory or the store (made by another agent).
    async fn key(&self, epoch: u64) -> Result<[u8; 32], Refusal> {
        if let Some(k) = self.cached(epoch) {
            return Ok(k);
        }
        let recent_miss = self
            .misses
            .lock()
            .ok()
            .and_then(|m| m.get(&epoch).copied())
            .is_some_and(|t| t.elapsed() < MISS_BACKOFF);
        if recent_miss {
            return Err(Refusal::UnrecognizedClient);
        }
        match self.secrets.get(&key_name(epoch)).await {
            Ok(Some(k)) => {
                self.remember(epoch, k);
                Ok(k)
            }
            Ok(None) => {
                if let Ok(mut m) = self.misses.lock() {
                    m.retain(|e, _| *e + 1 >= epoch);
                    m.insert(epoch, Instant::now());
                }
                Err(Refusal::UnrecognizedClient)
            }
            Err(e) => Err(Refusal::Unavailable(format!("session keys: {e}"))),
        }
    }
}

fn key_name(epoch: u64) -> String {
    format!("session-key.{epoch}")
}

fn secret_for(key: &[u8], access_key_id: &str) -> Secret {
    let mac = hmac(
        key,
        &[
            b"trellis-session-secret:".as_slice(),
            access_key_id.as_bytes(),
        ]
        .concat(),
    );
    let mut s = STANDARD.encode(mac);
    s.truncate(40);
    Secret::new(s)
}

/// `ASIA` and 16 random base32 characters, as AWS's temporary access key ids look.
fn new_access_key_id() -> Result<String, Refusal> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| Refusal::Unavailable(format!("no randomness: {e}")))?;
    let tail: String = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)] as char)
        .collect();
    Ok(format!("{SESSION_KEY_PREFIX}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::TempDir;

    const ROLE: &str = "arn:aws:iam::111122223333:role/ci";
    const CALLER: &str = "arn:aws:sts::111122223333:assumed-role/ci/run-1";
    const NOW: u64 = 1_800_000_000;

    #[tokio::test]
    async fn a_session_from_one_agent_verifies_on_another_sharing_the_store() {
        let dir = TempDir::new("sessions");
        let a = Sessions::new(Secrets::in_dir(dir.path()), Duration::from_secs(3600));
        let b = Sessions::new(Secrets::in_dir(dir.path()), Duration::from_secs(3600));
        let s = a.issue(ROLE, CALLER, NOW).await.unwrap();
        assert!(s.access_key_id.starts_with("ASIA") && s.access_key_id.len() == 20);
        assert_eq!(s.secret.expose().len(), 40);
        assert_eq!(s.expires, NOW + 3600);
        let v = b
            .verify(&s.access_key_id, s.token.expose(), NOW + 10)
            .await
            .unwrap();
        assert_eq!((v.role.as_str(), v.caller.as_str()), (ROLE, CALLER));
        assert_eq!(v.secret, s.secret);

        // Expired; another key id; a forged body; another store's keys.
        assert!(matches!(
            b.verify(&s.access_key_id, s.token.expose(), NOW + 3600)
                .await,
            Err(Refusal::ExpiredToken)
        ));
        assert!(matches!(
            b.verify("ASIAAAAAAAAAAAAAAAAA", s.token.expose(), NOW)
                .await,
            Err(Refusal::UnrecognizedClient)
        ));
        let (payload, mac) = s.token.expose().split_once('.').unwrap();
        let forged = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
            .unwrap()
            .replace("role/ci", "role/admin");
        let forged = format!("{}.{mac}", URL_SAFE_NO_PAD.encode(forged));
        assert!(matches!(
            b.verify(&s.access_key_id, &forged, NOW).await,
            Err(Refusal::UnrecognizedClient)
        ));
        let other = TempDir::new("sessions-other");
        let c = Sessions::new(Secrets::in_dir(other.path()), Duration::from_secs(3600));
        assert!(
            c.verify(&s.access_key_id, s.token.expose(), NOW)
                .await
                .is_err()
        );
        assert!(!format!("{s:?}").contains(s.secret.expose()));
    }

    #[tokio::test]
    async fn sessions_outlive_the_day_their_key_was_made() {
        let dir = TempDir::new("sessions-days");
        let a = Sessions::new(Secrets::in_dir(dir.path()), MAX_DURATION);
        let late = (NOW / EPOCH_SECS + 1) * EPOCH_SECS - 60;
        let s = a.issue(ROLE, CALLER, late).await.unwrap();
        a.verify(&s.access_key_id, s.token.expose(), late + 11 * 3600)
            .await
            .unwrap();
        let next = a.issue(ROLE, CALLER, late + 120).await.unwrap();
        assert_ne!(next.secret, s.secret);
        a.verify(&next.access_key_id, next.token.expose(), late + 3600)
            .await
            .unwrap();
    }
}
