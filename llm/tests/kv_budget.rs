//! The sessions' KV caches under a memory budget, on the real Qwen2.5 0.5B model
//! (skipped with a message when the model is not installed). The eviction order
//! itself is unit-tested without a model in `kv_budget.rs`; these check that the
//! engine wires it right: a generating session is never evicted, an evicted one is
//! rebuilt transparently, and reuse can be switched off.

mod common;

use std::ops::ControlFlow;

use parley_llm::{
    CandleEngine, CandleOptions, ChatMessage, GenerateOptions, GenerationStats, LlmSession, Role,
};

const MIB: usize = 1 << 20;
/// One session's cache after a short turn: 24 layers × keys and values × 2 KV heads ×
/// 64 dimensions × 4 bytes (f32) × 512 positions (the buffers' first growth step).
const SESSION_BYTES: usize = 12 * MIB;

/// An engine of its own (the budget is per engine), or `None` after saying why the
/// test is skipped.
fn engine(test: &str, options: CandleOptions) -> Option<CandleEngine> {
    common::gguf_or_skip(test)?;
    let (gguf, tokenizer) = common::model_files()?;
    let engine = match tokenizer {
        Some(t) => CandleEngine::load(&gguf, &t, options),
        None => CandleEngine::load_gguf_only(&gguf, options),
    };
    Some(engine.expect("the model exists but does not load"))
}

fn user(text: &str) -> ChatMessage {
    ChatMessage::new(Role::User, text)
}

/// Generates greedily; `during` runs once, on the first piece of text, while the
/// session is generating.
fn run_with(
    session: &mut dyn LlmSession,
    messages: &[ChatMessage],
    max_tokens: usize,
    mut during: impl FnMut(),
) -> (String, GenerationStats) {
    let mut text = String::new();
    let mut ran = false;
    let options = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    let stats = session
        .generate(messages, &options, &mut |piece| {
            if !ran {
                ran = true;
                during();
            }
            text.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (text, stats)
}

fn run(
    session: &mut dyn LlmSession,
    messages: &[ChatMessage],
    max_tokens: usize,
) -> (String, GenerationStats) {
    run_with(session, messages, max_tokens, || {})
}

#[test]
fn idle_caches_are_evicted_oldest_first_never_while_generating_and_rebuilt() {
    // Room for two short sessions, not three; the 12 MiB system-prompt cache is over
    // its own bound (an eighth of the budget), so it is not shared here.
    let options = CandleOptions {
        kv_budget_bytes: 30 * MIB,
        ..CandleOptions::default()
    };
    let Some(engine) = engine(
        "idle_caches_are_evicted_oldest_first_never_while_generating_and_rebuilt",
        options,
    ) else {
        return;
    };
    let (mut a, mut b, mut c) = (engine.session(), engine.session(), engine.session());
    let italy = vec![user("What is the capital of Italy? Answer in one word.")];
    let france = vec![user("What is the capital of France? Answer in one word.")];

    let (answer_a, _) = run(&mut a, &italy, 4);
    let (answer_b, b1) = run(&mut b, &france, 8);
    assert!(answer_b.contains("Paris"), "{answer_b:?}");
    let stats = engine.kv_stats();
    assert_eq!(
        (stats.sessions_cached, stats.bytes_in_use, stats.prefix_bytes, stats.evictions),
        (2, 2 * SESSION_BYTES, 0, 0),
        "{stats:?}"
    );

    // A is the least recently used, but while it generates C's first turn pushes the
    // budget over: B, the oldest idle cache, is evicted, not the busy A.
    let mut conv_a = italy.clone();
    conv_a.push(ChatMessage::new(Role::Assistant, answer_a));
    conv_a.push(user("And of Spain? One word."));
    let (_, a2) = run_with(&mut a, &conv_a, 4, || {
        run(&mut c, &[user("Say hello.")], 2);
        let stats = engine.kv_stats();
        assert_eq!((stats.sessions_busy, stats.evictions), (1, 1), "{stats:?}");
    });
    assert!(a2.cached_tokens > 0, "{a2:?}");
    assert_eq!(b.cached_len(), 0, "B was evicted");
    assert!(a.cached_len() > 0 && c.cached_len() > 0);

    // B's next turn starts from nothing and says the same; C, now the oldest, goes.
    let (again, b2) = run(&mut b, &france, 8);
    assert_eq!(b2.cached_tokens, 0, "{b2:?}");
    assert_eq!(b2.prompt_tokens, b1.prompt_tokens);
    assert_eq!(again, answer_b, "greedy decoding from a rebuilt cache is the same");
    assert_eq!(c.cached_len(), 0);
    assert_eq!(engine.kv_stats().evictions, 2);

    // From then on B reuses its cache again.
    let mut conv_b = france.clone();
    conv_b.push(ChatMessage::new(Role::Assistant, again));
    conv_b.push(user("And of Germany? One word."));
    let (berlin, b3) = run(&mut b, &conv_b, 8);
    assert!(berlin.contains("Berlin"), "{berlin:?}");
    assert!(b3.cached_tokens >= b2.prompt_tokens, "{b3:?}");

    drop((a, b, c));
    assert_eq!(engine.kv_stats().bytes_in_use, 0, "ended sessions free their caches");
}

#[test]
fn without_reuse_every_generation_prefills_the_whole_prompt() {
    let options = CandleOptions {
        kv_reuse: false,
        ..CandleOptions::default()
    };
    let Some(engine) = engine("without_reuse_every_generation_prefills_the_whole_prompt", options) else {
        return;
    };
    let mut session = engine.session();
    let france = vec![user("What is the capital of France? Answer in one word.")];
    let (first, s1) = run(&mut session, &france, 4);
    let (second, s2) = run(&mut session, &france, 4);
    assert_eq!((s1.cached_tokens, s2.cached_tokens), (0, 0));
    assert_eq!(first, second);
    // Neither the session's cache nor a shared system prompt is kept.
    let (_, other) = run(&mut engine.session(), &france, 1);
    assert_eq!(other.cached_tokens, 0);
    assert_eq!(engine.kv_stats().bytes_in_use, 0);
}
