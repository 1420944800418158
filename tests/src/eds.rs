//! An ADS client that stands in for an Envoy where only its endpoints matter (the fleet suite and
//! bench): state of the world, CDS wildcard and EDS for one cluster, every response ACKed; each
//! assignment of that cluster is handed over as a set of `ip:port`.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn request(type_url: &str, names: Vec<String>, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// The endpoints of an assignment, as `ip:port`.
fn addresses(cla: &ClusterLoadAssignment) -> BTreeSet<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => {
                let port = match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => p,
                    _ => 0,
                };
                Some(format!("{}:{port}", s.address))
            }
            _ => None,
        })
        .collect()
}

/// One stream of node `node` on the ADS server at `addr` (`host:port`), watching `cluster`'s
/// endpoints: `seen` gets every assignment of it. Returns when the stream ends.
pub async fn watch(
    addr: &str,
    node: &str,
    cluster: &str,
    mut seen: impl FnMut(BTreeSet<String>),
) -> Result<(), tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(16);
    let mut first = request(CLUSTER, vec![], "", "");
    first.node = Some(Node {
        id: node.into(),
        ..Default::default()
    });
    let _ = tx.send(first).await;
    let _ = tx
        .send(request(ENDPOINT, vec![cluster.into()], "", ""))
        .await;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(r) = inbound.message().await? {
        let names = if r.type_url == ENDPOINT {
            for any in &r.resources {
                if let Ok(cla) = ClusterLoadAssignment::decode(any.value.as_slice())
                    && cla.cluster_name == cluster
                {
                    seen(addresses(&cla));
                }
            }
            vec![cluster.to_string()]
        } else {
            vec![]
        };
        let _ = tx
            .send(request(&r.type_url, names, &r.version_info, &r.nonce))
            .await;
    }
    Ok(())
}
