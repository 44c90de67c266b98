//! The tokenizer built from the GGUF metadata, against the real model's vocabulary.

mod common;

use parley_llm::tokenizer::{TextStream, tokenizer_from_json, tokenizer_json_from_gguf};
use tokenizers::Tokenizer;

fn tokenizer_or_skip(test: &str) -> Option<Tokenizer> {
    let gguf = common::gguf_or_skip(test)?;
    let json = tokenizer_json_from_gguf(&gguf).expect("tokenizer.json from the GGUF");
    Some(tokenizer_from_json(&json).expect("the built tokenizer.json loads"))
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).expect("encode").get_ids().to_vec()
}

#[test]
fn known_strings_tokenize_to_the_models_ids() {
    let Some(tok) = tokenizer_or_skip("known_strings_tokenize_to_the_models_ids") else {
        return;
    };
    assert_eq!(ids(&tok, "Hello"), vec![9707]);
    assert_eq!(ids(&tok, "Hello, world!"), vec![9707, 11, 1879, 0]);
    // A ChatML fragment: control tokens whole, "\n" is 198.
    assert_eq!(
        ids(&tok, "<|im_start|>user\nHi<|im_end|>\n"),
        vec![151644, 872, 198, 13048, 151645, 198]
    );
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151643));
    assert_eq!(ids(&tok, "<tool_call>"), vec![151657]);
    // Qwen2 splits digits one by one.
    assert_eq!(ids(&tok, "2024").len(), 4);
}

#[test]
fn mixed_text_round_trips() {
    let Some(tok) = tokenizer_or_skip("mixed_text_round_trips") else {
        return;
    };
    let text = "<|im_start|>system\nYou're a pharmacist.<|im_end|>\n  Café ☕ 12345 \
                naïve 東京 😀\t\r\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>";
    let encoded = ids(&tok, text);
    assert_eq!(tok.decode(&encoded, false).expect("decode"), text);

    // Streaming the same ids yields the same text, with no broken characters.
    let mut stream = TextStream::new(&tok);
    let mut streamed = String::new();
    for &id in &encoded {
        if let Some(piece) = stream.push(id).expect("push") {
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            streamed.push_str(&piece);
        }
    }
    if let Some(rest) = stream.flush().expect("flush") {
        streamed.push_str(&rest);
    }
    assert_eq!(streamed, text);
}

#[test]
fn written_tokenizer_json_loads_from_disk() {
    let Some(gguf) = common::gguf_or_skip("written_tokenizer_json_loads_from_disk") else {
        return;
    };
    let started = std::time::Instant::now();
    let json = tokenizer_json_from_gguf(&gguf).expect("json");
    eprintln!(
        "built tokenizer.json ({} bytes) in {:?}",
        json.len(),
        started.elapsed()
    );
    let path =
        std::env::temp_dir().join(format!("parley-llm-tokenizer-{}.json", std::process::id()));
    std::fs::write(&path, &json).expect("write");
    let loaded = parley_llm::tokenizer::load_tokenizer(&path);
    let _ = std::fs::remove_file(&path);
    let tok = loaded.expect("load from disk");
    assert_eq!(ids(&tok, "Hello"), vec![9707]);
    assert_eq!(tok.get_vocab_size(true), 151936);
}
