//! The phone gateway end to end: a fake Twilio (a real WebSocket client speaking
//! the Media Streams protocol, streaming μ-law 8 kHz in 20 ms frames in real time,
//! silence included, and echoing marks) against the real binary and models.
//!
//! The server under test has `[twilio] auth_token` and `public_url` set, so every
//! request carries an `X-Twilio-Signature`; the signatures below were computed
//! independently (Python's hmac) for those fixed URLs.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use parley_audio::format::AudioFormat;
use parley_tests::{RATE, Server, http_request, metric, resample, speech, start_server, transcribe_with_server, words};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

const TOKEN: &str = "parley-e2e-token";
const PUBLIC_URL: &str = "https://parley.example.test";
/// HMAC-SHA1 of `wss://parley.example.test/twilio` with TOKEN, no parameters.
const WS_SIGNATURE: &str = "JZRGfJU4/El1WrrgXcEehPELzIU=";
/// HMAC-SHA1 of `https://parley.example.test/twilio/voice` + the sorted VOICE_PARAMS.
const VOICE_SIGNATURE: &str = "EAgE2BDAruvfOyk2dcNdb0BlGAY=";
const VOICE_BODY: &str = "CallSid=CA0000000000000000000000000000e2e1&AccountSid=AC0000000000000000000000000000e2e0\
&From=%2B15550100&To=%2B15550111&CallStatus=ringing&Direction=inbound";

const TURN_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of 20 ms of μ-law at 8 kHz.
const FRAME: usize = 160;
/// The agent may run this far ahead of real time (its default pacing lead).
const LEAD_MS: f64 = 120.0;

/// One server with the Twilio settings for every test here.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("parley-e2e-twilio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path: PathBuf = dir.join("twilio.toml");
        std::fs::write(&path, format!("[twilio]\npublic_url = \"{PUBLIC_URL}\"\nauth_token = \"{TOKEN}\"\n")).expect("write config");
        let path = path.to_string_lossy().into_owned();
        start_server(&["--config", &path, "--max-calls", "8"]).expect("start parley with a [twilio] config")
    })
}

/// The tests here measure real-time pacing and barge-in on a small machine: one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// μ-law 8 kHz bytes of speech made at the test rate.
fn mulaw(samples_24k: &[f32]) -> Vec<u8> {
    let at_8k = resample(samples_24k, RATE, 8000).expect("resample");
    AudioFormat::Pcmu.encode(&at_8k).expect("μ-law is stateless")
}

/// A message from the server and when it arrived.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    msg: Value,
}

impl Received {
    fn event(&self) -> &str {
        self.msg["event"].as_str().unwrap_or("?")
    }
}

/// A fake Twilio: streams the queued caller audio (or silence) every 20 ms, sends
/// control messages between frames, records what the server sends, echoes marks.
struct FakeTwilio {
    stream_sid: String,
    audio: Arc<Mutex<VecDeque<u8>>>,
    queued: Arc<AtomicUsize>,
    control: mpsc::UnboundedSender<Message>,
    incoming: mpsc::UnboundedReceiver<Received>,
    /// Every server message so far, in order.
    log: Vec<Received>,
    closed: Arc<AtomicUsize>,
}

impl FakeTwilio {
    async fn connect(server: &Server, custom_parameters: Value) -> Result<Self> {
        let mut req = format!("ws://{}/twilio", server.addr).into_client_request()?;
        req.headers_mut().insert("x-twilio-signature", HeaderValue::from_static(WS_SIGNATURE));
        let (ws, _) = tokio_tungstenite::connect_async(req).await.context("connect to /twilio")?;
        let (mut sink, mut stream) = ws.split();
        let stream_sid = "MZ00000000000000000000000000e2e000".to_string();
        sink.send(Message::text(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string())).await?;
        let start = json!({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
            "accountSid": "AC0000000000000000000000000000e2e0", "streamSid": stream_sid, "callSid": "CA0000000000000000000000000000e2e1",
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": custom_parameters}});
        sink.send(Message::text(start.to_string())).await?;

        let audio = Arc::new(Mutex::new(VecDeque::<u8>::new()));
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (control, mut control_rx) = mpsc::unbounded_channel::<Message>();
        let (incoming_tx, incoming) = mpsc::unbounded_channel::<Received>();

        // Sender: control messages first, then one 20 ms media frame per tick.
        let (a, q, sid) = (audio.clone(), queued.clone(), stream_sid.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = 2u64;
            let mut chunk = 1u64;
            loop {
                ticker.tick().await;
                while let Ok(m) = control_rx.try_recv() {
                    let stop = matches!(&m, Message::Close(_));
                    if sink.send(m).await.is_err() || stop {
                        return;
                    }
                }
                let frame: Vec<u8> = {
                    let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let n = a.len().min(FRAME);
                    let mut f: Vec<u8> = a.drain(..n).collect();
                    f.resize(FRAME, 0xFF); // μ-law silence
                    q.store(a.len(), Ordering::SeqCst);
                    f
                };
                let payload = base64::engine::general_purpose::STANDARD.encode(&frame);
                let media = json!({"event": "media", "sequenceNumber": seq.to_string(), "streamSid": sid,
                    "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": (chunk * 20).to_string(), "payload": payload}});
                seq += 1;
                chunk += 1;
                if sink.send(Message::text(media.to_string())).await.is_err() {
                    return;
                }
            }
        });
        // Receiver: records every server message; a mark is echoed, as Twilio does
        // once playback reaches it (the agent paces in real time, so that is now).
        let (echo, sid, c) = (control.clone(), stream_sid.clone(), closed.clone());
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let text = match msg {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                if v["event"] == "mark" {
                    let name = v["mark"]["name"].clone();
                    let _ = echo.send(Message::text(json!({"event": "mark", "sequenceNumber": "0", "streamSid": sid, "mark": {"name": name}}).to_string()));
                }
                if incoming_tx.send(Received { at: Instant::now(), msg: v }).is_err() {
                    break;
                }
            }
            c.store(1, Ordering::SeqCst);
        });
        Ok(Self { stream_sid, audio, queued, control, incoming, log: Vec::new(), closed })
    }

    /// Queues caller audio (μ-law 8 kHz); it goes out in real time.
    fn say(&self, mulaw: &[u8]) {
        let mut a = self.audio.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        a.extend(mulaw);
        self.queued.store(a.len(), Ordering::SeqCst);
    }

    /// Waits until the queued caller audio has been sent; returns when that was.
    async fn said(&mut self) -> Instant {
        while self.queued.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    }

    /// Sends a text message (valid or not) between media frames.
    fn send_raw(&self, text: &str) {
        let _ = self.control.send(Message::text(text.to_string()));
    }

    fn send_binary(&self, bytes: Vec<u8>) {
        let _ = self.control.send(Message::binary(bytes));
    }

    /// Moves what has arrived into the log.
    fn drain(&mut self) {
        while let Ok(r) = self.incoming.try_recv() {
            self.log.push(r);
        }
    }

    /// Reads until a message with `event` arrives; returns it.
    async fn wait_for(&mut self, event: &str, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = match tokio::time::timeout(left, self.incoming.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => bail!("the server closed the stream while waiting for {event}; got {:?}", self.events()),
                Err(_) => bail!("timed out waiting for {event}; got {:?}", self.events()),
            };
            self.log.push(r.clone());
            if r.event() == event {
                return Ok(r);
            }
        }
    }

    /// Event names received so far, runs of media collapsed.
    fn events(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.log {
            let e = r.event().to_string();
            match out.last_mut() {
                Some(last) if e == "media" && last.starts_with("media") => *last = format!("media x{}", last.split('x').nth(1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(1) + 1),
                _ => out.push(e),
            }
        }
        out
    }

    /// Sends `stop` and closes, as Twilio does when the caller hangs up.
    fn hang_up(&self) {
        self.send_raw(&json!({"event": "stop", "sequenceNumber": "0", "streamSid": self.stream_sid,
            "stop": {"accountSid": "AC0000000000000000000000000000e2e0", "callSid": "CA0000000000000000000000000000e2e1"}}).to_string());
        let _ = self.control.send(Message::Close(None));
    }

    /// Waits for the server to close the socket.
    async fn closed_by_server(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.closed.load(Ordering::SeqCst) == 1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// The media messages in `log[range]`, checked: our stream, 160-byte payloads.
fn media_of(log: &[Received], sid: &str) -> Vec<(Instant, Vec<u8>)> {
    log.iter()
        .filter(|r| r.event() == "media")
        .map(|r| {
            assert_eq!(r.msg["streamSid"], sid, "{}", r.msg);
            let bytes = base64::engine::general_purpose::STANDARD.decode(r.msg["media"]["payload"].as_str().expect("payload")).expect("base64 payload");
            assert_eq!(bytes.len(), FRAME, "media payloads are 20 ms μ-law frames");
            (r.at, bytes)
        })
        .collect()
}

/// μ-law 8 kHz reply audio → the test rate, transcribed by the server.
async fn transcribe_mulaw(server: &Server, audio: &[u8]) -> Result<String> {
    let pcm = AudioFormat::Pcmu.decode(audio)?;
    transcribe_with_server(server, &resample(&pcm, 8000, RATE)?).await
}

/// Levenshtein distance between two words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Waits for the server to have no call in progress.
async fn calls_drain(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server.addr, "parley_calls_active").await.expect("metric") != 0.0 {
        assert!(Instant::now() < deadline, "calls were not freed within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_question_gets_paced_mulaw_answer_and_a_mark() {
    let _turn = one_at_a_time().await;
    let server = server();
    let mut t = FakeTwilio::connect(server, json!({})).await.expect("connect");
    t.say(&mulaw(&speech("What is the capital of Germany?").expect("speech")));
    let mark = t.wait_for("mark", TURN_TIMEOUT).await.expect("a mark after the response");
    assert_eq!(mark.msg["streamSid"], t.stream_sid.as_str(), "{}", mark.msg);
    assert!(mark.msg["mark"]["name"].as_str().is_some_and(|n| !n.is_empty()), "{}", mark.msg);
    let before_mark = t.log.len() - 1;
    let media = media_of(&t.log[..before_mark], &t.stream_sid);
    assert!(!t.events().iter().any(|e| e == "clear"), "no barge-in happened: {:?}", t.events());

    // Paced, not dumped: the audio arrives at about the speed it plays.
    let total_ms = media.len() as f64 * 20.0;
    assert!(total_ms >= 1000.0, "only {total_ms} ms of reply audio");
    let first = media[0].0;
    let span_ms = media.last().expect("media").0.duration_since(first).as_secs_f64() * 1000.0;
    assert!(span_ms >= total_ms * 0.75, "{total_ms} ms of audio arrived in {span_ms} ms");
    for (i, (at, _)) in media.iter().enumerate() {
        let elapsed = at.duration_since(first).as_secs_f64() * 1000.0;
        let sent_ms = i as f64 * 20.0;
        assert!(sent_ms <= elapsed + LEAD_MS + 250.0, "frame {i} ({sent_ms} ms of audio) arrived after only {elapsed} ms");
    }

    // The reply is speech that says Berlin.
    let audio: Vec<u8> = media.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let back = transcribe_mulaw(server, &audio).await.expect("transcribe the reply");
    // Whisper tiny on 8 kHz telephone audio may misspell the name ("brolin").
    assert!(words(&back).iter().any(|w| edit_distance(w, "berlin") <= 2), "reply audio transcribed as {back:?}");

    t.hang_up();
    assert!(t.closed_by_server(Duration::from_secs(10)).await, "the server did not close the stream after stop");
    calls_drain(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_barging_in_gets_a_clear_and_the_old_reply_stops() {
    let _turn = one_at_a_time().await;
    let server = server();
    let mut t = FakeTwilio::connect(server, json!({})).await.expect("connect");
    t.say(&mulaw(&speech("Please tell me a long story about a brave knight and a dragon.").expect("speech")));
    t.wait_for("media", TURN_TIMEOUT).await.expect("the agent starts speaking");
    tokio::time::sleep(Duration::from_millis(600)).await;
    t.drain();
    assert!(!t.events().iter().any(|e| e == "mark"), "the story ended before the barge-in: {:?}", t.events());

    // The caller talks over the agent (one phrase without pauses, so the VAD
    // hears one turn).
    t.say(&mulaw(&speech("Wait what is two plus two").expect("speech")));
    let clear = t.wait_for("clear", Duration::from_secs(60)).await.expect("a clear on barge-in");
    assert_eq!(clear.msg["streamSid"], t.stream_sid.as_str(), "{}", clear.msg);
    let clear_at = t.log.len() - 1;
    let before_clear: Vec<String> = t.log[..clear_at].iter().map(|r| r.event().to_string()).collect();
    assert!(!before_clear.iter().any(|e| e == "mark"), "the interrupted reply got a mark: {:?}", t.events());
    let speech_end = t.said().await;
    t.drain();
    // Until the caller has finished speaking no new reply can start, so any media
    // between the clear and then would be the interrupted reply going on.
    let late: Vec<&Received> = t.log[clear_at..].iter().filter(|r| r.event() == "media" && r.at <= speech_end).collect();
    assert!(late.is_empty(), "{} media frames of the interrupted reply after the clear: {:?}", late.len(), t.events());

    // The new turn gets its own reply, ended by a mark.
    let after = t.log.len();
    t.wait_for("mark", TURN_TIMEOUT).await.expect("the next reply's mark");
    let media = media_of(&t.log[after..], &t.stream_sid);
    assert!(!media.is_empty(), "the next reply had no audio: {:?}", t.events());
    assert!(media.iter().all(|(at, _)| *at > speech_end));

    t.hang_up();
    assert!(t.closed_by_server(Duration::from_secs(10)).await);
    calls_drain(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_messages_do_not_end_the_call() {
    let _turn = one_at_a_time().await;
    let server = server();
    let greeting = "Hello, thank you for calling. How can I help you today?";
    let mut t = FakeTwilio::connect(server, json!({"greeting": greeting})).await.expect("connect");
    t.send_raw("{not json");
    t.send_raw(&json!({"event": "no-such-event", "streamSid": t.stream_sid}).to_string());
    t.send_raw(&json!({"event": "media", "streamSid": t.stream_sid, "media": {"payload": "***not base64***"}}).to_string());
    t.send_raw(&json!({"event": "dtmf", "streamSid": t.stream_sid, "dtmf": {"digit": "not a digit"}}).to_string());
    t.send_raw(&json!({"event": "dtmf", "streamSid": t.stream_sid, "dtmf": {"track": "inbound_track", "digit": "1"}}).to_string());
    t.send_raw(&json!({"event": "mark", "streamSid": t.stream_sid, "mark": {"name": "never-sent"}}).to_string());
    t.send_raw(&json!({"noevent": true}).to_string());
    t.send_binary(vec![1, 2, 3]);

    // The call is alive: the agent speaks its greeting to the end.
    t.wait_for("mark", TURN_TIMEOUT).await.expect("the greeting, then its mark");
    let media = media_of(&t.log, &t.stream_sid);
    assert!(media.len() >= 25, "only {} frames of greeting: {:?}", media.len(), t.events());
    let audio: Vec<u8> = media.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let back = words(&transcribe_mulaw(server, &audio).await.expect("transcribe the greeting"));
    assert!(["hello", "thank", "thanks", "calling", "help", "welcome"].iter().any(|w| back.contains(&w.to_string())), "greeting heard as {back:?}");
    assert!(metric(&server.addr, "parley_client_messages_rejected_total").await.expect("metric") >= 5.0);

    // A socket closed without `stop` frees the call too.
    let _ = t.control.send(Message::Close(None));
    calls_drain(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_webhook_answers_twiml_and_checks_signatures() {
    let server = server();
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let signed = [form[0], ("X-Twilio-Signature", VOICE_SIGNATURE)];
    let ok = http_request(&server.addr, "POST", "/twilio/voice", &signed, VOICE_BODY).await.expect("POST");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.header("content-type").is_some_and(|c| c.starts_with("text/xml")), "{ok:?}");
    assert!(ok.body.contains("<Response><Connect><Stream url=\"wss://parley.example.test/twilio\"/></Connect></Response>"), "{}", ok.body);

    let bad = [form[0], ("X-Twilio-Signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")];
    assert_eq!(http_request(&server.addr, "POST", "/twilio/voice", &bad, VOICE_BODY).await.expect("POST").status, 403);
    assert_eq!(http_request(&server.addr, "POST", "/twilio/voice", &form, VOICE_BODY).await.expect("POST").status, 403);
    // A tampered parameter breaks the signature.
    let tampered = VOICE_BODY.replace("%2B15550100", "%2B15550199");
    assert_eq!(http_request(&server.addr, "POST", "/twilio/voice", &signed, &tampered).await.expect("POST").status, 403);

    // The media stream is refused without a valid signature, before any upgrade.
    for sig in [None, Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA=")] {
        let mut req = format!("ws://{}/twilio", server.addr).into_client_request().expect("request");
        if let Some(sig) = sig {
            req.headers_mut().insert("x-twilio-signature", HeaderValue::from_static(sig));
        }
        match tokio_tungstenite::connect_async(req).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
            other => panic!("expected a 403 refusal, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
}
