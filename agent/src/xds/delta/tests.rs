//! The delta ADS rules, scripted with a fake Envoy over a real gRPC stream, on the SotW tests'
//! harness (mesh `m`: `front` calls `back.local`, provided by `back` on HTTP 8080).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;

use super::super::snapshot::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use super::super::tests::{
    FAST, Harness, QUIET, ScriptedCloudMap, add_service, by_cloud_map, commit_unrelated_write,
    front_calls, front_calls_back, front_drops_back, harness, harness_polling, harness_with,
};
use crate::test_helpers::delta::{DeltaEnvoy, names, reply, resume, subscribe, versions};

const BACK_CLUSTER: &str = "cds_egress_m_back_http_8080";
const BACK_ROUTES: &str = "rds_egress_http_8080";
const EGRESS: &str = "lds_egress_0.0.0.0_15001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_first_subscribe_gets_every_resource_with_its_version_and_an_ack_gets_no_push() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    // The backend's cluster and DROP_ALL's AWS API pass-through.
    assert_eq!(cds.resources.len(), 2, "{:?}", names(&cds));
    assert!(names(&cds).contains(&BACK_CLUSTER), "{:?}", names(&cds));
    assert!(cds.resources.iter().all(|r| !r.version.is_empty()));
    assert!(cds.removed_resources.is_empty());
    assert!(!cds.nonce.is_empty() && !cds.system_version_info.is_empty());
    envoy.ack(&cds).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_subscribe_gets_exactly_those_names_and_unknown_ones_are_reported_removed() {
    let h = harness().await;
    let mut envoy = h
        .delta_front(subscribe(ROUTE, &[BACK_ROUTES, "rds_nope"], &[]))
        .await;
    let rds = envoy.recv().await.unwrap();
    assert_eq!(names(&rds), [BACK_ROUTES]);
    assert_eq!(rds.removed_resources, ["rds_nope"]);
    envoy.ack(&rds).await;
    envoy.expect_silence(QUIET).await;

    // Unsubscribing needs no answer; subscribing again is answered in full, unchanged or not.
    envoy.send(subscribe(ROUTE, &[], &[BACK_ROUTES])).await;
    envoy.expect_silence(QUIET).await;
    envoy.send(subscribe(ROUTE, &[BACK_ROUTES], &[])).await;
    let again = envoy.recv().await.unwrap();
    assert_eq!(names(&again), [BACK_ROUTES]);
    assert_eq!(versions(&again), versions(&rds));
    assert!(
        again.removed_resources.is_empty(),
        "rds_nope was already reported"
    );
    assert_ne!(again.nonce, rds.nonce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_recorded_and_not_answered_until_the_input_changes_the_resource() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(LISTENER, &[], &[])).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds).await;

    front_drops_back(&h);
    let pushed = envoy.recv().await.unwrap();
    assert_eq!(
        names(&pushed),
        [EGRESS],
        "only the changed listener is sent"
    );
    assert_ne!(versions(&pushed), versions(&lds));
    envoy.nack(&pushed, "listener rejected: bad regex").await;
    envoy.expect_silence(QUIET).await;
    assert!(
        h.metrics
            .render()
            .contains("trellis_xds_nacks_total{type=\"Listener\"} 1")
    );
    let view = h.metrics.debug_view();
    let nack = view
        .values()
        .find_map(|s| s.types.get("Listener")?.last_nack.clone());
    assert_eq!(nack.as_deref(), Some("listener rejected: bad regex"));

    // A commit that does not change this proxy's output pushes nothing.
    commit_unrelated_write(&h);
    envoy.expect_silence(QUIET).await;
    // New input that changes the listener is pushed again: the original content, same version.
    front_calls_back(&h);
    let again = envoy.recv().await.unwrap();
    assert_eq!(versions(&again), versions(&lds));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_with_stale_or_unknown_nonces_are_ignored_but_their_subscriptions_count() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds).await;
    envoy.expect_silence(QUIET).await;
    // The same nonce again, now as a NACK, and a nonce never sent: neither is a NACK.
    envoy.nack(&cds, "late").await;
    let mut unknown = reply(CLUSTER, "999");
    unknown.error_detail = Some(envoy_types::pb::google::rpc::Status {
        message: "unknown".into(),
        ..Default::default()
    });
    envoy.send(unknown).await;
    envoy.expect_silence(QUIET).await;
    let text = h.metrics.render();
    assert!(
        !text.contains("trellis_xds_nacks_total{type=\"Cluster\"}"),
        "{text}"
    );
    assert!(
        text.contains("trellis_xds_stale_requests_total 2"),
        "{text}"
    );
    // A subscription riding on a stale nonce still counts (the protocol says so for delta).
    let mut sub = subscribe(ROUTE, &[BACK_ROUTES], &[]);
    sub.response_nonce = "998".into();
    envoy.send(sub).await;
    let rds = envoy.recv().await.unwrap();
    assert_eq!(names(&rds), [BACK_ROUTES]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_initial_resource_versions_resends_nothing_unchanged() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds).await;
    drop(envoy);

    let held = versions(&cds);
    let mut again = h.delta_front(resume(CLUSTER, &[], held.clone())).await;
    again.expect_silence(QUIET).await;

    // A reconnect that holds an outdated cluster and one that no longer exists gets exactly
    // those: the update at once, the removal once its listeners are in (they may use it).
    let mut outdated = held.clone();
    outdated.insert(BACK_CLUSTER.into(), "old".into());
    outdated.insert("cds_gone".into(), "v".into());
    let mut third = h.delta_front(resume(CLUSTER, &[], outdated)).await;
    let fixed = third.recv().await.unwrap();
    assert_eq!(names(&fixed), [BACK_CLUSTER]);
    assert!(fixed.removed_resources.is_empty());
    third.ack(&fixed).await;
    third.send(subscribe(LISTENER, &[], &[])).await;
    let lds = third.recv().await.unwrap();
    assert_eq!(lds.type_url, LISTENER);
    third.ack(&lds).await;
    let gone = third.recv().await.unwrap();
    assert_eq!(gone.type_url, CLUSTER);
    assert_eq!(gone.removed_resources, ["cds_gone"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_is_sent_as_removed_resources_once_the_updates_that_stop_using_it_are_acked() {
    let h = harness().await;
    let mut envoy = subscribed_to_everything(&h).await;

    // Without its backend, front loses the cluster and the route config; the listener changes.
    front_drops_back(&h);
    let lds = envoy.recv().await.unwrap();
    assert_eq!(lds.type_url, LISTENER, "updates first");
    assert_eq!(names(&lds), [EGRESS]);
    assert!(lds.removed_resources.is_empty());
    // Nothing is removed while the listener that stops using it may still be rejected.
    envoy.expect_silence(QUIET).await;
    envoy.ack(&lds).await;
    let cds = envoy.recv().await.unwrap();
    assert_eq!(
        cds.type_url, CLUSTER,
        "then removals, clusters before routes"
    );
    assert!(cds.resources.is_empty());
    assert_eq!(cds.removed_resources, [BACK_CLUSTER]);
    let rds = envoy.recv().await.unwrap();
    assert_eq!(rds.type_url, ROUTE);
    assert_eq!(rds.removed_resources, [BACK_ROUTES]);
    envoy.ack(&cds).await;
    envoy.ack(&rds).await;
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_update_holds_the_removals_so_the_previous_configuration_keeps_working() {
    let h = harness().await;
    let mut envoy = subscribed_to_everything(&h).await;
    front_drops_back(&h);
    let lds = envoy.recv().await.unwrap();
    envoy.nack(&lds, "listener rejected").await;
    // The Envoy still runs the old listener, which routes to the backend's cluster: keep it.
    envoy.expect_silence(QUIET).await;
    commit_unrelated_write(&h);
    envoy.expect_silence(QUIET).await;
    // The backend comes back: only the listener moves (the cluster was never taken away), and
    // once it is ACKed nothing is left to remove.
    front_calls_back(&h);
    let again = envoy.recv().await.unwrap();
    assert_eq!(again.type_url, LISTENER);
    envoy.ack(&again).await;
    envoy.expect_silence(QUIET).await;
}

/// A fake Envoy of `front` holding clusters, listeners and the egress route config, all ACKed.
async fn subscribed_to_everything(h: &Harness) -> DeltaEnvoy {
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds).await;
    envoy.send(subscribe(LISTENER, &[], &[])).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds).await;
    envoy.send(subscribe(ROUTE, &[BACK_ROUTES], &[])).await;
    let rds = envoy.recv().await.unwrap();
    envoy.ack(&rds).await;
    envoy.expect_silence(QUIET).await;
    envoy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_name_also_covered_by_the_wildcard_is_answered_either_way() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds).await;
    envoy
        .send(subscribe(CLUSTER, &[BACK_CLUSTER, "cds_extra"], &[]))
        .await;
    let named = envoy.recv().await.unwrap();
    assert_eq!(
        names(&named),
        [BACK_CLUSTER],
        "subscribing is answered in full"
    );
    assert_eq!(named.removed_resources, ["cds_extra"]);
    envoy.ack(&named).await;
    envoy
        .send(subscribe(CLUSTER, &[], &[BACK_CLUSTER, "cds_extra"]))
        .await;
    let answer = envoy.recv().await.unwrap();
    assert_eq!(
        names(&answer),
        [BACK_CLUSTER],
        "still in the wildcard: resent"
    );
    assert_eq!(
        answer.removed_resources,
        ["cds_extra"],
        "not in the wildcard: removed"
    );
    envoy.ack(&answer).await;
    // Dropping the wildcard itself needs no answer, and later changes no longer reach the client.
    envoy.send(subscribe(CLUSTER, &[], &["*"])).await;
    envoy.expect_silence(QUIET).await;
    front_drops_back(&h);
    envoy.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_streams_share_the_per_proxy_quota_and_identity_rules() {
    let h = harness().await;
    let mut a = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let mut b = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    a.recv().await.unwrap();
    b.recv().await.unwrap();
    let mut c = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    assert_eq!(
        c.recv().await.unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    let mut ghost = DeltaEnvoy::connect(
        h.addr,
        "mesh/m/virtualNode/ghost",
        subscribe(CLUSTER, &[], &[]),
    )
    .await
    .unwrap();
    assert_eq!(
        ghost.recv().await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert!(
        h.metrics
            .render()
            .contains("trellis_xds_connected_streams{node=\"mesh/m/virtualNode/front\"} 2")
    );
    let view = h.metrics.debug_view();
    assert!(view.values().all(|s| s.variant == "delta"), "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_we_do_not_manage_get_an_empty_assignment_on_delta_too() {
    let h = harness().await;
    let mut envoy = h
        .delta_front(subscribe(ENDPOINT, &["local_cluster"], &[]))
        .await;
    let eds = envoy.recv().await.unwrap();
    assert_eq!(names(&eds), ["local_cluster"]);
    assert!(eds.removed_resources.is_empty());
    envoy.ack(&eds).await;
    front_drops_back(&h);
    envoy.expect_silence(QUIET).await;
}

const CM_CLUSTER: &str = "cds_egress_m_cm_http_8080";

/// The assignments a response carries: cluster name → number of endpoints.
fn assigned(r: &DeltaDiscoveryResponse) -> BTreeMap<String, usize> {
    r.resources
        .iter()
        .filter_map(|res| res.resource.as_ref())
        .map(|a| {
            let cla =
                <ClusterLoadAssignment as prost::Message>::decode(a.value.as_slice()).unwrap();
            let n = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            (cla.cluster_name, n)
        })
        .collect()
}

/// Everything `envoy` is sent until it has been quiet for [`QUIET`], each ACKed, except
/// responses of type `reject`, which are NACKed.
async fn drain(envoy: &mut DeltaEnvoy, reject: Option<&str>) -> Vec<DeltaDiscoveryResponse> {
    let mut got = Vec::new();
    while let Ok(r) = tokio::time::timeout(QUIET, envoy.recv()).await {
        let r = r.unwrap();
        if Some(r.type_url.as_str()) == reject {
            envoy.nack(&r, "rejected").await;
        } else {
            envoy.ack(&r).await;
        }
        got.push(r);
    }
    got
}

/// `front`'s Envoy holding everything, all ACKed: (stream, clusters, endpoints if `eds`,
/// listeners, routes) as first sent.
async fn holding(
    h: &Harness,
    eds: bool,
) -> (
    DeltaEnvoy,
    DeltaDiscoveryResponse,
    Option<DeltaDiscoveryResponse>,
    DeltaDiscoveryResponse,
    DeltaDiscoveryResponse,
) {
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    let cds = envoy.recv().await.unwrap();
    envoy.ack(&cds).await;
    let eds = if eds {
        envoy.send(subscribe(ENDPOINT, &[BACK_CLUSTER], &[])).await;
        loop {
            let r = envoy.recv().await.unwrap();
            envoy.ack(&r).await;
            if assigned(&r).get(BACK_CLUSTER).is_some_and(|n| *n > 0) {
                break Some(r);
            }
        }
    } else {
        None
    };
    envoy.send(subscribe(LISTENER, &[], &[])).await;
    let lds = envoy.recv().await.unwrap();
    envoy.ack(&lds).await;
    envoy.send(subscribe(ROUTE, &[BACK_ROUTES], &[])).await;
    let rds = envoy.recv().await.unwrap();
    envoy.ack(&rds).await;
    envoy.expect_silence(QUIET).await;
    (envoy, cds, eds, lds, rds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_kept_for_make_before_break_keeps_its_endpoints_on_delta() {
    let h = harness_with(FAST, by_cloud_map("back")).await;
    h.set_instances("back", &[Ipv4Addr::new(10, 0, 0, 1)]);
    let (mut envoy, ..) = holding(&h, true).await;
    front_drops_back(&h);
    let got = drain(&mut envoy, None).await;
    assert!(got.iter().any(|r| r.type_url == LISTENER), "{got:?}");
    for r in got.iter().filter(|r| r.type_url == ENDPOINT) {
        assert_ne!(
            assigned(r).get(BACK_CLUSTER),
            Some(&0),
            "a kept cluster was emptied while routes still point at it: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_with_changed_state_removes_nothing_before_the_new_listener_is_acked() {
    let mut h = harness().await;
    let (envoy, cds, _, lds, rds) = holding(&h, false).await;
    drop(envoy);
    h.stop().await;
    front_drops_back(&h);
    h.start().await;
    let mut again = h.delta_front(resume(CLUSTER, &[], versions(&cds))).await;
    again.send(resume(LISTENER, &[], versions(&lds))).await;
    again
        .send(resume(ROUTE, &[BACK_ROUTES], versions(&rds)))
        .await;
    // Up to the new listener, nothing it stops using may go.
    loop {
        let r = again.recv().await.unwrap();
        assert!(
            !r.removed_resources
                .iter()
                .any(|n| n == BACK_CLUSTER || n == BACK_ROUTES),
            "removed before the listener that stops using it was even sent: {r:?}"
        );
        if r.type_url == LISTENER {
            again.ack(&r).await;
            break;
        }
        again.ack(&r).await;
    }
    let got = drain(&mut again, None).await;
    let removed: Vec<&String> = got.iter().flat_map(|r| &r.removed_resources).collect();
    assert!(removed.contains(&&BACK_CLUSTER.to_string()), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_a_reconnect_while_the_listener_that_stops_using_it_is_rejected_on_delta() {
    let h = harness().await;
    let (mut envoy, cds, _, lds, rds) = holding(&h, false).await;
    front_drops_back(&h);
    let got = drain(&mut envoy, Some(LISTENER)).await;
    assert!(
        got.iter().all(|r| r.removed_resources.is_empty()),
        "{got:?}"
    );
    // Reconnect holding what it had: the new listener was rejected, the old one still routes
    // to back.
    drop(envoy);
    let mut again = h.delta_front(resume(CLUSTER, &[], versions(&cds))).await;
    again.send(resume(LISTENER, &[], versions(&lds))).await;
    again
        .send(resume(ROUTE, &[BACK_ROUTES], versions(&rds)))
        .await;
    let got = drain(&mut again, Some(LISTENER)).await;
    assert!(
        got.iter().any(|r| r.type_url == LISTENER),
        "the listener is offered again: {got:?}"
    );
    for r in &got {
        assert!(
            r.removed_resources.is_empty(),
            "removed what the running listener uses: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_cloud_map_call_after_a_restart_leaves_a_delta_envoy_its_endpoints() {
    let cloud_map = Arc::new(ScriptedCloudMap::default());
    cloud_map.set("back", &[Ipv4Addr::new(10, 0, 0, 1)]);
    let mut h = harness_polling(by_cloud_map("back"), cloud_map.clone()).await;
    let (envoy, cds, eds, ..) = holding(&h, true).await;
    drop(envoy);
    cloud_map.throttle(true);
    h.restart().await;
    let mut again = h.delta_front(resume(CLUSTER, &[], versions(&cds))).await;
    again
        .send(resume(ENDPOINT, &[BACK_CLUSTER], versions(&eds.unwrap())))
        .await;
    let calls = cloud_map.calls();
    let mut got = Vec::new();
    while cloud_map.calls() < calls + 4 {
        got.extend(drain(&mut again, None).await);
    }
    got.extend(drain(&mut again, None).await);
    for r in &got {
        assert_ne!(
            assigned(r).get(BACK_CLUSTER),
            Some(&0),
            "a failed Cloud Map call emptied endpoints Envoy had: {got:?}"
        );
    }
    // Cloud Map answers again, with one more instance.
    cloud_map.set(
        "back",
        &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
    );
    cloud_map.throttle(false);
    loop {
        let r = again.recv().await.unwrap();
        again.ack(&r).await;
        if assigned(&r).get(BACK_CLUSTER) == Some(&2) {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_and_its_route_go_cluster_first_on_delta_and_the_route_once_it_is_warm() {
    let h = harness().await;
    add_service(&h, "cm", 8080, by_cloud_map("cm"));
    let (mut envoy, ..) = holding(&h, false).await;
    front_calls(&h, &["back.local", "cm.local"]);
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    assert!(names(&cds).contains(&CM_CLUSTER), "{cds:?}");
    envoy.expect_silence(QUIET).await;
    envoy.ack(&cds).await;
    envoy.send(subscribe(ENDPOINT, &[CM_CLUSTER], &[])).await;
    let eds = envoy.recv().await.unwrap();
    assert!(
        assigned(&eds).is_empty(),
        "Cloud Map has not answered: {eds:?}"
    );
    envoy.ack(&eds).await;
    envoy.expect_silence(QUIET).await;
    h.set_instances("cm", &[Ipv4Addr::new(10, 0, 0, 9)]);
    let eds = envoy.recv().await.unwrap();
    assert_eq!(assigned(&eds).get(CM_CLUSTER), Some(&1));
    envoy.expect_silence(QUIET).await;
    envoy.ack(&eds).await;
    let rds = envoy.recv().await.unwrap();
    assert_eq!(rds.type_url, ROUTE, "the route follows the warm cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_unanswered_pushes_than_are_remembered_do_not_hold_removals_forever() {
    let h = harness().await;
    let mut envoy = subscribed_to_everything(&h).await;
    let mut last = None;
    for i in 0..=18 {
        if i % 2 == 0 {
            front_drops_back(&h);
        } else {
            front_calls_back(&h);
        }
        let r = envoy.recv().await.unwrap();
        assert_eq!(r.type_url, LISTENER, "push {i}");
        last = Some(r);
    }
    // Envoy answers in order; its answer to the last settles all of them.
    envoy.ack(&last.unwrap()).await;
    let got = drain(&mut envoy, None).await;
    let removed: Vec<&String> = got.iter().flat_map(|r| &r.removed_resources).collect();
    assert!(
        removed.contains(&&BACK_CLUSTER.to_string()),
        "removals stayed held: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_route_configuration_that_is_deleted_no_longer_holds_removals() {
    let h = harness().await;
    add_service(
        &h,
        "other",
        8080,
        serde_json::json!({"dns": {"hostname": "other.internal"}}),
    );
    let mut envoy = subscribed_to_everything(&h).await;
    front_calls(&h, &["back.local", "other.local"]);
    let got = drain(&mut envoy, Some(ROUTE)).await;
    assert!(got.iter().any(|r| r.type_url == ROUTE), "{got:?}");
    // The rejected route configuration goes with every backend.
    front_calls(&h, &[]);
    let got = drain(&mut envoy, None).await;
    let removed: Vec<&String> = got.iter().flat_map(|r| &r.removed_resources).collect();
    assert!(
        removed.contains(&&BACK_CLUSTER.to_string()) && removed.contains(&&BACK_ROUTES.to_string()),
        "removals stayed held by a rejection of what no longer exists: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_requests_for_types_we_do_not_serve_leave_no_state_and_no_metric_label() {
    let h = harness().await;
    let mut envoy = h.delta_front(subscribe(CLUSTER, &[], &[])).await;
    envoy.recv().await.unwrap();
    envoy
        .send(subscribe("type.googleapis.com/example.Junk", &["a"], &[]))
        .await;
    envoy.expect_silence(QUIET).await;
    let text = h.metrics.render();
    assert!(!text.contains("Junk"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_delta_request_with_a_leftover_nonce_is_not_stale() {
    let h = harness().await;
    let mut first = subscribe(CLUSTER, &[], &[]);
    first.response_nonce = "17".into();
    let mut envoy = h.delta_front(first).await;
    let cds = envoy.recv().await.unwrap();
    assert_eq!(cds.type_url, CLUSTER);
    let text = h.metrics.render();
    assert!(
        text.contains("trellis_xds_stale_requests_total 0"),
        "{text}"
    );
}
