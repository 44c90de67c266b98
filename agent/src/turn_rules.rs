//! Text rules of turn-taking: does a transcript sound finished, is a sound only a
//! backchannel ("mm-hm"), and which words of a partial transcript are stable enough
//! to show.
//!
//! These run on Whisper's text, so they are deliberately forgiving about
//! punctuation and case: Whisper often ends an unfinished phrase with a full stop.

/// Words after which a sentence is not over ("my number is five five five and").
const DANGLING_WORDS: &[&str] = &[
    "and", "or", "but", "so", "because", "then", "the", "a", "an", "to", "of", "at", "in", "on", "for", "with", "from", "is",
    "are", "was", "my", "your", "our", "their", "his", "her", "its", "it's", "that", "which", "who", "dot", "underscore",
    "dash", "hyphen", "plus", "um", "uh", "er", "erm", "like", "um,", "uh,",
];

/// Number words: a caller reading digits out pauses between groups.
const NUMBER_WORDS: &[&str] = &[
    "zero", "oh", "o", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
    "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "double", "triple",
];

/// Backchannels: sounds that acknowledge the speaker without taking the turn.
pub const DEFAULT_BACKCHANNELS: &[&str] = &[
    "mm", "mmm", "mm-hm", "mm-hmm", "mhm", "hm", "hmm", "uh-huh", "uh huh", "uh", "um", "ah", "oh", "yeah", "yes", "yep",
    "ok", "okay", "right", "sure", "i see", "got it", "alright", "all right",
];

/// Lower-cased words of `text` without surrounding punctuation.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '@' && c != '\'' && c != '-').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// True when a transcript reads like the caller stopped mid-sentence: it ends in
/// a digit group or number word, a conjunction, article or preposition, a
/// half-spelled e-mail address, a comma or a dash. Such a turn gets a longer
/// silence window (capped; see `TurnDetection::unfinished_silence_ms`).
pub fn looks_unfinished(text: &str) -> bool {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return false;
    }
    if trimmed.ends_with(',') || trimmed.ends_with('-') || trimmed.ends_with("...") || trimmed.ends_with('…') || trimmed.ends_with('@') {
        return true;
    }
    if trimmed.ends_with('?') {
        return false;
    }
    let all = words(trimmed);
    let Some(last) = all.last() else { return false };
    if last.chars().any(|c| c.is_ascii_digit()) || NUMBER_WORDS.contains(&last.as_str()) {
        return true;
    }
    if DANGLING_WORDS.contains(&last.as_str()) {
        return true;
    }
    // An address being spelled: "john at example", "john@example".
    let tail = all.iter().rev().take(3).map(String::as_str).collect::<Vec<_>>();
    if last.contains('@') && !last.contains('.') {
        return true;
    }
    tail.len() >= 2 && tail[1] == "at" && all.iter().any(|w| w == "email" || w == "e-mail" || w == "address")
}

/// True when a transcript reads as a finished turn that wants an answer: it ends in
/// a question mark, has at least two words, and without the mark does not look
/// unfinished (Whisper puts "?" after "Can I talk to," too). Only
/// questions: Whisper ends nearly every cut-off statement with a full stop, and a
/// statement is often the first half of a turn ("I'd like to check my order.
/// It's O R D zero zero two."), where a question usually closes one. Such a turn
/// may end before the silence window (`TurnDetection::complete_silence_ms`).
pub fn reads_complete(text: &str) -> bool {
    let trimmed = text.trim();
    let Some(question) = trimmed.strip_suffix('?') else { return false };
    words(question).len() >= 2 && !looks_unfinished(question)
}

/// True when `text` carries no words beyond backchannels (or none at all): a cough,
/// "mm-hm", "okay". `backchannels` are matched as whole words or phrases.
pub fn is_backchannel(text: &str, backchannels: &[String]) -> bool {
    let mut rest = words(text).join(" ");
    if rest.is_empty() {
        return true;
    }
    // Longest phrases first, so "uh huh" is taken before "uh".
    let mut phrases: Vec<&str> = backchannels.iter().map(String::as_str).collect();
    phrases.sort_by_key(|p| std::cmp::Reverse(p.len()));
    loop {
        let before = rest.len();
        for p in &phrases {
            let p = p.trim().to_lowercase();
            if p.is_empty() {
                continue;
            }
            if rest == p {
                return true;
            }
            if let Some(after) = rest.strip_prefix(&format!("{p} ")) {
                rest = after.to_string();
            }
        }
        if rest.len() == before {
            return false;
        }
    }
}

/// Words that open a yes to a question the agent asked.
const YES_WORDS: &[&str] =
    &["yes", "yeah", "yep", "yup", "sure", "ok", "okay", "correct", "right", "absolutely", "definitely", "confirm", "confirmed"];

/// Openings of a yes said without a yes word.
const YES_PHRASES: &[&str] = &["go ahead", "please go ahead", "please do", "do it", "please proceed", "that's right", "that is right"];

/// Words that make an answer not a plain yes ("yes, no wait", "not that one").
const NOT_YES_WORDS: &[&str] =
    &["no", "nope", "not", "don't", "dont", "never", "cancel", "wait", "stop", "hold", "wrong", "instead", "but", "actually"];

/// Longest answer read as a plain yes: a longer one carries more than the answer.
const MAX_YES_WORDS: usize = 8;

/// How the caller answered a yes/no question the agent asked: `Some(true)` for a
/// plain yes ("Yes.", "Yes, please go ahead.", "Yeah, that's right."),
/// `Some(false)` for an answer with a no in it, `None` for anything else (a new
/// question, a longer turn): then the model reads it.
pub fn confirmation_answer(text: &str) -> Option<bool> {
    let all = words(text);
    if all.iter().any(|w| NOT_YES_WORDS.contains(&w.as_str())) {
        return Some(false);
    }
    let first = all.first()?;
    let joined = all.join(" ");
    let opens_yes = YES_WORDS.contains(&first.as_str()) || YES_PHRASES.iter().any(|p| joined == *p || joined.starts_with(&format!("{p} ")));
    (opens_yes && all.len() <= MAX_YES_WORDS && !text.contains('?')).then_some(true)
}

/// Turns a stream of partial hypotheses into append-only text: a word is shown once
/// two consecutive hypotheses agree on it (and on everything before it), and shown
/// text is never taken back. The final transcript replaces it all.
#[derive(Debug, Default, Clone)]
pub struct PartialStabilizer {
    previous: Vec<String>,
    shown: Vec<String>,
}

impl PartialStabilizer {
    /// Feeds one hypothesis; returns the newly stable text to show, if any.
    pub fn update(&mut self, hypothesis: &str) -> Option<String> {
        let current: Vec<String> = hypothesis.split_whitespace().map(str::to_string).collect();
        let agreed = self.previous.iter().zip(&current).take_while(|(a, b)| normalise(a) == normalise(b)).count();
        self.previous = current.clone();
        // Only extend text that the hypothesis still agrees with.
        let consistent = self.shown.len() <= current.len() && self.shown.iter().zip(&current).all(|(a, b)| normalise(a) == normalise(b));
        if !consistent || agreed <= self.shown.len() {
            return None;
        }
        let new = &current[self.shown.len()..agreed];
        let delta = if self.shown.is_empty() { new.join(" ") } else { format!(" {}", new.join(" ")) };
        self.shown.extend(new.iter().cloned());
        Some(delta)
    }

    /// Words shown so far.
    pub fn shown_words(&self) -> usize {
        self.shown.len()
    }
}

fn normalise(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backchannels() -> Vec<String> {
        DEFAULT_BACKCHANNELS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn numbers_and_dangling_words_are_unfinished() {
        for t in ["My phone number is 555, 123.", "my number is five five five", "I want to order pizza and", "It's john at", "Send it to the", "Um, my ID is 1001."] {
            assert!(looks_unfinished(t), "{t}");
        }
        for t in ["What is the capital of Germany?", "How many legs does a dog have?", "Thank you.", "", "Is it ready, 1001?"] {
            assert!(!looks_unfinished(t), "{t}");
        }
    }

    #[test]
    fn only_a_whole_question_reads_complete() {
        for t in ["What is the capital of Germany?", " How many legs does a dog have? ", "Is order 1001 ready?"] {
            assert!(reads_complete(t), "{t}");
        }
        // Statements, one-word questions, questions cut off mid-way, and a question
        // ending in digits (more may follow) wait for the window.
        for t in ["I'd like to check my order.", "Thank you.", "Really?", "", "Can I talk to, ?", "Is the order for the?", "What is", "Is it ready, 1001?"] {
            assert!(!reads_complete(t), "{t}");
        }
    }

    #[test]
    fn backchannels_carry_no_words() {
        let b = backchannels();
        for t in ["", "Mm-hm.", "Uh huh", "okay, okay", "Yeah. Right.", "hmm"] {
            assert!(is_backchannel(t, &b), "{t}");
        }
        for t in ["Wait, stop.", "okay but what about tomorrow", "No.", "yeah I need a refill"] {
            assert!(!is_backchannel(t, &b), "{t}");
        }
    }

    #[test]
    fn a_plain_yes_confirms_and_anything_else_does_not() {
        for t in ["Yes.", "Yes, please go ahead.", "Yes, that's right.", "yeah sure", "Okay, please do.", "Please go ahead."] {
            assert_eq!(confirmation_answer(t), Some(true), "{t}");
        }
        for t in ["Actually no, don't do that. Never mind.", "No.", "Yes, no wait.", "Not that one."] {
            assert_eq!(confirmation_answer(t), Some(false), "{t}");
        }
        for t in ["", "What time can I pick it up?", "Please refill my other one.", "Yes, and when can I pick up my other order, the one from last week?", "Is it ready?", "Sure?"] {
            assert_eq!(confirmation_answer(t), None, "{t}");
        }
    }

    #[test]
    fn partials_show_only_agreed_words_and_never_retract() {
        let mut s = PartialStabilizer::default();
        assert_eq!(s.update("My"), None);
        assert_eq!(s.update("My phone"), Some("My".into()));
        assert_eq!(s.update("My phone number"), Some(" phone".into()));
        // A changed hypothesis shows nothing new until it settles.
        assert_eq!(s.update("My fun number is"), None);
        assert_eq!(s.update("My fun number is five"), None);
        assert_eq!(s.shown_words(), 2);
        assert_eq!(s.update("My fun number is five five"), None);
        assert_eq!(s.shown_words(), 2);
    }

    #[test]
    fn partials_extend_when_hypotheses_agree() {
        let mut s = PartialStabilizer::default();
        s.update("What is the");
        assert_eq!(s.update("What is the capital"), Some("What is the".into()));
        assert_eq!(s.update("What is the capital of Germany"), Some(" capital".into()));
    }
}
