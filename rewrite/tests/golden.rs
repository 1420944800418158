//! Golden tests over realistic task definitions in `tests/fixtures/NAME/`: `input.json` and `args` (the
//! CLI flags, one per line) go through the binary and must print exactly `expected.json`; when
//! `expected.diff` exists, `--diff` must print exactly that. Every expected output is a fixed point and
//! passes botocore's `RegisterTaskDefinition` validation. `UPDATE_EXPECT=1` rewrites the expected files.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{botocore_validate, fixture_args, fixtures, ok, rewrite_cmd};

/// Compares `actual` with the file, or writes it under `UPDATE_EXPECT`; returns a mismatch message.
fn expect_file(path: &Path, actual: &str) -> Option<String> {
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(path, actual).expect("write expected file");
        return None;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return None;
    }
    let diff = trellis_rewrite::diff(&expected, actual, "expected", "actual");
    Some(format!(
        "{} differs (UPDATE_EXPECT=1 to accept):\n{diff}",
        path.display()
    ))
}

#[test]
fn fixtures_match_their_expected_output() {
    let dirs = fixtures();
    assert!(dirs.len() >= 6, "fixtures missing: {dirs:?}");
    let mut failures = Vec::new();
    let mut outputs = Vec::new();
    for dir in &dirs {
        let name = dir
            .file_name()
            .expect("dir name")
            .to_string_lossy()
            .into_owned();
        let args = fixture_args(dir);
        let input = dir.join("input.json");
        let out = ok(rewrite_cmd().args(&args).arg(&input));
        failures.extend(expect_file(&dir.join("expected.json"), &out));

        // A fixed point: meshing the output again prints it unchanged, and --diff shows nothing.
        let again = ok(rewrite_cmd().args(&args).arg(dir.join("expected.json")));
        if again != out {
            failures.push(format!("{name}: rewriting the output changes it"));
        }
        let no_diff = ok(rewrite_cmd()
            .args(&args)
            .arg("--diff")
            .arg(dir.join("expected.json")));
        if !no_diff.is_empty() {
            failures.push(format!(
                "{name}: --diff of the output is not empty:\n{no_diff}"
            ));
        }

        if dir.join("expected.diff").exists() {
            let diff = ok(rewrite_cmd()
                .current_dir(dir)
                .args(&args)
                .args(["--diff", "input.json"]));
            failures.extend(expect_file(&dir.join("expected.diff"), &diff));
        }
        outputs.push((
            name,
            serde_json::from_str::<Value>(&out).expect("JSON output"),
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    botocore_validate(&outputs);
}
