//! `POST /v1/stream`: one HTTP/2 stream is one call, full duplex.
//!
//! The request body is NDJSON (`application/x-ndjson`), one Realtime client event per
//! line; the response body is NDJSON Realtime server events, one per line, streamed as
//! they happen (the response starts before the request body ends). A driver transport
//! ([`crate::driver`]) around the Realtime decoder and encoder:
//!
//! - the call ends when the client ends its request body (after the reply in
//!   progress, if any, has been delivered) or resets the stream;
//! - the server keeps the response open while the client is still sending (h2 would
//!   otherwise reset the request with `NO_ERROR`, hyperium/h2#634), except when the
//!   call ends on its own (the call deadline, server shutdown);
//! - a bad line (malformed JSON, a line over `server.max_message_bytes`) gets an `error` event and the call goes on; an
//!   oversized line is discarded as it arrives, never buffered whole;
//! - the request body is read all the time (the driver's reader), so flow control
//!   never stalls the response; a client that stops reading the response is cut off
//!   by the driver's write timeout.
//!
//! HTTP/1.1 with a chunked request body works too where the client interleaves.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span};

use crate::app::App;
use crate::driver::{self, WireError, WireIn, WireOut, WireSink, WireSource};
use crate::realtime::{BinaryFrames, Realtime, dialect_of};

pub mod lines;

use lines::{Line, LineSplitter};

/// Response lines the writer may queue before `send` waits for the client to read
/// (hyper pulls lines as HTTP/2 flow control allows): small, so the driver's write
/// timeout sees a client that stopped reading.
const RESPONSE_QUEUE: usize = 8;
/// The content type of both bodies.
pub const NDJSON: &str = "application/x-ndjson";

/// Starts a call on this stream: admits it, then answers at once with a streamed
/// NDJSON body while the driver reads the request body line by line.
pub async fn handler(State(app): State<Arc<App>>, headers: HeaderMap, request: Body) -> Response {
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !matches!(essence.as_str(), "application/x-ndjson" | "application/jsonl" | "application/json") {
            let msg = format!("the request body must be {NDJSON} (one Realtime client event per line), not {ct}");
            let body = serde_json::json!({"error": {"type": "invalid_request_error", "code": "unsupported_media_type", "message": msg}});
            let refusal = (StatusCode::UNSUPPORTED_MEDIA_TYPE, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
            return refuse(request, refusal).await;
        }
    }
    let slot = match driver::admit(&app, &headers, false) {
        Ok(slot) => slot,
        Err(refusal) => return refuse(request, refusal.into_response()).await,
    };
    let dialect = dialect_of(&headers);
    let (tx, rx) = mpsc::channel::<Bytes>(RESPONSE_QUEUE);
    let source = NdjsonSource::new(request.into_data_stream(), app.config.server.max_message_bytes);
    let sink = NdjsonSink(Some(tx));
    let span = info_span!("stream", call_id = %slot.id);
    let transport = Realtime::new(&app, &slot.id, dialect, BinaryFrames::Refuse).starting_with(slot.preset.as_deref().cloned());
    span.in_scope(|| info!(?dialect, "HTTP stream call opened"));
    tokio::spawn(driver::run(app, slot, source, sink, transport).instrument(span));
    let lines = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    let mut response = Body::from_stream(lines).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(NDJSON));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    // Proxies (nginx) must not buffer the stream.
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

/// Most of a refused request's body that is read before the refusal is sent.
const REFUSED_BODY_READ: usize = 64 * 1024;
/// How long a refused request's body may take to arrive before the refusal goes anyway.
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends `refusal` after reading what is left of a small request body. Answering
/// before the body ends makes h2 reset the request stream, and a reset that arrives
/// with the answer makes some clients (curl 7.88: exit 92, about one time in 30) drop
/// the answer unread; a large or slow body still gets the refusal, and the reset.
async fn refuse(request: Body, refusal: Response) -> Response {
    let mut body = request.into_data_stream();
    let mut read = 0usize;
    let drained = tokio::time::timeout(REFUSED_BODY_WAIT, async {
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > REFUSED_BODY_READ {
                break;
            }
        }
    });
    let _ = drained.await;
    refusal
}

/// The request body as lines ([`lines::LineSplitter`]): each complete line is one
/// message; empty lines are skipped; a line longer than the limit is discarded as it
/// arrives and reported as [`WireIn::TooLarge`]; a last line without a newline still
/// counts.
pub struct NdjsonSource {
    body: BodyDataStream,
    lines: LineSplitter,
    ended: bool,
}

impl NdjsonSource {
    /// Reads `body`, with lines of at most `limit` bytes.
    pub fn new(body: BodyDataStream, limit: usize) -> Self {
        Self { body, lines: LineSplitter::new(limit), ended: false }
    }
}

fn wire_in(line: Line) -> WireIn {
    match line {
        Line::Text(t) => WireIn::Text(t),
        Line::TooLarge(n) => WireIn::TooLarge(n),
    }
}

impl WireSource for NdjsonSource {
    const HALF_CLOSE: bool = true;

    async fn recv(&mut self) -> Option<Result<WireIn, WireError>> {
        loop {
            if let Some(line) = self.lines.next_line() {
                return Some(Ok(wire_in(line)));
            }
            if self.ended {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.lines.push(&chunk),
                Some(Err(e)) => return Some(Err(WireError::Io(format!("reading the request body: {e}")))),
                None => {
                    self.ended = true;
                    return self.lines.finish().map(|line| Ok(wire_in(line)));
                }
            }
        }
    }
}

/// The response body: one line per server event.
pub struct NdjsonSink(Option<mpsc::Sender<Bytes>>);

impl WireSink for NdjsonSink {
    async fn send(&mut self, msg: WireOut) -> Result<(), WireError> {
        let Some(tx) = &self.0 else { return Err(WireError::Io("the response has ended".into())) };
        let line = match msg {
            WireOut::Text(t) => {
                let mut b = t.into_bytes();
                b.push(b'\n');
                Bytes::from(b)
            }
            WireOut::Binary(_) => return Ok(()), // no binary on this wire
            WireOut::Close { .. } => {
                self.0 = None;
                return Ok(());
            }
        };
        tx.send(line).await.map_err(|_| WireError::Io("the client reset the stream".into()))
    }

    async fn finish(&mut self) {
        // Dropping the sender ends the response body.
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(chunks: &[&[u8]], limit: usize) -> Vec<String> {
        let chunks: Vec<Result<Bytes, Infallible>> = chunks.iter().map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut src = NdjsonSource::new(body.into_data_stream(), limit);
        let mut out = Vec::new();
        while let Some(m) = src.recv().await {
            out.push(match m.expect("no error") {
                WireIn::Text(t) => t,
                WireIn::Binary(_) => "binary".into(),
                WireIn::TooLarge(n) => format!("too large {n}"),
            });
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_across_chunks_and_skips_blank_ones() {
        assert_eq!(lines(&[b"{\"a\":1}\n{\"b\"", b":2}\r\n\n  \n{\"c\":3}"], 100).await, ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
    }

    #[tokio::test]
    async fn discards_oversized_lines_without_buffering_them() {
        let big = vec![b'x'; 50];
        let out = lines(&[b"{}\n", &big, &big, b"\n{\"ok\":1}\n", &big], 20).await;
        assert_eq!(out, ["{}", "too large 100", "{\"ok\":1}", "too large 50"]);
    }

    #[tokio::test]
    async fn keeps_invalid_utf8_for_the_decoder_to_refuse() {
        let out = lines(&[b"\xff\xfe{\n"], 100).await;
        assert_eq!(out.len(), 1);
        assert!(out[0].contains('{'));
    }
}
