//! The caller's side of turn-taking inside a call: speech in progress, a finished
//! stretch that may go on, and speech heard while the agent talks.

use std::sync::OnceLock;
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::turn_rules::PartialStabilizer;

/// Speech-to-text decodes that may run at once across all calls: one per two cores
/// (a decode uses two threads). Measured on 2 cores: two 2.7 s clips decoded side by
/// side took 7 s each instead of 0.25 s one after the other, so decodes queue here.
/// Finals wait for a slot; partials only take a free one and are skipped otherwise,
/// so partial decoding never delays anyone's turn by more than one short decode.
pub(crate) fn asr_slots() -> &'static Semaphore {
    SLOTS.get_or_init(|| Semaphore::new(asr_slot_count()))
}

static SLOTS: OnceLock<Semaphore> = OnceLock::new();

fn asr_slot_count() -> usize {
    (std::thread::available_parallelism().map_or(2, usize::from) / 2).max(1)
}

/// Speech-to-text decodes running now across all calls (taken slots of the shared
/// decoding semaphore): exported as a gauge so an operator, and the tests, can see
/// that a call which hung up left no decode behind.
pub fn asr_decodes_running() -> usize {
    SLOTS.get().map_or(0, |s| asr_slot_count().saturating_sub(s.available_permits()))
}

/// Longest audio a partial transcript looks at (Whisper's window is 30 s).
pub(crate) const PARTIAL_MAX_SAMPLES: usize = 28 * 16_000;

/// Speech the VAD hears now.
pub(crate) struct Speech {
    /// The user item this speech will become.
    pub item_id: String,
    /// When the VAD reported its start.
    pub started: Instant,
    /// Partial transcript shown so far.
    pub stabilizer: PartialStabilizer,
    /// When the last partial transcript was started.
    pub last_partial: Option<Instant>,
    /// The partial transcript of this speech being decoded, if any: stopped when the
    /// turn's own transcript needs the decoding slot ([`Speech::stop_partial`]).
    pub partial: Option<tokio::task::AbortHandle>,
    /// Set when the speech began during a reply that may be interrupted.
    pub barge: Option<Barge>,
    /// The transcript started when the caller paused (see [`EarlyTranscript`]).
    pub early: Option<EarlyTranscript>,
    /// The end of speech (stream ms) whose early transcript reads as a finished
    /// question: the turn ends there once `complete_silence_ms` has passed.
    pub complete: Option<u64>,
}

impl Speech {
    /// Stops the partial transcript in progress, if any. Called when the caller
    /// pauses or stops: the turn's transcript is about to queue for a decoding slot,
    /// and a partial of the same speech would hold that slot for a whole decode
    /// (measured: about 85 ms of the turn's latency at the median, 200 ms at p95) to
    /// produce text the final transcript replaces anyway. Dropping the task stops the
    /// decode (the transcriber's stop flag), which frees the slot.
    pub fn stop_partial(&mut self) {
        if let Some(task) = self.partial.take() {
            task.abort();
        }
    }
}

/// A transcript of the turn started at the caller's first pause, before the VAD's
/// silence window confirms the turn is over: when the stop comes for the same end of
/// speech, this is the turn's transcript and the window was not spent waiting. If the
/// caller went on speaking it is dropped (a decode not begun yet is skipped).
pub(crate) struct EarlyTranscript {
    /// The end of speech (stream ms) it covers.
    pub end_ms: u64,
    /// The decode's result and its duration in ms; closed if it was skipped.
    pub result: tokio::sync::oneshot::Receiver<(Result<parley_asr::Transcript, parley_asr::AsrError>, f64)>,
    /// Set once the caller spoke again: the decode, if still waiting, is not run.
    pub stale: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EarlyTranscript {
    /// Marks it unwanted.
    pub fn drop_stale(self) {
        self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Speech heard during a reply, being judged: interruption, backchannel or echo.
#[derive(Debug, Clone)]
pub(crate) struct Barge {
    /// The reply it is judged against.
    pub response_id: String,
    /// When to look at it next (minimum duration, then echo re-checks).
    pub check_at: Instant,
    /// The reply is paused while the caller's words are judged.
    pub paused: bool,
    /// The last check found it to be the agent's own echo.
    pub echo: bool,
}

/// A finished stretch of speech that sounded unfinished, waiting for more.
pub(crate) struct HeldTurn {
    pub item_id: String,
    pub text: String,
    pub timer: crate::call::TurnTimer,
    pub asr_ms: f64,
    /// Commit it as it is at this time if the caller says nothing more.
    pub deadline: Instant,
}
