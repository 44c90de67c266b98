//! Tool calling end to end: the real binary and model, built-in pharmacy tools,
//! an HTTP tool served by a local test server, client tools the Realtime way, and a
//! tool that times out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_tests::{Client, Server, start_server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TURN: Duration = Duration::from_secs(180);

async fn ask_text(c: &mut Client, text: &str) -> Value {
    c.say_text(text).await.expect("send");
    c.wait_for("response.done", TURN).await.expect("response.done")
}

fn server_with_config(config: &str) -> Server {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("parley-tools-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("parley.toml");
    let db = dir.join("pharmacy.sqlite");
    let _ = std::fs::remove_file(&db);
    std::fs::write(&path, format!("[tools]\npharmacy_db = \"{}\"\n{config}", db.display())).expect("write config");
    start_server(&["--config", path.to_str().expect("utf-8 path")]).expect("start parley")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pharmacy_caller_gets_the_order_status_from_the_built_in_tools() {
    let server = tokio::task::spawn_blocking(|| server_with_config("")).await.expect("join");
    let mut c = Client::connect(&server).await.expect("connect");
    let done = ask_text(&mut c, "My member ID is 1001 and my date of birth is March 12, 1984. What orders do I have and what is their status?").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let calls = c.tool_calls();
    assert!(!calls.is_empty(), "no tool was called; events: {:?}", c.types());
    let (name, args) = &calls[0];
    // Issue 9: identity first, so the first call is the check.
    assert_eq!(name, "verify_member", "first call {name} {args}");
    assert!(args.to_string().contains("1001") || args.to_string().to_lowercase().contains("ord001"), "arguments {args}");
    // The result went into the conversation, and the agent said the status.
    assert!(c.types().iter().any(|t| t == "conversation.item.added") && c.events.iter().any(|e| e["item"]["type"] == "function_call_output"));
    assert!(c.spoken().to_lowercase().contains("process"), "agent said: {}", c.spoken());
}

/// A one-route HTTP server that records request bodies and answers after `delay`.
async fn http_tool_server(delay: Duration, answer: Value) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers and a Content-Length body.
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                            .unwrap_or(0);
                        if body.len() >= len {
                            let content_type = head.lines().find(|l| l.to_lowercase().starts_with("content-type:")).unwrap_or("").to_string();
                            log.lock().expect("lock").push((content_type, body.to_string()));
                            break;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                let body = answer.to_string();
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

fn http_tool_config(addr: &str, timeout_ms: u64) -> String {
    format!(
        r#"pharmacy = false
[[tools.http]]
name = "get_store_hours"
description = "Get the opening hours of one of our stores."
url = "http://{addr}/hours"
timeout_ms = {timeout_ms}
parameters = {{ type = "object", properties = {{ store = {{ type = "string", description = "the store's street, e.g. Main Street" }} }}, required = ["store"] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_tool_is_posted_the_arguments_and_its_answer_is_spoken() {
    let (addr, seen) = http_tool_server(Duration::ZERO, json!({"store": "Main Street", "hours": "9 AM to 6 PM"})).await;
    let config = http_tool_config(&addr, 5000);
    let server = tokio::task::spawn_blocking(move || server_with_config(&config)).await.expect("join");
    let mut c = Client::connect(&server).await.expect("connect");
    let done = ask_text(&mut c, "What are the opening hours of the Main Street store?").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let requests = seen.lock().expect("lock").clone();
    assert!(!requests.is_empty(), "the HTTP tool was never called; tool calls: {:?}", c.tool_calls());
    let (content_type, body) = &requests[0];
    assert!(content_type.to_lowercase().contains("application/json"), "{content_type}");
    let body: Value = serde_json::from_str(body).expect("the tool got JSON");
    assert!(body["store"].as_str().unwrap_or("").to_lowercase().contains("main"), "{body}");
    let said = c.spoken();
    assert!(said.contains('9') || said.contains("nine"), "agent said: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_times_out_is_explained_and_the_call_goes_on() {
    let (addr, _) = http_tool_server(Duration::from_secs(30), json!({})).await;
    let config = http_tool_config(&addr, 1500);
    let server = tokio::task::spawn_blocking(move || server_with_config(&config)).await.expect("join");
    let mut c = Client::connect(&server).await.expect("connect");
    let done = ask_text(&mut c, "What are the opening hours of the Main Street store?").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let output = c.events.iter().find(|e| e["item"]["type"] == "function_call_output").expect("a tool result in the conversation");
    assert!(output["item"]["output"].as_str().unwrap_or("").contains("did not answer"), "{output}");
    assert!(!c.spoken().is_empty(), "the agent said nothing after the timeout");
    // The call still works.
    let done = ask_text(&mut c, "Thanks. Say goodbye.").await;
    assert_eq!(done["response"]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tools_follow_the_realtime_function_call_sequence() {
    let server = tokio::task::spawn_blocking(|| server_with_config("pharmacy = false\n")).await.expect("join");
    let mut c = Client::connect(&server).await.expect("connect");
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [{
        "type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}}))
        .await
        .expect("send");
    c.wait_for("session.updated", Duration::from_secs(10)).await.expect("updated");
    let done = ask_text(&mut c, "What's the weather like in Paris right now?").await;
    let order = ["response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done", "response.done"];
    let types = c.types();
    let mut last = 0;
    for k in order {
        let at = types.iter().skip(last).position(|t| t == k).unwrap_or_else(|| panic!("no {k} after {last}: {types:?}"));
        last += at;
    }
    let call = done["response"]["output"].as_array().and_then(|o| o.iter().find(|i| i["type"] == "function_call")).expect("function_call in response.done").clone();
    assert_eq!(call["name"], "get_weather");
    assert!(call["arguments"].as_str().unwrap_or("").to_lowercase().contains("paris"), "{call}");
    c.send(json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": call["call_id"], "output": "{\"temperature_c\": 21, \"sky\": \"sunny\"}"}}))
        .await
        .expect("send");
    c.send(json!({"type": "response.create"})).await.expect("send");
    let done = c.wait_for("response.done", TURN).await.expect("second response");
    assert_eq!(done["response"]["status"], "completed");
    let said = done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_lowercase();
    assert!(said.contains("21") || said.contains("sunny") || said.contains("twenty"), "agent said: {said}");
}

/// Issue 9's spoken call: a caller proves who they are, asks an order's status and
/// pickup time, and asks for a refill, which is requested only after they say yes.
/// Every turn is speech (espeak-ng) heard through the real ASR; the tool events come
/// in order, and nothing is disclosed before the identity check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_pharmacy_call_checks_identity_then_answers_status_pickup_and_refill() {
    let server = tokio::task::spawn_blocking(|| server_with_config("")).await.expect("join");
    let mut c = Client::connect(&server).await.expect("connect");
    let turn = |text: &'static str| {
        let audio = parley_tests::speech(text).expect("espeak-ng");
        (text, audio)
    };
    let turns = [
        turn("Hi. Is my order ready?"),
        turn("My member ID is one zero zero two, and my date of birth is November second, nineteen seventy one."),
        turn("What is the status of order O R D zero zero two?"),
        turn("When can I pick it up?"),
        // espeak-ng's "refill my" reaches tiny.en as "reveal my"; "a refill of" as "a refill on".
        turn("I would like a refill of my prescription."),
        turn("Yes, please go ahead."),
    ];
    let mut said = Vec::new();
    let mut calls_after = Vec::new();
    for (text, audio) in &turns {
        let before = c.spoken().len();
        let done = c.stream(audio, 1500, Some("response.done")).await.expect("stream");
        let done = match done {
            Some(done) => done,
            None => c.wait_for("response.done", TURN).await.expect("response.done"),
        };
        assert_eq!(done["response"]["status"], "completed", "{text}: {done}");
        let now = c.spoken();
        said.push(now[before..].to_string());
        calls_after.push(c.tool_calls());
        eprintln!("caller: {text}\n  heard: {}\n  calls: {:?}\n  agent: {}", c.heard(), c.tool_calls(), now[before..].trim());
    }
    let names = |i: usize| calls_after[i].iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    // 1: nothing disclosed before the check (member 1002's orders are Lisinopril).
    // Nor made up: the 0.5B model once answered "Yes, my order is ready."
    assert!(!said[0].contains("lisinopril") && !said[0].contains("is ready") && !said[0].contains("ready for"), "disclosed before the check: {}", said[0]);
    // 2: the check, with the spoken member id.
    // (Turn 1's check may have been called with nothing, for what it asks the caller.)
    let verify = calls_after[1].iter().rfind(|(n, _)| n == "verify_member").unwrap_or_else(|| panic!("no verify_member: {:?}", names(1)));
    assert_eq!(verify.1["member_id"], "1002", "{verify:?}");
    // 3: the status of ORD002 is ready (from a look-up, or from the check's result,
    // which lists the member's orders).
    assert!(said[2].contains("ready"), "status: {}", said[2]);
    // 4: the pickup time, December 2nd at 2:30 p.m.
    assert!(said[3].contains("december") && (said[3].contains("two thirty") || said[3].contains("2:30")), "pickup: {}", said[3]);
    // 5-6: the refill. Member 1002 has one prescription (RX1002, Lisinopril, two
    // refills left): asked for with no id, it is that one; the tool asks the
    // caller to confirm, and the refill is requested on the yes.
    let refills: Vec<&(String, Value)> = calls_after[5].iter().filter(|(n, _)| n == "request_refill").collect();
    assert!(refills.iter().all(|(_, a)| a["rx_id"] == "RX1002"), "{refills:?}");
    let confirmed_at = calls_after.iter().position(|calls| calls.iter().any(|(n, a)| n == "request_refill" && a["confirm"] == true));
    assert_eq!(confirmed_at, Some(5), "the refill was not requested on the caller's yes: {:?}", names(5));
    assert!(["request", "submit", "placed"].iter().any(|w| said[5].contains(w)), "refill: {}", said[5]);
    assert!(said[4].chars().any(char::is_alphabetic) && said[5].chars().any(char::is_alphabetic), "a silent turn: {said:?}");
    // The tool events came in the Realtime order for each call: arguments done,
    // then the output item, then its result in the conversation.
    let order: Vec<&str> = c
        .events
        .iter()
        .filter_map(|e| match e["type"].as_str() {
            Some("response.function_call_arguments.done") => Some("args"),
            Some("conversation.item.added") if e["item"]["type"] == "function_call_output" => Some("result"),
            _ => None,
        })
        .collect();
    assert!(order.first() == Some(&"args") && order.iter().filter(|s| **s == "args").count() == order.iter().filter(|s| **s == "result").count(), "{order:?}");
    assert!(!c.spoken().contains('{') && !c.spoken().contains("555-"), "JSON or a phone number spoken: {}", c.spoken());
}
