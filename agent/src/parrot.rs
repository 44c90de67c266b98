//! Replies that only repeat a line back: the caller's last words, or a caller's line
//! from the prompt's examples. A small model does this when it does not know what to
//! say ("Yes, please go ahead with that refill." from an example; the caller's own
//! "Please refill my prescription." read back to them). Such a reply is held while it
//! still could be a repeat, and dropped if it was one, so the agent can try again.

use parley_llm::{ChatMessage, GenerateOptions, Role, ToolSpec};

use crate::before_check::BeforeCheck;

/// Fewest words a repeat must have to be dropped: "Yes." or "Thank you." said back
/// may be a fine reply.
const MIN_WORDS: usize = 3;

/// The lines a reply must not merely repeat, as lowercase words.
#[derive(Debug, Default)]
pub struct Parrot {
    lines: Vec<Vec<String>>,
    /// The offered tools' descriptions and their parameters', as words: written for
    /// the model, never for the caller ("with the member ID and date of birth they
    /// said.", read back by the 0.5B model in the eval).
    tool_texts: Vec<Vec<String>>,
    /// The `say` sentences of tool results already in the conversation (earlier
    /// turns), and the agent's earlier replies: the 0.5B model answered a new question with the last one again
    /// ("You have one order…" to "Are there refills left on RX1003?", eval). A
    /// sentence this response's own look-ups return again is taken off
    /// ([`Self::fresh_result`]): reading it is then the answer.
    results: std::sync::Mutex<Vec<Vec<String>>>,
    /// Times and dates not to say before the identity check ([`BeforeCheck`]).
    check: BeforeCheck,
}

/// Fewest words a reply must have to be taken for an earlier result read again:
/// "Thank you, Maria." may be a fine answer to thanks.
const MIN_RESULT_WORDS: usize = 5;

/// Fewest words a phrase must have to be taken for a copy of a tool's description.
const MIN_COPIED_WORDS: usize = 4;

impl Parrot {
    /// The caller's last message, and each example caller line (`Caller: …`) of the
    /// system prompt.
    pub fn for_messages(messages: &[ChatMessage]) -> Self {
        let mut lines: Vec<Vec<String>> = Vec::new();
        if let Some(user) = messages.iter().rev().find(|m| m.role == Role::User) {
            lines.push(words(&user.content).0);
        }
        for system in messages.iter().filter(|m| m.role == Role::System) {
            for line in system.content.lines() {
                if let Some(example) = line.strip_prefix("Caller: ") {
                    lines.push(words(example).0);
                }
            }
        }
        lines.retain(|l| l.len() >= MIN_WORDS);
        let says = messages
            .iter()
            .filter(|m| m.role == Role::Tool)
            .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m.content).ok())
            .filter_map(|v| v.get("say").and_then(|s| s.as_str()).map(|say| words(say).0));
        // The agent's own earlier replies too: after a new look-up the model read its
        // last reply out again instead of the new result ("And how many refills are
        // left on it?", eval).
        let replies = messages.iter().filter(|m| m.role == Role::Assistant).map(|m| words(&m.content).0);
        let results = says.chain(replies).filter(|w| w.len() >= MIN_RESULT_WORDS).collect();
        Self { lines, tool_texts: Vec::new(), results: std::sync::Mutex::new(results), check: BeforeCheck::default() }
    }

    /// A tool result of this response: its `say` is a fresh answer, not an old one.
    pub fn fresh_result(&self, output: &str) {
        let Some(say) = serde_json::from_str::<serde_json::Value>(output).ok().and_then(|v| v.get("say")?.as_str().map(|s| words(s).0)) else {
            return;
        };
        self.old_results().retain(|line| *line != say);
    }

    /// A sentence the agent said itself in this response (a gate's, as it opened):
    /// the model reading it again would say it twice ("Thank you, Aisha, you're
    /// verified." after the refill question's result, eval).
    pub fn announced(&self, say: &str) {
        let said = words(say).0;
        if said.len() >= MIN_RESULT_WORDS {
            self.old_results().push(said);
        }
    }

    fn old_results(&self) -> std::sync::MutexGuard<'_, Vec<Vec<String>>> {
        self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Also guards against reading back the descriptions of `tools` (and of their
    /// parameters).
    pub fn with_tools(mut self, tools: &[ToolSpec]) -> Self {
        for tool in tools {
            self.tool_texts.push(words(&tool.description).0);
            if let Some(properties) = tool.parameters.get("properties").and_then(|p| p.as_object()) {
                for property in properties.values() {
                    if let Some(description) = property.get("description").and_then(|d| d.as_str()) {
                        self.tool_texts.push(words(description).0);
                    }
                }
            }
        }
        self.tool_texts.retain(|t| t.len() >= MIN_COPIED_WORDS);
        self
    }

    /// Also withholds, until the identity check passes, the times and dates the
    /// caller did not say (see [`BeforeCheck`]).
    pub fn with_check(mut self, options: &GenerateOptions, messages: &[ChatMessage]) -> Self {
        self.check = BeforeCheck::for_messages(options, messages);
        self
    }

    /// The identity check passed in this response.
    pub fn check_passed(&self) {
        self.check.opened();
    }

    /// True when `text` names a time or date that may not be said yet.
    pub fn withholds(&self, text: &str) -> bool {
        self.check.withholds(text)
    }

    /// True when `text` (at least [`MIN_COPIED_WORDS`] words) is word for word a run
    /// out of a tool's or parameter's description.
    pub fn copies_tool_text(&self, text: &str) -> bool {
        let (said, _) = words(text);
        said.len() >= MIN_COPIED_WORDS && self.tool_texts.iter().any(|t| t.windows(said.len()).any(|w| w == said.as_slice()))
    }

    /// True while `text` (a reply so far, maybe ending inside a word) is the start of
    /// one of the lines: it could still turn out to be a repeat.
    pub fn may_repeat(&self, text: &str) -> bool {
        let (said, partial) = words(text);
        !said.is_empty() && self.lines.iter().chain(self.old_results().iter()).any(|line| starts(line, &said, partial))
    }

    /// True when the whole reply is, word for word, the start of an earlier tool
    /// result's `say` or of an earlier reply (at least [`MIN_RESULT_WORDS`] words):
    /// an old answer given to a new question. The agent looks it up instead.
    pub fn repeats_result(&self, text: &str) -> bool {
        let (said, _) = words(text);
        said.len() >= MIN_RESULT_WORDS && self.old_results().iter().any(|line| starts(line, &said, false))
    }

    /// True when the whole reply is one of the lines, or at least its first
    /// [`MIN_WORDS`] words and nothing else.
    pub fn repeats(&self, text: &str) -> bool {
        let (said, _) = words(text);
        (said.len() >= MIN_WORDS && self.lines.iter().any(|line| starts(line, &said, false))) || self.copies_tool_text(text) || self.repeats_result(text)
    }
}

/// Whether `said` begins `line`; with `partial`, its last word may be unfinished.
fn starts(line: &[String], said: &[String], partial: bool) -> bool {
    if said.len() > line.len() {
        return false;
    }
    let whole = if partial { said.len() - 1 } else { said.len() };
    line[..whole] == said[..whole] && (!partial || starts_word(&line[whole], &said[whole]))
}

/// Whether a word cut short (`part`, as [`words`] maps it) may become `word`. The
/// cut "you" of "you're" was read as the whole "you" and mapped to "i", so the
/// earlier answer "Thank you, Robert, you're verified. …", read out again, was
/// taken for a new reply and spoken (eval, 1.5B model): a cut word is also compared
/// as written.
fn starts_word(word: &str, part: &str) -> bool {
    let written = match part {
        "i" => "you",
        "my" => "your",
        other => other,
    };
    word.starts_with(part) || word.starts_with(written) || (word == "i" && "you".starts_with(written)) || (word == "my" && "your".starts_with(written))
}

/// The text's words, lowercase (letters, digits, apostrophes; "your" and "you" as
/// "my" and "I"), and whether the last one may be cut short (the text ends inside it).
fn words(text: &str) -> (Vec<String>, bool) {
    let words: Vec<String> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(|w| match w.to_lowercase().as_str() {
            // Read back, "my prescription" becomes "your prescription".
            "your" => "my".to_string(),
            "you" => "i".to_string(),
            other => other.to_string(),
        })
        .collect();
    let partial = text.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '\'');
    (words, partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parrot() -> Parrot {
        Parrot::for_messages(&[
            ChatMessage::new(Role::System, "Rules.\nExamples:\nCaller: Yes, please go ahead with that refill.\nYou: <tool_call>"),
            ChatMessage::new(Role::User, "Hi. Is my order ready?"),
            ChatMessage::new(Role::Assistant, "Your member ID, please."),
            ChatMessage::new(Role::User, "Please refill my prescription R X one zero zero two."),
        ])
    }

    #[test]
    fn the_callers_last_line_and_the_examples_are_not_replies() {
        let p = parrot();
        assert!(p.repeats("Please refill my prescription R X one zero zero two."));
        assert!(p.repeats("please refill my prescription"));
        assert!(p.repeats("Please refill your prescription R X one zero zero two."));
        assert!(p.repeats("Yes, please go ahead with that refill."));
        // An earlier caller line is not guarded; short agreement is a fine reply.
        assert!(!p.repeats("Hi. Is my order ready?"));
        assert!(!p.repeats("Yes, please."));
        assert!(!p.repeats("Please hold while I check your prescription."));
    }

    #[test]
    fn a_tools_description_read_back_is_not_a_reply() {
        let tool = ToolSpec {
            name: "verify_member".into(),
            description: "Check who the caller is, with the member ID and date of birth they said.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"order_id": {"type": "string", "description": "An order ID the caller said or a tool returned."}}}),
        };
        let p = parrot().with_tools(&[tool]);
        assert!(p.copies_tool_text("with the member ID and date of birth they said."));
        assert!(p.repeats("An order ID the caller said"));
        assert!(!p.copies_tool_text("Your member ID and date of birth, please."));
        assert!(!p.copies_tool_text("Thank you."));
    }

    #[test]
    fn an_earlier_results_say_read_again_is_a_repeat() {
        let p = Parrot::for_messages(&[
            ChatMessage::new(Role::User, "I'm member 1003, born July 25, 1990."),
            ChatMessage::tool_result("c1", r#"{"verified": true, "say": "Thank you, Aisha, you're verified."}"#),
            ChatMessage::tool_result("c2", r#"{"say": "You have one order. Order O R D zero zero three has been shipped."}"#),
            ChatMessage::tool_result("c3", r#"{"error": "no such order"}"#),
            ChatMessage::new(Role::User, "Are there any refills left on RX1003?"),
        ]);
        assert!(p.may_repeat("You have one or"));
        assert!(p.repeats("You have one order. Order O R D zero zero three has been shipped."));
        assert!(p.repeats_result("You have one order. Order O R D zero zero three"));
        assert!(p.repeats_result("Thank you, Aisha, you're verified."));
        // Short thanks, or an answer that goes on past it, are replies.
        assert!(!p.repeats("Thank you, Aisha."));
        assert!(!p.repeats("You have one order with five refills left."));
        assert!(!p.repeats_result("Are there any refills left"));
        // Looked up again in this response, the same sentence is the answer.
        p.fresh_result(r#"{"say": "You have one order. Order O R D zero zero three has been shipped."}"#);
        assert!(!p.repeats("You have one order. Order O R D zero zero three has been shipped."));
        assert!(p.repeats_result("Thank you, Aisha, you're verified."));
        // The agent's own earlier reply, read out again.
        let p = Parrot::for_messages(&[
            ChatMessage::new(Role::User, "Where is my order?"),
            ChatMessage::new(Role::Assistant, "Thank you, Aisha, you're verified. You have one order, shipped by mail."),
            ChatMessage::new(Role::User, "And how many refills are left on it?"),
        ]);
        assert!(p.repeats_result("Thank you, Aisha, you're verified. You have one order, shipped by mail."));
        assert!(!p.repeats("It has five refills left."));
        // What the agent said itself in this response is not said again.
        p.announced("Done: your refill of Metformin is requested.");
        assert!(p.repeats("\"Done: your refill of Metformin is requested.\""));
    }

    #[test]
    fn a_reply_is_held_only_while_it_could_still_be_a_repeat() {
        let p = parrot();
        assert!(p.may_repeat("Ye"));
        assert!(p.may_repeat("Yes, please go ahe"));
        assert!(p.may_repeat("Please refill"));
        assert!(!p.may_repeat("Please hold"));
        assert!(!p.may_repeat("Sure"));
        assert!(!p.may_repeat("   "));
        // Past the end of every line.
        assert!(!p.may_repeat("Yes, please go ahead with that refill. And"));
        // A word cut short where "you" could go on to "you're".
        let p = Parrot::for_messages(&[
            ChatMessage::new(Role::Assistant, "Thank you, Robert, you're verified. Order O R D zero zero six is ready."),
            ChatMessage::new(Role::User, "Can you refill my atorvastatin?"),
        ]);
        assert!(p.may_repeat("Thank you, Robert, you"));
        assert!(p.may_repeat("Thank yo"));
        assert!(p.may_repeat("Thank you, Robert, you're verified. Order O R D zero zero six is re"));
        assert!(!p.may_repeat("Thank you, Robert, yes"));
    }
}
