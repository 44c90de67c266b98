//! Helpers for Parley's end-to-end tests: start the real `parley` binary on a free
//! port with the real models, speak to it over a real WebSocket, and read its
//! metrics over plain HTTP.
//!
//! The binary is found at `$PARLEY_BIN`, or next to the test executable's target
//! folder (`target/<profile>/parley`); `make test` builds it first.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The Realtime default wire rate, used by the test callers.
pub const RATE: u32 = 24_000;

/// Path of the `parley` binary under test.
pub fn parley_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PARLEY_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> → target/<profile>/parley
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    profile_dir.join("parley")
}

/// A running server.
pub struct Server {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Whether the listener speaks TLS (`[server.tls]`).
    pub tls: bool,
}

impl Server {
    /// The Realtime URL.
    pub fn realtime_url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }
}

/// Starts `parley serve` with `extra` arguments on a free port and waits until it
/// is ready. The child is killed when the test process exits (PDEATHSIG on a
/// thread that lives as long as the process).
pub fn start_server(extra: &[&str]) -> Result<Server> {
    let bin = parley_bin();
    if !bin.exists() {
        bail!("{} does not exist; build it first (`make test` does)", bin.display());
    }
    let args: Vec<String> = ["serve", "--listen", "127.0.0.1:0"].iter().chain(extra).map(|s| s.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(String, bool)>>();
    std::thread::spawn(move || {
        let spawned = spawn_with_deathsig(&bin, &args);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let Some(stdout) = child.stdout.take() else {
            let _ = tx.send(Err(anyhow::anyhow!("no stdout")));
            return;
        };
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("parley listening on http://") {
                        break Ok((a.trim().to_string(), false));
                    }
                    if let Some(a) = line.strip_prefix("parley listening on https://") {
                        break Ok((a.trim().to_string(), true));
                    }
                }
                _ => break Err(anyhow::anyhow!("parley exited before listening (see its stderr above)")),
            }
        };
        let _ = tx.send(addr);
        // Keep this thread (the child's parent for PDEATHSIG) alive and drain stdout.
        for _ in lines {}
        let _ = child.wait();
    });
    let (addr, tls) = rx.recv_timeout(Duration::from_secs(60)).context("parley did not start listening within 60 s")??;
    let server = Server { addr, tls };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = if tls { curl_ready(&server.addr) } else { matches!(http_get_blocking(&server.addr, "/readyz"), Ok((200, _))) };
        if ready {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("parley did not become ready within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/readyz` over TLS (any certificate), with curl.
fn curl_ready(addr: &str) -> bool {
    Command::new("curl").args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &format!("https://{addr}/readyz")]).output().is_ok_and(|o| o.stdout == b"200")
}

/// Starts `parley serve --config FILE` with `toml` as the file (plus `extra`).
pub fn start_server_with_config(toml: &str, extra: &[&str]) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("parley-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("config-{:x}.toml", hash(toml)));
    std::fs::write(&path, toml)?;
    let path = path.to_string_lossy().into_owned();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(extra);
    start_server(&args)
}

/// A self-signed certificate for `localhost` and 127.0.0.1 made with openssl:
/// `(cert.pem, key.pem)` paths.
pub fn self_signed_cert() -> Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("parley-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() {
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .context("run openssl (apt-get install openssl)")?;
        if !status.success() {
            bail!("openssl could not make a certificate");
        }
    }
    Ok((cert, key))
}

/// Polls a metric until it equals `want`; fails after `within`. Returns how long it took.
pub async fn wait_metric(addr: &str, name: &str, want: f64, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let v = metric(addr, name).await?;
        if v == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("{name} is {v}, not {want}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_with_deathsig(bin: &PathBuf, args: &[String]) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
    if std::env::var_os("PARLEY_LOG").is_none() {
        cmd.env("PARLEY_LOG", "warn");
    }
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))
}

/// One server shared by every test of a test binary (loading models takes seconds).
pub fn shared_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_server(&["--max-calls", "8"]).expect("start the shared parley server"))
}

fn http_get_blocking(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    parse_response(&buf)
}

fn parse_response(buf: &str) -> Result<(u16, String)> {
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A plain HTTP/1.1 GET.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    parse_response(&buf)
}

/// An HTTP/1.1 response: status, header lines (lower-cased names) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// Any HTTP/1.1 request with extra headers and a body (sent with its length).
pub async fn http_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<HttpResponse> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (status, body) = parse_response(&buf)?;
    let head = buf.split_once("\r\n\r\n").map_or(buf.as_str(), |(h, _)| h);
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse { status, headers, body })
}

/// Reads one metric's value from `/metrics`.
pub async fn metric(addr: &str, name: &str) -> Result<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("metric {name} not found"))
}

/// Speech made by espeak-ng, at the wire rate, padded with silence.
pub fn speech(text: &str) -> Result<Vec<f32>> {
    let dir = std::env::temp_dir().join(format!("parley-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{:x}.wav", hash(text)));
    let status = Command::new("espeak-ng").args(["-v", "en-us", "-s", "140", "-w"]).arg(&path).arg(text).status().context("run espeak-ng (apt-get install espeak-ng)")?;
    if !status.success() {
        bail!("espeak-ng failed");
    }
    let (samples, rate) = parley_audio::wav::read_wav(&path)?;
    resample(&samples, rate, RATE)
}

/// A cough-like sound at the wire rate: a burst of noise with a fast attack and a
/// 120 ms decay, 350 ms long, deterministic.
pub fn cough() -> Vec<f32> {
    let mut seed = 0x2545_f491_u32;
    (0..(RATE as usize * 350 / 1000))
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let noise = (seed as f32 / u32::MAX as f32) * 2.0 - 1.0;
            let t = i as f32 / RATE as f32;
            let env = (t / 0.01).min(1.0) * (-t / 0.12).exp();
            0.6 * noise * env
        })
        .collect()
}

/// Resamples a whole clip.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    let mut r = parley_audio::resample::StreamResampler::new(from, to)?;
    let mut out = r.process(samples);
    out.extend(r.flush());
    Ok(out)
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Lower-case words of a text, without punctuation.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A Realtime client over a real WebSocket.
pub struct Client {
    ws: Ws,
    /// Every event received, in order.
    pub events: Vec<Value>,
}

impl Client {
    /// Connects and waits for `session.created`.
    pub async fn connect(server: &Server) -> Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(server.realtime_url()).await.context("connect to /v1/realtime")?;
        let mut c = Self { ws, events: Vec::new() };
        c.wait_for("session.created", Duration::from_secs(10)).await?;
        Ok(c)
    }

    /// Connects over a socket with a tiny receive buffer (a client that will stop
    /// reading fills it fast) and waits for `session.created`.
    pub async fn connect_small_buffer(server: &Server) -> Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let tcp = socket.connect(server.addr.parse()?).await?;
        let (ws, _) = tokio_tungstenite::client_async(server.realtime_url(), tokio_tungstenite::MaybeTlsStream::Plain(tcp)).await.context("connect to /v1/realtime")?;
        let mut c = Self { ws, events: Vec::new() };
        c.wait_for("session.created", Duration::from_secs(10)).await?;
        Ok(c)
    }

    /// Sends one JSON event.
    pub async fn send(&mut self, event: Value) -> Result<()> {
        self.send_raw(event.to_string()).await
    }

    /// Sends any text message, valid or not.
    pub async fn send_raw(&mut self, text: String) -> Result<()> {
        self.ws.send(Message::text(text)).await.context("send")
    }

    /// Sends PCM16 audio as one append.
    pub async fn append(&mut self, samples: &[f32]) -> Result<()> {
        self.append_bytes(&parley_audio::pcm::encode_pcm16le(samples)).await
    }

    /// Sends a payload in the session's input format (one Opus packet, say) as one append.
    pub async fn append_bytes(&mut self, payload: &[u8]) -> Result<()> {
        let audio = base64::engine::general_purpose::STANDARD.encode(payload);
        self.send(json!({"type": "input_audio_buffer.append", "audio": audio})).await
    }

    /// Streams payloads of 20 ms each (Opus packets) in real time, one append per
    /// payload, collecting events meanwhile. Stops early when `until` arrives.
    pub async fn stream_packets(&mut self, packets: &[Vec<u8>], until: Option<&str>) -> Result<Option<Value>> {
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        for packet in packets {
            ticker.tick().await;
            self.append_bytes(packet).await?;
            for v in self.drain().await? {
                if until.is_some_and(|k| v["type"] == k) {
                    return Ok(Some(v));
                }
            }
        }
        Ok(None)
    }

    /// What the server heard the caller say: every
    /// `conversation.item.input_audio_transcription.completed` transcript so far,
    /// joined with spaces.
    pub fn heard(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["type"] == "conversation.item.input_audio_transcription.completed")
            .map(|e| e["transcript"].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The raw payloads of a response's `response.output_audio.delta` events, in
    /// order (one Opus packet each for an Opus session).
    pub fn response_payloads(&self, response_id: &str) -> Result<Vec<Vec<u8>>> {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta" && e["response_id"] == response_id)
            .map(|e| Ok(base64::engine::general_purpose::STANDARD.decode(e["delta"].as_str().unwrap_or(""))?))
            .collect()
    }

    /// Next event, or an error after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout(timeout, self.ws.next()).await.context("timed out waiting for an event")?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    self.events.push(v.clone());
                    return Ok(v);
                }
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the connection"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Reads events until one of type `kind` arrives; returns it.
    pub async fn wait_for(&mut self, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.next_event(left).await.with_context(|| format!("waiting for {kind}; got {:?}", self.types()))?;
            if ev["type"] == kind {
                return Ok(ev);
            }
        }
    }

    /// Streams audio in real time (20 ms appends), then `tail_ms` of silence,
    /// collecting events meanwhile. Stops early when `until` arrives.
    pub async fn stream(&mut self, samples: &[f32], tail_ms: u64, until: Option<&str>) -> Result<Option<Value>> {
        let chunk = (RATE / 50) as usize;
        let mut padded = samples.to_vec();
        padded.extend(std::iter::repeat_n(0.0, (RATE as u64 * tail_ms / 1000) as usize));
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        for piece in padded.chunks(chunk) {
            ticker.tick().await;
            self.append(piece).await?;
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(0), self.ws.next()).await {
                if let Message::Text(t) = msg {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    self.events.push(v.clone());
                    if until.is_some_and(|k| v["type"] == k) {
                        return Ok(Some(v));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Adds a typed user message and asks for a reply.
    pub async fn say_text(&mut self, text: &str) -> Result<()> {
        self.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})).await?;
        self.send(json!({"type": "response.create"})).await
    }

    /// Tool calls announced so far: (name, arguments).
    pub fn tool_calls(&self) -> Vec<(String, Value)> {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.function_call_arguments.done")
            .map(|e| (e["name"].as_str().unwrap_or("").to_string(), serde_json::from_str(e["arguments"].as_str().unwrap_or("{}")).unwrap_or(Value::Null)))
            .collect()
    }

    /// Everything the agent said so far, lower-case.
    pub fn spoken(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.output_audio_transcript.delta")
            .map(|e| e["delta"].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    }

    /// Every event already waiting, without blocking.
    pub async fn drain(&mut self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(0), self.ws.next()).await {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str())?;
                self.events.push(v.clone());
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Event types received so far.
    pub fn types(&self) -> Vec<String> {
        self.events.iter().map(|e| e["type"].as_str().unwrap_or("?").to_string()).collect()
    }

    /// The PCM16 audio of all `response.output_audio.delta` events of a response.
    pub fn response_audio(&self, response_id: &str) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for e in &self.events {
            if e["type"] == "response.output_audio.delta" && e["response_id"] == response_id {
                let bytes = base64::engine::general_purpose::STANDARD.decode(e["delta"].as_str().unwrap_or(""))?;
                out.extend(parley_audio::pcm::decode_pcm16le(&bytes)?);
            }
        }
        Ok(out)
    }

    /// Closes the connection abruptly (no close frame), like a vanished client.
    pub fn vanish(self) {
        drop(self.ws);
    }

    /// Closes politely.
    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await.ok();
        Ok(())
    }
}

/// Transcribes audio with the server's own speech-to-text: a second call with
/// turn detection off, the audio appended and committed.
pub async fn transcribe_with_server(server: &Server, samples: &[f32]) -> Result<String> {
    let mut c = Client::connect(server).await?;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": null}}}})).await?;
    c.wait_for("session.updated", Duration::from_secs(10)).await?;
    for piece in samples.chunks(RATE as usize) {
        c.append(piece).await?;
    }
    c.send(json!({"type": "input_audio_buffer.commit"})).await?;
    let ev = c.wait_for("conversation.item.input_audio_transcription.completed", Duration::from_secs(60)).await?;
    c.close().await?;
    Ok(ev["transcript"].as_str().unwrap_or("").to_string())
}
