//! Language models for Parley.
//!
//! The agent talks to a model through two traits: an [`LlmEngine`] is loaded once and
//! shared by every call; each call opens its own [`LlmSession`], which keeps that
//! call's KV cache between turns so turn N only prefills the tokens that are new
//! since turn N-1 (the conversation is re-rendered every turn and compared token by
//! token with what the cache already holds).
//!
//! The embedded engine runs Qwen2-architecture GGUF models with candle on the CPU
//! (CUDA with the `cuda` feature).
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use std::path::Path;
//! use parley_llm::{CandleEngine, CandleOptions, ChatMessage, GenerateOptions, LlmEngine, Role};
//!
//! # fn main() -> Result<(), parley_llm::LlmError> {
//! let dir = Path::new("/root/.cache/parley/models/llm");
//! let engine = CandleEngine::load(
//!     &dir.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
//!     &dir.join("qwen2.5-coder-0.5b-instruct.tokenizer.json"),
//!     CandleOptions::default(),
//! )?;
//! let mut session = engine.new_session(); // one per call; keeps the call's KV cache
//! let mut conversation = vec![ChatMessage::new(Role::User, "What is the capital of France?")];
//! let mut reply = String::new();
//! let stats = session.generate(&conversation, &GenerateOptions::default(), &mut |piece| {
//!     reply.push_str(piece); // stream to the text chunker / TTS here
//!     ControlFlow::Continue(()) // Break on barge-in
//! })?;
//! conversation.push(ChatMessage::new(Role::Assistant, reply));
//! // The next turn re-sends the whole conversation; only the new tokens are prefilled.
//! # let _ = stats;
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`chat`] renders the ChatML prompt, [`tokenizer`] builds the tokenizer from
//! the GGUF metadata and streams text out of token ids, [`qwen2`] is the forward pass
//! with shared weights and a per-session KV cache, [`kv_budget`] keeps every session's
//! cache under one memory budget, [`engine`] ties them into
//! [`LlmEngine`] / [`LlmSession`], [`toolcall`] finds the tool calls in a streamed reply
//! (tagged or not) so they are run, not spoken.

use std::ops::ControlFlow;
use std::path::PathBuf;

pub mod attention;
pub mod chat;
pub mod cpu;
pub mod engine;
pub mod grammar;
pub mod known_ids;
pub mod kv_budget;
pub mod pool;
pub mod q8;
pub mod qwen2;
pub mod requant;
pub mod remote;
pub mod tokenizer;
pub mod toolcall;

/// Deterministic pseudo-random inputs for the kernels' unit tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// `n` values in `[-1, 1)` from a 64-bit LCG seeded with `seed`.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

pub use engine::{CandleEngine, CandleOptions, CandleSession, LlmDevice};
pub use kv_budget::KvCacheStats;

/// Everything that can go wrong running a language model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The GGUF weights or the tokenizer could not be loaded.
    #[error("cannot load the language model {path}: {reason} (run `parley models install` to fetch it)")]
    Load { path: PathBuf, reason: String },
    /// The tokenizer failed on this text.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The model failed while running.
    #[error("model error: {0}")]
    Model(String),
    /// The conversation no longer fits in the model's context window.
    #[error("the conversation is {tokens} tokens, over the model's context of {limit}")]
    ContextFull { tokens: usize, limit: usize },
    /// No model can take the request now (every remote replica is down); the caller
    /// should hear an apology and may try again.
    #[error("{0}")]
    Unavailable(String),
}

/// Who said a message in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// A tool the model may call: a name, what it is for, and its JSON-schema parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// A JSON schema (`{"type": "object", "properties": {...}, "required": [...]}`).
    pub parameters: serde_json::Value,
}

/// A call the model asked for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// Unique within the conversation (`call_…`), so a result can name its call.
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (an object when it wrote valid JSON).
    pub arguments: serde_json::Value,
}

/// One message of a conversation, as the model sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// Assistant messages: the tool calls it made (its `content` may be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tool messages: the id of the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// An assistant message that calls tools.
    pub fn tool_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self { role: Role::Assistant, content: content.into(), tool_calls: calls, tool_call_id: None }
    }

    /// The result of a tool call.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: Role::Tool, content: content.into(), tool_calls: Vec::new(), tool_call_id: Some(call_id.into()) }
    }
}

/// Sampling and length settings for one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling cut-off, used when `temperature > 0`.
    pub top_p: f64,
    /// Seed for sampling, so a run can be repeated.
    pub seed: u64,
    /// Penalty on tokens already generated in this reply (1.0 = off): small models
    /// decoding greedily otherwise fall into loops ("her son's son's son…").
    pub repeat_penalty: f32,
    /// How many of the reply's most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Tools the model may call in this generation; empty means plain chat.
    pub tools: Vec<ToolSpec>,
    /// Whether the model may, must or must not call one of [`Self::tools`]. The tools
    /// stay in the prompt either way (so its cache is kept); the choice is enforced
    /// by the embedded engine's grammar and passed to remote replicas.
    pub tool_choice: ToolChoice,
}

/// OpenAI's `tool_choice`: what the model may do with the tools offered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Speak or call, as the model decides.
    #[default]
    Auto,
    /// Only speak (a reply after the last tool round a response allows).
    None,
    /// Call one of the tools before anything else.
    Required,
    /// Call this tool before anything else.
    Function(String),
    /// Call, before anything else, a tool about a record the caller's last words
    /// name: the known-id parameters ([`known_ids::KNOWN`]) take only the ids said
    /// there, and tools whose required ids were not said there are not callable.
    /// "Which medication is in order ORD006?" then cannot become a look-up of a
    /// prescription seen earlier (the 1.5B model did that when any call was
    /// required; eval).
    RequiredNamed,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 0.9, seed: 299_792_458, repeat_penalty: 1.15, repeat_last_n: 64, tools: Vec::new(), tool_choice: ToolChoice::Auto }
    }
}

/// What one generation cost, for latency reports and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: usize,
    /// Of those, how many were already in the session's KV cache.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Milliseconds spent prefilling the uncached prompt tokens.
    pub prefill_ms: f64,
    /// Milliseconds from the call to the first generated text.
    pub first_token_ms: f64,
    /// Milliseconds for the whole call.
    pub total_ms: f64,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Tool calls found in the reply (tagged or not); their text was not passed to
    /// `on_text`, so it is never spoken.
    pub tool_calls: Vec<ToolCall>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced its end-of-turn token.
    #[default]
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The caller's token callback asked to stop (barge-in, cancel).
    Cancelled,
}

/// A language model loaded once and shared by every call.
pub trait LlmEngine: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;
    /// Opens a session for one call; it holds that call's KV cache.
    fn new_session(&self) -> Box<dyn LlmSession>;
    /// How much memory this process's KV caches hold against their budget, for
    /// metrics; `None` for engines whose caches live elsewhere (remote replicas).
    fn kv_cache_stats(&self) -> Option<KvCacheStats> {
        None
    }
}

/// One call's conversation with the model. Blocking: run on a dedicated thread or
/// `spawn_blocking`.
pub trait LlmSession: Send {
    /// Generates the assistant's next message for `messages` (the whole conversation
    /// so far, system prompt first), calling `on_text` with each piece of decoded
    /// text as soon as it is known. Returning `ControlFlow::Break` from `on_text`
    /// stops generation (finish reason `Cancelled`). The KV cache keeps the longest
    /// token prefix shared with the previous call, so only new tokens are prefilled.
    fn generate(
        &mut self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, LlmError>;

    /// Reads `messages` into the session's cache without generating, so a
    /// [`generate`](Self::generate) with the same prompt soon after only has to
    /// decode (the agent calls it while it waits to be sure the caller has finished).
    /// Returns the prompt's token count, or `None` where the engine keeps no cache of
    /// its own (remote replicas), which do nothing.
    fn prefill(&mut self, messages: &[ChatMessage], options: &GenerateOptions) -> Result<Option<usize>, LlmError> {
        let _ = (messages, options);
        Ok(None)
    }
}
