//! Two TCP virtual services on the same port (two databases on 5432), which App Mesh could not
//! tell apart: the agent resolves their names as the app does, and each connection reaches the
//! service whose address the app dialled.

use std::fs;
use std::time::Duration;

use serde_json::json;
use trellis_tests::apps::start_banner;
use trellis_tests::mesh::{Agent, AgentOpts, Task};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Workdir, can_run_privileged, eventually, run};

/// What a TCP connection from `task` to `host:5432` is greeted with.
fn greeting(task: &Task, host: &str) -> Result<String, String> {
    let script = format!("exec 3<>/dev/tcp/{host}/5432 && head -n1 <&3");
    let out = run(&mut task.cmd(&["timeout", "3", "bash", "-c", &script]));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.is_empty() {
        Ok(text)
    } else {
        Err(format!(
            "{} {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn two_tcp_services_on_one_port_are_reached_by_the_address_the_app_dialled() {
    if !can_run_privileged("TCP services sharing a port") {
        return;
    }
    let work = Workdir::new("tcp-shared");
    let db = |name: &str| {
        json!({"meshName": "m", "virtualNodeName": name, "spec": {
            "listeners": [{"portMapping": {"port": 5432, "protocol": "tcp"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
    };
    let service = |name: &str, node: &str| {
        json!({"meshName": "m", "virtualServiceName": name,
               "spec": {"provider": {"virtualNode": {"virtualNodeName": node}}}})
    };
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            db("orders-db"),
            db("users-db"),
            service("orders-db.local", "orders-db"),
            service("users-db.local", "users-db"),
            {"meshName": "m", "virtualNodeName": "front", "spec": {"backends": [
                {"virtualService": {"virtualServiceName": "orders-db.local"}},
                {"virtualService": {"virtualServiceName": "users-db.local"}}]}}
        ]),
    );
    let mut vpc = trellis_tests::mesh::Vpc::new(&work, 29);
    let front = vpc.task("front", 2);
    let orders = vpc.task("orders", 3);
    let users = vpc.task("users", 4);
    let names = [
        (orders.ip.as_str(), "orders-db.local orders-db.trellis.test"),
        (users.ip.as_str(), "users-db.local users-db.trellis.test"),
    ];
    vpc.start_dns(&work, &names);
    // The agent's lookups answer like the VPC resolver the tasks use.
    let hosts = work.join("agent-hosts");
    let text: String = names.iter().map(|(ip, n)| format!("{ip} {n}\n")).collect();
    fs::write(&hosts, text).expect("write hosts");
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            resources: Some(&resources),
            env: vec![("TRELLIS_ADDRESS_POLL_MS".into(), "500".into())],
            hosts: Some(hosts),
            ..AgentOpts::default()
        },
    );
    let specs = [
        TaskSpec {
            name: "orders",
            node: "orders-db",
            app: None,
        },
        TaskSpec {
            name: "users",
            node: "users-db",
            app: None,
        },
        TaskSpec {
            name: "front",
            node: "front",
            app: None,
        },
    ];
    let mut procs = start_tasks(
        &work,
        &agent,
        "m",
        &[
            (&orders, &specs[0]),
            (&users, &specs[1]),
            (&front, &specs[2]),
        ],
        &|_| {},
    );
    procs.push(start_banner(&work, &orders, 5432, "orders-db"));
    procs.push(start_banner(&work, &users, 5432, "users-db"));

    // Before the agent knew the addresses the first service by name took the whole port; once
    // resolved, each name reaches its own database.
    for name in ["orders-db", "users-db"] {
        eventually(
            &format!("front reaches {name} by its address"),
            Duration::from_secs(30),
            || match greeting(&front, &format!("{name}.local")) {
                Ok(g) if g == name => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    // And the connections went through front's Envoy, to each database's own cluster.
    let stats = front
        .http_get(None, "http://127.0.0.1:9901/stats?filter=cx_total")
        .unwrap_or_default();
    for name in ["orders-db", "users-db"] {
        let cx = stats
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "cluster.cds_egress_m_{name}_tcp_5432.upstream_cx_total: "
                ))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(cx > 0, "no connection on {name}'s cluster:\n{stats}");
    }
    drop(procs);
}
