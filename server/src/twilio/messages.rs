//! The Media Streams wire messages: what the gateway sends (parsed leniently, both
//! Twilio's camelCase and Telnyx's snake_case names) and what we send back.

use std::collections::BTreeMap;

use base64::Engine as _;
use parley_audio::format::AudioFormat;
use serde_json::{Map, Value, json};

/// Bytes of one 20 ms G.711 frame at 8 kHz: the size gateways expect.
pub const FRAME_BYTES: usize = 160;

/// Which gateway's spelling a stream uses; replies use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Twilio (and Fonoster): `streamSid`, `mediaFormat.sampleRate`.
    Twilio,
    /// Telnyx: `stream_id`, `media_format.sample_rate`.
    Telnyx,
}

/// The `start` message: who the call is and what audio it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub stream_sid: String,
    pub call_sid: Option<String>,
    pub account_sid: Option<String>,
    pub tracks: Vec<String>,
    /// `<Parameter>` values from the TwiML (string values only).
    pub custom_parameters: BTreeMap<String, String>,
    /// The audio both ways (bidirectional streams use one format).
    pub format: AudioFormat,
    pub dialect: Dialect,
}

/// A message from the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// `connected`: the socket is up; `start` follows.
    Connected,
    Start(Start),
    /// `media`: caller audio, base64-decoded. `track` is `inbound` on bidirectional streams.
    Media { track: Option<String>, payload: Vec<u8> },
    /// `mark`: playback reached a mark we sent (or it was cleared).
    Mark { name: String },
    /// `dtmf`: a key the caller pressed (`0`-`9`, `*`, `#`, `A`-`D`).
    Dtmf { digit: char },
    /// `stop`: the call or the stream ended.
    Stop,
    /// An event this server does not handle; ignored.
    Unknown(String),
}

/// Why a gateway message could not be used. The gateway has no error event, so
/// these are only logged.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("no string `event` field")]
    MissingEvent,
    #[error("invalid `{event}` message: {reason}")]
    Invalid { event: &'static str, reason: String },
}

fn invalid(event: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError::Invalid { event, reason: reason.into() }
}

/// The first of `keys` present in `v` as a string.
fn str_field<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_str))
}

/// Parses one text message from the gateway.
pub fn parse(text: &str) -> Result<Inbound, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    let event = v.get("event").and_then(Value::as_str).ok_or(ParseError::MissingEvent)?;
    match event {
        "connected" => Ok(Inbound::Connected),
        "start" => parse_start(&v).map(Inbound::Start),
        "media" => {
            let media = v.get("media").ok_or_else(|| invalid("media", "no `media` object"))?;
            let payload = media.get("payload").and_then(Value::as_str).ok_or_else(|| invalid("media", "`media.payload` must be a base64 string"))?;
            let payload = base64::engine::general_purpose::STANDARD.decode(payload).map_err(|e| invalid("media", format!("`media.payload` is not valid base64: {e}")))?;
            let track = media.get("track").and_then(Value::as_str).map(str::to_string);
            Ok(Inbound::Media { track, payload })
        }
        "mark" => {
            let name = v.get("mark").and_then(|m| m.get("name")).and_then(Value::as_str).ok_or_else(|| invalid("mark", "`mark.name` must be a string"))?;
            Ok(Inbound::Mark { name: name.to_string() })
        }
        "dtmf" => {
            let digit = v.get("dtmf").and_then(|d| d.get("digit")).and_then(Value::as_str).ok_or_else(|| invalid("dtmf", "`dtmf.digit` must be a string"))?;
            let mut chars = digit.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) if c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D') => Ok(Inbound::Dtmf { digit: c }),
                _ => Err(invalid("dtmf", format!("`{}` is not a keypad digit", digit.chars().take(8).collect::<String>()))),
            }
        }
        "stop" => Ok(Inbound::Stop),
        other => Ok(Inbound::Unknown(other.chars().take(64).collect())),
    }
}

fn parse_start(v: &Value) -> Result<Start, ParseError> {
    let start = v.get("start").filter(|s| s.is_object()).ok_or_else(|| invalid("start", "no `start` object"))?;
    let dialect = if start.get("streamSid").is_some() || v.get("streamSid").is_some() { Dialect::Twilio } else { Dialect::Telnyx };
    let stream_sid = str_field(start, &["streamSid", "stream_id"])
        .or_else(|| str_field(v, &["streamSid", "stream_id"]))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("start", "no `streamSid` (or `stream_id`)"))?
        .to_string();
    let call_sid = str_field(start, &["callSid", "call_sid", "call_control_id"]).map(str::to_string);
    let account_sid = str_field(start, &["accountSid", "account_sid"]).map(str::to_string);
    let tracks = start.get("tracks").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default();
    let custom_parameters = ["customParameters", "custom_parameters"]
        .iter()
        .find_map(|k| start.get(*k).and_then(Value::as_object))
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
        .unwrap_or_default();
    let format = match ["mediaFormat", "media_format"].iter().find_map(|k| start.get(*k)) {
        None => AudioFormat::Pcmu, // Twilio's only format
        Some(f) => media_format(f)?,
    };
    Ok(Start { stream_sid, call_sid, account_sid, tracks, custom_parameters, format, dialect })
}

/// The audio format of a `mediaFormat` object: G.711 μ-law or A-law at 8 kHz, mono.
fn media_format(f: &Value) -> Result<AudioFormat, ParseError> {
    let encoding = str_field(f, &["encoding"]).unwrap_or("audio/x-mulaw").to_ascii_lowercase();
    let format = match encoding.as_str() {
        "audio/x-mulaw" | "audio/pcmu" | "pcmu" | "mulaw" | "ulaw" | "g711_ulaw" => AudioFormat::Pcmu,
        "audio/x-alaw" | "audio/pcma" | "pcma" | "alaw" | "g711_alaw" => AudioFormat::Pcma,
        other => return Err(invalid("start", format!("unsupported media encoding `{}`; use audio/x-mulaw or audio/x-alaw at 8000 Hz", other.chars().take(32).collect::<String>()))),
    };
    let rate = ["sampleRate", "sample_rate"].iter().find_map(|k| f.get(*k)).and_then(|r| r.as_u64().or_else(|| r.as_str().and_then(|s| s.parse().ok())));
    if let Some(rate) = rate
        && rate != 8000
    {
        return Err(invalid("start", format!("unsupported sample rate {rate}; G.711 streams are 8000 Hz")));
    }
    let channels = f.get("channels").and_then(|c| c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())));
    if let Some(channels) = channels
        && channels != 1
    {
        return Err(invalid("start", format!("unsupported channel count {channels}; streams are mono")));
    }
    Ok(format)
}

/// Renders our messages for one stream in its dialect.
#[derive(Debug, Clone)]
pub struct Outbound {
    stream_sid: String,
    dialect: Dialect,
}

impl Outbound {
    pub fn new(stream_sid: String, dialect: Dialect) -> Self {
        Self { stream_sid, dialect }
    }

    fn with_sid(&self, mut m: Map<String, Value>) -> Value {
        let key = match self.dialect {
            Dialect::Twilio => "streamSid",
            Dialect::Telnyx => "stream_id",
        };
        m.insert(key.into(), Value::String(self.stream_sid.clone()));
        Value::Object(m)
    }

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// `media`: agent audio (one frame) to play.
    pub fn media(&self, audio: &[u8]) -> Value {
        let payload = base64::engine::general_purpose::STANDARD.encode(audio);
        self.with_sid(Self::object(json!({"event": "media", "media": {"payload": payload}})))
    }

    /// `mark`: the gateway echoes it once everything sent before it has played.
    pub fn mark(&self, name: &str) -> Value {
        self.with_sid(Self::object(json!({"event": "mark", "mark": {"name": name}})))
    }

    /// `clear`: drop the audio the gateway has buffered (barge-in).
    pub fn clear(&self) -> Value {
        self.with_sid(Self::object(json!({"event": "clear"})))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_start_is_parsed() {
        let msg = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC11","streamSid":"MZ22","callSid":"CA33",
            "tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},
            "customParameters":{"instructions":"Be a pirate.","n":5}},"streamSid":"MZ22"}"#;
        let Ok(Inbound::Start(s)) = parse(msg) else { panic!("{:?}", parse(msg)) };
        assert_eq!(s.stream_sid, "MZ22");
        assert_eq!(s.call_sid.as_deref(), Some("CA33"));
        assert_eq!(s.account_sid.as_deref(), Some("AC11"));
        assert_eq!(s.tracks, vec!["inbound".to_string()]);
        assert_eq!(s.format, AudioFormat::Pcmu);
        assert_eq!(s.dialect, Dialect::Twilio);
        // Only string parameters are kept.
        assert_eq!(s.custom_parameters.len(), 1);
        assert_eq!(s.custom_parameters["instructions"], "Be a pirate.");
    }

    #[test]
    fn telnyx_start_is_parsed() {
        let msg = r#"{"event":"start","sequence_number":"1","start":{"user_id":"u","call_control_id":"v3:abc",
            "media_format":{"encoding":"PCMA","sample_rate":8000,"channels":1}},"stream_id":"32de0dea"}"#;
        let Ok(Inbound::Start(s)) = parse(msg) else { panic!("{:?}", parse(msg)) };
        assert_eq!(s.stream_sid, "32de0dea");
        assert_eq!(s.call_sid.as_deref(), Some("v3:abc"));
        assert_eq!(s.format, AudioFormat::Pcma);
        assert_eq!(s.dialect, Dialect::Telnyx);
        assert_eq!(Outbound::new(s.stream_sid, s.dialect).clear(), json!({"event": "clear", "stream_id": "32de0dea"}));
    }

    #[test]
    fn unsupported_formats_are_refused() {
        for f in [r#"{"encoding":"audio/opus","sampleRate":8000}"#, r#"{"encoding":"audio/x-mulaw","sampleRate":16000}"#, r#"{"encoding":"audio/x-mulaw","channels":2}"#] {
            let msg = format!(r#"{{"event":"start","start":{{"streamSid":"MZ1","mediaFormat":{f}}}}}"#);
            assert!(matches!(parse(&msg), Err(ParseError::Invalid { event: "start", .. })), "{f}: {:?}", parse(&msg));
        }
        assert!(matches!(parse(r#"{"event":"start","start":{"callSid":"CA1"}}"#), Err(ParseError::Invalid { .. })));
    }

    #[test]
    fn media_mark_dtmf_stop_and_unknown() {
        let m = parse(r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"/39+"},"streamSid":"MZ1"}"#);
        assert_eq!(m, Ok(Inbound::Media { track: Some("inbound".into()), payload: vec![0xff, 0x7f, 0x7e] }));
        assert_eq!(parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"resp_1"}}"#), Ok(Inbound::Mark { name: "resp_1".into() }));
        assert_eq!(parse(r##"{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"#"}}"##), Ok(Inbound::Dtmf { digit: '#' }));
        assert_eq!(parse(r#"{"event":"stop","stop":{"callSid":"CA1"},"streamSid":"MZ1"}"#), Ok(Inbound::Stop));
        assert_eq!(parse(r#"{"event":"dance"}"#), Ok(Inbound::Unknown("dance".into())));
        assert_eq!(parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#), Ok(Inbound::Connected));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(parse("{not json"), Err(ParseError::InvalidJson(_))));
        assert_eq!(parse(r#"{"type":"media"}"#), Err(ParseError::MissingEvent));
        assert!(matches!(parse(r#"{"event":"media","media":{"payload":"***"}}"#), Err(ParseError::Invalid { event: "media", .. })));
        assert!(matches!(parse(r#"{"event":"media"}"#), Err(ParseError::Invalid { event: "media", .. })));
        assert!(matches!(parse(r#"{"event":"dtmf","dtmf":{"digit":"12"}}"#), Err(ParseError::Invalid { event: "dtmf", .. })));
        assert!(matches!(parse(r#"{"event":"dtmf","dtmf":{"digit":"x"}}"#), Err(ParseError::Invalid { event: "dtmf", .. })));
        assert!(matches!(parse(r#"{"event":"mark","mark":{}}"#), Err(ParseError::Invalid { event: "mark", .. })));
    }

    #[test]
    fn outbound_messages_have_the_twilio_shape() {
        let out = Outbound::new("MZ9".into(), Dialect::Twilio);
        assert_eq!(out.media(&[0xff, 0x7f, 0x7e]), json!({"event": "media", "streamSid": "MZ9", "media": {"payload": "/39+"}}));
        assert_eq!(out.mark("resp_1"), json!({"event": "mark", "streamSid": "MZ9", "mark": {"name": "resp_1"}}));
        assert_eq!(out.clear(), json!({"event": "clear", "streamSid": "MZ9"}));
    }
}
