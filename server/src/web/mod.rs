//! What a browser talks to: the demo page at `/` (plain HTML, CSS and JavaScript
//! modules embedded in the binary; no build step) and the client secrets that let a
//! browser open `/v1/realtime` without holding an API key.
//!
//! The page is a Realtime client like any other: it captures the microphone in an
//! AudioWorklet at 24 kHz PCM16, plays the agent through a small jitter buffer,
//! and shows the transcript, tool calls and per-turn latency. `[web] demo = false`
//! turns it off; the client secrets endpoint stays.

pub mod secrets;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::realtime::Dialect;
use crate::realtime::client_events::SessionPatch;
use crate::realtime::session_config;

/// Longest lifetime a client secret may ask for, in seconds (OpenAI's limit).
pub const MAX_SECRET_SECONDS: u64 = 7200;

/// An embedded file of the page.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset { name: $name, content_type: $type, body: include_str!(concat!("assets/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// The page's files, served under `/demo/`.
const ASSETS: &[Asset] = &[
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("realtime.js", JS),
    asset!("audio.js", JS),
    asset!("ui.js", JS),
    asset!("capture-worklet.js", JS),
    asset!("playback-worklet.js", JS),
];

const INDEX: &str = include_str!("assets/index.html");

/// The browser-facing routes: the page (when `demo` is on) and client secrets.
pub fn routes(demo: bool) -> Router<Arc<App>> {
    let router = Router::new().route("/v1/realtime/client_secrets", post(client_secrets));
    if demo { router.route("/", get(index)).route("/demo/info", get(info)).route("/demo/{file}", get(asset)) } else { router }
}

/// Headers every page response carries: a strict content security policy (only
/// this origin's scripts, styles and sockets; no framing), no sniffing, no referrer,
/// the microphone for this origin only.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, HeaderValue); 9] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; \
                 connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::HeaderName::from_static("permissions-policy"), HeaderValue::from_static("microphone=(self), camera=(), geolocation=(), payment=()")),
        (header::HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
        (header::HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static("same-origin")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

async fn index() -> Response {
    (page_headers("text/html; charset=utf-8"), INDEX).into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => (page_headers(a.content_type), a.body).into_response(),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// What the page needs to know before it connects: whether it must ask for a key.
async fn info(State(app): State<Arc<App>>) -> Response {
    let body = json!({
        "auth_required": !app.keys.is_empty(),
        "ready": app.engines().is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    (page_headers("application/json"), body.to_string()).into_response()
}

/// `POST /v1/realtime/client_secrets`, OpenAI's shape.
#[derive(Debug, Default, Deserialize)]
struct SecretRequest {
    expires_after: Option<ExpiresAfter>,
    session: Option<Value>,
}

/// `expires_after`: `{"anchor": "created_at", "seconds": 600}`.
#[derive(Debug, Default, Deserialize)]
struct ExpiresAfter {
    anchor: Option<String>,
    seconds: Option<u64>,
}

fn api_error(status: StatusCode, code: &str, param: Option<&str>, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error", "param": param, "code": code}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Mints a client secret for an API key holder. Answers
/// `{"value": "ek_…", "expires_at": UNIX, "session": {…}}`.
async fn client_secrets(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let keys = &app.keys;
    let mut minted_by = None;
    if !keys.is_empty() {
        // Only a real API key mints: a client secret cannot extend itself.
        minted_by = crate::keys::bearer(&headers).and_then(|g| keys.find(g));
        if minted_by.is_none() {
            return api_error(StatusCode::UNAUTHORIZED, "invalid_api_key", None, "minting a client secret needs an API key: send `Authorization: Bearer KEY`");
        }
    }
    let request: SecretRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SecretRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_json", None, format!("the body is not a valid client secret request: {e}")),
        }
    };
    let web = &app.config.web;
    let expires = request.expires_after.unwrap_or_default();
    if let Some(anchor) = expires.anchor.as_deref().filter(|a| *a != "created_at") {
        return api_error(StatusCode::BAD_REQUEST, "invalid_value", Some("expires_after.anchor"), format!("expires_after.anchor must be `created_at`, not `{anchor}`"));
    }
    let seconds = expires.seconds.unwrap_or(web.client_secret_seconds);
    if !(web.client_secret_min_seconds..=MAX_SECRET_SECONDS).contains(&seconds) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("expires_after.seconds"),
            format!("expires_after.seconds must be between {} and {MAX_SECRET_SECONDS}, not {seconds}", web.client_secret_min_seconds),
        );
    }
    let preset = match request.session {
        None => None,
        Some(session) => match session_preset(&app, session) {
            Ok(s) => Some(Box::new(s)),
            Err((code, message)) => return api_error(StatusCode::BAD_REQUEST, code, Some("session"), message),
        },
    };
    let shown = preset.as_deref().unwrap_or(&app.session_defaults).clone();
    let minted = app.client_secrets.mint(Duration::from_secs(seconds), preset, minted_by);
    let session_id = format!("sess_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let body = json!({
        "value": minted.value,
        "expires_at": minted.expires_at,
        "session": session_config::session_json(&session_id, &shown, Dialect::Ga),
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body.to_string()).into_response()
}

/// The settings a secret's calls start with: the server defaults with the request's
/// `session` applied as a `session.update` would. Errors are (code, message).
fn session_preset(app: &App, session: Value) -> Result<parley_agent::SessionSettings, (&'static str, String)> {
    if let Some(kind) = session.get("type").and_then(Value::as_str).filter(|k| *k != "realtime") {
        return Err(("unsupported_session_type", format!("session.type `{kind}` is not supported; use `realtime`")));
    }
    let patch: SessionPatch = serde_json::from_value(session).map_err(|e| ("invalid_value", format!("invalid session: {e}")))?;
    let defaults = &app.session_defaults;
    session_config::apply(defaults, patch, defaults).map_err(|e| (e.code(), format!("invalid session: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::router;
    use crate::config::Config;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn call(config: Config, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let app = Arc::new(App::new(config).expect("app"));
        let res = router(app).oneshot(req).await.expect("router answers");
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).expect("request")
    }

    fn mint(key: Option<&str>, body: &str) -> Request<Body> {
        let mut r = Request::post("/v1/realtime/client_secrets").header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        r.body(Body::from(body.to_string())).expect("request")
    }

    fn with_key() -> Config {
        let mut c = Config::default();
        c.server.api_keys = vec!["sk-test".into()];
        c
    }

    #[tokio::test]
    async fn the_page_and_its_files_come_with_security_headers() {
        let (status, headers, body) = call(Config::default(), get("/")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<script type=\"module\" src=\"/demo/app.js\">"), "{body}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii");
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(headers[header::CONTENT_TYPE].to_str().expect("ascii").starts_with("text/html"));
        for a in ASSETS {
            let (status, headers, body) = call(Config::default(), get(&format!("/demo/{}", a.name))).await;
            assert_eq!(status, StatusCode::OK, "{}", a.name);
            assert_eq!(headers[header::CONTENT_TYPE], a.content_type);
            assert!(body.len() > 100, "{} is empty", a.name);
        }
        assert_eq!(call(Config::default(), get("/demo/nope.js")).await.0, StatusCode::NOT_FOUND);
        let (_, _, info) = call(with_key(), get("/demo/info")).await;
        assert_eq!(serde_json::from_str::<Value>(&info).expect("json")["auth_required"], true);
    }

    #[tokio::test]
    async fn the_page_can_be_turned_off() {
        let mut c = Config::default();
        c.web.demo = false;
        assert_eq!(call(c.clone(), get("/")).await.0, StatusCode::NOT_FOUND);
        assert_eq!(call(c, get("/demo/app.js")).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn client_secrets_need_a_real_key_and_sane_expiry() {
        let (status, _, body) = call(with_key(), mint(None, "{}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(call(with_key(), mint(Some("sk-wrong"), "{}")).await.0, StatusCode::UNAUTHORIZED);

        let (status, headers, body) = call(with_key(), mint(Some("sk-test"), r#"{"expires_after": {"anchor": "created_at", "seconds": 60}}"#)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert!(v["value"].as_str().expect("value").starts_with("ek_"), "{v}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let expires = v["expires_at"].as_u64().expect("expires_at");
        assert!((now + 58..=now + 61).contains(&expires), "{expires} vs {now}");
        assert_eq!(v["session"]["type"], "realtime");

        let (status, _, body) = call(with_key(), mint(Some("sk-test"), r#"{"expires_after": {"seconds": 5}}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "under the 10 s minimum: {body}");
        assert!(body.contains("expires_after.seconds"), "{body}");
        assert_eq!(call(with_key(), mint(Some("sk-test"), r#"{"expires_after": {"seconds": 7201}}"#)).await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(with_key(), mint(Some("sk-test"), "not json")).await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(with_key(), mint(Some("sk-test"), "")).await.0, StatusCode::OK, "an empty body takes the defaults");

        let mut short = with_key();
        short.web.client_secret_min_seconds = 1;
        assert_eq!(call(short, mint(Some("sk-test"), r#"{"expires_after": {"seconds": 1}}"#)).await.0, StatusCode::OK, "tests may allow 1 s");
    }

    #[tokio::test]
    async fn a_secret_can_carry_the_session_its_calls_start_with() {
        let app = Arc::new(App::new(with_key()).expect("app"));
        let req = mint(Some("sk-test"), r#"{"session": {"type": "realtime", "instructions": "Speak like a pirate."}}"#);
        let res = router(app.clone()).oneshot(req).await.expect("router answers");
        assert_eq!(res.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body");
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["session"]["instructions"], "Speak like a pirate.");
        let found = app.client_secrets.check(v["value"].as_str().expect("value")).expect("valid");
        assert_eq!(found.preset.expect("preset").instructions, "Speak like a pirate.");
        assert!(found.key.is_some(), "its calls count against the key that minted it");

        let bad = mint(Some("sk-test"), r#"{"session": {"type": "transcription"}}"#);
        assert_eq!(router(app.clone()).oneshot(bad).await.expect("answer").status(), StatusCode::BAD_REQUEST);
        let bad = mint(Some("sk-test"), r#"{"session": {"temperature": 9}}"#);
        assert_eq!(router(app).oneshot(bad).await.expect("answer").status(), StatusCode::BAD_REQUEST);
    }
}
