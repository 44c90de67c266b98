//! The caller's audio from RTP to a steady 20 ms frame per tick: packets are put back
//! in timestamp order, a lost packet becomes silence of its length, a silence
//! suppression gap (no packets at all) becomes silence, and a new SSRC starts the
//! stream over. The call always gets one frame per tick, so its turn detection hears
//! the caller stop talking even when the caller's phone stops sending.
//!
//! Positions are RTP timestamps (samples at 8 kHz) extended past the 32-bit wrap, so
//! packets of any duration (10, 20, 30 ms) fill frames of any other.

use std::collections::BTreeMap;

/// Counters for the call's closing log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets that arrived after their audio had been played (dropped).
    pub late: u64,
    /// Packets already held (duplicates, dropped).
    pub duplicate: u64,
    /// Times the sender's SSRC changed.
    pub ssrc_changes: u64,
    /// Frames that had no audio at all (silence or loss).
    pub empty_frames: u64,
}

/// A playout buffer for one direction of G.711 (one byte per sample).
#[derive(Debug)]
pub struct JitterBuffer {
    frame: usize,
    silence: u8,
    prefetch: usize,
    max: usize,
    ssrc: Option<u32>,
    /// Highest extended timestamp seen (the reference for extending the next one).
    ext_last: i64,
    packets: BTreeMap<i64, Vec<u8>>,
    held: usize,
    /// Where playout is, when it is running.
    next: Option<i64>,
    stats: JitterStats,
}

impl JitterBuffer {
    /// `frame` samples per tick, `silence` the codec's silent byte, `prefetch` samples
    /// held before playout starts (the jitter it absorbs), `max` samples held at most
    /// (older audio is dropped past it).
    pub fn new(frame: usize, silence: u8, prefetch: usize, max: usize) -> Self {
        Self { frame, silence, prefetch, max: max.max(prefetch + frame), ssrc: None, ext_last: 0, packets: BTreeMap::new(), held: 0, next: None, stats: JitterStats::default() }
    }

    /// The counters so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    fn reset(&mut self) {
        self.packets.clear();
        self.held = 0;
        self.next = None;
    }

    /// Takes one audio packet.
    pub fn push(&mut self, ssrc: u32, timestamp: u32, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if self.ssrc != Some(ssrc) {
            if self.ssrc.is_some() {
                self.stats.ssrc_changes += 1;
            }
            // A new source (a transfer, a media server switch): its numbers mean nothing
            // next to the old ones. What the old one left unplayed is dropped.
            self.reset();
            self.ssrc = Some(ssrc);
            self.ext_last = i64::from(timestamp);
        }
        let delta = i64::from(timestamp.wrapping_sub(self.ext_last as u32) as i32);
        let ext = self.ext_last + delta;
        self.ext_last = self.ext_last.max(ext);
        let len = payload.len() as i64;
        if let Some(next) = self.next
            && ext + len <= next
        {
            if next - ext > self.max as i64 {
                // The sender's clock jumped back: start over from this packet.
                self.reset();
            } else {
                self.stats.late += 1;
                return;
            }
        }
        if self.packets.contains_key(&ext) {
            self.stats.duplicate += 1;
            return;
        }
        self.held += payload.len();
        self.packets.insert(ext, payload.to_vec());
        while self.held > self.max {
            let Some((k, p)) = self.packets.pop_first() else { break };
            self.held -= p.len();
            if let Some(next) = self.next.as_mut() {
                *next = (*next).max(k + p.len() as i64);
            }
        }
    }

    /// The next frame and whether any of it came from the caller.
    pub fn pop(&mut self) -> (Vec<u8>, bool) {
        let mut out = vec![self.silence; self.frame];
        let first = self.packets.first_key_value().map(|(k, _)| *k);
        let start = match (self.next, first) {
            (_, None) => None,
            (None, Some(first)) => (self.held >= self.prefetch).then_some(first),
            // A long gap (silence suppression while audio was still held): skip it.
            (Some(next), Some(first)) if first > next + self.max as i64 => Some(first),
            (Some(next), Some(_)) => Some(next),
        };
        let Some(start) = start else {
            self.stats.empty_frames += 1;
            return (out, false);
        };
        let end = start + self.frame as i64;
        let mut got = false;
        while let Some((&k, p)) = self.packets.first_key_value() {
            if k >= end {
                break;
            }
            let plen = p.len() as i64;
            let from = start.max(k);
            let to = end.min(k + plen);
            if to > from {
                let src = (from - k) as usize;
                let dst = (from - start) as usize;
                let n = (to - from) as usize;
                out[dst..dst + n].copy_from_slice(&p[src..src + n]);
                got = true;
            }
            if k + plen <= end {
                if let Some((_, p)) = self.packets.pop_first() {
                    self.held -= p.len();
                }
            } else {
                break;
            }
        }
        // Nothing left: playout pauses and the next packet starts it again (after the
        // prefetch), wherever its timestamp is.
        self.next = if self.packets.is_empty() { None } else { Some(end) };
        if !got {
            self.stats.empty_frames += 1;
        }
        (out, got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u8 = 0xFF;

    fn buf() -> JitterBuffer {
        JitterBuffer::new(160, S, 320, 8000)
    }

    fn pkt(n: u8) -> Vec<u8> {
        vec![n; 160]
    }

    /// Pops until `n` frames came out, returning the first byte of each (S = silence).
    fn frames(b: &mut JitterBuffer, n: usize) -> Vec<u8> {
        (0..n).map(|_| b.pop().0[0]).collect()
    }

    #[test]
    fn waits_for_the_prefetch_then_plays_in_timestamp_order() {
        let mut b = buf();
        b.push(1, 1000, &pkt(1));
        assert_eq!(b.pop(), (vec![S; 160], false), "one packet is under the prefetch");
        // 3 and 2 arrive swapped.
        b.push(1, 1320, &pkt(3));
        b.push(1, 1160, &pkt(2));
        b.push(1, 1160, &pkt(2));
        assert_eq!(frames(&mut b, 4), vec![1, 2, 3, S]);
        assert_eq!(b.stats().duplicate, 1);
    }

    #[test]
    fn a_lost_packet_is_silence_of_its_length_and_late_ones_are_dropped() {
        let mut b = buf();
        for (i, n) in [(0u32, 1u8), (1, 2), (3, 4), (4, 5)] {
            b.push(9, i * 160, &pkt(n));
        }
        assert_eq!(frames(&mut b, 2), vec![1, 2]);
        // The frame of packet 3 is due now, and it is missing.
        assert_eq!(frames(&mut b, 1), vec![S]);
        b.push(9, 2 * 160, &pkt(3));
        assert_eq!(frames(&mut b, 2), vec![4, 5]);
        assert_eq!(b.stats().late, 1);
    }

    #[test]
    fn silence_suppression_gaps_and_timestamp_wrap() {
        let mut b = buf();
        let t0 = u32::MAX - 159;
        b.push(5, t0, &pkt(1));
        b.push(5, t0.wrapping_add(160), &pkt(2));
        assert_eq!(frames(&mut b, 3), vec![1, 2, S], "the caller went quiet: silence every tick");
        // Talk resumes 5 s later in RTP time, after the wrap.
        let t1 = t0.wrapping_add(160 * 250);
        b.push(5, t1, &pkt(3));
        b.push(5, t1.wrapping_add(160), &pkt(4));
        assert_eq!(frames(&mut b, 3), vec![3, 4, S]);
    }

    #[test]
    fn thirty_ms_packets_fill_twenty_ms_frames() {
        let mut b = JitterBuffer::new(160, S, 320, 8000);
        for i in 0..4u32 {
            b.push(2, 240 * i, &vec![i as u8 + 1; 240]);
        }
        let mut all = Vec::new();
        for _ in 0..6 {
            all.extend(b.pop().0);
        }
        let expect: Vec<u8> = (1..=4u8).flat_map(|n| vec![n; 240]).chain(vec![S; 0]).collect();
        assert_eq!(&all[..960], &expect[..]);
        assert!(all[960..].iter().all(|&x| x == S));
    }

    #[test]
    fn a_new_ssrc_starts_over() {
        let mut b = buf();
        b.push(1, 50_000, &pkt(1));
        b.push(1, 50_160, &pkt(2));
        assert_eq!(frames(&mut b, 1), vec![1]);
        // Another source with unrelated numbers (earlier timestamps) replaces it.
        b.push(2, 7, &pkt(7));
        b.push(2, 167, &pkt(8));
        assert_eq!(frames(&mut b, 3), vec![7, 8, S]);
        assert_eq!(b.stats().ssrc_changes, 1);
    }

    #[test]
    fn holds_at_most_max_dropping_the_oldest() {
        let mut b = JitterBuffer::new(160, S, 320, 640);
        for i in 0..10u32 {
            b.push(3, i * 160, &pkt(i as u8));
        }
        assert_eq!(frames(&mut b, 5), vec![6, 7, 8, 9, S]);
    }
}
