//! The agent's play clock: audio leaves in real-time-sized frames, at most a small
//! lead ahead of a monotonic clock, and the clock tells how much the caller heard.

use std::time::{Duration, Instant};

/// A phrase of the reply and where it sits on the response's audio timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct SpokenPhrase {
    /// The phrase text.
    pub text: String,
    /// Audio offset where the phrase starts, in milliseconds.
    pub start_ms: f64,
    /// Audio offset where it ends.
    pub end_ms: f64,
}

/// Real-time pacing of one response's frames.
#[derive(Debug)]
pub struct PlayClock {
    started: Option<Instant>,
    sent_ms: f64,
    lead: Duration,
    phrases: Vec<SpokenPhrase>,
}

impl PlayClock {
    /// A clock allowing the sender `lead_ms` ahead of real time.
    pub fn new(lead_ms: u32) -> Self {
        Self { started: None, sent_ms: 0.0, lead: Duration::from_millis(u64::from(lead_ms)), phrases: Vec::new() }
    }

    /// When the next frame may be sent: its play time minus the lead.
    pub fn next_send_at(&self) -> Option<Instant> {
        let started = self.started?;
        let play_at = started + Duration::from_secs_f64(self.sent_ms / 1000.0);
        Some(play_at.checked_sub(self.lead).unwrap_or(started))
    }

    /// When the next frame sent will be heard: now for the first frame, else where
    /// the audio sent so far ends on the caller's timeline.
    pub fn next_play_at(&self) -> Instant {
        match self.started {
            Some(t) => t + Duration::from_secs_f64(self.sent_ms / 1000.0),
            None => Instant::now(),
        }
    }

    /// After a pause: the caller has played what was sent (or as much as real time
    /// allowed), and the timeline continues from now instead of rushing to catch up.
    pub fn resume(&mut self) {
        if let Some(t) = self.started {
            let played = self.played_ms();
            self.started = Some(Instant::now().checked_sub(Duration::from_secs_f64(played / 1000.0)).unwrap_or(t));
        }
    }

    /// Records a frame of `ms` milliseconds as sent now.
    pub fn sent(&mut self, ms: f64) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
        self.sent_ms += ms;
    }

    /// Records that a phrase's audio begins at the current send position.
    pub fn phrase(&mut self, text: String, duration_ms: f64) {
        let start_ms = self.sent_ms;
        self.phrases.push(SpokenPhrase { text, start_ms, end_ms: start_ms + duration_ms });
    }

    /// Milliseconds the caller has heard by now: real time since the first frame,
    /// never more than was sent.
    pub fn played_ms(&self) -> f64 {
        match self.started {
            Some(t) => (t.elapsed().as_secs_f64() * 1000.0).min(self.sent_ms),
            None => 0.0,
        }
    }

    /// The text the caller heard by `played_ms`: whole phrases that finished, and the
    /// words of the phrase in progress in proportion to its elapsed audio.
    pub fn heard_text(&self, played_ms: f64) -> String {
        let mut parts: Vec<String> = Vec::new();
        for p in &self.phrases {
            if played_ms >= p.end_ms {
                parts.push(p.text.clone());
            } else if played_ms > p.start_ms {
                let frac = (played_ms - p.start_ms) / (p.end_ms - p.start_ms).max(1.0);
                let words: Vec<&str> = p.text.split_whitespace().collect();
                let n = ((words.len() as f64) * frac).floor() as usize;
                if n > 0 {
                    parts.push(words[..n].join(" "));
                }
            }
        }
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_text_cuts_the_phrase_in_progress() {
        let mut c = PlayClock::new(0);
        c.phrase("Your order is processing.".into(), 1000.0);
        c.sent(1000.0);
        c.phrase("It will be ready on December sixth.".into(), 1400.0);
        c.sent(1400.0);
        assert_eq!(c.heard_text(0.0), "");
        assert_eq!(c.heard_text(1000.0), "Your order is processing.");
        assert_eq!(c.heard_text(1700.0), "Your order is processing. It will be");
        assert_eq!(c.heard_text(5000.0), "Your order is processing. It will be ready on December sixth.");
    }

    #[test]
    fn resuming_after_a_pause_does_not_rush() {
        let mut c = PlayClock::new(100);
        c.sent(200.0);
        std::thread::sleep(Duration::from_millis(300));
        // Everything sent was heard during the pause; the next frame is due now, not
        // 100 ms in the past, and the one after it 20 ms later.
        c.resume();
        assert!((c.played_ms() - 200.0).abs() < 1.0);
        let at = c.next_send_at().expect("started");
        assert!(at <= Instant::now());
        assert!(Instant::now().duration_since(at) <= Duration::from_millis(120));
        c.sent(20.0);
        let later = c.next_send_at().expect("started");
        assert!((later.duration_since(at).as_secs_f64() * 1000.0 - 20.0).abs() < 1.0);
    }

    #[test]
    fn send_time_runs_at_most_lead_ahead() {
        let mut c = PlayClock::new(100);
        assert!(c.next_send_at().is_none());
        c.sent(20.0);
        let first = c.next_send_at().expect("started");
        c.sent(480.0);
        let later = c.next_send_at().expect("started");
        let gap = later.duration_since(first).as_secs_f64() * 1000.0;
        assert!((gap - 480.0).abs() < 1.0, "gap {gap}");
    }
}
