//! Envoy's matchers, as Envoy 1.40 evaluates them: strings (exact, prefix, suffix, contains,
//! RE2-style regex over the whole value), headers (missing headers, `invert_match`,
//! `treat_missing_header_as_empty`, repeated headers joined by `,`), query parameters, path
//! specifiers (against the path without its query), virtual host domains (exact, then `*suffix`
//! longest first, then `prefix*`, then `*`), path normalization, and the listener filter
//! predicates that switch the TLS inspector on or off.

use std::net::IpAddr;

use trellis_envoy_api::pb::envoy::config::core::v3::CidrRange;
use trellis_envoy_api::pb::envoy::config::listener::v3::{
    ListenerFilterChainMatchPredicate, listener_filter_chain_match_predicate as predicate,
};
use trellis_envoy_api::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, header_matcher, query_parameter_matcher, route_match,
};
use trellis_envoy_api::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

/// Whether `re` matches all of `value` (Envoy's `safe_regex` is a full match). A regex the
/// regex crate does not take matches nothing, as Envoy refuses such a config.
pub(crate) fn regex_full(re: &str, value: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(value))
}

/// A `StringMatcher` against `value`.
pub(crate) fn string(m: &StringMatcher, value: &str) -> bool {
    use string_matcher::MatchPattern as P;
    let fold = |s: &str| {
        if m.ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    let v = fold(value);
    match &m.match_pattern {
        Some(P::Exact(e)) => v == fold(e),
        Some(P::Prefix(p)) => v.starts_with(&fold(p)),
        Some(P::Suffix(s)) => v.ends_with(&fold(s)),
        Some(P::Contains(c)) => v.contains(&fold(c)),
        // ignore_case does not apply to regexes (Envoy's own rule).
        Some(P::SafeRegex(r)) => regex_full(&r.regex, value),
        Some(P::Custom(_)) | None => false,
    }
}

/// How a `StringMatcher` reads, for explanations.
pub(crate) fn describe_string(m: &StringMatcher) -> String {
    use string_matcher::MatchPattern as P;
    let case = if m.ignore_case { " (any case)" } else { "" };
    let s = match &m.match_pattern {
        Some(P::Exact(e)) => format!("equals {e:?}"),
        Some(P::Prefix(p)) => format!("starts with {p:?}"),
        Some(P::Suffix(s)) => format!("ends with {s:?}"),
        Some(P::Contains(c)) => format!("contains {c:?}"),
        Some(P::SafeRegex(r)) => format!("matches the regex {:?}", r.regex),
        Some(P::Custom(c)) => format!("passes the custom matcher {}", c.name),
        None => "is anything".into(),
    };
    format!("{s}{case}")
}

/// The request's headers as routing sees them: pseudo-headers first, then the rest.
#[derive(Clone, Debug, Default)]
pub(crate) struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// Every value of `name`, joined by `,` as Envoy joins repeated headers before matching.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    pub(crate) fn set(&mut self, name: &str, value: &str) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.0.push((name.to_string(), value.to_string())),
        }
    }
}

/// A header condition: whether it holds and, when not, why.
pub(crate) fn header(h: &HeaderMatcher, headers: &Headers) -> Result<(), String> {
    use header_matcher::HeaderMatchSpecifier as S;
    let present = match &h.header_match_specifier {
        Some(S::PresentMatch(p)) => Some(*p),
        None => Some(true),
        _ => None,
    };
    let value = headers.get(&h.name);
    let Some(value) = value.or_else(|| h.treat_missing_header_as_empty.then(String::new)) else {
        // Absent: only a presence test can hold (Envoy's HeaderUtility::matchHeaders).
        let holds = match present {
            Some(p) => p == h.invert_match,
            None => false,
        };
        return if holds {
            Ok(())
        } else {
            Err(format!("the request has no {} header", h.name))
        };
    };
    #[allow(deprecated, reason = "Envoy still honours the deprecated matchers")]
    let (holds, what) = match &h.header_match_specifier {
        Some(S::ExactMatch(e)) => (e.is_empty() || value == *e, format!("equals {e:?}")),
        Some(S::SafeRegexMatch(r)) => (
            regex_full(&r.regex, &value),
            format!("matches the regex {:?}", r.regex),
        ),
        Some(S::RangeMatch(r)) => (
            value
                .parse::<i64>()
                .is_ok_and(|n| n >= r.start && n < r.end),
            format!("is an integer in [{}, {})", r.start, r.end),
        ),
        Some(S::PresentMatch(p)) => (*p, "is present".into()),
        Some(S::PrefixMatch(p)) => (value.starts_with(p.as_str()), format!("starts with {p:?}")),
        Some(S::SuffixMatch(s)) => (value.ends_with(s.as_str()), format!("ends with {s:?}")),
        Some(S::ContainsMatch(c)) => (value.contains(c.as_str()), format!("contains {c:?}")),
        Some(S::StringMatch(m)) => (string(m, &value), describe_string(m)),
        None => (true, "is present".into()),
    };
    if holds != h.invert_match {
        Ok(())
    } else if h.invert_match {
        Err(format!(
            "{} is {value:?}, and the route wants it not to be: it {what}",
            h.name
        ))
    } else {
        Err(format!(
            "{} is {value:?}; the route wants a value that {what}",
            h.name
        ))
    }
}

/// The query string of `path` as name → value pairs, percent-decoded, in order.
pub(crate) fn query_params(path: &str) -> Vec<(String, String)> {
    let Some((_, q)) = path.split_once('?') else {
        return vec![];
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(n), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// A query parameter condition (Envoy uses the first value of a repeated parameter).
pub(crate) fn query(q: &QueryParameterMatcher, params: &[(String, String)]) -> Result<(), String> {
    use query_parameter_matcher::QueryParameterMatchSpecifier as S;
    let Some((_, value)) = params.iter().find(|(n, _)| *n == q.name) else {
        return Err(format!("the query has no parameter {:?}", q.name));
    };
    match &q.query_parameter_match_specifier {
        Some(S::StringMatch(m)) if !string(m, value) => Err(format!(
            "query parameter {} is {value:?}; the route wants a value that {}",
            q.name,
            describe_string(m)
        )),
        _ => Ok(()),
    }
}

/// The path without its query string or fragment: what Envoy's path specifiers see.
pub(crate) fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// A route's path specifier against the path: whether it holds and, when not, why.
pub(crate) fn path(
    spec: Option<&route_match::PathSpecifier>,
    case_sensitive: bool,
    full_path: &str,
) -> Result<(), String> {
    use route_match::PathSpecifier as P;
    let p = path_only(full_path);
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let (holds, what) = match spec {
        Some(P::Prefix(pre)) => (
            fold(p).starts_with(&fold(pre)),
            format!("the prefix {pre:?}"),
        ),
        Some(P::Path(exact)) => (fold(p) == fold(exact), format!("exactly {exact:?}")),
        Some(P::SafeRegex(r)) => (regex_full(&r.regex, p), format!("the regex {:?}", r.regex)),
        Some(P::PathSeparatedPrefix(pre)) => (
            p == pre || p.starts_with(&format!("{pre}/")),
            format!("the path-separated prefix {pre:?}"),
        ),
        Some(P::ConnectMatcher(_)) => (false, "CONNECT requests".into()),
        Some(P::PathMatchPolicy(x)) => (false, format!("the path policy {}", x.name)),
        None => (false, "no path".into()),
    };
    if holds {
        Ok(())
    } else {
        Err(format!("the path {p:?} does not match {what}"))
    }
}

/// How a virtual host domain matched a host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DomainMatch {
    Exact,
    /// `*.example.com`: longer suffixes first.
    Suffix(std::cmp::Reverse<usize>),
    /// `example.*`: longer prefixes first.
    Prefix(std::cmp::Reverse<usize>),
    Any,
}

/// How `domain` matches `host` (already lowercased), if it does. A wildcard never matches the
/// empty string.
pub(crate) fn domain(domain: &str, host: &str) -> Option<DomainMatch> {
    let d = domain.to_ascii_lowercase();
    if d == "*" {
        return Some(DomainMatch::Any);
    }
    if let Some(suffix) = d.strip_prefix('*') {
        return (host.len() > suffix.len() && host.ends_with(suffix))
            .then_some(DomainMatch::Suffix(std::cmp::Reverse(suffix.len())));
    }
    if let Some(prefix) = d.strip_suffix('*') {
        return (host.len() > prefix.len() && host.starts_with(prefix))
            .then_some(DomainMatch::Prefix(std::cmp::Reverse(prefix.len())));
    }
    (d == host).then_some(DomainMatch::Exact)
}

/// `path` as Envoy's `normalize_path` leaves it: backslashes as slashes, percent-encoded
/// unreserved characters decoded, `.` and `..` segments resolved (never above the root). The
/// query is left alone. (Envoy's canonicalizer also escapes characters a path may not hold; a
/// request here cannot hold them: `Request::parse` refuses them.)
pub(crate) fn normalize(path: &str) -> String {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut decoded = String::with_capacity(p.len());
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(c as char);
            } else {
                decoded.push_str(&p[i..i + 3]);
            }
            i += 3;
            continue;
        }
        decoded.push(if b[i] == b'\\' { '/' } else { b[i] as char });
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, s) in segments.iter().enumerate() {
        match *s {
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = format!("/{}", out.join("/"));
    if trailing && !normal.ends_with('/') {
        normal.push('/');
    }
    match q {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    }
}

/// `merge_slashes`: runs of `/` in the path (not the query) become one.
pub(crate) fn merge_slashes(path: &str) -> String {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    match q {
        Some(q) => format!("{out}?{q}"),
        None => out,
    }
}

/// A listener filter's `filter_disabled` predicate for a connection to `port`.
pub(crate) fn predicate(p: &ListenerFilterChainMatchPredicate, port: u32) -> bool {
    use predicate::Rule;
    match &p.rule {
        Some(Rule::OrMatch(set)) => set.rules.iter().any(|r| predicate(r, port)),
        Some(Rule::AndMatch(set)) => set.rules.iter().all(|r| predicate(r, port)),
        Some(Rule::NotMatch(r)) => !predicate(r, port),
        Some(Rule::AnyMatch(any)) => *any,
        Some(Rule::DestinationPortRange(r)) => {
            i64::from(port) >= i64::from(r.start) && i64::from(port) < i64::from(r.end)
        }
        None => false,
    }
}

/// The prefix length by which `range` holds `ip`, if it does.
pub(crate) fn cidr(range: &CidrRange, ip: IpAddr) -> Option<u32> {
    let base: IpAddr = range.address_prefix.parse().ok()?;
    let len = range.prefix_len.as_ref().map_or(0, |l| l.value);
    let holds = match (base, ip) {
        (IpAddr::V4(b), IpAddr::V4(i)) => {
            let len = len.min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(b) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(b), IpAddr::V6(i)) => {
            let len = len.min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(b) & mask == u128::from(i) & mask
        }
        _ => false,
    };
    holds.then_some(len)
}

#[cfg(test)]
mod tests;
