//! Short-lived client secrets for browsers, the way OpenAI's Realtime API does it.
//!
//! A browser cannot set an `Authorization` header on a WebSocket, and an API key
//! must not be shipped to one. A backend (or the demo page, with a key the person
//! typed) calls `POST /v1/realtime/client_secrets` with a real API key and gets a
//! secret (`ek_…`) that expires; the browser then opens `/v1/realtime` with the
//! WebSocket subprotocols `["realtime", "openai-insecure-api-key.<secret>"]`.
//! A secret can open any number of calls until it expires; a call already open
//! goes on after that. A secret minted with a `session` starts its calls with that
//! configuration.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use parley_agent::SessionSettings;

use crate::keys::{ApiKeys, KeyId};

/// Prefix of the subprotocol that carries a credential (the OpenAI SDK's spelling).
pub const KEY_SUBPROTOCOL_PREFIX: &str = "openai-insecure-api-key.";
/// Most secrets alive at once; minting past it drops the ones closest to expiry.
const MAX_LIVE_SECRETS: usize = 10_000;

/// One minted secret.
struct Secret {
    expires: Instant,
    preset: Option<Box<SessionSettings>>,
    /// The API key that minted it: its calls count against that key's limits.
    key: Option<KeyId>,
}

/// Who a call's credential says the caller is, and what it brings.
#[derive(Debug, Default)]
pub struct Authorized {
    /// The API key presented, or the one that minted the client secret presented;
    /// `None` on a server without keys.
    pub key: Option<KeyId>,
    /// The session preset of the client secret, if it carried one.
    pub preset: Option<Box<SessionSettings>>,
}

/// The secrets minted by this process (they do not survive a restart).
#[derive(Default)]
pub struct ClientSecrets {
    live: Mutex<HashMap<String, Secret>>,
}

/// A freshly minted secret.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The secret itself, `ek_` and 32 hex digits.
    pub value: String,
    /// When it stops opening calls, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a call's credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Nothing usable was sent.
    #[error("missing API key: send `Authorization: Bearer KEY`, or from a browser a client secret (POST /v1/realtime/client_secrets) as the WebSocket subprotocol `openai-insecure-api-key.SECRET`")]
    Missing,
    /// A key or secret was sent and is not known.
    #[error("unknown API key or client secret")]
    Unknown,
    /// A client secret that has expired.
    #[error("the client secret has expired; mint a new one with POST /v1/realtime/client_secrets")]
    Expired,
}

impl ClientSecrets {
    /// Mints a secret that opens calls for `ttl`, starting them with `preset` when
    /// given; its calls count against `key`'s limits.
    pub fn mint(&self, ttl: Duration, preset: Option<Box<SessionSettings>>, key: Option<KeyId>) -> Minted {
        let uuid_hex = || uuid::Uuid::new_v4().simple().to_string();
        // Two v4 UUIDs: 244 random bits from the OS generator.
        let value = format!("ek_{}{}", &uuid_hex()[..16], &uuid_hex()[..16]);
        let now = Instant::now();
        let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + ttl.as_secs();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_LIVE_SECRETS
            && let Some(oldest) = live.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(value.clone(), Secret { expires: now + ttl, preset, key });
        Minted { value, expires_at }
    }

    /// Checks a secret: its minting key and session preset while it is valid.
    pub fn check(&self, value: &str) -> Result<Authorized, AuthError> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(value) {
            Some(s) if s.expires > Instant::now() => Ok(Authorized { key: s.key, preset: s.preset.clone() }),
            Some(_) => Err(AuthError::Expired),
            None => Err(AuthError::Unknown),
        }
    }

    /// Authorizes a call from its request headers: a Bearer API key or client secret,
    /// or a key or secret in the `openai-insecure-api-key.` subprotocol. With no API
    /// keys configured everything is allowed; a valid client secret still brings its
    /// session preset.
    pub fn authorize(&self, keys: &ApiKeys, headers: &HeaderMap) -> Result<Authorized, AuthError> {
        let given = crate::keys::bearer(headers).or_else(|| subprotocol_credential(headers));
        let Some(given) = given.filter(|g| !g.is_empty()) else {
            return if keys.is_empty() { Ok(Authorized::default()) } else { Err(AuthError::Missing) };
        };
        if let Some(key) = keys.find(given) {
            return Ok(Authorized { key: Some(key), preset: None });
        }
        match self.check(given) {
            Ok(found) => Ok(found),
            Err(_) if keys.is_empty() => Ok(Authorized::default()),
            Err(e) => Err(e),
        }
    }
}

/// The credential in a `Sec-WebSocket-Protocol: …, openai-insecure-api-key.X, …` header.
pub fn subprotocol_credential(headers: &HeaderMap) -> Option<&str> {
    requested_subprotocols(headers).find_map(|p| p.strip_prefix(KEY_SUBPROTOCOL_PREFIX))
}

/// Every subprotocol a WebSocket handshake offers, trimmed.
pub fn requested_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// The subprotocol to echo in the handshake response: `realtime` when offered (as
/// the OpenAI SDK does), otherwise the first one offered. A browser that offered
/// subprotocols fails the handshake unless one comes back.
pub fn chosen_subprotocol(headers: &HeaderMap) -> Option<&str> {
    let mut offered = requested_subprotocols(headers).peekable();
    let first = offered.peek().copied();
    offered.find(|p| *p == "realtime").or(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn test_keys() -> ApiKeys {
        ApiKeys::from_digests(&[ApiKeys::digest_hex("sk-test")]).expect("valid")
    }

    fn with_protocols(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn a_secret_opens_calls_until_it_expires() {
        let s = ClientSecrets::default();
        let keys = test_keys();
        let m = s.mint(Duration::from_millis(150), None, Some(KeyId(0)));
        assert!(m.value.starts_with("ek_") && m.value.len() == 35, "{}", m.value);
        let h = with_protocols(&format!("realtime, openai-insecure-api-key.{}", m.value));
        assert_eq!(s.authorize(&keys, &h).map(|a| a.key), Ok(Some(KeyId(0))), "counted against the key that minted it");
        assert!(s.authorize(&keys, &h).is_ok(), "usable more than once");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(s.authorize(&keys, &h).err(), Some(AuthError::Expired));
    }

    #[test]
    fn keys_secrets_and_their_absence() {
        let s = ClientSecrets::default();
        let keys = test_keys();
        assert_eq!(s.authorize(&keys, &HeaderMap::new()).err(), Some(AuthError::Missing));
        assert_eq!(s.authorize(&keys, &with_protocols("realtime, openai-insecure-api-key.sk-test")).map(|a| a.key), Ok(Some(KeyId(0))));
        assert_eq!(s.authorize(&keys, &with_protocols("openai-insecure-api-key.ek_nope")).err(), Some(AuthError::Unknown));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-test"));
        assert_eq!(s.authorize(&keys, &bearer).map(|a| a.key), Ok(Some(KeyId(0))));
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-tes"));
        assert_eq!(s.authorize(&keys, &bearer).err(), Some(AuthError::Unknown), "a prefix of a key is no key");
        let m = s.mint(Duration::from_secs(60), Some(Box::default()), Some(KeyId(0)));
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {}", m.value)).expect("header"));
        assert!(matches!(s.authorize(&keys, &bearer), Ok(Authorized { preset: Some(_), .. })), "a secret works as a Bearer token and brings its preset");
        let open = s.authorize(&ApiKeys::default(), &HeaderMap::new()).expect("no keys configured: open");
        assert!(open.key.is_none() && open.preset.is_none());
    }

    #[test]
    fn the_handshake_echoes_realtime_or_the_first_offer() {
        assert_eq!(chosen_subprotocol(&with_protocols("openai-insecure-api-key.ek_x, realtime")), Some("realtime"));
        assert_eq!(chosen_subprotocol(&with_protocols("openai-insecure-api-key.ek_x")), Some("openai-insecure-api-key.ek_x"));
        assert_eq!(chosen_subprotocol(&HeaderMap::new()), None);
        assert_eq!(subprotocol_credential(&with_protocols("realtime,openai-insecure-api-key.ek_y")), Some("ek_y"));
    }
}
