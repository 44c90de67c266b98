//! Remote LLM replicas end to end: real `parley serve` processes serve
//! `/v1/chat/completions` from their embedded model, and a `RemotePool` built here
//! uses them as replicas. A call sticks to its replica, survives that replica being
//! killed (before and during a reply), and fails clearly when none is left. The
//! endpoint itself is also checked with a raw HTTP/1.1 client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::ops::ControlFlow;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parley_llm::remote::{RemoteConfig, RemotePool, RemoteSession, ReplicaConfig};
use parley_llm::{ChatMessage, GenerateOptions, GenerationStats, LlmSession, Role};
use parley_tests::{parley_bin, words};
use serde_json::{Value, json};

/// Model loading plus a margin.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// A `parley serve` process this test owns and can kill.
struct Replica {
    addr: String,
    child: Child,
}

impl Replica {
    /// Starts `parley serve` on `listen` (`127.0.0.1:0` for a free port) and waits
    /// until its models are loaded.
    fn start(listen: &str) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let bin = parley_bin();
        if !bin.exists() {
            bail!("{} does not exist; build it first (`make test` does)", bin.display());
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--listen", listen]).stdout(Stdio::piped()).stderr(Stdio::inherit());
        if std::env::var_os("PARLEY_LOG").is_none() {
            cmd.env("PARLEY_LOG", "warn");
        }
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the test (the thread that started it) if the test is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("parley listening on http://") {
                        break a.trim().to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    bail!("parley exited before listening (see its stderr above)");
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let replica = Self { addr, child };
        let deadline = Instant::now() + READY_TIMEOUT;
        while http(&replica.addr, "GET", "/readyz", None).map(|r| r.status).unwrap_or(0) != 200 {
            if Instant::now() > deadline {
                bail!("parley at {} was not ready within {READY_TIMEOUT:?}", replica.addr);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(replica)
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// SIGKILL, like a crashed host: no goodbye on its sockets.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A response read by hand.
struct Http {
    status: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), the chunked
/// body decoded.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Http> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, rest) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status")?;
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") { dechunk(rest)? } else { rest.to_string() };
    Ok(Http { status, headers, body })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("chunk end")?;
    }
}

fn pool(replicas: &[(&str, String)]) -> Arc<RemotePool> {
    RemotePool::new(RemoteConfig {
        replicas: replicas
            .iter()
            .map(|(name, url)| ReplicaConfig { name: name.to_string(), base_url: url.clone(), api_key: None, model: "parley".into(), forward_repeat_penalty: false })
            .collect(),
        request_timeout_ms: 60_000,
        health_interval_ms: 500,
        connect_timeout_ms: 1_000,
    })
    .expect("pool")
}

fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_tokens, ..GenerateOptions::default() }
}

/// One turn: the user's message, the streamed reply appended to the conversation.
fn turn(session: &mut RemoteSession, conversation: &mut Vec<ChatMessage>, user: &str) -> Result<(String, GenerationStats)> {
    conversation.push(ChatMessage::new(Role::User, user));
    let mut reply = String::new();
    let stats = session.generate(conversation, &options(40), &mut |piece| {
        reply.push_str(piece);
        ControlFlow::Continue(())
    })?;
    conversation.push(ChatMessage::new(Role::Assistant, reply.clone()));
    Ok((reply, stats))
}

fn requests(pool: &RemotePool, name: &str) -> u64 {
    pool.replica_stats().iter().find(|r| r.name == name).map(|r| r.requests).unwrap_or(0)
}

fn has(text: &str, word: &str) -> bool {
    words(text).iter().any(|w| w == word)
}

#[test]
fn a_call_sticks_to_its_replica_and_survives_losing_it() {
    let t0 = Instant::now();
    let mut a = Replica::start("127.0.0.1:0").expect("start replica a");
    let mut b = Replica::start("127.0.0.1:0").expect("start replica b");
    eprintln!("two replicas ready in {:?}", t0.elapsed());
    let pool = pool(&[("a", a.base_url()), ("b", b.base_url())]);

    // (a) The answer streams from one replica; the next turn goes to the same one.
    let mut session = pool.session();
    let mut conversation = vec![ChatMessage::new(Role::System, "You are a helpful assistant. Answer briefly.")];
    let t = Instant::now();
    let (reply, stats) = turn(&mut session, &mut conversation, "What is the capital of Germany? One word.").expect("turn 1");
    eprintln!("turn 1: {reply:?} in {:?} (first text {:.0} ms)", t.elapsed(), stats.first_token_ms);
    assert!(has(&reply, "berlin"), "turn 1 said {reply:?}");
    assert!(stats.prompt_tokens > 0 && stats.generated_tokens > 0, "{stats:?}");
    let home = session.replica_name().expect("pinned").to_string();
    let other = if home == "a" { "b" } else { "a" };
    let (reply, _) = turn(&mut session, &mut conversation, "What is the capital of France? One word.").expect("turn 2");
    assert!(has(&reply, "paris"), "turn 2 said {reply:?}");
    assert_eq!(session.replica_name(), Some(home.as_str()), "turn 2 moved");
    assert_eq!((requests(&pool, &home), requests(&pool, other)), (2, 0), "{:?}", pool.replica_stats());

    // A stateless request goes to the idle replica... or either: both are idle now;
    // it must simply succeed and pin nothing.
    let (text, _) = pool.complete(&[ChatMessage::new(Role::User, "What is the capital of Italy? One word.")], &options(20)).expect("stateless");
    assert!(has(&text, "rome"), "stateless said {text:?}");
    assert!(pool.replica_stats().iter().map(|r| r.sessions).sum::<usize>() == 1);

    // (b) Kill the call's replica between turns: the next turn completes on the
    // other one, with the whole conversation resent.
    let (home_replica, other_replica) = if home == "a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let home_addr = home_replica.addr.clone();
    home_replica.kill();
    let t = Instant::now();
    let (reply, _) = turn(&mut session, &mut conversation, "What is the capital of Spain? One word.").expect("turn 3 after the kill");
    eprintln!("turn 3 (failed over): {reply:?} in {:?}", t.elapsed());
    assert!(has(&reply, "madrid"), "turn 3 said {reply:?}");
    assert_eq!(session.replica_name(), Some(other), "turn 3 did not move");
    let dead = pool.replica_stats().into_iter().find(|r| r.name == home).expect("stats");
    assert!(!dead.healthy, "{dead:?}");

    // Bring the dead replica back on its port; the pool's health checks see it.
    let t = Instant::now();
    let mut revived = Replica::start(&home_addr).expect("restart the killed replica on its port");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pool.replica_stats().iter().all(|r| r.healthy) {
        assert!(Instant::now() < deadline, "the restarted replica never came back: {:?}", pool.replica_stats());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("restarted replica back in the pool after {:?}", t.elapsed());

    // Kill the call's (new) replica in the middle of a reply: an error (the agent
    // apologises), and the next turn goes to the replica that is left.
    conversation.push(ChatMessage::new(Role::User, "Count from 1 to 40, separated by commas."));
    let mut heard = String::new();
    let mut killed = false;
    let result = session.generate(&conversation, &options(150), &mut |piece| {
        heard.push_str(piece);
        if !killed {
            other_replica.kill();
            killed = true;
        }
        ControlFlow::Continue(())
    });
    conversation.pop();
    let err = result.expect_err("a reply cut off mid-stream must be an error");
    eprintln!("mid-reply kill: heard {heard:?}, error: {err}");
    assert!(killed && !heard.is_empty());
    assert!(err.to_string().contains("mid-reply"), "{err}");
    let (reply, _) = turn(&mut session, &mut conversation, "What is the capital of Germany? One word.").expect("the turn after the mid-reply failure");
    assert!(has(&reply, "berlin"), "said {reply:?}");
    assert_eq!(session.replica_name(), Some(home.as_str()), "did not move to the restarted replica");

    // (c) Both down: a clear error, quickly.
    revived.kill();
    let t = Instant::now();
    let err = turn(&mut session, &mut conversation, "Are you there?").expect_err("no replica left");
    let msg = err.to_string();
    eprintln!("both down: {msg} after {:?}", t.elapsed());
    assert!(msg.contains("no healthy LLM replica"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    eprintln!("whole scenario: {:?}", t0.elapsed());
}

#[test]
fn the_endpoint_answers_raw_http_clients() {
    let server = parley_tests::shared_server();
    let addr = server.addr.as_str();
    let question = json!([{"role": "user", "content": "What is the capital of Germany? One word."}]);

    // GET /v1/models names the engine.
    let models = http(addr, "GET", "/v1/models", None).expect("models");
    assert_eq!(models.status, 200, "{}", models.body);
    let v: Value = serde_json::from_str(&models.body).expect("models JSON");
    assert_eq!(v["object"], "list");
    assert!(v["data"][0]["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");

    // Non-streaming: one chat.completion object.
    let t = Instant::now();
    let r = http(addr, "POST", "/v1/chat/completions", Some(&json!({"model": "parley", "messages": question, "temperature": 0, "max_tokens": 20}))).expect("completion");
    eprintln!("non-streaming completion in {:?}", t.elapsed());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("content-type: application/json"), "{}", r.headers);
    let v: Value = serde_json::from_str(&r.body).expect("completion JSON");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")), "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(has(v["choices"][0]["message"]["content"].as_str().unwrap_or(""), "berlin"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().is_some_and(|n| n > 5) && usage["completion_tokens"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0)));

    // Streaming: role, content deltas, the finish, the usage, [DONE].
    let body = json!({"model": "parley", "messages": question, "temperature": 0, "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}});
    let r = http(addr, "POST", "/v1/chat/completions", Some(&body)).expect("stream");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("content-type: text/event-stream"), "{}", r.headers);
    let data: Vec<&str> = r.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{}", r.body);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk JSON")).collect();
    assert!(chunks.len() >= 4, "{}", r.body);
    let id = chunks[0]["id"].clone();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == id), "{}", r.body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(has(&text, "berlin"), "streamed {text:?}");
    let finishes: Vec<usize> = (0..chunks.len()).filter(|&i| !chunks[i]["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finishes, vec![chunks.len() - 2], "one finish chunk, before the usage chunk: {}", r.body);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "stop");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["completion_tokens"].as_u64().is_some_and(|n| n >= 1), "{last}");

    // Tools: the model's call comes back as tool_calls with finish_reason tool_calls.
    let tools = json!([{"type": "function", "function": {
        "name": "get_order_status",
        "description": "Look up the status of an order by its order ID",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]);
    let ask = json!([
        {"role": "system", "content": "You are a pharmacy assistant. Use the tools."},
        {"role": "user", "content": "What is the status of order ORD001?"}
    ]);
    let r = http(addr, "POST", "/v1/chat/completions", Some(&json!({"messages": ask, "tools": tools, "temperature": 0, "max_tokens": 100}))).expect("tools");
    let v: Value = serde_json::from_str(&r.body).expect("tools JSON");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_order_status");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments string")).expect("arguments JSON");
    assert_eq!(args["order_id"], "ORD001", "{v}");
    let streamed = http(addr, "POST", "/v1/chat/completions", Some(&json!({"messages": ask, "tools": tools, "temperature": 0, "max_tokens": 100, "stream": true})))
        .expect("tools stream");
    let deltas: Vec<Value> = streamed.body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).expect("chunk")).collect();
    let call = deltas.iter().find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned()).expect("a tool_calls delta");
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["name"], "get_order_status");
    assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(deltas.iter().any(|c| c["choices"][0]["finish_reason"] == "tool_calls"), "{}", streamed.body);

    // Bad requests: 400 with an OpenAI-style error body.
    for bad in [json!("not an object"), json!({"messages": []}), json!({"messages": [{"role": "wizard", "content": "x"}]}), json!({"messages": question, "n": 3})] {
        let r = http(addr, "POST", "/v1/chat/completions", Some(&bad)).expect("bad request");
        assert_eq!(r.status, 400, "{bad} → {}", r.body);
        let v: Value = serde_json::from_str(&r.body).expect("error JSON");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

/// Barge-in through a real replica: `Break` ends the reply at once as `Cancelled`
/// (the request is dropped, which stops the replica's generation), and a cancel
/// does not count against the replica's health.
#[test]
fn a_cancelled_remote_reply_stops_early() {
    let server = parley_tests::shared_server();
    let pool = pool(&[("only", format!("http://{}/v1", server.addr))]);
    let mut session = pool.session();
    let messages = [ChatMessage::new(Role::User, "Count from 1 to 100, separated by commas.")];
    let mut pieces = 0;
    let t = Instant::now();
    let stats = session
        .generate(&messages, &options(200), &mut |_| {
            pieces += 1;
            if pieces == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .expect("cancelled");
    assert_eq!(stats.finish, parley_llm::FinishReason::Cancelled);
    assert_eq!(pieces, 3);
    eprintln!("cancelled after 3 pieces in {:?}", t.elapsed());
    assert!(pool.replica_stats()[0].healthy);
}

/// A tool call made by a replica's model arrives as a call (from the streamed
/// `tool_calls` deltas), not as speech, and the tool's result continues the turn.
#[test]
fn tool_calls_come_back_through_the_pool() {
    let server = parley_tests::shared_server();
    let pool = pool(&[("only", format!("http://{}/v1", server.addr))]);
    let mut session = pool.session();
    let options = GenerateOptions {
        max_tokens: 100,
        tools: vec![parley_llm::ToolSpec {
            name: "get_order_status".into(),
            description: "Look up the status of an order by its order ID".into(),
            parameters: json!({"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}),
        }],
        ..GenerateOptions::default()
    };
    let mut conversation = vec![
        ChatMessage::new(Role::System, "You are a pharmacy assistant. Use the tools."),
        ChatMessage::new(Role::User, "What is the status of order ORD001?"),
    ];
    let mut spoken = String::new();
    let stats = session
        .generate(&conversation, &options, &mut |p| {
            spoken.push_str(p);
            ControlFlow::Continue(())
        })
        .expect("a reply");
    assert_eq!(stats.tool_calls.len(), 1, "spoke {spoken:?}, stats {stats:?}");
    let call = &stats.tool_calls[0];
    assert_eq!(call.name, "get_order_status");
    assert_eq!(call.arguments["order_id"], "ORD001");
    assert!(!spoken.contains('{'), "call JSON was spoken: {spoken:?}");

    // The result goes back with the call's id; the model answers from it.
    conversation.push(ChatMessage::tool_calls(spoken, stats.tool_calls.clone()));
    conversation.push(ChatMessage::tool_result(call.id.clone(), r#"{"order_id": "ORD001", "status": "processing"}"#));
    // As the agent does after a result: with its grammar, the 0.5B model may not
    // echo the result's JSON, and without a word on what to do it ends its reply.
    conversation.push(ChatMessage::new(Role::System, "Now answer the caller in one to three short spoken sentences from the tool result."));
    let mut answer = String::new();
    session
        .generate(&conversation, &GenerateOptions { max_tokens: 60, ..options.clone() }, &mut |p| {
            answer.push_str(p);
            ControlFlow::Continue(())
        })
        .expect("the answer after the tool result");
    assert!(words(&answer).iter().any(|w| w.starts_with("process")), "answered {answer:?}");
    assert_eq!(pool.replica_stats()[0].requests, 2);
}
