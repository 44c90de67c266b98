//! The SIP bridge end to end: SIPp (Debian `sip-tester`) calls the real binary over
//! UDP on loopback; Parley's RTP is captured with tcpdump, decoded and, for the
//! spoken question, transcribed with the server's own speech-to-text.
//!
//! One server with the models for the file, with `[sip]` on, a short ring (for
//! CANCEL), a `max_call_seconds` the question call stays well under (the deadline
//! call waits for Parley's BYE) and a transfer target (so every call is offered
//! `transfer_call`). The test of refusals and shutdown starts its own small server
//! (the echo agent, one call at most) and stops it.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use parley_audio::format::AudioFormat;
use parley_tests::{RATE, Server, metric, resample, speech, start_server, transcribe_with_server, wait_metric, words};

/// `server.max_call_seconds` of the server under test.
const MAX_CALL_SECONDS: u64 = 90;
/// `sip.rtp_timeout_seconds` of the server under test.
const RTP_TIMEOUT: u64 = 20;
/// How long Parley rings before answering (the CANCEL scenario hangs up meanwhile).
const RING_MS: u64 = 800;
/// Longest the question call may take to be answered aloud.
const REPLY_TIMEOUT: Duration = Duration::from_secs(80);
/// `sip.transfer_target` of the server under test.
const TRANSFER_TARGET: &str = "sip:desk@pbx.example";
/// `sip.transfer_say` of the server under test (words the small speech-to-text
/// model hears reliably over G.711).
const TRANSFER_SAY: &str = "Please hold, I am putting you through to a person.";

struct SipServer {
    http: Server,
    sip: SocketAddr,
    dir: PathBuf,
}

/// A UDP port free now (with `port + 2` free too: SIPp also binds it for media).
fn free_udp_port() -> u16 {
    loop {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        let port = s.local_addr().expect("local addr").port();
        if port < 65000 && UdpSocket::bind(("127.0.0.1", port + 2)).is_ok() {
            return port;
        }
    }
}

fn server() -> &'static SipServer {
    static SERVER: OnceLock<SipServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("parley-e2e-sip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("sip.toml");
        std::fs::write(&config, format!("[server]\nmax_call_seconds = {MAX_CALL_SECONDS}\n\n[sip]\nring_ms = {RING_MS}\nrtp_timeout_seconds = {RTP_TIMEOUT}\ntransfer_target = \"{TRANSFER_TARGET}\"\ntransfer_say = \"{TRANSFER_SAY}\"\n")).expect("write config");
        let sip: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().expect("addr");
        let http = start_server(&["--config", &config.to_string_lossy(), "--sip-listen", &sip.to_string(), "--max-calls", "8"]).expect("start parley with [sip]");
        SipServer { http, sip, dir }
    })
}

/// A SIPp scenario from tests/sipp with its `@NAME@` placeholders filled in.
fn scenario(name: &str, fill: &[(&str, &str)]) -> Result<PathBuf> {
    scenario_in(&server().dir, name, fill)
}

/// [`scenario`], written into `dir`.
fn scenario_in(dir: &Path, name: &str, fill: &[(&str, &str)]) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp").join(format!("{name}.xml"));
    let mut text = std::fs::read_to_string(&src).with_context(|| format!("read {}", src.display()))?;
    for (k, v) in fill {
        text = text.replace(&format!("@{k}@"), v);
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("{name}-{n}.xml"));
    std::fs::write(&out, text)?;
    Ok(out)
}

/// One SIPp caller: its SIP and media ports and its Call-ID.
struct Caller {
    name: &'static str,
    sip_port: u16,
    media_port: u16,
    /// Makes the Call-ID unique to this run.
    run: String,
}

impl Caller {
    fn new(name: &'static str) -> Self {
        let run = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0));
        Self { name, sip_port: free_udp_port(), media_port: free_udp_port(), run }
    }

    fn call_id(&self) -> String {
        format!("{}-{}-1", self.name, self.run)
    }

    /// Runs the scenario for one call; Ok when SIPp says the call succeeded.
    async fn run(&self, scenario: &Path) -> Result<()> {
        let s = server();
        self.run_at(scenario, s.sip, &s.dir).await
    }

    /// SIPp's message log of the last run (`-trace_msg`).
    fn messages(&self, dir: &Path) -> String {
        let dir = dir.join(self.name);
        std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with("_messages.log")).map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect())
            .unwrap_or_default()
    }

    /// [`Caller::run`] against the SIP server at `sip`, SIPp's files in `dir`.
    async fn run_at(&self, scenario: &Path, sip: SocketAddr, dir: &Path) -> Result<()> {
        let args: Vec<String> = [
            "-sf",
            &scenario.to_string_lossy(),
            "-m",
            "1",
            "-i",
            "127.0.0.1",
            "-p",
            &self.sip_port.to_string(),
            "-mi",
            "127.0.0.1",
            "-mp",
            &self.media_port.to_string(),
            "-cid_str",
            &format!("{}-{}-%u", self.name, self.run),
            "-nostdin",
            "-timeout",
            "170s",
            "-timeout_error",
            "-trace_err",
            "-trace_msg",
            &sip.to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let dir = dir.join(self.name);
        std::fs::create_dir_all(&dir)?;
        let out = tokio::process::Command::new("sipp").args(&args).current_dir(&dir).stdin(Stdio::null()).output().await.context("run sipp (apt-get install sip-tester)")?;
        if !out.status.success() {
            let mut logs = String::new();
            for entry in std::fs::read_dir(&dir)?.flatten() {
                let p = entry.path();
                if p.to_string_lossy().ends_with("_errors.log") || p.to_string_lossy().ends_with("_messages.log") {
                    logs.push_str(&format!("--- {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default()));
                }
            }
            bail!("sipp {} failed ({}):\n{}\n{}", self.name, out.status, String::from_utf8_lossy(&out.stderr), logs);
        }
        Ok(())
    }

    /// Tells the waiting scenario (question.xml) to hang up: an INFO in its call.
    fn release(&self) -> Result<()> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        let me = sock.local_addr()?;
        let msg = format!(
            "INFO sip:sipp@127.0.0.1:{p} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-release-{p}\r\nFrom: <sip:test@{me}>;tag=test\r\nTo: <sip:sipp@127.0.0.1:{p}>\r\nCall-ID: {cid}\r\nCSeq: 1 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            p = self.sip_port,
            cid = self.call_id()
        );
        sock.send_to(msg.as_bytes(), ("127.0.0.1", self.sip_port))?;
        Ok(())
    }
}

/// A tcpdump capture of UDP to some ports on loopback.
struct Capture {
    child: std::process::Child,
    path: PathBuf,
}

impl Capture {
    fn start(name: &str, ports: &[u16]) -> Result<Self> {
        let path = server().dir.join(format!("{name}.pcap"));
        let filter = ports.iter().map(|p| format!("dst port {p}")).collect::<Vec<_>>().join(" or ");
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-n", "-w"])
            .arg(&path)
            .arg(format!("udp and ({filter})"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("run tcpdump (apt-get install tcpdump; it needs root or CAP_NET_RAW)")?;
        // It says "listening on lo" once capturing.
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).context("tcpdump did not start listening")?;
        Ok(Self { child, path })
    }

    /// The packets so far.
    fn packets(&self) -> Vec<Udp> {
        std::fs::read(&self.path).map(|b| parse_pcap(&b)).unwrap_or_default()
    }

    fn stop(mut self) -> Vec<Udp> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.packets()
    }
}

/// A captured UDP datagram.
#[derive(Debug, Clone)]
struct Udp {
    at: f64,
    dst_port: u16,
    payload: Vec<u8>,
}

/// Reads a classic pcap file (loopback as Ethernet, Linux cooked v1/v2 or BSD null).
fn parse_pcap(b: &[u8]) -> Vec<Udp> {
    let mut out = Vec::new();
    if b.len() < 24 {
        return out;
    }
    let le = b[0..4] == [0xd4, 0xc3, 0xb2, 0xa1] || b[0..4] == [0x4d, 0x3c, 0xb2, 0xa1];
    let nanos = b[0..4] == [0x4d, 0x3c, 0xb2, 0xa1] || b[0..4] == [0xa1, 0xb2, 0x3c, 0x4d];
    let u32_at = |i: usize| -> u32 {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let link = u32_at(20);
    let skip = match link {
        1 => 14,
        113 => 16,
        276 => 20,
        0 => 4,
        _ => return out,
    };
    let mut i = 24;
    while i + 16 <= b.len() {
        let (sec, frac, len) = (u32_at(i), u32_at(i + 4), u32_at(i + 8) as usize);
        let data_start = i + 16;
        if data_start + len > b.len() {
            break; // a record still being written
        }
        let frame = &b[data_start..data_start + len];
        i = data_start + len;
        let Some(ip) = frame.get(skip..) else { continue };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        let at = f64::from(sec) + f64::from(frac) / if nanos { 1e9 } else { 1e6 };
        out.push(Udp { at, dst_port: u16::from_be_bytes([udp[2], udp[3]]), payload: udp[8..].to_vec() });
    }
    out
}

/// An RTP packet from Parley, as captured.
#[derive(Debug, Clone)]
struct Rtp {
    at: f64,
    pt: u8,
    marker: bool,
    seq: u16,
    ts: u32,
    ssrc: u32,
    payload: Vec<u8>,
}

/// Parley's RTP among the captured datagrams: RTP version 2 to SIPp's media port
/// (the capture only holds what goes there).
fn parley_rtp(packets: &[Udp], to: u16) -> Vec<Rtp> {
    packets
        .iter()
        .filter(|u| u.dst_port == to && u.payload.len() >= 12 && u.payload[0] >> 6 == 2)
        .map(|u| {
            let p = &u.payload;
            let cc = usize::from(p[0] & 0x0f);
            Rtp {
                at: u.at,
                pt: p[1] & 0x7f,
                marker: p[1] & 0x80 != 0,
                seq: u16::from_be_bytes([p[2], p[3]]),
                ts: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                ssrc: u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
                payload: p[12 + 4 * cc..].to_vec(),
            }
        })
        .collect()
}

/// Checks one SSRC, no sequence gaps and the timestamp step; returns the p99 of
/// |gap − ptime| between consecutive packets in ms (gaps from hold excluded when
/// `allow_pauses`).
fn check_stream(rtp: &[Rtp], pt: u8, ptime_ms: u32, allow_pauses: bool) -> Result<f64> {
    ensure!(rtp.len() > 20, "only {} RTP packets from Parley", rtp.len());
    let ssrc = rtp[0].ssrc;
    ensure!(rtp.iter().all(|r| r.ssrc == ssrc), "more than one SSRC: {:?}", rtp.iter().map(|r| r.ssrc).collect::<std::collections::BTreeSet<_>>());
    ensure!(rtp.iter().all(|r| r.pt == pt), "payload types {:?}, expected {pt}", rtp.iter().map(|r| r.pt).collect::<std::collections::BTreeSet<_>>());
    let step = ptime_ms * 8;
    let mut jitter = Vec::new();
    let mut skips = 0usize;
    for w in rtp.windows(2) {
        ensure!(w[1].seq == w[0].seq.wrapping_add(1), "sequence gap: {} then {}", w[0].seq, w[1].seq);
        ensure!(w[1].payload.len() == step as usize, "a packet of {} bytes, expected {step}", w[1].payload.len());
        let gap = w[1].at - w[0].at;
        let ts_gap = w[1].ts.wrapping_sub(w[0].ts);
        if allow_pauses && gap > 0.5 {
            // Held: nothing sent, but the timestamp kept time.
            let expected = (gap * 8000.0) as i64;
            ensure!((i64::from(ts_gap) - expected).abs() < 8000 / 5, "after a pause of {gap:.2} s the timestamp moved {ts_gap}");
            continue;
        }
        if ts_gap > step && ts_gap % step == 0 {
            // The sender thread stalled past a tick (two cores shared with the
            // call's own speech recognition and model): the tick went out as
            // timestamp, not as a late burst. Rare, and it must say how much time passed.
            let ticks = ts_gap / step;
            ensure!((gap * 1000.0 - f64::from(ticks * ptime_ms)).abs() < f64::from(ptime_ms), "a skip of {ticks} ticks after {gap:.3} s");
            skips += 1;
            continue;
        }
        ensure!(ts_gap == step, "timestamp step {ts_gap}, expected {step}");
        jitter.push((gap * 1000.0 - f64::from(ptime_ms)).abs());
    }
    ensure!(skips <= 1 + rtp.len() / 200, "{skips} skipped ticks in {} packets: not one steady stream", rtp.len());
    jitter.sort_by(|a, b| a.total_cmp(b));
    Ok(jitter[(jitter.len() * 99 / 100).min(jitter.len() - 1)])
}

fn silence_of(pt: u8) -> u8 {
    if pt == 8 { 0xD5 } else { 0xFF }
}

/// Tests on the shared server run one at a time: the calls whose packet timing is
/// measured do not share the machine's two cores with another call's speech
/// recognition, and the counters a test reads (calls, responses, transfers) move
/// only for its own calls (`make test` runs two tests of a file at once).
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

async fn calls_drain(s: &SipServer) {
    wait_metric(&s.http.addr, "parley_calls_active", 0.0, Duration::from_secs(MAX_CALL_SECONDS + 30)).await.expect("every call ended: the active-calls gauge is back to 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_presses_a_key_asks_a_question_and_hears_the_answer() {
    let _timing = one_at_a_time().await;
    let s = server();
    let question = speech("What is the capital of France?").expect("speech");
    let ulaw = AudioFormat::Pcmu.encode(&resample(&question, RATE, 8000).expect("resample")).expect("μ-law");
    let question_ms = (ulaw.len() / 8).to_string();
    let qfile = s.dir.join("question.ulaw");
    std::fs::write(&qfile, ulaw).expect("write the question");
    let silence = s.dir.join("question-silence.ulaw");
    std::fs::write(&silence, vec![0xFFu8; 8000]).expect("write silence");
    let caller = Caller::new("question");
    let fill = [("QUESTION", qfile.to_string_lossy().into_owned()), ("QUESTION_MS", question_ms), ("SILENCE", silence.to_string_lossy().into_owned()), ("DTMF_PCAP", "/usr/share/sip-tester/dtmf_2833_1.pcap".into())];
    let fill: Vec<(&str, &str)> = fill.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sc = scenario("question", &fill).expect("scenario");
    let capture = Capture::start("question", &[caller.media_port]).expect("capture");
    let keys_before = metric(&s.http.addr, "parley_sip_dtmf_keys_total").await.expect("metric");
    let done_before = metric(&s.http.addr, "parley_responses_total{status=\"completed\"}").await.unwrap_or(0.0);

    let run = caller.run(&sc);
    tokio::pin!(run);
    // Hang up once the reply has been spoken: a completed response and then a second
    // of silence on the wire.
    let started = Instant::now();
    let released = loop {
        tokio::select! {
            r = &mut run => panic!("the scenario ended before the reply: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let done = metric(&s.http.addr, "parley_responses_total{status=\"completed\"}").await.unwrap_or(0.0);
        if done > done_before {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            caller.release().expect("release the caller");
            break true;
        }
        if started.elapsed() > REPLY_TIMEOUT {
            caller.release().expect("release the caller");
            break false;
        }
    };
    run.await.expect("SIPp's call succeeded");
    let packets = capture.stop();
    assert!(released, "no completed reply within {} s", REPLY_TIMEOUT.as_secs());

    let rtp = parley_rtp(&packets, caller.media_port);
    // The reply: from the first talk spurt to the last non-silent packet.
    let first = rtp.iter().position(|r| r.marker).expect("a talk spurt (marker bit)");
    let last = rtp.iter().rposition(|r| r.payload.iter().any(|&b| b != silence_of(0))).expect("speech");
    let audio: Vec<u8> = rtp[first..=last].iter().flat_map(|r| r.payload.iter().copied()).collect();
    let pcm = AudioFormat::Pcmu.decode(&audio).expect("μ-law");
    let heard = transcribe_with_server(&s.http, &resample(&pcm, 8000, RATE).expect("resample")).await.expect("transcribe");
    assert!(words(&heard).contains(&"paris".to_string()), "the reply was heard as {heard:?}");
    let keys = metric(&s.http.addr, "parley_sip_dtmf_keys_total").await.expect("metric");
    assert_eq!(keys - keys_before, 1.0, "the key press, once (its end packet is sent three times)");
    let p99 = check_stream(&rtp, 0, 20, false).expect("one steady RTP stream");
    eprintln!("question call: {} packets from Parley, p99 |gap - 20 ms| = {p99:.2} ms", rtp.len());
    assert!(p99 < 5.0, "p99 jitter {p99:.2} ms");
    calls_drain(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_hangs_up_at_max_call_seconds_and_after_the_rtp_timeout() {
    let _serial = one_at_a_time().await;
    let s = server();
    // One caller streams silence (so only the call's deadline ends it), one sends no RTP.
    let silence = s.dir.join("silence.ulaw");
    std::fs::write(&silence, vec![0xFFu8; 8000]).expect("write silence");
    let streaming = format!("<nop><action><exec rtp_stream=\"{},-1,0\"/></action></nop>", silence.to_string_lossy());
    let deadline = Caller::new("deadline");
    let quiet = Caller::new("quiet");
    let (s1, s2) = (scenario("deadline", &[("MEDIA", &streaming)]).expect("scenario"), scenario("deadline", &[("MEDIA", "")]).expect("scenario"));
    let t = Instant::now();
    let (a, b) = tokio::join!(
        async {
            deadline.run(&s1).await?;
            anyhow::Ok(t.elapsed().as_secs_f64())
        },
        async {
            quiet.run(&s2).await?;
            anyhow::Ok(t.elapsed().as_secs_f64())
        }
    );
    let took = a.expect("Parley sent BYE at max_call_seconds and SIPp's call succeeded");
    assert!((MAX_CALL_SECONDS as f64 - 1.0..MAX_CALL_SECONDS as f64 + 10.0).contains(&took), "the streaming call lasted {took:.1} s");
    let took = b.expect("Parley sent BYE after the RTP timeout and SIPp's call succeeded");
    assert!((RTP_TIMEOUT as f64 - 1.0..RTP_TIMEOUT as f64 + 5.0).contains(&took), "the call without RTP lasted {took:.1} s");
    calls_drain(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_cancel_no_common_codec_delayed_offer_pcma_hold_and_codec_change() {
    let _serial = one_at_a_time().await;
    let s = server();
    // OPTIONS, 488 and CANCEL: signalling only.
    for name in ["options", "no_codec", "cancel"] {
        let caller = Caller::new(name);
        caller.run(&scenario(name, &[]).expect("scenario")).await.unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }

    // The three media calls at once, each captured (the lock taken above keeps them
    // apart from the question call, whose packet timing is measured).
    let no_sdp = Caller::new("no_sdp");
    let pcma = Caller::new("pcma");
    let hold = Caller::new("hold");
    let change = Caller::new("codec_change");
    let capture = Capture::start("media", &[no_sdp.media_port, pcma.media_port, hold.media_port, change.media_port]).expect("capture");
    let (s1, s2, s3) = (scenario("no_sdp", &[]).expect("scenario"), scenario("pcma", &[("PCMA_PCAP", "/usr/share/sip-tester/g711a.pcap")]).expect("scenario"), scenario("hold", &[]).expect("scenario"));
    let s4 = scenario("codec_change", &[]).expect("scenario");
    let (a, b, c, d) = tokio::join!(no_sdp.run(&s1), pcma.run(&s2), hold.run(&s3), change.run(&s4));
    let packets = capture.stop();
    a.expect("INVITE without SDP");
    b.expect("PCMA at 30 ms");
    c.expect("hold and resume");
    d.expect("re-INVITE from PCMU to PCMA answered PCMA");

    // Delayed offer: the answer in the ACK chose PCMA.
    let p99 = check_stream(&parley_rtp(&packets, no_sdp.media_port), 8, 20, false).expect("RTP after a delayed offer");
    assert!(p99 < 5.0, "no_sdp p99 jitter {p99:.2} ms");
    // PCMA with ptime 30: 240-byte packets every 30 ms.
    let p99 = check_stream(&parley_rtp(&packets, pcma.media_port), 8, 30, false).expect("RTP at ptime 30");
    assert!(p99 < 5.0, "pcma p99 jitter {p99:.2} ms");
    // Hold: nothing sent while held (sendonly then inactive, 3 s), the same stream after.
    let held = parley_rtp(&packets, hold.media_port);
    check_stream(&held, 0, 20, true).expect("one stream across hold");
    let longest = held.windows(2).map(|w| w[1].at - w[0].at).fold(0.0, f64::max);
    assert!((2.5..4.5).contains(&longest), "the longest pause in Parley's RTP was {longest:.2} s; the call was held for 3 s");
    // Codec change: PCMU, then PCMA in the same stream (one SSRC, no sequence or
    // timestamp jump), each with its own silence byte.
    let changed = parley_rtp(&packets, change.media_port);
    let at = changed.iter().position(|r| r.pt == 8).expect("PCMA packets after the re-INVITE");
    let (before, after) = changed.split_at(at);
    check_stream(before, 0, 20, false).expect("PCMU before the re-INVITE");
    check_stream(after, 8, 20, false).expect("PCMA after it");
    let (last, first) = (&before[before.len() - 1], &after[0]);
    assert_eq!((first.ssrc, first.seq, first.ts), (last.ssrc, last.seq.wrapping_add(1), last.ts.wrapping_add(160)), "the stream goes on across the codec change");
    assert!(before.iter().all(|r| r.payload.iter().all(|&b| b == 0xFF)) && after.iter().all(|r| r.payload.iter().all(|&b| b == 0xD5)), "silence in each codec");
    let mut by_port: HashMap<u16, usize> = HashMap::new();
    for u in &packets {
        *by_port.entry(u.dst_port).or_default() += 1;
    }
    eprintln!("captured per port: {by_port:?}");
    calls_drain(s).await;
}

/// Writes `text` as spoken μ-law (8 kHz) into the server's dir; returns the file and
/// its length in ms.
fn spoken_ulaw(dir: &Path, name: &str, text: &str) -> Result<(PathBuf, u64)> {
    let pcm = speech(text)?;
    let ulaw = AudioFormat::Pcmu.encode(&resample(&pcm, RATE, 8000)?)?;
    let path = dir.join(format!("{name}.ulaw"));
    std::fs::write(&path, &ulaw)?;
    Ok((path, ulaw.len() as u64 / 8))
}

/// One caller of transfer.xml: asks for a person; SIPp checks the REFER (Refer-To the
/// target, a summary header), answers 202 and a NOTIFY with `sipfrag`, then does
/// `after`. Returns the caller (for its SIPp log), Parley's RTP to it, and how the
/// `outcome` count of transfers moved.
async fn transfer_call(name: &'static str, asks: &str, sipfrag: &str, after: &str, outcome: &str) -> (Caller, Vec<Rtp>, f64) {
    let s = server();
    let (question, question_ms) = spoken_ulaw(&s.dir, &format!("{name}-question"), asks).expect("speech");
    let silence = s.dir.join("transfer-silence.ulaw");
    std::fs::write(&silence, vec![0xFFu8; 8000]).expect("write silence");
    let fill = [
        ("QUESTION", question.to_string_lossy().into_owned()),
        ("QUESTION_MS", question_ms.to_string()),
        ("SILENCE", silence.to_string_lossy().into_owned()),
        ("TARGET", TRANSFER_TARGET.to_string()),
        ("SIPFRAG", sipfrag.to_string()),
        ("AFTER", after.to_string()),
    ];
    let fill: Vec<(&str, &str)> = fill.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sc = scenario("transfer", &fill).expect("scenario");
    let caller = Caller::new(name);
    let capture = Capture::start(name, &[caller.media_port]).expect("capture");
    let count = format!("parley_sip_transfers_total{{outcome=\"{outcome}\"}}");
    let before = metric(&s.http.addr, &count).await.expect("metric");
    let started = Instant::now();
    let run = caller.run(&sc).await;
    let packets = capture.stop();
    run.unwrap_or_else(|e| panic!("{name}: {e:#}"));
    eprintln!("{name} call: {:.1} s", started.elapsed().as_secs_f64());
    let moved = metric(&s.http.addr, &count).await.expect("metric") - before;
    let rtp = parley_rtp(&packets, caller.media_port);
    (caller, rtp, moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_who_asks_for_a_person_is_told_and_transferred_by_refer() {
    let _timing = one_at_a_time().await;
    let s = server();
    // After NOTIFY 200 the scenario succeeds only when Parley hangs up (BYE).
    let after = "<recv request=\"BYE\" timeout=\"20000\"/><send><![CDATA[\n      SIP/2.0 200 OK\n      [last_Via:]\n      [last_From:]\n      [last_To:]\n      [last_Call-ID:]\n      [last_CSeq:]\n      Content-Length: 0\n    ]]></send>";
    let (caller, rtp, completed) = transfer_call("transfer", "Can I talk to a real person, please?", "200 OK", after, "completed").await;
    assert_eq!(completed, 1.0, "one transfer completed");

    // The summary: the caller's words, on one line.
    let log = caller.messages(&s.dir);
    let summary = log.lines().find_map(|l| l.strip_prefix("X-Parley-Summary:")).unwrap_or_else(|| panic!("no summary header in SIPp's log:\n{log}"));
    assert!(words(summary).iter().any(|w| w == "person"), "summary {summary:?}");
    assert!(log.lines().any(|l| l.starts_with("X-Parley-Call-Id: call_")), "no call id header");

    // The caller heard the transfer line before the REFER (the stream's timing is
    // the question call's to check).
    assert!(rtp.len() > 50 && rtp.iter().all(|r| r.ssrc == rtp[0].ssrc && r.pt == 0), "one PCMU stream from Parley");
    let speech: Vec<u8> = rtp.iter().flat_map(|r| r.payload.iter().copied()).collect();
    let pcm = AudioFormat::Pcmu.decode(&speech).expect("μ-law");
    let heard = transcribe_with_server(&s.http, &resample(&pcm, 8000, RATE).expect("resample")).await.expect("transcribe");
    eprintln!("transfer: {} packets from Parley, heard {heard:?}, summary {summary:?}", rtp.len());
    let heard = words(&heard);
    // At least its start: on a loaded machine the capture has lost the line's end.
    assert!(["hold", "person", "through"].iter().any(|w| heard.contains(&w.to_string())), "Parley was heard saying {heard:?}, not {TRANSFER_SAY:?}");
    calls_drain(s).await;
}

/// A server process of this file's own; killed if the test fails before it exits.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `parley serve` with `config` (its own process: the test stops it) and
/// returns it with its HTTP and SIP addresses.
fn start_own(config: &Path) -> Result<(Proc, String, SocketAddr)> {
    use std::io::BufRead;
    let mut child = Command::new(parley_tests::parley_bin()).args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(config).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("start parley")?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut http, mut sip) = (None, None);
    while http.is_none() || sip.is_none() {
        let Some(Ok(line)) = lines.next() else { bail!("parley exited before listening") };
        if let Some(a) = line.strip_prefix("parley listening on http://") {
            http = Some(a.trim().to_string());
        }
        if let Some(a) = line.strip_prefix("parley sip listening on udp://") {
            sip = Some(a.trim().parse()?);
        }
    }
    // Keep reading stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((proc, http.context("http")?, sip.context("sip")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_at_max_calls_503_while_draining_and_bye_at_shutdown() {
    // Its own server: the echo agent (no models), one call at most, a short drain.
    const DRAIN_S: u64 = 2;
    const RETRY_AFTER_S: u64 = 7;
    let dir = std::env::temp_dir().join(format!("parley-e2e-sip-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("sip.toml");
    let sip_port = free_udp_port();
    std::fs::write(
        &config,
        format!("[agent]\nmode = \"echo\"\n\n[server]\nmax_calls = 1\n\n[server.drain]\ntimeout_s = {DRAIN_S}\ngoodbye = \"Goodbye.\"\n\n[server.limits]\nretry_after_s = {RETRY_AFTER_S}\n\n[sip]\nlisten = \"127.0.0.1:{sip_port}\"\n"),
    )
    .expect("write config");
    let (mut proc, http, sip) = start_own(&config).expect("start parley (echo agent, [sip])");
    let silence = dir.join("silence.ulaw");
    std::fs::write(&silence, vec![0xFFu8; 8000]).expect("write silence");
    let streaming = format!("<nop><action><exec rtp_stream=\"{},-1,0\"/></action></nop>", silence.to_string_lossy());
    let holder = Caller::new("holder");
    let held = scenario_in(&dir, "deadline", &[("MEDIA", &streaming)]).expect("scenario");
    let refused = |status: &str, check: &str, reference: &str| scenario_in(&dir, "refused", &[("STATUS", status), ("CHECK", check), ("REFERENCE", reference)]);
    let busy = refused("486", "", "").expect("scenario");
    let retry = format!("<action><ereg regexp=\"^ *{RETRY_AFTER_S}\" search_in=\"hdr\" header=\"Retry-After:\" check_it=\"true\" assign_to=\"ra\"/></action>");
    let draining = refused("503", &retry, "<Reference variables=\"ra\"/>").expect("scenario");

    let (held_call, checks) = tokio::join!(
        async {
            let t = Instant::now();
            holder.run_at(&held, sip, &dir).await.map(|()| t)
        },
        async {
            wait_metric(&http, "parley_calls_active", 1.0, Duration::from_secs(20)).await.context("the first call is up")?;
            // The one call the server takes is up: the next INVITE is busy.
            Caller::new("busy").run_at(&busy, sip, &dir).await.context("486 at server.max_calls")?;
            // SIGTERM: the server drains; new calls get 503 with Retry-After.
            let signalled = Instant::now();
            let pid = proc.0.id().to_string();
            ensure!(Command::new("kill").args(["-TERM", &pid]).status()?.success(), "kill -TERM");
            while !matches!(parley_tests::http_get(&http, "/readyz").await, Ok((503, _))) {
                ensure!(signalled.elapsed() < Duration::from_secs(5), "/readyz not 503 after SIGTERM");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Caller::new("draining").run_at(&draining, sip, &dir).await.context("503 with Retry-After while draining")?;
            anyhow::Ok(signalled)
        }
    );
    let signalled = checks.expect("refusals");
    held_call.expect("the call in progress got Parley's BYE at shutdown");
    let took = signalled.elapsed().as_secs_f64();
    // Drain time, then the goodbye and the BYE.
    assert!((DRAIN_S as f64 - 0.5..DRAIN_S as f64 + 12.0).contains(&took), "BYE {took:.1} s after SIGTERM");
    let status = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.0.try_wait()? {
                return anyhow::Ok(status);
            }
            ensure!(Instant::now() < until, "parley did not exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("join")
    .expect("exit");
    assert!(status.success(), "parley exited with {status}");
}

/// A 16-bit mono WAV file's samples (the `data` chunk, whatever chunks come first).
fn wav_samples(bytes: &[u8]) -> Result<Vec<f32>> {
    ensure!(bytes.len() > 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE", "not a WAV file");
    let mut i = 12;
    while i + 8 <= bytes.len() {
        let id = &bytes[i..i + 4];
        let len = u32::from_le_bytes([bytes[i + 4], bytes[i + 5], bytes[i + 6], bytes[i + 7]]) as usize;
        let body = &bytes[i + 8..(i + 8 + len).min(bytes.len())];
        if id == b"data" {
            return Ok(body.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0).collect());
        }
        i += 8 + len + (len & 1);
    }
    bail!("no data chunk")
}

/// `samples` (8 kHz mono) as a 16-bit WAV file.
fn wav_8k(samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes()).collect();
    let mut out = Vec::with_capacity(44 + data.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&16000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

/// A second real SIP client: baresip (Debian), headless. Its `aufile` module plays a
/// WAV (the question, then silence) as the microphone and `sndfile` records what it
/// hears; it calls Parley, and once the reply has been spoken the test stops it
/// (SIGTERM: it hangs up with BYE). The recording is transcribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_calls_asks_a_question_and_records_the_answer() {
    let _timing = one_at_a_time().await;
    let s = server();
    let dir = s.dir.join("baresip");
    let rec = dir.join("rec");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&rec).expect("baresip dir");
    let question = resample(&speech("What is the capital of France?").expect("speech"), RATE, 8000).expect("resample");
    let mut mic = vec![0.0f32; 4000];
    mic.extend(&question);
    // Silence after it, longer than any reply takes: at the file's end baresip hangs up.
    mic.resize(mic.len() + 8000 * 120, 0.0);
    let wav = dir.join("question.wav");
    std::fs::write(&wav, wav_8k(&mic)).expect("write the question");
    let port = free_udp_port();
    let config = format!(
        "poll_method epoll\nsip_listen 127.0.0.1:{port}\naudio_player alsa,null\naudio_alert alsa,null\naudio_source aufile,{wav}\naudio_level no\nmodule_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\nmodule alsa.so\nmodule sndfile.so\nmodule_app account.so\nmodule_app menu.so\nsnd_path {rec}\n",
        wav = wav.display(),
        rec = rec.display()
    );
    std::fs::write(dir.join("config"), config).expect("config");
    std::fs::write(dir.join("accounts"), format!("<sip:caller@127.0.0.1:{port}>;regint=0;audio_codecs=PCMU\n")).expect("accounts");
    std::fs::write(dir.join("contacts"), "").expect("contacts");
    let log = std::fs::File::create(dir.join("baresip.log")).expect("log");
    let done_before = metric(&s.http.addr, "parley_responses_total{status=\"completed\"}").await.unwrap_or(0.0);
    let calls_before = metric(&s.http.addr, "parley_calls_total").await.expect("metric");
    let mut baresip = Command::new("baresip")
        .arg("-f")
        .arg(&dir)
        .args(["-e", &format!("/dial sip:parley@{}", s.sip), "-t", "150"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("run baresip (apt-get install baresip)");
    // Hang up a second and a half after the reply was spoken.
    let started = Instant::now();
    let replied = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(Some(status)) = baresip.try_wait() {
            panic!("baresip ended ({status}) before the reply:\n{}", std::fs::read_to_string(dir.join("baresip.log")).unwrap_or_default());
        }
        let done = metric(&s.http.addr, "parley_responses_total{status=\"completed\"}").await.unwrap_or(0.0);
        if done > done_before {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            break true;
        }
        if started.elapsed() > REPLY_TIMEOUT {
            break false;
        }
    };
    let pid = baresip.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exited = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        matches!(baresip.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = baresip.kill();
        let _ = baresip.wait();
    }
    let log = std::fs::read_to_string(dir.join("baresip.log")).unwrap_or_default();
    assert!(replied, "no completed reply within {} s; baresip's log:\n{log}", REPLY_TIMEOUT.as_secs());
    assert!(exited, "baresip did not stop on SIGTERM");
    assert_eq!(metric(&s.http.addr, "parley_calls_total").await.expect("metric") - calls_before, 1.0, "baresip's call reached Parley");
    // The caller's hang-up (BYE on SIGTERM) ended the call on Parley's side.
    calls_drain(s).await;

    let heard_file = std::fs::read_dir(&rec).expect("recordings").flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with("-dec.wav")).unwrap_or_else(|| panic!("baresip recorded nothing; its log:\n{log}"));
    let heard = wav_samples(&std::fs::read(&heard_file).expect("read the recording")).expect("the recording");
    assert!(heard.iter().any(|s| s.abs() > 0.05), "the recording is silent");
    let text = transcribe_with_server(&s.http, &resample(&heard, 8000, RATE).expect("resample")).await.expect("transcribe");
    eprintln!("baresip heard {text:?} ({:.1} s recorded)", heard.len() as f64 / 8000.0);
    assert!(words(&text).contains(&"paris".to_string()), "baresip heard {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_the_target_does_not_answer_is_told_to_the_caller_and_the_call_goes_on() {
    let _timing = one_at_a_time().await;
    let s = server();
    // After NOTIFY 480 the caller listens (a BYE from Parley now fails the scenario),
    // then hangs up itself.
    let after = "<pause milliseconds=\"9000\"/><send retrans=\"500\"><![CDATA[\n      BYE [next_url] SIP/2.0\n      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n      From: \"sipp\" <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\n      To:[$to]\n      Call-ID: [call_id]\n      CSeq: 3 BYE\n      Contact: <sip:sipp@[local_ip]:[local_port]>\n      Max-Forwards: 70\n      Content-Length: 0\n    ]]></send><recv response=\"200\" crlf=\"true\"/>";
    let (_caller, rtp, failed) = transfer_call("transfer_failed", "I want to speak to a human.", "480 Temporarily Unavailable", after, "failed").await;
    assert_eq!(failed, 1.0, "one transfer failed");
    assert!(rtp.len() > 50 && rtp.iter().all(|r| r.ssrc == rtp[0].ssrc && r.pt == 0), "one PCMU stream from Parley");
    // What the caller heard after the transfer line: that nobody could be reached.
    let speech: Vec<u8> = rtp.iter().flat_map(|r| r.payload.iter().copied()).collect();
    let pcm = AudioFormat::Pcmu.decode(&speech).expect("μ-law");
    let heard = transcribe_with_server(&s.http, &resample(&pcm, 8000, RATE).expect("resample")).await.expect("transcribe");
    eprintln!("transfer_failed: heard {heard:?}");
    let heard = words(&heard);
    assert!(["sorry", "reach", "anyone", "helping"].iter().filter(|w| heard.contains(&w.to_string())).count() >= 2, "the caller heard {heard:?}");
    calls_drain(s).await;
}
