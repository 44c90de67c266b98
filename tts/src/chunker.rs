//! Cuts a streaming LLM reply into phrases that can be synthesized one by one.
//!
//! Synthesis of a phrase can start as soon as the phrase is complete, so the
//! caller hears the first words while the LLM is still writing the rest. Cutting
//! too early breaks prosody (a voice reads "Dr." as the end of a sentence) and
//! cutting too late delays the first audio, hence the rules in [`PhraseChunker`].
//!
//! ```
//! use parley_tts::chunker::PhraseChunker;
//!
//! let mut chunker = PhraseChunker::new();
//! let mut phrases = Vec::new();
//! for token in ["Sure", ", Dr", ". Smith", "'s order is ready", ". It costs $3", ".50", "."] {
//!     phrases.extend(chunker.push(token));
//! }
//! phrases.extend(chunker.finish());
//! assert_eq!(phrases, ["Sure, Dr. Smith's order is ready.", "It costs $3.50."]);
//! ```

use crate::text::{self, Boundary};

/// The first phrase of a reply may be cut at a comma once it is this long, so
/// the first audio starts sooner; shorter cuts would sound choppy.
pub const FIRST_PHRASE_MIN_CHARS: usize = 25;

/// A phrase longer than this is cut at a word boundary even without punctuation:
/// an LLM that writes a 600-character sentence must not hold back all the audio.
pub const MAX_PHRASE_CHARS: usize = 200;

/// Text with no whitespace at all (a huge URL, garbage) is cut hard at this length
/// so the buffer cannot grow without bound.
const RUNAWAY_CHARS: usize = 1000;

/// Turns a stream of LLM tokens into complete, speakable phrases.
///
/// Phrases end at sentence ends (`.`, `!`, `?` followed by whitespace) and at line
/// breaks. The first phrase of a reply also ends at `,` `;` `:` once it has at
/// least [`FIRST_PHRASE_MIN_CHARS`] characters. Anything longer than
/// [`MAX_PHRASE_CHARS`] is cut at a word boundary. Numbers (`3.5`, `10:00`,
/// `1,000`), common abbreviations (`Dr.`, `e.g.`, `etc.`), initials, list numbers,
/// emails and URLs are never cut. Markdown symbols are removed and phrases with
/// nothing to say (no letter or digit) are dropped.
///
/// One chunker serves one reply at a time; [`PhraseChunker::finish`] ends the reply
/// and makes the chunker ready for the next one.
#[derive(Debug, Clone)]
pub struct PhraseChunker {
    /// Text received but not yet returned as a phrase.
    buf: String,
    /// No phrase has been returned yet in this reply.
    first: bool,
}

impl Default for PhraseChunker {
    fn default() -> Self {
        Self::new()
    }
}

impl PhraseChunker {
    /// A chunker at the start of a reply.
    pub fn new() -> Self {
        Self {
            buf: String::new(),
            first: true,
        }
    }

    /// Adds streamed text and returns the phrases it completed, in order, cleaned
    /// of markdown and extra whitespace. Often empty: a phrase is only returned once
    /// the text after it proves it ended (a `.` alone may still become `3.5`).
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.buf.push_str(text);
        let mut phrases = Vec::new();
        loop {
            let start = self.buf.len() - self.buf.trim_start().len();
            self.buf.drain(..start);
            let Some(cut) = self.find_cut() else { break };
            let raw: String = self.buf.drain(..cut).collect();
            if let Some(phrase) = clean_phrase(&raw) {
                self.first = false;
                phrases.push(phrase);
            }
        }
        phrases
    }

    /// Ends the reply: returns what is left (if it has anything to say) and resets
    /// the chunker for the next reply.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        self.first = true;
        clean_phrase(&rest)
    }

    /// Discards the buffered text without returning it (barge-in: what was not
    /// said yet will never be said) and resets for the next reply.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.first = true;
    }

    /// The byte index where the buffered text (which starts with a non-space) should
    /// be cut, if a phrase is complete.
    fn find_cut(&self) -> Option<usize> {
        let s = self.buf.as_str();
        let chars: Vec<(usize, char)> = s.char_indices().collect();
        let byte_after = |k: usize| chars.get(k + 1).map_or(s.len(), |&(i, _)| i);
        let mut k = 0;
        while k < chars.len() {
            let (i, c) = chars[k];
            if c == '\n' {
                return Some(i + 1);
            }
            if text::is_sentence_end(c) {
                // The whole run "?!", "..." and any closing quote or bracket.
                let mut end = k;
                while end + 1 < chars.len() && text::is_sentence_end(chars[end + 1].1) {
                    end += 1;
                }
                let single_period = c == '.' && end == k;
                while end + 1 < chars.len() && text::is_closer(chars[end + 1].1) {
                    end += 1;
                }
                let Some(&(_, next)) = chars.get(end + 1) else {
                    // The next character decides ("3." may become "3.5"): wait for it.
                    return None;
                };
                if next.is_whitespace() {
                    let boundary = if single_period {
                        text::period_boundary(s, 0, i)
                    } else {
                        Boundary::Yes
                    };
                    match boundary {
                        Boundary::Yes => return Some(byte_after(end)),
                        Boundary::Undecided => return None,
                        Boundary::No => {}
                    }
                }
                k = end + 1;
                continue;
            }
            if self.first && text::is_clause_end(c) {
                // At the end of the buffer the next character decides: wait for it.
                let &(_, next) = chars.get(k + 1)?;
                if next.is_whitespace() && k + 1 >= FIRST_PHRASE_MIN_CHARS {
                    return Some(i + 1);
                }
            }
            k += 1;
        }
        if chars.len() > MAX_PHRASE_CHARS {
            self.hard_cut(&chars)
        } else {
            None
        }
    }

    /// Where to cut a phrase that grew past [`MAX_PHRASE_CHARS`] without a sentence
    /// end: preferably after a clause (`, ` in its second half), else at the last
    /// word boundary before the limit, else at the first one after it.
    fn hard_cut(&self, chars: &[(usize, char)]) -> Option<usize> {
        let s = self.buf.as_str();
        let limit = MAX_PHRASE_CHARS.min(chars.len());
        let is_space = |k: usize| chars.get(k).is_some_and(|&(_, c)| c.is_whitespace());
        let clause = (MAX_PHRASE_CHARS / 2..limit)
            .rev()
            .find(|&k| text::is_clause_end(chars[k].1) && is_space(k + 1));
        if let Some(k) = clause {
            return Some(chars[k].0 + 1);
        }
        // Never cut between an abbreviation and the word it introduces ("Dr. | Smith").
        let good_space = |k: usize| {
            is_space(k)
                && k > 0
                && !(chars[k - 1].1 == '.'
                    && text::period_boundary(s, 0, chars[k - 1].0) == Boundary::No)
        };
        if let Some(k) = (1..limit).rev().find(|&k| good_space(k)) {
            return Some(chars[k].0);
        }
        if let Some(k) = (limit..chars.len()).find(|&k| is_space(k)) {
            return Some(chars[k].0);
        }
        if chars.len() > RUNAWAY_CHARS {
            return Some(chars[MAX_PHRASE_CHARS].0);
        }
        None
    }
}

/// Markdown out, whitespace collapsed; `None` when nothing is left to say.
fn clean_phrase(raw: &str) -> Option<String> {
    let phrase = text::collapse_whitespace(&text::strip_markdown(raw));
    text::is_speakable(&phrase).then_some(phrase)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one and returns every phrase, `finish` included.
    fn run(pieces: &[&str]) -> Vec<String> {
        let mut chunker = PhraseChunker::new();
        let mut out = Vec::new();
        for p in pieces {
            out.extend(chunker.push(p));
        }
        out.extend(chunker.finish());
        out
    }

    /// Feeds `text` in every way that matters: whole, char by char, and in pieces
    /// of 2, 3 and 7 bytes (on char boundaries), and checks they all agree.
    fn all_ways(text: &str) -> Vec<String> {
        let whole = run(&[text]);
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs), whole, "char by char differs for {text:?}");
        for n in [2, 3, 7] {
            let mut pieces = Vec::new();
            let mut cur = String::new();
            for c in text.chars() {
                cur.push(c);
                if cur.len() >= n {
                    pieces.push(std::mem::take(&mut cur));
                }
            }
            pieces.push(cur);
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(run(&refs), whole, "pieces of {n} differ for {text:?}");
        }
        whole
    }

    #[test]
    fn cuts_at_sentence_ends() {
        assert_eq!(
            all_ways("Hello there. How are you? I am fine! Bye"),
            ["Hello there.", "How are you?", "I am fine!", "Bye"]
        );
    }

    #[test]
    fn waits_for_the_character_after_a_period() {
        let mut c = PhraseChunker::new();
        assert!(c.push("It is 3.").is_empty());
        assert!(c.push("5 degrees").is_empty());
        assert_eq!(c.push(". Cold"), ["It is 3.5 degrees."]);
        assert!(c.push(" out").is_empty());
        assert_eq!(c.finish().as_deref(), Some("Cold out"));
    }

    #[test]
    fn never_cuts_numbers() {
        assert_eq!(
            all_ways("It is 3.5 degrees at 10:00 and costs 1,000 dollars, more or less, ok. Next."),
            [
                "It is 3.5 degrees at 10:00 and costs 1,000 dollars,",
                "more or less, ok.",
                "Next."
            ]
        );
    }

    #[test]
    fn never_cuts_abbreviations() {
        assert_eq!(
            all_ways(
                "Mr. and Mrs. Smith met Dr. Jones. They like fruit, e.g. apples, i.e. food. Fine."
            ),
            [
                "Mr. and Mrs. Smith met Dr. Jones.",
                "They like fruit, e.g. apples, i.e. food.",
                "Fine."
            ]
        );
    }

    #[test]
    fn sentence_final_abbreviations_look_at_the_next_word() {
        assert_eq!(
            all_ways("Come at 5 p.m. or later. We close at 9 p.m. See you, etc. Bye"),
            [
                "Come at 5 p.m. or later.",
                "We close at 9 p.m.",
                "See you, etc.",
                "Bye"
            ]
        );
    }

    #[test]
    fn never_cuts_emails_or_urls() {
        assert_eq!(
            all_ways("Write to john.doe@example.com or visit https://example.com/a?b=c. Thanks"),
            [
                "Write to john.doe@example.com or visit https://example.com/a?b=c.",
                "Thanks"
            ]
        );
    }

    #[test]
    fn first_phrase_cuts_at_a_comma_once_long_enough() {
        assert_eq!(
            all_ways("Yes, your prescription is ready, and you can pick it up today, or tomorrow."),
            [
                "Yes, your prescription is ready,",
                "and you can pick it up today, or tomorrow."
            ]
        );
        assert_eq!(
            all_ways("Okay; let me check that: one moment please; thanks."),
            ["Okay; let me check that: one moment please;", "thanks."]
        );
    }

    #[test]
    fn next_reply_gets_a_fresh_first_phrase() {
        let mut c = PhraseChunker::new();
        assert_eq!(
            c.push("Your order number is ready, and more "),
            ["Your order number is ready,"]
        );
        assert_eq!(c.finish().as_deref(), Some("and more"));
        assert_eq!(
            c.push("Second reply starts here, with a comma "),
            ["Second reply starts here,"]
        );
    }

    #[test]
    fn cuts_at_newlines_and_strips_markdown() {
        assert_eq!(
            all_ways(
                "## Your options\n- **Refill** now\n- Pick up at `noon`\n\n1. First step\n2. Second"
            ),
            [
                "Your options",
                "Refill now",
                "Pick up at noon",
                "1. First step",
                "2. Second"
            ]
        );
    }

    #[test]
    fn drops_phrases_without_letters_or_digits() {
        assert_eq!(all_ways("Hi.\n---\n*** ... 🎉\nBye."), ["Hi.", "Bye."]);
        assert_eq!(run(&["", " ", "\n"]), Vec::<String>::new());
    }

    #[test]
    fn keeps_closing_quotes_and_runs_of_punctuation() {
        assert_eq!(
            all_ways("He said \"stop.\" Then what?! Well... okay."),
            ["He said \"stop.\"", "Then what?!", "Well...", "okay."]
        );
    }

    #[test]
    fn hard_cuts_long_phrases_at_word_boundaries() {
        let long = "word ".repeat(100);
        let phrases = all_ways(&long);
        assert!(phrases.len() >= 3, "{phrases:?}");
        for p in &phrases {
            assert!(p.chars().count() <= MAX_PHRASE_CHARS, "{} chars", p.len());
            assert!(
                p.split(' ').all(|w| w == "word"),
                "cut inside a word: {p:?}"
            );
        }
        assert_eq!(phrases.join(" "), long.trim());
    }

    #[test]
    fn hard_cut_prefers_a_clause_boundary_and_spares_abbreviations() {
        let text = format!(
            "{}, and then Dr. Smith {}",
            "a".repeat(150),
            "b ".repeat(40)
        );
        let mut c = PhraseChunker::new();
        c.first = false; // not the first phrase: commas alone do not cut
        let phrases = c.push(&text);
        assert_eq!(phrases.len(), 1, "{phrases:?}");
        assert!(phrases[0].ends_with(','), "{phrases:?}");
        let text = format!("{} Dr. Smith {}", "a ".repeat(98), "b ".repeat(60));
        let mut c = PhraseChunker::new();
        c.first = false;
        let phrases = c.push(&text);
        assert!(phrases.iter().all(|p| !p.ends_with("Dr.")), "{phrases:?}");
    }

    #[test]
    fn long_text_without_spaces_is_cut_eventually() {
        let url = "x".repeat(1500);
        let mut c = PhraseChunker::new();
        let phrases = c.push(&url);
        assert!(!phrases.is_empty());
        assert!(
            phrases
                .iter()
                .all(|p| p.chars().count() <= MAX_PHRASE_CHARS)
        );
    }

    #[test]
    fn multibyte_text_is_safe() {
        assert_eq!(
            all_ways("Ça va très bien… Merci! «Voilà» — naïve café. 日本語です。"),
            [
                "Ça va très bien…",
                "Merci!",
                "«Voilà» — naïve café.",
                "日本語です。"
            ]
        );
    }

    #[test]
    fn reset_drops_pending_text() {
        let mut c = PhraseChunker::new();
        assert!(c.push("This will never be").is_empty());
        c.reset();
        assert_eq!(c.finish(), None);
    }
}
