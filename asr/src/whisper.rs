//! [`WhisperTranscriber`]: Whisper through whisper.cpp (whisper-rs).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

use crate::text::clean_transcript;
use crate::{AsrError, Transcriber, Transcript};

/// Input sample rate Whisper expects.
pub const SAMPLE_RATE: usize = 16_000;
/// Shortest input worth decoding; shorter audio is padded with silence up to this, as
/// whisper.cpp refuses very short input and guesses badly on a fraction of a second.
const MIN_SAMPLES: usize = SAMPLE_RATE;
/// Silence put before every utterance (200 ms).
const LEAD_IN_SAMPLES: usize = SAMPLE_RATE / 5;
/// Encoder frames per second of audio (10 ms mel hop, then a stride-2 convolution).
const ENCODER_FRAMES_PER_SECOND: usize = 50;
/// Encoder frames of (silent) context beyond the audio itself when the context is
/// fitted. Whisper was trained on 30 s windows; given too little trailing silence it
/// loops ("1, 2, 3, 4, 1, 2, 3, 4, …"). On 48 espeak-ng clips of 1.2–4.3 s, 128 frames
/// looped on 2, 160 and more matched the full window's word error rate; 256 leaves
/// room for real voices.
const AUDIO_CTX_MARGIN: usize = 256;
/// Cap on tokens decoded per second of audio (text and timestamp tokens), so a
/// decoder stuck repeating itself stops early instead of filling its 224-token budget.
const MAX_TOKENS_PER_SECOND: usize = 10;
/// Tokens always allowed, on top of [`MAX_TOKENS_PER_SECOND`].
const MIN_MAX_TOKENS: usize = 16;
/// Longest prompt, in tokens: Whisper reads at most half its 448-token text context
/// as previous text.
const MAX_PROMPT_TOKENS: usize = 200;
/// A phrase said this many times in a row is taken for a decoding loop.
const LOOP_REPEATS: usize = 3;

/// How [`WhisperTranscriber`] runs the model.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperOptions {
    /// CPU threads per transcription.
    pub threads: usize,
    /// Spoken language (ISO 639-1, such as `en`); ignored by English-only models.
    pub language: String,
    /// Decoder states kept ready for reuse: about the number of transcriptions
    /// expected to run at once. More concurrent calls still work; their extra states
    /// are created on demand and dropped afterwards.
    pub pool_size: usize,
    /// Shrink the encoder's context to the audio's length (plus a margin) instead of
    /// always encoding a 30 s window: several times faster on short utterances.
    pub fit_audio_ctx: bool,
    /// Text the decoder reads as if it had just been said before each utterance
    /// (whisper.cpp's initial prompt): the words a deployment expects ("member ID",
    /// "prescription R X 1001", drug names) are then heard as such instead of as the
    /// nearest common words. Empty: none.
    pub prompt: String,
}

impl Default for WhisperOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            language: "en".into(),
            pool_size: 2,
            fit_audio_ctx: true,
            prompt: String::new(),
        }
    }
}

/// Whisper, loaded once and shared by every call.
///
/// The model weights live in one whisper.cpp context; each transcription borrows a
/// decoder state (KV caches and scratch buffers, about 20 MB for tiny.en) from a
/// small pool, so concurrent transcriptions run in parallel without reloading anything.
///
/// ```no_run
/// use parley_asr::{Transcriber, WhisperOptions, WhisperTranscriber};
/// let asr = WhisperTranscriber::load("ggml-tiny.en.bin".as_ref(), WhisperOptions::default())?;
/// let heard = asr.transcribe(&vec![0.0; 16_000])?;
/// println!("{}", heard.text);
/// # Ok::<(), parley_asr::AsrError>(())
/// ```
pub struct WhisperTranscriber {
    ctx: WhisperContext,
    states: Mutex<Vec<WhisperState>>,
    options: WhisperOptions,
    model_audio_ctx: usize,
    /// [`WhisperOptions::prompt`], tokenized.
    prompt_tokens: Vec<std::ffi::c_int>,
}

impl std::fmt::Debug for WhisperTranscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperTranscriber")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl WhisperTranscriber {
    /// Loads a ggml Whisper model (as written by [`crate::convert::ct2_to_ggml`]) and
    /// prepares `options.pool_size` decoder states.
    pub fn load(model: &Path, options: WhisperOptions) -> Result<Self, AsrError> {
        route_whisper_logs();
        let fail = |reason: String| AsrError::Load {
            path: model.to_path_buf(),
            reason,
        };
        if !model.is_file() {
            return Err(fail("no such file".into()));
        }
        let started = Instant::now();
        let ctx = WhisperContext::new_with_params(model, WhisperContextParameters::default())
            .map_err(|e| fail(format!("whisper.cpp rejected it ({e})")))?;
        let model_audio_ctx = usize::try_from(ctx.model_n_audio_ctx()).unwrap_or(0);
        let prompt_tokens = if options.prompt.trim().is_empty() {
            Vec::new()
        } else {
            let tokens = ctx
                .tokenize(options.prompt.trim(), MAX_PROMPT_TOKENS)
                .map_err(|e| fail(format!("cannot tokenize the speech-to-text prompt ({e}); it may hold at most {MAX_PROMPT_TOKENS} tokens")))?;
            tokens.into_iter().map(|t| t as std::ffi::c_int).collect()
        };
        let states = (0..options.pool_size.max(1))
            .map(|_| ctx.create_state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("cannot allocate decoder state ({e})")))?;
        tracing::info!(
            model = %model.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            states = states.len(),
            "whisper model loaded"
        );
        Ok(Self {
            ctx,
            states: Mutex::new(states),
            options,
            model_audio_ctx,
            prompt_tokens,
        })
    }

    /// The options this transcriber was loaded with.
    pub fn options(&self) -> &WhisperOptions {
        &self.options
    }

    /// Takes a decoder state from the pool, or makes one when all are in use.
    fn checkout(&self) -> Result<PooledState<'_>, AsrError> {
        let pooled = self.states.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let state = match pooled {
            Some(state) => state,
            None => self
                .ctx
                .create_state()
                .map_err(|e| AsrError::Decode(format!("cannot allocate decoder state ({e})")))?,
        };
        Ok(PooledState {
            owner: self,
            state: Some(state),
        })
    }

    /// Decoding settings for `samples` of audio; `fit` shrinks the encoder context.
    ///
    /// Greedy, one segment, no temperature fallback (a fallback re-decodes up to five
    /// times, seconds of latency for a voice turn). Timestamp tokens stay on although
    /// they are not returned: they let the decoder end where the audio ends, and with a
    /// fitted context it loops far more often without them.
    fn params(&self, samples: usize, fit: bool, stop: Option<&Arc<AtomicBool>>) -> FullParams<'_, '_> {
        let mut p = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        p.set_n_threads(i32::try_from(self.options.threads.max(1)).unwrap_or(1));
        p.set_language(Some(&self.options.language));
        p.set_translate(false);
        p.set_no_context(true);
        p.set_no_timestamps(false);
        p.set_single_segment(true);
        p.set_suppress_blank(true);
        p.set_suppress_nst(true);
        p.set_temperature_inc(0.0);
        p.set_print_special(false);
        p.set_print_progress(false);
        p.set_print_realtime(false);
        p.set_print_timestamps(false);
        p.set_max_tokens(i32::try_from(max_tokens_for(samples)).unwrap_or(0));
        if !self.prompt_tokens.is_empty() {
            // Tokens made once at load and borrowed: whisper-rs's
            // `set_initial_prompt` leaks a C string every call.
            p.set_tokens(&self.prompt_tokens);
        }
        if let Some(stop) = stop {
            // whisper.cpp polls this during the encoder's graph and between decoder
            // steps, and gives up once it is set. (Not `set_abort_callback_safe`: in
            // whisper-rs 0.16 its trampoline reads the boxed closure as the wrong type.)
            // SAFETY: the callback only reads an AtomicBool; the pointer is to the one
            // inside `stop`, which the caller holds for the whole decode (`decode`
            // borrows it across `full`).
            unsafe {
                p.set_abort_callback(Some(stop_requested));
                p.set_abort_callback_user_data(Arc::as_ptr(stop).cast_mut().cast());
            }
        }
        if fit {
            let ctx = audio_ctx_for(samples, self.model_audio_ctx);
            p.set_audio_ctx(i32::try_from(ctx).unwrap_or(0));
        }
        p
    }

    /// Runs one decode; returns the raw text and the number of tokens decoded.
    fn decode(
        &self,
        state: &mut WhisperState,
        audio: &[f32],
        fit: bool,
        stop: Option<&Arc<AtomicBool>>,
    ) -> Result<(String, usize), AsrError> {
        let result = state.full(self.params(audio.len(), fit, stop), audio);
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(AsrError::Decode("the decode was stopped: its call ended".into()));
        }
        result.map_err(|e| AsrError::Decode(e.to_string()))?;
        let (mut raw, mut tokens) = (String::new(), 0);
        for segment in state.as_iter() {
            raw.push_str(
                &segment
                    .to_str_lossy()
                    .map_err(|e| AsrError::Decode(e.to_string()))?,
            );
            tokens += usize::try_from(segment.n_tokens()).unwrap_or(0);
        }
        Ok((raw, tokens))
    }
}

/// whisper.cpp's abort callback: `data` is the stop flag of the decode.
unsafe extern "C" fn stop_requested(data: *mut std::ffi::c_void) -> bool {
    // SAFETY: see `params`: `data` points to a live AtomicBool for the whole decode.
    unsafe { (*(data as *const AtomicBool)).load(Ordering::Relaxed) }
}

/// Encoder context (in frames) that covers `samples` of audio plus a margin, capped at
/// the model's full window.
fn audio_ctx_for(samples: usize, model_audio_ctx: usize) -> usize {
    let frames = (samples * ENCODER_FRAMES_PER_SECOND).div_ceil(SAMPLE_RATE);
    (frames + AUDIO_CTX_MARGIN).min(model_audio_ctx)
}

/// Token budget for `samples` of audio.
fn max_tokens_for(samples: usize) -> usize {
    MIN_MAX_TOKENS + MAX_TOKENS_PER_SECOND * samples.div_ceil(SAMPLE_RATE)
}

/// Whether `text` holds a phrase of two or more words said [`LOOP_REPEATS`] times in a
/// row: the signature of a decoder loop rather than of speech.
fn looks_like_a_loop(text: &str) -> bool {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let n = words.len();
    (2..=n / LOOP_REPEATS).any(|len| {
        (0..=n - LOOP_REPEATS * len).any(|start| {
            let phrase = &words[start..start + len];
            (1..LOOP_REPEATS).all(|k| &words[start + k * len..start + (k + 1) * len] == phrase)
        })
    })
}

impl Transcriber for WhisperTranscriber {
    fn transcribe(&self, samples_16k: &[f32]) -> Result<Transcript, AsrError> {
        self.run(samples_16k, None)
    }

    fn transcribe_until(&self, samples_16k: &[f32], stop: &Arc<AtomicBool>) -> Result<Transcript, AsrError> {
        self.run(samples_16k, Some(stop))
    }
}

impl WhisperTranscriber {
    /// One transcription, stopped early when `stop` is set.
    fn run(&self, samples_16k: &[f32], stop: Option<&Arc<AtomicBool>>) -> Result<Transcript, AsrError> {
        if samples_16k.is_empty() {
            return Ok(Transcript::default());
        }
        // Silence before the first word: tiny.en mishears it without (measured:
        // "Tell me the capital of France" became "...and friends" with no lead-in, and
        // was right with 100 ms or more). Then pad short input up to MIN_SAMPLES.
        let mut padded = vec![0.0; LEAD_IN_SAMPLES];
        padded.extend_from_slice(samples_16k);
        if padded.len() < MIN_SAMPLES {
            padded.resize(MIN_SAMPLES, 0.0);
        }
        let audio = &padded[..];
        let started = Instant::now();
        let mut pooled = self.checkout()?;
        let state = pooled
            .state
            .as_mut()
            .ok_or_else(|| AsrError::Decode("no decoder state".into()))?;
        let fit = self.options.fit_audio_ctx
            && audio_ctx_for(audio.len(), self.model_audio_ctx) < self.model_audio_ctx;
        let _stopping = StopWatch::set(stop);
        let (mut raw, tokens) = self.decode(state, audio, fit, stop)?;
        if fit && (tokens >= max_tokens_for(audio.len()) || looks_like_a_loop(&raw)) {
            // The shortened window made the decoder loop: pay for the full window once.
            // Length only: a transcript is the caller's words (see parley_agent::redact).
            tracing::debug!(chars = raw.len(), "fitted audio context looped; retrying with the full window");
            raw = self.decode(state, audio, false, stop)?.0;
        }
        drop(pooled);
        let text = clean_transcript(&raw);
        tracing::debug!(
            audio_ms = (samples_16k.len() * 1000 / SAMPLE_RATE) as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            chars = text.len(),
            "transcribed"
        );
        Ok(Transcript { text })
    }
}

/// A decoder state on loan; it goes back to the pool (if the pool has room) when
/// dropped, including when the transcription fails or panics.
struct PooledState<'a> {
    owner: &'a WhisperTranscriber,
    state: Option<WhisperState>,
}

impl Drop for PooledState<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let mut pool = self.owner.states.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < self.owner.options.pool_size.max(1) {
                pool.push(state);
            }
        }
    }
}

thread_local! {
    /// The stop flag of the decode running on this thread, if any: whisper.cpp logs a
    /// decode it was asked to stop as an error ("failed to encode"), which it is not.
    static STOP_FLAG: std::cell::RefCell<Option<Arc<AtomicBool>>> = const { std::cell::RefCell::new(None) };
}

/// Makes a decode's stop flag visible to [`log_line`] on this thread while it runs.
struct StopWatch;

impl StopWatch {
    fn set(stop: Option<&Arc<AtomicBool>>) -> Self {
        STOP_FLAG.with(|f| *f.borrow_mut() = stop.cloned());
        Self
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        STOP_FLAG.with(|f| *f.borrow_mut() = None);
    }
}

/// True when the decode on this thread was asked to stop.
fn stop_requested_here() -> bool {
    STOP_FLAG.with(|f| f.borrow().as_ref().is_some_and(|s| s.load(Ordering::Relaxed)))
}

/// Sends whisper.cpp's and ggml's log lines to `tracing` (target `parley_asr::whisper_cpp`)
/// instead of stderr: its chatty load report at debug level, warnings and errors as such.
fn route_whisper_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the callback is a plain function that lives for the whole program
        // and ignores its (null) user data.
        unsafe {
            whisper_rs::whisper_rs_sys::whisper_log_set(Some(log_line), std::ptr::null_mut());
            whisper_rs::whisper_rs_sys::ggml_log_set(Some(log_line), std::ptr::null_mut());
        }
    });
}

unsafe extern "C" fn log_line(
    level: whisper_rs::whisper_rs_sys::ggml_log_level,
    text: *const std::ffi::c_char,
    _user_data: *mut std::ffi::c_void,
) {
    use whisper_rs::whisper_rs_sys as sys;
    if text.is_null() {
        return;
    }
    // SAFETY: whisper.cpp passes a NUL-terminated string valid for this call.
    let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim();
    if text.is_empty() || text == "." {
        return;
    }
    match level {
        sys::ggml_log_level_GGML_LOG_LEVEL_ERROR if stop_requested_here() => {
            tracing::debug!(target: "parley_asr::whisper_cpp", "stopped on request: {text}")
        }
        sys::ggml_log_level_GGML_LOG_LEVEL_ERROR => {
            tracing::error!(target: "parley_asr::whisper_cpp", "{text}")
        }
        sys::ggml_log_level_GGML_LOG_LEVEL_WARN => {
            tracing::warn!(target: "parley_asr::whisper_cpp", "{text}")
        }
        sys::ggml_log_level_GGML_LOG_LEVEL_INFO => {
            tracing::debug!(target: "parley_asr::whisper_cpp", "{text}")
        }
        _ => tracing::trace!(target: "parley_asr::whisper_cpp", "{text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_ctx_follows_length_and_caps_at_the_model_window() {
        assert_eq!(audio_ctx_for(SAMPLE_RATE, 1500), 50 + AUDIO_CTX_MARGIN);
        assert_eq!(
            audio_ctx_for(SAMPLE_RATE * 5 / 2, 1500),
            125 + AUDIO_CTX_MARGIN
        );
        assert_eq!(audio_ctx_for(SAMPLE_RATE * 60, 1500), 1500);
    }

    #[test]
    fn token_budget_grows_with_audio() {
        assert_eq!(
            max_tokens_for(SAMPLE_RATE),
            MIN_MAX_TOKENS + MAX_TOKENS_PER_SECOND
        );
        assert_eq!(
            max_tokens_for(SAMPLE_RATE * 3 - 1),
            MIN_MAX_TOKENS + 3 * MAX_TOKENS_PER_SECOND
        );
    }

    #[test]
    fn loops_are_phrases_said_three_times_in_a_row() {
        assert!(looks_like_a_loop(
            "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,"
        ));
        assert!(looks_like_a_loop("Hello. Thank you. Thank you. Thank you."));
        assert!(looks_like_a_loop(
            "Can you check it? Can you check it? Can you check it?"
        ));
        assert!(!looks_like_a_loop("1, 2, 3, 4"));
        assert!(!looks_like_a_loop("no no no"));
        assert!(!looks_like_a_loop("one two one two"));
        assert!(!looks_like_a_loop(""));
    }

    #[test]
    fn default_options() {
        let o = WhisperOptions::default();
        assert_eq!(
            (o.threads, o.language.as_str(), o.fit_audio_ctx),
            (2, "en", true)
        );
    }
}
