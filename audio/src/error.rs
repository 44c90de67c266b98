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
    /// A stateful format (Opus) was given to a stateless conversion; its packets
    /// only make sense in order, through one decoder or encoder per stream.
    #[error("{format} audio needs a decoder or encoder that keeps state across packets; use AudioFormat::decoder or AudioFormat::encoder")]
    NeedsCodecState { format: &'static str },
    /// libopus refused to create a decoder or encoder.
    #[error("cannot set up an Opus {what}: {source}")]
    OpusSetup {
        what: &'static str,
        #[source]
        source: opus::Error,
    },
    /// An Opus message carried no bytes; a packet is at least its table-of-contents byte.
    #[error("an empty Opus packet; send exactly one Opus packet (48 kHz mono) per message")]
    EmptyOpusPacket,
    /// The bytes are not an Opus packet libopus can decode.
    #[error("cannot decode a {len}-byte Opus packet: {source}; send exactly one Opus packet (48 kHz mono) per message")]
    OpusDecode {
        len: usize,
        #[source]
        source: opus::Error,
    },
    /// libopus failed to encode a frame.
    #[error("cannot encode a frame of {samples} samples as Opus: {source}")]
    OpusEncode {
        samples: usize,
        #[source]
        source: opus::Error,
    },
    /// An Opus packet holds one frame of a fixed legal duration; more samples than
    /// that cannot go into one packet.
    #[error("an Opus frame of {samples} samples is longer than the encoder's {max} (one packet per frame)")]
    OpusFrameTooLong { samples: usize, max: usize },
    /// Opus frames last 2.5, 5, 10, 20, 40 or 60 ms; anything else is not a frame size.
    #[error("{samples} samples at 48 kHz is not an Opus frame size; use 2.5, 5, 10, 20, 40 or 60 ms (120 to 2880 samples)")]
    OpusFrameSize { samples: usize },
}
