//! Voice activity detection and server-side turn detection on 16 kHz audio.
//!
//! [`VoiceDetector`] scores 16 ms frames with earshot's small neural VAD;
//! [`TurnDetector`] turns those scores into the Realtime API's
//! `speech_started` / `speech_stopped` events.

mod steady;
mod turn;

use earshot::Detector;

pub use turn::{TurnDetector, TurnEvent, TurnSettings};

/// Sample rate earshot expects.
pub const VAD_RATE: u32 = 16_000;
/// Samples per earshot frame (16 ms at 16 kHz).
pub const FRAME_SAMPLES: usize = 256;
/// Duration of one frame in milliseconds.
pub const FRAME_MS: u64 = 16;

/// Loudest sample of a frame the detector treats as digital silence without asking
/// the network: below half a 16-bit step. μ-law silence (0xFF) decodes to exactly
/// 0; A-law has no zero (its quietest code is ±8 steps), so A-law silence is still
/// scored by the network. Idle μ-law and PCM calls send such frames most of the
/// time; scoring them was the largest CPU cost of an idle call.
const SILENCE_PEAK: f32 = 0.5 / 32_768.0;

/// earshot neural VAD on arbitrary-length 16 kHz input (buffers into 256-sample frames).
pub struct VoiceDetector {
    detector: Box<Detector>,
    pending: Vec<f32>,
    /// The last frame was digital silence, scored 0 without the network; the
    /// network starts afresh on the next sound.
    silent: bool,
}

impl VoiceDetector {
    /// Creates a detector with fresh state; one per audio stream.
    pub fn new() -> Self {
        Self {
            detector: Detector::default_boxed(),
            pending: Vec::with_capacity(FRAME_SAMPLES),
            silent: false,
        }
    }

    /// Adds 16 kHz samples and returns one speech probability (0..1) per
    /// completed 16 ms frame; a partial frame is kept for the next call.
    pub fn push(&mut self, samples_16k: &[f32]) -> Vec<f32> {
        let mut scores =
            Vec::with_capacity((self.pending.len() + samples_16k.len()) / FRAME_SAMPLES);
        self.push_frames(samples_16k, |_, p| scores.push(p));
        scores
    }

    /// Like [`push`](Self::push), handing each completed frame and its score to `on_frame`.
    pub(crate) fn push_frames(
        &mut self,
        samples_16k: &[f32],
        mut on_frame: impl FnMut(&[f32], f32),
    ) {
        let mut rest = samples_16k;
        while !rest.is_empty() {
            let take = (FRAME_SAMPLES - self.pending.len()).min(rest.len());
            // earshot wants [-1, 1]; clamp overshoot and silence NaNs.
            self.pending.extend(
                rest[..take]
                    .iter()
                    .map(|&s| if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) }),
            );
            rest = &rest[take..];
            if self.pending.len() == FRAME_SAMPLES {
                let p = if self.pending.iter().all(|s| s.abs() < SILENCE_PEAK) {
                    self.silent = true;
                    0.0
                } else {
                    if std::mem::take(&mut self.silent) {
                        // After digital silence, the state a fresh stream starts from.
                        self.detector.reset();
                    }
                    self.detector.predict_f32(&self.pending).clamp(0.0, 1.0)
                };
                on_frame(&self.pending, p);
                self.pending.clear();
            }
        }
    }

    /// Forgets all audio heard so far, including a partial frame.
    pub fn reset(&mut self) {
        self.detector.reset();
        self.pending.clear();
        self.silent = false;
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
