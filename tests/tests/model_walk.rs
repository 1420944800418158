//! The test generated from botocore's App Mesh model (`tests/py/model_walk.py`), against a freshly
//! started agent: every operation round-trips a valid request built from the model, and every
//! constraint the model states is enforced with a BadRequestException naming the field.

use std::process::Command;

use trellis_tests::mesh::Agent;
use trellis_tests::{Workdir, run, venv};

#[test]
fn every_operation_round_trips_and_every_model_constraint_is_a_bad_request_naming_the_field() {
    let work = Workdir::new("model-walk");
    let agent = Agent::start(&work, None);
    let out = run(Command::new(venv().join("bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/model_walk.py"))
        .args(["--endpoint", &agent.api])
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "model walk failed ({}):\n{report}",
        out.status
    );
    assert!(
        report.contains("operations: 38 of 38"),
        "the walk did not reach every operation:\n{report}"
    );
    // The counts (operations, constraints, requests), visible with --nocapture.
    println!("{report}");
}
