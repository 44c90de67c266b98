//! Process-wide state and the HTTP router.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_agent::{Engines, SessionSettings};

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every request.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// What a new call starts with.
    pub session_defaults: SessionSettings,
    /// Exported at `/metrics`.
    pub metrics: Metrics,
    /// Cancelled when the server shuts down: every call's driver ends its call.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Client secrets minted for browsers (`POST /v1/realtime/client_secrets`).
    pub client_secrets: crate::web::secrets::ClientSecrets,
    /// The API keys, as digests.
    pub keys: crate::keys::ApiKeys,
    /// Per-key rates and concurrency, per-address connections (`[server.limits]`).
    pub limiter: crate::limits::Limiter,
    /// Cancelled on SIGTERM: new calls are refused (503) while the calls in progress
    /// finish, until `server.drain.timeout_s`, when [`App::shutdown`] ends the rest.
    pub draining: tokio_util::sync::CancellationToken,
    engines: OnceLock<Arc<Engines>>,
    load_error: OnceLock<String>,
    active: Arc<AtomicUsize>,
}

/// A call's place in the server's capacity; freed when dropped.
pub struct CallSlot {
    /// The call's id, for logs and events.
    pub id: String,
    /// The settings the call starts with when its client secret carried a session.
    pub preset: Option<Box<SessionSettings>>,
    active: Arc<AtomicUsize>,
    /// The call's place in its API key's limits.
    _key: Option<crate::limits::KeyPermit>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a call was not admitted: an HTTP status, a message that says what to do and,
/// for refusals that pass (rate, capacity, draining, loading), when to retry.
pub struct Refusal(StatusCode, String, Option<u64>);

impl Refusal {
    /// A refusal with `Retry-After: retry_after_s`.
    pub fn retry(status: StatusCode, message: String, retry_after_s: u64) -> Self {
        Self(status, message, Some(retry_after_s.max(1)))
    }

    /// The WebSocket close code and reason for a refusal on a socket already
    /// accepted: 1008 (policy violation) for credentials, 1013 (try again later)
    /// for capacity and loading.
    pub fn close_code(&self) -> (u16, String) {
        let code = if self.0 == StatusCode::UNAUTHORIZED { 1008 } else { 1013 };
        (code, self.1.clone())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"type": "invalid_request_error", "code": self.0.as_u16(), "message": self.1}});
        let mut response = (self.0, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        if let Some(s) = self.2 {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        response
    }
}

impl App {
    /// State for a server with `config`; engines are attached once loaded. The API
    /// keys are hashed here; `config` keeps none in the clear (see
    /// [`crate::config::ServerConfig::resolve_api_keys`]).
    pub fn new(mut config: Config) -> anyhow::Result<Self> {
        let session_defaults = config.session_defaults();
        let mut digests: Vec<String> = config.server.api_keys.drain(..).map(|k| crate::keys::ApiKeys::digest_hex(&k)).collect();
        digests.extend(config.server.api_key_sha256.iter().cloned());
        let keys = crate::keys::ApiKeys::from_digests(&digests)?;
        let limiter = crate::limits::Limiter::new(&config.server.limits);
        Ok(Self {
            config,
            session_defaults,
            metrics: Metrics::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            client_secrets: Default::default(),
            keys,
            limiter,
            draining: tokio_util::sync::CancellationToken::new(),
            engines: OnceLock::new(),
            load_error: OnceLock::new(),
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Makes the server ready.
    pub fn set_engines(&self, engines: Engines) {
        let _ = self.engines.set(Arc::new(engines));
    }

    /// Records why the models failed to load (reported by `/readyz`).
    pub fn set_load_error(&self, e: String) {
        let _ = self.load_error.set(e);
    }

    /// The models, once loaded.
    pub fn engines(&self) -> Option<Arc<Engines>> {
        self.engines.get().cloned()
    }

    /// Calls in progress.
    pub fn active_calls(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The longest a call may last.
    pub fn max_call_duration(&self) -> Option<Duration> {
        match self.config.server.max_call_seconds {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    /// How long one write to a client may take before the call is ended.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.write_timeout_ms.max(1))
    }

    /// Checks the credential (unless `pre_authorized`), drain, readiness, the key's
    /// limits and the server's capacity before a call starts. Transports call it
    /// through [`crate::driver::admit`]. The credential is a Bearer API key, or a
    /// client secret (Bearer or WebSocket subprotocol), which may carry the call's
    /// first session settings.
    pub fn admit(&self, headers: &HeaderMap, pre_authorized: bool) -> Result<CallSlot, Refusal> {
        let retry_s = self.config.server.limits.retry_after_s;
        let authorized = if pre_authorized {
            Default::default()
        } else {
            self.client_secrets.authorize(&self.keys, headers).map_err(|e| Refusal(StatusCode::UNAUTHORIZED, e.to_string(), None))?
        };
        if self.draining.is_cancelled() {
            self.metrics.calls_refused.inc();
            return Err(Refusal::retry(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down; retry (another instance will take the call)".into(), retry_s));
        }
        if self.engines.get().is_none() {
            return Err(Refusal::retry(StatusCode::SERVICE_UNAVAILABLE, "the models are still loading; retry when /readyz returns 200".into(), retry_s));
        }
        let key_permit = match authorized.key {
            Some(key) => match self.limiter.start_call(key) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.metrics.calls_refused.inc();
                    let label = self.keys.label(key);
                    return Err(match e {
                        crate::limits::LimitError::Rate { retry_after } => {
                            tracing::info!(key = %label, "call refused: the key's call start rate");
                            Refusal::retry(StatusCode::TOO_MANY_REQUESTS, e.to_string(), retry_after.as_secs())
                        }
                        crate::limits::LimitError::Busy(_) => {
                            tracing::info!(key = %label, calls = self.limiter.calls_held(key), "call refused: the key's concurrent calls");
                            Refusal::retry(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), retry_s)
                        }
                    });
                }
            },
            None => None,
        };
        let max = self.config.server.max_calls;
        let taken = self.active.fetch_add(1, Ordering::SeqCst);
        if taken >= max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.metrics.calls_refused.inc();
            return Err(Refusal::retry(StatusCode::SERVICE_UNAVAILABLE, format!("the server is at its limit of {max} calls; retry later or raise server.max_calls"), retry_s));
        }
        self.metrics.calls_total.inc();
        let id = format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        Ok(CallSlot { id, preset: authorized.preset, active: self.active.clone(), _key: key_permit })
    }
}

/// Every route of the server.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        // CONNECT: the same WebSocket through HTTP/2 (RFC 8441).
        .route("/v1/realtime", get(crate::realtime::handler).connect(crate::realtime::handler))
        // One HTTP/2 stream is one call: NDJSON Realtime events both ways.
        .route("/v1/stream", axum::routing::post(crate::stream::handler))
        // Amazon SageMaker's container contract: health and the bidirectional stream.
        .route("/ping", get(crate::sagemaker::ping).post(crate::sagemaker::ping))
        .route(crate::sagemaker::STREAM_PATH, get(crate::sagemaker::stream).connect(crate::sagemaker::stream))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::openai_api::routes())
        .merge(crate::twilio::routes())
        .merge(crate::web::routes(app.config.web.demo))
        .with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.draining.is_cancelled() {
        // A load balancer stops sending new calls here.
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if app.engines().is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else if let Some(e) = app.load_error.get() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("model loading failed: {e}\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading models\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let engines = app.engines();
    let kv = engines.as_ref().and_then(|e| e.llm.kv_cache_stats());
    let body = app.metrics.render(app.active_calls(), engines.is_some(), kv);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
