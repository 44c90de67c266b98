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
    fn call(&self, arguments: serde_json::Value, _scope: &parley_agent::tools::CallScope) -> ToolFuture<'_> {
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
    let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../audio/tests/fixtures/speech16k.wav");
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

/// The audio fixture as 20 ms Opus packets (48 kHz mono), one stream.
fn speech_opus_packets() -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../audio/tests/fixtures/speech16k.wav");
    let (samples, rate) = parley_audio::wav::read_wav(&path).expect("fixture");
    let mut r = parley_audio::resample::StreamResampler::new(rate, 48_000).expect("resampler");
    let mut s = r.process(&samples);
    s.extend(r.flush());
    let mut encoder = AudioFormat::Opus.encoder().expect("encoder");
    s.chunks(960).map(|frame| encoder.encode(frame).expect("encode")).collect()
}

#[tokio::test]
async fn an_opus_call_hears_packets_and_replies_one_20_ms_packet_per_delta_in_one_stream() {
    let settings = SessionSettings { input_format: AudioFormat::Opus, output_format: AudioFormat::Opus, ..SessionSettings::default() };
    let (call, mut rx) = start(settings).await;
    // A payload that is not Opus is refused; the call goes on.
    call.send(CallInput::Audio(vec![0xFF, 0xFF, 0xFF, 0xFF])).await.expect("send");
    let AgentEvent::Error { code, message } = next(&mut rx).await else { panic!("no error for a bad packet") };
    assert_eq!(code, ErrorCode::InvalidAudio);
    assert!(message.contains("Opus"), "{message}");
    for packet in speech_opus_packets() {
        call.send(CallInput::Audio(packet)).await.expect("send");
    }
    let first = until(&mut rx, is_done).await;
    let kinds: Vec<&str> = first.iter().map(kind).collect();
    assert!(kinds.contains(&"speech_started") && kinds.contains(&"transcript"), "{kinds:?}");
    // A second reply continues the same Opus stream: one decoder takes both.
    call.send(CallInput::UserText("and then?".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let second = until(&mut rx, is_done).await;
    let mut decoder = AudioFormat::Opus.decoder().expect("decoder");
    let mut decoded = Vec::new();
    let mut packets = 0;
    for event in first.iter().chain(&second) {
        if let AgentEvent::AudioDelta { audio, .. } = event {
            assert_eq!(opus::packet::get_nb_samples(audio, 48_000).expect("an Opus packet"), 960, "one 20 ms packet per delta");
            let samples = decoder.decode(audio).expect("decodes in order");
            assert_eq!(samples.len(), 960);
            decoded.extend(samples);
            packets += 1;
        }
    }
    assert!(packets > 50, "only {packets} packets");
    let rms = (decoded.iter().map(|s| s * s).sum::<f32>() / decoded.len() as f32).sqrt();
    assert!(rms > 0.05, "the reply decodes to sound, not silence (rms {rms})");
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
    let settings = SessionSettings { turn_detection: None, ..SessionSettings::default() };
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
    let settings = SessionSettings { output_format: AudioFormat::Pcmu, ..SessionSettings::default() };
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

/// Calls the first tool with the same arguments on every generation (a small model
/// looping), up to three times, then speaks.
struct RepeatingLlm;
struct RepeatingSession;
impl LlmEngine for RepeatingLlm {
    fn name(&self) -> &str {
        "fake-repeating"
    }
    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(RepeatingSession)
    }
}
impl LlmSession for RepeatingSession {
    fn generate(&mut self, messages: &[ChatMessage], options: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Result<GenerationStats, LlmError> {
        let mut stats = GenerationStats::default();
        let calls = messages.iter().map(|m| m.tool_calls.len()).sum::<usize>();
        // Like a real engine, it calls nothing when calls are not allowed.
        if let Some(tool) = options.tools.first().filter(|_| calls < 3 && options.tool_choice != parley_llm::ToolChoice::None) {
            stats.tool_calls.push(ToolCall { id: format!("call_{calls}"), name: tool.name.clone(), arguments: serde_json::json!({"member_id": "1001"}) });
            return Ok(stats);
        }
        let _ = on_text("Your order is processing.");
        Ok(stats)
    }
}

#[tokio::test]
async fn a_call_repeated_with_the_same_arguments_runs_once() {
    let (registry, runs) = counting_tool(5);
    let engines = Arc::new(Engines { llm: Arc::new(RepeatingLlm), ..(*engines_with(registry)).clone() });
    let (call, mut rx) = start_with(engines, SessionSettings::default()).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "run once");
    assert_eq!(events.iter().filter(|e| matches!(e, AgentEvent::FunctionCall { .. })).count(), 1, "committed once");
    assert_eq!(events.iter().filter(|e| matches!(e, AgentEvent::FunctionOutput { .. })).count(), 1);
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.last() else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed);
    assert_eq!(transcript, "Your order is processing.");
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

// ---- Turn-taking: false interruptions, unfinished turns, uninterruptible parts, echo.

/// Speech-to-text that answers by the length of the audio: short stretches get
/// `short`, longer ones `long` (a caller going on after a pause).
struct ScriptedAsr {
    short: &'static str,
    long: &'static str,
    long_from_s: f32,
}
impl Transcriber for ScriptedAsr {
    fn transcribe(&self, samples: &[f32]) -> Result<Transcript, AsrError> {
        let text = if samples.len() as f32 >= self.long_from_s * 16_000.0 { self.long } else { self.short };
        Ok(Transcript { text: text.to_string() })
    }
}

/// Speech-to-text that answers each stretch of speech with the next line of a script.
struct SequenceAsr {
    lines: Vec<&'static str>,
    next: std::sync::atomic::AtomicUsize,
}
impl SequenceAsr {
    fn new(lines: &[&'static str]) -> Self {
        Self { lines: lines.to_vec(), next: std::sync::atomic::AtomicUsize::new(0) }
    }
}
impl Transcriber for SequenceAsr {
    fn transcribe(&self, _samples: &[f32]) -> Result<Transcript, AsrError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Transcript { text: self.lines.get(i).or(self.lines.last()).copied().unwrap_or("").to_string() })
    }
}

/// A voice that "speaks" the fixture's speech (so its echo looks like speech to the
/// VAD), about 40 ms per character.
struct SpeechTts;
impl Synthesizer for SpeechTts {
    fn sample_rate(&self) -> u32 {
        16_000
    }
    fn synthesize(&self, text: &str) -> Result<Vec<f32>, TtsError> {
        let speech = fixture_speech();
        let n = text.len() * 640;
        Ok(speech.iter().cycle().take(n).copied().collect())
    }
}

/// The fixture's speech (0.9–2.9 s), 16 kHz.
fn fixture_speech() -> Vec<f32> {
    let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../audio/tests/fixtures/speech16k.wav");
    let (samples, _) = parley_audio::wav::read_wav(&path).expect("fixture");
    samples[14_400..46_400].to_vec()
}

/// 16 kHz samples as PCM16 24 kHz bytes.
fn pcm24k(samples: &[f32]) -> Vec<u8> {
    let mut r = parley_audio::resample::StreamResampler::new(16_000, 24_000).expect("resampler");
    let mut s = r.process(samples);
    s.extend(r.flush());
    parley_audio::pcm::encode_pcm16le(&s)
}

fn silence(ms: usize) -> Vec<f32> {
    vec![0.0; ms * 16]
}

/// Sends PCM16 24 kHz audio in real time (20 ms chunks), collecting events meanwhile.
async fn stream_real_time(call: &CallHandle, rx: &mut mpsc::Receiver<AgentEvent>, pcm: &[u8], events: &mut Vec<AgentEvent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for chunk in pcm.chunks(960) {
        tick.tick().await;
        call.send(CallInput::Audio(chunk.to_vec())).await.expect("send");
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
    }
}

/// Starts a reply to a typed question and waits until `frames` audio frames played.
async fn reply_playing(call: &CallHandle, rx: &mut mpsc::Receiver<AgentEvent>, options: Option<parley_agent::ResponseOptions>, frames: usize) -> Vec<AgentEvent> {
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(match options {
        Some(o) => CallInput::CreateResponseWith(o),
        None => CallInput::CreateResponse,
    })
    .await
    .expect("send");
    let mut events = Vec::new();
    while events.iter().filter(|e| matches!(e, AgentEvent::AudioDelta { .. })).count() < frames {
        events.push(next(rx).await);
    }
    events
}

fn engines_asr(asr: impl Transcriber + 'static) -> Arc<Engines> {
    Arc::new(Engines { transcriber: Arc::new(asr), llm: Arc::new(FakeLlm(REPLY)), tts: Arc::new(FakeTts), tools: ToolRegistry::default() })
}

#[tokio::test]
async fn a_sound_without_words_pauses_the_reply_and_it_resumes() {
    let engines = engines_asr(ScriptedAsr { short: "", long: "", long_from_s: 99.0 });
    let (call, mut rx) = start_with(engines, SessionSettings::default()).await;
    let mut events = reply_playing(&call, &mut rx, None, 20).await;
    // Half a second of "cough" (speech-like sound the transcriber finds no words in).
    let mut sound = fixture_speech()[..8_000].to_vec();
    sound.extend(silence(900));
    stream_real_time(&call, &mut rx, &pcm24k(&sound), &mut events).await;
    events.extend(until(&mut rx, is_done).await);
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    let started = kinds.iter().position(|k| *k == "speech_started").expect("the VAD heard the sound");
    assert!(!kinds.contains(&"cleared"), "{kinds:?}");
    assert!(kinds[started..].contains(&"audio.delta"), "the reply went on after the sound: {kinds:?}");
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed);
    assert_eq!(transcript, REPLY);
    assert!(!kinds.contains(&"committed"), "a sound without words is not a turn: {kinds:?}");
    call.close().await;
}

#[tokio::test]
async fn a_backchannel_does_not_interrupt() {
    let engines = engines_asr(ScriptedAsr { short: "Mm-hm.", long: "Mm-hm.", long_from_s: 99.0 });
    let (call, mut rx) = start_with(engines, SessionSettings::default()).await;
    let mut events = reply_playing(&call, &mut rx, None, 20).await;
    let mut sound = fixture_speech()[..12_000].to_vec();
    sound.extend(silence(900));
    stream_real_time(&call, &mut rx, &pcm24k(&sound), &mut events).await;
    events.extend(until(&mut rx, is_done).await);
    let Some(AgentEvent::ResponseDone { status, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed, "{:?}", events.iter().map(kind).collect::<Vec<_>>());
    call.close().await;
}

/// Reads "555 123" / pause / "4567": one turn with the whole number, answered once.
async fn read_a_number_with_a_pause(unfinished_silence_ms: u32) -> Vec<AgentEvent> {
    let engines = engines_asr(SequenceAsr::new(&["My phone number is 555, 123.", "4567."]));
    let mut settings = SessionSettings::default();
    if let Some(td) = settings.turn_detection.as_mut() {
        td.unfinished_silence_ms = unfinished_silence_ms;
        // The scripted transcriber answers finals only.
        td.partial_interval_ms = 0;
    }
    let (call, mut rx) = start_with(engines, settings).await;
    let speech = fixture_speech();
    let mut audio = silence(300);
    audio.extend(&speech);
    audio.extend(silence(1_000));
    audio.extend(&speech);
    audio.extend(silence(1_200));
    let mut events = Vec::new();
    stream_real_time(&call, &mut rx, &pcm24k(&audio), &mut events).await;
    events.extend(until(&mut rx, is_done).await);
    call.close().await;
    events
}

#[tokio::test]
async fn a_number_read_in_groups_is_one_turn() {
    let events = read_a_number_with_a_pause(2_000).await;
    let commits = events.iter().filter(|e| matches!(e, AgentEvent::InputCommitted { .. })).count();
    assert_eq!(commits, 1, "{:?}", events.iter().map(kind).collect::<Vec<_>>());
    let transcripts: Vec<&String> = events.iter().filter_map(|e| if let AgentEvent::UserTranscript { transcript, .. } = e { Some(transcript) } else { None }).collect();
    assert_eq!(transcripts, vec!["My phone number is 555, 123. 4567."]);
    // The control: with the extension off, the pause cuts the caller off.
    let events = read_a_number_with_a_pause(500).await;
    let first = events.iter().find_map(|e| if let AgentEvent::UserTranscript { transcript, .. } = e { Some(transcript.clone()) } else { None });
    assert_eq!(first.as_deref(), Some("My phone number is 555, 123."));
}

#[tokio::test]
async fn speech_during_a_part_that_may_not_be_interrupted_is_answered_after_it() {
    let (call, mut rx) = start(SessionSettings::default()).await;
    let options = parley_agent::ResponseOptions { interruptible: false, ..Default::default() };
    let mut events = reply_playing(&call, &mut rx, Some(options), 10).await;
    let mut audio = fixture_speech();
    audio.extend(silence(800));
    stream_real_time(&call, &mut rx, &pcm24k(&audio), &mut events).await;
    events.extend(until(&mut rx, is_done).await);
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed);
    assert_eq!(transcript, REPLY);
    assert!(!events.iter().any(|e| matches!(e, AgentEvent::OutputAudioCleared { .. })));
    // The caller's words were kept and get their own answer.
    let next_reply = until(&mut rx, is_done).await;
    assert!(next_reply.iter().any(|e| matches!(e, AgentEvent::ResponseCreated { .. })));
    let all: Vec<&AgentEvent> = events.iter().chain(&next_reply).collect();
    assert!(all.iter().any(|e| matches!(e, AgentEvent::UserTranscript { transcript, .. } if transcript == "where is my order")));
    call.close().await;
}

/// The server's line ([`CallInput::Say`], e.g. a SIP transfer's) replaces the reply
/// in progress even while a turn of the caller's waits for an answer: ending that
/// reply must not start the waiting answer in the line's place (which then refused
/// the line as a second response). The waiting turn is answered after the line.
#[tokio::test]
async fn the_servers_line_replaces_the_reply_while_a_turn_waits() {
    let (call, mut rx) = start(SessionSettings::default()).await;
    let long = "This part may not be interrupted, and it goes on for a good while. ".repeat(4);
    let options = parley_agent::ResponseOptions { interruptible: false, say: Some(long), ..Default::default() };
    let mut events = reply_playing(&call, &mut rx, Some(options), 10).await;
    let mut audio = fixture_speech();
    audio.extend(silence(800));
    stream_real_time(&call, &mut rx, &pcm24k(&audio), &mut events).await;
    // The caller's turn is committed and waits for the line in progress.
    if !events.iter().any(|e| matches!(e, AgentEvent::UserTranscript { .. })) {
        events.extend(until(&mut rx, |e| matches!(e, AgentEvent::UserTranscript { .. })).await);
    }
    assert!(!events.iter().any(is_done), "the first reply was still playing");
    let line = "Please hold, I am putting you through to a person.";
    call.send(CallInput::Say(parley_agent::ResponseOptions { interruptible: false, say: Some(line.into()), ..Default::default() })).await.expect("send");
    let first = until(&mut rx, is_done).await;
    assert!(matches!(first.last(), Some(AgentEvent::ResponseDone { status: ResponseStatus::Cancelled, .. })), "{:?}", first.last());
    let said = until(&mut rx, is_done).await;
    assert!(!said.iter().any(|e| matches!(e, AgentEvent::Error { .. })), "{said:?}");
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = said.last() else { panic!() };
    assert_eq!((*status, transcript.as_str()), (ResponseStatus::Completed, line));
    // Then the waiting turn gets its answer.
    let answer = until(&mut rx, is_done).await;
    let Some(AgentEvent::ResponseDone { status, transcript, .. }) = answer.last() else { panic!() };
    assert_eq!((*status, transcript.as_str()), (ResponseStatus::Completed, REPLY));
    call.close().await;
}

#[tokio::test]
async fn truncate_cuts_a_reply_to_what_the_client_played() {
    let settings = SessionSettings { turn_detection: None, ..SessionSettings::default() };
    let (call, mut rx) = start(settings).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let events = until(&mut rx, is_done).await;
    let Some(AgentEvent::ResponseDone { item_id: Some(item_id), .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    call.send(CallInput::Truncate { item_id: item_id.clone(), audio_end_ms: 1_000 }).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::ItemTruncated { audio_end_ms: 1_000, .. }));
    call.send(CallInput::Truncate { item_id: "nope".into(), audio_end_ms: 10 }).await.expect("send");
    assert!(matches!(next(&mut rx).await, AgentEvent::Error { code: ErrorCode::UnknownItem, .. }));
    call.close().await;
}

/// Plays the reply back into the call's input at a third of its level, 60 ms late,
/// as a speakerphone would; returns the events of the reply.
async fn reply_with_its_echo(echo_guard: bool) -> Vec<AgentEvent> {
    let engines = Arc::new(Engines {
        transcriber: Arc::new(FakeAsr("where is my order")),
        llm: Arc::new(FakeLlm(REPLY)),
        tts: Arc::new(SpeechTts),
        tools: ToolRegistry::default(),
    });
    let mut settings = SessionSettings::default();
    if let Some(td) = settings.turn_detection.as_mut() {
        td.interruption.echo_guard = echo_guard;
    }
    let (call, mut rx) = start_with(engines, settings).await;
    call.send(CallInput::UserText("where is my order".into())).await.expect("send");
    call.send(CallInput::CreateResponse).await.expect("send");
    let mut speaker: std::collections::VecDeque<u8> = std::iter::repeat_n(0u8, 3 * 960).collect();
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !events.iter().any(is_done) {
        tick.tick().await;
        while let Ok(ev) = rx.try_recv() {
            if let AgentEvent::AudioDelta { audio, .. } = &ev {
                speaker.extend(audio.iter().copied());
            }
            events.push(ev);
        }
        // What the speaker plays now comes back, quieter.
        let frame: Vec<u8> = (0..960).map(|_| speaker.pop_front().unwrap_or(0)).collect();
        let samples = parley_audio::pcm::decode_pcm16le(&frame).expect("pcm");
        let quieter: Vec<f32> = samples.iter().map(|s| s * 0.33).collect();
        call.send(CallInput::Audio(parley_audio::pcm::encode_pcm16le(&quieter))).await.expect("send");
    }
    call.close().await;
    events
}

#[tokio::test]
async fn the_agents_own_echo_does_not_interrupt_it() {
    let events = reply_with_its_echo(true).await;
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    let Some(AgentEvent::ResponseDone { status, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Completed, "{kinds:?}");
    assert!(!kinds.contains(&"cleared"), "{kinds:?}");
    // The control: without the guard the same echo interrupts the agent.
    let events = reply_with_its_echo(false).await;
    let Some(AgentEvent::ResponseDone { status, .. }) = events.iter().find(|e| is_done(e)) else { panic!() };
    assert_eq!(*status, ResponseStatus::Cancelled, "{:?}", events.iter().map(kind).collect::<Vec<_>>());
}
