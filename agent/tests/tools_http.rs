//! HTTP tools against a real local HTTP server on port 0: what the service receives,
//! and how its answers (JSON, text, errors, slowness, silence) reach the model.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use parley_agent::tools::http::{HttpTool, HttpToolConfig, MAX_RESPONSE_BYTES};
use parley_agent::tools::{CallScope, Tool, ToolError};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Echoes what it received: the body as JSON, and the headers that matter.
async fn echo(headers: HeaderMap, body: Bytes) -> axum::Json<Value> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let received: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    axum::Json(json!({
        "received": received,
        "content_type": header("content-type"),
        "token": header("x-token"),
    }))
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(10)).await;
    "too late"
}

async fn broken() -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("database exploded {}", "x".repeat(500)))
}

async fn text() -> &'static str {
    "Open 9 to 5 today"
}

async fn huge() -> String {
    "y".repeat(MAX_RESPONSE_BYTES + 1)
}

/// A chunked answer with no Content-Length, so only the read limit can stop it.
async fn huge_chunked() -> axum::body::Body {
    let chunks = (0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 8 * 1024])));
    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
}

async fn json_header_text_body() -> ([(header::HeaderName, &'static str); 1], &'static str) {
    ([(header::CONTENT_TYPE, "application/json")], "not json at all")
}

async fn start_server() -> SocketAddr {
    let app = Router::new()
        .route("/echo", post(echo))
        .route("/slow", post(slow))
        .route("/broken", post(broken))
        .route("/text", post(text))
        .route("/huge", post(huge))
        .route("/huge-chunked", post(huge_chunked))
        .route("/mislabelled", post(json_header_text_body));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    addr
}

fn tool(addr: SocketAddr, path: &str, timeout_ms: u64) -> HttpTool {
    HttpTool::new(HttpToolConfig {
        name: "test_service".into(),
        description: "A test service.".into(),
        parameters: json!({"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}),
        url: format!("http://{addr}{path}"),
        timeout_ms,
        headers: BTreeMap::from([("X-Token".to_string(), "secret-123".to_string())]),
        headers_from_env: BTreeMap::new(),
        headers_from_file: BTreeMap::new(),
    })
    .expect("valid tool")
}

fn failed(result: Result<Value, ToolError>) -> String {
    match result {
        Err(ToolError::Failed(message)) => message,
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn posts_the_arguments_as_json_with_the_configured_headers() {
    let addr = start_server().await;
    let tool = tool(addr, "/echo", 2_000);
    let arguments = json!({"day": "Friday", "count": 2, "nested": {"ok": true}});
    let answer = tool.call(arguments.clone(), &CallScope::default()).await.expect("answer");
    assert_eq!(answer["received"], arguments);
    assert_eq!(answer["content_type"], "application/json");
    assert_eq!(answer["token"], "secret-123");

    // Arguments the model wrote as a JSON string are sent as the object; the pooled
    // connection is reused for the second call.
    let answer = tool.call(json!("{\"day\": \"Monday\"}"), &CallScope::default()).await.expect("answer");
    assert_eq!(answer["received"], json!({"day": "Monday"}));
}

#[tokio::test]
async fn a_slow_service_times_out_at_the_configured_limit() {
    let addr = start_server().await;
    let tool = tool(addr, "/slow", 200);
    let started = Instant::now();
    assert_eq!(tool.call(json!({"day": "Friday"}), &CallScope::default()).await, Err(ToolError::Timeout(200)));
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn an_error_status_fails_with_the_start_of_the_body() {
    let addr = start_server().await;
    let message = failed(tool(addr, "/broken", 2_000).call(json!({"day": "Friday"}), &CallScope::default()).await);
    assert!(message.starts_with("the service answered HTTP 500: database exploded"), "{message}");
    assert_eq!(message.len(), "the service answered HTTP 500: ".len() + 200, "{message}");

    let message = failed(tool(addr, "/missing", 2_000).call(json!({}), &CallScope::default()).await);
    assert!(message.starts_with("the service answered HTTP 404"), "{message}");
}

#[tokio::test]
async fn a_text_answer_is_wrapped_as_result() {
    let addr = start_server().await;
    let answer = tool(addr, "/text", 2_000).call(json!({"day": "Friday"}), &CallScope::default()).await.expect("answer");
    assert_eq!(answer, json!({"result": "Open 9 to 5 today"}));
    let answer = tool(addr, "/mislabelled", 2_000).call(json!({}), &CallScope::default()).await.expect("answer");
    assert_eq!(answer, json!({"result": "not json at all"}));
}

#[tokio::test]
async fn an_oversized_answer_is_refused() {
    let addr = start_server().await;
    let message = failed(tool(addr, "/huge", 2_000).call(json!({}), &CallScope::default()).await);
    assert!(message.contains("larger than 64 KiB"), "{message}");
    let message = failed(tool(addr, "/huge-chunked", 2_000).call(json!({}), &CallScope::default()).await);
    assert!(message.contains("larger than 64 KiB"), "{message}");
}

#[tokio::test]
async fn an_unreachable_service_fails_quickly() {
    // A port that was just free: nothing listens there now.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let message = failed(tool(addr, "/echo", 2_000).call(json!({}), &CallScope::default()).await);
    assert!(message.contains("could not be reached"), "{message}");
}

#[tokio::test]
async fn arguments_that_are_not_an_object_are_invalid() {
    let addr = start_server().await;
    assert!(matches!(tool(addr, "/echo", 2_000).call(json!([1, 2]), &CallScope::default()).await, Err(ToolError::InvalidArguments(_))));
}
