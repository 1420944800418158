//! House rules that a reader of ARCHITECTURE.md and docs/style.md relies on, checked over the
//! source tree rather than only written down (rust-analyzer's tidy tests are the model).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively, but generated code.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                if p.file_name()
                    .is_some_and(|n| n != "generated" && n != "target")
                {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The `src` directories of the workspace's crates.
fn crate_sources() -> Vec<PathBuf> {
    let root = trellis_tests::workspace_root();
    [
        "model",
        "envoy-api",
        "translate",
        "explain",
        "agent",
        "rewrite",
        "proxy-route-manager",
        "tests",
    ]
    .iter()
    .map(|c| root.join(c).join("src"))
    .collect()
}

fn relative(p: &Path) -> String {
    p.strip_prefix(trellis_tests::workspace_root())
        .unwrap_or(p)
        .display()
        .to_string()
}

/// The inline `mod tests { … }` at the end of a file: its length in lines.
fn inline_tests_len(text: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| *l == "mod tests {")?;
    Some(lines.len() - start)
}

/// One place for unit tests: short ones inline at the end of the file (`mod tests { … }`), longer
/// ones in `foo/tests.rs` beside `foo.rs` (linkerd2-proxy's layout); no `foo_tests.rs`, no
/// `#[path]` tricks.
#[test]
fn unit_tests_live_inline_when_short_and_in_foo_slash_tests_rs_otherwise() {
    const INLINE_MAX: usize = 100;
    let mut wrong = Vec::new();
    for src in crate_sources() {
        for file in rust_files(&src) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let text = std::fs::read_to_string(&file).expect("read source");
            if name.ends_with("_tests.rs") {
                wrong.push(format!("{}: name it <module>/tests.rs", relative(&file)));
            }
            if text.contains("#[path") {
                wrong.push(format!("{}: no #[path] modules", relative(&file)));
            }
            if name == "tests.rs" {
                let dir = file.parent().expect("parent");
                let owner_file = dir.with_extension("rs");
                let owner_mod = dir.join("mod.rs");
                let root = dir == src;
                if !(root || owner_file.exists() || owner_mod.exists()) {
                    wrong.push(format!("{}: no module beside it owns it", relative(&file)));
                }
            }
            if let Some(n) = inline_tests_len(&text)
                && n > INLINE_MAX
            {
                wrong.push(format!(
                    "{}: {n} lines of inline tests; move them to <module>/tests.rs",
                    relative(&file)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every non-test module says what it is for in its first line.
#[test]
fn every_module_starts_with_a_doc_comment() {
    let mut missing = Vec::new();
    for src in crate_sources() {
        for file in rust_files(&src) {
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read source");
            if !text.starts_with("//!") {
                missing.push(relative(&file));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a `//!` first line: {missing:?}"
    );
}

/// Translation's rule (ARCHITECTURE.md): proto structure is spelled only in the builders of
/// Envoy output (`envoy.rs`: listeners, clusters, filters, TLS; `routes.rs`: routes; `gateway.rs`:
/// gateway routes). The planning and policy modules call those builders and pass values on: they
/// may name a proto type (a return type, an `impl`), never build one field by field or reach
/// into a oneof.
#[test]
fn only_the_envoy_builders_spell_proto_structure() {
    const BUILDERS: [&str; 3] = ["envoy.rs", "routes.rs", "gateway.rs"];
    let src = trellis_tests::workspace_root().join("translate/src");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in rust_files(&src) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if BUILDERS.contains(&name) || name == "tests.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        // Only the code before the file's own tests.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let imported = proto_imports(code);
        checked += 1;
        for (n, line) in code.lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for ty in &imported {
                if ty.starts_with(|c: char| c.is_ascii_lowercase()) {
                    if l.contains(&format!("{ty}::")) && !l.starts_with("use ") {
                        wrong.push(format!(
                            "{}:{}: reaches into the oneof {ty}",
                            relative(&file),
                            n + 1
                        ));
                    }
                    continue;
                }
                let literal = format!("{ty} {{");
                let builds = l.match_indices(&literal).any(|(at, _)| {
                    let before = &l[..at];
                    let whole_word = !before.ends_with(|c: char| c.is_alphanumeric() || c == '_');
                    let named_only = ["-> ", "for ", "impl ", "struct ", "enum "]
                        .iter()
                        .any(|p| before.ends_with(p));
                    whole_word && !named_only
                });
                if builds && !l.starts_with("use ") {
                    wrong.push(format!("{}:{}: builds {ty}", relative(&file), n + 1));
                }
            }
            if l.contains("pb::") && !l.starts_with("use ") {
                wrong.push(format!(
                    "{}:{}: names a proto path outside an import",
                    relative(&file),
                    n + 1
                ));
            }
        }
    }
    assert!(checked >= 6, "the planning modules were read: {checked}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The last path segment of every name imported from `trellis_envoy_api::pb` (types and oneof
/// modules), following `{…}` groups across lines.
fn proto_imports(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use trellis_envoy_api::pb::") {
        let stmt = &rest[at..];
        let end = stmt.find(';').unwrap_or(stmt.len());
        let stmt = &stmt[..end];
        let list = match (stmt.find('{'), stmt.rfind('}')) {
            (Some(a), Some(b)) => &stmt[a + 1..b],
            _ => stmt.rsplit("::").next().unwrap_or(""),
        };
        for item in list.split(',') {
            let item = item.trim();
            let name = item
                .rsplit(" as ")
                .next()
                .unwrap_or(item)
                .rsplit("::")
                .next()
                .unwrap_or("")
                .trim();
            if !name.is_empty() && name != "self" {
                names.push(name.to_string());
            }
        }
        rest = &rest[at + end..];
    }
    names
}
