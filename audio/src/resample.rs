//! Stateful streaming sample-rate conversion on top of rubato's sinc resampler.

use rubato::{
    Resampler, SincFixedIn, SincInterpolationParameters, SincInterpolationType, WindowFunction,
    calculate_cutoff,
};

use crate::AudioError;

/// Lowest and highest rates accepted; outside this the filter sizes make no sense.
const MIN_RATE: u32 = 1_000;
const MAX_RATE: u32 = 384_000;
/// How good a conversion must be, which sets the sinc filter's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quality {
    /// Audio someone listens to (synthesized speech on its way to the caller): 256
    /// taps, >90 dB stopband, a look-ahead of a few milliseconds.
    #[default]
    Playback,
    /// Audio only a detector and a recognizer hear (the caller's side on its way to
    /// the VAD and Whisper): 96 taps, three eighths of the work and of the look-ahead
    /// (64 taps took 2 dB off a 3 kHz tone).
    /// Every call runs this on every packet for as long as it lasts, so it was the
    /// largest single cost of a talking call (a 10 s `perf` of 500 echo calls:
    /// rubato's sinc loop 19 % of the server's cycles, ahead of the VAD at 6 %);
    /// its tones stay within 1 dB up to 3 kHz from 8 kHz, and out-of-band ones
    /// stay under −40 dB.
    Analysis,
}

impl Quality {
    /// Sinc filter length in input samples.
    fn sinc_len(self) -> usize {
        match self {
            Quality::Playback => 256,
            Quality::Analysis => 96,
        }
    }
}
/// Largest exact sub-sample grid used with nearest-point interpolation; ratios
/// needing a finer grid fall back to cubic interpolation between 256 points.
const MAX_EXACT_GRID: usize = 256;
/// Input processed per rubato call, as a fraction of a second (5 ms): small
/// enough to add little latency, large enough to keep per-call overhead low.
const CHUNKS_PER_SECOND: u32 = 200;

/// Stateful streaming resampler (rubato sinc, good anti-aliasing), one per stream; never reset between chunks.
///
/// Input of any chunk length is buffered and converted in fixed 5 ms blocks, so
/// the output does not depend on how the input was chunked. Output is aligned
/// with the input clock (output sample `k` is the signal at time `k / to_hz`,
/// no leading delay), but it can only be computed once the filter has seen the
/// input that follows: it comes out at most
/// [`latency_samples`](Self::latency_samples) input samples late.
pub struct StreamResampler {
    from_hz: u32,
    to_hz: u32,
    /// `None` when the rates are equal.
    inner: Option<Converter>,
}

struct Converter {
    rubato: SincFixedIn<f32>,
    sinc_len: usize,
    from_hz: u32,
    to_hz: u32,
    chunk: usize,
    /// Input not yet handed to rubato (always shorter than `chunk`).
    pending: Vec<f32>,
    /// rubato's output buffer, reused between blocks.
    out_buf: Vec<Vec<f32>>,
    /// Lead-in that lines output time up with input time.
    align: Alignment,
    /// Output produced by the lead-in, handed out with the next call.
    carry: Vec<f32>,
    /// Leading output samples still to drop.
    skip: usize,
    /// Input samples received since the stream (re)started.
    consumed: u64,
    /// Output samples returned since the stream (re)started.
    emitted: u64,
}

impl StreamResampler {
    /// Builds a resampler for one stream of audio to be listened to ([`Quality::Playback`]);
    /// equal rates give a zero-cost passthrough.
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Self, AudioError> {
        Self::with_quality(from_hz, to_hz, Quality::Playback)
    }

    /// Builds a resampler for one stream at the given quality.
    pub fn with_quality(from_hz: u32, to_hz: u32, quality: Quality) -> Result<Self, AudioError> {
        for rate in [from_hz, to_hz] {
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(AudioError::UnsupportedRate(rate));
            }
        }
        let inner = if from_hz == to_hz {
            None
        } else {
            Some(Converter::new(from_hz, to_hz, quality.sinc_len())?)
        };
        Ok(Self {
            from_hz,
            to_hz,
            inner,
        })
    }

    /// Converts the next piece of the stream; returns whatever output is ready
    /// (possibly nothing while the first block and the filter look-ahead fill).
    pub fn process(&mut self, input: &[f32]) -> Vec<f32> {
        match &mut self.inner {
            None => input.to_vec(),
            Some(conv) => conv.process(input),
        }
    }

    /// Ends the stream: pushes the buffered input and filter tail out (padding
    /// with zeros) and returns the rest, so the total output is
    /// `round(total_input * to / from)` samples. The resampler is then ready for a new stream.
    pub fn flush(&mut self) -> Vec<f32> {
        match &mut self.inner {
            None => Vec::new(),
            Some(conv) => conv.flush(),
        }
    }

    /// Worst-case wait, in input samples, between an instant of input arriving
    /// and the output for that instant coming out of [`process`](Self::process):
    /// the filter's look-ahead plus one block (0 for passthrough). About 21 ms
    /// from 8 kHz, 10 ms from 24 kHz, 8 ms from 48 kHz.
    pub fn latency_samples(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| {
            let step = c.from_hz.div_ceil(c.to_hz) as usize;
            c.sinc_len / 2 + 2 + step + c.chunk - 1
        })
    }

    /// The input rate this resampler was built for.
    pub fn from_hz(&self) -> u32 {
        self.from_hz
    }

    /// The output rate this resampler was built for.
    pub fn to_hz(&self) -> u32 {
        self.to_hz
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// How to line rubato's output up with the input clock.
///
/// rubato's output sample `k` sits at input time `(k + 1) * step - 1 + 1 / grid`
/// (in input samples, `step = from / to`), not at `k * step`. Feeding `zeros`
/// silent samples first and dropping `skip` outputs moves sample `k` to exactly
/// `k * step` whenever `zeros - offset` is a whole number of output steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Alignment {
    zeros: usize,
    skip: usize,
}

fn alignment(from_hz: u32, to_hz: u32, grid: usize, exact: bool) -> Alignment {
    let g = gcd(from_hz, to_hz);
    let p = i64::from(from_hz / g); // step = p / q in input samples
    let q = i64::from(to_hz / g);
    let f = grid as i64;
    if exact && f == q {
        // offset = (p + 1 - q) / q; need zeros * q = (skip + 1) * p + 1 - q.
        for skip in 0..=2 * q {
            let num = (skip + 1) * p + 1 - q;
            if num >= 0 && num % q == 0 {
                return Alignment {
                    zeros: (num / q) as usize,
                    skip: skip as usize,
                };
            }
        }
    }
    // Interpolated grid: no exact solution in general, so take the lead-in
    // (up to a few milliseconds) that leaves the smallest sub-sample error.
    let step = p as f64 / q as f64;
    let offset = step - 1.0 + 1.0 / f as f64;
    let residual = |zeros: usize| {
        let skip = ((zeros as f64 - offset) / step).round().max(0.0);
        (zeros as f64 - offset - skip * step).abs()
    };
    let zeros = (0..=64)
        .min_by(|&a, &b| residual(a).total_cmp(&residual(b)))
        .unwrap_or(0);
    let skip = ((zeros as f64 - offset) / step).round().max(0.0) as usize;
    Alignment { zeros, skip }
}

impl Converter {
    fn new(from_hz: u32, to_hz: u32, sinc_len: usize) -> Result<Self, AudioError> {
        let ratio = f64::from(to_hz) / f64::from(from_hz);
        // Output instants fall on a grid of 1/(to/gcd) input samples; when that
        // grid is coarse enough, precompute a filter for each point and pick it
        // exactly instead of interpolating between filters.
        let exact_grid = (to_hz / gcd(from_hz, to_hz)) as usize;
        let exact = exact_grid <= MAX_EXACT_GRID;
        let (interpolation, grid) = if exact {
            (SincInterpolationType::Nearest, exact_grid)
        } else {
            (SincInterpolationType::Cubic, MAX_EXACT_GRID)
        };
        let window = WindowFunction::BlackmanHarris2;
        let params = SincInterpolationParameters {
            sinc_len,
            f_cutoff: calculate_cutoff(sinc_len, window),
            interpolation,
            oversampling_factor: grid,
            window,
        };
        let chunk = (from_hz / CHUNKS_PER_SECOND).max(1) as usize;
        let rubato = SincFixedIn::<f32>::new(ratio, 1.0, params, chunk, 1).map_err(|source| {
            AudioError::Resampler {
                from_hz,
                to_hz,
                source,
            }
        })?;
        let out_buf = rubato.output_buffer_allocate(true);
        let mut conv = Self {
            rubato,
            sinc_len,
            from_hz,
            to_hz,
            chunk,
            align: alignment(from_hz, to_hz, grid, exact),
            pending: Vec::with_capacity(chunk),
            carry: Vec::new(),
            out_buf,
            skip: 0,
            consumed: 0,
            emitted: 0,
        };
        conv.restart();
        Ok(conv)
    }

    /// Resets rubato and the counters for a fresh stream and feeds the alignment lead-in.
    fn restart(&mut self) {
        self.rubato.reset();
        self.pending.clear();
        self.skip = self.align.skip;
        self.consumed = 0;
        self.emitted = 0;
        let mut lead = Vec::new();
        self.feed(&vec![0.0; self.align.zeros], &mut lead);
        self.carry = lead;
    }

    fn process(&mut self, input: &[f32]) -> Vec<f32> {
        self.consumed += input.len() as u64;
        let mut out = std::mem::take(&mut self.carry);
        out.reserve(
            ((self.pending.len() + input.len()) as u64 * u64::from(self.to_hz)
                / u64::from(self.from_hz)) as usize
                + 1,
        );
        self.feed(input, &mut out);
        out
    }

    /// Buffers `input` and runs every block it completes.
    fn feed(&mut self, input: &[f32], out: &mut Vec<f32>) {
        let mut rest = input;
        while !rest.is_empty() {
            let take = (self.chunk - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == self.chunk {
                self.run_block(out);
                self.pending.clear();
            }
        }
    }

    /// Feeds one full block from `pending` to rubato and appends its output past the delay.
    fn run_block(&mut self, out: &mut Vec<f32>) {
        let input = [self.pending.as_slice()];
        // The buffers are sized by rubato itself, so this cannot fail; if it ever
        // did, losing one block beats taking the call down.
        let Ok((_, produced)) = self
            .rubato
            .process_into_buffer(&input, &mut self.out_buf, None)
        else {
            debug_assert!(false, "rubato rejected buffers it sized itself");
            return;
        };
        let block = &self.out_buf[0][..produced];
        let dropped = self.skip.min(block.len());
        self.skip -= dropped;
        out.extend_from_slice(&block[dropped..]);
        self.emitted += (block.len() - dropped) as u64;
    }

    fn flush(&mut self) -> Vec<f32> {
        let expected = (self.consumed * u64::from(self.to_hz) + u64::from(self.from_hz) / 2)
            / u64::from(self.from_hz);
        let mut out = std::mem::take(&mut self.carry);
        let already = self.emitted - out.len() as u64;
        // Each zero-padded block yields about chunk * ratio samples; the filter
        // tail and lead-in need at most sinc_len + zeros input samples, so this is bounded.
        let max_blocks = (self.sinc_len + self.align.zeros) / self.chunk + 3;
        for _ in 0..max_blocks {
            if self.emitted >= expected {
                break;
            }
            self.pending.resize(self.chunk, 0.0);
            self.run_block(&mut out);
            self.pending.clear();
        }
        out.truncate(expected.saturating_sub(already) as usize);
        self.restart();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::TAU;

    fn sine(freq: f32, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| 0.5 * (TAU * freq * i as f32 / rate as f32).sin())
            .collect()
    }

    fn run(from: u32, to: u32, input: &[f32], chunk: usize) -> Vec<f32> {
        run_at(from, to, input, chunk, Quality::Playback)
    }

    fn run_at(from: u32, to: u32, input: &[f32], chunk: usize, quality: Quality) -> Vec<f32> {
        let mut r = StreamResampler::with_quality(from, to, quality).unwrap();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            out.extend(r.process(piece));
        }
        out.extend(r.flush());
        out
    }

    /// Amplitude of `freq` in `x` (single-bin DFT), ignoring the edges.
    fn tone_amplitude(x: &[f32], freq: f32, rate: u32) -> f32 {
        let body = &x[x.len() / 8..x.len() * 7 / 8];
        let (mut re, mut im) = (0.0f64, 0.0f64);
        for (i, &s) in body.iter().enumerate() {
            let phase = f64::from(TAU) * f64::from(freq) * i as f64 / f64::from(rate);
            re += f64::from(s) * phase.cos();
            im += f64::from(s) * phase.sin();
        }
        (2.0 * (re * re + im * im).sqrt() / body.len() as f64) as f32
    }

    fn rms(x: &[f32]) -> f32 {
        let body = &x[x.len() / 8..x.len() * 7 / 8];
        (body.iter().map(|s| s * s).sum::<f32>() / body.len() as f32).sqrt()
    }

    fn db(ratio: f32) -> f32 {
        20.0 * ratio.log10()
    }

    #[test]
    fn passband_tone_keeps_amplitude_frequency_and_timing() {
        let input = sine(1000.0, 24_000, 24_000);
        let out = run(24_000, 8_000, &input, 480);
        let amp = tone_amplitude(&out, 1000.0, 8_000);
        assert!(db(amp / 0.5).abs() < 1.0, "1 kHz gain {} dB", db(amp / 0.5));
        // All the energy sits at 1 kHz: nothing left after removing that tone.
        // The delay is trimmed, so the output matches the ideal tone sample for sample.
        let ideal = sine(1000.0, 8_000, out.len());
        let body = out.len() / 8..out.len() * 7 / 8;
        let worst = body
            .map(|i| (out[i] - ideal[i]).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 0.01, "deviation from the ideal 1 kHz tone: {worst}");
    }

    #[test]
    fn out_of_band_tone_is_filtered_not_aliased() {
        // 6 kHz cannot exist at 8 kHz; naive decimation would fold it to 2 kHz.
        let input = sine(6000.0, 24_000, 24_000);
        let out = run(24_000, 8_000, &input, 480);
        let level = db(rms(&out) / (0.5 / 2f32.sqrt()));
        assert!(level < -40.0, "6 kHz leaked at {level} dB");
        let alias = db(tone_amplitude(&out, 2000.0, 8_000) / 0.5);
        assert!(alias < -40.0, "2 kHz alias at {alias} dB");
    }

    #[test]
    fn lengths_after_flush_match_the_ratio() {
        for (from, to, len) in [
            (8_000, 16_000, 8_000),
            (24_000, 16_000, 24_001),
            (16_000, 24_000, 1_234),
            (16_000, 8_000, 5),
            (44_100, 16_000, 44_100),
            (16_000, 24_000, 0),
        ] {
            let out = run(from, to, &vec![0.1; len], 333);
            let expected = (len as f64 * f64::from(to) / f64::from(from)).round() as usize;
            assert_eq!(out.len(), expected, "{from}->{to} of {len}");
        }
    }

    #[test]
    fn chunking_does_not_change_the_output() {
        for (from, to) in [
            (24_000, 8_000),
            (8_000, 16_000),
            (16_000, 24_000),
            (44_100, 16_000),
        ] {
            let input: Vec<f32> = (0..from as usize / 2)
                .map(|i| ((i as f32 * 0.013).sin() + (i as f32 * 0.31).cos()) * 0.3)
                .collect();
            let whole = run(from, to, &input, input.len());
            let mut r = StreamResampler::new(from, to).unwrap();
            let mut pieces = Vec::new();
            let mut offset = 0;
            for &size in [1usize, 37, 160, 333].iter().cycle() {
                if offset >= input.len() {
                    break;
                }
                let end = (offset + size).min(input.len());
                pieces.extend(r.process(&input[offset..end]));
                offset = end;
            }
            pieces.extend(r.flush());
            assert_eq!(pieces, whole, "{from}->{to}");
        }
    }

    #[test]
    fn flush_restarts_the_stream() {
        let input = sine(440.0, 16_000, 4_000);
        let mut r = StreamResampler::new(16_000, 24_000).unwrap();
        let mut first = r.process(&input);
        first.extend(r.flush());
        let mut second = r.process(&input);
        second.extend(r.flush());
        assert_eq!(first, second);
        assert!(r.flush().is_empty());
    }

    #[test]
    fn upsampling_keeps_a_tone_clean() {
        for quality in [Quality::Playback, Quality::Analysis] {
            let input = sine(3000.0, 8_000, 8_000);
            let out = run_at(8_000, 16_000, &input, 160, quality);
            assert_eq!(out.len(), 16_000);
            let amp = tone_amplitude(&out, 3000.0, 16_000);
            assert!(
                db(amp / 0.5).abs() < 1.0,
                "{quality:?}: 3 kHz gain {} dB",
                db(amp / 0.5)
            );
            // No image at 8 kHz - 3 kHz = 5 kHz.
            let image = db(tone_amplitude(&out, 5000.0, 16_000) / 0.5);
            assert!(image < -40.0, "{quality:?}: 5 kHz image at {image} dB");
        }
    }

    #[test]
    fn analysis_quality_filters_out_of_band_tones_and_keeps_speech() {
        // Caller audio at 24 kHz (the Realtime API's rate) down to the VAD's 16 kHz:
        // speech frequencies kept, a 10 kHz tone (would fold to 6 kHz) removed.
        let out = run_at(
            24_000,
            16_000,
            &sine(1000.0, 24_000, 24_000),
            480,
            Quality::Analysis,
        );
        let ideal = sine(1000.0, 16_000, out.len());
        let body = out.len() / 8..out.len() * 7 / 8;
        let worst = body
            .map(|i| (out[i] - ideal[i]).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 0.01, "deviation from the ideal 1 kHz tone: {worst}");
        let out = run_at(
            24_000,
            16_000,
            &sine(10_000.0, 24_000, 24_000),
            480,
            Quality::Analysis,
        );
        let level = db(rms(&out) / (0.5 / 2f32.sqrt()));
        assert!(level < -40.0, "10 kHz leaked at {level} dB");
        // And the look-ahead is shorter than playback's.
        let a = StreamResampler::with_quality(8_000, 16_000, Quality::Analysis).unwrap();
        let p = StreamResampler::new(8_000, 16_000).unwrap();
        assert!(
            a.latency_samples() + 64 <= p.latency_samples(),
            "{} vs {}",
            a.latency_samples(),
            p.latency_samples()
        );
    }

    #[test]
    fn output_arrives_within_the_stated_latency() {
        for (from, to) in [
            (24_000, 8_000),
            (8_000, 16_000),
            (16_000, 24_000),
            (48_000, 16_000),
            (11_025, 16_000),
        ] {
            for quality in [Quality::Playback, Quality::Analysis] {
                let mut r = StreamResampler::with_quality(from, to, quality).unwrap();
                let latency = r.latency_samples();
                let mut produced = 0usize;
                let mut worst = 0usize;
                // Feed one sample at a time and note how late each output instant appears.
                for fed in 1..=from as usize / 4 {
                    produced += r.process(&[0.0]).len();
                    // Input instants already covered by output: produced * from / to.
                    let covered = produced * from as usize / to as usize;
                    worst = worst.max(fed.saturating_sub(covered));
                }
                assert!(worst <= latency, "{from}->{to}: {worst} > {latency}");
                assert!(
                    worst + 16 >= latency,
                    "{from}->{to}: {worst} much below {latency}"
                );
            }
        }
    }

    #[test]
    fn equal_rates_pass_through_and_bad_rates_are_rejected() {
        let mut r = StreamResampler::new(16_000, 16_000).unwrap();
        assert_eq!(r.process(&[0.1, 0.2]), vec![0.1, 0.2]);
        assert!(r.flush().is_empty());
        assert_eq!(r.latency_samples(), 0);
        assert_eq!((r.from_hz(), r.to_hz()), (16_000, 16_000));
        assert!(matches!(
            StreamResampler::new(0, 16_000),
            Err(AudioError::UnsupportedRate(0))
        ));
        assert!(StreamResampler::new(16_000, 10_000_000).is_err());
    }
}
