//! Caller audio as it arrives on the wire (`input_audio_buffer.append` after base64,
//! Twilio `media`, SIP RTP payloads): the first byte picks the format, the rest is
//! one stream of payloads (cut at each 0xFF 0xFE pair, so a run exercises the
//! stateful Opus decoder over several packets), then base64 text decoded the way
//! the Realtime endpoint does. Errors are fine; a panic or a wrong length is not.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use parley_audio::codec::AudioDecoder;
use parley_audio::format::AudioFormat;

const FORMATS: [AudioFormat; 7] = [
    AudioFormat::Pcmu,
    AudioFormat::Pcma,
    AudioFormat::Opus,
    AudioFormat::Pcm16 { rate: 8_000 },
    AudioFormat::Pcm16 { rate: 16_000 },
    AudioFormat::Pcm16 { rate: 24_000 },
    AudioFormat::Pcm16 { rate: 48_000 },
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let format = FORMATS[usize::from(pick) % FORMATS.len()];
    let Ok(mut decoder) = AudioDecoder::new(format) else { return };
    for payload in split(rest) {
        if let Ok(samples) = decoder.decode(payload) {
            match format {
                AudioFormat::Pcmu | AudioFormat::Pcma => assert_eq!(samples.len(), payload.len()),
                AudioFormat::Pcm16 { .. } => assert_eq!(samples.len(), payload.len() / 2),
                // At most 120 ms at 48 kHz per packet.
                AudioFormat::Opus => assert!(samples.len() <= 48_000 * 120 / 1000),
            }
            if format != AudioFormat::Opus {
                assert!(samples.iter().all(|s| s.is_finite() && s.abs() <= 1.0), "samples out of range");
            }
        }
        if let Some(ms) = format.duration_ms(payload.len()) {
            assert!(ms <= payload.len() as u64 * 1000);
        }
    }
    // The same bytes as base64 text, as a Realtime append carries them.
    if let Ok(text) = std::str::from_utf8(rest)
        && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text)
    {
        let _ = format.decode(&bytes);
    }
});

/// Payloads separated by 0xFF 0xFE.
fn split(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == 0xFF && bytes[i + 1] == 0xFE {
            out.push(&bytes[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&bytes[start..]);
    out
}
