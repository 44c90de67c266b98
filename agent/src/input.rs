//! The caller's audio on its way in: decode, resample to 16 kHz, detect speech,
//! and keep the samples of the turn in progress.

use std::time::Instant;

use parley_audio::codec::AudioDecoder;
use parley_audio::format::AudioFormat;
use parley_audio::resample::{Quality, StreamResampler};
use parley_audio::vad::{TurnDetector, TurnEvent, TurnSettings};
use parley_audio::AudioError;

/// The sample rate speech-to-text and the VAD work at.
pub const ASR_RATE: u32 = 16_000;
const SAMPLES_PER_MS: u64 = (ASR_RATE / 1000) as u64;
/// Audio kept after the VAD's end of speech: Whisper hears the last word better
/// with some silence after it (measured: "of France" became "and friends" at 150 ms).
const END_MARGIN_MS: u64 = 400;

/// Silence after speech at which the turn is probably over and its transcription may
/// start early, before the VAD's `silence_duration_ms` confirms it (earshot's score
/// trails speech by about 100 ms, so this is about a quarter second of real silence).
pub const EARLY_PAUSE_MS: u64 = 160;

/// What happened to the input after a chunk was pushed.
#[derive(Debug, Clone, PartialEq)]
pub enum InputEvent {
    /// Speech began at this stream position.
    SpeechStarted { at_ms: u64 },
    /// Speech ended; `samples` is the turn (with prefix padding) to transcribe,
    /// `ended_at` the wall-clock time the last speech sample arrived.
    SpeechStopped { at_ms: u64, samples: Vec<f32>, ended_at: Instant },
    /// The caller has been silent for [`EARLY_PAUSE_MS`] after speech that ended at
    /// `at_ms`: the turn will probably stop there. `samples` is the turn as a stop now
    /// would cut it (the missing end margin filled with silence), to transcribe early.
    /// If the stop later carries the same `at_ms`, nobody spoke in between and the
    /// early transcript is the turn's.
    SpeechPaused { at_ms: u64, samples: Vec<f32> },
    /// The buffer hit its limit without a commit and was cut.
    Overflow,
}

/// Input audio state of one call.
pub struct InputAudio {
    /// The call's one decoder: Opus packets decode only in order, through one state.
    decoder: AudioDecoder,
    resampler: StreamResampler,
    detector: Option<TurnDetector>,
    prefix_padding_ms: u64,
    max_buffer_ms: u64,
    /// 16 kHz samples kept since the last commit (or the padding before speech):
    /// `buffer[head..]`. What is dropped from the front is only skipped by `head`
    /// until it is most of the vector, so dropping costs no copy per packet.
    buffer: Vec<f32>,
    head: usize,
    /// Stream position (in 16 kHz samples) of the first kept sample.
    buffer_start: u64,
    /// Total 16 kHz samples pushed since the call began.
    total: u64,
    /// When the newest samples arrived.
    last_arrival: Instant,
    /// The speech end (ms) the last `SpeechPaused` was reported for.
    paused_at: Option<u64>,
}

impl InputAudio {
    /// Input state for `format`, with server VAD when `vad` is given.
    pub fn new(format: AudioFormat, vad: Option<TurnSettings>, max_buffer_ms: u32) -> Result<Self, AudioError> {
        let prefix_padding_ms = vad.as_ref().map_or(0, |v| u64::from(v.prefix_padding_ms));
        Ok(Self {
            decoder: format.decoder()?,
            resampler: StreamResampler::with_quality(format.sample_rate(), ASR_RATE, Quality::Analysis)?,
            detector: vad.map(TurnDetector::new),
            prefix_padding_ms,
            max_buffer_ms: u64::from(max_buffer_ms),
            buffer: Vec::new(),
            head: 0,
            buffer_start: 0,
            total: 0,
            last_arrival: Instant::now(),
            paused_at: None,
        })
    }

    /// Applies new settings; keeps the stream position, restarts the detector, and
    /// the decoder and resampler if the format changed (a new Opus stream starts
    /// with a fresh decoder; the same format keeps its decoder's state).
    pub fn reconfigure(&mut self, format: AudioFormat, vad: Option<TurnSettings>, max_buffer_ms: u32) -> Result<(), AudioError> {
        if format != self.decoder.format() {
            let resampler = StreamResampler::with_quality(format.sample_rate(), ASR_RATE, Quality::Analysis)?;
            self.decoder = format.decoder()?;
            self.resampler = resampler;
        }
        self.prefix_padding_ms = vad.as_ref().map_or(0, |v| u64::from(v.prefix_padding_ms));
        match (&mut self.detector, vad) {
            (Some(d), Some(v)) => d.set_settings(v),
            (slot, v) => *slot = v.map(TurnDetector::new),
        }
        self.max_buffer_ms = u64::from(max_buffer_ms);
        Ok(())
    }

    /// Stream time (ms) where the VAD last heard speech, with server VAD.
    pub fn last_speech_end_ms(&self) -> Option<u64> {
        self.detector.as_ref().map(TurnDetector::last_speech_end_ms)
    }

    /// True while the VAD hears speech.
    pub fn in_speech(&self) -> bool {
        self.detector.as_ref().is_some_and(TurnDetector::in_speech)
    }

    /// Decodes and processes one chunk of wire audio (for Opus, exactly one packet).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<InputEvent>, AudioError> {
        let decoded = self.decoder.decode(bytes)?;
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
                TurnEvent::SpeechStopped { at_ms } => out.push(self.stopped(at_ms, arrived)),
            }
        }
        if let Some(paused) = self.early_pause() {
            out.push(paused);
        }
        if self.detector.is_some() && !self.in_speech() {
            self.trim_to_padding();
        } else if self.kept().len() as u64 > self.max_buffer_ms * SAMPLES_PER_MS {
            self.clear();
            out.push(InputEvent::Overflow);
        }
        Ok(out)
    }

    /// The turn that ended at `at_ms` (stream ms), cut from the buffer: up to
    /// [`END_MARGIN_MS`] past its end, as much of it as has arrived.
    fn stopped(&mut self, at_ms: u64, arrived: Instant) -> InputEvent {
        let end = (at_ms * SAMPLES_PER_MS).min(self.total);
        // A little audio past the detected end keeps trailing consonants
        // (the VAD's score falls before a final "s" or "f" does).
        let cut = (end + END_MARGIN_MS * SAMPLES_PER_MS).min(self.total);
        let to = usize::try_from(cut.saturating_sub(self.buffer_start)).unwrap_or(usize::MAX).min(self.kept().len());
        let turn = self.kept()[..to].to_vec();
        self.drop_front(to);
        // When the last speech sample arrived, assuming real-time input: the
        // samples pushed after it took their own duration to arrive.
        let behind_ms = self.total.saturating_sub(end) as f64 / SAMPLES_PER_MS as f64;
        let ended_at = arrived.checked_sub(std::time::Duration::from_secs_f64(behind_ms / 1000.0)).unwrap_or(arrived);
        InputEvent::SpeechStopped { at_ms, samples: turn, ended_at }
    }

    /// Ends the turn now if it is still open, the caller has said nothing since the
    /// speech that ended at `at_ms`, and has been silent for at least `min_silence_ms`
    /// (VAD time): the `SpeechStopped` the silence window would give later, with the
    /// same `at_ms`. See [`TurnDetector::end_turn`].
    pub fn end_turn(&mut self, at_ms: u64, min_silence_ms: u64) -> Option<InputEvent> {
        let d = self.detector.as_mut()?;
        if !d.in_speech() || d.last_speech_end_ms() != at_ms || d.silence_ms() < min_silence_ms {
            return None;
        }
        let TurnEvent::SpeechStopped { at_ms } = d.end_turn()? else { return None };
        Some(self.stopped(at_ms, self.last_arrival))
    }

    /// A `SpeechPaused` when the caller has just been silent for [`EARLY_PAUSE_MS`]
    /// mid-turn (once per end of speech), if the stop is further away than that.
    fn early_pause(&mut self) -> Option<InputEvent> {
        let d = self.detector.as_ref()?;
        let silence_ms = u64::from(d.settings().silence_duration_ms);
        if !d.in_speech() || d.silence_ms() < EARLY_PAUSE_MS || silence_ms <= EARLY_PAUSE_MS + 100 {
            return None;
        }
        let at_ms = d.last_speech_end_ms();
        if self.paused_at == Some(at_ms) {
            return None;
        }
        self.paused_at = Some(at_ms);
        let end = (at_ms * SAMPLES_PER_MS).min(self.total);
        let cut = end + END_MARGIN_MS * SAMPLES_PER_MS;
        let have = usize::try_from(cut.min(self.total).saturating_sub(self.buffer_start)).unwrap_or(usize::MAX).min(self.kept().len());
        let mut samples = self.kept()[..have].to_vec();
        // The margin not heard yet is (near) silence by definition: pad with zeros.
        samples.resize(usize::try_from(cut.saturating_sub(self.buffer_start)).unwrap_or(have).max(have), 0.0);
        Some(InputEvent::SpeechPaused { at_ms, samples })
    }

    /// Outside speech only the prefix padding is worth keeping.
    fn trim_to_padding(&mut self) {
        let keep = (self.prefix_padding_ms * SAMPLES_PER_MS) as usize;
        if self.kept().len() > keep {
            self.drop_front(self.kept().len() - keep);
        }
    }

    /// The samples kept.
    fn kept(&self) -> &[f32] {
        &self.buffer[self.head..]
    }

    /// Forgets the first `n` kept samples; the vector is compacted only once the
    /// skipped part is at least as long as the rest (amortized: no copy per packet).
    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.kept().len());
        self.head += n;
        self.buffer_start += n as u64;
        if self.head >= self.buffer.len() - self.head {
            self.buffer.drain(..self.head);
            self.head = 0;
        }
    }

    /// Takes everything buffered (a manual commit).
    pub fn take(&mut self) -> Vec<f32> {
        self.buffer_start = self.total;
        if let Some(d) = &mut self.detector {
            d.reset();
        }
        let mut all = std::mem::take(&mut self.buffer);
        all.drain(..std::mem::take(&mut self.head));
        all
    }

    /// Drops everything buffered.
    pub fn clear(&mut self) {
        let _ = self.take();
    }

    /// The turn in progress so far (with its prefix padding), for a partial transcript.
    pub fn current(&self) -> Vec<f32> {
        self.kept().to_vec()
    }

    /// The last `ms` of buffered input and when its last sample arrived.
    pub fn recent(&self, ms: u64) -> (&[f32], Instant) {
        let kept = self.kept();
        let n = ((ms * SAMPLES_PER_MS) as usize).min(kept.len());
        (&kept[kept.len() - n..], self.last_arrival)
    }

    /// Milliseconds of audio waiting for a commit.
    pub fn buffered_ms(&self) -> u64 {
        self.kept().len() as u64 / SAMPLES_PER_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_speech() -> Vec<f32> {
        let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../audio/tests/fixtures/speech16k.wav");
        let (samples, _) = parley_audio::wav::read_wav(&path).expect("fixture");
        samples[14_400..46_400].to_vec()
    }

    #[test]
    fn a_pause_comes_before_the_stop_with_the_same_end_and_the_turns_audio() {
        let vad = TurnSettings::default();
        let mut input = InputAudio::new(AudioFormat::Pcm16 { rate: 16_000 }, Some(vad), 60_000).expect("input");
        let mut audio = fixture_speech();
        audio.extend(vec![0.0; 16 * 1500]);
        let mut events = Vec::new();
        for chunk in audio.chunks(320) {
            events.extend(input.push(&parley_audio::pcm::encode_pcm16le(chunk)).expect("push"));
        }
        let paused: Vec<_> = events.iter().filter_map(|e| match e { InputEvent::SpeechPaused { at_ms, samples } => Some((*at_ms, samples.len())), _ => None }).collect();
        let stopped: Vec<_> = events.iter().filter_map(|e| match e { InputEvent::SpeechStopped { at_ms, samples, .. } => Some((*at_ms, samples.len())), _ => None }).collect();
        assert_eq!(stopped.len(), 1, "{events:?}");
        let (stop_at, stop_len) = stopped[0];
        // The last pause before the stop covers the same end of speech and the same audio.
        let Some(&(pause_at, pause_len)) = paused.last() else { panic!("no pause before the stop") };
        assert_eq!(pause_at, stop_at);
        assert_eq!(pause_len, stop_len, "the early turn is cut (and padded) like the stop's");
        let pause_index = events.iter().position(|e| matches!(e, InputEvent::SpeechPaused { at_ms, .. } if *at_ms == stop_at));
        let stop_index = events.iter().position(|e| matches!(e, InputEvent::SpeechStopped { .. }));
        assert!(pause_index < stop_index, "the pause is reported first");
    }

    #[test]
    fn a_turn_ended_at_its_pause_is_cut_like_the_stop_and_stops_once() {
        let vad = TurnSettings::default();
        let mut input = InputAudio::new(AudioFormat::Pcm16 { rate: 16_000 }, Some(vad), 60_000).expect("input");
        let mut audio = fixture_speech();
        audio.extend(vec![0.0; 16 * 1500]);
        let mut ended = None;
        let mut later = Vec::new();
        for chunk in audio.chunks(320) {
            for event in input.push(&parley_audio::pcm::encode_pcm16le(chunk)).expect("push") {
                match event {
                    InputEvent::SpeechPaused { at_ms, .. } => {
                        // Not yet: too little silence; then it ends.
                        assert!(input.end_turn(at_ms, 10_000).is_none());
                        assert!(input.end_turn(at_ms + 16, 0).is_none(), "another end of speech");
                        ended = input.end_turn(at_ms, EARLY_PAUSE_MS);
                        assert!(!input.in_speech());
                    }
                    other if ended.is_some() => later.push(other),
                    _ => {}
                }
            }
        }
        let Some(InputEvent::SpeechStopped { samples, .. }) = ended else { panic!("not ended: {ended:?}") };
        assert!(samples.len() >= fixture_speech().len() - 16 * 100, "the turn's audio: {} samples", samples.len());
        assert!(later.is_empty(), "the window brings no second stop: {later:?}");
    }
}
