//! One response of the agent: LLM text → phrases → speech → paced audio frames.
//!
//! Four stages joined by small bounded channels, so synthesis of the next phrase
//! overlaps playback of the current one and a slow caller backs up the pipeline
//! instead of growing a queue. Everything stops when the response's cancellation
//! token fires (barge-in, `response.cancel`, the call ending).

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use parley_audio::format::AudioFormat;
use parley_audio::frame::Framer;
use parley_audio::resample::StreamResampler;
use parley_llm::{ChatMessage, GenerateOptions, GenerationStats, LlmSession};
use parley_tts::chunker::PhraseChunker;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::events::{AgentEvent, ErrorCode, ResponseStatus};
use crate::pacing::PlayClock;
use crate::settings::PacingSettings;
use crate::Engines;

/// LLM text pieces in flight between the model thread and the chunker.
const TEXT_QUEUE: usize = 64;
/// Phrases waiting for synthesis.
const PHRASE_QUEUE: usize = 4;
/// Frames synthesized ahead of playback (50 × 20 ms = 1 s).
const FRAME_QUEUE: usize = 50;

/// A call's LLM session, shared between the call and the thread generating.
pub type SharedSession = Arc<Mutex<Box<dyn LlmSession>>>;

/// What a response needs to run.
pub struct ResponseJob {
    pub response_id: String,
    pub item_id: String,
    pub messages: Vec<ChatMessage>,
    pub options: GenerateOptions,
    pub output_format: AudioFormat,
    pub pacing: PacingSettings,
}

/// How a response ended, for the call to commit to the conversation.
#[derive(Debug, Default)]
pub struct ResponseOutcome {
    /// Completed, or failed; cancellation is decided by the call.
    pub status: Option<ResponseStatus>,
    /// Every phrase the agent was going to say, in order.
    pub text: String,
    /// The model's own accounting.
    pub stats: Option<GenerationStats>,
    /// When the first LLM text arrived.
    pub first_token_at: Option<Instant>,
    /// When the first audio frame was sent.
    pub first_audio_at: Option<Instant>,
    /// How long the first phrase took to synthesize.
    pub first_tts_ms: Option<f64>,
}

/// A phrase's audio cut into frames; the first frame carries the phrase text.
struct Frame {
    audio: Vec<u8>,
    ms: f64,
    phrase: Option<(String, f64)>,
}

/// Runs a response to its end or until `cancel` fires. Audio and transcript deltas
/// go to `events`; the play clock is shared so the call can read what was heard.
pub async fn run(
    job: ResponseJob,
    engines: Engines,
    session: SharedSession,
    events: mpsc::Sender<AgentEvent>,
    clock: Arc<Mutex<PlayClock>>,
    cancel: CancellationToken,
) -> ResponseOutcome {
    let first_token_at = Arc::new(OnceLock::new());
    let (text_tx, text_rx) = mpsc::channel::<String>(TEXT_QUEUE);
    let (phrase_tx, phrase_rx) = mpsc::channel::<String>(PHRASE_QUEUE);
    let (frame_tx, frame_rx) = mpsc::channel::<Frame>(FRAME_QUEUE);

    let llm = tokio::task::spawn_blocking({
        let cancel = cancel.clone();
        let first = first_token_at.clone();
        let messages = job.messages;
        let options = job.options.clone();
        let span = tracing::Span::current();
        move || {
            let _enter = span.enter();
            let mut session = session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            session.generate(&messages, &options, &mut |piece: &str| {
                if cancel.is_cancelled() {
                    return ControlFlow::Break(());
                }
                if !piece.is_empty() {
                    let _ = first.set(Instant::now());
                }
                match text_tx.blocking_send(piece.to_string()) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            })
        }
    });

    let chunker = tokio::spawn(chunk_phrases(text_rx, phrase_tx, cancel.clone()).in_current_span());
    let synth = tokio::spawn(
        synthesize_phrases(phrase_rx, frame_tx, engines.clone(), job.output_format, job.pacing, events.clone(), cancel.clone())
            .in_current_span(),
    );
    let mut outcome = ResponseOutcome::default();
    let sent = pace_frames(frame_rx, &job.response_id, &job.item_id, &events, &clock, &cancel).await;
    outcome.first_audio_at = sent.first_audio_at;
    outcome.text = sent.text;

    let (synth_result, chunk_result) = (synth.await, chunker.await);
    if let Ok(first_tts) = synth_result {
        outcome.first_tts_ms = first_tts;
    }
    if let Err(e) = chunk_result {
        warn!(error = %e, "phrase chunker task failed");
    }
    outcome.first_token_at = first_token_at.get().copied();
    if cancel.is_cancelled() {
        // The model thread notices on its next token; its result no longer matters.
        return outcome;
    }
    match llm.await {
        Ok(Ok(stats)) => {
            debug!(?stats, "generation finished");
            outcome.stats = Some(stats);
            outcome.status = Some(ResponseStatus::Completed);
        }
        Ok(Err(e)) => {
            warn!(error = %e, "language model failed");
            let _ = events
                .send(AgentEvent::Error { code: ErrorCode::ModelFailed, message: format!("the language model failed: {e}") })
                .await;
            outcome.status = Some(ResponseStatus::Failed);
        }
        Err(e) => {
            warn!(error = %e, "language model thread panicked");
            outcome.status = Some(ResponseStatus::Failed);
        }
    }
    outcome
}

/// Cuts the model's text stream into phrases worth synthesizing on their own.
async fn chunk_phrases(mut text: mpsc::Receiver<String>, phrases: mpsc::Sender<String>, cancel: CancellationToken) {
    let mut chunker = PhraseChunker::new();
    loop {
        let piece = tokio::select! {
            _ = cancel.cancelled() => return,
            piece = text.recv() => piece,
        };
        let ready = match piece {
            Some(piece) => chunker.push(&piece),
            None => chunker.finish().into_iter().collect(),
        };
        for phrase in ready {
            if phrases.send(phrase).await.is_err() {
                return;
            }
        }
        if text.is_closed() && text.is_empty() {
            if let Some(rest) = chunker.finish() {
                let _ = phrases.send(rest).await;
            }
            return;
        }
    }
}

/// Synthesizes each phrase, converts it to the caller's format and queues frames.
/// Returns how long the first phrase took.
async fn synthesize_phrases(
    mut phrases: mpsc::Receiver<String>,
    frames: mpsc::Sender<Frame>,
    engines: Engines,
    format: AudioFormat,
    pacing: PacingSettings,
    events: mpsc::Sender<AgentEvent>,
    cancel: CancellationToken,
) -> Option<f64> {
    let voice_rate = engines.tts.sample_rate();
    let out_rate = format.sample_rate();
    let mut resampler = match StreamResampler::new(voice_rate, out_rate) {
        Ok(r) => r,
        Err(e) => {
            let _ = events.send(AgentEvent::Error { code: ErrorCode::ModelFailed, message: format!("cannot resample the voice: {e}") }).await;
            return None;
        }
    };
    let frame_len = (out_rate as usize * pacing.frame_ms as usize / 1000).max(1);
    let frame_ms = frame_len as f64 * 1000.0 / f64::from(out_rate);
    let mut framer = Framer::new(frame_len);
    let mut first_tts_ms = None;
    loop {
        let phrase = tokio::select! {
            _ = cancel.cancelled() => return first_tts_ms,
            p = phrases.recv() => p,
        };
        let Some(phrase) = phrase else { break };
        let started = Instant::now();
        let tts = engines.tts.clone();
        let text = phrase.clone();
        let synthesis = tokio::task::spawn_blocking(move || tts.synthesize(&text));
        let result = tokio::select! {
            _ = cancel.cancelled() => return first_tts_ms,
            r = synthesis => r,
        };
        let samples = match result {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(error = %e, phrase = %phrase, "synthesis failed; skipping the phrase");
                let _ = events.send(AgentEvent::Error { code: ErrorCode::ModelFailed, message: format!("speech synthesis failed: {e}") }).await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "synthesis thread panicked");
                continue;
            }
        };
        if first_tts_ms.is_none() {
            first_tts_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        let duration_ms = samples.len() as f64 * 1000.0 / f64::from(voice_rate);
        let converted = resampler.process(&samples);
        let mut marker = Some((phrase, duration_ms));
        for frame in framer.push(&converted) {
            let f = Frame { audio: format.encode(&frame), ms: frame_ms, phrase: marker.take() };
            if frames.send(f).await.is_err() {
                return first_tts_ms;
            }
        }
        if let Some((phrase, duration_ms)) = marker {
            // The phrase was shorter than one frame's remainder: mark the next one.
            let f = Frame { audio: Vec::new(), ms: 0.0, phrase: Some((phrase, duration_ms)) };
            if frames.send(f).await.is_err() {
                return first_tts_ms;
            }
        }
    }
    let tail = resampler.flush();
    let mut last = framer.push(&tail);
    last.extend(framer.flush());
    for frame in last {
        if frames.send(Frame { audio: format.encode(&frame), ms: frame_ms, phrase: None }).await.is_err() {
            break;
        }
    }
    first_tts_ms
}

/// What the pacer sent.
struct Sent {
    first_audio_at: Option<Instant>,
    text: String,
}

/// Sends frames no faster than real time plus the lead, on a monotonic clock.
async fn pace_frames(
    mut frames: mpsc::Receiver<Frame>,
    response_id: &str,
    item_id: &str,
    events: &mpsc::Sender<AgentEvent>,
    clock: &Mutex<PlayClock>,
    cancel: &CancellationToken,
) -> Sent {
    let mut sent = Sent { first_audio_at: None, text: String::new() };
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return sent,
            f = frames.recv() => f,
        };
        let Some(frame) = frame else { return sent };
        let send_at = lock(clock).next_send_at();
        if let Some(at) = send_at {
            tokio::select! {
                _ = cancel.cancelled() => return sent,
                _ = tokio::time::sleep_until(at.into()) => {}
            }
        }
        if let Some((text, duration_ms)) = frame.phrase {
            lock(clock).phrase(text.clone(), duration_ms);
            if !sent.text.is_empty() {
                sent.text.push(' ');
            }
            sent.text.push_str(&text);
            let delta = AgentEvent::TranscriptDelta { response_id: response_id.into(), item_id: item_id.into(), delta: text };
            if events.send(delta).await.is_err() {
                return sent;
            }
        }
        if frame.audio.is_empty() {
            continue;
        }
        if cancel.is_cancelled() {
            return sent;
        }
        lock(clock).sent(frame.ms);
        sent.first_audio_at.get_or_insert_with(Instant::now);
        let delta = AgentEvent::AudioDelta { response_id: response_id.into(), item_id: item_id.into(), audio: frame.audio };
        if events.send(delta).await.is_err() {
            return sent;
        }
    }
}

/// Locks the play clock; a poisoned lock still holds a usable clock.
pub fn lock(clock: &Mutex<PlayClock>) -> std::sync::MutexGuard<'_, PlayClock> {
    clock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
