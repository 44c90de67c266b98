//! Our outgoing RTP stream: one SSRC, sequence +1 per packet, timestamp +samples per
//! packet whether or not there is speech (the pacer sends silence between replies),
//! and the marker bit on the first packet of each talk spurt (RFC 3551 section 4.1).
//! Headers are written with `rtp-types`.

use rtp_types::RtpPacketBuilder;

/// Writes the call's RTP packets, one per tick of the pacer.
#[derive(Debug)]
pub struct Packetizer {
    ssrc: u32,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    /// Samples (= timestamp units at 8 kHz) per packet.
    samples: u32,
    /// Whether the last packet carried speech.
    talking: bool,
}

impl Packetizer {
    /// A stream with random-looking starting numbers (RFC 3550 section 5.1) given by
    /// the caller, `samples` per packet.
    pub fn new(ssrc: u32, payload_type: u8, first_seq: u16, first_timestamp: u32, samples: u32) -> Self {
        Self { ssrc, payload_type, seq: first_seq, timestamp: first_timestamp, samples, talking: false }
    }

    /// The stream's SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The packet for this tick: `payload` is one packet's worth of audio, `speech`
    /// whether it is the agent talking (false for the silence between replies).
    pub fn packet(&mut self, payload: &[u8], speech: bool) -> Vec<u8> {
        let marker = speech && !self.talking;
        self.talking = speech;
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(self.payload_type)
            .sequence_number(self.seq)
            .timestamp(self.timestamp)
            .ssrc(self.ssrc)
            .marker_bit(marker)
            .payload(payload)
            .write_vec_unchecked();
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(self.samples);
        packet
    }

    /// Time passes without a packet (on hold): the timestamp still advances so the
    /// next packet's timestamp says how long the pause was; the next speech is a new
    /// talk spurt.
    pub fn skip(&mut self) {
        self.timestamp = self.timestamp.wrapping_add(self.samples);
        self.talking = false;
    }

    /// The payload type of the next packets (a re-INVITE changed the codec); the
    /// stream (SSRC, sequence, timestamp) goes on.
    pub fn set_payload_type(&mut self, payload_type: u8) {
        self.payload_type = payload_type;
    }

    /// The agent's audio was dropped (barge-in): the next speech starts a new spurt.
    pub fn interrupt(&mut self) {
        self.talking = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtp_types::RtpPacket;

    fn header(p: &[u8]) -> (u16, u32, bool, u32, u8, usize) {
        let r = RtpPacket::parse(p).expect("our packet parses");
        (r.sequence_number(), r.timestamp(), r.marker_bit(), r.ssrc(), r.payload_type(), r.payload().len())
    }

    #[test]
    fn sequence_and_timestamp_advance_over_silence_and_the_marker_starts_each_spurt() {
        let mut p = Packetizer::new(0xABCD, 0, 65534, u32::MAX - 160, 160);
        let speech = [0x55u8; 160];
        let silence = [0xFFu8; 160];
        let plan = [true, true, false, false, true, true];
        let got: Vec<_> = plan.iter().map(|&s| header(&p.packet(if s { &speech } else { &silence }, s))).collect();
        let seqs: Vec<u16> = got.iter().map(|h| h.0).collect();
        assert_eq!(seqs, vec![65534, 65535, 0, 1, 2, 3], "seq +1, wrapping");
        let ts: Vec<u32> = got.iter().map(|h| h.1).collect();
        assert_eq!(ts, vec![u32::MAX - 160, u32::MAX, 159, 319, 479, 639], "timestamp +160 through silence, wrapping");
        let markers: Vec<bool> = got.iter().map(|h| h.2).collect();
        assert_eq!(markers, vec![true, false, false, false, true, false]);
        assert!(got.iter().all(|h| h.3 == 0xABCD && h.4 == 0 && h.5 == 160), "one SSRC and payload type");
    }

    #[test]
    fn barge_in_and_hold_start_a_new_spurt_and_keep_the_clock() {
        let mut p = Packetizer::new(1, 8, 10, 1000, 240);
        let a = header(&p.packet(&[0u8; 240], true));
        p.interrupt();
        let b = header(&p.packet(&[0u8; 240], true));
        assert!(a.2 && b.2, "speech after a barge-in is a new talk spurt");
        p.skip();
        p.skip();
        let c = header(&p.packet(&[0u8; 240], true));
        assert_eq!((b.0 + 1, b.1 + 3 * 240, true), (c.0, c.1, c.2), "held ticks advance the timestamp, not the sequence");
    }
}
