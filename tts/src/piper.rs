//! Piper voices: VITS models exported to ONNX, run with ONNX Runtime, fed with
//! espeak-ng IPA phonemes.
//!
//! A voice is two files, `<name>.onnx` and `<name>.onnx.json` (sample rate,
//! espeak voice, inference scales, and the phoneme → id table), plus the ONNX
//! Runtime shared library, loaded at run time so the build needs no C++ toolchain
//! and a GPU build of the runtime can be dropped in later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use serde::Deserialize;

use crate::{Synthesizer, TtsError, espeak, onnx, text};

/// The voice `parley models install` ships.
pub const DEFAULT_VOICE: &str = "en_US-joe-medium";
/// The ONNX Runtime library `parley models install` ships, under `onnxruntime/`.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Longest phoneme string sent to the model in one run. Phrases from the chunker
/// are far shorter; a caller passing a whole page gets it synthesized in pieces so
/// memory stays bounded (VITS attention grows with the square of the length).
const MAX_PHONEMES_PER_RUN: usize = 400;
/// Output quieter than this (about -46 dBFS) counts as silence when trimming.
const SILENCE_THRESHOLD: f32 = 0.005;
/// Silence kept before the first sound: enough for the attack of a plosive.
const LEAD_SILENCE_S: f32 = 0.02;
/// Silence kept after the last sound, so consecutive phrases do not run into
/// each other and a phrase never ends mid-waveform (a click at the join).
const TRAIL_SILENCE_S: f32 = 0.05;
/// Length of the fade-in and fade-out applied at the phrase edges.
const FADE_S: f32 = 0.005;

/// Where the files of a Piper voice are, as laid out by `parley models install`
/// under the models directory (`$PARLEY_MODELS_DIR`, default `~/.cache/parley/models`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoiceFiles {
    /// The VITS model, `tts/<voice>.onnx`.
    pub onnx: PathBuf,
    /// Its config, `tts/<voice>.onnx.json`.
    pub config: PathBuf,
    /// The ONNX Runtime shared library, `onnxruntime/libonnxruntime.so.1.31.1`.
    pub ort_dylib: PathBuf,
}

impl VoiceFiles {
    /// The standard layout of the default voice under `models_dir`, so the server
    /// and the installer agree on paths without repeating them.
    pub fn in_models_dir(models_dir: &Path) -> Self {
        Self::voice_in_models_dir(models_dir, DEFAULT_VOICE)
    }

    /// The standard layout of the voice named `voice` (e.g. `en_US-joe-medium`).
    pub fn voice_in_models_dir(models_dir: &Path, voice: &str) -> Self {
        let tts = models_dir.join("tts");
        Self {
            onnx: tts.join(format!("{voice}.onnx")),
            config: tts.join(format!("{voice}.onnx.json")),
            ort_dylib: models_dir.join("onnxruntime").join(ORT_LIBRARY),
        }
    }

    /// The files that do not exist, for a readiness check or an error message.
    pub fn missing(&self) -> Vec<&Path> {
        [&self.onnx, &self.config, &self.ort_dylib]
            .into_iter()
            .map(PathBuf::as_path)
            .filter(|p| !p.is_file())
            .collect()
    }
}

/// Tuning for a [`PiperVoice`]: how much CPU one voice may use.
#[derive(Debug, Clone, PartialEq)]
pub struct PiperOptions {
    /// Threads ONNX Runtime uses inside one synthesis. Default 1: on a small
    /// server ASR and the LLM need the other cores, and one thread already runs
    /// about 10× faster than real time; on a busy 2-core machine 2 threads were
    /// measured twice as slow as 1 (they fight the other work for the cores).
    pub intra_threads: usize,
    /// Sessions in the pool, i.e. how many phrases (of different calls) can be
    /// synthesized at the same time. Each holds its own copy of the weights
    /// (about 80–100 MB resident for the shipped voice). Default 1.
    pub sessions: usize,
    /// Overrides the voice's `length_scale` (speaking rate): above 1 is slower.
    pub length_scale: Option<f32>,
}

impl Default for PiperOptions {
    fn default() -> Self {
        Self {
            intra_threads: 1,
            sessions: 1,
            length_scale: None,
        }
    }
}

/// The parts of `<voice>.onnx.json` Parley uses; unknown keys are ignored because
/// the file is Piper's, not ours.
#[derive(Debug, Deserialize)]
struct VoiceConfig {
    audio: AudioConfig,
    espeak: EspeakConfig,
    inference: InferenceConfig,
    phoneme_id_map: HashMap<String, Vec<i64>>,
}

#[derive(Debug, Deserialize)]
struct AudioConfig {
    sample_rate: u32,
}

#[derive(Debug, Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Debug, Deserialize)]
struct InferenceConfig {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

/// A loaded Piper voice: text in, 22 050 Hz (for the shipped voice) mono audio out.
///
/// `synthesize` takes `&self` and may be called from many threads: each call takes
/// a session from a small pool ([`PiperOptions::sessions`]) and waits when all are
/// busy, because an ONNX Runtime session runs one inference at a time here.
pub struct PiperVoice {
    sessions: Vec<Mutex<Session>>,
    next_session: AtomicUsize,
    /// The model has a speaker-id input (multi-speaker voices); speaker 0 is used.
    has_speaker_input: bool,
    sample_rate: u32,
    espeak_voice: String,
    /// `[noise_scale, length_scale, noise_w]`, the model's `scales` input.
    scales: [f32; 3],
    phoneme_ids: HashMap<char, Vec<i64>>,
    bos: Vec<i64>,
    eos: Vec<i64>,
    pad: Vec<i64>,
}

impl std::fmt::Debug for PiperVoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiperVoice")
            .field("sessions", &self.sessions.len())
            .field("sample_rate", &self.sample_rate)
            .field("espeak_voice", &self.espeak_voice)
            .field("scales", &self.scales)
            .finish_non_exhaustive()
    }
}

impl PiperVoice {
    /// Loads a voice with [`PiperOptions::default`]. `ort_dylib` is the ONNX Runtime
    /// library; it is loaded once per process (see [`crate::onnx::environment`]).
    pub fn load(onnx: &Path, config_json: &Path, ort_dylib: &Path) -> Result<PiperVoice, TtsError> {
        Self::load_with(onnx, config_json, ort_dylib, &PiperOptions::default())
    }

    /// Loads the voice laid out in `files` (see [`VoiceFiles::in_models_dir`]).
    pub fn load_files(files: &VoiceFiles, options: &PiperOptions) -> Result<PiperVoice, TtsError> {
        Self::load_with(&files.onnx, &files.config, &files.ort_dylib, options)
    }

    /// Loads a voice with explicit tuning.
    pub fn load_with(
        onnx: &Path,
        config_json: &Path,
        ort_dylib: &Path,
        options: &PiperOptions,
    ) -> Result<PiperVoice, TtsError> {
        let started = Instant::now();
        let config = read_config(config_json)?;
        let load_err = |reason: String| TtsError::Load {
            path: onnx.to_path_buf(),
            reason,
        };
        if !onnx.is_file() {
            return Err(load_err("the voice model is missing".into()));
        }

        let mut phoneme_ids = HashMap::new();
        for (key, ids) in &config.phoneme_id_map {
            let mut chars = key.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => {
                    phoneme_ids.insert(c, ids.clone());
                }
                _ => tracing::debug!(phoneme = %key, "ignoring a multi-character phoneme key"),
            }
        }
        let special = |c: char| {
            phoneme_ids.get(&c).cloned().ok_or_else(|| TtsError::Load {
                path: config_json.to_path_buf(),
                reason: format!("phoneme_id_map has no {c:?}"),
            })
        };
        let (bos, eos, pad) = (special('^')?, special('$')?, special('_')?);

        let env = onnx::environment(ort_dylib)?;
        let count = options.sessions.max(1);
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            let session = Session::builder(&env)
                .and_then(|b| {
                    b.with_optimization_level(GraphOptimizationLevel::Level3)
                        .map_err(Into::into)
                })
                .and_then(|b| {
                    b.with_intra_threads(options.intra_threads.max(1))
                        .map_err(Into::into)
                })
                .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
                .and_then(|mut b| b.commit_from_file(onnx))
                .map_err(|e| load_err(format!("ONNX Runtime cannot load the model: {e}")))?;
            sessions.push(Mutex::new(session));
        }
        let inputs: Vec<String> = sessions
            .first()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .inputs()
                    .iter()
                    .map(|i| i.name().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        for required in ["input", "input_lengths", "scales"] {
            if !inputs.iter().any(|i| i == required) {
                return Err(load_err(format!(
                    "not a Piper model: no input {required:?} (inputs: {inputs:?})"
                )));
            }
        }
        let has_speaker_input = inputs.iter().any(|i| i == "sid");

        let inference = &config.inference;
        let voice = PiperVoice {
            sessions,
            next_session: AtomicUsize::new(0),
            has_speaker_input,
            sample_rate: config.audio.sample_rate,
            espeak_voice: config.espeak.voice,
            scales: [
                inference.noise_scale,
                options.length_scale.unwrap_or(inference.length_scale),
                inference.noise_w,
            ],
            phoneme_ids,
            bos,
            eos,
            pad,
        };
        // Fail at load, not on the first call, if espeak-ng or its voice is missing,
        // and run each session once: ONNX Runtime's first run allocates and plans,
        // which would otherwise slow the first phrase of the first call.
        let warm_up = voice.ids(&espeak::phonemize("Ready.", &voice.espeak_voice)?);
        for session in &voice.sessions {
            let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
            voice.run_session(&mut session, warm_up.clone())?;
        }
        tracing::info!(
            model = %onnx.display(),
            sessions = count,
            intra_threads = options.intra_threads,
            load_ms = started.elapsed().as_millis() as u64,
            "Piper voice loaded"
        );
        Ok(voice)
    }

    /// The IPA phonemes the voice will speak for `text`, for debugging
    /// pronunciation problems.
    pub fn phonemes(&self, text: &str) -> Result<String, TtsError> {
        espeak::phonemize(&text::normalize_for_speech(text), &self.espeak_voice)
    }

    /// Model input ids for a phoneme string: `^ _ (phoneme _)* $`. Phonemes the
    /// voice does not know are skipped (logged at debug level).
    fn ids(&self, phonemes: &str) -> Vec<i64> {
        let mut ids = Vec::with_capacity(phonemes.len() * 2 + 4);
        ids.extend_from_slice(&self.bos);
        ids.extend_from_slice(&self.pad);
        for c in phonemes.chars() {
            match self.phoneme_ids.get(&c) {
                Some(p) => {
                    ids.extend_from_slice(p);
                    ids.extend_from_slice(&self.pad);
                }
                None => tracing::debug!(phoneme = %c, "phoneme not in the voice's map, skipped"),
            }
        }
        ids.extend_from_slice(&self.eos);
        ids
    }

    /// Runs the model on one id sequence, on the first free session.
    fn infer(&self, ids: Vec<i64>) -> Result<Vec<f32>, TtsError> {
        let mut session = self.acquire_session();
        self.run_session(&mut session, ids)
    }

    fn run_session(&self, session: &mut Session, ids: Vec<i64>) -> Result<Vec<f32>, TtsError> {
        let run_err = |what: &str, e: ort::Error| TtsError::Synthesis(format!("{what}: {e}"));
        let n = ids.len();
        let input =
            Tensor::from_array(([1usize, n], ids)).map_err(|e| run_err("input tensor", e))?;
        let lengths = Tensor::from_array(([1usize], vec![n as i64]))
            .map_err(|e| run_err("length tensor", e))?;
        let scales = Tensor::from_array(([3usize], self.scales.to_vec()))
            .map_err(|e| run_err("scales tensor", e))?;
        let mut inputs =
            ort::inputs!["input" => input, "input_lengths" => lengths, "scales" => scales];
        if self.has_speaker_input {
            let sid = Tensor::from_array(([1usize], vec![0i64]))
                .map_err(|e| run_err("speaker tensor", e))?;
            inputs.push(("sid".into(), sid.into()));
        }
        let outputs = session.run(inputs).map_err(|e| run_err("model run", e))?;
        let output = outputs
            .get("output")
            .ok_or_else(|| TtsError::Synthesis("the model has no output \"output\"".into()))?;
        let (_, audio) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| run_err("output tensor", e))?;
        Ok(audio.to_vec())
    }

    /// A free session if there is one, else waits for one (round robin).
    fn acquire_session(&self) -> std::sync::MutexGuard<'_, Session> {
        let n = self.sessions.len();
        let start = self.next_session.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            if let Ok(guard) = self.sessions[(start + k) % n].try_lock() {
                return guard;
            }
        }
        // A panic during a run cannot leave a session half-updated in a way that
        // matters for the next run (inputs are per run), so poisoning is ignored.
        self.sessions[start % n]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Synthesizer for PiperVoice {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    fn synthesize(&self, text: &str) -> Result<Vec<f32>, TtsError> {
        let started = Instant::now();
        let phonemes = self.phonemes(text)?;
        let mut audio = Vec::new();
        for piece in split_phonemes(&phonemes, MAX_PHONEMES_PER_RUN) {
            let ids = self.ids(piece);
            if ids.len() <= self.bos.len() + self.pad.len() + self.eos.len() {
                continue; // nothing the voice can say
            }
            audio.extend(self.infer(ids)?);
        }
        let audio = finish_audio(audio, self.sample_rate);
        tracing::debug!(
            chars = text.len(),
            phonemes = phonemes.chars().count(),
            audio_ms = (audio.len() as u64 * 1000) / u64::from(self.sample_rate.max(1)),
            took_ms = started.elapsed().as_millis() as u64,
            "synthesized"
        );
        Ok(audio)
    }
}

fn read_config(path: &Path) -> Result<VoiceConfig, TtsError> {
    let load_err = |reason: String| TtsError::Load {
        path: path.to_path_buf(),
        reason,
    };
    let bytes =
        std::fs::read(path).map_err(|e| load_err(format!("cannot read the voice config: {e}")))?;
    let config: VoiceConfig = serde_json::from_slice(&bytes)
        .map_err(|e| load_err(format!("not a Piper voice config: {e}")))?;
    if config.audio.sample_rate == 0 {
        return Err(load_err("audio.sample_rate is 0".into()));
    }
    Ok(config)
}

/// Splits a long phoneme string into pieces of at most about `max` characters,
/// preferably after a clause mark, else at a word boundary.
fn split_phonemes(phonemes: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = phonemes.trim();
    while rest.chars().count() > max {
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let head = &rest[..limit];
        let clause_cut = head
            .char_indices()
            .rev()
            .filter(|&(i, c)| {
                matches!(c, '.' | ',' | ';' | ':' | '!' | '?')
                    && head[i + c.len_utf8()..].starts_with(' ')
            })
            .map(|(i, c)| i + c.len_utf8())
            .find(|&i| i >= limit / 4);
        let cut = clause_cut
            .or_else(|| head.rfind(' ').filter(|&i| i > 0))
            .unwrap_or(limit);
        pieces.push(rest[..cut].trim());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    pieces
}

/// Makes model output safe to queue back to back: NaNs zeroed, peaks above full
/// scale scaled down (not clipped), silence at the edges trimmed to
/// [`LEAD_SILENCE_S`] / [`TRAIL_SILENCE_S`], and short fades so a phrase starts
/// and ends at zero (no click at the join).
fn finish_audio(mut audio: Vec<f32>, sample_rate: u32) -> Vec<f32> {
    for s in &mut audio {
        if !s.is_finite() {
            *s = 0.0;
        }
    }
    let peak = audio.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    if peak > 1.0 {
        let gain = 1.0 / peak;
        audio.iter_mut().for_each(|s| *s *= gain);
    }
    let rate = sample_rate as f32;
    let Some(first) = audio.iter().position(|s| s.abs() > SILENCE_THRESHOLD) else {
        return Vec::new();
    };
    let last = audio
        .iter()
        .rposition(|s| s.abs() > SILENCE_THRESHOLD)
        .unwrap_or(first);
    let start = first.saturating_sub((LEAD_SILENCE_S * rate) as usize);
    let end = (last + 1 + (TRAIL_SILENCE_S * rate) as usize).min(audio.len());
    let mut audio = audio[start..end].to_vec();
    // Keep the promised trailing silence even when the model stopped short.
    let want_end = last - start + 1 + (TRAIL_SILENCE_S * rate) as usize;
    audio.resize(want_end.max(audio.len()), 0.0);
    let fade = ((FADE_S * rate) as usize).min(audio.len() / 2).max(1);
    for i in 0..fade {
        let g = i as f32 / fade as f32;
        audio[i] *= g;
        let j = audio.len() - 1 - i;
        audio[j] *= g;
    }
    for s in &mut audio {
        *s = s.clamp(-1.0, 1.0);
    }
    audio
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phonemes_split_at_clauses_then_words() {
        let p = "aaa bbb, ccc ddd. eee";
        assert_eq!(split_phonemes(p, 100), vec![p]);
        assert_eq!(split_phonemes(p, 11), vec!["aaa bbb,", "ccc ddd.", "eee"]);
        assert_eq!(
            split_phonemes("aaaa bbbb cccc", 6),
            vec!["aaaa", "bbbb", "cccc"]
        );
        assert_eq!(split_phonemes("abcdefgh", 3), vec!["abc", "def", "gh"]);
        assert!(split_phonemes("  ", 3).is_empty());
    }

    #[test]
    fn finished_audio_is_trimmed_faded_and_in_range() {
        let rate = 1000;
        let mut audio = vec![0.0; 500];
        audio.extend(std::iter::repeat_n(2.0, 100));
        audio.push(f32::NAN);
        audio.extend(vec![0.0; 500]);
        let out = finish_audio(audio, rate);
        // 20 ms lead + 100 loud samples + 50 ms trail at 1 kHz (the NaN became silence)
        assert_eq!(out.len(), 20 + 100 + 50);
        assert!(out.iter().all(|s| (-1.0..=1.0).contains(s)));
        assert_eq!(out[0], 0.0);
        assert_eq!(*out.last().unwrap_or(&1.0), 0.0);
        assert!(
            (out[60] - 1.0).abs() < 1e-6,
            "scaled, not clipped: {}",
            out[60]
        );
    }

    #[test]
    fn silent_audio_becomes_empty() {
        assert!(finish_audio(vec![0.0; 100], 1000).is_empty());
        assert!(finish_audio(Vec::new(), 1000).is_empty());
    }

    #[test]
    fn files_follow_the_installer_layout() {
        let f = VoiceFiles::in_models_dir(Path::new("/m"));
        assert_eq!(f.onnx, Path::new("/m/tts/en_US-joe-medium.onnx"));
        assert_eq!(f.config, Path::new("/m/tts/en_US-joe-medium.onnx.json"));
        assert_eq!(
            f.ort_dylib,
            Path::new("/m/onnxruntime/libonnxruntime.so.1.31.1")
        );
        assert_eq!(f.missing().len(), 3);
    }
}
