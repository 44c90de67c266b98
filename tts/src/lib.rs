//! Speech synthesis for Parley.
//!
//! One trait, [`Synthesizer`], that turns one phrase of text into audio, and the
//! Piper engine behind it (VITS voices run with ONNX Runtime, phonemes from
//! espeak-ng). [`chunker`] cuts a stream of LLM tokens into speakable phrases so
//! synthesis starts on the first phrase instead of waiting for the whole reply.

use std::path::PathBuf;

/// Everything that can go wrong turning text into speech.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// The voice model, its config or the ONNX runtime library could not be loaded.
    #[error("cannot load the voice {path}: {reason} (run `parley models install` to fetch it)")]
    Load { path: PathBuf, reason: String },
    /// espeak-ng could not turn the text into phonemes.
    #[error("phonemization failed: {0}")]
    Phonemize(String),
    /// The voice model failed to run.
    #[error("synthesis failed: {0}")]
    Synthesis(String),
}

/// A text-to-speech engine shared by all calls.
///
/// Blocking: run it on a dedicated thread or `spawn_blocking`.
pub trait Synthesizer: Send + Sync {
    /// The sample rate of the audio [`Synthesizer::synthesize`] returns.
    fn sample_rate(&self) -> u32;
    /// Synthesizes one phrase into mono samples in [-1, 1] at `sample_rate()`.
    fn synthesize(&self, text: &str) -> Result<Vec<f32>, TtsError>;
}
