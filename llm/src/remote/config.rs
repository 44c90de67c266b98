//! Settings of a pool of OpenAI-compatible replicas.

use serde::{Deserialize, Serialize};

use crate::LlmError;

/// A pool of OpenAI-compatible chat-completions servers serving the same model.
///
/// In Parley's TOML each replica is one `[[…replicas]]` table; unknown keys are
/// rejected so a misspelt setting is an error instead of a silent default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// The servers; requests are spread over those that are healthy.
    pub replicas: Vec<ReplicaConfig>,
    /// Longest wait for the response headers, and then for each next piece of the
    /// stream (not for the whole reply, whose length varies): a replica silent that
    /// long is judged dead and the request fails over if nothing was said yet. It
    /// must cover the prefill of a long conversation on the slowest replica.
    pub request_timeout_ms: u64,
    /// How often every replica's `GET {base_url}/models` is polled, so a failed
    /// replica comes back into use once it answers again.
    pub health_interval_ms: u64,
    /// Longest wait for a TCP connection; kept short so a dead host fails over fast.
    pub connect_timeout_ms: u64,
}

/// One server of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// A name for logs and metrics (`gpu-a`).
    pub name: String,
    /// The API root, `http://host:port/v1`: `/chat/completions` and `/models` are
    /// appended. Plain `http://` only (TLS is not built in; put the replicas on a
    /// private network or behind a local TLS-terminating proxy).
    pub base_url: String,
    /// Sent as `Authorization: Bearer KEY` when set.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The `model` field of each request (vLLM and SGLang check it against the model
    /// they serve; llama.cpp and Parley accept any).
    pub model: String,
    /// Send the request's repeat penalty (`repetition_penalty`, `repeat_penalty`,
    /// `repeat_last_n`). Off by default: llama.cpp's server and vLLM count the prompt
    /// in the penalty window, so the penalty falls on the caller's own words and keeps
    /// a small model from repeating their member ID in a tool call (the embedded
    /// engine counts only the reply's tokens).
    #[serde(default)]
    pub forward_repeat_penalty: bool,
}

/// Defaults: a 30 s silence limit (a CPU replica prefilling a long call is slow),
/// health checks every 5 s, connections within 2 s.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// See [`DEFAULT_REQUEST_TIMEOUT_MS`].
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 5_000;
/// See [`DEFAULT_REQUEST_TIMEOUT_MS`].
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            replicas: Vec::new(),
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

impl RemoteConfig {
    /// Checks what can be checked without the network: at least one replica,
    /// unique names, `http://` URLs with a host, non-zero timeouts. The server's
    /// config validation can call this to fail at start-up with a clear message.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |why: String| Err(LlmError::Model(format!("remote LLM configuration: {why}")));
        if self.replicas.is_empty() {
            return bad("no replicas; add at least one `[[llm.replicas]]` with name, base_url and model".into());
        }
        for (field, v) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if v == 0 {
                return bad(format!("{field} must be above 0"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.replicas {
            if r.name.trim().is_empty() {
                return bad(format!("the replica at {} has an empty name", r.base_url));
            }
            if !names.insert(r.name.as_str()) {
                return bad(format!("two replicas are named {:?}; names must be unique", r.name));
            }
            if r.model.trim().is_empty() {
                return bad(format!("replica {:?} has an empty model", r.name));
            }
            super::http::Endpoint::parse(&r.base_url, r.api_key.as_deref())
                .map_err(|e| LlmError::Model(format!("remote LLM configuration: replica {:?}: {e}", r.name)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, url: &str) -> ReplicaConfig {
        ReplicaConfig { name: name.into(), base_url: url.into(), api_key: None, model: "m".into(), forward_repeat_penalty: false }
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let c: RemoteConfig = serde_json::from_str(r#"{"replicas":[{"name":"a","base_url":"http://127.0.0.1:1/v1","model":"m"}]}"#).expect("valid");
        assert_eq!(c.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert!(c.validate().is_ok());
        assert!(serde_json::from_str::<RemoteConfig>(r#"{"replica":[]}"#).is_err());
        assert!(serde_json::from_str::<RemoteConfig>(r#"{"replicas":[{"name":"a","base_url":"x","model":"m","key":"k"}]}"#).is_err());
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let msg = |c: RemoteConfig| c.validate().expect_err("invalid").to_string();
        assert!(msg(RemoteConfig::default()).contains("no replicas"));
        let two = RemoteConfig { replicas: vec![replica("a", "http://h:1/v1"), replica("a", "http://h:2/v1")], ..RemoteConfig::default() };
        assert!(msg(two).contains("unique"));
        let tls = RemoteConfig { replicas: vec![replica("a", "https://h/v1")], ..RemoteConfig::default() };
        assert!(msg(tls).contains("http://"));
        let zero = RemoteConfig { replicas: vec![replica("a", "http://h/v1")], connect_timeout_ms: 0, ..RemoteConfig::default() };
        assert!(msg(zero).contains("connect_timeout_ms"));
    }
}
