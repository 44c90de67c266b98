//! Per-call settings, changed by the client (`session.update`) over server defaults.

use parley_audio::format::AudioFormat;
use parley_audio::vad::TurnSettings;
use parley_llm::{GenerateOptions, ToolSpec};

/// The default instructions: a voice agent must answer briefly, in plain speech.
pub const DEFAULT_INSTRUCTIONS: &str = "You are a friendly, helpful voice assistant on a live phone call. \
Answer the caller's question directly and correctly in one or two short spoken sentences. Do not use lists, markdown, code or emoji. \
If you did not understand the caller, ask them to repeat.";

/// Default for [`TurnDetection::complete_silence_ms`]: VAD silence, which trails the
/// real silence by about 100 ms. The early transcript is taken at 160 ms and takes
/// 100–350 ms, so this ends a question about when its transcript is known; against
/// the 500 ms window that saves about a quarter second per question.
pub const DEFAULT_COMPLETE_SILENCE_MS: u32 = 250;

/// Server-side voice activity detection: when set, the server decides when the
/// caller's turn ends and (optionally) answers on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnDetection {
    /// VAD threshold, padding and silence window.
    pub vad: TurnSettings,
    /// Start a response as soon as a turn is committed.
    pub create_response: bool,
    /// Speech during a response interrupts it (barge-in).
    pub interrupt_response: bool,
    /// Silence allowed before committing a turn whose transcript looks unfinished
    /// (a number being read out, a trailing "and", an address half spelled): the
    /// silence window grows from `vad.silence_duration_ms` up to this, and no further.
    /// Equal to the silence window turns the extension off.
    pub unfinished_silence_ms: u32,
    /// Silence after which a turn whose transcript (taken at the caller's pause)
    /// reads as a finished question ends, without waiting for the rest of the
    /// silence window ([`crate::turn_rules::reads_complete`]). At least the silence
    /// window turns this off.
    pub complete_silence_ms: u32,
    /// How often a partial transcript is made while the caller speaks; 0 turns
    /// partial transcripts off.
    pub partial_interval_ms: u32,
    /// How speech during the agent's reply is judged.
    pub interruption: InterruptionSettings,
}

impl Default for TurnDetection {
    fn default() -> Self {
        Self {
            vad: TurnSettings::default(),
            create_response: true,
            interrupt_response: true,
            unfinished_silence_ms: 2_000,
            complete_silence_ms: DEFAULT_COMPLETE_SILENCE_MS,
            partial_interval_ms: 500,
            interruption: InterruptionSettings::default(),
        }
    }
}

/// Barge-in judgement: what speech during a reply must be to stop it.
///
/// Speech that starts while the agent talks first has to last `min_pause_ms`
/// (shorter sounds are ignored); then, unless it is the agent's own echo, the agent
/// pauses. If the caller's words (a partial or final transcript) are more than
/// backchannels, the reply is cancelled and cut to what was heard; if the sound
/// carried no words or only backchannels, the reply resumes where it paused.
#[derive(Debug, Clone, PartialEq)]
pub struct InterruptionSettings {
    /// Speech during a reply shorter than this does not even pause it.
    pub min_pause_ms: u32,
    /// Words that acknowledge without taking the turn ("mm-hm", "okay"); speech made
    /// only of these resumes the reply.
    pub backchannels: Vec<String>,
    /// Compare speech heard during playback with the agent's own recent audio and
    /// ignore it when it is an echo.
    pub echo_guard: bool,
    /// Envelope correlation (0..1) at or above which input counts as echo.
    pub echo_correlation: f32,
}

impl Default for InterruptionSettings {
    fn default() -> Self {
        Self {
            min_pause_ms: 250,
            backchannels: crate::turn_rules::DEFAULT_BACKCHANNELS.iter().map(|s| s.to_string()).collect(),
            echo_guard: true,
            echo_correlation: 0.7,
        }
    }
}

/// Options of one response (`response.create`'s `response` object).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseOptions {
    /// Instructions for this response only, instead of the session's.
    pub instructions: Option<String>,
    /// `false` plays the whole reply even if the caller speaks (a legal notice);
    /// their speech is kept and answered next.
    pub interruptible: bool,
    /// Speak exactly this, without the model (the server's goodbye when it stops).
    pub say: Option<String>,
}

impl Default for ResponseOptions {
    fn default() -> Self {
        Self { instructions: None, interruptible: true, say: None }
    }
}

/// How outbound audio is cut and paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacingSettings {
    /// Duration of each audio frame sent (20 ms suits telephony).
    pub frame_ms: u32,
    /// How far ahead of real time the sender may run, to absorb network jitter.
    /// Kept small so that barge-in drops little and "heard" is known closely.
    pub lead_ms: u32,
}

impl Default for PacingSettings {
    fn default() -> Self {
        Self { frame_ms: 20, lead_ms: 120 }
    }
}

/// Everything one call can configure.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    /// The system prompt.
    pub instructions: String,
    /// What the caller sends.
    pub input_format: AudioFormat,
    /// What the caller wants back.
    pub output_format: AudioFormat,
    /// `None` means the client commits turns itself.
    pub turn_detection: Option<TurnDetection>,
    /// Sampling settings for replies.
    pub generate: GenerateOptions,
    /// The voice name (informational while one voice is loaded).
    pub voice: String,
    /// Outbound pacing.
    pub pacing: PacingSettings,
    /// Largest input buffer kept without a commit, in milliseconds of audio.
    pub max_buffer_ms: u32,
    /// Tools the client runs (Realtime function calling), declared in `session.update`.
    pub client_tools: Vec<ToolSpec>,
    /// `false` offers the model no tools at all (`tool_choice: "none"`).
    pub tools_enabled: bool,
    /// How the agent uses tools.
    pub tool_policy: ToolPolicy,
}

/// Limits and courtesies of the tool loop.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPolicy {
    /// A server tool that takes longer fails with a timeout the model can explain.
    pub timeout_ms: u64,
    /// When a tool has not answered after this long, the agent says `holding_phrase`.
    pub holding_after_ms: u64,
    /// What the agent says while a slow tool runs; empty says nothing.
    pub holding_phrase: String,
    /// Most model → tool → model rounds in one response.
    pub max_rounds: usize,
}

impl Default for ToolPolicy {
    fn default() -> Self {
        Self { timeout_ms: 8_000, holding_after_ms: 1_200, holding_phrase: "One moment while I check that.".into(), max_rounds: 4 }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            instructions: DEFAULT_INSTRUCTIONS.to_string(),
            input_format: AudioFormat::Pcm16 { rate: 24_000 },
            output_format: AudioFormat::Pcm16 { rate: 24_000 },
            turn_detection: Some(TurnDetection::default()),
            generate: GenerateOptions { max_tokens: 120, ..GenerateOptions::default() },
            voice: "joe".to_string(),
            pacing: PacingSettings::default(),
            max_buffer_ms: 60_000,
            client_tools: Vec::new(),
            tools_enabled: true,
            tool_policy: ToolPolicy::default(),
        }
    }
}
