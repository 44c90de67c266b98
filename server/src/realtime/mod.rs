//! `GET /v1/realtime`: the OpenAI Realtime protocol over WebSocket.
//!
//! A transport of the call driver ([`crate::driver`]): [`RealtimeDecoder`] parses
//! client events into call input, [`RealtimeEncoder`] renders call events; the driver
//! owns admission, the deadline, the reader and writer and shutdown. A malformed or
//! oversized message gets an `error` event and the call goes on. The same adapter
//! carries the HTTP/2 NDJSON stream and SageMaker's WebSocket.

pub mod client_events;
pub mod server_events;
pub mod session_config;

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use parley_agent::{AgentEvent, CallInput, ResponseOptions, SessionSettings};
use tracing::{Instrument, debug, info, info_span};

use crate::app::App;
use crate::driver::{self, Decoder, Encoder, Opening, Step, Transport, WireIn, WireOut, WireSource, ws};
use client_events::{ClientEvent, ProtocolError};
use server_events::EventWriter;

/// Which generation of the protocol's event names a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The GA names (`response.output_audio.delta`).
    Ga,
    /// The beta names (`response.audio.delta`), chosen by `OpenAI-Beta: realtime=v1`.
    Beta,
}

/// A protocol error for the writer to send.
pub struct ErrorOut {
    kind: &'static str,
    code: String,
    message: String,
    event_id: Option<String>,
}

impl ErrorOut {
    fn invalid(code: &str, message: String) -> Self {
        Self { kind: "invalid_request_error", code: code.into(), message, event_id: None }
    }
}

/// The dialect a request asks for: `OpenAI-Beta: realtime=v1`, or (from browsers,
/// which cannot set headers) the subprotocol `openai-beta.realtime-v1`, means the
/// beta names.
pub fn dialect_of(headers: &HeaderMap) -> Dialect {
    let beta_protocol = crate::web::secrets::requested_subprotocols(headers).any(|p| p == "openai-beta.realtime-v1");
    match headers.get("openai-beta").and_then(|v| v.to_str().ok()) {
        Some(v) if v.contains("realtime=v1") => Dialect::Beta,
        _ if beta_protocol => Dialect::Beta,
        _ => Dialect::Ga,
    }
}

/// Upgrades the request (an HTTP/1.1 upgrade or an RFC 8441 extended CONNECT) to a
/// Realtime session run by the call driver.
pub async fn handler(mut ws: WebSocketUpgrade, headers: HeaderMap, State(app): State<Arc<App>>) -> Response {
    let slot = match driver::admit(&app, &headers, false) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    // Browsers send their credential and options as subprotocols; one must be echoed.
    if let Some(p) = crate::web::secrets::chosen_subprotocol(&headers).and_then(|p| axum::http::HeaderValue::from_str(p).ok()) {
        ws.set_selected_protocol(p);
    }
    let dialect = dialect_of(&headers);
    ws::configured(ws, ws::MAX_MESSAGE, ws::MAX_FRAME)
        .on_upgrade(move |socket| {
            let span = info_span!("realtime", call_id = %slot.id);
            let (source, sink) = ws::split(socket);
            let transport = Realtime::new(&app, &slot.id, dialect, BinaryFrames::Refuse).starting_with(slot.preset.as_deref().cloned());
            info!(?dialect, "realtime session opened");
            driver::run(app, slot, source, sink, transport).instrument(span)
        })
}

/// What a binary WebSocket message is on a Realtime-style endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryFrames {
    /// Not part of the protocol: an `error` event (`/v1/realtime`).
    Refuse,
    /// Input audio in the session's input format, unless it holds a JSON object with
    /// a `type`, which is an event (SageMaker sends untyped payload parts as binary).
    AudioOrEvent,
}

/// The Realtime protocol as a driver transport: client events in, server events out.
/// Also used by the HTTP/2 NDJSON stream and SageMaker's WebSocket, which carry the
/// same events.
pub struct Realtime {
    decoder: RealtimeDecoder,
    encoder: RealtimeEncoder,
    settings: SessionSettings,
}

impl Realtime {
    /// A session for one call, with the server's defaults.
    pub fn new(app: &Arc<App>, call_id: &str, dialect: Dialect, binary: BinaryFrames) -> Self {
        let defaults = app.session_defaults.clone();
        Self {
            decoder: RealtimeDecoder { app: app.clone(), settings: defaults.clone(), defaults: defaults.clone(), binary },
            encoder: RealtimeEncoder { writer: EventWriter::new(dialect, call_id.to_string()) },
            settings: defaults,
        }
    }

    /// Starts the call with `settings` instead of the server's defaults (a client
    /// secret minted with a `session`); `None` keeps the defaults.
    pub fn starting_with(mut self, settings: Option<SessionSettings>) -> Self {
        if let Some(settings) = settings {
            self.decoder.settings = settings.clone();
            self.settings = settings;
        }
        self
    }
}

impl<S: WireSource> Transport<S> for Realtime {
    type Decoder = RealtimeDecoder;
    type Encoder = RealtimeEncoder;

    async fn open(self, _source: &mut S) -> Option<Opening<RealtimeDecoder, RealtimeEncoder>> {
        Some(Opening { settings: self.settings, first_inputs: Vec::new(), decoder: self.decoder, encoder: self.encoder })
    }
}

/// Client events to call input; protocol errors become notes for the writer.
pub struct RealtimeDecoder {
    app: Arc<App>,
    settings: SessionSettings,
    defaults: SessionSettings,
    binary: BinaryFrames,
}

impl RealtimeDecoder {
    fn reject(&self, out: &mut Vec<Step<ErrorOut>>, e: ErrorOut) {
        self.app.metrics.rejected_messages.inc();
        out.push(Step::Note(e));
    }

    fn event(&mut self, text: &str, out: &mut Vec<Step<ErrorOut>>) {
        let (event_id, parsed) = client_events::parse(text);
        let input = match parsed {
            Ok(ClientEvent::SessionUpdate(patch)) => match session_config::apply(&self.settings, *patch, &self.defaults) {
                Ok(s) => {
                    self.settings = s.clone();
                    Ok(CallInput::Update(Box::new(s)))
                }
                Err(e) => Err(e),
            },
            Ok(ClientEvent::Append(bytes)) => Ok(CallInput::Audio(bytes)),
            Ok(ClientEvent::Commit) => Ok(CallInput::Commit),
            Ok(ClientEvent::Clear) => Ok(CallInput::ClearInput),
            Ok(ClientEvent::UserText(t)) => Ok(CallInput::UserText(t)),
            Ok(ClientEvent::ResponseCreate(None)) => Ok(CallInput::CreateResponse),
            Ok(ClientEvent::ResponseCreate(Some(r))) => {
                Ok(CallInput::CreateResponseWith(ResponseOptions { instructions: r.instructions, interruptible: r.interruptible, ..ResponseOptions::default() }))
            }
            Ok(ClientEvent::Truncate { item_id, audio_end_ms }) => Ok(CallInput::Truncate { item_id, audio_end_ms }),
            Ok(ClientEvent::ResponseCancel | ClientEvent::OutputClear) => Ok(CallInput::CancelResponse),
            Ok(ClientEvent::FunctionOutput { call_id, output }) => Ok(CallInput::ToolOutput { call_id, output }),
            Err(e) => Err(e),
        };
        match input {
            Ok(input) => out.push(Step::Input(input)),
            Err(e) => {
                debug!(error = %e, "bad client event");
                self.reject(out, protocol_error(&e, event_id));
            }
        }
    }
}

/// Whether a binary message is a JSON object with a `type` (an event, not audio).
fn is_json_event(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'{') && serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.get("type").is_some_and(|t| t.is_string()))
}

impl Decoder for RealtimeDecoder {
    type Note = ErrorOut;

    fn decode(&mut self, msg: WireIn, out: &mut Vec<Step<ErrorOut>>) {
        let max_bytes = self.app.config.server.max_message_bytes;
        let len = match &msg {
            WireIn::Text(t) => t.len(),
            WireIn::Binary(b) => b.len(),
            WireIn::TooLarge(len) => *len,
        };
        if len > max_bytes || matches!(msg, WireIn::TooLarge(_)) {
            let e = ErrorOut::invalid("message_too_large", format!("the message is {len} bytes, over the limit of {max_bytes}; send audio in smaller appends"));
            return self.reject(out, e);
        }
        match msg {
            WireIn::Text(text) => self.event(&text, out),
            WireIn::Binary(b) if self.binary == BinaryFrames::AudioOrEvent => match std::str::from_utf8(&b) {
                Ok(text) if is_json_event(&b) => self.event(text, out),
                _ => out.push(Step::Input(CallInput::Audio(b.to_vec()))),
            },
            WireIn::TooLarge(_) => {} // rejected above
            WireIn::Binary(b) => {
                let e = ErrorOut::invalid(
                    "binary_not_supported",
                    format!("binary messages ({} bytes) are not part of the Realtime protocol; send JSON text events with base64 audio", b.len()),
                );
                self.reject(out, e);
            }
        }
    }

    fn deadline_note(&mut self) -> Option<ErrorOut> {
        Some(ErrorOut::invalid("call_duration_exceeded", "the call reached its maximum duration and is being closed".into()))
    }
}

fn protocol_error(e: &ProtocolError, event_id: Option<String>) -> ErrorOut {
    ErrorOut { kind: "invalid_request_error", code: e.code().into(), message: e.to_string(), event_id }
}

/// Call events as Realtime server events, one JSON text message each.
pub struct RealtimeEncoder {
    writer: EventWriter,
}

impl Encoder for RealtimeEncoder {
    type Note = ErrorOut;

    fn event(&mut self, event: &AgentEvent, out: &mut Vec<WireOut>) {
        out.extend(self.writer.render(event).into_iter().map(|v| WireOut::Text(v.to_string())));
    }

    fn note(&mut self, e: ErrorOut, out: &mut Vec<WireOut>) {
        out.push(WireOut::Text(self.writer.error(e.kind, &e.code, &e.message, e.event_id.as_deref()).to_string()));
    }
}
