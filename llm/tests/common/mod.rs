//! Finding the real model for tests, and loading it once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use parley_llm::engine::{DEFAULT_GGUF_FILE, DEFAULT_TOKENIZER_FILE};
use parley_llm::{CandleEngine, CandleOptions};

/// Where the installer puts models: `$PARLEY_MODELS_DIR`, else `~/.cache/parley/models`.
fn models_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PARLEY_MODELS_DIR") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/parley/models"))
}

/// The GGUF file and, if present, its tokenizer.json: the installed model first, then
/// the development copy in /tmp/llm.
pub fn model_files() -> Option<(PathBuf, Option<PathBuf>)> {
    let mut candidates = Vec::new();
    if let Some(dir) = models_dir() {
        let dir = dir.join("llm");
        candidates.push((
            dir.join(DEFAULT_GGUF_FILE),
            dir.join(DEFAULT_TOKENIZER_FILE),
        ));
    }
    candidates.push((
        PathBuf::from("/tmp/llm/qwen.gguf"),
        PathBuf::from("/tmp/llm/tokenizer.json"),
    ));
    candidates
        .into_iter()
        .find(|(g, _)| g.is_file())
        .map(|(g, t)| {
            let t = t.is_file().then_some(t);
            (g, t)
        })
}

/// The GGUF path, or `None` after printing why the test is skipped.
pub fn gguf_or_skip(test: &str) -> Option<PathBuf> {
    match model_files() {
        Some((g, _)) => Some(g),
        None => {
            eprintln!(
                "skipping {test}: no Qwen2.5 GGUF at $PARLEY_MODELS_DIR/llm/{DEFAULT_GGUF_FILE} \
                 or /tmp/llm/qwen.gguf (run `parley models install`)"
            );
            None
        }
    }
}

/// The engine, loaded once and shared by every test in the binary (the weights take
/// about 2 GB), or `None` after printing why the test is skipped.
pub fn engine_or_skip(test: &str) -> Option<Arc<CandleEngine>> {
    static ENGINE: OnceLock<Option<Arc<CandleEngine>>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let (gguf, tokenizer) = model_files()?;
        let started = std::time::Instant::now();
        let engine = match tokenizer {
            Some(t) => CandleEngine::load(&gguf, &t, CandleOptions::default()),
            None => CandleEngine::load_gguf_only(&gguf, CandleOptions::default()),
        };
        match engine {
            Ok(e) => {
                eprintln!(
                    "loaded {} in {:.1} s",
                    gguf.display(),
                    started.elapsed().as_secs_f64()
                );
                Some(Arc::new(e))
            }
            Err(e) => panic!("the model exists but does not load: {e}"),
        }
    });
    if engine.is_none() {
        gguf_or_skip(test);
    }
    engine.clone()
}
