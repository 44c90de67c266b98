//! Remote engines: any OpenAI-compatible chat-completions server (vLLM, SGLang,
//! llama.cpp's `llama-server`, another Parley) as a pool of replicas behind the same
//! [`LlmEngine`](crate::LlmEngine) / [`LlmSession`](crate::LlmSession) traits as the
//! embedded engine, so the agent does not know which one it talks to.
//!
//! The embedded engine keeps one KV cache per call; a remote server keeps a prefix
//! cache per replica. Sending every turn of a call to the same replica (session
//! routing) is what makes that cache hit, so each turn only prefills its new tokens.
//! See [`RemotePool`] for routing, health checks and failover.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use parley_llm::remote::{RemoteConfig, RemotePool, ReplicaConfig};
//! use parley_llm::{ChatMessage, GenerateOptions, LlmEngine, Role};
//!
//! # fn main() -> Result<(), parley_llm::LlmError> {
//! let pool = RemotePool::new(RemoteConfig {
//!     replicas: vec![
//!         ReplicaConfig { name: "a".into(), base_url: "http://10.0.0.5:8000/v1".into(), api_key: None, model: "qwen2.5-0.5b-instruct".into(), forward_repeat_penalty: false },
//!         ReplicaConfig { name: "b".into(), base_url: "http://10.0.0.6:8000/v1".into(), api_key: None, model: "qwen2.5-0.5b-instruct".into(), forward_repeat_penalty: false },
//!     ],
//!     ..RemoteConfig::default()
//! })?;
//! let mut session = pool.new_session(); // one per call: sticks to one replica
//! let messages = vec![ChatMessage::new(Role::User, "What is the capital of France?")];
//! let stats = session.generate(&messages, &GenerateOptions::default(), &mut |piece| {
//!     print!("{piece}");
//!     ControlFlow::Continue(()) // Break on barge-in: the request is dropped
//! })?;
//! # let _ = stats;
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`config`] (the TOML settings), [`sse`] (the event-stream decoder),
//! [`wire`] (request and chunk JSON, tool-call fragments), `http` (the hyper client
//! and health probe), `pool` (routing and failover).

pub mod config;
mod http;
mod pool;
pub mod sse;
pub mod wire;

pub use config::{RemoteConfig, ReplicaConfig};
pub use pool::{RemotePool, RemoteSession, ReplicaStats};

#[cfg(test)]
mod tests;
