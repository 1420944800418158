//! The text form of an explanation: one block per decision, the App Mesh fields behind it marked
//! `←`, routes passed over and why, then the outcome (and, for a refusal, what to change).

use std::fmt::Write;

use super::{Direction, Explanation, Field, Outcome};

const INDENT: &str = "                    ";

/// The explanation as a terminal shows it.
pub fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let mesh_prefix = e.proxy.split('/').take(2).collect::<Vec<_>>().join("/") + "/";
    let short = |r: &str| r.strip_prefix(&mesh_prefix).unwrap_or(r).to_string();
    let way = match e.direction {
        Direction::Outbound => "through",
        Direction::Inbound => "into",
    };
    let _ = writeln!(
        out,
        "{} {} {way} {}",
        e.request.method,
        e.request.url(),
        e.proxy
    );
    if e.request.authority != authority_of_url(e) || !e.request.headers.is_empty() {
        let mut hs = vec![format!("host: {}", e.request.authority)];
        hs.extend(e.request.headers.iter().map(|(n, v)| format!("{n}: {v}")));
        let _ = writeln!(out, "  headers: {}", hs.join("; "));
    }
    out.push('\n');
    let fields = |out: &mut String, from: &[Field], pad: &str| {
        for f in from {
            let _ = writeln!(
                out,
                "{pad}← {} {} = {}",
                short(&f.resource),
                f.field,
                f.value
            );
        }
    };
    for s in &e.steps {
        let _ = writeln!(out, "{:<19} {}", s.stage.as_str(), s.envoy);
        let _ = writeln!(out, "{INDENT}{}", s.decision);
        fields(&mut out, &s.from, INDENT);
        for p in &s.passed {
            let _ = writeln!(out, "{INDENT}passed over {}: {}", p.envoy, p.reason);
            fields(&mut out, &p.from, &format!("{INDENT}  "));
        }
    }
    let _ = write!(out, "{:<19} ", "outcome");
    match &e.outcome {
        Outcome::Forwarded {
            authority,
            path,
            targets,
        } => {
            let _ = writeln!(
                out,
                "forwarded as {} {path} with Host {authority}",
                e.request.method
            );
            for t in targets {
                target(&mut out, t);
            }
        }
        Outcome::Proxied { targets } => {
            let _ = writeln!(out, "proxied (TCP)");
            for t in targets {
                target(&mut out, t);
            }
        }
        Outcome::LocalReply {
            status,
            reason,
            fix,
        } => {
            let _ = writeln!(out, "Envoy answers {status} itself");
            let _ = writeln!(out, "{INDENT}{reason}");
            for f in fix {
                let _ = writeln!(
                    out,
                    "{INDENT}fix: {} {}: {}",
                    short(&f.resource),
                    f.field,
                    f.change
                );
            }
        }
        Outcome::Closed { reason, fix } => {
            let _ = writeln!(out, "connection closed");
            let _ = writeln!(out, "{INDENT}{reason}");
            for f in fix {
                let _ = writeln!(
                    out,
                    "{INDENT}fix: {} {}: {}",
                    short(&f.resource),
                    f.field,
                    f.change
                );
            }
        }
    }
    out
}

fn target(out: &mut String, t: &super::Target) {
    let node = t
        .virtual_node
        .as_ref()
        .map_or(String::new(), |n| format!(" (virtual node {n})"));
    let at = if t.endpoints.is_empty() {
        t.note.clone().unwrap_or_else(|| "no endpoints".into())
    } else {
        t.endpoints.join(", ")
    };
    let _ = writeln!(
        out,
        "{INDENT}{:>5.1}% {}{node} → {at}",
        t.share * 100.0,
        t.cluster
    );
}

fn authority_of_url(e: &Explanation) -> String {
    let r = &e.request;
    let host = if r.host.contains(':') {
        format!("[{}]", r.host)
    } else {
        r.host.clone()
    };
    let default = match r.scheme {
        super::Scheme::Https => 443,
        _ => 80,
    };
    if r.port == default {
        host
    } else {
        format!("{host}:{}", r.port)
    }
}
