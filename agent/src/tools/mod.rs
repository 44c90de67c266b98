//! Tools the agent can run on the server: built-in ones compiled in (the pharmacy
//! desk) and HTTP tools declared in the configuration. Client tools (declared in
//! `session.update`, run by the client) are not here: the call hands those to the
//! transport as function-call events.

pub mod http;
pub mod pharmacy;

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
    /// Runs the tool. Blocking work (a database query) belongs on a blocking thread.
    fn call(&self, arguments: Value) -> ToolFuture<'_>;
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

    /// True when no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}
