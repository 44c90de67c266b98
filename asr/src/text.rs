//! Cleaning Whisper's output into what the caller said.

/// Removes bracketed non-speech tags (`[BLANK_AUDIO]`, `(music)`, `[ Silence ]`,
/// `*laughs*`-style tags are left alone) and collapses whitespace.
///
/// An unclosed bracket is kept as text: it is more likely speech than a tag.
pub fn clean_transcript(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(['[', '(']) {
        let close = if rest.as_bytes()[start] == b'[' {
            ']'
        } else {
            ')'
        };
        match rest[start + 1..].find(close) {
            Some(len) => {
                out.push_str(&rest[..start]);
                out.push(' ');
                rest = &rest[start + 1 + len + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::clean_transcript;

    #[test]
    fn strips_bracketed_tags() {
        assert_eq!(clean_transcript(" [BLANK_AUDIO]"), "");
        assert_eq!(
            clean_transcript(" (music) Hello there. [ Silence ]"),
            "Hello there."
        );
        assert_eq!(clean_transcript("one (coughs) two"), "one two");
    }

    #[test]
    fn keeps_unclosed_brackets_and_trims() {
        assert_eq!(clean_transcript("  call me at (555  "), "call me at (555");
        assert_eq!(clean_transcript(" One, two,  three. "), "One, two, three.");
    }
}
