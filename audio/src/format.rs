//! The wire audio formats callers speak, and their byte/sample conversions.
//!
//! PCM16 and G.711 are stateless: any payload converts on its own, with
//! [`AudioFormat::decode`] and [`AudioFormat::encode`]. Opus is not: each packet
//! depends on the ones before it, so it converts only through a call's own
//! [`AudioDecoder`] and [`AudioEncoder`] ([`AudioFormat::decoder`],
//! [`AudioFormat::encoder`]), which every format also offers.

use crate::codec::{AudioDecoder, AudioEncoder};
use crate::{AudioError, g711, pcm};

/// Sample rate of G.711 (PCMU/PCMA) audio, fixed by the standard.
const G711_RATE: u32 = 8_000;

/// Sample rate Parley speaks Opus at: the codec's full band, and what WebRTC and
/// browsers decode to anyway.
pub const OPUS_RATE: u32 = 48_000;

/// Duration of every Opus packet Parley sends: one packet per 20 ms frame, the
/// size voice clients (WebRTC, Discord, SIP) expect and decode without fuss.
pub const OPUS_FRAME_MS: u32 = 20;

/// Wire audio formats callers speak.
///
/// One value per call direction tells the transport how to turn payload bytes
/// into samples and back; the rate says what the resampler must convert from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// 16-bit little-endian mono PCM at the given rate (Realtime `pcm16` is 24 kHz).
    Pcm16 { rate: u32 },
    /// G.711 μ-law at 8 kHz (Twilio Media Streams, SIP PCMU).
    Pcmu,
    /// G.711 A-law at 8 kHz (SIP PCMA).
    Pcma,
    /// Opus, 48 kHz mono, one packet per message (Realtime `audio/opus`). Stateful:
    /// convert it with [`decoder`](Self::decoder) and [`encoder`](Self::encoder).
    Opus,
}

impl AudioFormat {
    /// Sample rate of the format, so callers know what to resample from and to.
    pub fn sample_rate(&self) -> u32 {
        match self {
            AudioFormat::Pcm16 { rate } => *rate,
            AudioFormat::Pcmu | AudioFormat::Pcma => G711_RATE,
            AudioFormat::Opus => OPUS_RATE,
        }
    }

    /// Whether converting a payload needs the packets before it (Opus), so that a
    /// call keeps one [`AudioDecoder`] / [`AudioEncoder`] per direction.
    pub fn is_stateful(&self) -> bool {
        matches!(self, AudioFormat::Opus)
    }

    /// Decodes a wire payload into `f32` samples; PCM16 payloads of odd length are rejected.
    ///
    /// Opus is refused ([`AudioError::NeedsCodecState`]): a packet decoded without
    /// the ones before it comes out wrong, so use [`decoder`](Self::decoder).
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>, AudioError> {
        match self {
            AudioFormat::Pcm16 { .. } => pcm::decode_pcm16le(bytes),
            AudioFormat::Pcmu => Ok(bytes
                .iter()
                .map(|&b| pcm::i16_to_f32(g711::ulaw_decode(b)))
                .collect()),
            AudioFormat::Pcma => Ok(bytes
                .iter()
                .map(|&b| pcm::i16_to_f32(g711::alaw_decode(b)))
                .collect()),
            AudioFormat::Opus => Err(AudioError::NeedsCodecState { format: "Opus" }),
        }
    }

    /// Encodes `f32` samples (already at [`sample_rate`](Self::sample_rate)) into a wire payload.
    ///
    /// Opus is refused ([`AudioError::NeedsCodecState`]): its packets carry one
    /// frame each and predict from the previous one, so use [`encoder`](Self::encoder).
    pub fn encode(&self, samples: &[f32]) -> Result<Vec<u8>, AudioError> {
        match self {
            AudioFormat::Pcm16 { .. } => Ok(pcm::encode_pcm16le(samples)),
            AudioFormat::Pcmu => Ok(samples
                .iter()
                .map(|&s| g711::ulaw_encode(pcm::f32_to_i16(s)))
                .collect()),
            AudioFormat::Pcma => Ok(samples
                .iter()
                .map(|&s| g711::alaw_encode(pcm::f32_to_i16(s)))
                .collect()),
            AudioFormat::Opus => Err(AudioError::NeedsCodecState { format: "Opus" }),
        }
    }

    /// A decoder for one stream of this format (one call's input): the way to decode
    /// any format, and the only one for Opus.
    pub fn decoder(&self) -> Result<AudioDecoder, AudioError> {
        AudioDecoder::new(*self)
    }

    /// An encoder for one stream of this format (one call's output), making
    /// [`OPUS_FRAME_MS`] packets for Opus: the way to encode any format, and the
    /// only one for Opus.
    pub fn encoder(&self) -> Result<AudioEncoder, AudioError> {
        AudioEncoder::new(*self, (OPUS_RATE * OPUS_FRAME_MS / 1000) as usize)
    }

    /// The outbound frame length in ms for a configured `frame_ms`: Opus always
    /// sends [`OPUS_FRAME_MS`] (each frame is one packet, and 20 ms is the size
    /// clients expect), the other formats whatever was configured.
    pub fn frame_ms(&self, configured: u32) -> u32 {
        match self {
            AudioFormat::Opus => OPUS_FRAME_MS,
            _ => configured,
        }
    }

    /// Bytes per sample on the wire (2 for PCM16, 1 for G.711); `None` for Opus,
    /// whose packets are compressed at a variable size.
    pub fn bytes_per_sample(&self) -> Option<usize> {
        match self {
            AudioFormat::Pcm16 { .. } => Some(2),
            AudioFormat::Pcmu | AudioFormat::Pcma => Some(1),
            AudioFormat::Opus => None,
        }
    }

    /// Bytes per second of audio, for pacing outbound frames and sizing buffers;
    /// `None` for Opus (variable bit rate).
    pub fn bytes_per_second(&self) -> Option<usize> {
        self.bytes_per_sample().map(|b| self.sample_rate() as usize * b)
    }

    /// Playback duration of a payload in milliseconds, so transports can track
    /// how much audio a caller has actually heard; `None` for Opus, where the
    /// length of a packet does not tell its duration.
    pub fn duration_ms(&self, byte_len: usize) -> Option<u64> {
        let per_second = self.bytes_per_second()? as u64;
        if per_second == 0 {
            return Some(0);
        }
        Some(byte_len as u64 * 1000 / per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        let pcm24 = AudioFormat::Pcm16 { rate: 24_000 };
        assert_eq!(pcm24.sample_rate(), 24_000);
        assert_eq!(pcm24.bytes_per_second(), Some(48_000));
        assert_eq!(AudioFormat::Pcmu.sample_rate(), 8_000);
        assert_eq!(AudioFormat::Pcmu.bytes_per_second(), Some(8_000));
        assert_eq!(AudioFormat::Pcma.bytes_per_second(), Some(8_000));
        assert_eq!(AudioFormat::Pcmu.duration_ms(160), Some(20));
        assert_eq!(pcm24.duration_ms(960), Some(20));
        assert_eq!(AudioFormat::Opus.sample_rate(), 48_000);
        assert_eq!(AudioFormat::Opus.bytes_per_second(), None);
        assert_eq!(AudioFormat::Opus.duration_ms(100), None);
    }

    #[test]
    fn decode_encode_lengths_and_values() {
        let samples: Vec<f32> = (0..160).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
        for format in [
            AudioFormat::Pcm16 { rate: 16_000 },
            AudioFormat::Pcmu,
            AudioFormat::Pcma,
        ] {
            let bytes = format.encode(&samples).unwrap();
            assert_eq!(Some(bytes.len()), format.bytes_per_sample().map(|b| samples.len() * b));
            let back = format.decode(&bytes).unwrap();
            assert_eq!(back.len(), samples.len());
            // G.711 keeps about 1/16 relative precision; PCM16 is near exact.
            for (a, b) in samples.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= a.abs() / 16.0 + 1e-3,
                    "{format:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn pcm16_rejects_odd_payloads_but_g711_takes_any_length() {
        let odd = [0u8; 5];
        assert!(AudioFormat::Pcm16 { rate: 24_000 }.decode(&odd).is_err());
        assert_eq!(AudioFormat::Pcmu.decode(&odd).unwrap().len(), 5);
        assert_eq!(AudioFormat::Pcma.decode(&odd).unwrap().len(), 5);
    }

    #[test]
    fn g711_silence_bytes() {
        assert_eq!(AudioFormat::Pcmu.encode(&[0.0]).unwrap(), vec![0xFF]);
        assert_eq!(AudioFormat::Pcma.encode(&[0.0]).unwrap(), vec![0xD5]);
    }

    #[test]
    fn opus_is_refused_by_the_stateless_conversions_and_framed_at_20_ms() {
        assert!(matches!(AudioFormat::Opus.decode(&[0xF8, 0xFF, 0xFE]), Err(AudioError::NeedsCodecState { .. })));
        assert!(matches!(AudioFormat::Opus.encode(&[0.0; 960]), Err(AudioError::NeedsCodecState { .. })));
        assert!(AudioFormat::Opus.is_stateful() && !AudioFormat::Pcmu.is_stateful());
        assert_eq!(AudioFormat::Opus.frame_ms(40), 20);
        assert_eq!(AudioFormat::Pcmu.frame_ms(40), 40);
    }
}
