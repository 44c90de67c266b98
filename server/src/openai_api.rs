//! `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI chat-completions API
//! served from Parley's own language model, so one Parley can be another's replica
//! (and any OpenAI client can talk to the embedded model).
//!
//! Stateless: each request runs on a fresh session of the engine on a blocking
//! thread (the embedded engine still reuses the KV cache of the system prompt, which
//! sessions share). Streaming answers are server-sent events, one
//! `chat.completion.chunk` per piece of text, then the tool calls, a last chunk with
//! the finish reason, the usage when asked (`stream_options.include_usage`), and
//! `data: [DONE]`. A client that hangs up stops the generation.
//!
//! Accepted: `model` (any; one model is served), `messages` (text content, as a
//! string or text parts; `developer` counts as `system`), `stream`, `max_tokens` /
//! `max_completion_tokens`, `temperature`, `top_p`, `seed`, `n` = 1, `tools`
//! (functions), `tool_choice` (`"auto"`, `"none"`, `"required"` or a function: the
//! embedded engine enforces it with its grammar), and the extensions
//! `repetition_penalty` / `repeat_penalty` / `repeat_last_n` that vLLM and
//! llama.cpp read. Other fields are ignored, as OpenAI-compatible servers do.
//! Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parley_llm::remote::wire::{arguments_string, parse_arguments};
use parley_llm::{ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmError, Role, ToolCall, ToolChoice, ToolSpec};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::app::App;

/// Longest reply when the request names no limit.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Most reply tokens a request may ask for.
pub const MAX_MAX_TOKENS: usize = 8192;
/// Pieces of text buffered between the model thread and the HTTP response; a slow
/// reader slows the model instead of growing memory.
const PIECES_QUEUED: usize = 64;

/// The API's routes, for the server's router (`.merge(openai_api::routes())`).
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/chat/completions", post(chat_completions)).route("/v1/models", get(models))
}

/// An error in the API's shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", message: message.into(), param, code: None }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// How a model failure looks to the client: a conversation over the context
    /// window is the request's fault (400), anything else the server's (500).
    fn from_llm(e: &LlmError) -> Self {
        match e {
            LlmError::ContextFull { .. } => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                message: e.to_string(),
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            },
            LlmError::Tokenizer(_) => Self::bad_request(e.to_string(), Some("messages")),
            _ => {
                tracing::warn!(error = %e, "chat completion failed");
                Self { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", message: e.to_string(), param: None, code: None }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, [(header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response()
    }
}

/// The request body. Unknown fields are ignored (clients send many optional ones).
#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// vLLM's and SGLang's name for the repeat penalty.
    #[serde(default)]
    repetition_penalty: Option<f32>,
    /// llama.cpp's name for it (clients may send both).
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// Message content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InToolCall {
    #[serde(default)]
    id: Option<String>,
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
struct InFunctionCall {
    name: String,
    /// A JSON string per the API; an object is accepted too.
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: InFunction,
}

#[derive(Debug, Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

/// What a valid request asks for.
struct Job {
    messages: Vec<ChatMessage>,
    options: GenerateOptions,
    stream: bool,
    include_usage: bool,
}

fn content_text(content: Option<Content>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text" | "input_text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            format!("messages[{index}]: content parts of type {kind:?} are not supported; send text"),
                            Some("messages"),
                        ));
                    }
                }
            }
            Ok(text)
        }
    }
}

/// Checks a request and turns it into messages and options for the engine.
fn validate(request: ChatRequest) -> Result<Job, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages must hold at least one message", Some("messages")));
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
    }
    let mut options = GenerateOptions::default();
    let max = request.max_completion_tokens.or(request.max_tokens);
    options.max_tokens = match max {
        None => DEFAULT_MAX_TOKENS,
        Some(0) => return Err(ApiError::bad_request("max_tokens must be at least 1", Some("max_tokens"))),
        Some(n) => (n as usize).min(MAX_MAX_TOKENS),
    };
    // The API's defaults: temperature 1, top_p 1.
    options.temperature = request.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&options.temperature) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2", Some("temperature")));
    }
    options.top_p = request.top_p.unwrap_or(1.0);
    if !(options.top_p > 0.0 && options.top_p <= 1.0) {
        return Err(ApiError::bad_request("top_p must be above 0 and at most 1", Some("top_p")));
    }
    if let Some(seed) = request.seed {
        options.seed = seed as u64;
    }
    if let Some(p) = request.repetition_penalty.or(request.repeat_penalty) {
        if !(p.is_finite() && p > 0.0) {
            return Err(ApiError::bad_request("repetition_penalty must be above 0", Some("repetition_penalty")));
        }
        options.repeat_penalty = p;
    }
    if let Some(n) = request.repeat_last_n {
        options.repeat_last_n = n;
    }

    options.tool_choice = match &request.tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) if !name.trim().is_empty() => ToolChoice::Function(name.to_string()),
                _ => return Err(ApiError::bad_request("tool_choice: a function choice needs function.name", Some("tool_choice"))),
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                Some("tool_choice"),
            ));
        }
    };
    for (i, t) in request.tools.unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::bad_request(format!("tools[{i}]: only tools of type \"function\" are supported"), Some("tools")));
        }
        if t.function.name.trim().is_empty() {
            return Err(ApiError::bad_request(format!("tools[{i}]: the function needs a name"), Some("tools")));
        }
        options.tools.push(ToolSpec {
            name: t.function.name,
            description: t.function.description.unwrap_or_default(),
            parameters: t.function.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
    }
    let forced = match &options.tool_choice {
        ToolChoice::Required | ToolChoice::RequiredNamed => Some(!options.tools.is_empty()),
        ToolChoice::Function(name) => Some(options.tools.iter().any(|t| &t.name == name)),
        _ => None,
    };
    if forced == Some(false) {
        return Err(ApiError::bad_request("tool_choice asks for a tool call, but that tool is not in tools", Some("tool_choice")));
    }

    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}]: unknown role {other:?} (use system, developer, user, assistant or tool)"),
                    Some("messages"),
                ));
            }
        };
        let content = content_text(m.content, i)?;
        let mut message = ChatMessage::new(role, content);
        if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
            if role != Role::Assistant {
                return Err(ApiError::bad_request(format!("messages[{i}]: only assistant messages carry tool_calls"), Some("messages")));
            }
            message.tool_calls = calls
                .into_iter()
                .map(|c| ToolCall {
                    id: c.id.unwrap_or_else(parley_llm::toolcall::new_call_id),
                    name: c.function.name,
                    arguments: match c.function.arguments {
                        Some(Value::String(s)) => parse_arguments(&s),
                        Some(Value::Null) | None => json!({}),
                        Some(other) => other,
                    },
                })
                .collect();
        }
        if role == Role::Tool {
            let Some(id) = m.tool_call_id else {
                return Err(ApiError::bad_request(format!("messages[{i}]: a tool message needs tool_call_id"), Some("messages")));
            };
            message.tool_call_id = Some(id);
        }
        messages.push(message);
    }
    Ok(Job {
        messages,
        options,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// What the model thread sends to the response.
enum Gen {
    Text(String),
    Done(GenerationStats),
    Failed(LlmError),
}

/// Requests generating at once, across the process: at most `server.max_calls`
/// (more get 429, which tells a pool in front to try another replica).
fn permits(app: &App) -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| Arc::new(Semaphore::new(app.config.server.max_calls.max(1))))
}

fn check_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let keys = &app.keys;
    if keys.is_empty() {
        return Ok(());
    }
    if crate::keys::bearer(headers).is_some_and(|k| keys.find(k).is_some()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            message: "missing or unknown API key: send `Authorization: Bearer KEY`".into(),
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

fn loading() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: "the models are still loading; retry when /readyz returns 200".into(),
        param: None,
        code: None,
    }
}

/// `GET /v1/models`: the one model this server runs.
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&app, &headers) {
        return e.into_response();
    }
    let Some(engines) = app.engines() else { return loading().into_response() };
    let body = json!({"object": "list", "data": [{"id": engines.llm.name(), "object": "model", "created": 0, "owned_by": "parley"}]});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    match complete(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn complete(app: Arc<App>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&app, &headers)?;
    let request: ChatRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not a valid chat-completions request: {e}"), None))?;
    let job = validate(request)?;
    let engines = app.engines().ok_or_else(loading)?;
    let permit = Arc::clone(permits(&app)).try_acquire_owned().map_err(|_| ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        kind: "rate_limit_error",
        message: format!("the server is generating {} replies already (server.max_calls); retry later", app.config.server.max_calls),
        param: None,
        code: None,
    })?;

    let engine = Arc::clone(&engines.llm);
    let model = engine.name().to_string();
    let (tx, mut rx) = mpsc::channel::<Gen>(PIECES_QUEUED);
    let Job { messages, options, stream, include_usage } = job;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut session = engine.new_session();
        let result = session.generate(&messages, &options, &mut |text| {
            // The receiver is gone when the client hung up: stop generating.
            match tx.blocking_send(Gen::Text(text.to_string())) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        let _ = tx.blocking_send(match result {
            Ok(stats) => Gen::Done(stats),
            Err(e) => Gen::Failed(e),
        });
    });

    let reply = Reply { id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()), created: unix_now(), model };
    // Wait for the first piece before answering, so an error that comes before any
    // text (a conversation over the context window) gets its own HTTP status.
    let first = rx.recv().await.unwrap_or_else(|| Gen::Failed(LlmError::Model("the generation stopped unexpectedly".into())));
    if let Gen::Failed(e) = &first {
        return Err(ApiError::from_llm(e));
    }
    if stream {
        return Ok(stream_response(reply, first, rx, include_usage));
    }

    let mut text = String::new();
    let mut next = Some(first);
    let stats = loop {
        match next.take() {
            Some(Gen::Text(t)) => text.push_str(&t),
            Some(Gen::Done(stats)) => break stats,
            Some(Gen::Failed(e)) => return Err(ApiError::from_llm(&e)),
            None => return Err(ApiError::from_llm(&LlmError::Model("the generation stopped unexpectedly".into()))),
        }
        next = rx.recv().await;
    };
    let mut message = json!({"role": "assistant", "content": text});
    if !stats.tool_calls.is_empty() {
        message["tool_calls"] = stats.tool_calls.iter().map(|c| tool_call_json(c, None)).collect();
        if text.is_empty() {
            message["content"] = Value::Null;
        }
    }
    let body = json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(&stats), "logprobs": null}],
        "usage": usage(&stats),
    });
    Ok(([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response())
}

/// What every chunk of one reply repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let data = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        Event::default().data(data.to_string())
    }

    /// The events one message from the model thread turns into; true when it ends
    /// the stream.
    fn events(&self, message: Gen, include_usage: bool, out: &mut VecDeque<Event>) -> bool {
        match message {
            Gen::Text(t) => {
                out.push_back(self.chunk(json!({"content": t}), None));
                false
            }
            Gen::Done(stats) => {
                if !stats.tool_calls.is_empty() {
                    let calls: Vec<Value> = stats.tool_calls.iter().enumerate().map(|(i, c)| tool_call_json(c, Some(i))).collect();
                    out.push_back(self.chunk(json!({"tool_calls": calls}), None));
                }
                out.push_back(self.chunk(json!({}), Some(finish_reason(&stats))));
                if include_usage {
                    let data = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(&stats),
                    });
                    out.push_back(Event::default().data(data.to_string()));
                }
                out.push_back(Event::default().data("[DONE]"));
                true
            }
            Gen::Failed(e) => {
                // Mid-stream: the status is already sent; report in the stream and
                // end without `[DONE]`, so clients see the reply as broken.
                let error = ApiError::from_llm(&e);
                out.push_back(Event::default().data(error.body().to_string()));
                true
            }
        }
    }
}

fn stream_response(reply: Reply, first: Gen, rx: mpsc::Receiver<Gen>, include_usage: bool) -> Response {
    let mut queued = VecDeque::new();
    queued.push_back(reply.chunk(json!({"role": "assistant", "content": ""}), None));
    let ended = reply.events(first, include_usage, &mut queued);
    let state = (reply, rx, queued, ended);
    let events = futures_util::stream::unfold(state, move |(reply, mut rx, mut queued, mut ended)| async move {
        loop {
            if let Some(event) = queued.pop_front() {
                return Some((Ok::<_, Infallible>(event), (reply, rx, queued, ended)));
            }
            if ended {
                return None;
            }
            let message = rx.recv().await.unwrap_or_else(|| Gen::Failed(LlmError::Model("the generation stopped unexpectedly".into())));
            ended = reply.events(message, include_usage, &mut queued);
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// A tool call in the API's shape (`index` in stream deltas).
fn tool_call_json(c: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments_string(&c.arguments)}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

fn finish_reason(stats: &GenerationStats) -> &'static str {
    if !stats.tool_calls.is_empty() {
        return "tool_calls";
    }
    match stats.finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<Job, ApiError> {
        validate(serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string(), None))?)
    }

    #[test]
    fn a_full_request_becomes_messages_and_options() {
        let job = parse(json!({
            "model": "anything",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Order "}, {"type": "text", "text": "status?"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"member_id\":\"1001\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "processing"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 40,
            "max_tokens": 999,
            "temperature": 0,
            "seed": 7,
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "Find", "parameters": {"type": "object"}}}],
            "tool_choice": "auto",
            "repeat_penalty": 1.1,
            "repetition_penalty": 1.1,
            "user": "ignored"
        }))
        .expect("valid");
        assert!(job.stream && job.include_usage);
        assert_eq!(job.options.max_tokens, 40);
        assert_eq!(job.options.temperature, 0.0);
        assert_eq!(job.options.seed, 7);
        assert_eq!(job.options.repeat_penalty, 1.1);
        assert_eq!(job.options.tools.len(), 1);
        assert_eq!(job.messages[0].role, Role::System);
        assert_eq!(job.messages[1].content, "Order status?");
        assert_eq!(job.messages[2].tool_calls[0].arguments, json!({"member_id": "1001"}));
        assert_eq!(job.messages[3].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn tool_choice_none_keeps_the_tools_in_the_prompt_but_forbids_calls() {
        let job = parse(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}))
            .expect("valid");
        assert_eq!(job.options.tools.len(), 1);
        assert_eq!(job.options.tool_choice, ToolChoice::None);
        let job = parse(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}}))
            .expect("valid");
        assert_eq!(job.options.tool_choice, ToolChoice::Function("f".into()));
        assert!(!job.stream);
        assert_eq!(job.options.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
            (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
            (json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}), "tool_choice"),
            (json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}), "tool_choice"),
            (json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval", "function": {"name": "f"}}]}), "tools"),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).err().unwrap_or_else(|| panic!("accepted {body}"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn stream_events_end_with_finish_usage_and_done() {
        let reply = Reply { id: "chatcmpl-1".into(), created: 1, model: "m".into() };
        let mut out = VecDeque::new();
        assert!(!reply.events(Gen::Text("Hi".into()), true, &mut out));
        let stats = GenerationStats {
            prompt_tokens: 10,
            generated_tokens: 3,
            tool_calls: vec![ToolCall { id: "call_1".into(), name: "f".into(), arguments: json!({"a": 1}) }],
            ..GenerationStats::default()
        };
        assert!(reply.events(Gen::Done(stats), true, &mut out));
        // Content chunk, tool calls, finish, usage, [DONE].
        assert_eq!(out.len(), 5);
        assert_eq!(finish_reason(&GenerationStats { finish: FinishReason::Length, ..GenerationStats::default() }), "length");
    }
}
