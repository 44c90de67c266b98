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
///
/// Each byte is looked at once and moved at most once per chunk, however the body is
/// cut: rescanning or shifting the whole buffer per chunk or per line made a line of
/// `limit` bytes sent in 1-byte chunks cost `limit²/2` comparisons (about a minute of
/// CPU at the default 512 KiB), and a chunk of blank lines `n²/2` byte moves.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already taken (dropped at the next push).
    start: usize,
    /// `buf[start..scanned]` is known to hold no newline.
    scanned: usize,
    limit: usize,
    /// Bytes of an oversized line discarded so far (`Some` while skipping to its end).
    skipping: Option<usize>,
}

impl LineSplitter {
    /// A splitter for lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), start: 0, scanned: 0, limit, skipping: None }
    }

    /// Takes the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The length of the pending line up to its newline, if that has arrived.
    fn newline(&mut self) -> Option<usize> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => Some(self.scanned + i - self.start),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Takes the pending line and its newline (`len` bytes, then `\n`).
    fn take(&mut self, len: usize) -> &[u8] {
        let line = self.start..self.start + len;
        self.start += len + 1;
        self.scanned = self.start;
        &self.buf[line]
    }

    /// Drops everything pending.
    fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
    }

    /// The next complete line (or oversized-line report) in what was pushed, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        loop {
            if let Some(skipped) = self.skipping {
                match self.newline() {
                    Some(i) => {
                        self.take(i);
                        self.skipping = None;
                        return Some(Line::TooLarge(skipped + i));
                    }
                    None => {
                        self.skipping = Some(skipped + self.buf.len() - self.start);
                        self.clear();
                        return None;
                    }
                }
            }
            match self.newline() {
                Some(i) if i > self.limit => {
                    self.take(i);
                    return Some(Line::TooLarge(i));
                }
                Some(i) => match to_text(self.take(i)) {
                    Some(m) => return Some(m),
                    None => continue, // a blank line
                },
                None if self.buf.len() - self.start > self.limit => {
                    self.skipping = Some(self.buf.len() - self.start);
                    self.clear();
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
        let rest = to_text(&self.buf[self.start..]);
        self.clear();
        rest
    }
}

/// A line as text; `None` for a blank one.
fn to_text(line: &[u8]) -> Option<Line> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(Line::Text(String::from_utf8_lossy(line).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], limit: usize) -> Vec<Line> {
        let mut s = LineSplitter::new(limit);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            out.extend(std::iter::from_fn(|| s.next_line()));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn the_same_lines_wherever_the_body_is_cut() {
        let body: &[u8] = b"{\"a\":1}\r\n\n  \n0123456789abc\n\xff{\n{\"b\":2}\nlast";
        let whole = split(&[body], 10);
        assert_eq!(
            whole,
            [
                Line::Text("{\"a\":1}".into()),
                Line::TooLarge(13),
                Line::Text("\u{fffd}{".into()),
                Line::Text("{\"b\":2}".into()),
                Line::Text("last".into())
            ]
        );
        for size in 1..body.len() {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(split(&chunks, 10), whole, "chunks of {size}");
        }
    }

    /// A line of the default limit (512 KiB) in 1-byte chunks, and a body of blank
    /// lines, were quadratic: about a minute and 12 s of CPU. Now each takes
    /// milliseconds; the bound leaves room for a slow, loaded machine.
    #[test]
    fn tiny_chunks_and_blank_lines_cost_linear_time() {
        let limit = 512 * 1024;
        let t = std::time::Instant::now();
        let mut s = LineSplitter::new(limit);
        for _ in 0..limit {
            s.push(b"x");
            assert_eq!(s.next_line(), None);
        }
        s.push(b"\n");
        assert!(matches!(s.next_line(), Some(Line::Text(t)) if t.len() == limit));
        let blank = vec![b'\n'; 256 * 1024];
        for _ in 0..4 {
            s.push(&blank);
            assert_eq!(s.next_line(), None);
        }
        assert_eq!(s.finish(), None);
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
