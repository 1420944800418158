//! The README's main job: a live two-task mesh on the embedded store, narrated step by step.

use std::time::Duration;

use trellis_tests::scenario::{ADMIN_PORT, BACK_URL, EGRESS_CLUSTER, INGRESS_CLUSTER, two_tasks};
use trellis_tests::{Workdir, can_run_privileged};

fn say(line: &str) {
    eprintln!("[trellis-demo] {line}");
}

fn main() {
    if !can_run_privileged("trellis-demo") {
        std::process::exit(1);
    }
    let work = Workdir::new("demo");
    let mesh = two_tasks(&work, &say);
    say(&format!(
        "{} processes running; front's app now calls {BACK_URL}",
        mesh.processes()
    ));
    let mut answer = Err(String::new());
    for _ in 0..50 {
        answer = mesh.front.http_get(None, BACK_URL);
        if answer.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match &answer {
        Ok(body) => say(&format!("front got: {body:?}")),
        Err(e) => say(&format!("front got no answer: {e}")),
    }
    say(&format!(
        "front Envoy {EGRESS_CLUSTER} = {}; back Envoy {INGRESS_CLUSTER} = {}",
        mesh.front.envoy_stat(ADMIN_PORT, EGRESS_CLUSTER),
        mesh.back.envoy_stat(ADMIN_PORT, INGRESS_CLUSTER)
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
    let mut refused = None;
    for _ in 0..50 {
        if let Err(e) = mesh.front.http_get(None, BACK_URL) {
            refused = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match &refused {
        Some(e) => say(&format!("front's request is now refused: {e}")),
        None => say("front's request was still answered after 10 s"),
    }
    let ok = answer.is_ok() && refused.is_some();
    say(if ok {
        "done: the mesh behaved as App Mesh would"
    } else {
        "FAILED: see the logs above"
    });
    drop(mesh);
    std::process::exit(if ok { 0 } else { 1 });
}
