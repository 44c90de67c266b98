//! The embedded engine: Qwen2 GGUF weights on candle, one KV cache per session, all
//! of an engine's caches under one memory budget ([`crate::kv_budget`]).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::kv_budget::{KvBudget, KvCacheStats, SessionId};
use crate::qwen2::{KvCache, ModelContext, Qwen2LoadOptions, Qwen2Weights};
use crate::tokenizer::{TextStream, load_tokenizer, tokenizer_from_json, tokenizer_json_from_gguf};
use crate::grammar::{CallMatcher, ToolCallGrammar};
use crate::toolcall::ToolCallFilter;
use crate::{
    ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession,
    ToolSpec, chat,
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
    /// Dequantize the weights to f32 at load, for comparison only: it reads four times
    /// the bytes per decoded token and holds about 1.9 GB for the 0.5B model. Off,
    /// matrices stay quantized, in formats with a SIMD kernel ([`crate::requant`]).
    pub dequantize: bool,
    /// Most tokens a session may hold (prompt plus reply); a longer conversation
    /// fails with [`LlmError::ContextFull`]. Each session's KV cache grows up to this
    /// (24 KB per token for the 0.5B model: 100 MB at 4096).
    pub max_context: usize,
    /// Where to run.
    pub device: LlmDevice,
    /// Bytes all the sessions' KV caches may hold together, so many calls cannot
    /// exhaust memory: past it, the least recently used idle sessions lose their
    /// cache (their next turn prefills the whole prompt again); a generating session
    /// is never evicted. The shared system-prompt caches count against it too, within
    /// an eighth of it (see [`crate::kv_budget`]).
    pub kv_budget_bytes: usize,
    /// Prefills of at least this many new tokens run on dequantized weights with a
    /// dense GEMM ([`crate::qwen2::Qwen2LoadOptions::dense_prefill_min_tokens`]).
    pub dense_prefill_min_tokens: usize,
    /// Keep each session's KV cache between generations and share system-prompt
    /// caches between sessions. Off, every generation prefills its whole prompt from
    /// an empty cache: only for measuring what reuse saves.
    pub kv_reuse: bool,
    /// Constrain tool calls with a grammar ([`crate::grammar`]): once the model opens
    /// a call it can only name an offered tool and write arguments valid against the
    /// tool's schema, with ids narrowed to known ones ([`crate::known_ids`]). Off,
    /// calls are sampled freely and parsed after (for comparison only).
    pub constrain_tool_calls: bool,
    /// Keep the file's Q5_0 matrices as stored instead of converting them to Q8_0
    /// ([`crate::qwen2::Qwen2LoadOptions::keep_q5_0`]): about 90 MB less for the 0.5B
    /// model, decoding a few percent slower on an arithmetic-bound CPU.
    pub keep_q5_0: bool,
}

/// Default for [`CandleOptions::kv_budget_bytes`]: 1 GiB, about ten full 4096-token
/// conversations of the 0.5B model.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 1 << 30;

impl Default for CandleOptions {
    fn default() -> Self {
        Self {
            dequantize: false,
            max_context: 4096,
            device: LlmDevice::Cpu,
            kv_budget_bytes: DEFAULT_KV_BUDGET_BYTES,
            dense_prefill_min_tokens: crate::qwen2::DEFAULT_DENSE_PREFILL_MIN_TOKENS,
            kv_reuse: true,
            constrain_tool_calls: true,
            keep_q5_0: false,
        }
    }
}

/// What every session of one engine shares: read-only, except the list of shared
/// system-prompt prefixes.
struct Shared {
    name: String,
    weights: Qwen2Weights,
    tokenizer: Tokenizer,
    /// Token ids that end the assistant's turn.
    stop_ids: Vec<u32>,
    /// `<|im_end|>`, which closes the system message: the prompt up to it is the
    /// part that calls with the same system prompt share.
    im_end: Option<u32>,
    /// The KV caches of the last few system prompts prefilled by any session, most
    /// recent first, so a new call with one of those system prompts starts with it
    /// instead of prefilling it (the first turn, and the greeting, get faster).
    system_prefixes: Mutex<Vec<Arc<PrefixSnapshot>>>,
    /// Every session's KV cache while idle, under one byte limit.
    budget: KvBudget<SessionKv>,
    /// [`CandleOptions::kv_reuse`].
    kv_reuse: bool,
    /// The tool-call grammar, when calls are constrained and the model has tags.
    grammar: Option<ToolCallGrammar>,
}

/// How many distinct system prompts keep a shared KV prefix (a server usually has one
/// or a few; each costs about 24 KB per token for the 0.5B model). They are also
/// bounded in bytes by [`KvBudget::prefix_limit`], and count against the budget.
const SYSTEM_PREFIXES_KEPT: usize = 4;

/// A prompt prefix and its keys and values.
struct PrefixSnapshot {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Shared {
    /// Length of the system message in `ids`, through its `<|im_end|>`.
    fn system_prefix_len(&self, ids: &[u32]) -> Option<usize> {
        let im_end = self.im_end?;
        ids.iter().position(|&id| id == im_end).map(|i| i + 1)
    }

    fn prefixes(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PrefixSnapshot>>> {
        // The list is always valid, even if a holder panicked.
        self.system_prefixes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stored system prefix that `ids` starts with, if any.
    fn snapshot_for(&self, ids: &[u32]) -> Option<Arc<PrefixSnapshot>> {
        self.prefixes()
            .iter()
            .find(|s| ids.starts_with(&s.ids))
            .cloned()
    }

    /// Whether `ids` (a system prefix) is stored.
    fn has_snapshot(&self, ids: &[u32]) -> bool {
        self.prefixes().iter().any(|s| s.ids == ids)
    }

    /// Stores a system prefix as the most recent one, keeping the newest that fit in
    /// their count and byte bounds, and tells the budget what they take.
    fn store_snapshot(&self, snapshot: PrefixSnapshot) {
        let mut prefixes = self.prefixes();
        prefixes.retain(|s| s.ids != snapshot.ids);
        prefixes.insert(0, Arc::new(snapshot));
        prefixes.truncate(SYSTEM_PREFIXES_KEPT);
        // Newest first, each kept if it still fits: one too large for the bound is
        // not shared, and does not push out the others.
        let bound = self.budget.prefix_limit();
        let mut total = 0usize;
        prefixes.retain(|s| {
            let bytes = s.cache.bytes();
            let fits = total + bytes <= bound;
            if fits {
                total += bytes;
            } else {
                tracing::debug!(bytes, bound, "a system prompt's KV cache is over its bound; not shared");
            }
            fits
        });
        // Under the list's lock, so concurrent stores report in order (the budget
        // never takes this lock: no deadlock).
        self.budget.set_prefix_bytes(total);
    }
}

/// The embedded language model: Qwen2-architecture GGUF weights run by candle.
///
/// Loaded once per process (the weights are the large part); each call opens a
/// session with [`LlmEngine::new_session`], which owns only its KV cache, so sessions
/// run concurrently on different threads (they only take the budget's lock briefly,
/// to check their cache out before a generation and back in after).
#[derive(Clone)]
pub struct CandleEngine {
    shared: Arc<Shared>,
}

impl CandleEngine {
    /// Loads the GGUF weights and the `tokenizer.json` written by the setup step.
    pub fn load(
        gguf: &Path,
        tokenizer_json: &Path,
        options: CandleOptions,
    ) -> Result<Self, LlmError> {
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

    fn with_tokenizer(
        gguf: &Path,
        tokenizer: Tokenizer,
        options: CandleOptions,
    ) -> Result<Self, LlmError> {
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
            &Qwen2LoadOptions {
                dequantize: options.dequantize,
                max_context: options.max_context,
                dense_prefill_min_tokens: options.dense_prefill_min_tokens,
                keep_q5_0: options.keep_q5_0,
                ..Qwen2LoadOptions::default()
            },
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
            simd = crate::cpu::simd_path(),
            threads = crate::cpu::model_threads(),
            weights = %weights.summary(),
            dequantize = options.dequantize,
            max_context = weights.max_context(),
            kv_budget_bytes = options.kv_budget_bytes,
            kv_reuse = options.kv_reuse,
            "language model loaded"
        );
        let im_end = tokenizer.token_to_id(chat::IM_END);
        let grammar = if options.constrain_tool_calls {
            let t = Instant::now();
            let grammar = ToolCallGrammar::new(&tokenizer, vocab, stop_ids[0])?;
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "tool-call grammar ready");
            grammar
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                name,
                weights,
                tokenizer,
                stop_ids,
                im_end,
                system_prefixes: Mutex::new(Vec::new()),
                budget: KvBudget::new(options.kv_budget_bytes),
                kv_reuse: options.kv_reuse,
                grammar,
            }),
        })
    }

    /// The most tokens a session may hold.
    pub fn max_context(&self) -> usize {
        self.shared.weights.max_context()
    }

    /// Number of tokens `messages` render to, so the agent can trim a conversation
    /// before it hits [`LlmError::ContextFull`].
    pub fn count_tokens(&self, messages: &[ChatMessage]) -> Result<usize, LlmError> {
        self.count_tokens_with_tools(messages, &[])
    }

    /// Like [`CandleEngine::count_tokens`] for a generation offered `tools` (their
    /// schemas are part of the prompt, often a few hundred tokens).
    pub fn count_tokens_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<usize, LlmError> {
        Ok(encode(
            &self.shared.tokenizer,
            &chat::render_prompt_with_tools(messages, tools),
        )?
        .len())
    }

    /// A session with its concrete type, for callers (benchmarks, tests) that want
    /// more than the [`LlmSession`] trait.
    pub fn session(&self) -> CandleSession {
        CandleSession {
            id: self.shared.budget.register(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// What the sessions' KV caches hold against their budget (bytes in use, cached
    /// sessions, evictions), for the server's metrics.
    pub fn kv_stats(&self) -> KvCacheStats {
        self.shared.budget.stats()
    }
}

impl LlmEngine for CandleEngine {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(self.session())
    }

    fn kv_cache_stats(&self) -> Option<KvCacheStats> {
        Some(self.kv_stats())
    }
}

/// One call's conversation state: its KV cache and the token ids the cache holds,
/// kept in the engine's [`KvBudget`] between generations (so it may be evicted while
/// the call is idle; the next turn then prefills the whole prompt).
///
/// With tools in [`GenerateOptions::tools`], the prompt carries Qwen's tools section
/// and the reply runs through [`ToolCallFilter`]: `on_text` gets only speech (an empty
/// piece while a possible call is held, so a barge-in can still stop it) and the calls
/// come back in [`GenerationStats::tool_calls`], each with a fresh `call_…` id.
pub struct CandleSession {
    shared: Arc<Shared>,
    /// This session's place in the budget.
    id: SessionId,
}

impl CandleSession {
    /// Number of tokens in the KV cache (0 once evicted).
    pub fn cached_len(&self) -> usize {
        self.shared
            .budget
            .peek(self.id, |kv| kv.ids.len())
            .unwrap_or(0)
    }

    /// Drops the KV cache and frees its memory (an idle call, or a reset).
    pub fn clear(&mut self) {
        self.shared.budget.remove(self.id);
    }
}

impl Drop for CandleSession {
    fn drop(&mut self) {
        self.shared.budget.remove(self.id);
    }
}

/// A KV cache and exactly the tokens whose keys and values it holds, in order.
struct SessionKv {
    cache: KvCache,
    ids: Vec<u32>,
    /// The logits after exactly `ids`, when known: a reply whose prompt is what a
    /// speculative prefill already ran starts sampling at once, instead of running
    /// the last token again (one forward pass, about 25 ms) to get them back.
    last_logits: Option<candle_core::Tensor>,
}

impl SessionKv {
    fn empty(shared: &Shared) -> Self {
        Self {
            cache: shared.weights.new_cache(),
            ids: Vec::new(),
            last_logits: None,
        }
    }

    /// Drops the cache's contents and frees its buffers.
    fn clear(&mut self) {
        self.cache.clear();
        self.ids.clear();
        self.last_logits = None;
    }

    /// Makes the cache hold a prefix of `ids` and returns the logits after the last of
    /// them, running only what is not cached. Returns `(logits, reused)` where
    /// `reused` counts the cached tokens kept.
    fn prefill(
        &mut self,
        shared: &Shared,
        ids: &[u32],
    ) -> Result<(candle_core::Tensor, usize), LlmError> {
        let mut common = self
            .ids
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        if common == ids.len()
            && self.ids.len() == ids.len()
            && let Some(logits) = &self.last_logits
        {
            return Ok((logits.clone(), common));
        }
        self.last_logits = None;
        // Without reuse, shared system prefixes are neither used nor stored.
        let system_len = shared
            .kv_reuse
            .then(|| shared.system_prefix_len(ids))
            .flatten();
        if let Some(system_len) = system_len
            && common < system_len
            && let Some(snapshot) = shared.snapshot_for(&ids[..system_len])
            && snapshot.ids.len() > common
        {
            self.cache = snapshot.cache.copy_prefix(snapshot.ids.len())?;
            self.ids = snapshot.ids.clone();
            common = snapshot.ids.len();
            tracing::debug!(tokens = common, "reused the shared system-prompt KV cache");
        }
        // At least one token must run so that logits exist.
        let keep = common.min(ids.len().saturating_sub(1));
        self.cache.truncate(keep);
        self.ids.truncate(keep);
        let new = &ids[keep..];
        match shared.weights.forward(new, &mut self.cache) {
            Ok(logits) => {
                self.ids.extend_from_slice(new);
                self.last_logits = Some(logits.clone());
                if let Some(system_len) = system_len
                    && keep < system_len
                    && !shared.has_snapshot(&ids[..system_len])
                {
                    let cache = self.cache.copy_prefix(system_len)?;
                    shared.store_snapshot(PrefixSnapshot {
                        ids: ids[..system_len].to_vec(),
                        cache,
                    });
                }
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

/// A session's cache checked out of the budget for one generation (the session is
/// busy, so never evicted), checked back in with its size however the generation
/// ends; dropped instead when reuse is off.
struct Checkout<'a> {
    shared: &'a Shared,
    id: SessionId,
    kv: SessionKv,
}

impl<'a> Checkout<'a> {
    fn new(shared: &'a Shared, id: SessionId) -> Self {
        let kv = shared
            .budget
            .checkout(id)
            .unwrap_or_else(|| SessionKv::empty(shared));
        Self { shared, id, kv }
    }

    /// Tells the budget the cache's size after it grew, so it makes room now.
    fn report_size(&self) {
        self.shared.budget.resize(self.id, self.kv.cache.bytes());
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if !self.shared.kv_reuse {
            self.shared.budget.remove(self.id);
            return;
        }
        let kv = std::mem::replace(&mut self.kv, SessionKv::empty(self.shared));
        let bytes = kv.cache.bytes();
        self.shared.budget.checkin(self.id, kv, bytes);
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
        Sampling::TopP {
            p: options.top_p,
            temperature: options.temperature,
        }
    } else {
        Sampling::All {
            temperature: options.temperature,
        }
    };
    LogitsProcessor::from_sampling(options.seed, sampling)
}

/// One generation's tool-call constraint: which tools may be called, and the
/// grammar of the call being written.
struct CallConstraint<'a> {
    grammar: &'a ToolCallGrammar,
    callable: Vec<ToolSpec>,
    call: Option<CallMatcher>,
    /// The first token must open a call (`tool_choice` required or a function).
    must_call: bool,
    /// A brace the model starts becomes `<tool_call>` ([`ToolCallGrammar::mask_speech`]).
    redirect: bool,
}

impl<'a> CallConstraint<'a> {
    fn new(grammar: &'a ToolCallGrammar, callable: Vec<ToolSpec>, must_call: bool, redirect: bool) -> Self {
        let must_call = must_call && !callable.is_empty();
        Self { grammar, callable, call: None, must_call, redirect }
    }

    /// The logits with what may not come next masked: inside a call, whatever the
    /// grammar forbids; outside one, what speech never needs (an untagged call's
    /// braces), and `<tool_call>` when no tool can be called.
    fn mask(&mut self, logits: Tensor) -> Result<Tensor, LlmError> {
        let mut values = logits.to_dtype(DType::F32).and_then(|l| l.flatten_all()).and_then(|l| l.to_vec1::<f32>()).context("masking the logits")?;
        match &mut self.call {
            Some(call) => {
                if let Err(e) = call.mask(&mut values) {
                    // A grammar failure must not cost the caller the reply: the rest
                    // of the call is sampled freely and parsed as before.
                    tracing::warn!(error = %e, "tool-call grammar failed; sampling this call unconstrained");
                    self.call = None;
                    return Ok(logits);
                }
            }
            None if self.must_call => {
                let open = self.grammar.open_token() as usize;
                for (id, v) in values.iter_mut().enumerate() {
                    if id != open {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            None => self.grammar.mask_speech(&mut values, !self.callable.is_empty(), self.redirect),
        }
        let n = values.len();
        Tensor::from_vec(values, n, logits.device()).context("masking the logits")
    }

    /// Follows the sampled token: `<tool_call>` starts a call's grammar, and the
    /// grammar ends with the call.
    fn advance(&mut self, token: u32) {
        self.must_call = false;
        match &mut self.call {
            Some(call) => match call.advance(token) {
                Ok(false) => {}
                Ok(true) => self.call = None,
                Err(e) => {
                    tracing::warn!(error = %e, "tool-call grammar failed; sampling this call unconstrained");
                    self.call = None;
                }
            },
            None if token == self.grammar.open_token() && !self.callable.is_empty() => match self.grammar.matcher(&self.callable) {
                Ok(call) => self.call = Some(call),
                Err(e) => tracing::warn!(error = %e, "cannot build the tool-call grammar; sampling this call unconstrained"),
            },
            None => {}
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

impl LlmSession for CandleSession {
    fn prefill(&mut self, messages: &[ChatMessage], options: &GenerateOptions) -> Result<Option<usize>, LlmError> {
        let options = GenerateOptions {
            max_tokens: 0,
            ..options.clone()
        };
        let stats = self.generate(messages, &options, &mut |_| ControlFlow::Break(()))?;
        Ok(Some(stats.prompt_tokens))
    }

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

        let prompt = chat::render_prompt_with_tools(messages, &options.tools);
        let ids = encode(&shared.tokenizer, &prompt)?;
        if ids.len() >= max_context {
            return Err(LlmError::ContextFull {
                tokens: ids.len(),
                limit: max_context,
            });
        }

        let mut kv = Checkout::new(&shared, self.id);
        let prefill_started = Instant::now();
        let (mut logits, cached_tokens) = kv.kv.prefill(&shared, &ids)?;
        let prefill_ms = ms_since(prefill_started);
        kv.report_size();
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
        let mut reply_ids: Vec<u32> = Vec::new();
        // With tools, the reply goes through the tool-call filter: calls are collected,
        // only speech reaches `on_text`.
        let mut filter = (!options.tools.is_empty()).then(|| {
            ToolCallFilter::new(options.tools.iter().map(|t| t.name.clone()).collect())
        });
        // With a grammar, the tools as they may be called now (ids narrowed to known
        // ones) and the call being written, if any. Also with no tool offered when
        // the conversation holds earlier calls or results: the small model otherwise
        // writes one more in JSON (a voice call whose tools were turned off spoke
        // nothing); masked, it speaks. Plain chat without either is left free.
        let holds_calls = messages.iter().any(|m| m.role == crate::Role::Tool || !m.tool_calls.is_empty());
        let mut constraint = match &shared.grammar {
            Some(grammar) if !options.tools.is_empty() || holds_calls => {
                let must_call = matches!(options.tool_choice, crate::ToolChoice::Required | crate::ToolChoice::RequiredNamed | crate::ToolChoice::Function(_));
                // Right after a tool result the model should speak, not start a call
                // with a brace (it would be echoing the result).
                let after_tool = messages.iter().rev().find(|m| m.role != crate::Role::System).is_some_and(|m| m.role == crate::Role::Tool);
                Some(CallConstraint::new(grammar, crate::known_ids::callable(options, messages), must_call, !after_tool))
            }
            _ => None,
        };
        let finish = loop {
            if stats.generated_tokens >= options.max_tokens {
                break FinishReason::Length;
            }
            if options.repeat_penalty != 1.0 && !reply_ids.is_empty() {
                let recent = &reply_ids[reply_ids.len().saturating_sub(options.repeat_last_n)..];
                logits = candle_transformers::utils::apply_repeat_penalty(&logits, options.repeat_penalty, recent)
                    .context("repeat penalty")?;
            }
            if let Some(constraint) = &mut constraint {
                logits = constraint.mask(logits)?;
            }
            let next = sampler.sample(&logits).context("sampling")?;
            if let Some(constraint) = &mut constraint {
                constraint.advance(next);
            }
            reply_ids.push(next);
            if shared.stop_ids.contains(&next) {
                break FinishReason::Stop;
            }
            stats.generated_tokens += 1;
            if let Some(text) = stream.push(next)? {
                first_text_ms.get_or_insert_with(|| ms_since(started));
                // While a possible call is held the speech is empty; `on_text` still
                // gets it, so a barge-in can stop a reply that is all tool call.
                let speech = match &mut filter {
                    Some(filter) => filter.push(&text),
                    None => text,
                };
                if on_text(&speech).is_break() {
                    break FinishReason::Cancelled;
                }
            }
            if stats.generated_tokens >= options.max_tokens || kv.kv.ids.len() >= max_context {
                break FinishReason::Length;
            }
            logits = match shared.weights.forward(&[next], &mut kv.kv.cache) {
                Ok(logits) => logits,
                Err(e) => {
                    kv.kv.clear();
                    return Err(e);
                }
            };
            kv.kv.ids.push(next);
            kv.kv.last_logits = Some(logits.clone());
        };
        if finish != FinishReason::Cancelled {
            let mut rest = match stream.flush()? {
                Some(text) => {
                    first_text_ms.get_or_insert_with(|| ms_since(started));
                    match &mut filter {
                        Some(filter) => filter.push(&text),
                        None => text,
                    }
                }
                None => String::new(),
            };
            if let Some(filter) = &mut filter {
                let (speech, calls) = filter.finish();
                rest.push_str(&speech);
                stats.tool_calls = calls.into_iter().map(|c| c.into_tool_call()).collect();
            }
            if !rest.is_empty() {
                // Generation is over; a Break here has nothing left to stop.
                let _ = on_text(&rest);
            }
        } else if let Some(filter) = &mut filter {
            // Cancelled: only calls the model finished count; held text is dropped.
            stats.tool_calls = filter
                .take_calls()
                .into_iter()
                .map(|c| c.into_tool_call())
                .collect();
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
            tool_calls = stats.tool_calls.len(),
            "generation finished"
        );
        Ok(stats)
    }
}
