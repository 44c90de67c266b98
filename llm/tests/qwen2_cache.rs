//! The forward pass with a KV cache: prefilling in one batch, in two batches, or after
//! truncating the cache must give the same logits (the causal mask over a non-empty
//! cache, and truncation, are right).

mod common;

use candle_core::Device;
use parley_llm::qwen2::{Qwen2LoadOptions, Qwen2Weights};
use parley_llm::tokenizer::{tokenizer_from_json, tokenizer_json_from_gguf};

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let a: Vec<f32> = a.to_vec1().expect("logits");
    let b: Vec<f32> = b.to_vec1().expect("logits");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(t: &candle_core::Tensor) -> u32 {
    let v: Vec<f32> = t.to_vec1().expect("logits");
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn batched_split_and_truncated_prefills_agree() {
    let Some(gguf) = common::gguf_or_skip("batched_split_and_truncated_prefills_agree") else {
        return;
    };
    let tok = tokenizer_from_json(&tokenizer_json_from_gguf(&gguf).expect("json")).expect("tok");
    // f32 weights: every path computes the same sums, so the logits must agree to
    // rounding. Quantized weights: one row and many rows run different kernels (a
    // 1-row GEMV and a tiled GEMM, summing in another order through 24 layers), so
    // single steps are held to the same top token and a looser bound.
    for (dequantize, step_tolerance) in [(true, 1e-3), (false, 1.0)] {
        let options = Qwen2LoadOptions { dequantize, ..Qwen2LoadOptions::default() };
        let weights = Qwen2Weights::load(&gguf, &Device::Cpu, &options).expect("weights");
        check_cache_paths(&weights, &tok, step_tolerance);
    }
}

fn check_cache_paths(weights: &Qwen2Weights, tok: &tokenizers::Tokenizer, step_tolerance: f32) {
    let text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
                Name three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
    assert!(ids.len() > 20);
    let split = ids.len() / 2;

    // One batch.
    let mut whole = weights.new_cache();
    let full = weights.forward(&ids, &mut whole).expect("one batch");
    assert_eq!(whole.len(), ids.len());

    // Two batches: the second has several tokens on top of a non-empty cache.
    let mut halves = weights.new_cache();
    weights
        .forward(&ids[..split], &mut halves)
        .expect("first half");
    let two = weights
        .forward(&ids[split..], &mut halves)
        .expect("second half");
    let d = max_abs_diff(&full, &two);
    eprintln!("one batch vs two: max |diff| = {d:e}");
    assert!(d < 1e-3, "one batch vs two batches differ by {d}");

    // Token by token for the last few.
    let mut steps = weights.new_cache();
    let tail = 4;
    weights
        .forward(&ids[..ids.len() - tail], &mut steps)
        .expect("prefix");
    let mut last = None;
    for id in &ids[ids.len() - tail..] {
        last = Some(weights.forward(&[*id], &mut steps).expect("step"));
    }
    let d = max_abs_diff(&full, last.as_ref().expect("ran steps"));
    eprintln!("one batch vs single steps: max |diff| = {d:e}");
    assert!(d < step_tolerance, "one batch vs single steps differ by {d}");
    assert_eq!(argmax(&full), argmax(last.as_ref().expect("ran steps")));

    // Truncation: fill the cache with something else after the split, cut back, redo.
    let mut reused = weights.new_cache();
    weights.forward(&ids[..split], &mut reused).expect("prefix");
    let other = tok
        .encode("Something else entirely, longer than before.", false)
        .expect("enc");
    weights
        .forward(other.get_ids(), &mut reused)
        .expect("detour");
    reused.truncate(split);
    assert_eq!(reused.len(), split);
    let again = weights
        .forward(&ids[split..], &mut reused)
        .expect("after truncate");
    let d = max_abs_diff(&full, &again);
    assert!(d < 1e-3, "after truncation the logits differ by {d}");

    // And the model is sane: after this prompt it starts answering.
    let first = tok.decode(&[argmax(&full)], false).expect("decode");
    eprintln!("first answer token: {first:?}");
    assert!(!first.starts_with("<|"), "{first:?}");
}

#[test]
fn context_limit_is_enforced() {
    let Some(gguf) = common::gguf_or_skip("context_limit_is_enforced") else {
        return;
    };
    let weights = Qwen2Weights::load(
        &gguf,
        &Device::Cpu,
        &Qwen2LoadOptions {
            max_context: 8,
            ..Qwen2LoadOptions::default()
        },
    )
    .expect("weights");
    let mut cache = weights.new_cache();
    weights.forward(&[9707; 6], &mut cache).expect("fits");
    let err = weights.forward(&[9707; 3], &mut cache).expect_err("over");
    assert!(
        matches!(
            err,
            parley_llm::LlmError::ContextFull {
                tokens: 9,
                limit: 8
            }
        ),
        "{err}"
    );
    assert_eq!(
        cache.len(),
        6,
        "a refused forward leaves the cache as it was"
    );
    weights
        .forward(&[9707; 2], &mut cache)
        .expect("exactly full");
}
