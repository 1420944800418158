//! The AWS SDK's shared configuration for every client the agent makes (Cloud Map, ECS), so they
//! all connect alike: rustls with ring, a 2 s connect timeout, the caller's per-attempt timeout and
//! retry choice, an endpoint override (VPC endpoints, tests), and the agent's own region when the
//! default chain (environment, profile, instance metadata) finds none.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls;

/// How one client's configuration is loaded.
#[derive(Debug, Clone, Copy)]
pub struct Loading<'a> {
    pub endpoint: Option<&'a str>,
    pub fallback_region: &'a str,
    pub attempt_timeout: Duration,
    /// Off where the caller owns retrying (it backs off, counts and logs every failure).
    pub sdk_retries: bool,
}

pub async fn load(s: Loading<'_>) -> SdkConfig {
    let loader = |region: Option<Region>| {
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut l = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(s.attempt_timeout)
                    .build(),
            );
        if !s.sdk_retries {
            l = l.retry_config(RetryConfig::disabled());
        }
        if let Some(r) = region {
            l = l.region(r);
        }
        if let Some(url) = s.endpoint {
            l = l.endpoint_url(url);
        }
        l
    };
    let shared = loader(None).load().await;
    if shared.region().is_some() {
        return shared;
    }
    loader(Some(Region::new(s.fallback_region.to_string())))
        .load()
        .await
}
