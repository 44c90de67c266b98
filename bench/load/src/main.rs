//! `parley-load`: N concurrent callers against a Parley server, to find its limit.
//!
//! Each caller streams audio paced from a monotonic clock (a WAV on a loop with a
//! pause after each turn, or silence) over `/twilio`, `/v1/realtime` (WebSockets) or
//! `POST /v1/stream` (one HTTP/2 stream per call, on its own connection or on a few
//! shared ones: `--h2-connections`), and records the agent's outbound frames. One
//! call loop drives every transport: a [`wire::Dialect`] says what the messages are,
//! a [`pipe::Pipe`] carries them. A sampler reads the server's RSS, CPU and open file
//! descriptors from `/proc/PID`. A run writes `calls.csv` (one row per call),
//! `samples.csv` (one row a second), `summary.json` and `plot.png`, and prints the
//! summary as one `key=value` line for scripts.
//!
//! Pacing error: the agent sends each reply's frames at most a lead ahead of real
//! time; a frame that arrives after the time it should start playing (first frame's
//! arrival + the audio before it) leaves the caller a gap. That lateness is the
//! pacing error; `drift` is the lateness of each reply's last frame.

mod pipe;
mod plot;
mod stats;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use tokio::sync::Mutex;

use crate::pipe::{H2Pool, Pipe};
use crate::stats::{CallReport, Sample};
use crate::wire::{Dialect, Heard};

/// Which endpoint the callers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// Twilio Media Streams: μ-law 8 kHz, 20 ms frames.
    Twilio,
    /// OpenAI Realtime: PCM16 24 kHz appends.
    Realtime,
    /// `POST /v1/stream`: the Realtime events as NDJSON on one HTTP/2 stream (h2c).
    Stream,
    /// Every other call on each.
    Mixed,
}

/// Options of a run.
#[derive(Parser, Debug, Clone)]
#[command(name = "parley-load", about = "Concurrent paced callers against a Parley server")]
struct Args {
    /// The server, `HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Concurrent calls.
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// Endpoint the calls use.
    #[arg(long, value_enum, default_value = "twilio")]
    transport: Transport,
    /// Seconds over which the calls start (evenly).
    #[arg(long, default_value_t = 10.0)]
    ramp_s: f64,
    /// Seconds the run lasts after the ramp (steady state).
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// Replace-on-end (soaks): each call lasts this many seconds, then hangs up and
    /// a new one takes its place; 0 keeps every call for the whole run.
    #[arg(long, default_value_t = 0.0)]
    call_s: f64,
    /// A WAV the callers say on a loop (any rate, mono); without it they send silence.
    #[arg(long)]
    wav: Option<PathBuf>,
    /// Silence after each turn, in ms, while the agent answers; default: the clip's
    /// length plus 1.5 s (the echo agent's reply fits).
    #[arg(long)]
    gap_ms: Option<u64>,
    /// Audio per message, in ms (Twilio sends 20).
    #[arg(long, default_value_t = 20)]
    chunk_ms: u64,
    /// The server's pid, for RSS, CPU and file descriptors from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// `stream` only: HTTP/2 connections the calls share (call i on connection
    /// i mod K); 0 opens one connection per call. The server's
    /// `server.http.h2_max_concurrent_streams` (64 by default) must cover
    /// calls / K.
    #[arg(long, default_value_t = 0)]
    h2_connections: usize,
    /// Folder for calls.csv, samples.csv, summary.json and plot.png.
    #[arg(long, default_value = "load-out")]
    out: PathBuf,
}

/// Counters the sampler reads while calls run.
#[derive(Default)]
struct Live {
    connected: AtomicUsize,
    failed: AtomicUsize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let summary = run(args).await?;
    println!("{}", summary.line());
    Ok(())
}

/// The audio a caller says, at the transport's rate, and how long a cycle is.
#[derive(Clone)]
struct Script {
    /// The clip (empty: silence only).
    clip: Arc<Vec<f32>>,
    gap_ms: u64,
}

fn load_clip(path: &Path, rate: u32) -> Result<Vec<f32>> {
    let (samples, from) = parley_audio::wav::read_wav(path).with_context(|| format!("reading {}", path.display()))?;
    let mut r = parley_audio::resample::StreamResampler::new(from, rate).context("resampler")?;
    let mut out = r.process(&samples);
    out.extend(r.flush());
    Ok(out)
}

/// Runs the whole load and writes its files.
async fn run(args: Args) -> Result<stats::Summary> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let scripts = |rate: u32| -> Result<Script> {
        let clip = match &args.wav {
            Some(p) => load_clip(p, rate)?,
            None => Vec::new(),
        };
        let clip_ms = clip.len() as u64 * 1000 / u64::from(rate);
        Ok(Script { clip: Arc::new(clip), gap_ms: args.gap_ms.unwrap_or(clip_ms + 1500) })
    };
    let twilio = scripts(wire::Twilio::new().rate())?;
    let realtime = scripts(wire::Realtime.rate())?;
    let h2 = Arc::new(H2Pool::new(&args.addr, args.h2_connections));

    let live = Arc::new(Live::default());
    let reports: Arc<Mutex<Vec<CallReport>>> = Arc::default();
    let start = Instant::now();
    let total = Duration::from_secs_f64(args.ramp_s + args.duration_s);
    let end = start + total;

    // Idle baseline before any call.
    let mut proc = args.pid.map(stats::ProcReader::new);
    let baseline = proc.as_mut().and_then(|p| p.read(start, 0));

    let sampler = {
        let live = live.clone();
        let pid = args.pid;
        tokio::spawn(async move {
            let mut proc = pid.map(stats::ProcReader::new);
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let calls = live.connected.load(Ordering::Relaxed);
                let s = match proc.as_mut().and_then(|p| p.read(start, calls)) {
                    Some(s) => s,
                    None => Sample { t_s: start.elapsed().as_secs_f64(), calls, ..Sample::default() },
                };
                samples.push(s);
                if Instant::now() >= end {
                    return samples;
                }
            }
        })
    };

    let mut slots = Vec::new();
    for i in 0..args.calls {
        let at = start + Duration::from_secs_f64(args.ramp_s * i as f64 / args.calls.max(1) as f64);
        let transport = match args.transport {
            Transport::Mixed if i % 2 == 1 => Transport::Realtime,
            Transport::Mixed => Transport::Twilio,
            t => t,
        };
        let script = if transport == Transport::Twilio { twilio.clone() } else { realtime.clone() };
        let (live, reports, args, h2) = (live.clone(), reports.clone(), args.clone(), h2.clone());
        slots.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut n = 0;
            // Replace-on-end: a slot keeps one call going until the run is over.
            while Instant::now() < end {
                let until = if args.call_s > 0.0 { (Instant::now() + Duration::from_secs_f64(args.call_s)).min(end) } else { end };
                let id = format!("{i}.{n}");
                n += 1;
                let report = one_call(&args.addr, &h2, i, transport, &script, args.chunk_ms, until, &live, id).await;
                if report.error.is_some() {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    // A refused call is not retried in a busy loop.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                reports.lock().await.push(report);
                if args.call_s <= 0.0 {
                    break;
                }
            }
        }));
    }
    for slot in slots {
        let _ = slot.await;
    }
    let samples = sampler.await.context("the sampler failed")?;
    let reports = std::mem::take(&mut *reports.lock().await);
    let summary = stats::Summary::of(&args_label(&args), args.calls, args.ramp_s, &reports, &samples, baseline.as_ref());
    stats::write_calls(&args.out.join("calls.csv"), &reports)?;
    stats::write_samples(&args.out.join("samples.csv"), &samples)?;
    std::fs::write(args.out.join("summary.json"), serde_json::to_string_pretty(&summary.json())?).context("writing summary.json")?;
    if let Err(e) = plot::draw(&args.out.join("plot.png"), &samples, &reports, &args_label(&args)) {
        eprintln!("warning: no plot: {e:#}");
    }
    Ok(summary)
}

fn args_label(args: &Args) -> String {
    let audio = if args.wav.is_some() { "talking" } else { "silent" };
    let connections = match (args.transport, args.h2_connections) {
        (Transport::Stream, 0) => ", one connection per call".to_string(),
        (Transport::Stream, k) => format!(", {k} h2 connection{}", if k == 1 { "" } else { "s" }),
        _ => String::new(),
    };
    format!("{} calls, {:?}{connections}, {audio}", args.calls, args.transport).to_lowercase()
}

/// What one call saw of the agent's audio.
#[derive(Default)]
struct Outbound {
    /// The reply in progress: its first frame's arrival and the audio since.
    reply: Option<(Instant, f64)>,
    last_at: Option<Instant>,
    inter_ms: Vec<f64>,
    late_ms: Vec<f64>,
    drift_ms: Vec<f64>,
    frames: usize,
    replies: usize,
    /// When the caller last finished a turn and has not heard a reply since.
    turn_end: Option<Instant>,
    turn_ms: Vec<f64>,
}

/// A gap this long between frames starts a new reply.
const NEW_REPLY_GAP: Duration = Duration::from_millis(400);

impl Outbound {
    fn frame(&mut self, at: Instant, ms: f64) {
        self.frames += 1;
        let new_reply = self.last_at.is_none_or(|l| at.duration_since(l) > NEW_REPLY_GAP);
        if new_reply {
            self.end_reply();
            self.reply = Some((at, 0.0));
            self.replies += 1;
            if let Some(end) = self.turn_end.take() {
                self.turn_ms.push(at.duration_since(end).as_secs_f64() * 1000.0);
            }
        } else if let Some(last) = self.last_at {
            self.inter_ms.push(at.duration_since(last).as_secs_f64() * 1000.0);
        }
        if let Some((first, audio_ms)) = self.reply.as_mut() {
            let due = *first + Duration::from_secs_f64(*audio_ms / 1000.0);
            let late = at.saturating_duration_since(due).as_secs_f64() * 1000.0 - due.saturating_duration_since(at).as_secs_f64() * 1000.0;
            self.late_ms.push(late.max(0.0));
            *audio_ms += ms;
            if let Some(d) = self.drift_ms.last_mut().filter(|_| !new_reply) {
                *d = late;
            } else {
                self.drift_ms.push(late);
            }
        }
        self.last_at = Some(at);
    }

    /// The reply was cleared (barge-in): the next frame starts a new one.
    fn end_reply(&mut self) {
        self.reply = None;
    }
}

/// One call from connect to hang-up at `until`.
#[allow(clippy::too_many_arguments)]
async fn one_call(addr: &str, h2: &H2Pool, slot: usize, transport: Transport, script: &Script, chunk_ms: u64, until: Instant, live: &Live, id: String) -> CallReport {
    let started = Instant::now();
    let mut report = CallReport { id, transport: format!("{transport:?}").to_lowercase(), ..CallReport::default() };
    let mut out = Outbound::default();
    let result = match transport {
        Transport::Twilio => match Pipe::websocket(&format!("ws://{addr}/twilio")).await {
            Ok(pipe) => call(pipe, wire::Twilio::new(), script, chunk_ms, until, live, &mut out).await,
            Err(e) => Err(e),
        },
        Transport::Stream => match open_stream(addr, h2, slot).await {
            Ok(pipe) => call(pipe, wire::Realtime, script, chunk_ms, until, live, &mut out).await,
            Err(e) => Err(e),
        },
        _ => match Pipe::websocket(&format!("ws://{addr}/v1/realtime")).await {
            Ok(pipe) => call(pipe, wire::Realtime, script, chunk_ms, until, live, &mut out).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.fill(&out.inter_ms, &out.late_ms, &out.drift_ms, &out.turn_ms, out.frames, out.replies);
    report
}

/// `POST /v1/stream` on slot `slot`'s HTTP/2 connection.
async fn open_stream(addr: &str, h2: &H2Pool, slot: usize) -> Result<Pipe> {
    let conn = h2.connection(slot).await?;
    Pipe::stream(conn, addr).await
}

/// Streams the caller's audio every `chunk_ms` from a monotonic clock: the clip,
/// then `gap_ms` of silence, on a loop (silence only without a clip). Returns the
/// samples of the next chunk and whether it is the last of a turn.
struct Talker {
    script: Script,
    rate: u32,
    pos: usize,
    chunk: usize,
}

impl Talker {
    fn new(script: Script, rate: u32, chunk_ms: u64) -> Self {
        Self { script, rate, pos: 0, chunk: (rate as u64 * chunk_ms / 1000) as usize }
    }

    fn next(&mut self) -> (Vec<f32>, bool) {
        let clip = &self.script.clip;
        let cycle = clip.len() + (self.script.gap_ms as usize * self.rate as usize / 1000);
        let mut out = vec![0.0; self.chunk];
        let mut turn_end = false;
        if !clip.is_empty() {
            for s in out.iter_mut() {
                let p = self.pos % cycle;
                if p < clip.len() {
                    *s = clip[p];
                }
                if p + 1 == clip.len() {
                    turn_end = true;
                }
                self.pos += 1;
            }
        }
        (out, turn_end)
    }
}

/// The call loop every transport shares: opens the call, streams the caller's audio
/// every `chunk_ms` from a monotonic clock while recording the agent's frames, and
/// hangs up at `until`. An error (the server closed the call, an error event, a
/// failed send) ends it as failed.
async fn call(mut pipe: Pipe, mut dialect: impl Dialect, script: &Script, chunk_ms: u64, until: Instant, live: &Live, out: &mut Outbound) -> Result<()> {
    for msg in dialect.open() {
        pipe.send(msg).await.context("opening the call")?;
    }
    live.connected.fetch_add(1, Ordering::Relaxed);
    let _connected = Connected(live);
    let mut talker = Talker::new(script.clone(), dialect.rate(), chunk_ms);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval_at(t0.into(), Duration::from_millis(chunk_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = tokio::time::sleep_until(until.into());
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = tick.tick() => {
                let (samples, turn_end) = talker.next();
                let msg = dialect.audio(&samples, chunk_ms)?;
                pipe.send(msg).await.context("sending audio")?;
                if turn_end {
                    out.turn_end = Some(Instant::now());
                }
            }
            text = pipe.recv() => {
                let at = Instant::now();
                match dialect.decode(&text?)? {
                    Heard::Audio(ms) => out.frame(at, ms),
                    Heard::Cleared => out.end_reply(),
                    Heard::Answer(msg) => pipe.send(msg).await.context("answering")?,
                    Heard::Other => {}
                }
            }
        }
    }
    if let Some(stop) = dialect.stop() {
        let _ = pipe.send(stop).await;
    }
    pipe.close().await;
    Ok(())
}

/// Counts a call as connected while it lives.
struct Connected<'a>(&'a Live);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::percentile;

    #[test]
    fn a_reply_on_time_has_no_pacing_error_and_a_late_frame_does() {
        let mut o = Outbound::default();
        let t = Instant::now();
        for k in 0..10 {
            o.frame(t + Duration::from_millis(20 * k), 20.0);
        }
        assert!(o.late_ms.iter().all(|&l| l < 0.5), "{:?}", o.late_ms);
        o.frame(t + Duration::from_millis(230), 20.0);
        assert!((o.late_ms.last().copied().unwrap_or_default() - 30.0).abs() < 0.5);
        assert_eq!((o.replies, o.frames), (1, 11));
        assert!((percentile(&o.inter_ms, 50.0) - 20.0).abs() < 0.5);
    }

    #[test]
    fn the_talker_marks_the_end_of_each_turn() {
        let script = Script { clip: Arc::new(vec![0.5; 8_000]), gap_ms: 1000 };
        let mut t = Talker::new(script, 8_000, 20);
        let ends: Vec<usize> = (0..200).filter(|_| t.next().1).collect();
        assert_eq!(ends, vec![49, 149]);
    }
}
