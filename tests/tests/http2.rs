//! One listener, every wire: HTTP/2 in the clear (prior knowledge) and over TLS (ALPN)
//! next to HTTP/1.1, and the Realtime and Twilio WebSockets through RFC 8441 extended
//! CONNECT, each exercised with a client nobody here wrote (curl, Node's `http2`).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use parley_tests::{Server, metric, self_signed_cert, start_server, start_server_with_config, wait_metric};

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
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/rfc8441.js");
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
    let url = format!("http://{}", plain().addr);
    let (code, out) = tokio::task::spawn_blocking(move || node(&[&url, "/twilio", "--accept-only"])).await.expect("join");
    assert_eq!(code, 0, "{out}");
    // The stream was reset before `start`: the call is freed.
    wait_metric(&plain().addr, "parley_calls_active", 0.0, Duration::from_secs(40)).await.expect("call freed");
    assert!(metric(&plain().addr, "parley_calls_total").await.expect("metric") >= 1.0);
}
