//! The tool-call grammar over the real Qwen2.5 tokenizer (skipped with a message when
//! the model is not installed). Tokens are drawn at random from what the grammar
//! allows (an adversary, not a model): whatever is drawn, the finished call names an
//! offered tool, its arguments parse against the schema, and a narrowed id is one the
//! conversation holds. Also, on the real model, a question about an order nobody
//! named gets no call with an invented id.

mod common;

use std::ops::ControlFlow;

use parley_llm::grammar::ToolCallGrammar;
use parley_llm::known_ids::narrow;
use parley_llm::tokenizer::load_tokenizer;
use parley_llm::{ChatMessage, GenerateOptions, LlmEngine, Role, ToolSpec};
use serde_json::{Value, json};

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_order_details".into(),
            description: "Get one order's status.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^ORD[0-9]{3,6}$", "x-parley-known": true}},
                "required": ["order_id"]
            }),
        },
        ToolSpec {
            name: "request_refill".into(),
            description: "Request a refill.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "rx_id": {"type": "string", "pattern": "^RX[0-9]{3,8}$", "x-parley-known": true},
                    "confirm": {"type": "boolean"}
                },
                "required": ["rx_id"]
            }),
        },
        ToolSpec {
            name: "get_weather".into(),
            description: "Weather in a city.".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"]}),
        },
    ]
}

/// A tiny xorshift, so the test needs no crate and repeats exactly.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn any_token_the_grammar_allows_ends_in_a_valid_call() {
    let Some((_, Some(tokenizer_path))) = common::model_files() else {
        eprintln!("skipping: no tokenizer.json installed (run `parley models install`)");
        return;
    };
    let tokenizer = load_tokenizer(&tokenizer_path).expect("tokenizer");
    let vocab = 151_936;
    let eos = tokenizer.token_to_id("<|im_end|>").expect("im_end");
    let grammar = ToolCallGrammar::new(&tokenizer, vocab, eos).expect("grammar").expect("Qwen has <tool_call>");
    let close = tokenizer.token_to_id("</tool_call>").expect("close tag");

    let said = [
        ChatMessage::new(Role::User, "My order is O R D zero zero four and my prescription RX1003."),
        ChatMessage::tool_result("c1", r#"{"orders": ["ORD002"]}"#),
    ];
    let callable = narrow(&tools(), &said);
    assert_eq!(callable.len(), 3);

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..24 {
        let mut matcher = grammar.matcher(&callable).expect("matcher");
        let mut ids = Vec::new();
        let mut done = false;
        for _ in 0..400 {
            // Random logits: the draw is whatever token the mask lets win.
            let mut logits: Vec<f32> = (0..vocab).map(|_| (next(&mut state) % 10_000) as f32).collect();
            // Every other round, lean hard towards closing early, so short and
            // truncated paths are tried too.
            if round % 2 == 1 {
                logits[close as usize] = 1e9;
            }
            matcher.mask(&mut logits).expect("mask");
            let (token, _) = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, v)| (i as u32, *v))
                .expect("a token");
            assert!(logits[token as usize].is_finite(), "the grammar allowed nothing");
            ids.push(token);
            if matcher.advance(token).expect("advance") {
                done = true;
                break;
            }
        }
        let text = tokenizer.decode(&ids, false).expect("decode");
        assert!(done, "round {round}: the call did not close in 400 tokens: {text:?}");
        let body = text.trim_end_matches("</tool_call>").trim();
        let call: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("round {round}: {e}: {text:?}"));
        let name = call["name"].as_str().expect("a name");
        let args = call["arguments"].as_object().expect("an arguments object");
        match name {
            "get_order_details" => assert!(["ORD004", "ORD002"].contains(&args["order_id"].as_str().expect("order_id is a string")), "{text}"),
            "request_refill" => {
                assert_eq!(args["rx_id"], "RX1003", "{text}");
                assert!(args.keys().all(|k| k == "rx_id" || k == "confirm"), "{text}");
                if let Some(c) = args.get("confirm") {
                    assert!(c.is_boolean(), "{text}");
                }
            }
            "get_weather" => {
                assert!(args["city"].as_str().expect("city is a string").chars().count() <= 12, "{text}");
                if let Some(d) = args.get("days") {
                    assert!((1..=7).contains(&d.as_i64().expect("days is an integer")), "{text}");
                }
            }
            other => panic!("round {round}: a tool nobody offered: {other} in {text:?}"),
        }
    }
}

#[test]
fn a_question_about_an_unnamed_order_never_calls_with_an_invented_id() {
    let Some(engine) = common::engine_or_skip("a_question_about_an_unnamed_order_never_calls_with_an_invented_id") else {
        return;
    };
    let mut session = engine.new_session();
    let messages = [
        ChatMessage::new(Role::System, "You answer the phone at a pharmacy. Use the tools to look up orders."),
        ChatMessage::new(Role::User, "Hi, can you check the status of my order?"),
    ];
    let options = GenerateOptions { max_tokens: 48, tools: tools()[..1].to_vec(), ..GenerateOptions::default() };
    let mut spoken = String::new();
    let stats = session
        .generate(&messages, &options, &mut |t| {
            spoken.push_str(t);
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert!(stats.tool_calls.is_empty(), "no order id is known, yet it called {:?}", stats.tool_calls);
    assert!(!spoken.contains("<tool_call>"), "{spoken}");

    // Once the caller names it, the call goes through with that id.
    let messages = [
        ChatMessage::new(Role::System, "You answer the phone at a pharmacy. Use the tools to look up orders."),
        ChatMessage::new(Role::User, "Hi, can you check the status of my order ORD004?"),
    ];
    let mut spoken = String::new();
    let stats = session
        .generate(&messages, &options, &mut |t| {
            spoken.push_str(t);
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(stats.tool_calls.len(), 1, "{stats:?}, spoken: {spoken:?}");
    assert_eq!(stats.tool_calls[0].arguments["order_id"], "ORD004");
}
