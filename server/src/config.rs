//! The configuration file: one TOML document, unknown keys rejected, every field
//! defaulted, validated into the settings the server runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use parley_agent::{InterruptionSettings, SessionSettings, TurnDetection};
use parley_audio::vad::TurnSettings;
use serde::Deserialize;

/// The whole configuration file. `parley config` prints the defaults.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub agent: AgentConfig,
    pub asr: AsrConfig,
    pub llm: LlmConfig,
    pub tts: TtsConfig,
    pub tools: ToolsConfig,
    pub twilio: TwilioConfig,
    pub sip: SipConfig,
    pub web: WebConfig,
    pub logging: LoggingConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// What goes into the logs.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Replace phone numbers, card numbers, e-mail addresses and SSN-like numbers
    /// (written or spoken as words) in logged transcripts, model text and tool
    /// arguments and results with `[phone]`, `[card]`, `[email]`, `[ssn]`. Only the
    /// logs: callers and the model see the real text.
    pub redact: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { redact: true }
    }
}

/// The SIP bridge: calls from SIP trunks and PBXs (SIP over UDP, G.711 RTP).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// HOST:PORT to receive SIP on (UDP), e.g. `0.0.0.0:5060`; empty turns the bridge off.
    pub listen: String,
    /// The IP address the trunk reaches us at, written into SDP `c=` lines and the
    /// Contact header (this host's public address behind NAT). Empty uses the
    /// listen address, which must then not be 0.0.0.0.
    pub public_address: String,
    /// RTP ports to use, `LOW-HIGH` inclusive (open them in the firewall); empty
    /// lets the system pick any free port.
    pub rtp_ports: String,
    /// A call with no RTP from the caller for this long is hung up (not while on
    /// hold); 0 never.
    pub rtp_timeout_seconds: u64,
    /// How long to ring (180) before answering, in milliseconds.
    pub ring_ms: u64,
    /// What the agent says when a call connects; empty waits for the caller.
    pub greeting: String,
    /// Where the `transfer_call` tool hands a caller to a person (SIP REFER's
    /// Refer-To), e.g. `sip:desk@pbx.example`; empty: the tool is not offered.
    pub transfer_target: String,
    /// What the agent says before it transfers the caller (not interruptible); empty
    /// transfers without a word.
    pub transfer_say: String,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            public_address: String::new(),
            rtp_ports: String::new(),
            rtp_timeout_seconds: 30,
            ring_ms: 0,
            greeting: String::new(),
            transfer_target: String::new(),
            transfer_say: "Transferring you now.".into(),
        }
    }
}

impl SipConfig {
    /// Where to listen, when the bridge is on.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).with_context(|| format!("sip.listen `{}` is not HOST:PORT", self.listen))
    }

    /// The address for `c=` and Contact.
    pub fn public_ip(&self) -> Result<Option<std::net::IpAddr>> {
        let Some(listen) = self.listen_addr()? else { return Ok(None) };
        if self.public_address.is_empty() {
            if listen.ip().is_unspecified() {
                bail!("sip.listen `{}` binds every address: set sip.public_address to the IP the trunk reaches this host at", self.listen);
            }
            return Ok(Some(listen.ip()));
        }
        let ip: std::net::IpAddr = self.public_address.parse().with_context(|| format!("sip.public_address `{}` is not an IP address", self.public_address))?;
        if ip.is_unspecified() {
            bail!("sip.public_address must be a reachable address, not {ip}");
        }
        Ok(Some(ip))
    }

    /// The RTP port range.
    pub fn rtp_port_range(&self) -> Result<Option<(u16, u16)>> {
        if self.rtp_ports.trim().is_empty() {
            return Ok(None);
        }
        let parsed = self.rtp_ports.split_once('-').and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
        match parsed {
            Some((lo, hi)) if lo > 0 && lo < hi => Ok(Some((lo, hi))),
            _ => bail!("sip.rtp_ports `{}` is not LOW-HIGH (two ports, LOW below HIGH)", self.rtp_ports),
        }
    }

    /// The transfer target (a `sip:`, `sips:` or `tel:` URI), when transfers are on.
    pub fn transfer_uri(&self) -> Result<Option<String>> {
        let target = self.transfer_target.trim();
        if target.is_empty() {
            return Ok(None);
        }
        let scheme_ok = ["sip:", "sips:", "tel:"].iter().any(|s| target.len() > s.len() && target.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)));
        if !scheme_ok || target.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>') {
            bail!("sip.transfer_target `{target}` is not a SIP URI (sip:user@host, sips:… or tel:…)");
        }
        Ok(Some(target.to_string()))
    }
}

/// What browsers get: the demo page and client secrets.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the browser demo page at `/` (its files under `/demo/`).
    pub demo: bool,
    /// Lifetime of a client secret (`POST /v1/realtime/client_secrets`) whose request
    /// does not say, in seconds.
    pub client_secret_seconds: u64,
    /// Shortest lifetime a request may ask for, in seconds (OpenAI's is 10).
    pub client_secret_min_seconds: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self { demo: true, client_secret_seconds: 600, client_secret_min_seconds: 10 }
    }
}

/// Phone gateways on `/twilio` (Twilio Media Streams; Telnyx, Fonoster).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    /// This server's public base URL as the gateway reaches it (`https://voice.example.com`),
    /// for the TwiML `<Stream>` URL and signatures; empty uses the request's Host.
    pub public_url: String,
    /// The Twilio auth token: when set, `/twilio/voice` and `/twilio` require a valid
    /// `X-Twilio-Signature`. Empty checks nothing.
    pub auth_token: String,
    /// What the agent says when a call connects; empty waits for the caller.
    pub greeting: String,
}

/// Tools the server runs for every call.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Offer the built-in demo pharmacy desk (SQLite, created and seeded on first run).
    pub pharmacy: bool,
    /// Its database file; empty means `~/.cache/parley/pharmacy.sqlite`.
    pub pharmacy_db: String,
    /// A server tool that takes longer fails with an explained timeout.
    pub timeout_ms: u64,
    /// After this long without an answer the agent says `holding_phrase`.
    pub holding_after_ms: u64,
    /// What the agent says while a slow tool runs; empty says nothing.
    pub holding_phrase: String,
    /// Most model → tool → model rounds per response.
    pub max_rounds: usize,
    /// HTTP tools: the server POSTs the arguments as JSON to `url`.
    pub http: Vec<parley_agent::tools::http::HttpToolConfig>,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        let p = parley_agent::ToolPolicy::default();
        Self {
            pharmacy: true,
            pharmacy_db: String::new(),
            timeout_ms: p.timeout_ms,
            holding_after_ms: p.holding_after_ms,
            holding_phrase: p.holding_phrase,
            max_rounds: p.max_rounds,
            http: Vec::new(),
        }
    }
}

/// Listener and limits.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (HTTP/1.1 and HTTP/2 cleartext).
    pub listen: String,
    /// Calls served at once; more are refused with 503.
    pub max_calls: usize,
    /// Largest client message accepted, in bytes; larger ones get an `error` event.
    pub max_message_bytes: usize,
    /// Longest call, in seconds; 0 means no limit.
    pub max_call_seconds: u64,
    /// API keys accepted as `Authorization: Bearer KEY`; with none here, in
    /// `api_key_sha256` or in a keys file, there is no auth. Hashed at load; better
    /// kept out of this file (`api_key_sha256`, `api_keys_file`, `PARLEY_API_KEYS`).
    pub api_keys: Vec<String>,
    /// API keys by their SHA-256 digest (64 hex digits, `printf %s KEY | sha256sum`),
    /// so the config file holds no key.
    pub api_key_sha256: Vec<String>,
    /// A file of API keys (also `PARLEY_API_KEYS_FILE`): one per line, `#` comments,
    /// `sha256:HEX` lines are digests. Read at start.
    pub api_keys_file: String,
    /// Per-key call rates and concurrency, per-address connections.
    pub limits: crate::limits::LimitsConfig,
    /// What SIGTERM does to calls in progress.
    pub drain: DrainConfig,
    /// Longest one write to a client may take, in milliseconds: a client that stops
    /// reading is cut off after this and its call slot freed.
    pub write_timeout_ms: u64,
    /// TLS on the listener (`cert`, `key` PEM files); absent means plain TCP.
    pub tls: crate::listener::TlsConfig,
    /// The listener's HTTP/1 and HTTP/2 limits.
    pub http: crate::listener::HttpLimits,
    /// Amazon SageMaker mode (`parley serve --sagemaker`, `PARLEY_SAGEMAKER=true`, or the
    /// container's `serve` command): SageMaker's sidecar, which authenticates callers
    /// itself (IAM), opens `/invocations-bidirectional-stream` without an API key, so
    /// that path is served without one; the listener defaults to 0.0.0.0:8080.
    pub sagemaker: bool,
}

/// `[server.drain]`: a graceful stop. On SIGTERM (or Ctrl-C) the server stops
/// admitting calls (503 with `Retry-After`, `/readyz` 503), lets the calls in
/// progress go on for up to `timeout_s`, then ends each with `goodbye`, spoken in the
/// call's voice, and a clean close; the process then exits 0.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Seconds calls in progress may go on after the signal; 0 says goodbye at once.
    pub timeout_s: u64,
    /// What the agent says to each call still open when the time is up; empty ends
    /// calls without a word.
    pub goodbye: String,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { timeout_s: 30, goodbye: "I'm sorry, this line is closing for maintenance. Please call again in a minute. Goodbye.".into() }
    }
}

impl ServerConfig {
    /// Gathers every API key (`api_keys`, `api_keys_file`, the keys in `env_keys`,
    /// `PARLEY_API_KEYS`'s comma-separated list) into `api_key_sha256` as digests
    /// and clears the plain ones, so nothing downstream holds a key in the clear.
    pub fn resolve_api_keys(&mut self, env_keys: Option<&str>) -> Result<()> {
        let mut digests: Vec<String> = self.api_keys.drain(..).map(|k| crate::keys::ApiKeys::digest_hex(&k)).collect();
        if !self.api_keys_file.is_empty() {
            digests.extend(crate::keys::read_keys_file(Path::new(&self.api_keys_file))?);
        }
        if let Some(env) = env_keys {
            digests.extend(env.split(',').map(str::trim).filter(|k| !k.is_empty()).map(crate::keys::ApiKeys::digest_hex));
        }
        for d in std::mem::take(&mut self.api_key_sha256) {
            crate::keys::check_digest(&d).context("server.api_key_sha256")?;
            digests.push(d.trim().trim_start_matches("sha256:").to_ascii_lowercase());
        }
        digests.sort();
        digests.dedup();
        self.api_key_sha256 = digests;
        Ok(())
    }
}

/// Where the model files live, and which embedded language model to run.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Folder `parley models install` fills; empty means `$PARLEY_MODELS_DIR` or
    /// `~/.cache/parley/models`.
    pub dir: String,
    /// The embedded language model, by name: `qwen2.5-coder-0.5b` (installed by
    /// default) or `qwen2.5-coder-1.5b` (better at tools, about 3x slower; install it
    /// with `parley models install --extra qwen1.5b`).
    pub llm: String,
    /// A Qwen2 GGUF file to run instead of the named model; empty means `llm`.
    pub llm_gguf: String,
    /// Its `tokenizer.json`; empty means built from the GGUF's metadata at load.
    pub llm_tokenizer: String,
}

impl ModelsConfig {
    /// Checks the model choice: a known name, or a GGUF file for a tokenizer file.
    pub fn validate(&self) -> Result<()> {
        if self.llm_gguf.is_empty() {
            if !self.llm_tokenizer.is_empty() {
                bail!("models.llm_tokenizer is set without models.llm_gguf");
            }
            crate::models::llm_model(&self.llm).context("models.llm")?;
        }
        Ok(())
    }
}

/// What answers the caller.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// The models: speech-to-text, the language model and the voice.
    #[default]
    Models,
    /// No models (ready at once): each caller turn is played back after it ends,
    /// through the same turn-taking, barge-in and pacing. For load tests of the
    /// transports and gateway integration tests.
    Echo,
}

/// Defaults for each call, which `session.update` can change.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `models` (the default) or `echo` (see [`AgentMode`]).
    pub mode: AgentMode,
    /// System prompt.
    pub instructions: String,
    /// Longest reply, in tokens.
    pub max_response_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Outbound audio frame length in milliseconds.
    pub frame_ms: u32,
    /// How far ahead of real time outbound audio may run, in milliseconds.
    pub lead_ms: u32,
    /// Server-side turn detection defaults.
    pub turn_detection: TurnDetectionConfig,
}

/// Server VAD defaults (the Realtime protocol's `server_vad`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TurnDetectionConfig {
    /// Off means clients commit turns themselves.
    pub enabled: bool,
    /// VAD probability that counts as speech.
    pub threshold: f32,
    /// Audio kept before the detected start of speech.
    pub prefix_padding_ms: u32,
    /// Silence that ends a turn.
    pub silence_duration_ms: u32,
    /// Shorter bursts are not speech.
    pub min_speech_ms: u32,
    /// Answer as soon as a turn ends.
    pub create_response: bool,
    /// Caller speech interrupts the agent.
    pub interrupt_response: bool,
    /// Longest silence before committing a turn that sounds unfinished (a number
    /// being read out, a trailing "and"); equal to `silence_duration_ms` turns it off.
    pub unfinished_silence_ms: u32,
    /// Silence after which a turn whose early transcript reads as a finished
    /// question ends, before the rest of the silence window; at least
    /// `silence_duration_ms` turns it off.
    pub complete_silence_ms: u32,
    /// How often partial transcripts are made while the caller speaks (0 = off).
    pub partial_interval_ms: u32,
    /// Speech over the agent shorter than this does not even pause it.
    pub min_pause_ms: u32,
    /// Words that acknowledge without taking the turn; speech of only these (or of
    /// no words, like a cough) lets the paused reply resume.
    pub backchannels: Vec<String>,
    /// Ignore speech over the agent that is the agent's own echo.
    pub echo_guard: bool,
    /// Envelope correlation (0..1) at which input counts as echo.
    pub echo_correlation: f32,
}

/// Speech-to-text settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    /// CPU threads per transcription.
    pub threads: usize,
    /// Words the callers are expected to say, given to Whisper as the text before
    /// each utterance, so domain words (drug names) are heard as such. Empty: none.
    pub prompt: String,
    /// With the pharmacy desk on and no `prompt`, prompt with the desk's vocabulary
    /// (how ids sound, the medications and prescribers on record). Off by default:
    /// with tiny.en it mends some words ("refill", "date of birth") and garbles
    /// others ("order ORD003"); see README, Configuration.
    pub desk_vocabulary: bool,
}

/// Language-model settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Dequantize weights to f32 at load: about 2 GB of RAM and a slower decode
    /// (four times the bytes read per token); only for comparison. Off, the weights
    /// stay quantized and formats without a SIMD kernel become Q8_0 at load.
    pub dequantize: bool,
    /// Keep the model file's Q5_0 matrices as stored (CPUs with AVX2 and without
    /// AVX-VNNI) instead of converting them to Q8_0: about 90 MB less resident for
    /// the 0.5B model, decoding a few percent slower where the CPU, not memory, is
    /// the limit. Off by default.
    pub keep_q5_0: bool,
    /// Threads the embedded model's matrix products use, 0 for one per core
    /// (`PARLEY_MODEL_THREADS` when set). A product runs on the calling thread plus
    /// the pool's helpers that are free; a second call's product meanwhile runs on its
    /// own thread instead of waiting (`RAYON_NUM_THREADS`, for attention's f32
    /// products, wins when set).
    pub threads: usize,
    /// Context window used per call, in tokens.
    pub context: usize,
    /// Memory, in MiB, that all calls' KV caches (embedded model) may hold together;
    /// past it the least recently used idle calls lose theirs and re-prefill their
    /// next turn. The shared system-prompt caches count too, within an eighth of it.
    pub kv_cache_mb: usize,
    /// Keep each call's KV cache between turns (only new tokens are prefilled) and
    /// share system-prompt caches between calls; `false` prefills every turn from
    /// scratch, for benchmarks.
    pub kv_reuse: bool,
    /// Hold the embedded model's tool calls to a grammar: an offered tool, arguments
    /// valid against its schema, ids only ones the conversation holds. `false` samples
    /// calls freely and parses them after (for comparison only).
    pub constrain_tool_calls: bool,
    /// OpenAI-compatible servers (vLLM, SGLang, llama.cpp, another Parley) used
    /// instead of the embedded model; empty means the embedded model. A call sticks
    /// to one replica; a failed replica's calls move to a healthy one.
    pub replicas: Vec<parley_llm::remote::ReplicaConfig>,
    /// Longest silence from a replica before it counts as failed.
    pub request_timeout_ms: u64,
    /// How often replicas are health-checked.
    pub health_interval_ms: u64,
    /// Connection timeout to a replica.
    pub connect_timeout_ms: u64,
}

/// Speech-synthesis settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// Voice name reported to clients.
    pub voice: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8080".into(), max_calls: 16, max_message_bytes: 512 * 1024, max_call_seconds: 3600, api_keys: Vec::new(), api_key_sha256: Vec::new(), api_keys_file: String::new(), limits: Default::default(), drain: Default::default(), write_timeout_ms: 10_000, tls: Default::default(), http: Default::default(), sagemaker: false }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self { dir: String::new(), llm: crate::models::DEFAULT_LLM.into(), llm_gguf: String::new(), llm_tokenizer: String::new() }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        let session = SessionSettings::default();
        Self {
            mode: AgentMode::default(),
            instructions: session.instructions,
            max_response_tokens: session.generate.max_tokens,
            temperature: session.generate.temperature,
            frame_ms: session.pacing.frame_ms,
            lead_ms: session.pacing.lead_ms,
            turn_detection: TurnDetectionConfig::default(),
        }
    }
}

impl Default for TurnDetectionConfig {
    fn default() -> Self {
        let d = TurnDetection::default();
        Self {
            enabled: true,
            threshold: d.vad.threshold,
            prefix_padding_ms: d.vad.prefix_padding_ms,
            silence_duration_ms: d.vad.silence_duration_ms,
            min_speech_ms: d.vad.min_speech_ms,
            create_response: d.create_response,
            interrupt_response: d.interrupt_response,
            unfinished_silence_ms: d.unfinished_silence_ms,
            complete_silence_ms: d.complete_silence_ms,
            partial_interval_ms: d.partial_interval_ms,
            min_pause_ms: d.interruption.min_pause_ms,
            backchannels: d.interruption.backchannels,
            echo_guard: d.interruption.echo_guard,
            echo_correlation: d.interruption.echo_correlation,
        }
    }
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self { threads: 2, prompt: String::new(), desk_vocabulary: false }
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        use parley_llm::remote::config::{DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_HEALTH_INTERVAL_MS, DEFAULT_REQUEST_TIMEOUT_MS};
        Self {
            dequantize: false,
            keep_q5_0: false,
            threads: 0,
            context: 4096,
            kv_cache_mb: parley_llm::engine::DEFAULT_KV_BUDGET_BYTES >> 20,
            kv_reuse: true,
            constrain_tool_calls: true,
            replicas: Vec::new(),
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self { voice: "joe".into() }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
        let config: Config = toml::from_str(&text).with_context(|| format!("{} is not a valid Parley config (see `parley config` for every key)", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        self.listen_addr()?;
        self.sip.public_ip()?;
        self.sip.rtp_port_range()?;
        self.sip.transfer_uri()?;
        self.models.validate()?;
        self.server.http.validate()?;
        self.telemetry.validate()?;
        self.server.limits.validate().map_err(anyhow::Error::msg)?;
        for d in &self.server.api_key_sha256 {
            crate::keys::check_digest(d).context("server.api_key_sha256")?;
        }
        if self.server.write_timeout_ms == 0 {
            bail!("server.write_timeout_ms must be above 0");
        }
        let url = &self.twilio.public_url;
        if !url.is_empty() && !url.starts_with("https://") && !url.starts_with("http://") {
            bail!("twilio.public_url must start with https:// (or http://), not `{url}`");
        }
        let t = &self.agent.turn_detection;
        if !(0.0..=1.0).contains(&t.threshold) {
            bail!("agent.turn_detection.threshold must be between 0 and 1, not {}", t.threshold);
        }
        if t.unfinished_silence_ms < t.silence_duration_ms {
            bail!("agent.turn_detection.unfinished_silence_ms ({}) must be at least silence_duration_ms ({})", t.unfinished_silence_ms, t.silence_duration_ms);
        }
        if !(0.0..=1.0).contains(&t.echo_correlation) {
            bail!("agent.turn_detection.echo_correlation must be between 0 and 1, not {}", t.echo_correlation);
        }
        if !(10..=120).contains(&self.agent.frame_ms) {
            bail!("agent.frame_ms must be between 10 and 120, not {}", self.agent.frame_ms);
        }
        if self.server.max_calls == 0 {
            bail!("server.max_calls must be at least 1");
        }
        if let Some(remote) = self.remote_llm() {
            remote.validate().context("llm.replicas")?;
        }
        if self.llm.kv_cache_mb == 0 {
            bail!("llm.kv_cache_mb must be at least 1");
        }
        if self.llm.kv_cache_mb.checked_mul(1 << 20).is_none() {
            bail!("llm.kv_cache_mb {} is too large", self.llm.kv_cache_mb);
        }
        if self.tools.max_rounds == 0 {
            bail!("tools.max_rounds must be at least 1");
        }
        let w = &self.web;
        if w.client_secret_min_seconds == 0 || !(w.client_secret_min_seconds..=crate::web::MAX_SECRET_SECONDS).contains(&w.client_secret_seconds) {
            bail!(
                "web.client_secret_seconds ({}) must be between web.client_secret_min_seconds ({}, at least 1) and {}",
                w.client_secret_seconds,
                w.client_secret_min_seconds,
                crate::web::MAX_SECRET_SECONDS
            );
        }
        if self.server.max_message_bytes < 1024 {
            bail!("server.max_message_bytes must be at least 1024");
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.server.listen.parse().with_context(|| format!("server.listen `{}` is not HOST:PORT", self.server.listen))
    }

    /// The remote replica pool's settings, when replicas are configured.
    pub fn remote_llm(&self) -> Option<parley_llm::remote::RemoteConfig> {
        (!self.llm.replicas.is_empty()).then(|| parley_llm::remote::RemoteConfig {
            replicas: self.llm.replicas.clone(),
            request_timeout_ms: self.llm.request_timeout_ms,
            health_interval_ms: self.llm.health_interval_ms,
            connect_timeout_ms: self.llm.connect_timeout_ms,
        })
    }

    /// The pharmacy database file after defaults.
    pub fn pharmacy_db(&self) -> PathBuf {
        if self.tools.pharmacy_db.is_empty() {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            home.join(".cache/parley/pharmacy.sqlite")
        } else {
            PathBuf::from(&self.tools.pharmacy_db)
        }
    }

    /// The models folder after defaults and environment.
    pub fn models_dir(&self) -> PathBuf {
        if self.models.dir.is_empty() { crate::models::default_dir() } else { PathBuf::from(&self.models.dir) }
    }

    /// The settings a new call starts with.
    pub fn session_defaults(&self) -> SessionSettings {
        let mut s = SessionSettings::default();
        let a = &self.agent;
        s.instructions = a.instructions.clone();
        s.generate.max_tokens = a.max_response_tokens;
        s.generate.temperature = a.temperature;
        s.pacing.frame_ms = a.frame_ms;
        s.pacing.lead_ms = a.lead_ms;
        s.voice = self.tts.voice.clone();
        s.tool_policy = parley_agent::ToolPolicy {
            timeout_ms: self.tools.timeout_ms,
            holding_after_ms: self.tools.holding_after_ms,
            holding_phrase: self.tools.holding_phrase.clone(),
            max_rounds: self.tools.max_rounds,
        };
        let t = &a.turn_detection;
        s.turn_detection = t.enabled.then(|| TurnDetection {
            vad: TurnSettings {
                threshold: t.threshold,
                prefix_padding_ms: t.prefix_padding_ms,
                silence_duration_ms: t.silence_duration_ms,
                min_speech_ms: t.min_speech_ms,
            },
            create_response: t.create_response,
            interrupt_response: t.interrupt_response,
            unfinished_silence_ms: t.unfinished_silence_ms,
            complete_silence_ms: t.complete_silence_ms,
            partial_interval_ms: t.partial_interval_ms,
            interruption: InterruptionSettings {
                min_pause_ms: t.min_pause_ms,
                backchannels: t.backchannels.clone(),
                echo_guard: t.echo_guard,
                echo_correlation: t.echo_correlation,
            },
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_transfer_target_must_be_a_sip_uri() {
        let with = |t: &str| SipConfig { transfer_target: t.into(), ..SipConfig::default() }.transfer_uri();
        assert_eq!(with("").expect("empty is off"), None);
        assert_eq!(with(" sip:desk@pbx.example ").expect("sip"), Some("sip:desk@pbx.example".into()));
        assert_eq!(with("tel:+15551234567").expect("tel"), Some("tel:+15551234567".into()));
        for bad in ["desk@pbx.example", "sip:", "sip:desk@pbx example", "<sip:desk@pbx>", "sip:a\r\nX: y", "é:x"] {
            assert!(with(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&Config::default()).expect("serialize");
        let back: Config = toml::from_str(&text).expect("parse");
        assert_eq!(back, Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").expect_err("typo must fail");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn api_keys_are_gathered_as_digests_and_none_stays_in_the_clear() {
        let dir = std::env::temp_dir().join(format!("parley-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("keys");
        std::fs::write(&file, "# ops\nsk-file\n").expect("write");
        let hashed = crate::keys::ApiKeys::digest_hex("sk-hashed");
        let text = format!("[server]\napi_keys = [\"sk-inline\"]\napi_key_sha256 = [\"{hashed}\"]\napi_keys_file = \"{}\"\n", file.display());
        let mut c: Config = toml::from_str(&text).expect("parse");
        c.validate().expect("valid");
        c.server.resolve_api_keys(Some("sk-env-1, sk-env-2,")).expect("resolve");
        assert!(c.server.api_keys.is_empty());
        let printed = toml::to_string(&c).expect("serialize");
        assert!(!printed.contains("sk-"), "no plain key left: {printed}");
        let keys = crate::keys::ApiKeys::from_digests(&c.server.api_key_sha256).expect("digests");
        assert_eq!(keys.len(), 5);
        for k in ["sk-inline", "sk-hashed", "sk-file", "sk-env-1", "sk-env-2"] {
            assert!(keys.find(k).is_some(), "{k}");
        }
        let mut bad = Config::default();
        bad.server.api_key_sha256 = vec!["not hex".into()];
        assert!(bad.validate().expect_err("bad digest").to_string().contains("api_key_sha256"));
        let mut missing = Config::default();
        missing.server.api_keys_file = "/nonexistent/parley-keys".into();
        assert!(missing.server.resolve_api_keys(None).is_err());
    }

    #[test]
    fn the_echo_mode_parses() {
        let c: Config = toml::from_str("[agent]\nmode = \"echo\"\n").expect("parse");
        assert_eq!(c.agent.mode, AgentMode::Echo);
        assert_eq!(Config::default().agent.mode, AgentMode::Models);
        assert!(toml::from_str::<Config>("[agent]\nmode = \"parrot\"\n").is_err());
    }

    #[test]
    fn bad_values_are_explained() {
        let mut c = Config::default();
        c.agent.turn_detection.threshold = 2.0;
        assert!(c.validate().expect_err("invalid").to_string().contains("threshold"));
    }

    #[test]
    fn kv_cache_settings_parse_and_a_zero_budget_is_refused() {
        let c: Config = toml::from_str("[llm]\nkv_cache_mb = 256\nkv_reuse = false\n").expect("parse");
        assert_eq!((c.llm.kv_cache_mb, c.llm.kv_reuse), (256, false));
        c.validate().expect("valid");
        assert_eq!((Config::default().llm.kv_cache_mb, Config::default().llm.kv_reuse), (1024, true));
        let mut c = Config::default();
        c.llm.kv_cache_mb = 0;
        assert!(c.validate().expect_err("invalid").to_string().contains("kv_cache_mb"));
    }
}
