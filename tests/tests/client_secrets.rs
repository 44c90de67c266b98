//! Client secrets end to end: the real binary with `server.api_keys` set. A secret
//! is minted with an API key (and only with one), opens calls as the WebSocket
//! subprotocol `openai-insecure-api-key.<secret>` (the subprotocol chosen is echoed
//! in the handshake) until it expires, and is refused after; a call opened before
//! the expiry goes on. One server for the whole file.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use parley_tests::{Server, http_request, start_server};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const KEY: &str = "sk-e2e-secret-test";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("parley-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("parley.toml");
        // Secrets as short as 1 s, so expiry can be tested quickly.
        std::fs::write(&path, format!("[server]\napi_keys = [\"{KEY}\"]\n[web]\nclient_secret_min_seconds = 1\n")).expect("write config");
        start_server(&["--config", path.to_str().expect("utf-8 path")]).expect("start parley")
    })
}

async fn shared() -> &'static Server {
    tokio::task::spawn_blocking(server).await.expect("join")
}

/// Mints a secret: (HTTP status, body).
async fn mint(s: &Server, key: Option<&str>, body: Value) -> Result<(u16, Value)> {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    let r = http_request(&s.addr, "POST", "/v1/realtime/client_secrets", &headers, &body.to_string()).await?;
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    Ok((r.status, v))
}

async fn secret(s: &Server, seconds: u64) -> Result<String> {
    let (status, v) = mint(s, Some(KEY), json!({"expires_after": {"anchor": "created_at", "seconds": seconds}})).await?;
    if status != 200 {
        bail!("minting failed: {status} {v}");
    }
    Ok(v["value"].as_str().context("no value")?.to_string())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v1/realtime` offering `protocols`; returns the socket and the
/// subprotocol the server chose, or the HTTP status it refused with.
async fn open(s: &Server, protocols: &str) -> Result<std::result::Result<(Ws, Option<String>), u16>> {
    let mut req = s.realtime_url().into_client_request()?;
    if !protocols.is_empty() {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocols)?);
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, res)) => {
            let chosen = res.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
            Ok(Ok((ws, chosen)))
        }
        Err(WsError::Http(res)) => Ok(Err(res.status().as_u16())),
        Err(e) => Err(e.into()),
    }
}

async fn next_of(ws: &mut Ws, kind: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.with_context(|| format!("no {kind}"))?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["type"] == kind {
                    return Ok(v);
                }
            }
            Some(Ok(_)) => {}
            other => bail!("socket ended waiting for {kind}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_api_key_mints_a_secret() -> Result<()> {
    let s = shared().await;
    assert_eq!(mint(s, None, json!({})).await?.0, 401);
    assert_eq!(mint(s, Some("sk-wrong"), json!({})).await?.0, 401);
    let ek = secret(s, 60).await?;
    assert_eq!(mint(s, Some(&ek), json!({})).await?.0, 401, "a secret cannot mint another");
    let (status, v) = mint(s, Some(KEY), json!({})).await?;
    assert_eq!(status, 200, "{v}");
    assert!(v["expires_at"].as_u64().is_some() && v["session"]["object"] == "realtime.session", "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_opens_calls_as_a_subprotocol_until_it_expires() -> Result<()> {
    let s = shared().await;
    let ek = secret(s, 3).await?;
    let offer = format!("realtime, openai-insecure-api-key.{ek}");

    // Accepted, `realtime` echoed, and usable for more than one call.
    let (mut first, chosen) = open(s, &offer).await?.map_err(|st| anyhow::anyhow!("refused with {st}"))?;
    assert_eq!(chosen.as_deref(), Some("realtime"));
    next_of(&mut first, "session.created").await?;
    let (mut second, _) = open(s, &offer).await?.map_err(|st| anyhow::anyhow!("second call refused with {st}"))?;
    next_of(&mut second, "session.created").await?;
    second.close(None).await.ok();

    tokio::time::sleep(Duration::from_millis(3300)).await;
    assert_eq!(open(s, &offer).await?.err(), Some(401), "an expired secret must be refused");

    // The call opened before the expiry goes on.
    first.send(Message::text(json!({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}}).to_string())).await?;
    let updated = next_of(&mut first, "session.updated").await?;
    assert_eq!(updated["session"]["instructions"], "Be brief.");
    first.close(None).await.ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_credential_are_refused_and_keys_work_as_subprotocols() -> Result<()> {
    let s = shared().await;
    assert_eq!(open(s, "").await?.err(), Some(401));
    assert_eq!(open(s, "realtime").await?.err(), Some(401));
    assert_eq!(open(s, "realtime, openai-insecure-api-key.ek_0123456789abcdef0123456789abcdef").await?.err(), Some(401));
    // The OpenAI SDK in a browser (dangerouslyAllowBrowser) sends the key itself; only
    // that protocol offered, so it is the one echoed.
    let offer = format!("openai-insecure-api-key.{KEY}");
    let (mut ws, chosen) = open(s, &offer).await?.map_err(|st| anyhow::anyhow!("refused with {st}"))?;
    assert_eq!(chosen.as_deref(), Some(offer.as_str()));
    next_of(&mut ws, "session.created").await?;
    ws.close(None).await.ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_minted_with_a_session_starts_its_calls_with_it() -> Result<()> {
    let s = shared().await;
    let body = json!({"expires_after": {"anchor": "created_at", "seconds": 60}, "session": {"type": "realtime", "instructions": "You are a terse pirate.", "tool_choice": "none"}});
    let (status, v) = mint(s, Some(KEY), body).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["session"]["instructions"], "You are a terse pirate.");
    let ek = v["value"].as_str().context("value")?;
    let (mut ws, _) = open(s, &format!("realtime, openai-insecure-api-key.{ek}")).await?.map_err(|st| anyhow::anyhow!("refused with {st}"))?;
    let created = next_of(&mut ws, "session.created").await?;
    assert_eq!(created["session"]["instructions"], "You are a terse pirate.");
    assert_eq!(created["session"]["tool_choice"], "none");
    ws.close(None).await.ok();
    Ok(())
}
