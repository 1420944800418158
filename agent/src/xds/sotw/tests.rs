//! The state-of-the-world machine under churn, scripted with a fake Envoy over a real gRPC
//! stream (the harness of `xds/tests.rs`): kept clusters keep their endpoints, holds survive a
//! reconnect and an agent restart, a failed Cloud Map call changes nothing an Envoy has, routes
//! wait for the clusters they point at, and subscriptions that shrink or grow in a NACK are
//! answered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

use super::super::snapshot::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use super::super::tests::{
    FAST, Harness, QUIET, ScriptedCloudMap, add_service, by_cloud_map, front_calls,
    front_drops_back, harness, harness_polling, harness_with,
};
use crate::test_helpers::ads::{FakeEnvoy, request};

const BACK_CLUSTER: &str = "cds_egress_m_back_http_8080";
const CM_CLUSTER: &str = "cds_egress_m_cm_http_8080";
const BACK_ROUTES: &str = "rds_egress_http_8080";
const JUNK: &str = "type.googleapis.com/example.Junk";

/// The clusters a CDS response holds, by name.
fn cluster_names(r: &DiscoveryResponse) -> BTreeSet<String> {
    r.resources
        .iter()
        .map(|a| {
            <Cluster as prost::Message>::decode(a.value.as_slice())
                .unwrap()
                .name
        })
        .collect()
}

/// The assignments an EDS response holds: cluster name → number of endpoints.
fn assigned(r: &DiscoveryResponse) -> BTreeMap<String, usize> {
    r.resources
        .iter()
        .map(|a| {
            let cla =
                <ClusterLoadAssignment as prost::Message>::decode(a.value.as_slice()).unwrap();
            let n = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            (cla.cluster_name, n)
        })
        .collect()
}

/// The next response of `type_url`: from `seen` (read earlier), else read until one arrives;
/// other types read meanwhile are kept in `seen`.
async fn next_of(
    envoy: &mut FakeEnvoy,
    seen: &mut Vec<DiscoveryResponse>,
    type_url: &str,
) -> DiscoveryResponse {
    if let Some(i) = seen.iter().position(|r| r.type_url == type_url) {
        return seen.remove(i);
    }
    loop {
        let r = envoy.recv().await.unwrap();
        if r.type_url == type_url {
            return r;
        }
        seen.push(r);
    }
}

/// What a fake Envoy holds, all ACKed: clusters, the backend's endpoints when it has an EDS
/// cluster, listeners and the egress route configuration.
struct Held {
    envoy: FakeEnvoy,
    cds: DiscoveryResponse,
    eds: Option<DiscoveryResponse>,
    lds: DiscoveryResponse,
    rds: DiscoveryResponse,
}

/// `front`'s Envoy, subscribed to and holding everything; with `eds`, also back's endpoints
/// (waiting for discovery to publish at least one).
async fn holding_everything(h: &Harness, eds: bool) -> Held {
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds, &[]).await;
    let eds = if eds {
        envoy.send(request(ENDPOINT, &[BACK_CLUSTER], "", "")).await;
        loop {
            let r = envoy.recv().await.unwrap();
            assert_eq!(r.type_url, ENDPOINT);
            envoy.ack(&r, &[BACK_CLUSTER]).await;
            if assigned(&r).get(BACK_CLUSTER).is_some_and(|n| *n > 0) {
                break Some(r);
            }
        }
    } else {
        None
    };
    envoy.send(request(LISTENER, &[], "", "")).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds, &[]).await;
    envoy.send(request(ROUTE, &[BACK_ROUTES], "", "")).await;
    let rds = envoy.recv().await.unwrap();
    envoy.ack(&rds, &[BACK_ROUTES]).await;
    envoy.expect_silence(QUIET).await;
    Held {
        envoy,
        cds,
        eds,
        lds,
        rds,
    }
}

/// How the fake Envoy answers what it is sent while draining.
#[derive(Clone, Copy)]
struct Answers<'a> {
    /// The endpoint names it ACKs with.
    eds: &'a [&'a str],
    /// The route names it ACKs with; `None`: it watches no route configuration, so (as Envoy
    /// does) it takes a route push without answering.
    rds: Option<&'a [&'a str]>,
    /// It rejects listener pushes.
    nack_listeners: bool,
}

const ACK_ALL: Answers<'static> = Answers {
    eds: &[],
    rds: Some(&[]),
    nack_listeners: false,
};

/// Everything `envoy` is sent until it has been quiet for [`QUIET`], answered as `answers` says.
async fn drain(envoy: &mut FakeEnvoy, answers: Answers<'_>) -> Vec<DiscoveryResponse> {
    let mut got = Vec::new();
    while let Ok(r) = tokio::time::timeout(QUIET, envoy.recv()).await {
        let r = r.unwrap();
        answer(envoy, &r, answers).await;
        got.push(r);
    }
    got
}

async fn answer(envoy: &FakeEnvoy, r: &DiscoveryResponse, answers: Answers<'_>) {
    match r.type_url.as_str() {
        ENDPOINT => envoy.ack(r, answers.eds).await,
        ROUTE => {
            if let Some(names) = answers.rds {
                envoy.ack(r, names).await;
            }
        }
        LISTENER if answers.nack_listeners => envoy.nack(r, &[], "listener rejected").await,
        _ => envoy.ack(r, &[]).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_kept_for_make_before_break_keeps_its_endpoints() {
    let h = harness_with(FAST, by_cloud_map("back")).await;
    h.set_instances("back", &[Ipv4Addr::new(10, 0, 0, 1)]);
    let mut held = holding_everything(&h, true).await;
    // The backend goes: its cluster is kept until the listener that used it is ACKed, and
    // Envoy, still having the cluster, still asks for its endpoints.
    front_drops_back(&h);
    let got = drain(
        &mut held.envoy,
        Answers {
            eds: &[BACK_CLUSTER],
            ..ACK_ALL
        },
    )
    .await;
    assert!(
        got.iter().any(|r| r.type_url == LISTENER),
        "the listener moved: {got:?}"
    );
    for r in got.iter().filter(|r| r.type_url == ENDPOINT) {
        assert_ne!(
            assigned(r).get(BACK_CLUSTER),
            Some(&0),
            "a kept cluster was emptied while routes still point at it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_a_reconnect_while_the_listener_that_stops_using_it_is_rejected() {
    let h = harness().await;
    let mut held = holding_everything(&h, false).await;
    front_drops_back(&h);
    let got = drain(
        &mut held.envoy,
        Answers {
            rds: Some(&[BACK_ROUTES]),
            nack_listeners: true,
            ..ACK_ALL
        },
    )
    .await;
    let kept = got.iter().rev().find(|r| r.type_url == CLUSTER).unwrap();
    assert!(cluster_names(kept).contains(BACK_CLUSTER), "kept: {kept:?}");
    // The connection resets: Envoy comes back holding what it ACKed, still running the old
    // listener (which routes to back) because it rejected the new one.
    drop(held.envoy);
    let mut again = h.front(request(CLUSTER, &[], &kept.version_info, "")).await;
    again
        .send(request(LISTENER, &[], &held.lds.version_info, ""))
        .await;
    again
        .send(request(ROUTE, &[BACK_ROUTES], &held.rds.version_info, ""))
        .await;
    let got = drain(
        &mut again,
        Answers {
            rds: Some(&[BACK_ROUTES]),
            nack_listeners: true,
            ..ACK_ALL
        },
    )
    .await;
    for r in got.iter().filter(|r| r.type_url == CLUSTER) {
        assert!(
            cluster_names(r).contains(BACK_CLUSTER),
            "the cluster the running listener routes to was removed: {got:?}"
        );
    }
    assert!(
        got.iter().any(|r| r.type_url == LISTENER),
        "the listener is offered again: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_with_changed_state_keeps_the_clusters_envoy_still_routes_to() {
    let mut h = harness().await;
    let held = holding_everything(&h, false).await;
    drop(held.envoy);
    // While the agent is down, the backend goes.
    h.stop().await;
    front_drops_back(&h);
    h.start().await;
    let mut again = h
        .front(request(CLUSTER, &[], &held.cds.version_info, ""))
        .await;
    again
        .send(request(LISTENER, &[], &held.lds.version_info, ""))
        .await;
    again
        .send(request(ROUTE, &[BACK_ROUTES], &held.rds.version_info, ""))
        .await;
    let mut seen = Vec::new();
    let first = next_of(&mut again, &mut seen, CLUSTER).await;
    assert!(
        cluster_names(&first).contains(BACK_CLUSTER),
        "the restarted agent removed a cluster Envoy's listener still routes to: {first:?}"
    );
    again.ack(&first, &[]).await;
    let lds = next_of(&mut again, &mut seen, LISTENER).await;
    again.ack(&lds, &[]).await;
    // Once the listener that stops using it is in, the exact set follows.
    let got = drain(&mut again, ACK_ALL).await;
    let last = got.iter().rev().find(|r| r.type_url == CLUSTER).unwrap();
    assert!(!cluster_names(last).contains(BACK_CLUSTER), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_cloud_map_call_after_a_restart_leaves_envoy_its_endpoints() {
    let cloud_map = Arc::new(ScriptedCloudMap::default());
    cloud_map.set("back", &[Ipv4Addr::new(10, 0, 0, 1)]);
    let mut h = harness_polling(by_cloud_map("back"), cloud_map.clone()).await;
    let held = holding_everything(&h, true).await;
    drop(held.envoy);
    let eds = held.eds.unwrap();
    // The agent restarts while Cloud Map throttles: its first calls fail.
    cloud_map.throttle(true);
    h.restart().await;
    let mut again = h
        .front(request(CLUSTER, &[], &held.cds.version_info, ""))
        .await;
    again
        .send(request(ENDPOINT, &[BACK_CLUSTER], &eds.version_info, ""))
        .await;
    let calls = cloud_map.calls();
    let mut got = Vec::new();
    while cloud_map.calls() < calls + 4 {
        got.extend(
            drain(
                &mut again,
                Answers {
                    eds: &[BACK_CLUSTER],
                    ..ACK_ALL
                },
            )
            .await,
        );
    }
    got.extend(
        drain(
            &mut again,
            Answers {
                eds: &[BACK_CLUSTER],
                ..ACK_ALL
            },
        )
        .await,
    );
    for r in got.iter().filter(|r| r.type_url == ENDPOINT) {
        assert_ne!(
            assigned(r).get(BACK_CLUSTER),
            Some(&0),
            "a failed Cloud Map call emptied endpoints Envoy had: {got:?}"
        );
    }
    // A new Envoy, which has nothing to keep, is not held waiting: back is known empty.
    let mut fresh = h.front(request(CLUSTER, &[], "", "")).await;
    let cds = fresh.recv().await.unwrap();
    fresh.ack(&cds, &[]).await;
    fresh.send(request(ENDPOINT, &[BACK_CLUSTER], "", "")).await;
    loop {
        let r = fresh.recv().await.unwrap();
        fresh.ack(&r, &[BACK_CLUSTER]).await;
        if let Some(n) = assigned(&r).get(BACK_CLUSTER) {
            assert_eq!(*n, 0);
            break;
        }
    }
    // Cloud Map answers again, with one more instance: both get the endpoints.
    cloud_map.set(
        "back",
        &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
    );
    cloud_map.throttle(false);
    for envoy in [&mut again, &mut fresh] {
        loop {
            let r = envoy.recv().await.unwrap();
            envoy.ack(&r, &[BACK_CLUSTER]).await;
            if assigned(&r).get(BACK_CLUSTER) == Some(&2) {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_that_adds_route_names_is_answered_for_the_new_names() {
    let h = harness().await;
    add_service(&h, "other", 8080, json_dns("other"));
    add_service(&h, "b2", 9090, json_dns("b2"));
    let mut held = holding_everything(&h, false).await;
    let envoy = &mut held.envoy;
    let mut seen = Vec::new();
    // Route config 8080 changes and Envoy rejects it.
    front_calls(&h, &["back.local", "other.local"]);
    let cds = next_of(envoy, &mut seen, CLUSTER).await;
    envoy.ack(&cds, &[]).await;
    let rejected = next_of(envoy, &mut seen, ROUTE).await;
    envoy
        .nack(&rejected, &[BACK_ROUTES], "route rejected")
        .await;
    let ack_routes = Answers {
        rds: Some(&[BACK_ROUTES]),
        ..ACK_ALL
    };
    for r in std::mem::take(&mut seen) {
        answer(envoy, &r, ack_routes).await;
    }
    drain(envoy, ack_routes).await;
    // A backend on 9090: its listener chain asks for route config 9090.
    front_calls(&h, &["back.local", "other.local", "b2.local"]);
    let cds = next_of(envoy, &mut seen, CLUSTER).await;
    envoy.ack(&cds, &[]).await;
    let lds = next_of(envoy, &mut seen, LISTENER).await;
    // Envoy subscribes to 9090 while the answer to its NACK is its last route nonce, then
    // ACKs the listener.
    let both = [BACK_ROUTES, "rds_egress_http_9090"];
    envoy
        .send(request(
            ROUTE,
            &both,
            &held.rds.version_info,
            &rejected.nonce,
        ))
        .await;
    envoy.ack(&lds, &[]).await;
    // The route push (8080 still rejected) is NACKed with both names: 9090 must be answered.
    let push = next_of(envoy, &mut seen, ROUTE).await;
    envoy.nack(&push, &both, "route rejected").await;
    let answer = tokio::time::timeout(Duration::from_secs(2), next_of(envoy, &mut seen, ROUTE))
        .await
        .expect("route config 9090 was never sent: the listener waits for it");
    let names: Vec<String> = answer
        .resources
        .iter()
        .map(|a| {
            <envoy_types::pb::envoy::config::route::v3::RouteConfiguration as prost::Message>::decode(
                a.value.as_slice(),
            )
            .unwrap()
            .name
        })
        .collect();
    assert!(
        names.contains(&"rds_egress_http_9090".to_string()),
        "{names:?}"
    );
}

fn json_dns(name: &str) -> serde_json::Value {
    serde_json::json!({"dns": {"hostname": format!("{name}.internal")}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_and_its_route_go_cluster_first_and_the_route_once_it_is_warm() {
    let h = harness().await;
    add_service(&h, "cm", 8080, by_cloud_map("cm"));
    let mut held = holding_everything(&h, false).await;
    let envoy = &mut held.envoy;
    front_calls(&h, &["back.local", "cm.local"]);
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    assert!(cluster_names(&cds).contains(CM_CLUSTER));
    // Nothing that routes to it before Envoy has it.
    envoy.expect_silence(QUIET).await;
    envoy.ack(&cds, &[]).await;
    // Envoy asks for the new cluster's endpoints; Cloud Map has not answered yet.
    envoy.send(request(ENDPOINT, &[CM_CLUSTER], "", "")).await;
    let eds = envoy.recv().await.unwrap();
    assert_eq!(eds.type_url, ENDPOINT);
    assert!(assigned(&eds).is_empty(), "{eds:?}");
    envoy.ack(&eds, &[CM_CLUSTER]).await;
    envoy.expect_silence(QUIET).await;
    h.set_instances("cm", &[Ipv4Addr::new(10, 0, 0, 9)]);
    let eds = envoy.recv().await.unwrap();
    assert_eq!(assigned(&eds).get(CM_CLUSTER), Some(&1));
    // Still warming until Envoy has taken the endpoints.
    envoy.expect_silence(QUIET).await;
    envoy.ack(&eds, &[CM_CLUSTER]).await;
    let rds = envoy.recv().await.unwrap();
    assert_eq!(rds.type_url, ROUTE, "the route follows the warm cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_a_cluster_cloud_map_has_not_answered_waits_no_longer_than_the_warming_hold() {
    let h = harness().await;
    add_service(&h, "cm", 8080, by_cloud_map("cm"));
    let mut held = holding_everything(&h, false).await;
    let envoy = &mut held.envoy;
    front_calls(&h, &["back.local", "cm.local"]);
    let cds = envoy.recv().await.unwrap();
    envoy.expect_silence(QUIET).await;
    envoy.ack(&cds, &[]).await;
    envoy.send(request(ENDPOINT, &[CM_CLUSTER], "", "")).await;
    let eds = envoy.recv().await.unwrap();
    envoy.ack(&eds, &[CM_CLUSTER]).await;
    // Cloud Map never answers: the route still goes, once the hold is over.
    let rds = tokio::time::timeout(Duration::from_secs(4), envoy.recv())
        .await
        .expect("the route waited past the warming hold")
        .unwrap();
    assert_eq!(rds.type_url, ROUTE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_names_shrinking_to_none_release_the_kept_clusters() {
    let h = harness().await;
    let mut held = holding_everything(&h, false).await;
    let envoy = &mut held.envoy;
    front_drops_back(&h);
    let mut seen = Vec::new();
    let cds = next_of(envoy, &mut seen, CLUSTER).await;
    assert!(cluster_names(&cds).contains(BACK_CLUSTER), "kept");
    let lds = next_of(envoy, &mut seen, LISTENER).await;
    envoy.ack(&cds, &[]).await;
    // Envoy applies the listener: no route configuration is used any more, which it says with
    // the last route nonce it had processed. The route push that follows has no watcher and no
    // resources, so Envoy takes it without a word.
    envoy
        .send(request(ROUTE, &[], &held.rds.version_info, &held.rds.nonce))
        .await;
    envoy.ack(&lds, &[]).await;
    let got = drain(
        envoy,
        Answers {
            rds: None,
            ..ACK_ALL
        },
    )
    .await;
    let exact = got
        .iter()
        .rev()
        .find(|r| r.type_url == CLUSTER)
        .unwrap_or_else(|| panic!("the kept cluster was never released: {got:?}"));
    assert!(!cluster_names(exact).contains(BACK_CLUSTER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_with_a_leftover_nonce_is_answered() {
    let h = harness().await;
    let mut envoy = h.front(request(CLUSTER, &[], "", "17")).await;
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_types_we_do_not_serve_leave_no_state_and_no_metric_label() {
    let h = harness().await;
    let mut envoy = h.front(request(CLUSTER, &[], "", "")).await;
    envoy.recv().await.unwrap();
    envoy.send(request(JUNK, &["a"], "", "")).await;
    envoy
        .nack(
            &DiscoveryResponse {
                type_url: JUNK.into(),
                ..Default::default()
            },
            &[],
            "junk",
        )
        .await;
    envoy.expect_silence(QUIET).await;
    let text = h.metrics.render();
    assert!(!text.contains("Junk"), "{text}");
    let view = format!("{:?}", h.metrics.debug_view());
    assert!(!view.contains("Junk"), "{view}");
}
