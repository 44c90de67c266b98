//! `session.update` applied to a call's settings, and the session object the
//! server reports back in `session.created` / `session.updated`.

use parley_agent::{SessionSettings, TurnDetection};
use parley_audio::format::{AudioFormat, OPUS_RATE};
use serde_json::{Value, json};

use super::client_events::{FormatPatch, ProtocolError, SessionPatch, TurnDetectionPatch};
use super::Dialect;

fn invalid(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidEvent { event: "session.update".into(), reason: reason.into() }
}

/// PCM rates the pipeline resamples from and to.
const PCM_RATES: [u32; 4] = [8_000, 16_000, 24_000, 48_000];

fn ga_format(f: &FormatPatch) -> Result<AudioFormat, ProtocolError> {
    match f.kind.as_str() {
        "audio/pcm" => {
            let rate = f.rate.unwrap_or(24_000);
            if PCM_RATES.contains(&rate) {
                Ok(AudioFormat::Pcm16 { rate })
            } else {
                Err(invalid(format!("audio/pcm rate {rate} is not supported; use one of {PCM_RATES:?}")))
            }
        }
        "audio/pcmu" => Ok(AudioFormat::Pcmu),
        "audio/pcma" => Ok(AudioFormat::Pcma),
        // Parley's extension: one Opus packet per message, always 48 kHz mono.
        "audio/opus" => match f.rate {
            None | Some(OPUS_RATE) => Ok(AudioFormat::Opus),
            Some(rate) => Err(invalid(format!("audio/opus rate {rate} is not supported; Opus is spoken at {OPUS_RATE} Hz only"))),
        },
        other => Err(invalid(format!("unknown audio format `{other}`; use audio/pcm, audio/pcmu, audio/pcma or audio/opus"))),
    }
}

fn beta_format(name: &str) -> Result<AudioFormat, ProtocolError> {
    match name {
        "pcm16" => Ok(AudioFormat::Pcm16 { rate: 24_000 }),
        "g711_ulaw" => Ok(AudioFormat::Pcmu),
        "g711_alaw" => Ok(AudioFormat::Pcma),
        "opus" => Ok(AudioFormat::Opus),
        other => Err(invalid(format!("unknown audio format `{other}`; use pcm16, g711_ulaw, g711_alaw or opus"))),
    }
}

fn apply_turn_detection(current: &Option<TurnDetection>, patch: Option<TurnDetectionPatch>, defaults: &SessionSettings) -> Result<Option<TurnDetection>, ProtocolError> {
    let Some(p) = patch else { return Ok(None) };
    let mut td = current.clone().or_else(|| defaults.turn_detection.clone()).unwrap_or_default();
    match p.kind.as_deref().unwrap_or("server_vad") {
        "server_vad" => {}
        "semantic_vad" => {
            // No semantic end-of-turn model yet: map eagerness onto the silence window.
            td.vad.silence_duration_ms = match p.eagerness.as_deref().unwrap_or("auto") {
                "high" => 300,
                "low" => 1200,
                _ => 600,
            };
        }
        other => return Err(invalid(format!("unknown turn_detection type `{other}`; use server_vad"))),
    }
    if let Some(t) = p.threshold {
        if !(0.0..=1.0).contains(&t) {
            return Err(invalid(format!("turn_detection.threshold must be between 0 and 1, not {t}")));
        }
        td.vad.threshold = t;
    }
    if let Some(v) = p.prefix_padding_ms {
        td.vad.prefix_padding_ms = v.min(2_000);
    }
    if let Some(v) = p.silence_duration_ms {
        if !(100..=10_000).contains(&v) {
            return Err(invalid(format!("turn_detection.silence_duration_ms must be 100..=10000, not {v}")));
        }
        td.vad.silence_duration_ms = v;
    }
    if let Some(v) = p.create_response {
        td.create_response = v;
    }
    if let Some(v) = p.interrupt_response {
        td.interrupt_response = v;
    }
    if let Some(v) = p.unfinished_silence_ms {
        if !(100..=10_000).contains(&v) {
            return Err(invalid(format!("turn_detection.unfinished_silence_ms must be 100..=10000, not {v}")));
        }
        td.unfinished_silence_ms = v;
    }
    if let Some(v) = p.complete_silence_ms {
        if !(100..=10_000).contains(&v) {
            return Err(invalid(format!("turn_detection.complete_silence_ms must be 100..=10000, not {v}")));
        }
        td.complete_silence_ms = v;
    }
    if let Some(v) = p.partial_interval_ms {
        if v != 0 && v < 200 {
            return Err(invalid(format!("turn_detection.partial_interval_ms must be 0 (off) or at least 200, not {v}")));
        }
        td.partial_interval_ms = v;
    }
    if let Some(i) = p.interruption {
        if let Some(v) = i.min_pause_ms {
            td.interruption.min_pause_ms = v.min(5_000);
        }
        if let Some(v) = i.backchannels {
            td.interruption.backchannels = v;
        }
        if let Some(v) = i.echo_guard {
            td.interruption.echo_guard = v;
        }
        if let Some(v) = i.echo_correlation {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(format!("turn_detection.interruption.echo_correlation must be between 0 and 1, not {v}")));
            }
            td.interruption.echo_correlation = v;
        }
    }
    Ok(Some(td))
}

fn max_tokens(v: &Value) -> Result<usize, ProtocolError> {
    match v {
        Value::String(s) if s == "inf" => Ok(1024),
        Value::Number(n) => n
            .as_u64()
            .filter(|n| (1..=4096).contains(n))
            .map(|n| n as usize)
            .ok_or_else(|| invalid("max_output_tokens must be 1..=4096 or \"inf\"")),
        _ => Err(invalid("max_output_tokens must be a number or \"inf\"")),
    }
}

/// Returns `current` with the patch applied; nothing changes when it fails.
pub fn apply(current: &SessionSettings, patch: SessionPatch, defaults: &SessionSettings) -> Result<SessionSettings, ProtocolError> {
    let mut s = current.clone();
    if let Some(i) = patch.instructions {
        s.instructions = i;
    }
    if let Some(f) = patch.input_audio_format.as_deref() {
        s.input_format = beta_format(f)?;
    }
    if let Some(f) = patch.output_audio_format.as_deref() {
        s.output_format = beta_format(f)?;
    }
    if let Some(td) = patch.turn_detection {
        s.turn_detection = apply_turn_detection(&s.turn_detection, td, defaults)?;
    }
    if let Some(v) = patch.voice {
        s.voice = v;
    }
    if let Some(audio) = patch.audio {
        if let Some(input) = audio.input {
            if let Some(f) = input.format.as_ref() {
                s.input_format = ga_format(f)?;
            }
            if let Some(td) = input.turn_detection {
                s.turn_detection = apply_turn_detection(&s.turn_detection, td, defaults)?;
            }
        }
        if let Some(output) = audio.output {
            if let Some(f) = output.format.as_ref() {
                s.output_format = ga_format(f)?;
            }
            if let Some(v) = output.voice {
                s.voice = v;
            }
        }
    }
    if let Some(v) = patch.max_output_tokens.as_ref().or(patch.max_response_output_tokens.as_ref()) {
        s.generate.max_tokens = max_tokens(v)?;
    }
    if let Some(tools) = patch.tools {
        let mut specs = Vec::with_capacity(tools.len());
        for t in tools {
            if t.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(invalid(format!("tool `{}` has type `{}`; only function tools are supported", t.name, t.kind.unwrap_or_default())));
            }
            if t.name.is_empty() || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(invalid(format!("tool name `{}` must be letters, digits, `_` or `-`", t.name)));
            }
            specs.push(parley_llm::ToolSpec {
                name: t.name,
                description: t.description,
                parameters: t.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
        }
        s.client_tools = specs;
    }
    if let Some(choice) = patch.tool_choice {
        use parley_llm::ToolChoice;
        s.tools_enabled = choice.as_str() != Some("none");
        s.generate.tool_choice = match (&choice, choice.as_str()) {
            (_, Some("auto" | "none")) => ToolChoice::Auto,
            (_, Some("required")) => ToolChoice::Required,
            (Value::Object(o), _) if o.get("type").and_then(Value::as_str) == Some("function") => {
                // Realtime's `{"type": "function", "name": ...}`; the Chat API nests it.
                let name = o.get("name").or_else(|| o.get("function").and_then(|f| f.get("name"))).and_then(Value::as_str);
                match name {
                    Some(name) if !name.trim().is_empty() => ToolChoice::Function(name.to_string()),
                    _ => return Err(invalid("tool_choice of type function needs a name")),
                }
            }
            _ => return Err(invalid(format!("tool_choice must be \"auto\", \"none\", \"required\" or a function, not {choice}"))),
        };
    }
    if let Some(t) = patch.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(invalid(format!("temperature must be between 0 and 2, not {t}")));
        }
        s.generate.temperature = t;
    }
    Ok(s)
}

/// The session's `tool_choice` as the Realtime API writes it.
fn tool_choice_json(s: &SessionSettings) -> Value {
    use parley_llm::ToolChoice;
    match &s.generate.tool_choice {
        _ if !s.tools_enabled => json!("none"),
        ToolChoice::Auto | ToolChoice::None => json!("auto"),
        ToolChoice::Required | ToolChoice::RequiredNamed => json!("required"),
        ToolChoice::Function(name) => json!({"type": "function", "name": name}),
    }
}

fn ga_format_json(f: AudioFormat) -> Value {
    match f {
        AudioFormat::Pcm16 { rate } => json!({"type": "audio/pcm", "rate": rate}),
        AudioFormat::Pcmu => json!({"type": "audio/pcmu"}),
        AudioFormat::Pcma => json!({"type": "audio/pcma"}),
        AudioFormat::Opus => json!({"type": "audio/opus", "rate": OPUS_RATE}),
    }
}

fn beta_format_name(f: AudioFormat) -> &'static str {
    match f {
        AudioFormat::Pcm16 { .. } => "pcm16",
        AudioFormat::Pcmu => "g711_ulaw",
        AudioFormat::Pcma => "g711_alaw",
        AudioFormat::Opus => "opus",
    }
}

fn turn_detection_json(td: &Option<TurnDetection>) -> Value {
    match td {
        None => Value::Null,
        Some(t) => json!({
            "type": "server_vad",
            "threshold": t.vad.threshold,
            "prefix_padding_ms": t.vad.prefix_padding_ms,
            "silence_duration_ms": t.vad.silence_duration_ms,
            "create_response": t.create_response,
            "interrupt_response": t.interrupt_response,
            "unfinished_silence_ms": t.unfinished_silence_ms,
            "complete_silence_ms": t.complete_silence_ms,
            "partial_interval_ms": t.partial_interval_ms,
            "interruption": {
                "min_pause_ms": t.interruption.min_pause_ms,
                "backchannels": t.interruption.backchannels,
                "echo_guard": t.interruption.echo_guard,
                "echo_correlation": t.interruption.echo_correlation,
            },
        }),
    }
}

fn tools_json(s: &SessionSettings) -> Value {
    s.client_tools.iter().map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters})).collect()
}

/// The session object in the client's dialect.
pub fn session_json(id: &str, s: &SessionSettings, dialect: Dialect) -> Value {
    match dialect {
        Dialect::Ga => json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": id,
            "model": "parley",
            "output_modalities": ["audio"],
            "instructions": s.instructions,
            "audio": {
                "input": {
                    "format": ga_format_json(s.input_format),
                    "turn_detection": turn_detection_json(&s.turn_detection),
                    "transcription": {"model": "whisper-tiny.en"},
                },
                "output": {"format": ga_format_json(s.output_format), "voice": s.voice, "speed": 1.0},
            },
            "tools": tools_json(s),
            "tool_choice": tool_choice_json(s),
            "max_output_tokens": s.generate.max_tokens,
        }),
        Dialect::Beta => json!({
            "object": "realtime.session",
            "id": id,
            "model": "parley",
            "modalities": ["audio", "text"],
            "instructions": s.instructions,
            "voice": s.voice,
            "input_audio_format": beta_format_name(s.input_format),
            "output_audio_format": beta_format_name(s.output_format),
            "input_audio_transcription": {"model": "whisper-tiny.en"},
            "turn_detection": turn_detection_json(&s.turn_detection),
            "tools": tools_json(s),
            "tool_choice": tool_choice_json(s),
            "temperature": s.generate.temperature,
            "max_response_output_tokens": s.generate.max_tokens,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::client_events::{ClientEvent, parse};

    fn patch(json: &str) -> SessionPatch {
        match parse(json).1 {
            Ok(ClientEvent::SessionUpdate(p)) => *p,
            other => panic!("not a session.update: {other:?}"),
        }
    }

    /// The Realtime seeds of the fuzz target `realtime_client_events` through `apply`
    /// (which the fuzz build cannot reach: it would need the model stack): every
    /// `session.update` among them applies or is refused with an `invalid_event`, and
    /// what the server reports back in either dialect is itself a valid update that
    /// settles (applying the report of the result changes nothing more).
    #[test]
    fn seed_patches_apply_or_refuse_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/fuzz/seeds/realtime_client_events");
        let entries = std::fs::read_dir(&dir).expect("the fuzz seeds");
        let d = SessionSettings::default();
        let mut updates = 0;
        for entry in entries {
            let path = entry.expect("entry").path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).expect("seed")).into_owned();
            let Ok(ClientEvent::SessionUpdate(p)) = parse(&text).1 else { continue };
            updates += 1;
            let s = match apply(&d, *p, &d) {
                Ok(s) => s,
                Err(e) => {
                    assert_eq!(e.code(), "invalid_event", "{}", path.display());
                    continue;
                }
            };
            for dialect in [Dialect::Ga, Dialect::Beta] {
                let report = |s: &SessionSettings| patch(&json!({"type": "session.update", "session": session_json("s", s, dialect)}).to_string());
                let s1 = apply(&s, report(&s), &d).unwrap_or_else(|e| panic!("{}: our own report refused: {e}", path.display()));
                let s2 = apply(&s1, report(&s1), &d).expect("valid");
                assert_eq!(s1, s2, "{} ({dialect:?})", path.display());
            }
        }
        assert!(updates >= 3, "{updates} session.update seeds in {}", dir.display());
    }

    #[test]
    fn ga_update_changes_formats_and_vad() {
        let d = SessionSettings::default();
        let s = apply(&d, patch(r#"{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcmu"},
            "turn_detection":{"type":"server_vad","silence_duration_ms":700,"threshold":0.6}}}}}"#), &d).expect("valid");
        assert_eq!(s.input_format, AudioFormat::Pcmu);
        assert_eq!(s.output_format, d.output_format);
        let td = s.turn_detection.expect("vad on");
        assert_eq!(td.vad.silence_duration_ms, 700);
        assert!((td.vad.threshold - 0.6).abs() < 1e-6);
    }

    #[test]
    fn null_turn_detection_turns_it_off_and_bad_rate_is_refused() {
        let d = SessionSettings::default();
        let s = apply(&d, patch(r#"{"type":"session.update","session":{"turn_detection":null}}"#), &d).expect("valid");
        assert!(s.turn_detection.is_none());
        let e = apply(&d, patch(r#"{"type":"session.update","session":{"audio":{"output":{"format":{"type":"audio/pcm","rate":11025}}}}}"#), &d);
        assert!(e.is_err());
    }

    #[test]
    fn opus_is_accepted_in_both_dialects_at_48_khz_only_and_echoed_back() {
        let d = SessionSettings::default();
        let s = apply(&d, patch(r#"{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/opus"}},
            "output":{"format":{"type":"audio/opus","rate":48000}}}}}"#), &d).expect("valid");
        assert_eq!((s.input_format, s.output_format), (AudioFormat::Opus, AudioFormat::Opus));
        let ga = session_json("s", &s, Dialect::Ga);
        assert_eq!(ga["audio"]["input"]["format"], json!({"type": "audio/opus", "rate": 48000}));
        assert_eq!(ga["audio"]["output"]["format"], json!({"type": "audio/opus", "rate": 48000}));

        let e = apply(&d, patch(r#"{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/opus","rate":16000}}}}}"#), &d);
        let message = e.expect_err("16 kHz Opus is refused").to_string();
        assert!(message.contains("audio/opus rate 16000") && message.contains("48000"), "{message}");

        let s = apply(&d, patch(r#"{"type":"session.update","session":{"input_audio_format":"opus","output_audio_format":"opus"}}"#), &d).expect("valid");
        assert_eq!((s.input_format, s.output_format), (AudioFormat::Opus, AudioFormat::Opus));
        let beta = session_json("s", &s, Dialect::Beta);
        assert_eq!((&beta["input_audio_format"], &beta["output_audio_format"]), (&json!("opus"), &json!("opus")));
    }
}
