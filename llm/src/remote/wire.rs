//! The OpenAI chat-completions wire format, as far as the remote engine needs it:
//! the request body it sends, the streamed chunks it reads, and the accumulation of
//! tool-call fragments into whole calls.
//!
//! Parsing is lenient in what servers disagree on (a `null` where a field is
//! expected, tool-call arguments sent as an object instead of a string, a missing
//! fragment `index`) and strict only where the answer would otherwise be wrong.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::toolcall::new_call_id;
use crate::{ChatMessage, GenerateOptions, Role, ToolCall, ToolChoice};

/// The JSON body of a streamed chat-completions request.
///
/// With `repeat_penalty`, it also sends the request's repeat penalty (when on) under
/// the names vLLM and SGLang (`repetition_penalty`) and llama.cpp's server
/// (`repeat_penalty`, `repeat_last_n`) read; these servers ignore the names they do
/// not know. See [`super::ReplicaConfig::forward_repeat_penalty`] for why it is off
/// by default.
pub fn request_body(model: &str, messages: &[ChatMessage], options: &GenerateOptions, repeat_penalty: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "seed": options.seed,
    });
    if repeat_penalty && options.repeat_penalty != 1.0 {
        body["repetition_penalty"] = json!(options.repeat_penalty);
        body["repeat_penalty"] = json!(options.repeat_penalty);
        body["repeat_last_n"] = json!(options.repeat_last_n);
    }
    // A reply that may not call a tool is sent without them: llama.cpp's server
    // still lays the tools out in the prompt under `"tool_choice": "none"`, and a
    // small model then keeps writing calls as text (never spoken, so the caller
    // hears nothing). The prompt's tools block already changes between rounds as
    // ids become known, so a replica's prefix cache loses nothing more by this.
    if !options.tools.is_empty() && options.tool_choice != ToolChoice::None {
        // The tools as they may be called now: ids narrowed to the known ones
        // (servers that constrain tool calls with the schema, such as llama.cpp's
        // with --jinja, then cannot invent one). A look-up required about the
        // records the caller just named takes only those ids, as the embedded
        // engine's grammar does ([`crate::known_ids::callable`]); other choices see
        // every tool, so that a named function still has its neighbours.
        let tools = match options.tool_choice {
            ToolChoice::RequiredNamed => crate::known_ids::callable(options, messages),
            _ => crate::known_ids::narrow(&options.tools, messages),
        };
        // Servers refuse an empty list: with no tool callable now, none is offered.
        if tools.is_empty() {
            return body;
        }
        body["tools"] = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
            .collect();
        body["tool_choice"] = match &options.tool_choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required | ToolChoice::RequiredNamed => json!("required"),
            ToolChoice::Function(name) if tools.iter().any(|t| &t.name == name) => json!({"type": "function", "function": {"name": name}}),
            // The named tool cannot be called yet (its id is not known): let it choose.
            ToolChoice::Function(_) => json!("auto"),
        };
    }
    body
}

/// The wire name of a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// One message as the API expects it: tool-call arguments are a JSON *string*.
pub fn message_json(m: &ChatMessage) -> Value {
    let mut v = json!({"role": role_name(m.role), "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m.tool_calls.iter().map(tool_call_json).collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// A whole tool call in the API's shape.
pub fn tool_call_json(c: &ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments_string(&c.arguments)}})
}

/// Arguments as the string the API carries: a string stays as written, anything
/// else is serialized.
pub fn arguments_string(arguments: &Value) -> String {
    match arguments {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Arguments as [`ToolCall`] holds them: the parsed object when the text is valid
/// JSON, `{}` when empty, else the raw text (so the agent can tell the model its
/// JSON was broken).
pub fn parse_arguments(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// One streamed `chat.completion.chunk` (only the fields used).
#[derive(Debug, Default, Deserialize)]
pub struct Chunk {
    #[serde(default, deserialize_with = "null_as_default")]
    pub choices: Vec<ChunkChoice>,
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Some servers report a failure mid-stream as `data: {"error": …}`.
    #[serde(default)]
    pub error: Option<Value>,
}

/// A choice in a chunk; Parley asks for one (`n` = 1).
#[derive(Debug, Default, Deserialize)]
pub struct ChunkChoice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the message.
#[derive(Debug, Default, Deserialize)]
pub struct Delta {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A fragment of a tool call.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the message this fragment belongs to.
    #[serde(default)]
    pub index: Option<usize>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: Option<FunctionDelta>,
}

/// The function part of a tool-call fragment.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FunctionDelta {
    #[serde(default)]
    pub name: Option<String>,
    /// A piece of the arguments' JSON text (a few servers send a whole object).
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// Token counts, sent in the last chunk when `stream_options.include_usage` is set.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<usize>,
    #[serde(default)]
    pub completion_tokens: Option<usize>,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// Where servers report prefix-cache hits.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<usize>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One `data:` payload of the stream, interpreted.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk.
    Chunk(Chunk),
    /// `[DONE]`: the stream ended well.
    Done,
}

/// Parses one `data:` payload.
pub fn parse_event(data: &str) -> Result<StreamEvent, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(StreamEvent::Done);
    }
    serde_json::from_str::<Chunk>(data)
        .map(StreamEvent::Chunk)
        .map_err(|e| format!("a streamed chunk is not chat-completion JSON ({e}): {}", truncate(data, 200)))
}

/// The message of an OpenAI-style error body (`{"error": {"message": …}}`), else the
/// body itself, shortened.
pub fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let e = v.get("error")?;
        e.get("message").and_then(Value::as_str).map(str::to_string).or_else(|| e.as_str().map(str::to_string))
    });
    message.unwrap_or_else(|| truncate(body.trim(), 300).to_string())
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// Builds whole tool calls from streamed fragments: the first fragment of a call
/// carries its id and name, the rest carry pieces of the arguments' JSON text.
#[derive(Debug, Default)]
pub struct ToolCallAccumulator {
    calls: Vec<PartialCall>,
}

#[derive(Debug, Default)]
struct PartialCall {
    index: Option<usize>,
    id: Option<String>,
    name: String,
    arguments: String,
}

impl ToolCallAccumulator {
    /// Adds one fragment.
    pub fn push(&mut self, delta: &ToolCallDelta) {
        let slot = match delta.index {
            Some(i) => match self.calls.iter().position(|c| c.index == Some(i)) {
                Some(pos) => pos,
                None => self.open(delta.index),
            },
            // No index: a fragment with a new id starts a call, the rest continue
            // the last one.
            None => match (&delta.id, self.calls.last()) {
                (Some(id), Some(last)) if last.id.as_deref() == Some(id.as_str()) => self.calls.len() - 1,
                (None, Some(_)) => self.calls.len() - 1,
                _ => self.open(None),
            },
        };
        let call = &mut self.calls[slot];
        if let Some(id) = delta.id.as_deref().filter(|s| !s.is_empty()) {
            call.id.get_or_insert_with(|| id.to_string());
        }
        if let Some(f) = &delta.function {
            if let Some(name) = &f.name {
                call.name.push_str(name);
            }
            match &f.arguments {
                Some(Value::String(piece)) => call.arguments.push_str(piece),
                Some(Value::Null) | None => {}
                Some(whole) => call.arguments.push_str(&whole.to_string()),
            }
        }
    }

    fn open(&mut self, index: Option<usize>) -> usize {
        self.calls.push(PartialCall { index, ..PartialCall::default() });
        self.calls.len() - 1
    }

    /// Whether any fragment arrived.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The calls, in the order they were opened; calls without a name are dropped
    /// (nothing could run them), calls without an id get one.
    pub fn finish(self) -> Vec<ToolCall> {
        self.calls
            .into_iter()
            .filter(|c| !c.name.trim().is_empty())
            .map(|c| ToolCall {
                id: c.id.unwrap_or_else(new_call_id),
                name: c.name.trim().to_string(),
                arguments: parse_arguments(&c.arguments),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ToolSpec;

    fn chunk(data: &str) -> Chunk {
        match parse_event(data).expect("valid chunk") {
            StreamEvent::Chunk(c) => c,
            StreamEvent::Done => panic!("unexpected [DONE]"),
        }
    }

    fn fragments(data: &[&str]) -> Vec<ToolCall> {
        let mut acc = ToolCallAccumulator::default();
        for d in data {
            for choice in chunk(d).choices {
                for t in &choice.delta.tool_calls {
                    acc.push(t);
                }
            }
        }
        acc.finish()
    }

    #[test]
    fn openai_style_fragments_make_two_calls() {
        let calls = fragments(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"lookup_member","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"member_"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"id\": \"1001\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"list_orders","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ]);
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0], ToolCall { id: "call_a".into(), name: "lookup_member".into(), arguments: json!({"member_id": "1001"}) });
        assert_eq!(calls[1], ToolCall { id: "call_b".into(), name: "list_orders".into(), arguments: json!({}) });
    }

    #[test]
    fn interleaved_indexes_go_to_their_own_calls() {
        let calls = fragments(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"x\":"}},{"index":1,"id":"b","function":{"name":"g","arguments":"{\"y\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"2}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
        ]);
        assert_eq!(calls[0].arguments, json!({"x": 1}));
        assert_eq!(calls[1].arguments, json!({"y": 2}));
    }

    #[test]
    fn lenient_shapes_from_other_servers() {
        // No index, arguments as an object, no id, nulls where lists belong.
        let calls = fragments(&[
            r#"{"choices":[{"delta":{"content":null,"tool_calls":[{"function":{"name":"refill","arguments":{"rx":"RX1001"}}}]},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"delta":{"tool_calls":null}}]}"#,
            r#"{"choices":null}"#,
        ]);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "refill");
        assert_eq!(calls[0].arguments, json!({"rx": "RX1001"}));
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() > 10, "{}", calls[0].id);
    }

    #[test]
    fn broken_arguments_are_kept_as_text_and_nameless_calls_dropped() {
        let calls = fragments(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"x\": 1"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"arguments":"{}"}}]}}]}"#,
        ]);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, json!("{\"x\": 1"));
    }

    #[test]
    fn done_usage_and_errors() {
        assert!(matches!(parse_event(" [DONE] "), Ok(StreamEvent::Done)));
        let c = chunk(r#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":24}}}"#);
        let usage = c.usage.expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (Some(30), Some(5)));
        assert_eq!(usage.prompt_tokens_details.and_then(|d| d.cached_tokens), Some(24));
        assert!(chunk(r#"{"error":{"message":"boom"}}"#).error.is_some());
        assert!(parse_event("{not json").is_err());
        assert_eq!(error_message(r#"{"error":{"message":"context too long","type":"invalid_request_error"}}"#), "context too long");
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message("  upstream gone \n"), "upstream gone");
    }

    #[test]
    fn request_body_has_tools_and_api_shaped_history() {
        let messages = vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Order status for 1001?"),
            ChatMessage::tool_calls("", vec![ToolCall { id: "call_1".into(), name: "lookup".into(), arguments: json!({"member_id": "1001"}) }]),
            ChatMessage::tool_result("call_1", "{\"status\":\"processing\"}"),
        ];
        let options = GenerateOptions {
            tools: vec![ToolSpec { name: "lookup".into(), description: "Find a member".into(), parameters: json!({"type": "object"}) }],
            ..GenerateOptions::default()
        };
        let body = request_body("qwen", &messages, &options, false);
        assert!(body.get("repeat_penalty").is_none(), "a penalty by default: {body}");
        assert_eq!(request_body("qwen", &messages, &options, true)["repeat_penalty"], json!(options.repeat_penalty));
        assert_eq!(body["stream"], true);
        assert_eq!(body["model"], "qwen");
        assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"member_id\":\"1001\"}");
        assert_eq!(body["messages"][2]["tool_calls"][0]["type"], "function");
        assert_eq!(body["messages"][3]["role"], "tool");
        assert_eq!(body["messages"][3]["tool_call_id"], "call_1");
        assert_eq!(body["tools"][0]["function"]["name"], "lookup");
        assert_eq!(body["tool_choice"], "auto");
        assert!(body["messages"][0].get("tool_calls").is_none());
        let plain = request_body("qwen", &messages[..2], &GenerateOptions { repeat_penalty: 1.0, ..GenerateOptions::default() }, true);
        assert!(plain.get("tools").is_none() && plain.get("repetition_penalty").is_none());
    }

    /// A replica gets the same narrowing as the embedded engine: a look-up required
    /// about the record the caller just named may take that id only, not one the
    /// call saw earlier.
    #[test]
    fn a_required_look_up_of_a_named_record_offers_only_its_id() {
        let order_tool = ToolSpec {
            name: "get_order_details".into(),
            description: "One order".into(),
            parameters: json!({"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD[0-9]{3,}$", "x-parley-known": true}}, "required": ["order_id"]}),
        };
        let messages = vec![
            ChatMessage::new(Role::User, "Is order ORD001 ready?"),
            ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "get_order_details".into(), arguments: json!({"order_id": "ORD001"}) }]),
            ChatMessage::tool_result("c1", r#"{"order_id": "ORD001", "status": "ready"}"#),
            ChatMessage::new(Role::User, "Which medication is in order ORD006?"),
        ];
        let named = GenerateOptions { tools: vec![order_tool], tool_choice: ToolChoice::RequiredNamed, ..GenerateOptions::default() };
        let body = request_body("qwen", &messages, &named, false);
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["tools"][0]["function"]["parameters"]["properties"]["order_id"]["enum"], json!(["ORD006"]), "{body}");
        let any = GenerateOptions { tool_choice: ToolChoice::Required, ..named };
        let ids = &request_body("qwen", &messages, &any, false)["tools"][0]["function"]["parameters"]["properties"]["order_id"]["enum"];
        assert_eq!(ids.as_array().map(Vec::len), Some(2), "required alone: every id seen: {ids}");
    }
}
