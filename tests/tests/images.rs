//! The container images as users get them: `images/build.sh` builds all three with buildah (no
//! Docker engine), then each is inspected (entrypoint as its Containerfile declares it, user, OCI
//! labels), unpacked with umoci, and run from its root filesystem inside a fresh network namespace
//! (`ip netns` + `unshare --pid` + `chroot` as the image's user): the agent serves and answers its
//! health check as uid 1338, the route manager installs its rules with the image's own iptables
//! (nft and legacy both start), the Envoy image's entrypoint starts Envoy as 1337 and stops it
//! cleanly on SIGTERM, and the Envoy image gets its listeners from the agent image through the host
//! socket directory (uid 1337 reaching uid 1338's socket), each in its own network namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::reap::{remove_at_exit, scratch_dir};
use trellis_tests::{
    Proc, Workdir, bin, can_run_privileged, check, eventually, run, workspace_root,
};

/// The OCI layout with all three images, built once per test process and shared by its tests.
fn layout() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bins = bin("trellis-agent")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        // Both binaries come from the same (just refreshed) build directory.
        bin("trellis-proxy-route-manager");
        let out = scratch_dir().join(format!("trellis-images-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        // A static is never dropped: the layout goes when the test process does, however it ends.
        remove_at_exit(&out);
        check(
            Command::new("bash")
                .arg(workspace_root().join("images/build.sh"))
                .arg("--out")
                .arg(&out)
                .env("TRELLIS_BIN_DIR", &bins)
                .env("TRELLIS_ENVOY", trellis_tests::envoy()),
        );
        out
    })
}

/// True when the image tools are here; under CI they must be.
fn tools_ready(test: &str) -> bool {
    if !can_run_privileged(test) {
        return false;
    }
    let missing: Vec<&str> = ["buildah", "skopeo", "umoci"]
        .into_iter()
        .filter(|t| {
            !run(Command::new("sh").args(["-c", &format!("command -v {t}")]))
                .status
                .success()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {missing:?} missing and CI is set: run scripts/setup.sh"
    );
    eprintln!("SKIPPED {test}: {missing:?} missing (scripts/setup.sh installs them)");
    false
}

/// The image's config (`skopeo inspect --config`), `.config` part.
fn config(image: &str) -> Value {
    let text = check(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:{image}", layout().display()),
    ]));
    let v: Value = serde_json::from_str(&text).expect("skopeo prints JSON");
    v["config"].clone()
}

/// What the Containerfile's final stage declares, so the engine-less build cannot drift from it.
fn declared_entrypoint(image: &str) -> Value {
    let file = workspace_root().join(format!("images/{image}/Containerfile"));
    let text = std::fs::read_to_string(&file).expect("read Containerfile");
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .unwrap_or_else(|| panic!("{} declares no ENTRYPOINT", file.display()));
    serde_json::from_str(line).expect("ENTRYPOINT in exec (JSON) form")
}

/// An unpacked image and a network namespace to run it in; both removed on drop.
struct Unpacked {
    dir: PathBuf,
    ns: String,
    env: Vec<(String, String)>,
    user: String,
    /// Host paths bound into the image's root (a task's host volumes), as (host, in-image path).
    binds: Vec<(PathBuf, String)>,
}

impl Unpacked {
    /// `tag` tells apart two unpackings of one image in one test.
    fn new(work: &Workdir, image: &str, cfg: &Value, tag: &str) -> Self {
        let dir = work.join(&format!("unpacked-{image}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        check(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{image}", layout().display()))
                .arg(&dir),
        );
        let ns = format!("trl-{}{tag}-{}", &image[8..11], std::process::id());
        let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        check(Command::new("ip").args(["netns", "add", &ns]));
        check(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        let env = cfg["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Unpacked {
            dir,
            ns,
            env,
            user: cfg["User"].as_str().unwrap_or("0:0").to_string(),
            binds: Vec::new(),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// `argv` inside the image: its netns, a pid namespace, its root, its user and environment.
    /// `--kill-child` does not end the image's program with `unshare` (the uid change clears the
    /// parent-death signal): a long-running one must be a [`Proc`], whose drop kills the tree.
    fn cmd(&self, argv: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .args(["unshare", "--pid", "--fork", "--kill-child"])
            .arg(format!(
                "--mount-proc={}",
                self.rootfs().join("proc").display()
            ))
            // A container runtime provides /dev (programs open /dev/null) with a private /dev/shm
            // (Envoy's hot-restart region); bind the host's /dev with a fresh tmpfs on shm in the
            // private mount namespace, then enter the image's root as its user.
            .args(["sh", "-c", &self.enter_script()])
            .arg(self.rootfs())
            .arg(&self.user)
            .args(argv)
            .env_clear();
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c
    }
}

impl Unpacked {
    fn enter_script(&self) -> String {
        let mut script = String::from(
            "root=$0 user=$1; shift; mount --bind /dev \"$root/dev\" && mount -t tmpfs -o mode=1777 shm \"$root/dev/shm\"",
        );
        for (host, inside) in &self.binds {
            script.push_str(&format!(
                " && mount --bind '{}' \"$root{inside}\"",
                host.display()
            ));
        }
        script.push_str(" && exec chroot --userspec=\"$user\" \"$root\" \"$@\"");
        script
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.ns]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn argv(entrypoint: &Value) -> Vec<String> {
    entrypoint
        .as_array()
        .expect("entrypoint is a list")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

/// Entrypoint present and as declared, the expected user, and the OCI labels.
fn inspect(image: &str, want_user: &str) -> Value {
    let cfg = config(image);
    assert_eq!(
        cfg["Entrypoint"],
        declared_entrypoint(image),
        "{image}: the built entrypoint differs from its Containerfile's"
    );
    assert_eq!(cfg["User"], want_user, "{image}: user");
    let labels = &cfg["Labels"];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        labels["org.opencontainers.image.version"], version,
        "{image}"
    );
    assert_eq!(labels["org.opencontainers.image.title"], image);
    let revision = run(Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace_root()));
    if revision.status.success() {
        assert_eq!(
            labels["org.opencontainers.image.revision"],
            String::from_utf8_lossy(&revision.stdout).trim(),
            "{image}: revision label"
        );
    }
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| !s.is_empty() && s != "unknown"),
        "{image}: source label {labels}"
    );
    cfg
}

#[test]
fn agent_image_runs_as_1338_and_serves_from_its_own_root() {
    if !tools_ready("agent_image_runs_as_1338_and_serves_from_its_own_root") {
        return;
    }
    let work = Workdir::new("image-agent");
    let cfg = inspect("trellis-agent", "1338:1338");
    let img = Unpacked::new(&work, "trellis-agent", &cfg, "a");
    let entry = argv(&cfg["Entrypoint"]);
    let bin = img.rootfs().join(entry[0].trim_start_matches('/'));
    assert!(bin.is_file(), "entrypoint {} missing", bin.display());

    let entry: Vec<&str> = entry.iter().map(String::as_str).collect();
    let version = check(&mut img.cmd(&[entry.as_slice(), &["--version"]].concat(), &[]));
    assert_eq!(
        version.trim(),
        format!("trellis-agent {}", env!("CARGO_PKG_VERSION"))
    );
    check(&mut img.cmd(&[entry.as_slice(), &["serve", "--help"]].concat(), &[]));

    // The image's CMD (`serve`) as its non-root user: the data and socket directories are its own.
    let cmd_args: Vec<String> = argv(&cfg["Cmd"]);
    let full: Vec<&str> = entry
        .iter()
        .copied()
        .chain(cmd_args.iter().map(String::as_str))
        .collect();
    let mut agent = Proc::spawn(
        "agent image",
        &mut img.cmd(&full, &[]),
        work.join("agent.log"),
    );
    eventually(
        "the agent in the image is healthy",
        Duration::from_secs(60),
        || {
            if !agent.is_running() {
                return Err(format!("agent exited:\n{}", agent.log_text()));
            }
            let out = run(&mut img.cmd(&[entry[0], "health"], &[]));
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    );
    // A write through the API lands in the image's data directory, owned by the agent's user.
    check(Command::new("ip").args([
        "netns",
        "exec",
        &img.ns,
        "curl",
        "-sf",
        "-X",
        "PUT",
        "http://127.0.0.1:9080/v20190125/meshes",
        "-d",
        r#"{"meshName": "image-check"}"#,
    ]));
    let sock = img.rootfs().join("var/run/trellis/xds.sock");
    assert!(sock.exists(), "no ADS socket at {}", sock.display());
    let written: Vec<u32> = std::fs::read_dir(img.rootfs().join("var/lib/trellis"))
        .expect("data dir")
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .collect();
    assert!(
        !written.is_empty() && written.iter().all(|uid| *uid == 1338),
        "the agent's data directory holds files of uids {written:?}, expected 1338's"
    );
}

#[test]
fn route_manager_image_installs_the_redirect_with_its_own_iptables() {
    if !tools_ready("route_manager_image_installs_the_redirect_with_its_own_iptables") {
        return;
    }
    let work = Workdir::new("image-route-manager");
    let cfg = inspect("trellis-proxy-route-manager", "0:0");
    let img = Unpacked::new(&work, "trellis-proxy-route-manager", &cfg, "a");
    let entry = argv(&cfg["Entrypoint"]);
    let entry: Vec<&str> = entry.iter().map(String::as_str).collect();
    assert!(
        img.rootfs()
            .join(entry[0].trim_start_matches('/'))
            .is_file(),
        "entrypoint missing"
    );
    let version = check(&mut img.cmd(&[entry.as_slice(), &["--version"]].concat(), &[]));
    assert!(
        version.starts_with("trellis-proxy-route-manager "),
        "{version}"
    );
    check(&mut img.cmd(&[entry.as_slice(), &["--help"]].concat(), &[]));
    // Both backends the route manager can detect are in the image and start.
    for prog in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
    ] {
        check(&mut img.cmd(&[prog], &[]));
    }
    // The real thing: App Mesh's rules installed in the namespace from inside the image.
    let env = [
        ("APPMESH_START_ENABLED", "1"),
        ("APPMESH_IGNORE_UID", "1337"),
        ("APPMESH_APP_PORTS", "8080"),
    ];
    check(&mut img.cmd(&entry, &env));
    // Whichever backend it detected, the host's programs of that backend see the rules.
    let rules: String = ["iptables-nft-save", "iptables-legacy-save"]
        .into_iter()
        .map(|p| check(Command::new("ip").args(["netns", "exec", &img.ns, p, "-t", "nat"])))
        .collect();
    assert!(
        rules.contains("-A APPMESH_INGRESS") && rules.contains("-A APPMESH_EGRESS"),
        "no App Mesh chains after the image ran:\n{rules}"
    );
    let status = run(&mut img.cmd(&[entry.as_slice(), &["--status"]].concat(), &env));
    assert!(
        status.status.success(),
        "--status from the image: {}",
        String::from_utf8_lossy(&status.stdout)
    );
}

#[test]
fn envoy_image_starts_envoy_as_1337_and_stops_it_on_sigterm() {
    if !tools_ready("envoy_image_starts_envoy_as_1337_and_stops_it_on_sigterm") {
        return;
    }
    let work = Workdir::new("image-envoy");
    let cfg = inspect("trellis-envoy", "1337:1337");
    let img = Unpacked::new(&work, "trellis-envoy", &cfg, "a");
    let entry = argv(&cfg["Entrypoint"]);
    let entry: Vec<&str> = entry.iter().map(String::as_str).collect();
    let version = check(&mut img.cmd(&["/usr/local/bin/envoy", "--version"], &[]));
    assert!(version.contains("/1.40."), "{version}");

    let env = [
        ("APPMESH_RESOURCE_ARN", "mesh/shop/virtualNode/web"),
        ("ENVOY_DRAIN_TIMEOUT", "1"),
        // No agent here: LIVE after the initial fetch gives up instead of waiting forever.
        ("ENVOY_INITIAL_FETCH_TIMEOUT", "1"),
    ];
    let mut ep = Proc::spawn(
        "envoy image",
        &mut img.cmd(&entry, &env),
        work.join("envoy.log"),
    );
    // The health check trellis-rewrite puts on the Envoy container, run inside the image.
    let health = "curl -s http://localhost:9901/server_info | grep state | grep -q LIVE";
    eventually(
        "the Envoy image's health check passes",
        Duration::from_secs(60),
        || {
            if !ep.is_running() {
                return Err(format!("entrypoint exited:\n{}", ep.log_text()));
            }
            let out = run(&mut img.cmd(&["/bin/sh", "-c", health], &[]));
            out.status
                .success()
                .then_some(())
                .ok_or("not LIVE yet".into())
        },
    );
    assert!(
        img.rootfs().join("tmp/envoy-bootstrap.json").exists(),
        "the entrypoint wrote no bootstrap"
    );
    // SIGTERM to the entrypoint (pid 1 of the image's pid namespace): drain, then exit 0.
    let pids = check(Command::new("pgrep").args(["-f", "^/usr/local/bin/trellis-agent envoy"]));
    let mine: Vec<&str> = pids
        .lines()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/root"))
                .map(|r| r == img.rootfs())
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(mine.len(), 1, "entrypoint processes in the image: {pids}");
    check(Command::new("kill").args(["-TERM", mine[0]]));
    let status = eventually("the Envoy image exits", Duration::from_secs(60), || {
        ep.exited().ok_or_else(|| "running".to_string())
    });
    assert_eq!(status.code(), Some(0), "{}", ep.log_text());
}

#[test]
fn envoy_image_gets_its_config_from_the_agent_image_over_the_host_socket_directory() {
    if !tools_ready(
        "envoy_image_gets_its_config_from_the_agent_image_over_the_host_socket_directory",
    ) {
        return;
    }
    // The instance: the agent image (uid 1338) makes the socket in its socket directory, which the
    // Envoy image (uid 1337) gets as the host volume trellis-rewrite mounts, in its own netns.
    let work = Workdir::new("image-pair");
    let agent_cfg = config("trellis-agent");
    let agent = Unpacked::new(&work, "trellis-agent", &agent_cfg, "b");
    let entry = argv(&agent_cfg["Entrypoint"]);
    let mut full: Vec<String> = entry.clone();
    full.extend(argv(&agent_cfg["Cmd"]));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    // No ECS agent on this host to attest the Envoy with: a lab's setting.
    let mut agent_proc = Proc::spawn(
        "agent image",
        &mut agent.cmd(&full, &[("TRELLIS_XDS_ATTESTATION", "none")]),
        work.join("agent.log"),
    );
    let in_agent_ns = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &agent.ns]).args(args);
        c
    };
    eventually("the agent image serves", Duration::from_secs(60), || {
        if !agent_proc.is_running() {
            return Err(format!("agent exited:\n{}", agent_proc.log_text()));
        }
        let out = run(&mut agent.cmd(&[entry[0].as_str(), "health"], &[]));
        out.status
            .success()
            .then_some(())
            .ok_or("not healthy".into())
    });
    for (path, body) in [
        ("/v20190125/meshes", r#"{"meshName": "shop"}"#),
        (
            "/v20190125/meshes/shop/virtualNodes",
            r#"{"virtualNodeName": "web", "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}], "serviceDiscovery": {"dns": {"hostname": "web.shop.local"}}}}"#,
        ),
    ] {
        check(&mut in_agent_ns(&[
            "curl",
            "-sf",
            "-X",
            "PUT",
            &format!("http://127.0.0.1:9080{path}"),
            "-d",
            body,
        ]));
    }

    let envoy_cfg = config("trellis-envoy");
    let mut envoy = Unpacked::new(&work, "trellis-envoy", &envoy_cfg, "b");
    std::fs::create_dir_all(envoy.rootfs().join("var/run/trellis")).expect("mount point");
    envoy.binds.push((
        agent.rootfs().join("var/run/trellis"),
        "/var/run/trellis".into(),
    ));
    let env = [("APPMESH_RESOURCE_ARN", "mesh/shop/virtualNode/web")];
    let entry = argv(&envoy_cfg["Entrypoint"]);
    let entry: Vec<&str> = entry.iter().map(String::as_str).collect();
    let mut envoy_proc = Proc::spawn(
        "envoy image",
        &mut envoy.cmd(&entry, &env),
        work.join("envoy.log"),
    );
    // LIVE with its listener from the agent (the initial fetch waits for the agent: no timeout).
    eventually(
        "Envoy from the image has the agent's listener",
        Duration::from_secs(60),
        || {
            if !envoy_proc.is_running() {
                return Err(format!("entrypoint exited:\n{}", envoy_proc.log_text()));
            }
            let out = run(&mut envoy.cmd(
                &["/usr/bin/curl", "-sf", "http://127.0.0.1:9901/listeners"],
                &[],
            ));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("lds_ingress_0.0.0.0_15000")
                .then_some(())
                .ok_or(format!("listeners: {text}"))
        },
    );
}
