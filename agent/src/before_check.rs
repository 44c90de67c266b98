//! Times, dates and record states the model says to a caller who has not passed the
//! identity check. Before the check nothing about a member's records may be told,
//! and the model has no record to read a pickup time or a status from, so any it
//! says is made up: the 1.5B model told a caller whose check had failed "The order
//! can be picked up on November 2nd, 1971 at 3 PM." (eval), and the 0.5B model
//! answered "Hi. Is my order ready?" with "Yes, my order is ready." (e2e). While a
//! gate tool ([`parley_llm::known_ids::GATE`]) is offered and has not passed, a
//! phrase that names a time, a date or a weekday the caller did not say, or states
//! an order's status or a prescription's refills, is withheld, and the reply falls
//! back to what the check needs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use parley_llm::{ChatMessage, GenerateOptions, Role};
use regex::Regex;

/// One response's view: whether the check is still to pass, and what the caller said.
#[derive(Debug, Default)]
pub struct BeforeCheck {
    /// A gate is offered and has not passed in this call.
    pending: AtomicBool,
    /// The times and dates the caller said (their birth date, a time they asked
    /// about), as [`mentions`] writes them: saying those back discloses nothing.
    heard: Vec<String>,
}

impl BeforeCheck {
    /// The state at the start of a response over `messages`.
    pub fn for_messages(options: &GenerateOptions, messages: &[ChatMessage]) -> Self {
        let pending = parley_llm::known_ids::gate_pending(options, messages);
        let heard = messages.iter().filter(|m| m.role == Role::User).flat_map(|m| mentions(&m.content)).collect();
        Self { pending: AtomicBool::new(pending), heard }
    }

    /// The check passed during this response: what follows comes from records.
    pub fn opened(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    /// True when `text` may not be said yet: the check is pending and the text names
    /// a time or date the caller did not say, or states a record's status.
    pub fn withholds(&self, text: &str) -> bool {
        self.pending.load(Ordering::SeqCst) && (mentions(text).iter().any(|m| !self.heard.contains(m)) || states_a_record(text))
    }
}

/// True when `text` states an order's status ("it's ready", "has been shipped") or
/// a prescription's refills ("two refills left"). Questions ("Is it ready?") and
/// what the agent offers to find out ("I can check whether it is ready") are not
/// statements.
fn states_a_record(text: &str) -> bool {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        let count = r"no|any|\d+|zero|one|two|three|four|five|six|seven|eight|nine|ten";
        Regex::new(&format!(
            r"(?:\b(?:is|are|was|were|be|been)|'s|'re)\s+(?:now\s+|already\s+|still\s+|all\s+)?(?:ready|shipped|processing|being processed|picked up|on (?:its|the) way|in stock)\b|\b(?:{count})\s+(?:more\s+)?refills?\s+(?:left|remaining)\b"
        ))
        .expect("the record-state pattern is valid")
    });
    let lower = text.to_lowercase().replace('\u{2019}', "'");
    let asks = lower.trim_end().ends_with('?') || [" if ", " whether ", "check ", "look up", "find out"].iter().any(|w| lower.contains(w));
    !asks && pattern.is_match(&lower)
}

/// Times ("3 PM", "ten a.m.", "2:30", "noon"), dates ("December 6th", "Dec. sixth",
/// with the year when one follows) and days ("Monday", "tomorrow") in `text`, lower
/// case, punctuation and spacing evened out. A date keeps its year so that a birth
/// date the caller gave ("November 2nd, 1971") may be read back whole, but not made
/// a pickup day ("picked up on November 2nd": the 1.5B model, eval).
fn mentions(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    pattern()
        .find_iter(&lower)
        .map(|m| m.as_str().split(|c: char| c.is_whitespace() || matches!(c, '.' | ',' | '-')).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" "))
        .collect()
}

fn pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let month = r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?";
        let ordinal = r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|thirtieth";
        let day = format!(r"\d{{1,2}}(?:st|nd|rd|th)?|(?:twenty|thirty)[- ](?:{ordinal})|{ordinal}");
        let hour = r"\d{1,2}|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve";
        let minutes = r"[:.]?\d{2}|\s(?:o\s?five|ten|fifteen|twenty|thirty|forty(?:[- ]five)?|fifty)";
        let time = format!(r"(?:{hour})(?:{minutes})?\s?(?:[ap]\.?\s?m\b\.?|o'clock)|\d{{1,2}}:\d{{2}}|\bnoon\b|\bmidnight\b");
        let days = r"monday|tuesday|wednesday|thursday|friday|saturday|sunday|tomorrow";
        Regex::new(&format!(r"\b(?:(?:{month})\.?\s+(?:{day})\b(?:,?\s+\d{{4}}\b)?|(?:{time})|(?:{days})\b)")).expect("the time and date pattern is valid")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_llm::ToolSpec;

    fn gate() -> ToolSpec {
        ToolSpec {
            name: "verify_member".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": {"member_id": {"type": "string"}}, "x-parley-gate": true}),
        }
    }

    #[test]
    fn times_dates_and_days_are_found_in_words_and_digits() {
        for (text, want) in [
            ("The order can be picked up on November 2nd, 1971 at 3 PM.", vec!["november 2nd 1971", "3 pm"]),
            ("It will be ready on December sixth at ten a.m.", vec!["december sixth", "ten a m"]),
            ("Come by at 2:30 tomorrow.", vec!["2:30", "tomorrow"]),
            ("Pickup is Monday at two thirty p.m.", vec!["monday", "two thirty p m"]),
            ("Jan. twenty-first at noon", vec!["jan twenty first", "noon"]),
        ] {
            assert_eq!(mentions(text), want, "{text}");
        }
        for text in ["How can I help you today?", "May I have your member ID?", "You have two orders.", "Order O R D zero zero one is ready."] {
            assert!(mentions(text).is_empty(), "{text}: {:?}", mentions(text));
        }
    }

    #[test]
    fn statements_of_a_records_state_are_told_from_questions() {
        for text in ["Yes, my order is ready.", "Your order has been shipped.", "It's ready for pickup.", "You have two refills left.", "There are no refills remaining."] {
            assert!(states_a_record(text), "{text}");
        }
        for text in [
            "Is your order ready?",
            "I can check whether your order is ready. What is your member ID?",
            "To see if it has been shipped, I need your date of birth.",
            "Before I can help, I need your member ID and date of birth.",
            "I'm ready to help.",
        ] {
            assert!(!states_a_record(text), "{text}");
        }
    }

    #[test]
    fn before_the_check_only_what_the_caller_said_may_be_said_back() {
        let options = GenerateOptions { tools: vec![gate()], ..GenerateOptions::default() };
        let messages = [ChatMessage::new(Role::User, "Member 10024, November 2nd, 1971. What time can I pick it up?")];
        let check = BeforeCheck::for_messages(&options, &messages);
        assert!(check.withholds("The order can be picked up on November 2nd, 1971 at 3 PM."));
        assert!(check.withholds("It will be ready on Monday."));
        assert!(check.withholds("Yes, your order is ready."));
        assert!(check.withholds("The order can be picked up on November 2nd, Sorry."), "a birth date is not a pickup day");
        assert!(!check.withholds("You said November 2nd, 1971. What is your member ID?"));
        assert!(!check.withholds("Before I can help, I need your member ID and date of birth."));
        // Once the check passes, the look-up's times are the answer.
        check.opened();
        assert!(!check.withholds("You can pick it up on December second at two thirty p.m."));
        assert!(!check.withholds("Your order is ready."));
        // No gate offered: nothing to withhold.
        let free = BeforeCheck::for_messages(&GenerateOptions::default(), &messages);
        assert!(!free.withholds("The store opens at 9 a.m."));
    }
}
