//! The real Piper voice end to end. Skipped, with the reason printed, when the
//! model files are not installed (see `support::voice_files`).

mod support;

use std::sync::OnceLock;
use std::time::Instant;

use parley_tts::{PiperOptions, PiperVoice, Synthesizer, TtsError};

/// One voice for the whole test binary (loading takes about half a second).
fn voice() -> Option<&'static PiperVoice> {
    static VOICE: OnceLock<Option<PiperVoice>> = OnceLock::new();
    VOICE
        .get_or_init(|| match support::voice_files() {
            Ok(files) => match PiperVoice::load_files(&files, &PiperOptions::default()) {
                Ok(v) => Some(v),
                Err(e) => panic!("the voice files exist but do not load: {e}"),
            },
            Err(reason) => {
                eprintln!("SKIPPED: no Piper voice: {reason}");
                None
            }
        })
        .as_ref()
}

fn rms(samples: &[f32]) -> f32 {
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32).sqrt()
}

fn write_wav(path: &str, samples: &[f32], rate: u32) -> Result<(), hound::Error> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for s in samples {
        w.write_sample((s * f32::from(i16::MAX)) as i16)?;
    }
    w.finalize()
}

#[test]
fn one_two_three_four_sounds_like_speech() -> Result<(), TtsError> {
    let Some(voice) = voice() else { return Ok(()) };
    assert_eq!(voice.sample_rate(), 22050);
    let started = Instant::now();
    let audio = voice.synthesize("One two three four.")?;
    let took = started.elapsed();
    let seconds = audio.len() as f32 / voice.sample_rate() as f32;
    eprintln!(
        "{seconds:.2} s of speech in {} ms ({})",
        took.as_millis(),
        voice.phonemes("One two three four.")?
    );
    assert!((0.8..3.0).contains(&seconds), "duration {seconds} s");
    let level = rms(&audio);
    assert!(level > 0.02, "RMS {level} is close to silence");
    assert!(audio.iter().all(|s| (-1.0..=1.0).contains(s)));
    // Faded at both ends so phrases join without a click.
    assert!(audio[0].abs() < 1e-3 && audio[audio.len() - 1].abs() < 1e-3);
    // So the lead can listen to it or transcribe it.
    if let Err(e) = write_wav("/tmp/tts-check.wav", &audio, voice.sample_rate()) {
        eprintln!("could not write /tmp/tts-check.wav: {e}");
    }
    Ok(())
}

#[test]
fn length_is_stable_across_runs() -> Result<(), TtsError> {
    let Some(voice) = voice() else { return Ok(()) };
    let text = "Your prescription is ready for pickup.";
    let lens: Vec<usize> = (0..3)
        .map(|_| voice.synthesize(text).map(|a| a.len()))
        .collect::<Result<_, _>>()?;
    let (min, max) = (
        lens.iter().min().copied().unwrap_or(0),
        lens.iter().max().copied().unwrap_or(0),
    );
    // noise_w makes durations vary a little from run to run, not a lot.
    assert!(
        min > 0 && (max as f32) < min as f32 * 1.25,
        "lengths {lens:?}"
    );
    Ok(())
}

#[test]
fn longer_text_is_longer_audio() -> Result<(), TtsError> {
    let Some(voice) = voice() else { return Ok(()) };
    let short = voice.synthesize("Hello.")?;
    let long = voice.synthesize(
        "Hello. Your order of vitamin C, 3.5 grams, is ready at 10:00 with Dr. Smith.",
    )?;
    assert!(
        long.len() > short.len() * 3,
        "{} vs {}",
        long.len(),
        short.len()
    );
    Ok(())
}

#[test]
fn nothing_to_say_is_empty_audio() -> Result<(), TtsError> {
    let Some(voice) = voice() else { return Ok(()) };
    assert!(voice.synthesize("")?.is_empty());
    assert!(voice.synthesize("  ** -- ")?.is_empty());
    Ok(())
}

#[test]
fn synthesizes_from_several_threads() {
    let Some(voice) = voice() else { return };
    std::thread::scope(|s| {
        let handles: Vec<_> = [
            "First caller speaking.",
            "Second caller speaking.",
            "Third one.",
        ]
        .into_iter()
        .map(|t| s.spawn(move || voice.synthesize(t)))
        .collect();
        for h in handles {
            let audio = h
                .join()
                .expect("thread panicked")
                .expect("synthesis failed");
            assert!(rms(&audio) > 0.02);
        }
    });
}

#[test]
fn loading_twice_shares_the_runtime() -> Result<(), TtsError> {
    let Some(first) = voice() else { return Ok(()) };
    let files = support::voice_files().map_err(TtsError::Synthesis)?;
    let options = PiperOptions {
        intra_threads: 2,
        sessions: 2,
        length_scale: Some(1.3),
    };
    let second = PiperVoice::load_files(&files, &options)?;
    let a = first.synthesize("One two three four.")?;
    let b = second.synthesize("One two three four.")?;
    assert!(
        b.len() as f32 > a.len() as f32 * 1.1,
        "length_scale 1.3 should be slower: {} vs {}",
        b.len(),
        a.len()
    );
    Ok(())
}

#[test]
fn missing_model_is_a_load_error() {
    let Ok(files) = support::voice_files() else {
        return;
    };
    let err = PiperVoice::load(
        &files.onnx.with_extension("nope"),
        &files.config,
        &files.ort_dylib,
    );
    assert!(matches!(err, Err(TtsError::Load { .. })), "{err:?}");
    let err = PiperVoice::load(&files.onnx, &files.onnx, &files.ort_dylib);
    assert!(
        matches!(err, Err(TtsError::Load { .. })),
        "config that is not JSON: {err:?}"
    );
}
