//! The two-task mesh of the walking skeleton, shared by its end-to-end test and the demo:
//! `front-vn` calls virtual service `back.local`, provided by `back-vn` (http 8080, DNS discovery).

use std::fs;
use std::time::Duration;

use serde_json::{Value, json};

use crate::mesh::{Agent, Task, Vpc, rewrite, run_route_manager, start_envoy};
use crate::{Proc, Workdir, eventually};

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

/// One awsvpc task of a scenario: its namespace, the virtual node it runs as, and its app.
#[derive(Debug, Clone)]
pub struct TaskSpec<'a> {
    pub name: &'a str,
    pub node: &'a str,
    /// A small HTTP app answering `body` on `port`, if the task serves.
    pub app: Option<(u16, &'a str)>,
}

/// Meshes and starts tasks in ECS order (route manager → Envoy HEALTHY → app), each from the task
/// definition `trellis-rewrite` makes for it. Returns the processes to keep alive.
pub fn start_tasks(
    work: &Workdir,
    agent: &Agent,
    mesh: &str,
    tasks: &[(&Task, &TaskSpec<'_>)],
    say: &dyn Fn(&str),
) -> Vec<Proc> {
    start_tasks_with_envoy_env(work, agent, mesh, tasks, &[], say)
}

/// `start_tasks`, with variables the operator added to each Envoy container's environment.
pub fn start_tasks_with_envoy_env(
    work: &Workdir,
    agent: &Agent,
    mesh: &str,
    tasks: &[(&Task, &TaskSpec<'_>)],
    envoy_env: &[(&str, &str)],
    say: &dyn Fn(&str),
) -> Vec<Proc> {
    let mut procs = Vec::new();
    for (task, spec) in tasks {
        let ports: Vec<u16> = spec.app.iter().map(|(p, _)| *p).collect();
        let mut def = rewrite(
            work,
            &app_taskdef(spec.name, &ports),
            mesh,
            spec.node,
            &agent.socket_dir,
        );
        add_envoy_env(&mut def, envoy_env);
        run_route_manager(task, &def);
        say(&format!(
            "{}: proxy-route-manager installed the App Mesh iptables rules",
            spec.name
        ));
        procs.push(start_envoy(work, task, &def));
        say(&format!(
            "{}: Envoy (uid 1337) is HEALTHY by the task definition's health check",
            spec.name
        ));
        if let Some((port, body)) = spec.app {
            procs.push(task.start_http_app(work, port, body));
            say(&format!("{}: app listening on {port}", spec.name));
        }
    }
    procs
}

/// Adds variables to the Envoy container of a task definition, as an operator editing it would.
fn add_envoy_env(def: &mut Value, vars: &[(&str, &str)]) {
    let Some(envoy) = def["containerDefinitions"]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["name"] == "envoy"))
    else {
        panic!("task definition has no envoy container");
    };
    if !envoy["environment"].is_array() {
        envoy["environment"] = json!([]);
    }
    if let Some(env) = envoy["environment"].as_array_mut() {
        for (k, v) in vars {
            env.push(json!({"name": k, "value": v}));
        }
    }
}

/// Writes a `--resources` file.
pub fn resources_file(work: &Workdir, items: &Value) -> std::path::PathBuf {
    let path = work.join("resources.json");
    fs::write(&path, serde_json::to_vec_pretty(items).expect("encode")).expect("write resources");
    path
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

/// `back-vn`'s spec: HTTP on 8080, found by DNS as `back-vn.trellis.test`.
pub fn back_spec() -> Value {
    json!({
        "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": "back-vn.trellis.test"}}
    })
}

/// Mesh `m` with `back-vn` (spec `back`) providing `back.local`, and, with `front`, the node
/// `front-vn` whose one backend is `back.local`.
pub fn back_front_items(back: Value, front: bool) -> Value {
    let mut items = vec![
        json!({"meshName": "m"}),
        json!({"meshName": "m", "virtualServiceName": "back.local",
               "spec": {"provider": {"virtualNode": {"virtualNodeName": "back-vn"}}}}),
        json!({"meshName": "m", "virtualNodeName": "back-vn", "spec": back}),
    ];
    if front {
        items.push(
            json!({"meshName": "m", "virtualNodeName": "front-vn", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "back.local"}}]}}),
        );
    }
    Value::Array(items)
}

/// Builds the mesh: resources (mesh, back's node and service from `--resources`, front's node
/// through the AWS CLI), a VPC with two tasks meshed by `trellis-rewrite`, started in ECS order.
pub fn two_tasks(work: &Workdir, say: &dyn Fn(&str)) -> TwoTasks {
    let resources = resources_file(work, &back_front_items(back_spec(), false));
    say(
        "starting trellis-agent with mesh m, virtual node back-vn and virtual service back.local (--resources); \
         its API takes only SigV4-signed requests from the keys and roles of --api-auth",
    );
    let agent = Agent::start_secured(work, Some(&resources));
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
    let back_spec = TaskSpec {
        name: "back",
        node: "back-vn",
        app: Some((8080, BACK_BODY)),
    };
    let front_spec = TaskSpec {
        name: "front",
        node: "front-vn",
        app: None,
    };
    say("trellis-rewrite meshes each task definition (envoy + proxy-route-manager containers)");
    let procs = start_tasks(
        work,
        &agent,
        "m",
        &[(&back, &back_spec), (&front, &front_spec)],
        say,
    );
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

/// Front calls `color.local`, a virtual router's service whose route `rt` sends everything to
/// `blue`; `red` waits as the other target. Each Envoy gets `envoy_env` in its container.
#[derive(Debug)]
pub struct Colors {
    // Field order is drop order: processes before the namespaces they live in.
    _procs: Vec<Proc>,
    pub front: Task,
    pub blue: Task,
    pub red: Task,
    pub vpc: Vpc,
    pub agent: Agent,
}

pub const COLOR_URL: &str = "http://color.local:9080/";

pub fn colors(work: &Workdir, vpc_id: u8, envoy_env: &[(&str, &str)]) -> Colors {
    let rt = color_route(json!({"prefix": "/"}), "blue");
    colors_with_routes(work, vpc_id, &[("rt", rt)], envoy_env)
}

/// [`colors`] with router `vr`'s routes given as (name, spec).
pub fn colors_with_routes(
    work: &Workdir,
    vpc_id: u8,
    routes: &[(&str, Value)],
    envoy_env: &[(&str, &str)],
) -> Colors {
    let color_node = |name: &str| {
        json!({"meshName": "m", "virtualNodeName": name, "spec": {
            "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
    };
    let mut items = vec![
        json!({"meshName": "m"}),
        color_node("blue"),
        color_node("red"),
        json!({"meshName": "m", "virtualNodeName": "front", "spec": {
            "backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}}),
        json!({"meshName": "m", "virtualRouterName": "vr",
               "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}),
        json!({"meshName": "m", "virtualServiceName": "color.local",
               "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}}),
    ];
    items.extend(routes.iter().map(|(name, spec)| {
        json!({"meshName": "m", "virtualRouterName": "vr", "routeName": name, "spec": spec})
    }));
    let resources = resources_file(work, &Value::Array(items));
    let agent = Agent::start(work, Some(&resources));
    let mut vpc = Vpc::new(work, vpc_id);
    let front = vpc.task("front", 2);
    let blue = vpc.task("blue", 3);
    let red = vpc.task("red", 4);
    // The service name resolves to any address (as with App Mesh); Envoy routes by Host.
    vpc.start_dns(
        work,
        &[
            (&blue.ip, "blue.trellis.test color.local"),
            (&red.ip, "red.trellis.test"),
        ],
    );
    let specs = [
        TaskSpec {
            name: "blue",
            node: "blue",
            app: Some((9080, "blue")),
        },
        TaskSpec {
            name: "red",
            node: "red",
            app: Some((9080, "red")),
        },
        TaskSpec {
            name: "front",
            node: "front",
            app: None,
        },
    ];
    let procs = start_tasks_with_envoy_env(
        work,
        &agent,
        "m",
        &[(&blue, &specs[0]), (&red, &specs[1]), (&front, &specs[2])],
        envoy_env,
        &|_| {},
    );
    Colors {
        _procs: procs,
        front,
        blue,
        red,
        vpc,
        agent,
    }
}

/// The spec of route `rt`: requests matching `http_match` go to `node`.
pub fn color_route(http_match: Value, node: &str) -> Value {
    json!({"httpRoute": {"match": http_match,
        "action": {"weightedTargets": [{"virtualNode": node, "weight": 1}]}}})
}

pub const FRONT_NODE: &str = "mesh/m/virtualNode/front";

impl Colors {
    /// Waits until front's requests are answered by `color`.
    pub fn front_answered_by(&self, color: &str) {
        eventually(
            &format!("front's requests answered by {color}"),
            Duration::from_secs(20),
            || match self.front.http_get(None, COLOR_URL) {
                Ok(body) if body == color => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    /// Waits until front's Envoy has ACKed the route configuration last sent to it; returns
    /// front's stream in `/debug/xds`.
    pub fn front_route_acked(&self, what: &str) -> Value {
        eventually(what, Duration::from_secs(10), || {
            let front = self.agent.xds_stream(FRONT_NODE)?;
            let route = &front["types"]["RouteConfiguration"];
            if route["sent_version"] == route["acked_version"] {
                Ok(front)
            } else {
                Err(format!("{front}"))
            }
        })
    }

    /// Replaces route `rt` through the App Mesh API (the real AWS CLI).
    pub fn set_route(&self, spec: &Value) {
        self.agent.appmesh(&[
            "update-route",
            "--mesh-name",
            "m",
            "--virtual-router-name",
            "vr",
            "--route-name",
            "rt",
            "--spec",
            &spec.to_string(),
        ]);
    }
}
