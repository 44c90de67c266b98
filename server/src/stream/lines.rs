//! The request body of `/v1/stream` cut into lines, free of I/O: chunks go in as
//! they arrive, lines come out. Each complete line is one message; blank lines are
//! skipped; a line longer than the limit is discarded as it arrives (never buffered
//! whole) and reported by its length; a last line without a newline still counts.
//!
//! No dependency beyond std, so the fuzz target `ndjson_stream` (`bench/fuzz/`)
//! compiles this file in as it is.

/// What one line of the body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line's text (without its `\n` or `\r\n`). Invalid UTF-8 is kept (lossily)
    /// so that the decoder answers it with an `invalid_json` error.
    Text(String),
    /// A line over the limit, by its length in bytes (without the `\n`).
    TooLarge(usize),
}

/// Cuts a byte stream into [`Line`]s of at most `limit` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes of an oversized line discarded so far (`Some` while skipping to its end).
    skipping: Option<usize>,
}

impl LineSplitter {
    /// A splitter for lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), limit, skipping: None }
    }

    /// Takes the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line (or oversized-line report) in what was pushed, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        loop {
            if let Some(skipped) = self.skipping {
                match self.buf.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.buf.drain(..=i);
                        self.skipping = None;
                        return Some(Line::TooLarge(skipped + i));
                    }
                    None => {
                        self.skipping = Some(skipped + self.buf.len());
                        self.buf.clear();
                        return None;
                    }
                }
            }
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(i) if i > self.limit => {
                    self.buf.drain(..=i);
                    return Some(Line::TooLarge(i));
                }
                Some(i) => {
                    let line: Vec<u8> = self.buf.drain(..=i).take(i).collect();
                    match to_text(line) {
                        Some(m) => return Some(m),
                        None => continue, // a blank line
                    }
                }
                None if self.buf.len() > self.limit => {
                    self.skipping = Some(self.buf.len());
                    self.buf.clear();
                    return None;
                }
                None => return None,
            }
        }
    }

    /// The body ended: what is left after the last [`next_line`](Self::next_line)
    /// returned `None` (a last line without a newline, or the end of an oversized one).
    pub fn finish(&mut self) -> Option<Line> {
        if let Some(skipped) = self.skipping.take() {
            return Some(Line::TooLarge(skipped));
        }
        to_text(std::mem::take(&mut self.buf))
    }
}

/// A line as text; `None` for a blank one.
fn to_text(mut line: Vec<u8>) -> Option<Line> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(Line::Text(match String::from_utf8(line) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}
