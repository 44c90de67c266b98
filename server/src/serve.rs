//! `parley serve`: start listening at once, load the models in the background,
//! report ready when they are in.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tracing::{error, info};

use crate::app::{App, router};
use crate::config::{AgentMode, Config};

/// Options of `parley serve`; each overrides the config file.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one and prints it).
    #[arg(long, env = "PARLEY_LISTEN")]
    listen: Option<String>,
    /// Configuration file (TOML); `parley config` prints the defaults.
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// Models folder.
    #[arg(long, env = "PARLEY_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Calls served at once.
    #[arg(long, env = "PARLEY_MAX_CALLS")]
    max_calls: Option<usize>,
    /// What answers callers: `models`, or `echo` (no models; each turn is played back).
    #[arg(long, env = "PARLEY_AGENT_MODE", value_enum)]
    agent_mode: Option<AgentMode>,
    /// A file of API keys (`server.api_keys_file`): one per line, `#` comments,
    /// `sha256:HEX` lines are digests. `PARLEY_API_KEYS` (comma-separated) adds more.
    #[arg(long, env = "PARLEY_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "PARLEY_LOG_JSON")]
    log_json: bool,
    /// Amazon SageMaker mode (`server.sagemaker`): listen on 0.0.0.0:8080 (or
    /// `$SAGEMAKER_BIND_TO_PORT`) unless `--listen` says otherwise, and serve
    /// `/invocations-bidirectional-stream` without an API key (the sidecar
    /// authenticates callers).
    #[arg(long, env = "PARLEY_SAGEMAKER")]
    sagemaker: bool,
    /// Answer SIP calls on HOST:PORT (UDP), `sip.listen`.
    #[arg(long, env = "PARLEY_SIP_LISTEN")]
    sip_listen: Option<String>,
}

/// Where SageMaker expects the container to listen.
fn sagemaker_listen() -> String {
    let port = std::env::var("SAGEMAKER_BIND_TO_PORT").ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(8080);
    format!("0.0.0.0:{port}")
}

/// Logs to stderr (text or JSON, `PARLEY_LOG` filters them) and, when
/// `[telemetry]` names a collector, spans to it over OTLP.
fn init_logging(json: bool, telemetry: &crate::telemetry::TelemetryConfig, runtime: tokio::runtime::Handle) -> Result<Option<crate::telemetry::Tracing>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().with_filter(filter).boxed() } else { fmt.with_filter(filter).boxed() };
    let (otlp, tracing) = match crate::telemetry::layer(telemetry, runtime)? {
        Some((layer, tracing)) => (Some(layer), Some(tracing)),
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(otlp).try_init().context("setting up logging")?;
    if let Some(url) = telemetry.traces_url().filter(|_| tracing.is_some()) {
        info!(%url, sample_ratio = telemetry.sample_ratio, "exporting traces over OTLP/HTTP");
    }
    Ok(tracing)
}

/// Runs the server until interrupted.
pub fn run(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if args.sagemaker {
        config.server.sagemaker = true;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    } else if config.server.sagemaker {
        config.server.listen = sagemaker_listen();
    }
    if let Some(dir) = args.models_dir {
        config.models.dir = dir.to_string_lossy().into_owned();
    }
    if let Some(sip) = args.sip_listen {
        config.sip.listen = sip;
    }
    if let Some(n) = args.max_calls {
        config.server.max_calls = n;
    }
    if let Some(mode) = args.agent_mode {
        config.agent.mode = mode;
    }
    if let Some(file) = args.api_keys_file {
        config.server.api_keys_file = file.to_string_lossy().into_owned();
    }
    let echo = config.agent.mode == AgentMode::Echo;
    config.validate()?;
    // Before the async runtime starts any thread (this sets environment variables).
    // SAFETY: only this thread exists yet.
    let threads = unsafe { parley_llm::cpu::set_model_threads(config.llm.threads) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let traces = init_logging(args.log_json, &config.telemetry, runtime.handle().clone())?;
    parley_agent::redact::set_enabled(config.logging.redact);
    if !config.logging.redact {
        tracing::warn!("logging.redact = false: transcripts and tool data are logged unredacted");
    }
    // Every key becomes a digest here; none is kept in the clear past this point.
    let env_keys = std::env::var("PARLEY_API_KEYS").ok();
    config.server.resolve_api_keys(env_keys.as_deref()).context("loading the API keys")?;

    info!(simd = parley_llm::cpu::simd_path(), model_threads = threads, asr_threads = config.asr.threads, "CPU");
    // Fail fast, before binding, when the models are missing.
    if !echo {
        crate::models::check(&config.models_dir())?;
    }

    let result = runtime.block_on(serve(config));
    // The spans still queued go out while the runtime that carries them is alive.
    if let Some(traces) = traces {
        traces.shutdown();
    }
    result
}

/// How long, after the calls have ended, open connections get to finish.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
/// How long each call gets to say goodbye and close once the drain time is up.
const GOODBYE_GRACE: std::time::Duration = std::time::Duration::from_secs(20);
/// How often the drain looks whether the calls have ended.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

async fn serve(config: Config) -> Result<()> {
    let addr = config.listen_addr()?;
    let tls = if config.server.tls.enabled() { Some(crate::listener::tls_acceptor(&config.server.tls)?) } else { None };
    let limits = config.server.http.clone();
    let app = Arc::new(App::new(config)?);
    info!(api_keys = app.keys.len(), "authentication");
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}; is another server using it?"))?;
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("parley listening on {scheme}://{local}");
    info!(%local, tls = tls.is_some(), "listening (HTTP/1.1 and HTTP/2)");

    if app.config.agent.mode == AgentMode::Echo {
        app.set_engines(parley_agent::Engines::echo());
        info!("echo agent: no models; ready");
    } else {
        load_models(app.clone());
    }

    let sip = crate::sip::start(app.clone()).await?;

    let stop = drain(app.clone());
    crate::listener::serve(listener, router(app.clone()), limits, tls, app.clone(), stop, DRAIN).await.context("server failed")?;
    if let Some(sip) = sip {
        // SIP calls hang up (BYE) before the process exits.
        let _ = sip.await;
    }
    info!("shut down");
    Ok(())
}

/// The graceful stop (`[server.drain]`): after the signal, new calls are refused
/// while the ones in progress go on, up to the drain timeout; then every call left
/// says goodbye and closes (calls end through their driver: a WebSocket is not a
/// request the HTTP layer can wait for). Resolves when the listener may stop.
async fn drain(app: Arc<App>) {
    shutdown_signal().await;
    let timeout = std::time::Duration::from_secs(app.config.server.drain.timeout_s);
    info!(calls = app.active_calls(), timeout_s = timeout.as_secs(), "shutting down: refusing new calls, letting calls in progress finish");
    app.draining.cancel();
    let until = tokio::time::Instant::now() + timeout;
    while app.active_calls() > 0 && tokio::time::Instant::now() < until {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL) => {}
            // A second signal: no more waiting.
            _ = shutdown_signal() => break,
        }
    }
    let left = app.active_calls();
    if left > 0 {
        info!(calls = left, "drain time is up: ending the calls left with a goodbye");
    }
    app.shutdown.cancel();
    let until = tokio::time::Instant::now() + GOODBYE_GRACE;
    while app.active_calls() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Loads the models on a blocking thread; the server reports ready when they are in.
fn load_models(loader: Arc<App>) {
    tokio::task::spawn_blocking(move || match crate::engines::load(&loader.config) {
        Ok(engines) => {
            loader.set_engines(engines);
            info!("models loaded; ready");
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "model loading failed");
            loader.set_load_error(format!("{e:#}"));
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
