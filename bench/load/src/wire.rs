//! What the callers say and hear, apart from how it travels: a [`Dialect`] encodes the
//! caller's audio and the call's start and stop as text messages, and decodes the
//! server's messages into the few things the call loop measures. The Twilio and
//! Realtime dialects share one call loop (`main.rs`), and the Realtime one is spoken
//! both over a WebSocket and over an HTTP/2 stream.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use parley_audio::format::AudioFormat;
use serde_json::{Value, json};

/// A server message, as the call loop needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// An outbound audio frame this many milliseconds long.
    Audio(f64),
    /// The reply in progress was cleared (barge-in).
    Cleared,
    /// A message the caller answers with (Twilio's mark echo).
    Answer(String),
    /// Anything else.
    Other,
}

/// One endpoint's messages, so that a single call loop can drive every transport.
pub trait Dialect {
    /// Sample rate of the caller's audio, so the script is resampled once per run.
    fn rate(&self) -> u32;
    /// Messages sent right after connecting, before any audio (Twilio's `connected`
    /// and `start`).
    fn open(&mut self) -> Vec<String>;
    /// One chunk of the caller's audio as a message.
    fn audio(&mut self, samples: &[f32], chunk_ms: u64) -> Result<String>;
    /// The message that hangs up, if the endpoint has one (Twilio's `stop`).
    fn stop(&mut self) -> Option<String>;
    /// Reads one server message; an error ends the call as failed.
    fn decode(&mut self, text: &str) -> Result<Heard>;
}

/// Twilio Media Streams: μ-law 8 kHz `media` events with sequence numbers.
pub struct Twilio {
    seq: u64,
}

const SID: &str = "MZ00000000000000000000000000load00";
const ACCOUNT: &str = "AC00000000000000000000000000load0";
const CALL: &str = "CA00000000000000000000000000load1";

impl Twilio {
    /// A fresh call (sequence numbers start after `start`).
    pub fn new() -> Self {
        Self { seq: 2 }
    }
}

impl Default for Twilio {
    fn default() -> Self {
        Self::new()
    }
}

impl Dialect for Twilio {
    fn rate(&self) -> u32 {
        8_000
    }

    fn open(&mut self) -> Vec<String> {
        let start = json!({"event": "start", "sequenceNumber": "1", "streamSid": SID, "start": {
            "accountSid": ACCOUNT, "streamSid": SID, "callSid": CALL,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}, "customParameters": {}}});
        vec![json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(), start.to_string()]
    }

    fn audio(&mut self, samples: &[f32], chunk_ms: u64) -> Result<String> {
        let payload = base64::engine::general_purpose::STANDARD.encode(AudioFormat::Pcmu.encode(samples).context("encoding μ-law")?);
        let seq = self.seq;
        self.seq += 1;
        Ok(json!({"event": "media", "sequenceNumber": seq.to_string(), "streamSid": SID,
            "media": {"track": "inbound", "chunk": (seq - 1).to_string(), "timestamp": ((seq - 2) * chunk_ms).to_string(), "payload": payload}})
        .to_string())
    }

    fn stop(&mut self) -> Option<String> {
        Some(json!({"event": "stop", "sequenceNumber": self.seq.to_string(), "streamSid": SID, "stop": {"accountSid": ACCOUNT, "callSid": CALL}}).to_string())
    }

    fn decode(&mut self, text: &str) -> Result<Heard> {
        let Ok(v) = serde_json::from_str::<Value>(text) else { bail!("a message that is not JSON") };
        Ok(match v["event"].as_str() {
            Some("media") => {
                let bytes = v["media"]["payload"].as_str().and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok()).unwrap_or_default();
                Heard::Audio(bytes.len() as f64 / 8.0)
            }
            Some("clear") => Heard::Cleared,
            // Twilio echoes a mark once playback reaches it; paced audio is heard now.
            Some("mark") => Heard::Answer(json!({"event": "mark", "sequenceNumber": "0", "streamSid": SID, "mark": {"name": v["mark"]["name"]}}).to_string()),
            _ => Heard::Other,
        })
    }
}

/// OpenAI Realtime events: PCM16 24 kHz appends in, `response.output_audio.delta`
/// out (server VAD). Spoken over `/v1/realtime` and over `POST /v1/stream`.
pub struct Realtime;

impl Dialect for Realtime {
    fn rate(&self) -> u32 {
        24_000
    }

    fn open(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn audio(&mut self, samples: &[f32], _chunk_ms: u64) -> Result<String> {
        let audio = base64::engine::general_purpose::STANDARD.encode(parley_audio::pcm::encode_pcm16le(samples));
        Ok(json!({"type": "input_audio_buffer.append", "audio": audio}).to_string())
    }

    fn stop(&mut self) -> Option<String> {
        None
    }

    fn decode(&mut self, text: &str) -> Result<Heard> {
        let Ok(v) = serde_json::from_str::<Value>(text) else { bail!("a message that is not JSON") };
        Ok(match v["type"].as_str() {
            Some("response.output_audio.delta") => {
                let bytes = v["delta"].as_str().and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok()).unwrap_or_default();
                // PCM16 mono at 24 kHz: 48 bytes a millisecond.
                Heard::Audio(bytes.len() as f64 / 48.0)
            }
            Some("output_audio_buffer.cleared") => Heard::Cleared,
            Some("error") => bail!("error event: {}", v["error"]),
            _ => Heard::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_numbers_media_and_answers_marks() {
        let mut t = Twilio::new();
        assert_eq!(t.open().len(), 2);
        let m: Value = serde_json::from_str(&t.audio(&[0.0; 160], 20).expect("encodes")).expect("json");
        assert_eq!((m["sequenceNumber"].as_str(), m["media"]["chunk"].as_str(), m["media"]["timestamp"].as_str()), (Some("2"), Some("1"), Some("0")));
        let m: Value = serde_json::from_str(&t.audio(&[0.0; 160], 20).expect("encodes")).expect("json");
        assert_eq!(m["media"]["timestamp"].as_str(), Some("20"));
        let payload = base64::engine::general_purpose::STANDARD.encode([0xffu8; 160]);
        assert_eq!(t.decode(&json!({"event": "media", "media": {"payload": payload}}).to_string()).expect("decodes"), Heard::Audio(20.0));
        let Heard::Answer(a) = t.decode(r#"{"event":"mark","mark":{"name":"m1"}}"#).expect("decodes") else { panic!("no answer") };
        assert!(a.contains("\"m1\""));
        assert_eq!(t.decode(r#"{"event":"clear"}"#).expect("decodes"), Heard::Cleared);
        assert!(t.decode("not json").is_err());
    }

    #[test]
    fn realtime_measures_deltas_and_fails_on_errors() {
        let mut r = Realtime;
        let delta = base64::engine::general_purpose::STANDARD.encode([0u8; 960]);
        assert_eq!(r.decode(&json!({"type": "response.output_audio.delta", "delta": delta}).to_string()).expect("decodes"), Heard::Audio(20.0));
        assert_eq!(r.decode(r#"{"type":"session.created"}"#).expect("decodes"), Heard::Other);
        assert!(r.decode(r#"{"type":"error","error":{"code":"x"}}"#).is_err());
        let a: Value = serde_json::from_str(&r.audio(&[0.0; 480], 20).expect("encodes")).expect("json");
        assert_eq!(a["type"], "input_audio_buffer.append");
    }
}
