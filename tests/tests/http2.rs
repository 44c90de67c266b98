//! One listener, every wire: HTTP/2 in the clear (prior knowledge) and over TLS (ALPN)
//! next to HTTP/1.1, and the Realtime and Twilio WebSockets through RFC 8441 extended
//! CONNECT, each exercised with a client nobody here wrote (curl, Node's `http2`).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use parley_tests::{Server, metric, self_signed_cert, start_server_with_config, wait_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Tests that open calls take turns: each checks that the calls gauge returns to 0
/// on the servers this file shares, which another test's call would hold up.
static ONE_CALL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Streams one HTTP/2 connection may have open at once on [`plain`]: low, so a
/// test can go past it.
const MAX_STREAMS: u32 = 4;

fn plain() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start_server_with_config(&format!("[server.http]\nh2_max_concurrent_streams = {MAX_STREAMS}\n"), &[]).expect("start parley"))
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

/// A bare HTTP/2 client, frames written by hand: it does not hold back new streams
/// when the server's limit is reached, as real clients (nghttp2, Node) do, so it can
/// show what the server does with one that ignores the limit.
mod raw_h2 {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    /// RST_STREAM's REFUSED_STREAM code (RFC 9113 §7).
    pub const REFUSED_STREAM: u32 = 0x7;

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub struct Conn {
        tcp: TcpStream,
    }

    impl Conn {
        /// Connects with prior knowledge, trades SETTINGS, and acknowledges the
        /// server's (so its limits are in force for this connection).
        pub async fn open(addr: &str) -> Conn {
            let mut c = Conn { tcp: TcpStream::connect(addr).await.expect("connect") };
            c.tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
            c.send(SETTINGS, 0, 0, &[]).await;
            loop {
                let f = c.next().await.expect("the server's SETTINGS");
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    c.send(SETTINGS, ACK, 0, &[]).await;
                    return c;
                }
            }
        }

        pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let len = payload.len() as u32;
            let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            frame.extend_from_slice(&stream.to_be_bytes());
            frame.extend_from_slice(payload);
            self.tcp.write_all(&frame).await.expect("write a frame");
        }

        /// Opens stream `id` as a call: `POST /v1/stream`, NDJSON, body left open.
        pub async fn open_call(&mut self, id: u32, authority: &str) {
            // HPACK (RFC 7541), no Huffman: indexed `:method: POST` (3) and `:scheme:
            // http` (6); literals without indexing named by static entries `:path`
            // (4), `:authority` (1) and `content-type` (31, past the 4-bit prefix).
            let mut block = vec![0x83, 0x86];
            for (name, value) in [(&[0x04u8][..], "/v1/stream"), (&[0x01], authority), (&[0x0f, 0x10], "application/x-ndjson")] {
                block.extend_from_slice(name);
                assert!(value.len() < 127);
                block.push(value.len() as u8);
                block.extend_from_slice(value.as_bytes());
            }
            self.send(HEADERS, END_HEADERS, id, &block).await;
        }

        /// The next frame, or `None` when the connection closes or nothing comes
        /// for 30 s.
        pub async fn next(&mut self) -> Option<Frame> {
            let read = async {
                let mut head = [0u8; 9];
                self.tcp.read_exact(&mut head).await.ok()?;
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                self.tcp.read_exact(&mut payload).await.ok()?;
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                Some(Frame { kind: head[3], flags: head[4], stream, payload })
            };
            tokio::time::timeout(Duration::from_secs(30), read).await.ok().flatten()
        }

        /// Reads frames until `want` matches one; panics on GOAWAY or a closed connection.
        pub async fn until(&mut self, what: &str, want: impl Fn(&Frame) -> bool) -> Frame {
            loop {
                let f = self.next().await.unwrap_or_else(|| panic!("connection closed or silent while waiting for {what}"));
                if want(&f) {
                    return f;
                }
                assert!(f.kind != GOAWAY, "GOAWAY while waiting for {what}: {:?}", f.payload);
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    self.send(SETTINGS, ACK, 0, &[]).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_on_one_connection_are_refused_and_the_calls_go_on() {
    use raw_h2::*;
    let _turn = ONE_CALL_AT_A_TIME.lock().await;
    let s = plain();
    let mut c = Conn::open(&s.addr).await;
    // As many calls as the limit allows, and one more: client stream ids are odd.
    let ids: Vec<u32> = (0..=MAX_STREAMS).map(|i| 1 + 2 * i).collect();
    for &id in &ids {
        c.open_call(id, &s.addr).await;
    }
    let extra = *ids.last().expect("ids");
    // The extra stream is refused; the calls within the limit are answered (their
    // response headers), in whatever order the frames come.
    let (mut refused, mut answered) = (None, Vec::new());
    while refused.is_none() || answered.len() < MAX_STREAMS as usize {
        let f = c.until("the calls' answers and the extra stream's reset", |f| f.kind == HEADERS || f.kind == RST_STREAM).await;
        if f.kind == RST_STREAM {
            assert_eq!(f.stream, extra, "only the stream past the limit is reset");
            refused = Some(u32::from_be_bytes(f.payload[..4].try_into().expect("error code")));
        } else {
            answered.push(f.stream);
        }
    }
    assert_eq!(refused, Some(REFUSED_STREAM));
    answered.sort_unstable();
    assert_eq!(answered, ids[..MAX_STREAMS as usize]);
    wait_metric(&s.addr, "parley_calls_active", f64::from(MAX_STREAMS), Duration::from_secs(10)).await.expect("the calls within the limit run");
    // One call ends (the client ends its body); its slot on the connection is free
    // again for a new stream.
    c.send(DATA, END_STREAM, 1, &[]).await;
    c.until("the first call's end", |f| f.stream == 1 && (f.kind == DATA || f.kind == HEADERS) && f.flags & END_STREAM != 0).await;
    let next = extra + 2;
    c.open_call(next, &s.addr).await;
    let f = c.until("the new stream's answer", |f| f.stream == next && (f.kind == HEADERS || f.kind == RST_STREAM)).await;
    assert_eq!(f.kind, HEADERS, "a stream opened after one ended should be accepted");
    // The client vanishes: every call on the connection is freed.
    drop(c);
    wait_calls_freed(s, Duration::from_secs(30)).await;
}
