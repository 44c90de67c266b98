//! The echo agent: engines that need no model files, for measuring transports and
//! for gateway integration tests.
//!
//! A call on these engines runs the same input, VAD, turn-taking, barge-in and
//! pacing code as a real one; only the reply differs: the call plays the caller's
//! own turn back (see `ResponseJob::echo_audio`). The engines here fill the
//! [`Engines`] slots so nothing else needs a special case: the transcriber names
//! the turn without decoding it, the language model repeats the caller's text (a
//! text-only turn), and the voice turns text into a short silence.

use std::ops::ControlFlow;
use std::sync::Arc;

use parley_asr::{AsrError, Transcriber, Transcript};
use parley_llm::{ChatMessage, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession, Role};
use parley_tts::{Synthesizer, TtsError};

use crate::Engines;
use crate::tools::ToolRegistry;

/// The name the echo language model reports; [`Engines::is_echo`] looks for it.
pub const ECHO_ENGINE: &str = "echo";

/// What the echo transcriber "hears" in every stretch of speech: words that are no
/// backchannel and do not sound unfinished, so each stretch is a turn and speech
/// over the echo interrupts it, as a caller's words would.
pub const ECHO_TRANSCRIPT: &str = "caller speech";

/// Milliseconds of silence the echo voice makes per character of text.
const SILENCE_MS_PER_CHAR: usize = 20;
/// The echo voice's sample rate (the caller's turn is kept at the ASR rate too).
const ECHO_RATE: u32 = 16_000;

impl Engines {
    /// Engines for the echo agent: no model files, ready at once, no server tools.
    pub fn echo() -> Self {
        Self { transcriber: Arc::new(EchoTranscriber), llm: Arc::new(EchoLlm), tts: Arc::new(EchoVoice), tools: ToolRegistry::default() }
    }

    /// True for [`Engines::echo`]: the call plays each caller turn back instead of
    /// answering it.
    pub fn is_echo(&self) -> bool {
        self.llm.name() == ECHO_ENGINE
    }
}

/// A transcriber that decodes nothing: every stretch of speech reads as
/// [`ECHO_TRANSCRIPT`].
pub struct EchoTranscriber;

impl Transcriber for EchoTranscriber {
    fn transcribe(&self, _samples_16k: &[f32]) -> Result<Transcript, AsrError> {
        Ok(Transcript { text: ECHO_TRANSCRIPT.to_string() })
    }

    fn is_instant(&self) -> bool {
        true
    }
}

/// A language model that repeats the caller's last message.
pub struct EchoLlm;

impl LlmEngine for EchoLlm {
    fn name(&self) -> &str {
        ECHO_ENGINE
    }

    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(EchoSession)
    }
}

/// The echo model's per-call session; it keeps no state.
struct EchoSession;

impl LlmSession for EchoSession {
    fn generate(&mut self, messages: &[ChatMessage], _options: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Result<GenerationStats, LlmError> {
        let last = messages.iter().rev().find(|m| m.role == Role::User).map(|m| m.content.as_str()).unwrap_or_default();
        if !last.is_empty() {
            let _ = on_text(last);
        }
        Ok(GenerationStats::default())
    }
}

/// A voice that says nothing: silence as long as the text would roughly take.
pub struct EchoVoice;

impl Synthesizer for EchoVoice {
    fn sample_rate(&self) -> u32 {
        ECHO_RATE
    }

    fn synthesize(&self, text: &str) -> Result<Vec<f32>, TtsError> {
        Ok(vec![0.0; text.chars().count() * SILENCE_MS_PER_CHAR * ECHO_RATE as usize / 1000])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_engines_are_recognised_and_repeat_the_caller() {
        let engines = Engines::echo();
        assert!(engines.is_echo());
        let mut said = String::new();
        let messages = [ChatMessage::new(Role::System, "be brief"), ChatMessage::new(Role::User, "hello there")];
        engines
            .llm
            .new_session()
            .generate(&messages, &GenerateOptions::default(), &mut |t| {
                said.push_str(t);
                ControlFlow::Continue(())
            })
            .expect("echo generates");
        assert_eq!(said, "hello there");
        assert_eq!(engines.transcriber.transcribe(&[0.0; 160]).expect("echo transcribes").text, ECHO_TRANSCRIPT);
        assert_eq!(engines.tts.synthesize("abc").expect("echo speaks").len(), 3 * 320);
    }
}
