//! The `--api-auth` file: keys (access key id, secret, policy), IAM roles (ARN, policy) and
//! metrics scrapers (name, SHA-256 of a bearer token). Read and checked whole; a bad file is
//! refused with the field and the rule, so the caller keeps the previous one in force.
//!
//! ```json
//! {"keys":  [{"accessKeyId": "AKIA…", "secretAccessKey": "…", "policy": {"Version": "2012-10-17", "Statement": […]}}],
//!  "roles": [{"arn": "arn:aws:iam::111122223333:role/ci-deployer", "policy": {…}}],
//!  "scrapers": [{"name": "prometheus", "tokenSha256": "64 hex digits"}]}
//! ```
//!
//! Scrapers exist because Prometheus cannot sign SigV4 but can send a bearer token from a file.
//! The file holds only the token's digest, so reading it does not let anyone scrape.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

use super::identity::IamName;
use super::policy::Policy;

/// Access key ids with this prefix are Trellis's session credentials.
pub const SESSION_KEY_PREFIX: &str = "ASIA";

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Key {
    pub access_key_id: String,
    pub secret: Secret,
    pub policy: Policy,
}

/// A metrics scraper: who may `GET /metrics` with a bearer token, and nothing else.
#[derive(Debug, Clone)]
pub struct Scraper {
    pub name: String,
    pub token_sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Role {
    pub arn: String,
    pub name: IamName,
    pub policy: Policy,
}

/// A checked auth file.
#[derive(Debug, Clone, Default)]
pub struct AuthFile {
    keys: HashMap<String, Key>,
    roles: Vec<Role>,
    scrapers: Vec<Scraper>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the auth file {path} is not JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the auth file {path}: {field}: {rule}")]
    Field {
        path: String,
        field: String,
        rule: String,
    },
}

impl AuthFile {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<AuthFile, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        AuthFile::parse(&bytes, &path.display().to_string())
    }

    /// Checks a file's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &str) -> Result<AuthFile, Error> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: path.to_string(),
            source,
        })?;
        let field = |field: &str, rule: &str| Error::Field {
            path: path.to_string(),
            field: field.to_string(),
            rule: rule.to_string(),
        };
        let obj = doc
            .as_object()
            .ok_or_else(|| field("(top level)", "must be an object with keys and roles"))?;
        for k in obj.keys() {
            if !["keys", "roles", "scrapers"].contains(&k.as_str()) {
                return Err(field(
                    k,
                    "is not an auth file member (keys, roles, scrapers)",
                ));
            }
        }
        let list = |name: &str| -> Result<Vec<Value>, Error> {
            match obj.get(name) {
                None => Ok(vec![]),
                Some(Value::Array(items)) => Ok(items.clone()),
                Some(_) => Err(field(name, "must be a list")),
            }
        };
        let mut out = AuthFile::default();
        let mut ids = Vec::new();
        for (i, item) in list("keys")?.iter().enumerate() {
            let at = format!("keys[{i}]");
            let key = parse_key(item, &at).map_err(|(f, r)| field(&f, &r))?;
            if let Some(j) = ids.iter().position(|id| *id == key.access_key_id) {
                return Err(field(
                    &format!("{at}.accessKeyId"),
                    &format!("duplicates another key's (keys[{j}])"),
                ));
            }
            ids.push(key.access_key_id.clone());
            out.keys.insert(key.access_key_id.clone(), key);
        }
        for (i, item) in list("roles")?.iter().enumerate() {
            let at = format!("roles[{i}]");
            let role = parse_role(item, &at).map_err(|(f, r)| field(&f, &r))?;
            if let Some(j) = out.roles.iter().position(|r| r.name == role.name) {
                return Err(field(
                    &format!("{at}.arn"),
                    &format!("names the same identity as roles[{j}]"),
                ));
            }
            out.roles.push(role);
        }
        for (i, item) in list("scrapers")?.iter().enumerate() {
            let at = format!("scrapers[{i}]");
            let scraper = parse_scraper(item, &at).map_err(|(f, r)| field(&f, &r))?;
            if let Some(j) = out.scrapers.iter().position(|s| s.name == scraper.name) {
                return Err(field(
                    &format!("{at}.name"),
                    &format!("duplicates another scraper's (scrapers[{j}])"),
                ));
            }
            if let Some(j) = out
                .scrapers
                .iter()
                .position(|s| s.token_sha256 == scraper.token_sha256)
            {
                return Err(field(
                    &format!("{at}.tokenSha256"),
                    &format!("is the same token as scrapers[{j}]'s: give each scraper its own"),
                ));
            }
            out.scrapers.push(scraper);
        }
        Ok(out)
    }

    pub fn key(&self, access_key_id: &str) -> Option<&Key> {
        self.keys.get(access_key_id)
    }

    /// The role entry whose identity STS's `caller` ARN proves.
    pub fn role_for_caller(&self, caller: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name.matches_caller(caller))
    }

    /// The role entry named `arn` in the file (how session credentials find their policy, so
    /// editing or removing a role takes effect on sessions already issued).
    pub fn role(&self, arn: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.arn == arn)
    }

    /// The scraper whose token has this SHA-256 digest. Compares with every scraper's digest in
    /// constant time, so the answer's timing does not tell how much of a digest matched.
    pub fn scraper(&self, token_sha256: &[u8; 32]) -> Option<&Scraper> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for s in &self.scrapers {
            if bool::from(s.token_sha256.ct_eq(token_sha256)) {
                found = Some(s);
            }
        }
        found
    }

    pub fn has_roles(&self) -> bool {
        !self.roles.is_empty()
    }

    /// Counts for the log line of a (re)load: keys, roles, scrapers; never a secret.
    pub fn summary(&self) -> (usize, usize, usize) {
        (self.keys.len(), self.roles.len(), self.scrapers.len())
    }
}

type FieldError = (String, String);

fn object<'v>(
    item: &'v Value,
    at: &str,
    allowed: &[&str],
) -> Result<&'v serde_json::Map<String, Value>, FieldError> {
    let obj = item
        .as_object()
        .ok_or_else(|| (at.to_string(), "must be an object".to_string()))?;
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err((
                format!("{at}.{k}"),
                format!("is not a member here ({})", allowed.join(", ")),
            ));
        }
    }
    Ok(obj)
}

fn string<'v>(
    obj: &'v serde_json::Map<String, Value>,
    at: &str,
    name: &str,
) -> Result<&'v str, FieldError> {
    obj.get(name)
        .ok_or_else(|| (format!("{at}.{name}"), "is required".to_string()))?
        .as_str()
        .ok_or_else(|| (format!("{at}.{name}"), "must be a string".to_string()))
}

fn policy(obj: &serde_json::Map<String, Value>, at: &str) -> Result<Policy, FieldError> {
    let doc = obj
        .get("policy")
        .ok_or_else(|| (format!("{at}.policy"), "is required".to_string()))?;
    Policy::parse(doc, &format!("{at}.policy")).map_err(|e| (e.field, e.rule))
}

fn parse_key(item: &Value, at: &str) -> Result<Key, FieldError> {
    let obj = object(
        item,
        at,
        &["accessKeyId", "secretAccessKey", "policy", "description"],
    )?;
    let id = string(obj, at, "accessKeyId")?;
    let id_at = format!("{at}.accessKeyId");
    if !(16..=128).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err((
            id_at,
            "must be 16 to 128 letters and digits (an AWS-style access key id)".into(),
        ));
    }
    if id.starts_with(SESSION_KEY_PREFIX) {
        return Err((
            id_at,
            format!("must not start with {SESSION_KEY_PREFIX}: those are session credentials"),
        ));
    }
    // The secret itself is never quoted back, whatever is wrong with it.
    let secret = string(obj, at, "secretAccessKey")?;
    if !(16..=128).contains(&secret.len())
        || !secret.bytes().all(|b| b.is_ascii_graphic())
        || secret.contains(char::is_whitespace)
    {
        return Err((
            format!("{at}.secretAccessKey"),
            "must be 16 to 128 printable characters without spaces".into(),
        ));
    }
    if let Some(d) = obj.get("description") {
        d.as_str()
            .ok_or_else(|| (format!("{at}.description"), "must be a string".to_string()))?;
    }
    Ok(Key {
        access_key_id: id.to_string(),
        secret: Secret::new(secret),
        policy: policy(obj, at)?,
    })
}

fn parse_role(item: &Value, at: &str) -> Result<Role, FieldError> {
    let obj = object(item, at, &["arn", "policy", "description"])?;
    let arn = string(obj, at, "arn")?;
    let name = IamName::from_config_arn(arn).map_err(|rule| (format!("{at}.arn"), rule))?;
    if let Some(d) = obj.get("description") {
        d.as_str()
            .ok_or_else(|| (format!("{at}.description"), "must be a string".to_string()))?;
    }
    Ok(Role {
        arn: arn.to_string(),
        name,
        policy: policy(obj, at)?,
    })
}

fn parse_scraper(item: &Value, at: &str) -> Result<Scraper, FieldError> {
    let obj = object(item, at, &["name", "tokenSha256", "description"])?;
    let name = string(obj, at, "name")?;
    if !(1..=64).contains(&name.len())
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err((
            format!("{at}.name"),
            "must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    let digest = string(obj, at, "tokenSha256")?;
    let token_sha256 = hex::decode(digest)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            (
                format!("{at}.tokenSha256"),
                "must be the SHA-256 of the token, 64 hex digits (`sha256sum` of a token file without a newline)".to_string(),
            )
        })?;
    if let Some(d) = obj.get("description") {
        d.as_str()
            .ok_or_else(|| (format!("{at}.description"), "must be a string".to_string()))?;
    }
    Ok(Scraper {
        name: name.to_string(),
        token_sha256,
    })
}

#[cfg(test)]
mod tests;
