//! The models every call shares.

use std::sync::Arc;

use parley_asr::Transcriber;
use parley_llm::LlmEngine;
use parley_tts::Synthesizer;

use crate::tools::ToolRegistry;

/// The process-wide models: loaded once at start-up, shared by all calls, so a
/// call's own state stays small (its KV cache, its audio buffers).
#[derive(Clone)]
pub struct Engines {
    /// Speech-to-text for the caller's turns.
    pub transcriber: Arc<dyn Transcriber>,
    /// The language model that writes the agent's replies.
    pub llm: Arc<dyn LlmEngine>,
    /// The agent's voice.
    pub tts: Arc<dyn Synthesizer>,
    /// Tools the server runs itself (built-in and HTTP), offered to every call.
    pub tools: ToolRegistry,
}
