//! Loading the models a server shares between calls.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use parley_agent::{Engines, SessionSettings};
use parley_agent::tools::ToolRegistry;
use parley_agent::tools::http::HttpTool;
use parley_agent::tools::pharmacy::{PharmacyDb, pharmacy_tools};
use parley_asr::{WhisperOptions, WhisperTranscriber};
use parley_llm::remote::RemotePool;
use parley_llm::{CandleEngine, CandleOptions, ChatMessage, LlmEngine, Role};
use parley_tts::PiperVoice;
use tracing::{info, warn};

use crate::config::Config;
use crate::models;

/// Checks the model files, loads all three models and warms them up ([`warm_up`]).
pub fn load(config: &Config) -> Result<Engines> {
    let dir = config.models_dir();
    let paths = models::check(&dir)?;

    let (tools, vocabulary) = tools(config)?;
    let t = Instant::now();
    let prompt = match vocabulary {
        Some(words) if config.asr.prompt.is_empty() && config.asr.desk_vocabulary => words,
        _ => config.asr.prompt.clone(),
    };
    let asr = WhisperTranscriber::load(&paths.whisper, WhisperOptions { threads: config.asr.threads, prompt, ..WhisperOptions::default() })
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
                constrain_tool_calls: config.llm.constrain_tool_calls,
                keep_q5_0: config.llm.keep_q5_0,
                ..CandleOptions::default()
            };
            let llm = embedded_llm(config, options).context("loading the language model")?;
            info!(ms = t.elapsed().as_millis() as u64, "language model loaded");
            Arc::new(llm)
        }
    };

    let engines = Engines { transcriber: Arc::new(asr), llm, tts: Arc::new(tts), tools };
    // SIP calls offer transfer_call too: a system prompt of their own, warmed as well.
    let sip_tools = if config.sip.listen_addr()?.is_some() && config.sip.transfer_uri()?.is_some() { vec![crate::sip::transfer::tool_spec()] } else { Vec::new() };
    warm_up(&engines, &config.session_defaults(), config.remote_llm().is_none(), &sip_tools);
    Ok(engines)
}

/// Runs each model once before the server says it is ready, so the first call is as
/// fast as the tenth: the language model prefills the default system prompt with the
/// server's tools (every call with those instructions starts from that shared KV
/// cache), and Whisper and Piper run once (their first run allocates buffers and
/// thread pools). Remote replicas (`warm_llm` false) warm their own caches. A failure
/// here is only logged: the call that meets it reports it. `transport_tools` are the
/// client tools a transport adds to every call of its own (SIP's `transfer_call`):
/// when there are any, that system prompt is prefilled too.
pub fn warm_up(engines: &Engines, defaults: &SessionSettings, warm_llm: bool, transport_tools: &[parley_llm::ToolSpec]) {
    let t = Instant::now();
    if let Err(e) = engines.transcriber.transcribe(&vec![0.0f32; 16_000]) {
        warn!(error = %e, "speech-to-text warm-up failed");
    }
    if let Err(e) = engines.tts.synthesize("Hello.") {
        warn!(error = %e, "voice warm-up failed");
    }
    let audio_ms = t.elapsed().as_millis() as u64;
    if !warm_llm {
        info!(audio_ms, "warmed up speech-to-text and the voice");
        return;
    }

    // One session for both: the second prompt differs only at the end of the tool
    // list, so its prefill starts from the first one's cache.
    let mut session = engines.llm.new_session();
    prefill_system_prompt(engines, session.as_mut(), defaults, &[], audio_ms);
    if defaults.tools_enabled && !transport_tools.is_empty() {
        prefill_system_prompt(engines, session.as_mut(), defaults, transport_tools, audio_ms);
    }
}

/// Prefills (and so shares) the system prompt of calls with the default settings
/// plus `client_tools`, in the order a call builds it (`Call::reply_setup`).
fn prefill_system_prompt(engines: &Engines, session: &mut dyn parley_llm::LlmSession, defaults: &SessionSettings, client_tools: &[parley_llm::ToolSpec], audio_ms: u64) {
    let t = Instant::now();
    let mut options = defaults.generate.clone();
    let mut instructions = defaults.instructions.clone();
    if defaults.tools_enabled {
        (instructions, options.tools) = engines.tools.prompt_for(engines.llm.name(), &instructions);
        options.tools.extend(defaults.client_tools.iter().cloned());
        options.tools.extend(client_tools.iter().cloned());
    }
    options.max_tokens = 1;
    let messages = [ChatMessage::new(Role::System, instructions.as_str()), ChatMessage::new(Role::User, "Hello.")];
    match session.generate(&messages, &options, &mut |_| ControlFlow::Break(())) {
        Ok(stats) => info!(
            audio_ms,
            llm_ms = t.elapsed().as_millis() as u64,
            prompt_tokens = stats.prompt_tokens,
            client_tools = client_tools.len(),
            "warmed up: the default system prompt is prefilled and shared"
        ),
        Err(e) => warn!(error = %e, "language model warm-up failed"),
    }
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

/// The server-side tools the configuration asks for, and the words their callers
/// are expected to say (the pharmacy desk's vocabulary), for speech-to-text.
fn tools(config: &Config) -> Result<(ToolRegistry, Option<String>)> {
    let mut vocabulary = None;
    let mut registry = ToolRegistry::default();
    if config.tools.pharmacy {
        let path = config.pharmacy_db();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = PharmacyDb::open(&path).with_context(|| format!("opening the pharmacy database {}", path.display()))?;
        vocabulary = Some(db.vocabulary().context("reading the pharmacy desk's vocabulary")?);
        for tool in pharmacy_tools(Arc::new(db)) {
            registry.register(tool);
        }
    }
    for http in &config.tools.http {
        let tool = HttpTool::new(http.clone()).with_context(|| format!("HTTP tool `{}`", http.name))?;
        registry.register(Arc::new(tool));
    }
    info!(tools = ?registry.specs().iter().map(|t| t.name.clone()).collect::<Vec<_>>(), "server tools ready");
    Ok((registry, vocabulary))
}
