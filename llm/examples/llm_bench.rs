//! Measures the embedded engine: load time, prefill of a ~150-token prompt, per-token
//! decode, a cached second turn, and memory.
//!
//! ```text
//! cargo run --release -p parley-llm --example llm_bench -- [GGUF] [--dequantize] [--tokens N]
//! ```
//! GGUF defaults to `$PARLEY_MODELS_DIR/llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`,
//! then `/tmp/llm/qwen.gguf`. A `tokenizer.json` next to it (installer name) is used if
//! present, else the tokenizer is built from the GGUF.

mod common;
use common::status_mb;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use parley_llm::engine::{DEFAULT_GGUF_FILE, DEFAULT_TOKENIZER_FILE};
use parley_llm::{CandleEngine, CandleOptions, ChatMessage, GenerateOptions, LlmEngine, Role};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut gguf = None;
    // The engine's default (quantized weights); --dequantize for the f32 comparison.
    let mut dequantize = false;
    let mut tokens = 32usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dequantize" => dequantize = true,
            "--quantized" => dequantize = false,
            "--tokens" => tokens = args.next().ok_or("--tokens N")?.parse()?,
            _ => gguf = Some(PathBuf::from(a)),
        }
    }
    let models = std::env::var_os("PARLEY_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/parley/models")))
        .map(|d| d.join("llm"));
    let gguf = gguf
        .or_else(|| {
            models
                .as_ref()
                .map(|d| d.join(DEFAULT_GGUF_FILE))
                .filter(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/tmp/llm/qwen.gguf"));
    let tokenizer = models
        .map(|d| d.join(DEFAULT_TOKENIZER_FILE))
        .filter(|p| p.is_file());

    let options = CandleOptions {
        dequantize,
        ..CandleOptions::default()
    };
    let t = Instant::now();
    let engine = match &tokenizer {
        Some(tok) => CandleEngine::load(&gguf, tok, options)?,
        None => CandleEngine::load_gguf_only(&gguf, options)?,
    };
    println!(
        "load: {:.2} s (dequantize={dequantize}, tokenizer {}), RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        if tokenizer.is_some() {
            "from tokenizer.json"
        } else {
            "built from GGUF"
        },
        status_mb("VmRSS:")
    );

    let system = "You are the voice assistant of a neighbourhood pharmacy. You answer callers \
        on the phone, so keep every answer to one or two short spoken sentences, without lists, \
        markdown or emoji. You can look up members by name and date of birth, check the status \
        of their prescription refills, tell them when an order will be ready for pickup, and \
        give the opening hours, which are eight in the morning to eight in the evening on \
        weekdays and nine to five on Saturdays. The pharmacy is closed on Sundays. Never give \
        medical advice; suggest speaking with the pharmacist instead.";
    let mut conv = vec![
        ChatMessage::new(Role::System, system),
        ChatMessage::new(
            Role::User,
            "Hi, when are you open on Saturday? And can I pick up my refill then?",
        ),
    ];
    println!("prompt: {} tokens", engine.count_tokens(&conv)?);

    let mut session = engine.new_session();
    let opts = GenerateOptions {
        max_tokens: tokens,
        ..GenerateOptions::default()
    };
    let mut reply = String::new();
    let s1 = session.generate(&conv, &opts, &mut |p| {
        reply.push_str(p);
        ControlFlow::Continue(())
    })?;
    let decode_ms = (s1.total_ms - s1.prefill_ms) / s1.generated_tokens.max(1) as f64;
    println!("turn 1: {reply:?}");
    println!(
        "turn 1: prompt {} tokens ({} cached), prefill {:.0} ms ({:.0} tok/s), first text {:.0} ms, \
         {} tokens in {:.0} ms total, decode {:.1} ms/token, finish {:?}",
        s1.prompt_tokens,
        s1.cached_tokens,
        s1.prefill_ms,
        (s1.prompt_tokens - s1.cached_tokens) as f64 / (s1.prefill_ms / 1000.0),
        s1.first_token_ms,
        s1.generated_tokens,
        s1.total_ms,
        decode_ms,
        s1.finish
    );

    conv.push(ChatMessage::new(Role::Assistant, reply));
    conv.push(ChatMessage::new(
        Role::User,
        "Great, thanks. And on Sunday?",
    ));
    let mut reply2 = String::new();
    let s2 = session.generate(&conv, &opts, &mut |p| {
        reply2.push_str(p);
        ControlFlow::Continue(())
    })?;
    println!("turn 2: {reply2:?}");
    println!(
        "turn 2: prompt {} tokens ({} cached, {} new), prefill {:.0} ms, first text {:.0} ms, \
         {} tokens, decode {:.1} ms/token",
        s2.prompt_tokens,
        s2.cached_tokens,
        s2.prompt_tokens - s2.cached_tokens,
        s2.prefill_ms,
        s2.first_token_ms,
        s2.generated_tokens,
        (s2.total_ms - s2.prefill_ms) / s2.generated_tokens.max(1) as f64,
    );
    // A new call with the same system prompt starts from the shared system prefix.
    let conv3 = vec![
        conv[0].clone(),
        ChatMessage::new(Role::User, "Do you sell sunscreen?"),
    ];
    let mut other = engine.new_session();
    let s3 = other.generate(&conv3, &opts, &mut |_| ControlFlow::Continue(()))?;
    println!(
        "new call, same system prompt: prompt {} tokens ({} cached), prefill {:.0} ms, \
         first text {:.0} ms",
        s3.prompt_tokens, s3.cached_tokens, s3.prefill_ms, s3.first_token_ms
    );
    println!(
        "memory: RSS {:.0} MB, peak {:.0} MB",
        status_mb("VmRSS:"),
        status_mb("VmHWM:")
    );
    println!("engine: {}", engine.name());
    Ok(())
}
