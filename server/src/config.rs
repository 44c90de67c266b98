//! The configuration file: one TOML document, unknown keys rejected, every field
//! defaulted, validated into the settings the server runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use parley_agent::{SessionSettings, TurnDetection};
use parley_audio::vad::TurnSettings;
use serde::Deserialize;

/// The whole configuration file. `parley config` prints the defaults.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub agent: AgentConfig,
    pub asr: AsrConfig,
    pub llm: LlmConfig,
    pub tts: TtsConfig,
    pub tools: ToolsConfig,
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
    /// API keys accepted as `Authorization: Bearer KEY`; empty means no auth.
    pub api_keys: Vec<String>,
}

/// Where the model files live.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Folder `parley models install` fills; empty means `$PARLEY_MODELS_DIR` or
    /// `~/.cache/parley/models`.
    pub dir: String,
}

/// Defaults for each call, which `session.update` can change.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
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
}

/// Speech-to-text settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    /// CPU threads per transcription.
    pub threads: usize,
}

/// Language-model settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Dequantize weights to f32 at load: about 2 GB of RAM for a much faster
    /// prefill on CPUs (candle's quantized CPU kernels are slow).
    pub dequantize: bool,
    /// Context window used per call, in tokens.
    pub context: usize,
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
        Self { listen: "127.0.0.1:8080".into(), max_calls: 16, max_message_bytes: 512 * 1024, max_call_seconds: 3600, api_keys: Vec::new() }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self { dir: String::new() }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        let session = SessionSettings::default();
        Self {
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
        }
    }
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self { threads: 2 }
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        use parley_llm::remote::config::{DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_HEALTH_INTERVAL_MS, DEFAULT_REQUEST_TIMEOUT_MS};
        Self {
            dequantize: true,
            context: 4096,
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

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            models: ModelsConfig::default(),
            agent: AgentConfig::default(),
            asr: AsrConfig::default(),
            llm: LlmConfig::default(),
            tts: TtsConfig::default(),
            tools: ToolsConfig::default(),
        }
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
        let t = &self.agent.turn_detection;
        if !(0.0..=1.0).contains(&t.threshold) {
            bail!("agent.turn_detection.threshold must be between 0 and 1, not {}", t.threshold);
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
        if self.tools.max_rounds == 0 {
            bail!("tools.max_rounds must be at least 1");
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
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_values_are_explained() {
        let mut c = Config::default();
        c.agent.turn_detection.threshold = 2.0;
        assert!(c.validate().expect_err("invalid").to_string().contains("threshold"));
    }
}
