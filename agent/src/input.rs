//! The caller's audio on its way in: decode, resample to 16 kHz, detect speech,
//! and keep the samples of the turn in progress.

use std::time::Instant;

use parley_audio::format::AudioFormat;
use parley_audio::resample::StreamResampler;
use parley_audio::vad::{TurnDetector, TurnEvent, TurnSettings};
use parley_audio::AudioError;

/// The sample rate speech-to-text and the VAD work at.
pub const ASR_RATE: u32 = 16_000;
const SAMPLES_PER_MS: u64 = (ASR_RATE / 1000) as u64;
/// Audio kept after the VAD's end of speech: Whisper hears the last word better
/// with some silence after it (measured: "of France" became "and friends" at 150 ms).
const END_MARGIN_MS: u64 = 400;

/// What happened to the input after a chunk was pushed.
#[derive(Debug, Clone, PartialEq)]
pub enum InputEvent {
    /// Speech began at this stream position.
    SpeechStarted { at_ms: u64 },
    /// Speech ended; `samples` is the turn (with prefix padding) to transcribe,
    /// `ended_at` the wall-clock time the last speech sample arrived.
    SpeechStopped { at_ms: u64, samples: Vec<f32>, ended_at: Instant },
    /// The buffer hit its limit without a commit and was cut.
    Overflow,
}

/// Input audio state of one call.
pub struct InputAudio {
    format: AudioFormat,
    resampler: StreamResampler,
    detector: Option<TurnDetector>,
    prefix_padding_ms: u64,
    max_buffer_ms: u64,
    /// 16 kHz samples kept since the last commit (or the padding before speech).
    buffer: Vec<f32>,
    /// Stream position (in 16 kHz samples) of `buffer[0]`.
    buffer_start: u64,
    /// Total 16 kHz samples pushed since the call began.
    total: u64,
    /// When the newest samples arrived.
    last_arrival: Instant,
}

impl InputAudio {
    /// Input state for `format`, with server VAD when `vad` is given.
    pub fn new(format: AudioFormat, vad: Option<TurnSettings>, max_buffer_ms: u32) -> Result<Self, AudioError> {
        let prefix_padding_ms = vad.as_ref().map_or(0, |v| u64::from(v.prefix_padding_ms));
        Ok(Self {
            format,
            resampler: StreamResampler::new(format.sample_rate(), ASR_RATE)?,
            detector: vad.map(TurnDetector::new),
            prefix_padding_ms,
            max_buffer_ms: u64::from(max_buffer_ms),
            buffer: Vec::new(),
            buffer_start: 0,
            total: 0,
            last_arrival: Instant::now(),
        })
    }

    /// Applies new settings; keeps the stream position, restarts the detector and
    /// the resampler if the format changed.
    pub fn reconfigure(&mut self, format: AudioFormat, vad: Option<TurnSettings>, max_buffer_ms: u32) -> Result<(), AudioError> {
        if format != self.format {
            self.resampler = StreamResampler::new(format.sample_rate(), ASR_RATE)?;
            self.format = format;
        }
        self.prefix_padding_ms = vad.as_ref().map_or(0, |v| u64::from(v.prefix_padding_ms));
        match (&mut self.detector, vad) {
            (Some(d), Some(v)) => d.set_settings(v),
            (slot, v) => *slot = v.map(TurnDetector::new),
        }
        self.max_buffer_ms = u64::from(max_buffer_ms);
        Ok(())
    }

    /// True while the VAD hears speech.
    pub fn in_speech(&self) -> bool {
        self.detector.as_ref().is_some_and(TurnDetector::in_speech)
    }

    /// Decodes and processes one chunk of wire audio.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<InputEvent>, AudioError> {
        let decoded = self.format.decode(bytes)?;
        let samples = self.resampler.process(&decoded);
        let arrived = Instant::now();
        self.last_arrival = arrived;
        self.total += samples.len() as u64;
        self.buffer.extend_from_slice(&samples);

        let mut out = Vec::new();
        let events = match &mut self.detector {
            Some(d) => d.push(&samples),
            None => Vec::new(),
        };
        for event in events {
            match event {
                TurnEvent::SpeechStarted { at_ms } => out.push(InputEvent::SpeechStarted { at_ms }),
                TurnEvent::SpeechStopped { at_ms } => {
                    let end = (at_ms * SAMPLES_PER_MS).min(self.total);
                    // A little audio past the detected end keeps trailing consonants
                    // (the VAD's score falls before a final "s" or "f" does).
                    let cut = (end + END_MARGIN_MS * SAMPLES_PER_MS).min(self.total);
                    let to = usize::try_from(cut.saturating_sub(self.buffer_start)).unwrap_or(usize::MAX).min(self.buffer.len());
                    let turn: Vec<f32> = self.buffer.drain(..to).collect();
                    self.buffer_start += to as u64;
                    // When the last speech sample arrived, assuming real-time input: the
                    // samples pushed after it took their own duration to arrive.
                    let behind_ms = self.total.saturating_sub(end) as f64 / SAMPLES_PER_MS as f64;
                    let ended_at = arrived.checked_sub(std::time::Duration::from_secs_f64(behind_ms / 1000.0)).unwrap_or(arrived);
                    out.push(InputEvent::SpeechStopped { at_ms, samples: turn, ended_at });
                }
            }
        }
        if self.detector.is_some() && !self.in_speech() {
            self.trim_to_padding();
        } else if self.buffer.len() as u64 > self.max_buffer_ms * SAMPLES_PER_MS {
            self.clear();
            out.push(InputEvent::Overflow);
        }
        Ok(out)
    }

    /// Outside speech only the prefix padding is worth keeping.
    fn trim_to_padding(&mut self) {
        let keep = (self.prefix_padding_ms * SAMPLES_PER_MS) as usize;
        if self.buffer.len() > keep {
            let drop = self.buffer.len() - keep;
            self.buffer.drain(..drop);
            self.buffer_start += drop as u64;
        }
    }

    /// Takes everything buffered (a manual commit).
    pub fn take(&mut self) -> Vec<f32> {
        self.buffer_start = self.total;
        if let Some(d) = &mut self.detector {
            d.reset();
        }
        std::mem::take(&mut self.buffer)
    }

    /// Drops everything buffered.
    pub fn clear(&mut self) {
        let _ = self.take();
    }

    /// The turn in progress so far (with its prefix padding), for a partial transcript.
    pub fn current(&self) -> Vec<f32> {
        self.buffer.clone()
    }

    /// The last `ms` of buffered input and when its last sample arrived.
    pub fn recent(&self, ms: u64) -> (&[f32], Instant) {
        let n = ((ms * SAMPLES_PER_MS) as usize).min(self.buffer.len());
        (&self.buffer[self.buffer.len() - n..], self.last_arrival)
    }

    /// Milliseconds of audio waiting for a commit.
    pub fn buffered_ms(&self) -> u64 {
        self.buffer.len() as u64 / SAMPLES_PER_MS
    }
}
