//! `GET /twilio`: phone gateways speaking the Twilio Media Streams protocol
//! (bidirectional `<Connect><Stream>`), and its dialects (Telnyx's `stream_id`
//! spelling, Fonoster). `POST /twilio/voice` answers the TwiML that points a call here.
//!
//! Per stream: the reader (this task) waits for `start`, starts an agent call with
//! G.711 at 8 kHz both ways and server VAD, then feeds it the caller's `media`;
//! the writer task turns the call's paced audio into 20 ms `media` messages, ends
//! each response's audio with a `mark`, and sends `clear` on barge-in. The gateway
//! has no error event, so a malformed message is logged and skipped; `stop` or a
//! closed socket ends the call.
//!
//! - DTMF: a key press becomes a user text item "(The caller pressed 5 on the
//!   keypad.)" in the conversation; it does not start a response by itself.
//! - Marks: a `mark` named after the response id follows each response's audio;
//!   the gateway echoes it when playback gets there, which is logged (the agent
//!   tracks what the caller heard on its own play clock).
//! - Greeting: `twilio.greeting` (or a `greeting` custom parameter) makes the agent
//!   speak first: the model is asked, through the instructions of that first
//!   response only (`CallInput::CreateResponseWith`), to say it.
//! - Custom parameter `instructions` replaces the system prompt for the call.

pub mod messages;
pub mod signature;
pub mod voice;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parley_agent::{AgentEvent, CallInput, ResponseOptions, SessionSettings, TurnDetection};
use tokio::sync::mpsc;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::app::{App, CallSlot};
use messages::{FRAME_BYTES, Inbound, Outbound, Start};

/// Hard WebSocket message limit (gateway messages are a few hundred bytes).
const WS_MAX_MESSAGE: usize = 1024 * 1024;
/// How long a connected gateway may take to send `start`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `instructions` custom parameter accepted.
const MAX_INSTRUCTIONS: usize = 16 * 1024;
/// Malformed messages logged at `warn` per call; later ones at `debug`.
const WARN_LIMIT: usize = 10;

/// The gateway routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/twilio", get(stream_handler)).route("/twilio/voice", get(voice::handler).post(voice::handler))
}

/// Checks the signature (when a token is set) and capacity, then upgrades.
async fn stream_handler(ws: WebSocketUpgrade, headers: HeaderMap, uri: Uri, State(app): State<Arc<App>>) -> Response {
    let config = &app.config.twilio;
    let mut admit_headers = headers.clone();
    if !config.auth_token.is_empty() {
        if !voice::signed(&config.auth_token, &headers, &uri, &voice::ws_bases(config, &headers, &uri), &[]) {
            warn!("media stream refused: missing or invalid X-Twilio-Signature");
            return (StatusCode::FORBIDDEN, "missing or invalid X-Twilio-Signature\n").into_response();
        }
        // A gateway cannot send API keys; its verified signature stands in for one.
        if let Some(key) = app.config.server.api_keys.first()
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}"))
        {
            admit_headers.insert(header::AUTHORIZATION, v);
        }
    }
    let slot = match app.admit(&admit_headers) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    ws.max_message_size(WS_MAX_MESSAGE).max_frame_size(WS_MAX_MESSAGE).on_upgrade(move |socket| {
        let span = info_span!("twilio", call_id = %slot.id, stream_sid = field::Empty, call_sid = field::Empty);
        serve(socket, app, slot).instrument(span)
    })
}

/// What reading the socket gave.
enum Next {
    Msg(Inbound),
    Skip,
    End,
}

/// Reads gateway messages, logging and skipping the bad ones.
struct Reader {
    stream: SplitStream<WebSocket>,
    app: Arc<App>,
    bad: usize,
}

impl Reader {
    async fn next(&mut self) -> Next {
        let text = match self.stream.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(b))) => {
                self.reject(format_args!("binary message of {} bytes ignored: the protocol sends JSON text", b.len()));
                return Next::Skip;
            }
            Some(Ok(Message::Close(_))) | None => return Next::End,
            Some(Ok(_)) => return Next::Skip, // ping/pong: answered by the WebSocket layer
            Some(Err(e)) => {
                info!(error = %e, "connection lost");
                return Next::End;
            }
        };
        let max = self.app.config.server.max_message_bytes;
        if text.len() > max {
            self.reject(format_args!("message of {} bytes ignored: over server.max_message_bytes ({max})", text.len()));
            return Next::Skip;
        }
        match messages::parse(text.as_str()) {
            Ok(m) => Next::Msg(m),
            Err(e) => {
                self.reject(format_args!("malformed gateway message ignored: {e}"));
                Next::Skip
            }
        }
    }

    fn reject(&mut self, what: std::fmt::Arguments<'_>) {
        self.app.metrics.rejected_messages.inc();
        self.bad += 1;
        if self.bad <= WARN_LIMIT {
            warn!("{what}");
        } else {
            debug!("{what}");
        }
    }
}

/// Marks sent and echoed: what the caller's phone has played.
#[derive(Debug, Default)]
struct Playback {
    pending: Vec<String>,
    played: usize,
}

fn lock(p: &Mutex<Playback>) -> std::sync::MutexGuard<'_, Playback> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The call's settings: the server's defaults, G.711 both ways, 20 ms frames,
/// server VAD on (a phone caller cannot commit turns), and the `instructions`
/// custom parameter over the system prompt.
fn call_settings(defaults: &SessionSettings, start: &Start) -> SessionSettings {
    let mut s = defaults.clone();
    s.input_format = start.format;
    s.output_format = start.format;
    s.pacing.frame_ms = 20;
    if s.turn_detection.is_none() {
        s.turn_detection = Some(TurnDetection::default());
    }
    if let Some(instructions) = start.custom_parameters.get("instructions").map(|i| i.trim()).filter(|i| !i.is_empty()) {
        if instructions.len() <= MAX_INSTRUCTIONS {
            s.instructions = instructions.to_string();
        } else {
            warn!(bytes = instructions.len(), "the `instructions` custom parameter is over {MAX_INSTRUCTIONS} bytes; using the default instructions");
        }
    }
    s
}

/// The first response's instructions when the agent greets the caller.
fn greeting_instructions(instructions: &str, greeting: &str) -> String {
    format!("{instructions}\n\nThe call has just connected and the caller has not said anything yet. Greet the caller by saying exactly: \"{greeting}\"")
}

/// The user item a key press adds to the conversation.
fn dtmf_text(digit: char) -> String {
    format!("(The caller pressed {digit} on the keypad.)")
}

async fn serve(socket: WebSocket, app: Arc<App>, slot: CallSlot) {
    let Some(engines) = app.engines() else { return };
    let (sink, stream) = socket.split();
    let mut reader = Reader { stream, app: app.clone(), bad: 0 };
    let limit = app.max_call_duration();
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);

    // Nothing to run until the gateway says what the stream is.
    let waited = tokio::time::timeout(START_TIMEOUT, async {
        loop {
            match reader.next().await {
                Next::Msg(Inbound::Start(start)) => return Some(start),
                Next::Msg(Inbound::Connected) => debug!("gateway connected"),
                Next::Msg(Inbound::Stop) | Next::End => return None,
                Next::Msg(_) => debug!("message before `start` ignored"),
                Next::Skip => {}
            }
        }
    })
    .await;
    let start = match waited {
        Ok(Some(start)) => start,
        Ok(None) => {
            info!("the stream ended before `start`");
            return;
        }
        Err(_) => {
            warn!("no `start` message within {} s; closing", START_TIMEOUT.as_secs());
            return;
        }
    };
    Span::current().record("stream_sid", start.stream_sid.as_str());
    if let Some(sid) = &start.call_sid {
        Span::current().record("call_sid", sid.as_str());
    }
    let settings = call_settings(&app.session_defaults, &start);
    info!(dialect = ?start.dialect, format = ?start.format, tracks = ?start.tracks, account_sid = start.account_sid.as_deref().unwrap_or(""), "media stream started");
    let (call, events) = parley_agent::Call::start(slot.id.clone(), engines, settings.clone());

    let greeting = start.custom_parameters.get("greeting").unwrap_or(&app.config.twilio.greeting).trim().to_string();
    if !greeting.is_empty() {
        // The agent has no "say this verbatim" input: the first response runs on
        // instructions (for it alone) that ask the model for the greeting, with tools
        // off for it (a small model otherwise tends to look something up first).
        let mut no_tools = settings.clone();
        no_tools.tools_enabled = false;
        let options = ResponseOptions { instructions: Some(greeting_instructions(&settings.instructions, &greeting)), ..ResponseOptions::default() };
        for input in [CallInput::Update(Box::new(no_tools)), CallInput::CreateResponseWith(options), CallInput::Update(Box::new(settings.clone()))] {
            let _ = call.send(input).await;
        }
    }

    let playback = Arc::new(Mutex::new(Playback::default()));
    let out = Outbound::new(start.stream_sid.clone(), start.dialect);
    let writer = tokio::spawn(write_loop(sink, events, out, playback.clone(), app.clone()).in_current_span());

    loop {
        let next = tokio::select! {
            n = reader.next() => n,
            _ = &mut deadline => {
                info!("the call reached server.max_call_seconds; closing");
                break;
            }
        };
        let input = match next {
            Next::End => break,
            Next::Skip => continue,
            Next::Msg(Inbound::Media { track, payload }) => {
                if track.as_deref().is_some_and(|t| !t.starts_with("inbound")) {
                    continue; // only the caller's side is the agent's input
                }
                CallInput::Audio(payload)
            }
            Next::Msg(Inbound::Dtmf { digit }) => {
                debug!("the caller pressed a key");
                CallInput::UserText(dtmf_text(digit))
            }
            Next::Msg(Inbound::Mark { name }) => {
                let mut p = lock(&playback);
                if let Some(i) = p.pending.iter().position(|n| *n == name) {
                    p.pending.remove(i);
                    p.played += 1;
                    debug!(mark = %name, "the caller's phone played the response to its end");
                } else {
                    debug!(mark = %name, "echo of a mark we did not send");
                }
                continue;
            }
            Next::Msg(Inbound::Stop) => {
                info!("the gateway stopped the stream");
                break;
            }
            Next::Msg(Inbound::Start(_)) => {
                debug!("second `start` ignored");
                continue;
            }
            Next::Msg(Inbound::Connected) => continue,
            Next::Msg(Inbound::Unknown(event)) => {
                debug!(%event, "unknown gateway event ignored");
                continue;
            }
        };
        if call.send(input).await.is_err() {
            break;
        }
    }
    call.close().await;
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer).await.is_err() {
        warn!("writer did not finish in time");
        writer.abort();
    }
    let p = lock(&playback);
    info!(responses_played = p.played, marks_pending = p.pending.len(), "media stream closed");
    drop(p);
    drop(slot);
}

/// The only task that writes to the socket: agent audio as 20 ms `media`
/// messages (already paced in real time by the agent), a `mark` after each
/// response's audio, `clear` on barge-in.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut events: mpsc::Receiver<AgentEvent>,
    out: Outbound,
    playback: Arc<Mutex<Playback>>,
    app: Arc<App>,
) {
    // The response whose audio is going out, and the last one cleared.
    let mut speaking: Option<String> = None;
    let mut cleared: Option<String> = None;
    while let Some(ev) = events.recv().await {
        app.metrics.observe(&ev);
        let sends = match &ev {
            AgentEvent::AudioDelta { response_id, audio, .. } => {
                if cleared.as_ref() == Some(response_id) {
                    continue;
                }
                speaking = Some(response_id.clone());
                audio.chunks(FRAME_BYTES).map(|frame| out.media(frame)).collect()
            }
            AgentEvent::OutputAudioCleared { response_id } => {
                info!(%response_id, "caller barged in: clearing the gateway's audio");
                cleared = Some(response_id.clone());
                speaking = None;
                vec![out.clear()]
            }
            AgentEvent::AudioDone { response_id, .. } if speaking.as_ref() == Some(response_id) => {
                speaking = None;
                lock(&playback).pending.push(response_id.clone());
                vec![out.mark(response_id)]
            }
            AgentEvent::ResponseDone { response_id, status, .. } => {
                info!(%response_id, status = status.as_str(), "response done");
                Vec::new()
            }
            AgentEvent::UserTranscript { transcript, .. } => {
                debug!(chars = transcript.len(), "caller's turn transcribed");
                Vec::new()
            }
            AgentEvent::Error { code, message } => {
                warn!(code = code.as_str(), %message, "agent error");
                Vec::new()
            }
            _ => Vec::new(),
        };
        for v in sends {
            if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                return;
            }
        }
    }
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use messages::Dialect;
    use parley_audio::format::AudioFormat;

    fn start(params: &[(&str, &str)]) -> Start {
        Start {
            stream_sid: "MZ1".into(),
            call_sid: None,
            account_sid: None,
            tracks: vec!["inbound".into()],
            custom_parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            format: AudioFormat::Pcmu,
            dialect: Dialect::Twilio,
        }
    }

    #[test]
    fn calls_run_on_g711_with_server_vad() {
        let mut defaults = SessionSettings { turn_detection: None, ..SessionSettings::default() };
        defaults.pacing.frame_ms = 40;
        let s = call_settings(&defaults, &start(&[]));
        assert_eq!(s.input_format, AudioFormat::Pcmu);
        assert_eq!(s.output_format, AudioFormat::Pcmu);
        assert_eq!(s.pacing.frame_ms, 20);
        assert!(s.turn_detection.is_some());
        assert_eq!(s.instructions, defaults.instructions);
    }

    #[test]
    fn instructions_parameter_replaces_the_prompt_within_limits() {
        let defaults = SessionSettings::default();
        assert_eq!(call_settings(&defaults, &start(&[("instructions", " Be brief. ")])).instructions, "Be brief.");
        assert_eq!(call_settings(&defaults, &start(&[("instructions", "  ")])).instructions, defaults.instructions);
        let long = "x".repeat(MAX_INSTRUCTIONS + 1);
        assert_eq!(call_settings(&defaults, &start(&[("instructions", &long)])).instructions, defaults.instructions);
    }

    #[test]
    fn dtmf_and_greeting_texts() {
        assert_eq!(dtmf_text('5'), "(The caller pressed 5 on the keypad.)");
        let g = greeting_instructions("Be kind.", "Hello, this is Parley.");
        assert!(g.starts_with("Be kind.\n\n") && g.ends_with("saying exactly: \"Hello, this is Parley.\""), "{g}");
    }
}
