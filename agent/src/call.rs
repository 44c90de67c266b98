//! The call actor: one task that owns a call's state and reacts to input, speech
//! events, transcripts and responses in the order they happen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_asr::{AsrError, Transcript};
use parley_audio::echo::EchoReference;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::conversation::{Conversation, Item, ItemContent, ItemRole};
use crate::events::{AgentEvent, CallInput, ErrorCode, ResponseStatus, TurnMetrics};
use crate::ids::new_id;
use crate::input::{InputAudio, InputEvent};
use crate::pacing::PlayClock;
use crate::response::{self, Playback, ResponseJob, ResponseOutcome, SharedEncoder, SharedSession, ToolReport};
use crate::settings::{ResponseOptions, SessionSettings};
use crate::turn_rules::{PartialStabilizer, is_backchannel, looks_unfinished, reads_complete};
use crate::turns::{Barge, EarlyTranscript, HeldTurn, PARTIAL_MAX_SAMPLES, Speech, asr_slots};
use crate::{AgentError, Engines};

/// Inputs queued for a call before the transport has to wait (backpressure).
const INPUT_QUEUE: usize = 256;
/// Events queued for the transport's writer.
const EVENT_QUEUE: usize = 256;
/// Played audio remembered for the echo check.
const ECHO_MEMORY_MS: u64 = 4_000;
/// Input compared with the played audio when judging speech during a reply.
const ECHO_WINDOW_MS: u64 = 600;
/// How often speech that sounded like echo is looked at again.
const ECHO_RECHECK: Duration = Duration::from_millis(150);
/// How long [`CallHandle::close`] waits for the call task to wind down before it
/// aborts it: the task never blocks on the transport once cancelled, so this is only
/// a backstop against a bug, never a wait a client can cause.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most caller audio an echo call keeps to play back (16 kHz samples, 30 s): a
/// session that never answers (`create_response` off) does not grow without bound.
const ECHO_MAX_SAMPLES: usize = 30 * crate::input::ASR_RATE as usize;

/// Starts calls.
pub struct Call;

/// The transport's handle on a running call. Dropping it ends the call.
pub struct CallHandle {
    tx: mpsc::Sender<CallInput>,
    task: Option<JoinHandle<()>>,
    cancel: CancellationToken,
}

impl CallHandle {
    /// Queues input for the call, waiting if the call is behind.
    pub async fn send(&self, input: CallInput) -> Result<(), AgentError> {
        self.tx.send(input).await.map_err(|_| AgentError::CallEnded)
    }

    /// Ends the call: stops any response and its transcriptions, and waits (at most
    /// [`CLOSE_GRACE`], then aborts) for the call task to finish.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err()
        {
            warn!("the call task did not end within {} ms of its cancellation; aborting it", CLOSE_GRACE.as_millis());
            task.abort();
        }
    }
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Cancelled, it ends by itself; aborting makes sure even a stuck one does.
            runtime.spawn(async move {
                let mut task = task;
                if tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err() {
                    task.abort();
                }
            });
        }
    }
}

impl Call {
    /// Starts a call; returns its handle and the stream of events for the client.
    pub fn start(call_id: String, engines: Arc<Engines>, settings: SessionSettings) -> (CallHandle, mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let cancel = CancellationToken::new();
        let span = info_span!("call", call_id = %call_id);
        let task = tokio::spawn(
            {
                let cancel = cancel.clone();
                async move {
                    match CallState::new(engines, settings, event_tx, cancel) {
                        Ok(state) => state.run(rx).await,
                        Err((events, e)) => {
                            let _ = events.send(AgentEvent::Error { code: ErrorCode::InvalidAudio, message: e }).await;
                        }
                    }
                }
            }
            .instrument(span),
        );
        (CallHandle { tx, task: Some(task), cancel }, event_rx)
    }
}

/// A transcription finished on a blocking thread.
struct Transcribed {
    item_id: String,
    result: Result<Transcript, AsrError>,
    asr_ms: f64,
    timer: TurnTimer,
    /// How the audio got here.
    kind: TranscribeKind,
}

/// Why audio was transcribed.
enum TranscribeKind {
    /// `input_audio_buffer.commit`: the item is already committed.
    Manual,
    /// The VAD ended a stretch of speech; the turn is committed (or held) when the
    /// text is known.
    Segment {
        /// The reply this speech may have interrupted, still to be decided.
        barge: Option<String>,
        ended_at: Instant,
    },
}

/// Longest interval between partial transcripts of speech over a reply: they are
/// what tells an interruption from a backchannel, so they do not wait for the
/// (longer, display-only) `partial_interval_ms`.
const BARGE_PARTIAL_MS: u32 = 500;

/// A partial transcript of the speech in progress.
struct Partial {
    item_id: String,
    text: Option<String>,
}

/// The text of an early transcript (taken at the caller's pause), for judging
/// whether the turn can end before the silence window does.
struct EarlyText {
    item_id: String,
    /// The end of speech (stream ms) it covers.
    end_ms: u64,
    text: String,
}

/// Sets its flag when dropped: a decode future dropped (its call ended, its task
/// aborted) tells the blocking decode to stop, which then frees its slot.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Decodes `samples` on a blocking thread, holding `permit` (a slot of
/// [`asr_slots`]) until the decode is over. Dropping the future stops the decode
/// within a graph step or so (see [`parley_asr::Transcriber::transcribe_until`]).
async fn decode(transcriber: Arc<dyn parley_asr::Transcriber>, samples: Vec<f32>, permit: Option<tokio::sync::SemaphorePermit<'static>>) -> Result<Transcript, AsrError> {
    let stop = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(stop.clone());
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        transcriber.transcribe_until(&samples, &stop)
    })
    .await
    .unwrap_or_else(|e| Err(AsrError::Decode(format!("the transcription thread failed: {e}"))));
    drop(guard);
    result
}

/// Prefills the language model with the conversation plus the caller's words as an
/// early transcript has them, while the VAD's silence window runs: if the turn ends
/// there, the reply's own prefill finds these tokens in the call's KV cache and only
/// starts generating. If the caller goes on, the next prefill keeps the common prefix
/// and overwrites the rest (the cache is cut to what the prompts share).
async fn speculative_prefill(mut messages: Vec<parley_llm::ChatMessage>, text: String, options: parley_llm::GenerateOptions, session: SharedSession) {
    messages.push(parley_llm::ChatMessage::new(parley_llm::Role::User, text));
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        // A reply that starts meanwhile waits for this lock, then reuses what it wrote.
        let Ok(mut session) = session.try_lock() else { return None };
        Some(session.prefill(&messages, &options))
    })
    .await;
    match result {
        Ok(Some(Ok(Some(tokens)))) => debug!(prompt_tokens = tokens, ms = started.elapsed().as_millis() as u64, "speculative prefill"),
        Ok(Some(Err(e))) => debug!(error = %e, "speculative prefill failed"),
        _ => {}
    }
}

/// Wall-clock marks of one turn, from the end of the caller's speech.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TurnTimer {
    speech_end: Option<Instant>,
    committed: Option<Instant>,
    transcript: Option<Instant>,
}

impl TurnTimer {
    fn since_end(&self, t: Option<Instant>) -> Option<f64> {
        match (self.speech_end, t) {
            (Some(end), Some(t)) => Some(t.saturating_duration_since(end).as_secs_f64() * 1000.0),
            _ => None,
        }
    }
}

/// The response in progress.
struct ActiveResponse {
    id: String,
    item_id: String,
    cancel: CancellationToken,
    clock: Arc<Mutex<PlayClock>>,
    task: JoinHandle<ResponseOutcome>,
    timer: TurnTimer,
    asr_ms: Option<f64>,
    /// Function-call items this response produced, for `response.done`.
    function_calls: Vec<(String, parley_llm::ToolCall)>,
    /// Holds the audio while speech over it is judged.
    pause: watch::Sender<bool>,
    /// `false` while a part that may not be interrupted plays.
    interruptible: Arc<AtomicBool>,
    /// The turn's span: its latency breakdown is recorded on it when it ends.
    span: tracing::Span,
}

struct CallState {
    engines: Arc<Engines>,
    settings: SessionSettings,
    events: mpsc::Sender<AgentEvent>,
    cancel: CancellationToken,
    input: InputAudio,
    /// The call's one output encoder, lent to every response (an Opus stream spans
    /// the whole call); a new one only when the output format changes.
    encoder: SharedEncoder,
    conversation: Conversation,
    session: SharedSession,
    response: Option<ActiveResponse>,
    /// The caller's speech in progress (between speech start and stop).
    speech: Option<Speech>,
    /// A finished stretch of speech that sounded unfinished, waiting for more.
    held: Option<HeldTurn>,
    /// Stretches of speech being transcribed, in the order spoken, with results that
    /// came back early: they are resolved strictly in order.
    segments: std::collections::VecDeque<(String, Option<Transcribed>)>,
    /// A committed turn waiting for the reply in progress to end before it is answered.
    pending_response: Option<(TurnTimer, Option<f64>)>,
    /// The last finished reply's item and clock, for `conversation.item.truncate`.
    last_played: Option<(String, Arc<Mutex<PlayClock>>)>,
    /// What the agent played lately, to tell the caller from the agent's echo.
    echo: Arc<Mutex<EchoReference>>,
    partials_tx: mpsc::Sender<Partial>,
    partials_rx: Option<mpsc::Receiver<Partial>>,
    early_tx: mpsc::Sender<EarlyText>,
    early_rx: Option<mpsc::Receiver<EarlyText>>,
    transcribed_tx: mpsc::Sender<Transcribed>,
    transcribed_rx: Option<mpsc::Receiver<Transcribed>>,
    /// Transcriptions still running; a response waits for them.
    pending_transcripts: usize,
    /// Tool calls and results reported by responses, committed in order.
    reports_tx: mpsc::Sender<ToolReport>,
    reports_rx: mpsc::Receiver<ToolReport>,
    /// The call's tool memory: what its tools keep between turns (who the caller
    /// proved to be).
    tool_scope: crate::tools::CallScope,
    /// Every task the call spawns besides its responses (transcriptions, partials,
    /// early transcripts): aborted when the call ends, so none outlives it.
    tasks: tokio::task::JoinSet<()>,
    /// Echo agent ([`Engines::is_echo`]): the caller's turn not yet played back,
    /// 16 kHz; the next response plays it instead of a model's reply.
    echo_audio: Vec<f32>,
    /// Saying goodbye ([`CallInput::EndWith`]): no new replies; the call ends when
    /// nothing plays.
    ending: bool,
}

impl CallState {
    fn new(
        engines: Arc<Engines>,
        settings: SessionSettings,
        events: mpsc::Sender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<Self, (mpsc::Sender<AgentEvent>, String)> {
        let vad = settings.turn_detection.as_ref().map(|t| t.vad.clone());
        let input = match InputAudio::new(settings.input_format, vad, settings.max_buffer_ms) {
            Ok(i) => i,
            Err(e) => return Err((events, format!("cannot set up input audio: {e}"))),
        };
        let encoder = match settings.output_format.encoder() {
            Ok(e) => Arc::new(Mutex::new(e)),
            Err(e) => return Err((events, format!("cannot set up output audio: {e}"))),
        };
        let session = Arc::new(Mutex::new(engines.llm.new_session()));
        let (transcribed_tx, transcribed_rx) = mpsc::channel(16);
        let (reports_tx, reports_rx) = mpsc::channel(64);
        let (partials_tx, partials_rx) = mpsc::channel(4);
        let (early_tx, early_rx) = mpsc::channel(4);
        Ok(Self {
            engines,
            settings,
            events,
            cancel,
            input,
            encoder,
            conversation: Conversation::default(),
            session,
            response: None,
            speech: None,
            held: None,
            segments: std::collections::VecDeque::new(),
            pending_response: None,
            last_played: None,
            echo: Arc::new(Mutex::new(EchoReference::new(ECHO_MEMORY_MS))),
            partials_tx,
            partials_rx: Some(partials_rx),
            early_tx,
            early_rx: Some(early_rx),
            transcribed_tx,
            transcribed_rx: Some(transcribed_rx),
            pending_transcripts: 0,
            reports_tx,
            reports_rx,
            tool_scope: crate::tools::CallScope::default(),
            tasks: tokio::task::JoinSet::new(),
            echo_audio: Vec::new(),
            ending: false,
        })
    }

    /// Queues an event for the transport. Borrows nothing across the await, so the
    /// call's (non-`Sync`) state never has to cross threads by reference.
    /// Never waits past the call's cancellation: a client that stops reading fills
    /// the queue, and the call must still end when its transport gives up on it.
    fn emit(&self, event: AgentEvent) -> impl std::future::Future<Output = ()> + Send + 'static {
        let events = self.events.clone();
        let cancel = self.cancel.clone();
        // A closed channel means the transport is gone; the call ends on its own.
        async move {
            tokio::select! {
                _ = events.send(event) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let message = message.into();
        debug!(code = code.as_str(), %message, "call error");
        self.emit(AgentEvent::Error { code, message })
    }

    async fn run(mut self, mut inputs: mpsc::Receiver<CallInput>) {
        info!("call started");
        self.emit(AgentEvent::SessionUpdated(Box::new(self.settings.clone()))).await;
        let (Some(mut transcribed), Some(mut partials), Some(mut early)) = (self.transcribed_rx.take(), self.partials_rx.take(), self.early_rx.take()) else { return };
        loop {
            // A held turn waits while the caller speaks or a stretch is being transcribed.
            let held_deadline = self.held.as_ref().filter(|_| self.speech.is_none() && self.segments.is_empty()).map(|h| h.deadline);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(report) = self.reports_rx.recv() => self.on_report(report).await,
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input).await,
                    None => break,
                },
                Some(done) = transcribed.recv() => self.on_transcribed(done).await,
                Some(partial) = partials.recv() => self.on_partial(partial).await,
                Some(text) = early.recv() => self.on_early_text(text).await,
                _ = sleep_until_opt(held_deadline) => self.commit_held().await,
                outcome = wait_response(&mut self.response) => self.finish_response(outcome, None).await,
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            if self.ending && self.response.is_none() {
                // The goodbye has played: the call ends, and with it its events.
                break;
            }
        }
        if let Some(active) = self.response.take() {
            active.cancel.cancel();
            active.task.abort();
        }
        // Transcriptions of a call nobody listens to any more: stop them (a running
        // decode stops within a graph step and frees its server-wide slot).
        self.tasks.abort_all();
        info!("call ended");
    }

    async fn on_input(&mut self, input: CallInput) {
        match input {
            CallInput::Audio(bytes) => self.on_audio(&bytes).await,
            CallInput::Commit => {
                if self.input.buffered_ms() == 0 {
                    self.error(ErrorCode::EmptyBuffer, "the input audio buffer is empty; append audio before committing").await;
                    return;
                }
                let samples = self.input.take();
                self.keep_for_echo(&samples);
                let timer = TurnTimer { speech_end: Some(Instant::now()), committed: Some(Instant::now()), transcript: None };
                let item_id = new_id("item");
                self.commit_audio(item_id, samples, timer).await;
            }
            CallInput::ClearInput => {
                self.input.clear();
                self.speech = None;
                self.held = None;
                self.segments.clear();
                self.echo_audio.clear();
                self.emit(AgentEvent::InputCleared).await;
            }
            CallInput::UserText(text) => {
                let id = new_id("item");
                let previous = self.conversation.push(Item::message(id.clone(), ItemRole::User, Some(text.clone())));
                self.emit(AgentEvent::ItemAdded { item_id: id, previous_item_id: previous, role: ItemRole::User, text: Some(text) }).await;
            }
            CallInput::CreateResponse => self.create_response(ResponseOptions::default()).await,
            CallInput::CreateResponseWith(options) => self.create_response(options).await,
            CallInput::Truncate { item_id, audio_end_ms } => self.truncate(item_id, audio_end_ms).await,
            CallInput::CancelResponse => {
                if self.response.is_some() {
                    self.interrupt().await;
                }
            }
            CallInput::Say(options) => self.say_now(options).await,
            CallInput::EndWith(goodbye) => self.end_with(goodbye).await,
            CallInput::ToolOutput { call_id, output } => {
                if !self.conversation.has_call(&call_id) {
                    self.error(ErrorCode::UnknownCall, format!("no function call with call_id {call_id} in this conversation")).await;
                } else if self.conversation.has_output(&call_id) {
                    self.error(ErrorCode::UnknownCall, format!("function call {call_id} already has its output; it is not run or answered twice")).await;
                } else {
                    self.commit_output(call_id, output).await;
                }
            }
            CallInput::Update(settings) => {
                let vad = settings.turn_detection.as_ref().map(|t| t.vad.clone());
                // A reply already playing keeps the encoder it was given.
                let encoder = if settings.output_format == self.settings.output_format {
                    None
                } else {
                    match settings.output_format.encoder() {
                        Ok(e) => Some(Arc::new(Mutex::new(e))),
                        Err(e) => {
                            self.error(ErrorCode::InvalidAudio, format!("cannot use that output format: {e}")).await;
                            return;
                        }
                    }
                };
                if let Err(e) = self.input.reconfigure(settings.input_format, vad, settings.max_buffer_ms) {
                    self.error(ErrorCode::InvalidAudio, format!("cannot use that input format: {e}")).await;
                    return;
                }
                if let Some(encoder) = encoder {
                    self.encoder = encoder;
                }
                self.settings = *settings;
                self.emit(AgentEvent::SessionUpdated(Box::new(self.settings.clone()))).await;
            }
        }
    }

    async fn on_audio(&mut self, bytes: &[u8]) {
        let events = match self.input.push(bytes) {
            Ok(events) => events,
            Err(e) => {
                self.error(ErrorCode::InvalidAudio, format!("audio does not fit the input format: {e}")).await;
                return;
            }
        };
        for event in events {
            match event {
                InputEvent::SpeechStarted { at_ms } => self.on_speech_started(at_ms).await,
                InputEvent::SpeechStopped { at_ms, samples, ended_at } => self.on_speech_stopped(at_ms, samples, ended_at).await,
                InputEvent::SpeechPaused { at_ms, samples } => self.on_speech_paused(at_ms, samples),
                InputEvent::Overflow => {
                    // The speech in progress is gone with the buffer; a reply it paused goes on.
                    if let Some(speech) = self.speech.take()
                        && speech.barge.is_some_and(|b| b.paused)
                        && let Some(active) = self.response.as_ref()
                    {
                        let _ = active.pause.send(false);
                    }
                    self.error(ErrorCode::BufferFull, format!("over {} ms of audio without a commit; the buffer was cleared", self.settings.max_buffer_ms)).await;
                }
            }
        }
        self.judge_barge_in();
        self.start_partial();
        self.end_turn_if_complete().await;
    }

    async fn on_speech_started(&mut self, at_ms: u64) {
        let now = Instant::now();
        let item_id = new_id("item");
        let mut barge = None;
        if let (Some(td), Some(active)) = (self.settings.turn_detection.as_ref(), self.response.as_ref())
            && td.interrupt_response
        {
            if active.interruptible.load(Ordering::SeqCst) {
                let wait = Duration::from_millis(u64::from(td.interruption.min_pause_ms));
                barge = Some(Barge { response_id: active.id.clone(), check_at: now + wait, paused: false, echo: false });
            } else {
                info!("the caller spoke during a part that may not be interrupted; kept for the next turn");
            }
        }
        self.speech = Some(Speech { item_id: item_id.clone(), started: now, stabilizer: PartialStabilizer::default(), last_partial: None, partial: None, complete: None, barge, early: None });
        self.emit(AgentEvent::SpeechStarted { item_id, audio_start_ms: at_ms }).await;
    }

    /// Speech over a reply: once it has lasted the minimum and is not the agent's own
    /// echo, pause the reply while the words are judged.
    fn judge_barge_in(&mut self) {
        let now = Instant::now();
        let Some(td) = self.settings.turn_detection.as_ref() else { return };
        let Some(speech) = self.speech.as_mut() else { return };
        let Some(barge) = speech.barge.as_mut() else { return };
        if barge.paused || now < barge.check_at {
            return;
        }
        let Some(active) = self.response.as_ref().filter(|a| a.id == barge.response_id) else {
            speech.barge = None;
            return;
        };
        if td.interruption.echo_guard {
            let (recent, end) = self.input.recent(ECHO_WINDOW_MS);
            let echo = self.echo.lock().unwrap_or_else(|p| p.into_inner());
            if echo.active_near(end, Duration::from_millis(1_000)) {
                let check = echo.check(recent, end, -200, 800);
                if check.is_echo(td.interruption.echo_correlation) {
                    if !barge.echo {
                        debug!(correlation = check.correlation, lag_ms = check.lag_ms, level_gap_db = check.level_gap_db, "speech over the reply is its own echo");
                    }
                    barge.echo = true;
                    barge.check_at = now + ECHO_RECHECK;
                    return;
                }
                debug!(correlation = check.correlation, lag_ms = check.lag_ms, "speech over the reply is not echo");
            }
        }
        barge.echo = false;
        barge.paused = true;
        let _ = active.pause.send(true);
        info!(after_ms = now.duration_since(speech.started).as_millis() as u64, "the caller speaks over the reply: paused");
    }

    /// Starts a partial transcript of the speech in progress when one is due and a
    /// decoding slot is free.
    fn start_partial(&mut self) {
        let Some(interval) = self.settings.turn_detection.as_ref().map(|t| t.partial_interval_ms) else { return };
        let Some(speech) = self.speech.as_mut() else { return };
        // Speech again after a pause: the early transcript of that pause is stale.
        if speech.early.as_ref().is_some_and(|e| self.input.last_speech_end_ms().is_some_and(|end| end > e.end_ms))
            && let Some(early) = speech.early.take()
        {
            early.drop_stale();
        }
        if speech.early.is_some() {
            return; // paused: the early transcript is running, a partial would only wait
        }
        // Over a reply, partials are what confirms an interruption: they come at
        // least every BARGE_PARTIAL_MS whatever the display interval.
        let interval = match speech.barge {
            Some(_) if interval > 0 => interval.min(BARGE_PARTIAL_MS),
            _ => interval,
        };
        let since = speech.last_partial.unwrap_or(speech.started);
        if interval == 0 || speech.partial.is_some() || since.elapsed() < Duration::from_millis(u64::from(interval)) {
            return;
        }
        if speech.barge.as_ref().is_some_and(|b| b.echo && !b.paused) {
            return;
        }
        let Ok(permit) = asr_slots().try_acquire() else { return };
        speech.last_partial = Some(Instant::now());
        let mut samples = self.input.current();
        if samples.len() > PARTIAL_MAX_SAMPLES {
            samples.drain(..samples.len() - PARTIAL_MAX_SAMPLES);
        }
        let item_id = speech.item_id.clone();
        let transcriber = self.engines.transcriber.clone();
        let tx = self.partials_tx.clone();
        let task = self.tasks.spawn(
            async move {
                let text = decode(transcriber, samples, Some(permit)).await.ok().map(|t| t.text);
                let _ = tx.send(Partial { item_id, text }).await;
            }
            .in_current_span(),
        );
        speech.partial = Some(task);
    }

    async fn on_partial(&mut self, partial: Partial) {
        let Some(speech) = self.speech.as_mut().filter(|s| s.item_id == partial.item_id) else { return };
        speech.partial = None;
        let Some(text) = partial.text else { return };
        let delta = speech.stabilizer.update(&text);
        let confirmed = speech.barge.as_ref().is_some_and(|b| b.paused)
            && self.settings.turn_detection.as_ref().is_some_and(|t| !is_backchannel(&text, &t.interruption.backchannels));
        if confirmed {
            speech.barge = None;
        }
        let item_id = speech.item_id.clone();
        if let Some(delta) = delta {
            self.emit(AgentEvent::UserTranscriptDelta { item_id, delta }).await;
        }
        if confirmed {
            info!("the caller's words interrupt the reply");
            self.interrupt().await;
        }
    }

    async fn on_speech_stopped(&mut self, at_ms: u64, samples: Vec<f32>, ended_at: Instant) {
        let Some(mut speech) = self.speech.take() else { return };
        speech.stop_partial();
        self.emit(AgentEvent::SpeechStopped { item_id: speech.item_id.clone(), audio_end_ms: at_ms }).await;
        let barge = speech.barge.filter(|b| self.response.as_ref().is_some_and(|a| a.id == b.response_id));
        if let Some(b) = &barge
            && !b.paused
        {
            // Too short to pause the reply, or the agent's own echo: not the caller's turn.
            debug!(echo = b.echo, "ignored a sound over the reply");
            return;
        }
        let timer = TurnTimer { speech_end: Some(ended_at), committed: Some(Instant::now()), transcript: None };
        self.keep_for_echo(&samples);
        dump_turn(&speech.item_id, &samples);
        let kind = TranscribeKind::Segment { barge: barge.map(|b| b.response_id), ended_at };
        self.segments.push_back((speech.item_id.clone(), None));
        match speech.early {
            Some(early) if early.end_ms == at_ms => self.transcribe(speech.item_id, samples, timer, kind, Some(early)),
            other => {
                if let Some(early) = other {
                    early.drop_stale();
                }
                self.transcribe(speech.item_id, samples, timer, kind, None);
            }
        }
    }

    /// The caller paused: transcribe the turn now, in case the pause is its end, and
    /// let the language model read the conversation so far with that text meanwhile
    /// ([`speculative_prefill`]). Not for speech over a reply (judged separately).
    fn on_speech_paused(&mut self, at_ms: u64, samples: Vec<f32>) {
        let Some(speech) = self.speech.as_mut() else { return };
        if speech.barge.is_some() || self.engines.transcriber.is_instant() {
            return;
        }
        speech.stop_partial();
        if let Some(old) = speech.early.take() {
            old.drop_stale();
        }
        let stale = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        speech.early = Some(EarlyTranscript { end_ms: at_ms, result: rx, stale: stale.clone() });
        let item_id = speech.item_id.clone();
        let prefill = (self.response.is_none() && self.held.is_none() && self.segments.is_empty())
            .then(|| {
                let (instructions, options) = self.reply_setup(&self.settings.instructions);
                (self.conversation.to_messages(&instructions), options, self.session.clone())
            });
        let transcriber = self.engines.transcriber.clone();
        let early_tx = self.early_tx.clone();
        let span = info_span!("early_transcript", audio_ms = samples.len() / 16);
        self.tasks.spawn(
            async move {
                let permit = asr_slots().acquire().await.ok();
                if stale.load(Ordering::SeqCst) {
                    return; // the caller went on: never decoded
                }
                let started = Instant::now();
                let result = decode(transcriber, samples, permit).await;
                let asr_ms = started.elapsed().as_secs_f64() * 1000.0;
                let text = result.as_ref().ok().map(|t| t.text.trim().to_string()).filter(|t| !t.is_empty());
                let _ = tx.send((result, asr_ms));
                if let Some(text) = &text {
                    let _ = early_tx.send(EarlyText { item_id, end_ms: at_ms, text: text.clone() }).await;
                }
                if let (Some(text), Some((messages, options, session))) = (text, prefill)
                    && !stale.load(Ordering::SeqCst)
                {
                    speculative_prefill(messages, text, options, session).await;
                }
            }
            .instrument(span),
        );
    }

    /// An early transcript arrived: if it reads as a finished question, the turn may
    /// end after `complete_silence_ms` instead of the whole silence window.
    async fn on_early_text(&mut self, early: EarlyText) {
        let Some(td) = self.settings.turn_detection.as_ref() else { return };
        if td.complete_silence_ms >= td.vad.silence_duration_ms {
            return; // off
        }
        let Some(speech) = self.speech.as_mut().filter(|s| s.item_id == early.item_id && s.barge.is_none()) else { return };
        if !reads_complete(&early.text) {
            return;
        }
        speech.complete = Some(early.end_ms);
        self.end_turn_if_complete().await;
    }

    /// Ends the turn now if its early transcript read as finished, the caller has
    /// said nothing since, and `complete_silence_ms` of silence has passed.
    async fn end_turn_if_complete(&mut self) {
        let Some(end_ms) = self.speech.as_ref().and_then(|s| s.complete) else { return };
        let Some(min_silence) = self.settings.turn_detection.as_ref().map(|t| u64::from(t.complete_silence_ms)) else { return };
        if let Some(InputEvent::SpeechStopped { at_ms, samples, ended_at }) = self.input.end_turn(end_ms, min_silence) {
            info!(silence_ms = ended_at.elapsed().as_millis() as u64, "the caller's question reads as finished: turn ended before the silence window");
            self.on_speech_stopped(at_ms, samples, ended_at).await;
        }
    }

    /// Echo agent: keeps a stretch of the caller's speech for the next response to
    /// play back (the most recent [`ECHO_MAX_SAMPLES`]).
    fn keep_for_echo(&mut self, samples: &[f32]) {
        if !self.engines.is_echo() {
            return;
        }
        self.echo_audio.extend_from_slice(samples);
        let excess = self.echo_audio.len().saturating_sub(ECHO_MAX_SAMPLES);
        self.echo_audio.drain(..excess);
    }

    /// Adds a user audio item (a manual commit) and transcribes it off the runtime.
    async fn commit_audio(&mut self, item_id: String, samples: Vec<f32>, timer: TurnTimer) {
        let previous = self.conversation.push(Item::message(item_id.clone(), ItemRole::User, None));
        self.emit(AgentEvent::InputCommitted { item_id: item_id.clone(), previous_item_id: previous.clone() }).await;
        self.emit(AgentEvent::ItemAdded { item_id: item_id.clone(), previous_item_id: previous, role: ItemRole::User, text: None }).await;
        dump_turn(&item_id, &samples);
        self.transcribe(item_id, samples, timer, TranscribeKind::Manual, None);
    }

    /// Transcribes audio on a blocking thread; the result comes back as `Transcribed`.
    /// With the early transcript of the same stretch of speech (see
    /// [`Self::on_speech_paused`]) that is the result, and the audio is decoded only if
    /// the early decode did not run.
    fn transcribe(&mut self, item_id: String, samples: Vec<f32>, timer: TurnTimer, kind: TranscribeKind, early: Option<EarlyTranscript>) {
        self.pending_transcripts += 1;
        let transcriber = self.engines.transcriber.clone();
        let tx = self.transcribed_tx.clone();
        let span = info_span!("transcribe", item_id = %item_id, audio_ms = samples.len() / 16, early = early.is_some());
        self.tasks.spawn(
            async move {
                let early = match early {
                    Some(early) => early.result.await.ok(),
                    None => None,
                };
                let (result, asr_ms) = match early {
                    Some(done) => done,
                    None if transcriber.is_instant() => (transcriber.transcribe(&samples), 0.0),
                    None => {
                        let started = Instant::now();
                        let permit = asr_slots().acquire().await.ok();
                        let result = decode(transcriber, samples, permit).await;
                        (result, started.elapsed().as_secs_f64() * 1000.0)
                    }
                };
                let mut timer = timer;
                timer.transcript = Some(Instant::now());
                let _ = tx.send(Transcribed { item_id, result, asr_ms, timer, kind }).await;
            }
            .instrument(span),
        );
    }

    async fn on_transcribed(&mut self, done: Transcribed) {
        self.pending_transcripts = self.pending_transcripts.saturating_sub(1);
        if !matches!(done.kind, TranscribeKind::Segment { .. }) {
            let text = self.transcript_text(&done).await;
            self.conversation.set_text(&done.item_id, text.clone(), false);
            self.emit(AgentEvent::UserTranscript { item_id: done.item_id, transcript: text.clone() }).await;
            self.maybe_respond(&text, done.timer, Some(done.asr_ms)).await;
            return;
        }
        // Stretches of speech resolve in the order they were spoken.
        match self.segments.iter_mut().find(|(id, _)| *id == done.item_id) {
            Some(slot) => slot.1 = Some(done),
            None => return, // cleared meanwhile
        }
        while self.segments.front().is_some_and(|(_, r)| r.is_some()) {
            if let Some((_, Some(done))) = self.segments.pop_front() {
                self.resolve_segment(done).await;
            }
        }
    }

    /// The text of a transcription; a failure is reported to the client and reads as
    /// silence.
    fn transcript_text(&self, done: &Transcribed) -> impl std::future::Future<Output = String> + Send + 'static {
        let (text, failure) = match &done.result {
            Ok(t) => (t.text.clone(), None),
            Err(e) => {
                warn!(error = %e, "transcription failed");
                (String::new(), Some(self.error(ErrorCode::TranscriptionFailed, format!("could not transcribe the last turn: {e}"))))
            }
        };
        async move {
            if let Some(f) = failure {
                f.await;
            }
            text
        }
    }

    /// Decides what a transcribed stretch of speech is: a false interruption (the
    /// reply resumes), part of a turn that is not over yet (held), or a turn.
    async fn resolve_segment(&mut self, done: Transcribed) {
        let text = self.transcript_text(&done).await;
        info!(item_id = %done.item_id, chars = text.len(), asr_ms = done.asr_ms, "transcript");
        let TranscribeKind::Segment { barge, ended_at } = done.kind else { return };
        let Some(td) = self.settings.turn_detection.clone() else {
            self.commit_turn(done.item_id, text, done.timer, done.asr_ms).await;
            return;
        };
        if let Some(response_id) = barge
            && self.response.as_ref().is_some_and(|a| a.id == response_id)
        {
            if is_backchannel(&text, &td.interruption.backchannels) {
                info!(heard = %crate::redact::Redacted(&text), "no words over the reply: it resumes");
                if let Some(active) = self.response.as_ref() {
                    let _ = active.pause.send(false);
                }
                return;
            }
            info!("the caller's words interrupt the reply");
            self.interrupt().await;
        }
        // A stretch after an unfinished one continues the same turn.
        let (item_id, text) = match self.held.take() {
            Some(held) if !text.trim().is_empty() => {
                info!(item_id = %held.item_id, "the caller went on after a pause; same turn");
                (held.item_id, format!("{} {}", held.text.trim(), text.trim()))
            }
            Some(held) => (held.item_id, held.text),
            None => (done.item_id, text),
        };
        if td.unfinished_silence_ms > td.vad.silence_duration_ms && looks_unfinished(&text) {
            let deadline = ended_at + Duration::from_millis(u64::from(td.unfinished_silence_ms));
            if Instant::now() < deadline || self.speech.is_some() || !self.segments.is_empty() {
                info!(heard = %crate::redact::Redacted(&text), "the turn sounds unfinished: waiting for more");
                self.held = Some(HeldTurn { item_id, text, timer: done.timer, asr_ms: done.asr_ms, deadline });
                return;
            }
        }
        self.commit_turn(item_id, text, done.timer, done.asr_ms).await;
    }

    /// A held turn's wait is over: commit it as it is.
    async fn commit_held(&mut self) {
        let Some(held) = self.held.take() else { return };
        let mut timer = held.timer;
        timer.committed = Some(Instant::now());
        self.commit_turn(held.item_id, held.text, timer, held.asr_ms).await;
    }

    /// Commits a transcribed turn of the caller and answers it when the session says so.
    async fn commit_turn(&mut self, item_id: String, text: String, timer: TurnTimer, asr_ms: f64) {
        let previous = self.conversation.push(Item::message(item_id.clone(), ItemRole::User, Some(text.clone())));
        self.emit(AgentEvent::InputCommitted { item_id: item_id.clone(), previous_item_id: previous.clone() }).await;
        self.emit(AgentEvent::ItemAdded { item_id: item_id.clone(), previous_item_id: previous, role: ItemRole::User, text: None }).await;
        self.emit(AgentEvent::UserTranscript { item_id, transcript: text.clone() }).await;
        self.maybe_respond(&text, timer, Some(asr_ms)).await;
    }

    /// Answers a committed turn when turn detection creates responses; waits for a
    /// reply in progress (one that may not be interrupted) to end first.
    async fn maybe_respond(&mut self, text: &str, timer: TurnTimer, asr_ms: Option<f64>) {
        let auto = self.settings.turn_detection.as_ref().is_some_and(|t| t.create_response);
        if !auto || text.trim().is_empty() || self.pending_transcripts > 0 || self.input.in_speech() || self.held.is_some() || !self.segments.is_empty() {
            return;
        }
        if self.response.is_some() {
            self.pending_response = Some((timer, asr_ms));
            return;
        }
        self.start_response(timer, asr_ms, ResponseOptions::default()).await;
    }

    async fn create_response(&mut self, options: ResponseOptions) {
        if self.response.is_some() {
            self.error(ErrorCode::ActiveResponse, "a response is already in progress; cancel it or wait for response.done").await;
            return;
        }
        self.start_response(TurnTimer::default(), None, options).await;
    }

    /// `conversation.item.truncate`: the client stopped playing an assistant item at
    /// `audio_end_ms`; keep only what was heard by then.
    async fn truncate(&mut self, item_id: String, audio_end_ms: u64) {
        if let Some(active) = self.response.as_ref().filter(|a| a.item_id == item_id) {
            let heard = response::lock(&active.clock).heard_text(audio_end_ms as f64);
            active.cancel.cancel();
            let outcome = wait_response(&mut self.response).await;
            self.finish_response(outcome, Some(heard)).await;
        } else if let Some((_, clock)) = self.last_played.as_ref().filter(|(id, _)| *id == item_id) {
            let heard = response::lock(clock).heard_text(audio_end_ms as f64);
            self.conversation.set_text(&item_id, heard, true);
        } else {
            self.error(ErrorCode::UnknownItem, format!("no assistant audio item {item_id} to truncate")).await;
            return;
        }
        self.emit(AgentEvent::ItemTruncated { item_id, audio_end_ms }).await;
    }

    /// The system prompt and sampling settings of this call's replies: the tools it
    /// offers in the words of the model's family, and their guidance after the
    /// instructions. One place, so the speculative prefill and the reply see the same
    /// prompt (and the warm-up's shared prefix, built by the same registry call).
    fn reply_setup(&self, instructions: &str) -> (String, parley_llm::GenerateOptions) {
        let mut options = self.settings.generate.clone();
        if !self.settings.tools_enabled {
            return (instructions.to_string(), options);
        }
        let (instructions, tools) = self.engines.tools.prompt_for(self.engines.llm.name(), instructions);
        options.tools = tools;
        options.tools.extend(self.settings.client_tools.iter().cloned());
        (instructions, options)
    }

    async fn start_response(&mut self, timer: TurnTimer, asr_ms: Option<f64>, request: ResponseOptions) {
        if self.ending && request.say.is_none() {
            // The call is saying goodbye: no new replies.
            return;
        }
        let response_id = new_id("resp");
        let item_id = new_id("item");
        let span = info_span!(
            "turn",
            response_id = %response_id,
            status = tracing::field::Empty,
            endpoint_ms = tracing::field::Empty,
            transcript_ms = tracing::field::Empty,
            asr_ms = tracing::field::Empty,
            first_token_ms = tracing::field::Empty,
            first_tts_ms = tracing::field::Empty,
            first_audio_ms = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            cached_tokens = tracing::field::Empty,
            prefill_ms = tracing::field::Empty,
            generated_tokens = tracing::field::Empty,
            tool_calls = tracing::field::Empty,
        );
        self.emit(AgentEvent::ResponseCreated { response_id: response_id.clone() }).await;
        let previous = self.conversation.push(Item::message(item_id.clone(), ItemRole::Assistant, None));
        self.emit(AgentEvent::ItemAdded { item_id: item_id.clone(), previous_item_id: previous, role: ItemRole::Assistant, text: None }).await;
        self.emit(AgentEvent::OutputItemAdded { response_id: response_id.clone(), item_id: item_id.clone() }).await;
        let instructions = request.instructions.as_deref().unwrap_or(&self.settings.instructions);
        let (instructions, options) = self.reply_setup(instructions);
        self.tool_scope.next_response();
        let messages = self.conversation.to_messages(&instructions);
        let last_said = messages.iter().rev().find(|m| m.role == parley_llm::Role::User).map(|m| m.content.as_str());
        self.tool_scope.set_caller_answer(last_said.and_then(crate::turn_rules::confirmation_answer));
        let job = ResponseJob {
            response_id: response_id.clone(),
            item_id: item_id.clone(),
            messages,
            options,
            output_format: self.settings.output_format,
            encoder: self.encoder.clone(),
            pacing: self.settings.pacing,
            tool_policy: self.settings.tool_policy.clone(),
            interruptible: request.interruptible,
            scope: self.tool_scope.clone(),
            echo_audio: (request.say.is_none() && self.engines.is_echo() && !self.echo_audio.is_empty()).then(|| std::mem::take(&mut self.echo_audio)),
            say: request.say,
        };
        let cancel = self.cancel.child_token();
        let clock = Arc::new(Mutex::new(PlayClock::new(self.settings.pacing.lead_ms)));
        let (pause, paused) = watch::channel(false);
        let interruptible = Arc::new(AtomicBool::new(request.interruptible));
        let playback = Playback { clock: clock.clone(), paused, interruptible: interruptible.clone(), echo: self.echo.clone() };
        let task = tokio::spawn(
            response::run(job, (*self.engines).clone(), self.session.clone(), self.events.clone(), self.reports_tx.clone(), playback, cancel.clone())
                .instrument(span.clone()),
        );
        self.response = Some(ActiveResponse { id: response_id, item_id, cancel, clock, task, timer, asr_ms, function_calls: Vec::new(), pause, interruptible, span });
    }

    /// The server ends the call with last words ([`CallInput::EndWith`]): the reply
    /// in progress stops (kept as far as it was heard), turns waiting for an answer
    /// are dropped, and `goodbye` is spoken, not interruptible; the run loop ends the
    /// call once nothing is playing.
    async fn end_with(&mut self, goodbye: String) {
        if self.ending {
            return;
        }
        info!("ending the call with a goodbye");
        if self.response.is_some() {
            self.interrupt().await;
        }
        self.ending = true;
        self.pending_response = None;
        self.held = None;
        if !goodbye.trim().is_empty() {
            let options = ResponseOptions { instructions: None, interruptible: false, say: Some(goodbye) };
            self.start_response(TurnTimer::default(), None, options).await;
        }
    }

    /// [`CallInput::Say`]: stops the reply in progress and speaks `options` in its
    /// place. A turn waiting for an answer is put aside meanwhile (ending the reply
    /// would start its answer, and the words would then be refused as a second
    /// response) and answered once the words are done.
    async fn say_now(&mut self, options: ResponseOptions) {
        let waiting = self.pending_response.take();
        if self.response.is_some() {
            self.interrupt().await;
        }
        self.pending_response = waiting.or(self.pending_response.take());
        if self.ending {
            return;
        }
        self.start_response(TurnTimer::default(), None, options).await;
    }

    /// Stops the response in progress and keeps only what the caller heard.
    async fn interrupt(&mut self) {
        let Some(active) = self.response.as_ref() else { return };
        let played = response::lock(&active.clock).played_ms();
        active.cancel.cancel();
        let heard = response::lock(&active.clock).heard_text(played);
        let outcome = wait_response(&mut self.response).await;
        self.finish_response(outcome, Some(heard)).await;
    }

    async fn on_report(&mut self, report: ToolReport) {
        if let Some(call) = self.commit_report(report).await
            && let Some(active) = self.response.as_mut()
        {
            active.function_calls.push(call);
        }
    }

    /// Commits a tool call or result the moment it is reported; returns a call's
    /// item for the response that made it. Duplicates are ignored, so nothing is
    /// committed (or run) twice.
    async fn commit_report(&mut self, report: ToolReport) -> Option<(String, parley_llm::ToolCall)> {
        match report {
            ToolReport::Call { response_id, call, client } => {
                if self.conversation.has_call(&call.id) {
                    return None;
                }
                let item_id = new_id("item");
                let previous = self.conversation.push(Item { id: item_id.clone(), content: ItemContent::FunctionCall(call.clone()) });
                info!(tool = %call.name, call_id = %call.id, client, "model called a tool");
                self.emit(AgentEvent::FunctionCall { response_id, item_id: item_id.clone(), previous_item_id: previous, call: call.clone(), client }).await;
                Some((item_id, call))
            }
            ToolReport::Output { call_id, output } => {
                if !self.conversation.has_output(&call_id) {
                    self.commit_output(call_id, output).await;
                }
                None
            }
        }
    }

    async fn commit_output(&mut self, call_id: String, output: String) {
        let item_id = new_id("item");
        let previous = self.conversation.push(Item { id: item_id.clone(), content: ItemContent::FunctionOutput { call_id: call_id.clone(), output: output.clone() } });
        self.emit(AgentEvent::FunctionOutput { item_id, previous_item_id: previous, call_id, output }).await;
    }

    /// Commits a finished response to the conversation and tells the client.
    async fn finish_response(&mut self, finished: Option<(ActiveResponse, ResponseOutcome)>, heard: Option<String>) {
        let Some((mut active, outcome)) = finished else { return };
        // Calls and results the response reported before ending go in first.
        while let Ok(report) = self.reports_rx.try_recv() {
            if let Some(call) = self.commit_report(report).await {
                active.function_calls.push(call);
            }
        }
        let interrupted = heard.is_some();
        let status = if interrupted { ResponseStatus::Cancelled } else { outcome.status.unwrap_or(ResponseStatus::Failed) };
        let text = heard.unwrap_or_else(|| outcome.text.clone());
        self.conversation.set_text(&active.item_id, text.clone(), interrupted);
        if interrupted {
            self.emit(AgentEvent::OutputAudioCleared { response_id: active.id.clone() }).await;
        }
        self.emit(AgentEvent::AudioDone { response_id: active.id.clone(), item_id: active.item_id.clone() }).await;
        self.emit(AgentEvent::TranscriptDone { response_id: active.id.clone(), item_id: active.item_id.clone(), transcript: text.clone() }).await;
        let timer = active.timer;
        let stats = outcome.stats.clone().unwrap_or_default();
        let metrics = TurnMetrics {
            response_id: active.id.clone(),
            endpoint_ms: timer.since_end(timer.committed),
            transcript_ms: timer.since_end(timer.transcript),
            asr_ms: active.asr_ms,
            first_token_ms: timer.since_end(outcome.first_token_at),
            first_audio_ms: timer.since_end(outcome.first_audio_at),
            prompt_tokens: stats.prompt_tokens,
            cached_tokens: stats.cached_tokens,
            prefill_ms: stats.prefill_ms,
            generated_tokens: stats.generated_tokens,
            first_tts_ms: outcome.first_tts_ms,
        };
        info!(status = status.as_str(), ?metrics, "response finished");
        record_metrics(&active.span, status.as_str(), &metrics, active.function_calls.len());
        self.emit(AgentEvent::Metrics(metrics)).await;
        self.last_played = Some((active.item_id.clone(), active.clock.clone()));
        self.emit(AgentEvent::ResponseDone { response_id: active.id, item_id: Some(active.item_id), status, transcript: text, function_calls: active.function_calls }).await;
        // Speech kept while the reply could not be interrupted is answered now.
        if let Some((timer, asr_ms)) = self.pending_response.take()
            && !self.ending
            && self.response.is_none()
            && !self.input.in_speech()
        {
            self.start_response(timer, asr_ms, ResponseOptions::default()).await;
        }
    }
}

/// Puts a turn's latency breakdown on its span (for traces); fields not measured
/// in this turn stay unset.
fn record_metrics(span: &tracing::Span, status: &str, m: &TurnMetrics, tool_calls: usize) {
    span.record("status", status);
    for (field, value) in [
        ("endpoint_ms", m.endpoint_ms),
        ("transcript_ms", m.transcript_ms),
        ("asr_ms", m.asr_ms),
        ("first_token_ms", m.first_token_ms),
        ("first_tts_ms", m.first_tts_ms),
        ("first_audio_ms", m.first_audio_ms),
    ] {
        if let Some(v) = value {
            span.record(field, v);
        }
    }
    // As i64: traces carry u64 beyond i64's range as strings.
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("prompt_tokens", count(m.prompt_tokens));
    span.record("cached_tokens", count(m.cached_tokens));
    span.record("prefill_ms", m.prefill_ms);
    span.record("generated_tokens", count(m.generated_tokens));
    span.record("tool_calls", count(tool_calls));
}

/// With `PARLEY_DUMP_TURNS=DIR`, writes each committed turn (16 kHz WAV, what the
/// speech-to-text hears) to DIR: for debugging recognition problems.
fn dump_turn(item_id: &str, samples: &[f32]) {
    let Some(dir) = std::env::var_os("PARLEY_DUMP_TURNS") else { return };
    let path = std::path::Path::new(&dir).join(format!("{item_id}.wav"));
    if let Err(e) = parley_audio::wav::write_wav(&path, samples, crate::input::ASR_RATE) {
        warn!(error = %e, "cannot dump the turn");
    }
}

/// Sleeps until `deadline`; pending forever without one, so it can sit in a `select!`.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Waits for the active response to finish; pending forever when there is none,
/// so it can sit in a `select!`.
async fn wait_response(slot: &mut Option<ActiveResponse>) -> Option<(ActiveResponse, ResponseOutcome)> {
    let Some(active) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let outcome = (&mut active.task).await.unwrap_or_else(|e| {
        warn!(error = %e, "response task failed");
        ResponseOutcome { status: Some(ResponseStatus::Failed), ..ResponseOutcome::default() }
    });
    slot.take().map(|a| (a, outcome))
}
