//! The call actor: one task that owns a call's state and reacts to input, speech
//! events, transcripts and responses in the order they happen.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use parley_asr::{AsrError, Transcript};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::conversation::{Conversation, Item, ItemContent, ItemRole};
use crate::events::{AgentEvent, CallInput, ErrorCode, ResponseStatus, TurnMetrics};
use crate::ids::new_id;
use crate::input::{InputAudio, InputEvent};
use crate::pacing::PlayClock;
use crate::response::{self, ResponseJob, ResponseOutcome, SharedSession, ToolReport};
use crate::settings::SessionSettings;
use crate::{AgentError, Engines};

/// Inputs queued for a call before the transport has to wait (backpressure).
const INPUT_QUEUE: usize = 256;
/// Events queued for the transport's writer.
const EVENT_QUEUE: usize = 256;

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

    /// Ends the call: stops any response and waits for the call task to finish.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
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
}

/// Wall-clock marks of one turn, from the end of the caller's speech.
#[derive(Debug, Clone, Copy, Default)]
struct TurnTimer {
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
}

struct CallState {
    engines: Arc<Engines>,
    settings: SessionSettings,
    events: mpsc::Sender<AgentEvent>,
    cancel: CancellationToken,
    input: InputAudio,
    conversation: Conversation,
    session: SharedSession,
    response: Option<ActiveResponse>,
    /// Item id of the user speech in progress (between speech start and stop).
    speech_item: Option<String>,
    transcribed_tx: mpsc::Sender<Transcribed>,
    transcribed_rx: Option<mpsc::Receiver<Transcribed>>,
    /// Transcriptions still running; a response waits for them.
    pending_transcripts: usize,
    /// Tool calls and results reported by responses, committed in order.
    reports_tx: mpsc::Sender<ToolReport>,
    reports_rx: mpsc::Receiver<ToolReport>,
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
        let session = Arc::new(Mutex::new(engines.llm.new_session()));
        let (transcribed_tx, transcribed_rx) = mpsc::channel(16);
        let (reports_tx, reports_rx) = mpsc::channel(64);
        Ok(Self {
            engines,
            settings,
            events,
            cancel,
            input,
            conversation: Conversation::default(),
            session,
            response: None,
            speech_item: None,
            transcribed_tx,
            transcribed_rx: Some(transcribed_rx),
            pending_transcripts: 0,
            reports_tx,
            reports_rx,
        })
    }

    /// Queues an event for the transport. Borrows nothing across the await, so the
    /// call's (non-`Sync`) state never has to cross threads by reference.
    fn emit(&self, event: AgentEvent) -> impl std::future::Future<Output = ()> + Send + 'static {
        let events = self.events.clone();
        // A closed channel means the transport is gone; the call ends on its own.
        async move {
            let _ = events.send(event).await;
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
        let mut transcribed = match self.transcribed_rx.take() {
            Some(rx) => rx,
            None => return,
        };
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(report) = self.reports_rx.recv() => self.on_report(report).await,
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input).await,
                    None => break,
                },
                Some(done) = transcribed.recv() => self.on_transcribed(done).await,
                outcome = wait_response(&mut self.response) => self.finish_response(outcome, None).await,
            }
        }
        if let Some(active) = self.response.take() {
            active.cancel.cancel();
            active.task.abort();
        }
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
                let timer = TurnTimer { speech_end: Some(Instant::now()), committed: Some(Instant::now()), transcript: None };
                let item_id = new_id("item");
                self.commit_audio(item_id, samples, timer).await;
            }
            CallInput::ClearInput => {
                self.input.clear();
                self.speech_item = None;
                self.emit(AgentEvent::InputCleared).await;
            }
            CallInput::UserText(text) => {
                let id = new_id("item");
                let previous = self.conversation.push(Item::message(id.clone(), ItemRole::User, Some(text.clone())));
                self.emit(AgentEvent::ItemAdded { item_id: id, previous_item_id: previous, role: ItemRole::User, text: Some(text) }).await;
            }
            CallInput::CreateResponse => {
                if self.response.is_some() {
                    self.error(ErrorCode::ActiveResponse, "a response is already in progress; cancel it or wait for response.done").await;
                    return;
                }
                self.start_response(TurnTimer::default(), None).await;
            }
            CallInput::CancelResponse => {
                if self.response.is_some() {
                    self.interrupt().await;
                }
            }
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
                if let Err(e) = self.input.reconfigure(settings.input_format, vad, settings.max_buffer_ms) {
                    self.error(ErrorCode::InvalidAudio, format!("cannot use that input format: {e}")).await;
                    return;
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
                InputEvent::SpeechStarted { at_ms } => {
                    let item_id = new_id("item");
                    self.speech_item = Some(item_id.clone());
                    self.emit(AgentEvent::SpeechStarted { item_id, audio_start_ms: at_ms }).await;
                    let interrupts = self.settings.turn_detection.as_ref().is_some_and(|t| t.interrupt_response);
                    if interrupts && self.response.is_some() {
                        info!("caller barged in");
                        self.interrupt().await;
                    }
                }
                InputEvent::SpeechStopped { at_ms, samples, ended_at } => {
                    let item_id = self.speech_item.take().unwrap_or_else(|| new_id("item"));
                    self.emit(AgentEvent::SpeechStopped { item_id: item_id.clone(), audio_end_ms: at_ms }).await;
                    let timer = TurnTimer { speech_end: Some(ended_at), committed: Some(Instant::now()), transcript: None };
                    self.commit_audio(item_id, samples, timer).await;
                }
                InputEvent::Overflow => {
                    self.error(ErrorCode::BufferFull, format!("over {} ms of audio without a commit; the buffer was cleared", self.settings.max_buffer_ms)).await;
                }
            }
        }
    }

    /// Adds a user audio item and transcribes it off the runtime.
    async fn commit_audio(&mut self, item_id: String, samples: Vec<f32>, timer: TurnTimer) {
        let previous = self.conversation.push(Item::message(item_id.clone(), ItemRole::User, None));
        self.emit(AgentEvent::InputCommitted { item_id: item_id.clone(), previous_item_id: previous.clone() }).await;
        self.emit(AgentEvent::ItemAdded { item_id: item_id.clone(), previous_item_id: previous, role: ItemRole::User, text: None }).await;
        self.pending_transcripts += 1;
        dump_turn(&item_id, &samples);
        let transcriber = self.engines.transcriber.clone();
        let tx = self.transcribed_tx.clone();
        let span = info_span!("transcribe", item_id = %item_id, audio_ms = samples.len() / 16);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let result = tokio::task::spawn_blocking(move || transcriber.transcribe(&samples))
                    .await
                    .unwrap_or_else(|e| Err(AsrError::Decode(format!("the transcription thread failed: {e}"))));
                let asr_ms = started.elapsed().as_secs_f64() * 1000.0;
                let mut timer = timer;
                timer.transcript = Some(Instant::now());
                let _ = tx.send(Transcribed { item_id, result, asr_ms, timer }).await;
            }
            .instrument(span),
        );
    }

    async fn on_transcribed(&mut self, done: Transcribed) {
        self.pending_transcripts = self.pending_transcripts.saturating_sub(1);
        let text = match done.result {
            Ok(t) => t.text,
            Err(e) => {
                warn!(error = %e, "transcription failed");
                self.error(ErrorCode::TranscriptionFailed, format!("could not transcribe the last turn: {e}")).await;
                String::new()
            }
        };
        info!(item_id = %done.item_id, chars = text.len(), asr_ms = done.asr_ms, "transcript");
        self.conversation.set_text(&done.item_id, text.clone(), false);
        self.emit(AgentEvent::UserTranscript { item_id: done.item_id, transcript: text.clone() }).await;
        let auto = self.settings.turn_detection.as_ref().is_some_and(|t| t.create_response);
        if auto && !text.trim().is_empty() && self.pending_transcripts == 0 && self.response.is_none() && !self.input.in_speech() {
            self.start_response(done.timer, Some(done.asr_ms)).await;
        }
    }

    async fn start_response(&mut self, timer: TurnTimer, asr_ms: Option<f64>) {
        let response_id = new_id("resp");
        let item_id = new_id("item");
        let span = info_span!("turn", response_id = %response_id);
        self.emit(AgentEvent::ResponseCreated { response_id: response_id.clone() }).await;
        let previous = self.conversation.push(Item::message(item_id.clone(), ItemRole::Assistant, None));
        self.emit(AgentEvent::ItemAdded { item_id: item_id.clone(), previous_item_id: previous, role: ItemRole::Assistant, text: None }).await;
        self.emit(AgentEvent::OutputItemAdded { response_id: response_id.clone(), item_id: item_id.clone() }).await;
        let mut options = self.settings.generate.clone();
        if self.settings.tools_enabled {
            options.tools = self.engines.tools.specs();
            options.tools.extend(self.settings.client_tools.iter().cloned());
        }
        let job = ResponseJob {
            response_id: response_id.clone(),
            item_id: item_id.clone(),
            messages: self.conversation.to_messages(&self.settings.instructions),
            options,
            output_format: self.settings.output_format,
            pacing: self.settings.pacing,
            tool_policy: self.settings.tool_policy.clone(),
        };
        let cancel = self.cancel.child_token();
        let clock = Arc::new(Mutex::new(PlayClock::new(self.settings.pacing.lead_ms)));
        let task = tokio::spawn(
            response::run(job, (*self.engines).clone(), self.session.clone(), self.events.clone(), self.reports_tx.clone(), clock.clone(), cancel.clone())
                .instrument(span),
        );
        self.response = Some(ActiveResponse { id: response_id, item_id, cancel, clock, task, timer, asr_ms, function_calls: Vec::new() });
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
        self.emit(AgentEvent::Metrics(metrics)).await;
        self.emit(AgentEvent::ResponseDone { response_id: active.id, item_id: Some(active.item_id), status, transcript: text, function_calls: active.function_calls }).await;
    }
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
