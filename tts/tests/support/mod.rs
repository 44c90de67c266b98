//! Finds the real voice files for tests and the `say` example.

use std::path::PathBuf;

use parley_tts::VoiceFiles;

/// The installed voice (`$PARLEY_MODELS_DIR`, default `~/.cache/parley/models`, as
/// laid out by `parley models install`), else the files named by
/// `PARLEY_TTS_ONNX`, `PARLEY_TTS_CONFIG` and `PARLEY_ORT_DYLIB`. `Err` says why
/// neither is usable.
pub fn voice_files() -> Result<VoiceFiles, String> {
    let models_dir = std::env::var_os("PARLEY_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/parley/models"))
        });
    let mut reasons = Vec::new();
    if let Some(dir) = models_dir {
        let files = VoiceFiles::in_models_dir(&dir);
        let missing = files.missing();
        if missing.is_empty() {
            return Ok(files);
        }
        reasons.push(format!("missing {missing:?} (run `parley models install`)"));
    }
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    match (
        var("PARLEY_TTS_ONNX"),
        var("PARLEY_TTS_CONFIG"),
        var("PARLEY_ORT_DYLIB"),
    ) {
        (Some(onnx), Some(config), Some(ort_dylib)) => {
            let files = VoiceFiles {
                onnx,
                config,
                ort_dylib,
            };
            let missing = files.missing();
            if missing.is_empty() {
                return Ok(files);
            }
            reasons.push(format!("PARLEY_TTS_* point at missing {missing:?}"));
        }
        _ => {
            reasons.push("PARLEY_TTS_ONNX, PARLEY_TTS_CONFIG, PARLEY_ORT_DYLIB not all set".into())
        }
    }
    Err(reasons.join("; "))
}
