//! Transcribes WAV files (16 kHz mono) and times each run, with the encoder context
//! fitted to the audio and with the full 30 s window.
//!
//! ```text
//! cargo run --release -p parley-asr --example transcribe -- MODEL.bin FILE.wav... [--runs N] [--threads N] [--prompt TEXT] [--fit-only|--full-only]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use parley_asr::{Transcriber, WhisperOptions, WhisperTranscriber};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut files, mut runs, mut threads, mut prompt) = (Vec::new(), 5usize, 2usize, String::new());
    let mut modes = vec![true, false];
    let model = PathBuf::from(args.next().ok_or(
        "usage: transcribe MODEL.bin FILE.wav... [--runs N] [--threads N] [--prompt TEXT] [--fit-only|--full-only]",
    )?);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().ok_or("--runs N")?.parse()?,
            "--threads" => threads = args.next().ok_or("--threads N")?.parse()?,
            "--prompt" => prompt = args.next().ok_or("--prompt TEXT")?,
            "--fit-only" => modes = vec![true],
            "--full-only" => modes = vec![false],
            _ => files.push(PathBuf::from(arg)),
        }
    }
    for fit_audio_ctx in modes.clone() {
        let options = WhisperOptions {
            threads,
            fit_audio_ctx,
            pool_size: 1,
            prompt: prompt.clone(),
            ..WhisperOptions::default()
        };
        let asr = WhisperTranscriber::load(&model, options)?;
        for file in &files {
            let mut reader = hound::WavReader::open(file)?;
            let spec = reader.spec();
            if (spec.sample_rate, spec.channels) != (16_000, 1) {
                return Err(format!("{}: need 16 kHz mono", file.display()).into());
            }
            let audio: Vec<f32> = reader
                .samples::<i16>()
                .map(|s| s.map(|s| f32::from(s) / 32768.0))
                .collect::<Result<_, _>>()?;
            asr.transcribe(&audio)?; // warm-up
            let mut times = Vec::new();
            let mut text = String::new();
            for _ in 0..runs {
                let started = Instant::now();
                text = asr.transcribe(&audio)?.text;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{:<5} audio {:>5.2} s  median {:>6.0} ms  min {:>6.0} ms  {}: {text:?}",
                if fit_audio_ctx { "fit" } else { "full" },
                audio.len() as f64 / 16_000.0,
                times[times.len() / 2],
                times[0],
                file.file_name().unwrap_or_default().to_string_lossy(),
            );
        }
    }
    Ok(())
}
