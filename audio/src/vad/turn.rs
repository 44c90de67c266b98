//! Server-side turn detection: VAD scores to speech start/stop events.

use super::steady::{self, Steadiness};
use super::{FRAME_MS, FRAME_SAMPLES, VAD_RATE, VoiceDetector};

/// How far below `threshold` a frame may score and still count as speech once
/// speech has started, so the dips between syllables do not end a turn.
const HYSTERESIS: f32 = 0.15;
/// Changing frames a run of loud frames needs before it can start a turn;
/// steady tones and hum never produce them.
const MIN_CHANGING_FRAMES: u32 = 2;
/// Frames (about 100 ms) a run may stay unchanged before its onset moves
/// forward; speech changes well within that, a tone never does.
const STEADY_RESTART_FRAMES: u32 = 6;

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
        Self {
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
            min_speech_ms: 100,
        }
    }
}

impl TurnSettings {
    /// Where the turn's audio should start for a speech onset at `speech_at_ms`:
    /// `prefix_padding_ms` earlier, not before the stream began.
    pub fn audio_start_ms(&self, speech_at_ms: u64) -> u64 {
        speech_at_ms.saturating_sub(u64::from(self.prefix_padding_ms))
    }

    fn start_frames(&self) -> u32 {
        frames_for(self.min_speech_ms)
    }

    fn stop_frames(&self) -> u32 {
        frames_for(self.silence_duration_ms)
    }

    fn stay_threshold(&self) -> f32 {
        (self.threshold - HYSTERESIS).max(self.threshold.min(0.05))
    }
}

/// Whole frames covering `ms`, at least one.
fn frames_for(ms: u32) -> u32 {
    ms.div_ceil(FRAME_MS as u32).max(1)
}

/// A change of turn, timed in milliseconds of audio since the first sample pushed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TurnEvent {
    /// The caller began speaking at `at_ms` (onset of the speech run).
    SpeechStarted { at_ms: u64 },
    /// The caller stopped speaking at `at_ms` (end of the last speech frame).
    SpeechStopped { at_ms: u64 },
}

/// Turns per-frame VAD scores into speech start/stop events, like the
/// Realtime API's `server_vad`.
///
/// A turn starts after `min_speech_ms` of consecutive frames at or over
/// `threshold` (`at_ms` = onset of that run) and stops after
/// `silence_duration_ms` of frames that are not speech (`at_ms` = end of the
/// last speech frame). Times are milliseconds since the first sample ever
/// pushed; [`reset`](Self::reset) does not rewind the clock.
///
/// Two refinements over that bare rule:
/// - hysteresis: once speech has started, frames down to `threshold - 0.15`
///   still count as speech, so the dips between syllables do not end a turn;
/// - steady signals are not speech: earshot alone scores dial tones, DTMF and
///   low tones around 0.5, so a run must also change its spectral shape (see
///   the `steady` module) before it starts a turn, and a steady frame inside a
///   turn counts as silence. A run that stays unchanged for 100 ms moves its
///   onset forward, so after a tone `at_ms` is near where the sound began
///   changing; a start may come later than `min_speech_ms` for such runs. A
///   vowel held perfectly still for longer than `silence_duration_ms` ends a turn.
///
/// Events come out with the frame (16 ms) that decides them; earshot looks at
/// the last 48 ms, so onsets read about one frame late and stops about 100 ms
/// late (its score decays after speech ends).
pub struct TurnDetector {
    vad: VoiceDetector,
    settings: TurnSettings,
    steadiness: Steadiness,
    /// Samples pushed since creation (the clock).
    samples_seen: u64,
    /// Sample index at which the next VAD frame begins.
    next_frame_start: u64,
    in_speech: bool,
    /// While not in speech: the current run of loud frames.
    run: Option<Run>,
    /// While in speech: end sample of the last speech frame, and silent frames since.
    last_speech_end: u64,
    silent_frames: u32,
    last_probability: f32,
}

/// A run of consecutive frames over the threshold, not yet a turn.
#[derive(Debug, Clone, Copy)]
struct Run {
    onset: u64,
    frames: u32,
    changing: u32,
}

impl TurnDetector {
    /// Creates a detector for one call's inbound audio.
    pub fn new(settings: TurnSettings) -> Self {
        Self {
            vad: VoiceDetector::new(),
            settings,
            steadiness: Steadiness::new(),
            samples_seen: 0,
            next_frame_start: 0,
            in_speech: false,
            run: None,
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
        let mut frames = Vec::new();
        self.vad.push_frames(samples_16k, |frame, p| {
            frames.push((steady::shape(frame), p))
        });
        let mut events = Vec::new();
        for (shape, p) in frames {
            let start = self.next_frame_start;
            let end = start + FRAME_SAMPLES as u64;
            self.next_frame_start = end;
            self.last_probability = p;
            let event = if self.in_speech {
                self.step_in_speech(p, shape, end)
            } else {
                self.step_waiting(p, shape, start, end)
            };
            events.extend(event);
        }
        events
    }

    fn step_waiting(
        &mut self,
        p: f32,
        shape: steady::Shape,
        start: u64,
        end: u64,
    ) -> Option<TurnEvent> {
        if p < self.settings.threshold {
            self.run = None;
            self.steadiness.clear();
            return None;
        }
        let changing = self.steadiness.observe(shape);
        let run = match self.run {
            // Steady for a while: whatever this is, it has not started changing yet.
            Some(run) if run.changing == 0 && !changing && run.frames >= STEADY_RESTART_FRAMES => {
                Run {
                    onset: start,
                    frames: 0,
                    changing: 0,
                }
            }
            Some(run) => run,
            None => Run {
                onset: start,
                frames: 0,
                changing: 0,
            },
        };
        let run = Run {
            frames: run.frames + 1,
            changing: run.changing + u32::from(changing),
            ..run
        };
        if run.frames < self.settings.start_frames() || run.changing < MIN_CHANGING_FRAMES {
            self.run = Some(run);
            return None;
        }
        self.run = None;
        self.in_speech = true;
        self.last_speech_end = end;
        self.silent_frames = 0;
        Some(TurnEvent::SpeechStarted {
            at_ms: samples_to_ms(run.onset),
        })
    }

    fn step_in_speech(&mut self, p: f32, shape: steady::Shape, end: u64) -> Option<TurnEvent> {
        let changing = self.steadiness.observe(shape);
        if p >= self.settings.stay_threshold() && changing {
            self.last_speech_end = end;
            self.silent_frames = 0;
            return None;
        }
        self.silent_frames += 1;
        if self.silent_frames < self.settings.stop_frames() {
            return None;
        }
        Some(self.stop())
    }

    /// Leaves the turn in progress: its `SpeechStopped` at the last speech frame.
    fn stop(&mut self) -> TurnEvent {
        self.in_speech = false;
        self.silent_frames = 0;
        self.steadiness.clear();
        TurnEvent::SpeechStopped {
            at_ms: samples_to_ms(self.last_speech_end),
        }
    }

    /// Ends the turn in progress now, before the silence window has run out, and
    /// returns its `SpeechStopped` (the same `at_ms` the window would have given);
    /// `None` outside a turn. For a caller that knows more than the VAD: the
    /// transcript of the pause reads as a finished question. The detector keeps its
    /// state, so speech that follows starts a new turn as usual.
    pub fn end_turn(&mut self) -> Option<TurnEvent> {
        self.in_speech.then(|| self.stop())
    }

    /// Whether the caller is currently mid-turn (between start and stop events).
    pub fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Drops VAD state and any turn in progress (no `SpeechStopped` is emitted),
    /// e.g. after `input_audio_buffer.clear`. The clock keeps counting.
    pub fn reset(&mut self) {
        self.vad.reset();
        self.steadiness.clear();
        self.next_frame_start = self.samples_seen;
        self.in_speech = false;
        self.run = None;
        self.silent_frames = 0;
        self.last_probability = 0.0;
    }

    /// While the caller is mid-turn: how long the frames since the last speech frame
    /// have been silent, in milliseconds (0 outside a turn). The turn stops when this
    /// reaches `silence_duration_ms`; a caller can start work on the likely end of the
    /// turn before that (an early transcript) and check [`Self::last_speech_end_ms`]
    /// when the stop comes to know whether the caller spoke again meanwhile.
    pub fn silence_ms(&self) -> u64 {
        if self.in_speech {
            u64::from(self.silent_frames) * FRAME_MS
        } else {
            0
        }
    }

    /// Stream time (ms) where the last speech frame ended: the `at_ms` a
    /// `SpeechStopped` would carry now.
    pub fn last_speech_end_ms(&self) -> u64 {
        samples_to_ms(self.last_speech_end)
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
