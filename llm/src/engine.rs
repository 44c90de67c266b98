//! The embedded engine: Qwen2 GGUF weights on candle, one KV cache per session.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::qwen2::{KvCache, ModelContext, Qwen2LoadOptions, Qwen2Weights};
use crate::tokenizer::{TextStream, load_tokenizer, tokenizer_from_json, tokenizer_json_from_gguf};
use crate::{
    ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession,
    chat,
};

/// File name of the default model inside `$PARLEY_MODELS_DIR/llm/`, as the installer
/// writes it.
pub const DEFAULT_GGUF_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// File name of the default model's tokenizer inside `$PARLEY_MODELS_DIR/llm/`.
pub const DEFAULT_TOKENIZER_FILE: &str = "qwen2.5-coder-0.5b-instruct.tokenizer.json";

/// Where the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlmDevice {
    /// The CPU (every build).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs the crate's `cuda` feature, else loading fails
    /// with a clear error.
    Cuda(usize),
}

/// How to load the embedded engine.
#[derive(Debug, Clone, PartialEq)]
pub struct CandleOptions {
    /// Dequantize the weights to f32 at load: prefill is about 18x faster on CPU than
    /// with candle's quantized kernels, at about 2 GB of RAM for the 0.5B model.
    pub dequantize: bool,
    /// Most tokens a session may hold (prompt plus reply); a longer conversation
    /// fails with [`LlmError::ContextFull`]. Each session's KV cache grows up to this.
    pub max_context: usize,
    /// Where to run.
    pub device: LlmDevice,
}

impl Default for CandleOptions {
    fn default() -> Self {
        Self { dequantize: true, max_context: 4096, device: LlmDevice::Cpu }
    }
}

/// What every session of one engine shares, read-only.
struct Shared {
    name: String,
    weights: Qwen2Weights,
    tokenizer: Tokenizer,
    /// Token ids that end the assistant's turn.
    stop_ids: Vec<u32>,
}

/// The embedded language model: Qwen2-architecture GGUF weights run by candle.
///
/// Loaded once per process (the weights are the large part); each call opens a
/// session with [`LlmEngine::new_session`], which owns only its KV cache, so sessions
/// run concurrently on different threads without locks.
#[derive(Clone)]
pub struct CandleEngine {
    shared: Arc<Shared>,
}

impl CandleEngine {
    /// Loads the GGUF weights and the `tokenizer.json` written by the setup step.
    pub fn load(gguf: &Path, tokenizer_json: &Path, options: CandleOptions) -> Result<Self, LlmError> {
        let tokenizer = load_tokenizer(tokenizer_json)?;
        Self::with_tokenizer(gguf, tokenizer, options)
    }

    /// Loads the GGUF weights and builds the tokenizer from the GGUF metadata, for
    /// when no `tokenizer.json` was written (costs about a second more than
    /// [`CandleEngine::load`]).
    pub fn load_gguf_only(gguf: &Path, options: CandleOptions) -> Result<Self, LlmError> {
        let tokenizer = tokenizer_from_json(&tokenizer_json_from_gguf(gguf)?)?;
        Self::with_tokenizer(gguf, tokenizer, options)
    }

    fn with_tokenizer(gguf: &Path, tokenizer: Tokenizer, options: CandleOptions) -> Result<Self, LlmError> {
        let _span = tracing::info_span!("llm.load", path = %gguf.display()).entered();
        let started = Instant::now();
        let device = match options.device {
            LlmDevice::Cpu => Device::Cpu,
            LlmDevice::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|e| LlmError::Load {
                path: gguf.to_path_buf(),
                reason: format!(
                    "cannot open CUDA device {ordinal}: {e} (is parley-llm built with the `cuda` feature?)"
                ),
            })?,
        };
        let weights = Qwen2Weights::load(
            gguf,
            &device,
            &Qwen2LoadOptions { dequantize: options.dequantize, max_context: options.max_context },
        )?;

        let mut stop_ids = Vec::new();
        for token in [chat::IM_END, chat::END_OF_TEXT] {
            if let Some(id) = tokenizer.token_to_id(token) {
                stop_ids.push(id);
            }
        }
        if stop_ids.is_empty() {
            return Err(LlmError::Load {
                path: gguf.to_path_buf(),
                reason: format!(
                    "the tokenizer has neither {} nor {}: not a ChatML model",
                    chat::IM_END,
                    chat::END_OF_TEXT
                ),
            });
        }
        let vocab = weights.config().vocab_size;
        if tokenizer.get_vocab_size(true) > vocab {
            return Err(LlmError::Load {
                path: gguf.to_path_buf(),
                reason: format!(
                    "the tokenizer has {} tokens but the model only {vocab}: wrong tokenizer.json?",
                    tokenizer.get_vocab_size(true)
                ),
            });
        }

        let stem = gguf.file_stem().map(|s| s.to_string_lossy().into_owned());
        let name = format!("candle:{}", stem.unwrap_or_else(|| "qwen2".into()));
        tracing::info!(
            name,
            load_ms = started.elapsed().as_millis() as u64,
            dequantize = options.dequantize,
            max_context = weights.max_context(),
            "language model loaded"
        );
        Ok(Self { shared: Arc::new(Shared { name, weights, tokenizer, stop_ids }) })
    }

    /// The most tokens a session may hold.
    pub fn max_context(&self) -> usize {
        self.shared.weights.max_context()
    }

    /// Number of tokens `messages` render to, so the agent can trim a conversation
    /// before it hits [`LlmError::ContextFull`].
    pub fn count_tokens(&self, messages: &[ChatMessage]) -> Result<usize, LlmError> {
        Ok(encode(&self.shared.tokenizer, &chat::render_prompt(messages))?.len())
    }

    /// A session with its concrete type, for callers (benchmarks, tests) that want
    /// more than the [`LlmSession`] trait.
    pub fn session(&self) -> CandleSession {
        CandleSession {
            cache: self.shared.weights.new_cache(),
            cached_ids: Vec::new(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl LlmEngine for CandleEngine {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(self.session())
    }
}

/// One call's conversation state: its KV cache and the token ids the cache holds.
pub struct CandleSession {
    shared: Arc<Shared>,
    cache: KvCache,
    /// Exactly the tokens whose keys and values are in `cache`, in order.
    cached_ids: Vec<u32>,
}

impl CandleSession {
    /// Number of tokens in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cached_ids.len()
    }

    /// Drops the KV cache and frees its memory (an idle call, or a reset).
    pub fn clear(&mut self) {
        self.cache.clear();
        self.cached_ids.clear();
    }

    /// Makes the cache hold a prefix of `ids` and returns the logits after the last of
    /// them, running only what is not cached. Returns `(logits, reused)` where
    /// `reused` counts the cached tokens kept.
    fn prefill(&mut self, ids: &[u32]) -> Result<(candle_core::Tensor, usize), LlmError> {
        let common = self.cached_ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // At least one token must run so that logits exist.
        let keep = common.min(ids.len().saturating_sub(1));
        self.cache.truncate(keep);
        self.cached_ids.truncate(keep);
        let new = &ids[keep..];
        match self.shared.weights.forward(new, &mut self.cache) {
            Ok(logits) => {
                self.cached_ids.extend_from_slice(new);
                Ok((logits, keep))
            }
            Err(e) => {
                // The cache still holds `keep` valid positions, but start clean anyway.
                self.clear();
                Err(e)
            }
        }
    }
}

/// Tokenizes a rendered prompt; special tokens in the text (`<|im_start|>`) are
/// matched as single tokens.
fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, LlmError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| LlmError::Tokenizer(format!("cannot tokenize the prompt: {e}")))
}

fn sampler(options: &GenerateOptions) -> LogitsProcessor {
    let sampling = if options.temperature <= 0.0 || !options.temperature.is_finite() {
        Sampling::ArgMax
    } else if options.top_p > 0.0 && options.top_p < 1.0 {
        Sampling::TopP { p: options.top_p, temperature: options.temperature }
    } else {
        Sampling::All { temperature: options.temperature }
    };
    LogitsProcessor::from_sampling(options.seed, sampling)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

impl LlmSession for CandleSession {
    fn generate(
        &mut self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, LlmError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "llm.generate",
            engine = %self.shared.name,
            messages = messages.len(),
            prompt_tokens = tracing::field::Empty,
            cached_tokens = tracing::field::Empty,
            prefill_ms = tracing::field::Empty,
            generated_tokens = tracing::field::Empty,
            finish = tracing::field::Empty,
        );
        let _enter = span.enter();
        let shared = Arc::clone(&self.shared);
        let max_context = shared.weights.max_context();

        let prompt = chat::render_prompt(messages);
        let ids = encode(&shared.tokenizer, &prompt)?;
        if ids.len() >= max_context {
            return Err(LlmError::ContextFull { tokens: ids.len(), limit: max_context });
        }

        let (mut logits, cached_tokens) = self.prefill(&ids)?;
        let prefill_ms = ms_since(started);
        span.record("prompt_tokens", ids.len());
        span.record("cached_tokens", cached_tokens);
        span.record("prefill_ms", prefill_ms);

        let mut stats = GenerationStats {
            prompt_tokens: ids.len(),
            cached_tokens,
            prefill_ms,
            ..GenerationStats::default()
        };
        let mut sampler = sampler(options);
        let mut stream = TextStream::new(&shared.tokenizer);
        let mut first_text_ms = None;
        let finish = loop {
            if stats.generated_tokens >= options.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&logits).context("sampling")?;
            if shared.stop_ids.contains(&next) {
                break FinishReason::Stop;
            }
            stats.generated_tokens += 1;
            if let Some(text) = stream.push(next)? {
                first_text_ms.get_or_insert_with(|| ms_since(started));
                if on_text(&text).is_break() {
                    break FinishReason::Cancelled;
                }
            }
            if stats.generated_tokens >= options.max_tokens || self.cached_ids.len() >= max_context {
                break FinishReason::Length;
            }
            logits = match shared.weights.forward(&[next], &mut self.cache) {
                Ok(logits) => logits,
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            };
            self.cached_ids.push(next);
        };
        if finish != FinishReason::Cancelled
            && let Some(text) = stream.flush()?
        {
            first_text_ms.get_or_insert_with(|| ms_since(started));
            // Generation is over; a Break here has nothing left to stop.
            let _ = on_text(&text);
        }

        stats.finish = finish;
        stats.total_ms = ms_since(started);
        stats.first_token_ms = first_text_ms.unwrap_or(stats.total_ms);
        span.record("generated_tokens", stats.generated_tokens);
        span.record("finish", tracing::field::debug(finish));
        tracing::debug!(
            prompt_tokens = stats.prompt_tokens,
            cached_tokens = stats.cached_tokens,
            prefill_ms = stats.prefill_ms,
            first_token_ms = stats.first_token_ms,
            generated_tokens = stats.generated_tokens,
            total_ms = stats.total_ms,
            "generation finished"
        );
        Ok(stats)
    }
}
