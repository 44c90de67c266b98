//! `GET /v1/realtime`: the OpenAI Realtime protocol over WebSocket.
//!
//! Per connection: the reader (this task) parses client events and feeds the call;
//! the writer task is the only one touching the socket's send half, rendering the
//! call's events and the reader's protocol errors in order. A malformed or oversized
//! message gets an `error` event and the call goes on.

pub mod client_events;
pub mod server_events;
pub mod session_config;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use parley_agent::{AgentEvent, Call, CallInput};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::app::{App, CallSlot};
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

/// Hard WebSocket message limit; messages between the configured limit and this
/// one are read and refused with an `error` event, larger ones close the socket.
const WS_MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Protocol errors waiting for the writer.
const ERROR_QUEUE: usize = 32;

/// A protocol error for the writer to send.
struct ErrorOut {
    kind: &'static str,
    code: String,
    message: String,
    event_id: Option<String>,
}

/// Upgrades the request to a Realtime session.
pub async fn handler(mut ws: WebSocketUpgrade, headers: HeaderMap, State(app): State<Arc<App>>) -> Response {
    let slot = match app.admit(&headers) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    // Browsers send their credential and options as subprotocols; one must be echoed.
    if let Some(p) = crate::web::secrets::chosen_subprotocol(&headers).and_then(|p| axum::http::HeaderValue::from_str(p).ok()) {
        ws.set_selected_protocol(p);
    }
    let beta_protocol = crate::web::secrets::requested_subprotocols(&headers).any(|p| p == "openai-beta.realtime-v1");
    let dialect = match headers.get("openai-beta").and_then(|v| v.to_str().ok()) {
        Some(v) if v.contains("realtime=v1") => Dialect::Beta,
        _ if beta_protocol => Dialect::Beta,
        _ => Dialect::Ga,
    };
    ws.max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| {
            let span = info_span!("realtime", call_id = %slot.id);
            serve(socket, app, slot, dialect).instrument(span)
        })
}

async fn serve(socket: WebSocket, app: Arc<App>, slot: CallSlot, dialect: Dialect) {
    let Some(engines) = app.engines() else { return };
    let (sink, mut stream) = socket.split();
    let defaults = app.session_defaults.clone();
    // A client secret minted with a `session` starts the call with it.
    let initial = slot.preset.as_deref().cloned().unwrap_or_else(|| defaults.clone());
    let (call, events) = Call::start(slot.id.clone(), engines, initial.clone());
    let (err_tx, err_rx) = mpsc::channel::<ErrorOut>(ERROR_QUEUE);
    let writer = tokio::spawn(write_loop(sink, events, err_rx, EventWriter::new(dialect, slot.id.clone()), app.clone()).in_current_span());
    info!(?dialect, "realtime session opened");

    let mut settings = initial;
    let max_bytes = app.config.server.max_message_bytes;
    let limit = app.max_call_duration();
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = &mut deadline => {
                let _ = err_tx.send(ErrorOut { kind: "invalid_request_error", code: "call_duration_exceeded".into(), message: "the call reached its maximum duration and is being closed".into(), event_id: None }).await;
                break;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(b))) => {
                app.metrics.rejected_messages.inc();
                let _ = err_tx
                    .send(ErrorOut { kind: "invalid_request_error", code: "binary_not_supported".into(), message: format!("binary messages ({} bytes) are not part of the Realtime protocol; send JSON text events with base64 audio", b.len()), event_id: None })
                    .await;
                continue;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue, // ping/pong are answered by the WebSocket layer
            Some(Err(e)) => {
                info!(error = %e, "connection lost");
                break;
            }
        };
        if text.len() > max_bytes {
            app.metrics.rejected_messages.inc();
            let _ = err_tx
                .send(ErrorOut { kind: "invalid_request_error", code: "message_too_large".into(), message: format!("the message is {} bytes, over the limit of {max_bytes}; send audio in smaller appends", text.len()), event_id: None })
                .await;
            continue;
        }
        let (event_id, parsed) = client_events::parse(text.as_str());
        let input = match parsed {
            Ok(ClientEvent::SessionUpdate(patch)) => match session_config::apply(&settings, *patch, &defaults) {
                Ok(s) => {
                    settings = s.clone();
                    Ok(CallInput::Update(Box::new(s)))
                }
                Err(e) => Err(e),
            },
            Ok(ClientEvent::Append(bytes)) => Ok(CallInput::Audio(bytes)),
            Ok(ClientEvent::Commit) => Ok(CallInput::Commit),
            Ok(ClientEvent::Clear) => Ok(CallInput::ClearInput),
            Ok(ClientEvent::UserText(t)) => Ok(CallInput::UserText(t)),
            Ok(ClientEvent::ResponseCreate(None)) => Ok(CallInput::CreateResponse),
            Ok(ClientEvent::ResponseCreate(Some(options))) => Ok(CallInput::CreateResponseWith(options)),
            Ok(ClientEvent::Truncate { item_id, audio_end_ms }) => Ok(CallInput::Truncate { item_id, audio_end_ms }),
            Ok(ClientEvent::ResponseCancel | ClientEvent::OutputClear) => Ok(CallInput::CancelResponse),
            Ok(ClientEvent::FunctionOutput { call_id, output }) => Ok(CallInput::ToolOutput { call_id, output }),
            Err(e) => Err(e),
        };
        match input {
            Ok(input) => {
                if call.send(input).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                app.metrics.rejected_messages.inc();
                debug!(error = %e, "bad client event");
                let _ = err_tx.send(protocol_error(&e, event_id)).await;
            }
        }
    }
    call.close().await;
    drop(err_tx);
    if tokio::time::timeout(Duration::from_secs(5), writer).await.is_err() {
        warn!("writer did not finish in time");
    }
    info!("realtime session closed");
    drop(slot);
}

fn protocol_error(e: &ProtocolError, event_id: Option<String>) -> ErrorOut {
    ErrorOut { kind: "invalid_request_error", code: e.code().into(), message: e.to_string(), event_id }
}

/// The only task that writes to the socket.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut events: mpsc::Receiver<AgentEvent>,
    mut errors: mpsc::Receiver<ErrorOut>,
    mut writer: EventWriter,
    app: Arc<App>,
) {
    let mut errors_open = true;
    loop {
        let values = tokio::select! {
            biased;
            e = errors.recv(), if errors_open => match e {
                Some(e) => vec![writer.error(e.kind, &e.code, &e.message, e.event_id.as_deref())],
                None => { errors_open = false; continue; }
            },
            ev = events.recv() => match ev {
                Some(ev) => {
                    app.metrics.observe(&ev);
                    writer.render(&ev)
                }
                None => break,
            },
        };
        for v in values {
            if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                return;
            }
        }
    }
    let _ = sink.close().await;
}
