//! The echo agent (`--agent-mode echo`, issue 13): no models, each caller turn
//! played back through the real VAD, turn-taking, barge-in and pacing; and a short
//! smoke run of the load generator against it over both transports.

use std::time::{Duration, Instant};

use parley_tests::{Client, RATE, Server, speech, start_server};
use serde_json::Value;

fn echo_server() -> Server {
    start_server(&["--agent-mode", "echo", "--max-calls", "64"]).expect("the echo server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_turn_is_echoed_back_paced_and_barge_in_cuts_it() {
    let server = echo_server();
    let mut c = Client::connect(&server).await.expect("connect");
    let turn = speech("Hello, I am calling about my order, number four.").expect("espeak-ng");
    let turn_ms = turn.len() as f64 * 1000.0 / f64::from(RATE);
    let first = c.stream(&turn, 3_000, Some("response.output_audio.delta")).await.expect("stream").expect("the turn is echoed");
    let response_id = first["response_id"].as_str().expect("response id").to_string();
    let started = Instant::now();
    let done = c.wait_for("response.done", Duration::from_secs(30)).await.expect("the echo ends");
    let played_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let echoed = c.response_audio(&response_id).expect("audio");
    let echoed_ms = echoed.len() as f64 * 1000.0 / f64::from(RATE);
    // The VAD's segment is the speech plus its padding, minus trailing silence.
    assert!(echoed_ms > turn_ms * 0.6 && echoed_ms < turn_ms + 1_500.0, "echoed {echoed_ms:.0} ms of a {turn_ms:.0} ms turn");
    // Paced: the audio took about its own length to arrive (less the lead).
    assert!(played_ms > echoed_ms - 400.0, "{echoed_ms:.0} ms of audio arrived in {played_ms:.0} ms");

    // Barge-in: speak again, then speak over the echo; it is cut.
    let first = c.stream(&turn, 1_200, Some("response.output_audio.delta")).await.expect("stream").expect("the second turn is echoed");
    let second = first["response_id"].as_str().expect("response id").to_string();
    // Other words than the echo's: the echo guard rightly ignores the caller's line
    // playing the agent's own audio back.
    let over = speech("No, wait. Stop. I need to ask something else entirely.").expect("espeak-ng");
    c.stream(&over, 1_500, Some("response.done")).await.expect("stream over the echo");
    let done = match c.events.iter().rev().find(|e| e["type"] == "response.done" && e["response"]["id"] == second.as_str()) {
        Some(d) => d.clone(),
        None => c.wait_for("response.done", Duration::from_secs(30)).await.expect("the echo ends"),
    };
    assert_eq!(done["response"]["status"], "cancelled", "barge-in cuts the echo: {done}");
    let types: Vec<String> = c.types();
    assert!(types.iter().any(|t| t == "output_audio_buffer.cleared" || t == "input_audio_buffer.speech_started"), "{types:?}");
    c.close().await.ok();
}

#[test]
fn the_load_generator_drives_echo_calls_over_twilio_and_realtime() {
    let load = parley_tests::parley_bin().with_file_name("parley-load");
    if !load.exists() {
        panic!("{} does not exist; build it first (cargo build --release -p parley-load)", load.display());
    }
    let server = echo_server();
    let dir = std::env::temp_dir().join(format!("parley-load-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let clip = dir.join("clip.wav");
    let status = std::process::Command::new("espeak-ng").args(["-v", "en-us", "-s", "150", "-w"]).arg(&clip).arg("Hello, I am calling about my order.").status().expect("espeak-ng");
    assert!(status.success());
    let out = std::process::Command::new(&load)
        .args(["--addr", &server.addr, "--calls", "6", "--transport", "mixed", "--ramp-s", "1", "--duration-s", "12", "--wav"])
        .arg(&clip)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .expect("parley-load runs");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{line}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/summary.json")).expect("summary.json")).expect("json");
    assert_eq!(summary["failed"], 0, "{line}");
    assert!(summary["turns"].as_u64().unwrap_or(0) >= 6, "each caller heard its turns echoed: {line}");
    assert!(summary["pacing_error_p99_ms"].as_f64().unwrap_or(f64::MAX) < 100.0, "{line}");
    for f in ["calls.csv", "samples.csv", "plot.png"] {
        assert!(dir.join("out").join(f).exists(), "{f}");
    }
}
