//! Who is asking: a key from the auth file, or an IAM role (or user) proven through STS. Also the
//! mapping from what STS says (`arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`) to the role an
//! operator names in the auth file (`arn:aws:iam::ACCOUNT:role/PATH/NAME`).

use std::fmt;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A long-lived key of the auth file, by its access key id.
    Key { access_key_id: String },
    /// An IAM role or user of the auth file, acting through session credentials Trellis issued.
    Role {
        /// The auth file's ARN for it (`arn:aws:iam::ACCOUNT:role/NAME`).
        arn: String,
        /// What STS answered for the caller (`arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`).
        caller: String,
        /// The session credentials' access key id.
        access_key_id: String,
    },
    /// A metrics scraper of the auth file, by a bearer token: `scraper/NAME`.
    Scraper { name: String },
    /// Nobody in particular: the API runs without `--api-auth` (loopback, or explicitly open).
    Anonymous,
}

impl Principal {
    /// The name the audit log and refusals use: the key id, or the role's ARN.
    pub fn name(&self) -> &str {
        match self {
            Principal::Key { access_key_id } => access_key_id,
            Principal::Role { arn, .. } => arn,
            Principal::Scraper { name } => name,
            Principal::Anonymous => "anonymous",
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IAM identity as the auth file names it, reduced to what an STS answer can be matched on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IamName {
    /// A role: partition, account and role name (STS's assumed-role ARNs carry no role path).
    Role {
        partition: String,
        account: String,
        name: String,
    },
    /// A user: matched on the whole ARN.
    User(String),
}

impl IamName {
    /// Parses an auth file `arn`: `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME` or `…:user/…`.
    pub fn from_config_arn(arn: &str) -> Result<IamName, String> {
        let rule = "must be an IAM role or user ARN (arn:aws:iam::111122223333:role/NAME)";
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [arn_, partition, service, region, account, resource] = parts[..] else {
            return Err(rule.into());
        };
        if arn_ != "arn" || service != "iam" || !region.is_empty() || partition.is_empty() {
            return Err(rule.into());
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{rule}: the account must be 12 digits"));
        }
        if arn.contains(['*', '?']) {
            return Err(format!("{rule}: no wildcards"));
        }
        match resource.split_once('/') {
            Some(("role", rest)) if !rest.is_empty() && !rest.ends_with('/') => {
                let name = rest.rsplit('/').next().unwrap_or(rest);
                Ok(IamName::Role {
                    partition: partition.into(),
                    account: account.into(),
                    name: name.into(),
                })
            }
            Some(("user", rest)) if !rest.is_empty() && !rest.ends_with('/') => {
                Ok(IamName::User(arn.into()))
            }
            _ => Err(rule.into()),
        }
    }

    /// Whether STS's answer for a caller is this identity: an assumed-role ARN matches its role,
    /// an IAM user ARN matches itself.
    pub fn matches_caller(&self, caller: &str) -> bool {
        match self {
            IamName::User(arn) => arn == caller,
            IamName::Role {
                partition,
                account,
                name,
            } => {
                let parts: Vec<&str> = caller.splitn(6, ':').collect();
                let ["arn", p, "sts", "", a, resource] = parts[..] else {
                    return false;
                };
                let mut segs = resource.splitn(3, '/');
                matches!(
                    (segs.next(), segs.next(), segs.next()),
                    (Some("assumed-role"), Some(n), Some(session))
                        if n == name && p == partition && a == account && !session.is_empty()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assumed_role_maps_to_its_role_whatever_its_path_and_session() {
        let role = IamName::from_config_arn("arn:aws:iam::111122223333:role/ci/deployer").unwrap();
        assert!(role.matches_caller("arn:aws:sts::111122223333:assumed-role/deployer/build-42"));
        assert!(!role.matches_caller("arn:aws:sts::444455556666:assumed-role/deployer/build-42"));
        assert!(!role.matches_caller("arn:aws:sts::111122223333:assumed-role/deployer2/x"));
        assert!(!role.matches_caller("arn:aws:sts::111122223333:assumed-role/deployer/"));
        assert!(!role.matches_caller("arn:aws:iam::111122223333:role/ci/deployer"));
        assert!(!role.matches_caller("arn:aws-cn:sts::111122223333:assumed-role/deployer/x"));
        let user = IamName::from_config_arn("arn:aws:iam::111122223333:user/alice").unwrap();
        assert!(user.matches_caller("arn:aws:iam::111122223333:user/alice"));
        assert!(!user.matches_caller("arn:aws:iam::111122223333:user/alice2"));
    }

    #[test]
    fn config_arns_must_be_iam_roles_or_users() {
        for bad in [
            "arn:aws:sts::111122223333:assumed-role/x/y",
            "arn:aws:iam::1111:role/x",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:group/x",
            "arn:aws:iam::111122223333:role/*",
            "role/x",
        ] {
            assert!(IamName::from_config_arn(bad).is_err(), "{bad}");
        }
    }
}
