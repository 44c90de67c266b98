//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong turning bytes and files into samples and back.
///
/// Messages say what the caller should change, since most of these reach a
/// client as an error event.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// PCM16 carries two bytes per sample, so a payload of odd length is truncated or corrupt.
    #[error("PCM16 audio has an odd length of {0} bytes; send whole 16-bit little-endian samples")]
    OddPcmLength(usize),
    /// The rate is zero or outside what the resampler is built for.
    #[error("unsupported sample rate {0} Hz; use a rate between 1000 and 384000 Hz")]
    UnsupportedRate(u32),
    /// rubato refused the resampler settings.
    #[error("cannot build a resampler from {from_hz} Hz to {to_hz} Hz: {source}")]
    Resampler {
        from_hz: u32,
        to_hz: u32,
        #[source]
        source: rubato::ResamplerConstructionError,
    },
    /// A WAV file could not be read or parsed.
    #[error("cannot read WAV {path}: {source}")]
    WavRead {
        path: PathBuf,
        #[source]
        source: hound::Error,
    },
    /// A WAV file could not be written.
    #[error("cannot write WAV {path}: {source}")]
    WavWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The WAV header declares a layout with no samples to mix.
    #[error("WAV {path} declares zero channels; it is not a usable audio file")]
    NoChannels { path: PathBuf },
}
