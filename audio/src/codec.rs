//! Per-stream decoders and encoders for every wire format.
//!
//! Opus predicts each packet from the ones before it, so one call direction must
//! keep one codec state for its whole life: the caller's packets go through one
//! [`AudioDecoder`], and every reply of the call through one [`AudioEncoder`], so
//! the caller's decoder (which lives as long as the call) stays in step. PCM16 and
//! G.711 have no state; their decoder and encoder wrap the stateless conversions
//! of [`AudioFormat`], so callers treat every format alike.

use crate::format::{AudioFormat, OPUS_RATE};
use crate::AudioError;

/// Samples per channel of the longest Opus packet (120 ms at 48 kHz), the most
/// one packet can decode to.
const OPUS_MAX_PACKET_SAMPLES: usize = OPUS_RATE as usize * 120 / 1000;

/// Legal Opus frame lengths at 48 kHz: 2.5, 5, 10, 20, 40 and 60 ms.
const OPUS_FRAME_SIZES: [usize; 6] = [120, 240, 480, 960, 1920, 2880];

/// Largest packet libopus writes for one frame (its own recommended bound).
const OPUS_MAX_PACKET_BYTES: usize = 4000;

/// Decodes one stream of wire payloads (one call's input) into samples at the
/// format's rate.
///
/// For Opus each payload must be exactly one packet; a payload libopus cannot
/// parse is an error, never a panic, and leaves the decoder usable.
#[derive(Debug)]
pub struct AudioDecoder {
    format: AudioFormat,
    opus: Option<opus::Decoder>,
}

impl AudioDecoder {
    /// A fresh decoder for `format` (48 kHz mono libopus state for Opus).
    pub fn new(format: AudioFormat) -> Result<Self, AudioError> {
        let opus = match format {
            AudioFormat::Opus => Some(
                opus::Decoder::new(OPUS_RATE, opus::Channels::Mono)
                    .map_err(|source| AudioError::OpusSetup { what: "decoder", source })?,
            ),
            _ => None,
        };
        Ok(Self { format, opus })
    }

    /// The format this decoder reads, so its owner knows when a new one is needed.
    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// Decodes one payload into samples at the format's rate, continuing the stream.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<f32>, AudioError> {
        let Some(decoder) = self.opus.as_mut() else {
            return self.format.decode(payload);
        };
        // libopus reads an empty packet as "a packet was lost" and invents audio;
        // on the wire an empty message is a client's mistake.
        if payload.is_empty() {
            return Err(AudioError::EmptyOpusPacket);
        }
        let mut out = vec![0.0f32; OPUS_MAX_PACKET_SAMPLES];
        let n = decoder
            .decode_float(payload, &mut out, false)
            .map_err(|source| AudioError::OpusDecode { len: payload.len(), source })?;
        out.truncate(n);
        Ok(out)
    }
}

/// Encodes one stream of samples (one call's output) into wire payloads.
///
/// For Opus every call of [`encode`](Self::encode) makes exactly one packet of the
/// encoder's frame length, so a transport sends one packet per message.
#[derive(Debug)]
pub struct AudioEncoder {
    format: AudioFormat,
    opus: Option<OpusFrames>,
}

/// An Opus encoder and the frame length its packets carry.
#[derive(Debug)]
struct OpusFrames {
    encoder: opus::Encoder,
    frame_samples: usize,
}

impl AudioEncoder {
    /// A fresh encoder for `format`. For Opus (48 kHz mono, tuned for voice)
    /// `opus_frame_samples` is the length of every packet and must be a legal Opus
    /// frame (120, 240, 480, 960, 1920 or 2880 samples); other formats ignore it.
    pub fn new(format: AudioFormat, opus_frame_samples: usize) -> Result<Self, AudioError> {
        let opus = match format {
            AudioFormat::Opus => {
                if !OPUS_FRAME_SIZES.contains(&opus_frame_samples) {
                    return Err(AudioError::OpusFrameSize { samples: opus_frame_samples });
                }
                let encoder = opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip)
                    .map_err(|source| AudioError::OpusSetup { what: "encoder", source })?;
                Some(OpusFrames { encoder, frame_samples: opus_frame_samples })
            }
            _ => None,
        };
        Ok(Self { format, opus })
    }

    /// The format this encoder writes, so its owner knows when a new one is needed.
    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// Samples per packet for Opus (frames must be at most this long); `None` for
    /// the stateless formats, which take any length.
    pub fn frame_samples(&self) -> Option<usize> {
        self.opus.as_ref().map(|o| o.frame_samples)
    }

    /// Encodes one frame (samples at the format's rate) into one payload.
    ///
    /// For Opus the payload is exactly one packet: a frame shorter than the
    /// encoder's frame length (the last one of a reply) is padded with silence, a
    /// longer one is refused.
    pub fn encode(&mut self, frame: &[f32]) -> Result<Vec<u8>, AudioError> {
        let Some(opus) = self.opus.as_mut() else {
            return self.format.encode(frame);
        };
        if frame.len() > opus.frame_samples {
            return Err(AudioError::OpusFrameTooLong { samples: frame.len(), max: opus.frame_samples });
        }
        let padded;
        let input = if frame.len() < opus.frame_samples {
            let mut p = frame.to_vec();
            p.resize(opus.frame_samples, 0.0);
            padded = p;
            &padded[..]
        } else {
            frame
        };
        opus.encoder
            .encode_vec_float(input, OPUS_MAX_PACKET_BYTES)
            .map_err(|source| AudioError::OpusEncode { samples: frame.len(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: usize = 960;

    fn tone(hz: f32, seconds: f32) -> Vec<f32> {
        let n = (OPUS_RATE as f32 * seconds) as usize;
        (0..n).map(|i| 0.4 * (2.0 * std::f32::consts::PI * hz * i as f32 / OPUS_RATE as f32).sin()).collect()
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|s| s * s).sum::<f32>() / x.len().max(1) as f32).sqrt()
    }

    /// Frequency from upward zero crossings, good enough for a pure tone.
    fn frequency(x: &[f32]) -> f32 {
        let ups = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
        ups as f32 * OPUS_RATE as f32 / x.len() as f32
    }

    #[test]
    fn a_tone_survives_encode_then_decode() {
        let input = tone(440.0, 1.0);
        let mut enc = AudioFormat::Opus.encoder().unwrap();
        let mut dec = AudioFormat::Opus.decoder().unwrap();
        assert_eq!(enc.frame_samples(), Some(FRAME));
        let mut out = Vec::new();
        for frame in input.chunks(FRAME) {
            let packet = enc.encode(frame).unwrap();
            assert!(!packet.is_empty() && packet.len() < FRAME, "one compressed packet, got {} bytes", packet.len());
            let decoded = dec.decode(&packet).unwrap();
            assert_eq!(decoded.len(), FRAME, "one packet decodes to one 20 ms frame");
            out.extend(decoded);
        }
        assert_eq!(out.len(), input.len());
        // Skip the codec's start-up (its look-ahead delay and the first frames).
        let settled = &out[FRAME * 5..];
        let (want, got) = (rms(&input[FRAME * 5..]), rms(settled));
        assert!((got - want).abs() < want * 0.25, "energy {got} vs {want}");
        let hz = frequency(settled);
        assert!((hz - 440.0).abs() < 440.0 * 0.05, "frequency {hz} Hz");
    }

    #[test]
    fn a_packet_that_is_not_opus_is_an_error_and_the_decoder_goes_on() {
        let mut dec = AudioFormat::Opus.decoder().unwrap();
        // Code 3 (several frames) claiming 63 frames of 20 ms: over the 120 ms limit.
        let err = dec.decode(&[0xFF, 0xFF, 0xFF, 0xFF]).unwrap_err();
        assert!(matches!(err, AudioError::OpusDecode { len: 4, .. }), "{err}");
        assert!(err.to_string().contains("one Opus packet"), "{err}");
        // A code 0 packet longer than one frame may be (1275 bytes).
        assert!(dec.decode(&[0x78; 1300]).is_err());
        assert!(matches!(dec.decode(&[]), Err(AudioError::EmptyOpusPacket)));
        // Still decodes real packets after the garbage.
        let mut enc = AudioFormat::Opus.encoder().unwrap();
        let packet = enc.encode(&tone(300.0, 0.02)).unwrap();
        assert_eq!(dec.decode(&packet).unwrap().len(), FRAME);
    }

    #[test]
    fn a_short_last_frame_is_padded_to_one_whole_packet_and_a_long_one_refused() {
        let mut enc = AudioFormat::Opus.encoder().unwrap();
        let mut dec = AudioFormat::Opus.decoder().unwrap();
        let short = enc.encode(&tone(440.0, 0.007)).unwrap();
        assert_eq!(opus::packet::get_nb_samples(&short, OPUS_RATE).unwrap(), FRAME);
        assert_eq!(dec.decode(&short).unwrap().len(), FRAME);
        let silence = enc.encode(&[]).unwrap();
        assert_eq!(opus::packet::get_nb_samples(&silence, OPUS_RATE).unwrap(), FRAME);
        assert!(matches!(enc.encode(&[0.0; FRAME + 1]), Err(AudioError::OpusFrameTooLong { samples: 961, max: FRAME })));
    }

    #[test]
    fn only_legal_opus_frame_sizes_are_accepted() {
        for ok in OPUS_FRAME_SIZES {
            let mut enc = AudioEncoder::new(AudioFormat::Opus, ok).unwrap();
            let packet = enc.encode(&vec![0.1; ok]).unwrap();
            assert_eq!(opus::packet::get_nb_samples(&packet, OPUS_RATE).unwrap(), ok);
        }
        assert!(matches!(AudioEncoder::new(AudioFormat::Opus, 1000), Err(AudioError::OpusFrameSize { samples: 1000 })));
        // The stateless formats take any length.
        let mut pcmu = AudioFormat::Pcmu.encoder().unwrap();
        assert_eq!(pcmu.encode(&[0.0; 7]).unwrap().len(), 7);
        assert_eq!(pcmu.frame_samples(), None);
        let mut back = AudioFormat::Pcmu.decoder().unwrap();
        assert_eq!(back.decode(&[0xFF; 7]).unwrap(), vec![0.0; 7]);
    }
}
