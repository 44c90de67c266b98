//! `POST /twilio/voice`: the voice webhook. Answers TwiML that connects the call to
//! this server's `/twilio` Media Stream; checks `X-Twilio-Signature` when
//! `twilio.auth_token` is set. Also the URL logic both endpoints share.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::signature;
use crate::app::App;
use crate::config::TwilioConfig;

/// The request header carrying Twilio's signature.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// The request's host (`Host`, or the HTTP/2 authority), if it looks like one.
fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string).or_else(|| uri.authority().map(|a| a.to_string()))?;
    let ok = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    ok.then_some(host)
}

/// The base URLs (`scheme://host[/prefix]`, no trailing slash) a gateway may have
/// used to reach this server over HTTP: the configured public URL, or the request's
/// host with the scheme of `X-Forwarded-Proto` (both `https` and `http` when absent).
pub fn http_bases(config: &TwilioConfig, headers: &HeaderMap, uri: &Uri) -> Vec<String> {
    if !config.public_url.is_empty() {
        return vec![config.public_url.trim_end_matches('/').to_string()];
    }
    let Some(host) = request_host(headers, uri) else { return Vec::new() };
    let forwarded = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()).map(|v| v.trim().to_ascii_lowercase());
    let schemes: Vec<&str> = match forwarded.as_deref() {
        Some("http") => vec!["http"],
        Some("https") => vec!["https"],
        _ => vec!["https", "http"],
    };
    schemes.into_iter().map(|s| format!("{s}://{host}")).collect()
}

/// The same bases as WebSocket URLs (`https` → `wss`, `http` → `ws`).
pub fn ws_bases(config: &TwilioConfig, headers: &HeaderMap, uri: &Uri) -> Vec<String> {
    http_bases(config, headers, uri)
        .into_iter()
        .map(|b| match b.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}"),
            Some((_, rest)) => format!("wss://{rest}"),
            None => b,
        })
        .collect()
}

/// Whether the request's `X-Twilio-Signature` signs one of the URLs it may have
/// been sent to (`bases` + the request's path and query) with `params`.
pub fn signed(token: &str, headers: &HeaderMap, uri: &Uri, bases: &[String], params: &[(String, String)]) -> bool {
    let Some(given) = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()) else { return false };
    let path = uri.path_and_query().map_or_else(|| uri.path(), |p| p.as_str());
    bases.iter().any(|base| signature::verify(token, given, &format!("{base}{path}"), params))
}

/// TwiML that connects the call to a bidirectional Media Stream at `stream_url`.
pub fn twiml(stream_url: &str) -> String {
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Connect><Stream url=\"{}\"/></Connect></Response>\n", xml_escape(stream_url))
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `POST /twilio/voice` (GET works too, as Twilio allows either method).
pub async fn handler(State(app): State<Arc<App>>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let config = &app.config.twilio;
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    if !config.auth_token.is_empty() && !signed(&config.auth_token, &headers, &uri, &http_bases(config, &headers, &uri), &params) {
        warn!("voice webhook refused: missing or invalid X-Twilio-Signature");
        return (StatusCode::FORBIDDEN, "missing or invalid X-Twilio-Signature\n").into_response();
    }
    let Some(base) = ws_bases(config, &headers, &uri).into_iter().next() else {
        return (StatusCode::BAD_REQUEST, "no usable Host header; set twilio.public_url\n").into_response();
    };
    let call_sid = params.iter().find(|(k, _)| k == "CallSid").map_or("", |(_, v)| v.as_str());
    info!(call_sid, "voice webhook: connecting the call to the media stream");
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], twiml(&format!("{base}/twilio"))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header value"));
        }
        h
    }

    #[test]
    fn twiml_points_at_the_stream() {
        assert_eq!(
            twiml("wss://voice.example.org/twilio"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Connect><Stream url=\"wss://voice.example.org/twilio\"/></Connect></Response>\n"
        );
        assert!(twiml("wss://a/b?x=1&y=\"2\"").contains("url=\"wss://a/b?x=1&amp;y=&quot;2&quot;\""));
    }

    #[test]
    fn bases_come_from_the_host_or_the_public_url() {
        let uri: Uri = "/twilio/voice".parse().expect("uri");
        let mut config = TwilioConfig::default();
        let h = headers(&[("host", "voice.example.org")]);
        assert_eq!(http_bases(&config, &h, &uri), vec!["https://voice.example.org", "http://voice.example.org"]);
        assert_eq!(ws_bases(&config, &h, &uri), vec!["wss://voice.example.org", "ws://voice.example.org"]);
        let h = headers(&[("host", "voice.example.org:8443"), ("x-forwarded-proto", "https")]);
        assert_eq!(http_bases(&config, &h, &uri), vec!["https://voice.example.org:8443"]);
        // A Host that could break out of the XML attribute is not used.
        assert!(http_bases(&config, &headers(&[("host", "evil\"/><Hangup")]), &uri).is_empty());
        config.public_url = "https://parley.example.com/voice/".into();
        assert_eq!(ws_bases(&config, &h, &uri), vec!["wss://parley.example.com/voice"]);
        config.public_url = "http://10.0.0.5:8080".into();
        assert_eq!(ws_bases(&config, &h, &uri), vec!["ws://10.0.0.5:8080"]);
    }

    #[test]
    fn signature_covers_url_path_and_params() {
        // Computed independently (Python's hmac) for token "parley-unit-token",
        // URL https://voice.example.org/twilio/voice, params a=0, a=1, b=2, c="".
        let sig = "8iEO8nzQqaSdiaDNR5uuSmhai1w=";
        let params: Vec<(String, String)> = form_urlencoded::parse(b"b=2&a=1&c=&a=0").into_owned().collect();
        let uri: Uri = "/twilio/voice".parse().expect("uri");
        let config = TwilioConfig::default();
        let h = headers(&[("host", "voice.example.org"), (SIGNATURE_HEADER, sig)]);
        assert!(signed("parley-unit-token", &h, &uri, &http_bases(&config, &h, &uri), &params));
        assert!(!signed("parley-unit-token", &h, &uri, &http_bases(&config, &h, &uri), &params[1..]));
        let other: Uri = "/twilio/voice?x=1".parse().expect("uri");
        assert!(!signed("parley-unit-token", &h, &other, &http_bases(&config, &h, &other), &params));
        let unsigned = headers(&[("host", "voice.example.org")]);
        assert!(!signed("parley-unit-token", &unsigned, &uri, &http_bases(&config, &unsigned, &uri), &params));
        // The WebSocket handshake: the wss URL, no parameters.
        let ws: Uri = "/twilio".parse().expect("uri");
        let h = headers(&[("host", "voice.example.org"), (SIGNATURE_HEADER, "MqMIRm4Jsnkw+LCmc6i+PPWkZYc=")]);
        assert!(signed("parley-unit-token", &h, &ws, &ws_bases(&config, &h, &ws), &[]));
    }
}
