//! Running one scripted conversation through the real agent, in-process: a
//! [`Call`] on the loaded engines with a fresh pharmacy database, each user turn
//! sent as text (or, for a spoken conversation, synthesized and sent as audio that
//! the real ASR transcribes), everything the agent did collected per turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parley_agent::tools::ToolRegistry;
use parley_agent::tools::pharmacy::{PharmacyDb, pharmacy_tools};
use parley_agent::{AgentEvent, Call, CallInput, Engines, ResponseStatus, SessionSettings};
use tokio::sync::mpsc;

use super::check::TurnRecord;
use super::set::{Conversation, Voice};

/// What running a conversation needs: the models, the call settings, a time limit.
pub struct Driver {
    /// Models shared by every conversation; the tools are replaced per conversation.
    pub engines: Engines,
    pub settings: SessionSettings,
    /// Longest wait for one response.
    pub turn_timeout: Duration,
}

/// One conversation's run.
#[derive(Debug)]
pub struct Run {
    /// One record per turn that was run (fewer than the turns when one failed).
    pub records: Vec<TurnRecord>,
    pub elapsed: Duration,
}

impl Driver {
    /// Runs `conversation` to its end, or up to the first turn whose response did
    /// not complete. Errors only when the pharmacy database cannot be created.
    pub async fn run(&self, conversation: &Conversation) -> Result<Run> {
        let started = Instant::now();
        let engines = Arc::new(Engines { tools: fresh_pharmacy()?, ..self.engines.clone() });
        let (call, mut events) = Call::start(format!("eval-{}", conversation.name), engines, self.settings.clone());
        let mut records = Vec::new();
        for turn in &conversation.turns {
            let began = Instant::now();
            let mut record = self.turn(&call, &mut events, &turn.user, conversation.spoken).await;
            record.seconds = began.elapsed().as_secs_f64();
            let stop = record.error.is_some();
            records.push(record);
            if stop {
                break;
            }
        }
        call.close().await;
        Ok(Run { records, elapsed: started.elapsed() })
    }

    /// Sends one user turn, asks for a response and collects it.
    async fn turn(&self, call: &parley_agent::CallHandle, events: &mut mpsc::Receiver<AgentEvent>, user: &str, voice: Option<Voice>) -> TurnRecord {
        let mut record = TurnRecord::default();
        let deadline = tokio::time::Instant::now() + self.turn_timeout;
        let inputs = match voice {
            None => vec![CallInput::UserText(user.to_string())],
            Some(voice) => match self.speech(user, voice).await {
                Ok(audio) => vec![CallInput::Audio(audio), CallInput::Commit],
                Err(e) => {
                    record.error = Some(format!("cannot synthesize the caller's turn: {e:#}"));
                    return record;
                }
            },
        };
        for input in inputs {
            if call.send(input).await.is_err() {
                record.error = Some("the call ended".into());
                return record;
            }
        }
        if voice.is_some() {
            // The response must see the transcript, so it is asked for once it is in.
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(AgentEvent::UserTranscript { transcript, .. })) => {
                        record.heard = Some(transcript);
                        break;
                    }
                    Ok(Some(AgentEvent::Error { code, message })) => {
                        record.error = Some(format!("{}: {message}", code.as_str()));
                        return record;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        record.error = Some("no transcript of the caller's turn".into());
                        return record;
                    }
                }
            }
        }
        if call.send(CallInput::CreateResponse).await.is_err() {
            record.error = Some("the call ended".into());
            return record;
        }
        let mut errors = Vec::new();
        loop {
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    record.error = Some(format!("no response.done within {} s", self.turn_timeout.as_secs()));
                    let _ = call.send(CallInput::CancelResponse).await;
                    return record;
                }
                Ok(None) => {
                    record.error = Some("the call ended".into());
                    return record;
                }
                Ok(Some(event)) => event,
            };
            match event {
                AgentEvent::FunctionCall { call, .. } => record.calls.push((call.name, call.arguments)),
                AgentEvent::FunctionOutput { output, .. } => record.outputs.push(output),
                AgentEvent::Error { code, message } => errors.push(format!("{}: {message}", code.as_str())),
                AgentEvent::ResponseDone { status, transcript, .. } => {
                    record.reply = transcript;
                    if status != ResponseStatus::Completed {
                        let why = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
                        record.error = Some(format!("response {}{why}", status.as_str()));
                    }
                    return record;
                }
                _ => {}
            }
        }
    }
}

impl Driver {
    /// The caller's words as audio in the call's input format: synthesized by the
    /// server's Piper voice or by `espeak-ng`, then resampled, with half a second of
    /// silence after (as a caller's microphone would send).
    async fn speech(&self, text: &str, voice: Voice) -> Result<Vec<u8>> {
        let (samples, rate) = match voice {
            Voice::Piper => {
                let tts = self.engines.tts.clone();
                let text = text.to_string();
                let samples = tokio::task::spawn_blocking(move || tts.synthesize(&text)).await.context("the synthesis thread")??;
                (samples, self.engines.tts.sample_rate())
            }
            Voice::Espeak => {
                static TURN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("parley-eval-{}-{n}.wav", std::process::id()));
                let out = tokio::process::Command::new("espeak-ng")
                    .arg("-w")
                    .arg(&path)
                    .args(["-s", "150", text])
                    .output()
                    .await
                    .context("running espeak-ng (install it with apt-get install espeak-ng)")?;
                anyhow::ensure!(out.status.success(), "espeak-ng failed: {}", String::from_utf8_lossy(&out.stderr));
                let read = parley_audio::wav::read_wav(&path).context("reading espeak-ng's WAV");
                let _ = std::fs::remove_file(&path);
                read?
            }
        };
        let format = self.settings.input_format;
        let mut resampler = parley_audio::resample::StreamResampler::new(rate, format.sample_rate())?;
        let mut converted = resampler.process(&samples);
        converted.extend(resampler.flush());
        converted.extend(std::iter::repeat_n(0.0, format.sample_rate() as usize / 2));
        format.encode(&converted).with_context(|| format!("encoding the caller's turn as {format:?} (eval calls speak a stateless format)"))
    }
}

/// The pharmacy tools on a new in-memory database with the seed records, so what
/// one conversation changes (a refill used) never leaks into the next.
fn fresh_pharmacy() -> Result<ToolRegistry> {
    let db = PharmacyDb::in_memory().context("creating the in-memory pharmacy database")?;
    let mut registry = ToolRegistry::default();
    for tool in pharmacy_tools(Arc::new(db)) {
        registry.register(tool);
    }
    Ok(registry)
}
