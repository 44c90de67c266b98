//! The last look at a phrase before the voice says it: sentences glued by the model
//! are separated, codes such as `ORD001` are spelled out the way a caller should
//! hear them, and text addressed to the model (a tool's note about "the caller", a
//! nudge the model echoed) is dropped, so it is never spoken verbatim.

use crate::tools::spoken;

/// Words that only text written for the model uses; a phrase containing one is not
/// for the caller's ears.
const MODEL_DIRECTED: &[&str] =
    &["the caller", "caller's", "tool result", "will return a json", "returns a json", "verify_member", "request_refill", "list_orders", "get_order_details", "get_pickup_time", "get_prescription"];

/// Fewest words a copy of our instructions must have to be taken for one: "Do not
/// show" alone could be the caller's own business.
const MIN_COPIED_WORDS: usize = 4;

/// Text Parley itself writes to the model mid-call. A small model sometimes reads
/// a piece of it back as its reply ("when it has one). Do not show JSON.", eval).
/// The operator's own instructions are not listed: a line scripted there may be
/// meant to be said word for word.
fn our_instructions() -> [&'static str; 5] {
    [
        crate::conversation::AFTER_TOOL_NUDGE,
        crate::response::PLAIN_SPEECH_NUDGE,
        crate::response::GATE_OPENED_NUDGE,
        crate::response::LOOK_IT_UP_NUDGE,
        crate::response::ASK_FOR_DETAILS_NUDGE,
    ]
}

/// Lowercase words of `text`, punctuation dropped.
fn plain_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// True when `text` (at least [`MIN_COPIED_WORDS`] words) is word for word a run
/// out of one of [`our_instructions`].
pub fn copies_instructions(text: &str) -> bool {
    let said = plain_words(text);
    said.len() >= MIN_COPIED_WORDS
        && our_instructions().iter().any(|nudge| plain_words(nudge).windows(said.len()).any(|w| w == said.as_slice()))
}

/// Speaker labels of the prompt's examples (`Caller: …` / `You: …`): the small model
/// opens its reply with one ("You:", said alone, eval), or goes on to write the
/// caller's next line.
const OWN_LABELS: &[&str] = &["You:", "Agent:", "Assistant:"];
const CALLER_LABELS: &[&str] = &["Caller:", "User:"];

/// `text` without the speaker labels a model copied from the examples: its own
/// label taken off the front, and from a caller's label on, nothing (a line the
/// model wrote for the caller is not the agent's to say).
pub fn without_labels(text: &str) -> String {
    let mut rest = text.trim_start();
    while let Some(after) = OWN_LABELS.iter().find_map(|l| rest.strip_prefix(l)) {
        rest = after.trim_start();
    }
    let cut = CALLER_LABELS.iter().filter_map(|l| rest.find(l)).min().unwrap_or(rest.len());
    let kept = &rest[..cut];
    let mut out = kept.to_string();
    for label in OWN_LABELS {
        out = out.replace(&format!("\n{label}"), "\n");
    }
    out
}

/// The phrase as it should be spoken, or `None` when it must not be spoken at all.
pub fn speakable(phrase: &str) -> Option<String> {
    // The model copying the history's interruption mark says what came before it.
    let unmarked = without_labels(&phrase.replace(crate::conversation::INTERRUPTED_MARK, ""));
    let phrase = unmarked.trim();
    if phrase.is_empty() {
        return None;
    }
    let lower = phrase.to_lowercase();
    if MODEL_DIRECTED.iter().any(|w| lower.contains(w)) || names_a_field(phrase) || copies_instructions(phrase) {
        tracing::debug!(phrase = %crate::redact::Redacted(phrase), "dropped a phrase addressed to the model");
        return None;
    }
    let mended = spoken::mend_spacing(phrase);
    let words: Vec<String> = mended.split(' ').map(spell_code).collect();
    Some(words.join(" "))
}

/// True when `phrase` names a snake_case field (`order_id`): data, not words for a
/// person. The 1.5B model answered "What's in order ORD005?" with 'To get the
/// details of order ORD005, order_id: "ORD005" This will return a JSON object
/// containing …' (eval).
fn names_a_field(phrase: &str) -> bool {
    phrase.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| {
        let mut parts = w.split('_');
        w.contains('_') && parts.all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
    })
}

/// `ORD001`, `RX1002,` or `ORD-001.` spelled out ("O R D zero zero one,"); other
/// words as they are. A code is one to four capitals, an optional dash, and at
/// least two digits.
fn spell_code(word: &str) -> String {
    let core_end = word.trim_end_matches(['.', ',', '?', '!', ';', ':', ')', '"', '\'']).len();
    let core_start = word.len() - word.trim_start_matches(['(', '"', '\'']).len();
    if core_start >= core_end {
        return word.to_string();
    }
    let core = &word[core_start..core_end];
    let letters = core.chars().take_while(|c| c.is_ascii_uppercase()).count();
    let rest = core[letters..].strip_prefix('-').unwrap_or(&core[letters..]);
    let is_code = (1..=4).contains(&letters) && rest.len() >= 2 && rest.chars().all(|c| c.is_ascii_digit());
    if !is_code {
        return word.to_string();
    }
    format!("{}{}{}", &word[..core_start], spoken::id(core), &word[core_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_interruption_mark_is_taken_out() {
        assert_eq!(speakable("A dragon, a [interrupted by the caller]").as_deref(), Some("A dragon, a"));
        assert_eq!(speakable(" [interrupted by the caller] "), None);
    }

    #[test]
    fn codes_are_spelled_and_glued_sentences_mended() {
        assert_eq!(speakable("Your order ORD001 is ready.").as_deref(), Some("Your order O R D zero zero one is ready."));
        assert_eq!(speakable("Prescription RX1002, right?").as_deref(), Some("Prescription R X one zero zero two, right?"));
        assert_eq!(speakable("at the pharmacy.The medication").as_deref(), Some("at the pharmacy. The medication"));
        assert_eq!(speakable("It costs 3.50 at 10:00 AM, see Dr. Reyes.").as_deref(), Some("It costs 3.50 at 10:00 AM, see Dr. Reyes."));
        assert_eq!(speakable("I said OK, A1, COVID19 and (ORD-004).").as_deref(), Some("I said OK, A1, COVID19 and (O R D zero zero four)."));
    }

    #[test]
    fn field_names_and_what_a_tool_returns_are_not_spoken() {
        assert_eq!(speakable(r#"To get the details of order ORD005, order_id: "ORD005""#), None);
        assert_eq!(speakable("This will return a JSON object containing the status."), None);
        assert!(speakable("I need your member ID and date of birth first.").is_some());
        assert!(speakable("Your order is ready; pickup is at 10:00.").is_some());
    }

    #[test]
    fn speaker_labels_copied_from_the_examples_are_not_spoken() {
        assert_eq!(speakable("You:"), None);
        assert_eq!(speakable("You: What is your member ID?").as_deref(), Some("What is your member ID?"));
        assert_eq!(speakable("Sure. Caller: Yes, please.").as_deref(), Some("Sure."));
        assert_eq!(speakable("Caller: Is my order ready?"), None);
        assert!(speakable("Thank you for your patience.").is_some());
    }

    #[test]
    fn text_for_the_model_is_not_spoken() {
        assert_eq!(speakable("Ask the caller to check the order ID or list the member's orders."), None);
        assert_eq!(speakable("I will call verify_member now."), None);
        assert_eq!(speakable("Now answer the caller in one to three short spoken sentences."), None);
        assert!(speakable("JSON is a data format.").is_some(), "a caller may ask about anything");
        assert!(speakable("Thank you, Maria, you're verified.").is_some());
        assert_eq!(speakable("when it has one). Do not show JSON."), None);
        assert_eq!(speakable("Do not show JSON."), None);
        assert!(speakable("Do not show me that.").is_some());
    }
}
