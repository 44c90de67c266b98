//! Voice activity detection and server-side turn detection on 16 kHz audio.
//!
//! [`VoiceDetector`] scores 16 ms frames with earshot's small neural VAD;
//! [`TurnDetector`] turns those scores into the Realtime API's
//! `speech_started` / `speech_stopped` events.

use earshot::Detector;

/// Sample rate earshot expects.
pub const VAD_RATE: u32 = 16_000;
/// Samples per earshot frame (16 ms at 16 kHz).
pub const FRAME_SAMPLES: usize = 256;
/// Duration of one frame in milliseconds.
pub const FRAME_MS: u64 = 16;
/// How far below `threshold` a frame may score and still count as speech once
/// speech has started, so syllable dips do not end a turn.
const HYSTERESIS: f32 = 0.15;

/// earshot neural VAD on arbitrary-length 16 kHz input (buffers into 256-sample frames).
pub struct VoiceDetector {
    detector: Box<Detector>,
    pending: Vec<f32>,
}

impl VoiceDetector {
    /// Creates a detector with fresh state; one per audio stream.
    pub fn new() -> Self {
        Self { detector: Detector::default_boxed(), pending: Vec::with_capacity(FRAME_SAMPLES) }
    }

    /// Adds 16 kHz samples and returns one speech probability (0..1) per
    /// completed 16 ms frame; a partial frame is kept for the next call.
    pub fn push(&mut self, samples_16k: &[f32]) -> Vec<f32> {
        let mut scores = Vec::with_capacity((self.pending.len() + samples_16k.len()) / FRAME_SAMPLES);
        let mut rest = samples_16k;
        while !rest.is_empty() {
            let take = (FRAME_SAMPLES - self.pending.len()).min(rest.len());
            // earshot wants [-1, 1]; clamp overshoot and silence NaNs.
            self.pending.extend(rest[..take].iter().map(|&s| if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) }));
            rest = &rest[take..];
            if self.pending.len() == FRAME_SAMPLES {
                scores.push(self.detector.predict_f32(&self.pending).clamp(0.0, 1.0));
                self.pending.clear();
            }
        }
        scores
    }

    /// Forgets all audio heard so far, including a partial frame.
    pub fn reset(&mut self) {
        self.detector.reset();
        self.pending.clear();
    }

    /// Samples held back waiting for a full frame.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl Default for VoiceDetector {
    fn default() -> Self {
        Self::new()
    }
}

/// Server-VAD settings, mirroring the OpenAI Realtime `server_vad` turn_detection fields.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSettings {
    /// Frame probability at or above which audio counts as speech (0..1).
    pub threshold: f32,
    /// Audio to keep before the detected onset when handing a turn to ASR;
    /// the detector does not buffer audio, see [`TurnSettings::audio_start_ms`].
    pub prefix_padding_ms: u32,
    /// Silence after speech that ends the turn.
    pub silence_duration_ms: u32,
    /// Shortest run of speech frames that starts a turn; shorter blips are not speech.
    pub min_speech_ms: u32,
}

impl Default for TurnSettings {
    fn default() -> Self {
        Self { threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500, min_speech_ms: 100 }
    }
}

impl TurnSettings {
    /// Where the turn's audio should start for a speech onset at `speech_at_ms`:
    /// `prefix_padding_ms` earlier, not before the stream began.
    pub fn audio_start_ms(&self, speech_at_ms: u64) -> u64 {
        speech_at_ms.saturating_sub(u64::from(self.prefix_padding_ms))
    }

    fn start_frames(&self) -> u64 {
        u64::from(self.min_speech_ms).div_ceil(FRAME_MS).max(1)
    }

    fn stop_frames(&self) -> u64 {
        u64::from(self.silence_duration_ms).div_ceil(FRAME_MS).max(1)
    }

    fn stay_threshold(&self) -> f32 {
        (self.threshold - HYSTERESIS).max(self.threshold.min(0.05))
    }
}

/// A change of turn, timed in milliseconds of audio since the first sample pushed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnEvent {
    /// The caller began speaking at `at_ms` (onset of the speech run).
    SpeechStarted { at_ms: u64 },
    /// The caller stopped speaking at `at_ms` (end of the last speech frame).
    SpeechStopped { at_ms: u64 },
}

/// Turns per-frame VAD scores into speech start/stop events: start after min_speech_ms of frames over threshold (at_ms = onset of that run, measured from the first sample ever pushed), stop after silence_duration_ms below threshold (at_ms = end of the last speech frame). Hysteresis is fine.
///
/// Once speech has started, frames down to `threshold - 0.15` still count as
/// speech, so the dips between syllables do not end a turn. The clock counts
/// every sample ever pushed and is not rewound by [`reset`](Self::reset).
pub struct TurnDetector {
    vad: VoiceDetector,
    settings: TurnSettings,
    /// Samples pushed since creation (the clock).
    samples_seen: u64,
    /// Sample index at which the next VAD frame begins.
    next_frame_start: u64,
    in_speech: bool,
    /// Start sample of the current run of loud frames while not in speech.
    run_start: Option<u64>,
    run_frames: u64,
    /// End sample of the last speech frame while in speech.
    last_speech_end: u64,
    silent_frames: u64,
    last_probability: f32,
}

impl TurnDetector {
    /// Creates a detector for one call's inbound audio.
    pub fn new(settings: TurnSettings) -> Self {
        Self {
            vad: VoiceDetector::new(),
            settings,
            samples_seen: 0,
            next_frame_start: 0,
            in_speech: false,
            run_start: None,
            run_frames: 0,
            last_speech_end: 0,
            silent_frames: 0,
            last_probability: 0.0,
        }
    }

    /// Applies new settings (a `session.update`) from the next frame on, keeping state.
    pub fn set_settings(&mut self, s: TurnSettings) {
        self.settings = s;
    }

    /// The settings in force.
    pub fn settings(&self) -> &TurnSettings {
        &self.settings
    }

    /// Adds 16 kHz samples and returns the turn events they complete, in order.
    pub fn push(&mut self, samples_16k: &[f32]) -> Vec<TurnEvent> {
        self.samples_seen += samples_16k.len() as u64;
        let mut events = Vec::new();
        for p in self.vad.push(samples_16k) {
            let start = self.next_frame_start;
            let end = start + FRAME_SAMPLES as u64;
            self.next_frame_start = end;
            self.last_probability = p;
            if let Some(event) = self.step(p, start, end) {
                events.push(event);
            }
        }
        events
    }

    fn step(&mut self, p: f32, start: u64, end: u64) -> Option<TurnEvent> {
        if self.in_speech {
            if p >= self.settings.stay_threshold() {
                self.last_speech_end = end;
                self.silent_frames = 0;
                return None;
            }
            self.silent_frames += 1;
            if self.silent_frames >= self.settings.stop_frames() {
                self.in_speech = false;
                self.silent_frames = 0;
                return Some(TurnEvent::SpeechStopped { at_ms: samples_to_ms(self.last_speech_end) });
            }
            return None;
        }
        if p < self.settings.threshold {
            self.run_start = None;
            self.run_frames = 0;
            return None;
        }
        let onset = *self.run_start.get_or_insert(start);
        self.run_frames += 1;
        if self.run_frames < self.settings.start_frames() {
            return None;
        }
        self.in_speech = true;
        self.run_start = None;
        self.run_frames = 0;
        self.last_speech_end = end;
        self.silent_frames = 0;
        Some(TurnEvent::SpeechStarted { at_ms: samples_to_ms(onset) })
    }

    /// Whether the caller is currently mid-turn (between start and stop events).
    pub fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Drops VAD state and any turn in progress (no `SpeechStopped` is emitted),
    /// e.g. after `input_audio_buffer.clear`. The clock keeps counting.
    pub fn reset(&mut self) {
        self.vad.reset();
        self.next_frame_start = self.samples_seen;
        self.in_speech = false;
        self.run_start = None;
        self.run_frames = 0;
        self.silent_frames = 0;
        self.last_probability = 0.0;
    }

    /// Speech probability of the most recent frame, for metrics and the demo page.
    pub fn last_probability(&self) -> f32 {
        self.last_probability
    }

    /// Milliseconds of audio pushed so far (the clock `at_ms` is measured on).
    pub fn elapsed_ms(&self) -> u64 {
        samples_to_ms(self.samples_seen)
    }
}

fn samples_to_ms(samples: u64) -> u64 {
    samples * 1000 / u64::from(VAD_RATE)
}
