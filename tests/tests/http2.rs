//! One listener, every wire: HTTP/2 in the clear (prior knowledge) and over TLS (ALPN)
//! next to HTTP/1.1, and the Realtime and Twilio WebSockets through RFC 8441 extended
//! CONNECT, each exercised with a client nobody here wrote (curl, Node's `http2`).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use parley_tests::{Server, metric, self_signed_cert, start_server, start_server_with_config, wait_metric};

/// Tests that open calls take turns: each checks that the calls gauge returns to 0
/// on the servers this file shares, which another test's call would hold up.
static ONE_CALL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn plain() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start_server(&[]).expect("start parley"))
}

fn tls() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let (cert, key) = self_signed_cert().expect("certificate");
        let config = format!("[server.tls]\ncert = {:?}\nkey = {:?}\n", cert.display().to_string(), key.display().to_string());
        start_server_with_config(&config, &[]).expect("start parley with TLS")
    })
}

/// curl's body and the HTTP version it spoke.
fn curl(args: &[&str], url: &str) -> (String, String) {
    let out = Command::new("curl").args(["-s", "-w", "\n%{http_version}"]).args(args).arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (body.trim().to_string(), version.trim().to_string())
}

fn node(args: &[&str]) -> (i32, String) {
    let script = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("node/rfc8441.js");
    let out = Command::new("node").arg(script).args(args).output().expect("run node (apt-get install nodejs)");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn h2c_prior_knowledge_and_http1_share_the_port() {
    let s = plain();
    assert_eq!(curl(&["--http2-prior-knowledge"], &format!("http://{}/healthz", s.addr)), ("ok".to_string(), "2".to_string()));
    assert_eq!(curl(&["--http1.1"], &format!("http://{}/healthz", s.addr)), ("ok".to_string(), "1.1".to_string()));
}

#[test]
fn tls_negotiates_h2_and_http1_by_alpn() {
    let s = tls();
    let (cert, _) = self_signed_cert().expect("certificate");
    let cert = cert.display().to_string();
    let port = s.addr.rsplit(':').next().expect("port");
    let url = format!("https://localhost:{port}/healthz");
    assert_eq!(curl(&["--http2", "--cacert", &cert], &url), ("ok".to_string(), "2".to_string()));
    assert_eq!(curl(&["--http1.1", "--cacert", &cert], &url), ("ok".to_string(), "1.1".to_string()));
}

#[test]
fn a_garbage_tls_handshake_is_dropped_and_the_server_goes_on() {
    use std::io::{Read, Write};
    let s = tls();
    let mut tcp = std::net::TcpStream::connect(&s.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01garbage").expect("write");
    let mut buf = Vec::new();
    // The server answers with a TLS alert or just closes; it must not hang or serve.
    let _ = tcp.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"), "served plain HTTP on the TLS port");
    let port = s.addr.rsplit(':').next().expect("port");
    assert_eq!(curl(&["-k", "--http2"], &format!("https://localhost:{port}/healthz")).0, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_over_rfc8441_on_h2c_and_tls() {
    let _turn = ONE_CALL_AT_A_TIME.lock().await;
    for (s, url) in [(plain(), format!("http://{}", plain().addr)), (tls(), format!("https://{}", tls().addr))] {
        let (code, out) = tokio::task::spawn_blocking(move || node(&[&url, "/v1/realtime"])).await.expect("join");
        assert_eq!(code, 0, "{out}");
        for t in ["session.created", "invalid_json", "session.updated"] {
            assert!(out.contains(t), "no {t} in {out}");
        }
        // The call ended with the stream: the slot is free again.
        if s.tls {
            let url = format!("https://{}/metrics", s.addr);
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while !curl(&["-k"], &url).0.lines().any(|l| l == "parley_calls_active 0") {
                assert!(std::time::Instant::now() < deadline, "the call over TLS was not freed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            wait_metric(&s.addr, "parley_calls_active", 0.0, Duration::from_secs(15)).await.expect("call freed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_accepts_rfc8441_connect() {
    let _turn = ONE_CALL_AT_A_TIME.lock().await;
    let url = format!("http://{}", plain().addr);
    let (code, out) = tokio::task::spawn_blocking(move || node(&[&url, "/twilio", "--accept-only"])).await.expect("join");
    assert_eq!(code, 0, "{out}");
    // The stream was reset before `start`: the call is freed.
    wait_metric(&plain().addr, "parley_calls_active", 0.0, Duration::from_secs(40)).await.expect("call freed");
    assert!(metric(&plain().addr, "parley_calls_total").await.expect("metric") >= 1.0);
}

/// Runs tests/node/stream.js (a `POST /v1/stream` client on Node's `http2`).
fn node_stream(args: &[&str]) -> (i32, String) {
    let script = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("node/stream.js");
    let out = Command::new("node").arg(script).args(args).output().expect("run node (apt-get install nodejs)");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Waits until the server has no call in progress (over TLS with curl).
async fn wait_calls_freed(s: &Server, within: Duration) {
    if !s.tls {
        wait_metric(&s.addr, "parley_calls_active", 0.0, within).await.expect("calls freed");
        return;
    }
    let url = format!("https://{}/metrics", s.addr);
    let deadline = std::time::Instant::now() + within;
    while !curl(&["-k"], &url).0.lines().any(|l| l == "parley_calls_active 0") {
        assert!(std::time::Instant::now() < deadline, "the call over TLS was not freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The spoken question as raw PCM16 24 kHz, in a file for the Node client.
fn question_pcm() -> String {
    let samples = parley_tests::speech("What is the capital of Germany?").expect("speech");
    let path = std::env::temp_dir().join(format!("parley-e2e-{}/question.pcm", std::process::id()));
    std::fs::write(&path, parley_audio::pcm::encode_pcm16le(&samples)).expect("write pcm");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_stream_is_one_full_duplex_call_on_h2c_and_tls() {
    let _turn = ONE_CALL_AT_A_TIME.lock().await;
    let pcm = question_pcm();
    for s in [plain(), tls()] {
        let url = format!("{}://{}", if s.tls { "https" } else { "http" }, s.addr);
        let pcm = pcm.clone();
        // 600 kB: over server.max_message_bytes (512 KiB), the line limit.
        let (code, out) = tokio::task::spawn_blocking(move || node_stream(&[&url, "call", &pcm, "600000"])).await.expect("join");
        assert_eq!(code, 0, "{out}");
        let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"));
        let errors: Vec<&str> = summary["errors"].as_array().expect("errors").iter().filter_map(|e| e.as_str()).collect();
        assert!(errors.contains(&"invalid_json") && errors.contains(&"message_too_large"), "{summary}");
        let heard = parley_tests::words(summary["transcript"].as_str().unwrap_or(""));
        assert!(heard.contains(&"capital".to_string()) && heard.contains(&"germany".to_string()), "heard {heard:?}");
        assert!(summary["audio_deltas"].as_u64().unwrap_or(0) > 0, "no spoken answer: {summary}");
        // The answer came while the request body was open; the server ended the
        // response only after the client ended its body.
        assert_eq!(summary["done_before_body_end"], true, "{summary}");
        assert_eq!(summary["first_event_before_body_end"], true, "{summary}");
        assert_eq!(summary["response_ended_after_body"], true, "{summary}");
        wait_calls_freed(s, Duration::from_secs(15)).await;
    }
    // A client that resets the stream mid-call frees the call.
    let total = metric(&plain().addr, "parley_calls_total").await.expect("metric");
    let url = format!("http://{}", plain().addr);
    let (code, out) = tokio::task::spawn_blocking(move || node_stream(&[&url, "reset", &pcm])).await.expect("join");
    assert_eq!(code, 0, "{out}");
    assert!(metric(&plain().addr, "parley_calls_total").await.expect("metric") > total);
    wait_calls_freed(plain(), Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_refuses_other_content_types() {
    let (body, _) = curl(&["--http2-prior-knowledge", "-X", "POST", "-H", "content-type: text/plain", "--data", "hi"], &format!("http://{}/v1/stream", plain().addr));
    assert!(body.contains("unsupported_media_type"), "{body}");
}
