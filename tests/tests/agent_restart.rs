//! An agent restart is invisible to traffic: Envoys keep serving their last configuration while the
//! agent is down, reconnect to the restarted agent, and are sent nothing new (same input, same
//! content versions).

use std::process::Command;
use std::time::Duration;

use trellis_tests::mesh::Agent;
use trellis_tests::scenario::{ADMIN_PORT, BACK_URL, EGRESS_CLUSTER, two_tasks};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

#[test]
fn a_restarted_agent_loses_no_request_and_resends_nothing_unchanged() {
    if !can_run_privileged("agent restart") {
        return;
    }
    let work = Workdir::new("restart");
    let mut mesh = two_tasks(&work, &|_| {});
    eventually("front reaches back", Duration::from_secs(20), || {
        mesh.front.http_get(None, BACK_URL)
    });

    // Steady traffic from front's app: 300 requests, 10 ms apart, one status code per line.
    let script = format!(
        "for i in $(seq 1 300); do curl -s -o /dev/null -m 3 -w '%{{http_code}}\\n' {BACK_URL}; sleep 0.01; done"
    );
    // A Proc, so a failure before the loop ends does not leave it running.
    let mut traffic = Proc::spawn(
        "traffic",
        &mut mesh.front.cmd(&["sh", "-c", &script]),
        work.join("traffic.log"),
    );

    // The restart happens under load: once the traffic is flowing through front's Envoy.
    let before = mesh.front.envoy_stat(ADMIN_PORT, EGRESS_CLUSTER);
    eventually("traffic flows", Duration::from_secs(10), || {
        let now = mesh.front.envoy_stat(ADMIN_PORT, EGRESS_CLUSTER);
        (now >= before + 10)
            .then_some(())
            .ok_or(format!("{} requests so far", now - before))
    });
    run(Command::new("kill").args(["-9", &mesh.agent.proc.pid().to_string()]));
    // The agent stays down for a while (a deliberate outage, not a wait for something).
    std::thread::sleep(Duration::from_secs(1));
    mesh.agent = Agent::start(&work, None);

    // 300 requests of at most 3 s each.
    eventually("the traffic loop ends", Duration::from_secs(900), || {
        traffic.exited().ok_or_else(|| "running".to_string())
    });
    let codes = traffic.log_text();
    let failed: Vec<&str> = codes.lines().filter(|c| *c != "200").collect();
    assert_eq!(codes.lines().count(), 300);
    assert!(
        failed.is_empty(),
        "{} of 300 requests failed across the restart: {failed:?}",
        failed.len()
    );

    // Both Envoys came back to the new agent, which had nothing new to send them.
    let metrics = |agent: &Agent| {
        check(
            agent
                .curl()
                .args(["-sf", &format!("{}/metrics", agent.api)]),
        )
    };
    let m = eventually("both Envoys reconnected", Duration::from_secs(30), || {
        let m = metrics(&mesh.agent);
        let connected = m
            .lines()
            .filter(|l| l.starts_with("trellis_xds_connected_streams{"))
            .count();
        if connected == 2 {
            Ok(m)
        } else {
            Err(format!("{connected} connected"))
        }
    });
    for kind in ["Cluster", "Listener"] {
        assert!(
            !m.contains(&format!("trellis_xds_pushes_total{{type=\"{kind}\"}}")),
            "the restarted agent resent unchanged {kind}s:\n{m}"
        );
    }
    assert_eq!(
        mesh.front.http_get(None, BACK_URL).expect("still served"),
        trellis_tests::scenario::BACK_BODY
    );
}
