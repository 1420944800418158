//! Issue 17 at CI size: steady keep-alive load from a front task through real Envoys to a Cloud
//! Map service of back tasks while ECS moves tasks (`tests/src/churn.rs` reproduces its start and
//! stop sequences), at the default Cloud Map poll. Scenarios 1–5 must not lose one request; 6 (a
//! task killed outright) stays within its stated bound. The bench runs the same at full size.

use trellis_tests::can_run_privileged;
use trellis_tests::churn::{Size, Tally, run_scenario};

fn scenario(n: usize) -> Option<Tally> {
    if !can_run_privileged(&format!("churn scenario {n}")) {
        return None;
    }
    let t = run_scenario(n, &Size::ci());
    eprintln!("churn {n}: {t}");
    assert!(t.total() > 0, "the load ran");
    Some(t)
}

fn lossless(n: usize) {
    if let Some(t) = scenario(n) {
        assert_eq!(t.failed, 0, "scenario {n} lost requests: {t}");
    }
}

#[test]
fn rolling_replacement_of_every_back_task_loses_no_request() {
    lossless(1);
}

#[test]
fn scale_in_from_three_tasks_to_one_loses_no_request() {
    lossless(2);
}

#[test]
fn scale_out_from_one_task_to_three_loses_no_request_and_the_new_tasks_serve() {
    lossless(3);
}

#[test]
fn a_killed_and_restarted_agent_loses_no_request() {
    lossless(4);
}

#[test]
fn a_store_outage_under_two_agents_loses_no_request() {
    lossless(5);
}

/// The bound for a task killed outright (no deregistration): a try that meets it is retried on
/// another task, so only a response it had begun to send when it died can be lost, at most one
/// per client connection.
#[test]
fn a_back_task_killed_outright_loses_at_most_the_answers_it_had_begun() {
    if let Some(t) = scenario(6) {
        let bound = Size::ci().clients as u64;
        assert!(t.failed <= bound, "scenario 6 lost more than {bound}: {t}");
    }
}
