//! Tools the agent can run on the server: built-in ones compiled in (the pharmacy
//! desk) and HTTP tools declared in the configuration. Client tools (declared in
//! `session.update`, run by the client) are not here: the call hands those to the
//! transport as function-call events.

pub mod http;
pub mod pharmacy;
mod scope;
pub mod spoken;

pub use scope::CallScope;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parley_llm::ToolSpec;
use serde_json::Value;

/// Why a tool failed. The message is given to the model as the tool's result, so it
/// can explain the failure to the caller; it must not leak internals.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ToolError {
    /// The arguments do not fit the tool's schema.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The tool ran but could not do what was asked (unknown member, …).
    #[error("{0}")]
    Failed(String),
    /// The tool declined, and says why in a sentence written for the caller (a
    /// desk's "Sorry, that member ID and date of birth don't match our records."):
    /// its result carries the sentence as `say` too, to be spoken as it is.
    #[error("{0}")]
    Declined(String),
    /// The tool did not answer in time.
    #[error("the tool did not answer within {0} ms")]
    Timeout(u64),
}

/// The future a tool returns.
pub type ToolFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, ToolError>> + Send + 'a>>;

/// A tool run by the server.
pub trait Tool: Send + Sync {
    /// Name, description and JSON-schema parameters, as the model sees them.
    fn spec(&self) -> ToolSpec;
    /// The spec as a model of this family reads it best (`model` is the engine's
    /// name, e.g. `candle:qwen2.5-coder-0.5b-instruct-q4_k_m`): tools whose wording
    /// lives in per-family prompt files pick it here. Defaults to [`Tool::spec`].
    fn spec_for(&self, model: &str) -> ToolSpec {
        let _ = model;
        self.spec()
    }
    /// Text added to the system prompt while this tool is offered (how a desk works,
    /// a short example), for the model named `model`. Tools of one desk return the
    /// same text; the registry says it once.
    fn guidance(&self, model: &str) -> Option<String> {
        let _ = model;
        None
    }
    /// Runs the tool for the call whose memory is `scope`. Blocking work (a database
    /// query) belongs on a blocking thread.
    fn call(&self, arguments: Value, scope: &CallScope) -> ToolFuture<'_>;
}

/// The server-side tools available to calls, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl ToolRegistry {
    /// Adds (or replaces) a tool under its spec's name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.spec().name, tool);
    }

    /// The tool with this name.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.tools.get(name).cloned()
    }

    /// Every tool's spec, in name order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec()).collect()
    }

    /// Every tool's spec as the model named `model` should see it, in name order.
    pub fn specs_for(&self, model: &str) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec_for(model)).collect()
    }

    /// The tools' guidance for the system prompt, each distinct text once, in name
    /// order of the first tool giving it; `None` when no tool gives any.
    pub fn guidance(&self, model: &str) -> Option<String> {
        let mut texts: Vec<String> = Vec::new();
        for text in self.tools.values().filter_map(|t| t.guidance(model)) {
            let text = text.trim().to_string();
            if !text.is_empty() && !texts.contains(&text) {
                texts.push(text);
            }
        }
        (!texts.is_empty()).then(|| texts.join("\n\n"))
    }

    /// The system prompt and tool specs a model named `model` is given: `instructions`
    /// followed by the tools' guidance, and every spec in that family's words.
    pub fn prompt_for(&self, model: &str, instructions: &str) -> (String, Vec<ToolSpec>) {
        let instructions = match self.guidance(model) {
            Some(guidance) => format!("{}\n\n{guidance}", instructions.trim_end()),
            None => instructions.to_string(),
        };
        (instructions, self.specs_for(model))
    }

    /// True when no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}
