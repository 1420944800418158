//! Envoy attestation on the ADS Unix socket (`--xds-attestation ecs`): real Envoys in container
//! cgroups named as ECS names them, the ECS agent's introspection API (a stand-in), task
//! definitions in moto's ECS. Only the Envoy of the container whose task definition names a node
//! gets that node's configuration; a restart with the ECS API down keeps known tasks served.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::dynamo::{Moto, aws_env};
use trellis_tests::ecs::{
    Cgroups, Introspection, in_cgroup, register_task_definition, wait_refused,
};
use trellis_tests::mesh::{
    Agent, AgentOpts, Task, Vpc, rewrite, run_route_manager, start_envoy_in,
};
use trellis_tests::scenario::{
    BACK_BODY, BACK_URL, app_taskdef, back_front_items, back_spec, resources_file,
};
use trellis_tests::{Proc, Workdir, bin, can_run_privileged, check, eventually, free_port};

/// An Envoy started as `trellis-agent bootstrap` makes it for node `claims`, on the host's
/// network, in `cgroup` when given: a process trying its luck on the socket.
fn envoy_claiming(
    work: &Workdir,
    name: &str,
    claims: &str,
    socket: &Path,
    cgroup: Option<&Path>,
) -> Proc {
    let boot = work.join(&format!("bootstrap-{name}.json"));
    check(
        Command::new(bin("trellis-agent"))
            .args(["bootstrap", "--output"])
            .arg(&boot)
            .env_clear()
            .env("APPMESH_RESOURCE_ARN", claims)
            .env(
                "APPMESH_XDS_ENDPOINT",
                format!("unix://{}", socket.display()),
            )
            .env("ENVOY_ADMIN_ACCESS_PORT", free_port().to_string())
            .env("ENVOY_ADMIN_ACCESS_LOG_FILE", "/dev/null"),
    );
    let envoy = work.stage(&trellis_tests::envoy()).display().to_string();
    let boot = boot.display().to_string();
    let args = [
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--",
        &envoy,
        "-c",
        &boot,
        "--disable-hot-restart",
        "--concurrency",
        "1",
    ];
    let argv: Vec<String> = match cgroup {
        Some(cg) => in_cgroup(cg, &args),
        None => args.iter().map(|a| a.to_string()).collect(),
    };
    Proc::spawn(
        &format!("envoy {name}"),
        Command::new(&argv[0]).args(&argv[1..]),
        work.join(&format!("envoy-{name}.log")),
    )
}

/// Streams the agent serves for `node`.
fn streams_of(agent: &Agent, node: &str) -> usize {
    agent
        .debug_xds()
        .as_object()
        .map(|s| s.values().filter(|s| s["node"] == node).count())
        .unwrap_or(0)
}

fn refused(agent: &Agent, reason: &str) -> f64 {
    agent.metric(&format!(
        "trellis_xds_refused_streams_total{{reason=\"{reason}\"}}"
    ))
}

#[test]
fn only_the_container_whose_task_definition_names_the_node_gets_it_even_with_ecs_down() {
    if !can_run_privileged("xds_attestation") {
        return;
    }
    let work = Workdir::new("attest");
    // Dropped last: every process in these cgroups has ended by then.
    let cgroups = Cgroups::new("attest");
    let moto = Moto::start(&work, "moto-ecs");
    let intro = Introspection::start(&work);
    let resources = resources_file(&work, &back_front_items(back_spec(), true));
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            resources: Some(&resources),
            args: [
                "--xds-attestation",
                "ecs",
                "--ecs-agent-uri",
                &intro.uri,
                "--ecs-endpoint",
                &moto.endpoint,
            ]
            .map(String::from)
            .to_vec(),
            env: aws_env(),
            ..AgentOpts::default()
        },
    );
    let socket = agent.socket_dir.join("xds.sock");

    // Two tasks as ECS runs them: each Envoy in its container's cgroup, the introspection API
    // naming the task, the task definition (trellis-rewrite's) registered in ECS.
    let mut vpc = Vpc::new(&work, 77);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let mut procs = Vec::new();
    let start = |task: &Task, name: &str, node: &str, ports: &[u16], procs: &mut Vec<Proc>| {
        let def: Value = rewrite(
            &work,
            &app_taskdef(name, ports),
            "m",
            node,
            &agent.socket_dir,
        );
        let revision = register_task_definition(&work, &moto.endpoint, &def);
        let container = cgroups.container(name);
        intro.add(&container, name, revision, "envoy");
        run_route_manager(task, &def);
        procs.push(start_envoy_in(&work, task, &def, &[], Some(&container.dir)));
        container
    };
    start(&back, "back", "back-vn", &[8080], &mut procs);
    procs.push(back.start_http_app(&work, 8080, BACK_BODY));
    let front_container = start(&front, "front", "front-vn", &[], &mut procs);
    let body = eventually(
        "front reaches back through two attested Envoys",
        Duration::from_secs(30),
        || front.http_get(None, BACK_URL),
    );
    assert_eq!(body, BACK_BODY);

    // A process in front's container claiming back's node: refused, back keeps its one stream.
    let before = refused(&agent, "attestation_wrong_node");
    let _impostor = envoy_claiming(
        &work,
        "impostor",
        "mesh/m/virtualNode/back-vn",
        &socket,
        Some(&front_container.dir),
    );
    wait_refused(&agent, "attestation_wrong_node", before);
    assert_eq!(streams_of(&agent, "mesh/m/virtualNode/back-vn"), 1);
    // Its load reports (LRS, same socket) are refused as its ADS stream was: no caller passes
    // traffic figures off as another node's.
    eventually(
        "the impostor's load reports are refused",
        Duration::from_secs(20),
        || {
            let log = agent.proc.log_text();
            log.lines()
                .any(|l| {
                    l.contains("load reports refused") && l.contains("mesh/m/virtualNode/back-vn")
                })
                .then_some(())
                .ok_or_else(|| {
                    "no refused load report stream for back-vn in the agent's log".to_string()
                })
        },
    );

    // A host process (no container cgroup) claiming front's node.
    let before = refused(&agent, "attestation_not_a_container");
    let _host = envoy_claiming(&work, "host", "mesh/m/virtualNode/front-vn", &socket, None);
    wait_refused(&agent, "attestation_not_a_container", before);

    // A container whose task definition names no node.
    let plain = app_taskdef("plain", &[]);
    let revision = register_task_definition(&work, &moto.endpoint, &plain);
    let plain_container = cgroups.container("plain");
    intro.add(&plain_container, "plain", revision, "app");
    let before = refused(&agent, "attestation_no_node");
    let _plain = envoy_claiming(
        &work,
        "plain",
        "mesh/m/virtualNode/front-vn",
        &socket,
        Some(&plain_container.dir),
    );
    wait_refused(&agent, "attestation_no_node", before);
    assert_eq!(streams_of(&agent, "mesh/m/virtualNode/front-vn"), 1);
    let log = agent.proc.log_text();
    assert!(
        log.contains("names no App Mesh node"),
        "the refusal's reason is not in the agent's log"
    );

    // A task ECS knows, started while the ECS API is down: its definition cannot be read.
    let late = rewrite(
        &work,
        &app_taskdef("late", &[]),
        "m",
        "front-vn",
        &agent.socket_dir,
    );
    let revision = register_task_definition(&work, &moto.endpoint, &late);
    let late_container = cgroups.container("late");
    intro.add(&late_container, "late", revision, "envoy");
    drop(moto);

    // The agent restarts while ECS is down: the Envoys it attested before are served again.
    let agent = agent.restart(&work);
    for node in ["mesh/m/virtualNode/front-vn", "mesh/m/virtualNode/back-vn"] {
        eventually(
            "a known task reconnects with ECS down",
            Duration::from_secs(30),
            || agent.xds_stream(node),
        );
    }
    let body = eventually(
        "traffic flows after the restart",
        Duration::from_secs(30),
        || front.http_get(None, BACK_URL),
    );
    assert_eq!(body, BACK_BODY);
    let before = refused(&agent, "attestation_ecs_unavailable");
    let _late = envoy_claiming(
        &work,
        "late",
        "mesh/m/virtualNode/front-vn",
        &socket,
        Some(&late_container.dir),
    );
    wait_refused(&agent, "attestation_ecs_unavailable", before);
    assert_eq!(streams_of(&agent, "mesh/m/virtualNode/front-vn"), 1);
    drop(procs);
}
