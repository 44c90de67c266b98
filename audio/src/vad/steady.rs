//! Spotting steady signals (tones, hum, constant noise) that the neural VAD can
//! mistake for voice.
//!
//! earshot scores a steady 200-440 Hz tone, a dial tone or a DTMF digit at or
//! above 0.5, which would let a telephone's own signalling barge in on the
//! agent. Speech, unlike those, changes its spectral shape every few tens of
//! milliseconds. Each frame's shape is summarized by its normalized
//! autocorrelation at short lags (independent of loudness), and a frame counts
//! as *changing* when that shape differs enough from one of the few frames
//! before it.

/// Autocorrelation lags summarizing a frame's spectral envelope (up to 2 ms at 16 kHz).
const LAGS: usize = 32;
/// Frames of history compared against (about 100 ms).
const HISTORY: usize = 6;
/// Mean absolute change of the normalized autocorrelation that marks speech-like
/// change. Measured: pure and dual tones and white noise stay below 0.10, even
/// after a μ-law round trip; running speech mostly lies between 0.25 and 0.85.
const CHANGE_THRESHOLD: f32 = 0.15;

/// The loudness-independent shape of one frame.
pub(crate) type Shape = [f32; LAGS];

/// Normalized autocorrelation of `frame` at lags 1..=32.
pub(crate) fn shape(frame: &[f32]) -> Shape {
    let energy: f32 = frame.iter().map(|s| s * s).sum();
    let mut out = [0.0; LAGS];
    if energy <= f32::EPSILON {
        return out;
    }
    for (lag, value) in (1..).zip(out.iter_mut()) {
        let sum: f32 = frame.iter().skip(lag).zip(frame).map(|(a, b)| a * b).sum();
        *value = sum / energy;
    }
    out
}

fn distance(a: &Shape, b: &Shape) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / LAGS as f32
}

/// Remembers the last few frame shapes and says whether a new one is changing.
#[derive(Debug, Clone)]
pub(crate) struct Steadiness {
    history: [Shape; HISTORY],
    len: usize,
    next: usize,
}

impl Steadiness {
    pub(crate) fn new() -> Self {
        Self {
            history: [[0.0; LAGS]; HISTORY],
            len: 0,
            next: 0,
        }
    }

    /// Forgets the history, so the next frame has nothing to differ from.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }

    /// Records `shape` and returns whether it differs from any remembered frame
    /// by the change threshold (false when there is no history yet).
    pub(crate) fn observe(&mut self, shape: Shape) -> bool {
        let changing = self.history[..self.len]
            .iter()
            .any(|old| distance(old, &shape) >= CHANGE_THRESHOLD);
        self.history[self.next] = shape;
        self.next = (self.next + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
        changing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::TAU;

    fn frames(signal: impl Fn(usize) -> f32, count: usize) -> Vec<Shape> {
        let samples: Vec<f32> = (0..count * 256).map(signal).collect();
        samples.chunks_exact(256).map(shape).collect()
    }

    fn changing_count(shapes: &[Shape]) -> usize {
        let mut steadiness = Steadiness::new();
        shapes.iter().filter(|s| steadiness.observe(**s)).count()
    }

    #[test]
    fn tones_are_steady() {
        let tone = |f: f32| move |i: usize| 0.3 * (TAU * f * i as f32 / 16_000.0).sin();
        for f in [200.0, 440.0, 1000.0, 3000.0] {
            assert_eq!(changing_count(&frames(tone(f), 60)), 0, "{f} Hz");
        }
        let dtmf = |i: usize| tone(697.0)(i) + tone(1209.0)(i);
        assert_eq!(changing_count(&frames(dtmf, 60)), 0);
    }

    #[test]
    fn a_change_of_sound_is_changing() {
        let switch = |i: usize| {
            let f = if i < 256 * 10 { 300.0 } else { 2500.0 };
            0.3 * (TAU * f * i as f32 / 16_000.0).sin()
        };
        let shapes = frames(switch, 20);
        assert!(changing_count(&shapes) >= 5);
        let mut steadiness = Steadiness::new();
        assert!(!steadiness.observe(shapes[0]), "no history, no change");
        steadiness.clear();
        assert!(!steadiness.observe(shapes[15]));
    }

    #[test]
    fn silence_has_a_zero_shape() {
        assert_eq!(shape(&[0.0; 256]), [0.0; LAGS]);
    }
}
