//! Prometheus metrics, kept as plain atomics: a handful of counters, gauges and
//! latency histograms does not justify a metrics framework.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use parley_agent::{AgentEvent, ResponseStatus};
use parley_llm::KvCacheStats;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (ms) of the latency histogram buckets.
const BUCKETS_MS: [f64; 12] = [100.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 8000.0, 13000.0];

/// A latency histogram in milliseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, ms: f64) {
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            if ms <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((ms.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {}", bound / 1000.0, self.buckets[i].load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Every metric the server exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Calls accepted since start.
    pub calls_total: Counter,
    /// Calls refused for capacity, a key's limits or a drain.
    pub calls_refused: Counter,
    /// Connections refused because their address held `connections_per_ip`.
    pub connections_refused: Counter,
    /// Client messages refused (malformed, unknown, oversized).
    pub rejected_messages: Counter,
    /// Responses by outcome.
    pub responses_completed: Counter,
    pub responses_cancelled: Counter,
    pub responses_failed: Counter,
    /// End of caller speech → first agent audio.
    pub turn_first_audio: Histogram,
    /// End of caller speech → final transcript.
    pub turn_transcript: Histogram,
    /// End of caller speech → first LLM text.
    pub turn_first_token: Histogram,
    /// Calls ended because the client stopped taking writes (see the call driver).
    pub write_timeouts: Counter,
    /// Key presses (RFC 4733 events) read from SIP callers' RTP.
    pub sip_dtmf_keys: Counter,
    /// SIP transfers (`transfer_call`) the agent started.
    pub sip_transfers_asked: Counter,
    /// SIP transfers the target answered (NOTIFY 2xx): our leg hung up.
    pub sip_transfers_completed: Counter,
    /// SIP transfers refused, failed or timed out: the call went on.
    pub sip_transfers_failed: Counter,
}

impl Metrics {
    /// Updates metrics from an event on its way to a client.
    pub fn observe(&self, event: &AgentEvent) {
        match event {
            AgentEvent::ResponseDone { status, .. } => match status {
                ResponseStatus::Completed => self.responses_completed.inc(),
                ResponseStatus::Cancelled => self.responses_cancelled.inc(),
                ResponseStatus::Failed => self.responses_failed.inc(),
            },
            AgentEvent::Metrics(m) => {
                if let Some(v) = m.first_audio_ms {
                    self.turn_first_audio.observe(v);
                }
                if let Some(v) = m.transcript_ms {
                    self.turn_transcript.observe(v);
                }
                if let Some(v) = m.first_token_ms {
                    self.turn_first_token.observe(v);
                }
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition; `kv` is the embedded model's KV-cache budget
    /// (none for remote replicas, or before the models load).
    pub fn render(&self, active_calls: usize, ready: bool, kv: Option<KvCacheStats>) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        gauge(&mut out, "parley_calls_active", "Calls in progress.", active_calls as u64);
        gauge(&mut out, "parley_ready", "1 once the models are loaded.", u64::from(ready));
        counter(&mut out, "parley_calls_total", "Calls accepted.", self.calls_total.get());
        counter(&mut out, "parley_calls_refused_total", "Calls refused because the server was full.", self.calls_refused.get());
        counter(&mut out, "parley_client_messages_rejected_total", "Client messages answered with an error event.", self.rejected_messages.get());
        counter(&mut out, "parley_connections_refused_total", "Connections refused: their address held server.limits.connections_per_ip.", self.connections_refused.get());
        counter(&mut out, "parley_write_timeouts_total", "Calls ended because the client stopped reading (server.write_timeout_ms).", self.write_timeouts.get());
        counter(&mut out, "parley_sip_dtmf_keys_total", "Key presses (RFC 4733) read from SIP callers.", self.sip_dtmf_keys.get());
        let _ = writeln!(out, "# HELP parley_sip_transfers_total SIP transfers to a person (REFER) by outcome.\n# TYPE parley_sip_transfers_total counter");
        for (outcome, c) in [("asked", &self.sip_transfers_asked), ("completed", &self.sip_transfers_completed), ("failed", &self.sip_transfers_failed)] {
            let _ = writeln!(out, "parley_sip_transfers_total{{outcome=\"{outcome}\"}} {}", c.get());
        }
        gauge(&mut out, "parley_asr_decodes_running", "Speech-to-text decodes running now, all calls together.", parley_agent::asr_decodes_running() as u64);
        let _ = writeln!(out, "# HELP parley_responses_total Responses by final status.\n# TYPE parley_responses_total counter");
        for (status, c) in [("completed", &self.responses_completed), ("cancelled", &self.responses_cancelled), ("failed", &self.responses_failed)] {
            let _ = writeln!(out, "parley_responses_total{{status=\"{status}\"}} {}", c.get());
        }
        self.turn_first_audio.render(&mut out, "parley_turn_first_audio_seconds", "End of caller speech to first agent audio.");
        self.turn_transcript.render(&mut out, "parley_turn_transcript_seconds", "End of caller speech to final transcript.");
        self.turn_first_token.render(&mut out, "parley_turn_first_token_seconds", "End of caller speech to first LLM token.");
        if let Some(kv) = kv {
            gauge(&mut out, "parley_llm_kv_cache_bytes", "Bytes the calls' KV caches and the shared system-prompt caches hold.", kv.bytes_in_use as u64);
            gauge(&mut out, "parley_llm_kv_cache_budget_bytes", "Limit on parley_llm_kv_cache_bytes (llm.kv_cache_mb).", kv.budget_bytes as u64);
            gauge(&mut out, "parley_llm_kv_cache_sessions", "Calls holding a KV cache, idle or generating.", kv.sessions_cached as u64);
            counter(&mut out, "parley_llm_kv_evictions_total", "Idle calls' KV caches dropped to stay within the budget.", kv.evictions);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(150.0);
        h.observe(900.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 0"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.2\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2"), "{s}");
        assert!(s.contains("x_count 2"), "{s}");
    }

    #[test]
    fn kv_cache_metrics_only_for_the_embedded_model() {
        let m = Metrics::default();
        assert!(!m.render(0, true, None).contains("parley_llm_kv"));
        let kv = KvCacheStats { budget_bytes: 100, bytes_in_use: 40, sessions_cached: 2, evictions: 3, ..KvCacheStats::default() };
        let s = m.render(0, true, Some(kv));
        for line in ["parley_llm_kv_cache_bytes 40", "parley_llm_kv_cache_budget_bytes 100", "parley_llm_kv_cache_sessions 2", "parley_llm_kv_evictions_total 3"] {
            assert!(s.contains(line), "{line} missing from {s}");
        }
    }
}
