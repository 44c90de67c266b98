//! Client events of the OpenAI Realtime protocol, parsed leniently: the GA shapes
//! and the older beta shapes both work, unknown fields are ignored, and every
//! problem becomes a [`ProtocolError`] that the handler turns into an `error` event.
//!
//! Only serde, serde_json, base64 and thiserror: no type of the model stack, so the
//! fuzz targets in `bench/fuzz/` compile this file in as it is.

use serde::Deserialize;
use serde_json::Value;

/// A client event the server understands.
#[derive(Debug)]
pub enum ClientEvent {
    /// `session.update`.
    SessionUpdate(Box<SessionPatch>),
    /// `input_audio_buffer.append`: base64 audio, decoded.
    Append(Vec<u8>),
    /// `input_audio_buffer.commit`.
    Commit,
    /// `input_audio_buffer.clear`.
    Clear,
    /// `conversation.item.create` of a user text message.
    UserText(String),
    /// `response.create` (with its `response` options, if any).
    ResponseCreate(Option<ResponseRequest>),
    /// `conversation.item.truncate`: playback of an assistant item stopped here.
    Truncate { item_id: String, audio_end_ms: u64 },
    /// `response.cancel`.
    ResponseCancel,
    /// `output_audio_buffer.clear`: the client wants agent audio to stop.
    OutputClear,
    /// `conversation.item.create` of a `function_call_output`: a client tool's result.
    FunctionOutput { call_id: String, output: String },
}

/// The `response` options of a `response.create` that Parley acts on; the handler
/// makes the call's `parley_agent::ResponseOptions` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRequest {
    /// Instructions for this response only, instead of the session's.
    pub instructions: Option<String>,
    /// `false` plays the whole reply even if the caller speaks (Parley's extension).
    pub interruptible: bool,
}

impl Default for ResponseRequest {
    fn default() -> Self {
        Self { instructions: None, interruptible: true }
    }
}

/// Why a client message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the event has no string `type` field")]
    MissingType,
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("invalid `{event}` event: {reason}")]
    InvalidEvent { event: String, reason: String },
    #[error("`{0}` is not supported by this server yet")]
    Unsupported(String),
}

impl ProtocolError {
    /// The `error.code` sent to clients.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::MissingType => "missing_type",
            Self::UnknownType(_) => "unknown_event",
            Self::InvalidEvent { .. } => "invalid_event",
            Self::Unsupported(_) => "unsupported_event",
        }
    }
}

/// The changes a `session.update` asks for; `None` leaves a setting as it is.
#[derive(Debug, Default, Deserialize)]
pub struct SessionPatch {
    pub instructions: Option<String>,
    /// GA: `audio.input` / `audio.output`.
    pub audio: Option<AudioPatch>,
    /// Beta: `"pcm16" | "g711_ulaw" | "g711_alaw" | "opus"` (`opus`: Parley's extension).
    pub input_audio_format: Option<String>,
    /// Beta.
    pub output_audio_format: Option<String>,
    /// Beta place of turn detection; `null` turns it off.
    #[serde(default, deserialize_with = "explicit_null")]
    pub turn_detection: Option<Option<TurnDetectionPatch>>,
    /// Beta voice.
    pub voice: Option<String>,
    /// GA name of the reply length limit.
    pub max_output_tokens: Option<Value>,
    /// Beta name.
    pub max_response_output_tokens: Option<Value>,
    pub temperature: Option<f64>,
    /// Client tools: `[{"type": "function", "name", "description", "parameters"}]`.
    pub tools: Option<Vec<ToolPatch>>,
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "name": ...}`.
    pub tool_choice: Option<Value>,
}

/// One client tool declaration.
#[derive(Debug, Deserialize)]
pub struct ToolPatch {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// `session.audio` in the GA protocol.
#[derive(Debug, Default, Deserialize)]
pub struct AudioPatch {
    pub input: Option<AudioInputPatch>,
    pub output: Option<AudioOutputPatch>,
}

/// `session.audio.input`.
#[derive(Debug, Default, Deserialize)]
pub struct AudioInputPatch {
    pub format: Option<FormatPatch>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub turn_detection: Option<Option<TurnDetectionPatch>>,
}

/// `session.audio.output`.
#[derive(Debug, Default, Deserialize)]
pub struct AudioOutputPatch {
    pub format: Option<FormatPatch>,
    pub voice: Option<String>,
}

/// `{"type": "audio/pcm", "rate": 24000}` and friends (`audio/opus`, 48 kHz, is Parley's extension).
#[derive(Debug, Deserialize)]
pub struct FormatPatch {
    #[serde(rename = "type")]
    pub kind: String,
    pub rate: Option<u32>,
}

/// `turn_detection` settings.
#[derive(Debug, Default, Deserialize)]
pub struct TurnDetectionPatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub threshold: Option<f32>,
    pub prefix_padding_ms: Option<u32>,
    pub silence_duration_ms: Option<u32>,
    pub create_response: Option<bool>,
    pub interrupt_response: Option<bool>,
    /// `semantic_vad`: low | medium | high | auto.
    pub eagerness: Option<String>,
    /// Parley: longest silence before committing a turn that sounds unfinished.
    pub unfinished_silence_ms: Option<u32>,
    /// Parley: silence after which a turn that reads as a finished question ends.
    pub complete_silence_ms: Option<u32>,
    /// Parley: how often partial transcripts are made (0 = off).
    pub partial_interval_ms: Option<u32>,
    /// Parley: how speech during a reply is judged.
    pub interruption: Option<InterruptionPatch>,
}

/// Parley's barge-in settings inside `turn_detection.interruption`.
#[derive(Debug, Default, Deserialize)]
pub struct InterruptionPatch {
    pub min_pause_ms: Option<u32>,
    pub backchannels: Option<Vec<String>>,
    pub echo_guard: Option<bool>,
    pub echo_correlation: Option<f32>,
}

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Parses one text message from the client. Returns the client's `event_id` (if
/// any) alongside, so errors can point at the event that caused them.
pub fn parse(text: &str) -> (Option<String>, Result<ClientEvent, ProtocolError>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return (None, Err(ProtocolError::InvalidJson(e.to_string()))),
    };
    let event_id = value.get("event_id").and_then(Value::as_str).map(str::to_owned);
    (event_id, parse_value(value))
}

fn invalid(event: &str, reason: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::InvalidEvent { event: event.to_string(), reason: reason.to_string() }
}

fn parse_value(mut value: Value) -> Result<ClientEvent, ProtocolError> {
    let kind = value.get("type").and_then(Value::as_str).ok_or(ProtocolError::MissingType)?.to_string();
    match kind.as_str() {
        "session.update" => {
            let session = value.get_mut("session").map(Value::take).unwrap_or(Value::Object(Default::default()));
            let patch: SessionPatch = serde_json::from_value(session).map_err(|e| invalid(&kind, e))?;
            Ok(ClientEvent::SessionUpdate(Box::new(patch)))
        }
        "input_audio_buffer.append" => {
            let audio = value.get("audio").and_then(Value::as_str).ok_or_else(|| invalid(&kind, "`audio` must be a base64 string"))?;
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(audio)
                .map_err(|e| invalid(&kind, format!("`audio` is not valid base64: {e}")))?;
            Ok(ClientEvent::Append(bytes))
        }
        "input_audio_buffer.commit" => Ok(ClientEvent::Commit),
        "input_audio_buffer.clear" => Ok(ClientEvent::Clear),
        "response.create" => Ok(ClientEvent::ResponseCreate(response_options(&value, &kind)?)),
        "response.cancel" => Ok(ClientEvent::ResponseCancel),
        "output_audio_buffer.clear" => Ok(ClientEvent::OutputClear),
        "conversation.item.create" => parse_item_create(&value, &kind),
        "conversation.item.truncate" => {
            let item_id = value.get("item_id").and_then(Value::as_str).ok_or_else(|| invalid(&kind, "missing `item_id`"))?;
            let audio_end_ms = value.get("audio_end_ms").and_then(Value::as_u64).ok_or_else(|| invalid(&kind, "`audio_end_ms` must be a non-negative integer"))?;
            Ok(ClientEvent::Truncate { item_id: item_id.to_string(), audio_end_ms })
        }
        "conversation.item.delete" | "conversation.item.retrieve" | "transcription_session.update" => {
            Err(ProtocolError::Unsupported(kind))
        }
        _ => Err(ProtocolError::UnknownType(kind)),
    }
}

/// The options of `response.create` Parley acts on: `instructions` for this reply,
/// and `interruptible: false` (a Parley extension) for a reply that must play to the end.
fn response_options(value: &Value, kind: &str) -> Result<Option<ResponseRequest>, ProtocolError> {
    let Some(response) = value.get("response").filter(|r| !r.is_null()) else { return Ok(None) };
    let mut options = ResponseRequest::default();
    match response.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => options.instructions = Some(s.clone()),
        Some(_) => return Err(invalid(kind, "`response.instructions` must be a string")),
    }
    match response.get("interruptible") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => options.interruptible = *b,
        Some(_) => return Err(invalid(kind, "`response.interruptible` must be true or false")),
    }
    Ok(Some(options))
}

fn parse_item_create(value: &Value, kind: &str) -> Result<ClientEvent, ProtocolError> {
    let item = value.get("item").ok_or_else(|| invalid(kind, "missing `item`"))?;
    let item_type = item.get("type").and_then(Value::as_str).unwrap_or("message");
    if item_type == "function_call_output" {
        let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| invalid(kind, "a function_call_output needs `call_id`"))?;
        let output = match item.get("output") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(invalid(kind, "a function_call_output needs `output`")),
        };
        return Ok(ClientEvent::FunctionOutput { call_id: call_id.to_string(), output });
    }
    if item_type != "message" {
        return Err(ProtocolError::Unsupported(format!("conversation.item.create of type {item_type}")));
    }
    let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
    if role != "user" {
        return Err(ProtocolError::Unsupported(format!("conversation.item.create with role {role}")));
    }
    let content = item.get("content").and_then(Value::as_array).ok_or_else(|| invalid(kind, "`item.content` must be an array"))?;
    let mut text = String::new();
    for part in content {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "text") => {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    if !text.is_empty() {
                        text.push(' ');
                    }
                    text.push_str(t);
                }
            }
            Some(other) => return Err(ProtocolError::Unsupported(format!("content part of type {other}"))),
            None => return Err(invalid(kind, "every content part needs a `type`")),
        }
    }
    if text.trim().is_empty() {
        return Err(invalid(kind, "the message has no text"));
    }
    Ok(ClientEvent::UserText(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_append_and_rejects_bad_base64() {
        let (id, ev) = parse(r#"{"type":"input_audio_buffer.append","event_id":"e1","audio":"AAEC"}"#);
        assert_eq!(id.as_deref(), Some("e1"));
        assert!(matches!(ev, Ok(ClientEvent::Append(b)) if b == vec![0, 1, 2]));
        let (_, ev) = parse(r#"{"type":"input_audio_buffer.append","audio":"%%%"}"#);
        assert!(matches!(ev, Err(ProtocolError::InvalidEvent { .. })));
    }

    #[test]
    fn malformed_and_unknown() {
        assert!(matches!(parse("{nope").1, Err(ProtocolError::InvalidJson(_))));
        assert!(matches!(parse(r#"{"a":1}"#).1, Err(ProtocolError::MissingType)));
        assert!(matches!(parse(r#"{"type":"made.up"}"#).1, Err(ProtocolError::UnknownType(t)) if t == "made.up"));
    }

    #[test]
    fn session_update_ga_and_beta_shapes() {
        let (_, ev) = parse(r#"{"type":"session.update","session":{"type":"realtime","instructions":"hi",
            "audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":null},"output":{"format":{"type":"audio/pcm","rate":24000}}}}}"#);
        let Ok(ClientEvent::SessionUpdate(p)) = ev else { panic!("not parsed") };
        assert_eq!(p.instructions.as_deref(), Some("hi"));
        let input = p.audio.and_then(|a| a.input).expect("input");
        assert_eq!(input.format.expect("format").kind, "audio/pcmu");
        assert!(matches!(input.turn_detection, Some(None)));
        let (_, ev) = parse(r#"{"type":"session.update","session":{"input_audio_format":"g711_alaw","turn_detection":{"type":"server_vad","silence_duration_ms":800}}}"#);
        let Ok(ClientEvent::SessionUpdate(p)) = ev else { panic!("not parsed") };
        assert_eq!(p.input_audio_format.as_deref(), Some("g711_alaw"));
        assert_eq!(p.turn_detection.flatten().and_then(|t| t.silence_duration_ms), Some(800));
    }

    #[test]
    fn response_create_options() {
        assert!(matches!(parse(r#"{"type":"response.create"}"#).1, Ok(ClientEvent::ResponseCreate(None))));
        assert!(matches!(parse(r#"{"type":"response.create","response":null}"#).1, Ok(ClientEvent::ResponseCreate(None))));
        let (_, ev) = parse(r#"{"type":"response.create","response":{"instructions":"Be brief."}}"#);
        let Ok(ClientEvent::ResponseCreate(Some(r))) = ev else { panic!("not parsed") };
        assert_eq!(r, ResponseRequest { instructions: Some("Be brief.".into()), interruptible: true });
        let (_, ev) = parse(r#"{"type":"response.create","response":{"interruptible":false}}"#);
        assert!(matches!(ev, Ok(ClientEvent::ResponseCreate(Some(ResponseRequest { instructions: None, interruptible: false })))));
        assert!(matches!(parse(r#"{"type":"response.create","response":{"interruptible":"no"}}"#).1, Err(ProtocolError::InvalidEvent { .. })));
    }

    #[test]
    fn item_create_text() {
        let (_, ev) = parse(r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Hello"}]}}"#);
        assert!(matches!(ev, Ok(ClientEvent::UserText(t)) if t == "Hello"));
    }
}
