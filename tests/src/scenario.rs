//! The two-task mesh of the walking skeleton, shared by its end-to-end test and the demo:
//! `front-vn` calls virtual service `back.local`, provided by `back-vn` (http 8080, DNS discovery).

use std::fs;

use serde_json::{Value, json};

use crate::mesh::{Agent, Task, Vpc, rewrite, run_route_manager, start_envoy};
use crate::{Proc, Workdir};

pub const ADMIN_PORT: u16 = 9901;
pub const BACK_URL: &str = "http://back.local:8080/";
pub const BACK_BODY: &str = "hello from back";
pub const EGRESS_CLUSTER: &str = "cluster.cds_egress_m_back-vn_http_8080.upstream_rq_total";
pub const INGRESS_CLUSTER: &str = "cluster.cds_ingress_m_back-vn_http_8080.upstream_rq_total";

/// A plain (unmeshed) awsvpc task definition with one app container.
pub fn app_taskdef(family: &str, ports: &[u16]) -> Value {
    let port_mappings: Vec<_> = ports
        .iter()
        .map(|p| json!({"containerPort": p, "protocol": "tcp"}))
        .collect();
    json!({
        "family": family,
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["EC2"],
        "containerDefinitions": [{
            "name": "app",
            "image": "example/app:1",
            "essential": true,
            "memory": 128,
            "portMappings": port_mappings
        }]
    })
}

/// Everything running; dropping it stops the processes and removes the namespaces.
#[derive(Debug)]
pub struct TwoTasks {
    // Field order is drop order: processes before the namespaces they live in.
    procs: Vec<Proc>,
    pub front: Task,
    pub back: Task,
    pub vpc: Vpc,
    pub agent: Agent,
}

/// Builds the mesh: resources (mesh, back's node and service from `--resources`, front's node
/// through the AWS CLI), a VPC with two tasks meshed by `trellis-rewrite`, started in ECS order.
pub fn two_tasks(work: &Workdir, say: &dyn Fn(&str)) -> TwoTasks {
    let resources = work.join("resources.json");
    let items = json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualServiceName": "back.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "back-vn"}}}},
        {"meshName": "m", "virtualNodeName": "back-vn", "spec": {
            "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": "back-vn.trellis.test"}}}}
    ]);
    fs::write(
        &resources,
        serde_json::to_vec_pretty(&items).expect("encode"),
    )
    .expect("write resources");
    say(
        "starting trellis-agent with mesh m, virtual node back-vn and virtual service back.local (--resources)",
    );
    let agent = Agent::start(work, Some(&resources));
    say(&format!(
        "agent up: App Mesh API at {}, ADS on {}",
        agent.api,
        agent.socket_dir.join("xds.sock").display()
    ));
    say("aws appmesh create-virtual-node front-vn with backend back.local");
    agent.appmesh(&[
        "create-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "front-vn",
        "--spec",
        r#"{"backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}"#,
    ]);

    let mut vpc = Vpc::new(work, 7);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.start_dns(work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    say(&format!(
        "VPC {}: front task {} and back task {}, resolver {}",
        vpc.prefix,
        front.ip,
        back.ip,
        vpc.resolver()
    ));

    let back_def = rewrite(
        work,
        &app_taskdef("back", &[8080]),
        "m",
        "back-vn",
        &agent.socket_dir,
    );
    let front_def = rewrite(
        work,
        &app_taskdef("front", &[]),
        "m",
        "front-vn",
        &agent.socket_dir,
    );
    say("trellis-rewrite meshed both task definitions (envoy + proxy-route-manager containers)");

    let mut procs = Vec::new();
    for (task, def, base_id, name) in [
        (&back, &back_def, 71, "back"),
        (&front, &front_def, 72, "front"),
    ] {
        run_route_manager(task, def);
        say(&format!(
            "{name}: proxy-route-manager installed the App Mesh iptables rules"
        ));
        procs.push(start_envoy(work, task, def, base_id));
        say(&format!(
            "{name}: Envoy (uid 1337) is HEALTHY by the task definition's health check"
        ));
        if name == "back" {
            procs.push(back.start_http_app(work, 8080, BACK_BODY));
            say("back: app listening on 8080");
        }
    }
    TwoTasks {
        procs,
        front,
        back,
        vpc,
        agent,
    }
}

impl TwoTasks {
    pub fn processes(&self) -> usize {
        self.procs.len()
    }
}
