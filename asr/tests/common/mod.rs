//! Helpers shared by the model tests: where models live, and the speech fixture.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `$PARLEY_MODELS_DIR`, else `~/.cache/parley/models` (the installer's default).
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PARLEY_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/parley/models")
}

/// The installed ggml model, or `None` (after printing why) when it is not installed.
pub fn installed_model() -> Option<PathBuf> {
    let path = models_dir().join("whisper/ggml-tiny.en.bin");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run `parley models install` (or `make models`) to test with the real model",
            path.display()
        );
        None
    }
}

/// 16 kHz mono samples of a WAV file.
pub fn read_wav(path: &Path) -> Vec<f32> {
    let mut reader = hound::WavReader::open(path).expect("open fixture");
    let spec = reader.spec();
    assert_eq!(
        (spec.sample_rate, spec.channels),
        (16_000, 1),
        "fixture must be 16 kHz mono"
    );
    reader
        .samples::<i16>()
        .map(|s| f32::from(s.expect("sample")) / 32768.0)
        .collect()
}

/// espeak-ng saying "one two three four" (2.76 s with 0.3 s of silence each side).
pub fn one_two_three_four() -> Vec<f32> {
    read_wav(&std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("tests/fixtures/one_two_three_four.wav"))
}

/// Lower case, digits spelled out, punctuation dropped, words single-spaced.
pub fn normalise(text: &str) -> String {
    const DIGITS: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let mut out = String::new();
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            out.push(' ');
            out.push_str(DIGITS[d as usize]);
            out.push(' ');
        } else if c.is_alphanumeric() || c.is_whitespace() {
            out.extend(c.to_lowercase());
        } else {
            out.push(' ');
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
