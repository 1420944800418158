//! IAM identity policy documents: checked once when loaded (a bad document is refused naming the
//! field and the rule), then evaluated for one action on one resource the way IAM evaluates
//! identity policies: an explicit `Deny` wins, otherwise any `Allow`, otherwise denied.
//!
//! Free of HTTP on purpose: the API authorises App Mesh operations with it, and the ADS server can
//! authorise `appmesh:StreamAggregatedResources` on a node's ARN with the same documents.
//!
//! Supported elements: `Version`, `Id`, `Statement` (one or a list) with `Sid`, `Effect`,
//! `Action`/`NotAction`, `Resource`/`NotResource`, and the `*` and `?` wildcards (actions match
//! case-insensitively, resources case-sensitively, as in IAM). `Condition`, `Principal` and policy
//! variables are refused rather than ignored: ignoring a condition would widen an `Allow`, and
//! ignoring a variable would silently narrow a `Deny`.

use serde_json::{Map, Value};

/// The outcome of evaluating policies for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// A statement denies it: no `Allow` anywhere can override that.
    ExplicitDeny,
    /// Nothing allows it.
    ImplicitDeny,
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// A field of a policy document and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct Error {
    pub field: String,
    pub rule: String,
}

fn err(field: &str, rule: impl Into<String>) -> Error {
    Error {
        field: field.to_string(),
        rule: rule.into(),
    }
}

/// One checked policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    allow: bool,
    actions: Patterns,
    resources: Patterns,
}

/// `Action` or `NotAction` (likewise for resources): the request must match one pattern, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Patterns {
    negated: bool,
    list: Vec<String>,
}

/// Actions Trellis authorises, so a misspelt one is refused instead of never matching.
pub const KNOWN_ACTIONS: &[&str] = &[
    "appmesh:CreateGatewayRoute",
    "appmesh:CreateMesh",
    "appmesh:CreateRoute",
    "appmesh:CreateVirtualGateway",
    "appmesh:CreateVirtualNode",
    "appmesh:CreateVirtualRouter",
    "appmesh:CreateVirtualService",
    "appmesh:DeleteGatewayRoute",
    "appmesh:DeleteMesh",
    "appmesh:DeleteRoute",
    "appmesh:DeleteVirtualGateway",
    "appmesh:DeleteVirtualNode",
    "appmesh:DeleteVirtualRouter",
    "appmesh:DeleteVirtualService",
    "appmesh:DescribeGatewayRoute",
    "appmesh:DescribeMesh",
    "appmesh:DescribeRoute",
    "appmesh:DescribeVirtualGateway",
    "appmesh:DescribeVirtualNode",
    "appmesh:DescribeVirtualRouter",
    "appmesh:DescribeVirtualService",
    "appmesh:ListGatewayRoutes",
    "appmesh:ListMeshes",
    "appmesh:ListRoutes",
    "appmesh:ListTagsForResource",
    "appmesh:ListVirtualGateways",
    "appmesh:ListVirtualNodes",
    "appmesh:ListVirtualRouters",
    "appmesh:ListVirtualServices",
    "appmesh:StreamAggregatedResources",
    "appmesh:TagResource",
    "appmesh:UntagResource",
    "appmesh:UpdateGatewayRoute",
    "appmesh:UpdateMesh",
    "appmesh:UpdateRoute",
    "appmesh:UpdateVirtualGateway",
    "appmesh:UpdateVirtualNode",
    "appmesh:UpdateVirtualRouter",
    "appmesh:UpdateVirtualService",
    "trellis:ReadMetrics",
    "trellis:ReadDebug",
    "trellis:ReadTopology",
    "trellis:Explain",
];

impl Policy {
    /// Checks a policy document; `field` names it in errors (`keys[0].policy`).
    pub fn parse(doc: &Value, field: &str) -> Result<Policy, Error> {
        let obj = doc
            .as_object()
            .ok_or_else(|| err(field, "must be a policy document (a JSON object)"))?;
        for (k, v) in obj {
            let at = format!("{field}.{k}");
            match k.as_str() {
                "Version" => match v.as_str() {
                    Some("2012-10-17" | "2008-10-17") => {}
                    _ => return Err(err(&at, "must be \"2012-10-17\"")),
                },
                "Id" => {
                    v.as_str().ok_or_else(|| err(&at, "must be a string"))?;
                }
                "Statement" => {}
                _ => return Err(err(&at, "is not a policy element (Version, Id, Statement)")),
            }
        }
        let at = format!("{field}.Statement");
        let statements = match obj.get("Statement") {
            None => return Err(err(&at, "is required")),
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(err(&at, "must hold at least one statement"));
            }
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, s)| Statement::parse(s, &format!("{at}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            Some(s @ Value::Object(_)) => vec![Statement::parse(s, &at)?],
            Some(_) => return Err(err(&at, "must be a statement or a list of statements")),
        };
        Ok(Policy { statements })
    }

    /// This document alone: explicit deny, allow, or nothing said.
    pub fn evaluate(&self, action: &str, resource: &str) -> Decision {
        let mut allowed = false;
        for s in &self.statements {
            if s.actions.matches(action, true) && s.resources.matches(resource, false) {
                if !s.allow {
                    return Decision::ExplicitDeny;
                }
                allowed = true;
            }
        }
        if allowed {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }
}

/// Several documents together (IAM's identity-policy evaluation across a principal's policies).
pub fn evaluate_all<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    action: &str,
    resource: &str,
) -> Decision {
    let mut out = Decision::ImplicitDeny;
    for p in policies {
        match p.evaluate(action, resource) {
            Decision::ExplicitDeny => return Decision::ExplicitDeny,
            Decision::Allow => out = Decision::Allow,
            Decision::ImplicitDeny => {}
        }
    }
    out
}

impl Statement {
    fn parse(v: &Value, field: &str) -> Result<Statement, Error> {
        let obj = v
            .as_object()
            .ok_or_else(|| err(field, "must be a statement (a JSON object)"))?;
        for k in obj.keys() {
            let at = format!("{field}.{k}");
            match k.as_str() {
                "Sid" | "Effect" | "Action" | "NotAction" | "Resource" | "NotResource" => {}
                "Condition" => {
                    return Err(err(
                        &at,
                        "conditions are not supported (the statement would apply without it); \
                         remove it or narrow Resource instead",
                    ));
                }
                "Principal" | "NotPrincipal" => {
                    return Err(err(
                        &at,
                        "identity policies name no principal: the key or role holding the policy is the principal",
                    ));
                }
                _ => return Err(err(&at, "is not a statement element")),
            }
        }
        if let Some(sid) = obj.get("Sid") {
            sid.as_str()
                .ok_or_else(|| err(&format!("{field}.Sid"), "must be a string"))?;
        }
        let allow = match obj.get("Effect").and_then(Value::as_str) {
            Some("Allow") => true,
            Some("Deny") => false,
            Some(_) => return Err(err(&format!("{field}.Effect"), "must be Allow or Deny")),
            None => {
                return Err(err(
                    &format!("{field}.Effect"),
                    "is required (Allow or Deny)",
                ));
            }
        };
        let actions = Patterns::parse(obj, field, "Action", check_action)?;
        let resources = Patterns::parse(obj, field, "Resource", check_resource)?;
        Ok(Statement {
            allow,
            actions,
            resources,
        })
    }
}

impl Patterns {
    fn parse(
        obj: &Map<String, Value>,
        field: &str,
        name: &str,
        check: fn(&str, &str) -> Result<(), Error>,
    ) -> Result<Patterns, Error> {
        let not = format!("Not{name}");
        let (negated, key, v) = match (obj.get(name), obj.get(&not)) {
            (Some(v), None) => (false, name, v),
            (None, Some(v)) => (true, not.as_str(), v),
            (Some(_), Some(_)) => {
                return Err(err(
                    &format!("{field}.{not}"),
                    format!("only one of {name} and {not} may be given"),
                ));
            }
            (None, None) => {
                return Err(err(
                    &format!("{field}.{name}"),
                    format!("{name} or {not} is required"),
                ));
            }
        };
        let at = format!("{field}.{key}");
        let list: Vec<String> = match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(&format!("{at}[{i}]"), "must be a string"))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(err(&at, "must be a string or a non-empty list of strings")),
        };
        for (i, p) in list.iter().enumerate() {
            let at = if matches!(v, Value::Array(_)) {
                format!("{at}[{i}]")
            } else {
                at.clone()
            };
            check(p, &at)?;
        }
        Ok(Patterns { negated, list })
    }

    fn matches(&self, value: &str, case_insensitive: bool) -> bool {
        let hit = self
            .list
            .iter()
            .any(|p| wildcard_match(p, value, case_insensitive));
        hit != self.negated
    }
}

fn check_action(p: &str, at: &str) -> Result<(), Error> {
    if p == "*" {
        return Ok(());
    }
    let Some((service, name)) = p.split_once(':') else {
        return Err(err(
            at,
            format!("{p:?} must be service:Action (appmesh:DescribeMesh, appmesh:Describe*) or *"),
        ));
    };
    let service_ok = !service.is_empty()
        && service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !service_ok || name.is_empty() {
        return Err(err(
            at,
            format!("{p:?} must be service:Action (appmesh:DescribeMesh, appmesh:Describe*) or *"),
        ));
    }
    let ours = service.eq_ignore_ascii_case("appmesh") || service.eq_ignore_ascii_case("trellis");
    let literal = !p.contains(['*', '?']);
    if ours && literal && !KNOWN_ACTIONS.iter().any(|a| a.eq_ignore_ascii_case(p)) {
        return Err(err(at, format!("{p:?} is not an action Trellis knows")));
    }
    if ours && !literal && !KNOWN_ACTIONS.iter().any(|a| wildcard_match(p, a, true)) {
        return Err(err(at, format!("{p:?} matches no action Trellis knows")));
    }
    Ok(())
}

fn check_resource(p: &str, at: &str) -> Result<(), Error> {
    if p.contains("${") {
        return Err(err(at, "policy variables (${...}) are not supported"));
    }
    if p == "*" {
        return Ok(());
    }
    if !p.starts_with("arn:") || p.splitn(6, ':').count() < 6 {
        return Err(err(
            at,
            format!(
                "{p:?} must be * or an ARN (arn:aws:appmesh:REGION:ACCOUNT:mesh/NAME, wildcards allowed)"
            ),
        ));
    }
    Ok(())
}

/// IAM's wildcards: `*` matches any run of characters (also `:` and `/`), `?` any one.
pub fn wildcard_match(pattern: &str, value: &str, case_insensitive: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let eq = |a: char, b: char| {
        if case_insensitive {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut vi) = (0, 0);
    // Where the last `*` was and where in the value it began matching, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, vi));
                pi += 1;
            }
            Some(&c) if c == '?' || eq(c, v[vi]) => {
                pi += 1;
                vi += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    pi = sp + 1;
                    vi = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests;
