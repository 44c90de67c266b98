//! HTTP tools declared in the configuration: the model's arguments are POSTed as JSON
//! to a URL and the answer becomes the tool's result. This lets an operator connect
//! the agent to their own services (a booking system, a CRM) without rebuilding it.
//!
//! Credentials for the service (a bearer token, an API key header) come from the
//! environment or a file (`headers_from_env`, `headers_from_file`), so they need not
//! sit in the configuration; they go only into the requests, marked sensitive, and
//! never into the model's prompt, `session.updated`, `Debug` output or a log line.
//!
//! Only plain `http://` URLs are supported for now (a service on the same host or
//! network, or behind a local TLS-terminating proxy); `https://` is a follow-up. The
//! client is hyper's own, not reqwest, to keep the build small.
//!
//! ```
//! use parley_agent::tools::http::{HttpTool, HttpToolConfig};
//! use parley_agent::tools::Tool;
//!
//! let tool = HttpTool::new(HttpToolConfig {
//!     name: "store_hours".into(),
//!     description: "Get the store's opening hours for a day.".into(),
//!     parameters: serde_json::json!({
//!         "type": "object",
//!         "properties": { "day": { "type": "string" } },
//!         "required": ["day"],
//!     }),
//!     url: "http://127.0.0.1:8089/hours".into(),
//!     timeout_ms: 2_000,
//!     headers: Default::default(),
//!     headers_from_env: Default::default(),
//!     headers_from_file: Default::default(),
//! })
//! .expect("a valid tool");
//! assert_eq!(tool.spec().name, "store_hours");
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parley_llm::ToolSpec;
use serde_json::{Value, json};

use super::{Tool, ToolError, ToolFuture};

/// The largest answer read from a service. A tool result goes into the model's
/// context, where a few hundred tokens is already a lot; anything bigger is a
/// misconfigured endpoint, refused rather than read into memory.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The longest timeout a tool may declare. The caller is waiting on the line; a
/// longer one is a configuration mistake.
pub const MAX_TIMEOUT_MS: u64 = 120_000;

/// How much of an error answer the model sees: enough to explain, not a stack trace.
const ERROR_EXCERPT_CHARS: usize = 200;

/// Headers the tool sets itself (or the connection owns); a configuration may not.
const RESERVED_HEADERS: [&str; 5] = ["content-type", "content-length", "host", "transfer-encoding", "connection"];

/// One HTTP tool as declared in the configuration file (`[[tools.http]]` or wherever
/// the server's config puts the list). Unknown keys are rejected so a misspelled
/// `timeout` is an error, not a silent default. Its `Debug` shows header names only.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    /// The tool's name as the model calls it: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What the tool does, for the model to decide when to call it.
    pub description: String,
    /// The JSON schema of the arguments (`{"type": "object", ...}`).
    pub parameters: Value,
    /// Where the arguments are POSTed: a plain `http://` URL.
    pub url: String,
    /// How long the whole exchange may take, in milliseconds (1 to [`MAX_TIMEOUT_MS`]).
    pub timeout_ms: u64,
    /// Extra request headers written out (e.g. `accept-language`). Credentials
    /// belong in `headers_from_env` or `headers_from_file`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request headers whose values are read from environment variables at start:
    /// `{ authorization = "CRM_AUTHORIZATION" }`.
    #[serde(default)]
    pub headers_from_env: BTreeMap<String, String>,
    /// Request headers whose values are read from files at start (trimmed), e.g. a
    /// mounted secret: `{ x-api-key = "/run/secrets/crm_key" }`.
    #[serde(default)]
    pub headers_from_file: BTreeMap<String, String>,
}

impl std::fmt::Debug for HttpToolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may be credentials: names only, and where secrets come from.
        f.debug_struct("HttpToolConfig")
            .field("name", &self.name)
            .field("url", &redacted_url(&self.url))
            .field("timeout_ms", &self.timeout_ms)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("headers_from_env", &self.headers_from_env)
            .field("headers_from_file", &self.headers_from_file)
            .finish_non_exhaustive()
    }
}

/// A URL fit for a log line: no user info, no query string (either may hold a
/// token).
fn redacted_url(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) => format!("{}://{}{}", uri.scheme_str().unwrap_or("http"), uri.host().unwrap_or(""), uri.port().map(|p| format!(":{p}")).unwrap_or_default())
            + uri.path(),
        Err(_) => "(invalid url)".into(),
    }
}

/// A tool that POSTs its arguments to a configured URL. Built once at startup and
/// shared by every call; its client keeps connections to the service alive between
/// calls, so a tool call does not pay for a new connection each time.
pub struct HttpTool {
    config: HttpToolConfig,
    uri: Uri,
    headers: HeaderMap,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for HttpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may hold credentials: names only.
        f.debug_struct("HttpTool")
            .field("name", &self.config.name)
            .field("url", &redacted_url(&self.config.url))
            .field("timeout_ms", &self.config.timeout_ms)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HttpTool {
    /// Checks the declaration (name, schema, URL, timeout, headers) and builds the
    /// tool, so a bad configuration fails at startup with a message saying what to
    /// fix instead of failing on the first call.
    pub fn new(config: HttpToolConfig) -> Result<Self, ToolError> {
        let name = &config.name;
        let invalid = |why: String| ToolError::InvalidArguments(format!("http tool `{name}`: {why}"));
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid("the name must be 1 to 64 letters, digits, `_` or `-`".into()));
        }
        if config.description.trim().is_empty() {
            return Err(invalid("add a description so the model knows when to call it".into()));
        }
        match config.parameters.as_object() {
            Some(schema) if schema.get("type").is_none_or(|t| t == "object") => {}
            _ => return Err(invalid("parameters must be a JSON schema object with \"type\": \"object\"".into())),
        }
        if config.timeout_ms == 0 || config.timeout_ms > MAX_TIMEOUT_MS {
            return Err(invalid(format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, not {}", config.timeout_ms)));
        }
        let uri: Uri = config.url.parse().map_err(|_| invalid(format!("url `{}` is not a valid URL", config.url)))?;
        match uri.scheme_str() {
            Some("http") if uri.host().is_some_and(|h| !h.is_empty()) => {}
            Some("https") => {
                return Err(invalid(format!(
                    "url `{}`: https is not supported yet; use a plain http:// URL (a local TLS proxy works)",
                    config.url
                )));
            }
            _ => return Err(invalid(format!("url `{}` must look like http://host:port/path", config.url))),
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(invalid(format!(
                "url `{}` holds credentials; send them as a header from headers_from_env or headers_from_file",
                redacted_url(&config.url)
            )));
        }
        let mut values: Vec<(&String, String)> = config.headers.iter().map(|(k, v)| (k, v.clone())).collect();
        for (key, var) in &config.headers_from_env {
            let value = std::env::var(var).map_err(|_| invalid(format!("header `{key}`: the environment variable `{var}` is not set")))?;
            values.push((key, value.trim().to_string()));
        }
        for (key, path) in &config.headers_from_file {
            let value = std::fs::read_to_string(path).map_err(|e| invalid(format!("header `{key}`: cannot read `{path}`: {e}")))?;
            values.push((key, value.trim().to_string()));
        }
        let mut headers = HeaderMap::new();
        for (key, value) in values {
            let header_name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| invalid(format!("`{key}` is not a valid header name")))?;
            if RESERVED_HEADERS.contains(&header_name.as_str()) {
                return Err(invalid(format!("header `{key}` is set by the server and cannot be configured")));
            }
            if headers.contains_key(&header_name) {
                return Err(invalid(format!("header `{key}` is set twice")));
            }
            let mut header_value =
                HeaderValue::from_str(&value).map_err(|_| invalid(format!("the value of header `{key}` is not valid")))?;
            // Kept out of HTTP/2 header compression tables and debug output.
            header_value.set_sensitive(true);
            headers.insert(header_name, header_value);
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { config, uri, headers, client })
    }

    /// The declaration this tool was built from.
    pub fn config(&self) -> &HttpToolConfig {
        &self.config
    }

    /// One request and its answer, without the timeout.
    async fn exchange(&self, body: Vec<u8>) -> Result<Value, ToolError> {
        let name = &self.config.name;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/plain;q=0.9, */*;q=0.5")
            .header(header::USER_AGENT, concat!("parley/", env!("CARGO_PKG_VERSION")));
        if let Some(headers) = builder.headers_mut() {
            headers.extend(self.headers.clone());
        }
        let request = builder.body(Full::new(Bytes::from(body))).map_err(|error| {
            tracing::error!(tool = %name, %error, "cannot build the HTTP tool request");
            ToolError::Failed(format!("the {name} service could not be called"))
        })?;

        let response = self.client.request(request).await.map_err(|error| {
            tracing::warn!(tool = %name, url = %redacted_url(&self.config.url), %error, connect = error.is_connect(), "HTTP tool request failed");
            let why = if error.is_connect() { "could not be reached" } else { "dropped the connection" };
            ToolError::Failed(format!("the {name} service {why}; it may be down, try again later"))
        })?;
        let status = response.status();
        let too_large = || ToolError::Failed(format!("the {name} service's answer is larger than {} KiB", MAX_RESPONSE_BYTES / 1024));
        let declared_length = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > MAX_RESPONSE_BYTES as u64) {
            tracing::warn!(tool = %name, ?declared_length, "HTTP tool answer too large");
            return Err(too_large());
        }
        let bytes = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                tracing::warn!(tool = %name, "HTTP tool answer too large");
                return Err(too_large());
            }
            Err(error) => {
                tracing::warn!(tool = %name, %error, "HTTP tool answer cut off");
                return Err(ToolError::Failed(format!("the {name} service's answer was cut off; try again")));
            }
        };

        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let excerpt: String = text.trim().chars().take(ERROR_EXCERPT_CHARS).collect();
            tracing::warn!(tool = %name, status = status.as_u16(), body = %crate::redact::Redacted(&excerpt), "HTTP tool answered an error");
            return Err(ToolError::Failed(if excerpt.is_empty() {
                format!("the service answered HTTP {}", status.as_u16())
            } else {
                format!("the service answered HTTP {}: {excerpt}", status.as_u16())
            }));
        }
        Ok(result_value(&bytes))
    }
}

/// What is POSTed: the model's arguments as a JSON object. A model that wrote them
/// as a JSON string, or wrote none, still gets its call made.
fn request_body(arguments: Value) -> Result<Vec<u8>, ToolError> {
    let object = match arguments {
        Value::Object(_) => arguments,
        Value::Null => json!({}),
        Value::String(ref text) => match serde_json::from_str::<Value>(text) {
            Ok(parsed @ Value::Object(_)) => parsed,
            _ => return Err(ToolError::InvalidArguments("the arguments must be a JSON object".into())),
        },
        _ => return Err(ToolError::InvalidArguments("the arguments must be a JSON object".into())),
    };
    serde_json::to_vec(&object).map_err(|error| ToolError::InvalidArguments(format!("the arguments cannot be sent: {error}")))
}

/// A 2xx answer as the tool's result: JSON as it is, anything else as text under
/// `result`, so the model always gets a JSON value.
fn result_value(bytes: &[u8]) -> Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return json!({ "result": "ok" });
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "result": String::from_utf8_lossy(bytes).trim() }))
}

impl Tool for HttpTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.config.name.clone(),
            description: self.config.description.clone(),
            parameters: self.config.parameters.clone(),
        }
    }

    fn call(&self, arguments: Value, _scope: &super::CallScope) -> ToolFuture<'_> {
        Box::pin(async move {
            let body = request_body(arguments)?;
            let limit = self.config.timeout_ms;
            match tokio::time::timeout(Duration::from_millis(limit), self.exchange(body)).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(tool = %self.config.name, timeout_ms = limit, "HTTP tool timed out");
                    Err(ToolError::Timeout(limit))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HttpToolConfig {
        HttpToolConfig {
            name: "store_hours".into(),
            description: "Opening hours.".into(),
            parameters: json!({"type": "object", "properties": {}}),
            url: "http://127.0.0.1:9/hours".into(),
            timeout_ms: 1000,
            headers: BTreeMap::new(),
            headers_from_env: BTreeMap::new(),
            headers_from_file: BTreeMap::new(),
        }
    }

    fn rejected(config: HttpToolConfig, expected: &str) {
        match HttpTool::new(config) {
            Err(ToolError::InvalidArguments(message)) => assert!(message.contains(expected), "{message}"),
            other => panic!("expected a configuration error containing {expected:?}, got {other:?}"),
        }
    }

    #[test]
    fn bad_declarations_say_what_to_fix() {
        rejected(HttpToolConfig { name: "has space".into(), ..config() }, "name");
        rejected(HttpToolConfig { description: " ".into(), ..config() }, "description");
        rejected(HttpToolConfig { parameters: json!({"type": "string"}), ..config() }, "parameters");
        rejected(HttpToolConfig { parameters: json!([]), ..config() }, "parameters");
        rejected(HttpToolConfig { timeout_ms: 0, ..config() }, "timeout_ms");
        rejected(HttpToolConfig { timeout_ms: MAX_TIMEOUT_MS + 1, ..config() }, "timeout_ms");
        rejected(HttpToolConfig { url: "https://example.com/x".into(), ..config() }, "https is not supported");
        rejected(HttpToolConfig { url: "ftp://example.com/x".into(), ..config() }, "http://host");
        rejected(HttpToolConfig { url: "not a url".into(), ..config() }, "not a valid URL");
        let headers = BTreeMap::from([("Content-Type".to_string(), "text/plain".to_string())]);
        rejected(HttpToolConfig { headers, ..config() }, "set by the server");
        let headers = BTreeMap::from([("bad header".to_string(), "x".to_string())]);
        rejected(HttpToolConfig { headers, ..config() }, "header name");
        let headers = BTreeMap::from([("x-token".to_string(), "line\nbreak".to_string())]);
        rejected(HttpToolConfig { headers, ..config() }, "not valid");
        assert!(HttpTool::new(config()).is_ok());
    }

    #[test]
    fn credentials_come_from_files_and_the_environment_and_never_show() {
        let dir = std::env::temp_dir().join(format!("parley-http-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "file-secret-42\n").expect("write");
        // A variable every test process has, so no environment is changed here.
        let (var, var_value) = std::env::vars().find(|(k, v)| k == "PATH" && !v.is_empty()).expect("PATH is set");
        let c = HttpToolConfig {
            headers_from_file: BTreeMap::from([("x-api-key".to_string(), file.display().to_string())]),
            headers_from_env: BTreeMap::from([("x-from-env".to_string(), var.clone())]),
            url: "http://127.0.0.1:9/hours?token=query-secret".into(),
            ..config()
        };
        let tool = HttpTool::new(c.clone()).expect("valid");
        assert_eq!(tool.headers.get("x-api-key").map(|v| v.as_bytes()), Some(&b"file-secret-42"[..]));
        assert!(tool.headers.get("x-api-key").is_some_and(HeaderValue::is_sensitive));
        assert_eq!(tool.headers.get("x-from-env").and_then(|v| v.to_str().ok()), Some(var_value.trim()));
        for shown in [format!("{tool:?}"), format!("{c:?}"), serde_json::to_string(&tool.spec()).expect("spec")] {
            assert!(!shown.contains("file-secret-42") && !shown.contains("query-secret"), "{shown}");
        }
        let missing = HttpToolConfig { headers_from_env: BTreeMap::from([("authorization".to_string(), "PARLEY_TEST_UNSET_VAR_X".to_string())]), ..config() };
        rejected(missing, "PARLEY_TEST_UNSET_VAR_X");
        let no_file = HttpToolConfig { headers_from_file: BTreeMap::from([("authorization".to_string(), "/nonexistent/secret".to_string())]), ..config() };
        rejected(no_file, "/nonexistent/secret");
        let twice = HttpToolConfig {
            headers: BTreeMap::from([("x-api-key".to_string(), "a".to_string())]),
            headers_from_file: BTreeMap::from([("X-Api-Key".to_string(), file.display().to_string())]),
            ..config()
        };
        rejected(twice, "set twice");
        rejected(HttpToolConfig { url: "http://user:pw@127.0.0.1:9/x".into(), ..config() }, "holds credentials");
    }

    #[test]
    fn arguments_become_a_json_object() {
        assert_eq!(request_body(json!({"a": 1})).ok(), Some(b"{\"a\":1}".to_vec()));
        assert_eq!(request_body(Value::Null).ok(), Some(b"{}".to_vec()));
        assert_eq!(request_body(json!("{\"a\": 1}")).ok(), Some(b"{\"a\":1}".to_vec()));
        assert!(matches!(request_body(json!([1])), Err(ToolError::InvalidArguments(_))));
        assert!(matches!(request_body(json!("plain")), Err(ToolError::InvalidArguments(_))));
    }

    #[test]
    fn answers_become_json_values() {
        assert_eq!(result_value(b"{\"open\": \"9-5\"}"), json!({"open": "9-5"}));
        assert_eq!(result_value(b"Open 9 to 5\n"), json!({"result": "Open 9 to 5"}));
        assert_eq!(result_value(b""), json!({"result": "ok"}));
    }

    #[test]
    fn declarations_reject_unknown_keys() {
        let text = r#"{"name": "x", "description": "d", "parameters": {}, "url": "http://a/", "timeout_ms": 5}"#;
        let parsed: HttpToolConfig = serde_json::from_str(text).expect("valid declaration");
        assert!(parsed.headers.is_empty());
        let misspelled = r#"{"name": "x", "description": "d", "parameters": {}, "url": "http://a/", "timeout": 5}"#;
        assert!(serde_json::from_str::<HttpToolConfig>(misspelled).is_err());
    }
}
