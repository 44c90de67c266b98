//! Running one scripted conversation through the real agent, in-process: a
//! [`Call`] on the loaded engines with a fresh pharmacy database, each user turn
//! sent as text, everything the agent did collected per turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parley_agent::tools::ToolRegistry;
use parley_agent::tools::pharmacy::{PharmacyDb, pharmacy_tools};
use parley_agent::{AgentEvent, Call, CallInput, Engines, ResponseStatus, SessionSettings};
use tokio::sync::mpsc;

use super::check::TurnRecord;
use super::set::Conversation;

/// What running a conversation needs: the models, the call settings, a time limit.
pub struct Driver {
    /// Models shared by every conversation; the tools are replaced per conversation.
    pub engines: Engines,
    pub settings: SessionSettings,
    /// Longest wait for one response.
    pub turn_timeout: Duration,
}

/// One conversation's run.
#[derive(Debug)]
pub struct Run {
    /// One record per turn that was run (fewer than the turns when one failed).
    pub records: Vec<TurnRecord>,
    pub elapsed: Duration,
}

impl Driver {
    /// Runs `conversation` to its end, or up to the first turn whose response did
    /// not complete. Errors only when the pharmacy database cannot be created.
    pub async fn run(&self, conversation: &Conversation) -> Result<Run> {
        let started = Instant::now();
        let engines = Arc::new(Engines { tools: fresh_pharmacy()?, ..self.engines.clone() });
        let (call, mut events) = Call::start(format!("eval-{}", conversation.name), engines, self.settings.clone());
        let mut records = Vec::new();
        for turn in &conversation.turns {
            let record = self.turn(&call, &mut events, &turn.user).await;
            let stop = record.error.is_some();
            records.push(record);
            if stop {
                break;
            }
        }
        call.close().await;
        Ok(Run { records, elapsed: started.elapsed() })
    }

    /// Sends one user turn, asks for a response and collects it.
    async fn turn(&self, call: &parley_agent::CallHandle, events: &mut mpsc::Receiver<AgentEvent>, user: &str) -> TurnRecord {
        let mut record = TurnRecord::default();
        for input in [CallInput::UserText(user.to_string()), CallInput::CreateResponse] {
            if call.send(input).await.is_err() {
                record.error = Some("the call ended".into());
                return record;
            }
        }
        let deadline = tokio::time::Instant::now() + self.turn_timeout;
        let mut errors = Vec::new();
        loop {
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    record.error = Some(format!("no response.done within {} s", self.turn_timeout.as_secs()));
                    let _ = call.send(CallInput::CancelResponse).await;
                    return record;
                }
                Ok(None) => {
                    record.error = Some("the call ended".into());
                    return record;
                }
                Ok(Some(event)) => event,
            };
            match event {
                AgentEvent::FunctionCall { call, .. } => record.calls.push((call.name, call.arguments)),
                AgentEvent::FunctionOutput { output, .. } => record.outputs.push(output),
                AgentEvent::Error { code, message } => errors.push(format!("{}: {message}", code.as_str())),
                AgentEvent::ResponseDone { status, transcript, .. } => {
                    record.reply = transcript;
                    if status != ResponseStatus::Completed {
                        let why = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
                        record.error = Some(format!("response {}{why}", status.as_str()));
                    }
                    return record;
                }
                _ => {}
            }
        }
    }
}

/// The pharmacy tools on a new in-memory database with the seed records, so what
/// one conversation changes (a refill used) never leaks into the next.
fn fresh_pharmacy() -> Result<ToolRegistry> {
    let db = PharmacyDb::in_memory().context("creating the in-memory pharmacy database")?;
    let mut registry = ToolRegistry::default();
    for tool in pharmacy_tools(Arc::new(db)) {
        registry.register(tool);
    }
    Ok(registry)
}
