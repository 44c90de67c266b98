//! Benchmark of how a conversation feels (not a test): drives a real `parley serve`
//! over a real WebSocket with audio streamed in real time, over many trials, and
//! prints barge-in reaction, false-interruption rate on noise bursts, premature
//! cut-off rate on digit strings read with pauses, and end-of-turn delay.
//!
//! Run it with `bash bench/turn_feel.sh` (release build; `TRIALS=N` trials each).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parley_tests::{Client, RATE, cough, speech, start_server};
use serde_json::{Value, json};

const TURN: Duration = Duration::from_secs(180);
const STORY: &str = "Tell me a long story about a brave little dog who finds his way home.";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(5);
    let server = tokio::task::spawn_blocking(|| start_server(&[])).await??;
    let mut reactions = Vec::new();
    let mut ended_by_noise = 0;
    let mut cut_off = 0;
    let mut digit_delays = Vec::new();
    let mut question_delays = Vec::new();
    for t in 0..trials {
        let mut c = Client::connect(&server).await?;
        reactions.push(barge_in(&mut c).await.context("barge-in trial")?);
        let mut c = Client::connect(&server).await?;
        ended_by_noise += usize::from(noise_ends_reply(&mut c, t).await.context("noise trial")?);
        let mut c = Client::connect(&server).await?;
        let pause_ms = 600 + 200 * (t as u64 % 4);
        let (cut, delay) = digits(&mut c, pause_ms).await.context("digit trial")?;
        cut_off += usize::from(cut);
        digit_delays.push(delay);
        let mut c = Client::connect(&server).await?;
        question_delays.push(question(&mut c).await.context("question trial")?);
        eprintln!("trial {}/{trials} done", t + 1);
    }
    let n = trials as f64;
    println!("\n## Turn feel — {trials} trials each, real-time audio, release build\n");
    println!("| measure | median | min | max | rate |");
    println!("|---|---|---|---|---|");
    row("barge-in reaction: caller speech onset → last agent audio frame (ms)", &reactions, None);
    println!("| false interruptions: replies ended by a noise burst (cough, double cough, soft cough) | | | | {ended_by_noise}/{trials} ({:.0} %) |", 100.0 * ended_by_noise as f64 / n);
    println!("| premature cut-off: digit strings split by 0.6–1.2 s pauses | | | | {cut_off}/{trials} ({:.0} %) |", 100.0 * cut_off as f64 / n);
    row("end-of-turn delay, finished question: end of speech → committed (ms)", &question_delays, None);
    row("end-of-turn delay, digit string: end of last digit → committed (ms)", &digit_delays, None);
    Ok(())
}

fn row(name: &str, values: &[f64], rate: Option<&str>) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    println!("| {name} | {median:.0} | {:.0} | {:.0} | {} |", v.first().unwrap_or(&f64::NAN), v.last().unwrap_or(&f64::NAN), rate.unwrap_or(""));
}

async fn ask_text(c: &mut Client, text: &str) -> Result<()> {
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})).await?;
    c.send(json!({"type": "response.create"})).await
}

/// Waits for `n` audio frames of a reply; returns its id.
async fn until_audio(c: &mut Client, n: usize) -> Result<String> {
    let mut count = 0;
    loop {
        let ev = c.next_event(TURN).await?;
        if ev["type"] == "response.output_audio.delta" {
            count += 1;
            if count >= n {
                return Ok(ev["response_id"].as_str().unwrap_or("").to_string());
            }
        }
        anyhow::ensure!(ev["type"] != "response.done", "the reply ended early");
    }
}

/// Streams `samples` in real time while reading events; returns the send time of
/// each 20 ms chunk and the arrival time of each event.
async fn stream_timed(c: &mut Client, samples: &[f32], tail_ms: u64) -> Result<(Vec<Instant>, Vec<(Instant, Value)>)> {
    let mut padded = samples.to_vec();
    padded.extend(std::iter::repeat_n(0.0, (RATE as u64 * tail_ms / 1000) as usize));
    let mut sent = Vec::new();
    let mut got = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for chunk in padded.chunks(RATE as usize / 50) {
        tick.tick().await;
        sent.push(Instant::now());
        c.append(chunk).await?;
        for ev in c.drain().await? {
            got.push((Instant::now(), ev));
        }
    }
    Ok((sent, got))
}

/// Reads events (timed on arrival) until a `response.done`.
async fn timed_until_done(c: &mut Client, got: &mut Vec<(Instant, Value)>) -> Result<()> {
    if got.iter().any(|(_, e)| e["type"] == "response.done") {
        return Ok(());
    }
    loop {
        let ev = c.next_event(TURN).await?;
        let done = ev["type"] == "response.done";
        got.push((Instant::now(), ev));
        if done {
            return Ok(());
        }
    }
}

/// Onset of speech in a clip: the first 20 ms chunk with real energy.
fn onset_chunk(samples: &[f32]) -> usize {
    samples.chunks(RATE as usize / 50).position(|c| c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32 > 1e-4).unwrap_or(0)
}

async fn barge_in(c: &mut Client) -> Result<f64> {
    ask_text(c, STORY).await?;
    let first = until_audio(c, 40).await?;
    let question = speech("Stop. What is the capital of Germany?")?;
    let (sent, got) = stream_timed(c, &question, 1_000).await?;
    let onset = sent[onset_chunk(&question)];
    let last = got.iter().filter(|(_, e)| e["type"] == "response.output_audio.delta" && e["response_id"] == first.as_str()).map(|(t, _)| *t).next_back();
    let reaction = last.map_or(0.0, |t| t.saturating_duration_since(onset).as_secs_f64() * 1000.0);
    c.wait_for("response.done", TURN).await?;
    Ok(reaction)
}

/// A noise burst mid-reply: a cough, a double cough, or a softer cough by turns.
async fn noise_ends_reply(c: &mut Client, trial: usize) -> Result<bool> {
    ask_text(c, STORY).await?;
    let first = until_audio(c, 40).await?;
    let burst = match trial % 3 {
        0 => cough(),
        1 => [cough(), vec![0.0; RATE as usize * 150 / 1000], cough()].concat(),
        _ => cough().iter().map(|s| s * 0.4).collect(),
    };
    stream_timed(c, &burst, 1_200).await?;
    loop {
        if let Some(done) = c.events.iter().find(|e| e["type"] == "response.done" && e["response"]["id"] == first.as_str()) {
            return Ok(done["response"]["status"] != "completed");
        }
        c.next_event(TURN).await?;
    }
}

/// A phone number read in two groups with a pause; true when the pause ended the
/// turn, and the delay from the end of the last digit to the commit.
async fn digits(c: &mut Client, pause_ms: u64) -> Result<(bool, f64)> {
    let first = speech("My phone number is five five five, one two three.")?;
    let second = speech("Four five six seven.")?;
    let mut audio = first;
    audio.extend(std::iter::repeat_n(0.0, (RATE as u64 * pause_ms / 1000) as usize));
    let speech_end = audio.len() + last_voiced(&second);
    audio.extend(second);
    let (sent, mut got) = stream_timed(c, &audio, 3_000).await?;
    timed_until_done(c, &mut got).await?;
    let commits: Vec<Instant> = got.iter().filter(|(_, e)| e["type"] == "input_audio_buffer.committed").map(|(t, _)| *t).collect();
    let end_at = sent[(speech_end / (RATE as usize / 50)).min(sent.len() - 1)];
    let delay = commits.last().map_or(f64::NAN, |t| t.saturating_duration_since(end_at).as_secs_f64() * 1000.0);
    Ok((commits.len() != 1, delay))
}

async fn question(c: &mut Client) -> Result<f64> {
    let q = speech("How many legs does a dog have?")?;
    let end = last_voiced(&q);
    let (sent, mut got) = stream_timed(c, &q, 2_000).await?;
    timed_until_done(c, &mut got).await?;
    let end_at = sent[(end / (RATE as usize / 50)).min(sent.len() - 1)];
    let commit = got.iter().find(|(_, e)| e["type"] == "input_audio_buffer.committed").map(|(t, _)| *t).context("no commit")?;
    Ok(commit.saturating_duration_since(end_at).as_secs_f64() * 1000.0)
}

/// Index just past the last sample with real energy.
fn last_voiced(samples: &[f32]) -> usize {
    let chunk = RATE as usize / 50;
    let n = samples.chunks(chunk).rposition(|c| c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32 > 1e-4).map_or(0, |i| i + 1);
    n * chunk
}
