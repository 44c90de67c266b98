//! The call driver: the one piece every transport (Realtime WebSocket, Twilio media
//! streams, the HTTP/2 NDJSON stream, SageMaker's WebSocket, the SIP bridge to come)
//! runs its calls through.
//!
//! A transport is an adapter: a [`WireSource`] and a [`WireSink`] for its connection,
//! a [`Decoder`] that turns wire messages into [`CallInput`]s, and an [`Encoder`] that
//! turns [`AgentEvent`]s into wire messages. The driver owns the rest, so no transport
//! has its own copy of it:
//!
//! - admission and authentication ([`admit`]): API key, readiness, capacity;
//! - the call deadline (`server.max_call_seconds`), also while the transport is still
//!   opening the call (Twilio waits for `start`);
//! - the reader (the driver's own task) and the writer task, the only one that writes
//!   to the client; every write has a timeout (`server.write_timeout_ms`), so a client
//!   that stops reading is cut off and its slot freed instead of holding it for good;
//! - server shutdown (`[server.drain]`): when [`App::shutdown`] fires the call says
//!   the configured goodbye in its own voice ([`CallInput::EndWith`]), the writer
//!   delivers it and closes the connection with 1001 (going away);
//! - structured shutdown: when the reader stops (the client left, the deadline, a dead
//!   writer, server shutdown) the call is closed (its responses and transcriptions
//!   end with it), the writer gets a bounded grace to deliver what is left and is then
//!   aborted, and the call slot is released last.

pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use parley_agent::{AgentEvent, CallInput, SessionSettings};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::app::{App, CallSlot, Refusal};

/// Notes (protocol errors) waiting for the writer.
const NOTE_QUEUE: usize = 32;
/// How long the writer may take, after the call closed, to deliver what is left.
const WRITER_GRACE: Duration = Duration::from_secs(5);
/// The longest a call may take to say its goodbye when the server stops (the
/// sentence is paced in real time; a longer one is cut off).
const GOODBYE_LIMIT: Duration = Duration::from_secs(15);
/// WebSocket close code when the server stops (RFC 6455 "going away").
const CLOSE_GOING_AWAY: u16 = 1001;

/// A message read from the client.
#[derive(Debug)]
pub enum WireIn {
    /// A text message (a WebSocket text frame, an NDJSON line).
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// A message over the transport's size limit, already discarded (an NDJSON line
    /// longer than `server.max_message_bytes`): its length so far.
    TooLarge(usize),
}

/// A message for the client.
#[derive(Debug)]
pub enum WireOut {
    /// A text message.
    Text(String),
    /// A binary message (for transports that carry raw audio; none of today's
    /// encoders produces one yet).
    #[allow(dead_code)]
    Binary(Bytes),
    /// Ends the connection with a code and reason (WebSocket close); transports
    /// without one just end. Sent when the server stops.
    Close {
        /// The WebSocket close code.
        code: u16,
        /// Why, for the client.
        reason: String,
    },
}

/// Why the connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or was reset.
    #[error("connection failed: {0}")]
    Io(String),
}

/// The client's side of a connection, read by the driver.
pub trait WireSource: Send + 'static {
    /// Whether ending the client's side (`None` from [`WireSource::recv`]) is a half
    /// close after which the client still reads (an HTTP/2 request body) rather than
    /// the connection going away (a WebSocket close).
    const HALF_CLOSE: bool;

    /// The next message; `None` when the client ended its side.
    fn recv(&mut self) -> impl Future<Output = Option<Result<WireIn, WireError>>> + Send;
}

/// The server's side of a connection, written only by the driver's writer task.
pub trait WireSink: Send + 'static {
    /// Sends one message (the driver bounds it with the write timeout).
    fn send(&mut self, msg: WireOut) -> impl Future<Output = Result<(), WireError>> + Send;
    /// Ends the server's side politely.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// What a [`Decoder`] made of one client message.
#[derive(Debug)]
pub enum Step<N> {
    /// Input for the call.
    Input(CallInput),
    /// Something for the writer to tell the client (a protocol error).
    Note(N),
    /// The client ended the call (Twilio's `stop`).
    End,
}

/// A transport's reading half: wire messages to call input.
pub trait Decoder: Send + 'static {
    /// What the decoder asks the encoder to tell the client.
    type Note: Send + 'static;
    /// Decodes one client message into `out`.
    fn decode(&mut self, msg: WireIn, out: &mut Vec<Step<Self::Note>>);
    /// What to tell the client when the call reaches its maximum duration.
    fn deadline_note(&mut self) -> Option<Self::Note> {
        None
    }
    /// Called once when the call has ended (for the transport's closing log line).
    fn finished(&mut self) {}
}

/// A transport's writing half: call events to wire messages.
pub trait Encoder: Send + 'static {
    /// See [`Decoder::Note`].
    type Note: Send + 'static;
    /// Renders one call event into `out`.
    fn event(&mut self, event: &AgentEvent, out: &mut Vec<WireOut>);
    /// Renders one note from the decoder into `out`.
    fn note(&mut self, note: Self::Note, out: &mut Vec<WireOut>);
}

/// A call the transport has opened: its settings, first inputs and its two halves.
pub struct Opening<D, E> {
    /// The call's settings.
    pub settings: SessionSettings,
    /// Inputs sent before any client message (Twilio's greeting).
    pub first_inputs: Vec<CallInput>,
    /// The reading half.
    pub decoder: D,
    /// The writing half.
    pub encoder: E,
}

/// How a transport opens a call on a connection: reads what it needs before the
/// call can start (Twilio's `start`; most need nothing) and returns the call's
/// settings and the transport's two halves. `None` ends the connection.
pub trait Transport<S: WireSource>: Send + 'static {
    /// The reading half.
    type Decoder: Decoder;
    /// The writing half.
    type Encoder: Encoder<Note = <Self::Decoder as Decoder>::Note>;
    /// Opens the call (the driver bounds it with the call's deadline).
    fn open(self, source: &mut S) -> impl Future<Output = Option<Opening<Self::Decoder, Self::Encoder>>> + Send;
}

/// Checks the API key, readiness and capacity before a call starts; every transport
/// admits through here. `pre_authorized` skips the key (a verified Twilio signature
/// stands in for one).
pub fn admit(app: &App, headers: &HeaderMap, pre_authorized: bool) -> Result<CallSlot, Refusal> {
    app.admit(headers, pre_authorized)
}

/// Why the reader stopped.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// The client closed the connection or ended its messages.
    ClientLeft,
    /// The client finished sending (an HTTP/2 body); the reply in progress was delivered.
    ClientFinished,
    /// The client said so (Twilio `stop`).
    ClientEnded,
    /// A read failed.
    Lost,
    /// The writer could not deliver to the client within the write timeout.
    WriterDead,
    /// `server.max_call_seconds`.
    Deadline,
    /// The server is shutting down.
    Shutdown,
    /// The call task ended by itself.
    CallEnded,
}

/// Runs one call: `open` reads what the transport needs before the call can start
/// (under the call's deadline), then the driver runs the call until it ends and
/// frees everything it holds. Run it inside the transport's span.
pub async fn run<S, K, T>(app: Arc<App>, slot: CallSlot, mut source: S, sink: K, transport: T)
where
    S: WireSource,
    K: WireSink,
    T: Transport<S>,
{
    let Some(engines) = app.engines() else { return };
    let limit = app.max_call_duration();
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let shutdown = app.shutdown.clone();
    let opening = tokio::select! {
        o = transport.open(&mut source) => o,
        _ = &mut deadline => {
            info!("the call reached server.max_call_seconds before it started; closing");
            None
        }
        _ = shutdown.cancelled() => None,
    };
    let Some(Opening { settings, first_inputs, mut decoder, encoder }) = opening else { return };

    let (call, events) = parley_agent::Call::start(slot.id.clone(), engines, settings);
    let (note_tx, note_rx) = mpsc::channel(NOTE_QUEUE);
    let dead = CancellationToken::new();
    let (drain_tx, drain_rx) = watch::channel(false);
    let idle = CancellationToken::new();
    let write_timeout = app.write_timeout();
    let writer = tokio::spawn(
        write_loop(WriterParts { sink, events, notes: note_rx, encoder, app: app.clone(), write_timeout, dead: dead.clone(), drain: drain_rx, idle: idle.clone() })
            .in_current_span(),
    );
    let mut writer = writer;

    let mut steps = Vec::new();
    let mut pending: std::collections::VecDeque<CallInput> = first_inputs.into();
    let ending = 'reader: loop {
        // Inputs first (they may wait: the call applies backpressure), then the wire.
        while let Some(input) = pending.pop_front() {
            tokio::select! {
                biased;
                _ = dead.cancelled() => break 'reader Ending::WriterDead,
                _ = &mut deadline => break 'reader deadline_reached(&mut decoder, &note_tx),
                _ = shutdown.cancelled() => break 'reader Ending::Shutdown,
                sent = call.send(input) => if sent.is_err() { break 'reader Ending::CallEnded },
            }
        }
        let msg = tokio::select! {
            biased;
            _ = dead.cancelled() => break Ending::WriterDead,
            _ = &mut deadline => break deadline_reached(&mut decoder, &note_tx),
            _ = shutdown.cancelled() => break Ending::Shutdown,
            m = source.recv() => m,
        };
        match msg {
            None if S::HALF_CLOSE => {
                // The client finished sending; it still reads: end after the reply in
                // progress (if any) has been delivered.
                let _ = drain_tx.send(true);
                tokio::select! {
                    _ = idle.cancelled() => break Ending::ClientFinished,
                    _ = dead.cancelled() => break Ending::WriterDead,
                    _ = &mut deadline => break deadline_reached(&mut decoder, &note_tx),
                    _ = shutdown.cancelled() => break Ending::Shutdown,
                }
            }
            None => break Ending::ClientLeft,
            Some(Err(e)) => {
                info!(error = %e, "connection lost");
                break Ending::Lost;
            }
            Some(Ok(m)) => decoder.decode(m, &mut steps),
        }
        for step in steps.drain(..) {
            match step {
                Step::Input(input) => pending.push_back(input),
                Step::Note(note) => {
                    tokio::select! {
                        biased;
                        _ = dead.cancelled() => break 'reader Ending::WriterDead,
                        _ = &mut deadline => break 'reader deadline_reached(&mut decoder, &note_tx),
                        _ = note_tx.send(note) => {}
                    }
                }
                Step::End => break 'reader Ending::ClientEnded,
            }
        }
    };
    debug!(?ending, "the call is ending");
    let mut writer_done = false;
    if matches!(ending, Ending::Shutdown) {
        // The server is stopping: the call says goodbye in its own voice and ends
        // itself; the writer delivers the goodbye, then closes the connection.
        writer_done = say_goodbye(&app, &call, &mut writer).await;
    }
    // The call first (its responses and transcriptions end with it; bounded), then
    // the writer: it delivers what is left within its grace or is aborted.
    call.close().await;
    drop(note_tx);
    if !writer_done && tokio::time::timeout(WRITER_GRACE, &mut writer).await.is_err() {
        warn!("the writer did not finish within {} s; aborting it", WRITER_GRACE.as_secs());
        writer.abort();
    }
    decoder.finished();
    info!(?ending, "call closed");
    drop(slot);
}

/// Asks the call to end with `server.drain.goodbye` and waits (at most
/// [`GOODBYE_LIMIT`]) until the writer has delivered everything the call said and
/// closed the connection. True when the writer finished.
async fn say_goodbye(app: &App, call: &parley_agent::CallHandle, writer: &mut tokio::task::JoinHandle<()>) -> bool {
    let goodbye = app.config.server.drain.goodbye.clone();
    let until = tokio::time::Instant::now() + GOODBYE_LIMIT;
    if !matches!(tokio::time::timeout_at(until, call.send(CallInput::EndWith(goodbye))).await, Ok(Ok(()))) {
        return false;
    }
    match tokio::time::timeout_at(until, &mut *writer).await {
        Ok(_) => {
            info!("said goodbye; connection closed");
            true
        }
        Err(_) => {
            warn!("the goodbye did not finish within {} s; closing the call", GOODBYE_LIMIT.as_secs());
            false
        }
    }
}

fn deadline_reached<N>(decoder: &mut impl Decoder<Note = N>, notes: &mpsc::Sender<N>) -> Ending {
    info!("the call reached server.max_call_seconds; closing");
    if let Some(note) = decoder.deadline_note() {
        // Best effort: a writer that is stuck does not get to hold the call open.
        let _ = notes.try_send(note);
    }
    Ending::Deadline
}

struct WriterParts<K, E: Encoder> {
    sink: K,
    events: mpsc::Receiver<AgentEvent>,
    notes: mpsc::Receiver<E::Note>,
    encoder: E,
    app: Arc<App>,
    write_timeout: Duration,
    /// Cancelled by the writer when the client stopped taking writes.
    dead: CancellationToken,
    /// Set by the reader when the client finished sending.
    drain: watch::Receiver<bool>,
    /// Cancelled by the writer once draining and no reply is in progress.
    idle: CancellationToken,
}

/// The only task that writes to the client. Each write is bounded by the write
/// timeout; a write that does not complete marks the connection dead (the reader
/// then ends the call) and the writer returns, dropping its half of the connection.
async fn write_loop<K: WireSink, E: Encoder>(parts: WriterParts<K, E>) {
    let WriterParts { mut sink, mut events, mut notes, mut encoder, app, write_timeout, dead, mut drain, idle } = parts;
    let mut out = Vec::new();
    let mut notes_open = true;
    let mut draining = false;
    let mut responding = false;
    loop {
        if draining && !responding && !idle.is_cancelled() {
            idle.cancel();
        }
        tokio::select! {
            biased;
            n = notes.recv(), if notes_open => match n {
                Some(n) => encoder.note(n, &mut out),
                None => notes_open = false,
            },
            ev = events.recv() => match ev {
                Some(ev) => {
                    app.metrics.observe(&ev);
                    match &ev {
                        AgentEvent::ResponseCreated { .. } => responding = true,
                        AgentEvent::ResponseDone { .. } => responding = false,
                        _ => {}
                    }
                    encoder.event(&ev, &mut out);
                }
                None => break,
            },
            changed = drain.changed(), if !draining => {
                draining = changed.is_err() || *drain.borrow();
            }
        }
        for msg in out.drain(..) {
            let close = matches!(msg, WireOut::Close { .. });
            match tokio::time::timeout(write_timeout, sink.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    info!(error = %e, "writing to the client failed");
                    dead.cancel();
                    return;
                }
                Err(_) => {
                    warn!(timeout_ms = write_timeout.as_millis() as u64, "the client stopped reading: no write completed within the write timeout; ending the call");
                    app.metrics.write_timeouts.inc();
                    dead.cancel();
                    return;
                }
            }
            if close {
                dead.cancel();
                return;
            }
        }
    }
    if app.shutdown.is_cancelled() {
        // The call ended because the server stops: say so in the close.
        let close = WireOut::Close { code: CLOSE_GOING_AWAY, reason: "the server is shutting down".into() };
        let _ = tokio::time::timeout(write_timeout, sink.send(close)).await;
    }
    let _ = tokio::time::timeout(write_timeout, sink.finish()).await;
}
