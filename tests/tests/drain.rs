//! A graceful stop end to end (issue 13, item 4): the real binary (echo agent)
//! gets SIGTERM with a call open. It refuses new calls (503 with `Retry-After`,
//! `/readyz` 503) while the call goes on; when `server.drain.timeout_s` is up the
//! call hears the goodbye (a response whose transcript is the configured sentence,
//! through the call's voice and pacing), the socket closes with 1001, and the
//! process exits 0. This file starts its own server: the test ends it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use parley_tests::{http_get, parley_bin};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const GOODBYE: &str = "We are closing for maintenance now. Please call again soon. Goodbye.";
/// `server.drain.timeout_s`.
const DRAIN_S: u64 = 2;

/// The server process; killed if the test fails before it exits.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `parley serve` (echo agent, this file's config) and returns it with its
/// address once it is ready.
fn start() -> Result<(Proc, String)> {
    let dir = std::env::temp_dir().join(format!("parley-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("parley.toml");
    std::fs::write(&config, format!("[agent]\nmode = \"echo\"\n[server.drain]\ntimeout_s = {DRAIN_S}\ngoodbye = \"{GOODBYE}\"\n"))?;
    let mut child = Command::new(parley_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start parley")?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.strip_prefix("parley listening on http://") {
                    break a.trim().to_string();
                }
            }
            _ => bail!("parley exited before listening"),
        }
    };
    // Keep reading stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((proc, addr))
}

/// Waits for the child to exit, at most `within`.
fn wait_exit(proc: &mut Proc, within: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proc.0.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("parley did not exit within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_calls_then_says_goodbye_closes_and_exits_0() -> Result<()> {
    let (mut proc, addr) = tokio::task::spawn_blocking(start).await??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(&addr, "/readyz").await, Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("not ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/realtime")).await.context("connect")?;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?.context("no event")??;
    assert!(first.to_text()?.contains("session.created"), "{first:?}");

    let signalled = Instant::now();
    let pid = proc.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status()?.success());

    // While the call goes on, new calls are refused with when to retry, and the
    // server reports it is not ready (a load balancer stops sending calls).
    let mut refused = None;
    while refused.is_none() && signalled.elapsed() < Duration::from_secs(DRAIN_S) {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/realtime")).await {
            Err(WsError::Http(res)) if res.status() == 503 => refused = Some(res),
            Err(e) => bail!("a new call during the drain failed otherwise: {e}"),
            // The signal may not have arrived yet.
            Ok((mut early, _)) => {
                early.close(None).await.ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let refused = refused.context("no call was refused while draining")?;
    let retry = refused.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "{refused:?}");
    let body = refused.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    assert!(body.contains("shutting down"), "{body}");
    let (ready, body) = http_get(&addr, "/readyz").await?;
    assert_eq!((ready, body.trim()), (503, "draining"));

    // The open call: the goodbye as a response, then a close with 1001.
    let mut events: Vec<Value> = Vec::new();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("the call was not ended")? {
            Some(Ok(Message::Text(t))) => events.push(serde_json::from_str(t.as_str())?),
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("the connection failed instead of closing: {e}; events {events:?}"),
            None => bail!("the connection ended without a close frame; events {events:?}"),
        }
    };
    let ended_after = signalled.elapsed();
    assert!(ended_after >= Duration::from_secs(DRAIN_S), "the call was ended before the drain time: {ended_after:?}");
    let done = events.iter().find(|e| e["type"] == "response.done").context("no response.done before the close")?;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let transcript: String = events.iter().filter(|e| e["type"] == "response.output_audio_transcript.delta").filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(transcript.split_whitespace().collect::<Vec<_>>().join(" "), GOODBYE, "the goodbye is spoken through the call's voice");
    assert!(events.iter().any(|e| e["type"] == "response.output_audio.delta"), "the goodbye is audio");
    let frame = close.context("a close frame without a code")?;
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");

    let status = tokio::task::spawn_blocking(move || wait_exit(&mut proc, Duration::from_secs(20))).await??;
    assert_eq!(status.code(), Some(0), "{status:?}");
    Ok(())
}
