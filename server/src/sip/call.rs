//! One SIP call from INVITE to hang-up: admission (486/503), the offer (488 when no
//! codec matches), ringing, our answer (or our offer when the INVITE had none, the
//! answer then coming in the ACK), the call run by the driver, re-INVITEs for hold
//! and resume, and the end: BYE from the caller, CANCEL, or our BYE when the driver
//! stops first (`max_call_seconds`, the RTP timeout, shutdown).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use parley_agent::{AgentEvent, CallInput, ResponseOptions, SessionSettings, TurnDetection};
use tracing::{Span, debug, info, warn};

use super::media::{Clearer, Media, MediaConfig};
use super::sdp::{self, LocalMedia, Negotiated, SdpError};
use super::stack::{CallEvent, IncomingCall, Refuse};
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
            let why = if app.engines().is_none() { Refuse::Unavailable } else { Refuse::Busy };
            info!(status = ?why, "call refused: {}", if why == Refuse::Busy { "server.max_calls reached" } else { "the models are still loading" });
            let _ = call.refuse(why);
            wait_end(&mut call).await;
            return;
        }
    };
    Span::current().record("call_id", slot.id.as_str());
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
            CallEvent::Ended(reason) => {
                info!(?reason, "the call ended before the ACK");
                return;
            }
        }
    };
    info!(codec = terms.codec.name(), ptime_ms = terms.ptime_ms, dtmf_pt = ?terms.dtmf_pt, remote = ?terms.remote, direction = ?terms.direction, rtp_port = media.port(), "call answered");
    let (source, sink) = media.start(terms, config.media);
    let ender = source.ender();
    let transport = SipTransport { app: app.clone(), terms, greeting: config.greeting.clone(), clearer: media.clearer() };
    let driven = driver::run(app.clone(), slot, source, sink, transport);
    tokio::pin!(driven);
    let mut current = terms;
    let hung_up_by_caller = loop {
        tokio::select! {
            _ = &mut driven => break false,
            ev = call.next_event() => match ev {
                CallEvent::Ended(reason) => {
                    info!(?reason, "the caller ended the call");
                    ender.cancel();
                    (&mut driven).await;
                    break true;
                }
                CallEvent::Acked { .. } => {}
                CallEvent::Reoffer(r) => {
                    if r.sdp.is_empty() {
                        // A re-INVITE without an offer: we offer what we have now.
                        version += 1;
                        r.answer(sdp::answer(&current, &local, version)).await;
                        continue;
                    }
                    match sdp::parse(&r.sdp).and_then(|d| sdp::negotiate(&d)) {
                        Ok(n) => {
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
}

impl<S: WireSource> Transport<S> for SipTransport {
    type Decoder = SipDecoder;
    type Encoder = SipEncoder;

    async fn open(self, _source: &mut S) -> Option<Opening<SipDecoder, SipEncoder>> {
        let settings = call_settings(&self.app.session_defaults, self.terms);
        let mut first_inputs = Vec::new();
        if !self.greeting.trim().is_empty() {
            let mut no_tools = settings.clone();
            no_tools.tools_enabled = false;
            let options = ResponseOptions { instructions: Some(greeting_instructions(&settings.instructions, self.greeting.trim())), ..ResponseOptions::default() };
            first_inputs = vec![CallInput::Update(Box::new(no_tools)), CallInput::CreateResponseWith(options), CallInput::Update(Box::new(settings.clone()))];
        }
        Some(Opening { settings, first_inputs, decoder: SipDecoder { app: Some(self.app.clone()), keys: 0 }, encoder: SipEncoder { clearer: self.clearer, cleared: None } })
    }
}

/// The call's settings: the server's defaults with the agreed codec both ways, 20 ms
/// frames and server turn detection.
fn call_settings(defaults: &SessionSettings, terms: Negotiated) -> SessionSettings {
    let mut s = defaults.clone();
    s.input_format = terms.codec.format();
    s.output_format = terms.codec.format();
    s.pacing.frame_ms = 20;
    if s.turn_detection.is_none() {
        s.turn_detection = Some(TurnDetection::default());
    }
    s
}

/// Media to call input.
struct SipDecoder {
    /// For the key-press counter (`None` in unit tests).
    app: Option<Arc<App>>,
    keys: usize,
}

impl Decoder for SipDecoder {
    type Note = std::convert::Infallible;

    fn decode(&mut self, msg: WireIn, out: &mut Vec<Step<Self::Note>>) {
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
/// queue is emptied at once and the rest of the cut response is dropped.
struct SipEncoder {
    clearer: Clearer,
    cleared: Option<String>,
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
            AgentEvent::ResponseDone { response_id, status, .. } => info!(%response_id, status = status.as_str(), "response done"),
            AgentEvent::UserTranscript { transcript, .. } => debug!(chars = transcript.len(), "caller's turn transcribed"),
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
        let s = call_settings(&defaults, terms);
        assert_eq!((s.input_format, s.output_format, s.pacing.frame_ms), (parley_audio::format::AudioFormat::Pcma, parley_audio::format::AudioFormat::Pcma, 20));
        assert!(s.turn_detection.is_some());
    }

    #[test]
    fn key_presses_become_user_text_and_frames_audio() {
        let mut d = SipDecoder { app: None, keys: 0 };
        let mut out = Vec::new();
        d.decode(WireIn::Text(super::super::media::dtmf_message('7')), &mut out);
        d.decode(WireIn::Binary(vec![0xFFu8; 160].into()), &mut out);
        assert!(matches!(&out[0], Step::Input(CallInput::UserText(t)) if t.contains('7')));
        assert!(matches!(&out[1], Step::Input(CallInput::Audio(a)) if a.len() == 160));
    }
}
