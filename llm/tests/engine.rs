//! The embedded engine on the real Qwen2.5 0.5B model (skipped with a message when the
//! model is not installed).

mod common;

use std::ops::ControlFlow;

use parley_llm::{ChatMessage, FinishReason, GenerateOptions, LlmEngine, Role};

const QUESTION: &str = "What is the capital of France? Answer in one word.";

fn run(
    session: &mut dyn parley_llm::LlmSession,
    messages: &[ChatMessage],
    max_tokens: usize,
) -> (String, parley_llm::GenerationStats) {
    let mut text = String::new();
    let options = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    let stats = session
        .generate(messages, &options, &mut |piece| {
            text.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (text, stats)
}

#[test]
fn answers_paris_and_reuses_the_cache_next_turn() {
    let Some(engine) = common::engine_or_skip("answers_paris_and_reuses_the_cache_next_turn")
    else {
        return;
    };
    let mut session = engine.new_session();
    let mut conv = vec![ChatMessage::new(Role::User, QUESTION)];
    let (answer, first) = run(session.as_mut(), &conv, 16);
    eprintln!("turn 1: {answer:?} {first:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
    assert_eq!(first.finish, FinishReason::Stop);
    assert_eq!(first.cached_tokens, 0);
    assert!(first.generated_tokens >= 1);
    assert!(first.first_token_ms >= first.prefill_ms);
    assert!(first.total_ms >= first.first_token_ms);

    conv.push(ChatMessage::new(Role::Assistant, answer));
    conv.push(ChatMessage::new(Role::User, "And of Germany? One word."));
    let (answer2, second) = run(session.as_mut(), &conv, 16);
    eprintln!("turn 2: {answer2:?} {second:?}");
    assert!(answer2.contains("Berlin"), "{answer2:?}");
    assert!(
        second.cached_tokens >= first.prompt_tokens,
        "turn 2 reused {} tokens, turn 1's prompt was {}",
        second.cached_tokens,
        first.prompt_tokens
    );
    let new_tokens = second.prompt_tokens - second.cached_tokens;
    assert!(new_tokens <= 20, "turn 2 prefilled {new_tokens} tokens");
    assert!(new_tokens * 2 < first.prompt_tokens);
    eprintln!(
        "prefill: turn 1 {:.0} ms, turn 2 {:.0} ms",
        first.prefill_ms, second.prefill_ms
    );

    // The same conversation again: everything is cached, the last token re-runs.
    let (answer3, third) = run(session.as_mut(), &conv, 16);
    assert_eq!(
        answer3, answer2,
        "greedy decoding over a reused cache is deterministic"
    );
    assert_eq!(third.cached_tokens, third.prompt_tokens - 1);
}

#[test]
fn break_after_three_pieces_cancels() {
    let Some(engine) = common::engine_or_skip("break_after_three_pieces_cancels") else {
        return;
    };
    let mut session = engine.new_session();
    let conv = vec![ChatMessage::new(
        Role::User,
        "Count from one to fifty in words.",
    )];
    let mut pieces = Vec::new();
    let options = GenerateOptions {
        max_tokens: 100,
        ..GenerateOptions::default()
    };
    let stats = session
        .generate(&conv, &options, &mut |piece| {
            pieces.push(piece.to_owned());
            if pieces.len() == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("generate");
    assert_eq!(stats.finish, FinishReason::Cancelled);
    assert_eq!(pieces.len(), 3, "{pieces:?}");
    assert!(stats.generated_tokens <= 4, "{stats:?}");

    // The session stays usable after a cancel.
    let (answer, stats) = run(
        session.as_mut(),
        &[ChatMessage::new(Role::User, QUESTION)],
        16,
    );
    assert!(answer.contains("Paris"), "{answer:?}");
    assert!(
        stats.cached_tokens > 0,
        "the system prompt prefix is shared"
    );
}

#[test]
fn max_tokens_stops_with_length() {
    let Some(engine) = common::engine_or_skip("max_tokens_stops_with_length") else {
        return;
    };
    let mut session = engine.new_session();
    let conv = vec![ChatMessage::new(
        Role::User,
        "Write a long poem about the sea.",
    )];
    let (text, stats) = run(session.as_mut(), &conv, 5);
    assert_eq!(stats.finish, FinishReason::Length);
    assert_eq!(stats.generated_tokens, 5);
    assert!(!text.is_empty());
}

#[test]
fn sessions_generate_concurrently_and_independently() {
    let Some(engine) = common::engine_or_skip("sessions_generate_concurrently_and_independently")
    else {
        return;
    };
    let questions = [
        QUESTION,
        "What is the capital of Italy? Answer in one word.",
    ];
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let engine = engine.clone();
                s.spawn(move || {
                    let mut session = engine.new_session();
                    run(session.as_mut(), &[ChatMessage::new(Role::User, *q)], 16).0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(answers[0].contains("Paris"), "{answers:?}");
    assert!(answers[1].contains("Rome"), "{answers:?}");
}

#[test]
fn context_full_is_an_error_not_a_panic() {
    let Some(engine) = common::engine_or_skip("context_full_is_an_error_not_a_panic") else {
        return;
    };
    let long = "word ".repeat(engine.max_context() + 10);
    let mut session = engine.new_session();
    let err = session
        .generate(
            &[ChatMessage::new(Role::User, long)],
            &GenerateOptions::default(),
            &mut |_| ControlFlow::Continue(()),
        )
        .expect_err("too long");
    assert!(
        matches!(err, parley_llm::LlmError::ContextFull { .. }),
        "{err}"
    );
}

#[test]
fn a_new_session_reuses_another_sessions_system_prompt() {
    let Some(engine) =
        common::engine_or_skip("a_new_session_reuses_another_sessions_system_prompt")
    else {
        return;
    };
    let system = ChatMessage::new(
        Role::System,
        "You are the phone assistant of the Riverside pharmacy. Answer in one short sentence.",
    );
    let conv_a = vec![system.clone(), ChatMessage::new(Role::User, QUESTION)];
    let conv_b = vec![system, ChatMessage::new(Role::User, "Say hello.")];
    // Through the system message's <|im_end|>: the rendering of the system message
    // alone ends with "\n<|im_start|>assistant\n", 4 more tokens.
    let system_tokens = engine.count_tokens(&conv_a[..1]).expect("count") - 4;

    let mut session_a = engine.new_session();
    let (_, a) = run(session_a.as_mut(), &conv_a, 4);
    assert_eq!(a.cached_tokens, 0);
    let (text_b, b) = run(engine.new_session().as_mut(), &conv_b, 8);
    assert_eq!(
        b.cached_tokens, system_tokens,
        "the second call starts from the shared prefix"
    );
    // The copied prefix gives the same answer as the session that computed it.
    let (text_b_in_a, b_in_a) = run(session_a.as_mut(), &conv_b, 8);
    assert!(b_in_a.cached_tokens > system_tokens);
    assert_eq!(text_b, text_b_in_a);
}

#[test]
fn a_reply_after_a_speculative_prefill_starts_without_running_a_token_again() {
    let Some(engine) = common::engine_or_skip("a_reply_after_a_speculative_prefill_starts_without_running_a_token_again")
    else {
        return;
    };
    // Its own system prompt: the engine's shared system-prompt cache must not serve
    // the other tests' first turns.
    let conv = vec![
        ChatMessage::new(Role::System, "You answer questions in one word."),
        ChatMessage::new(Role::User, QUESTION),
    ];
    let mut fresh = engine.new_session();
    let (want, _) = run(fresh.as_mut(), &conv, 16);

    let mut session = engine.new_session();
    let prompt = session
        .prefill(&conv, &GenerateOptions::default())
        .expect("prefill")
        .expect("the embedded engine keeps a cache");
    let (answer, stats) = run(session.as_mut(), &conv, 16);
    assert_eq!(stats.prompt_tokens, prompt);
    assert_eq!(
        stats.cached_tokens, stats.prompt_tokens,
        "the prefill's logits are used as they are: nothing runs before sampling"
    );
    assert_eq!(answer, want, "the same greedy answer as without the prefill");
}
