//! One SIP call from INVITE to hang-up: admission (486/503), the offer (488 when no
//! codec matches), ringing, our answer (or our offer when the INVITE had none, the
//! answer then coming in the ACK), the call run by the driver, re-INVITEs for hold
//! and resume, and the end: BYE from the caller, CANCEL, or our BYE when the driver
//! stops first (`max_call_seconds`, the RTP timeout, shutdown, a transfer that went
//! through).
//!
//! A transfer (`transfer_call`, see [`super::transfer`]): the encoder sees the
//! model's call and, once that response is done, tells the call's loop here, which
//! answers the tool and has the agent say the configured line (inputs reach the call
//! through the decoder, which takes them on the next 20 ms frame), then sends REFER
//! and follows its NOTIFYs.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use parley_agent::{AgentEvent, CallInput, ResponseOptions, SessionSettings, TurnDetection};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, info, warn};

use super::media::{Clearer, Media, MediaConfig};
use super::sdp::{self, LocalMedia, Negotiated, SdpError};
use super::stack::{CallEvent, IncomingCall, Refuse, SipError};
use super::transfer;
use crate::app::App;
use crate::driver::{self, Decoder, Encoder, Opening, Step, Transport, WireIn, WireOut, WireSource};
use crate::twilio::{dtmf_text, greeting_instructions};

/// What every call of the bridge shares.
#[derive(Debug, Clone)]
pub struct CallConfig {
    /// The address in our `c=` lines.
    pub public_ip: IpAddr,
    /// Where RTP sockets are bound.
    pub bind_ip: IpAddr,
    /// RTP port range, inclusive.
    pub rtp_ports: Option<(u16, u16)>,
    /// How long we ring before answering.
    pub ring: Duration,
    /// The media side's settings.
    pub media: MediaConfig,
    /// What the agent says first; empty waits for the caller.
    pub greeting: String,
    /// Transfers to a person (`transfer_call`); `None`: the tool is not offered.
    pub transfer: Option<TransferConfig>,
}

/// Where `transfer_call` sends callers, and what the agent says first.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// The Refer-To URI.
    pub target: String,
    /// Said before the REFER; empty transfers without a word.
    pub say: String,
}

/// Longest wait for the transfer line to be said before the REFER goes anyway.
const ANNOUNCE_LIMIT: Duration = Duration::from_secs(15);
/// Longest wait for the transfer's outcome (the REFER's answer, then a final NOTIFY).
const TRANSFER_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for the queued audio to go out before the REFER.
const PLAY_OUT_LIMIT: Duration = Duration::from_secs(3);
/// Caller turns kept for the transfer summary.
const SUMMARY_TURNS: usize = 2;

/// What the encoder tells the call's loop.
#[derive(Debug)]
enum Signal {
    /// The model called `transfer_call` and its response is over.
    TransferAsked {
        /// The tool call's id (the tool's result answers it).
        tool_call_id: String,
        /// The `reason` argument.
        reason: String,
        /// The caller's last turns, oldest first.
        caller_said: Vec<String>,
    },
    /// A response ended; what it said.
    Spoken(String),
}

/// Where a transfer stands.
#[derive(Debug)]
enum Transfer {
    /// None asked for (or the last one failed).
    Idle,
    /// The agent says the line; then the REFER goes.
    Announcing { summary: String, until: Instant },
    /// REFER sent: waiting for its answer and the NOTIFYs.
    Referring { until: Instant },
}

impl Transfer {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Transfer::Idle => None,
            Transfer::Announcing { until, .. } | Transfer::Referring { until } => Some(*until),
        }
    }
}
fn refuse_offer(e: &SdpError) -> Refuse {
    match e {
        SdpError::Parse(_) => Refuse::BadRequest,
        SdpError::NoAudio | SdpError::NoCommonCodec(_) => Refuse::NotAcceptable,
    }
}

/// Runs one call to its end. Run it inside the call's span.
pub async fn run(app: Arc<App>, config: Arc<CallConfig>, mut call: IncomingCall) {
    info!(from = %call.from, to = %call.to, source = ?call.source, offer = !call.sdp.is_empty(), "INVITE");
    let slot = match driver::admit(&app, &HeaderMap::new(), true) {
        Ok(slot) => slot,
        Err(_) => {
            let why = if app.engines().is_none() || app.draining.is_cancelled() { Refuse::Unavailable } else { Refuse::Busy };
            info!(status = ?why, "call refused: {}", if why == Refuse::Busy { "server.max_calls reached" } else { "the models are still loading or the server is stopping" });
            let _ = call.refuse(why);
            wait_end(&mut call).await;
            return;
        }
    };
    Span::current().record("call_id", slot.id.as_str());
    let parley_call_id = slot.id.clone();
    let offered = if call.sdp.is_empty() {
        None
    } else {
        match sdp::parse(&call.sdp).and_then(|d| sdp::negotiate(&d)) {
            Ok(n) => Some(n),
            Err(e) => {
                info!(error = %e, "call refused: the offer cannot be answered");
                let _ = call.refuse(refuse_offer(&e));
                wait_end(&mut call).await;
                return;
            }
        }
    };
    let socket = match super::media::bind(config.bind_ip, config.rtp_ports).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "call refused: no RTP socket");
            let _ = call.refuse(Refuse::Unavailable);
            wait_end(&mut call).await;
            return;
        }
    };
    // Until the caller's answer arrives (delayed offer), PCMU both ways is assumed.
    let placeholder = Negotiated { codec: sdp::Codec::Pcmu, dtmf_pt: None, ptime_ms: sdp::DEFAULT_PTIME_MS, remote: None, direction: sdp::Direction::SendRecv };
    let media = match Media::new(socket, offered.unwrap_or(placeholder)) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "call refused: the RTP socket has no address");
            let _ = call.refuse(Refuse::Unavailable);
            wait_end(&mut call).await;
            return;
        }
    };
    let local = LocalMedia { addr: config.public_ip, port: media.port(), session_id: u64::from(uuid::Uuid::new_v4().as_u128() as u32) };
    let mut version = 1u64;

    if let Err(e) = call.ringing() {
        warn!(error = %e, "180 Ringing not sent");
    }
    if !config.ring.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(config.ring) => {}
            ev = call.next_event() => {
                info!(event = ?ev, "the caller gave up before the answer");
                return;
            }
        }
    }
    let body = match &offered {
        Some(n) => sdp::answer(n, &local, version),
        None => sdp::offer(&local, version),
    };
    if let Err(e) = call.accept(body) {
        warn!(error = %e, "200 OK not sent");
        return;
    }
    let terms = loop {
        match call.next_event().await {
            CallEvent::Acked { sdp: ack_sdp } => match offered {
                Some(n) => break n,
                None => match sdp::parse(&ack_sdp).and_then(|d| sdp::accept_answer(&d)) {
                    Ok(n) => break n,
                    Err(e) => {
                        // RFC 3261 13.3.1.4: a bad answer in the ACK is ended with BYE.
                        warn!(error = %e, "the answer in the ACK is unusable; hanging up");
                        let _ = call.bye().await;
                        return;
                    }
                },
            },
            CallEvent::Reoffer(r) => r.refuse(Refuse::NotAcceptable).await,
            CallEvent::TransferProgress { .. } => {}
            CallEvent::Ended(reason) => {
                info!(?reason, "the call ended before the ACK");
                return;
            }
        }
    };
    info!(codec = terms.codec.name(), ptime_ms = terms.ptime_ms, dtmf_pt = ?terms.dtmf_pt, remote = ?terms.remote, direction = ?terms.direction, rtp_port = media.port(), "call answered");
    let (source, sink) = media.start(terms, config.media);
    let ender = source.ender();
    let (inject, injected) = mpsc::unbounded_channel();
    let (signal_tx, mut signals) = mpsc::unbounded_channel();
    let transport = SipTransport {
        app: app.clone(),
        terms,
        greeting: config.greeting.clone(),
        clearer: media.clearer(),
        transfer: config.transfer.is_some(),
        injected,
        signals: signal_tx,
    };
    let driven = driver::run(app.clone(), slot, source, sink, transport);
    tokio::pin!(driven);
    let mut current = terms;
    let mut transfer = Transfer::Idle;
    let (refer_tx, mut refer_rx) = mpsc::channel::<Result<u16, SipError>>(1);
    let hung_up_by_caller = loop {
        let deadline = transfer.deadline();
        tokio::select! {
            _ = &mut driven => break false,
            Some(signal) = signals.recv() => {
                let Some(tc) = config.transfer.as_ref() else { continue };
                match signal {
                    Signal::TransferAsked { tool_call_id, reason, caller_said } => {
                        if !matches!(transfer, Transfer::Idle) {
                            info!("transfer_call again while a transfer is under way");
                            let _ = inject.send(CallInput::ToolOutput { call_id: tool_call_id, output: transfer::busy_output() });
                            continue;
                        }
                        let summary = transfer::summary(&reason, &caller_said);
                        info!(target = %tc.target, %summary, "the agent transfers the caller");
                        app.metrics.sip_transfers_asked.inc();
                        let _ = inject.send(CallInput::ToolOutput { call_id: tool_call_id, output: transfer::started_output(&tc.say) });
                        if tc.say.is_empty() {
                            transfer = start_refer(&call, tc, summary, &parley_call_id, &refer_tx);
                        } else {
                            // A reply the caller started meanwhile gives way to the line.
                            let options = ResponseOptions { instructions: None, interruptible: false, say: Some(tc.say.clone()) };
                            let _ = inject.send(CallInput::Say(options));
                            transfer = Transfer::Announcing { summary, until: Instant::now() + ANNOUNCE_LIMIT };
                        }
                    }
                    Signal::Spoken(text) => {
                        if let Transfer::Announcing { summary, .. } = &transfer && same_words(&text, &tc.say) {
                            played_out(&media).await;
                            transfer = start_refer(&call, tc, summary.clone(), &parley_call_id, &refer_tx);
                        }
                    }
                }
            }
            Some(answer) = refer_rx.recv() => {
                if !matches!(transfer, Transfer::Referring { .. }) {
                    // The transfer already ended (a NOTIFY, its time limit).
                    debug!(?answer, "a late answer to our REFER");
                    continue;
                }
                match answer {
                    Ok(status) if (200..300).contains(&status) => info!(status, "REFER accepted; waiting for the transfer's outcome (NOTIFY)"),
                    Ok(status) => transfer = transfer_failed(&app, &inject, &format!("the REFER was answered {status}")),
                    Err(e) => transfer = transfer_failed(&app, &inject, &format!("the REFER failed: {e}")),
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                match &transfer {
                    Transfer::Announcing { summary, .. } => {
                        warn!("the transfer line was not said in time; transferring anyway");
                        let Some(tc) = config.transfer.as_ref() else { continue };
                        transfer = start_refer(&call, tc, summary.clone(), &parley_call_id, &refer_tx);
                    }
                    _ => transfer = transfer_failed(&app, &inject, "no final NOTIFY in time"),
                }
            }
            ev = call.next_event() => match ev {
                CallEvent::Ended(reason) => {
                    info!(?reason, "the caller ended the call");
                    ender.cancel();
                    (&mut driven).await;
                    break true;
                }
                CallEvent::Acked { .. } => {}
                CallEvent::TransferProgress { status, terminated } => {
                    if !matches!(transfer, Transfer::Referring { .. }) {
                        debug!(status, "a NOTIFY for no transfer of ours");
                        continue;
                    }
                    match status {
                        100..=199 if !terminated => debug!(status, "transfer in progress"),
                        200..=299 => {
                            info!(status, "transferred: the caller is connected to the target; hanging up our leg");
                            app.metrics.sip_transfers_completed.inc();
                            ender.cancel();
                            (&mut driven).await;
                            break false;
                        }
                        _ => transfer = transfer_failed(&app, &inject, &format!("the target answered {status}")),
                    }
                }
                CallEvent::Reoffer(r) => {
                    if r.sdp.is_empty() {
                        // A re-INVITE without an offer: we offer what we have now.
                        version += 1;
                        r.answer(sdp::answer(&current, &local, version)).await;
                        continue;
                    }
                    match sdp::parse(&r.sdp).and_then(|d| sdp::negotiate(&d)) {
                        Ok(mut n) => {
                            // The sender keeps the packet length it started with (and
                            // the call its codec: a new one on the wire is transcoded).
                            n.ptime_ms = terms.ptime_ms;
                            version += 1;
                            info!(direction = ?n.direction, remote = ?n.remote, codec = n.codec.name(), "re-INVITE: {}", if n.direction == sdp::Direction::SendRecv { "media both ways" } else { "on hold" });
                            media.update(n);
                            current = n;
                            r.answer(sdp::answer(&n, &local, version)).await;
                        }
                        Err(e) => {
                            info!(error = %e, "re-INVITE refused; the call goes on as it was");
                            r.refuse(refuse_offer(&e)).await;
                        }
                    }
                }
            },
        }
    };
    if !hung_up_by_caller {
        info!("hanging up (BYE)");
        if let Err(e) = call.bye().await {
            info!(error = %e, "BYE not completed");
        }
    }
    drop(media);
}

/// Sends the REFER (in a task of its own: its answer comes while the call's events
/// are read); its result arrives on `answers`.
fn start_refer(call: &IncomingCall, tc: &TransferConfig, summary: String, call_id: &str, answers: &mpsc::Sender<Result<u16, SipError>>) -> Transfer {
    let referrer = call.referrer();
    let target = tc.target.clone();
    let headers = vec![(transfer::SUMMARY_HEADER.to_string(), summary), (transfer::CALL_ID_HEADER.to_string(), call_id.to_string())];
    let answers = answers.clone();
    info!(%target, "sending REFER");
    tokio::spawn(
        async move {
            let _ = answers.send(referrer.refer(&target, headers).await).await;
        }
        .in_current_span(),
    );
    Transfer::Referring { until: Instant::now() + TRANSFER_LIMIT }
}

/// A transfer that did not go through: the caller is told, the call goes on.
fn transfer_failed(app: &App, inject: &mpsc::UnboundedSender<CallInput>, why: &str) -> Transfer {
    info!(why, "transfer failed; the call goes on");
    app.metrics.sip_transfers_failed.inc();
    let options = ResponseOptions { instructions: None, interruptible: true, say: Some(transfer::FAILED_SAY.to_string()) };
    let _ = inject.send(CallInput::Say(options));
    Transfer::Idle
}

/// Whether two texts say the same words (case and punctuation aside): a spoken line's
/// transcript against the configured sentence.
fn same_words(a: &str, b: &str) -> bool {
    let words = |s: &str| s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect::<Vec<_>>();
    words(a) == words(b)
}

/// Waits (bounded) until the agent's queued audio has gone out.
async fn played_out(media: &Media) {
    let until = Instant::now() + PLAY_OUT_LIMIT;
    while media.queued_ms() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Waits for a refused or abandoned INVITE's dialog to end (the stack sends the
/// final response and takes the ACK), bounded.
async fn wait_end(call: &mut IncomingCall) {
    let _ = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            if let CallEvent::Ended(r) = call.next_event().await {
                debug!(reason = ?r, "dialog ended");
                return;
            }
        }
    })
    .await;
}

/// The call as a driver transport: it is open once answered.
struct SipTransport {
    app: Arc<App>,
    terms: Negotiated,
    greeting: String,
    clearer: Clearer,
    /// Whether `transfer_call` is offered.
    transfer: bool,
    /// Inputs from the call's loop (the transfer's), for the decoder.
    injected: mpsc::UnboundedReceiver<CallInput>,
    /// To the call's loop, from the encoder.
    signals: mpsc::UnboundedSender<Signal>,
}

impl<S: WireSource> Transport<S> for SipTransport {
    type Decoder = SipDecoder;
    type Encoder = SipEncoder;

    async fn open(self, _source: &mut S) -> Option<Opening<SipDecoder, SipEncoder>> {
        let settings = call_settings(&self.app.session_defaults, self.terms, self.transfer);
        let mut first_inputs = Vec::new();
        if !self.greeting.trim().is_empty() {
            let mut no_tools = settings.clone();
            no_tools.tools_enabled = false;
            let options = ResponseOptions { instructions: Some(greeting_instructions(&settings.instructions, self.greeting.trim())), ..ResponseOptions::default() };
            first_inputs = vec![CallInput::Update(Box::new(no_tools)), CallInput::CreateResponseWith(options), CallInput::Update(Box::new(settings.clone()))];
        }
        let decoder = SipDecoder { app: Some(self.app.clone()), keys: 0, injected: Some(self.injected) };
        let encoder = SipEncoder { clearer: self.clearer, cleared: None, signals: Some(self.signals), asked: None, caller_said: VecDeque::new() };
        Some(Opening { settings, first_inputs, decoder, encoder })
    }
}

/// The call's settings: the server's defaults with the agreed codec both ways, 20 ms
/// frames, server turn detection and, when transfers are on, `transfer_call` (a
/// client tool: this transport runs it).
fn call_settings(defaults: &SessionSettings, terms: Negotiated, transfer: bool) -> SessionSettings {
    let mut s = defaults.clone();
    if transfer && !s.client_tools.iter().any(|t| t.name == transfer::TOOL_NAME) {
        s.client_tools.push(transfer::tool_spec());
    }
    s.input_format = terms.codec.format();
    s.output_format = terms.codec.format();
    s.pacing.frame_ms = 20;
    if s.turn_detection.is_none() {
        s.turn_detection = Some(TurnDetection::default());
    }
    s
}

/// Media to call input, and the call loop's own inputs (taken with each frame).
struct SipDecoder {
    /// For the key-press counter (`None` in unit tests).
    app: Option<Arc<App>>,
    keys: usize,
    /// Inputs from the call's loop (`None` in unit tests).
    injected: Option<mpsc::UnboundedReceiver<CallInput>>,
}

impl Decoder for SipDecoder {
    type Note = std::convert::Infallible;

    fn decode(&mut self, msg: WireIn, out: &mut Vec<Step<Self::Note>>) {
        // The media side delivers a frame every 20 ms, held or not: the loop's
        // inputs wait at most that long.
        if let Some(injected) = self.injected.as_mut() {
            while let Ok(input) = injected.try_recv() {
                out.push(Step::Input(input));
            }
        }
        match msg {
            WireIn::Binary(frame) => out.push(Step::Input(CallInput::Audio(frame.to_vec()))),
            WireIn::Text(t) => {
                if let Some(key) = t.strip_prefix("dtmf:").and_then(|k| k.chars().next()) {
                    self.keys += 1;
                    if let Some(app) = &self.app {
                        app.metrics.sip_dtmf_keys.inc();
                    }
                    out.push(Step::Input(CallInput::UserText(dtmf_text(key))));
                }
            }
            WireIn::TooLarge(_) => {}
        }
    }

    fn finished(&mut self) {
        info!(keys = self.keys, "SIP call media closed");
    }
}

/// Call events to media: the agent's audio into the send queue; on barge-in the
/// queue is emptied at once and the rest of the cut response is dropped. It also
/// watches for `transfer_call` and tells the call's loop.
struct SipEncoder {
    clearer: Clearer,
    cleared: Option<String>,
    /// To the call's loop (`None` in unit tests).
    signals: Option<mpsc::UnboundedSender<Signal>>,
    /// A `transfer_call` made by a response still running: (response, call id, reason).
    asked: Option<(String, String, String)>,
    /// The caller's last turns, for the transfer summary.
    caller_said: VecDeque<String>,
}

impl SipEncoder {
    fn signal(&self, signal: Signal) {
        if let Some(tx) = &self.signals {
            let _ = tx.send(signal);
        }
    }
}

impl Encoder for SipEncoder {
    type Note = std::convert::Infallible;

    fn event(&mut self, ev: &AgentEvent, wire: &mut Vec<WireOut>) {
        match ev {
            AgentEvent::AudioDelta { response_id, audio, .. } if self.cleared.as_ref() != Some(response_id) => {
                wire.push(WireOut::Binary(audio.clone().into()));
            }
            AgentEvent::OutputAudioCleared { response_id } => {
                info!(%response_id, "caller barged in: dropping the queued audio");
                self.cleared = Some(response_id.clone());
                self.clearer.clear();
            }
            AgentEvent::ResponseDone { response_id, status, transcript, .. } => {
                info!(%response_id, status = status.as_str(), "response done");
                if let Some((_, tool_call_id, reason)) = self.asked.take_if(|(asked_by, _, _)| asked_by == response_id) {
                    self.signal(Signal::TransferAsked { tool_call_id, reason, caller_said: self.caller_said.iter().cloned().collect() });
                }
                self.signal(Signal::Spoken(transcript.clone()));
            }
            AgentEvent::FunctionCall { response_id, call, client: true, .. } if call.name == transfer::TOOL_NAME => {
                let reason = transfer::reason_of(&call.arguments);
                info!(call_id = %call.id, %reason, "the model called transfer_call");
                self.asked = Some((response_id.clone(), call.id.clone(), reason));
            }
            AgentEvent::UserTranscript { transcript, .. } => {
                debug!(chars = transcript.len(), "caller's turn transcribed");
                if !transcript.trim().is_empty() {
                    if self.caller_said.len() == SUMMARY_TURNS {
                        self.caller_said.pop_front();
                    }
                    self.caller_said.push_back(transcript.clone());
                }
            }
            AgentEvent::Error { code, message } => warn!(code = code.as_str(), %message, "agent error"),
            _ => {}
        }
    }

    fn note(&mut self, note: Self::Note, _out: &mut Vec<WireOut>) {
        match note {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_run_on_the_agreed_codec_with_server_vad() {
        let defaults = SessionSettings { turn_detection: None, ..SessionSettings::default() };
        let terms = Negotiated { codec: sdp::Codec::Pcma, dtmf_pt: Some(101), ptime_ms: 30, remote: None, direction: sdp::Direction::SendRecv };
        let s = call_settings(&defaults, terms, false);
        assert_eq!((s.input_format, s.output_format, s.pacing.frame_ms), (parley_audio::format::AudioFormat::Pcma, parley_audio::format::AudioFormat::Pcma, 20));
        assert!(s.turn_detection.is_some());
        assert!(s.client_tools.is_empty(), "no transfer target: no transfer_call");
        let with = call_settings(&defaults, terms, true);
        assert_eq!(with.client_tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["transfer_call"]);
        assert_eq!(call_settings(&with, terms, true).client_tools.len(), 1, "offered once");
    }

    #[test]
    fn a_transfer_call_is_reported_once_its_response_is_done_with_the_callers_words() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut e = SipEncoder { clearer: Clearer::detached(), cleared: None, signals: Some(tx), asked: None, caller_said: VecDeque::new() };
        let mut wire = Vec::new();
        for t in ["Hello.", "I have a billing question.", "Please transfer me to a person."] {
            e.event(&AgentEvent::UserTranscript { item_id: "i".into(), transcript: t.into() }, &mut wire);
        }
        let call = parley_llm::ToolCall { id: "call_1".into(), name: "transfer_call".into(), arguments: serde_json::json!({"reason": "wants a person"}) };
        e.event(&AgentEvent::FunctionCall { response_id: "r1".into(), item_id: "f".into(), previous_item_id: None, call, client: true }, &mut wire);
        assert!(rx.try_recv().is_err(), "not before the response is done");
        let done = |id: &str, text: &str| AgentEvent::ResponseDone { response_id: id.into(), item_id: None, status: parley_agent::ResponseStatus::Completed, transcript: text.into(), function_calls: Vec::new() };
        e.event(&done("r1", ""), &mut wire);
        match rx.try_recv() {
            Ok(Signal::TransferAsked { tool_call_id, reason, caller_said }) => {
                assert_eq!((tool_call_id.as_str(), reason.as_str()), ("call_1", "wants a person"));
                assert_eq!(caller_said, ["I have a billing question.", "Please transfer me to a person."]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(rx.try_recv(), Ok(Signal::Spoken(t)) if t.is_empty()));
        e.event(&done("r2", "Transferring you now."), &mut wire);
        assert!(matches!(rx.try_recv(), Ok(Signal::Spoken(t)) if t == "Transferring you now."));
        assert!(rx.try_recv().is_err(), "asked once");
    }

    #[test]
    fn the_transfer_line_is_recognised_by_its_words() {
        assert!(same_words("Please hold.  I am putting you through", "Please hold, I am putting you through"));
        assert!(!same_words("Please hold.", "Please hold, I am putting you through"));
        assert!(!same_words("", "Transferring you now."));
    }

    #[test]
    fn key_presses_become_user_text_and_frames_audio() {
        let (inject, injected) = mpsc::unbounded_channel();
        let mut d = SipDecoder { app: None, keys: 0, injected: Some(injected) };
        inject.send(CallInput::CancelResponse).expect("send");
        let mut out = Vec::new();
        d.decode(WireIn::Text(super::super::media::dtmf_message('7')), &mut out);
        d.decode(WireIn::Binary(vec![0xFFu8; 160].into()), &mut out);
        assert!(matches!(&out[0], Step::Input(CallInput::CancelResponse)), "the loop's input first");
        assert!(matches!(&out[1], Step::Input(CallInput::UserText(t)) if t.contains('7')));
        assert!(matches!(&out[2], Step::Input(CallInput::Audio(a)) if a.len() == 160));
        assert_eq!(out.len(), 3);
    }
}
