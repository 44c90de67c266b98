//! Personal data out of the logs: phone numbers, payment card numbers (Luhn-checked),
//! e-mail addresses and SSN-like numbers in transcripts, model text and tool
//! arguments and results are replaced by `[phone]`, `[card]`, `[email]` and `[ssn]`
//! before they reach a log line, whether written ("555-123-4567",
//! "jo@example.com") or spoken as words, as speech-to-text writes them ("five five
//! five, one two three four", "jo dot smith at example dot com").
//!
//! Only logs: what the caller hears and what the model reads are never changed. An
//! operator who must see the raw text turns it off (`[logging] redact = false`,
//! [`set_enabled`]).
//!
//! How numbers are found: the text is cut into words; a run of digit groups and
//! number words ("oh", "five", "twenty", "double", "hundred"), joined only by spaces,
//! dashes, dots, commas or parentheses, is read as one digit string. 13 to 19 digits
//! that pass the Luhn check are a card, exactly 9 an SSN, 7 to 15 a phone number;
//! shorter numbers (an order of 2, a time, a year) stay. Hand-written rather than a
//! crate: no maintained crate reads spoken number words.
//!
//! ```
//! use parley_agent::redact::redact;
//! assert_eq!(redact("call me at five five five, one two three, four five six seven"), "call me at [phone]");
//! assert_eq!(redact("card 4111 1111 1111 1111 please"), "card [card] please");
//! assert_eq!(redact("order 2 of ORD003"), "order 2 of ORD003");
//! ```

use std::borrow::Cow;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use regex::Regex;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns redaction on or off for the whole process (`[logging] redact`); on by
/// default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether log text is redacted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Text for a log line: redacted (when redaction is on) as it is formatted, so a
/// line below the log level costs nothing. `info!(heard = %Redacted(&text), ...)`.
pub struct Redacted<'a>(pub &'a str);

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if enabled() { f.write_str(&redact(self.0)) } else { f.write_str(self.0) }
    }
}

/// A written e-mail address.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)+").unwrap_or_else(|e| unreachable!("valid regex: {e}"))
});

/// A spoken one: words joined by "dot" (or "underscore", "dash"), "at", a domain
/// of words joined by "dot" that ends in a common top-level domain.
static SPOKEN_EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b[a-z0-9_]+(?:\s+(?:dot|underscore|dash|hyphen)\s+[a-z0-9_]+)*\s+at\s+[a-z0-9]+(?:\s+(?:dot|dash|hyphen)\s+[a-z0-9]+)*\s+dot\s+(?:com|org|net|edu|gov|io|co|uk|us|ca|de|fr|info|biz|me)\b",
    )
    .unwrap_or_else(|e| unreachable!("valid regex: {e}"))
});

/// `text` with phone numbers, card numbers, e-mail addresses and SSN-like numbers
/// replaced, in written and spoken forms (regardless of [`enabled`]).
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    if let Cow::Owned(s) = EMAIL.replace_all(&out, "[email]") {
        out = Cow::Owned(s);
    }
    if let Cow::Owned(s) = SPOKEN_EMAIL.replace_all(&out, "[email]") {
        out = Cow::Owned(s);
    }
    match redact_numbers(&out) {
        Some(s) => Cow::Owned(s),
        None => out,
    }
}

/// What a word means inside a number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// A group of digits as written.
    Digits,
    /// A digit word: "zero" to "nine".
    Unit(u8),
    /// "oh" or "o": zero, but only between other parts of a number.
    Oh,
    /// "ten" to "nineteen".
    Teen(u8),
    /// "twenty" to "ninety".
    Tens(u8),
    /// "hundred".
    Hundred,
    /// "double" or "triple": the next digit two or three times.
    Repeat(usize),
}

fn part_of(word: &str) -> Option<Part> {
    if word.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Part::Digits);
    }
    const UNITS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    const TEENS: [&str; 10] = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"];
    const TENS: [&str; 8] = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
    let w = word.to_ascii_lowercase();
    if let Some(i) = UNITS.iter().position(|u| *u == w) {
        return Some(Part::Unit(i as u8));
    }
    if let Some(i) = TEENS.iter().position(|u| *u == w) {
        return Some(Part::Teen(10 + i as u8));
    }
    if let Some(i) = TENS.iter().position(|u| *u == w) {
        return Some(Part::Tens(20 + 10 * i as u8));
    }
    match w.as_str() {
        "oh" | "o" => Some(Part::Oh),
        "hundred" => Some(Part::Hundred),
        "double" => Some(Part::Repeat(2)),
        "triple" => Some(Part::Repeat(3)),
        _ => None,
    }
}

/// Whether the text between two words may sit inside one number: spaces and at most
/// one or two of `-.,()+`.
fn joins(between: &str) -> bool {
    let marks = between.chars().filter(|c| !c.is_whitespace()).count();
    between.chars().all(|c| c.is_whitespace() || "-.,()+".contains(c)) && marks <= 2 && between.len() <= 6
}

/// One word of the text: its byte range and what it means in a number, if anything.
struct Word {
    start: usize,
    end: usize,
    part: Option<Part>,
}

fn words(text: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        if c.is_alphanumeric() || (c == '\'' && start.is_some()) {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            let w = &text[s..i];
            out.push(Word { start: s, end: i, part: part_of(w) });
        }
    }
    out
}

/// The digit string a run of number words and digit groups says.
fn digits_of(text: &str, run: &[Word]) -> String {
    let mut digits = String::new();
    // After "hundred": the next value under 100 fills its two zeros.
    let mut hundred_at: Option<usize> = None;
    let mut i = 0;
    while i < run.len() {
        let Some(part) = run[i].part else { break };
        let next = run.get(i + 1).and_then(|w| w.part);
        let mut value: Option<u8> = None;
        match part {
            Part::Digits => digits.push_str(&text[run[i].start..run[i].end]),
            Part::Unit(d) => value = Some(d),
            Part::Oh => value = Some(0),
            Part::Teen(n) => value = Some(n),
            Part::Tens(t) => match next {
                Some(Part::Unit(d)) if d > 0 => {
                    value = Some(t + d);
                    i += 1;
                }
                _ => value = Some(t),
            },
            Part::Hundred => {
                if !digits.is_empty() {
                    digits.push_str("00");
                    hundred_at = Some(digits.len() - 2);
                }
            }
            Part::Repeat(n) => match next {
                Some(Part::Unit(d)) => {
                    digits.extend(std::iter::repeat_n(char::from(b'0' + d), n));
                    i += 1;
                }
                Some(Part::Oh) => {
                    digits.extend(std::iter::repeat_n('0', n));
                    i += 1;
                }
                _ => {}
            },
        }
        if let Some(v) = value {
            match hundred_at.take() {
                // "five hundred twenty" is 520; "eight hundred five five five" is 800 555.
                Some(at) if (10..100).contains(&v) => digits.replace_range(at.., &v.to_string()),
                _ => digits.push_str(&v.to_string()),
            }
        } else if !matches!(part, Part::Hundred) {
            hundred_at = None;
        }
        i += 1;
    }
    digits
}

/// The Luhn checksum of a card number.
fn luhn(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

/// What a number is, by its digits; `None` keeps it.
fn kind_of(digits: &str) -> Option<&'static str> {
    let n = digits.len();
    if (13..=19).contains(&n) && luhn(digits) {
        Some("[card]")
    } else if n == 9 {
        Some("[ssn]")
    } else if (7..=15).contains(&n) {
        Some("[phone]")
    } else {
        None
    }
}

/// The text with its sensitive numbers replaced; `None` when there were none.
fn redact_numbers(text: &str) -> Option<String> {
    let words = words(text);
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut changed = false;
    let mut i = 0;
    while i < words.len() {
        if words[i].part.is_none() {
            i += 1;
            continue;
        }
        // The longest run of number parts from here.
        let mut j = i + 1;
        while j < words.len() && words[j].part.is_some() && joins(&text[words[j - 1].end..words[j].start]) {
            j += 1;
        }
        // "oh" only counts between other parts ("oh, five five five" is a word and a number).
        let (mut a, mut b) = (i, j);
        while a < b && words[a].part == Some(Part::Oh) {
            a += 1;
        }
        while b > a && words[b - 1].part == Some(Part::Oh) {
            b -= 1;
        }
        if a < b
            && let Some(label) = kind_of(&digits_of(text, &words[a..b]))
        {
            // A "(" or "+" just before the number belongs to it.
            let mut start = words[a].start;
            while start > copied && text[..start].ends_with(['(', '+']) {
                start -= 1;
            }
            out.push_str(&text[copied..start]);
            out.push_str(label);
            copied = words[b - 1].end;
            changed = true;
        }
        i = j;
    }
    changed.then(|| {
        out.push_str(&text[copied..]);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str) -> String {
        redact(text).into_owned()
    }

    #[test]
    fn written_phone_numbers() {
        assert_eq!(r("Call 555-123-4567 now."), "Call [phone] now.");
        assert_eq!(r("my number is (555) 123-4567"), "my number is [phone]");
        assert_eq!(r("+1 415 555 2671"), "[phone]");
        assert_eq!(r("+44 20 7946 0958, thanks"), "[phone], thanks");
        assert_eq!(r("555.123.4567"), "[phone]");
        assert_eq!(r("5551234"), "[phone]");
        assert_eq!(r("it is 555 1234."), "it is [phone].");
    }

    #[test]
    fn spoken_phone_numbers() {
        assert_eq!(r("five five five one two three four five six seven"), "[phone]");
        assert_eq!(r("It's five five five, one two three, four five six seven."), "It's [phone].");
        assert_eq!(r("my number is eight hundred five five five oh one nine nine"), "my number is [phone]");
        assert_eq!(r("four one five double five five, two six seven one"), "[phone]");
        assert_eq!(r("Five-five-five, twelve thirty-four."), "[phone].");
        assert_eq!(r("call 555 one two three 4567"), "call [phone]");
        assert_eq!(r("Oh, five five five one two three four."), "Oh, [phone].");
    }

    #[test]
    fn cards_need_the_luhn_check() {
        assert_eq!(r("card 4111 1111 1111 1111 exp 12/27"), "card [card] exp 12/27");
        assert_eq!(r("4111-1111-1111-1111"), "[card]");
        assert_eq!(r("5500 0000 0000 0004"), "[card]");
        assert_eq!(r("378282246310005"), "[card]", "15-digit Amex");
        // Sixteen digits that fail the check are no card (and too long for a phone).
        assert_eq!(r("ref 4111 1111 1111 1112"), "ref 4111 1111 1111 1112");
        assert_eq!(
            r("four one one one, one one one one, one one one one, one one one one"),
            "[card]",
            "spoken digit by digit"
        );
        assert_eq!(r("forty-one eleven, eleven eleven, eleven eleven, eleven eleven"), "[card]");
    }

    #[test]
    fn ssn_like_numbers() {
        assert_eq!(r("SSN 123-45-6789."), "SSN [ssn].");
        assert_eq!(r("it's 123456789"), "it's [ssn]");
        assert_eq!(r("one two three, four five, six seven eight nine"), "[ssn]");
    }

    #[test]
    fn email_addresses() {
        assert_eq!(r("write to jo.smith+rx@example.co.uk today"), "write to [email] today");
        assert_eq!(r("It's jo dot smith at gmail dot com."), "It's [email].");
        assert_eq!(r("JANE_DOE at Example dot org"), "[email]");
        assert_eq!(r("mail bob underscore lee at mail dot example dot com please"), "mail [email] please");
        assert_eq!(r("I'm at the pharmacy"), "I'm at the pharmacy");
    }

    #[test]
    fn ordinary_numbers_and_words_stay() {
        for keep in [
            "I need 2 refills of 20 mg tablets.",
            "Order ORD003 for member M1001, pickup at 10:30.",
            "born on 04/12/1985",
            "one moment please",
            "I have one question and two more after that.",
            "the total is $42.50",
            "twenty twenty five",
            "Oh, one more thing.",
            "",
        ] {
            assert_eq!(r(keep), keep);
            assert!(matches!(redact(keep), Cow::Borrowed(_)), "no copy when nothing changes: {keep}");
        }
    }

    #[test]
    fn everything_in_one_line_and_non_ascii_text() {
        assert_eq!(
            r("Name: Zoë, phone 555-123-4567, card 4111111111111111, mail zoe@example.com, SSN 123 45 6789."),
            "Name: Zoë, phone [phone], card [card], mail [email], SSN [ssn]."
        );
        assert_eq!(r("Größe 555 123 4567 – ok"), "Größe [phone] – ok");
    }

    #[test]
    fn tool_arguments_as_json() {
        let args = r#"{"phone":"555-123-4567","email":"a@b.io","member_id":"M1001","qty":2}"#;
        assert_eq!(r(args), r#"{"phone":"[phone]","email":"[email]","member_id":"M1001","qty":2}"#);
    }

    #[test]
    fn the_display_wrapper_follows_the_switch() {
        let text = "five five five one two three four";
        assert_eq!(Redacted(text).to_string(), "[phone]");
        // Other tests read the switch too: turn it back on straight away.
        set_enabled(false);
        let raw = Redacted(text).to_string();
        set_enabled(true);
        assert_eq!(raw, text);
    }

    #[test]
    fn luhn_checks() {
        assert!(luhn("4111111111111111"));
        assert!(!luhn("4111111111111112"));
        assert!(luhn("79927398713"));
    }
}
