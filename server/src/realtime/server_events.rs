//! Agent events rendered as Realtime server events, in the client's dialect.

use base64::Engine as _;
use parley_agent::{AgentEvent, ItemRole, TurnMetrics};
use serde_json::{Value, json};

use super::Dialect;
use super::session_config::session_json;

/// Renders server events for one connection; remembers whether the session was
/// already announced (`session.created` comes once, then `session.updated`).
pub struct EventWriter {
    dialect: Dialect,
    session_id: String,
    announced: bool,
    next_event: u64,
}

fn audio_part(dialect: Dialect, transcript: &str) -> Value {
    let kind = match dialect {
        Dialect::Ga => "output_audio",
        Dialect::Beta => "audio",
    };
    json!({"type": kind, "transcript": transcript})
}

fn assistant_item(dialect: Dialect, item_id: &str, status: &str, transcript: Option<&str>) -> Value {
    let content = match transcript {
        Some(t) => vec![audio_part(dialect, t)],
        None => Vec::new(),
    };
    json!({"id": item_id, "object": "realtime.item", "type": "message", "status": status, "role": "assistant", "content": content})
}

fn function_call_item(item_id: &str, call: &parley_llm::ToolCall, status: &str) -> Value {
    json!({"id": item_id, "object": "realtime.item", "type": "function_call", "status": status,
        "call_id": call.id, "name": call.name, "arguments": call.arguments.to_string()})
}

fn function_output_item(item_id: &str, call_id: &str, output: &str) -> Value {
    json!({"id": item_id, "object": "realtime.item", "type": "function_call_output", "call_id": call_id, "output": output})
}

fn user_item(item_id: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(t) => json!([{"type": "input_text", "text": t}]),
        None => json!([{"type": "input_audio", "transcript": null}]),
    };
    json!({"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user", "content": content})
}

fn metrics_json(m: &TurnMetrics) -> Value {
    json!({
        "response_id": m.response_id,
        "endpoint_ms": m.endpoint_ms,
        "transcript_ms": m.transcript_ms,
        "asr_ms": m.asr_ms,
        "first_token_ms": m.first_token_ms,
        "first_audio_ms": m.first_audio_ms,
        "first_tts_ms": m.first_tts_ms,
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
        "prefill_ms": m.prefill_ms,
        "generated_tokens": m.generated_tokens,
    })
}

impl EventWriter {
    /// A writer for a connection speaking `dialect`.
    pub fn new(dialect: Dialect, session_id: String) -> Self {
        Self { dialect, session_id, announced: false, next_event: 0 }
    }

    fn event_id(&mut self) -> String {
        self.next_event += 1;
        format!("event_{}_{}", &self.session_id[5.min(self.session_id.len())..], self.next_event)
    }

    fn name(&self, ga: &'static str, beta: &'static str) -> &'static str {
        match self.dialect {
            Dialect::Ga => ga,
            Dialect::Beta => beta,
        }
    }

    /// An `error` event.
    pub fn error(&mut self, kind: &str, code: &str, message: &str, client_event_id: Option<&str>) -> Value {
        json!({
            "type": "error",
            "event_id": self.event_id(),
            "error": {"type": kind, "code": code, "message": message, "param": null, "event_id": client_event_id},
        })
    }

    /// The server events for one agent event (some agent events map to several).
    pub fn render(&mut self, event: &AgentEvent) -> Vec<Value> {
        let d = self.dialect;
        let mut out: Vec<Value> = match event {
            AgentEvent::SessionUpdated(settings) => {
                let kind = if self.announced { "session.updated" } else { "session.created" };
                self.announced = true;
                vec![json!({"type": kind, "session": session_json(&self.session_id, settings, d)})]
            }
            AgentEvent::SpeechStarted { item_id, audio_start_ms } => {
                vec![json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": audio_start_ms, "item_id": item_id})]
            }
            AgentEvent::SpeechStopped { item_id, audio_end_ms } => {
                vec![json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": audio_end_ms, "item_id": item_id})]
            }
            AgentEvent::InputCommitted { item_id, previous_item_id } => {
                vec![json!({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous_item_id})]
            }
            AgentEvent::InputCleared => vec![json!({"type": "input_audio_buffer.cleared"})],
            AgentEvent::ItemAdded { item_id, previous_item_id, role, text } => {
                let item = match role {
                    ItemRole::User => user_item(item_id, text.as_deref()),
                    ItemRole::Assistant => assistant_item(d, item_id, "in_progress", None),
                };
                let mut events = vec![json!({"type": self.name("conversation.item.added", "conversation.item.created"), "previous_item_id": previous_item_id, "item": item})];
                if d == Dialect::Ga && text.is_some() {
                    events.push(json!({"type": "conversation.item.done", "previous_item_id": previous_item_id, "item": item}));
                }
                events
            }
            AgentEvent::UserTranscriptDelta { item_id, delta } => vec![json!({
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item_id, "content_index": 0, "delta": delta,
            })],
            AgentEvent::ItemTruncated { item_id, audio_end_ms } => vec![json!({
                "type": "conversation.item.truncated",
                "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms,
            })],
            AgentEvent::UserTranscript { item_id, transcript } => vec![json!({
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id, "content_index": 0, "transcript": transcript,
            })],
            AgentEvent::ResponseCreated { response_id } => vec![json!({
                "type": "response.created",
                "response": {"object": "realtime.response", "id": response_id, "status": "in_progress", "status_details": null, "output": []},
            })],
            AgentEvent::OutputItemAdded { response_id, item_id } => vec![
                json!({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": assistant_item(d, item_id, "in_progress", None)}),
                json!({"type": "response.content_part.added", "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "part": audio_part(d, "")}),
            ],
            AgentEvent::AudioDelta { response_id, item_id, audio } => vec![json!({
                "type": self.name("response.output_audio.delta", "response.audio.delta"),
                "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0,
                "delta": base64::engine::general_purpose::STANDARD.encode(audio),
            })],
            AgentEvent::TranscriptDelta { response_id, item_id, delta } => vec![json!({
                "type": self.name("response.output_audio_transcript.delta", "response.audio_transcript.delta"),
                "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta,
            })],
            AgentEvent::AudioDone { response_id, item_id } => vec![json!({
                "type": self.name("response.output_audio.done", "response.audio.done"),
                "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0,
            })],
            AgentEvent::TranscriptDone { response_id, item_id, transcript } => vec![
                json!({
                    "type": self.name("response.output_audio_transcript.done", "response.audio_transcript.done"),
                    "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "transcript": transcript,
                }),
                json!({"type": "response.content_part.done", "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "part": audio_part(d, transcript)}),
            ],
            AgentEvent::FunctionCall { response_id, item_id, previous_item_id, call, client } => {
                let args = call.arguments.to_string();
                vec![
                    json!({"type": "response.output_item.added", "response_id": response_id, "output_index": 1, "item": function_call_item(item_id, call, "in_progress")}),
                    json!({"type": self.name("conversation.item.added", "conversation.item.created"), "previous_item_id": previous_item_id, "item": function_call_item(item_id, call, "completed")}),
                    json!({"type": "response.function_call_arguments.delta", "response_id": response_id, "item_id": item_id, "output_index": 1, "call_id": call.id, "delta": args}),
                    json!({"type": "response.function_call_arguments.done", "response_id": response_id, "item_id": item_id, "output_index": 1, "call_id": call.id, "name": call.name, "arguments": args}),
                    json!({"type": "response.output_item.done", "response_id": response_id, "output_index": 1, "item": function_call_item(item_id, call, "completed"),
                        "parley_runs_on": if *client { "client" } else { "server" }}),
                ]
            }
            AgentEvent::FunctionOutput { item_id, previous_item_id, call_id, output } => {
                let item = function_output_item(item_id, call_id, output);
                let mut events = vec![json!({"type": self.name("conversation.item.added", "conversation.item.created"), "previous_item_id": previous_item_id, "item": item})];
                if d == Dialect::Ga {
                    events.push(json!({"type": "conversation.item.done", "previous_item_id": previous_item_id, "item": item}));
                }
                events
            }
            AgentEvent::ResponseDone { response_id, item_id, status, transcript, function_calls } => {
                let status_str = status.as_str();
                let item_status = if status_str == "completed" { "completed" } else { "incomplete" };
                let mut output: Vec<Value> = item_id.iter().map(|id| assistant_item(d, id, item_status, Some(transcript))).collect();
                let mut events = Vec::new();
                for item in &output {
                    events.push(json!({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": item}));
                }
                output.extend(function_calls.iter().map(|(id, call)| function_call_item(id, call, "completed")));
                let details = match status_str {
                    "cancelled" => json!({"type": "cancelled", "reason": "turn_detected"}),
                    "failed" => json!({"type": "failed", "error": {"type": "server_error", "code": "model_failed"}}),
                    _ => Value::Null,
                };
                events.push(json!({
                    "type": "response.done",
                    "response": {"object": "realtime.response", "id": response_id, "status": status_str, "status_details": details, "output": output},
                }));
                events
            }
            AgentEvent::OutputAudioCleared { response_id } => vec![json!({"type": "output_audio_buffer.cleared", "response_id": response_id})],
            AgentEvent::Metrics(m) => vec![json!({"type": "parley.turn.metrics", "metrics": metrics_json(m)})],
            AgentEvent::Error { code, message } => {
                let e = self.error("invalid_request_error", code.as_str(), message, None);
                return vec![e];
            }
        };
        for ev in &mut out {
            if let Some(obj) = ev.as_object_mut() {
                obj.insert("event_id".into(), Value::String(self.event_id()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_names_follow_the_dialect() {
        let ev = AgentEvent::AudioDelta { response_id: "r".into(), item_id: "i".into(), audio: vec![0, 1] };
        let ga = EventWriter::new(Dialect::Ga, "sess_x".into()).render(&ev);
        assert_eq!(ga[0]["type"], "response.output_audio.delta");
        assert_eq!(ga[0]["delta"], "AAE=");
        let beta = EventWriter::new(Dialect::Beta, "sess_x".into()).render(&ev);
        assert_eq!(beta[0]["type"], "response.audio.delta");
    }

    #[test]
    fn session_created_once_then_updated() {
        let mut w = EventWriter::new(Dialect::Ga, "sess_x".into());
        let ev = AgentEvent::SessionUpdated(Box::default());
        assert_eq!(w.render(&ev)[0]["type"], "session.created");
        assert_eq!(w.render(&ev)[0]["type"], "session.updated");
        let ids: Vec<_> = [w.render(&ev), w.render(&ev)].concat().iter().map(|e| e["event_id"].clone()).collect();
        assert_ne!(ids[0], ids[1]);
    }
}
