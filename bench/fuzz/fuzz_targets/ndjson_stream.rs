//! The `/v1/stream` request body (NDJSON, one Realtime client event per line) as
//! HTTP/2 DATA frames deliver it: the first byte picks the line limit
//! (`server.max_message_bytes`, small here so that oversized lines are common), the
//! second and third the chunking (chunk sizes drawn from 1 up to a maximum), the rest
//! is the body. The body goes through the server's own line splitter
//! (server/src/stream/lines.rs) chunk by chunk, then every line through the Realtime
//! client-event parser (server/src/realtime/client_events.rs), as the Realtime
//! decoder does.
//!
//! Beyond "no panic": the lines out are exactly those of a one-pass reference split
//! of the whole body (same texts, same oversize reports with the same lengths,
//! blank lines skipped), whatever the chunk boundaries; no text has a newline.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../server/src/stream/lines.rs"]
mod lines;

#[allow(dead_code)]
#[path = "../../../server/src/realtime/client_events.rs"]
mod client_events;

use lines::{Line, LineSplitter};

fuzz_target!(|data: &[u8]| {
    let [b0, max_chunk, seed, body @ ..] = data else { return };
    let limit = if *b0 < 0xF0 { usize::from(*b0) + 1 } else { 1024 * usize::from(b0 - 0xEF) };
    let max_chunk = usize::from(*max_chunk) + 1;
    let mut rng = u32::from(*seed) * 0x9E37_79B9 | 1;

    let mut splitter = LineSplitter::new(limit);
    let mut got = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        // xorshift32: chunk sizes in 1..=max_chunk.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let n = (rng as usize % max_chunk + 1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        splitter.push(chunk);
        while let Some(line) = splitter.next_line() {
            got.push(line);
        }
    }
    got.extend(splitter.finish());
    assert_eq!(got, reference(body, limit), "limit {limit}, chunks up to {max_chunk}");

    for line in got {
        match line {
            Line::Text(text) => {
                assert!(!text.contains('\n'));
                assert!(text.chars().any(|c| !c.is_ascii_whitespace()), "a blank line came out");
                // The Realtime decoder refuses a message over the limit before parsing.
                if text.len() <= limit {
                    let (_, parsed) = client_events::parse(&text);
                    if let Err(e) = parsed {
                        assert!(!e.code().is_empty());
                    }
                }
            }
            Line::TooLarge(n) => assert!(n > limit),
        }
    }
});

/// The body split in one pass: every `\n`-terminated line, then what follows the
/// last `\n`; a line over `limit` bytes is reported by its length; a trailing `\r`
/// is dropped; blank lines are skipped; invalid UTF-8 is kept lossily.
fn reference(body: &[u8], limit: usize) -> Vec<Line> {
    body.split(|&b| b == b'\n')
        .filter_map(|line| {
            if line.len() > limit {
                return Some(Line::TooLarge(line.len()));
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                return None;
            }
            Some(Line::Text(String::from_utf8_lossy(line).into_owned()))
        })
        .collect()
}
