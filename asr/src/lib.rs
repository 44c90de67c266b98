//! Speech-to-text for Parley.
//!
//! One trait, [`Transcriber`], that the call pipeline uses for partial and final
//! transcripts, and one engine behind it: Whisper through whisper-rs
//! ([`WhisperTranscriber`]). The model is loaded once per process and shared by every
//! call; each transcription borrows per-run decoder state from a small pool.
//!
//! [`convert`] turns the CTranslate2 Whisper weights that ship on the package index
//! into the ggml file that whisper.cpp loads (`parley models install` runs it once).
//!
//! ```no_run
//! use std::path::Path;
//! use parley_asr::{Transcriber, WhisperOptions, WhisperTranscriber};
//!
//! let asr = WhisperTranscriber::load(
//!     Path::new("models/whisper/ggml-tiny.en.bin"),
//!     WhisperOptions { threads: 2, ..WhisperOptions::default() },
//! )?;
//! let utterance: Vec<f32> = vec![0.0; 2 * 16_000]; // 16 kHz mono, from the VAD
//! let heard = asr.transcribe(&utterance)?; // blocking: call from a worker thread
//! println!("caller said: {}", heard.text);
//! # Ok::<(), parley_asr::AsrError>(())
//! ```
//!
//! Short utterances are cheap: the encoder's context is fitted to the audio (plus
//! about 5 s of silence) instead of a full 30 s window, about 0.2 s instead of 0.9 s
//! for a 2–3 s utterance on 2 cores, with the same accuracy on our test clips.
//! whisper.cpp's own log lines go to `tracing` under the target
//! `parley_asr::whisper_cpp` (its load report at debug level).

use std::path::PathBuf;

pub mod convert;
mod text;
mod whisper;

pub use text::clean_transcript;
pub use whisper::{SAMPLE_RATE, WhisperOptions, WhisperTranscriber};

/// Everything that can go wrong turning speech into text.
#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    /// The model file could not be read or is not a Whisper model.
    #[error(
        "cannot load the Whisper model {path}: {reason} (run `parley models install` to fetch and convert it)"
    )]
    Load { path: PathBuf, reason: String },
    /// The decoder failed on this audio.
    #[error("transcription failed: {0}")]
    Decode(String),
    /// Converting CTranslate2 weights to ggml failed.
    #[error("cannot convert the Whisper model: {0}")]
    Convert(String),
}

/// The text heard in one stretch of audio.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    /// The words, trimmed, without Whisper's bracketed non-speech tags.
    pub text: String,
}

/// A speech-to-text engine shared by all calls.
///
/// Implementations are blocking (they run model code): call them from a dedicated
/// thread or `spawn_blocking`, never directly on the async runtime.
pub trait Transcriber: Send + Sync {
    /// Transcribes one utterance of 16 kHz mono samples in [-1, 1].
    fn transcribe(&self, samples_16k: &[f32]) -> Result<Transcript, AsrError>;

    /// Like [`Transcriber::transcribe`], but gives up soon after `stop` is set: a call
    /// that hung up must not keep a decode (and the server-wide decoding slot it holds)
    /// running for nobody. Engines that cannot stop early decode to the end.
    fn transcribe_until(&self, samples_16k: &[f32], stop: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<Transcript, AsrError> {
        let _ = stop;
        self.transcribe(samples_16k)
    }

    /// True for a transcriber that does no real work (the echo agent's): its calls
    /// need neither a server-wide decoding slot nor a blocking thread, and there is
    /// nothing to gain from decoding a turn early.
    fn is_instant(&self) -> bool {
        false
    }
}
