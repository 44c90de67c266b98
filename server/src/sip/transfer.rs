//! Hand-off to a person: the `transfer_call` tool, offered on SIP calls when
//! `[sip] transfer_target` is set. The SIP transport runs it (it is a client tool of
//! the call, so no other transport ever offers it): the agent says a short line, then
//! Parley sends REFER (Refer-To: the target, `X-Parley-Summary`: one line about the
//! call) and follows the NOTIFYs: a 2xx from the target ends our leg with BYE; a
//! failure is told to the caller and the call goes on.
//!
//! The pieces free of I/O are here: the tool's spec, the summary line, the header
//! value's sanitizing and the tool's results. The call's side is in [`super::call`].

use parley_llm::ToolSpec;
use serde_json::{Value, json};

/// The tool's name, as the model calls it.
pub const TOOL_NAME: &str = "transfer_call";
/// The header carrying the call's summary on the REFER.
pub const SUMMARY_HEADER: &str = "X-Parley-Summary";
/// The header carrying Parley's call id on the REFER (to find the call in the logs).
pub const CALL_ID_HEADER: &str = "X-Parley-Call-Id";
/// Longest summary header value, in bytes (proxies drop long custom headers).
pub const SUMMARY_MAX: usize = 200;
/// Longest reason kept from the model's arguments, in characters.
const REASON_MAX: usize = 80;
/// What the caller hears when the transfer did not go through.
pub const FAILED_SAY: &str = "I'm sorry, I couldn't reach anyone to take your call right now. I can keep helping you here.";

/// Words a caller uses to ask for a person; `asked_for` must be one the caller said.
const ASKED_FOR: &str = "^(person|people|human|someone|somebody|agent|operator|representative|receptionist|staff|manager|transfer|transferred)$";

/// The tool as the model sees it. Its `asked_for` parameter is a known value
/// (`x-parley-known`): the engine lets the model call the tool only once the caller
/// has said one of [`ASKED_FOR`]'s words, so a question the agent can answer never
/// ends in a transfer (the 0.5B model, offered the tool, sometimes called it for
/// "What is the capital of France?").
pub fn tool_spec() -> ToolSpec {
    ToolSpec {
        name: TOOL_NAME.into(),
        description: "Transfer this phone call to a human. Only when the caller asks to speak to a person, a human, an operator, an agent or a representative, or asks to be transferred. Never for a question you can answer.".into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "asked_for": {"type": "string", "description": "The word the caller used for whom they want: person, human, agent, operator, …", "pattern": ASKED_FOR, "x-parley-known": true},
                "reason": {"type": "string", "description": "Why the caller wants a person, in a few words."}
            },
            "required": ["asked_for", "reason"],
            "additionalProperties": false
        }),
    }
}

/// The `reason` argument of a call, trimmed and shortened; empty when missing.
pub fn reason_of(arguments: &Value) -> String {
    let reason = arguments.get("reason").and_then(Value::as_str).unwrap_or_default();
    one_line(reason).chars().take(REASON_MAX).collect()
}

/// The one-line summary of a call for the person who takes it over: why the caller
/// wants a person and what they said last (newest last), sanitized for a SIP header
/// and at most [`SUMMARY_MAX`] bytes.
pub fn summary(reason: &str, caller_said: &[String]) -> String {
    let reason = if reason.trim().is_empty() { "caller asked for a person" } else { reason };
    let said: Vec<String> = caller_said.iter().map(|s| one_line(s)).filter(|s| !s.is_empty()).collect();
    let text = if said.is_empty() { format!("reason: {reason}") } else { format!("reason: {reason}; caller said: {}", said.join(" / ")) };
    header_value(&text, SUMMARY_MAX)
}

/// Collapses whitespace (newlines included) to single spaces.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text made safe as a SIP header value: printable ASCII only (others become `?`,
/// line breaks and tabs spaces, so nothing can end the header or start another),
/// whitespace collapsed, at most `max` bytes (cut at a word, marked `...`).
pub fn header_value(text: &str, max: usize) -> String {
    let ascii: String = text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else if c.is_whitespace() { ' ' } else { '?' }).collect();
    let line = one_line(&ascii);
    if line.len() <= max {
        return line;
    }
    let budget = max.saturating_sub(3);
    let cut = line[..budget].rfind(' ').filter(|&i| i > budget / 2).unwrap_or(budget);
    format!("{}...", line[..cut].trim_end())
}

/// The tool's result while the transfer starts: the model sees that it is under way.
pub fn started_output(say: &str) -> String {
    json!({ "status": "transferring", "say": say }).to_string()
}

/// The tool's result when a transfer is already under way.
pub fn busy_output() -> String {
    json!({ "status": "a transfer is already under way" }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_is_callable_only_once_the_caller_asked_for_a_person() {
        use parley_llm::{ChatMessage, Role};
        let spec = tool_spec();
        assert_eq!(spec.name, "transfer_call");
        assert_eq!(spec.parameters["required"], json!(["asked_for", "reason"]));
        let callable = |said: &str| parley_llm::known_ids::narrow(std::slice::from_ref(&spec), &[ChatMessage::new(Role::User, said)]);
        assert!(callable("What is the capital of France?").is_empty());
        assert!(callable("Can you help me with my order?").is_empty());
        let narrowed = callable("Can I talk to a real person, please?");
        assert_eq!(narrowed.len(), 1);
        assert_eq!(narrowed[0].parameters["properties"]["asked_for"]["enum"], json!(["PERSON"]));
        assert_eq!(callable("I want to speak to a human.").len(), 1);
        assert_eq!(callable("Transfer me to an operator").len(), 1);
    }

    #[test]
    fn the_reason_is_one_short_line() {
        assert_eq!(reason_of(&json!({"reason": "  wants\na   person "})), "wants a person");
        assert_eq!(reason_of(&json!({})), "");
        assert_eq!(reason_of(&json!({"reason": 7})), "");
        assert_eq!(reason_of(&json!({"reason": "x".repeat(500)})).len(), REASON_MAX);
    }

    #[test]
    fn summaries_cannot_break_the_header_and_are_capped() {
        let s = summary("billing question", &["Hi.\r\nVia: evil".into(), "Please transfer me to a person – now".into()]);
        assert_eq!(s, "reason: billing question; caller said: Hi. Via: evil / Please transfer me to a person ? now");
        assert!(!s.contains('\r') && !s.contains('\n'));
        let long = summary("r", &["word ".repeat(200)]);
        assert!(long.len() <= SUMMARY_MAX, "{} bytes", long.len());
        assert!(long.ends_with("..."), "{long}");
        assert!(long.bytes().all(|b| (0x20..0x7f).contains(&b)));
        assert_eq!(summary(" ", &[]), "reason: caller asked for a person");
    }

    #[test]
    fn a_header_value_without_spaces_is_cut_at_the_limit() {
        let v = header_value(&"a".repeat(50), 10);
        assert_eq!(v, "aaaaaaa...");
    }
}
