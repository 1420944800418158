//! The only code that talks to ECS: `DescribeTaskDefinition` for `--from-ecs` and
//! `RegisterTaskDefinition` for `--register`, through `aws-sdk-ecs` (endpoint, region, credentials,
//! signing and retries from `aws-config`).
//!
//! Task definitions cross this boundary as raw JSON, not as the SDK's typed structs: the response body is
//! captured as received and the request body is our JSON as written. A typed round trip would silently
//! drop any field newer than the SDK's model, which is exactly the data loss this tool exists to avoid.

use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::interceptors::AfterDeserializationInterceptorContextRef;
use aws_sdk_ecs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::TaskDefinitionField;
use aws_smithy_http_client::tls;
use aws_smithy_types::body::SdkBody;
use serde_json::Value;

/// Where to reach ECS; `None` fields fall back to `aws-config`'s usual sources (`AWS_ENDPOINT_URL`,
/// `AWS_REGION`, the shared config files).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    pub(crate) endpoint_url: Option<String>,
    pub(crate) region: Option<String>,
}

/// An ECS client with the runtime that drives it (the CLI is otherwise synchronous).
pub(crate) struct Ecs {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

// === impl Ecs ===

impl Ecs {
    pub(crate) fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(https);
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let config = runtime.block_on(loader.load());
        if config.region().is_none() {
            bail!("no AWS region: pass --region or set AWS_REGION");
        }
        let client = Client::new(&config);
        Ok(Self { runtime, client })
    }

    /// `DescribeTaskDefinition` with tags: the response JSON exactly as ECS sent it,
    /// `{"taskDefinition": {...}, "tags": [...]}`.
    pub(crate) fn describe(&self, task_definition: &str) -> anyhow::Result<Value> {
        let body = CaptureBody::default();
        let sent = self.runtime.block_on(
            self.client
                .describe_task_definition()
                .task_definition(task_definition)
                .include(TaskDefinitionField::Tags)
                .customize()
                .interceptor(body.clone())
                .send(),
        );
        sent.map_err(|e| {
            let hint = "check the family, the revision and the region";
            ecs_error(e, &format!("--from-ecs {task_definition}"), hint)
        })?;
        let bytes = body.take().ok_or_else(|| {
            anyhow!("--from-ecs {task_definition}: ECS returned no response body")
        })?;
        let text = String::from_utf8(bytes).context("ECS returned a response that is not UTF-8")?;
        trellis_rewrite::parse(&text)
            .with_context(|| format!("--from-ecs {task_definition}: reading ECS's response"))
    }

    /// `RegisterTaskDefinition` with `request` as the body, verbatim; returns the new revision's ARN.
    pub(crate) fn register(&self, request: &Value) -> anyhow::Result<String> {
        let family = request
            .get("family")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let body = serde_json::to_vec(request).context("serialising the task definition")?;
        // The SDK serialises a request from its typed input; we swap in our own body before signing, so
        // the signature covers exactly what we send.
        let out = self
            .runtime
            .block_on(
                self.client
                    .register_task_definition()
                    .family(&family)
                    .customize()
                    .mutate_request(move |req| {
                        *req.body_mut() = SdkBody::from(body.clone());
                        req.headers_mut()
                            .insert("content-length", body.len().to_string());
                    })
                    .send(),
            )
            .map_err(|e| {
                ecs_error(
                    e,
                    &format!("--register {family}"),
                    "ECS rejected the rewritten definition",
                )
            })?;
        out.task_definition()
            .and_then(|td| td.task_definition_arn())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("--register {family}: ECS returned no task definition ARN"))
    }
}

/// An SDK error as one line: the service's own code and message when ECS answered, else the whole chain
/// (connection refused, no credentials, ...).
fn ecs_error<E, R>(e: SdkError<E, R>, what: &str, hint: &str) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match e.as_service_error() {
        Some(se) => anyhow!(
            "{what}: ECS answered {}: {} ({hint})",
            se.code().unwrap_or("an error"),
            se.message().unwrap_or("no message"),
        ),
        None => anyhow!("{what}: calling ECS failed: {}", DisplayErrorContext(&e)),
    }
}

/// Keeps the raw body of a successful response; the orchestrator has read it into memory by then.
#[derive(Debug, Clone, Default)]
struct CaptureBody(Arc<Mutex<Option<Vec<u8>>>>);

// === impl CaptureBody ===

impl CaptureBody {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok().and_then(|mut b| b.take())
    }
}

impl Intercept for CaptureBody {
    fn name(&self) -> &'static str {
        "CaptureBody"
    }

    fn read_after_deserialization(
        &self,
        ctx: &AfterDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if ctx.output_or_error().is_ok()
            && let Some(bytes) = ctx.response().body().bytes()
            && let Ok(mut slot) = self.0.lock()
        {
            *slot = Some(bytes.to_vec());
        }
        Ok(())
    }
}
