//! The Amazon SageMaker bring-your-own-container contract for bidirectional
//! streaming (the image is built by the repository's `Dockerfile`):
//!
//! - `GET` and `POST /ping`: 200 once the models are loaded, 503 before (answered at
//!   once, well within SageMaker's 2 s ping timeout);
//! - `/invocations-bidirectional-stream`: the WebSocket SageMaker's sidecar opens for
//!   each client stream (one stream = one call), speaking the Realtime events. Text
//!   frames are client events; binary frames are input audio in the session's input
//!   format, unless one holds a JSON object with a `type`, which is an event
//!   (SageMaker sends payload parts without a data type as binary frames). Fragmented
//!   messages are reassembled and pings answered by the WebSocket layer. A call that
//!   cannot start (capacity, models loading, credentials) is accepted and then closed
//!   with a close code and reason, which the sidecar hands the client as a model
//!   stream error (an HTTP refusal would reach it as an opaque failure):
//!   1013 (try again later) for capacity or loading, 1008 (policy) for credentials.
//!
//! In SageMaker mode (`server.sagemaker`) the stream needs no API key: the sidecar
//! authenticates callers (IAM) and does not pass one. Elsewhere it is admitted like
//! `/v1/realtime`.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{Instrument, info, info_span};

use crate::app::App;
use crate::driver::{self, ws};
use crate::realtime::{BinaryFrames, Realtime, dialect_of};

/// The path SageMaker's sidecar opens.
pub const STREAM_PATH: &str = "/invocations-bidirectional-stream";

/// `GET`/`POST /ping`: SageMaker's health check.
pub async fn ping(State(app): State<Arc<App>>) -> Response {
    if app.engines().is_some() {
        (StatusCode::OK, "healthy\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading models\n").into_response()
    }
}

/// Upgrades the sidecar's request (HTTP/1.1 or RFC 8441) to a Realtime call whose
/// binary frames are audio or events.
pub async fn stream(ws: WebSocketUpgrade, headers: HeaderMap, State(app): State<Arc<App>>) -> Response {
    let ws = ws::configured(ws, ws::MAX_MESSAGE, ws::MAX_FRAME);
    let slot = match driver::admit(&app, &headers, app.config.server.sagemaker) {
        Ok(slot) => slot,
        Err(refusal) => {
            let (code, reason) = refusal.close_code();
            info!(code, reason = %reason, "SageMaker stream refused");
            return ws.on_upgrade(move |mut socket| async move {
                // WebSocket close reasons are at most 123 bytes.
                let reason = truncate(&reason, 123).to_owned();
                let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
            });
        }
    };
    let dialect = dialect_of(&headers);
    ws.on_upgrade(move |socket| {
        let span = info_span!("sagemaker", call_id = %slot.id);
        let (source, sink) = ws::split(socket);
        let transport = Realtime::new(&app, &slot.id, dialect, BinaryFrames::AudioOrEvent).starting_with(slot.preset.as_deref().cloned());
        span.in_scope(|| info!(?dialect, "SageMaker stream opened"));
        driver::run(app, slot, source, sink, transport).instrument(span)
    })
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(super::truncate("abc", 123), "abc");
        let long = "é".repeat(100);
        let cut = super::truncate(&long, 123);
        assert!(cut.len() <= 123 && cut.chars().all(|c| c == 'é'));
    }
}
