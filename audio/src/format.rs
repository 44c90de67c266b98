//! The wire audio formats callers speak, and their byte/sample conversions.

use crate::{AudioError, g711, pcm};

/// Sample rate of G.711 (PCMU/PCMA) audio, fixed by the standard.
const G711_RATE: u32 = 8_000;

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
}

impl AudioFormat {
    /// Sample rate of the format, so callers know what to resample from and to.
    pub fn sample_rate(&self) -> u32 {
        match self {
            AudioFormat::Pcm16 { rate } => *rate,
            AudioFormat::Pcmu | AudioFormat::Pcma => G711_RATE,
        }
    }

    /// Decodes a wire payload into `f32` samples; PCM16 payloads of odd length are rejected.
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
        }
    }

    /// Encodes `f32` samples (already at [`sample_rate`](Self::sample_rate)) into a wire payload.
    pub fn encode(&self, samples: &[f32]) -> Vec<u8> {
        match self {
            AudioFormat::Pcm16 { .. } => pcm::encode_pcm16le(samples),
            AudioFormat::Pcmu => samples
                .iter()
                .map(|&s| g711::ulaw_encode(pcm::f32_to_i16(s)))
                .collect(),
            AudioFormat::Pcma => samples
                .iter()
                .map(|&s| g711::alaw_encode(pcm::f32_to_i16(s)))
                .collect(),
        }
    }

    /// Bytes per sample on the wire (2 for PCM16, 1 for G.711).
    pub fn bytes_per_sample(&self) -> usize {
        match self {
            AudioFormat::Pcm16 { .. } => 2,
            AudioFormat::Pcmu | AudioFormat::Pcma => 1,
        }
    }

    /// Bytes per second of audio, for pacing outbound frames and sizing buffers.
    pub fn bytes_per_second(&self) -> usize {
        self.sample_rate() as usize * self.bytes_per_sample()
    }

    /// Playback duration of a payload in milliseconds, so transports can track
    /// how much audio a caller has actually heard.
    pub fn duration_ms(&self, byte_len: usize) -> u64 {
        let per_second = self.bytes_per_second() as u64;
        if per_second == 0 {
            return 0;
        }
        byte_len as u64 * 1000 / per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        let pcm24 = AudioFormat::Pcm16 { rate: 24_000 };
        assert_eq!(pcm24.sample_rate(), 24_000);
        assert_eq!(pcm24.bytes_per_second(), 48_000);
        assert_eq!(AudioFormat::Pcmu.sample_rate(), 8_000);
        assert_eq!(AudioFormat::Pcmu.bytes_per_second(), 8_000);
        assert_eq!(AudioFormat::Pcma.bytes_per_second(), 8_000);
        assert_eq!(AudioFormat::Pcmu.duration_ms(160), 20);
        assert_eq!(pcm24.duration_ms(960), 20);
    }

    #[test]
    fn decode_encode_lengths_and_values() {
        let samples: Vec<f32> = (0..160).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
        for format in [
            AudioFormat::Pcm16 { rate: 16_000 },
            AudioFormat::Pcmu,
            AudioFormat::Pcma,
        ] {
            let bytes = format.encode(&samples);
            assert_eq!(bytes.len(), samples.len() * format.bytes_per_sample());
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
        assert_eq!(AudioFormat::Pcmu.encode(&[0.0]), vec![0xFF]);
        assert_eq!(AudioFormat::Pcma.encode(&[0.0]), vec![0xD5]);
    }
}
