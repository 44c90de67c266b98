//! Audio plumbing for Parley: plain synchronous code, no async runtime.
//!
//! Every call's audio passes through this crate twice. Inbound, wire bytes are
//! decoded ([`format`](mod@format), or a call's stateful [`codec`] for Opus), resampled to the 16 kHz the models hear ([`resample`]),
//! and watched for turns ([`vad`]). Outbound, synthesized speech is resampled to
//! the caller's rate, cut into real-time frames ([`frame`]) and encoded again.
//! [`wav`] reads and writes files for the CLI caller and tests.
//!
//! ```
//! # fn main() -> Result<(), parley_audio::AudioError> {
//! use parley_audio::format::AudioFormat;
//! use parley_audio::resample::StreamResampler;
//!
//! // A Twilio media payload: 20 ms of μ-law at 8 kHz.
//! let wire = vec![0xFFu8; 160];
//! let samples = AudioFormat::Pcmu.decode(&wire)?;
//! let mut up = StreamResampler::new(8_000, 16_000)?;
//! let mut audio_16k = up.process(&samples);
//! audio_16k.extend(up.flush());
//! assert_eq!(audio_16k.len(), 320);
//! # Ok(())
//! # }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
pub mod codec;
pub mod echo;
pub mod format;
pub mod frame;
pub mod g711;
pub mod pcm;
pub mod resample;
pub mod vad;
pub mod wav;

pub use error::AudioError;
