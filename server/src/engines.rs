//! Loading the models a server shares between calls.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use parley_agent::Engines;
use parley_agent::tools::ToolRegistry;
use parley_agent::tools::http::HttpTool;
use parley_agent::tools::pharmacy::{PharmacyDb, pharmacy_tools};
use parley_asr::{WhisperOptions, WhisperTranscriber};
use parley_llm::remote::RemotePool;
use parley_llm::{CandleEngine, CandleOptions, LlmEngine};
use parley_tts::PiperVoice;
use tracing::info;

use crate::config::Config;
use crate::models;

/// Checks the model files and loads all three models (several seconds: the LLM
/// dequantizes its weights).
pub fn load(config: &Config) -> Result<Engines> {
    let dir = config.models_dir();
    let paths = models::check(&dir)?;

    let t = Instant::now();
    let asr = WhisperTranscriber::load(&paths.whisper, WhisperOptions { threads: config.asr.threads, ..WhisperOptions::default() })
        .context("loading speech-to-text")?;
    info!(ms = t.elapsed().as_millis() as u64, "speech-to-text loaded");

    let t = Instant::now();
    let tts = PiperVoice::load(&paths.piper_onnx, &paths.piper_config, &paths.onnxruntime).context("loading the voice")?;
    info!(ms = t.elapsed().as_millis() as u64, "voice loaded");

    let t = Instant::now();
    let llm: Arc<dyn LlmEngine> = match config.remote_llm() {
        Some(remote) => {
            let names: Vec<String> = remote.replicas.iter().map(|r| r.name.clone()).collect();
            let pool = RemotePool::new(remote).context("starting the remote LLM pool")?;
            info!(replicas = ?names, "remote language model pool ready");
            pool
        }
        None => {
            let options = CandleOptions {
                dequantize: config.llm.dequantize,
                max_context: config.llm.context,
                kv_budget_bytes: config.llm.kv_cache_mb.saturating_mul(1 << 20),
                kv_reuse: config.llm.kv_reuse,
                ..CandleOptions::default()
            };
            let llm = embedded_llm(config, options).context("loading the language model")?;
            info!(ms = t.elapsed().as_millis() as u64, "language model loaded");
            Arc::new(llm)
        }
    };

    Ok(Engines { transcriber: Arc::new(asr), llm, tts: Arc::new(tts), tools: tools(config)? })
}

/// The embedded model `[models]` chooses: a GGUF file given by path, else an
/// installed model by name (the 0.5B by default).
fn embedded_llm(config: &Config, options: CandleOptions) -> Result<CandleEngine> {
    let m = &config.models;
    if !m.llm_gguf.is_empty() {
        let gguf = std::path::Path::new(&m.llm_gguf);
        return Ok(if m.llm_tokenizer.is_empty() {
            CandleEngine::load_gguf_only(gguf, options)?
        } else {
            CandleEngine::load(gguf, std::path::Path::new(&m.llm_tokenizer), options)?
        });
    }
    let files = models::llm_model(&m.llm)?.files(&config.models_dir())?;
    Ok(CandleEngine::load(&files.gguf, &files.tokenizer, options)?)
}

/// The server-side tools the configuration asks for.
fn tools(config: &Config) -> Result<ToolRegistry> {
    let mut registry = ToolRegistry::default();
    if config.tools.pharmacy {
        let path = config.pharmacy_db();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = PharmacyDb::open(&path).with_context(|| format!("opening the pharmacy database {}", path.display()))?;
        for tool in pharmacy_tools(Arc::new(db)) {
            registry.register(tool);
        }
    }
    for http in &config.tools.http {
        let tool = HttpTool::new(http.clone()).with_context(|| format!("HTTP tool `{}`", http.name))?;
        registry.register(Arc::new(tool));
    }
    info!(tools = ?registry.specs().iter().map(|t| t.name.clone()).collect::<Vec<_>>(), "server tools ready");
    Ok(registry)
}
