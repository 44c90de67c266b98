//! Small text rules shared by the phrase chunker and the phonemizer.
//!
//! Both need to agree on what ends a sentence (so "Dr. Smith" is never split in
//! two) and on what is markdown noise that must not be read aloud. The LLM writes
//! for a screen; these rules make its output speakable without a full text
//! normalisation engine (espeak-ng already reads numbers, dates and most symbols).

/// Abbreviations after which a period never ends a sentence: they are always
/// followed by more of the same sentence (a name, an example).
const ALWAYS_ABBREVIATIONS: &[&str] = &[
    "mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "mt.", "vs.", "e.g.", "i.e.",
    "approx.", "dept.", "fig.", "ave.", "apt.", "ft.", "lt.", "col.", "gen.", "rev.", "hon.",
    "cf.", "viz.",
];

/// Abbreviations that can also end a sentence ("…at 5 p.m. See you"): a period after
/// them is a sentence end only when the next word starts with a capital letter.
const SENTENCE_FINAL_ABBREVIATIONS: &[&str] = &[
    "etc.", "a.m.", "p.m.", "inc.", "ltd.", "co.", "corp.", "u.s.", "u.k.", "jan.", "feb.", "mar.",
    "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "oct.", "nov.", "dec.",
];

/// Characters that end a sentence when followed by whitespace.
pub(crate) fn is_sentence_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…')
}

/// Characters that end a clause (not a sentence) when followed by whitespace.
pub(crate) fn is_clause_end(c: char) -> bool {
    matches!(c, ',' | ';' | ':')
}

/// Characters that may close a sentence after its final punctuation: `"Stop." He`.
pub(crate) fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | '”' | '’' | ')' | ']' | '*' | '_' | '`')
}

/// Whether a period at byte `dot` of `text` (followed by whitespace) ends a sentence.
///
/// `Undecided` means the answer depends on text that has not arrived yet (the next
/// word after a "p.m."), which only the streaming chunker can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Boundary {
    Yes,
    No,
    Undecided,
}

/// Decides whether the single `.` at byte index `dot` of `text` ends a sentence,
/// given that whitespace (or the end of the text) follows it.
///
/// `phrase_start` is where the current phrase starts, so a list number at its head
/// ("1. Take two tablets") is not cut off as a phrase of its own.
pub(crate) fn period_boundary(text: &str, phrase_start: usize, dot: usize) -> Boundary {
    let before = &text[phrase_start..dot];
    let word_start = before
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let word = before[word_start..].trim_start_matches(|c: char| {
        matches!(c, '(' | '"' | '\'' | '“' | '‘' | '[' | '*' | '_' | '`')
    });
    if word.is_empty() {
        return Boundary::Yes;
    }
    // A list number at the start of a phrase: "1." / "12.".
    if word_start == 0 && word.chars().all(|c| c.is_ascii_digit()) {
        return Boundary::No;
    }
    // An initial: "J. Smith", "vitamin C. Then" (a longer phrase is harmless).
    let mut chars = word.chars();
    if let (Some(c), None) = (chars.next(), chars.next())
        && c.is_alphabetic()
    {
        return Boundary::No;
    }
    let lower = format!("{}.", word.to_lowercase());
    if ALWAYS_ABBREVIATIONS.contains(&lower.as_str()) {
        return Boundary::No;
    }
    let next = text[dot + 1..].chars().find(|c| !c.is_whitespace());
    if lower == "no." {
        // "No. 5" is a number; "No. I can't." is a sentence.
        return match next {
            None => Boundary::Undecided,
            Some(c) if c.is_ascii_digit() => Boundary::No,
            Some(_) => Boundary::Yes,
        };
    }
    if SENTENCE_FINAL_ABBREVIATIONS.contains(&lower.as_str()) {
        return match next {
            None => Boundary::Undecided,
            Some(c) if c.is_uppercase() => Boundary::Yes,
            Some(_) => Boundary::No,
        };
    }
    Boundary::Yes
}

/// Removes markdown that would otherwise be read aloud or break the prosody:
/// emphasis (`*`, `_` at word edges), code ticks, headings (`#`), strike-through
/// (`~`), block quotes and list bullets at line starts, and link targets
/// (`[text](url)` keeps `text`).
///
/// Underscores inside words (`john_doe@example.com`) are kept.
pub fn strip_markdown(text: &str) -> String {
    let text = strip_link_targets(text);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let body = strip_line_marker(trimmed);
        let chars: Vec<char> = body.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            match c {
                '*' | '`' | '#' | '~' => {}
                '_' => {
                    let prev = i.checked_sub(1).map(|j| chars[j]);
                    let next = chars.get(i + 1).copied();
                    let inside_word = prev.is_some_and(char::is_alphanumeric)
                        && next.is_some_and(char::is_alphanumeric);
                    if inside_word {
                        out.push(c);
                    }
                }
                _ => out.push(c),
            }
        }
    }
    out
}

/// Drops a block-quote marker or a list bullet at the start of a line.
fn strip_line_marker(line: &str) -> &str {
    let mut rest = line;
    while let Some(r) = rest.strip_prefix('>') {
        rest = r.trim_start();
    }
    let unheaded = rest.trim_start_matches('#');
    if unheaded.len() != rest.len() && unheaded.starts_with(char::is_whitespace) {
        rest = unheaded.trim_start();
    }
    for bullet in ["- ", "+ ", "• ", "* "] {
        if let Some(r) = rest.strip_prefix(bullet) {
            return r.trim_start();
        }
    }
    rest
}

/// `[text](target)` → `text`: a URL read aloud helps no one on a call.
fn strip_link_targets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after_open = &rest[open + 1..];
        let Some(close) = after_open.find("](") else {
            break;
        };
        let after_paren = &after_open[close + 2..];
        let Some(end) = after_paren.find(')') else {
            break;
        };
        let label = &after_open[..close];
        if label.contains('[') || after_paren[..end].contains(char::is_whitespace) {
            // Not a link (nested bracket or spaces in the target): leave it alone.
            out.push_str(&rest[..open + 1]);
            rest = after_open;
            continue;
        }
        out.push_str(&rest[..open]);
        out.push_str(label);
        rest = &after_paren[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Collapses every run of whitespace (newlines included) into one space and trims.
pub fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Rewrites the few written forms espeak-ng reads badly on a phone call: money
/// (`$3.50` → "3 dollars 50 cents", espeak says "dollar three point five zero")
/// and clock times (`10:00` → "10 o'clock", `9:05` → "9 oh 5"; espeak says "ten
/// zero zero").
pub fn normalize_for_speech(text: &str) -> String {
    let text = collapse_whitespace(&strip_markdown(text));
    let text = expand_money(&text);
    expand_times(&text)
}

/// `$N`, `$N.NN`, `$N million` into words espeak reads naturally.
fn expand_money(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let int_len = after
            .char_indices()
            .take_while(|(i, c)| c.is_ascii_digit() || (*c == ',' && *i > 0))
            .count();
        // A trailing comma belongs to the sentence, not the number.
        let int_part = after[..int_len].trim_end_matches(',');
        if int_part.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let mut consumed = int_part.len();
        let mut cents: Option<&str> = None;
        let mut decimal: Option<&str> = None;
        let tail = &after[consumed..];
        if let Some(frac) = tail.strip_prefix('.') {
            let digits = frac.chars().take_while(char::is_ascii_digit).count();
            if digits == 2 {
                cents = Some(&frac[..2]);
                consumed += 3;
            } else if digits > 0 {
                decimal = Some(&frac[..digits]);
                consumed += 1 + digits;
            }
        }
        let tail = &after[consumed..];
        let scale = ["thousand", "million", "billion", "trillion"]
            .into_iter()
            .find(|w| {
                tail.strip_prefix(' ')
                    .and_then(|t| t.get(..w.len()))
                    .is_some_and(|t| t.eq_ignore_ascii_case(w))
                    && !tail[1 + w.len()..].starts_with(char::is_alphabetic)
            });
        if let Some(scale) = scale {
            out.push_str(int_part);
            if let Some(c) = cents.or(decimal) {
                out.push('.');
                out.push_str(c);
            }
            out.push(' ');
            out.push_str(scale);
            out.push_str(" dollars");
            rest = &tail[1 + scale.len()..];
            continue;
        }
        if let Some(d) = decimal {
            out.push_str(&format!("{int_part}.{d} dollars"));
        } else {
            let whole_is_zero = int_part.chars().all(|c| c == '0' || c == ',');
            let cents_n: u32 = cents.and_then(|c| c.parse().ok()).unwrap_or(0);
            if !(whole_is_zero && cents_n > 0) {
                let unit = if int_part == "1" { "dollar" } else { "dollars" };
                out.push_str(&format!("{int_part} {unit}"));
            }
            if cents_n > 0 {
                if !whole_is_zero {
                    out.push_str(" and ");
                }
                let unit = if cents_n == 1 { "cent" } else { "cents" };
                out.push_str(&format!("{cents_n} {unit}"));
            }
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// `H:MM` clock times; leaves `10:00:00`, `3:1` and longer digit runs alone.
fn expand_times(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b':' {
            i += 1;
            continue;
        }
        let hour_start = (0..i)
            .rev()
            .take_while(|&j| bytes[j].is_ascii_digit())
            .last()
            .unwrap_or(i);
        let hour_len = i - hour_start;
        let min_end = i
            + 1
            + bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
        let min_len = min_end - i - 1;
        let preceded_ok = hour_start == 0 || !matches!(bytes[hour_start - 1], b':' | b'.');
        let followed_ok = min_end == bytes.len() || !matches!(bytes[min_end], b':');
        if (1..=2).contains(&hour_len) && min_len == 2 && preceded_ok && followed_ok {
            let hour: u32 = text[hour_start..i].parse().unwrap_or(99);
            let minute: u32 = text[i + 1..min_end].parse().unwrap_or(99);
            if hour <= 24 && minute < 60 {
                out.push_str(&text[copied..hour_start]);
                let spoken = match minute {
                    0 => {
                        let next_word = text[min_end..].trim_start().to_lowercase();
                        let has_meridiem = ["am", "pm", "a.m", "p.m"]
                            .iter()
                            .any(|m| next_word.starts_with(m));
                        if has_meridiem {
                            format!("{hour}")
                        } else {
                            format!("{hour} o'clock")
                        }
                    }
                    1..=9 => format!("{hour} oh {minute}"),
                    _ => format!("{hour} {minute}"),
                };
                out.push_str(&spoken);
                copied = min_end;
            }
        }
        i = min_end.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// Whether a phrase has anything to say: a phrase of only punctuation, symbols or
/// emoji would be silence or noise.
pub(crate) fn is_speakable(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_stripped() {
        assert_eq!(
            strip_markdown("**Bold** and _it_ `code`"),
            "Bold and it code"
        );
        assert_eq!(
            strip_markdown("# Title\n- item one\n> quote"),
            "Title\nitem one\nquote"
        );
        assert_eq!(
            strip_markdown("mail john_doe@example.com"),
            "mail john_doe@example.com"
        );
        assert_eq!(
            strip_markdown("see [the docs](https://x.y/z) now"),
            "see the docs now"
        );
        assert_eq!(strip_markdown("a [b] c (d)"), "a [b] c (d)");
    }

    #[test]
    fn money_is_spoken() {
        assert_eq!(
            normalize_for_speech("It costs $3.50."),
            "It costs 3 dollars and 50 cents."
        );
        assert_eq!(normalize_for_speech("$1 only"), "1 dollar only");
        assert_eq!(normalize_for_speech("$0.99"), "99 cents");
        assert_eq!(normalize_for_speech("$1,200, paid"), "1,200 dollars, paid");
        assert_eq!(normalize_for_speech("$2.5 million"), "2.5 million dollars");
        assert_eq!(normalize_for_speech("$12.00"), "12 dollars");
        assert_eq!(normalize_for_speech("a $ sign"), "a $ sign");
    }

    #[test]
    fn times_are_spoken() {
        assert_eq!(
            normalize_for_speech("at 10:00 today"),
            "at 10 o'clock today"
        );
        assert_eq!(normalize_for_speech("at 10:00 am"), "at 10 am");
        assert_eq!(normalize_for_speech("at 9:05."), "at 9 oh 5.");
        assert_eq!(normalize_for_speech("at 14:30"), "at 14 30");
        assert_eq!(normalize_for_speech("12:00:00 and 3:1"), "12:00:00 and 3:1");
        assert_eq!(normalize_for_speech("Note: 5"), "Note: 5");
    }

    #[test]
    fn periods_after_abbreviations_do_not_end_sentences() {
        let t = "Ask Dr. Smith";
        assert_eq!(
            period_boundary(t, 0, t.find('.').unwrap_or(0)),
            Boundary::No
        );
        let t = "Done. Next";
        assert_eq!(period_boundary(t, 0, 4), Boundary::Yes);
        let t = "at 5 p.m. See";
        assert_eq!(period_boundary(t, 0, 8), Boundary::Yes);
        let t = "at 5 p.m. or";
        assert_eq!(period_boundary(t, 0, 8), Boundary::No);
        let t = "at 5 p.m. ";
        assert_eq!(period_boundary(t, 0, 8), Boundary::Undecided);
        let t = "1. Take";
        assert_eq!(period_boundary(t, 0, 1), Boundary::No);
        let t = "I have 3. Then";
        assert_eq!(period_boundary(t, 0, 8), Boundary::Yes);
    }
}
