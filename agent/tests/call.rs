//! The call actor against small fakes behind the model traits: event order of a
//! turn, server-VAD turns, barge-in, cancellation and bad input.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use parley_agent::{AgentEvent, Call, CallHandle, CallInput, Engines, ErrorCode, ResponseStatus, SessionSettings};
use parley_asr::{AsrError, Transcriber, Transcript};
use parley_audio::format::AudioFormat;
use parley_llm::{ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession};
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
    fn generate(&mut self, messages: &[ChatMessage], _: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Result<GenerationStats, LlmError> {
        assert!(messages.len() >= 2, "system prompt plus the user's turn");
        let mut stats = GenerationStats { prompt_tokens: 10, ..GenerationStats::default() };
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
    Arc::new(Engines { transcriber: Arc::new(FakeAsr("where is my order")), llm: Arc::new(FakeLlm(REPLY)), tts: Arc::new(FakeTts) })
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
    let (call, mut rx) = Call::start("test".into(), engines(), settings);
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
