//! Fixed-size framing of a sample stream.

/// Cuts a stream into fixed-size frames (e.g. 20 ms) keeping the remainder.
///
/// Outbound audio is paced and sent in real-time-sized frames (160 samples of
/// 8 kHz μ-law for telephony), whatever chunk sizes synthesis produces.
#[derive(Debug, Clone)]
pub struct Framer {
    frame_len: usize,
    pending: Vec<f32>,
}

impl Framer {
    /// Creates a framer emitting frames of `frame_len` samples (at least 1).
    pub fn new(frame_len: usize) -> Self {
        let frame_len = frame_len.max(1);
        Self {
            frame_len,
            pending: Vec::with_capacity(frame_len),
        }
    }

    /// Adds samples and returns every frame completed by them, oldest first.
    pub fn push(&mut self, samples: &[f32]) -> Vec<Vec<f32>> {
        let mut frames = Vec::new();
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (self.frame_len - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == self.frame_len {
                frames.push(std::mem::replace(
                    &mut self.pending,
                    Vec::with_capacity(self.frame_len),
                ));
            }
        }
        frames
    }

    /// Emits the held remainder zero-padded to a full frame, or `None` when
    /// nothing is held; use it at the end of a response.
    pub fn flush(&mut self) -> Option<Vec<f32>> {
        if self.pending.is_empty() {
            return None;
        }
        let mut frame = std::mem::take(&mut self.pending);
        frame.resize(self.frame_len, 0.0);
        Some(frame)
    }

    /// Number of samples held back waiting for a full frame.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops the held remainder, e.g. when the caller barges in.
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// The frame length this framer cuts to.
    pub fn frame_len(&self) -> usize {
        self.frame_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_order_and_remainder() {
        let mut framer = Framer::new(4);
        let input: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert!(framer.push(&input[..3]).is_empty());
        assert_eq!(framer.pending(), 3);
        let frames = framer.push(&input[3..]);
        assert_eq!(
            frames,
            vec![vec![0.0, 1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0, 7.0]]
        );
        assert_eq!(framer.pending(), 2);
        assert_eq!(framer.flush(), Some(vec![8.0, 9.0, 0.0, 0.0]));
        assert_eq!(framer.pending(), 0);
        assert_eq!(framer.flush(), None);
    }

    #[test]
    fn exact_multiple_leaves_nothing_pending() {
        let mut framer = Framer::new(160);
        assert_eq!(framer.push(&[0.5; 480]).len(), 3);
        assert_eq!(framer.pending(), 0);
        assert!(framer.push(&[]).is_empty());
    }

    #[test]
    fn zero_length_is_treated_as_one() {
        let mut framer = Framer::new(0);
        assert_eq!(framer.push(&[1.0, 2.0]).len(), 2);
        framer.push(&[3.0]);
        assert_eq!(framer.frame_len(), 1);
        framer.clear();
        assert_eq!(framer.pending(), 0);
    }
}
