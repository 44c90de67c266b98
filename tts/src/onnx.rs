//! The process-wide ONNX Runtime environment.
//!
//! ONNX Runtime allows one environment per process, and the `ort` crate loads the
//! runtime library once and ignores any later path. Every component that runs an
//! ONNX model (Piper voices here, possibly a VAD or ASR model elsewhere) must
//! therefore share the environment created by [`environment`]; calling
//! `ort::init_from(..).build()` a second time anywhere else fails.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;

use crate::TtsError;

/// The environment and the library it was loaded from, once created.
static ENVIRONMENT: Mutex<Option<(Environment, PathBuf)>> = Mutex::new(None);

/// Returns the process's ONNX Runtime environment, loading the runtime from
/// `dylib` (e.g. `libonnxruntime.so.1.31.1`) on the first call.
///
/// Later calls return the same environment whatever path they pass (a different
/// one is logged as a warning), because the runtime cannot be loaded twice. A
/// failed first call can be retried with a better path.
pub fn environment(dylib: &Path) -> Result<Environment, TtsError> {
    let mut slot = ENVIRONMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((env, loaded)) = slot.as_ref() {
        if loaded != dylib {
            tracing::warn!(
                loaded = %loaded.display(),
                requested = %dylib.display(),
                "ONNX Runtime is already loaded; ignoring the other library path"
            );
        }
        return Ok(env.clone());
    }
    let load_err = |reason: String| TtsError::Load {
        path: dylib.to_path_buf(),
        reason,
    };
    if !dylib.is_file() {
        return Err(load_err("the ONNX Runtime library is missing".into()));
    }
    let env = ort::init_from(dylib)
        .map_err(|e| load_err(format!("cannot load ONNX Runtime: {e}")))?
        .with_name("parley")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(format!("cannot create the ONNX Runtime environment: {e}")))?;
    tracing::info!(library = %dylib.display(), "ONNX Runtime loaded");
    *slot = Some((env.clone(), dylib.to_path_buf()));
    Ok(env)
}
