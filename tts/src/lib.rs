//! Speech synthesis for Parley.
//!
//! One trait, [`Synthesizer`], that turns one phrase of text into audio, and the
//! Piper engine behind it (VITS voices run with ONNX Runtime, phonemes from
//! espeak-ng). [`chunker`] cuts a stream of LLM tokens into speakable phrases so
//! synthesis starts on the first phrase instead of waiting for the whole reply.
//!
//! ```no_run
//! # #[cfg(feature = "piper")]
//! # fn main() -> Result<(), parley_tts::TtsError> {
//! use parley_tts::chunker::PhraseChunker;
//! use parley_tts::piper::{PiperOptions, PiperVoice, VoiceFiles};
//! use parley_tts::Synthesizer;
//!
//! // The layout `parley models install` creates under $PARLEY_MODELS_DIR.
//! let files = VoiceFiles::in_models_dir(std::path::Path::new("/var/cache/parley/models"));
//! let voice = PiperVoice::load_files(&files, &PiperOptions::default())?;
//! let mut chunker = PhraseChunker::new();
//! for token in ["Your refill ", "is ready. ", "Pick it up ", "after 3 p.m."] {
//!     for phrase in chunker.push(token) {
//!         let samples = voice.synthesize(&phrase)?; // mono f32 at voice.sample_rate()
//!         # let _ = samples;
//!     }
//! }
//! if let Some(rest) = chunker.finish() {
//!     let samples = voice.synthesize(&rest)?;
//!     # let _ = samples;
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "piper"))]
//! # fn main() {}
//! ```
//!
//! The `piper` feature (on by default) needs `libespeak-ng-dev` to build and the
//! `espeak-ng-data` files plus an ONNX Runtime library (`libonnxruntime.so`, from
//! `parley models install`) to run.

use std::path::PathBuf;

pub mod chunker;
#[cfg(feature = "piper")]
pub mod espeak;
#[cfg(feature = "piper")]
pub mod onnx;
#[cfg(feature = "piper")]
pub mod piper;
pub mod text;

#[cfg(feature = "piper")]
pub use piper::{PiperOptions, PiperVoice, VoiceFiles};

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
