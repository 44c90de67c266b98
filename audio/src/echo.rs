//! Is the caller's "speech" only the agent's own voice coming back?
//!
//! On a speakerphone (or a gateway without echo cancellation) the agent's words
//! return on the caller's channel, a little later and quieter. The VAD calls that
//! speech, and without a check the agent would interrupt itself. [`EchoReference`]
//! keeps the loudness envelope (10 ms energy frames) of what the agent played, on
//! the wall clock, and compares the envelope of recent input with it over a range
//! of delays: a high correlation at some delay means the input is the agent's echo.
//!
//! Envelopes rather than waveforms: rooms, codecs and resamplers change the
//! waveform (phase, filtering) but keep the syllable rhythm, and envelopes make the
//! comparison independent of the two streams' sample rates. This is a detector, not
//! an echo canceller; a caller talking over the echo lowers the correlation and
//! counts as speech.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Envelope frame length.
const FRAME: Duration = Duration::from_millis(10);
/// Level given to silence (and to times with no reference), in dB.
const FLOOR_DB: f32 = -80.0;

/// What a comparison found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoCheck {
    /// Best Pearson correlation of the two envelopes (−1..1); 0 when there was too
    /// little reference to compare.
    pub correlation: f32,
    /// Delay of the input behind the reference at the best correlation.
    pub lag_ms: i64,
    /// Input level minus reference level over the window at that delay, in dB.
    pub level_gap_db: f32,
}

impl EchoCheck {
    /// True when the input follows the played audio closely (correlation at least
    /// `min_correlation`) and is not much louder than it: the agent's own voice.
    pub fn is_echo(&self, min_correlation: f32) -> bool {
        self.correlation >= min_correlation && self.level_gap_db < 6.0
    }
}

/// The loudness envelope of what the agent played recently, on the wall clock.
#[derive(Debug, Clone)]
pub struct EchoReference {
    /// (start of the frame, level in dB), in time order.
    frames: VecDeque<(Instant, f32)>,
    keep: Duration,
}

impl EchoReference {
    /// Keeps `keep_ms` of history.
    pub fn new(keep_ms: u64) -> Self {
        Self { frames: VecDeque::new(), keep: Duration::from_millis(keep_ms) }
    }

    /// Records `samples` (mono, `rate` Hz) as heard by the caller from `starts_at`.
    pub fn push_played(&mut self, samples: &[f32], rate: u32, starts_at: Instant) {
        let per_frame = (rate as usize / 100).max(1);
        for (i, chunk) in samples.chunks(per_frame).enumerate() {
            if chunk.len() < per_frame / 2 {
                break;
            }
            let at = starts_at + FRAME * i as u32;
            // Frames come in play order; a response restarting earlier replaces the tail.
            while self.frames.back().is_some_and(|(t, _)| *t > at) {
                self.frames.pop_back();
            }
            self.frames.push_back((at, level_db(chunk)));
        }
        if let Some(&(newest, _)) = self.frames.back() {
            while self.frames.front().is_some_and(|(t, _)| newest.saturating_duration_since(*t) > self.keep) {
                self.frames.pop_front();
            }
        }
    }

    /// True when something was played within `within` of `now`.
    pub fn active_near(&self, now: Instant, within: Duration) -> bool {
        self.frames.iter().rev().take(1).any(|(t, level)| *level > FLOOR_DB && now.saturating_duration_since(*t) <= within)
            || self.frames.iter().any(|(t, _)| *t > now)
    }

    /// Forgets everything played.
    pub fn clear(&mut self) {
        self.frames.clear();
    }

    /// Compares the input `input_16k` (16 kHz mono, its last sample heard at
    /// `input_end`) with the reference for delays from `min_lag_ms` to `max_lag_ms`.
    pub fn check(&self, input_16k: &[f32], input_end: Instant, min_lag_ms: i64, max_lag_ms: i64) -> EchoCheck {
        let none = EchoCheck { correlation: 0.0, lag_ms: 0, level_gap_db: 0.0 };
        let input: Vec<f32> = input_16k.chunks_exact(160).map(level_db).collect();
        if input.len() < 10 || self.frames.is_empty() {
            return none;
        }
        let n = input.len();
        // Start time of each input frame.
        let times: Vec<Instant> = (0..n)
            .map(|i| input_end.checked_sub(FRAME * (n - i) as u32).unwrap_or(input_end))
            .collect();
        let mut best = none;
        let mut lag = min_lag_ms;
        while lag <= max_lag_ms {
            let reference: Vec<Option<f32>> = times.iter().map(|t| self.level_at(shift(*t, -lag))).collect();
            let covered = reference.iter().filter(|r| r.is_some()).count();
            if covered * 2 >= n {
                let r: Vec<f32> = reference.iter().map(|r| r.unwrap_or(FLOOR_DB)).collect();
                let c = pearson(&input, &r);
                if c > best.correlation {
                    best = EchoCheck { correlation: c, lag_ms: lag, level_gap_db: mean_power_db(&input) - mean_power_db(&r) };
                }
            }
            lag += 10;
        }
        best
    }

    /// The reference level of the frame that covers `t`, if any.
    fn level_at(&self, t: Instant) -> Option<f32> {
        let idx = self.frames.partition_point(|(start, _)| *start <= t);
        if idx == 0 {
            return None;
        }
        let (start, level) = self.frames[idx - 1];
        (t.saturating_duration_since(start) < FRAME * 2).then_some(level)
    }
}

fn shift(t: Instant, ms: i64) -> Instant {
    if ms >= 0 {
        t + Duration::from_millis(ms as u64)
    } else {
        t.checked_sub(Duration::from_millis(ms.unsigned_abs())).unwrap_or(t)
    }
}

/// Level of a frame in dB relative to full scale, floored.
fn level_db(frame: &[f32]) -> f32 {
    let power = frame.iter().map(|s| s * s).sum::<f32>() / frame.len().max(1) as f32;
    (10.0 * (power + 1e-10).log10()).max(FLOOR_DB)
}

/// Mean power of a run of dB frames, back in dB.
fn mean_power_db(levels: &[f32]) -> f32 {
    let mean = levels.iter().map(|db| 10f32.powf(db / 10.0)).sum::<f32>() / levels.len().max(1) as f32;
    10.0 * (mean + 1e-10).log10()
}

fn pearson(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len()) as f32;
    if n < 2.0 {
        return 0.0;
    }
    let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    // Flat envelopes (steady noise, silence) say nothing about echo.
    if va < 1.0 || vb < 1.0 {
        return 0.0;
    }
    cov / (va.sqrt() * vb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speech() -> Vec<f32> {
        let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("tests/fixtures/speech16k.wav");
        // The fixture's speech runs from 0.9 s to 2.95 s.
        crate::wav::read_wav(&path).expect("fixture").0[14_400..47_200].to_vec()
    }

    /// Plays `played` from `t0`, then returns input that is the reference delayed by
    /// `delay_ms` and scaled, plus `other` (a second talker) on top.
    fn scenario(played: &[f32], delay_ms: usize, gain: f32, other: Option<&[f32]>) -> (EchoReference, Vec<f32>, Instant) {
        let t0 = Instant::now();
        let mut r = EchoReference::new(5_000);
        for (i, frame) in played.chunks(320).enumerate() {
            r.push_played(frame, 16_000, t0 + Duration::from_millis(20 * i as u64));
        }
        let delay = delay_ms * 16;
        let mut input = vec![0.0f32; played.len() + delay];
        for (i, s) in played.iter().enumerate() {
            input[i + delay] += s * gain;
        }
        if let Some(o) = other {
            for (i, s) in o.iter().enumerate().take(input.len()) {
                input[i] += s;
            }
        }
        let end = t0 + Duration::from_millis((input.len() / 16) as u64);
        (r, input, end)
    }

    #[test]
    fn a_quiet_delayed_copy_is_echo() {
        let s = speech();
        let played = &s[..16_000 * 2];
        let (r, input, end) = scenario(played, 120, 0.3, None);
        let window = &input[input.len() - 8_000..];
        let c = r.check(window, end, -200, 800);
        assert!(c.is_echo(0.7), "{c:?}");
        assert!((c.lag_ms - 120).abs() <= 20, "{c:?}");
        assert!(c.level_gap_db < -6.0, "{c:?}");
    }

    #[test]
    fn other_speech_is_not_echo() {
        let s = speech();
        let played = &s[..16_000];
        let other: Vec<f32> = s[16_000..].iter().map(|x| x * 0.8).collect();
        let (r, _, end) = scenario(played, 100, 0.0, None);
        let input = &other[..8_000.min(other.len())];
        let c = r.check(input, end, -200, 800);
        assert!(!c.is_echo(0.7), "{c:?}");
    }

    #[test]
    fn a_caller_talking_over_the_echo_is_not_echo() {
        let s = speech();
        let played = &s[..16_000 * 2];
        // Another talker: the same voice reversed has other syllables at any delay.
        let other: Vec<f32> = played.iter().rev().copied().collect();
        let (r, input, end) = scenario(played, 100, 0.15, Some(&other));
        let window = &input[input.len() - 12_000..input.len() - 4_000];
        let end = end - Duration::from_millis(250);
        let c = r.check(window, end, -200, 800);
        assert!(!c.is_echo(0.7), "{c:?}");
    }

    #[test]
    fn no_reference_means_no_echo() {
        let r = EchoReference::new(1_000);
        let c = r.check(&speech()[..8_000], Instant::now(), -200, 800);
        assert_eq!(c.correlation, 0.0);
    }
}
