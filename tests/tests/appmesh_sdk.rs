//! The App Mesh API driven through the Rust `aws-sdk-appmesh` crate, whose parser is strict: a
//! timestamp that is not epoch seconds, or an error without the modelled type, fails the call (an
//! error type it cannot map surfaces as `Unhandled`, not as the typed variant these tests expect).

use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_sdk_appmesh::Client;
use aws_sdk_appmesh::config::http::HttpResponse;
use aws_sdk_appmesh::config::retry::RetryConfig;
use aws_sdk_appmesh::config::{Credentials, Region};
use aws_sdk_appmesh::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_appmesh::operation::create_mesh::CreateMeshError;
use aws_sdk_appmesh::operation::create_route::CreateRouteError;
use aws_sdk_appmesh::operation::create_virtual_node::CreateVirtualNodeError;
use aws_sdk_appmesh::operation::create_virtual_service::CreateVirtualServiceError;
use aws_sdk_appmesh::operation::delete_mesh::DeleteMeshError;
use aws_sdk_appmesh::operation::delete_virtual_node::DeleteVirtualNodeError;
use aws_sdk_appmesh::operation::delete_virtual_router::DeleteVirtualRouterError;
use aws_sdk_appmesh::operation::describe_gateway_route::DescribeGatewayRouteError;
use aws_sdk_appmesh::operation::describe_mesh::DescribeMeshError;
use aws_sdk_appmesh::operation::describe_route::DescribeRouteError;
use aws_sdk_appmesh::operation::describe_virtual_gateway::DescribeVirtualGatewayError;
use aws_sdk_appmesh::operation::describe_virtual_node::DescribeVirtualNodeError;
use aws_sdk_appmesh::operation::describe_virtual_router::DescribeVirtualRouterError;
use aws_sdk_appmesh::operation::describe_virtual_service::DescribeVirtualServiceError;
use aws_sdk_appmesh::operation::list_virtual_nodes::ListVirtualNodesError;
use aws_sdk_appmesh::operation::tag_resource::TagResourceError;
use aws_sdk_appmesh::operation::update_virtual_node::UpdateVirtualNodeError;
use aws_sdk_appmesh::primitives::DateTime;
use aws_sdk_appmesh::types::{
    DnsServiceDiscovery, EgressFilter, EgressFilterType, GatewayRouteSpec, GatewayRouteStatusCode,
    GatewayRouteTarget, GatewayRouteVirtualService, HttpGatewayRoute, HttpGatewayRouteAction,
    HttpGatewayRouteMatch, HttpRoute, HttpRouteAction, HttpRouteMatch, Listener, MeshSpec,
    MeshStatusCode, PortMapping, PortProtocol, ResourceMetadata, RouteSpec, RouteStatusCode,
    ServiceDiscovery, TagRef, TcpRoute, TcpRouteAction, VirtualGatewayListener,
    VirtualGatewayPortMapping, VirtualGatewayPortProtocol, VirtualGatewaySpec,
    VirtualGatewayStatusCode, VirtualNodeSpec, VirtualNodeStatusCode, VirtualRouterListener,
    VirtualRouterServiceProvider, VirtualRouterSpec, VirtualRouterStatusCode,
    VirtualServiceProvider, VirtualServiceSpec, VirtualServiceStatusCode, WeightedTarget,
};
use trellis_tests::Workdir;
use trellis_tests::mesh::Agent;

// === Helpers ===

/// An SDK client for the agent, configured as a user would: endpoint, region, static credentials
/// (the agent's key: every call is SigV4-signed and verified).
async fn client(agent: &Agent) -> Client {
    // The agent speaks plain HTTP; the client is the SDK's own, built without a TLS stack.
    let http = aws_smithy_http_client::Builder::new().build_http();
    let key = agent
        .auth
        .as_ref()
        .map(|a| a.key.clone())
        .expect("a secured agent");
    let config = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(&agent.api)
        .region(Region::new(trellis_tests::auth::REGION))
        .credentials_provider(Credentials::new(
            key.id,
            key.secret,
            None,
            None,
            "trellis-tests",
        ))
        // Every error here is the one under test: do not retry anything.
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    Client::new(&config)
}

/// The typed service error and the HTTP status of a call that must fail on the server's word.
fn rejected<O: Debug, E: Debug>(r: Result<O, SdkError<E, HttpResponse>>, what: &str) -> (E, u16) {
    match r {
        Ok(out) => panic!("{what}: expected an error, got {out:?}"),
        Err(SdkError::ServiceError(e)) => {
            let status = e.raw().status().as_u16();
            (e.into_err(), status)
        }
        Err(other) => panic!("{what}: expected a service error the SDK parsed, got {other:?}"),
    }
}

fn secs_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_secs_f64()
}

/// Metadata as App Mesh has it: version 1 on create, timestamps that parsed as DateTime near now,
/// 12-digit owners, and the ARN expected.
fn assert_created(md: &ResourceMetadata, arn: &str) {
    assert_eq!(md.arn(), arn);
    assert_eq!(md.version(), 1, "version is 1 on create: {md:?}");
    assert!(!md.uid().is_empty(), "uid: {md:?}");
    assert_recent(md.created_at(), "createdAt");
    assert_eq!(
        md.created_at(),
        md.last_updated_at(),
        "a new resource was last updated when it was created"
    );
    for owner in [md.mesh_owner(), md.resource_owner()] {
        assert!(
            owner.len() == 12 && owner.bytes().all(|b| b.is_ascii_digit()),
            "owner {owner:?} is not an account id"
        );
    }
}

fn assert_recent(t: &DateTime, what: &str) {
    let age = secs_now() - t.as_secs_f64();
    assert!(
        (-5.0..120.0).contains(&age),
        "{what} {t} is not a time of this test run (age {age} s)"
    );
}

/// After an update: one version more, the same createdAt, lastUpdatedAt not before it.
fn assert_updated(before: &ResourceMetadata, after: &ResourceMetadata) {
    assert_eq!(after.version(), before.version() + 1, "{after:?}");
    assert_eq!(after.created_at(), before.created_at());
    assert_eq!(after.uid(), before.uid());
    assert!(
        after.last_updated_at() >= before.last_updated_at(),
        "{after:?} vs {before:?}"
    );
    assert_recent(after.last_updated_at(), "lastUpdatedAt");
}

fn http_node(port: i32, hostname: &str) -> VirtualNodeSpec {
    VirtualNodeSpec::builder()
        .listeners(
            Listener::builder()
                .port_mapping(
                    PortMapping::builder()
                        .port(port)
                        .protocol(PortProtocol::Http)
                        .build()
                        .expect("port mapping"),
                )
                .build(),
        )
        .service_discovery(ServiceDiscovery::Dns(
            DnsServiceDiscovery::builder()
                .hostname(hostname)
                .build()
                .expect("dns discovery"),
        ))
        .build()
}

fn router(port: i32, protocol: PortProtocol) -> VirtualRouterSpec {
    VirtualRouterSpec::builder()
        .listeners(
            VirtualRouterListener::builder()
                .port_mapping(
                    PortMapping::builder()
                        .port(port)
                        .protocol(protocol)
                        .build()
                        .expect("port mapping"),
                )
                .build(),
        )
        .build()
}

fn target(node: &str, weight: i32) -> WeightedTarget {
    WeightedTarget::builder()
        .virtual_node(node)
        .weight(weight)
        .build()
        .expect("weighted target")
}

fn http_route(prefix: &str, targets: Vec<WeightedTarget>) -> RouteSpec {
    RouteSpec::builder()
        .http_route(
            HttpRoute::builder()
                .r#match(HttpRouteMatch::builder().prefix(prefix).build())
                .action(
                    HttpRouteAction::builder()
                        .set_weighted_targets(Some(targets))
                        .build()
                        .expect("route action"),
                )
                .build(),
        )
        .build()
}

fn tcp_route(node: &str) -> RouteSpec {
    RouteSpec::builder()
        .tcp_route(
            TcpRoute::builder()
                .action(
                    TcpRouteAction::builder()
                        .weighted_targets(target(node, 1))
                        .build()
                        .expect("tcp action"),
                )
                .build(),
        )
        .build()
}

fn provided_by_router(router: &str) -> VirtualServiceSpec {
    VirtualServiceSpec::builder()
        .provider(VirtualServiceProvider::VirtualRouter(
            VirtualRouterServiceProvider::builder()
                .virtual_router_name(router)
                .build()
                .expect("router provider"),
        ))
        .build()
}

fn gateway(port: i32) -> VirtualGatewaySpec {
    VirtualGatewaySpec::builder()
        .listeners(
            VirtualGatewayListener::builder()
                .port_mapping(
                    VirtualGatewayPortMapping::builder()
                        .port(port)
                        .protocol(VirtualGatewayPortProtocol::Http)
                        .build()
                        .expect("gateway port mapping"),
                )
                .build(),
        )
        .build()
        .expect("gateway spec")
}

fn gateway_route(prefix: &str, service: &str) -> GatewayRouteSpec {
    GatewayRouteSpec::builder()
        .http_route(
            HttpGatewayRoute::builder()
                .r#match(HttpGatewayRouteMatch::builder().prefix(prefix).build())
                .action(
                    HttpGatewayRouteAction::builder()
                        .target(
                            GatewayRouteTarget::builder()
                                .virtual_service(
                                    GatewayRouteVirtualService::builder()
                                        .virtual_service_name(service)
                                        .build()
                                        .expect("gateway route target service"),
                                )
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .build()
}

fn tag(key: &str, value: &str) -> TagRef {
    TagRef::builder()
        .key(key)
        .value(value)
        .build()
        .expect("tag")
}

fn allow_all() -> MeshSpec {
    MeshSpec::builder()
        .egress_filter(
            EgressFilter::builder()
                .r#type(EgressFilterType::AllowAll)
                .build()
                .expect("egress filter"),
        )
        .build()
}

// === Success: every kind ===

#[tokio::test]
async fn every_kind_is_created_described_listed_updated_and_deleted_with_app_mesh_metadata() {
    let work = Workdir::new("sdk-crud");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;

    // Mesh.
    let out = c.create_mesh().mesh_name("shop").send().await.unwrap();
    let mesh = out.mesh().unwrap();
    let mesh_arn = mesh.metadata().unwrap().arn().to_string();
    let prefix = mesh_arn
        .strip_suffix("mesh/shop")
        .unwrap_or_else(|| panic!("mesh ARN {mesh_arn} does not end with mesh/shop"));
    assert!(
        prefix.starts_with("arn:aws:appmesh:") && prefix.ends_with(':'),
        "{mesh_arn}"
    );
    assert_created(mesh.metadata().unwrap(), &mesh_arn);
    assert_eq!(
        mesh.status().unwrap().status(),
        Some(&MeshStatusCode::Active)
    );
    assert_eq!(
        mesh.spec()
            .unwrap()
            .egress_filter()
            .map(EgressFilter::r#type),
        Some(&EgressFilterType::DropAll),
        "App Mesh fills in the default egress filter"
    );
    let arn = |rest: &str| format!("{prefix}mesh/shop/{rest}");

    // Virtual node.
    let out = c
        .create_virtual_node()
        .mesh_name("shop")
        .virtual_node_name("web")
        .spec(http_node(8080, "web.shop.local"))
        .send()
        .await
        .unwrap();
    let node = out.virtual_node().unwrap();
    assert_created(node.metadata().unwrap(), &arn("virtualNode/web"));
    assert_eq!(node.mesh_name(), "shop");
    assert_eq!(node.virtual_node_name(), "web");
    assert_eq!(node.spec(), Some(&http_node(8080, "web.shop.local")));
    assert_eq!(
        node.status().unwrap().status(),
        &VirtualNodeStatusCode::Active
    );

    // Virtual router.
    let out = c
        .create_virtual_router()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .spec(router(8080, PortProtocol::Http))
        .send()
        .await
        .unwrap();
    let vr = out.virtual_router().unwrap();
    assert_created(vr.metadata().unwrap(), &arn("virtualRouter/web-router"));
    assert_eq!(
        vr.status().unwrap().status(),
        &VirtualRouterStatusCode::Active
    );

    // Route.
    let out = c
        .create_route()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .route_name("all")
        .spec(http_route("/", vec![target("web", 100)]))
        .send()
        .await
        .unwrap();
    let route = out.route().unwrap();
    assert_created(
        route.metadata().unwrap(),
        &arn("virtualRouter/web-router/route/all"),
    );
    assert_eq!(route.virtual_router_name(), "web-router");
    assert_eq!(route.status().unwrap().status(), &RouteStatusCode::Active);

    // Virtual service.
    let out = c
        .create_virtual_service()
        .mesh_name("shop")
        .virtual_service_name("web.shop.local")
        .spec(provided_by_router("web-router"))
        .send()
        .await
        .unwrap();
    let vs = out.virtual_service().unwrap();
    assert_created(
        vs.metadata().unwrap(),
        &arn("virtualService/web.shop.local"),
    );
    assert_eq!(
        vs.status().unwrap().status(),
        &VirtualServiceStatusCode::Active
    );

    // Virtual gateway and gateway route.
    let out = c
        .create_virtual_gateway()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .spec(gateway(9080))
        .send()
        .await
        .unwrap();
    let gw = out.virtual_gateway().unwrap();
    assert_created(gw.metadata().unwrap(), &arn("virtualGateway/ingress"));
    assert_eq!(
        gw.status().unwrap().status(),
        &VirtualGatewayStatusCode::Active
    );
    let out = c
        .create_gateway_route()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .gateway_route_name("to-web")
        .spec(gateway_route("/", "web.shop.local"))
        .send()
        .await
        .unwrap();
    let gr = out.gateway_route().unwrap();
    assert_created(
        gr.metadata().unwrap(),
        &arn("virtualGateway/ingress/gatewayRoute/to-web"),
    );
    assert_eq!(
        gr.status().unwrap().status(),
        &GatewayRouteStatusCode::Active
    );
    let gr_metadata = gr.metadata().unwrap().clone();

    // Describe returns what create returned.
    let d = c.describe_mesh().mesh_name("shop").send().await.unwrap();
    assert_eq!(d.mesh().unwrap().metadata(), mesh.metadata());
    let d = c
        .describe_virtual_node()
        .mesh_name("shop")
        .virtual_node_name("web")
        .send()
        .await
        .unwrap();
    assert_eq!(d.virtual_node().unwrap(), node);
    let d = c
        .describe_virtual_router()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .send()
        .await
        .unwrap();
    assert_eq!(d.virtual_router().unwrap(), vr);
    let d = c
        .describe_route()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .route_name("all")
        .send()
        .await
        .unwrap();
    assert_eq!(d.route().unwrap(), route);
    let d = c
        .describe_virtual_service()
        .mesh_name("shop")
        .virtual_service_name("web.shop.local")
        .send()
        .await
        .unwrap();
    assert_eq!(d.virtual_service().unwrap(), vs);
    let d = c
        .describe_virtual_gateway()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .send()
        .await
        .unwrap();
    assert_eq!(d.virtual_gateway().unwrap(), gw);
    let d = c
        .describe_gateway_route()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .gateway_route_name("to-web")
        .send()
        .await
        .unwrap();
    assert_eq!(d.gateway_route().unwrap(), gr);

    // Lists carry each resource's reference, timestamps included.
    let l = c.list_meshes().send().await.unwrap();
    assert_eq!(l.meshes().len(), 1);
    assert_eq!(l.meshes()[0].arn(), mesh_arn);
    assert_eq!(
        l.meshes()[0].created_at(),
        mesh.metadata().unwrap().created_at()
    );
    let l = c
        .list_virtual_nodes()
        .mesh_name("shop")
        .send()
        .await
        .unwrap();
    assert_eq!(l.virtual_nodes()[0].virtual_node_name(), "web");
    assert_eq!(l.virtual_nodes()[0].arn(), arn("virtualNode/web"));
    assert_recent(l.virtual_nodes()[0].last_updated_at(), "lastUpdatedAt");
    let l = c
        .list_virtual_routers()
        .mesh_name("shop")
        .send()
        .await
        .unwrap();
    assert_eq!(l.virtual_routers()[0].virtual_router_name(), "web-router");
    let l = c
        .list_routes()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .send()
        .await
        .unwrap();
    assert_eq!(l.routes()[0].route_name(), "all");
    assert_eq!(l.routes()[0].virtual_router_name(), "web-router");
    let l = c
        .list_virtual_services()
        .mesh_name("shop")
        .send()
        .await
        .unwrap();
    assert_eq!(
        l.virtual_services()[0].virtual_service_name(),
        "web.shop.local"
    );
    let l = c
        .list_virtual_gateways()
        .mesh_name("shop")
        .send()
        .await
        .unwrap();
    assert_eq!(l.virtual_gateways()[0].virtual_gateway_name(), "ingress");
    let l = c
        .list_gateway_routes()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .send()
        .await
        .unwrap();
    assert_eq!(l.gateway_routes()[0].gateway_route_name(), "to-web");
    assert_eq!(l.gateway_routes()[0].version(), 1);

    // Updates replace the spec and bump the version.
    let u = c
        .update_mesh()
        .mesh_name("shop")
        .spec(allow_all())
        .send()
        .await
        .unwrap();
    let m2 = u.mesh().unwrap();
    assert_eq!(m2.spec(), Some(&allow_all()));
    assert_updated(mesh.metadata().unwrap(), m2.metadata().unwrap());
    let u = c
        .update_virtual_node()
        .mesh_name("shop")
        .virtual_node_name("web")
        .spec(http_node(9090, "web2.shop.local"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        u.virtual_node().unwrap().spec(),
        Some(&http_node(9090, "web2.shop.local"))
    );
    assert_updated(
        node.metadata().unwrap(),
        u.virtual_node().unwrap().metadata().unwrap(),
    );
    let u = c
        .update_route()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .route_name("all")
        .spec(http_route("/v2", vec![target("web", 100)]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        u.route().unwrap().spec(),
        Some(&http_route("/v2", vec![target("web", 100)]))
    );
    assert_updated(
        route.metadata().unwrap(),
        u.route().unwrap().metadata().unwrap(),
    );
    let u = c
        .update_virtual_router()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .spec(router(8080, PortProtocol::Http))
        .send()
        .await
        .unwrap();
    assert_eq!(
        u.virtual_router().unwrap().metadata().unwrap().version(),
        1,
        "an update to the same spec changes nothing"
    );
    let u = c
        .update_virtual_gateway()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .spec(gateway(9080))
        .send()
        .await
        .unwrap();
    assert_eq!(u.virtual_gateway().unwrap().spec(), Some(&gateway(9080)));
    let u = c
        .update_gateway_route()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .gateway_route_name("to-web")
        .spec(gateway_route("/web", "web.shop.local"))
        .send()
        .await
        .unwrap();
    assert_updated(&gr_metadata, u.gateway_route().unwrap().metadata().unwrap());
    let u = c
        .update_virtual_service()
        .mesh_name("shop")
        .virtual_service_name("web.shop.local")
        .spec(provided_by_router("web-router"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        u.virtual_service().unwrap().spec(),
        Some(&provided_by_router("web-router"))
    );

    // Deletes, in reverse dependency order: each returns the resource as DELETED, then it is gone.
    let d = c
        .delete_gateway_route()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .gateway_route_name("to-web")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.gateway_route().unwrap().status().unwrap().status(),
        &GatewayRouteStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_gateway_route()
            .mesh_name("shop")
            .virtual_gateway_name("ingress")
            .gateway_route_name("to-web")
            .send()
            .await,
        "describe a deleted gateway route",
    );
    assert!(
        matches!(e, DescribeGatewayRouteError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c
        .delete_virtual_gateway()
        .mesh_name("shop")
        .virtual_gateway_name("ingress")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.virtual_gateway().unwrap().status().unwrap().status(),
        &VirtualGatewayStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_virtual_gateway()
            .mesh_name("shop")
            .virtual_gateway_name("ingress")
            .send()
            .await,
        "describe a deleted gateway",
    );
    assert!(
        matches!(e, DescribeVirtualGatewayError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c
        .delete_virtual_service()
        .mesh_name("shop")
        .virtual_service_name("web.shop.local")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.virtual_service().unwrap().status().unwrap().status(),
        &VirtualServiceStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_virtual_service()
            .mesh_name("shop")
            .virtual_service_name("web.shop.local")
            .send()
            .await,
        "describe a deleted service",
    );
    assert!(
        matches!(e, DescribeVirtualServiceError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c
        .delete_route()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .route_name("all")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.route().unwrap().status().unwrap().status(),
        &RouteStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_route()
            .mesh_name("shop")
            .virtual_router_name("web-router")
            .route_name("all")
            .send()
            .await,
        "describe a deleted route",
    );
    assert!(
        matches!(e, DescribeRouteError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c
        .delete_virtual_router()
        .mesh_name("shop")
        .virtual_router_name("web-router")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.virtual_router().unwrap().status().unwrap().status(),
        &VirtualRouterStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_virtual_router()
            .mesh_name("shop")
            .virtual_router_name("web-router")
            .send()
            .await,
        "describe a deleted router",
    );
    assert!(
        matches!(e, DescribeVirtualRouterError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c
        .delete_virtual_node()
        .mesh_name("shop")
        .virtual_node_name("web")
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.virtual_node().unwrap().status().unwrap().status(),
        &VirtualNodeStatusCode::Deleted
    );
    let (e, _) = rejected(
        c.describe_virtual_node()
            .mesh_name("shop")
            .virtual_node_name("web")
            .send()
            .await,
        "describe a deleted node",
    );
    assert!(
        matches!(e, DescribeVirtualNodeError::NotFoundException(_)),
        "{e:?}"
    );
    let d = c.delete_mesh().mesh_name("shop").send().await.unwrap();
    assert_eq!(
        d.mesh().unwrap().status().unwrap().status(),
        Some(&MeshStatusCode::Deleted)
    );
    let (e, status) = rejected(
        c.describe_mesh().mesh_name("shop").send().await,
        "describe a deleted mesh",
    );
    assert!(
        matches!(e, DescribeMeshError::NotFoundException(_)),
        "{e:?}"
    );
    assert_eq!(status, 404);
    assert!(c.list_meshes().send().await.unwrap().meshes().is_empty());
}

// === Each error type, typed ===

#[tokio::test]
async fn a_missing_resource_is_a_typed_not_found_exception_with_status_404() {
    let work = Workdir::new("sdk-not-found");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;

    let (e, status) = rejected(
        c.describe_mesh().mesh_name("nope").send().await,
        "describe a missing mesh",
    );
    assert!(
        matches!(e, DescribeMeshError::NotFoundException(_)),
        "{e:?}"
    );
    assert_eq!(status, 404);
    assert_eq!(e.code(), Some("NotFoundException"));
    assert!(
        e.message().is_some_and(|m| m.contains("nope")),
        "the message names the mesh: {e:?}"
    );

    let (e, status) = rejected(
        c.create_virtual_node()
            .mesh_name("nope")
            .virtual_node_name("a")
            .spec(http_node(8080, "a.local"))
            .send()
            .await,
        "create in a missing mesh",
    );
    assert!(
        matches!(e, CreateVirtualNodeError::NotFoundException(_)),
        "{e:?}"
    );
    assert_eq!(status, 404);

    c.create_mesh().mesh_name("m").send().await.unwrap();
    let (e, _) = rejected(
        c.list_virtual_nodes()
            .mesh_name("m")
            .mesh_owner("999999999999")
            .send()
            .await,
        "list a mesh of another owner",
    );
    assert!(
        matches!(e, ListVirtualNodesError::NotFoundException(_)),
        "{e:?}"
    );
    let (e, _) = rejected(
        c.create_route()
            .mesh_name("m")
            .virtual_router_name("no-router")
            .route_name("r")
            .spec(http_route("/", vec![target("a", 1)]))
            .send()
            .await,
        "create a route under a missing router",
    );
    assert!(matches!(e, CreateRouteError::NotFoundException(_)), "{e:?}");
}

#[tokio::test]
async fn invalid_input_is_a_typed_bad_request_exception_naming_the_field() {
    let work = Workdir::new("sdk-bad-request");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    c.create_mesh().mesh_name("m").send().await.unwrap();

    // The Rust SDK checks no ranges client-side: port 0 reaches the server.
    let (e, status) = rejected(
        c.create_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .spec(http_node(0, "a.local"))
            .send()
            .await,
        "port 0",
    );
    assert!(
        matches!(e, CreateVirtualNodeError::BadRequestException(_)),
        "{e:?}"
    );
    assert_eq!(status, 400);
    assert!(
        e.message()
            .is_some_and(|m| m.contains("spec.listeners[0].portMapping.port")),
        "{e:?}"
    );

    // A semantic rule: the provider must exist.
    let (e, _) = rejected(
        c.create_virtual_service()
            .mesh_name("m")
            .virtual_service_name("s.local")
            .spec(provided_by_router("ghost"))
            .send()
            .await,
        "a service provided by a missing router",
    );
    assert!(
        matches!(e, CreateVirtualServiceError::BadRequestException(_)),
        "{e:?}"
    );
    assert!(
        e.message()
            .is_some_and(|m| m.contains("spec.provider.virtualRouter.virtualRouterName")),
        "{e:?}"
    );

    // A semantic rule: the route kind must match a router listener protocol.
    c.create_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .spec(http_node(8080, "a.local"))
        .send()
        .await
        .unwrap();
    c.create_virtual_router()
        .mesh_name("m")
        .virtual_router_name("r")
        .spec(router(8080, PortProtocol::Http))
        .send()
        .await
        .unwrap();
    let (e, _) = rejected(
        c.create_route()
            .mesh_name("m")
            .virtual_router_name("r")
            .route_name("tcp")
            .spec(tcp_route("a"))
            .send()
            .await,
        "a tcp route on an http router",
    );
    assert!(
        matches!(e, CreateRouteError::BadRequestException(_)),
        "{e:?}"
    );
    assert!(
        e.message().is_some_and(|m| m.contains("spec.tcpRoute")),
        "{e:?}"
    );

    // A rejected update changes nothing.
    let (e, _) = rejected(
        c.update_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .spec(http_node(70000, "a.local"))
            .send()
            .await,
        "port 70000",
    );
    assert!(
        matches!(e, UpdateVirtualNodeError::BadRequestException(_)),
        "{e:?}"
    );
    let d = c
        .describe_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .send()
        .await
        .unwrap();
    assert_eq!(d.virtual_node().unwrap().metadata().unwrap().version(), 1);
}

#[tokio::test]
async fn creating_a_name_twice_is_a_typed_conflict_exception_with_status_409() {
    let work = Workdir::new("sdk-conflict");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    c.create_mesh().mesh_name("m").send().await.unwrap();
    let (e, status) = rejected(
        c.create_mesh().mesh_name("m").send().await,
        "a second mesh m",
    );
    assert!(matches!(e, CreateMeshError::ConflictException(_)), "{e:?}");
    assert_eq!(status, 409);

    c.create_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .spec(http_node(8080, "a.local"))
        .send()
        .await
        .unwrap();
    let (e, status) = rejected(
        c.create_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .spec(http_node(8080, "a.local"))
            .send()
            .await,
        "a second node a",
    );
    assert!(
        matches!(e, CreateVirtualNodeError::ConflictException(_)),
        "{e:?}"
    );
    assert_eq!(status, 409);
}

#[tokio::test]
async fn deleting_what_is_still_referenced_is_a_typed_resource_in_use_exception() {
    let work = Workdir::new("sdk-in-use");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    c.create_mesh().mesh_name("m").send().await.unwrap();
    c.create_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .spec(http_node(8080, "a.local"))
        .send()
        .await
        .unwrap();
    c.create_virtual_router()
        .mesh_name("m")
        .virtual_router_name("r")
        .spec(router(8080, PortProtocol::Http))
        .send()
        .await
        .unwrap();
    c.create_route()
        .mesh_name("m")
        .virtual_router_name("r")
        .route_name("to-a")
        .spec(http_route("/", vec![target("a", 1)]))
        .send()
        .await
        .unwrap();
    c.create_virtual_service()
        .mesh_name("m")
        .virtual_service_name("s.local")
        .spec(provided_by_router("r"))
        .send()
        .await
        .unwrap();

    let (e, status) = rejected(
        c.delete_mesh().mesh_name("m").send().await,
        "delete a mesh with resources",
    );
    assert!(
        matches!(e, DeleteMeshError::ResourceInUseException(_)),
        "{e:?}"
    );
    assert_eq!(status, 409);
    let (e, status) = rejected(
        c.delete_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .send()
            .await,
        "delete a node a route targets",
    );
    assert!(
        matches!(e, DeleteVirtualNodeError::ResourceInUseException(_)),
        "{e:?}"
    );
    assert_eq!(status, 409);
    let (e, _) = rejected(
        c.delete_virtual_router()
            .mesh_name("m")
            .virtual_router_name("r")
            .send()
            .await,
        "delete a router a service uses",
    );
    assert!(
        matches!(e, DeleteVirtualRouterError::ResourceInUseException(_)),
        "{e:?}"
    );
    // Nothing was deleted.
    c.describe_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .send()
        .await
        .unwrap();
    c.describe_virtual_router()
        .mesh_name("m")
        .virtual_router_name("r")
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_sixteenth_mesh_is_a_typed_limit_exceeded_exception() {
    let work = Workdir::new("sdk-limit");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    for i in 0..15 {
        c.create_mesh()
            .mesh_name(format!("m{i:02}"))
            .send()
            .await
            .unwrap();
    }
    let (e, status) = rejected(c.create_mesh().mesh_name("m15").send().await, "a 16th mesh");
    assert!(
        matches!(e, CreateMeshError::LimitExceededException(_)),
        "{e:?}"
    );
    assert_eq!(status, 400, "LimitExceededException is a 400 in the model");
    let (e, _) = rejected(
        c.describe_mesh().mesh_name("m15").send().await,
        "the rejected mesh",
    );
    assert!(
        matches!(e, DescribeMeshError::NotFoundException(_)),
        "{e:?}"
    );
    // Deleting one frees a slot.
    c.delete_mesh().mesh_name("m00").send().await.unwrap();
    c.create_mesh().mesh_name("m15").send().await.unwrap();
}

#[tokio::test]
async fn tagging_past_fifty_tags_is_a_typed_too_many_tags_exception() {
    let work = Workdir::new("sdk-too-many-tags");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    let out = c.create_mesh().mesh_name("m").send().await.unwrap();
    let arn = out.mesh().unwrap().metadata().unwrap().arn().to_string();
    let tags = |from: usize, to: usize| -> Vec<TagRef> {
        (from..to).map(|i| tag(&format!("k{i:02}"), "v")).collect()
    };
    c.tag_resource()
        .resource_arn(&arn)
        .set_tags(Some(tags(0, 30)))
        .send()
        .await
        .unwrap();
    // k29 is there already: 20 new keys make exactly 50, the limit.
    c.tag_resource()
        .resource_arn(&arn)
        .set_tags(Some(tags(29, 50)))
        .send()
        .await
        .unwrap();
    let (e, status) = rejected(
        c.tag_resource()
            .resource_arn(&arn)
            .set_tags(Some(tags(49, 51)))
            .send()
            .await,
        "the 51st tag",
    );
    assert!(
        matches!(e, TagResourceError::TooManyTagsException(_)),
        "{e:?}"
    );
    assert_eq!(status, 400);
    let listed = c
        .list_tags_for_resource()
        .resource_arn(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.tags().len(),
        50,
        "the rejected request added nothing"
    );
}

// === Pagination ===

#[tokio::test]
async fn lists_page_through_limit_and_next_token_and_the_paginator_sees_every_item_once() {
    let work = Workdir::new("sdk-pages");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    c.create_mesh().mesh_name("m").send().await.unwrap();
    let names: Vec<String> = (0..7).map(|i| format!("node-{i}")).collect();
    for n in &names {
        c.create_virtual_node()
            .mesh_name("m")
            .virtual_node_name(n)
            .spec(VirtualNodeSpec::builder().build())
            .send()
            .await
            .unwrap();
    }

    // By hand: pages of 3, 3 and 1; the last one has no token.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = c
            .list_virtual_nodes()
            .mesh_name("m")
            .limit(3)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        sizes.push(page.virtual_nodes().len());
        seen.extend(
            page.virtual_nodes()
                .iter()
                .map(|r| r.virtual_node_name().to_string()),
        );
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
        assert!(sizes.len() < 10, "pagination does not end: {sizes:?}");
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen, names);

    // A page boundary holds while the collection changes underneath.
    let first = c
        .list_virtual_nodes()
        .mesh_name("m")
        .limit(2)
        .send()
        .await
        .unwrap();
    c.create_virtual_node()
        .mesh_name("m")
        .virtual_node_name("node-0a")
        .spec(VirtualNodeSpec::builder().build())
        .send()
        .await
        .unwrap();
    let rest = c
        .list_virtual_nodes()
        .mesh_name("m")
        .set_next_token(first.next_token().map(str::to_string))
        .send()
        .await
        .unwrap();
    assert_eq!(
        rest.virtual_nodes()[0].virtual_node_name(),
        "node-2",
        "the next page starts after the last name returned"
    );

    // The SDK's paginator across meshes, one per page.
    for i in 0..4 {
        c.create_mesh()
            .mesh_name(format!("p{i}"))
            .send()
            .await
            .unwrap();
    }
    let pages: Vec<_> = c
        .list_meshes()
        .limit(1)
        .into_paginator()
        .send()
        .try_collect()
        .await
        .unwrap();
    let meshes: Vec<&str> = pages
        .iter()
        .flat_map(|p| p.meshes().iter().map(|m| m.mesh_name()))
        .collect();
    assert_eq!(meshes, ["m", "p0", "p1", "p2", "p3"]);
    assert!(pages.iter().all(|p| p.meshes().len() == 1), "{pages:?}");

    // Out-of-range limits are the model's BadRequest.
    let (e, status) = rejected(
        c.list_virtual_nodes()
            .mesh_name("m")
            .limit(101)
            .send()
            .await,
        "limit 101",
    );
    assert!(
        matches!(e, ListVirtualNodesError::BadRequestException(_)),
        "{e:?}"
    );
    assert_eq!(status, 400);
}

// === Tags ===

#[tokio::test]
async fn tags_given_at_create_are_listed_paged_added_and_removed() {
    let work = Workdir::new("sdk-tags");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;
    c.create_mesh().mesh_name("m").send().await.unwrap();
    let out = c
        .create_virtual_node()
        .mesh_name("m")
        .virtual_node_name("a")
        .spec(http_node(8080, "a.local"))
        .tags(tag("team", "shop"))
        .tags(tag("env", "test"))
        .send()
        .await
        .unwrap();
    let arn = out
        .virtual_node()
        .unwrap()
        .metadata()
        .unwrap()
        .arn()
        .to_string();
    let listed = c
        .list_tags_for_resource()
        .resource_arn(&arn)
        .send()
        .await
        .unwrap();
    let mut got: Vec<(String, String)> = listed
        .tags()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("env".into(), "test".into()),
            ("team".into(), "shop".into())
        ]
    );

    // Tagging adds and overwrites by key.
    c.tag_resource()
        .resource_arn(&arn)
        .tags(tag("team", "payments"))
        .tags(tag("tier", "1"))
        .send()
        .await
        .unwrap();
    let mut keys = Vec::new();
    let mut token = None;
    for _ in 0..10 {
        let page = c
            .list_tags_for_resource()
            .resource_arn(&arn)
            .limit(1)
            .set_next_token(token)
            .send()
            .await
            .unwrap();
        assert!(page.tags().len() <= 1);
        keys.extend(
            page.tags()
                .iter()
                .map(|t| format!("{}={}", t.key(), t.value())),
        );
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    keys.sort();
    assert_eq!(keys, ["env=test", "team=payments", "tier=1"]);

    c.untag_resource()
        .resource_arn(&arn)
        .tag_keys("env")
        .tag_keys("tier")
        .send()
        .await
        .unwrap();
    let listed = c
        .list_tags_for_resource()
        .resource_arn(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.tags(), [tag("team", "payments")]);

    // Tags on a route, addressed by its ARN.
    c.create_virtual_router()
        .mesh_name("m")
        .virtual_router_name("r")
        .spec(router(8080, PortProtocol::Http))
        .send()
        .await
        .unwrap();
    let route = c
        .create_route()
        .mesh_name("m")
        .virtual_router_name("r")
        .route_name("x")
        .spec(http_route("/", vec![target("a", 1)]))
        .tags(tag("owner", "me"))
        .send()
        .await
        .unwrap();
    let route_arn = route.route().unwrap().metadata().unwrap().arn().to_string();
    let listed = c
        .list_tags_for_resource()
        .resource_arn(&route_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.tags(), [tag("owner", "me")]);
}

// === Idempotency ===

#[tokio::test]
async fn a_repeated_client_token_is_the_same_create_and_a_changed_request_conflicts() {
    let work = Workdir::new("sdk-idempotency");
    let agent = Agent::start_secured(&work, None);
    let c = client(&agent).await;

    let first = c
        .create_mesh()
        .mesh_name("m")
        .client_token("token-1")
        .send()
        .await
        .unwrap();
    let again = c
        .create_mesh()
        .mesh_name("m")
        .client_token("token-1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.mesh().unwrap().metadata(),
        first.mesh().unwrap().metadata(),
        "a retry returns the resource the first request made"
    );
    let (e, status) = rejected(
        c.create_mesh()
            .mesh_name("m")
            .client_token("token-1")
            .spec(allow_all())
            .send()
            .await,
        "same token, different spec",
    );
    assert!(matches!(e, CreateMeshError::ConflictException(_)), "{e:?}");
    assert_eq!(status, 409);

    // The same for a resource inside a mesh.
    let create = || {
        c.create_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .client_token("token-2")
            .spec(http_node(8080, "a.local"))
    };
    let first = create().send().await.unwrap();
    let again = create().send().await.unwrap();
    assert_eq!(
        again.virtual_node().unwrap().metadata().unwrap().uid(),
        first.virtual_node().unwrap().metadata().unwrap().uid()
    );
    let (e, _) = rejected(
        c.create_virtual_node()
            .mesh_name("m")
            .virtual_node_name("a")
            .client_token("token-2")
            .spec(http_node(9090, "a.local"))
            .send()
            .await,
        "same token, different node spec",
    );
    assert!(
        matches!(e, CreateVirtualNodeError::ConflictException(_)),
        "{e:?}"
    );
    let listed = c.list_virtual_nodes().mesh_name("m").send().await.unwrap();
    assert_eq!(
        listed.virtual_nodes().len(),
        1,
        "the retry made nothing new"
    );
    assert_eq!(listed.virtual_nodes()[0].version(), 1);
}
