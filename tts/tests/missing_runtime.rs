//! A wrong ONNX Runtime path is a clear load error, not a panic. Its own test
//! binary, because once the runtime is loaded in a process the path is ignored.

use std::path::Path;

use parley_tts::{PiperVoice, TtsError};

#[test]
fn missing_runtime_library_is_a_load_error() {
    let dir =
        std::env::temp_dir().join(format!("parley-tts-missing-runtime-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let onnx = dir.join("voice.onnx");
    let config = dir.join("voice.onnx.json");
    let written = std::fs::write(&onnx, b"not a model").and_then(|()| {
        std::fs::write(
            &config,
            br#"{"audio":{"sample_rate":22050},"espeak":{"voice":"en-us"},
                "inference":{"noise_scale":0.667,"length_scale":1,"noise_w":0.8},
                "phoneme_id_map":{"^":[1],"$":[2],"_":[0],"a":[14]}}"#,
        )
    });
    if let Err(e) = written {
        eprintln!("SKIPPED: cannot write to {}: {e}", dir.display());
        return;
    }
    let dylib = Path::new("/nonexistent/libonnxruntime.so.1.31.1");
    match PiperVoice::load(&onnx, &config, dylib) {
        Err(TtsError::Load { path, reason }) => {
            assert_eq!(path, dylib);
            assert!(reason.contains("ONNX Runtime"), "{reason}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
