//! API keys, held only as SHA-256 digests and compared in constant time.
//!
//! A key is hashed the moment the configuration is loaded; the process keeps no
//! plain key after that, so a memory dump, `parley config` or a debug log line
//! cannot leak one. Comparing digests with [`subtle`] (no early exit on the first
//! differing byte, every configured key tried) leaves no timing signal about how
//! much of a guessed key was right.
//!
//! Keys come from `server.api_keys` (plain), `server.api_key_sha256` (digests, so the
//! config file need not hold a key at all), a keys file (`server.api_keys_file` or
//! `PARLEY_API_KEYS_FILE`: one key per line, `#` comments, `sha256:HEX` lines are
//! digests) and `PARLEY_API_KEYS` (comma-separated).

use std::path::Path;

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Which configured key a caller presented: an index into the key list, stable for
/// the life of the process. Per-key limits count by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub usize);

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A digest that is not 64 hex digits.
    #[error("`{0}` is not a SHA-256 digest (64 hex digits); make one with `printf %s KEY | sha256sum`")]
    BadDigest(String),
    /// The keys file could not be read.
    #[error("cannot read the API keys file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The configured API keys, as digests.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// The SHA-256 digest of a key, as 64 lowercase hex digits (what
    /// `server.api_key_sha256` holds).
    pub fn digest_hex(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    /// Keys from their hex digests.
    pub fn from_digests(digests: &[String]) -> Result<Self, KeyError> {
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.push(parse_digest(d)?);
        }
        Ok(Self { digests: out })
    }

    /// No keys configured: the server is open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// The configured key `given` is, if any. Every key is compared, each in constant
    /// time, whatever matched first.
    pub fn find(&self, given: &str) -> Option<KeyId> {
        let d: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut found = None;
        for (i, k) in self.digests.iter().enumerate() {
            if bool::from(k[..].ct_eq(&d[..])) && found.is_none() {
                found = Some(KeyId(i));
            }
        }
        found
    }

    /// A name for a key in logs and metrics: the first 8 hex digits of its digest,
    /// which tell keys apart without saying anything usable about them.
    pub fn label(&self, id: KeyId) -> String {
        self.digests.get(id.0).map(|d| format!("key:{}", hex::encode(&d[..4]))).unwrap_or_else(|| "key:?".into())
    }
}

/// The Bearer token of a request, trimmed; `None` when there is none.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).filter(|k| !k.is_empty())
}

fn parse_digest(hex_digest: &str) -> Result<[u8; 32], KeyError> {
    let t = hex_digest.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    let bytes = hex::decode(t).map_err(|_| KeyError::BadDigest(hex_digest.to_string()))?;
    bytes.try_into().map_err(|_| KeyError::BadDigest(hex_digest.to_string()))
}

/// Checks that a digest parses (config validation).
pub fn check_digest(hex_digest: &str) -> Result<(), KeyError> {
    parse_digest(hex_digest).map(|_| ())
}

/// Reads a keys file into digests: one key per line, blank lines and `#` comments
/// skipped, `sha256:HEX` lines taken as digests.
pub fn read_keys_file(path: &Path) -> Result<Vec<String>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::File { path: path.display().to_string(), source })?;
    keys_from_lines(&text)
}

/// Digests of the keys in `text` (see [`read_keys_file`]).
pub fn keys_from_lines(text: &str) -> Result<Vec<String>, KeyError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with("sha256:") {
            check_digest(line)?;
            out.push(line.trim_start_matches("sha256:").to_ascii_lowercase());
        } else {
            out.push(ApiKeys::digest_hex(line));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_digest_and_labels_say_nothing_of_the_key() {
        let keys = ApiKeys::from_digests(&[ApiKeys::digest_hex("sk-a"), ApiKeys::digest_hex("sk-b")]).expect("valid");
        assert_eq!(keys.find("sk-a"), Some(KeyId(0)));
        assert_eq!(keys.find("sk-b"), Some(KeyId(1)));
        assert_eq!(keys.find("sk-"), None);
        assert_eq!(keys.find(""), None);
        let label = keys.label(KeyId(0));
        assert!(label.starts_with("key:") && label.len() == 12 && !label.contains("sk-a"), "{label}");
    }

    #[test]
    fn digests_must_be_64_hex_digits() {
        assert!(ApiKeys::from_digests(&["abc".into()]).is_err());
        assert!(ApiKeys::from_digests(&["zz".repeat(32)]).is_err());
        let d = ApiKeys::digest_hex("k");
        assert_eq!(d.len(), 64);
        assert!(ApiKeys::from_digests(&[format!("sha256:{d}")]).expect("prefixed").find("k").is_some());
    }

    #[test]
    fn a_keys_file_holds_keys_digests_and_comments() {
        let d = ApiKeys::digest_hex("sk-hashed");
        let text = format!("# tenants\nsk-plain\n\n  sha256:{}  \n", d.to_uppercase());
        let digests = keys_from_lines(&text).expect("parse");
        let keys = ApiKeys::from_digests(&digests).expect("valid");
        assert_eq!(keys.len(), 2);
        assert!(keys.find("sk-plain").is_some() && keys.find("sk-hashed").is_some());
        assert!(keys.find("# tenants").is_none());
        assert!(keys_from_lines("sha256:1234\n").is_err());
        let missing = read_keys_file(Path::new("/nonexistent/keys")).expect_err("missing file");
        assert!(missing.to_string().contains("/nonexistent/keys"), "{missing}");
    }

    #[test]
    fn the_bearer_token_is_trimmed_and_empty_is_none() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  sk-x ".parse().expect("header"));
        assert_eq!(bearer(&h), Some("sk-x"));
        h.insert(header::AUTHORIZATION, "Bearer ".parse().expect("header"));
        assert_eq!(bearer(&h), None);
    }
}
