//! RFC 4733 telephone-events: key presses from the caller's RTP.
//!
//! An event is sent as several packets with the same RTP timestamp (its start) and
//! a growing duration, the last three times with the end bit. Carriers differ on the
//! marker bit, so a key press is recognised by its (timestamp, event) pair alone: the
//! first packet of a new pair is the press, every later one is a repeat.

/// Remembered presses (a repeat of anything older is long over).
const REMEMBERED: usize = 16;

/// Why a telephone-event payload was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DtmfError {
    /// Shorter than the 4-byte event block.
    #[error("telephone-event payload of {0} bytes; it needs 4")]
    Short(usize),
}

/// Decodes telephone-event packets into key presses, each once.
#[derive(Debug, Default)]
pub struct DtmfDecoder {
    /// (SSRC, timestamp, event) of recent presses, newest last.
    seen: std::collections::VecDeque<(u32, u32, u8)>,
}

impl DtmfDecoder {
    /// A decoder with nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one telephone-event packet: the key, when this packet starts a press.
    /// Events that are not keys (flash, tones) are ignored.
    pub fn packet(&mut self, ssrc: u32, timestamp: u32, payload: &[u8]) -> Result<Option<char>, DtmfError> {
        let [event, ..] = *payload else { return Err(DtmfError::Short(payload.len())) };
        if payload.len() < 4 {
            return Err(DtmfError::Short(payload.len()));
        }
        let key = (ssrc, timestamp, event);
        if self.seen.contains(&key) {
            return Ok(None);
        }
        if self.seen.len() == REMEMBERED {
            self.seen.pop_front();
        }
        self.seen.push_back(key);
        Ok(digit(event))
    }
}

/// The key of an RFC 4733 DTMF event code.
fn digit(event: u8) -> Option<char> {
    match event {
        0..=9 => char::from_digit(u32::from(event), 10),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some((b'A' + event - 12) as char),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(event: u8, end: bool, duration: u16) -> [u8; 4] {
        let d = duration.to_be_bytes();
        [event, if end { 0x80 | 10 } else { 10 }, d[0], d[1]]
    }

    #[test]
    fn one_press_per_timestamp_and_event_with_repeated_end_packets() {
        let mut d = DtmfDecoder::new();
        let mut keys = Vec::new();
        // "5": three progress packets then the end packet three times, no marker bit anywhere.
        for (end, dur) in [(false, 160), (false, 320), (false, 480), (true, 640), (true, 640), (true, 640)] {
            keys.extend(d.packet(7, 1000, &payload(5, end, dur)).expect("valid"));
        }
        // "#" right after, then "5" again: a new timestamp is a new press.
        for end in [false, true, true, true] {
            keys.extend(d.packet(7, 2000, &payload(11, end, 400)).expect("valid"));
        }
        for end in [false, true] {
            keys.extend(d.packet(7, 3000, &payload(5, end, 400)).expect("valid"));
        }
        assert_eq!(keys, vec!['5', '#', '5']);
    }

    #[test]
    fn events_on_their_own_ssrc_and_bad_payloads() {
        let mut d = DtmfDecoder::new();
        // The event stream may carry its own SSRC (different from the audio's).
        assert_eq!(d.packet(0xDEAD, 1000, &payload(10, false, 160)), Ok(Some('*')));
        assert_eq!(d.packet(0xBEEF, 1000, &payload(10, false, 160)), Ok(Some('*')), "another stream's press is its own");
        assert_eq!(d.packet(0xDEAD, 1000, &payload(10, true, 320)), Ok(None));
        assert_eq!(d.packet(1, 5, &[1, 2]), Err(DtmfError::Short(2)));
        assert_eq!(d.packet(1, 5, &[]), Err(DtmfError::Short(0)));
        assert_eq!(d.packet(1, 6, &payload(16, false, 160)), Ok(None), "flash is not a key");
        assert_eq!(d.packet(1, 7, &payload(15, false, 160)), Ok(Some('D')));
    }
}
