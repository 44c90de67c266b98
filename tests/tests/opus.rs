//! Opus on the Realtime WebSocket end to end: the real binary and models, a
//! spoken question sent as 20 ms Opus packets (one per append), the reply read
//! back as Opus packets (one per delta) and heard by the server's own ASR.

use std::time::Duration;

use parley_audio::format::AudioFormat;
use parley_tests::{Client, RATE, resample, shared_server, speech, transcribe_with_server, words};
use serde_json::json;

const TURN_TIMEOUT: Duration = Duration::from_secs(120);
/// Samples in one 20 ms Opus packet at 48 kHz.
const PACKET: usize = 960;

/// `samples` (at the test rate) as a stream of 20 ms Opus packets, with `tail_ms`
/// of silence after, from one encoder as a real caller would send them.
fn opus_packets(samples: &[f32], tail_ms: usize) -> Vec<Vec<u8>> {
    let mut audio = resample(samples, RATE, 48_000).expect("resample to 48 kHz");
    audio.extend(std::iter::repeat_n(0.0, 48 * tail_ms));
    let mut encoder = AudioFormat::Opus.encoder().expect("an Opus encoder");
    audio.chunks(PACKET).map(|frame| encoder.encode(frame).expect("encode a frame")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opus_call_is_heard_and_answered_in_opus_and_survives_a_bad_packet() {
    let server = shared_server();
    let mut c = Client::connect(server).await.expect("connect");
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/opus"}},
        "output": {"format": {"type": "audio/opus", "rate": 48000}}}}}))
        .await
        .expect("send");
    let updated = c.wait_for("session.updated", Duration::from_secs(10)).await.expect("session.updated");
    for side in ["input", "output"] {
        assert_eq!(updated["session"]["audio"][side]["format"]["type"], "audio/opus", "{updated}");
    }

    // Not an Opus packet (code 3 claiming 63 frames): an error, and the call goes on.
    c.append_bytes(&[0xFF, 0xFF, 0xFF, 0xFF]).await.expect("send");
    let err = c.wait_for("error", Duration::from_secs(10)).await.expect("an error event");
    assert_eq!(err["error"]["code"], "invalid_audio", "{err}");
    assert!(err["error"]["message"].as_str().unwrap_or("").contains("Opus"), "{err}");

    let question = speech("What is the capital of Germany?").expect("speech");
    let packets = opus_packets(&question, 1500);
    let done = match c.stream_packets(&packets, Some("response.done")).await.expect("stream") {
        Some(done) => done,
        None => c.wait_for("response.done", TURN_TIMEOUT).await.expect("response.done"),
    };
    let heard = words(&c.heard());
    assert!(heard.contains(&"capital".to_string()) && heard.contains(&"germany".to_string()), "heard {heard:?}");
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let said = done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_string();
    assert!(words(&said).contains(&"berlin".to_string()), "agent said {said:?}");

    // Every delta is one 20 ms Opus packet, and they decode in order as one stream.
    let response_id = done["response"]["id"].as_str().expect("response id");
    let payloads = c.response_payloads(response_id).expect("base64 deltas");
    assert!(payloads.len() >= 25, "only {} packets of reply audio", payloads.len());
    let mut decoder = AudioFormat::Opus.decoder().expect("an Opus decoder");
    let mut reply = Vec::new();
    for packet in &payloads {
        assert_eq!(opus::packet::get_nb_samples(packet, 48_000).expect("an Opus packet"), PACKET, "one 20 ms packet per delta");
        reply.extend(decoder.decode(packet).expect("decodes"));
    }
    let rms = (reply.iter().map(|s| s * s).sum::<f32>() / reply.len() as f32).sqrt();
    assert!(rms > 0.01, "the reply is silent (rms {rms})");

    // The decoded reply is speech the server's ASR understands.
    let back = transcribe_with_server(server, &resample(&reply, 48_000, RATE).expect("resample")).await.expect("transcribe the reply");
    assert!(words(&back).contains(&"berlin".to_string()), "reply audio transcribed as {back:?} (agent said {said:?})");
    c.close().await.ok();
}
