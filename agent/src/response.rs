//! One response of the agent: LLM text → phrases → speech → paced audio frames.
//!
//! Four stages joined by small bounded channels, so synthesis of the next phrase
//! overlaps playback of the current one and a slow caller backs up the pipeline
//! instead of growing a queue. Everything stops when the response's cancellation
//! token fires (barge-in, `response.cancel`, the call ending).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use parley_audio::codec::AudioEncoder;
use parley_audio::echo::EchoReference;
use parley_audio::format::AudioFormat;
use parley_audio::frame::Framer;
use parley_audio::resample::StreamResampler;
use parley_llm::{ChatMessage, GenerateOptions, GenerationStats, LlmSession, ToolCall};
use parley_tts::chunker::PhraseChunker;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::events::{AgentEvent, ErrorCode, ResponseStatus};
use crate::pacing::PlayClock;
use crate::parrot::Parrot;
use crate::settings::{PacingSettings, ToolPolicy};
use crate::tools::{CallScope, ToolError, ToolRegistry};
use crate::Engines;

/// LLM text pieces in flight between the model thread and the chunker.
const TEXT_QUEUE: usize = 64;
/// Phrases waiting for synthesis.
const PHRASE_QUEUE: usize = 4;
/// Frames synthesized ahead of playback (50 × 20 ms = 1 s).
const FRAME_QUEUE: usize = 50;

/// A call's LLM session, shared between the call and the thread generating.
pub type SharedSession = Arc<Mutex<Box<dyn LlmSession>>>;

/// A call's output encoder, owned by the call and lent to each response: Opus
/// packets of every reply continue one stream, as the caller's one decoder expects.
pub type SharedEncoder = Arc<Mutex<AudioEncoder>>;

/// What a response needs to run.
pub struct ResponseJob {
    pub response_id: String,
    pub item_id: String,
    pub messages: Vec<ChatMessage>,
    /// Sampling settings; `options.tools` holds every tool offered (server and client).
    pub options: GenerateOptions,
    pub output_format: AudioFormat,
    /// The call's encoder for `output_format`. Frames are encoded as they are sent,
    /// so audio a barge-in drops never advances it past what the caller received.
    pub encoder: SharedEncoder,
    pub pacing: PacingSettings,
    /// Timeouts, holding phrase and round limit of the tool loop.
    pub tool_policy: ToolPolicy,
    /// `false`: the whole reply plays even if the caller speaks.
    pub interruptible: bool,
    /// The call's tool memory (who the caller proved to be, …).
    pub scope: CallScope,
    /// Echo agent: the caller's turn (16 kHz) to play back instead of a reply; it
    /// goes through the same framing, pacing, pause and barge-in as speech.
    pub echo_audio: Option<Vec<f32>>,
    /// A fixed text to speak instead of asking the model (the server's goodbye).
    pub say: Option<String>,
}

/// The call's hold on a response's playback: pause and resume it, know whether the
/// audio playing now may be interrupted, and record what was played for the echo
/// check.
#[derive(Clone)]
pub struct Playback {
    /// Where the response's audio stands on the caller's timeline.
    pub clock: Arc<Mutex<PlayClock>>,
    /// `true` holds the audio (a possible interruption is being judged).
    pub paused: watch::Receiver<bool>,
    /// `false` while a not-interruptible segment plays.
    pub interruptible: Arc<AtomicBool>,
    /// The call's record of played audio.
    pub echo: Arc<Mutex<EchoReference>>,
}

/// What the response reports to its call while it runs, so that tool calls and
/// results are committed to the conversation the moment they exist, whatever
/// happens to the response afterwards.
#[derive(Debug)]
pub enum ToolReport {
    /// The model called a tool.
    Call { response_id: String, call: ToolCall, client: bool },
    /// A server tool finished (or failed, or timed out).
    Output { call_id: String, output: String },
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
    /// Samples at the output format's rate, encoded only when the frame is sent.
    samples: Vec<f32>,
    ms: f64,
    phrase: Option<(String, f64)>,
    /// From this frame on the reply may not be interrupted.
    uninterruptible: bool,
}

impl Frame {
    fn audio(samples: Vec<f32>, ms: f64, phrase: Option<(String, f64)>) -> Self {
        Self { samples, ms, phrase, uninterruptible: false }
    }
}

/// Samples per outbound frame and the frame's duration in ms: the pacing setting,
/// except for Opus, whose every frame is one 20 ms packet.
fn frame_size(format: AudioFormat, pacing: PacingSettings) -> (usize, f64) {
    let rate = format.sample_rate();
    let len = (rate as usize * format.frame_ms(pacing.frame_ms) as usize / 1000).max(1);
    (len, len as f64 * 1000.0 / f64::from(rate))
}

/// What the model's side sends the chunker. Control marks are variants, not text,
/// so nothing a model or a replica writes can end a segment or switch off barge-in.
#[derive(Debug, Clone, PartialEq)]
enum TextPiece {
    /// Text the model wrote.
    Text(String),
    /// A sentence of the agent's own, not the model's (a gate's result, said as it
    /// opened): spoken as it is, without the guards against the model's repeats.
    Ours(String),
    /// One generation ended (each is its own segment for the JSON guard).
    SegmentEnd,
    /// What follows may not be interrupted (a tool result asked for it, e.g. a
    /// legal notice).
    Uninterruptible,
}

/// What the chunker sends synthesis.
#[derive(Debug, Clone, PartialEq)]
enum PhrasePiece {
    /// A phrase to say.
    Phrase(String),
    /// From here on the reply may not be interrupted.
    Uninterruptible,
}

/// Runs a response to its end or until `cancel` fires. Audio and transcript deltas
/// go to `events`; the play clock is shared so the call can read what was heard.
pub async fn run(
    mut job: ResponseJob,
    engines: Engines,
    session: SharedSession,
    events: mpsc::Sender<AgentEvent>,
    reports: mpsc::Sender<ToolReport>,
    playback: Playback,
    cancel: CancellationToken,
) -> ResponseOutcome {
    playback.interruptible.store(job.interruptible, Ordering::SeqCst);
    if let Some(audio) = job.echo_audio.take() {
        return play_back(audio, &job, &events, playback, &cancel).await;
    }
    let first_token_at = Arc::new(OnceLock::new());
    let (text_tx, text_rx) = mpsc::channel::<TextPiece>(TEXT_QUEUE);
    if let Some(said) = job.say.take() {
        // Our own words, not the model's: nothing to guard against.
        let parrot = Arc::new(Parrot::for_messages(&[]));
        let think = tokio::spawn(async move {
            let _ = text_tx.send(TextPiece::Ours(said)).await;
            Ok(GenerationStats::default())
        });
        return speak(job, engines, events, playback, cancel, think, text_rx, parrot, first_token_at).await;
    }
    let parrot = Arc::new(Parrot::for_messages(&job.messages).with_tools(&job.options.tools).with_check(&job.options, &job.messages));

    let think = tokio::spawn(
        think(
            job.messages.clone(),
            job.options.clone(),
            job.tool_policy.clone(),
            job.response_id.clone(),
            Tools { registry: engines.tools.clone(), scope: job.scope.clone() },
            session,
            text_tx,
            reports,
            cancel.clone(),
            first_token_at.clone(),
            parrot.clone(),
        )
        .in_current_span(),
    );
    speak(job, engines, events, playback, cancel, think, text_rx, parrot, first_token_at).await
}

/// The speaking half of a response: text from `think` is cut into phrases,
/// synthesized and paced out; then the response's outcome is `think`'s.
#[allow(clippy::too_many_arguments)]
async fn speak(
    job: ResponseJob,
    engines: Engines,
    events: mpsc::Sender<AgentEvent>,
    playback: Playback,
    cancel: CancellationToken,
    think: tokio::task::JoinHandle<Result<GenerationStats, String>>,
    text_rx: mpsc::Receiver<TextPiece>,
    parrot: Arc<Parrot>,
    first_token_at: Arc<OnceLock<Instant>>,
) -> ResponseOutcome {
    let (phrase_tx, phrase_rx) = mpsc::channel::<PhrasePiece>(PHRASE_QUEUE);
    let (frame_tx, frame_rx) = mpsc::channel::<Frame>(FRAME_QUEUE);
    let chunker = tokio::spawn(chunk_phrases(text_rx, phrase_tx, parrot, cancel.clone()).in_current_span());
    let synth = tokio::spawn(
        synthesize_phrases(phrase_rx, frame_tx, engines.clone(), job.output_format, job.pacing, events.clone(), cancel.clone())
            .in_current_span(),
    );
    let mut outcome = ResponseOutcome::default();
    let sent = pace_frames(frame_rx, &job, &events, playback, &cancel).await;
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
    match think.await {
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
            warn!(error = %e, "response thinking task failed");
            outcome.status = Some(ResponseStatus::Failed);
        }
    }
    outcome
}

/// The model's side of a response: generate; if the model called server tools,
/// run them, commit calls and results through `reports`, and generate again, up to
/// the round limit. Client tool calls end the response (the client answers them).
#[allow(clippy::too_many_arguments)]
async fn think(
    mut messages: Vec<ChatMessage>,
    mut options: GenerateOptions,
    policy: ToolPolicy,
    response_id: String,
    tools: Tools,
    session: SharedSession,
    text: mpsc::Sender<TextPiece>,
    reports: mpsc::Sender<ToolReport>,
    cancel: CancellationToken,
    first_token: Arc<OnceLock<Instant>>,
    parrot: Arc<Parrot>,
) -> Result<GenerationStats, String> {
    let mut total = GenerationStats::default();
    // Whether any round said something to the caller (not JSON, not a repeat).
    let mut spoke = false;
    let registry = &tools.registry;
    // Calls run in this response and their results: a repeat is answered from here.
    let mut answered: Vec<(ToolCall, String)> = Vec::new();
    // Calls whose `say` the caller already heard (a gate's, said as it opened).
    let mut announced: Vec<String> = Vec::new();
    let mut held = false;
    let mut retried = false;
    let mut round = 0;
    // Who the caller is gets checked first, with what they said (a gate); a plain
    // yes to a tool's confirmation question makes the confirmed call.
    let mut first_call = parley_llm::known_ids::gate_call(&options, &messages)
        .or_else(|| confirmed_call(&messages, &options.tools))
        .or_else(|| asked_call(&options, &messages));
    let mut asked_gate = false;
    if first_call.is_none() && options.tool_choice == parley_llm::ToolChoice::Auto && parley_llm::known_ids::names_record(&options, &messages) {
        debug!("the caller named a record; the first step is a look-up of it");
        let named = parley_llm::GenerateOptions { tool_choice: parley_llm::ToolChoice::RequiredNamed, ..options.clone() };
        let callable = !parley_llm::known_ids::callable(&named, &messages).is_empty();
        options.tool_choice = if callable { parley_llm::ToolChoice::RequiredNamed } else { parley_llm::ToolChoice::Required };
    }
    while round < policy.max_rounds.max(1) {
        round += 1;
        let generated = match first_call.take() {
            Some(call) => {
                debug!(tool = %call.name, "the caller's words make this call; no generation needed to write it");
                Ok((GenerationStats { tool_calls: vec![call], ..GenerationStats::default() }, String::new()))
            }
            None => generate(&session, messages.clone(), options.clone(), text.clone(), cancel.clone(), first_token.clone()).await,
        };
        let (stats, said) = match generated {
            Ok(done) => done,
            Err(GenerateError::Llm(parley_llm::LlmError::Unavailable(why))) => {
                // The caller hears why the line went quiet; the client gets the error.
                let _ = text.send(TextPiece::Text(UNAVAILABLE_APOLOGY.to_string())).await;
                return Err(why);
            }
            Err(e) => return Err(e.to_string()),
        };
        let repeated = parrot.repeats(&said);
        // Withheld (a time or date before the identity check): not said, and the
        // check says what it needs instead (below).
        let withheld = parrot.withholds(&said);
        if withheld {
            debug!("the reply named a time or date before the identity check; withheld");
        }
        spoke |= is_speech(&said) && !repeated && !withheld;
        if stats.tool_calls.is_empty() && !retried && (!is_speech(&said) || repeated) {
            // After a tool result the small model sometimes echoes JSON instead of
            // speaking, or it reads the caller's line back (the guards keep either
            // from being spoken); ask once more, plainly.
            if repeated {
                debug!("the reply only repeated the caller or an example; asking again");
            }
            retried = true;
            round -= 1;
            if round == 0 && parrot.repeats_result(&said) && !parley_llm::known_ids::callable(&options, &messages).is_empty() {
                // An earlier turn's answer read again to a new question: look the
                // new one up.
                debug!("the reply only repeated an earlier tool result; asking for a look-up");
                options.tool_choice = parley_llm::ToolChoice::Required;
                messages.push(ChatMessage::new(parley_llm::Role::System, LOOK_IT_UP_NUDGE));
            } else if round == 0 && !options.tools.is_empty() && parley_llm::known_ids::callable(&options, &messages).is_empty() {
                // Nothing said and nothing callable: the model wanted a tool whose
                // ids the caller has not given ("You:" and no more, to "What's the
                // status of my order?" from a caller not yet verified, eval).
                debug!("no words and no tool callable yet; asking the model to ask the caller");
                messages.push(ChatMessage::new(parley_llm::Role::System, ASK_FOR_DETAILS_NUDGE));
            } else {
                messages.push(ChatMessage::new(parley_llm::Role::System, PLAIN_SPEECH_NUDGE));
            }
            continue;
        }
        if round == 1 {
            total = stats.clone();
        } else {
            total.generated_tokens += stats.generated_tokens;
            total.tool_calls.extend(stats.tool_calls.iter().cloned());
        }
        if stats.tool_calls.is_empty() || cancel.is_cancelled() {
            // (Not when the model only read the caller's words back: "Good morning!
            // How are you?" is small talk, not a question for the check; eval.)
            if !spoke && !repeated && answered.is_empty() && !asked_gate && !cancel.is_cancelled() {
                // Nothing to say to a caller who has not passed a check: the check
                // says what it needs.
                if let Some(call) = parley_llm::known_ids::gate_ask(&options, &messages) {
                    debug!(tool = %call.name, "no words from the model; the gate says what it needs");
                    asked_gate = true;
                    first_call = Some(call);
                    round -= 1;
                    continue;
                }
            }
            if !spoke {
                say_last_result(&answered, &announced, &text, &cancel).await;
            }
            return Ok(total);
        }
        // A call to a tool nobody offered (the 0.5B model invents `say_hello`) is
        // dropped, not answered with an error it would read out.
        let (mut known, invented): (Vec<ToolCall>, Vec<ToolCall>) =
            stats.tool_calls.iter().cloned().partition(|c| options.tools.iter().any(|t| t.name == c.name));
        // The same call twice in one generation is one call.
        let mut seen: Vec<(String, serde_json::Value)> = Vec::new();
        known.retain(|c| {
            let key = (c.name.clone(), c.arguments.clone());
            let first = !seen.contains(&key);
            seen.push(key);
            first
        });
        if known.is_empty() {
            if retried {
                return Ok(total);
            }
            debug!(tools = ?invented.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), "model called tools that do not exist");
            retried = true;
            round -= 1;
            messages.push(ChatMessage::new(parley_llm::Role::System, PLAIN_SPEECH_NUDGE));
            continue;
        }
        // A call repeated with the same arguments in this response is answered from
        // the first result: not run again, not committed again.
        let repeats: Vec<Option<String>> = known.iter().map(|c| earlier_result(&answered, c)).collect();
        if repeats.iter().all(Option::is_some) {
            // Only calls already answered: the model is echoing its last call instead
            // of speaking (greedy small models loop on it). Their results are in the
            // conversation already; go straight to the reply in words.
            debug!(tools = ?known.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), "model repeated answered calls; replying in words");
            break;
        }
        let mut server_calls = Vec::new();
        let mut any_client_call = false;
        for (call, repeat) in known.iter().zip(&repeats) {
            if repeat.is_some() {
                debug!(tool = %call.name, "repeated tool call answered from its first result");
                continue;
            }
            let client = registry.get(&call.name).is_none() && options.tools.iter().any(|t| t.name == call.name);
            any_client_call |= client;
            if reports.send(ToolReport::Call { response_id: response_id.clone(), call: call.clone(), client }).await.is_err() {
                return Ok(total);
            }
            if !client {
                server_calls.push(call.clone());
            }
        }
        messages.push(ChatMessage::tool_calls("", known.clone()));
        // A required call was made: later rounds speak or call as the model decides.
        options.tool_choice = parley_llm::ToolChoice::Auto;
        if any_client_call {
            // The client runs its tools and asks for the next response itself.
            return Ok(total);
        }
        // The calls run one after another (a check of identity must be done before
        // the look-up the model asked for next), in a task of their own that commits
        // each result even if the caller interrupts meanwhile: a completed call is
        // never lost or re-run.
        let run = tokio::spawn(run_tools(tools.clone(), server_calls, policy.timeout_ms, reports.clone()).in_current_span());
        tokio::pin!(run);
        let results = loop {
            let holding = tokio::time::sleep(std::time::Duration::from_millis(policy.holding_after_ms));
            tokio::select! {
                _ = cancel.cancelled() => return Ok(total),
                r = &mut run => break r.unwrap_or_else(|e| {
                    warn!(error = %e, "tool task failed");
                    Vec::new()
                }),
                _ = holding, if !held && !policy.holding_phrase.is_empty() => {
                    held = true;
                    let _ = text.send(TextPiece::Text(format!("{} ", policy.holding_phrase.trim()))).await;
                }
            }
        };
        let mut hold_the_floor = false;
        let mut gate_opened = false;
        // The `say` sentences of this round's new results the caller has not heard;
        // `None` once one of them has none (an error, a tool not built for voice).
        let mut says: Option<Vec<String>> = Some(Vec::new());
        let mut fresh = results.into_iter();
        for (call, repeat) in known.iter().zip(repeats) {
            let output = match repeat {
                Some(output) => output,
                None => match fresh.next() {
                    Some((_, output)) => {
                        answered.push((call.clone(), output.clone()));
                        parrot.fresh_result(&output);
                        if opens_gate(&options.tools, call, &output) {
                            gate_opened = true;
                            parrot.check_passed();
                            // Said at once: the caller hears the check passed while
                            // the look-up runs.
                            if let Some(say) = spoken_sentence(&output) {
                                parrot.announced(&say);
                                let _ = text.send(TextPiece::Ours(say)).await;
                                announced.push(call.id.clone());
                            }
                        } else {
                            match spoken_sentence(&output) {
                                Some(say) => says.iter_mut().for_each(|s| s.push(say.clone())),
                                None => says = None,
                            }
                        }
                        output
                    }
                    None => serde_json::json!({ "error": "the tool did not finish" }).to_string(),
                },
            };
            hold_the_floor |= asks_uninterruptible(&output);
            messages.push(ChatMessage::tool_result(call.id.clone(), output));
        }
        if hold_the_floor {
            let _ = text.send(TextPiece::Uninterruptible).await;
        }
        let says = says.filter(|s| !s.is_empty() && !gate_opened);
        if let Some(says) = says {
            // Results built for voice speak for themselves: their `say` sentences are
            // the answer, in the desk's words. (Read back by the 0.5B model they lost
            // facts: "The order is being processed." for "Which medication is in
            // order ORD006?", eval.)
            debug!(results = says.len(), "speaking the results' say sentences");
            for say in says {
                parrot.announced(&say);
                let _ = text.send(TextPiece::Ours(say)).await;
            }
            return Ok(total);
        }
        if gate_opened && round < policy.max_rounds.max(1) {
            // The check the other tools waited for passed: go on to what the caller
            // came for with a look-up (the 0.5B model otherwise read the check's
            // result back and stopped, whatever the caller had asked).
            debug!("a gate opened; the next round calls a tool");
            options.tool_choice = parley_llm::ToolChoice::Required;
            messages.push(ChatMessage::new(parley_llm::Role::System, GATE_OPENED_NUDGE));
        } else {
            messages.push(ChatMessage::new(parley_llm::Role::System, crate::conversation::AFTER_TOOL_NUDGE));
        }
    }
    // Every round the response allows ended in calls: the caller has heard nothing
    // of their results yet. One more reply, in words only (the tools stay in the
    // prompt, so its cache holds; the engine just may not open a call).
    let words_only = parley_llm::GenerateOptions { tool_choice: parley_llm::ToolChoice::None, ..options.clone() };
    let said = match generate(&session, messages.clone(), words_only, text.clone(), cancel.clone(), first_token.clone()).await {
        Ok((stats, said)) => {
            total.generated_tokens += stats.generated_tokens;
            said
        }
        Err(e) => {
            warn!(error = %e, "the reply after the last tool round failed");
            String::new()
        }
    };
    if !spoke && (!is_speech(&said) || parrot.repeats(&said)) {
        say_last_result(&answered, &announced, &text, &cancel).await;
    }
    Ok(total)
}

/// The call a caller's plain yes confirms: the previous response's call whose result
/// asked for confirmation (`"status": "needs_confirmation"`, from a tool that takes
/// a boolean `confirm`), made again with `confirm: true`; or, when no result asked,
/// the call a result offered (`"offer": {"name", "arguments"}`, e.g. a refill after
/// a prescription look-up), made with `confirm: true`. A yes is what
/// [`crate::turn_rules::confirmation_answer`] reads as one; anything else (a no, a
/// new question) is the model's to answer. The small model often answered "Yes,
/// please go ahead." with words and no call, or called a look-up (eval).
fn confirmed_call(messages: &[ChatMessage], tools: &[parley_llm::ToolSpec]) -> Option<ToolCall> {
    let last_user = messages.iter().rposition(|m| m.role == parley_llm::Role::User)?;
    if crate::turn_rules::confirmation_answer(&messages[last_user].content) != Some(true) {
        return None;
    }
    let (previous, results) = previous_response(messages, last_user);
    let takes_confirm = |name: &str| {
        tools.iter().any(|t| t.name == name && t.parameters.pointer("/properties/confirm/type").and_then(serde_json::Value::as_str) == Some("boolean"))
    };
    let asked = results.iter().find(|(_, v)| asks_confirmation(v));
    let (name, mut arguments) = match asked {
        Some((m, _)) => {
            let call_id = m.tool_call_id.as_deref()?;
            let call = previous.iter().flat_map(|m| &m.tool_calls).find(|c| c.id == call_id)?;
            (call.name.clone(), call.arguments.as_object()?.clone())
        }
        None => {
            let offer = results.iter().find_map(|(_, v)| v.get("offer"))?;
            (offer.get("name")?.as_str()?.to_string(), offer.get("arguments")?.as_object()?.clone())
        }
    };
    if !takes_confirm(&name) {
        return None;
    }
    arguments.insert("confirm".into(), serde_json::Value::Bool(true));
    Some(ToolCall { id: parley_llm::toolcall::new_call_id(), name, arguments: serde_json::Value::Object(arguments) })
}

/// The call the caller asks for without naming its record
/// ([`parley_llm::known_ids::asked_call`]), unless their words answer the previous
/// response's question or offer (a yes goes to [`confirmed_call`]; "OK, please
/// request a refill for it" is the model's, which takes it as the yes it is) or
/// say no ("No, don't refill it").
fn asked_call(options: &parley_llm::GenerateOptions, messages: &[ChatMessage]) -> Option<ToolCall> {
    let last_user = messages.iter().rposition(|m| m.role == parley_llm::Role::User)?;
    if crate::turn_rules::confirmation_answer(&messages[last_user].content) == Some(false) {
        return None;
    }
    let (_, results) = previous_response(messages, last_user);
    if results.iter().any(|(_, v)| v.get("offer").is_some() || asks_confirmation(v)) {
        return None;
    }
    parley_llm::known_ids::asked_call(options, messages)
}

/// The response before the caller's message at `last_user`: its messages, and its
/// tool results that parse as JSON, last first.
fn previous_response(messages: &[ChatMessage], last_user: usize) -> (&[ChatMessage], Vec<(&ChatMessage, serde_json::Value)>) {
    let before = &messages[..last_user];
    let start = before.iter().rposition(|m| m.role == parley_llm::Role::User).map_or(0, |i| i + 1);
    let previous = &before[start..];
    let results = previous
        .iter()
        .rev()
        .filter(|m| m.role == parley_llm::Role::Tool)
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m.content).ok().map(|v| (m, v)))
        .collect();
    (previous, results)
}

/// True when a tool's result asks the caller to confirm (`"status":
/// "needs_confirmation"`).
fn asks_confirmation(result: &serde_json::Value) -> bool {
    result.get("status").and_then(serde_json::Value::as_str) == Some("needs_confirmation")
}

/// Said when no language model can answer (every replica down).
const UNAVAILABLE_APOLOGY: &str = "I'm sorry, I can't answer right now because of a technical problem on our side. Please try again in a moment.";

/// After a gate (an identity check) passed: the next round must call a tool.
pub(crate) const GATE_OPENED_NUDGE: &str = "The check passed. Now call the tool that answers what the caller asked.";

/// When the reply only repeated an earlier turn's tool result: the next round
/// must call a tool.
pub(crate) const LOOK_IT_UP_NUDGE: &str = "That answer was for an earlier question. Call the tool that answers what the caller asked now.";

/// True when `call` is to a gate tool ([`parley_llm::known_ids::GATE`]) and its
/// `output` is a success (a JSON object without `error`).
fn opens_gate(tools: &[parley_llm::ToolSpec], call: &ToolCall, output: &str) -> bool {
    tools.iter().any(|t| t.name == call.name && parley_llm::known_ids::is_gate(t))
        && parley_llm::known_ids::succeeded(output)
}

/// When the model wrote nothing to say and no tool can be called yet (the ids the
/// tools need were not said): it asks the caller for them.
pub(crate) const ASK_FOR_DETAILS_NUDGE: &str =
    "No tool can be used yet. Answer the caller in one short spoken sentence; if they asked about their records, ask for the details the rules need first.";

/// Said when a reply after a tool result was not speech.
pub(crate) const PLAIN_SPEECH_NUDGE: &str = "Reply to the caller in plain words: one short spoken sentence, no JSON or code.";

/// A tool result `{"uninterruptible": true, ...}` asks that what the agent says
/// next plays to the end (terms, a legal notice).
fn asks_uninterruptible(output: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(output).is_ok_and(|v| v.get("uninterruptible").and_then(serde_json::Value::as_bool) == Some(true))
}

/// When the model said nothing worth hearing (JSON an engine could not forbid, a
/// repeat of the caller), the caller hears the last tool result's own spoken
/// sentence, or with none, [`SAY_AGAIN`], rather than silence.
async fn say_last_result(answered: &[(ToolCall, String)], announced: &[String], text: &mpsc::Sender<TextPiece>, cancel: &CancellationToken) {
    if cancel.is_cancelled() {
        return;
    }
    let unheard = answered.iter().rev().filter(|(call, _)| !announced.contains(&call.id));
    let line = match unheard.filter_map(|(_, output)| spoken_sentence(output)).next() {
        Some(say) => {
            debug!("no words from the model after the tool results; speaking the last result's say sentence");
            say
        }
        // The caller heard the gate's sentence; nothing more to add.
        None if !announced.is_empty() => return,
        None => {
            debug!("no words from the model; asking the caller to say it again");
            SAY_AGAIN.to_string()
        }
    };
    let _ = text.send(TextPiece::Text(line)).await;
    let _ = text.send(TextPiece::SegmentEnd).await;
}

/// Said when the model had nothing to say and no tool result speaks for it: the
/// caller is never left in silence.
const SAY_AGAIN: &str = "Sorry, I didn't quite get that. Could you say it another way?";

/// A tool result's `say` sentence, which tools built for voice put in every result.
fn spoken_sentence(output: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(output).ok()?;
    let say = v.get("say")?.as_str()?.trim();
    (!say.is_empty()).then(|| say.to_string())
}

/// True when generated text has something to say besides echoed JSON values (one
/// or several, as a model writes calls and results one after another) and besides
/// a copy of our own instructions to the model.
fn is_speech(text: &str) -> bool {
    let words = crate::reply_text::without_labels(&outside_json(text));
    // What the phrase guard would drop (text for the model) is no speech either.
    words.chars().any(char::is_alphanumeric) && !crate::reply_text::copies_instructions(&words) && crate::reply_text::speakable(&words).is_some()
}

/// The text with every top-level JSON object or array (balanced, strings
/// respected) taken out; an unclosed one is taken out to the end.
fn outside_json(text: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if depth == 0 {
            if matches!(c, '{' | '[') {
                depth = 1;
            } else {
                out.push(c);
            }
            continue;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ => {}
        }
    }
    out
}

/// The server's tools and the call's memory they share.
#[derive(Clone)]
struct Tools {
    registry: ToolRegistry,
    scope: CallScope,
}

/// The result of an earlier call in this response with the same tool and arguments.
fn earlier_result(answered: &[(ToolCall, String)], call: &ToolCall) -> Option<String> {
    answered.iter().find(|(c, _)| c.name == call.name && c.arguments == call.arguments).map(|(_, output)| output.clone())
}

/// Runs server tools one after another, each with its timeout; returns each call's
/// id and result, in order.
async fn run_tools(tools: Tools, calls: Vec<ToolCall>, timeout_ms: u64, reports: mpsc::Sender<ToolReport>) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        out.push(run_tool(&tools, call, timeout_ms, &reports).await);
    }
    out
}

/// Runs one server tool with its timeout, commits the result, and returns it.
async fn run_tool(tools: &Tools, call: ToolCall, timeout_ms: u64, reports: &mpsc::Sender<ToolReport>) -> (String, String) {
    let started = Instant::now();
    let span = tracing::info_span!("tool", tool = %call.name, call_id = %call.id, ok = tracing::field::Empty, ms = tracing::field::Empty);
    let result = match tools.registry.get(&call.name) {
        Some(tool) => {
            let run = tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), tool.call(call.arguments.clone(), &tools.scope));
            match run.instrument(span.clone()).await {
                Ok(r) => r,
                Err(_) => Err(ToolError::Timeout(timeout_ms)),
            }
        }
        None => Err(ToolError::Failed(format!("there is no tool named {}", call.name))),
    };
    span.record("ok", result.is_ok());
    span.record("ms", started.elapsed().as_secs_f64() * 1000.0);
    let output = match &result {
        Ok(value) => value.to_string(),
        Err(ToolError::Declined(say)) => serde_json::json!({ "error": say, "say": say }).to_string(),
        Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
    };
    tracing::info!(tool = %call.name, call_id = %call.id, ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "tool call");
    // What went in and came out, for debugging; redacted of personal data.
    tracing::debug!(
        tool = %call.name,
        arguments = %crate::redact::Redacted(&call.arguments.to_string()),
        result = %crate::redact::Redacted(&output),
        "tool call detail"
    );
    let _ = reports.send(ToolReport::Output { call_id: call.id.clone(), output: output.clone() }).await;
    (call.id, output)
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
enum GenerateError {
    #[error("{0}")]
    Llm(parley_llm::LlmError),
    #[error("the model thread failed: {0}")]
    Thread(String),
}

/// One generation on a blocking thread, streaming its text into `text`.
async fn generate(
    session: &SharedSession,
    messages: Vec<ChatMessage>,
    options: GenerateOptions,
    text: mpsc::Sender<TextPiece>,
    cancel: CancellationToken,
    first: Arc<OnceLock<Instant>>,
) -> Result<(GenerationStats, String), GenerateError> {
    let session = session.clone();
    // One generation round; `first_token_ms` is from the round's start (the
    // turn's own figure, from the end of speech, is on the turn span).
    let span = tracing::info_span!("llm", tools = options.tools.len(), first_token_ms = tracing::field::Empty);
    let run = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let started = Instant::now();
        let mut session = session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut said = String::new();
        let mut seen_token = false;
        let result = session.generate(&messages, &options, &mut |piece: &str| {
            if cancel.is_cancelled() {
                return ControlFlow::Break(());
            }
            if !piece.is_empty() {
                let _ = first.set(Instant::now());
                if !seen_token {
                    seen_token = true;
                    span.record("first_token_ms", started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            said.push_str(piece);
            match text.blocking_send(TextPiece::Text(piece.to_string())) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        // Each generation is its own segment for the JSON guard downstream.
        let _ = text.blocking_send(TextPiece::SegmentEnd);
        result.map(|stats| (stats, said))
    });
    match run.await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(GenerateError::Llm(e)),
        Err(e) => Err(GenerateError::Thread(e.to_string())),
    }
}

/// Cuts the model's text stream into phrases worth synthesizing on their own. A
/// generation whose text starts like JSON is held to its end and dropped if it is
/// JSON: data is never read out to a caller. Each phrase gets a last look
/// ([`crate::reply_text::speakable`]): glued sentences mended, codes spelled out,
/// text addressed to the model dropped.
async fn chunk_phrases(mut text: mpsc::Receiver<TextPiece>, phrases: mpsc::Sender<PhrasePiece>, parrot: Arc<Parrot>, cancel: CancellationToken) {
    /// Where the current generation's text stands.
    enum Segment {
        /// Only whitespace so far.
        Start(String),
        /// Plain text: goes straight to the chunker.
        Speech,
        /// Starts like JSON: held until the generation ends.
        Held(String),
        /// So far word for word the caller's line or an example's
        /// ([`Parrot::may_repeat`]): held until it parts from it, or dropped at the
        /// end if it never does.
        Repeating(String),
    }
    let mut chunker = PhraseChunker::new();
    let mut segment = Segment::Start(String::new());
    // The model wrote words, and whether any phrase went to the voice: when every
    // phrase was dropped here (text for the model, a description read back) the
    // caller must not get silence (eval: two silent replies).
    let (mut wrote_words, mut sent_any) = (false, false);
    // A phrase was withheld ([`Parrot::withholds`]) and its sentence goes on.
    let mut in_withheld = false;
    loop {
        let piece = tokio::select! {
            _ = cancel.cancelled() => return,
            piece = text.recv() => piece,
        };
        let mut ready = Vec::new();
        if piece == Some(TextPiece::Uninterruptible) {
            // What was said before the mark keeps its own phrase.
            let mut out: Vec<PhrasePiece> = chunker.finish().and_then(|p| crate::reply_text::speakable(&p)).map(PhrasePiece::Phrase).into_iter().collect();
            out.push(PhrasePiece::Uninterruptible);
            sent_any |= out.iter().any(|p| matches!(p, PhrasePiece::Phrase(_)));
            for piece in out {
                if phrases.send(piece).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if let Some(TextPiece::Ours(line)) = &piece {
            // Its own phrase, after whatever the model said before it.
            let mut ours: Vec<String> = chunker.finish().into_iter().collect();
            ours.extend(chunker.push(line));
            ours.extend(chunker.finish());
            let ours: Vec<String> = ours.iter().filter_map(|p| crate::reply_text::speakable(p)).collect();
            sent_any |= !ours.is_empty();
            for phrase in ours {
                if phrases.send(PhrasePiece::Phrase(phrase)).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let ended = match &piece {
            Some(TextPiece::SegmentEnd | TextPiece::Uninterruptible | TextPiece::Ours(_)) | None => true,
            Some(TextPiece::Text(piece)) => {
                wrote_words |= piece.chars().any(char::is_alphanumeric);
                segment = match segment {
                    Segment::Speech => {
                        ready.extend(chunker.push(piece));
                        Segment::Speech
                    }
                    Segment::Held(mut held) => {
                        held.push_str(piece);
                        Segment::Held(held)
                    }
                    Segment::Start(mut start) | Segment::Repeating(mut start) => {
                        start.push_str(piece);
                        let t = start.trim_start();
                        if t.starts_with('{') || t.starts_with('[') {
                            Segment::Held(start)
                        } else if t.is_empty() {
                            Segment::Start(start)
                        } else if parrot.may_repeat(t) {
                            Segment::Repeating(start)
                        } else {
                            ready.extend(chunker.push(&start));
                            Segment::Speech
                        }
                    }
                };
                false
            }
        };
        if ended && matches!(segment, Segment::Speech) {
            // The next generation (after a tool round) starts a new sentence.
            ready.extend(chunker.push(" "));
        }
        if ended {
            match std::mem::replace(&mut segment, Segment::Start(String::new())) {
                Segment::Held(held) if !is_speech(&held) => debug!(chars = held.len(), "dropped a JSON reply instead of speaking it"),
                // Words around the JSON: only the words are said.
                Segment::Held(held) => ready.extend(chunker.push(&outside_json(&held))),
                Segment::Repeating(held) if parrot.repeats(&held) => debug!(chars = held.len(), "dropped a reply that only repeated the caller or an example"),
                Segment::Repeating(held) => ready.extend(chunker.push(&held)),
                Segment::Start(_) | Segment::Speech => {}
            }
        }
        if piece.is_none() {
            ready.extend(chunker.finish());
        }
        let mut out: Vec<String> = ready
            .iter()
            .filter_map(|p| crate::reply_text::speakable(p))
            .filter(|phrase| {
                let copied = parrot.copies_tool_text(phrase);
                if copied {
                    debug!(phrase, "dropped a phrase read back from a tool's description");
                }
                !copied
            })
            .filter(|phrase| {
                // The rest of a withheld sentence goes too: "November 2nd," withheld
                // must not leave "1971." to be said alone (eval).
                let withheld = in_withheld || parrot.withholds(phrase);
                if withheld {
                    debug!("withheld a phrase naming a time or date before the identity check");
                }
                in_withheld = withheld && !ends_sentence(phrase);
                !withheld
            })
            .collect();
        if ended {
            in_withheld = false;
        }
        if piece.is_none() && wrote_words && !sent_any && out.is_empty() && !cancel.is_cancelled() {
            debug!("every phrase of the reply was dropped; asking the caller to say it again");
            out.push(SAY_AGAIN.to_string());
        }
        sent_any |= !out.is_empty();
        for phrase in out {
            if phrases.send(PhrasePiece::Phrase(phrase)).await.is_err() {
                return;
            }
        }
        if piece.is_none() {
            return;
        }
    }
}

/// True when `phrase` ends a sentence.
fn ends_sentence(phrase: &str) -> bool {
    phrase.trim_end().ends_with(['.', '?', '!'])
}

/// Synthesizes each phrase, converts it to the caller's format and queues frames.
/// Returns how long the first phrase took.
async fn synthesize_phrases(
    mut phrases: mpsc::Receiver<PhrasePiece>,
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
    let (frame_len, frame_ms) = frame_size(format, pacing);
    let mut framer = Framer::new(frame_len);
    let mut first_tts_ms = None;
    loop {
        let phrase = tokio::select! {
            _ = cancel.cancelled() => return first_tts_ms,
            p = phrases.recv() => p,
        };
        let phrase = match phrase {
            None => break,
            Some(PhrasePiece::Phrase(phrase)) => phrase,
            Some(PhrasePiece::Uninterruptible) => {
                let mark = Frame { uninterruptible: true, ..Frame::audio(Vec::new(), 0.0, None) };
                if frames.send(mark).await.is_err() {
                    return first_tts_ms;
                }
                continue;
            }
        };
        let started = Instant::now();
        let tts = engines.tts.clone();
        let text = phrase.clone();
        let span = tracing::info_span!("tts", chars = phrase.chars().count(), first = first_tts_ms.is_none(), audio_ms = tracing::field::Empty);
        let in_span = span.clone();
        let synthesis = tokio::task::spawn_blocking(move || in_span.in_scope(|| tts.synthesize(&text)));
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
        span.record("audio_ms", duration_ms);
        drop(span);
        let converted = resampler.process(&samples);
        let mut marker = Some((phrase, duration_ms));
        for frame in framer.push(&converted) {
            let f = Frame::audio(frame, frame_ms, marker.take());
            if frames.send(f).await.is_err() {
                return first_tts_ms;
            }
        }
        if let Some((phrase, duration_ms)) = marker {
            // The phrase was shorter than one frame's remainder: mark the next one.
            let f = Frame::audio(Vec::new(), 0.0, Some((phrase, duration_ms)));
            if frames.send(f).await.is_err() {
                return first_tts_ms;
            }
        }
    }
    let tail = resampler.flush();
    let mut last = framer.push(&tail);
    last.extend(framer.flush());
    for frame in last {
        if frames.send(Frame::audio(frame, frame_ms, None)).await.is_err() {
            break;
        }
    }
    first_tts_ms
}

/// Echo agent: plays the caller's turn back through the pacer, as a reply's speech
/// would go (framed in the output format, paced, paused and cut by barge-in).
async fn play_back(audio: Vec<f32>, job: &ResponseJob, events: &mpsc::Sender<AgentEvent>, playback: Playback, cancel: &CancellationToken) -> ResponseOutcome {
    let started = Instant::now();
    let (frame_tx, frame_rx) = mpsc::channel::<Frame>(FRAME_QUEUE);
    let (format, pacing) = (job.output_format, job.pacing);
    let text = crate::echo::ECHO_TRANSCRIPT.to_string();
    let feed = tokio::spawn(
        async move {
            let out_rate = format.sample_rate();
            let mut resampler = match StreamResampler::new(crate::input::ASR_RATE, out_rate) {
                Ok(r) => r,
                Err(e) => return Err(format!("cannot resample the echo: {e}")),
            };
            let (frame_len, frame_ms) = frame_size(format, pacing);
            let duration_ms = audio.len() as f64 * 1000.0 / f64::from(crate::input::ASR_RATE);
            let mut framer = Framer::new(frame_len);
            let mut converted = resampler.process(&audio);
            converted.extend(resampler.flush());
            let mut frames = framer.push(&converted);
            frames.extend(framer.flush());
            let mut marker = Some((text, duration_ms));
            for frame in frames {
                if frame_tx.send(Frame::audio(frame, frame_ms, marker.take())).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .in_current_span(),
    );
    let sent = pace_frames(frame_rx, job, events, playback, cancel).await;
    feed.abort();
    let status = match feed.await {
        Ok(Err(e)) => {
            let _ = events.send(AgentEvent::Error { code: ErrorCode::ModelFailed, message: e }).await;
            ResponseStatus::Failed
        }
        _ => ResponseStatus::Completed,
    };
    ResponseOutcome {
        status: Some(status),
        text: sent.text,
        stats: Some(GenerationStats::default()),
        first_token_at: Some(started),
        first_audio_at: sent.first_audio_at,
        first_tts_ms: Some(0.0),
    }
}

/// What the pacer sent.
struct Sent {
    first_audio_at: Option<Instant>,
    text: String,
}

/// Sends frames no faster than real time plus the lead, on a monotonic clock;
/// holds them while the call has playback paused, and records each frame's audio
/// at its play time for the echo check.
async fn pace_frames(
    mut frames: mpsc::Receiver<Frame>,
    job: &ResponseJob,
    events: &mpsc::Sender<AgentEvent>,
    mut playback: Playback,
    cancel: &CancellationToken,
) -> Sent {
    let (response_id, item_id) = (job.response_id.as_str(), job.item_id.as_str());
    let clock = &*playback.clock;
    let mut sent = Sent { first_audio_at: None, text: String::new() };
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return sent,
            f = frames.recv() => f,
        };
        let Some(frame) = frame else { return sent };
        if !wait_while_paused(&mut playback.paused, clock, cancel).await {
            return sent;
        }
        let send_at = lock(clock).next_send_at();
        if let Some(at) = send_at {
            tokio::select! {
                _ = cancel.cancelled() => return sent,
                _ = tokio::time::sleep_until(at.into()) => {}
            }
        }
        if frame.uninterruptible {
            playback.interruptible.store(false, Ordering::SeqCst);
        }
        if let Some((text, duration_ms)) = frame.phrase {
            lock(clock).phrase(text.clone(), duration_ms);
            // Deltas are concatenated by clients: each phrase after the first
            // carries the space that separates it from the one before.
            let delta = if sent.text.is_empty() { text.clone() } else { format!(" {text}") };
            sent.text.push_str(&delta);
            let delta = AgentEvent::TranscriptDelta { response_id: response_id.into(), item_id: item_id.into(), delta };
            if events.send(delta).await.is_err() {
                return sent;
            }
        }
        if frame.samples.is_empty() {
            continue;
        }
        // A pause that began while this frame waited holds it too.
        if !wait_while_paused(&mut playback.paused, clock, cancel).await || cancel.is_cancelled() {
            return sent;
        }
        // Encoded now, not when synthesized: the call's encoder only ever sees the
        // frames the caller receives, in order (one Opus packet per frame).
        let encoded = job.encoder.lock().unwrap_or_else(|p| p.into_inner()).encode(&frame.samples);
        let audio = match encoded {
            Ok(audio) => audio,
            Err(e) => {
                warn!(error = %e, "cannot encode an output frame; skipping it");
                let error = AgentEvent::Error { code: ErrorCode::ModelFailed, message: format!("cannot encode the reply audio: {e}") };
                if events.send(error).await.is_err() {
                    return sent;
                }
                continue;
            }
        };
        let plays_at = {
            let mut c = lock(clock);
            let at = c.next_play_at();
            c.sent(frame.ms);
            at
        };
        {
            // The echo check compares the caller's input with what the caller plays:
            // the decoded payload for the stateless formats (G.711's quantization
            // included), the frame itself for Opus (a second decoder per call would
            // cost more than the codec's small difference is worth).
            let decoded = if job.output_format.is_stateful() { None } else { job.output_format.decode(&audio).ok() };
            let played = decoded.as_deref().unwrap_or(&frame.samples);
            let mut echo = playback.echo.lock().unwrap_or_else(|p| p.into_inner());
            echo.push_played(played, job.output_format.sample_rate(), plays_at);
        }
        sent.first_audio_at.get_or_insert_with(Instant::now);
        let delta = AgentEvent::AudioDelta { response_id: response_id.into(), item_id: item_id.into(), audio };
        if events.send(delta).await.is_err() {
            return sent;
        }
    }
}

/// Holds playback while paused; false when the response was cancelled meanwhile.
async fn wait_while_paused(paused: &mut watch::Receiver<bool>, clock: &Mutex<PlayClock>, cancel: &CancellationToken) -> bool {
    if !*paused.borrow() {
        return true;
    }
    while *paused.borrow_and_update() {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            changed = paused.changed() => if changed.is_err() { return false },
        }
    }
    // The caller heard everything sent before the pause; go on from there.
    lock(clock).resume();
    true
}

/// Locks the play clock; a poisoned lock still holds a usable clock.
pub fn lock(clock: &Mutex<PlayClock>) -> std::sync::MutexGuard<'_, PlayClock> {
    clock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_that_repeats_the_caller_is_not_spoken() {
        let parrot = || Parrot::for_messages(&[ChatMessage::new(parley_llm::Role::User, "Please refill my prescription R X one.")]);
        let echo = vec![text("Please "), text("refill my "), text("prescription R X one."), TextPiece::SegmentEnd];
        // The echo is not spoken; with nothing else said before the reply ends, the
        // caller is asked to say it again rather than left in silence.
        assert_eq!(phrases_guarded(echo, parrot()).await, vec![PhrasePiece::Phrase(SAY_AGAIN.to_string())]);
        // One that parts from the caller's words is spoken whole, from its start.
        let reply = vec![text("Please "), text("refill my "), text("order? I can help."), TextPiece::SegmentEnd];
        let said: Vec<PhrasePiece> = phrases_guarded(reply, parrot()).await;
        let said: String = said.iter().filter_map(|p| if let PhrasePiece::Phrase(t) = p { Some(t.as_str()) } else { None }).collect::<Vec<_>>().join(" ");
        assert!(said.starts_with("Please refill my order?"), "{said}");
    }

    #[tokio::test]
    async fn a_reply_whose_every_phrase_is_dropped_is_not_silence() {
        let reply = vec![text("Ask the caller for their member ID. "), text("Do not show JSON."), TextPiece::SegmentEnd];
        assert_eq!(phrases_guarded(reply, Parrot::default()).await, vec![PhrasePiece::Phrase(SAY_AGAIN.to_string())]);
        // No words at all (a response that only called a client's tool): nothing.
        assert!(phrases_guarded(vec![text("  "), TextPiece::SegmentEnd], Parrot::default()).await.is_empty());
        // Some words kept: no fallback.
        let said = phrases_guarded(vec![text("Ask the caller for it. "), text("Your order is ready."), TextPiece::SegmentEnd], Parrot::default()).await;
        assert_eq!(said, vec![PhrasePiece::Phrase("Your order is ready.".into())]);
    }

    #[tokio::test]
    async fn the_agents_own_sentence_is_said_once_and_the_model_reading_it_again_is_not() {
        let parrot = Parrot::default();
        parrot.announced("Thank you, Aisha, you're verified.");
        let pieces = vec![
            TextPiece::Ours("Thank you, Aisha, you're verified.".into()),
            text("\"Thank you, Aisha, "),
            text("you're verified.\""),
            TextPiece::SegmentEnd,
            text("Just to confirm: a refill of Metformin?"),
            TextPiece::SegmentEnd,
        ];
        assert_eq!(
            phrases_guarded(pieces, parrot).await,
            vec![PhrasePiece::Phrase("Thank you, Aisha, you're verified.".into()), PhrasePiece::Phrase("Just to confirm: a refill of Metformin?".into())]
        );
    }

    #[test]
    fn speech_is_what_is_left_outside_json() {
        // Two values one after another (a call, then an echoed result): no speech.
        assert!(!is_speech(r#"{"name": "verify_member", "arguments": {"member_id": "1001"}}
{"say":"Thank you, Maria, you're verified."}"#));
        assert!(!is_speech("  "));
        assert!(!is_speech(r#"[1, 2] {"a": "}"}"#));
        // An unclosed value hides the rest.
        assert!(!is_speech(r#"{"say": "Your order is ready"#));
        assert!(is_speech("Your order is ready."));
        assert!(is_speech(r#"{"status": "ok"} Your order is ready."#));
        assert!(is_speech(r#"Sure. {"x": "\"}"} "#));
        assert!(!is_speech("when it has one). Do not show JSON."), "the after-result nudge read back is not speech");
    }

    #[test]
    fn a_results_spoken_sentence_is_its_say() {
        assert_eq!(spoken_sentence(r#"{"verified": true, "say": " Thank you, Maria. "}"#).as_deref(), Some("Thank you, Maria."));
        assert_eq!(spoken_sentence(r#"{"say": ""}"#), None);
        assert_eq!(spoken_sentence(r#"{"status": "ok"}"#), None);
        assert_eq!(spoken_sentence("not json"), None);
    }

    async fn phrases_of(pieces: Vec<TextPiece>) -> Vec<PhrasePiece> {
        phrases_guarded(pieces, Parrot::default()).await
    }

    async fn phrases_guarded(pieces: Vec<TextPiece>, parrot: Parrot) -> Vec<PhrasePiece> {
        let (text_tx, text_rx) = mpsc::channel(64);
        let (phrase_tx, mut phrase_rx) = mpsc::channel(64);
        for piece in pieces {
            text_tx.send(piece).await.expect("queue");
        }
        drop(text_tx);
        chunk_phrases(text_rx, phrase_tx, Arc::new(parrot), CancellationToken::new()).await;
        let mut out = Vec::new();
        while let Ok(piece) = phrase_rx.try_recv() {
            out.push(piece);
        }
        out
    }

    fn text(t: &str) -> TextPiece {
        TextPiece::Text(t.to_string())
    }

    fn phrase(t: &str) -> PhrasePiece {
        PhrasePiece::Phrase(t.to_string())
    }

    #[tokio::test]
    async fn control_characters_a_model_writes_are_only_text() {
        // Issue 9: the old in-band marks were "\u{0}" and "\u{1}"; a model writing
        // them must neither end the segment nor switch off barge-in.
        let out = phrases_of(vec![text("Hello \u{1}"), text("\u{0} there. Bye now."), TextPiece::SegmentEnd]).await;
        assert!(!out.contains(&PhrasePiece::Uninterruptible), "{out:?}");
        assert_eq!(out.len(), 2, "{out:?}");
    }

    #[tokio::test]
    async fn the_typed_mark_switches_off_interruption_between_phrases() {
        let out = phrases_of(vec![text("First part"), TextPiece::SegmentEnd, TextPiece::Uninterruptible, text("The notice."), TextPiece::SegmentEnd]).await;
        assert_eq!(out, [phrase("First part"), PhrasePiece::Uninterruptible, phrase("The notice.")]);
    }

    #[tokio::test]
    async fn json_and_text_for_the_model_are_not_spoken_and_generations_join_as_sentences() {
        let out = phrases_of(vec![
            text("{\"status\": \"processing\"}"),
            TextPiece::SegmentEnd,
            text("Let me check."),
            TextPiece::SegmentEnd,
            text("Ask the caller to check the number. "),
            text("Your order ORD001 is at the pharmacy.The pickup is Monday."),
            TextPiece::SegmentEnd,
        ])
        .await;
        assert_eq!(out, [phrase("Let me check."), phrase("Your order O R D zero zero one is at the pharmacy. The pickup is Monday.")]);
    }

    #[tokio::test]
    async fn a_sentence_withheld_before_the_identity_check_goes_whole() {
        use parley_llm::Role;
        let gate = parley_llm::ToolSpec {
            name: "verify_member".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": {"member_id": {"type": "string"}}, "x-parley-gate": true}),
        };
        let options = parley_llm::GenerateOptions { tools: vec![gate], ..parley_llm::GenerateOptions::default() };
        let messages = [ChatMessage::new(Role::User, "Member 10024, born November 2nd, 1971. What time can I pick it up?")];
        let parrot = Parrot::for_messages(&messages).with_check(&options, &messages);
        let out = phrases_guarded(
            vec![text("The order can be picked up on November 2nd, "), text("in the afternoon. "), text("What is your member ID?"), TextPiece::SegmentEnd],
            parrot,
        )
        .await;
        assert_eq!(out, [phrase("What is your member ID?")]);
    }

    #[test]
    fn a_refill_asked_for_without_an_id_is_made_unless_it_answers_an_offer_or_says_no() {
        use parley_llm::Role;
        let refill = parley_llm::ToolSpec {
            name: "request_refill".into(),
            description: String::new(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"rx_id": {"type": "string", "pattern": "^RX[0-9]{3,8}$", "x-parley-known": true}, "confirm": {"type": "boolean"}},
                "required": ["rx_id"],
                "x-parley-asked": "\\b(?:refill|renew)\\b"
            }),
        };
        let options = parley_llm::GenerateOptions { tools: vec![refill], ..parley_llm::GenerateOptions::default() };
        let conversation = |result: &str, answer: &str| {
            vec![ChatMessage::new(Role::User, "How many refills are left?"), ChatMessage::tool_result("c1", result), ChatMessage::new(Role::User, answer)]
        };
        let plain = r#"{"rx_id": "RX1002", "say": "It has two refills left."}"#;
        let call = asked_call(&options, &conversation(plain, "I would like a refill of my prescription.")).expect("the refill");
        assert_eq!(call.arguments, serde_json::json!({"rx_id": "RX1002"}));
        assert!(asked_call(&options, &conversation(plain, "No, don't refill it.")).is_none());
        let offered = r#"{"rx_id": "RX1002", "offer": {"name": "request_refill", "arguments": {"rx_id": "RX1002"}}}"#;
        assert!(asked_call(&options, &conversation(offered, "OK, please request a refill for it.")).is_none());
    }

    #[test]
    fn a_plain_yes_makes_the_call_that_asked_for_confirmation() {
        use parley_llm::Role;
        let refill = parley_llm::ToolSpec {
            name: "request_refill".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": {"rx_id": {"type": "string"}, "confirm": {"type": "boolean"}}}),
        };
        let asked = ToolCall { id: "c1".into(), name: "request_refill".into(), arguments: serde_json::json!({"rx_id": "RX1002"}) };
        let conversation = |answer: &str| {
            vec![
                ChatMessage::new(Role::User, "Please refill RX1002."),
                ChatMessage::tool_calls("", vec![asked.clone()]),
                ChatMessage::tool_result("c1", r#"{"status": "needs_confirmation", "say": "Just to confirm: a refill of RX1002?"}"#),
                ChatMessage::new(Role::Assistant, "Just to confirm: a refill of RX1002?"),
                ChatMessage::new(Role::User, answer),
            ]
        };
        let tools = [refill];
        let call = confirmed_call(&conversation("Yes, please go ahead."), &tools).expect("a yes confirms");
        assert_eq!((call.name.as_str(), call.arguments), ("request_refill", serde_json::json!({"rx_id": "RX1002", "confirm": true})));
        assert_ne!(call.id, "c1");
        for answer in ["No, don't.", "How many refills are left on it?", "Actually, wait."] {
            assert!(confirmed_call(&conversation(answer), &tools).is_none(), "{answer}");
        }
        // Only the question of the response just before the answer counts.
        let mut later = conversation("What time is it?");
        later.extend([ChatMessage::new(Role::Assistant, "It's noon."), ChatMessage::new(Role::User, "Yes.")]);
        assert!(confirmed_call(&later, &tools).is_none());
        // A tool without a boolean `confirm` is not called again.
        assert!(confirmed_call(&conversation("Yes."), &[]).is_none());
    }

    #[test]
    fn a_plain_yes_to_an_offer_makes_the_offered_call() {
        use parley_llm::Role;
        let refill = parley_llm::ToolSpec {
            name: "request_refill".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": {"rx_id": {"type": "string"}, "confirm": {"type": "boolean"}}}),
        };
        let looked_up = ToolCall { id: "c1".into(), name: "get_prescription".into(), arguments: serde_json::json!({"rx_id": "RX1002"}) };
        let conversation = |answer: &str| {
            vec![
                ChatMessage::new(Role::User, "Please refill my lisinopril, RX1002."),
                ChatMessage::tool_calls("", vec![looked_up.clone()]),
                ChatMessage::tool_result(
                    "c1",
                    r#"{"rx_id": "RX1002", "say": "It has two refills left. Would you like me to request a refill?", "offer": {"name": "request_refill", "arguments": {"rx_id": "RX1002"}}}"#,
                ),
                ChatMessage::new(Role::Assistant, "It has two refills left. Would you like me to request a refill?"),
                ChatMessage::new(Role::User, answer),
            ]
        };
        let tools = [refill];
        let call = confirmed_call(&conversation("Yes, please."), &tools).expect("a yes takes the offer");
        assert_eq!((call.name.as_str(), call.arguments), ("request_refill", serde_json::json!({"rx_id": "RX1002", "confirm": true})));
        assert!(confirmed_call(&conversation("No thanks."), &tools).is_none());
        assert!(confirmed_call(&conversation("Who prescribed it?"), &tools).is_none());
        // An offer of a tool this call does not have (or without `confirm`) is not made.
        assert!(confirmed_call(&conversation("Yes."), &[]).is_none());
    }

    #[test]
    fn a_repeated_call_finds_its_first_result() {
        let call = |id: &str, order: &str| ToolCall { id: id.into(), name: "get_order_details".into(), arguments: serde_json::json!({"order_id": order}) };
        let answered = vec![(call("a", "ORD001"), "first".to_string())];
        assert_eq!(earlier_result(&answered, &call("b", "ORD001")).as_deref(), Some("first"));
        assert_eq!(earlier_result(&answered, &call("c", "ORD002")), None);
    }
}
