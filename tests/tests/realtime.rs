//! The Realtime WebSocket end to end: the real binary, the real models, a real
//! socket, audio streamed in real time.

use std::time::Duration;

use parley_tests::{Client, metric, shared_server, speech, start_server, transcribe_with_server, words};
use serde_json::{Value, json};

const TURN_TIMEOUT: Duration = Duration::from_secs(120);

/// Streams a spoken question and waits for the response to finish.
async fn ask(client: &mut Client, question: &str) -> anyhow::Result<Value> {
    let audio = speech(question)?;
    // Speech, then enough silence for the VAD to end the turn; keep listening after.
    if let Some(done) = client.stream(&audio, 1500, Some("response.done")).await? {
        return Ok(done);
    }
    client.wait_for("response.done", TURN_TIMEOUT).await
}

fn index_of(client: &Client, kind: &str) -> usize {
    client.types().iter().position(|t| t == kind).unwrap_or_else(|| panic!("no {kind} in {:?}", client.types()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_question_gets_a_spoken_answer_that_whisper_understands() {
    let server = shared_server();
    let mut c = Client::connect(server).await.expect("connect");
    let done = ask(&mut c, "What is the capital of Germany?").await.expect("a response");

    // The protocol's order of events for a server-VAD turn.
    let order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.done",
    ];
    let positions: Vec<usize> = order.iter().map(|k| index_of(&c, k)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "events out of order: {:?}", c.types());

    let heard = words(&c.heard());
    assert!(heard.contains(&"capital".to_string()) && heard.contains(&"germany".to_string()), "heard {heard:?}");

    assert_eq!(done["response"]["status"], "completed", "{done}");
    let said = done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_string();
    assert!(words(&said).contains(&"berlin".to_string()), "agent said {said:?}");

    // The reply audio is speech that Whisper transcribes back to the reply text.
    let response_id = done["response"]["id"].as_str().expect("response id");
    let audio = c.response_audio(response_id).expect("audio");
    assert!(audio.len() > parley_tests::RATE as usize / 2, "only {} samples of reply audio", audio.len());
    let back = transcribe_with_server(server, &audio).await.expect("transcribe the reply");
    let said_words = words(&said);
    let back_words = words(&back);
    let overlap = said_words.iter().filter(|w| back_words.contains(w)).count();
    assert!(back_words.contains(&"berlin".to_string()), "reply audio transcribed as {back:?} (agent said {said:?})");
    assert!(overlap * 2 >= said_words.len(), "reply audio transcribed as {back:?}, agent said {said:?}");

    // The turn's latency breakdown was reported.
    let metrics = c.events.iter().find(|e| e["type"] == "parley.turn.metrics").expect("turn metrics");
    assert!(metrics["metrics"]["first_audio_ms"].as_f64().is_some(), "{metrics}");
    c.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_events_and_the_call_goes_on() {
    let server = shared_server();
    let mut c = Client::connect(server).await.expect("connect");
    let cases: Vec<(String, &str)> = vec![
        ("{not json".to_string(), "invalid_json"),
        (json!({"type": "no.such.event"}).to_string(), "unknown_event"),
        (json!({"type": "input_audio_buffer.append", "audio": "***not base64***"}).to_string(), "invalid_event"),
        (json!({"type": "input_audio_buffer.append", "audio": "A".repeat(600 * 1024)}).to_string(), "message_too_large"),
        (json!({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus-ish"}}}}}).to_string(), "invalid_event"),
    ];
    for (message, code) in cases {
        c.send_raw(message).await.expect("send");
        let err = c.wait_for("error", Duration::from_secs(10)).await.expect("an error event");
        assert_eq!(err["error"]["code"], code, "{err}");
        assert!(!err["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // Still a working call: a typed question gets a spoken answer.
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Say hello in one short sentence."}]}}))
        .await
        .expect("send");
    c.send(json!({"type": "response.create"})).await.expect("send");
    let done = c.wait_for("response.done", TURN_TIMEOUT).await.expect("response");
    assert_eq!(done["response"]["status"], "completed", "{done}");
    assert!(c.types().iter().any(|t| t == "response.output_audio.delta"));
    c.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_utterance_frees_its_call() {
    // A server of its own, so no other test's calls show in the gauge.
    let server = tokio::task::spawn_blocking(|| start_server(&[])).await.expect("join").expect("start parley");
    let mut c = Client::connect(&server).await.expect("connect");
    let audio = speech("Could you please tell me about my order").expect("speech");
    c.stream(&audio[..audio.len() / 2], 0, None).await.expect("stream");
    assert_eq!(metric(&server.addr, "parley_calls_active").await.expect("metric"), 1.0);
    c.vanish();
    // The registry must drop the call: poll the gauge, do not sleep blindly.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(&server.addr, "parley_calls_active").await.expect("metric") != 0.0 {
        assert!(std::time::Instant::now() < deadline, "the call was not freed within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the server still takes calls.
    let c = Client::connect(&server).await.expect("connect again");
    c.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_calls_get_their_own_answers() {
    let server = shared_server();
    let (a, b) = tokio::join!(
        async {
            let mut c = Client::connect(server).await.expect("connect");
            let done = ask(&mut c, "What is the capital of Germany?").await.expect("response");
            (c.heard(), done)
        },
        async {
            let mut c = Client::connect(server).await.expect("connect");
            let done = ask(&mut c, "How many legs does a dog have?").await.expect("response");
            (c.heard(), done)
        }
    );
    let said = |done: &Value| done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_lowercase();
    assert!(words(&a.0).contains(&"germany".to_string()), "call A heard {:?}", a.0);
    assert!(words(&b.0).contains(&"dog".to_string()), "call B heard {:?}", b.0);
    assert!(said(&a.1).contains("berlin"), "call A got {:?}", said(&a.1));
    assert!(said(&b.1).contains("four") || said(&b.1).contains('4'), "call B got {:?}", said(&b.1));
    assert!(!said(&a.1).contains("dog") && !said(&b.1).contains("berlin"), "answers crossed: {:?} / {:?}", said(&a.1), said(&b.1));
}
