//! Dead links, end to end on the real binary: a client that stops reading mid-reply,
//! a client that never reads past `max_call_seconds`, a client that hangs up while
//! its turns are being transcribed. Each must free its call slot (the
//! `parley_calls_active` gauge) and whatever server-wide resource it held, on time.

use std::time::Duration;

use parley_tests::{Client, RATE, metric, speech, start_server_with_config, wait_metric};
use serde_json::json;

/// 48 kHz PCM out: the reply fills the socket's buffers fastest.
async fn ask_for_a_long_reply(c: &mut Client) {
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 48000}}}}}))
        .await
        .expect("send");
    c.wait_for("session.updated", Duration::from_secs(10)).await.expect("session.updated");
    c.say_text("Tell me a long story about a dragon who learns to bake bread, with many details.").await.expect("ask");
    // Read until the reply's audio starts, then stop reading for good.
    c.wait_for("response.output_audio.delta", Duration::from_secs(120)).await.expect("the reply starts");
}

/// Without reading anything, asks for one reply after another (a single reply may
/// fit in the sockets' buffers) until the server frees the call or `within` passes.
/// Returns how long that took.
async fn keep_asking_until_freed(c: &mut Client, addr: &str, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    let mut next_ask = started;
    while metric(addr, "parley_calls_active").await.expect("metric") != 0.0 {
        assert!(started.elapsed() < within, "the call was not freed within {within:?}");
        if std::time::Instant::now() >= next_ask {
            // The server may have stopped reading too: never wait on a send.
            let ask = c.say_text("Now tell me another long story, about a whale who sings.");
            let _ = tokio::time::timeout(Duration::from_millis(200), ask).await;
            next_ask += Duration::from_secs(4);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_within_the_write_timeout() {
    // A small kernel send buffer: the stall shows after a second of audio, not after
    // the half minute loopback's autotuned 4 MiB would take.
    let config = "[server]\nwrite_timeout_ms = 1500\n[server.http]\ntcp_send_buffer_bytes = 16384\n";
    let server = tokio::task::spawn_blocking(move || start_server_with_config(config, &[])).await.expect("join").expect("start parley");
    let mut c = Client::connect_small_buffer(&server).await.expect("connect");
    ask_for_a_long_reply(&mut c).await;
    assert_eq!(metric(&server.addr, "parley_calls_active").await.expect("metric"), 1.0);
    // The client keeps its socket open but reads nothing: the server's writes stall,
    // and the call must end within the write timeout of the first stalled write.
    let took = keep_asking_until_freed(&mut c, &server.addr, Duration::from_secs(120)).await;
    assert!(metric(&server.addr, "parley_write_timeouts_total").await.expect("metric") >= 1.0, "ended, but not by the write timeout");
    eprintln!("call freed {took:?} after the client stopped reading");
    // The server still takes calls.
    Client::connect(&server).await.expect("connect again").close().await.ok();
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_call_seconds_ends_a_call_whose_client_never_reads() {
    // A write timeout far beyond the deadline: only the deadline can end this call.
    let config = "[server]\nmax_call_seconds = 40\nwrite_timeout_ms = 600000\n[server.http]\ntcp_send_buffer_bytes = 16384\n";
    let server = tokio::task::spawn_blocking(move || start_server_with_config(config, &[])).await.expect("join").expect("start parley");
    let started = std::time::Instant::now();
    let mut c = Client::connect_small_buffer(&server).await.expect("connect");
    ask_for_a_long_reply(&mut c).await;
    keep_asking_until_freed(&mut c, &server.addr, Duration::from_secs(80)).await;
    let took = started.elapsed();
    // The deadline, the call's close (2 s at most) and the writer's grace (5 s).
    assert!(took < Duration::from_secs(40 + 2 + 5 + 3), "the call lasted {took:?}");
    eprintln!("call freed {took:?} after it started (max_call_seconds = 40)");
    assert_eq!(metric(&server.addr, "parley_write_timeouts_total").await.expect("metric"), 0.0);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_mid_transcription_frees_the_asr_slot() {
    let server = tokio::task::spawn_blocking(|| start_server_with_config("", &[])).await.expect("join").expect("start parley");
    let mut c = Client::connect(&server).await.expect("connect");
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": null}}}})).await.expect("send");
    c.wait_for("session.updated", Duration::from_secs(10)).await.expect("session.updated");
    // About 25 s of speech per turn, four turns committed at once: decodes queue up
    // behind the server-wide decoding slot for many seconds.
    let sentence = "The quick brown fox jumps over the lazy dog near the river bank every single morning. ";
    let one = speech(&sentence.repeat(5)).expect("speech");
    let turn: Vec<f32> = one.iter().copied().cycle().take(RATE as usize * 25).collect();
    // How long one such decode takes on this machine now (it is loaded by others).
    let timed = std::time::Instant::now();
    for piece in turn.chunks(RATE as usize) {
        c.append(piece).await.expect("append");
    }
    c.send(json!({"type": "input_audio_buffer.commit"})).await.expect("commit");
    c.wait_for("conversation.item.input_audio_transcription.completed", Duration::from_secs(120)).await.expect("a transcript");
    let one_decode = timed.elapsed();
    for _ in 0..4 {
        for piece in turn.chunks(RATE as usize) {
            c.append(piece).await.expect("append");
        }
        c.send(json!({"type": "input_audio_buffer.commit"})).await.expect("commit");
    }
    wait_metric(&server.addr, "parley_asr_decodes_running", 1.0, Duration::from_secs(30)).await.expect("a decode runs");
    c.vanish();
    // The running decode stops at its next check (after the encoder or a decoder
    // step: well within one decode); the queued ones never start. Without that, the
    // four decodes would hold the slot for about four decodes' time.
    let took = wait_metric(&server.addr, "parley_asr_decodes_running", 0.0, one_decode * 2).await.expect("the decoding slot is freed");
    wait_metric(&server.addr, "parley_calls_active", 0.0, Duration::from_secs(5)).await.expect("the call is freed");
    // And nothing starts decoding afterwards for the call that left.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(&server.addr, "parley_asr_decodes_running").await.expect("metric"), 0.0, "a decode of the call that left started later");
    eprintln!("decoding slot freed {took:?} after the hang-up (one decode takes {one_decode:?})");
}
