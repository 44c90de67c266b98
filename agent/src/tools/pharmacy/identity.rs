//! Who the caller has proved to be, in this call. A voice is not an identity and a
//! member number alone is not a secret, so the desk discloses a member's orders and
//! prescriptions only after the caller gave the member ID *and* the matching date
//! of birth in this call; the state lives in the call's [`CallScope`], so one
//! caller's check never unlocks another call.
//!
//! [`CallScope`]: crate::tools::CallScope

use std::collections::HashMap;

/// Failed checks allowed in one call; after that the desk stops trying (guessing
/// birth dates over the phone must not work).
pub(super) const MAX_FAILURES: u32 = 3;

/// One call's identity state, kept in its scope.
#[derive(Debug, Default)]
pub(super) struct Identity {
    /// The member proved in this call.
    pub verified: Option<String>,
    /// Checks that did not match, each pair of member and date counted once.
    pub failures: u32,
    /// The pairs (member, date) of the checks that did not match.
    pub failed_pairs: Vec<String>,
    /// Refills offered for confirmation: prescription → the response that asked.
    /// A refill is placed only when confirmed in a later response, i.e. after the
    /// caller answered.
    pub proposed_refills: HashMap<String, u64>,
    /// Refills offered after a look-up ("Would you like me to request a refill?"):
    /// prescription → the response that offered. A plain yes in the next turn
    /// places it; anything else leaves it to the usual confirmation.
    pub offered_refills: HashMap<String, u64>,
}

impl Identity {
    /// True when too many checks failed in this call.
    pub fn locked(&self) -> bool {
        self.failures >= MAX_FAILURES
    }
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

/// A date of birth as callers and models write it, as `(year, month, day)`:
/// `1984-03-12`, `1984/3/12`, `03/12/1984` (month first, as a US desk reads it),
/// `March 12, 1984`, `12th of March 1984`, `Mar. 12th 1984`. `None` when it is not
/// a whole, valid date.
pub(super) fn parse_date(raw: &str) -> Option<(u32, u32, u32)> {
    let lower = raw.trim().to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '/' | '-' | '.'))
        .filter(|w| !w.is_empty() && *w != "of" && *w != "the")
        .collect();
    let number = |w: &str| -> Option<u32> {
        let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let suffix = &w[digits.len()..];
        matches!(suffix, "" | "st" | "nd" | "rd" | "th").then(|| digits.parse().ok()).flatten()
    };
    let month = |w: &str| MONTHS.iter().position(|m| w.starts_with(m)).map(|i| i as u32 + 1);
    let date = match words.as_slice() {
        &[a, b, c] => {
            let named = (month(a), month(b));
            match named {
                (Some(m), None) => (number(c)?, m, number(b)?),
                (None, Some(m)) => (number(c)?, m, number(a)?),
                _ => {
                    let (a, b, c) = (number(a)?, number(b)?, number(c)?);
                    if a > 31 { (a, b, c) } else { (c, a, b) }
                }
            }
        }
        _ => return None,
    };
    let (year, month, day) = date;
    let days = match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    ((1900..=2100).contains(&year) && (1..=days).contains(&day)).then_some(date)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_of_birth_in_the_forms_people_say_them() {
        for raw in [
            "1984-03-12",
            "1984/3/12",
            "03/12/1984",
            "3-12-1984",
            "March 12, 1984",
            "march 12th 1984",
            "12 March 1984",
            "the 12th of March, 1984",
            "Mar. 12th, 1984",
        ] {
            assert_eq!(parse_date(raw), Some((1984, 3, 12)), "{raw}");
        }
        for raw in ["", "1984", "March 1984", "1984-02-30", "13/13/1984", "yesterday", "March 12", "1801-01-01"] {
            assert_eq!(parse_date(raw), None, "{raw}");
        }
    }
}
