//! Conversions between 16-bit PCM and the `f32` samples the pipeline works in.
//!
//! Inside Parley audio is `f32` in `[-1, 1]`; on the wire and in files it is
//! 16-bit little-endian PCM.

use crate::AudioError;

/// Full-scale value of a 16-bit sample, as used for normalization.
const FULL_SCALE: f32 = 32768.0;

/// Converts a 16-bit sample to `f32`, mapping `i16::MIN` to exactly -1.0.
pub fn i16_to_f32(s: i16) -> f32 {
    f32::from(s) / FULL_SCALE
}

/// Converts an `f32` sample to 16 bits, rounding to the nearest level and
/// clamping out-of-range values (NaN becomes silence) so synthesis overshoot
/// never wraps around.
pub fn f32_to_i16(s: f32) -> i16 {
    if s.is_nan() {
        return 0;
    }
    (s * FULL_SCALE)
        .round()
        .clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16
}

/// Decodes little-endian 16-bit PCM bytes, as sent by Realtime clients, into samples.
pub fn decode_pcm16le(bytes: &[u8]) -> Result<Vec<f32>, AudioError> {
    if !bytes.len().is_multiple_of(2) {
        return Err(AudioError::OddPcmLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|pair| i16_to_f32(i16::from_le_bytes([pair[0], pair[1]])))
        .collect())
}

/// Encodes samples as little-endian 16-bit PCM bytes for the wire.
pub fn encode_pcm16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|&s| f32_to_i16(s).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_length_is_an_error() {
        assert!(matches!(
            decode_pcm16le(&[1, 2, 3]),
            Err(AudioError::OddPcmLength(3))
        ));
        assert_eq!(decode_pcm16le(&[]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn little_endian_round_trip() {
        let bytes = [0x00, 0x80, 0xFF, 0x7F, 0x01, 0x00, 0xFF, 0xFF];
        let samples = decode_pcm16le(&bytes).unwrap();
        assert_eq!(
            samples,
            vec![-1.0, 32767.0 / 32768.0, 1.0 / 32768.0, -1.0 / 32768.0]
        );
        assert_eq!(encode_pcm16le(&samples), bytes);
    }

    #[test]
    fn f32_to_i16_rounds_and_clamps() {
        assert_eq!(f32_to_i16(1.0), i16::MAX);
        assert_eq!(f32_to_i16(7.5), i16::MAX);
        assert_eq!(f32_to_i16(-1.0), i16::MIN);
        assert_eq!(f32_to_i16(-3.0), i16::MIN);
        assert_eq!(f32_to_i16(f32::NAN), 0);
        assert_eq!(f32_to_i16(0.6 / 32768.0), 1);
        assert_eq!(f32_to_i16(-0.6 / 32768.0), -1);
        assert_eq!(f32_to_i16(0.4 / 32768.0), 0);
        for s in [i16::MIN, -1234, -1, 0, 1, 999, i16::MAX] {
            assert_eq!(f32_to_i16(i16_to_f32(s)), s);
        }
    }
}
