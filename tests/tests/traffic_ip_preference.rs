//! IP preference on real traffic, dual-stack tasks: a node's `ipPreference` decides the family its
//! callers' Envoys resolve it in (DNS lookup family) and the address its own Envoy binds and
//! reaches the app on (`::`/`::1` for IPv6 preferences, `::`/`127.0.0.1` for IPv4 ones); with no
//! preference anywhere, App Mesh's default: DNS IPv6 first then IPv4, Cloud Map's IPv4 address
//! else its IPv6 one.

use std::time::Duration;

use serde_json::json;
use trellis_tests::cloudmap::{AWS_ENV, Moto};
use trellis_tests::mesh::{Agent, Task, Vpc, rewrite_with, run_route_manager, start_envoy};
use trellis_tests::scenario::{self, BACK_URL, app_taskdef, back_front_items, resources_file};
use trellis_tests::{Proc, Workdir, can_run_privileged, eventually};

fn back_spec(preference: &str) -> serde_json::Value {
    let mut spec = scenario::back_spec();
    spec["serviceDiscovery"]["dns"]["ipPreference"] = json!(preference);
    spec
}

/// The front Envoy's view of the back cluster's hosts (admin `/clusters`).
fn back_hosts(front: &Task) -> String {
    front
        .http_get(None, "http://127.0.0.1:9901/clusters")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("cds_egress_m_back-vn_http_8080::")
                && l.ends_with("::health_flags::healthy")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Meshes a task with IPv6 redirect rules too and starts its route manager and Envoy.
fn mesh_task(work: &Workdir, agent: &Agent, task: &Task, node: &str, ports: &[u16]) -> Proc {
    let def = rewrite_with(
        work,
        &app_taskdef(node, ports),
        "m",
        node,
        &agent.socket_dir,
        &["--enable-ipv6"],
    );
    run_route_manager(task, &def);
    start_envoy(work, task, &def)
}

#[test]
fn ipv6_preference_reaches_the_node_over_ipv6_and_ipv4_only_switches_it_back() {
    if !can_run_privileged("ip preference") {
        return;
    }
    let work = Workdir::new("ippref");
    let resources = resources_file(&work, &back_front_items(back_spec("IPv6_ONLY"), true));
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 19);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    vpc.add_ipv6(&front);
    let back_v6 = vpc.add_ipv6(&back);
    // Cloud Map private DNS answers A and AAAA for a dual-stack instance.
    vpc.start_dns(
        &work,
        &[
            (&back.ip, "back.local back-vn.trellis.test"),
            (&back_v6, "back-vn.trellis.test"),
        ],
    );
    let _procs = [
        mesh_task(&work, &agent, &back, "back-vn", &[8080]),
        back.start_http_app_dual_stack(&work, 8080, "back"),
        mesh_task(&work, &agent, &front, "front-vn", &[]),
    ];

    // IPv6_ONLY: front's Envoy resolves AAAA and connects over IPv6; back's Envoy (bound on `::`)
    // reaches the app on ::1.
    let body = eventually(
        "front reaches back over IPv6",
        Duration::from_secs(20),
        || front.http_get(None, BACK_URL),
    );
    assert_eq!(body, "back from ::1");
    let hosts = back_hosts(&front);
    assert!(
        hosts.contains(&back_v6) && !hosts.contains(&back.ip),
        "front's Envoy holds only the IPv6 address {back_v6}:\n{hosts}"
    );

    // IPv4_ONLY through the API: A records and the IPv4 loopback.
    agent.appmesh(&[
        "update-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        "back-vn",
        "--spec",
        &back_spec("IPv4_ONLY").to_string(),
    ]);
    eventually(
        "back is reached over IPv4",
        Duration::from_secs(20),
        || match front.http_get(None, BACK_URL) {
            Ok(b) if b.ends_with("127.0.0.1") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let hosts = eventually(
        "front's cluster has the IPv4 address",
        Duration::from_secs(20),
        || {
            let h = back_hosts(&front);
            if h.contains(&back.ip) && !h.contains(&back_v6) {
                Ok(h)
            } else {
                Err(h)
            }
        },
    );
    assert!(hosts.contains(&format!("{}:8080", back.ip)), "{hosts}");
}

/// virtual_nodes.md, "IP version preference", Default: "Envoy's DNS resolver prefers IPv6 and
/// falls back to IPv4" and "We use the IPv4 address returned by AWS Cloud Map if available and
/// falls back to using the IPv6 address". With no preference anywhere, a node whose name has only
/// an IPv6 address, and a Cloud Map instance registered with only `AWS_INSTANCE_IPV6`, are
/// reached over IPv6.
#[test]
fn with_no_preference_ipv6_only_dns_names_and_cloud_map_instances_are_reached() {
    if !can_run_privileged("default ip family") {
        return;
    }
    let work = Workdir::new("ippref-default");
    let moto = Moto::start(&work, trellis_tests::free_port());
    let svc = moto.create_service("ns", "v6cm");
    let listener = json!([{"portMapping": {"port": 8080, "protocol": "http"}}]);
    let items = json!([
        {"meshName": "m"},
        {"meshName": "m", "virtualNodeName": "v6dns", "spec": {"listeners": listener,
            "serviceDiscovery": {"dns": {"hostname": "v6dns.trellis.test"}}}},
        {"meshName": "m", "virtualNodeName": "v6cm", "spec": {"listeners": listener,
            "serviceDiscovery": {"awsCloudMap": {"namespaceName": "ns", "serviceName": "v6cm"}}}},
        {"meshName": "m", "virtualServiceName": "v6dns.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "v6dns"}}}},
        {"meshName": "m", "virtualServiceName": "v6cm.local",
         "spec": {"provider": {"virtualNode": {"virtualNodeName": "v6cm"}}}},
        {"meshName": "m", "virtualNodeName": "front", "spec": {"backends": [
            {"virtualService": {"virtualServiceName": "v6dns.local"}},
            {"virtualService": {"virtualServiceName": "v6cm.local"}}]}},
    ]);
    let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    env.extend([
        ("TRELLIS_CLOUDMAP_ENDPOINT", moto.url.as_str()),
        ("TRELLIS_CLOUDMAP_POLL_INTERVAL_MS", "200"),
    ]);
    let agent = Agent::start_with_env(&work, Some(&resources_file(&work, &items)), &env);
    let mut vpc = Vpc::new(&work, 20);
    let front = vpc.task("front", 2);
    let dns_back = vpc.task("v6dns", 3);
    let cm_back = vpc.task("v6cm", 4);
    let front_v6 = vpc.add_ipv6(&front);
    let dns_v6 = vpc.add_ipv6(&dns_back);
    let cm_v6 = vpc.add_ipv6(&cm_back);
    // The node's own name has only an IPv6 address; the service names resolve (to any address)
    // for the app, whose connection Envoy takes.
    vpc.start_dns(
        &work,
        &[
            (&dns_v6, "v6dns.trellis.test"),
            (&dns_back.ip, "v6dns.local v6cm.local"),
        ],
    );
    moto.register(&svc, "i-v6", &[("AWS_INSTANCE_IPV6", &cm_v6)]);
    let _procs = [
        dns_back.start_http_app_dual_stack(&work, 8080, "v6dns"),
        cm_back.start_http_app_dual_stack(&work, 8080, "v6cm"),
        mesh_task(&work, &agent, &front, "front", &[]),
    ];
    for name in ["v6dns", "v6cm"] {
        let body = eventually(
            &format!("front reaches {name}"),
            Duration::from_secs(30),
            || front.http_get(None, &format!("http://{name}.local:8080/")),
        );
        assert_eq!(body, format!("{name} from {front_v6}"), "over IPv6");
    }
}
