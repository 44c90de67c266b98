//! Twilio request signatures (`X-Twilio-Signature`): base64 of HMAC-SHA1, keyed
//! with the account's auth token, over the full URL Twilio requested followed by
//! every POST parameter's name and value, sorted by name. WebSocket handshakes are
//! signed the same way over the `wss://` URL with no parameters.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

fn mac(token: &str, url: &str, params: &[(String, String)]) -> HmacSha1 {
    let mut mac = <HmacSha1 as Mac>::new_from_slice(token.as_bytes()).expect("HMAC accepts keys of any length");
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The signature Twilio sends for a request to `url` with `params`.
#[cfg(test)]
pub fn compute(token: &str, url: &str, params: &[(String, String)]) -> String {
    base64::engine::general_purpose::STANDARD.encode(mac(token, url, params).finalize().into_bytes())
}

/// Whether `signature` (the header's value) signs `url` and `params`; compared in
/// constant time.
pub fn verify(token: &str, signature: &str, url: &str, params: &[(String, String)]) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else { return false };
    mac(token, url, params).verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    // Expected values computed independently (Python's hmac/hashlib/base64).
    #[test]
    fn known_signatures() {
        let params = pairs(&[("To", "+18005551212"), ("CallSid", "CA1234567890ABCDE"), ("Digits", "1234"), ("From", "+12349013030"), ("Caller", "+12349013030")]);
        assert_eq!(compute("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        // Repeated names sort by value too; empty values count.
        let params = pairs(&[("b", "2"), ("a", "1"), ("a", "0"), ("c", "")]);
        assert_eq!(compute("parley-unit-token", "https://voice.example.org/twilio/voice", &params), "8iEO8nzQqaSdiaDNR5uuSmhai1w=");
        assert_eq!(compute("parley-unit-token", "wss://voice.example.org/twilio", &[]), "MqMIRm4Jsnkw+LCmc6i+PPWkZYc=");
    }

    #[test]
    fn verify_accepts_only_the_right_signature() {
        let params = pairs(&[("CallSid", "CA1"), ("From", "+15550100")]);
        let url = "https://voice.example.org/twilio/voice";
        let good = compute("tok", url, &params);
        assert!(verify("tok", &good, url, &params));
        assert!(!verify("other", &good, url, &params), "wrong token");
        assert!(!verify("tok", &good, "http://voice.example.org/twilio/voice", &params), "wrong URL");
        assert!(!verify("tok", &good, url, &pairs(&[("CallSid", "CA2"), ("From", "+15550100")])), "tampered parameter");
        assert!(!verify("tok", "not base64!", url, &params));
        assert!(!verify("tok", "", url, &params));
    }
}
