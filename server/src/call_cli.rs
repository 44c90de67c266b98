//! `parley call`: a command-line caller. Streams a WAV file in real time (or sends
//! text, one or more turns), prints what the server heard and said as it arrives,
//! saves the agent's audio and prints each turn's latency.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use parley_audio::resample::StreamResampler;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The wire rate the caller uses (the Realtime default, PCM16 24 kHz).
const RATE: u32 = 24_000;
/// Real-time chunk the caller sends.
const CHUNK_MS: u64 = 20;

/// Options of `parley call`.
#[derive(Args, Debug)]
pub struct CallArgs {
    /// WAV file to speak (any rate; mixed to mono).
    file: Option<PathBuf>,
    /// Send this text as the user's message instead of audio. Given several times,
    /// plays a conversation in one call: one user turn each, in order, each sent
    /// once the previous response is done.
    #[arg(long)]
    text: Vec<String>,
    /// The server's Realtime endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/realtime", env = "PARLEY_URL")]
    url: String,
    /// Where to save the agent's audio.
    #[arg(long, default_value = "reply.wav")]
    out: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Instructions (system prompt) for this call.
    #[arg(long)]
    instructions: Option<String>,
    /// Append each turn's metrics (server breakdown plus the client's own first-audio
    /// latency: from the end of speech, or for text turns from sending the turn,
    /// `client_sent_to_first_audio_ms`) as one JSON line to this file, for benchmarks.
    #[arg(long)]
    metrics_out: Option<PathBuf>,
    /// API key, sent as a bearer token.
    #[arg(long, env = "PARLEY_API_KEY")]
    api_key: Option<String>,
}

/// Runs the caller.
pub fn run(args: CallArgs) -> Result<()> {
    if args.file.is_none() == args.text.is_empty() {
        bail!("give either a WAV file or --text \"...\"");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move { tokio::time::timeout(Duration::from_secs(args.timeout), call(&args)).await.context("the call timed out")? })
}

fn load_audio(path: &std::path::Path) -> Result<Vec<f32>> {
    let (samples, rate) = parley_audio::wav::read_wav(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut resampler = StreamResampler::new(rate, RATE)?;
    let mut out = resampler.process(&samples);
    out.extend(resampler.flush());
    Ok(out)
}

fn append_event(samples: &[f32]) -> String {
    let bytes = parley_audio::pcm::encode_pcm16le(samples);
    json!({"type": "input_audio_buffer.append", "audio": base64::engine::general_purpose::STANDARD.encode(bytes)}).to_string()
}

/// Sends one user text turn and asks for the response.
async fn send_text<S>(tx: &mut S, text: &str) -> Result<()>
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let item = json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}});
    tx.send(Message::text(item.to_string())).await?;
    tx.send(Message::text(json!({"type": "response.create"}).to_string())).await?;
    println!("you: {text}");
    Ok(())
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.0} ms"))
}

async fn call(args: &CallArgs) -> Result<()> {
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(args.url.as_str())?;
    if let Some(key) = &args.api_key {
        request.headers_mut().insert("authorization", format!("Bearer {key}").parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await.with_context(|| format!("cannot connect to {}", args.url))?;
    let (mut tx, mut rx) = ws.split();

    let mut session = json!({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}, "output": {"format": {"type": "audio/pcm", "rate": RATE}}}});
    if let Some(i) = &args.instructions {
        session["instructions"] = json!(i);
    }
    tx.send(Message::text(json!({"type": "session.update", "session": session}).to_string())).await?;

    let audio = match &args.file {
        Some(path) => load_audio(path)?,
        None => Vec::new(),
    };
    // Text turns still to send, in order; the first goes now.
    let mut texts = args.text.iter();
    let mut turn_sent: Option<Instant> = None;
    if let Some(text) = texts.next() {
        send_text(&mut tx, text).await?;
        turn_sent = Some(Instant::now());
    }

    let chunk = (RATE as u64 * CHUNK_MS / 1000) as usize;
    let started = Instant::now();
    let mut sent_chunks: u64 = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(CHUNK_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut reply: Vec<f32> = Vec::new();
    let mut speech_end: Option<Instant> = None;
    let mut first_audio: Option<Instant> = None;
    let mut agent_text_open = false;
    let streaming = args.file.is_some();
    loop {
        tokio::select! {
            _ = ticker.tick(), if streaming => {
                // The file, then silence, in real time, as a caller's microphone would.
                let from = sent_chunks as usize * chunk;
                let samples: Vec<f32> = if from < audio.len() {
                    audio[from..(from + chunk).min(audio.len())].to_vec()
                } else {
                    vec![0.0; chunk]
                };
                tx.send(Message::text(append_event(&samples))).await?;
                sent_chunks += 1;
            }
            msg = rx.next() => {
                let Some(msg) = msg else { bail!("the server closed the call") };
                let text = match msg? {
                    Message::Text(t) => t,
                    Message::Close(_) => bail!("the server closed the call"),
                    _ => continue,
                };
                let ev: Value = serde_json::from_str(text.as_str()).context("the server sent invalid JSON")?;
                match ev["type"].as_str().unwrap_or("") {
                    "input_audio_buffer.speech_stopped" => {
                        let end_ms = ev["audio_end_ms"].as_u64().unwrap_or(0);
                        speech_end = Some(started + Duration::from_millis(end_ms));
                    }
                    "conversation.item.input_audio_transcription.completed" => {
                        println!("you: {}", ev["transcript"].as_str().unwrap_or(""));
                    }
                    "response.output_audio_transcript.delta" | "response.audio_transcript.delta" => {
                        if !agent_text_open {
                            print!("agent:");
                            agent_text_open = true;
                        }
                        print!(" {}", ev["delta"].as_str().unwrap_or("").trim());
                        let _ = std::io::stdout().flush();
                    }
                    "response.output_audio.delta" | "response.audio.delta" => {
                        first_audio.get_or_insert_with(Instant::now);
                        let bytes = base64::engine::general_purpose::STANDARD.decode(ev["delta"].as_str().unwrap_or("")).context("bad audio from the server")?;
                        reply.extend(parley_audio::pcm::decode_pcm16le(&bytes)?);
                    }
                    "parley.turn.metrics" => {
                        let m = &ev["metrics"];
                        if agent_text_open {
                            println!();
                            agent_text_open = false;
                        }
                        let client_ms = match (speech_end, first_audio) {
                            (Some(end), Some(first)) => Some(first.saturating_duration_since(end).as_secs_f64() * 1000.0),
                            _ => None,
                        };
                        let client = client_ms.map(|v| format!(" (client saw {v:.0} ms)")).unwrap_or_default();
                        if let Some(path) = &args.metrics_out {
                            let mut line = m.clone();
                            line["client_first_audio_ms"] = json!(client_ms);
                            if let (Some(sent), Some(first)) = (turn_sent, first_audio) {
                                line["client_sent_to_first_audio_ms"] = json!(first.saturating_duration_since(sent).as_secs_f64() * 1000.0);
                            }
                            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
                            writeln!(f, "{line}")?;
                        }
                        println!(
                            "latency from end of speech: endpoint {} | transcript {} (asr {}) | first token {} | first audio {}{client} | prompt {} tokens, {} cached, prefill {}",
                            ms(&m["endpoint_ms"]), ms(&m["transcript_ms"]), ms(&m["asr_ms"]), ms(&m["first_token_ms"]), ms(&m["first_audio_ms"]),
                            m["prompt_tokens"], m["cached_tokens"], ms(&m["prefill_ms"]),
                        );
                    }
                    "response.done" => {
                        if agent_text_open {
                            println!();
                        }
                        let status = ev["response"]["status"].as_str().unwrap_or("?").to_string();
                        if let Some(text) = texts.next() {
                            // The conversation goes on: the next text turn, same call.
                            println!("response {status}");
                            agent_text_open = false;
                            first_audio = None;
                            send_text(&mut tx, text).await?;
                            turn_sent = Some(Instant::now());
                            continue;
                        }
                        // Let the last paced frames arrive: they precede response.done.
                        parley_audio::wav::write_wav(&args.out, &reply, RATE).with_context(|| format!("cannot write {}", args.out.display()))?;
                        println!("response {status}; saved {:.1} s of agent audio to {}", reply.len() as f64 / f64::from(RATE), args.out.display());
                        let _ = tx.send(Message::Close(None)).await;
                        return Ok(());
                    }
                    "error" => eprintln!("server error: {}", ev["error"]["message"].as_str().unwrap_or("?")),
                    _ => {}
                }
            }
        }
    }
}
