//! One call's RTP: a UDP socket, the receive side (symmetric RTP latching, the jitter
//! buffer, RFC 4733 key presses, the RTP timeout) and the send side (our packets on a
//! monotonic clock, one per `ptime`, silence between replies, nothing while held).
//!
//! The call driver sees this as a wire: [`MediaSource`] yields the caller's audio
//! (one 20 ms frame per tick, silence filled in) and key presses; [`MediaSink`] takes
//! the agent's audio into the outgoing queue.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use rtp_types::RtpPacket;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::dtmf::DtmfDecoder;
use super::jitter::JitterBuffer;
use super::packetizer::Packetizer;
use super::sdp::{Codec, Negotiated};
use crate::driver::{WireError, WireIn, WireOut, WireSink, WireSource};

/// The caller's audio goes to the call in frames of this length.
const IN_FRAME_MS: u64 = 20;
/// Samples per millisecond (G.711).
const SAMPLES_PER_MS: usize = 8;
/// Jitter absorbed before the caller's audio plays out.
const PREFETCH_MS: usize = 60;
/// Most caller audio held (older is dropped).
const JITTER_MAX_MS: usize = 1000;
/// Most agent audio queued for sending (the agent paces in real time; this only
/// catches bursts). Over it the oldest is dropped.
const OUT_QUEUE_MS: usize = 2000;
/// Frames waiting for the call (10 s: the call takes them as fast as they come).
const IN_QUEUE: usize = 500;
/// Audio from a new source address is taken over after the latched one was quiet this long.
const RELATCH_AFTER: Duration = Duration::from_secs(2);
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;
/// Malformed packets logged at `warn` per call.
const WARN_LIMIT: u64 = 5;

/// Locks, carrying on past a poisoned lock (the state stays usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the media side tells the call.
#[derive(Debug)]
pub enum MediaIn {
    /// 20 ms of the caller's audio in the call's codec.
    Audio(Vec<u8>),
    /// A key press.
    Dtmf(char),
    /// No RTP from the caller for the configured timeout (not while held).
    Timeout(Duration),
}

/// Settings of the media side.
#[derive(Debug, Clone, Copy)]
pub struct MediaConfig {
    /// End the call after this long without RTP from the caller (0: never).
    pub rtp_timeout: Duration,
}

/// State shared by the call, the receiver and the sender.
#[derive(Debug)]
struct Shared {
    /// The terms on the wire now (a re-INVITE may change the codec).
    terms: Negotiated,
    /// The codec the call runs in (the first agreed): audio is transcoded between it
    /// and the wire's when they differ.
    call_codec: Codec,
    /// Where our RTP goes: the SDP's address until the caller's first packet, then
    /// the address that packet came from.
    remote: Option<SocketAddr>,
    latched: bool,
    /// The agent's audio waiting to be sent.
    out: VecDeque<u8>,
    /// Set by a barge-in: the sender starts a new talk spurt.
    interrupted: bool,
    /// When RTP last came in.
    last_rx: Instant,
}

/// The media side of one call. Dropping it stops its tasks.
pub struct Media {
    shared: Arc<Mutex<Shared>>,
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
    local: SocketAddr,
}

/// Binds an RTP socket on `ip`: an even port in `ports` (inclusive) when given,
/// else any free one.
pub async fn bind(ip: IpAddr, ports: Option<(u16, u16)>) -> std::io::Result<UdpSocket> {
    let Some((lo, hi)) = ports else { return UdpSocket::bind(SocketAddr::new(ip, 0)).await };
    let span = u32::from(hi.saturating_sub(lo)) / 2 + 1;
    // Start somewhere different each call so that ports are not reused at once.
    let start = uuid::Uuid::new_v4().as_u128() as u32 % span;
    for i in 0..span {
        let port = lo + (((start + i) % span) * 2) as u16;
        if port > hi {
            continue;
        }
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(ip, port)).await {
            return Ok(s);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free RTP port in {lo}-{hi}")))
}

impl Media {
    /// Wraps a bound socket; nothing runs until [`Media::start`].
    pub fn new(socket: UdpSocket, terms: Negotiated) -> std::io::Result<Self> {
        let local = socket.local_addr()?;
        let shared = Shared { remote: terms.remote, call_codec: terms.codec, terms, latched: false, out: VecDeque::new(), interrupted: false, last_rx: Instant::now() };
        Ok(Self { shared: Arc::new(Mutex::new(shared)), socket: Arc::new(socket), stop: CancellationToken::new(), local })
    }

    /// The RTP port.
    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// Starts receiving and sending with the agreed terms; returns the call's
    /// halves of the wire.
    pub fn start(&self, terms: Negotiated, config: MediaConfig) -> (MediaSource, MediaSink) {
        self.update(terms);
        lock(&self.shared).call_codec = terms.codec;
        let (tx, rx) = mpsc::channel(IN_QUEUE);
        let ended = CancellationToken::new();
        tokio::spawn(receive(self.socket.clone(), self.shared.clone(), tx, config, self.stop.clone()).in_current_span());
        // The sender gets its own thread: a tokio worker busy with a call's audio
        // work would delay ticks by several milliseconds on a loaded machine.
        match socket2::SockRef::from(self.socket.as_ref()).try_clone() {
            Ok(sock) => {
                let (shared, stop, span) = (self.shared.clone(), self.stop.clone(), tracing::Span::current());
                let spawned = std::thread::Builder::new().name("rtp-send".into()).spawn(move || {
                    let _entered = span.enter();
                    raise_priority();
                    send(sock.into(), shared, stop);
                });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start the RTP sender thread; the caller hears nothing");
                }
            }
            Err(e) => warn!(error = %e, "cannot share the RTP socket with the sender; the caller hears nothing"),
        }
        (MediaSource { rx, ended: ended.clone() }, MediaSink { shared: self.shared.clone() })
    }

    /// New terms from a re-INVITE (hold, resume, a new address or codec).
    pub fn update(&self, terms: Negotiated) {
        let mut s = lock(&self.shared);
        if terms.remote != s.terms.remote && terms.remote.is_some() {
            // A new address in the SDP: latch again onto what really comes.
            s.remote = terms.remote;
            s.latched = false;
        }
        if terms.direction != s.terms.direction {
            // Coming out of hold (or going in): the RTP timeout counts from now.
            s.last_rx = Instant::now();
        }
        s.terms = terms;
    }

    /// How much of the agent's audio waits to be sent, in milliseconds.
    pub fn queued_ms(&self) -> usize {
        lock(&self.shared).out.len() / SAMPLES_PER_MS
    }

    /// A handle for the encoder to clear the queue with.
    pub fn clearer(&self) -> Clearer {
        Clearer { shared: self.shared.clone() }
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn clear(shared: &Mutex<Shared>) {
    let mut s = lock(shared);
    s.out.clear();
    s.interrupted = true;
}

/// Clears the outgoing queue (barge-in) from the encoder.
#[derive(Clone)]
pub struct Clearer {
    shared: Arc<Mutex<Shared>>,
}

impl Clearer {
    /// Drops the agent's queued audio at once.
    pub fn clear(&self) {
        clear(&self.shared);
    }

    /// A clearer of no call's queue (unit tests of the encoder).
    #[cfg(test)]
    pub fn detached() -> Self {
        let terms = super::sdp::Negotiated { codec: super::sdp::Codec::Pcmu, dtmf_pt: None, ptime_ms: 20, remote: None, direction: super::sdp::Direction::SendRecv };
        let shared = Shared { remote: None, call_codec: terms.codec, terms, latched: false, out: VecDeque::new(), interrupted: false, last_rx: Instant::now() };
        Self { shared: Arc::new(Mutex::new(shared)) }
    }
}

/// The receive loop: packets in as they come, one frame out to the call per 20 ms.
async fn receive(socket: Arc<UdpSocket>, shared: Arc<Mutex<Shared>>, tx: mpsc::Sender<MediaIn>, config: MediaConfig, stop: CancellationToken) {
    let codec = lock(&shared).terms.codec;
    let mut jitter = JitterBuffer::new(IN_FRAME_MS as usize * SAMPLES_PER_MS, codec.silence(), PREFETCH_MS * SAMPLES_PER_MS, JITTER_MAX_MS * SAMPLES_PER_MS);
    let mut dtmf = DtmfDecoder::new();
    let mut tick = tokio::time::interval(Duration::from_millis(IN_FRAME_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let (mut packets, mut bad, mut dropped_frames, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP port unreachable surfaces here on some systems: not fatal.
                        debug!(error = %e, "RTP receive error");
                        continue;
                    }
                };
                let pkt = match RtpPacket::parse(&buf[..n]) {
                    Ok(p) => p,
                    Err(e) => {
                        bad += 1;
                        if bad <= WARN_LIMIT { warn!(%from, bytes = n, error = ?e, "malformed RTP packet ignored"); }
                        continue;
                    }
                };
                let pt = pkt.payload_type();
                let (audio_pt, dtmf_pt, wire_codec, call_codec) = {
                    let mut s = lock(&shared);
                    let (audio_pt, dtmf_pt) = (s.terms.codec.payload_type(), s.terms.dtmf_pt);
                    let (wire_codec, call_codec) = (s.terms.codec, s.call_codec);
                    // Symmetric RTP: send back to where the caller's audio really comes
                    // from (behind NAT that is not what its SDP says). Key presses may
                    // come from elsewhere and move nothing; audio from another source
                    // is taken over only once the latched one has gone quiet.
                    if pt == audio_pt {
                        let quiet = s.last_rx.elapsed() > RELATCH_AFTER;
                        if !s.latched || (s.remote != Some(from) && quiet) {
                            if s.remote != Some(from) {
                                info!(%from, before = ?s.remote, "RTP latched onto the caller's source address");
                            }
                            s.remote = Some(from);
                            s.latched = true;
                        } else if s.remote != Some(from) {
                            foreign += 1;
                            if foreign <= WARN_LIMIT { debug!(%from, "audio from another address than the latched one ignored"); }
                            continue;
                        }
                    }
                    s.last_rx = Instant::now();
                    (audio_pt, dtmf_pt, wire_codec, call_codec)
                };
                packets += 1;
                if pt == audio_pt && wire_codec == call_codec {
                    jitter.push(pkt.ssrc(), pkt.timestamp(), pkt.payload());
                } else if pt == audio_pt {
                    jitter.push(pkt.ssrc(), pkt.timestamp(), &wire_codec.transcode(call_codec, pkt.payload()));
                } else if Some(pt) == dtmf_pt {
                    match dtmf.packet(pkt.ssrc(), pkt.timestamp(), pkt.payload()) {
                        Ok(Some(key)) => {
                            debug!("the caller pressed a key");
                            if tx.send(MediaIn::Dtmf(key)).await.is_err() { break; }
                        }
                        Ok(None) => {}
                        Err(e) => { bad += 1; if bad <= WARN_LIMIT { warn!(error = %e, "bad telephone-event packet ignored"); } }
                    }
                } else if pt == 13 {
                    // Comfort noise: silence, which the jitter buffer fills in anyway.
                } else {
                    bad += 1;
                    if bad <= WARN_LIMIT { warn!(pt, "RTP with a payload type not agreed ignored"); }
                }
            }
            _ = tick.tick() => {
                let (receiving, silent_for) = {
                    let s = lock(&shared);
                    // Any hold (sendonly, inactive) may come with no media at all.
                    (s.terms.direction == super::sdp::Direction::SendRecv, s.last_rx.elapsed())
                };
                if receiving && !config.rtp_timeout.is_zero() && silent_for >= config.rtp_timeout {
                    let _ = tx.try_send(MediaIn::Timeout(silent_for));
                    break;
                }
                let (frame, _) = jitter.pop();
                if tx.try_send(MediaIn::Audio(frame)).is_err() {
                    if tx.is_closed() { break; }
                    dropped_frames += 1;
                }
            }
        }
    }
    let st = jitter.stats();
    info!(packets, malformed = bad, late = st.late, duplicate = st.duplicate, ssrc_changes = st.ssrc_changes, frames_dropped = dropped_frames, "RTP receive ended");
}

/// Asks for a higher scheduling priority for the calling thread (nice -10), as media
/// pacing threads do: a packet late by tens of milliseconds is heard. Without the
/// privilege (CAP_SYS_NICE) the thread keeps the process's priority.
fn raise_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take and return plain integers; the call only
        // changes this thread's nice value.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
        if result != 0 {
            debug!(error = %std::io::Error::last_os_error(), "the RTP sender keeps the process's priority");
        }
    }
}

/// The send loop: one packet per `ptime` on a monotonic clock. When the clock falls
/// behind (a stalled thread), the packets missed are skipped, not burst: the
/// timestamp still says how much time passed.
fn send(socket: std::net::UdpSocket, shared: Arc<Mutex<Shared>>, stop: CancellationToken) {
    let terms = lock(&shared).terms;
    let ptime = Duration::from_millis(u64::from(terms.ptime_ms));
    let samples = terms.ptime_ms * SAMPLES_PER_MS as u32;
    let r = uuid::Uuid::new_v4().as_u128();
    let mut payload_type = terms.codec.payload_type();
    let mut packetizer = Packetizer::new(r as u32, payload_type, (r >> 32) as u16, (r >> 64) as u32, samples);
    let start = Instant::now();
    let mut tick: u64 = 0;
    let (mut sent, mut skipped, mut errors) = (0u64, 0u64, 0u64);
    loop {
        tick += 1;
        if stop.is_cancelled() {
            break;
        }
        let due_at = start + ptime * tick as u32;
        let now = Instant::now();
        if due_at > now {
            std::thread::sleep(due_at - now);
        }
        // Ticks the clock already passed go out as timestamp, not packets.
        let due = (start.elapsed().as_micros() / ptime.as_micros()) as u64;
        while tick < due {
            packetizer.skip();
            skipped += 1;
            tick += 1;
        }
        let (payload, speech, to) = {
            let mut s = lock(&shared);
            if s.interrupted {
                s.interrupted = false;
                packetizer.interrupt();
            }
            let n = samples as usize;
            let cap = OUT_QUEUE_MS * SAMPLES_PER_MS;
            if s.out.len() > cap {
                let excess = s.out.len() - cap;
                s.out.drain(..excess);
            }
            let (wire, call) = (s.terms.codec, s.call_codec);
            if wire.payload_type() != payload_type {
                payload_type = wire.payload_type();
                packetizer.set_payload_type(payload_type);
            }
            if !s.terms.direction.sends() || s.remote.is_none() {
                // Held (or nowhere to send): nothing goes out, the agent's audio is dropped.
                s.out.clear();
                (None, false, None)
            } else if s.out.is_empty() {
                (Some(vec![wire.silence(); n]), false, s.remote)
            } else {
                let take = n.min(s.out.len());
                let mut p: Vec<u8> = s.out.drain(..take).collect();
                p.resize(n, call.silence());
                (Some(call.transcode(wire, &p)), true, s.remote)
            }
        };
        let (Some(payload), Some(to)) = (payload, to) else {
            packetizer.skip();
            continue;
        };
        let packet = packetizer.packet(&payload, speech);
        // The socket is non-blocking (shared with the receiver's tokio half): a full
        // send buffer drops this packet, as the network would.
        match socket.send_to(&packet, to) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                if errors <= WARN_LIMIT {
                    debug!(error = %e, %to, "RTP send failed");
                }
            }
        }
    }
    info!(sent, skipped, errors, ssrc = packetizer.ssrc(), "RTP send ended");
}

/// The caller's side of the wire for the driver.
pub struct MediaSource {
    rx: mpsc::Receiver<MediaIn>,
    ended: CancellationToken,
}

impl MediaSource {
    /// A token that ends the source (the caller hung up).
    pub fn ender(&self) -> CancellationToken {
        self.ended.clone()
    }
}

/// How a key press travels from the source to the decoder (a wire text message).
pub fn dtmf_message(key: char) -> String {
    format!("dtmf:{key}")
}

impl WireSource for MediaSource {
    const HALF_CLOSE: bool = false;

    async fn recv(&mut self) -> Option<Result<WireIn, WireError>> {
        tokio::select! {
            biased;
            _ = self.ended.cancelled() => None,
            m = self.rx.recv() => match m? {
                MediaIn::Audio(frame) => Some(Ok(WireIn::Binary(Bytes::from(frame)))),
                MediaIn::Dtmf(key) => Some(Ok(WireIn::Text(dtmf_message(key)))),
                MediaIn::Timeout(after) => Some(Err(WireError::Io(format!("no RTP from the caller for {} s", after.as_secs())))),
            },
        }
    }
}

/// The agent's side of the wire: audio into the outgoing queue.
pub struct MediaSink {
    shared: Arc<Mutex<Shared>>,
}

impl WireSink for MediaSink {
    async fn send(&mut self, msg: WireOut) -> Result<(), WireError> {
        if let WireOut::Binary(audio) = msg {
            lock(&self.shared).out.extend(audio.iter().copied());
        }
        Ok(())
    }

    async fn finish(&mut self) {}
}
