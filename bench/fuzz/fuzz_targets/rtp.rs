//! The caller's RTP as the SIP bridge's receive loop (server/src/sip/media.rs) takes
//! it: each datagram parsed with `rtp-types`, audio of the agreed payload type
//! (transcoded when the wire's G.711 law is not the call's) into the jitter buffer
//! (server/src/sip/jitter.rs), telephone-events into the RFC 4733 decoder
//! (server/src/sip/dtmf.rs), comfort noise and other payload types dropped; the
//! 20 ms tick pops one frame. Same buffer sizes as media.rs.
//!
//! Input: the first byte picks the terms (wire and call codec, telephone-event on or
//! off); then records, each either a raw datagram (any bytes, up to the receive
//! buffer's 2048) or a packet built here from fuzzed header fields (SSRC, payload
//! type, timestamp, length) whose audio payload is a pattern of its samples'
//! timestamps; each record says how many ticks follow it.
//!
//! Beyond "no panic": every frame is 20 ms long; while the buffer has held only
//! pattern audio, every sample in a frame sits at its own timestamp relative to the
//! others (nothing reordered, shifted or mixed in) and a frame says it has audio
//! exactly when it has some; a key press is one of 0-9 * # A-D, never reported
//! twice for the same (SSRC, timestamp, event) among the last 16 presses, and a
//! telephone-event payload under 4 bytes is an error.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use rtp_types::RtpPacket;

#[allow(dead_code)]
#[path = "../../../server/src/sip/jitter.rs"]
mod jitter;

#[allow(dead_code)]
#[path = "../../../server/src/sip/dtmf.rs"]
mod dtmf;

#[allow(dead_code)]
#[path = "../../../server/src/sip/sdp.rs"]
mod sdp;

use dtmf::{DtmfDecoder, DtmfError};
use jitter::JitterBuffer;
use sdp::Codec;

// media.rs's sizes.
const FRAME: usize = 20 * 8;
const PREFETCH: usize = 60 * 8;
const JITTER_MAX: usize = 1000 * 8;
const MAX_DATAGRAM: usize = 2048;
const DTMF_PT: u8 = 101;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(terms) = input.byte() else { return };
    let wire = if terms & 1 == 0 { Codec::Pcmu } else { Codec::Pcma };
    let call = if terms & 2 == 0 { wire } else if wire == Codec::Pcmu { Codec::Pcma } else { Codec::Pcmu };
    let dtmf_pt = (terms & 4 != 0).then_some(DTMF_PT);
    let audio_pt = wire.payload_type();

    let mut jitter = JitterBuffer::new(FRAME, call.silence(), PREFETCH, JITTER_MAX);
    let mut dtmf = DtmfDecoder::new();
    // The decoder's memory, modelled: the last 16 presses.
    let mut presses: VecDeque<(u32, u32, u8)> = VecDeque::new();
    // Whether everything the jitter buffer took was pattern audio in the call's codec.
    let mut pure = wire == call;

    while let Some(kind) = input.byte() {
        let ticks = kind >> 4;
        let mut built = Vec::new();
        let datagram: &[u8] = if kind & 1 == 0 {
            // A raw datagram.
            let len = (usize::from(kind >> 1 & 7) << 8 | usize::from(input.byte().unwrap_or(0))) % (MAX_DATAGRAM + 1);
            input.bytes(len)
        } else {
            // A well-formed packet from fuzzed fields.
            let h = input.bytes(8);
            let [sel, t0, t1, t2, t3, len_lo, len_hi, marker] = <[u8; 8]>::try_from(h).unwrap_or_default();
            let ssrc = u32::from(sel & 3) * 0x1111_1111;
            let pt = match sel >> 2 & 3 {
                0 | 1 => audio_pt,
                2 => dtmf_pt.unwrap_or(13),
                _ => 13,
            };
            let ts = u32::from_le_bytes([t0, t1, t2, t3]);
            built.extend_from_slice(&[0x80, pt | (marker & 0x80), 0, sel, t3, t2, t1, t0]);
            built.extend_from_slice(&ssrc.to_be_bytes());
            let len = usize::from(u16::from_le_bytes([len_lo, len_hi])) % 1200;
            if pt == audio_pt {
                built.extend((0..len).map(|i| (ts.wrapping_add(i as u32) & 0x7F) as u8));
            } else {
                built.extend_from_slice(input.bytes(len.min(8)));
            }
            &built
        };
        let from_pattern = kind & 1 == 1;

        // media.rs's receive path for one datagram.
        if let Ok(pkt) = RtpPacket::parse(datagram) {
            let pt = pkt.payload_type();
            if pt == audio_pt && wire == call {
                pure &= from_pattern || pkt.payload().is_empty();
                jitter.push(pkt.ssrc(), pkt.timestamp(), pkt.payload());
            } else if pt == audio_pt {
                let audio = wire.transcode(call, pkt.payload());
                assert_eq!(audio.len(), pkt.payload().len());
                jitter.push(pkt.ssrc(), pkt.timestamp(), &audio);
            } else if Some(pt) == dtmf_pt {
                let (ssrc, ts, payload) = (pkt.ssrc(), pkt.timestamp(), pkt.payload());
                match dtmf.packet(ssrc, ts, payload) {
                    Err(DtmfError::Short(n)) => assert!(n < 4 && n == payload.len()),
                    Ok(key) => {
                        assert!(payload.len() >= 4);
                        let press = (ssrc, ts, payload[0]);
                        let repeat = presses.contains(&press);
                        if !repeat {
                            if presses.len() == 16 {
                                presses.pop_front();
                            }
                            presses.push_back(press);
                        }
                        match key {
                            Some(k) => {
                                assert!(!repeat, "a repeat gave a key again");
                                assert!("0123456789*#ABCD".contains(k), "key {k:?}");
                            }
                            None => assert!(repeat || payload[0] > 15),
                        }
                    }
                }
            }
        }

        for _ in 0..ticks {
            let (frame, got) = jitter.pop();
            assert_eq!(frame.len(), FRAME);
            if pure {
                let audio: Vec<(usize, u8)> = frame.iter().copied().enumerate().filter(|&(_, b)| b < 0x80).collect();
                assert_eq!(got, !audio.is_empty(), "frame {frame:?}");
                if let Some(&(j0, b0)) = audio.first() {
                    let start = b0.wrapping_sub(j0 as u8) & 0x7F;
                    for &(j, b) in &audio {
                        assert_eq!(b.wrapping_sub(j as u8) & 0x7F, start, "sample {j} out of place in {frame:?}");
                    }
                }
            }
        }
    }
});
