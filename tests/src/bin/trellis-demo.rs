//! The README's main job: a live two-task mesh on the embedded store, narrated step by step.
//!
//! `main` returns its exit code rather than calling `std::process::exit`, so every guard (the
//! processes, the namespaces, the working directory) is dropped before the process ends.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use trellis_tests::scenario::{ADMIN_PORT, BACK_URL, EGRESS_CLUSTER, INGRESS_CLUSTER, two_tasks};
use trellis_tests::{Workdir, can_run_privileged};

fn say(line: &str) {
    eprintln!("[trellis-demo] {line}");
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `limit`.
fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The demo itself; true when the mesh behaved as App Mesh would. Everything it started is
/// stopped when it returns (or panics).
fn demo(work: &Workdir) -> bool {
    let mesh = two_tasks(work, &say);
    say(&format!(
        "{} processes running; front's app now calls {BACK_URL}",
        mesh.processes()
    ));
    let mut last = String::new();
    let answer = within(Duration::from_secs(10), || {
        mesh.front
            .http_get(None, BACK_URL)
            .map_err(|e| last = e)
            .ok()
    });
    match &answer {
        Some(body) => say(&format!("front got: {body:?}")),
        None => say(&format!("front got no answer within 10 s: {last}")),
    }
    say(&format!(
        "front Envoy {EGRESS_CLUSTER} = {}; back Envoy {INGRESS_CLUSTER} = {}",
        mesh.front.envoy_stat(ADMIN_PORT, EGRESS_CLUSTER),
        mesh.back.envoy_stat(ADMIN_PORT, INGRESS_CLUSTER)
    ));
    let unsigned = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/v20190125/meshes", mesh.agent.api))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    say(&format!(
        "an unsigned request to the API gets HTTP {unsigned} (MissingAuthenticationTokenException); \
         the AWS CLI signs with the agent's administrator key"
    ));
    say(
        "aws appmesh update-virtual-node front-vn --spec '{}' (remove the backend; mesh egress is DROP_ALL)",
    );
    mesh.agent.appmesh(&[
        "update-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "front-vn",
        "--spec",
        "{}",
    ]);
    let refused = within(Duration::from_secs(10), || {
        mesh.front.http_get(None, BACK_URL).err()
    });
    match &refused {
        Some(e) => {
            say(&format!("front's request is now refused, as expected: {e}"));
            say(
                "  (that error is the point: front's Envoy no longer has back.local among its \
                 destinations and closes the connection unanswered, which curl reports as \
                 'Connection reset by peer' or 'Empty reply from server'; that is how DROP_ALL refuses)",
            );
        }
        None => say("front's request was still answered after 10 s"),
    }
    say("stopping the Envoys, the apps, dnsmasq and the agent; removing the namespaces");
    answer.is_some() && refused.is_some() && unsigned == "403"
}

fn main() -> ExitCode {
    say("the two-task mesh demo: agent, two awsvpc-like task namespaces, two Envoys (about 20 s)");
    if !can_run_privileged("trellis-demo") {
        return ExitCode::FAILURE;
    }
    let work = Workdir::new("demo");
    if demo(&work) {
        say("done: the mesh behaved as App Mesh would");
        ExitCode::SUCCESS
    } else {
        say(&format!(
            "FAILED: see the lines above; logs kept in {}",
            work.keep().display()
        ));
        ExitCode::FAILURE
    }
}
