//! One ECS container instance, for the attestation tests: container cgroups (directories named as
//! ECS names them, `…/ecs/TASK/CONTAINER_ID`, under this test's own cgroup v2, so a run's leak
//! check still sees their processes), the ECS agent's introspection API (a stand-in,
//! `py/ecs_introspection.py`) and task definitions registered in moto's ECS with the AWS CLI.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Proc, Workdir, aws, check, eventually};

/// The cgroups of this test's containers; dropping it ends their processes and removes them.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
}

/// A container: its 64-hex id and its cgroup directory.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub task: String,
    pub dir: PathBuf,
}

impl Cgroups {
    /// `MOUNT/OWN_PATH/trellis-NAME-PID`: beside this process's own cgroup v2.
    pub fn new(name: &str) -> Self {
        let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
        let mount = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
            })
            .expect("a cgroup v2 mount");
        let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 path");
        let root = Path::new(&mount)
            .join(path.trim_start_matches('/'))
            .join(format!("trellis-{name}-{}", std::process::id()));
        fs::create_dir_all(&root).expect("create the test's cgroup");
        Cgroups { root }
    }

    /// A new container of task `task` (a fresh random id), its cgroup created.
    pub fn container(&self, task: &str) -> Container {
        let mut bytes = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .expect("random container id");
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.root.join("ecs").join(task).join(&id);
        fs::create_dir_all(&dir).expect("create the container's cgroup");
        Container {
            id,
            task: task.to_string(),
            dir,
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // The containers' processes are this test's own (their `Proc`s end them first).
        let kill = self.root.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("find")
                .arg(&self.root)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", "+"])
                .output();
            if !self.root.exists() || std::time::Instant::now() > deadline {
                break;
            }
            drop(out);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The argv of a command that runs `args` in `cgroup` from its start (a shell moves itself
/// there, then execs them).
pub fn in_cgroup(cgroup: &Path, args: &[&str]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_string(),
        "-c".into(),
        r#"echo $$ >"$0/cgroup.procs" && exec "$@""#.into(),
        cgroup.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// The ECS agent's introspection API, answering for the containers it was told about.
#[derive(Debug)]
pub struct Introspection {
    _proc: Proc,
    file: PathBuf,
    pub uri: String,
}

impl Introspection {
    pub fn start(work: &Workdir) -> Self {
        let file = work.join("introspection-tasks.json");
        fs::write(&file, "{}").expect("write the tasks file");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/py/ecs_introspection.py"
        ))
        .arg(&file);
        let mut proc = Proc::spawn(
            "ecs introspection",
            &mut cmd,
            work.join("introspection.log"),
        );
        let addr = proc.wait_for_log("introspection listening on ", Duration::from_secs(20));
        Introspection {
            _proc: proc,
            file,
            uri: format!("http://{addr}"),
        }
    }

    /// The ECS agent now runs `container` as container `name` of a task of `family:revision`.
    pub fn add(&self, container: &Container, family: &str, revision: u64, name: &str) {
        let mut tasks: Value =
            serde_json::from_slice(&fs::read(&self.file).expect("read tasks")).expect("tasks");
        tasks[&container.id] = json!({
            "Arn": format!("arn:aws:ecs:us-east-1:000000000000:task/test/{}", container.task),
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "Family": family,
            "Version": revision.to_string(),
            "Containers": [{
                "DockerId": container.id,
                "DockerName": format!("ecs-{family}-{revision}-{name}"),
                "Name": name,
            }],
        });
        let tmp = self.file.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&tasks).expect("encode")).expect("write tasks");
        fs::rename(&tmp, &self.file).expect("rename tasks");
    }
}

/// Registers a task definition in the ECS at `endpoint` (the AWS CLI); returns its revision.
/// Without a task-level size it gets 512 MiB: moto refuses a container with only a memory
/// reservation otherwise (ECS itself accepts it).
pub fn register_task_definition(work: &Workdir, endpoint: &str, def: &Value) -> u64 {
    let mut def = def.clone();
    if def.get("memory").is_none() {
        def["memory"] = json!("512");
    }
    let def = &def;
    let family = def["family"].as_str().expect("family");
    let path = work.join(&format!("ecs-{family}.json"));
    fs::write(&path, serde_json::to_vec(def).expect("encode")).expect("write");
    let mut cmd = Command::new(aws());
    cmd.args([
        "ecs",
        "register-task-definition",
        "--endpoint-url",
        endpoint,
    ])
    .arg("--cli-input-json")
    .arg(format!("file://{}", path.display()))
    .env("AWS_DEFAULT_REGION", "us-east-1");
    for (k, v) in crate::dynamo::aws_env() {
        cmd.env(k, v);
    }
    let out: Value = serde_json::from_str(&check(&mut cmd)).expect("register answer");
    out["taskDefinition"]["revision"]
        .as_u64()
        .expect("a revision")
}

/// Waits until the agent at `metrics` counts a refusal for `reason` beyond `before`.
pub fn wait_refused(agent: &crate::mesh::Agent, reason: &str, before: f64) -> f64 {
    let name = format!("trellis_xds_refused_streams_total{{reason=\"{reason}\"}}");
    eventually(
        &format!("a stream refused for {reason}"),
        Duration::from_secs(20),
        || {
            let n = agent.metric(&name);
            if n > before {
                Ok(n)
            } else {
                Err(format!("{name} still {n}"))
            }
        },
    )
}
