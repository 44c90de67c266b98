//! The pool against fake replicas: tiny HTTP/1.1 servers on loopback whose answers
//! each test scripts (stream words, fail with a status, die mid-stream, stall, go
//! away), so routing, failover and cancellation are checked without a model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::{ChatMessage, FinishReason, GenerateOptions, LlmEngine, LlmSession, Role, ToolSpec};

/// What a fake replica does with a chat request.
#[derive(Clone, Debug)]
enum Behave {
    /// Streams these pieces as content deltas, then usage and `[DONE]`.
    Words(Vec<String>),
    /// Streams these pieces with a pause before each.
    SlowWords(Vec<String>, Duration),
    /// Answers with this status and an OpenAI-style error body.
    Status(u16),
    /// Streams these pieces, then closes the socket mid-stream.
    DieAfter(Vec<String>),
    /// Sends the headers, then nothing.
    Stall,
    /// Streams tool-call fragments.
    ToolCall,
}

#[derive(Default)]
struct Seen {
    chat_requests: usize,
    bodies: Vec<Value>,
    authorization: Vec<Option<String>>,
    /// Chunks a cancelled stream failed to write (the client hung up).
    hang_ups: usize,
}

struct Fake {
    addr: SocketAddr,
    behave: Arc<Mutex<Behave>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
    /// Every accepted connection, so `kill` can close them like a dying process.
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Fake {
    fn start(behave: Behave) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), behave)
    }

    fn start_on(addr: SocketAddr, behave: Behave) -> Self {
        let listener = TcpListener::bind(addr).expect("bind the fake replica");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let behave = Arc::new(Mutex::new(behave));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (b, s, st, cs) = (behave.clone(), seen.clone(), stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Ok(c) = stream.try_clone() {
                            cs.lock().expect("lock").push(c);
                        }
                        let (b, s) = (b.clone(), s.clone());
                        std::thread::spawn(move || serve(stream, b, s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // The listener drops here: new connections are refused.
        });
        Self { addr, behave, seen, stop, accept: Some(accept), conns }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn set(&self, behave: Behave) {
        *self.behave.lock().expect("lock") = behave;
    }

    fn chat_requests(&self) -> usize {
        self.seen.lock().expect("lock").chat_requests
    }

    /// Dies like a killed process: stops listening (connections are refused from
    /// now on) and closes every open connection, kept-alive ones included.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().expect("lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(stream: TcpStream, behave: Arc<Mutex<Behave>>, seen: Arc<Mutex<Seen>>) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        // One request (keep-alive: several per connection).
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut authorization = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("authorization") {
                    authorization = Some(v.trim().to_string());
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.starts_with("GET /v1/models") {
            let body = r#"{"object":"list","data":[{"id":"fake","object":"model"}]}"#;
            let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            continue;
        }
        if !request_line.starts_with("POST /v1/chat/completions") {
            let _ = write!(stream, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        // Chosen before the request is counted, so a test that saw the count knows
        // the behaviour is fixed for this request.
        let behave = behave.lock().expect("lock").clone();
        {
            let mut s = seen.lock().expect("lock");
            s.chat_requests += 1;
            s.bodies.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            s.authorization.push(authorization);
        }
        if !respond(&mut stream, behave, &seen) {
            return;
        }
    }
}

fn chunk_json(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
}

/// Writes one HTTP chunk holding one SSE event; false when the client is gone.
fn event(stream: &mut TcpStream, data: &str) -> bool {
    let payload = format!("data: {data}\n\n");
    write!(stream, "{:x}\r\n{payload}\r\n", payload.len()).is_ok() && stream.flush().is_ok()
}

/// Answers one chat request; false when the connection must close.
fn respond(stream: &mut TcpStream, behave: Behave, seen: &Mutex<Seen>) -> bool {
    const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    match behave {
        Behave::Status(code) => {
            let body = json!({"error": {"message": format!("fake says {code}"), "type": "server_error"}}).to_string();
            let _ = write!(stream, "HTTP/1.1 {code} Fake\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            true
        }
        Behave::Stall => {
            let _ = stream.write_all(SSE_HEAD.as_bytes());
            std::thread::sleep(Duration::from_secs(5));
            false
        }
        Behave::ToolCall => {
            let _ = stream.write_all(SSE_HEAD.as_bytes());
            let frags = [
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "lookup_member", "arguments": ""}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"member_id\": "}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"1001\"}"}}]}),
            ];
            for f in frags {
                event(stream, &chunk_json(f, None));
            }
            event(stream, &chunk_json(json!({}), Some("tool_calls")));
            event(stream, "[DONE]");
            let _ = stream.write_all(b"0\r\n\r\n");
            true
        }
        Behave::Words(words) => {
            let _ = stream.write_all(SSE_HEAD.as_bytes());
            event(stream, &chunk_json(json!({"role": "assistant", "content": ""}), None));
            for w in &words {
                event(stream, &chunk_json(json!({"content": w}), None));
            }
            event(stream, &chunk_json(json!({}), Some("stop")));
            event(stream, &json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": words.len(), "prompt_tokens_details": {"cached_tokens": 8}}}).to_string());
            event(stream, "[DONE]");
            let _ = stream.write_all(b"0\r\n\r\n");
            true
        }
        Behave::SlowWords(words, pause) => {
            let _ = stream.write_all(SSE_HEAD.as_bytes());
            for w in &words {
                std::thread::sleep(pause);
                if !event(stream, &chunk_json(json!({"content": w}), None)) {
                    seen.lock().expect("lock").hang_ups += 1;
                    return false;
                }
            }
            event(stream, &chunk_json(json!({}), Some("length")));
            event(stream, "[DONE]");
            let _ = stream.write_all(b"0\r\n\r\n");
            true
        }
        Behave::DieAfter(words) => {
            let _ = stream.write_all(SSE_HEAD.as_bytes());
            for w in &words {
                event(stream, &chunk_json(json!({"content": w}), None));
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            false
        }
    }
}

fn words(s: &str) -> Behave {
    Behave::Words(s.split_inclusive(' ').map(str::to_string).collect())
}

fn pool(fakes: &[&Fake], tweak: impl FnOnce(&mut RemoteConfig)) -> Arc<RemotePool> {
    let mut config = RemoteConfig {
        replicas: fakes
            .iter()
            .enumerate()
            .map(|(i, f)| ReplicaConfig { name: ["a", "b", "c"][i].into(), base_url: f.url(), api_key: Some(format!("key-{i}")), model: "fake-model".into(), forward_repeat_penalty: false })
            .collect(),
        request_timeout_ms: 2_000,
        health_interval_ms: 60_000,
        connect_timeout_ms: 500,
    };
    tweak(&mut config);
    RemotePool::new(config).expect("pool")
}

fn ask(session: &mut dyn LlmSession) -> Result<(String, crate::GenerationStats), crate::LlmError> {
    let mut text = String::new();
    let messages = [ChatMessage::new(Role::User, "hi")];
    let stats = session.generate(&messages, &GenerateOptions::default(), &mut |p| {
        text.push_str(p);
        ControlFlow::Continue(())
    })?;
    Ok((text, stats))
}

fn stat(pool: &RemotePool, name: &str) -> ReplicaStats {
    pool.replica_stats().into_iter().find(|s| s.name == name).expect("replica")
}

#[test]
fn a_session_sticks_to_its_replica_and_the_next_goes_to_the_other() {
    let (a, b) = (Fake::start(words("from a")), Fake::start(words("from b")));
    let pool = pool(&[&a, &b], |_| {});
    let mut first = pool.session();
    let (text, stats) = ask(&mut first).expect("turn 1");
    let home = first.replica_name().expect("pinned").to_string();
    assert_eq!(text, format!("from {home}"));
    assert_eq!((stats.prompt_tokens, stats.cached_tokens, stats.generated_tokens), (12, 8, 2));
    assert_eq!(stats.finish, FinishReason::Stop);
    for _ in 0..3 {
        assert_eq!(ask(&mut first).expect("next turn").0, format!("from {home}"));
        assert_eq!(first.replica_name(), Some(home.as_str()));
    }
    assert_eq!(stat(&pool, &home).requests, 4);
    assert_eq!(stat(&pool, &home).sessions, 1);
    // A second call goes to the replica with fewer calls pinned.
    let mut second = pool.session();
    let other = ask(&mut second).expect("second call").0;
    assert_ne!(other, format!("from {home}"));
    assert_eq!(a.chat_requests() + b.chat_requests(), 5);
    // Dropping a session frees its place.
    drop(first);
    assert_eq!(stat(&pool, &home).sessions, 0);
    // The request was the API's: model, stream, the key of that replica.
    let seen = a.seen.lock().expect("lock");
    let body = &seen.bodies[0];
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["messages"][0]["content"], "hi");
    assert_eq!(seen.authorization[0].as_deref(), Some("Bearer key-0"));
}

#[test]
fn a_replica_that_fails_before_any_text_is_replaced_within_the_turn() {
    let (mut a, mut b) = (Fake::start(words("from a")), Fake::start(words("from b")));
    let pool = pool(&[&a, &b], |_| {});
    let mut s = pool.session();
    let home = {
        ask(&mut s).expect("turn 1");
        s.replica_name().expect("pinned").to_string()
    };
    let (dead, alive) = if home == "a" { ("a", "b") } else { ("b", "a") };
    // 503 on the session's replica: the turn still completes, on the other one.
    let home_fake = if home == "a" { &a } else { &b };
    home_fake.set(Behave::Status(503));
    let (text, _) = ask(&mut s).expect("turn 2 fails over");
    assert_eq!(text, format!("from {alive}"));
    assert_eq!(s.replica_name(), Some(alive));
    let st = stat(&pool, dead);
    assert!(!st.healthy && st.failures == 1, "{st:?}");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("503")), "{st:?}");
    // It stays on the new replica even after the old one is back.
    home_fake.set(words("back"));
    assert_eq!(ask(&mut s).expect("turn 3").0, format!("from {alive}"));
    // Its new replica dies (connections refused): the old one, unhealthy since its
    // 503, is probed again and takes the turn.
    home_fake.set(words(&format!("from {dead}")));
    if alive == "a" { a.kill() } else { b.kill() }
    let (text, _) = ask(&mut s).expect("fails over from a refused connection");
    assert_eq!(text, format!("from {dead}"));
    assert_eq!(s.replica_name(), Some(dead));
}

#[test]
fn a_failure_mid_reply_is_an_error_and_the_next_turn_moves() {
    let (a, b) = (Fake::start(words("from a")), Fake::start(words("from b")));
    let pool = pool(&[&a, &b], |_| {});
    let mut s = pool.session();
    ask(&mut s).expect("turn 1");
    let home = s.replica_name().expect("pinned").to_string();
    let home_fake = if home == "a" { &a } else { &b };
    home_fake.set(Behave::DieAfter(vec!["The ".into(), "order ".into()]));
    let mut heard = String::new();
    let messages = [ChatMessage::new(Role::User, "hi")];
    let err = s
        .generate(&messages, &GenerateOptions::default(), &mut |p| {
            heard.push_str(p);
            ControlFlow::Continue(())
        })
        .expect_err("a broken stream after text cannot be retried silently");
    assert_eq!(heard, "The order ");
    assert!(err.to_string().contains("mid-reply"), "{err}");
    assert_eq!(s.replica_name(), None, "unpinned after the failure");
    let (text, _) = ask(&mut s).expect("the next turn goes elsewhere");
    assert_ne!(text, format!("from {home}"));
    assert_ne!(s.replica_name(), Some(home.as_str()));
}

#[test]
fn with_every_replica_down_the_error_says_so() {
    let (mut a, mut b) = (Fake::start(words("x")), Fake::start(words("y")));
    let pool = pool(&[&a, &b], |_| {});
    let mut s = pool.session();
    ask(&mut s).expect("turn 1");
    a.kill();
    b.kill();
    let started = Instant::now();
    let err = ask(&mut s).expect_err("nothing to answer");
    let msg = err.to_string();
    assert!(msg.contains("no healthy LLM replica"), "{msg}");
    assert!(msg.contains("a:") && msg.contains("b:"), "names each replica and why: {msg}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // A stateless request says the same.
    let err = pool.complete(&[ChatMessage::new(Role::User, "hi")], &GenerateOptions::default()).expect_err("down");
    assert!(err.to_string().contains("no healthy LLM replica"), "{err}");
}

#[test]
fn a_replica_that_comes_back_is_used_again() {
    let mut a = Fake::start(words("from a"));
    let addr = a.addr;
    let pool = pool(&[&a], |_| {});
    a.kill();
    assert!(pool.complete(&[ChatMessage::new(Role::User, "hi")], &GenerateOptions::default()).is_err());
    assert!(!stat(&pool, "a").healthy);
    // Back on the same port: the next request probes it before giving up.
    let _a2 = Fake::start_on(addr, words("again"));
    let (text, _) = pool.complete(&[ChatMessage::new(Role::User, "hi")], &GenerateOptions::default()).expect("revived");
    assert_eq!(text, "again");
    assert!(stat(&pool, "a").healthy);
}

#[test]
fn health_checks_mark_a_dead_replica_and_then_a_live_one() {
    let mut a = Fake::start(words("from a"));
    let addr = a.addr;
    let pool = pool(&[&a], |c| c.health_interval_ms = 50);
    a.kill();
    let wait_for = |healthy: bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat(&pool, "a").healthy != healthy {
            assert!(Instant::now() < deadline, "replica never became healthy={healthy}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(false);
    let _a2 = Fake::start_on(addr, words("again"));
    wait_for(true);
}

#[test]
fn a_bad_request_is_not_failed_over() {
    let (a, b) = (Fake::start(Behave::Status(400)), Fake::start(Behave::Status(400)));
    let pool = pool(&[&a, &b], |_| {});
    let mut s = pool.session();
    let err = ask(&mut s).expect_err("400");
    assert!(err.to_string().contains("fake says 400"), "{err}");
    assert_eq!(a.chat_requests() + b.chat_requests(), 1, "sent once, not to every replica");
    assert!(pool.replica_stats().iter().all(|r| r.healthy));
}

#[test]
fn a_stalled_replica_times_out_and_fails_over() {
    let (a, b) = (Fake::start(Behave::Stall), Fake::start(Behave::Stall));
    let pool = pool(&[&a, &b], |c| c.request_timeout_ms = 300);
    let mut s = pool.session();
    ask(&mut s).expect_err("both stall");
    assert_eq!((a.chat_requests(), b.chat_requests()), (1, 1), "tried each once");
    // Now one answers: the session, unpinned, lands there.
    a.set(words("from a"));
    let mut t = pool.session();
    let started = Instant::now();
    let (text, _) = ask(&mut t).expect("a answers");
    assert_eq!(text, "from a");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let stall_msg = stat(&pool, "b").last_error.unwrap_or_default();
    assert!(stall_msg.contains("300 ms"), "{stall_msg}");
}

#[test]
fn tool_call_fragments_become_calls() {
    let a = Fake::start(Behave::ToolCall);
    let pool = pool(&[&a], |_| {});
    let options = GenerateOptions {
        tools: vec![ToolSpec { name: "lookup_member".into(), description: "Find a member".into(), parameters: json!({"type": "object"}) }],
        ..GenerateOptions::default()
    };
    let mut spoken = String::new();
    let stats = pool
        .new_session()
        .generate(&[ChatMessage::new(Role::User, "member 1001")], &options, &mut |p| {
            spoken.push_str(p);
            ControlFlow::Continue(())
        })
        .expect("tool call");
    assert_eq!(spoken, "");
    assert_eq!(stats.tool_calls.len(), 1);
    assert_eq!(stats.tool_calls[0].id, "call_x");
    assert_eq!(stats.tool_calls[0].name, "lookup_member");
    assert_eq!(stats.tool_calls[0].arguments, json!({"member_id": "1001"}));
    let seen = a.seen.lock().expect("lock");
    assert_eq!(seen.bodies[0]["tools"][0]["function"]["name"], "lookup_member");
}

#[test]
fn break_stops_the_stream_and_hangs_up() {
    let pieces: Vec<String> = (0..40).map(|i| format!("w{i} ")).collect();
    let a = Fake::start(Behave::SlowWords(pieces, Duration::from_millis(30)));
    let pool = pool(&[&a], |_| {});
    let mut s = pool.session();
    let mut heard = Vec::new();
    let started = Instant::now();
    let stats = s
        .generate(&[ChatMessage::new(Role::User, "talk")], &GenerateOptions::default(), &mut |p| {
            heard.push(p.to_string());
            if heard.len() == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .expect("cancelled is not an error");
    assert_eq!(stats.finish, FinishReason::Cancelled);
    assert_eq!(heard, ["w0 ", "w1 ", "w2 "]);
    assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
    // The replica saw the hang-up: its next write failed long before the 40th word.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.seen.lock().expect("lock").hang_ups == 0 {
        assert!(Instant::now() < deadline, "the replica never noticed the cancel");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stat(&pool, "a").healthy, "a cancel is not a failure");
    assert_eq!(stat(&pool, "a").outstanding, 0);
}

#[test]
fn stateless_requests_go_to_the_least_busy_replica() {
    let slow: Vec<String> = (0..10).map(|i| format!("s{i} ")).collect();
    let behave = Behave::SlowWords(slow, Duration::from_millis(50));
    let (a, b) = (Fake::start(behave.clone()), Fake::start(behave));
    let pool = pool(&[&a, &b], |_| {});
    // One long stateless request (about half a second) keeps one replica busy.
    let busy = {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || pool.complete(&[ChatMessage::new(Role::User, "long")], &GenerateOptions::default()))
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let busy_name = loop {
        if let Some(r) = pool.replica_stats().into_iter().find(|r| r.outstanding > 0) {
            break r.name;
        }
        assert!(Instant::now() < deadline, "the long request never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    let busy_fake = if busy_name == "a" { &a } else { &b };
    while busy_fake.chat_requests() == 0 {
        assert!(Instant::now() < deadline, "the long request never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    a.set(words("from a"));
    b.set(words("from b"));
    let idle = if busy_name == "a" { "b" } else { "a" };
    for _ in 0..4 {
        let (text, _) = pool.complete(&[ChatMessage::new(Role::User, "hi")], &GenerateOptions::default()).expect("quick");
        assert_eq!(text, format!("from {idle}"), "a stateless request went to the busy replica: {:?}", pool.replica_stats());
    }
    let (long, stats) = busy.join().expect("thread").expect("the long request");
    assert!(long.starts_with("s0 s1"), "{long}");
    assert_eq!(stats.finish, FinishReason::Length);
    assert_eq!(stat(&pool, "a").sessions + stat(&pool, "b").sessions, 0, "stateless requests pin nothing");
}

#[test]
fn untagged_call_json_in_the_content_is_a_call_not_speech() {
    // What llama.cpp's server sends for the 0.5B model: the call as plain content.
    let pieces = ["Let me check. ", "{\"name\": \"lookup_", "member\", \"arguments\": ", "{\"member_id\": \"1001\"}}"];
    let a = Fake::start(Behave::Words(pieces.iter().map(|p| p.to_string()).collect()));
    let pool = pool(&[&a], |_| {});
    let options = GenerateOptions {
        tools: vec![ToolSpec { name: "lookup_member".into(), description: "Find a member".into(), parameters: json!({"type": "object"}) }],
        ..GenerateOptions::default()
    };
    let mut spoken = String::new();
    let stats = pool
        .new_session()
        .generate(&[ChatMessage::new(Role::User, "member 1001")], &options, &mut |p| {
            spoken.push_str(p);
            ControlFlow::Continue(())
        })
        .expect("reply");
    assert_eq!(spoken.trim(), "Let me check.");
    assert_eq!(stats.tool_calls.len(), 1, "{stats:?}");
    assert_eq!(stats.tool_calls[0].name, "lookup_member");
    assert_eq!(stats.tool_calls[0].arguments, json!({"member_id": "1001"}));
    // Without tools the same text is just text.
    let (text, stats) = pool.complete(&[ChatMessage::new(Role::User, "x")], &GenerateOptions::default()).expect("reply");
    assert!(text.contains("\"member_id\"") && stats.tool_calls.is_empty());
}

#[test]
fn a_reply_that_is_all_tool_call_can_still_be_cancelled() {
    // llama.cpp's server streams the 0.5B model's untagged call as many content
    // chunks, which the filter holds (nothing speakable): the callback must still
    // run for each, so a barge-in stops the request instead of waiting it out.
    let pieces: Vec<String> = ["```json\n", "{\n", "  \"name\": ", "\"lookup_", "member\",\n", "  \"arguments\": ", "{\"member_id\": ", "\"1001\"}", "\n}", "\n```"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    let a = Fake::start(Behave::SlowWords(pieces.clone(), Duration::from_millis(100)));
    let pool = pool(&[&a], |_| {});
    let options = GenerateOptions {
        tools: vec![ToolSpec { name: "lookup_member".into(), description: "Find a member".into(), parameters: json!({"type": "object"}) }],
        ..GenerateOptions::default()
    };
    let mut calls = 0;
    let mut spoken = String::new();
    let started = Instant::now();
    let stats = pool
        .new_session()
        .generate(&[ChatMessage::new(Role::User, "member 1001")], &options, &mut |p| {
            calls += 1;
            spoken.push_str(p);
            if calls == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .expect("cancelled is not an error");
    assert_eq!(stats.finish, FinishReason::Cancelled, "{stats:?}");
    assert_eq!(spoken, "", "held call text was spoken");
    assert!(stats.tool_calls.is_empty(), "a cancelled reply runs no calls: {stats:?}");
    assert!(started.elapsed() < Duration::from_millis(700), "the whole call was waited out: {:?}", started.elapsed());
    assert!(stat(&pool, "a").healthy, "a cancel is not a failure");

    // Not cancelled, the same stream is one call and no speech.
    a.set(Behave::Words(pieces));
    let mut spoken = String::new();
    let stats = pool
        .new_session()
        .generate(&[ChatMessage::new(Role::User, "member 1001")], &options, &mut |p| {
            spoken.push_str(p);
            ControlFlow::Continue(())
        })
        .expect("reply");
    assert_eq!(spoken.trim(), "");
    assert_eq!(stats.tool_calls.len(), 1, "{stats:?}");
    assert_eq!(stats.tool_calls[0].name, "lookup_member");
    assert_eq!(stats.tool_calls[0].arguments, json!({"member_id": "1001"}));
}
