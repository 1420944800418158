//! Property tests over generated task definitions (valid ones: unique names, ports off Envoy's, an
//! acyclic `dependsOn` that keeps ECS's condition rules, unknown fields anywhere) and generated options:
//! the rewrite succeeds, is a fixed point, keeps every field it does not own verbatim and in order, and
//! never emits an ordering ECS would refuse or that starts an app before Envoy. The ordering is checked
//! here independently of the crate's own validator.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use trellis_rewrite::{Options, Redirect, Target, rewrite};

const ENVOY: &str = "envoy";
const ROUTE_MANAGER: &str = "proxy-route-manager";
/// Fields the tool owns at the task level; everything else must come out untouched.
const OWNED_TASK_FIELDS: [&str; 3] = ["containerDefinitions", "volumes", "proxyConfiguration"];

/// A JSON value a future ECS field might hold.
fn unknown_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z0-9 ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,6}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Fields no ECS model has (yet): names the tool cannot know.
fn unknown_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(("future[A-Z][a-z]{0,6}", unknown_value()), 0..3)
}

/// One generated app container before its `dependsOn` is decided.
#[derive(Debug, Clone)]
struct App {
    essential: bool,
    health_check: bool,
    port: Option<u16>,
    extra: Vec<(String, Value)>,
    /// Per earlier container: whether to depend on it, and a condition pick.
    deps: Vec<(bool, u8)>,
}

fn app() -> impl Strategy<Value = App> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            80u16, 443, 3000, 8080, 8443, 9090, 50051,
        ])),
        unknown_fields(),
        prop::collection::vec((any::<bool>(), any::<u8>()), 5),
    )
        .prop_map(|(essential, health_check, port, extra, deps)| App {
            essential,
            health_check,
            port,
            extra,
            deps,
        })
}

/// The conditions ECS allows on `target`: COMPLETE/SUCCESS only on a non-essential one, HEALTHY only on
/// one with a health check.
fn allowed_conditions(essential: bool, health_check: bool) -> Vec<&'static str> {
    let mut c = vec!["START"];
    if !essential {
        c.extend(["COMPLETE", "SUCCESS"]);
    }
    if health_check {
        c.push("HEALTHY");
    }
    c
}

#[derive(Debug, Clone)]
struct Case {
    input: Value,
    opts: Options,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(app(), 1..5),
        unknown_fields(),
        any::<bool>(), // App Mesh-era Envoy container present
        any::<bool>(), // gateway
        any::<bool>(), // proxyConfiguration mode
        any::<bool>(), // TCP xDS endpoint
        prop::option::of(1000u32..3000),
        any::<bool>(), // wrap as DescribeTaskDefinition output
    )
        .prop_map(
            |(apps, task_extra, app_mesh_envoy, gateway, proxy_config, tcp, uid, wrap)| {
                let mut seen_ports = HashSet::new();
                let mut containers = Vec::new();
                for (i, a) in apps.iter().enumerate() {
                    let mut c = Map::new();
                    c.insert("name".into(), json!(format!("app{i}")));
                    c.insert("image".into(), json!(format!("registry/app{i}:1")));
                    c.insert("essential".into(), json!(a.essential || i == 0));
                    c.insert("memory".into(), json!(128));
                    // The first container always serves a port: the redirect needs one.
                    let port = a.port.or((i == 0).then_some(8000));
                    if let Some(p) = port.filter(|p| seen_ports.insert(*p)) {
                        c.insert("portMappings".into(), json!([{"containerPort": p, "protocol": "tcp"}]));
                    }
                    if a.health_check {
                        c.insert("healthCheck".into(), json!({"command": ["CMD", "true"]}));
                    }
                    let mut deps = Vec::new();
                    for (j, (on, pick)) in a.deps.iter().enumerate().take(i) {
                        if *on {
                            let t = &apps[j];
                            let ok = allowed_conditions(t.essential || j == 0, t.health_check);
                            deps.push(json!({"containerName": format!("app{j}"), "condition": ok[*pick as usize % ok.len()]}));
                        }
                    }
                    if !deps.is_empty() {
                        c.insert("dependsOn".into(), Value::Array(deps));
                    }
                    for (k, v) in &a.extra {
                        c.insert(k.clone(), v.clone());
                    }
                    containers.push(Value::Object(c));
                }
                if app_mesh_envoy {
                    containers.push(json!({
                        "name": "proxy",
                        "image": "840364872350.dkr.ecr.us-west-2.amazonaws.com/aws-appmesh-envoy:v1.29.6.0-prod",
                        "essential": true,
                        "memory": 256,
                        "environment": [{"name": "ENABLE_ENVOY_XRAY_TRACING", "value": "1"}],
                        "futureEnvoyField": {"kept": true}
                    }));
                }
                let mut td = Map::new();
                td.insert("family".into(), json!("prop"));
                td.insert("networkMode".into(), json!("awsvpc"));
                td.insert("containerDefinitions".into(), Value::Array(containers));
                td.insert("memory".into(), json!("4096"));
                for (k, v) in task_extra {
                    td.insert(k, v);
                }
                let input = if wrap {
                    td.insert("revision".into(), json!(3));
                    td.insert("status".into(), json!("ACTIVE"));
                    json!({"taskDefinition": td, "tags": [{"key": "k", "value": "v"}]})
                } else {
                    Value::Object(td)
                };

                let target = if gateway {
                    Target::VirtualGateway("gw".into())
                } else {
                    Target::VirtualNode("node".into())
                };
                let mut opts = Options::new("mesh", target);
                if proxy_config {
                    opts.redirect = Redirect::ProxyConfiguration;
                }
                if tcp {
                    opts.xds_endpoint = Some("10.0.0.1:15010".into());
                }
                opts.ignored_uid = uid;
                Case { input, opts }
            },
        )
}

/// The task definition inside `input`, as ECS would take it (no wrapper, no read-only fields).
fn unwrapped(input: &Value) -> Map<String, Value> {
    let mut td = input
        .get("taskDefinition")
        .unwrap_or(input)
        .as_object()
        .cloned()
        .unwrap_or_default();
    td.remove("revision");
    td.remove("status");
    td
}

fn containers(td: &Value) -> Vec<&Map<String, Value>> {
    td["containerDefinitions"]
        .as_array()
        .map(|cs| cs.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

fn name(c: &Map<String, Value>) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or_default()
}

fn deps(c: &Map<String, Value>) -> Vec<(&str, &str)> {
    c.get("dependsOn")
        .and_then(Value::as_array)
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    (
                        d["containerName"].as_str().unwrap_or_default(),
                        d["condition"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Keys of `of` that are also keys of `among`, in `of`'s order.
fn common_keys<'a>(of: &'a Map<String, Value>, among: &Map<String, Value>) -> Vec<&'a str> {
    of.keys()
        .filter(|k| among.contains_key(*k))
        .map(String::as_str)
        .collect()
}

/// Everything that makes an ordering invalid, as messages (empty when it is valid).
fn ordering_problems(out: &Value, opts: &Options) -> Vec<String> {
    let cs = containers(out);
    let by_name: HashMap<&str, &Map<String, Value>> = cs.iter().map(|c| (name(c), *c)).collect();
    let mut problems = Vec::new();
    // Every edge names a container and keeps ECS's condition rules.
    for c in &cs {
        for (target, condition) in deps(c) {
            let Some(t) = by_name.get(target) else {
                problems.push(format!("{} waits for missing {target}", name(c)));
                continue;
            };
            let essential = t.get("essential").and_then(Value::as_bool).unwrap_or(true);
            if !allowed_conditions(essential, t.contains_key("healthCheck")).contains(&condition) {
                problems.push(format!("{} waits for {target} {condition}", name(c)));
            }
        }
    }
    // No cycle: repeatedly remove containers that wait on nothing left.
    let mut left: HashSet<&str> = by_name.keys().copied().collect();
    loop {
        let ready: Vec<&str> = left
            .iter()
            .copied()
            .filter(|n| deps(by_name[n]).iter().all(|(t, _)| !left.contains(t)))
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            left.remove(n);
        }
    }
    if !left.is_empty() {
        problems.push(format!("dependsOn cycle among {left:?}"));
    }
    let Some(envoy) = by_name.get(ENVOY) else {
        problems.push("no envoy container".into());
        return problems;
    };
    if envoy.get("essential") != Some(&json!(true)) {
        problems.push("envoy is not essential".into());
    }
    // Envoy waits on the route manager's SUCCESS exactly when there is one.
    let has_rm = by_name.contains_key(ROUTE_MANAGER);
    let wants_rm = !opts.is_gateway() && opts.redirect == Redirect::RouteManager;
    if has_rm != wants_rm {
        problems.push(format!(
            "route manager present: {has_rm}, expected {wants_rm}"
        ));
    }
    if has_rm && !deps(envoy).contains(&(ROUTE_MANAGER, "SUCCESS")) {
        problems.push("envoy does not wait for the route manager's SUCCESS".into());
    }
    // Every other container waits for Envoy HEALTHY (directly), unless Envoy waits for it.
    let mut before_envoy = HashSet::new();
    let mut stack = vec![ENVOY];
    while let Some(n) = stack.pop() {
        for (t, _) in deps(by_name[n]) {
            if by_name.contains_key(t) && before_envoy.insert(t) {
                stack.push(t);
            }
        }
    }
    for c in &cs {
        let n = name(c);
        if n != ENVOY && !before_envoy.contains(n) && !deps(c).contains(&(ENVOY, "HEALTHY")) {
            problems.push(format!("{n} does not wait for envoy HEALTHY"));
        }
    }
    problems
}

proptest! {
    // Few cases so the suite stays fast; failures are printed, not persisted into the source tree.
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rewrite_is_idempotent(case in case()) {
        let out = rewrite(case.input.clone(), &case.opts)
            .map_err(|e| TestCaseError::fail(format!("valid input refused: {e}")))?;
        let again = rewrite(out.clone(), &case.opts)
            .map_err(|e| TestCaseError::fail(format!("own output refused: {e}")))?;
        prop_assert_eq!(
            serde_json::to_string_pretty(&again).unwrap(),
            serde_json::to_string_pretty(&out).unwrap()
        );
    }

    #[test]
    fn every_field_not_owned_is_kept_in_order(case in case()) {
        let out = rewrite(case.input.clone(), &case.opts)
            .map_err(|e| TestCaseError::fail(format!("valid input refused: {e}")))?;
        let before = unwrapped(&case.input);
        let after = out.as_object().expect("an object");
        for (k, v) in &before {
            if !OWNED_TASK_FIELDS.contains(&k.as_str()) {
                prop_assert_eq!(after.get(k), Some(v), "task field {}", k);
            }
        }
        prop_assert_eq!(common_keys(&before, after), common_keys(after, &before));

        let outs: HashMap<&str, &Map<String, Value>> =
            containers(&out).into_iter().map(|c| (name(c), c)).collect();
        let input_td = Value::Object(before.clone());
        for c in containers(&input_td) {
            // The App Mesh Envoy is renamed and owned; its unknown fields must still survive.
            let is_envoy = name(c) == "proxy";
            let o = outs.get(if is_envoy { ENVOY } else { name(c) });
            prop_assert!(o.is_some(), "container {} dropped", name(c));
            let o = o.expect("checked");
            for (k, v) in c {
                let owned = k == "dependsOn" || (is_envoy && k != "memory" && !k.starts_with("future"));
                if !owned {
                    prop_assert_eq!(o.get(k), Some(v), "{}.{}", name(c), k);
                }
            }
            prop_assert_eq!(common_keys(c, o), common_keys(o, c));
            // Existing dependencies are kept.
            for (t, cond) in deps(c) {
                prop_assert!(deps(o).contains(&(t, cond)), "{} lost dependsOn {} {}", name(c), t, cond);
            }
        }
    }

    #[test]
    fn ordering_is_always_valid(case in case()) {
        let out = rewrite(case.input.clone(), &case.opts)
            .map_err(|e| TestCaseError::fail(format!("valid input refused: {e}")))?;
        let problems = ordering_problems(&out, &case.opts);
        prop_assert!(problems.is_empty(), "{:?}\n{}", problems, serde_json::to_string_pretty(&out).unwrap());
    }
}
