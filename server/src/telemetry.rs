//! Traces over OTLP (optional, off by default): the spans the server already opens
//! (a connection, a call, a turn, and each stage of a turn: speech-to-text, the
//! LLM's first token, synthesis, tool calls) exported to an OpenTelemetry collector
//! over OTLP/HTTP (protobuf), with the per-turn latency breakdown as attributes of
//! the turn span. The exporter is the OpenTelemetry project's own
//! (`opentelemetry-otlp`); spans go out in batches from a background thread, so a
//! slow or absent collector costs a call nothing but the dropped spans.

use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};

/// `[telemetry]`: where traces go. Empty `otlp_endpoint` and no
/// `OTEL_EXPORTER_OTLP_ENDPOINT` in the environment: no export at all.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base address, e.g. `http://127.0.0.1:4318`; spans
    /// are posted to `{otlp_endpoint}/v1/traces`. Empty: the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable, else off.
    pub otlp_endpoint: String,
    /// `service.name` on every span.
    pub service_name: String,
    /// Share of calls traced (0.0–1.0), decided per trace at its root span.
    pub sample_ratio: f64,
    /// Give up on one export request after this long (the batch is dropped).
    pub timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: "parley".into(), sample_ratio: 1.0, timeout_ms: 5_000 }
    }
}

impl TelemetryConfig {
    /// The traces address in force, with the environment's as fallback; `None`: off.
    pub fn traces_url(&self) -> Option<String> {
        let base = if self.otlp_endpoint.trim().is_empty() {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty())?
        } else {
            self.otlp_endpoint.trim().to_string()
        };
        Some(traces_url(&base))
    }

    /// Rejects settings that cannot work, before the server starts.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            anyhow::bail!("telemetry.sample_ratio must be between 0 and 1 (got {})", self.sample_ratio);
        }
        if let Some(url) = self.traces_url() {
            url.parse::<http::Uri>().with_context(|| format!("telemetry.otlp_endpoint: {url} is not a URL"))?;
            if !url.starts_with("http://") && !url.starts_with("https://") {
                anyhow::bail!("telemetry.otlp_endpoint must start with http:// or https:// (got {url})");
            }
            if url.starts_with("https://") {
                anyhow::bail!("telemetry.otlp_endpoint: https is not supported yet; export to a local collector over http");
            }
        }
        Ok(())
    }
}

/// `BASE/v1/traces`, unless the address already names that path.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") }
}

/// Which spans are exported: Parley's own at info level and above (a connection,
/// the transport, the call, its turns and their stages); not the libraries'.
fn exported_spans() -> Targets {
    Targets::new()
        .with_target("parley", LevelFilter::INFO)
        .with_target("parley_server", LevelFilter::INFO)
        .with_target("parley_agent", LevelFilter::INFO)
        .with_target("parley_llm", LevelFilter::INFO)
        .with_target("parley_asr", LevelFilter::INFO)
        .with_target("parley_tts", LevelFilter::INFO)
}

/// Keeps the exporter alive; [`Tracing::shutdown`] sends what is still queued.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Flushes the queued spans (bounded by the export timeout) and stops the
    /// exporter thread. Call it before the async runtime goes away.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP trace export did not shut down cleanly");
        }
    }
}

/// A subscriber layer, boxed so that it can be left out.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync>;

/// The OTLP layer for the subscriber, or `None` when export is off. `runtime`
/// carries the export requests (the batch thread is not a Tokio thread).
pub fn layer<S>(config: &TelemetryConfig, runtime: tokio::runtime::Handle) -> Result<Option<(BoxedLayer<S>, Tracing)>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span> + Send + Sync,
{
    let Some(url) = config.traces_url() else { return Ok(None) };
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(Duration::from_millis(config.timeout_ms), None),
        runtime,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url.clone())
        .with_timeout(Duration::from_millis(config.timeout_ms))
        .build()
        .with_context(|| format!("setting up the OTLP trace exporter for {url}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("parley");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(exported_spans()).boxed();
    Ok(Some((layer, Tracing { provider })))
}

/// The exporter's HTTP client, run on the server's Tokio runtime: the batch
/// exporter calls it from its own plain thread, where Hyper has no reactor.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        match self.runtime.spawn(async move { client.send_bytes(request).await }).await {
            Ok(result) => result,
            Err(e) => Err(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_path_is_added_once() {
        assert_eq!(traces_url("http://collector:4318"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/v1/traces"), "http://collector:4318/v1/traces");
    }

    #[test]
    fn off_by_default() {
        let c = TelemetryConfig::default();
        // The environment may name a collector on an operator's machine; only the
        // file's setting is checked here.
        assert!(c.otlp_endpoint.is_empty());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_settings_are_refused() {
        let c = TelemetryConfig { sample_ratio: 1.5, ..TelemetryConfig::default() };
        assert!(c.validate().is_err());
        let c = TelemetryConfig { otlp_endpoint: "collector:4318".into(), ..TelemetryConfig::default() };
        assert!(c.validate().is_err());
        let c = TelemetryConfig { otlp_endpoint: "http://127.0.0.1:4318".into(), ..TelemetryConfig::default() };
        assert!(c.validate().is_ok());
        assert_eq!(c.traces_url().as_deref(), Some("http://127.0.0.1:4318/v1/traces"));
    }
}
