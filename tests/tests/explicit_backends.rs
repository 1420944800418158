//! Explicit-backend mode on real Envoy: a task without a redirect (bridge or host network mode)
//! reaches its backends through Envoy as its HTTP proxy, with the variables `trellis-rewrite` gave
//! its app container.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use trellis_tests::mesh::{Agent, Vpc, container, env_of, rewrite_with, start_envoy};
use trellis_tests::scenario::{
    BACK_BODY, EGRESS_CLUSTER, TaskSpec, app_taskdef, back_front_items, back_spec, resources_file,
    start_tasks,
};
use trellis_tests::{Workdir, can_run_privileged, eventually, run};

#[test]
fn an_app_without_redirect_reaches_its_backend_through_envoy_as_http_proxy() {
    if !can_run_privileged("explicit backends") {
        return;
    }
    let work = Workdir::new("explicit");
    let resources = resources_file(&work, &back_front_items(back_spec(), true));
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 13);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let back_spec = TaskSpec {
        name: "back",
        node: "back-vn",
        app: Some((8080, BACK_BODY)),
    };
    let mut procs = start_tasks(&work, &agent, "m", &[(&back, &back_spec)], &|_| {});

    // The front task runs in host network mode: no route manager, no iptables redirect.
    let mut input = app_taskdef("front", &[]);
    input["networkMode"] = json!("host");
    let def = rewrite_with(
        &work,
        &input,
        "m",
        "front-vn",
        &agent.socket_dir,
        &["--explicit-backends"],
    );
    let names: Vec<_> = def["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["app", "envoy"], "no route manager in explicit mode");
    procs.push(start_envoy(&work, &front, &def));
    let nat = front.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        !nat.contains("APPMESH"),
        "explicit mode installs no redirect:\n{nat}"
    );

    // curl as the app container would run it: with the container's environment.
    let app_env = env_of(container(&def, "app"));
    let get = |url: &str| {
        let mut cmd: Command = front.cmd(&["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", url]);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &app_env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = front.envoy_stat(9901, EGRESS_CLUSTER);
    let answer = eventually(
        "front reaches back.local through Envoy",
        Duration::from_secs(20),
        || {
            let out = get("http://back.local:8080/");
            if out.ends_with("\n200") {
                Ok(out)
            } else {
                Err(out)
            }
        },
    );
    assert!(answer.starts_with(BACK_BODY), "{answer}");
    assert!(
        front.envoy_stat(9901, EGRESS_CLUSTER) > before,
        "the request went through the front Envoy's egress cluster"
    );
    // Envoy answers for names the node did not declare: not found, not passed anywhere.
    let unknown = get("http://elsewhere.local:8080/");
    assert!(unknown.ends_with("\n404"), "{unknown}");
    drop(procs);
}
