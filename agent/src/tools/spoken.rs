//! Words made for speech: dates, times, quantities, strengths and ids written the way
//! a caller should hear them ("December sixth at ten a.m.", "O R D zero zero one"),
//! so that what a tool hands the model can be read out as it is, and the voice never
//! has to guess how to say `2026-12-06` or `ORD001`.

const ONES: [&str; 20] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
];
const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// A whole number in words: 21 → "twenty-one", 500 → "five hundred".
pub fn cardinal(n: u64) -> String {
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=99 => match n % 10 {
            0 => TENS[(n / 10) as usize].to_string(),
            unit => format!("{}-{}", TENS[(n / 10) as usize], ONES[unit as usize]),
        },
        100..=999 => with_rest(format!("{} hundred", ONES[(n / 100) as usize]), n % 100),
        1_000..=999_999 => with_rest(format!("{} thousand", cardinal(n / 1_000)), n % 1_000),
        _ => with_rest(format!("{} million", cardinal(n / 1_000_000)), n % 1_000_000),
    }
}

fn with_rest(head: String, rest: u64) -> String {
    if rest == 0 { head } else { format!("{head} {}", cardinal(rest)) }
}

/// A day of the month in words: 6 → "sixth", 22 → "twenty-second".
pub fn ordinal(n: u64) -> String {
    let words = cardinal(n);
    let (head, last) = match words.rfind(['-', ' ']) {
        Some(i) => words.split_at(i + 1),
        None => ("", words.as_str()),
    };
    let last = match last {
        "one" => "first".to_string(),
        "two" => "second".to_string(),
        "three" => "third".to_string(),
        "five" => "fifth".to_string(),
        "eight" => "eighth".to_string(),
        "nine" => "ninth".to_string(),
        "twelve" => "twelfth".to_string(),
        w if w.ends_with('y') => format!("{}ieth", &w[..w.len() - 1]),
        w => format!("{w}th"),
    };
    format!("{head}{last}")
}

/// An id spelled out, letter by letter and digit by digit: "ORD001" → "O R D zero
/// zero one"; "1001" → "one zero zero one".
pub fn id(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| match c.to_digit(10) {
            Some(d) => ONES[d as usize].to_string(),
            None => c.to_ascii_uppercase().to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `2026-12-06` → "December sixth"; `None` when it is not such a date.
pub fn date(iso: &str) -> Option<String> {
    let (_year, month, day) = ymd(iso)?;
    Some(format!("{} {}", MONTHS[month as usize - 1], ordinal(u64::from(day))))
}

/// Year, month and day of an ISO date, checked.
pub fn ymd(iso: &str) -> Option<(u32, u32, u32)> {
    let mut parts = iso.trim().splitn(3, '-');
    let year = parts.next()?.parse::<u32>().ok()?;
    let month = parts.next()?.parse::<u32>().ok()?;
    let day = parts.next()?.parse::<u32>().ok()?;
    ((1..=12).contains(&month) && (1..=31).contains(&day) && (1000..=9999).contains(&year)).then_some((year, month, day))
}

/// `10:00` → "ten a.m.", `14:30` → "two thirty p.m.", `09:05` → "nine oh five a.m.",
/// `12:00` → "noon"; `None` when it is not a time of day.
pub fn time(clock: &str) -> Option<String> {
    let (hour, minute) = clock.trim().split_once(':')?;
    let (hour, minute) = (hour.parse::<u64>().ok()?, minute.get(..2).unwrap_or(minute).parse::<u64>().ok()?);
    if hour > 23 || minute > 59 {
        return None;
    }
    match (hour, minute) {
        (12, 0) => return Some("noon".into()),
        (0, 0) => return Some("midnight".into()),
        _ => {}
    }
    let half = if hour < 12 { "a.m." } else { "p.m." };
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let minutes = match minute {
        0 => String::new(),
        1..=9 => format!(" oh {}", cardinal(minute)),
        _ => format!(" {}", cardinal(minute)),
    };
    Some(format!("{}{minutes} {half}", cardinal(hour12)))
}

/// "December sixth at ten a.m.", falling back to the stored text for a part that
/// is not in the expected form.
pub fn date_time(iso_date: &str, clock: &str) -> String {
    format!("{} at {}", date(iso_date).unwrap_or_else(|| iso_date.to_string()), time(clock).unwrap_or_else(|| clock.to_string()))
}

/// A strength as said aloud: "500 mg" → "five hundred milligrams", "0.5 mg" → "zero
/// point five milligrams"; unknown units are kept as written.
pub fn strength(raw: &str) -> String {
    raw.split_whitespace()
        .map(|word| {
            let unit = match word.to_ascii_lowercase().trim_end_matches('.') {
                "mg" => Some("milligrams"),
                "mcg" | "µg" | "ug" => Some("micrograms"),
                "g" => Some("grams"),
                "ml" => Some("milliliters"),
                "iu" => Some("international units"),
                _ => None,
            };
            match unit {
                Some(unit) => unit.to_string(),
                None => number_words(word).unwrap_or_else(|| word.to_string()),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// "500" → "five hundred", "0.5" → "zero point five"; `None` for other words.
fn number_words(word: &str) -> Option<String> {
    let (whole, fraction) = word.split_once('.').unwrap_or((word, ""));
    let whole = cardinal(whole.parse::<u64>().ok()?);
    if fraction.is_empty() {
        return Some(whole);
    }
    let digits: Option<Vec<String>> = fraction.chars().map(|c| c.to_digit(10).map(|d| ONES[d as usize].to_string())).collect();
    Some(format!("{whole} point {}", digits?.join(" ")))
}

/// Puts a space where two sentences were glued together ("pharmacy.The" →
/// "pharmacy. The"): after `.`, `!` or `?` that ends a lower-case word and comes right
/// before a capital. Decimals (`3.5`), initials (`U.S.`) and `a.m.` are left alone.
pub fn mend_spacing(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        out.push(c);
        let glued = matches!(c, '.' | '!' | '?')
            && i >= 2
            && chars[i - 1].is_lowercase()
            && chars[i - 2].is_lowercase()
            && chars.get(i + 1).is_some_and(|n| n.is_uppercase());
        if glued {
            out.push(' ');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_words() {
        let cases = [(0, "zero"), (7, "seven"), (21, "twenty-one"), (30, "thirty"), (60, "sixty"), (90, "ninety"), (100, "one hundred"), (500, "five hundred"), (1001, "one thousand one"), (2026, "two thousand twenty-six")];
        for (n, words) in cases {
            assert_eq!(cardinal(n), words, "{n}");
        }
        let cases = [(1, "first"), (2, "second"), (3, "third"), (6, "sixth"), (12, "twelfth"), (20, "twentieth"), (22, "twenty-second"), (30, "thirtieth"), (31, "thirty-first")];
        for (n, words) in cases {
            assert_eq!(ordinal(n), words, "{n}");
        }
    }

    #[test]
    fn ids_are_spelled_letter_by_letter() {
        assert_eq!(id("ORD001"), "O R D zero zero one");
        assert_eq!(id("rx1002"), "R X one zero zero two");
        assert_eq!(id("1001"), "one zero zero one");
    }

    #[test]
    fn dates_and_times_read_naturally() {
        assert_eq!(date_time("2026-12-06", "10:00"), "December sixth at ten a.m.");
        assert_eq!(date_time("2026-12-02", "14:30"), "December second at two thirty p.m.");
        assert_eq!(date_time("2026-01-31", "09:05"), "January thirty-first at nine oh five a.m.");
        assert_eq!(time("12:00").as_deref(), Some("noon"));
        assert_eq!(time("00:00").as_deref(), Some("midnight"));
        assert_eq!(time("00:15").as_deref(), Some("twelve fifteen a.m."));
        assert_eq!(time("16:45").as_deref(), Some("four forty-five p.m."));
        assert_eq!(date_time("soon", "later"), "soon at later");
        assert_eq!(date("2026-13-01"), None);
        assert_eq!(time("25:00"), None);
    }

    #[test]
    fn strengths_say_their_units() {
        assert_eq!(strength("500 mg"), "five hundred milligrams");
        assert_eq!(strength("10 mg"), "ten milligrams");
        assert_eq!(strength("50 mcg"), "fifty micrograms");
        assert_eq!(strength("0.5 mg"), "zero point five milligrams");
        assert_eq!(strength("1 puff"), "one puff");
    }

    #[test]
    fn glued_sentences_are_mended_and_others_left_alone() {
        assert_eq!(mend_spacing("at the pharmacy.The medication"), "at the pharmacy. The medication");
        assert_eq!(mend_spacing("Ready!Come by"), "Ready! Come by");
        assert_eq!(mend_spacing("is ready!Come by"), "is ready! Come by");
        assert_eq!(mend_spacing("It costs 3.50 in the U.S.A today"), "It costs 3.50 in the U.S.A today");
        assert_eq!(mend_spacing("ten a.m.Then"), "ten a.m.Then");
        assert_eq!(mend_spacing("Fine. Thanks."), "Fine. Thanks.");
    }
}
