//! Converts a CTranslate2 Whisper model to ggml (what `parley models install` does).
//!
//! ```text
//! cargo run --release -p parley-asr --example convert -- CT2_DIR mel_filters.npz gpt2.tiktoken OUT.bin
//! ```

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [ct2, mel, vocab, out] = &args[..] else {
        return Err("usage: convert CT2_DIR mel_filters.npz gpt2.tiktoken OUT.bin".into());
    };
    let started = std::time::Instant::now();
    parley_asr::convert::ct2_to_ggml(ct2, mel, vocab, out)?;
    println!(
        "wrote {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
