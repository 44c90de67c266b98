//! The WebSocket wire for the driver, over HTTP/1.1 upgrades and RFC 8441 extended
//! CONNECT alike (axum's upgrade hides the difference): text and binary messages in
//! and out; pings are answered by the WebSocket layer; a close frame carries the
//! code and reason of a fatal error.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};

use super::{WireError, WireIn, WireOut, WireSink, WireSource};

/// Largest WebSocket message, reassembled from its fragments, for the Realtime-style
/// endpoints (base64 audio appends): 16 MiB, far below tungstenite's 64 MiB default.
/// Messages between `server.max_message_bytes` and this get an `error` event; larger
/// ones close the socket.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest single WebSocket frame (tungstenite's default is 16 MiB).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Bytes tungstenite may buffer for writing before `send` waits for the socket
/// (its default is unbounded): the write timeout then sees a client that stops reading.
pub const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// Bytes tungstenite reads from the socket at a time. Its default, 128 KiB, is
/// zero-filled on every read and stays resident per connection: with calls sending
/// a few hundred bytes every 20 ms that was a tenth of an echo server's CPU and a
/// fifth of its memory per call. Larger messages still arrive, over several reads.
pub const READ_BUFFER: usize = 8 * 1024;
/// Bytes collected before tungstenite writes to the socket (each `send` flushes
/// anyway); its default is 128 KiB.
pub const WRITE_BUFFER: usize = 8 * 1024;

/// The socket settings every WebSocket endpoint shares, with its message limits.
pub fn configured(ws: axum::extract::ws::WebSocketUpgrade, max_message: usize, max_frame: usize) -> axum::extract::ws::WebSocketUpgrade {
    ws.max_message_size(max_message)
        .max_frame_size(max_frame)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
}

/// Splits an upgraded socket into the driver's two halves.
pub fn split(socket: WebSocket) -> (WsSource, WsSink) {
    let (sink, stream) = socket.split();
    (WsSource(stream), WsSink(sink))
}

/// The client's messages.
pub struct WsSource(SplitStream<WebSocket>);

/// The server's messages.
pub struct WsSink(SplitSink<WebSocket, Message>);

impl WireSource for WsSource {
    const HALF_CLOSE: bool = false;

    async fn recv(&mut self) -> Option<Result<WireIn, WireError>> {
        loop {
            return match self.0.next().await {
                Some(Ok(Message::Text(t))) => Some(Ok(WireIn::Text(t.as_str().to_owned()))),
                Some(Ok(Message::Binary(b))) => Some(Ok(WireIn::Binary(b))),
                Some(Ok(Message::Close(_))) | None => None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue, // answered by the WebSocket layer
                Some(Err(e)) => Some(Err(WireError::Io(e.to_string()))),
            };
        }
    }
}

impl WireSink for WsSink {
    async fn send(&mut self, msg: WireOut) -> Result<(), WireError> {
        let msg = match msg {
            WireOut::Text(t) => Message::Text(t.into()),
            WireOut::Binary(b) => Message::Binary(b),
            WireOut::Close { code, reason } => Message::Close(Some(CloseFrame { code, reason: reason.into() })),
        };
        self.0.send(msg).await.map_err(|e| WireError::Io(e.to_string()))
    }

    async fn finish(&mut self) {
        let _ = self.0.close().await;
    }
}
