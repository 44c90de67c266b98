//! How a call's messages travel: a WebSocket (text messages) or one HTTP/2 stream of
//! `POST /v1/stream` (NDJSON lines both ways), behind one [`Pipe`] so that the call
//! loop is the same for every transport. HTTP/2 connections are either one per call
//! or a few shared ones ([`H2Pool`]), which is what the HTTP/2 bench compares.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long connecting (TCP, WebSocket or HTTP/2 handshake, the stream's answer) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hang-up waits for the server to end an HTTP/2 response.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The client's HTTP/2 receive windows: one stream's reply audio (64 KB/s as base64
/// PCM16) must not wait on window updates, nor many streams on one connection share
/// a 64 KiB connection window (the protocol default).
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// One call's channel to the server, whatever carries it.
pub enum Pipe {
    /// `/twilio` or `/v1/realtime`.
    Ws(Box<Ws>),
    /// `POST /v1/stream`: the request body out, the response body in, with the bytes
    /// of a line not yet complete.
    H2 { tx: h2::SendStream<Bytes>, rx: h2::RecvStream, buf: Vec<u8> },
}

impl Pipe {
    /// Opens a WebSocket to `url`.
    pub async fn websocket(url: &str) -> Result<Self> {
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await.context("connect timed out")?.context("connect")?;
        Ok(Pipe::Ws(Box::new(ws)))
    }

    /// Opens `POST /v1/stream` on `conn` (an HTTP/2 connection to `addr`) and waits
    /// for the server's answer, so that a refused call fails here.
    pub async fn stream(conn: h2::client::SendRequest<Bytes>, addr: &str) -> Result<Self> {
        let opened = async {
            let mut conn = conn.ready().await.context("HTTP/2 connection not ready")?;
            let request = http::Request::post(format!("http://{addr}/v1/stream")).header("content-type", "application/x-ndjson").body(()).context("building the request")?;
            let (response, tx) = conn.send_request(request, false).context("opening the stream")?;
            let response = response.await.context("the server did not answer the stream")?;
            Ok::<_, anyhow::Error>((response, tx))
        };
        let (response, tx) = tokio::time::timeout(CONNECT_TIMEOUT, opened).await.context("opening the stream timed out")??;
        let status = response.status();
        let mut rx = response.into_body();
        if !status.is_success() {
            let mut text = Vec::new();
            while let Some(Ok(chunk)) = rx.data().await {
                let _ = rx.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            bail!("the server refused the call ({status}): {}", String::from_utf8_lossy(&text));
        }
        Ok(Pipe::H2 { tx, rx, buf: Vec::new() })
    }

    /// Sends one message (an NDJSON line on HTTP/2, after waiting for the stream's
    /// send window so that a slow server pushes back instead of h2 buffering without
    /// bound).
    pub async fn send(&mut self, text: String) -> Result<()> {
        match self {
            Pipe::Ws(ws) => ws.send(Message::text(text)).await.context("sending"),
            Pipe::H2 { tx, .. } => {
                let mut line = text.into_bytes();
                line.push(b'\n');
                tx.reserve_capacity(line.len());
                while tx.capacity() < line.len() {
                    match futures_util::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e).context("waiting for the send window"),
                        None => bail!("the server closed the stream"),
                    }
                }
                tx.send_data(Bytes::from(line), false).context("sending")
            }
        }
    }

    /// The next text message from the server; an error once the server ended the
    /// call or the connection failed. Cancel-safe: a partial line stays buffered.
    pub async fn recv(&mut self) -> Result<String> {
        match self {
            Pipe::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                    Some(Ok(Message::Close(_))) | None => bail!("the server closed the call"),
                    Some(Err(e)) => bail!("the connection failed: {e}"),
                    Some(Ok(_)) => continue,
                }
            },
            Pipe::H2 { rx, buf, .. } => loop {
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).take(i).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return String::from_utf8(line).context("the server sent invalid UTF-8");
                }
                match rx.data().await {
                    Some(Ok(chunk)) => {
                        // Read: the server may send that much more (flow control).
                        let _ = rx.flow_control().release_capacity(chunk.len());
                        buf.extend_from_slice(&chunk);
                    }
                    Some(Err(e)) => bail!("the stream failed: {e}"),
                    None => bail!("the server closed the call"),
                }
            },
        }
    }

    /// Hangs up: closes the WebSocket, or ends the request body and reads what is
    /// left of the response (the server ends it after the reply in progress).
    pub async fn close(self) {
        match self {
            Pipe::Ws(mut ws) => {
                let _ = SinkExt::close(&mut *ws).await;
            }
            Pipe::H2 { mut tx, mut rx, .. } => {
                if tx.send_data(Bytes::new(), true).is_err() {
                    return;
                }
                let drain = async {
                    while let Some(Ok(chunk)) = rx.data().await {
                        let _ = rx.flow_control().release_capacity(chunk.len());
                    }
                };
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            }
        }
    }
}

/// Opens an HTTP/2 cleartext connection to `addr` (prior knowledge) and drives it in
/// a task that ends when every handle and stream on it is gone.
pub async fn h2_connect(addr: &str) -> Result<h2::client::SendRequest<Bytes>> {
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        h2::client::Builder::new()
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {addr}"))
    };
    let (send, connection) = tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.context("connect timed out")??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("HTTP/2 connection: {e}");
        }
    });
    Ok(send)
}

/// The HTTP/2 connections of a run: none kept (a fresh connection per call) or `k`
/// shared ones, opened by the first call that needs each, call `i` on connection
/// `i % k`, so that `k = 1` carries every call on one connection.
pub struct H2Pool {
    addr: String,
    shared: Vec<OnceCell<h2::client::SendRequest<Bytes>>>,
}

impl H2Pool {
    /// `k` shared connections to `addr`; 0 means one per call.
    pub fn new(addr: &str, k: usize) -> Self {
        Self { addr: addr.to_string(), shared: (0..k).map(|_| OnceCell::new()).collect() }
    }

    /// A handle to the connection call slot `slot` uses.
    pub async fn connection(&self, slot: usize) -> Result<h2::client::SendRequest<Bytes>> {
        if self.shared.is_empty() {
            return h2_connect(&self.addr).await;
        }
        let cell = &self.shared[slot % self.shared.len()];
        cell.get_or_try_init(|| h2_connect(&self.addr)).await.cloned()
    }
}
