//! Behaviour tests for the rewrite: one small fixture per behaviour, whole-output comparisons (as pretty
//! JSON text, so field order is asserted too) and exact `Err` values for every rule.

use serde_json::{Value, json};

use crate::{Error, Options, Redirect, Target, parse, rewrite};

fn node() -> Options {
    Options::new("m", Target::VirtualNode("web".into()))
}

fn gateway() -> Options {
    Options::new("m", Target::VirtualGateway("gw".into()))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("a Value always serialises")
}

/// Rewrites `input` and compares the whole output, field order included; then checks the fixed point.
#[track_caller]
fn check(input: Value, opts: &Options, expected: Value) {
    let out = rewrite(input, opts).expect("rewrite should succeed");
    assert_same(&out, &expected);
    let again = rewrite(out.clone(), opts).expect("rewriting the output should succeed");
    assert_same(&again, &out);
}

/// Compares as pretty text (so order counts) and reports the first differing line, not two walls of JSON.
#[track_caller]
fn assert_same(actual: &Value, expected: &Value) {
    let (a, e) = (pretty(actual), pretty(expected));
    if a == e {
        return;
    }
    let line = a
        .lines()
        .zip(e.lines())
        .position(|(x, y)| x != y)
        .unwrap_or(a.lines().count().min(e.lines().count()));
    let window = |s: &str| {
        s.lines()
            .skip(line.saturating_sub(3))
            .take(6)
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "output differs at line {}:\n--- actual\n{}\n--- expected\n{}\n--- full actual\n{a}",
        line + 1,
        window(&a),
        window(&e)
    );
}

#[track_caller]
fn check_err(input: Value, opts: &Options, expected: &str) {
    match rewrite(input, opts) {
        Ok(out) => panic!("expected error {expected:?}, got output {}", pretty(&out)),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

/// Looks up a container by name in an output.
fn container<'a>(out: &'a Value, name: &str) -> &'a Value {
    out["containerDefinitions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {}", pretty(out)))
}

fn env(c: &Value) -> Vec<(String, String)> {
    c["environment"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_var(c: &Value, name: &str) -> Option<String> {
    env(c).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Asserts that container `c` sets each (name, value) variable.
#[track_caller]
fn assert_env(c: &Value, expected: &[(&str, &str)]) {
    for (name, value) in expected {
        assert_eq!(env_var(c, name).as_deref(), Some(*value), "{name}");
    }
}

fn names(out: &Value) -> Vec<&str> {
    out["containerDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn one_app() -> Value {
    json!({
        "family": "web",
        "networkMode": "awsvpc",
        "containerDefinitions": [
            {"name": "app", "image": "nginx", "memory": 256, "portMappings": [{"containerPort": 8080, "protocol": "tcp"}]}
        ],
        "requiresCompatibilities": ["EC2"]
    })
}

fn health_check() -> Value {
    json!({
        "command": ["CMD-SHELL", "curl -s http://localhost:9901/server_info | grep state | grep -q LIVE"],
        "interval": 5,
        "timeout": 2,
        "retries": 3,
        "startPeriod": 10
    })
}

fn envoy_mount() -> Value {
    json!([{"sourceVolume": "trellis-agent-socket", "containerPath": "/var/run/trellis", "readOnly": true}])
}

fn nofile() -> Value {
    json!([{"name": "nofile", "softLimit": 15000, "hardLimit": 15000}])
}

fn socket_volume() -> Value {
    json!({"name": "trellis-agent-socket", "host": {"sourcePath": "/var/run/trellis"}})
}

/// The Envoy container the rewrite writes for resource `arn`: name and image, then `head` (the
/// fields that differ by mode), then the fields every mode sets alike, then `tail`.
fn envoy_container(arn: &str, head: Value, tail: Value) -> Value {
    let mut envoy = json!({"name": "envoy", "image": "trellis-envoy:0.1.0"});
    let owned = json!({
        "environment": [
            {"name": "APPMESH_RESOURCE_ARN", "value": arn},
            {"name": "APPMESH_XDS_ENDPOINT", "value": "unix:///var/run/trellis/xds.sock"}
        ],
        "mountPoints": envoy_mount(),
        "ulimits": nofile(),
        "healthCheck": health_check()
    });
    let fields = envoy.as_object_mut().expect("an object");
    for part in [head, owned, tail] {
        if let Value::Object(part) = part {
            fields.extend(part);
        }
    }
    envoy
}

/// [`envoy_container`] as the sidecar of virtual node `web` (essential, uid 1337, default memory).
fn web_sidecar(tail: Value) -> Value {
    envoy_container(
        "mesh/m/virtualNode/web",
        json!({"essential": true, "user": "1337", "memoryReservation": 128}),
        tail,
    )
}

fn route_manager_env(app_ports: &str, ips: &str) -> Value {
    json!([
        {"name": "APPMESH_APP_PORTS", "value": app_ports},
        {"name": "APPMESH_EGRESS_IGNORED_IP", "value": ips},
        {"name": "APPMESH_EGRESS_IGNORED_PORTS", "value": "22"},
        {"name": "APPMESH_ENVOY_EGRESS_PORT", "value": "15001"},
        {"name": "APPMESH_ENVOY_INGRESS_PORT", "value": "15000"},
        {"name": "APPMESH_IGNORE_UID", "value": "1337"},
        {"name": "APPMESH_START_ENABLED", "value": "1"}
    ])
}

const DEFAULT_IPS: &str = "169.254.170.2,169.254.169.254";

#[test]
fn plain_one_app_awsvpc() {
    check(
        one_app(),
        &node(),
        json!({
            "family": "web",
            "networkMode": "awsvpc",
            "containerDefinitions": [
                {
                    "name": "app", "image": "nginx", "memory": 256,
                    "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
                    "dependsOn": [{"containerName": "envoy", "condition": "HEALTHY"}]
                },
                web_sidecar(
                    json!({"dependsOn": [{"containerName": "proxy-route-manager", "condition": "SUCCESS"}]})
                ),
                {
                    "name": "proxy-route-manager",
                    "image": "trellis-proxy-route-manager:0.1.0",
                    "essential": false,
                    "memoryReservation": 32,
                    "linuxParameters": {"capabilities": {"add": ["NET_ADMIN"]}},
                    "environment": route_manager_env("8080", DEFAULT_IPS)
                }
            ],
            "requiresCompatibilities": ["EC2"],
            "volumes": [socket_volume()]
        }),
    );
}

#[test]
fn options_reach_the_owned_containers() {
    let mut opts = node();
    opts.envoy_image = Some("registry/envoy:1".into());
    opts.route_manager_image = Some("registry/prm:1".into());
    opts.socket_host_path = "/run/agent".into();
    opts.app_ports = Some(vec![8080, 8443]);
    opts.ignored_uid = Some(2000);
    opts.egress_ignored_ips = vec!["10.0.0.0/8".into()];
    opts.egress_ignored_ports = vec![22, 5432];
    opts.envoy_log_level = Some("debug".into());
    opts.envoy_cpu = Some(128);
    opts.envoy_memory = Some(512);
    opts.envoy_env = vec![("ENABLE_ENVOY_STATS_TAGS".into(), "1".into())];
    let mut input = one_app();
    input["memory"] = json!("1024");
    let out = rewrite(input, &opts).unwrap();
    let envoy = container(&out, "envoy");
    assert_eq!(envoy["image"], "registry/envoy:1");
    assert_eq!(envoy["user"], "2000");
    assert_eq!(envoy["cpu"], 128);
    assert_eq!(envoy["memory"], 512);
    assert!(
        envoy.get("memoryReservation").is_none(),
        "task memory is set, so no default reservation"
    );
    assert_eq!(
        env(envoy),
        [
            ("APPMESH_RESOURCE_ARN", "mesh/m/virtualNode/web"),
            ("APPMESH_XDS_ENDPOINT", "unix:///var/run/trellis/xds.sock"),
            ("ENABLE_ENVOY_STATS_TAGS", "1"),
            ("ENVOY_LOG_LEVEL", "debug"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()))
    );
    let rm = container(&out, "proxy-route-manager");
    assert_eq!(rm["image"], "registry/prm:1");
    assert_env(
        rm,
        &[
            ("APPMESH_APP_PORTS", "8080,8443"),
            ("APPMESH_IGNORE_UID", "2000"),
            (
                "APPMESH_EGRESS_IGNORED_IP",
                "169.254.170.2,169.254.169.254,10.0.0.0/8",
            ),
            ("APPMESH_EGRESS_IGNORED_PORTS", "22,5432"),
        ],
    );
    assert_eq!(
        out["volumes"],
        json!([{"name": "trellis-agent-socket", "host": {"sourcePath": "/run/agent"}}])
    );
    let again = rewrite(out.clone(), &opts).unwrap();
    assert_eq!(pretty(&again), pretty(&out));
}

#[test]
fn describe_output_is_unwrapped_and_read_only_fields_dropped() {
    let mut td = one_app();
    let obj = td.as_object_mut().unwrap();
    obj.insert(
        "taskDefinitionArn".into(),
        json!("arn:aws:ecs:us-east-1:111122223333:task-definition/web:3"),
    );
    obj.insert("revision".into(), json!(3));
    obj.insert("status".into(), json!("ACTIVE"));
    obj.insert(
        "requiresAttributes".into(),
        json!([{"name": "com.amazonaws.ecs.capability.task-eni"}]),
    );
    obj.insert("compatibilities".into(), json!(["EC2"]));
    obj.insert("registeredAt".into(), json!("2024-05-01T10:00:00Z"));
    obj.insert(
        "registeredBy".into(),
        json!("arn:aws:iam::111122223333:user/ops"),
    );
    obj.insert("deregisteredAt".into(), json!("2024-06-01T10:00:00Z"));
    let tags = json!([{"key": "team", "value": "payments"}]);
    let wrapped = json!({"taskDefinition": td.clone(), "tags": tags});

    let expected = rewrite(one_app(), &node()).unwrap();
    assert_same(&rewrite(td, &node()).unwrap(), &expected);
    // The wrapper's tags become the request's tags, where a request would carry them.
    let mut tagged = one_app();
    tagged["tags"] = json!([{"key": "team", "value": "payments"}]);
    check(wrapped, &node(), rewrite(tagged, &node()).unwrap());
    // Empty tags are not worth a field.
    let out = rewrite(json!({"taskDefinition": one_app(), "tags": []}), &node()).unwrap();
    assert!(out.get("tags").is_none());
}

#[test]
fn rewrite_is_idempotent() {
    let migrated = app_mesh_definition();
    let pc = proxy_configuration();
    let mut tcp = node();
    tcp.xds_endpoint = Some("agent.local:15100".into());
    let cases = [
        (one_app(), node()),
        (one_app(), gateway()),
        (one_app(), pc.clone()),
        (one_app(), tcp),
        (migrated.clone(), node()),
        (migrated, pc),
        (with_init_and_deps(), node()),
    ];
    for (input, opts) in cases {
        let once = pretty(&rewrite(input, &opts).unwrap());
        let twice = pretty(&rewrite(parse(&once).unwrap(), &opts).unwrap());
        assert_eq!(once, twice, "options {opts:?}");
    }
}

fn with_init_and_deps() -> Value {
    json!({
        "family": "web",
        "networkMode": "awsvpc",
        "memory": "1 GB",
        "containerDefinitions": [
            {"name": "migrate", "image": "flyway", "essential": false},
            {
                "name": "app", "image": "nginx",
                "portMappings": [{"containerPort": 8080}],
                "dependsOn": [
                    {"containerName": "migrate", "condition": "SUCCESS"},
                    {"containerName": "envoy", "condition": "START"}
                ]
            },
            {
                "name": "envoy", "image": "old-envoy", "essential": true,
                "dependsOn": [{"containerName": "migrate", "condition": "SUCCESS"}],
                "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "envoy"}}
            }
        ]
    })
}

#[test]
fn existing_depends_on_is_merged() {
    let out = rewrite(with_init_and_deps(), &node()).unwrap();
    assert_eq!(
        names(&out),
        ["migrate", "app", "envoy", "proxy-route-manager"]
    );
    // The app's own dependency stays first; its START on Envoy becomes HEALTHY in place.
    assert_eq!(
        container(&out, "app")["dependsOn"],
        json!([
            {"containerName": "migrate", "condition": "SUCCESS"},
            {"containerName": "envoy", "condition": "HEALTHY"}
        ])
    );
    // Envoy keeps waiting for the init container and also waits for the route manager.
    let envoy = container(&out, "envoy");
    assert_eq!(
        envoy["dependsOn"],
        json!([
            {"containerName": "migrate", "condition": "SUCCESS"},
            {"containerName": "proxy-route-manager", "condition": "SUCCESS"}
        ])
    );
    assert_eq!(
        envoy["logConfiguration"]["options"]["awslogs-group"], "envoy",
        "user settings on Envoy are kept"
    );
    // Envoy waits for the init container, so the init container must not wait for Envoy.
    assert!(container(&out, "migrate").get("dependsOn").is_none());
}

#[test]
fn bridge_mode_is_refused_naming_the_field() {
    let mut input = one_app();
    input["networkMode"] = json!("bridge");
    check_err(
        input,
        &node(),
        r#"networkMode: "bridge" is not supported: transparent redirect needs awsvpc (one network namespace per task); --explicit-backends meshes bridge and host tasks through HTTP_PROXY"#,
    );
    let mut input = one_app();
    input.as_object_mut().unwrap().remove("networkMode");
    check_err(
        input,
        &node(),
        r#"networkMode: missing (ECS defaults to "bridge") is not supported: transparent redirect needs awsvpc (one network namespace per task); --explicit-backends meshes bridge and host tasks through HTTP_PROXY"#,
    );
}

/// Redirect through ECS's `proxyConfiguration` instead of the route manager.
fn proxy_configuration() -> Options {
    let mut o = node();
    o.redirect = Redirect::ProxyConfiguration;
    o
}

fn explicit() -> Options {
    let mut o = node();
    o.redirect = Redirect::Explicit;
    o
}

#[test]
fn explicit_backends_in_bridge_mode_link_the_app_to_envoy_as_its_http_proxy() {
    let mut input = one_app();
    input["networkMode"] = json!("bridge");
    check(
        input,
        &explicit(),
        json!({
            "family": "web",
            "networkMode": "bridge",
            "containerDefinitions": [
                {
                    "name": "app", "image": "nginx", "memory": 256,
                    "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
                    "dependsOn": [{"containerName": "envoy", "condition": "HEALTHY"}],
                    "environment": [
                        {"name": "HTTP_PROXY", "value": "http://envoy:15001"},
                        {"name": "http_proxy", "value": "http://envoy:15001"},
                        {"name": "NO_PROXY", "value": "localhost,127.0.0.1,169.254.170.2,169.254.169.254"},
                        {"name": "no_proxy", "value": "localhost,127.0.0.1,169.254.170.2,169.254.169.254"}
                    ],
                    "links": ["envoy"]
                },
                web_sidecar(json!({}))
            ],
            "requiresCompatibilities": ["EC2"],
            "volumes": [socket_volume()]
        }),
    );
}

#[test]
fn explicit_backends_keep_the_users_proxy_variables_and_links() {
    let mut input = one_app();
    input["networkMode"] = json!("bridge");
    input["containerDefinitions"][0]["environment"] = json!([
        {"name": "NO_PROXY", "value": "db.internal"},
        {"name": "A", "value": "1"}
    ]);
    input["containerDefinitions"][0]["links"] = json!(["envoy:proxy", "cache"]);
    let out = rewrite(input, &explicit()).unwrap();
    let app = container(&out, "app");
    assert_eq!(
        app["environment"],
        json!([
            {"name": "NO_PROXY", "value": "db.internal"},
            {"name": "A", "value": "1"},
            {"name": "HTTP_PROXY", "value": "http://envoy:15001"},
            {"name": "http_proxy", "value": "http://envoy:15001"},
            {"name": "no_proxy", "value": "localhost,127.0.0.1,169.254.170.2,169.254.169.254"}
        ])
    );
    assert_eq!(app["links"], json!(["envoy:proxy", "cache"]));
}

#[test]
fn explicit_backends_in_host_mode_use_loopback_and_refuse_envoys_ports() {
    let mut input = one_app();
    input["networkMode"] = json!("host");
    let out = rewrite(input.clone(), &explicit()).unwrap();
    let app = container(&out, "app");
    assert_eq!(app["environment"][0]["value"], "http://127.0.0.1:15001");
    assert!(
        app.get("links").is_none(),
        "links exist only in bridge mode"
    );

    input["containerDefinitions"][0]["portMappings"] = json!([{"containerPort": 15001}]);
    check_err(
        input,
        &explicit(),
        "containerDefinitions[0].portMappings[0].containerPort: port 15001 is reserved for Envoy's egress listener; move the application off it",
    );
}

#[test]
fn an_app_mesh_definition_moved_to_explicit_backends_loses_its_redirect() {
    let meshed = rewrite(one_app(), &node()).unwrap();
    let out = rewrite(meshed, &explicit()).unwrap();
    assert_eq!(names(&out), ["app", "envoy"]);
    assert!(out.get("proxyConfiguration").is_none());
    assert!(container(&out, "envoy").get("dependsOn").is_none());
    assert_eq!(
        container(&out, "app")["environment"][0]["value"],
        "http://127.0.0.1:15001"
    );
}

#[test]
fn app_ports_default_to_the_app_containers_ports() {
    let input = json!({
        "networkMode": "awsvpc",
        "memory": "2048",
        "containerDefinitions": [
            {"name": "api", "image": "api", "portMappings": [{"containerPort": 8080}, {"containerPort": 8443}]},
            {"name": "metrics", "image": "exporter", "portMappings": [{"containerPort": 9100}, {"containerPort": 8080}]},
            {"name": "worker", "image": "worker"}
        ]
    });
    let out = rewrite(input.clone(), &node()).unwrap();
    let rm = container(&out, "proxy-route-manager");
    assert_eq!(
        env_var(rm, "APPMESH_APP_PORTS").as_deref(),
        Some("8080,8443,9100")
    );
    for app in ["api", "metrics", "worker"] {
        assert_eq!(
            container(&out, app)["dependsOn"],
            json!([{"containerName": "envoy", "condition": "HEALTHY"}])
        );
    }
    // A flag wins, and its value then survives a re-run without the flag.
    let mut opts = node();
    opts.app_ports = Some(vec![8080]);
    let out = rewrite(input, &opts).unwrap();
    let again = rewrite(out, &node()).unwrap();
    assert_eq!(
        env_var(
            container(&again, "proxy-route-manager"),
            "APPMESH_APP_PORTS"
        )
        .as_deref(),
        Some("8080")
    );
}

#[test]
fn field_order_and_unknown_fields_are_preserved() {
    let input = json!({
        "zzFirst": {"b": 1, "a": 2},
        "containerDefinitions": [
            {
                "secrets": [{"name": "DB", "valueFrom": "arn:aws:ssm:us-east-1:1:parameter/db"}],
                "name": "app",
                "environment": [{"name": "Z", "value": "1"}, {"name": "A", "value": "2"}],
                "image": "nginx",
                "memoryReservation": 64,
                "futureField": [3, 2, 1]
            }
        ],
        "family": "web",
        "networkMode": "awsvpc",
        "volumes": [{"name": "data", "efsVolumeConfiguration": {"fileSystemId": "fs-1"}}],
        "cpu": "512"
    });
    let out = rewrite(input, &node()).unwrap();
    let top: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(
        top,
        [
            "zzFirst",
            "containerDefinitions",
            "family",
            "networkMode",
            "volumes",
            "cpu"
        ]
    );
    assert_eq!(out["zzFirst"], json!({"b": 1, "a": 2}));
    let app = container(&out, "app");
    let keys: Vec<&String> = app.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "secrets",
            "name",
            "environment",
            "image",
            "memoryReservation",
            "futureField",
            "dependsOn"
        ]
    );
    // The app's own environment is not the tool's: not sorted, not touched.
    assert_eq!(
        app["environment"],
        json!([{"name": "Z", "value": "1"}, {"name": "A", "value": "2"}])
    );
    assert_eq!(
        out["volumes"],
        json!([{"name": "data", "efsVolumeConfiguration": {"fileSystemId": "fs-1"}}, socket_volume()])
    );
}

#[test]
fn virtual_gateway_is_envoy_only() {
    let input = json!({
        "family": "gw",
        "networkMode": "bridge",
        "memory": "512",
        "containerDefinitions": [
            {"name": "envoy", "image": "public.ecr.aws/appmesh/aws-appmesh-envoy:v1.29", "user": "1337",
             "portMappings": [{"containerPort": 8443, "hostPort": 443}]}
        ]
    });
    check(
        input,
        &gateway(),
        json!({
            "family": "gw",
            "networkMode": "bridge",
            "memory": "512",
            "containerDefinitions": [
                envoy_container(
                    "mesh/m/virtualGateway/gw",
                    json!({"portMappings": [{"containerPort": 8443, "hostPort": 443}], "essential": true}),
                    json!({}),
                )
            ],
            "volumes": [socket_volume()]
        }),
    );
}

#[test]
fn node_task_turned_gateway_loses_its_redirect() {
    let meshed = rewrite(one_app(), &node()).unwrap();
    let out = rewrite(meshed, &gateway()).unwrap();
    assert_eq!(names(&out), ["app", "envoy"]);
    let envoy = container(&out, "envoy");
    assert!(envoy.get("user").is_none());
    assert!(envoy.get("dependsOn").is_none());
}

/// An App Mesh-era definition: AWS's Envoy image and ECS's proxyConfiguration.
fn app_mesh_definition() -> Value {
    json!({
        "family": "colorteller",
        "networkMode": "awsvpc",
        "cpu": "256",
        "memory": "512",
        "proxyConfiguration": {
            "type": "APPMESH",
            "containerName": "envoy-sidecar",
            "properties": [
                {"name": "IgnoredUID", "value": "1337"},
                {"name": "ProxyIngressPort", "value": "15000"},
                {"name": "ProxyEgressPort", "value": "15001"},
                {"name": "AppPorts", "value": "9080"},
                {"name": "EgressIgnoredIPs", "value": "169.254.170.2,169.254.169.254,10.1.0.0/16"},
                {"name": "EgressIgnoredPorts", "value": "22"}
            ]
        },
        "containerDefinitions": [
            {
                "name": "app", "image": "colorteller", "essential": true,
                "portMappings": [{"containerPort": 9080}, {"containerPort": 9081}],
                "dependsOn": [{"containerName": "envoy-sidecar", "condition": "HEALTHY"}]
            },
            {
                "name": "envoy-sidecar",
                "image": "840364872350.dkr.ecr.us-west-2.amazonaws.com/aws-appmesh-envoy:v1.27.0.0-prod",
                "essential": true,
                "user": "1337",
                "environment": [
                    {"name": "APPMESH_VIRTUAL_NODE_NAME", "value": "mesh/old/virtualNode/colorteller"},
                    {"name": "ENABLE_ENVOY_XRAY_TRACING", "value": "1"}
                ],
                "healthCheck": {"command": ["CMD-SHELL", "curl -s http://localhost:9901/server_info | grep state | grep -q LIVE"],
                                "interval": 5, "timeout": 2, "retries": 3, "startPeriod": 10}
            }
        ]
    })
}

#[test]
fn app_mesh_definition_migrates_to_the_route_manager() {
    let out = rewrite(app_mesh_definition(), &node()).unwrap();
    assert!(out.get("proxyConfiguration").is_none());
    assert_eq!(names(&out), ["app", "envoy", "proxy-route-manager"]);
    assert_eq!(
        container(&out, "app")["dependsOn"],
        json!([{"containerName": "envoy", "condition": "HEALTHY"}])
    );
    let envoy = container(&out, "envoy");
    assert_eq!(envoy["image"], "trellis-envoy:0.1.0");
    assert_eq!(
        env_var(envoy, "APPMESH_VIRTUAL_NODE_NAME"),
        None,
        "the stale identity is dropped"
    );
    assert_eq!(
        env_var(envoy, "ENABLE_ENVOY_XRAY_TRACING").as_deref(),
        Some("1"),
        "user variables are kept"
    );
    let rm = container(&out, "proxy-route-manager");
    // The user's ports (9080 only, not 9081) and exceptions carry over.
    assert_env(
        rm,
        &[
            ("APPMESH_APP_PORTS", "9080"),
            (
                "APPMESH_EGRESS_IGNORED_IP",
                "169.254.170.2,169.254.169.254,10.1.0.0/16",
            ),
            ("APPMESH_EGRESS_IGNORED_PORTS", "22"),
        ],
    );
}

#[test]
fn replacing_ecss_redirect_with_the_route_manager_is_a_warning() {
    let out = crate::rewrite_with_warnings(app_mesh_definition(), &node()).unwrap();
    assert_eq!(
        out.warnings
            .iter()
            .map(|w| w.path.as_str())
            .collect::<Vec<_>>(),
        ["proxyConfiguration"]
    );
    // Kept as ECS's redirect, or a task that never had one: no warning.
    let out = crate::rewrite_with_warnings(app_mesh_definition(), &proxy_configuration()).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let out = crate::rewrite_with_warnings(one_app(), &node()).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn proxy_configuration_mode() {
    let out = rewrite(app_mesh_definition(), &proxy_configuration()).unwrap();
    assert_eq!(names(&out), ["app", "envoy"]);
    let top: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(
        top,
        [
            "family",
            "networkMode",
            "cpu",
            "memory",
            "proxyConfiguration",
            "containerDefinitions",
            "volumes"
        ]
    );
    assert_eq!(
        out["proxyConfiguration"],
        json!({
            "type": "APPMESH",
            "containerName": "envoy",
            "properties": [
                {"name": "AppPorts", "value": "9080"},
                {"name": "EgressIgnoredIPs", "value": "169.254.170.2,169.254.169.254,10.1.0.0/16"},
                {"name": "EgressIgnoredPorts", "value": "22"},
                {"name": "IgnoredUID", "value": "1337"},
                {"name": "ProxyEgressPort", "value": "15001"},
                {"name": "ProxyIngressPort", "value": "15000"}
            ]
        })
    );
    assert!(container(&out, "envoy").get("dependsOn").is_none());
    // Switching back to the route manager keeps the settings.
    let back = rewrite(out, &node()).unwrap();
    assert!(back.get("proxyConfiguration").is_none());
    let rm = container(&back, "proxy-route-manager");
    assert_env(
        rm,
        &[
            ("APPMESH_APP_PORTS", "9080"),
            ("APPMESH_EGRESS_IGNORED_PORTS", "22"),
        ],
    );
}

#[test]
fn tcp_endpoint_drops_the_socket_and_allows_fargate() {
    let mut opts = proxy_configuration();
    opts.xds_endpoint = Some("10.0.0.5:15100".into());
    let mut input = one_app();
    input["requiresCompatibilities"] = json!(["FARGATE"]);
    input["cpu"] = json!("512");
    input["memory"] = json!("1024");
    let out = rewrite(input.clone(), &opts).unwrap();
    let envoy = container(&out, "envoy");
    assert_eq!(
        env_var(envoy, "APPMESH_XDS_ENDPOINT").as_deref(),
        Some("10.0.0.5:15100")
    );
    assert!(envoy.get("mountPoints").is_none());
    assert!(out.get("volumes").is_none());

    check_err(
        input.clone(),
        &node(),
        r#"requiresCompatibilities[0]: "FARGATE" is not valid: Fargate has no host volumes for the agent socket; pass --xds-endpoint HOST:PORT"#,
    );
    let mut tcp_only = node();
    tcp_only.xds_endpoint = Some("10.0.0.5:15100".into());
    check_err(
        input,
        &tcp_only,
        r#"requiresCompatibilities[0]: "FARGATE" is not valid: Fargate does not grant NET_ADMIN to the route manager; pass --proxy-configuration"#,
    );
}

#[test]
fn malformed_json_reports_line_and_column() {
    let err = parse("{\n  \"family\": \"web\",\n  \"networkMode\": awsvpc\n}").unwrap_err();
    assert_eq!(
        err,
        Error::Json {
            line: 3,
            column: 18,
            message: "expected value".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "input is not valid JSON at line 3, column 18: expected value"
    );
}

/// Appends container `c` to task definition `v`.
fn push_container(v: &mut Value, c: Value) {
    v["containerDefinitions"]
        .as_array_mut()
        .expect("containerDefinitions is an array")
        .push(c);
}

/// Removes `field` from the first container of task definition `v`.
fn remove_from_app(v: &mut Value, field: &str) {
    v["containerDefinitions"][0]
        .as_object_mut()
        .expect("the first container is an object")
        .remove(field);
}

/// Adds container `db` (no health check) and has the app wait for it with `condition`.
fn app_waits_for_db(v: &mut Value, condition: &str) {
    push_container(v, json!({"name": "db", "image": "pg", "memory": 64}));
    v["containerDefinitions"][0]["dependsOn"] =
        json!([{"containerName": "db", "condition": condition}]);
}

#[test]
fn rule_violations_name_the_field() {
    let with = |patch: &dyn Fn(&mut Value)| {
        let mut v = one_app();
        patch(&mut v);
        v
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            json!(["not", "a", "task"]),
            "(top level): expected an object (a task definition), found an array",
        ),
        (
            with(&|v| {
                v["containerDefinitions"][0]["portMappings"][0]["containerPort"] = json!(15000)
            }),
            "containerDefinitions[0].portMappings[0].containerPort: port 15000 is reserved for Envoy's ingress listener; move the application off it",
        ),
        (
            with(&|v| {
                v["containerDefinitions"][0]["portMappings"] =
                    json!([{"containerPort": 80}, {"containerPort": 9901}])
            }),
            "containerDefinitions[0].portMappings[1].containerPort: port 9901 is reserved for Envoy's admin interface; move the application off it",
        ),
        (
            with(&|v| {
                v["containerDefinitions"][0]["portMappings"][0] =
                    json!({"containerPortRange": "14000-16000"})
            }),
            "containerDefinitions[0].portMappings[0].containerPortRange: port 15000 is reserved for Envoy's ingress listener; move the application off it",
        ),
        (
            with(&|v| v["containerDefinitions"][0]["portMappings"][0]["hostPort"] = json!(80)),
            "containerDefinitions[0].portMappings[0].hostPort: 80 is not valid: in awsvpc mode hostPort must be absent or equal containerPort 8080",
        ),
        (
            with(&|v| {
                v["containerDefinitions"][0]["portMappings"][0]["containerPort"] = json!("8080")
            }),
            r#"containerDefinitions[0].portMappings[0].containerPort: expected a non-negative integer, found string "8080""#,
        ),
        (
            with(&|v| push_container(v, json!({"name": "app", "image": "x"}))),
            r#"containerDefinitions[1].name: "app" is also the name of containerDefinitions[0]; container names must be unique"#,
        ),
        (
            with(&|v| remove_from_app(v, "image")),
            "containerDefinitions[0].image: missing; ECS requires an image for every container",
        ),
        (
            with(&|v| remove_from_app(v, "name")),
            "containerDefinitions[0].name: missing; ECS requires a name for every container",
        ),
        (
            with(&|v| {
                v["containerDefinitions"][0]["dependsOn"] =
                    json!([{"containerName": "db", "condition": "START"}])
            }),
            r#"containerDefinitions[0].dependsOn[0].containerName: no container is named "db""#,
        ),
        (
            with(&|v| app_waits_for_db(v, "READY")),
            r#"containerDefinitions[0].dependsOn[0].condition: "READY" is not valid: must be one of START, COMPLETE, SUCCESS, HEALTHY"#,
        ),
        (
            with(&|v| app_waits_for_db(v, "HEALTHY")),
            r#"containerDefinitions[0].dependsOn[0].condition: "HEALTHY" is not valid: "db" has no healthCheck, so it never becomes HEALTHY"#,
        ),
        (
            with(&|v| {
                push_container(
                    v,
                    json!({
                        "name": "sidecar", "image": "x", "memory": 32,
                        "dependsOn": [{"containerName": "app", "condition": "SUCCESS"}]
                    }),
                )
            }),
            r#"containerDefinitions[1].dependsOn[0].condition: "SUCCESS" is not valid: "app" is essential; ECS allows COMPLETE and SUCCESS only on non-essential containers"#,
        ),
        (
            with(&|v| {
                push_container(
                    v,
                    json!({
                        "name": "cache", "image": "x", "memory": 32,
                        "dependsOn": [{"containerName": "cache", "condition": "START"}]
                    }),
                )
            }),
            "containerDefinitions[1].dependsOn[0].containerName: dependsOn cycle cache -> cache",
        ),
        (
            with(&|v| v["memory"] = json!("200")),
            "memory: 200 MiB is too small: the containers (Envoy included) need 256 MiB for containerDefinitions[0].memory",
        ),
        (
            with(&|v| v["memory"] = json!("300")),
            "memory: 300 MiB is too small: the containers (Envoy included) need 256 MiB plus at least 64 MiB left for Envoy (or set --envoy-memory)",
        ),
        (
            with(&|v| v["memory"] = json!("lots")),
            r#"memory: "lots" is not valid: expected MiB, or GB with the unit, e.g. "512" or "1 GB""#,
        ),
        (
            with(&|v| remove_from_app(v, "memory")),
            "containerDefinitions[0].memory: missing; without a task-level memory ECS needs memory or memoryReservation on every container",
        ),
        (
            with(&|v| {
                v["proxyConfiguration"] = json!({"type": "APPMESH",
                "properties": [{"name": "ProxyIngressPort", "value": "15500"}]})
            }),
            r#"proxyConfiguration.properties[0].value: "15500" is not valid: ProxyIngressPort must be 15000: Trellis Envoy's ingress listener is fixed at that port"#,
        ),
        (
            with(&|v| {
                v["proxyConfiguration"] = json!({"type": "APPMESH", "containerName": "proxy"})
            }),
            r#"proxyConfiguration.containerName: no container is named "proxy""#,
        ),
    ];
    for (input, expected) in cases {
        check_err(input, &node(), expected);
    }
}

#[test]
fn a_cycle_through_envoy_is_reported() {
    // The app waits for Envoy and Envoy waits for the app: the input itself can never start.
    let input = json!({
        "networkMode": "awsvpc",
        "memory": "1024",
        "containerDefinitions": [
            {"name": "app", "image": "nginx", "essential": false,
             "dependsOn": [{"containerName": "envoy", "condition": "HEALTHY"}]},
            {"name": "envoy", "image": "x", "dependsOn": [{"containerName": "app", "condition": "COMPLETE"}]}
        ]
    });
    check_err(
        input,
        &node(),
        "containerDefinitions[0].dependsOn: dependsOn cycle app -> envoy -> app",
    );
}

#[test]
fn memory_that_cannot_fit_envoy_is_refused() {
    let mut input = one_app();
    input["memory"] = json!("512");
    let mut opts = node();
    opts.envoy_memory = Some(300);
    check_err(
        input,
        &opts,
        "memory: 512 MiB is too small: the containers (Envoy included) need 556 MiB in total",
    );
}

#[test]
fn bad_options_are_refused() {
    type Patch = Box<dyn Fn(&mut Options)>;
    let cases: Vec<(Patch, &str)> = vec![
        (
            Box::new(|o| o.mesh = String::new()),
            r#"--mesh: "" is not valid: App Mesh names are 1 to 255 characters without '/' or spaces"#,
        ),
        (
            Box::new(|o| o.target = Target::VirtualNode("a/b".into())),
            r#"--virtual-node: "a/b" is not valid: App Mesh names are 1 to 255 characters without '/' or spaces"#,
        ),
        (
            Box::new(|o| o.app_ports = Some(vec![15001])),
            r#"--app-ports: "15001" is not valid: port 15001 is reserved for Envoy's egress listener"#,
        ),
        (
            Box::new(|o| o.egress_ignored_ips = vec!["10.0.0.0/33".into()]),
            r#"--egress-ignored-ips: "10.0.0.0/33" is not valid: expected an IP address or CIDR block"#,
        ),
        (
            Box::new(|o| o.envoy_log_level = Some("loud".into())),
            r#"--envoy-log-level: "loud" is not valid: must be one of trace, debug, info, warn, warning, error, critical, off"#,
        ),
        (
            Box::new(|o| o.socket_host_path = "run/trellis".into()),
            r#"--socket-host-path: "run/trellis" is not valid: must be an absolute path"#,
        ),
        (
            Box::new(|o| o.xds_endpoint = Some("agent".into())),
            r#"--xds-endpoint: "agent" is not valid: expected unix:///absolute/path or HOST:PORT"#,
        ),
        (
            Box::new(|o| o.envoy_env = vec![("APPMESH_RESOURCE_ARN".into(), "x".into())]),
            r#"--envoy-env: "APPMESH_RESOURCE_ARN" is not valid: this variable is set by the tool; use its own flag"#,
        ),
    ];
    for (patch, expected) in cases {
        let mut opts = node();
        patch(&mut opts);
        check_err(one_app(), &opts, expected);
    }
}

/// Validates outputs against botocore's own `RegisterTaskDefinition` input shape. The Rust assertions
/// above are the main ones; this guards against emitting something real ECS would reject by shape.
#[test]
fn outputs_match_the_ecs_register_task_definition_shape() {
    // TRELLIS_BOTOCORE_PYTHON, else the venv's python (TRELLIS_VENV, else the workspace's `.venv`).
    let python = std::env::var("TRELLIS_BOTOCORE_PYTHON").unwrap_or_else(|_| {
        let venv = std::env::var("TRELLIS_VENV")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv").into());
        format!("{venv}/bin/python")
    });
    if !std::path::Path::new(&python).exists() {
        assert!(
            std::env::var_os("TRELLIS_REQUIRE_BOTOCORE").is_none()
                && std::env::var_os("CI").is_none(),
            "TRELLIS_REQUIRE_BOTOCORE or CI is set but {python} is missing"
        );
        eprintln!(
            "skipping botocore shape validation: {python} not found (set TRELLIS_BOTOCORE_PYTHON)"
        );
        return;
    }
    let pc = proxy_configuration();
    let mut full = node();
    full.envoy_cpu = Some(64);
    full.envoy_memory = Some(128);
    full.egress_ignored_ports = vec![22];
    let outputs: Vec<Value> = [
        (one_app(), node()),
        (one_app(), gateway()),
        (one_app(), full),
        (app_mesh_definition(), node()),
        (app_mesh_definition(), pc),
        (with_init_and_deps(), node()),
    ]
    .into_iter()
    .map(|(input, opts)| rewrite(input, &opts).unwrap())
    .collect();
    let script = r#"
import json, sys
import botocore.session
from botocore.validate import validate_parameters
shape = botocore.session.get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition").input_shape
for i, params in enumerate(json.load(sys.stdin)):
    try:
        validate_parameters(params, shape)
    except Exception as e:
        print(f"output {i}: {e}")
        sys.exit(1)
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &outputs).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "botocore rejected an output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn ignored_gid_and_ipv6_reach_envoy_and_the_route_manager() {
    let mut opts = node();
    opts.ignored_gid = Some(1338);
    opts.enable_ipv6 = true;
    let out = rewrite(one_app(), &opts).unwrap();
    assert_eq!(container(&out, "envoy")["user"], "1337:1338");
    let rm = container(&out, "proxy-route-manager");
    assert_env(
        rm,
        &[("APPMESH_IGNORE_GID", "1338"), ("APPMESH_ENABLE_IPV6", "1")],
    );
    // Both are the task's settings now: a plain re-run keeps them.
    assert_same(&rewrite(out.clone(), &node()).unwrap(), &out);
}

#[test]
fn an_sds_socket_is_mounted_into_envoy_and_named_by_its_variable() {
    let mut opts = node();
    opts.sds_socket_path = Some("/run/spire/sockets/agent.sock".into());
    let out = rewrite(one_app(), &opts).unwrap();
    let envoy = container(&out, "envoy");
    assert!(envoy["environment"].as_array().unwrap().contains(
        &json!({"name": "APPMESH_SDS_SOCKET_PATH", "value": "/run/spire/sockets/agent.sock"})
    ));
    assert!(envoy["mountPoints"].as_array().unwrap().contains(
        &json!({"sourceVolume": "trellis-sds-socket", "containerPath": "/run/spire/sockets", "readOnly": true})
    ));
    assert!(out["volumes"].as_array().unwrap().contains(
        &json!({"name": "trellis-sds-socket", "host": {"sourcePath": "/run/spire/sockets"}})
    ));
    // A fixed point.
    assert_same(&rewrite(out.clone(), &opts).unwrap(), &out);

    opts.sds_socket_path = Some("agent.sock".into());
    check_err(
        one_app(),
        &opts,
        r#"--sds-socket-path: "agent.sock" is not valid: must be an absolute path to a socket inside a directory (e.g. /run/spire/sockets/agent.sock)"#,
    );
}

/// Fargate has no host volumes, so the SPIRE agent's socket directory cannot be mounted: every
/// definition that may run on Fargate is refused with --sds-socket-path, whatever else is right
/// for Fargate (TCP endpoint, proxyConfiguration) and whatever the target; nothing is returned.
#[test]
fn an_sds_socket_is_refused_for_a_definition_that_may_run_on_fargate() {
    const SDS: &str = "/run/spire/sockets/agent.sock";
    let fargate = |compatibilities: Value| {
        let mut input = one_app();
        input["requiresCompatibilities"] = compatibilities;
        input["cpu"] = json!("512");
        input["memory"] = json!("1024");
        input
    };
    let with_sds = |mut opts: Options, tcp: bool| {
        if tcp {
            opts.xds_endpoint = Some("10.0.0.5:15100".into());
        }
        opts.sds_socket_path = Some(SDS.into());
        opts
    };
    let refused = |i: usize| {
        format!(
            r#"requiresCompatibilities[{i}]: "FARGATE" is not valid: Fargate has no host volumes for the SDS socket; drop --sds-socket-path"#
        )
    };
    let cases = [
        // Otherwise fit for Fargate: only the SDS socket is in the way.
        (
            fargate(json!(["FARGATE"])),
            with_sds(proxy_configuration(), true),
            0,
        ),
        (fargate(json!(["FARGATE"])), with_sds(gateway(), true), 0),
        // The SDS rule comes first: the operator learns about the flag they added.
        (fargate(json!(["FARGATE"])), with_sds(node(), false), 0),
        // Placeable on either launch type: Fargate would still refuse the host volume.
        (
            fargate(json!(["EC2", "FARGATE"])),
            with_sds(proxy_configuration(), true),
            1,
        ),
    ];
    for (input, opts, index) in cases {
        check_err(input, &opts, &refused(index));
    }

    // The same definition without the SDS socket is fine on Fargate, and on EC2 the socket is kept.
    let mut without_sds = with_sds(proxy_configuration(), true);
    without_sds.sds_socket_path = None;
    let out = rewrite(fargate(json!(["FARGATE"])), &without_sds).unwrap();
    assert!(out.get("volumes").is_none(), "{}", pretty(&out));
    let out = rewrite(
        fargate(json!(["EC2"])),
        &with_sds(proxy_configuration(), true),
    )
    .unwrap();
    assert_eq!(
        out["volumes"],
        json!([{"name": "trellis-sds-socket", "host": {"sourcePath": "/run/spire/sockets"}}])
    );
}

// ---- ECS's own rules: no silent change of meaning ----

#[test]
fn windows_task_definitions_are_refused_in_every_mode() {
    let mut input = one_app();
    input["runtimePlatform"] =
        json!({"operatingSystemFamily": "WINDOWS_SERVER_2019_CORE", "cpuArchitecture": "X86_64"});
    let expected = r#"runtimePlatform.operatingSystemFamily: "WINDOWS_SERVER_2019_CORE" is not valid: Windows tasks cannot be meshed: App Mesh had no Windows Envoy, and ECS does not support user, ulimits, linuxParameters or proxyConfiguration on Windows containers, which the Envoy sidecar and the redirect need"#;
    let mut keep = node();
    keep.keep_envoy = true;
    for opts in [node(), gateway(), proxy_configuration(), explicit(), keep] {
        check_err(input.clone(), &opts, expected);
    }
    // Linux stays accepted.
    input["runtimePlatform"]["operatingSystemFamily"] = json!("LINUX");
    rewrite(input, &node()).unwrap();
}

/// A task with a FireLens log router whose app logs through it.
fn firelens_task() -> Value {
    json!({
        "family": "orders",
        "networkMode": "awsvpc",
        "memory": "2048",
        "containerDefinitions": [
            {"name": "log_router", "image": "fluent-bit", "essential": true, "memoryReservation": 50,
             "firelensConfiguration": {"type": "fluentbit"}},
            {"name": "app", "image": "orders", "portMappings": [{"containerPort": 8000}],
             "logConfiguration": {"logDriver": "awsfirelens",
                                  "options": {"Name": "cloudwatch_logs", "log_stream_prefix": "orders/"}}}
        ]
    })
}

#[test]
fn sidecars_log_through_firelens_so_the_log_router_starts_first_and_everyone_says_so() {
    let out = rewrite(firelens_task(), &node()).unwrap();
    // ECS's own order: the log router first; it no longer waits for Envoy.
    assert!(container(&out, "log_router").get("dependsOn").is_none());
    assert_eq!(
        container(&out, "app")["dependsOn"],
        json!([
            {"containerName": "envoy", "condition": "HEALTHY"},
            {"containerName": "log_router", "condition": "START"}
        ])
    );
    let envoy = container(&out, "envoy");
    assert_eq!(
        envoy["logConfiguration"],
        json!({"logDriver": "awsfirelens", "options": {"Name": "cloudwatch_logs", "log_stream_prefix": "envoy/"}})
    );
    assert_eq!(
        envoy["dependsOn"],
        json!([
            {"containerName": "proxy-route-manager", "condition": "SUCCESS"},
            {"containerName": "log_router", "condition": "START"}
        ])
    );
    let rm = container(&out, "proxy-route-manager");
    assert_eq!(
        rm["logConfiguration"]["options"]["log_stream_prefix"],
        "proxy-route-manager/"
    );
    assert_eq!(
        rm["dependsOn"],
        json!([{"containerName": "log_router", "condition": "START"}])
    );
    assert_same(&rewrite(out.clone(), &node()).unwrap(), &out);
}

#[test]
fn a_log_router_that_waits_for_envoy_keeps_the_firelens_containers_explicitly_behind_it() {
    // Envoy logs elsewhere and ECS's native redirect has no route manager: the log router is an
    // ordinary container that waits for Envoy, which removes ECS's implicit START ordering.
    let mut input = firelens_task();
    push_container(
        &mut input,
        json!({"name": "envoy", "image": "x", "logConfiguration": {"logDriver": "awslogs",
               "options": {"awslogs-group": "envoy"}}}),
    );
    push_container(
        &mut input,
        json!({"name": "worker", "image": "orders", "essential": false,
               "dependsOn": [{"containerName": "log_router", "condition": "HEALTHY"}],
               "logConfiguration": {"logDriver": "awsfirelens", "options": {"Name": "stdout"}}}),
    );
    input["containerDefinitions"][0]["healthCheck"] = json!({"command": ["CMD", "true"]});
    let out = rewrite(input, &proxy_configuration()).unwrap();
    assert_eq!(
        container(&out, "log_router")["dependsOn"],
        json!([{"containerName": "envoy", "condition": "HEALTHY"}])
    );
    assert_eq!(
        container(&out, "app")["dependsOn"],
        json!([
            {"containerName": "envoy", "condition": "HEALTHY"},
            {"containerName": "log_router", "condition": "START"}
        ])
    );
    // A dependency the user wrote on the log router is kept as written.
    assert_eq!(
        container(&out, "worker")["dependsOn"],
        json!([
            {"containerName": "log_router", "condition": "HEALTHY"},
            {"containerName": "envoy", "condition": "HEALTHY"}
        ])
    );
    assert_eq!(
        container(&out, "envoy")["logConfiguration"]["logDriver"],
        "awslogs",
        "Envoy's own log configuration is kept"
    );
}

#[test]
fn sidecars_inherit_the_apps_awslogs_configuration_under_their_own_stream_prefix() {
    let mut input = one_app();
    input["containerDefinitions"][0]["logConfiguration"] = json!({
        "logDriver": "awslogs",
        "options": {"awslogs-group": "/ecs/web", "awslogs-region": "us-west-2", "awslogs-stream-prefix": "web"}
    });
    // An init container's configuration is not the one taken: the essential app's is.
    push_container(
        &mut input,
        json!({"name": "init", "image": "x", "essential": false, "memory": 32,
               "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "/ecs/init"}}}),
    );
    let out = rewrite(input, &node()).unwrap();
    for name in ["envoy", "proxy-route-manager"] {
        assert_eq!(
            container(&out, name)["logConfiguration"],
            json!({"logDriver": "awslogs", "options": {
                "awslogs-group": "/ecs/web", "awslogs-region": "us-west-2", "awslogs-stream-prefix": name}}),
            "{name}"
        );
    }
    assert_same(&rewrite(out.clone(), &node()).unwrap(), &out);
    // No awslogs or FireLens in the app: nothing is invented.
    let out = rewrite(one_app(), &node()).unwrap();
    assert!(container(&out, "envoy").get("logConfiguration").is_none());
}

#[test]
fn a_pinned_image_survives_a_re_run_without_the_flag() {
    let mut pinned = node();
    pinned.envoy_image = Some("reg/trellis-envoy:0.3.2".into());
    pinned.route_manager_image = Some("reg/trellis-proxy-route-manager:0.3.2".into());
    pinned.envoy_cpu = Some(128);
    let out = rewrite(one_app(), &pinned).unwrap();
    let again = rewrite(out.clone(), &node()).unwrap();
    assert_same(&again, &out);
    assert_eq!(
        container(&again, "envoy")["image"],
        "reg/trellis-envoy:0.3.2"
    );
    assert_eq!(
        container(&again, "proxy-route-manager")["image"],
        "reg/trellis-proxy-route-manager:0.3.2"
    );
    // A flag still changes it.
    let mut newer = node();
    newer.envoy_image = Some("reg/trellis-envoy:0.4.0".into());
    let upgraded = rewrite(out, &newer).unwrap();
    assert_eq!(
        container(&upgraded, "envoy")["image"],
        "reg/trellis-envoy:0.4.0"
    );
    assert_eq!(
        container(&upgraded, "proxy-route-manager")["image"],
        "reg/trellis-proxy-route-manager:0.3.2"
    );
    // Not meshed for Trellis yet (AWS's image, or an Envoy without APPMESH_XDS_ENDPOINT): defaults.
    let migrated = rewrite(app_mesh_definition(), &node()).unwrap();
    assert_eq!(
        container(&migrated, "envoy")["image"],
        "trellis-envoy:0.1.0"
    );
    let out = rewrite(with_init_and_deps(), &node()).unwrap();
    assert_eq!(container(&out, "envoy")["image"], "trellis-envoy:0.1.0");
}

#[test]
fn ipv6_is_never_dropped_on_the_way_into_proxy_configuration() {
    let mut opts = proxy_configuration();
    opts.enable_ipv6 = true;
    check_err(
        one_app(),
        &opts,
        r#"--enable-ipv6: "" is not valid: ECS's APPMESH proxyConfiguration never redirects IPv6 (the ECS agent does not turn IPv6 on in its App Mesh CNI plugin), so IPv6 traffic would bypass Envoy; drop --proxy-configuration to use the route manager, which redirects IPv6 too"#,
    );
    // Switching a route-manager task with IPv6 on to proxyConfiguration names the setting.
    let mut v6 = node();
    v6.enable_ipv6 = true;
    let meshed = rewrite(one_app(), &v6).unwrap();
    let rm = names(&meshed)
        .iter()
        .position(|n| *n == "proxy-route-manager")
        .unwrap();
    let var = container(&meshed, "proxy-route-manager")["environment"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["name"] == "APPMESH_ENABLE_IPV6")
        .unwrap();
    check_err(
        meshed.clone(),
        &proxy_configuration(),
        &format!(
            r#"containerDefinitions[{rm}].environment[{var}].value: "1" is not valid: APPMESH_ENABLE_IPV6 cannot be carried into proxyConfiguration: ECS's APPMESH proxyConfiguration never redirects IPv6 (the ECS agent does not turn IPv6 on in its App Mesh CNI plugin), so IPv6 traffic would bypass Envoy; drop --proxy-configuration to use the route manager, which redirects IPv6 too, or remove the variable to redirect IPv4 only"#
        ),
    );
    // The route manager carries it on every re-run.
    let again = rewrite(meshed, &node()).unwrap();
    assert_env(
        container(&again, "proxy-route-manager"),
        &[("APPMESH_ENABLE_IPV6", "1")],
    );
}

#[test]
fn a_container_running_as_the_ignored_identity_is_warned_about_by_name() {
    let mut input = one_app();
    input["containerDefinitions"][0]["user"] = json!("1337");
    push_container(
        &mut input,
        json!({"name": "xray", "image": "xray", "memory": 32, "user": "2000:1338"}),
    );
    push_container(
        &mut input,
        json!({"name": "named", "image": "x", "memory": 32, "user": "nginx"}),
    );
    let mut opts = node();
    opts.ignored_gid = Some(1338);
    let out = crate::rewrite_with_warnings(input.clone(), &opts).unwrap();
    let warnings: Vec<String> = out.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            r#"containerDefinitions[0].user: "1337" runs as UID 1337, the identity the redirect ignores (Envoy's own), so all of this container's outbound traffic bypasses Envoy: no mesh routing, TLS, policies or metrics. Right for an agent that must reach its endpoint directly (the X-Ray daemon); for an application, run it as another user"#,
            r#"containerDefinitions[1].user: "2000:1338" runs as GID 1338, the identity the redirect ignores (Envoy's own), so all of this container's outbound traffic bypasses Envoy: no mesh routing, TLS, policies or metrics. Right for an agent that must reach its endpoint directly (the X-Ray daemon); for an application, run it as another user"#,
        ]
    );
    // Without a redirect (gateway, explicit backends) no identity bypasses anything.
    input["networkMode"] = json!("bridge");
    let out = crate::rewrite_with_warnings(input, &explicit()).unwrap();
    assert!(
        out.warnings.iter().all(|w| !w.path.ends_with(".user")),
        "{:?}",
        out.warnings
    );
}

#[test]
fn proxy_configuration_refuses_more_than_fifteen_ports_and_the_route_manager_warns() {
    // 14 listed plus port 22, always ignored: exactly 15 fit.
    let mut opts = proxy_configuration();
    opts.egress_ignored_ports = (1000..1014).collect();
    let out = rewrite(one_app(), &opts).unwrap();
    let props = out["proxyConfiguration"]["properties"].as_array().unwrap();
    let ignored = props
        .iter()
        .find(|p| p["name"] == "EgressIgnoredPorts")
        .unwrap();
    assert_eq!(ignored["value"].as_str().unwrap().split(',').count(), 15);

    opts.egress_ignored_ports = (1000..1015).collect();
    check_err(
        one_app(),
        &opts,
        r#"proxyConfiguration.properties.EgressIgnoredPorts: "1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014,22" is not valid: ECS's APPMESH proxyConfiguration applies at most 15 ports here and silently drops the rest (16 given, port 22 included); drop --proxy-configuration to use the route manager, which applies them all"#,
    );
    let mut opts = proxy_configuration();
    opts.app_ports = Some((8000..8016).collect());
    check_err(
        one_app(),
        &opts,
        r#"proxyConfiguration.properties.AppPorts: "8000,8001,8002,8003,8004,8005,8006,8007,8008,8009,8010,8011,8012,8013,8014,8015" is not valid: ECS's APPMESH proxyConfiguration applies at most 15 ports here and silently drops the rest (16 given); drop --proxy-configuration to use the route manager, which applies them all"#,
    );

    // The route manager takes them all, and says where that differs from ECS.
    let mut opts = node();
    opts.egress_ignored_ports = (1000..1015).collect();
    let out = crate::rewrite_with_warnings(one_app(), &opts).unwrap();
    assert_eq!(
        out.warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "proxy-route-manager.APPMESH_EGRESS_IGNORED_PORTS: 16 ports: ECS's App Mesh redirect applied only the first 15 and dropped the rest, the route manager applies them all; for ports 22 outbound traffic to them now bypasses Envoy where App Mesh sent it through Envoy"
        ]
    );
}

#[test]
fn port_22_bypasses_envoy_by_default_in_both_redirect_modes() {
    let out = rewrite(one_app(), &node()).unwrap();
    assert_env(
        container(&out, "proxy-route-manager"),
        &[("APPMESH_EGRESS_IGNORED_PORTS", "22")],
    );
    let out = rewrite(one_app(), &proxy_configuration()).unwrap();
    assert!(
        out["proxyConfiguration"]["properties"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "EgressIgnoredPorts", "value": "22"}))
    );
    // Listed ports keep their order; 22 is added once.
    let mut opts = node();
    opts.egress_ignored_ports = vec![5432];
    let out = rewrite(one_app(), &opts).unwrap();
    assert_env(
        container(&out, "proxy-route-manager"),
        &[("APPMESH_EGRESS_IGNORED_PORTS", "5432,22")],
    );
    opts.egress_ignored_ports = vec![22, 5432];
    let out = rewrite(one_app(), &opts).unwrap();
    assert_env(
        container(&out, "proxy-route-manager"),
        &[("APPMESH_EGRESS_IGNORED_PORTS", "22,5432")],
    );
}

fn keep() -> Options {
    let mut o = Options::new("old", Target::VirtualNode("colorteller".into()));
    o.keep_envoy = true;
    o
}

#[test]
fn keep_envoy_image_only_repoints_the_stock_image() {
    let input = app_mesh_definition();
    let mut expected = input.clone();
    let envoy = &mut expected["containerDefinitions"][1];
    envoy["environment"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "APPMESH_XDS_ENDPOINT", "value": "unix:///var/run/trellis/xds.sock"}));
    envoy["mountPoints"] = envoy_mount();
    expected["volumes"] = json!([socket_volume()]);
    check(input.clone(), &keep(), expected);

    // Over TCP (Fargate): the variable only, no mount or volume.
    let mut tcp = keep();
    tcp.xds_endpoint = Some("10.0.0.5:15010".into());
    let out = rewrite(input.clone(), &tcp).unwrap();
    assert_eq!(
        container(&out, "envoy-sidecar")["environment"][2],
        json!({"name": "APPMESH_XDS_ENDPOINT", "value": "10.0.0.5:15010"})
    );
    assert!(
        container(&out, "envoy-sidecar")
            .get("mountPoints")
            .is_none()
    );
    assert!(out.get("volumes").is_none());
}

#[test]
fn keep_envoy_image_refuses_what_it_cannot_repoint() {
    let mut other = keep();
    other.target = Target::VirtualNode("web".into());
    check_err(
        app_mesh_definition(),
        &other,
        r#"containerDefinitions[1].environment[0].value: "mesh/old/virtualNode/colorteller" is not valid: APPMESH_VIRTUAL_NODE_NAME must name mesh/old/virtualNode/web (its ARN or that path), as --mesh and the target flag say"#,
    );
    let mut no_identity = app_mesh_definition();
    no_identity["containerDefinitions"][1]["environment"] = json!([]);
    check_err(
        no_identity,
        &keep(),
        "containerDefinitions[1].environment: missing; the kept Envoy image needs APPMESH_RESOURCE_ARN (or APPMESH_VIRTUAL_NODE_NAME) to know which node it is",
    );
    check_err(
        one_app(),
        &keep(),
        r#"--keep-envoy-image: "" is not valid: the task has no Envoy container to keep: none is named envoy, named by proxyConfiguration.containerName, or runs AWS's aws-appmesh-envoy image"#,
    );
    let mut fargate = app_mesh_definition();
    fargate["requiresCompatibilities"] = json!(["FARGATE"]);
    check_err(
        fargate,
        &keep(),
        r#"requiresCompatibilities[0]: "FARGATE" is not valid: Fargate has no host volumes for the agent socket; pass --xds-endpoint HOST:PORT"#,
    );
}
