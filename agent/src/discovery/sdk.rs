//! Cloud Map through `aws-sdk-servicediscovery`: credentials and region from `aws-config`'s
//! default chain (environment, profile, ECS task role, EC2 instance profile), built on first use
//! so an agent without Cloud Map nodes never touches AWS.
//!
//! `DiscoverInstances` and `DiscoverInstancesRevision` carry the model's host prefix `data-`:
//! real AWS serves them at `data-servicediscovery.REGION.amazonaws.com`, but a local endpoint
//! (`http://127.0.0.1:5000`) would become `data-127.0.0.1`. The SDK has no setting for it, so an
//! interceptor drops the prefix when `--cloudmap-endpoint` points anywhere but an AWS host name.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use aws_sdk_servicediscovery::Client;
use aws_sdk_servicediscovery::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_servicediscovery::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_servicediscovery::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_servicediscovery::types::{HealthStatusFilter, HttpInstanceSummary};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;
use tracing::{debug, info};

use super::{CallError, CloudMap, Discovered, FailureKind};
use trellis_translate::{CloudMapKey, Instance};

/// The most instances one `DiscoverInstances` returns (the API's maximum; its default is 100).
const MAX_RESULTS: i32 = 1000;

/// How to reach Cloud Map.
#[derive(Clone, Debug)]
pub struct Settings {
    /// An endpoint URL instead of the region's (a VPC endpoint, or a local stand-in).
    pub endpoint: Option<String>,
    /// The region when the default chain finds none.
    pub fallback_region: String,
    /// `HealthStatus` of every `DiscoverInstances`.
    pub health: HealthStatusFilter,
}

#[derive(Debug)]
pub struct SdkCloudMap {
    settings: Settings,
    client: OnceCell<Client>,
}

impl SdkCloudMap {
    pub fn new(settings: Settings) -> Self {
        SdkCloudMap {
            settings,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> &Client {
        self.client.get_or_init(|| connect(&self.settings)).await
    }
}

async fn connect(s: &Settings) -> Client {
    let shared = crate::sdk::load(crate::sdk::Loading {
        endpoint: s.endpoint.as_deref(),
        fallback_region: &s.fallback_region,
        attempt_timeout: Duration::from_secs(5),
        // The pollers own retrying: they back off, count and log every failure.
        sdk_retries: false,
    })
    .await;
    let mut conf = aws_sdk_servicediscovery::config::Builder::from(&shared);
    let strip = s.endpoint.as_deref().is_some_and(|u| !is_aws_host(u));
    if strip {
        conf = conf.interceptor(NoHostPrefix);
    }
    info!(
        endpoint = s.endpoint.as_deref().unwrap_or("(the region's)"),
        region = ?shared.region(),
        host_prefix = !strip,
        health = s.health.as_str(),
        "cloud map client ready"
    );
    Client::from_conf(conf.build())
}

/// Whether an endpoint URL names an AWS host, where the `data-` prefix belongs.
pub fn is_aws_host(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if host_port.starts_with('[') {
        host_port.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    let host = host.to_ascii_lowercase();
    [".amazonaws.com", ".amazonaws.com.cn", ".api.aws"]
        .iter()
        .any(|suffix| host.ends_with(suffix))
}

/// Drops the model's `data-` host prefix (see the module comment).
#[derive(Debug)]
struct NoHostPrefix;

impl Intercept for NoHostPrefix {
    fn name(&self) -> &'static str {
        "NoHostPrefix"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // Runs after the operation stored its prefix and before the endpoint is applied.
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}

impl CloudMap for SdkCloudMap {
    fn discover<'a>(
        &'a self,
        key: &'a CloudMapKey,
    ) -> BoxFuture<'a, Result<Discovered, CallError>> {
        Box::pin(async move {
            let mut req = self
                .client()
                .await
                .discover_instances()
                .namespace_name(&key.namespace)
                .service_name(&key.service)
                .max_results(MAX_RESULTS)
                .health_status(self.settings.health.clone());
            for (k, v) in &key.attributes {
                req = req.query_parameters(k, v);
            }
            let out = req.send().await.map_err(classify)?;
            let instances = out
                .instances()
                .iter()
                .filter_map(|i| {
                    let parsed = instance(i);
                    if parsed.is_none() {
                        debug!(id = ?i.instance_id(), "instance without a usable AWS_INSTANCE_IPV4/IPV6 skipped");
                    }
                    parsed
                })
                .collect();
            Ok(Discovered { instances })
        })
    }

    fn revision<'a>(&'a self, key: &'a CloudMapKey) -> BoxFuture<'a, Result<i64, CallError>> {
        Box::pin(async move {
            let out = self
                .client()
                .await
                .discover_instances_revision()
                .namespace_name(&key.namespace)
                .service_name(&key.service)
                .send()
                .await
                .map_err(classify)?;
            Ok(out.instances_revision().unwrap_or_default())
        })
    }
}

/// An instance's addresses; `None` when it has neither a valid IPv4 nor IPv6 address.
fn instance(s: &HttpInstanceSummary) -> Option<Instance> {
    let attrs = s.attributes()?;
    let ipv4 = attrs
        .get("AWS_INSTANCE_IPV4")
        .and_then(|a| a.trim().parse::<Ipv4Addr>().ok());
    let ipv6 = attrs
        .get("AWS_INSTANCE_IPV6")
        .and_then(|a| a.trim().parse::<Ipv6Addr>().ok());
    if ipv4.is_none() && ipv6.is_none() {
        return None;
    }
    Some(Instance {
        id: s.instance_id().unwrap_or_default().to_string(),
        ipv4,
        ipv6,
    })
}

fn classify<E>(e: SdkError<E, HttpResponse>) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let kind = match &e {
        SdkError::ServiceError(ctx) => {
            kind_of(ctx.err().code().unwrap_or(""), ctx.raw().status().as_u16())
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            FailureKind::Unreachable
        }
        _ => FailureKind::Other,
    };
    CallError {
        kind,
        message: DisplayErrorContext(&e).to_string(),
    }
}

/// An AWS error code (or, for unknown codes, the HTTP status) as a failure kind.
fn kind_of(code: &str, status: u16) -> FailureKind {
    match code {
        "ThrottlingException"
        | "Throttling"
        | "ThrottledException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "RequestThrottled"
        | "RequestThrottledException" => FailureKind::Throttled,
        "NamespaceNotFound" | "ServiceNotFound" => FailureKind::NotFound,
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "MissingAuthenticationTokenException" => FailureKind::Denied,
        "InvalidInput" => FailureKind::Invalid,
        _ if status == 429 => FailureKind::Throttled,
        _ if status == 401 || status == 403 => FailureKind::Denied,
        _ => FailureKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_prefix_is_kept_for_aws_hosts_only() {
        assert!(is_aws_host(
            "https://servicediscovery.us-west-2.amazonaws.com"
        ));
        assert!(is_aws_host(
            "https://vpce-1.servicediscovery.eu-west-1.vpce.amazonaws.com:443/"
        ));
        assert!(is_aws_host(
            "https://servicediscovery.cn-north-1.amazonaws.com.cn"
        ));
        assert!(!is_aws_host("http://127.0.0.1:5000"));
        assert!(!is_aws_host("http://localhost:4566/"));
        assert!(!is_aws_host("http://[::1]:5000"));
        assert!(!is_aws_host("http://amazonaws.com.example.org"));
    }

    #[test]
    fn throttling_in_any_of_its_spellings_is_throttling() {
        for code in ["ThrottlingException", "RequestLimitExceeded", "Throttling"] {
            assert_eq!(kind_of(code, 400), FailureKind::Throttled, "{code}");
        }
        assert_eq!(kind_of("Whatever", 429), FailureKind::Throttled);
        assert_eq!(kind_of("ServiceNotFound", 400), FailureKind::NotFound);
        assert_eq!(kind_of("AccessDeniedException", 400), FailureKind::Denied);
        assert_eq!(kind_of("InternalFailure", 500), FailureKind::Other);
    }

    #[test]
    fn instances_need_an_address_and_keep_both_families() {
        let both = HttpInstanceSummary::builder()
            .instance_id("a")
            .attributes("AWS_INSTANCE_IPV4", "10.0.0.1")
            .attributes("AWS_INSTANCE_IPV6", "fd00::1")
            .attributes("AWS_INSTANCE_PORT", "9999")
            .build();
        let i = instance(&both).unwrap();
        assert_eq!(i.ipv4, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(i.ipv6, Some("fd00::1".parse().unwrap()));
        let bad = HttpInstanceSummary::builder()
            .instance_id("b")
            .attributes("AWS_INSTANCE_IPV4", "not-an-ip")
            .build();
        assert_eq!(instance(&bad), None);
    }
}
