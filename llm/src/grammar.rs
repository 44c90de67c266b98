//! Constrained tool calls for the embedded engine.
//!
//! A reply is free text until the model writes Qwen's `<tool_call>` token; from there
//! to its `</tool_call>` every token is masked by a grammar, so the call is always
//! well-formed: one of the offered tools by name, and arguments that parse against
//! that tool's JSON schema (with ids narrowed to the ones the conversation holds, see
//! [`crate::known_ids`]). When no offered tool can be called, the `<tool_call>` token
//! itself is masked and the model can only speak.
//!
//! The grammar engine is `llguidance` (the one llama.cpp, vLLM and mistral.rs use):
//! a Lark grammar with the arguments as embedded JSON schemas, and a token mask per
//! step computed over the model's tokenizer. Only the tokens of a call pay for the
//! mask; speech is sampled as before.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::{LlmError, ToolSpec};

/// Qwen's tag that opens a tool call; sampling it starts the grammar.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Qwen's tag that closes a tool call; the grammar ends with it.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// Builds grammars over one model's tokenizer. Made once when the model loads (it
/// indexes every token's bytes) and shared by all calls.
pub struct ToolCallGrammar {
    factory: Arc<ParserFactory>,
    /// The `<tool_call>` token.
    open: u32,
    /// Tokens that speech never needs and that start a call written without its
    /// tags (`{`, `}`, a backtick fence, `<`): masked while the model speaks with
    /// tools offered, so a call can only come tagged, and so constrained.
    not_speech: Vec<u32>,
    /// Of those, the ones that open something (`{`, a fence, `<`, after any blanks):
    /// the model writing one with tools offered is starting a call.
    call_starts: Vec<u32>,
    vocab: usize,
}

impl std::fmt::Debug for ToolCallGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolCallGrammar").field("open", &self.open).field("vocab", &self.vocab).finish()
    }
}

impl ToolCallGrammar {
    /// Indexes `tokenizer`'s tokens for masks over `vocab` logits (the model's
    /// vocabulary, which may be larger than the tokenizer's). `None` when the
    /// tokenizer has no `<tool_call>` token: the model has no tagged calls to constrain.
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: u32) -> Result<Option<Self>, LlmError> {
        let Some(open) = tokenizer.token_to_id(TOOL_CALL_OPEN) else {
            return Ok(None);
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| LlmError::Tokenizer(format!("tool-call grammar: {what}: {e}"));
        let json = tokenizer.to_string(false).map_err(|e| fail("cannot serialize the tokenizer", &e))?;
        let json: Value = serde_json::from_str(&json).map_err(|e| fail("cannot read the tokenizer", &e))?;
        let mut tokens = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| fail("cannot index the tokens", &e))?;
        drop(json);
        if tokens.len() > vocab {
            return Err(fail("the tokenizer is larger than the model", &format!("{} > {vocab}", tokens.len())));
        }
        tokens.resize(vocab, Vec::new());
        let not_speech = tokens
            .iter()
            .enumerate()
            .filter(|(id, bytes)| {
                *id as u32 != open
                    && bytes.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER)
                    && bytes.iter().any(|b| matches!(b, b'{' | b'}' | b'`' | b'<'))
            })
            .map(|(id, _)| id as u32)
            .collect::<Vec<u32>>();
        let call_starts = not_speech
            .iter()
            .copied()
            .filter(|&id| {
                let bytes = &tokens[id as usize];
                let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
                start.is_some_and(|i| matches!(bytes[i], b'{' | b'`' | b'<'))
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &tokens);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| fail("cannot start the grammar engine", &e))?;
        factory.quiet();
        Ok(Some(Self { factory: Arc::new(factory), open, not_speech, call_starts, vocab }))
    }

    /// The `<tool_call>` token, which starts a call.
    pub fn open_token(&self) -> u32 {
        self.open
    }

    /// Masks what the model may not write while it speaks with tools offered: an
    /// untagged call's braces, and `<tool_call>` itself when `can_call` is false.
    /// With `redirect` (and a tool it can call), the model's wish to open a brace or
    /// a fence (the 0.5B model often starts an untagged call so) becomes a wish to
    /// open a tagged call: `<tool_call>` gets the best of those tokens' logits, and
    /// the grammar then keeps the call well-formed. Not right after a tool result:
    /// there a brace is the small model echoing the result's JSON, and it should
    /// speak instead.
    pub fn mask_speech(&self, logits: &mut [f32], can_call: bool, redirect: bool) {
        let best_start = self.call_starts.iter().filter_map(|&id| logits.get(id as usize).copied()).fold(f32::NEG_INFINITY, f32::max);
        if let Some(v) = logits.get_mut(self.open as usize).filter(|_| can_call && redirect) {
            *v = v.max(best_start + 1e-3);
        }
        for &id in &self.not_speech {
            if let Some(v) = logits.get_mut(id as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if let Some(v) = logits.get_mut(self.open as usize).filter(|_| !can_call) {
            *v = f32::NEG_INFINITY;
        }
    }

    /// A matcher for one call to one of `tools`, started just after `<tool_call>`:
    /// `{"name": "<tool>", "arguments": <object valid against its schema>}` on its
    /// own line, then `</tool_call>`. `tools` must not be empty.
    pub fn matcher(&self, tools: &[ToolSpec]) -> Result<CallMatcher, LlmError> {
        let grammar = TopLevelGrammar::from_lark(lark_for(tools)?);
        let parser = self.factory.create_parser(grammar).map_err(|e| LlmError::Model(format!("tool-call grammar: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(LlmError::Model(format!("tool-call grammar: {e}")));
        }
        Ok(CallMatcher { matcher, vocab: self.vocab })
    }
}

/// The Lark grammar of one tagged call to any of `tools`.
fn lark_for(tools: &[ToolSpec]) -> Result<String, LlmError> {
    if tools.is_empty() {
        return Err(LlmError::Model("tool-call grammar: no tool to call".into()));
    }
    let mut lark = String::from("start: \"\\n\"? call \"\\n\"? \"</tool_call>\"\ncall: ");
    lark.push_str(&(0..tools.len()).map(|i| format!("tool{i}")).collect::<Vec<_>>().join(" | "));
    lark.push('\n');
    for (i, tool) in tools.iter().enumerate() {
        let name = serde_json::to_string(&tool.name).map_err(|e| LlmError::Model(e.to_string()))?;
        // The literal text `{"name": "<tool>", "arguments": `, as a Lark string.
        let head = format!("{{\"name\": {name}, \"arguments\": ");
        let head = serde_json::to_string(&head).map_err(|e| LlmError::Model(e.to_string()))?;
        let schema = serde_json::to_string(&closed_schema(&tool.parameters)).map_err(|e| LlmError::Model(e.to_string()))?;
        lark.push_str(&format!("tool{i}: {head} args{i} \"}}\"\nargs{i}: %json {schema}\n"));
    }
    Ok(lark)
}

/// Longest string argument a call may write when its schema sets no bound: a voice
/// tool's arguments are short, and a small model can otherwise loop inside a string.
const MAX_STRING_ARGUMENT: u64 = 80;

/// `schema` as the grammar takes it: an object, with no properties beyond the named
/// ones (a small model otherwise invents extra keys), strings bounded, JSON written
/// as Qwen writes it (`", "` and `": "`, no other whitespace, so it cannot pad a call
/// with blanks forever), and our `x-` annotations left out.
fn closed_schema(schema: &Value) -> Value {
    let mut schema = match schema {
        Value::Object(map) if !map.is_empty() => Value::Object(map.clone()),
        _ => json!({"type": "object", "properties": {}}),
    };
    strip_annotations(&mut schema);
    if let Value::Object(map) = &mut schema {
        map.entry("type").or_insert_with(|| json!("object"));
        if map.get("type") == Some(&json!("object")) {
            map.entry("additionalProperties").or_insert(Value::Bool(false));
        }
        map.insert("x-guidance".into(), json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    bound_strings(&mut schema);
    schema
}

/// Gives every free string schema (no enum, const or length bound) a maximum length.
fn bound_strings(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let free_string = map.get("type") == Some(&json!("string"))
                && !["enum", "const", "maxLength"].iter().any(|k| map.contains_key(*k));
            if free_string {
                map.insert("maxLength".into(), json!(MAX_STRING_ARGUMENT));
            }
            map.values_mut().for_each(bound_strings);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_strings),
        _ => {}
    }
}

/// Removes `x-parley-*` keys, which are ours, not JSON schema's.
pub(crate) fn strip_annotations(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with("x-parley"));
            map.values_mut().for_each(strip_annotations);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_annotations),
        _ => {}
    }
}

/// One call being written: which tokens may come next, until `</tool_call>`.
pub struct CallMatcher {
    matcher: Matcher,
    vocab: usize,
}

impl CallMatcher {
    /// Sets every logit the grammar forbids next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), LlmError> {
        let allowed = self.matcher.compute_mask().map_err(|e| LlmError::Model(format!("tool-call grammar: {e}")))?;
        let n = logits.len().min(self.vocab);
        for (id, logit) in logits.iter_mut().enumerate().take(n) {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        for logit in logits.iter_mut().skip(n) {
            *logit = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Moves past the sampled token. Returns true when the call is complete (its
    /// `</tool_call>` was written).
    pub fn advance(&mut self, token: u32) -> Result<bool, LlmError> {
        self.matcher.consume_token(token).map_err(|e| LlmError::Model(format!("tool-call grammar: {e}")))?;
        if self.matcher.is_stopped() {
            return Ok(true);
        }
        // Complete when nothing but the end of the sequence may follow.
        let done = self.matcher.is_accepting().unwrap_or(false)
            && self.matcher.compute_mask().map(|m| m.num_set() <= 1).unwrap_or(true);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lark_grammar_names_every_tool_and_closes_its_schema() {
        let tools = vec![
            ToolSpec { name: "get_order".into(), description: String::new(), parameters: json!({"type": "object", "properties": {"order_id": {"type": "string", "x-parley-known": true}}, "required": ["order_id"]}) },
            ToolSpec { name: "hang_up".into(), description: String::new(), parameters: json!({}) },
        ];
        let lark = lark_for(&tools).expect("a grammar");
        assert!(lark.contains("call: tool0 | tool1"), "{lark}");
        assert!(lark.contains(r#"tool0: "{\"name\": \"get_order\", \"arguments\": " args0"#), "{lark}");
        assert!(lark.contains("\"additionalProperties\":false"), "{lark}");
        assert!(!lark.contains("x-parley"), "{lark}");
        assert!(lark_for(&[]).is_err());
    }
}
