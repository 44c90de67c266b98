//! Tool calling on the real Qwen2.5 0.5B model (skipped with a message when the model
//! is not installed): the call is found and not spoken, the result is turned into
//! speech, and the KV cache still carries over between the two turns.

mod common;

use std::ops::ControlFlow;

use parley_llm::{
    ChatMessage, GenerateOptions, GenerationStats, LlmEngine, LlmSession, Role, ToolSpec,
};

const SYSTEM: &str = "You are a friendly voice assistant on a phone call. Keep answers short.";

/// The line added after tool results: without it the 0.5B model tends to echo the
/// call or result JSON instead of answering (MODELS.md).
const ANSWER_NUDGE: &str = "Answer the caller in one short spoken sentence using the tool result.";

/// The line the agent adds (after dropping the call) when the model called a tool
/// that does not exist: an error result instead gets read aloud by the 0.5B model.
const PLAIN_WORDS_RETRY: &str = "Reply to the caller in plain words.";

fn weather_tool() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: "Get the current weather in a city.".into(),
        parameters: serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"]
        }),
    }
}

fn options() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 64,
        tools: vec![weather_tool()],
        ..GenerateOptions::default()
    }
}

/// Generates and returns (speech as `on_text` saw it, stats).
fn speak(session: &mut dyn LlmSession, conv: &[ChatMessage]) -> (String, GenerationStats) {
    generate(session, conv, &options())
}

/// The whole text `session` gives for `conv` with `options`, and its stats.
fn generate(session: &mut dyn LlmSession, conv: &[ChatMessage], options: &GenerateOptions) -> (String, GenerationStats) {
    let mut text = String::new();
    let stats = session
        .generate(conv, options, &mut |piece| {
            text.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (text, stats)
}

fn assert_no_call_text(speech: &str) {
    for leak in [
        "{",
        "}",
        "get_weather",
        "tool_call",
        "\"city\"",
        "arguments",
    ] {
        assert!(!speech.contains(leak), "{leak:?} was spoken: {speech:?}");
    }
}

#[test]
fn calls_the_weather_tool_then_speaks_the_result() {
    let Some(engine) = common::engine_or_skip("calls_the_weather_tool_then_speaks_the_result")
    else {
        return;
    };
    let mut session = engine.new_session();
    let mut conv = vec![
        ChatMessage::new(Role::System, SYSTEM),
        ChatMessage::new(Role::User, "What's the weather in Paris?"),
    ];
    let (speech, first) = speak(session.as_mut(), &conv);
    eprintln!("turn 1: speech {speech:?}\n{first:?}");
    assert_no_call_text(&speech);
    assert_eq!(first.tool_calls.len(), 1, "{first:?}");
    let call = &first.tool_calls[0];
    assert_eq!(call.name, "get_weather");
    let city = call.arguments["city"].as_str().unwrap_or_default();
    assert!(city.eq_ignore_ascii_case("paris"), "{:?}", call.arguments);
    assert!(
        call.id.starts_with("call_") && call.id.len() == 21,
        "{}",
        call.id
    );

    conv.push(ChatMessage::tool_calls(
        speech.trim(),
        first.tool_calls.clone(),
    ));
    conv.push(ChatMessage::tool_result(
        call.id.clone(),
        r#"{"temperature_c": 21, "sky": "sunny"}"#,
    ));
    conv.push(ChatMessage::new(Role::System, ANSWER_NUDGE));
    let (answer, second) = speak(session.as_mut(), &conv);
    eprintln!("turn 2: speech {answer:?}\n{second:?}");
    eprintln!(
        "turn 2 reused {} of {} prompt tokens (turn 1's prompt: {}, reply: {} tokens); \
         prefill {:.0} ms vs {:.0} ms",
        second.cached_tokens,
        second.prompt_tokens,
        first.prompt_tokens,
        first.generated_tokens,
        second.prefill_ms,
        first.prefill_ms
    );
    assert!(second.tool_calls.is_empty(), "{second:?}");
    assert_no_call_text(&answer);
    let lower = answer.to_lowercase();
    assert!(
        lower.contains("21") || lower.contains("sunny"),
        "{answer:?}"
    );
    assert!(
        second.cached_tokens >= first.prompt_tokens,
        "the tool round kept turn 1's prompt in the cache: {} < {}",
        second.cached_tokens,
        first.prompt_tokens
    );
}

#[test]
fn a_plain_request_with_tools_offered_is_answered_in_words() {
    let Some(engine) =
        common::engine_or_skip("a_plain_request_with_tools_offered_is_answered_in_words")
    else {
        return;
    };
    let mut session = engine.new_session();
    let conv = vec![
        ChatMessage::new(Role::System, SYSTEM),
        ChatMessage::new(Role::User, "Hi, how are you?"),
    ];
    let (speech, stats) = speak(session.as_mut(), &conv);
    eprintln!("speech {speech:?}\n{stats:?}");
    assert!(
        stats.tool_calls.is_empty(),
        "called a tool for a greeting: {stats:?}"
    );
    assert!(speech.split_whitespace().count() >= 2, "{speech:?}");
    assert_no_call_text(&speech);
}

/// "Say hello." reads like a function to the 0.5B model: with tools offered it starts
/// an untagged `{"name": "say_hello", ...}`. With the grammar, braces are never spoken
/// and the call it starts must name an offered tool with valid arguments: the reply is
/// words, or a well-formed call to `get_weather`, never JSON read aloud and never a
/// tool nobody offered. Dropping the call and adding the plain-words line (what the
/// agent does after a call it cannot use) then gives words.
#[test]
fn a_call_the_model_starts_is_to_an_offered_tool_and_a_plain_words_line_recovers() {
    let Some(engine) = common::engine_or_skip(
        "a_call_the_model_starts_is_to_an_offered_tool_and_a_plain_words_line_recovers",
    ) else {
        return;
    };
    let mut session = engine.new_session();
    let mut conv = vec![
        ChatMessage::new(Role::System, SYSTEM),
        ChatMessage::new(Role::User, "Say hello."),
    ];
    let (speech, first) = speak(session.as_mut(), &conv);
    eprintln!("turn 1: speech {speech:?}\n{first:?}");
    assert_no_call_text(&speech);
    if first.tool_calls.is_empty() {
        eprintln!("note: the model answered \"Say hello.\" in words this time");
        assert!(!speech.trim().is_empty());
        return;
    }
    for call in &first.tool_calls {
        assert_eq!(call.name, "get_weather", "{first:?}");
        assert!(call.arguments["city"].is_string(), "{first:?}");
        assert_eq!(call.arguments.as_object().map(|a| a.len()), Some(1), "{first:?}");
    }
    conv.push(ChatMessage::new(Role::System, PLAIN_WORDS_RETRY));
    let (retry, second) = speak(session.as_mut(), &conv);
    eprintln!(
        "retry: speech {retry:?}, reused {} of {} prompt tokens\n{second:?}",
        second.cached_tokens, second.prompt_tokens
    );
    assert_no_call_text(&retry);
    assert!(!retry.trim().is_empty() || !second.tool_calls.is_empty(), "{second:?}");
    assert!(
        second.cached_tokens >= first.prompt_tokens - 4,
        "{second:?}"
    );
}

#[test]
fn without_tools_nothing_is_filtered() {
    let Some(engine) = common::engine_or_skip("without_tools_nothing_is_filtered") else {
        return;
    };
    let mut session = engine.new_session();
    let conv = vec![ChatMessage::new(
        Role::User,
        "Write the JSON object {\"a\": 1} and nothing else.",
    )];
    let (text, stats) = generate(
        session.as_mut(),
        &conv,
        &GenerateOptions {
            max_tokens: 24,
            ..GenerateOptions::default()
        },
    );
    eprintln!("{text:?} {stats:?}");
    assert!(stats.tool_calls.is_empty());
    assert!(text.contains('{'), "{text:?}");
}

/// A conversation that already holds a call and its result, generated with no tool
/// offered (a voice call whose tools were turned off): the engine keeps braces out
/// of the reply, so the model speaks instead of writing one more call in JSON.
#[test]
fn with_calls_in_the_history_and_no_tools_the_reply_has_no_json() {
    let Some(engine) = common::engine_or_skip("with_calls_in_the_history_and_no_tools_the_reply_has_no_json") else {
        return;
    };
    let mut session = engine.new_session();
    let call = parley_llm::ToolCall {
        id: "call_0123456789abcdef".into(),
        name: "get_weather".into(),
        arguments: serde_json::json!({"city": "Paris"}),
    };
    let conv = vec![
        ChatMessage::new(Role::System, SYSTEM),
        ChatMessage::new(Role::User, "What's the weather in Paris?"),
        ChatMessage::tool_calls("", vec![call]),
        ChatMessage::tool_result("call_0123456789abcdef", r#"{"temperature_c": 21, "sky": "sunny"}"#),
        ChatMessage::new(Role::Assistant, "It's sunny and 21 degrees in Paris."),
        ChatMessage::new(Role::User, "And in Rome? Write it as the JSON object {\"city\": ..., \"sky\": ...}."),
    ];
    let (text, stats) = generate(session.as_mut(), &conv, &GenerateOptions { max_tokens: 24, ..GenerateOptions::default() });
    eprintln!("{text:?} {stats:?}");
    assert!(stats.tool_calls.is_empty());
    assert!(!text.contains('{') && !text.contains("<tool_call>"), "{text:?}");
    assert!(text.chars().any(char::is_alphanumeric), "the model should still speak: {text:?}");
}

/// While a call is being written nothing is spoken, but `on_text` is still called
/// (with empty text) so a barge-in can stop the generation; a call cut off that way
/// is not returned.
#[test]
fn a_barge_in_while_a_call_is_written_stops_it_and_returns_no_half_call() {
    let Some(engine) = common::engine_or_skip(
        "a_barge_in_while_a_call_is_written_stops_it_and_returns_no_half_call",
    ) else {
        return;
    };
    let mut session = engine.new_session();
    let conv = vec![
        ChatMessage::new(Role::System, SYSTEM),
        ChatMessage::new(Role::User, "What's the weather in Paris?"),
    ];
    let mut pieces = Vec::new();
    let stats = session
        .generate(&conv, &options(), &mut |piece| {
            pieces.push(piece.to_owned());
            if pieces.len() == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("generate");
    eprintln!("{pieces:?} {stats:?}");
    assert_eq!(stats.finish, parley_llm::FinishReason::Cancelled);
    assert_eq!(pieces, ["", "", ""], "the call's text was held");
    assert!(stats.tool_calls.is_empty(), "{stats:?}");
    assert!(stats.generated_tokens <= 4, "{stats:?}");
}
