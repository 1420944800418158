//! Every acknowledged write survives `kill -9` of the agent, and nothing half-written appears.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_tests::mesh::Agent;
use trellis_tests::{Workdir, run};

/// One PUT over a fresh connection; `Some(status)` if a response arrived.
fn put(addr: &str, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn every_acknowledged_write_survives_kill_9_and_nothing_half_written_appears() {
    let work = Workdir::new("durability");
    let agent = Agent::start(&work, None);
    agent.appmesh(&["create-mesh", "--mesh-name", "m"]);
    let addr = agent.api.trim_start_matches("http://").to_string();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), addr.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = format!(
                    r#"{{"virtualNodeName":"n{i:05}","spec":{{"listeners":[{{"portMapping":{{"port":{},"protocol":"http"}}}}],"serviceDiscovery":{{"dns":{{"hostname":"n{i}.internal"}}}}}}}}"#,
                    1000 + i
                );
                match put(&addr, "/v20190125/meshes/m/virtualNodes", &body) {
                    Some(200) => acked.lock().unwrap().push(format!("n{i:05}")),
                    Some(other) => panic!("write n{i} got {other}"),
                    None => break, // the agent is gone
                }
            }
        })
    };
    // Let a stream of writes build up, then kill the agent mid-stream.
    while acked.lock().unwrap().len() < 40 {
        std::thread::sleep(Duration::from_millis(5));
    }
    run(Command::new("kill").args(["-9", &agent.proc.pid().to_string()]));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    drop(agent);

    let restarted = Agent::start(&work, None);
    let listed = restarted.appmesh(&["list-virtual-nodes", "--mesh-name", "m"]);
    let names: Vec<String> = listed["virtualNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["virtualNodeName"].as_str().unwrap().to_string())
        .collect();
    for name in &acked {
        assert!(
            names.contains(name),
            "acknowledged write {name} was lost ({} acked, {} present)",
            acked.len(),
            names.len()
        );
    }
    // At most the one write in flight at the kill may be present without an acknowledgement,
    // and whatever is present is whole.
    assert!(
        names.len() <= acked.len() + 1,
        "{} present, {} acked",
        names.len(),
        acked.len()
    );
    let last = names.last().unwrap();
    let d = restarted.appmesh(&[
        "describe-virtual-node",
        "--mesh-name",
        "m",
        "--virtual-node-name",
        last,
    ]);
    assert_eq!(
        d["virtualNode"]["spec"]["listeners"][0]["portMapping"]["protocol"],
        "http"
    );
}

#[test]
fn the_generated_model_matches_the_botocore_model() {
    let root = trellis_tests::workspace_root();
    let out = run(Command::new(trellis_tests::venv().join("bin/python"))
        .arg(root.join("scripts/gen_model.py"))
        .arg("--check")
        .current_dir(&root));
    assert!(
        out.status.success(),
        "model/src/generated.rs differs from what scripts/gen_model.py generates: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
