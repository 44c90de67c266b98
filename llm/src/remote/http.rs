//! The HTTP side of the remote engine: one streamed chat-completions request, and
//! the health probe. Runs on the pool's runtime; hands parsed chunks to the
//! blocking session through a bounded channel (backpressure: a slow consumer slows
//! the read instead of growing a buffer).
//!
//! Plain `http://` over HTTP/1.1 only: the replicas are expected on a private
//! network (TLS would need a TLS stack and certificates, not built in yet).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc;

use super::sse::SseDecoder;
use super::wire::{Chunk, StreamEvent, error_message, parse_event};

/// The shared connection pool (keep-alive: a turn does not pay a TCP handshake).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long an idle kept-alive connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Most bytes of an error response read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Builds the client every replica of a pool shares.
pub fn client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true); // SSE chunks are small; do not let Nagle hold them
    Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).pool_idle_timeout(POOL_IDLE).build(connector)
}

/// A replica's URLs and credentials, parsed once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    chat: Uri,
    models: Uri,
    authorization: Option<HeaderValue>,
}

impl Endpoint {
    /// Parses `http://host:port/prefix` (the API root, usually ending in `/v1`).
    pub fn parse(base_url: &str, api_key: Option<&str>) -> Result<Self, String> {
        let base = base_url.trim().trim_end_matches('/');
        let uri: Uri = base.parse().map_err(|e| format!("base_url {base_url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "base_url {base_url:?}: only http:// is supported (no TLS built in); reach the replica over a private network or a local TLS-terminating proxy"
                ));
            }
            _ => return Err(format!("base_url {base_url:?} must start with http://, e.g. http://10.0.0.5:8000/v1")),
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("base_url {base_url:?} has no host"));
        };
        if uri.query().is_some() {
            return Err(format!("base_url {base_url:?} must not have a query string"));
        }
        let prefix = uri.path().trim_end_matches('/');
        let make = |tail: &str| -> Result<Uri, String> {
            format!("http://{authority}{prefix}{tail}").parse().map_err(|e| format!("base_url {base_url:?}: {e}"))
        };
        let authorization = match api_key {
            Some(key) => Some(
                HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| "the api_key has characters not allowed in a header".to_string())?,
            ),
            None => None,
        };
        Ok(Self { chat: make("/chat/completions")?, models: make("/models")?, authorization })
    }
}

/// Why a request failed, by what it says about the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The replica is down or broken (no connection, a timeout, a 5xx, a broken
    /// stream): mark it unhealthy and try another.
    Replica(String),
    /// The replica is up but refuses more work now (429): try another, keep it
    /// healthy.
    Busy(String),
    /// The request itself is wrong (a 4xx such as a conversation over the context
    /// window): every replica would refuse it, so do not fail over.
    Request(String),
}

impl Failure {
    /// The explanation.
    pub fn message(&self) -> &str {
        match self {
            Failure::Replica(m) | Failure::Busy(m) | Failure::Request(m) => m,
        }
    }

    fn from_status(status: StatusCode, body: &str) -> Self {
        let detail = error_message(body);
        let mut msg = if detail.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {detail}") };
        if status == StatusCode::NOT_FOUND {
            msg.push_str(" (is base_url the API root, like http://host:port/v1?)");
        }
        match status.as_u16() {
            429 => Failure::Busy(msg),
            // Wrong credentials or URL are this replica's configuration, not the
            // request's: another replica may take it.
            401 | 403 | 404 | 405 => Failure::Replica(msg),
            400..=499 => Failure::Request(msg),
            _ => Failure::Replica(msg),
        }
    }
}

/// What the stream task hands to the session.
#[derive(Debug)]
pub enum Piece {
    /// A parsed chunk.
    Chunk(Chunk),
    /// The stream ended well.
    Done,
    /// The request failed; nothing more follows.
    Failed(Failure),
}

/// The error and its causes on one line (hyper's own `Display` says only
/// "client error (Connect)").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Sends one streamed chat-completions request and forwards what comes back until
/// `[DONE]`, a failure, or the session drops its receiver (barge-in: the body is
/// dropped, which closes the connection, which tells the server to stop).
pub async fn stream_chat(client: HttpClient, endpoint: Endpoint, body: Bytes, silence: Duration, tx: mpsc::Sender<Piece>) {
    if let Err(failure) = stream_inner(&client, &endpoint, body, silence, &tx).await {
        let _ = tx.send(Piece::Failed(failure)).await;
    }
}

async fn stream_inner(client: &HttpClient, endpoint: &Endpoint, body: Bytes, silence: Duration, tx: &mpsc::Sender<Piece>) -> Result<(), Failure> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(endpoint.chat.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "text/event-stream");
    if let Some(auth) = &endpoint.authorization {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let request = request.body(Full::new(body)).map_err(|e| Failure::Request(format!("cannot build the request: {e}")))?;
    let response = match tokio::time::timeout(silence, client.request(request)).await {
        Err(_) => return Err(Failure::Replica(format!("no response within {} ms", silence.as_millis()))),
        Ok(Err(e)) => return Err(Failure::Replica(describe(&e))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = read_limited(&mut body, silence).await;
        return Err(Failure::from_status(status, &text));
    }

    let mut decoder = SseDecoder::new();
    let mut finished = false; // a finish_reason was seen
    loop {
        let frame = match tokio::time::timeout(silence, body.frame()).await {
            Err(_) => return Err(Failure::Replica(format!("the stream stalled for {} ms", silence.as_millis()))),
            Ok(Some(Err(e))) => return Err(Failure::Replica(format!("the stream broke: {}", describe(&e)))),
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => {
                let events = decoder.finish().map_err(|e| Failure::Replica(e.to_string()))?;
                if forward(events, &mut finished, tx).await? {
                    return Ok(());
                }
                if finished {
                    // Some servers close after the last chunk without `[DONE]`.
                    let _ = tx.send(Piece::Done).await;
                    return Ok(());
                }
                return Err(Failure::Replica("the stream ended before the reply did".into()));
            }
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        let events = decoder.push(&data).map_err(|e| Failure::Replica(e.to_string()))?;
        if forward(events, &mut finished, tx).await? {
            return Ok(());
        }
    }
}

/// Hands decoded events on; `Ok(true)` when the stream is over (done, or the
/// session stopped listening).
async fn forward(events: Vec<String>, finished: &mut bool, tx: &mpsc::Sender<Piece>) -> Result<bool, Failure> {
    for data in events {
        match parse_event(&data).map_err(Failure::Replica)? {
            StreamEvent::Done => {
                let _ = tx.send(Piece::Done).await;
                return Ok(true);
            }
            StreamEvent::Chunk(chunk) => {
                if let Some(error) = &chunk.error {
                    return Err(stream_error(error));
                }
                if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
                    *finished = true;
                }
                if tx.send(Piece::Chunk(chunk)).await.is_err() {
                    return Ok(true); // cancelled: dropping the body closes the connection
                }
            }
        }
    }
    Ok(false)
}

/// An `{"error": …}` event in the stream: a request error when the server says so
/// (a 4xx code or `invalid_request_error`), else the replica's failure.
fn stream_error(error: &serde_json::Value) -> Failure {
    let message = error.get("message").and_then(|m| m.as_str()).map(str::to_string).unwrap_or_else(|| error.to_string());
    let code = error.get("code").and_then(|c| c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())));
    let kind = error.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let msg = format!("the replica reported an error mid-stream: {message}");
    if kind == "invalid_request_error" || code.is_some_and(|c| (400..500).contains(&c) && c != 429) {
        Failure::Request(msg)
    } else {
        Failure::Replica(msg)
    }
}

async fn read_limited(body: &mut hyper::body::Incoming, silence: Duration) -> String {
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match tokio::time::timeout(silence, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    out.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the replica answers `GET {base_url}/models`. Any HTTP answer below 500
/// counts as alive (a server without `/models` answers 404 and is still up); a 5xx
/// (Parley answers 503 while its models load) or no answer counts as down.
pub async fn probe(client: &HttpClient, endpoint: &Endpoint, timeout: Duration) -> Result<(), String> {
    let mut request = Request::builder().method(Method::GET).uri(endpoint.models.clone());
    if let Some(auth) = &endpoint.authorization {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let request = request.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let response = match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => return Err(format!("no answer to GET /models within {} ms", timeout.as_millis())),
        Ok(Err(e)) => return Err(describe(&e)),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    // Read the (small) body so the connection can be reused.
    let mut body = response.into_body();
    let text = read_limited(&mut body, timeout).await;
    if status.is_server_error() {
        return Err(format!("GET /models answered HTTP {status}: {}", error_message(&text)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_base_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8000/v1/", Some("k")).expect("valid");
        assert_eq!(e.chat.to_string(), "http://127.0.0.1:8000/v1/chat/completions");
        assert_eq!(e.models.to_string(), "http://127.0.0.1:8000/v1/models");
        assert_eq!(e.authorization.as_ref().map(|h| h.to_str().ok()), Some(Some("Bearer k")));
        let root = Endpoint::parse("http://host", None).expect("valid");
        assert_eq!(root.chat.to_string(), "http://host/chat/completions");
        assert!(Endpoint::parse("https://host/v1", None).expect_err("tls").contains("only http://"));
        assert!(Endpoint::parse("host:80/v1", None).is_err());
        assert!(Endpoint::parse("http://host/v1?x=1", None).is_err());
        assert!(Endpoint::parse("http://host/v1", Some("bad\nkey")).is_err());
    }

    #[test]
    fn statuses_say_whether_to_fail_over() {
        assert!(matches!(Failure::from_status(StatusCode::BAD_REQUEST, r#"{"error":{"message":"too long"}}"#), Failure::Request(m) if m.contains("too long")));
        assert!(matches!(Failure::from_status(StatusCode::SERVICE_UNAVAILABLE, ""), Failure::Replica(_)));
        assert!(matches!(Failure::from_status(StatusCode::TOO_MANY_REQUESTS, ""), Failure::Busy(_)));
        assert!(matches!(Failure::from_status(StatusCode::UNAUTHORIZED, ""), Failure::Replica(_)));
        assert!(matches!(stream_error(&serde_json::json!({"message": "x", "type": "invalid_request_error"})), Failure::Request(_)));
        assert!(matches!(stream_error(&serde_json::json!({"message": "x", "code": 500})), Failure::Replica(_)));
    }
}
