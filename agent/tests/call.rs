//! The call actor against small fakes behind the model traits: event order of a
//! turn, server-VAD turns, barge-in, cancellation and bad input.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use parley_agent::tools::{Tool, ToolFuture, ToolRegistry};
use parley_agent::{AgentEvent, Call, CallHandle, CallInput, Engines, ErrorCode, ResponseStatus, SessionSettings};
use parley_asr::{AsrError, Transcriber, Transcript};
use parley_audio::format::AudioFormat;
use parley_llm::{ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession, Role, ToolCall, ToolSpec};
use parley_tts::{Synthesizer, TtsError};
use tokio::sync::mpsc;

struct FakeAsr(&'static str);
impl Transcriber for FakeAsr {
    fn transcribe(&self, samples: &[f32]) -> Result<Transcript, AsrError> {
        assert!(!samples.is_empty());
        Ok(Transcript { text: self.0.to_string() })
    }
}

/// Streams a fixed reply word by word, a few ms per word, honouring Break.
struct FakeLlm(&'static str);
struct FakeSession(&'static str);
impl LlmEngine for FakeLlm {
    fn name(&self) -> &str {
        "fake"
    }
    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(FakeSession(self.0))
    }
}
impl LlmSession for FakeSession {
    fn generate(&mut self, messages: &[ChatMessage], options: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Result<GenerationStats, LlmError> {
        assert!(messages.len() >= 2, "system prompt plus the user's turn");
        let mut stats = GenerationStats { prompt_tokens: 10, ..GenerationStats::default() };
        // With tools offered and the user's turn last, call the first tool once.
        if let (Some(tool), Some(last)) = (options.tools.first(), messages.last())
            && last.role == Role::User
        {
            let id = format!("call_{}", messages.len());
            stats.tool_calls.push(ToolCall { id, name: tool.name.clone(), arguments: serde_json::json!({"member_id": "1001"}) });
            return Ok(stats);
        }
        for (i, word) in self.0.split_inclusive(' ').enumerate() {
            std::thread::sleep(Duration::from_millis(5));
            stats.generated_tokens += 1;
            if on_text(word).is_break() {
                stats.finish = FinishReason::Cancelled;
                return Ok(stats);
            }
            let _ = i;
        }
        Ok(stats)
    }
}

/// A tone 40 ms long per character of text, at 22.05 kHz.
struct FakeTts;
impl Synthesizer for FakeTts {
    fn sample_rate(&self) -> u32 {
        22_050
    }
    fn synthesize(&self, text: &str) -> Result<Vec<f32>, TtsError> {
        let n = text.len() * 882;
        Ok((0..n).map(|i| 0.3 * (i as f32 * 0.05).sin()).collect())
    }
}

const REPLY: &str = "Your order is processing. It will be ready for pickup on December sixth at ten in the morning.";

fn engines() -> Arc<Engines> {
    engines_with(ToolRegistry::default())
}

fn engines_with(tools: ToolRegistry) -> Arc<Engines> {
    Arc::new(Engines { transcriber: Arc::new(FakeAsr("where is my order")), llm: Arc::new(FakeLlm(REPLY)), tts: Arc::new(FakeTts), tools })
}

/// A server tool that counts its runs and answers after `delay`.
struct CountingTool {
    runs: Arc<std::sync::atomic::AtomicUsize>,
    delay: Duration,
}
impl Tool for CountingTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec { name: "list_orders".into(), description: "orders of a member".into(), parameters: serde_json::json!({"type": "object"}) }
    }
    fn call(&self, arguments: serde_json::Value) -> ToolFuture<'_> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(serde_json::json!({"member": arguments["member_id"], "orders": [{"order_id": "ORD001", "status": "processing"}]}))
        })
    }
}

async fn next(rx: &mut mpsc::Receiver<AgentEvent>) -> AgentEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an event within 20 s").expect("call still open")
}

/// Collects events until `stop` matches; returns them all.
async fn until(rx: &mut mpsc::Receiver<AgentEvent>, stop: impl Fn(&AgentEvent) -> bool) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    loop {
        let ev = next(rx).await;
        let done = stop(&ev);
        out.push(ev);
        if done {
            return out;
        }
    }
}

fn is_done(ev: &AgentEvent) -> bool {
    matches!(ev, AgentEvent::ResponseDone { .. })
}

async fn start(settings: SessionSettings) -> (CallHandle, mpsc::Receiver<AgentEvent>) {
    start_with(engines(), settings).await
}

async fn start_with(engines: Arc<Engines>, settings: SessionSettings) -> (CallHandle, mpsc::Receiver<AgentEvent>) {
    let (call, mut rx) = Call::start("test".into(), engines, settings);
    assert!(matches!(next(&mut rx).await, AgentEvent::SessionUpdated(_)));
    (call, rx)
}

/// The audio fixture (espeak speech, 1 s of silence each side) as PCM16 24 kHz bytes.
fn speech_pcm24k() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../audio/tests/fixtures/speech16k.wav");
    let (samples, rate) = parley_audio::wav::read_wav(&path).expect("fixture");
    let mut r = parley_audio::resample::StreamResampler::new(rate, 24_000).expect("resampler");
    let mut s = r.process(&samples);
    s.extend(r.flush());
    parley_audio::pcm::encode_pcm16le(&s)
}

#[tokio::test]
async fn a_text_turn_produces_the_realtime_sequence() {
    let (call, mut rx) = start(SessionSettings::default()).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    let first = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or_else(|| panic!("no {k} in {kinds:?}"));
    assert!(first("item") < first("response.created"));
    assert!(first("response.created") < first("transcript.delta"));
    assert!(first("transcript.delta") <= first("audio.delta"));
    assert!(first("audio.done") > kinds.iter().rposition(|x| *x == "audio.delta").expect("audio"));
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.last() else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed);
    assert_eq!(transcript, REPLY);
    // 24 kHz PCM16 in 20 ms frames: 960 bytes each.
    let sizes: Vec<usize> = events.iter().filter_map(|e| match e { AgentEvent::AudioDelta { audio, .. } => Some(audio.len()), _ => None }).collect();
    assert!(sizes.iter().all(|s| *s == 960), "{sizes:?}");
    call.close().await;
}

fn kind(e: &AgentEvent) -> &'static str {
    match e {
        AgentEvent::ItemAdded { .. } => "item",
        AgentEvent::ResponseCreated { .. } => "response.created",
        AgentEvent::TranscriptDelta { .. } => "transcript.delta",
        AgentEvent::AudioDelta { .. } => "audio.delta",
        AgentEvent::AudioDone { .. } => "audio.done",
        AgentEvent::ResponseDone { .. } => "response.done",
        AgentEvent::SpeechStarted { .. } => "speech_started",
        AgentEvent::SpeechStopped { .. } => "speech_stopped",
        AgentEvent::InputCommitted { .. } => "committed",
        AgentEvent::UserTranscript { .. } => "transcript",
        AgentEvent::OutputAudioCleared { .. } => "cleared",
        AgentEvent::Error { .. } => "error",
        _ => "other",
    }
}

#[tokio::test]
async fn server_vad_turn_is_transcribed_and_answered() {
    let (call, mut rx) = start(SessionSettings::default()).await;
    for chunk in speech_pcm24k().chunks(960) {
        call.send(CallInput::Audio(chunk.to_vec())).await.expect("send");
    }
    let events = until(&mut rx, is_done).await;
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    let order = ["speech_started", "speech_stopped", "committed", "transcript", "response.created", "audio.delta", "response.done"];
    let pos: Vec<usize> = order.iter().map(|k| kinds.iter().position(|x| x == k).unwrap_or_else(|| panic!("no {k} in {kinds:?}"))).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{kinds:?}");
    let started = events.iter().find_map(|e| match e { AgentEvent::SpeechStarted { audio_start_ms, .. } => Some(*audio_start_ms), _ => None });
    assert!((900..=1200).contains(&started.expect("start")), "speech starts about 1 s in: {started:?}");
    call.close().await;
}

#[tokio::test]
async fn barge_in_stops_audio_and_keeps_only_what_was_heard() {
    let (call, mut rx) = start(SessionSettings::default()).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    // Let about half a second of the reply play.
    let mut audio_frames = 0;
    while audio_frames < 25 {
        if let AgentEvent::AudioDelta { .. } = next(&mut rx).await {
            audio_frames += 1;
        }
    }
    // The caller speaks.
    let pcm = speech_pcm24k();
    let mut events = Vec::new();
    for chunk in pcm.chunks(960) {
        call.send(CallInput::Audio(chunk.to_vec())).await.expect("send");
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        if events.iter().any(is_done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if !events.iter().any(is_done) {
        events.extend(until(&mut rx, is_done).await);
    }
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    let started = kinds.iter().position(|k| *k == "speech_started").expect("speech started");
    let cleared = kinds.iter().position(|k| *k == "cleared").expect("output cleared");
    assert!(started < cleared, "{kinds:?}");
    assert!(!kinds[cleared..].contains(&"audio.delta"), "audio after the clear: {kinds:?}");
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Cancelled);
    assert!(transcript.len() < REPLY.len() / 2, "heard text should be a short prefix: {transcript:?}");
    assert!(REPLY.starts_with(transcript.as_str()), "{transcript:?}");
    call.close().await;
}

#[tokio::test]
async fn bad_audio_and_bad_requests_get_errors_and_the_call_goes_on() {
    let mut settings = SessionSettings::default();
    settings.turn_detection = None;
    let (call, mut rx) = start(settings).await;
    call.send(CallInput::Audio(vec![1, 2, 3])).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::Error { code: ErrorCode::InvalidAudio, .. }));
    call.send(CallInput::Commit).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::Error { code: ErrorCode::EmptyBuffer, .. }));
    call.send(CallInput::UserText("hi".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    assert!(events.iter().any(|e| matches!(e, AgentEvent::Error { code: ErrorCode::ActiveResponse, .. })));
    call.close().await;
}

#[tokio::test]
async fn cancel_stops_the_response_and_format_changes_apply() {
    let mut settings = SessionSettings::default();
    settings.output_format = AudioFormat::Pcmu;
    let (call, mut rx) = start(settings).await;
    call.send(CallInput::UserText("hi".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    loop {
        if let AgentEvent::AudioDelta { audio, .. } = next(&mut rx).await {
            assert_eq!(audio.len(), 160, "20 ms of 8 kHz mu-law");
            break;
        }
    }
    call.send(CallInput::CancelResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let Some(AgentEvent::ResponseDone { status, .. }) = events.last() else { panic!() };
    assert_eq!(*status, ResponseStatus::Cancelled);
    call.close().await;
}

fn counting_tool(delay_ms: u64) -> (ToolRegistry, Arc<std::sync::atomic::AtomicUsize>) {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut registry = ToolRegistry::default();
    registry.register(Arc::new(CountingTool { runs: runs.clone(), delay: Duration::from_millis(delay_ms) }));
    (registry, runs)
}

#[tokio::test]
async fn a_server_tool_is_called_committed_and_answered() {
    let (registry, runs) = counting_tool(10);
    let (call, mut rx) = start_with(engines_with(registry), SessionSettings::default()).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let call_ev = events.iter().position(|e| matches!(e, AgentEvent::FunctionCall { client: false, .. })).expect("function call");
    let out_ev = events.iter().position(|e| matches!(e, AgentEvent::FunctionOutput { output, .. } if output.contains("ORD001"))).expect("function output");
    let first_audio = events.iter().position(|e| matches!(e, AgentEvent::AudioDelta { .. })).expect("audio");
    assert!(call_ev < out_ev && out_ev < first_audio, "call, result, then speech");
    let Some(AgentEvent::ResponseDone { status, transcript, function_calls, .. }) = events.last() else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed);
    assert_eq!(transcript, REPLY);
    assert_eq!(function_calls.len(), 1);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    call.close().await;
}

#[tokio::test]
async fn a_slow_tool_gets_a_holding_phrase_and_a_timeout_is_explained() {
    let (registry, _) = counting_tool(3_000);
    let mut settings = SessionSettings::default();
    settings.tool_policy.holding_after_ms = 200;
    settings.tool_policy.timeout_ms = 1_000;
    let (call, mut rx) = start_with(engines_with(registry), settings).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let said: Vec<&str> = events.iter().filter_map(|e| match e { AgentEvent::TranscriptDelta { delta, .. } => Some(delta.as_str()), _ => None }).collect();
    assert!(said.first().is_some_and(|d| d.contains("One moment")), "{said:?}");
    assert!(events.iter().any(|e| matches!(e, AgentEvent::FunctionOutput { output, .. } if output.contains("did not answer within 1000 ms"))));
    let Some(AgentEvent::ResponseDone { status, .. }) = events.last() else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed, "the call goes on after a tool timeout");
    call.close().await;
}

#[tokio::test]
async fn client_tools_round_trip_and_outputs_are_not_taken_twice() {
    let mut settings = SessionSettings::default();
    settings.client_tools.push(ToolSpec { name: "get_weather".into(), description: "weather".into(), parameters: serde_json::json!({"type": "object"}) });
    let (call, mut rx) = start(settings).await;
    call.send(CallInput::UserText("weather in Paris?".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let call_id = events.iter().find_map(|e| match e { AgentEvent::FunctionCall { call, client: true, .. } => Some(call.id.clone()), _ => None }).expect("client call");
    let Some(AgentEvent::ResponseDone { function_calls, .. }) = events.last() else { panic!() };
    assert_eq!(function_calls.len(), 1);
    call.send(CallInput::ToolOutput { call_id: call_id.clone(), output: "{\"sky\": \"sunny\"}".into() }).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::FunctionOutput { call_id: c, .. } if c == call_id));
    call.send(CallInput::ToolOutput { call_id: call_id.clone(), output: "again".into() }).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::Error { code: ErrorCode::UnknownCall, .. }));
    call.send(CallInput::ToolOutput { call_id: "call_nope".into(), output: "x".into() }).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::Error { code: ErrorCode::UnknownCall, .. }));
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.last() else { panic!() };
    assert_eq!((*status, transcript.as_str()), (ResponseStatus::Completed, REPLY));
    call.close().await;
}

#[tokio::test]
async fn interrupting_right_after_a_tool_call_keeps_exactly_one_completed_call() {
    let (registry, runs) = counting_tool(300);
    let (call, mut rx) = start_with(engines_with(registry), SessionSettings::default()).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    loop {
        if let AgentEvent::FunctionCall { .. } = next(&mut rx).await {
            break;
        }
    }
    call.send(CallInput::CancelResponse).await.expect("send");
    let mut events = until(&mut rx, is_done).await;
    // The tool finishes on its own and its result is committed once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !events.iter().any(|e| matches!(e, AgentEvent::FunctionOutput { .. })) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => events.push(e),
            _ => panic!("the interrupted tool's result was never committed: {events:?}"),
        }
    }
    assert_eq!(events.iter().filter(|e| matches!(e, AgentEvent::FunctionCall { .. })).count(), 0, "no second call");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The next response sees the call and its result and does not call again.
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    assert!(!events.iter().any(|e| matches!(e, AgentEvent::FunctionCall { .. })), "the tool ran twice: {events:?}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    call.close().await;
}
