//! Server-sent events, as OpenAI-compatible servers stream chat completions.
//!
//! The body arrives in arbitrary pieces (a network read can end in the middle of a
//! line, or in the middle of a UTF-8 character), so the decoder keeps the unfinished
//! tail and yields an event only when its blank line has arrived. Only the `data`
//! field matters for chat completions; `event`, `id`, `retry` and comment lines
//! (`: keep-alive`) are skipped.

/// Incremental decoder from body bytes to the `data` of each complete event.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes after the last complete line.
    pending: Vec<u8>,
    /// `data` lines of the event being read, joined with `\n` as the spec says.
    data: Option<String>,
}

/// The most bytes one line may take before the stream is judged broken: a server
/// that never sends a newline must not grow this buffer without bound.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Why a stream cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error("an event-stream line is over {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// A line that is not UTF-8.
    #[error("the event stream is not UTF-8")]
    NotUtf8,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the body; returns the `data` of every event it
    /// completes, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let mut line = &self.pending[start..end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
            Self::line(&mut self.data, line, &mut events);
            start = end + 1;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_LINE_BYTES {
            return Err(SseError::LineTooLong);
        }
        Ok(events)
    }

    /// Ends the stream: an event whose blank line never came is still delivered
    /// (some servers close right after the last `data:` line).
    pub fn finish(&mut self) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            let line = std::str::from_utf8(&rest).map_err(|_| SseError::NotUtf8)?;
            Self::line(&mut self.data, line.trim_end_matches('\r'), &mut events);
        }
        if let Some(data) = self.data.take() {
            events.push(data);
        }
        Ok(events)
    }

    fn line(data: &mut Option<String>, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(d);
            }
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => *data = Some(value.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(decoder: &mut SseDecoder, pieces: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for p in pieces {
            out.extend(decoder.push(p).expect("valid stream"));
        }
        out.extend(decoder.finish().expect("valid stream"));
        out
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let body = "data: {\"a\":1}\n\ndata: {\"b\":\"é\"}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n".as_bytes();
        let whole = all(&mut SseDecoder::new(), &[body]);
        assert_eq!(whole, vec!["{\"a\":1}", "{\"b\":\"é\"}", "[DONE]"]);
        // Every split point, including inside the two-byte 'é' and inside "\r\n".
        for cut in 0..body.len() {
            let got = all(&mut SseDecoder::new(), &[&body[..cut], &body[cut..]]);
            assert_eq!(got, whole, "split at {cut}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(all(&mut SseDecoder::new(), &bytes), whole);
    }

    #[test]
    fn multi_line_data_and_other_fields() {
        let body = b"event: message\nid: 7\ndata: line one\ndata:line two\nretry: 10\n\n";
        assert_eq!(all(&mut SseDecoder::new(), &[body]), vec!["line one\nline two"]);
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_kept() {
        assert_eq!(all(&mut SseDecoder::new(), &[b"data: x\n\ndata: [DONE]"]), vec!["x", "[DONE]"]);
        assert_eq!(all(&mut SseDecoder::new(), &[b"data: [DONE]\n"]), vec!["[DONE]"]);
    }

    #[test]
    fn blank_lines_alone_yield_nothing() {
        assert!(all(&mut SseDecoder::new(), &[b"\n\n\r\n: comment\n\n"]).is_empty());
    }

    #[test]
    fn bad_streams_are_errors_not_panics() {
        assert_eq!(SseDecoder::new().push(b"data: \xff\xfe\n"), Err(SseError::NotUtf8));
        let mut d = SseDecoder::new();
        let long = vec![b'x'; MAX_LINE_BYTES + 1];
        assert_eq!(d.push(&long), Err(SseError::LineTooLong));
    }
}
