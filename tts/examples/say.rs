//! Synthesizes a sentence with the installed Piper voice and writes a WAV file,
//! to listen to the voice or transcribe it back.
//!
//! ```text
//! cargo run -p parley-tts --release --example say -- "One two three four." /tmp/tts-check.wav
//! ```
//!
//! The voice is looked up like the model tests do: `$PARLEY_MODELS_DIR` (default
//! `~/.cache/parley/models`), else `PARLEY_TTS_ONNX`, `PARLEY_TTS_CONFIG`,
//! `PARLEY_ORT_DYLIB`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use parley_tts::{PiperOptions, PiperVoice, Synthesizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let text = args
        .next()
        .unwrap_or_else(|| "One two three four.".to_owned());
    let out = args
        .next()
        .unwrap_or_else(|| "/tmp/tts-check.wav".to_owned());
    let files = support::voice_files()?;
    let voice = PiperVoice::load_files(&files, &PiperOptions::default())?;
    println!("phonemes: {}", voice.phonemes(&text)?);
    let started = Instant::now();
    let samples = voice.synthesize(&text)?;
    let took = started.elapsed();
    let seconds = samples.len() as f64 / f64::from(voice.sample_rate());
    println!("{seconds:.2} s of speech in {} ms", took.as_millis());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: voice.sample_rate(),
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&out, spec)?;
    for s in samples {
        writer.write_sample((s * f32::from(i16::MAX)) as i16)?;
    }
    writer.finalize()?;
    println!("wrote {out}");
    Ok(())
}
