//! Text to IPA phonemes with the espeak-ng C library, as Piper voices expect.
//!
//! The three functions used are declared here by hand instead of through a `-sys`
//! crate: it is only `espeak_Initialize`, `espeak_SetVoiceByName` and
//! `espeak_TextToPhonemes`, their signatures have been stable since 2014, and a
//! `-sys` crate would pull in bindgen (libclang) or vendor and build espeak-ng
//! from source. The library comes from Debian's `libespeak-ng-dev` (build) and
//! `libespeak-ng1` (run); its data from `espeak-ng-data`.
//!
//! espeak-ng keeps global state and is not thread-safe, so every call goes
//! through one process-wide mutex. Phonemizing a phrase takes well under a
//! millisecond, so the lock is never held for long.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::Mutex;

use crate::TtsError;
use crate::text::{self, Boundary};

/// `espeak_AUDIO_OUTPUT::AUDIO_OUTPUT_SYNCHRONOUS`: no audio device is opened.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_DONT_EXIT`: report a missing data directory instead of
/// calling `exit()` on the whole server.
const ESPEAK_INITIALIZE_DONT_EXIT: c_int = 0x8000;
/// `espeakCHARS_UTF8`.
const ESPEAK_CHARS_UTF8: c_int = 1;
/// `phonememode` bit 1: IPA as UTF-8 instead of espeak's ASCII phoneme names.
const PHONEME_MODE_IPA: c_int = 0x02;
/// `EE_OK`.
const EE_OK: c_int = 0;

#[link(name = "espeak-ng")]
unsafe extern "C" {
    fn espeak_Initialize(
        output: c_int,
        buflength: c_int,
        path: *const c_char,
        options: c_int,
    ) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(
        textptr: *mut *const c_void,
        textmode: c_int,
        phonememode: c_int,
    ) -> *const c_char;
}

/// espeak-ng's global state: whether it is initialised and which voice is selected.
struct State {
    initialized: bool,
    voice: Option<String>,
}

static ESPEAK: Mutex<State> = Mutex::new(State {
    initialized: false,
    voice: None,
});

/// Turns `text` into the IPA phoneme string a Piper voice was trained on.
///
/// Clauses are phonemized one by one and their punctuation (`,` `.` `?` …) is put
/// back after each, because `espeak_TextToPhonemes` drops it and the voice uses it
/// for pauses and intonation. Words are separated by spaces, clauses by a space.
pub fn phonemize(text: &str, voice: &str) -> Result<String, TtsError> {
    let mut out = String::new();
    for (clause, punct) in split_clauses(text) {
        let phonemes = if clause.trim().is_empty() {
            String::new()
        } else {
            clause_phonemes(&clause, voice)?
        };
        if phonemes.is_empty() && punct.is_none() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&phonemes);
        if let Some(p) = punct {
            out.push(p);
        }
    }
    Ok(out)
}

/// Phonemes of one clause (no clause punctuation inside).
fn clause_phonemes(clause: &str, voice: &str) -> Result<String, TtsError> {
    let c_text =
        CString::new(clause).map_err(|_| TtsError::Phonemize("text contains a NUL byte".into()))?;
    let mut state = ESPEAK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !state.initialized {
        // SAFETY: plain C call; a null path selects espeak-ng's compiled-in data directory.
        let rate = unsafe {
            espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS,
                0,
                std::ptr::null(),
                ESPEAK_INITIALIZE_DONT_EXIT,
            )
        };
        if rate <= 0 {
            return Err(TtsError::Phonemize(format!(
                "espeak_Initialize failed ({rate}): is the espeak-ng-data package installed?"
            )));
        }
        state.initialized = true;
        tracing::debug!(rate, "espeak-ng initialised");
    }
    if state.voice.as_deref() != Some(voice) {
        let c_voice = CString::new(voice)
            .map_err(|_| TtsError::Phonemize("voice name contains a NUL byte".into()))?;
        // SAFETY: `c_voice` is a valid NUL-terminated string for the duration of the call.
        let rc = unsafe { espeak_SetVoiceByName(c_voice.as_ptr()) };
        if rc != EE_OK {
            state.voice = None;
            return Err(TtsError::Phonemize(format!(
                "espeak-ng has no voice {voice:?} (error {rc})"
            )));
        }
        state.voice = Some(voice.to_owned());
    }
    let mut pieces: Vec<String> = Vec::new();
    let mut ptr: *const c_void = c_text.as_ptr().cast();
    // espeak returns one clause per call and advances `ptr`, setting it to null at
    // the end. The bound guards against a library bug looping forever.
    for _ in 0..=clause.len() {
        if ptr.is_null() {
            break;
        }
        // SAFETY: `ptr` points into `c_text` (NUL-terminated, alive for this scope),
        // and the mutex guarantees no other thread is inside espeak-ng.
        let res = unsafe { espeak_TextToPhonemes(&mut ptr, ESPEAK_CHARS_UTF8, PHONEME_MODE_IPA) };
        if res.is_null() {
            break;
        }
        // SAFETY: espeak returns a NUL-terminated string in its own static buffer,
        // valid until the next call; it is copied out at once.
        let piece = unsafe { CStr::from_ptr(res) }.to_string_lossy();
        let piece = strip_language_switches(piece.trim());
        if !piece.is_empty() {
            pieces.push(piece);
        }
    }
    drop(state);
    Ok(pieces.join(" "))
}

/// Removes espeak's language-switch markers such as `(fr)` … `(en)`, which it
/// inserts around foreign words; the voice would read them as phonemes.
fn strip_language_switches(phonemes: &str) -> String {
    let mut out = String::with_capacity(phonemes.len());
    let mut rest = phonemes;
    while let Some(open) = rest.find('(') {
        let after = &rest[open + 1..];
        match after.find(')') {
            Some(close)
                if close > 0
                    && after[..close]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-') =>
            {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Splits text into clauses and the punctuation that ended each (`None` for a
/// last clause without any). A clause ends at `. , ; : ! ? …` followed by
/// whitespace or the end, so "3.5", "10:00", "1,000", URLs and abbreviations
/// ("Dr. Smith") stay whole.
pub(crate) fn split_clauses(text: &str) -> Vec<(String, Option<char>)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut clauses = Vec::new();
    let mut start = 0; // byte index of the current clause
    let mut k = 0;
    while k < chars.len() {
        let (i, c) = chars[k];
        if !(text::is_sentence_end(c) || text::is_clause_end(c)) {
            k += 1;
            continue;
        }
        let mut end = k;
        while end + 1 < chars.len()
            && (text::is_sentence_end(chars[end + 1].1) || text::is_clause_end(chars[end + 1].1))
        {
            end += 1;
        }
        let mut after = end;
        while after + 1 < chars.len() && text::is_closer(chars[after + 1].1) {
            after += 1;
        }
        let at_end = after + 1 == chars.len();
        let followed_by_space = chars
            .get(after + 1)
            .is_some_and(|&(_, c)| c.is_whitespace());
        let is_boundary = (at_end || followed_by_space)
            && (c != '.' || end != k || text::period_boundary(text, start, i) != Boundary::No);
        if is_boundary {
            let run: Vec<char> = chars[k..=end].iter().map(|&(_, c)| c).collect();
            clauses.push((text[start..i].to_owned(), Some(clause_mark(&run))));
            start = chars.get(after + 1).map_or(text.len(), |&(b, _)| b);
            start += text[start..].len() - text[start..].trim_start().len();
        }
        k = after + 1;
    }
    if start < text.len() && text::is_speakable(&text[start..]) {
        clauses.push((text[start..].to_owned(), None));
    }
    clauses
}

/// The one punctuation mark that stands for a run such as `?!` or `...`: the
/// question or exclamation wins (it shapes the intonation), `…` becomes `.`.
fn clause_mark(run: &[char]) -> char {
    if run.contains(&'?') {
        '?'
    } else if run.contains(&'!') {
        '!'
    } else {
        match run.first() {
            Some(',') => ',',
            Some(';') => ';',
            Some(':') => ':',
            _ => '.',
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clauses(text: &str) -> Vec<(String, Option<char>)> {
        split_clauses(text)
    }

    #[test]
    fn clauses_keep_numbers_and_abbreviations_whole() {
        assert_eq!(
            clauses("Hello, Dr. Smith. It is 3.5 degrees at 10:00; ok?! Fine"),
            vec![
                ("Hello".into(), Some(',')),
                ("Dr. Smith".into(), Some('.')),
                ("It is 3.5 degrees at 10:00".into(), Some(';')),
                ("ok".into(), Some('?')),
                ("Fine".into(), None),
            ]
        );
        assert_eq!(
            clauses("Wait... \"what.\" "),
            vec![("Wait".into(), Some('.')), ("\"what".into(), Some('.'))]
        );
        assert_eq!(clauses(""), vec![]);
    }

    #[test]
    fn language_switches_are_removed() {
        assert_eq!(
            strip_language_switches("(fr)bɔ̃ʒuʁ(en) wˈɜːld"),
            "bɔ̃ʒuʁ wˈɜːld"
        );
        assert_eq!(strip_language_switches("a ( b"), "a ( b");
    }

    #[test]
    fn hello_world_phonemes() -> Result<(), TtsError> {
        let ipa = phonemize("hello world", "en-us")?;
        // espeak-ng 1.51: "həlˈoʊ wˈɜːld".
        assert!(
            ipa.contains('h') && ipa.contains('ə') && ipa.contains('w'),
            "{ipa}"
        );
        assert!(ipa.contains('ˈ'), "stress marks expected: {ipa}");
        assert!(ipa.contains(' '), "words separated: {ipa}");
        Ok(())
    }

    #[test]
    fn punctuation_is_put_back() -> Result<(), TtsError> {
        let ipa = phonemize("Hello, world. How are you?", "en-us")?;
        assert!(ipa.contains(", "), "{ipa}");
        assert!(ipa.contains(". "), "{ipa}");
        assert!(ipa.ends_with('?'), "{ipa}");
        Ok(())
    }

    #[test]
    fn phonemizing_from_many_threads_is_safe() {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    phonemize(&format!("thread number {i} says hello"), "en-us")
                })
            })
            .collect();
        for h in handles {
            let ipa = h
                .join()
                .expect("thread panicked")
                .expect("phonemize failed");
            assert!(ipa.contains("həlˈoʊ"), "{ipa}");
        }
    }

    #[test]
    fn unknown_voice_is_an_error() {
        assert!(matches!(
            phonemize("hi", "no-such-voice-xyz"),
            Err(TtsError::Phonemize(_))
        ));
        // and the next call with a good voice still works
        assert!(phonemize("hi", "en-us").is_ok_and(|s| !s.is_empty()));
    }
}
