//! Per-call figures, server samples from /proc, and the run's summary.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// The `p`th percentile (0–100) of `values`, nearest rank; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One call's figures, a row of `calls.csv`.
#[derive(Debug, Default, Clone)]
pub struct CallReport {
    pub id: String,
    pub transport: String,
    pub seconds: f64,
    pub error: Option<String>,
    pub frames: usize,
    pub replies: usize,
    pub inter_p50_ms: f64,
    pub inter_p99_ms: f64,
    pub late_p99_ms: f64,
    pub late_max_ms: f64,
    pub drift_max_ms: f64,
    pub turn_p50_ms: f64,
    pub turn_max_ms: f64,
    /// Every lateness and turn latency, for the run's percentiles.
    pub late_all: Vec<f64>,
    pub turn_all: Vec<f64>,
}

impl CallReport {
    /// Fills in the figures from what the call measured.
    pub fn fill(&mut self, inter: &[f64], late: &[f64], drift: &[f64], turns: &[f64], frames: usize, replies: usize) {
        self.frames = frames;
        self.replies = replies;
        self.inter_p50_ms = percentile(inter, 50.0);
        self.inter_p99_ms = percentile(inter, 99.0);
        self.late_p99_ms = percentile(late, 99.0);
        self.late_max_ms = percentile(late, 100.0);
        self.drift_max_ms = drift.iter().copied().fold(0.0, f64::max);
        self.turn_p50_ms = percentile(turns, 50.0);
        self.turn_max_ms = percentile(turns, 100.0);
        self.late_all = late.to_vec();
        self.turn_all = turns.to_vec();
    }
}

/// The server's state at one moment, a row of `samples.csv`.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub calls: usize,
    pub rss_mb: f64,
    /// Percent of one core since the previous sample.
    pub cpu_pct: f64,
    pub fds: usize,
}

/// Reads `/proc/PID` (Linux).
pub struct ProcReader {
    pid: u32,
    last: Option<(Instant, f64)>,
    ticks_per_s: f64,
}

impl ProcReader {
    /// A reader for the server process `pid`.
    pub fn new(pid: u32) -> Self {
        Self { pid, last: None, ticks_per_s: USER_HZ }
    }

    /// The process's RSS, CPU since the last read, and open descriptors; `None`
    /// once it is gone.
    pub fn read(&mut self, start: Instant, calls: usize) -> Option<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let rss_kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        let cpu_s = ticks / self.ticks_per_s;
        let now = Instant::now();
        let cpu_pct = match self.last {
            Some((at, before)) if now > at => (cpu_s - before) / now.duration_since(at).as_secs_f64() * 100.0,
            _ => 0.0,
        };
        self.last = Some((now, cpu_s));
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map(|d| d.count()).unwrap_or(0);
        Some(Sample { t_s: now.duration_since(start).as_secs_f64(), calls, rss_mb: rss_kb / 1024.0, cpu_pct, fds })
    }
}

/// Clock ticks per second in /proc/PID/stat: Linux fixes USER_HZ at 100 on every
/// architecture, so no libc call is needed.
const USER_HZ: f64 = 100.0;

/// A run's figures.
#[derive(Debug, Default)]
pub struct Summary {
    pub label: String,
    pub calls: usize,
    pub attempts: usize,
    pub failed: usize,
    pub frames: usize,
    pub inter_p50_ms: f64,
    pub inter_p99_ms: f64,
    pub late_p99_ms: f64,
    pub late_max_ms: f64,
    pub turn_p50_ms: f64,
    pub turn_p95_ms: f64,
    pub turns: usize,
    pub rss_idle_mb: f64,
    pub rss_peak_mb: f64,
    pub rss_per_call_mb: f64,
    pub cpu_pct: f64,
    pub cpu_per_call_pct: f64,
    pub fds_peak: usize,
    pub fds_end: usize,
}

impl Summary {
    /// Sums up a run; steady state is after the ramp, with every call up.
    pub fn of(label: &str, calls: usize, ramp_s: f64, reports: &[CallReport], samples: &[Sample], baseline: Option<&Sample>) -> Self {
        let late: Vec<f64> = reports.iter().flat_map(|r| r.late_all.iter().copied()).collect();
        let turns: Vec<f64> = reports.iter().flat_map(|r| r.turn_all.iter().copied()).collect();
        let inter_p50: Vec<f64> = reports.iter().filter(|r| r.frames > 1).map(|r| r.inter_p50_ms).collect();
        let inter_p99: Vec<f64> = reports.iter().filter(|r| r.frames > 1).map(|r| r.inter_p99_ms).collect();
        // Steady state: after the ramp (plus 2 s to settle), while calls are up.
        let steady: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= ramp_s + 2.0 && s.calls > 0).collect();
        let mean = |f: &dyn Fn(&Sample) -> f64| if steady.is_empty() { 0.0 } else { steady.iter().map(|s| f(s)).sum::<f64>() / steady.len() as f64 };
        let rss = mean(&|s| s.rss_mb);
        let cpu = mean(&|s| s.cpu_pct);
        let up = mean(&|s| s.calls as f64).max(1.0);
        let idle = baseline.map(|b| b.rss_mb).unwrap_or(0.0);
        Self {
            label: label.to_string(),
            calls,
            attempts: reports.len(),
            failed: reports.iter().filter(|r| r.error.is_some()).count(),
            frames: reports.iter().map(|r| r.frames).sum(),
            inter_p50_ms: percentile(&inter_p50, 50.0),
            inter_p99_ms: percentile(&inter_p99, 99.0),
            late_p99_ms: percentile(&late, 99.0),
            late_max_ms: percentile(&late, 100.0),
            turn_p50_ms: percentile(&turns, 50.0),
            turn_p95_ms: percentile(&turns, 95.0),
            turns: turns.len(),
            rss_idle_mb: idle,
            rss_peak_mb: samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max),
            rss_per_call_mb: if idle > 0.0 { (rss - idle) / up } else { 0.0 },
            cpu_pct: cpu,
            cpu_per_call_pct: cpu / up,
            fds_peak: samples.iter().map(|s| s.fds).max().unwrap_or(0),
            fds_end: samples.last().map(|s| s.fds).unwrap_or(0),
        }
    }

    /// The summary as JSON (`summary.json`).
    pub fn json(&self) -> Value {
        json!({
            "label": self.label, "calls": self.calls, "attempts": self.attempts, "failed": self.failed, "frames": self.frames,
            "inter_arrival_p50_ms": self.inter_p50_ms, "inter_arrival_p99_ms": self.inter_p99_ms,
            "pacing_error_p99_ms": self.late_p99_ms, "pacing_error_max_ms": self.late_max_ms,
            "turn_p50_ms": self.turn_p50_ms, "turn_p95_ms": self.turn_p95_ms, "turns": self.turns,
            "rss_idle_mb": self.rss_idle_mb, "rss_peak_mb": self.rss_peak_mb, "rss_per_call_mb": self.rss_per_call_mb,
            "cpu_pct": self.cpu_pct, "cpu_per_call_pct": self.cpu_per_call_pct, "fds_peak": self.fds_peak, "fds_end": self.fds_end,
        })
    }

    /// One `key=value` line, for scripts.
    pub fn line(&self) -> String {
        format!(
            "calls={} attempts={} failed={} frames={} inter_p50_ms={:.1} inter_p99_ms={:.1} pacing_p99_ms={:.2} pacing_max_ms={:.1} turns={} turn_p50_ms={:.0} turn_p95_ms={:.0} rss_idle_mb={:.1} rss_peak_mb={:.1} rss_per_call_mb={:.3} cpu_pct={:.1} cpu_per_call_pct={:.3} fds_peak={} fds_end={}",
            self.calls, self.attempts, self.failed, self.frames, self.inter_p50_ms, self.inter_p99_ms, self.late_p99_ms, self.late_max_ms, self.turns,
            self.turn_p50_ms, self.turn_p95_ms, self.rss_idle_mb, self.rss_peak_mb, self.rss_per_call_mb, self.cpu_pct, self.cpu_per_call_pct, self.fds_peak, self.fds_end
        )
    }
}

/// Writes `calls.csv`.
pub fn write_calls(path: &Path, reports: &[CallReport]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(f, "id,transport,seconds,frames,replies,inter_p50_ms,inter_p99_ms,pacing_p99_ms,pacing_max_ms,drift_max_ms,turn_p50_ms,turn_max_ms,error")?;
    for r in reports {
        let error = r.error.as_deref().unwrap_or("").replace([',', '\n', '"'], " ");
        writeln!(
            f,
            "{},{},{:.2},{},{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.1},{:.1},{}",
            r.id, r.transport, r.seconds, r.frames, r.replies, r.inter_p50_ms, r.inter_p99_ms, r.late_p99_ms, r.late_max_ms, r.drift_max_ms, r.turn_p50_ms, r.turn_max_ms, error
        )?;
    }
    f.flush().context("writing calls.csv")
}

/// Writes `samples.csv`.
pub fn write_samples(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(f, "t_s,calls,rss_mb,cpu_pct,fds")?;
    for s in samples {
        writeln!(f, "{:.2},{},{:.2},{:.1},{}", s.t_s, s.calls, s.rss_mb, s.cpu_pct, s.fds)?;
    }
    f.flush().context("writing samples.csv")
}
