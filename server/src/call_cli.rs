//! `parley call`: a command-line caller. Streams a WAV file in real time (or sends
//! text, one or more turns), prints what the server heard and said as it arrives,
//! saves the agent's audio and prints each turn's latency. Over the Realtime
//! WebSocket, or with `--http2` over one HTTP/2 stream (`POST /v1/stream`).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Args;
use axum::body::Bytes;
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
    /// Call over one HTTP/2 stream (`POST /v1/stream`, NDJSON both ways, h2c prior
    /// knowledge) instead of the WebSocket; `--url` then names the server, e.g.
    /// `http://127.0.0.1:8080` (a `ws://` URL is turned into one).
    #[arg(long)]
    http2: bool,
}

/// The caller's sending half: WebSocket text messages or NDJSON lines.
enum Tx {
    Ws(futures_util::stream::SplitSink<Ws, Message>),
    H2(h2::SendStream<Bytes>),
}

/// The caller's receiving half.
enum Rx {
    Ws(futures_util::stream::SplitStream<Ws>),
    H2 { body: h2::RecvStream, buf: Vec<u8> },
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Tx {
    /// Sends one client event.
    async fn send(&mut self, event: String) -> Result<()> {
        match self {
            Tx::Ws(ws) => ws.send(Message::text(event)).await.context("sending to the server"),
            Tx::H2(body) => {
                let mut line = event.into_bytes();
                line.push(b'\n');
                // h2 buffers what the window does not take yet.
                body.send_data(Bytes::from(line), false).context("sending to the server")
            }
        }
    }

    /// Ends the call politely.
    async fn close(&mut self) {
        match self {
            Tx::Ws(ws) => {
                let _ = ws.send(Message::Close(None)).await;
            }
            Tx::H2(body) => {
                let _ = body.send_data(Bytes::new(), true);
            }
        }
    }
}

impl Rx {
    /// The next server event's text; `None` when the server ended the call.
    async fn next(&mut self) -> Result<Option<String>> {
        match self {
            Rx::Ws(ws) => loop {
                match ws.next().await {
                    None => return Ok(None),
                    Some(msg) => match msg? {
                        Message::Text(t) => return Ok(Some(t.as_str().to_owned())),
                        Message::Close(_) => return Ok(None),
                        _ => continue,
                    },
                }
            },
            Rx::H2 { body, buf } => loop {
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).take(i).collect();
                    return Ok(Some(String::from_utf8(line).context("the server sent invalid UTF-8")?));
                }
                match body.data().await {
                    None => return Ok(None),
                    Some(chunk) => {
                        let chunk = chunk.context("reading the response stream")?;
                        let _ = body.flow_control().release_capacity(chunk.len());
                        buf.extend_from_slice(&chunk);
                    }
                }
            },
        }
    }
}

/// Opens `POST /v1/stream` on an h2c connection to `url`.
async fn connect_http2(url: &str, api_key: Option<&str>) -> Result<(Tx, Rx)> {
    let base = url.replacen("ws://", "http://", 1);
    let base = base.strip_suffix("/v1/realtime").unwrap_or(&base).trim_end_matches('/');
    let Some(authority) = base.strip_prefix("http://") else {
        bail!("--http2 speaks h2c (prior knowledge): give --url http://HOST:PORT, not {url}");
    };
    let tcp = tokio::net::TcpStream::connect(authority).await.with_context(|| format!("cannot connect to {authority}"))?;
    let _ = tcp.set_nodelay(true);
    let (client, connection) = h2::client::handshake(tcp).await.with_context(|| format!("HTTP/2 handshake with {authority}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("HTTP/2 connection: {e}");
        }
    });
    let mut client = client.ready().await.context("HTTP/2 connection not ready")?;
    let mut request = axum::http::Request::post(format!("{base}/v1/stream")).header("content-type", "application/x-ndjson");
    if let Some(key) = api_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let (response, body) = client.send_request(request.body(()).context("building the request")?, false).context("sending the request")?;
    let response = response.await.context("the server did not answer the stream")?;
    if !response.status().is_success() {
        let status = response.status();
        let mut body = response.into_body();
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            text.extend_from_slice(&chunk);
        }
        bail!("the server refused the call ({status}): {}", String::from_utf8_lossy(&text));
    }
    Ok((Tx::H2(body), Rx::H2 { body: response.into_body(), buf: Vec::new() }))
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
async fn send_text(tx: &mut Tx, text: &str) -> Result<()> {
    let item = json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}});
    tx.send(item.to_string()).await?;
    tx.send(json!({"type": "response.create"}).to_string()).await?;
    println!("you: {text}");
    Ok(())
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.0} ms"))
}

async fn call(args: &CallArgs) -> Result<()> {
    let (mut tx, mut rx) = if args.http2 {
        connect_http2(&args.url, args.api_key.as_deref()).await?
    } else {
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(args.url.as_str())?;
        if let Some(key) = &args.api_key {
            request.headers_mut().insert("authorization", format!("Bearer {key}").parse()?);
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await.with_context(|| format!("cannot connect to {}", args.url))?;
        let (tx, rx) = ws.split();
        (Tx::Ws(tx), Rx::Ws(rx))
    };

    let mut session = json!({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}, "output": {"format": {"type": "audio/pcm", "rate": RATE}}}});
    if let Some(i) = &args.instructions {
        session["instructions"] = json!(i);
    }
    tx.send(json!({"type": "session.update", "session": session}).to_string()).await?;

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
                tx.send(append_event(&samples)).await?;
                sent_chunks += 1;
            }
            msg = rx.next() => {
                let Some(text) = msg? else { bail!("the server closed the call") };
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
                        tx.close().await;
                        return Ok(());
                    }
                    "error" => eprintln!("server error: {}", ev["error"]["message"].as_str().unwrap_or("?")),
                    _ => {}
                }
            }
        }
    }
}
