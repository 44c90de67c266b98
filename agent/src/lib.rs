//! The call session: everything between a transport and the models.
//!
//! A transport adapter (the Realtime WebSocket, a phone gateway, the SIP bridge)
//! starts a [`Call`] with the process-wide [`Engines`], feeds it [`CallInput`]s
//! (encoded audio, commits, text, settings) and forwards the [`AgentEvent`]s it
//! gets back. Inside, one task owns the call's state (conversation, input audio,
//! the active response); model work runs on blocking threads; the agent's audio
//! leaves through a pacer that never runs ahead of real time by more than a small
//! lead, so barge-in can tell what the caller actually heard.
//!
//! ```no_run
//! # async fn demo(engines: std::sync::Arc<parley_agent::Engines>) {
//! use parley_agent::{Call, CallInput, SessionSettings};
//! let (call, mut events) = Call::start("call-1".into(), engines, SessionSettings::default());
//! call.send(CallInput::UserText("What time is it in Paris?".into())).await.ok();
//! call.send(CallInput::CreateResponse).await.ok();
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # }
//! ```

mod before_check;
mod call;
mod conversation;
pub mod echo;
mod engines;
mod events;
mod ids;
mod input;
mod pacing;
mod parrot;
pub mod redact;
mod reply_text;
mod response;
mod settings;
pub mod tools;
pub mod turn_rules;
mod turns;

pub use call::{Call, CallHandle};
pub use conversation::{Conversation, Item, ItemContent, ItemRole};
pub use engines::Engines;
pub use events::{AgentEvent, CallInput, ErrorCode, ResponseStatus, TurnMetrics};
pub use turns::asr_decodes_running;
pub use settings::{InterruptionSettings, PacingSettings, ResponseOptions, SessionSettings, ToolPolicy, TurnDetection};

/// Errors a call reports to its transport (and through it to the client).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The call has ended; no more input is accepted.
    #[error("the call has ended")]
    CallEnded,
}
