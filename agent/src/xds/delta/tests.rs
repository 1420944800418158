//! The delta ADS rules, scripted with a fake Envoy over a real gRPC stream, on the SotW tests'
//! harness (mesh `m`: `front` calls `back.local`, provided by `back` on HTTP 8080).

use super::super::snapshot::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use super::super::tests::{
    Harness, QUIET, commit_unrelated_write, front_calls_back, front_drops_back, harness,
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

    // A reconnect that holds an outdated cluster and one that no longer exists gets exactly those.
    let mut outdated = held.clone();
    outdated.insert(BACK_CLUSTER.into(), "old".into());
    outdated.insert("cds_gone".into(), "v".into());
    let mut third = h.delta_front(resume(CLUSTER, &[], outdated)).await;
    let fixed = third.recv().await.unwrap();
    assert_eq!(names(&fixed), [BACK_CLUSTER]);
    assert_eq!(fixed.removed_resources, ["cds_gone"]);
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
