//! Realtime client events as a WebSocket text frame carries them (the input as
//! UTF-8, lossily, as the NDJSON stream also hands lines over): the server's own
//! parser, compiled in from server/src/realtime/client_events.rs.
//!
//! Beyond "no panic": the `event_id` returned is the message's own; a parsed event
//! came from valid JSON whose `type` names it; appended audio is what its base64
//! says; user text is never blank; every error has a code and renders.
//!
//! Not here: applying a `session.update` (server/src/realtime/session_config.rs),
//! which builds `parley_agent::SessionSettings` and so needs the model stack
//! (whisper.cpp, candle, ONNX Runtime) in the build. The patch types it reads are
//! fuzzed here; the server's unit test `session_config::tests::seed_patches_apply_or_refuse_cleanly`
//! runs the seed corpus of this target through `apply`.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[allow(dead_code)]
#[path = "../../../server/src/realtime/client_events.rs"]
mod client_events;

use client_events::{ClientEvent, ProtocolError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
});

fn check(text: &str) {
    let (event_id, parsed) = client_events::parse(text);
    let value: Option<Value> = serde_json::from_str(text).ok();
    let expected_id = value.as_ref().and_then(|v| v.get("event_id")).and_then(Value::as_str);
    assert_eq!(event_id.as_deref(), expected_id);
    let kind = value.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str);
    match parsed {
        Ok(event) => {
            let kind = kind.expect("a parsed event has a string type");
            let expected = match &event {
                ClientEvent::SessionUpdate(_) => "session.update",
                ClientEvent::Append(bytes) => {
                    let audio = value.as_ref().and_then(|v| v.get("audio")).and_then(Value::as_str).expect("append has audio");
                    // The standard engine takes canonical base64 only, so it encodes back the same.
                    assert_eq!(base64::engine::general_purpose::STANDARD.encode(bytes), audio);
                    "input_audio_buffer.append"
                }
                ClientEvent::Commit => "input_audio_buffer.commit",
                ClientEvent::Clear => "input_audio_buffer.clear",
                ClientEvent::UserText(t) => {
                    assert!(!t.trim().is_empty(), "blank user text accepted");
                    "conversation.item.create"
                }
                ClientEvent::FunctionOutput { .. } => "conversation.item.create",
                ClientEvent::ResponseCreate(_) => "response.create",
                ClientEvent::Truncate { .. } => "conversation.item.truncate",
                ClientEvent::ResponseCancel => "response.cancel",
                ClientEvent::OutputClear => "output_audio_buffer.clear",
            };
            assert_eq!(kind, expected);
            let _ = format!("{event:?}");
        }
        Err(e) => {
            match &e {
                ProtocolError::InvalidJson(_) => assert!(value.is_none()),
                ProtocolError::MissingType => assert!(value.is_some() && kind.is_none()),
                ProtocolError::UnknownType(t) => assert_eq!(Some(t.as_str()), kind),
                ProtocolError::InvalidEvent { event, .. } => assert_eq!(Some(event.as_str()), kind),
                ProtocolError::Unsupported(_) => assert!(kind.is_some()),
            }
            assert!(!e.code().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
}
