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
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parley_agent::{AgentEvent, CallInput, ResponseOptions, SessionSettings, TurnDetection};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::app::App;
use crate::driver::{self, Decoder, Encoder, Opening, Step, Transport, WireIn, WireOut, WireSource, ws};
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
    // CONNECT: the same WebSocket through HTTP/2 (RFC 8441).
    Router::new().route("/twilio", get(stream_handler).connect(stream_handler)).route("/twilio/voice", get(voice::handler).post(voice::handler))
}

/// Checks the signature (when a token is set) and capacity, then upgrades (over
/// HTTP/1.1 or RFC 8441 extended CONNECT).
async fn stream_handler(ws: WebSocketUpgrade, headers: HeaderMap, uri: Uri, State(app): State<Arc<App>>) -> Response {
    let config = &app.config.twilio;
    let mut signed = false;
    if !config.auth_token.is_empty() {
        if !voice::signed(&config.auth_token, &headers, &uri, &voice::ws_bases(config, &headers, &uri), &[]) {
            warn!("media stream refused: missing or invalid X-Twilio-Signature");
            return (StatusCode::FORBIDDEN, "missing or invalid X-Twilio-Signature\n").into_response();
        }
        // A gateway cannot send API keys; its verified signature stands in for one.
        signed = true;
    }
    let slot = match driver::admit(&app, &headers, signed) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    ws::configured(ws, WS_MAX_MESSAGE, WS_MAX_MESSAGE).on_upgrade(move |socket| {
        let span = info_span!("twilio", call_id = %slot.id, stream_sid = field::Empty, call_sid = field::Empty);
        let (source, sink) = ws::split(socket);
        let transport = Twilio { parser: Parser { app: app.clone(), bad: 0 } };
        driver::run(app, slot, source, sink, transport).instrument(span)
    })
}

/// Parses gateway messages, logging and skipping the bad ones.
struct Parser {
    app: Arc<App>,
    bad: usize,
}

impl Parser {
    fn parse(&mut self, msg: WireIn) -> Option<Inbound> {
        let text = match msg {
            WireIn::Text(t) => t,
            WireIn::Binary(b) => {
                self.reject(format_args!("binary message of {} bytes ignored: the protocol sends JSON text", b.len()));
                return None;
            }
            WireIn::TooLarge(len) => {
                self.reject(format_args!("message of at least {len} bytes ignored: over server.max_message_bytes"));
                return None;
            }
        };
        let max = self.app.config.server.max_message_bytes;
        if text.len() > max {
            self.reject(format_args!("message of {} bytes ignored: over server.max_message_bytes ({max})", text.len()));
            return None;
        }
        match messages::parse(text.as_str()) {
            Ok(m) => Some(m),
            Err(e) => {
                self.reject(format_args!("malformed gateway message ignored: {e}"));
                None
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

/// The Twilio Media Streams protocol as a driver transport: the call starts once the
/// gateway's `start` says what the stream is.
struct Twilio {
    parser: Parser,
}

impl<S: WireSource> Transport<S> for Twilio {
    type Decoder = TwilioDecoder;
    type Encoder = TwilioEncoder;

    async fn open(mut self, source: &mut S) -> Option<Opening<TwilioDecoder, TwilioEncoder>> {
        // Nothing to run until the gateway says what the stream is.
        let waited = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                let msg = match source.recv().await {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        info!(error = %e, "connection lost");
                        return None;
                    }
                    None => return None,
                };
                match self.parser.parse(msg) {
                    Some(Inbound::Start(start)) => return Some(start),
                    Some(Inbound::Connected) => debug!("gateway connected"),
                    Some(Inbound::Stop) => return None,
                    Some(_) => debug!("message before `start` ignored"),
                    None => {}
                }
            }
        })
        .await;
        let start = match waited {
            Ok(Some(start)) => start,
            Ok(None) => {
                info!("the stream ended before `start`");
                return None;
            }
            Err(_) => {
                warn!("no `start` message within {} s; closing", START_TIMEOUT.as_secs());
                return None;
            }
        };
        Span::current().record("stream_sid", start.stream_sid.as_str());
        if let Some(sid) = &start.call_sid {
            Span::current().record("call_sid", sid.as_str());
        }
        let app = self.parser.app.clone();
        let settings = call_settings(&app.session_defaults, &start);
        info!(dialect = ?start.dialect, format = ?start.format, tracks = ?start.tracks, account_sid = start.account_sid.as_deref().unwrap_or(""), "media stream started");

        let mut first_inputs = Vec::new();
        let greeting = start.custom_parameters.get("greeting").unwrap_or(&app.config.twilio.greeting).trim().to_string();
        if !greeting.is_empty() {
            // The agent has no "say this verbatim" input: the first response runs on
            // instructions (for it alone) that ask the model for the greeting, with tools
            // off for it (a small model otherwise tends to look something up first).
            let mut no_tools = settings.clone();
            no_tools.tools_enabled = false;
            let options = ResponseOptions { instructions: Some(greeting_instructions(&settings.instructions, &greeting)), ..ResponseOptions::default() };
            first_inputs = vec![CallInput::Update(Box::new(no_tools)), CallInput::CreateResponseWith(options), CallInput::Update(Box::new(settings.clone()))];
        }
        let playback = Arc::new(Mutex::new(Playback::default()));
        let encoder = TwilioEncoder { out: Outbound::new(start.stream_sid.clone(), start.dialect), playback: playback.clone(), speaking: None, cleared: None };
        Some(Opening { settings, first_inputs, decoder: TwilioDecoder { parser: self.parser, playback }, encoder })
    }
}

/// Gateway messages to call input.
struct TwilioDecoder {
    parser: Parser,
    playback: Arc<Mutex<Playback>>,
}

impl Decoder for TwilioDecoder {
    /// The protocol has no error event: nothing goes back to the gateway.
    type Note = std::convert::Infallible;

    fn decode(&mut self, msg: WireIn, out: &mut Vec<Step<Self::Note>>) {
        let input = match self.parser.parse(msg) {
            None => return,
            Some(Inbound::Media { track, payload }) => {
                if track.as_deref().is_some_and(|t| !t.starts_with("inbound")) {
                    return; // only the caller's side is the agent's input
                }
                CallInput::Audio(payload)
            }
            Some(Inbound::Dtmf { digit }) => {
                debug!("the caller pressed a key");
                CallInput::UserText(dtmf_text(digit))
            }
            Some(Inbound::Mark { name }) => {
                let mut p = lock(&self.playback);
                if let Some(i) = p.pending.iter().position(|n| *n == name) {
                    p.pending.remove(i);
                    p.played += 1;
                    debug!(mark = %name, "the caller's phone played the response to its end");
                } else {
                    debug!(mark = %name, "echo of a mark we did not send");
                }
                return;
            }
            Some(Inbound::Stop) => {
                info!("the gateway stopped the stream");
                out.push(Step::End);
                return;
            }
            Some(Inbound::Start(_)) => {
                debug!("second `start` ignored");
                return;
            }
            Some(Inbound::Connected) => return,
            Some(Inbound::Unknown(event)) => {
                debug!(%event, "unknown gateway event ignored");
                return;
            }
        };
        out.push(Step::Input(input));
    }

    fn finished(&mut self) {
        let p = lock(&self.playback);
        info!(responses_played = p.played, marks_pending = p.pending.len(), "media stream closed");
    }
}

/// Call events to gateway messages: agent audio as 20 ms `media` messages (already
/// paced in real time by the agent), a `mark` after each response's audio, `clear`
/// on barge-in.
struct TwilioEncoder {
    out: Outbound,
    playback: Arc<Mutex<Playback>>,
    /// The response whose audio is going out.
    speaking: Option<String>,
    /// The last response cleared.
    cleared: Option<String>,
}

impl Encoder for TwilioEncoder {
    type Note = std::convert::Infallible;

    fn event(&mut self, ev: &AgentEvent, wire: &mut Vec<WireOut>) {
        let sends = match ev {
            AgentEvent::AudioDelta { response_id, audio, .. } => {
                if self.cleared.as_ref() == Some(response_id) {
                    return;
                }
                self.speaking = Some(response_id.clone());
                audio.chunks(FRAME_BYTES).map(|frame| self.out.media(frame)).collect()
            }
            AgentEvent::OutputAudioCleared { response_id } => {
                info!(%response_id, "caller barged in: clearing the gateway's audio");
                self.cleared = Some(response_id.clone());
                self.speaking = None;
                vec![self.out.clear()]
            }
            AgentEvent::AudioDone { response_id, .. } if self.speaking.as_ref() == Some(response_id) => {
                self.speaking = None;
                lock(&self.playback).pending.push(response_id.clone());
                vec![self.out.mark(response_id)]
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
        wire.extend(sends.into_iter().map(|v: serde_json::Value| WireOut::Text(v.to_string())));
    }

    fn note(&mut self, note: Self::Note, _out: &mut Vec<WireOut>) {
        match note {}
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
pub(crate) fn greeting_instructions(instructions: &str, greeting: &str) -> String {
    format!("{instructions}\n\nThe call has just connected and the caller has not said anything yet. Greet the caller by saying exactly: \"{greeting}\"")
}

/// The user item a key press adds to the conversation.
pub(crate) fn dtmf_text(digit: char) -> String {
    format!("(The caller pressed {digit} on the keypad.)")
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
