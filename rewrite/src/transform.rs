//! The rewrite itself: find or add the containers the tool owns, set exactly the fields it owns, merge
//! `dependsOn`, and leave every other byte of the task definition alone. Pure: no IO, so it is tested
//! with plain JSON values and re-running it on its own output is a fixed point.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::json::{self, Object};
use crate::options::{
    ALWAYS_IGNORED_IPS, DEFAULT_ENVOY_IMAGE, DEFAULT_ROUTE_MANAGER_IMAGE, ENVOY_ADMIN_PORT,
    ENVOY_CONTAINER, ENVOY_EGRESS_PORT, ENVOY_NOFILE, Options, PROXY_CONFIGURATION_MAX_PORTS,
    ROUTE_MANAGER_CONTAINER, Redirect, SDS_VOLUME, SOCKET_CONTAINER_PATH, SOCKET_VOLUME,
};
use crate::settings::{self, Existing, Settings};
use crate::{Error, Rewritten, Warning, validate};

/// Fields of `DescribeTaskDefinition` output that `RegisterTaskDefinition` does not accept.
const READ_ONLY: [&str; 9] = [
    "taskDefinitionArn",
    "revision",
    "status",
    "requiresAttributes",
    "compatibilities",
    "registeredAt",
    "registeredBy",
    "deregisteredAt",
    "deleteRequestedAt",
];

/// Image names of AWS's App Mesh containers, to recognise an App Mesh-era definition.
const AWS_ENVOY_IMAGE: &str = "aws-appmesh-envoy";
const AWS_ROUTE_MANAGER_IMAGE: &str = "aws-appmesh-proxy-route-manager";
/// Envoy identity variables of the App Mesh image that would contradict `APPMESH_RESOURCE_ARN`.
const STALE_IDENTITY_VARS: [&str; 2] = ["APPMESH_RESOURCE_NAME", "APPMESH_VIRTUAL_NODE_NAME"];
const ENV_RESOURCE_ARN: &str = "APPMESH_RESOURCE_ARN";
const ENV_XDS_ENDPOINT: &str = "APPMESH_XDS_ENDPOINT";
const ENV_LOG_LEVEL: &str = "ENVOY_LOG_LEVEL";
const ENV_ADMIN_PORT: &str = "ENVOY_ADMIN_ACCESS_PORT";
const ENV_SDS_SOCKET_PATH: &str = "APPMESH_SDS_SOCKET_PATH";
/// The log driver that sends a container's output through the task's FireLens log router.
const FIRELENS_DRIVER: &str = "awsfirelens";
/// The log drivers whose configuration the sidecars take over from the app.
const INHERITED_DRIVERS: [&str; 2] = ["awslogs", FIRELENS_DRIVER];
/// Memory reservations given to owned containers only when ECS needs one (no task-level memory).
const ENVOY_DEFAULT_RESERVATION: u64 = 128;
const ROUTE_MANAGER_DEFAULT_RESERVATION: u64 = 32;

/// See [`crate::rewrite_with_warnings`].
pub(crate) fn rewrite(input: Value, opts: &Options) -> Result<Rewritten, Error> {
    validate::options(opts)?;
    let mut td = task_definition(input)?;
    validate::operating_system(&td)?;
    if opts.keep_envoy {
        return keep_envoy(td, opts).map(|definition| Rewritten {
            definition,
            warnings: Vec::new(),
        });
    }
    validate::network_mode(&td, opts)?;
    validate::launch_type(&td, opts)?;
    let mode = td.get("networkMode").and_then(Value::as_str);
    // Containers share Envoy's ports in awsvpc and host mode; in bridge mode each has its own.
    let shares_ports = matches!(mode, Some("awsvpc" | "host"));
    let bridge = matches!(mode, Some("bridge") | None);
    let mut warnings = Vec::new();

    let mut containers = take_containers(&mut td)?;
    validate::names(&containers)?;
    let envoy = find_envoy(&td, &containers)?;
    // A task Trellis already meshed keeps the images it runs unless a flag names others, so a
    // re-run (a deploy step, say) never resets a pinned image to the defaults.
    let meshed = match envoy {
        Some(i) => has_variable(&containers[i], i, ENV_XDS_ENDPOINT)?,
        None => false,
    };
    if let Some(i) = envoy {
        rename(&mut containers, i, ENVOY_CONTAINER)?;
    }
    let route_manager = find_by_name_or_image(
        &containers,
        ROUTE_MANAGER_CONTAINER,
        AWS_ROUTE_MANAGER_IMAGE,
    );
    if let Some(i) = route_manager {
        rename(&mut containers, i, ROUTE_MANAGER_CONTAINER)?;
    }
    let kept_image = |i: Option<usize>| {
        i.filter(|_| meshed)
            .and_then(|i| containers[i].get("image"))
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    let envoy_image = opts
        .envoy_image
        .clone()
        .or_else(|| kept_image(envoy))
        .unwrap_or_else(|| DEFAULT_ENVOY_IMAGE.to_string());
    let route_manager_image = opts
        .route_manager_image
        .clone()
        .or_else(|| kept_image(route_manager))
        .unwrap_or_else(|| DEFAULT_ROUTE_MANAGER_IMAGE.to_string());

    let had_proxy_configuration = td.get("proxyConfiguration").is_some_and(|v| !v.is_null());
    // Settings the task already carries, from either redirect mechanism.
    let mut existing = Existing::default();
    if let Some(pc) = td.get("proxyConfiguration").filter(|v| !v.is_null()) {
        let pc = json::object(pc, "proxyConfiguration")?;
        match json::str_field(pc, "type", "proxyConfiguration")? {
            None | Some("APPMESH") => {}
            Some(other) => {
                return Err(Error::invalid(
                    "proxyConfiguration.type",
                    format!("{other:?}"),
                    "only APPMESH is supported",
                ));
            }
        }
        existing.read_proxy_configuration(&json::name_values(
            pc,
            "properties",
            "proxyConfiguration",
        )?)?;
    }
    if let Some(i) = route_manager {
        let path = format!("containerDefinitions[{i}]");
        existing.read_route_manager(&json::name_values(&containers[i], "environment", &path)?)?;
    }

    // Logs: the sidecars log where the app logs (awslogs or FireLens), under their own stream
    // prefix, unless they already have a log configuration.
    let log_router = containers
        .iter()
        .position(|c| c.get("firelensConfiguration").is_some_and(|v| !v.is_null()));
    let owned = |i: usize| Some(i) == envoy || Some(i) == route_manager;
    let inherited = inherited_logs(&containers, &owned, log_router)?;
    let uses_firelens = |i: Option<usize>| -> Result<bool, Error> {
        let own = match i {
            Some(i) => log_driver(&containers[i], i)?,
            None => None,
        };
        Ok(match own {
            Some(driver) => driver == FIRELENS_DRIVER,
            None => inherited.as_ref().is_some_and(|lc| {
                lc.get("logDriver").and_then(Value::as_str) == Some(FIRELENS_DRIVER)
            }),
        })
    };
    let sidecar_firelens = uses_firelens(envoy)?
        || (opts.redirect() == Some(Redirect::RouteManager) && uses_firelens(route_manager)?);
    // A sidecar logging through FireLens needs the log router started first (ECS's own order), so
    // the log router must not wait for Envoy.
    if let Some(l) = log_router.filter(|_| sidecar_firelens) {
        undepend(&mut containers[l], l, ENVOY_CONTAINER)?;
        undepend(&mut containers[l], l, ROUTE_MANAGER_CONTAINER)?;
    }

    // Containers Envoy itself waits for (init containers, log routers) must not wait for Envoy.
    let mut before_envoy = HashSet::new();
    for i in envoy.iter().chain(route_manager.iter()) {
        reachable(&containers, *i, &mut before_envoy);
    }
    if let Some(l) = log_router.filter(|_| sidecar_firelens) {
        before_envoy.insert(l);
        reachable(&containers, l, &mut before_envoy);
    }
    let apps: Vec<usize> = (0..containers.len())
        .filter(|&i| !owned(i) && !before_envoy.contains(&i))
        .collect();

    let admin = match envoy {
        Some(i) => admin_port(
            Some(&containers[i]),
            &format!("containerDefinitions[{i}]"),
            opts,
        )?,
        None => admin_port(None, "", opts)?,
    };
    let mut derived_ports = Vec::new();
    for i in (0..containers.len()).filter(|&i| !owned(i)) {
        let path = format!("containerDefinitions[{i}]");
        validate::app_container(
            &containers[i],
            &path,
            shares_ports,
            admin,
            opts.is_gateway(),
        )?;
        if apps.contains(&i) {
            for (j, pm) in json::array_field(&containers[i], "portMappings", &path)?
                .iter()
                .enumerate()
            {
                let pm_path = format!("{path}.portMappings[{j}]");
                let port =
                    validate::port_field(json::object(pm, &pm_path)?, "containerPort", &pm_path)?;
                if let Some(p) = port.and_then(|p| u16::try_from(p).ok())
                    && !derived_ports.contains(&p)
                {
                    derived_ports.push(p);
                }
            }
        }
    }
    let settings = Settings::resolve(opts, existing, derived_ports);
    // Without a task-level memory, ECS needs a memory value on every container, ours included.
    let needs_memory = validate::task_memory(&td)?.is_none();
    match opts.redirect() {
        Some(Redirect::ProxyConfiguration) => {
            if settings.app_ports.is_empty() {
                return Err(Error::option(
                    "app-ports",
                    "",
                    "ECS's APPMESH proxyConfiguration needs AppPorts and no app container declares a containerPort",
                ));
            }
            validate::proxy_configuration_settings(&settings)?;
        }
        Some(Redirect::RouteManager) => {
            if had_proxy_configuration {
                warnings.push(Warning {
                    path: "proxyConfiguration".into(),
                    message: "ECS's redirect is replaced by the proxy-route-manager init container (pass --proxy-configuration to keep it): ECS installed its rules before any container started, the route manager installs them when it runs, so containers that start before it (a FireLens log router, init containers Envoy waits for) connect directly until then".into(),
                });
            }
            warnings.extend(past_fifteen(&settings));
        }
        Some(Redirect::Explicit) => warnings.push(Warning {
            path: "--explicit-backends".into(),
            message: "no transparent redirect, unlike App Mesh on ECS: inbound traffic reaches the app directly (the node's listener TLS, timeouts, health checks and outlier detection do not apply to it) and only clients that honour HTTP_PROXY go through Envoy".into(),
        }),
        None => {}
    }
    if matches!(
        opts.redirect(),
        Some(Redirect::RouteManager | Redirect::ProxyConfiguration)
    ) {
        for i in (0..containers.len()).filter(|&i| !owned(i)) {
            let path = format!("containerDefinitions[{i}]");
            warnings.extend(validate::ignored_user(&containers[i], &path, &settings)?);
        }
    }

    // The Envoy container.
    let envoy_idx = match envoy {
        Some(i) => i,
        None => {
            containers.push(Object::new());
            containers.len() - 1
        }
    };
    envoy_container(
        &mut containers[envoy_idx],
        envoy_idx,
        opts,
        &envoy_image,
        &settings,
        needs_memory,
    )?;
    sidecar_logs(
        &mut containers[envoy_idx],
        ENVOY_CONTAINER,
        inherited.as_ref(),
    );

    // The route manager, or ECS's proxyConfiguration, or neither for a gateway.
    let mut remove = None;
    match opts.redirect() {
        Some(Redirect::RouteManager) => {
            let i = match route_manager {
                Some(i) => i,
                None => {
                    containers.push(Object::new());
                    containers.len() - 1
                }
            };
            route_manager_container(
                &mut containers[i],
                i,
                &route_manager_image,
                &settings,
                needs_memory,
            )?;
            sidecar_logs(
                &mut containers[i],
                ROUTE_MANAGER_CONTAINER,
                inherited.as_ref(),
            );
            depend(
                &mut containers[envoy_idx],
                envoy_idx,
                ROUTE_MANAGER_CONTAINER,
                "SUCCESS",
            )?;
            td.shift_remove("proxyConfiguration");
        }
        Some(Redirect::ProxyConfiguration) => {
            remove = route_manager;
            proxy_configuration(&mut td, &settings)?;
        }
        Some(Redirect::Explicit) | None => {
            remove = route_manager;
            td.shift_remove("proxyConfiguration");
        }
    }
    for &i in &apps {
        depend(&mut containers[i], i, ENVOY_CONTAINER, "HEALTHY")?;
        if opts.redirect() == Some(Redirect::Explicit) {
            explicit_proxy(&mut containers[i], i, bridge)?;
        }
    }
    if let Some(r) = remove {
        containers.remove(r);
        for (i, c) in containers.iter_mut().enumerate() {
            undepend(c, i, ROUTE_MANAGER_CONTAINER)?;
        }
    }
    firelens_order(&mut containers)?;

    socket_volume(&mut td, opts)?;
    validate::resources(&td, &containers)?;
    validate::depends_on(&containers)?;

    td.insert(
        "containerDefinitions".into(),
        Value::Array(containers.into_iter().map(Value::Object).collect()),
    );
    Ok(Rewritten {
        definition: Value::Object(td),
        warnings,
    })
}

/// `--keep-envoy-image`: the task's own Envoy container (AWS's image, say) stays exactly as it is,
/// variables and health check included; only `APPMESH_XDS_ENDPOINT` and the socket mount (and its
/// volume) are set, so the image fetches its configuration from the agent instead of App Mesh.
/// Nothing else in the task changes: the redirect stays what the task had.
fn keep_envoy(mut td: Object, opts: &Options) -> Result<Value, Error> {
    validate::fargate_socket(&td, opts)?;
    let mut containers = take_containers(&mut td)?;
    validate::names(&containers)?;
    let Some(i) = find_envoy(&td, &containers)? else {
        return Err(Error::option(
            "keep-envoy-image",
            "",
            "the task has no Envoy container to keep: none is named envoy, named by proxyConfiguration.containerName, or runs AWS's aws-appmesh-envoy image",
        ));
    };
    let path = format!("containerDefinitions[{i}]");
    validate::identity(&containers[i], &path, opts)?;
    json::set_name_value(
        &mut containers[i],
        "environment",
        &path,
        ENV_XDS_ENDPOINT,
        &opts.xds_endpoint_value(),
    )?;
    socket_mount(&mut containers[i], &path, opts)?;
    socket_volume(&mut td, opts)?;
    td.insert(
        "containerDefinitions".into(),
        Value::Array(containers.into_iter().map(Value::Object).collect()),
    );
    Ok(Value::Object(td))
}

/// Where the route manager (run anywhere) departs from ECS's proxyConfiguration (and AWS's route
/// manager), which kept the first 15 ports of a list and dropped the rest.
fn past_fifteen(settings: &Settings) -> Vec<Warning> {
    let mut out = Vec::new();
    for (var, ports, effect) in [
        (
            settings::RM_APP_PORTS,
            &settings.app_ports,
            "inbound traffic to them now goes through Envoy where App Mesh sent it straight to the app",
        ),
        (
            settings::RM_EGRESS_IGNORED_PORTS,
            &settings.ignored_ports,
            "outbound traffic to them now bypasses Envoy where App Mesh sent it through Envoy",
        ),
    ] {
        if ports.len() > PROXY_CONFIGURATION_MAX_PORTS {
            let beyond = ports[PROXY_CONFIGURATION_MAX_PORTS..]
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",");
            out.push(Warning {
                path: format!("{ROUTE_MANAGER_CONTAINER}.{var}"),
                message: format!(
                    "{} ports: ECS's App Mesh redirect applied only the first {PROXY_CONFIGURATION_MAX_PORTS} and dropped the rest, the route manager applies them all; for ports {beyond} {effect}",
                    ports.len()
                ),
            });
        }
    }
    out
}

/// Points an app container at Envoy's egress port as its HTTP proxy. Variables the user already set
/// win (a user's `NO_PROXY` may list more hosts that bypass Envoy); new ones are appended, so the
/// user's order is kept. In bridge mode Envoy is reached by a container link.
fn explicit_proxy(c: &mut Object, i: usize, bridge: bool) -> Result<(), Error> {
    let path = format!("containerDefinitions[{i}]");
    let host = if bridge { ENVOY_CONTAINER } else { "127.0.0.1" };
    let proxy = format!("http://{host}:{ENVOY_EGRESS_PORT}");
    let no_proxy = ["localhost", "127.0.0.1"]
        .into_iter()
        .chain(ALWAYS_IGNORED_IPS)
        .collect::<Vec<_>>()
        .join(",");
    let have: HashSet<String> = json::name_values(c, "environment", &path)?
        .into_iter()
        .map(|nv| nv.name)
        .collect();
    let env = json::array_field_mut(c, "environment", &path)?;
    for (name, value) in [
        ("HTTP_PROXY", &proxy),
        ("http_proxy", &proxy),
        ("NO_PROXY", &no_proxy),
        ("no_proxy", &no_proxy),
    ] {
        if !have.contains(name) {
            env.push(json!({"name": name, "value": value}));
        }
    }
    if bridge {
        let links = json::array_field_mut(c, "links", &path)?;
        let linked = links.iter().filter_map(Value::as_str).any(|l| {
            l == ENVOY_CONTAINER || l.split_once(':').is_some_and(|(n, _)| n == ENVOY_CONTAINER)
        });
        if !linked {
            links.push(json!(ENVOY_CONTAINER));
        }
    }
    Ok(())
}

/// Unwraps `DescribeTaskDefinition` output and drops its read-only fields; carries its `tags` over.
pub(crate) fn task_definition(input: Value) -> Result<Object, Error> {
    let mut top = match input {
        Value::Object(m) => m,
        other => {
            return Err(json::wrong(
                "(top level)",
                "an object (a task definition)",
                &other,
            ));
        }
    };
    let mut td = match top.shift_remove("taskDefinition") {
        Some(Value::Object(inner)) => {
            let mut inner = inner;
            let tags = top.shift_remove("tags");
            if let Some(tags) = tags.filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
                inner.entry("tags").or_insert(tags);
            }
            inner
        }
        Some(other) => return Err(json::wrong("taskDefinition", "an object", &other)),
        None => top,
    };
    for field in READ_ONLY {
        td.shift_remove(field);
    }
    Ok(td)
}

/// Takes the container list out (leaving its key in place, so the field keeps its position).
fn take_containers(td: &mut Object) -> Result<Vec<Object>, Error> {
    let list = match td.get_mut("containerDefinitions") {
        Some(Value::Array(a)) => std::mem::take(a),
        Some(other) => return Err(json::wrong("containerDefinitions", "an array", other)),
        None => {
            td.insert("containerDefinitions".into(), Value::Array(Vec::new()));
            Vec::new()
        }
    };
    list.into_iter()
        .enumerate()
        .map(|(i, c)| match c {
            Value::Object(m) => Ok(m),
            other => Err(json::wrong(
                &format!("containerDefinitions[{i}]"),
                "an object",
                &other,
            )),
        })
        .collect()
}

fn name_of(c: &Object) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// The Envoy container: named `envoy`, or the one an App Mesh `proxyConfiguration` names, or the only
/// container running AWS's Envoy image.
fn find_envoy(td: &Object, containers: &[Object]) -> Result<Option<usize>, Error> {
    if let Some(i) = containers
        .iter()
        .position(|c| name_of(c) == ENVOY_CONTAINER)
    {
        return Ok(Some(i));
    }
    if let Some(pc) = td.get("proxyConfiguration").and_then(Value::as_object)
        && let Some(name) = json::str_field(pc, "containerName", "proxyConfiguration")?
    {
        return match containers.iter().position(|c| name_of(c) == name) {
            Some(i) => Ok(Some(i)),
            None => Err(Error::UnknownDependency {
                path: "proxyConfiguration.containerName".into(),
                name: name.to_string(),
            }),
        };
    }
    Ok(find_by_name_or_image(
        containers,
        ENVOY_CONTAINER,
        AWS_ENVOY_IMAGE,
    ))
}

fn find_by_name_or_image(containers: &[Object], name: &str, image: &str) -> Option<usize> {
    if let Some(i) = containers.iter().position(|c| name_of(c) == name) {
        return Some(i);
    }
    let mut by_image = containers.iter().enumerate().filter(|(_, c)| {
        c.get("image")
            .and_then(Value::as_str)
            .is_some_and(|im| im.contains(image))
    });
    match (by_image.next(), by_image.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    }
}

/// Renames container `i` and every reference to it (`dependsOn`, `volumesFrom`).
fn rename(containers: &mut [Object], i: usize, to: &str) -> Result<(), Error> {
    let from = name_of(&containers[i]).to_string();
    if from == to {
        return Ok(());
    }
    if let Some(j) = containers.iter().position(|c| name_of(c) == to) {
        return Err(Error::DuplicateName {
            path: format!("containerDefinitions[{j}].name"),
            name: to.to_string(),
            first: format!(
                "containerDefinitions[{i}] (the Trellis-owned container {from:?} becomes {to:?})"
            ),
        });
    }
    containers[i].insert("name".into(), json!(to));
    for c in containers.iter_mut() {
        for key in ["dependsOn", "volumesFrom"] {
            let field = if key == "dependsOn" {
                "containerName"
            } else {
                "sourceContainer"
            };
            if let Some(Value::Array(list)) = c.get_mut(key) {
                for entry in list.iter_mut().filter_map(Value::as_object_mut) {
                    if entry.get(field).and_then(Value::as_str) == Some(from.as_str()) {
                        entry.insert(field.into(), json!(to));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Adds to `seen` every container that `start` waits for, directly or not.
fn reachable(containers: &[Object], start: usize, seen: &mut HashSet<usize>) {
    let mut stack = vec![start];
    while let Some(i) = stack.pop() {
        let deps = containers[i].get("dependsOn").and_then(Value::as_array);
        for d in deps.into_iter().flatten() {
            let Some(target) = d.get("containerName").and_then(Value::as_str) else {
                continue;
            };
            if let Some(t) = containers.iter().position(|c| name_of(c) == target)
                && seen.insert(t)
            {
                stack.push(t);
            }
        }
    }
}

/// The admin port the health check probes: the user's `ENVOY_ADMIN_ACCESS_PORT` if set, else 9901.
fn admin_port(envoy: Option<&Object>, path: &str, opts: &Options) -> Result<u16, Error> {
    if let Some((_, v)) = opts.envoy_env.iter().find(|(n, _)| n == ENV_ADMIN_PORT) {
        return v.parse().map_err(|_| {
            Error::option(
                "envoy-env",
                format!("{ENV_ADMIN_PORT}={v}"),
                "must be a port number",
            )
        });
    }
    let Some(envoy) = envoy else {
        return Ok(ENVOY_ADMIN_PORT);
    };
    for nv in json::name_values(envoy, "environment", path)? {
        if nv.name == ENV_ADMIN_PORT {
            return nv.value.trim().parse().map_err(|_| {
                Error::invalid(nv.path, format!("{:?}", nv.value), "must be a port number")
            });
        }
    }
    Ok(ENVOY_ADMIN_PORT)
}

fn envoy_container(
    c: &mut Object,
    i: usize,
    opts: &Options,
    image: &str,
    settings: &Settings,
    needs_memory: bool,
) -> Result<(), Error> {
    let path = format!("containerDefinitions[{i}]");
    let admin = admin_port(Some(c), &path, opts)?;
    c.insert("name".into(), json!(ENVOY_CONTAINER));
    c.insert("image".into(), json!(image));
    c.insert("essential".into(), json!(true));
    if opts.is_gateway() {
        c.shift_remove("user");
    } else {
        c.insert("user".into(), json!(settings.envoy_user()));
    }
    if let Some(cpu) = opts.envoy_cpu {
        c.insert("cpu".into(), json!(cpu));
    }
    if let Some(memory) = opts.envoy_memory {
        c.insert("memory".into(), json!(memory));
    }
    default_reservation(c, needs_memory, ENVOY_DEFAULT_RESERVATION);

    let mut env = vec![
        (ENV_RESOURCE_ARN.to_string(), opts.resource_arn()),
        (ENV_XDS_ENDPOINT.to_string(), opts.xds_endpoint_value()),
    ];
    if let Some(level) = &opts.envoy_log_level {
        env.push((ENV_LOG_LEVEL.to_string(), level.clone()));
    }
    env.extend(opts.envoy_env.iter().cloned());
    if let Some(p) = &opts.sds_socket_path {
        env.push((ENV_SDS_SOCKET_PATH.to_string(), p.clone()));
    }
    json::set_name_values(c, "environment", &path, &env, &STALE_IDENTITY_VARS)?;

    socket_mount(c, &path, opts)?;

    if let Some(dir) = opts.sds_socket_dir() {
        let mount = json!({"sourceVolume": SDS_VOLUME, "containerPath": dir, "readOnly": true});
        let mounts = json::array_field_mut(c, "mountPoints", &path)?;
        match position_by(mounts, "sourceVolume", SDS_VOLUME) {
            Some(p) => mounts[p] = mount,
            None => mounts.push(mount),
        }
    }

    // Envoy holds a socket per connection; keep the user's nofile limit if they set one.
    let ulimits = json::array_field_mut(c, "ulimits", &path)?;
    if !ulimits
        .iter()
        .any(|u| u.get("name").and_then(Value::as_str) == Some("nofile"))
    {
        ulimits
            .push(json!({"name": "nofile", "softLimit": ENVOY_NOFILE, "hardLimit": ENVOY_NOFILE}));
    }

    c.insert(
        "healthCheck".into(),
        json!({
            "command": [
                "CMD-SHELL",
                format!("curl -s http://localhost:{admin}/server_info | grep state | grep -q LIVE"),
            ],
            "interval": 5,
            "timeout": 2,
            "retries": 3,
            "startPeriod": 10,
        }),
    );
    if opts.redirect() != Some(Redirect::RouteManager) {
        undepend(c, i, ROUTE_MANAGER_CONTAINER)?;
    }
    Ok(())
}

fn route_manager_container(
    c: &mut Object,
    i: usize,
    image: &str,
    settings: &Settings,
    needs_memory: bool,
) -> Result<(), Error> {
    let path = format!("containerDefinitions[{i}]");
    c.insert("name".into(), json!(ROUTE_MANAGER_CONTAINER));
    c.insert("image".into(), json!(image));
    // It exits once the rules are in; an essential container exiting would stop the task.
    c.insert("essential".into(), json!(false));
    default_reservation(c, needs_memory, ROUTE_MANAGER_DEFAULT_RESERVATION);

    let lp_path = format!("{path}.linuxParameters");
    let lp = json::object_mut(
        c.entry("linuxParameters").or_insert_with(|| json!({})),
        &lp_path,
    )?;
    let caps_path = format!("{lp_path}.capabilities");
    let caps = json::object_mut(
        lp.entry("capabilities").or_insert_with(|| json!({})),
        &caps_path,
    )?;
    let add = json::array_field_mut(caps, "add", &caps_path)?;
    if !add.iter().any(|a| a.as_str() == Some("NET_ADMIN")) {
        add.push(json!("NET_ADMIN"));
    }

    json::set_name_values(
        c,
        "environment",
        &path,
        &settings.route_manager_env(),
        &settings::ROUTE_MANAGER_VARS,
    )
}

/// The agent socket's mount in the Envoy container (or none when Envoy reaches the agent over TCP).
fn socket_mount(c: &mut Object, path: &str, opts: &Options) -> Result<(), Error> {
    let mount = json!({"sourceVolume": SOCKET_VOLUME, "containerPath": SOCKET_CONTAINER_PATH, "readOnly": true});
    if opts.xds_endpoint.is_none() {
        let mounts = json::array_field_mut(c, "mountPoints", path)?;
        match position_by(mounts, "sourceVolume", SOCKET_VOLUME) {
            Some(p) => mounts[p] = mount,
            None => mounts.push(mount),
        }
    } else if let Some(Value::Array(mounts)) = c.get_mut("mountPoints")
        && let Some(p) = position_by(mounts, "sourceVolume", SOCKET_VOLUME)
    {
        mounts.remove(p);
        if mounts.is_empty() {
            c.shift_remove("mountPoints");
        }
    }
    Ok(())
}

/// Whether container `i` sets variable `name` (to anything).
fn has_variable(c: &Object, i: usize, name: &str) -> Result<bool, Error> {
    let path = format!("containerDefinitions[{i}]");
    Ok(json::name_values(c, "environment", &path)?
        .iter()
        .any(|nv| nv.name == name))
}

/// Container `i`'s `logConfiguration.logDriver`, if it has a log configuration.
fn log_driver(c: &Object, i: usize) -> Result<Option<String>, Error> {
    let path = format!("containerDefinitions[{i}].logConfiguration");
    match c.get("logConfiguration").filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(lc) => Ok(Some(
            json::str_field(json::object(lc, &path)?, "logDriver", &path)?
                .unwrap_or_default()
                .to_string(),
        )),
    }
}

/// The app's log configuration the sidecars take over: the first awslogs or FireLens one among the
/// essential containers (then the others), leaving out the sidecars and the log router itself.
fn inherited_logs(
    containers: &[Object],
    owned: &dyn Fn(usize) -> bool,
    log_router: Option<usize>,
) -> Result<Option<Object>, Error> {
    let essential = |c: &Object| c.get("essential").and_then(Value::as_bool) != Some(false);
    for want_essential in [true, false] {
        for (i, c) in containers.iter().enumerate() {
            if owned(i) || Some(i) == log_router || essential(c) != want_essential {
                continue;
            }
            if let Some(driver) = log_driver(c, i)?
                && INHERITED_DRIVERS.contains(&driver.as_str())
                && let Some(Value::Object(lc)) = c.get("logConfiguration")
            {
                return Ok(Some(lc.clone()));
            }
        }
    }
    Ok(None)
}

/// Gives a sidecar without a log configuration the app's, under its own stream prefix, so its logs
/// are reachable where the app's are (on Fargate there is nowhere else to read them).
fn sidecar_logs(c: &mut Object, name: &str, inherited: Option<&Object>) {
    if c.get("logConfiguration").is_some_and(|v| !v.is_null()) {
        return;
    }
    let Some(mut lc) = inherited.cloned() else {
        return;
    };
    let driver = lc
        .get("logDriver")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(Value::Object(options)) = lc.get_mut("options") {
        if driver == FIRELENS_DRIVER {
            // Fluent Bit's CloudWatch output; other outputs tell containers apart by the
            // container_name FireLens adds to each record.
            if options.contains_key("log_stream_prefix") {
                options.insert("log_stream_prefix".into(), json!(format!("{name}/")));
            }
        } else {
            options.insert("awslogs-stream-prefix".into(), json!(name));
        }
    }
    c.insert("logConfiguration".into(), Value::Object(lc));
}

/// ECS starts the log router before every container that logs through it only while the log router
/// has no `dependsOn` of its own; the rewrite may give it one, so the order is written down: each
/// FireLens container waits for the log router to START unless it already waits for it.
fn firelens_order(containers: &mut [Object]) -> Result<(), Error> {
    let Some(router) = containers
        .iter()
        .position(|c| c.get("firelensConfiguration").is_some_and(|v| !v.is_null()))
    else {
        return Ok(());
    };
    let router_name = name_of(&containers[router]).to_string();
    for (i, c) in containers.iter_mut().enumerate() {
        if i == router || log_driver(c, i)?.as_deref() != Some(FIRELENS_DRIVER) {
            continue;
        }
        let path = format!("containerDefinitions[{i}]");
        let deps = json::array_field_mut(c, "dependsOn", &path)?;
        let waits = deps
            .iter()
            .any(|d| d.get("containerName").and_then(Value::as_str) == Some(router_name.as_str()));
        if !waits {
            deps.push(json!({"containerName": router_name, "condition": "START"}));
        }
    }
    Ok(())
}

fn default_reservation(c: &mut Object, needs_memory: bool, mib: u64) {
    let unset = |k: &str| c.get(k).is_none_or(Value::is_null);
    if needs_memory && unset("memory") && unset("memoryReservation") {
        c.insert("memoryReservation".into(), json!(mib));
    }
}

/// Sets ECS's native redirect, keeping any property the tool does not own.
fn proxy_configuration(td: &mut Object, settings: &Settings) -> Result<(), Error> {
    let pc = json::object_mut(
        td.entry("proxyConfiguration").or_insert_with(|| json!({})),
        "proxyConfiguration",
    )?;
    pc.insert("type".into(), json!("APPMESH"));
    pc.insert("containerName".into(), json!(ENVOY_CONTAINER));
    json::set_name_values(
        pc,
        "properties",
        "proxyConfiguration",
        &settings.proxy_properties(),
        &settings::PROXY_PROPERTIES,
    )
}

/// Adds (or fixes the condition of) a dependency, keeping every other entry in place.
fn depend(c: &mut Object, i: usize, target: &str, condition: &str) -> Result<(), Error> {
    let path = format!("containerDefinitions[{i}]");
    let deps = json::array_field_mut(c, "dependsOn", &path)?;
    for (j, d) in deps.iter_mut().enumerate() {
        let d = json::object_mut(d, &format!("{path}.dependsOn[{j}]"))?;
        if d.get("containerName").and_then(Value::as_str) == Some(target) {
            d.insert("condition".into(), json!(condition));
            return Ok(());
        }
    }
    deps.push(json!({"containerName": target, "condition": condition}));
    Ok(())
}

fn undepend(c: &mut Object, i: usize, target: &str) -> Result<(), Error> {
    let path = format!("containerDefinitions[{i}]");
    if let Some(Value::Array(deps)) = c.get_mut("dependsOn") {
        let before = deps.len();
        deps.retain(|d| d.get("containerName").and_then(Value::as_str) != Some(target));
        if deps.is_empty() && before > 0 {
            c.shift_remove("dependsOn");
        }
    } else if let Some(other) = c.get("dependsOn").filter(|v| !v.is_null()) {
        return Err(json::wrong(&format!("{path}.dependsOn"), "an array", other));
    }
    Ok(())
}

/// The host volume carrying the agent socket (removed when Envoy uses a TCP endpoint).
fn socket_volume(td: &mut Object, opts: &Options) -> Result<(), Error> {
    let volume = json!({"name": SOCKET_VOLUME, "host": {"sourcePath": opts.socket_host_path}});
    if opts.xds_endpoint.is_none() {
        let volumes = json::array_field_mut(td, "volumes", "")?;
        match position_by(volumes, "name", SOCKET_VOLUME) {
            Some(p) => volumes[p] = volume,
            None => volumes.push(volume),
        }
    } else if let Some(Value::Array(volumes)) = td.get_mut("volumes")
        && let Some(p) = position_by(volumes, "name", SOCKET_VOLUME)
    {
        volumes.remove(p);
    }
    if let Some(dir) = opts.sds_socket_dir() {
        let volume = json!({"name": SDS_VOLUME, "host": {"sourcePath": dir}});
        let volumes = json::array_field_mut(td, "volumes", "")?;
        match position_by(volumes, "name", SDS_VOLUME) {
            Some(p) => volumes[p] = volume,
            None => volumes.push(volume),
        }
    }
    Ok(())
}

fn position_by(list: &[Value], key: &str, value: &str) -> Option<usize> {
    list.iter()
        .position(|v| v.get(key).and_then(Value::as_str) == Some(value))
}
