//! Per-key limits and authentication end to end (issue 13, item 4): the real binary
//! (echo agent) with keys from the config (plain and as a SHA-256 digest) and from a
//! keys file, `[server.limits]` set low. A key over its call start rate gets 429 with
//! `Retry-After`; a key at its concurrent-call cap gets 503 with `Retry-After`; an
//! address at its connection cap gets 503 on its next connection. The limits share
//! one server, so the checks run in order in one test (they would count each
//! other's calls and connections if they ran side by side).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parley_tests::{Server, metric, start_server_with_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const RATE_KEY: &str = "sk-e2e-rate";
const CAP_KEY: &str = "sk-e2e-cap-from-file";
const HASHED_KEY: &str = "sk-e2e-given-as-digest";
/// `server.limits.retry_after_s`: what a capacity refusal says.
const RETRY_S: u64 = 7;
/// `server.limits.connections_per_ip`.
const CONNECTIONS: usize = 12;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A refused upgrade: status, `Retry-After`, body.
#[derive(Debug)]
struct Refused {
    status: u16,
    retry_after: Option<u64>,
    body: String,
}

/// Opens `/v1/realtime` with `key` as the Bearer token.
async fn open(s: &Server, key: &str) -> Result<std::result::Result<Ws, Refused>> {
    let mut req = s.realtime_url().into_client_request()?;
    req.headers_mut().insert("Authorization", HeaderValue::from_str(&format!("Bearer {key}"))?);
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Ok(ws)),
        Err(WsError::Http(res)) => {
            let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            let body = res.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Ok(Err(Refused { status: res.status().as_u16(), retry_after, body }))
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens a call with `key`, retrying while the key's previous call still holds its
/// one place (a closed call frees it a moment later; a capacity refusal spends no
/// rate).
async fn open_when_free(s: &Server, key: &str) -> Result<std::result::Result<Ws, Refused>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open(s, key).await? {
            Err(r) if r.status == 503 && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => return Ok(other),
        }
    }
}

async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
}

/// One keep-alive HTTP/1.1 request on an open connection: the status and the
/// `Retry-After` header.
async fn get_on(conn: &mut tokio::net::TcpStream, addr: &str) -> Result<(u16, Option<String>)> {
    conn.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Both answers are small and carry a Content-Length; read until the body is in.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await.context("no answer")??;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))).unwrap_or(0);
            if body.len() >= len {
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status")?;
                let retry = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()));
                return Ok((status, retry));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rates_key_caps_and_address_caps_are_refused_with_retry_after() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("parley-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys_file = dir.join("keys");
    std::fs::write(&keys_file, format!("# keys for the limits test\n{CAP_KEY}\n"))?;
    let digest = sha256_hex(HASHED_KEY)?;
    let config = format!(
        "[agent]\nmode = \"echo\"\n[server]\napi_keys = [\"{RATE_KEY}\"]\napi_key_sha256 = [\"{digest}\"]\napi_keys_file = \"{}\"\n\
         [server.limits]\ncall_starts_per_minute = 3\ncall_start_burst = 3\ncalls_per_key = 1\nconnections_per_ip = {CONNECTIONS}\nretry_after_s = {RETRY_S}\n",
        keys_file.display()
    );
    let s = tokio::task::spawn_blocking(move || start_server_with_config(&config, &[])).await??;

    // Credentials: every source works, a wrong key does not.
    let Err(r) = open(&s, "sk-wrong").await? else { bail!("a wrong key was admitted") };
    assert_eq!(r.status, 401, "{r:?}");
    for key in [HASHED_KEY, CAP_KEY] {
        let ws = open_when_free(&s, key).await?.map_err(|r| anyhow::anyhow!("{key} refused: {r:?}"))?;
        close(ws).await;
    }

    // The rate: 3 starts, then 429 with the wait. Each call is closed before the
    // next, so the cap of one call never answers instead.
    for i in 0..3 {
        let ws = open_when_free(&s, RATE_KEY).await?.map_err(|r| anyhow::anyhow!("start {i} refused: {r:?}"))?;
        close(ws).await;
    }
    let started = Instant::now();
    let refused = loop {
        match open(&s, RATE_KEY).await? {
            Err(r) if r.status == 503 && started.elapsed() < Duration::from_secs(10) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(r) => break r,
            Ok(_) => bail!("a fourth start within the minute was admitted"),
        }
    };
    assert_eq!(refused.status, 429, "{refused:?}");
    let wait = refused.retry_after.context("429 without Retry-After")?;
    // 3 a minute: one every 20 s.
    assert!((1..=20).contains(&wait), "Retry-After {wait}");
    assert!(refused.body.contains("call_starts_per_minute"), "{}", refused.body);

    // The cap: the second call of a key that holds one is 503, with Retry-After.
    // (CAP_KEY spent one start above; two more fit its rate.)
    let held = open_when_free(&s, CAP_KEY).await?.map_err(|r| anyhow::anyhow!("first call refused: {r:?}"))?;
    let Err(busy) = open(&s, CAP_KEY).await? else { bail!("a second call over calls_per_key = 1 was admitted") };
    assert_eq!(busy.status, 503, "{busy:?}");
    assert_eq!(busy.retry_after, Some(RETRY_S), "{busy:?}");
    assert!(busy.body.contains("calls_per_key"), "{}", busy.body);
    // Another key is not held back by it.
    let other = open_when_free(&s, HASHED_KEY).await?.map_err(|r| anyhow::anyhow!("another key refused: {r:?}"))?;
    close(other).await;
    close(held).await;
    assert!(metric(&s.addr, "parley_calls_refused_total").await? >= 2.0);

    // The address cap: connections beyond it are answered 503 with Retry-After.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conns = Vec::new();
    let mut refused_at = None;
    for i in 0..CONNECTIONS + 3 {
        let mut c = tokio::net::TcpStream::connect(&s.addr).await?;
        let (status, retry) = get_on(&mut c, &s.addr).await?;
        if status == 503 {
            assert_eq!(retry.as_deref(), Some(RETRY_S.to_string().as_str()));
            refused_at = Some(i);
            break;
        }
        assert_eq!(status, 200);
        conns.push(c);
    }
    let at = refused_at.context("no connection was refused past connections_per_ip")?;
    // Connections of the calls above may still be closing on the server side.
    assert!((CONNECTIONS - 3..=CONNECTIONS).contains(&at), "refused at connection {at}");
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = tokio::net::TcpStream::connect(&s.addr).await?;
        match get_on(&mut c, &s.addr).await? {
            (200, _) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            (status, _) => bail!("still refused ({status}) after the connections closed"),
        }
    }
    assert!(metric(&s.addr, "parley_connections_refused_total").await? >= 1.0);
    Ok(())
}

/// The SHA-256 of `key` in hex, with the system's `sha256sum` (what an operator
/// would run).
fn sha256_hex(key: &str) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(key.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text.split_whitespace().next().context("sha256sum printed nothing")?.to_string())
}
