//! Raw speed of the embedded engine on a fixed token sequence, for a side-by-side with
//! llama.cpp (`bench/llm_vs_llamacpp.sh` feeds llama-server the very same token ids).
//!
//! ```text
//! cargo run --release -p parley-llm --example llm_speed -- [--gguf FILE] \
//!     [--prompt-tokens N]... [--decode N] [--dequantize] [--candle-q8] [--dense-min N] [--ids-out FILE]
//!     [--greedy-check N] [--threads N] [--concurrent N] [--row-layout] [--keep-q5]
//! ```
//! For each `--prompt-tokens N`: a fresh cache prefills N tokens of a fixed English
//! text (chat-formatted), then decodes `--decode` tokens greedily, never stopping at an
//! end token. Prints one `key=value` line per prompt (prefill and decode tok/s) and
//! the process's resident memory (now and peak).
//!
//! `--row-layout`: Q8_0 matrices in rows with the tile kernels, not in AVX-VNNI
//! panels (for comparison; CPUs without AVX-VNNI always use rows).
//! `--keep-q5`: Q5_0 matrices kept as stored where the AVX2 kernels unpack them,
//! instead of converted to Q8_0 (`[llm] keep_q5_0`).
//! `--dense-min N`: prefills of at least N tokens use dequantized weights (0: never).
//! `--greedy-check N` instead compares greedy continuations of N prompts between the
//! quantized path (the default) and f32 dequantized weights (the old default), and
//! prints how many agree token for token, and where the first difference falls.
//!
//! `--threads N`: the model's threads (default: `PARLEY_MODEL_THREADS`, else one per
//! core), as `[llm] threads` sets them in the server. `--concurrent N`: N sessions
//! prefill and decode at the same time on their own threads, as N calls would (one
//! line per session, then their total decode rate).

mod common;
use common::status_mb;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use parley_llm::engine::DEFAULT_GGUF_FILE;
use parley_llm::qwen2::{Qwen2LoadOptions, Qwen2Weights};
use parley_llm::tokenizer::{tokenizer_from_json, tokenizer_json_from_gguf};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn argmax(t: &Tensor) -> BoxResult<u32> {
    let v: Vec<f32> = t.to_vec1()?;
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// A long, ordinary English passage, chat-formatted, to cut prompts from.
const PASSAGE: &str = "The pharmacy on the corner opens at eight in the morning on weekdays \
and at nine on Saturdays. Callers ask about their prescriptions, when an order will be ready \
for pickup, how many refills are left, and whether the pharmacist can call them back. A good \
phone assistant answers in one or two short sentences, checks the caller's member number and \
date of birth before reading out anything private, and never gives medical advice. ";

fn prompt_ids(tok: &tokenizers::Tokenizer, n: usize) -> BoxResult<Vec<u32>> {
    let mut text = String::from(
        "<|im_start|>system\nYou are a helpful voice assistant. Answer briefly.<|im_end|>\n<|im_start|>user\n",
    );
    let tail = "Summarise what you just read in plain words.<|im_end|>\n<|im_start|>assistant\n";
    let tail_ids = tok.encode(tail, false)?.get_ids().to_vec();
    loop {
        let ids = tok.encode(text.as_str(), false)?.get_ids().to_vec();
        if ids.len() + tail_ids.len() >= n {
            let mut ids = ids[..n.saturating_sub(tail_ids.len())].to_vec();
            ids.extend(&tail_ids);
            return Ok(ids);
        }
        text.push_str(PASSAGE);
    }
}

fn greedy(w: &Qwen2Weights, prompt: &[u32], n: usize) -> BoxResult<(Vec<u32>, f64, f64)> {
    let mut cache = w.new_cache();
    let t = Instant::now();
    let logits = w.forward(prompt, &mut cache)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut next = argmax(&logits)?;
    let mut out = vec![next];
    let t = Instant::now();
    for _ in 1..n {
        let logits = w.forward(&[next], &mut cache)?;
        next = argmax(&logits)?;
        out.push(next);
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((out, prefill_ms, decode_ms))
}

fn main() -> BoxResult<()> {
    let mut gguf = None;
    let mut prompts = Vec::new();
    let mut decode = 128usize;
    let mut dequantize = false;
    let mut q8_kernel = true;
    let mut keep_q5_0 = false;
    let mut ids_out = None;
    let mut greedy_check = 0usize;
    let mut dense_min = parley_llm::qwen2::DEFAULT_DENSE_PREFILL_MIN_TOKENS;
    let mut threads = 0usize;
    let mut concurrent = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--gguf" => gguf = Some(PathBuf::from(value()?)),
            "--prompt-tokens" => prompts.push(value()?.parse::<usize>()?),
            "--decode" => decode = value()?.parse()?,
            "--dequantize" => dequantize = true,
            "--candle-q8" => q8_kernel = false,
            "--row-layout" => parley_llm::q8::use_row_layout(true),
            "--keep-q5" => keep_q5_0 = true,
            "--ids-out" => ids_out = Some(PathBuf::from(value()?)),
            "--greedy-check" => greedy_check = value()?.parse()?,
            "--dense-min" => dense_min = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--concurrent" => concurrent = value()?.parse::<usize>()?.max(1),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if prompts.is_empty() {
        prompts = vec![150, 650];
    }
    // SAFETY: no other thread exists yet.
    unsafe { parley_llm::cpu::set_model_threads(threads) };
    let gguf = gguf.unwrap_or_else(|| {
        let dir = std::env::var_os("PARLEY_MODELS_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/parley/models"))
            })
            .unwrap_or_default();
        dir.join("llm").join(DEFAULT_GGUF_FILE)
    });
    let tok = tokenizer_from_json(&tokenizer_json_from_gguf(&gguf)?)?;
    let rss_tok = status_mb("VmRSS:");
    let options = Qwen2LoadOptions {
        dequantize,
        dense_prefill_min_tokens: dense_min,
        q8_kernel,
        keep_q5_0,
        ..Qwen2LoadOptions::default()
    };
    let t = Instant::now();
    let w = Qwen2Weights::load(&gguf, &Device::Cpu, &options)?;
    println!(
        "engine=parley load_ms={:.0} rss_after_tokenizer_mb={rss_tok:.0} rss_after_load_mb={:.0} peak_rss_after_load_mb={:.0} simd={} threads={} weights=\"{}\"",
        t.elapsed().as_secs_f64() * 1e3,
        status_mb("VmRSS:"),
        status_mb("VmHWM:"),
        parley_llm::cpu::simd_path(),
        parley_llm::cpu::model_threads(),
        w.summary()
    );

    if greedy_check > 0 {
        return check_greedy(&w, &gguf, &tok, greedy_check, decode);
    }

    if concurrent > 1 {
        return run_concurrent(&w, &tok, &prompts, decode, concurrent);
    }

    let mut all_ids = Vec::new();
    for &n in &prompts {
        let ids = prompt_ids(&tok, n)?;
        let (_, prefill_ms, decode_ms) = greedy(&w, &ids, decode + 1)?;
        println!(
            "engine=parley prompt_tokens={} prefill_ms={prefill_ms:.0} prefill_tok_s={:.1} \
             decode_tokens={decode} decode_ms={decode_ms:.0} decode_tok_s={:.2} rss_mb={:.0} peak_rss_mb={:.0}",
            ids.len(),
            ids.len() as f64 / (prefill_ms / 1e3),
            decode as f64 / (decode_ms / 1e3),
            status_mb("VmRSS:"),
            status_mb("VmHWM:"),
        );
        all_ids.push(ids);
    }
    if let Some(path) = ids_out {
        let lines: Vec<String> = all_ids
            .iter()
            .map(|ids| serde_json::to_string(ids).unwrap_or_default())
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    Ok(())
}

/// `sessions` sessions at once, each on its own thread, each prefilling and decoding
/// every prompt length in turn: what the model does for that many simultaneous calls.
fn run_concurrent(
    w: &Qwen2Weights,
    tok: &tokenizers::Tokenizer,
    prompts: &[usize],
    decode: usize,
    sessions: usize,
) -> BoxResult<()> {
    for &n in prompts {
        let ids = prompt_ids(tok, n)?;
        let start = Instant::now();
        let results: Vec<BoxResult<(Vec<u32>, f64, f64)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..sessions)
                .map(|_| scope.spawn(|| greedy(w, &ids, decode + 1)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("session thread panicked".into())))
                .collect()
        });
        let wall_s = start.elapsed().as_secs_f64();
        for (i, r) in results.into_iter().enumerate() {
            let (_, prefill_ms, decode_ms) = r?;
            println!(
                "engine=parley session={i} prompt_tokens={} prefill_ms={prefill_ms:.0} decode_tokens={decode} decode_ms={decode_ms:.0} decode_tok_s={:.2}",
                ids.len(),
                decode as f64 / (decode_ms / 1e3),
            );
        }
        println!(
            "engine=parley sessions={sessions} prompt_tokens={} wall_s={wall_s:.2} total_tokens_per_s={:.2} rss_mb={:.0}",
            ids.len(),
            (sessions * (ids.len() + decode)) as f64 / wall_s,
            status_mb("VmRSS:"),
        );
    }
    Ok(())
}

/// Greedy continuations of `n` different prompts, quantized path against f32 weights.
fn check_greedy(
    w: &Qwen2Weights,
    gguf: &std::path::Path,
    tok: &tokenizers::Tokenizer,
    n: usize,
    decode: usize,
) -> BoxResult<()> {
    let reference = Qwen2Weights::load(
        gguf,
        &Device::Cpu,
        &Qwen2LoadOptions {
            dequantize: true,
            ..Qwen2LoadOptions::default()
        },
    )?;
    let subjects = [
        "the capital of France", "how many legs a spider has", "why the sky is blue",
        "a good book to read", "the tallest mountain", "how to boil an egg",
        "when the pharmacy opens on Saturday", "what a refill is", "how to reset a password",
        "the speed of light", "what an owl eats", "how rain forms",
    ];
    let forms = [
        "Tell me {}.", "In one sentence: {}?", "Can you explain {}?", "Quick question about {}.",
        "What do you know about {}?",
    ];
    let mut same = 0;
    let mut first_diffs = Vec::new();
    for i in 0..n {
        let q = forms[i % forms.len()].replace("{}", subjects[(i / forms.len() + i) % subjects.len()]);
        let text = format!(
            "<|im_start|>system\nYou are a helpful voice assistant. Answer in one or two short sentences.<|im_end|>\n<|im_start|>user\n{q} (#{i})<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(text.as_str(), false)?.get_ids().to_vec();
        let (a, _, _) = greedy(w, &ids, decode)?;
        let (b, _, _) = greedy(&reference, &ids, decode)?;
        match a.iter().zip(&b).position(|(x, y)| x != y) {
            None => same += 1,
            Some(at) => {
                first_diffs.push(at);
                println!(
                    "prompt {i}: differs at token {at}\n  quantized: {:?}\n  f32:       {:?}",
                    tok.decode(&a, true)?,
                    tok.decode(&b, true)?
                );
            }
        }
    }
    first_diffs.sort_unstable();
    println!(
        "greedy check: {same}/{n} prompts identical over {decode} tokens; first differences at tokens {first_diffs:?}"
    );
    Ok(())
}
