//! How a conversation feels, end to end on the real binary and models with audio
//! streamed in real time: barge-in that stops the agent and keeps only what was
//! heard, a cough that does not end the reply, a phone number read with pauses that
//! is not cut off, the agent's own echo that does not interrupt it, and an
//! interruption right after a tool call that leaves exactly one completed call.
//!
//! The scenarios run one at a time (they measure reactions in real time on a
//! shared 2-core machine).

use std::time::Duration;

use parley_tests::{Client, RATE, cough, shared_server, speech};
use serde_json::{Value, json};

const TURN: Duration = Duration::from_secs(180);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn ask_text(c: &mut Client, text: &str) {
    c.say_text(text).await.expect("send");
}

/// Waits until `n` audio deltas of the first response arrived; returns its id.
async fn until_audio(c: &mut Client, n: usize) -> String {
    let mut count = 0;
    loop {
        let ev = c.next_event(TURN).await.expect("event");
        if ev["type"] == "response.output_audio.delta" {
            count += 1;
            if count >= n {
                return ev["response_id"].as_str().expect("id").to_string();
            }
        }
        if ev["type"] == "response.done" {
            panic!("the reply ended before {n} audio frames: {:?}", c.types());
        }
    }
}

fn done_of<'a>(c: &'a Client, response_id: &str) -> Option<&'a Value> {
    c.events.iter().find(|e| e["type"] == "response.done" && e["response"]["id"] == response_id)
}

fn transcript_of_done(done: &Value) -> String {
    done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_mid_reply_stops_its_audio_and_keeps_only_what_was_heard() {
    let _serial = SERIAL.lock().await;
    let mut c = Client::connect(shared_server()).await.expect("connect");
    ask_text(&mut c, "Tell me a long story about a brave little dog who finds his way home.").await;
    let first = until_audio(&mut c, 50).await;
    let question = speech("Stop. What is the capital of Germany?").expect("espeak");
    c.stream(&question, 1_500, None).await.expect("stream");
    // Wait for the answer to the new question.
    loop {
        let ev = c.wait_for("response.done", TURN).await.expect("done");
        if ev["response"]["id"] != first.as_str() {
            break;
        }
    }
    let types = c.types();
    let cleared = c.events.iter().position(|e| e["type"] == "output_audio_buffer.cleared" && e["response_id"] == first.as_str()).unwrap_or_else(|| panic!("no clear for the interrupted reply: {types:?}"));
    let late = c.events[cleared..].iter().filter(|e| e["type"] == "response.output_audio.delta" && e["response_id"] == first.as_str()).count();
    assert_eq!(late, 0, "audio of the interrupted reply after the clear");
    let done = done_of(&c, &first).expect("first done");
    assert_eq!(done["response"]["status"], "cancelled", "{done}");
    // What is kept is what was heard: a prefix of what was sent, not the whole reply.
    let heard = parley_tests::words(&transcript_of_done(done));
    let sent: Vec<String> = c.events.iter().filter(|e| e["type"] == "response.output_audio_transcript.delta" && e["response_id"] == first.as_str()).flat_map(|e| parley_tests::words(e["delta"].as_str().unwrap_or(""))).collect();
    assert!(!heard.is_empty() && heard.len() <= sent.len() && sent[..heard.len()] == heard[..], "heard {heard:?} of sent {sent:?}");
    let answer = c.events.iter().rev().find(|e| e["type"] == "response.done").map(transcript_of_done).unwrap_or_default();
    assert!(answer.to_lowercase().contains("berlin"), "answer to the interruption: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cough_mid_reply_does_not_end_the_reply() {
    let _serial = SERIAL.lock().await;
    let mut c = Client::connect(shared_server()).await.expect("connect");
    ask_text(&mut c, "Tell me a long story about a brave little dog who finds his way home.").await;
    let first = until_audio(&mut c, 40).await;
    c.stream(&cough(), 1_200, Some("response.done")).await.expect("stream");
    let done = match done_of(&c, &first) {
        Some(d) => d.clone(),
        None => c.wait_for("response.done", TURN).await.expect("done"),
    };
    assert_eq!(done["response"]["status"], "completed", "{:?}", c.types());
    assert!(!c.types().iter().any(|t| t == "output_audio_buffer.cleared"), "{:?}", c.types());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_number_read_with_pauses_is_not_cut_off() {
    let _serial = SERIAL.lock().await;
    let mut c = Client::connect(shared_server()).await.expect("connect");
    let first = speech("My phone number is five five five, one two three.").expect("espeak");
    let second = speech("Four five six seven.").expect("espeak");
    let mut audio = first;
    audio.extend(std::iter::repeat_n(0.0, RATE as usize)); // a one-second pause
    audio.extend(second);
    c.stream(&audio, 2_500, Some("response.created")).await.expect("stream");
    c.wait_for("response.done", TURN).await.expect("done");
    let commits = c.types().iter().filter(|t| *t == "input_audio_buffer.committed").count();
    let said: Vec<&Value> = c.events.iter().filter(|e| e["type"].as_str().is_some_and(|t| t.contains("input_audio"))).collect();
    assert_eq!(commits, 1, "the pause cut the caller off: {said:?}");
    let heard = c.heard();
    let digits: String = heard.chars().filter(char::is_ascii_digit).collect();
    assert!(digits.ends_with("4567") || heard.to_lowercase().contains("seven"), "the last group is missing from {heard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_echo_does_not_interrupt_it() {
    let _serial = SERIAL.lock().await;
    let mut c = Client::connect(shared_server()).await.expect("connect");
    ask_text(&mut c, "Tell me a long story about a brave little dog who finds his way home.").await;
    // A speakerphone: what plays comes back into the microphone at a third of its level.
    let mut speaker: std::collections::VecDeque<f32> = std::collections::VecDeque::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let frame = RATE as usize / 50;
    let deadline = tokio::time::Instant::now() + TURN;
    let done = loop {
        ticker.tick().await;
        let mut finished = None;
        for ev in c.drain().await.expect("events") {
            if ev["type"] == "response.output_audio.delta" {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD.decode(ev["delta"].as_str().unwrap_or("")).expect("base64");
                speaker.extend(parley_audio::pcm::decode_pcm16le(&bytes).expect("pcm"));
            }
            if ev["type"] == "response.done" {
                finished = Some(ev);
            }
        }
        if let Some(done) = finished {
            break done;
        }
        let echo: Vec<f32> = (0..frame).map(|_| speaker.pop_front().unwrap_or(0.0) * 0.33).collect();
        c.append(&echo).await.expect("append");
        assert!(tokio::time::Instant::now() < deadline, "no response.done");
    };
    assert_eq!(done["response"]["status"], "completed", "{:?}", c.types());
    assert!(!c.types().iter().any(|t| t == "output_audio_buffer.cleared"), "{:?}", c.types());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_right_after_a_tool_call_leaves_exactly_one_completed_call() {
    let _serial = SERIAL.lock().await;
    let mut c = Client::connect(shared_server()).await.expect("connect");
    ask_text(&mut c, "My member ID is 1001. What is the status of my order?").await;
    c.wait_for("response.function_call_arguments.done", TURN).await.expect("the model called a tool");
    c.send(json!({"type": "response.cancel"})).await.expect("cancel");
    c.wait_for("response.done", TURN).await.expect("done");
    // The tool's result is committed even though the reply was cancelled.
    let has_output = |c: &Client| c.events.iter().any(|e| e["item"]["type"] == "function_call_output");
    while !has_output(&c) {
        c.next_event(Duration::from_secs(15)).await.expect("the interrupted call's result");
    }
    c.send(json!({"type": "response.create"})).await.expect("send");
    let done = c.wait_for("response.done", TURN).await.expect("done");
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let calls: Vec<&Value> = c.events.iter().filter(|e| e["type"] == "response.function_call_arguments.done").collect();
    let outputs: Vec<String> = c.events.iter().filter(|e| e["item"]["type"] == "function_call_output" && (e["type"] == "conversation.item.added" || e["type"] == "conversation.item.created")).map(|e| e["item"]["call_id"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(calls.len(), 1, "the tool ran again: {calls:?}");
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(calls[0]["call_id"].as_str(), Some(outputs[0].as_str()));
}
