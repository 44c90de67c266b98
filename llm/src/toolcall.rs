//! Finding tool calls in a streamed reply, so that they are run instead of spoken.
//!
//! Qwen2.5 is trained to answer a tool request with
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, but the 0.5B model
//! often drops the tags, wraps the JSON in a Markdown fence, or writes `"parameters"`
//! instead of `"arguments"`. A voice agent must neither read that JSON aloud nor delay
//! an ordinary answer until the whole reply is known, so [`ToolCallFilter`] sits
//! between the decoder and the text-to-speech chunker:
//!
//! - text that cannot be part of a call is released as soon as it arrives;
//! - `<tool_call>…</tool_call>` blocks are always held and never spoken (a missing
//!   closing tag at the end of the reply is tolerated);
//! - a `{` (or a ```` ``` ```` fence) is held only while it can still be a call: its
//!   first key must be one a call starts with (`"name"`, `"function"`, …), and once the
//!   object is complete it is a call if it names one of the session's tools, or has
//!   the shape of a call (`"name"` and `"arguments"` or `"parameters"`) whatever the
//!   name — otherwise it is released as speech. The 0.5B model asked to "Say hello."
//!   with tools offered writes `{"name": "say_hello", "arguments": {...}}`: reading
//!   that aloud is the worst outcome, so it comes back as a call to an unknown tool,
//!   which the agent answers with an error result the model can recover from;
//! - stray closing tags and `<tool_response>` blocks the model invents are dropped.
//!
//! ```
//! use parley_llm::toolcall::ToolCallFilter;
//!
//! let mut filter = ToolCallFilter::new(vec!["get_weather".into()]);
//! let mut spoken = String::new();
//! for piece in ["Let me check. ", "{\"name\": \"get_", "weather\", \"arguments\": ", "{\"city\": \"Paris\"}}"] {
//!     spoken.push_str(&filter.push(piece));
//! }
//! let (rest, calls) = filter.finish();
//! spoken.push_str(&rest);
//! assert_eq!(spoken, "Let me check.");
//! assert_eq!(calls[0].name, "get_weather");
//! assert_eq!(calls[0].arguments["city"], "Paris");
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::ToolCall;

/// A tool call found in the model's text, before it is given an id.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// The tool's name, spelled as given to the filter when it is one of its tools
    /// (even if the model changed its case). Otherwise whatever the model wrote (a
    /// tagged call, or untagged JSON shaped like a call): the agent must answer an
    /// unknown name with an error result the model can read.
    pub name: String,
    /// The arguments: the JSON object the model wrote (parsed leniently); a JSON
    /// string when the model gave an argument string that is not JSON; `{}` when it
    /// gave none.
    pub arguments: Value,
}

impl ParsedCall {
    /// The call with a fresh id from [`new_call_id`], ready for
    /// [`crate::GenerationStats::tool_calls`] and the conversation.
    pub fn into_tool_call(self) -> ToolCall {
        ToolCall {
            id: new_call_id(),
            name: self.name,
            arguments: self.arguments,
        }
    }
}

/// A new tool-call id, `call_` and 16 hex digits, unique within the process (a
/// counter, scrambled by a bijection so ids do not look sequential, from a random
/// start so two processes are very unlikely to share ids).
///
/// The id lets a tool result name its call, and the agent use it as the Realtime
/// `call_id`, so two calls in one conversation must never share one.
pub fn new_call_id() -> String {
    static START: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    let n = start.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("call_{:016x}", mix64(n))
}

/// SplitMix64's finalizer: a bijection on `u64`, so distinct inputs give distinct ids.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const OPEN_CALL: &str = "<tool_call>";
const CLOSE_CALL: &str = "</tool_call>";
const OPEN_RESPONSE: &str = "<tool_response>";
const CLOSE_RESPONSE: &str = "</tool_response>";
const FENCE: &str = "```";

/// What plain text is scanned for (besides `{`).
const MARKERS: [&str; 5] = [FENCE, OPEN_CALL, CLOSE_CALL, OPEN_RESPONSE, CLOSE_RESPONSE];

/// Keys a call object may start with; an object whose first key is anything else
/// (and not a tool name) is released as speech at once.
const CALL_KEYS: [&str; 13] = [
    "name",
    "function",
    "arguments",
    "parameters",
    "args",
    "type",
    "id",
    "tool",
    "tool_name",
    "tool_call",
    "tool_calls",
    "function_call",
    "call",
];

/// The longest key the first-key check waits for before giving up on a call.
const MAX_KEY_LEN: usize = 64;

/// Where the filter is in the reply.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    /// Speakable text; watching for `{`, fences and tags.
    Text,
    /// `held` starts with a fence; waiting for the end of its opening line.
    FenceOpen,
    /// `held` is (whitespace and) a `{` that may be an untagged call. `fence` is the
    /// opening fence line when it is inside one, spoken with it if it is no call.
    Json { fence: Option<String> },
    /// Inside a fence that holds no call: spoken up to and including its closing fence.
    FenceBody,
    /// After a call inside a fence: dropping its closing fence.
    FenceClose,
    /// Inside `<tool_call>`: held until `</tool_call>` (or the end).
    Tagged,
    /// Inside a `<tool_response>` the model made up: dropped.
    Response,
}

/// Splits a streamed model reply into text to speak and tool calls. See the
/// [module docs](self) for the rules.
///
/// One filter per generation: feed every decoded piece to [`push`](Self::push) and
/// speak what it returns, then call [`finish`](Self::finish) once at the end.
#[derive(Debug, Clone)]
pub struct ToolCallFilter {
    tools: Vec<String>,
    mode: Mode,
    /// Text received but not yet released or consumed.
    held: String,
    /// Whitespace after the last released text, released only with the next text, so
    /// the space before a call (or at the end) is never a piece of its own.
    pending_space: String,
    /// Released text not yet returned.
    out: String,
    /// Something was removed (a call, a tag) since text was last released: the
    /// whitespace on both sides of it is collapsed into one separator.
    gap: bool,
    calls: Vec<ParsedCall>,
}

impl ToolCallFilter {
    /// A filter for a generation offered these tools. Untagged JSON that names one of
    /// them is a call even in an unusual shape (`{"get_weather": {...}}`).
    pub fn new(tool_names: Vec<String>) -> Self {
        Self {
            tools: tool_names,
            mode: Mode::Text,
            held: String::new(),
            pending_space: String::new(),
            out: String::new(),
            gap: false,
            calls: Vec::new(),
        }
    }

    /// Adds the next piece of the reply; returns the text that is now known to be
    /// speech (often all of `text`; empty while a possible call is held).
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        self.process(false);
        std::mem::take(&mut self.out)
    }

    /// Ends the reply: returns the speakable text still held and every call found.
    /// A call cut off at the end (no closing tag, a missing final brace) is still
    /// parsed when it can be; held text that turns out to be no call is released.
    pub fn finish(&mut self) -> (String, Vec<ParsedCall>) {
        self.process(true);
        debug_assert!(
            self.held.is_empty(),
            "{:?} left in {:?}",
            self.held,
            self.mode
        );
        self.held.clear();
        self.pending_space.clear();
        self.mode = Mode::Text;
        (
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.calls),
        )
    }

    /// The calls completed so far, without finishing: for a generation that was
    /// cancelled, where a half-written call must not be repaired into a real one.
    pub fn take_calls(&mut self) -> Vec<ParsedCall> {
        std::mem::take(&mut self.calls)
    }

    /// Whether text is being held back (a possible call, or a partial tag).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn process(&mut self, at_end: bool) {
        loop {
            let progressed = match self.mode {
                Mode::Text => self.step_text(at_end),
                Mode::FenceOpen => self.step_fence_open(at_end),
                Mode::Json { .. } => self.step_json(at_end),
                Mode::FenceBody => self.step_fence_body(at_end),
                Mode::FenceClose => self.step_fence_close(at_end),
                Mode::Tagged => self.step_tagged(at_end),
                Mode::Response => self.step_response(at_end),
            };
            if !progressed {
                break;
            }
        }
    }

    /// Releases `text` as speech, holding back its trailing whitespace. The result
    /// does not depend on how the reply was split into pieces.
    fn emit(&mut self, text: &str) {
        let rest = text.trim_start();
        self.pending_space
            .push_str(&text[..text.len() - rest.len()]);
        if rest.is_empty() {
            return;
        }
        if self.gap {
            let separator = if self.pending_space.contains('\n') {
                "\n"
            } else if self.pending_space.is_empty() {
                ""
            } else {
                " "
            };
            self.out.push_str(separator);
            self.gap = false;
        } else {
            self.out.push_str(&self.pending_space);
        }
        self.pending_space.clear();
        let body = rest.trim_end();
        self.out.push_str(body);
        self.pending_space.push_str(&rest[body.len()..]);
    }

    /// Releases the first `n` bytes of `held` as speech.
    fn release(&mut self, n: usize) {
        let text: String = self.held.drain(..n).collect();
        self.emit(&text);
    }

    fn step_text(&mut self, at_end: bool) -> bool {
        match find_trigger(&self.held, at_end) {
            Trigger::Brace(i) => {
                self.release(i);
                self.mode = Mode::Json { fence: None };
                true
            }
            Trigger::Marker(i, marker) => {
                self.release(i);
                if marker == FENCE {
                    // The fence stays held: it is spoken if no call follows.
                    self.mode = Mode::FenceOpen;
                } else {
                    self.held.drain(..marker.len());
                    self.gap = true;
                    self.mode = match marker {
                        OPEN_CALL => Mode::Tagged,
                        OPEN_RESPONSE => Mode::Response,
                        // A stray closing tag: dropped.
                        _ => Mode::Text,
                    };
                }
                true
            }
            Trigger::Partial(i) => {
                self.release(i);
                false
            }
            Trigger::None => {
                self.release(self.held.len());
                false
            }
        }
    }

    fn step_fence_open(&mut self, at_end: bool) -> bool {
        let after = &self.held[FENCE.len()..];
        if let Some(nl) = after.find('\n') {
            if is_lang_tag(after[..nl].trim()) {
                let opening: String = self.held.drain(..FENCE.len() + nl + 1).collect();
                self.mode = Mode::Json {
                    fence: Some(opening),
                };
            } else {
                self.mode = Mode::FenceBody;
                self.release(FENCE.len());
            }
            return true;
        }
        if at_end {
            self.release(self.held.len());
            self.mode = Mode::Text;
            return true;
        }
        if is_lang_tag(after.trim_end()) {
            return false;
        }
        self.mode = Mode::FenceBody;
        self.release(FENCE.len());
        true
    }

    fn step_json(&mut self, at_end: bool) -> bool {
        let fenced = matches!(&self.mode, Mode::Json { fence: Some(_) });
        let lead = self.held.len() - self.held.trim_start().len();
        let body = &self.held[lead..];
        if body.is_empty() {
            if at_end {
                self.not_a_call(self.held.len());
                return true;
            }
            return false;
        }
        if !body.starts_with('{') {
            // Only inside a fence can anything but `{` come first.
            self.not_a_call(0);
            return true;
        }
        match scan_object(body, &self.tools) {
            Scan::Complete(end) => {
                match parse_calls(&body[..end], Some(&self.tools)) {
                    Some(calls) => {
                        self.calls.extend(calls);
                        self.gap = true;
                        self.held.drain(..lead + end);
                        self.mode = if fenced { Mode::FenceClose } else { Mode::Text };
                    }
                    None => self.not_a_call(lead + end),
                }
                true
            }
            Scan::NotCall => {
                self.not_a_call(lead + 1);
                true
            }
            Scan::Incomplete if at_end => {
                if let Some(calls) = parse_calls(body, Some(&self.tools)) {
                    self.calls.extend(calls);
                    self.gap = true;
                    self.held.clear();
                    self.mode = Mode::Text;
                } else if looks_like_call(body, &self.tools) {
                    tracing::warn!(
                        chars = body.len(),
                        "dropped an unfinished tool call the model did not complete"
                    );
                    self.held.clear();
                    self.mode = Mode::Text;
                } else {
                    self.not_a_call(self.held.len());
                }
                true
            }
            Scan::Incomplete => false,
        }
    }

    /// The held object (or fence) is no call: speaks its fence line and the first `n`
    /// bytes of `held`; the rest is scanned again.
    fn not_a_call(&mut self, n: usize) {
        let fence = match std::mem::replace(&mut self.mode, Mode::Text) {
            Mode::Json { fence } => fence,
            _ => None,
        };
        if let Some(opening) = &fence {
            self.emit(opening);
            // The rest of the fence is spoken as it comes, up to its closing fence.
            self.mode = Mode::FenceBody;
        }
        self.release(n);
    }

    fn step_fence_body(&mut self, at_end: bool) -> bool {
        if let Some(i) = self.held.find(FENCE) {
            self.release(i + FENCE.len());
            self.mode = Mode::Text;
            return true;
        }
        if at_end {
            self.release(self.held.len());
            self.mode = Mode::Text;
            return true;
        }
        let keep = if self.held.ends_with("``") {
            2
        } else if self.held.ends_with('`') {
            1
        } else {
            0
        };
        self.release(self.held.len() - keep);
        false
    }

    fn step_fence_close(&mut self, at_end: bool) -> bool {
        let lead = self.held.len() - self.held.trim_start().len();
        let rest = &self.held[lead..];
        if rest.starts_with(FENCE) {
            self.held.drain(..lead + FENCE.len());
            self.mode = Mode::Text;
        } else if rest.starts_with('{') {
            // Another call in the same fence.
            self.held.drain(..lead);
            self.mode = Mode::Json {
                fence: Some(String::new()),
            };
        } else if !at_end && FENCE.starts_with(rest) {
            return false;
        } else {
            self.held.drain(..lead);
            self.mode = Mode::Text;
        }
        true
    }

    fn step_tagged(&mut self, at_end: bool) -> bool {
        let close = [CLOSE_CALL, OPEN_CALL]
            .into_iter()
            .filter_map(|m| self.held.find(m).map(|i| (i, m)))
            .min();
        if let Some((i, marker)) = close {
            let content = self.held[..i].to_owned();
            self.held.drain(..i + marker.len());
            self.take_tagged(&content);
            // `<tool_call>` again: the model opened the next call without closing this one.
            self.mode = if marker == OPEN_CALL {
                Mode::Tagged
            } else {
                Mode::Text
            };
            return true;
        }
        if !at_end {
            return false;
        }
        let mut content = std::mem::take(&mut self.held);
        if let Some(partial) = (1..CLOSE_CALL.len())
            .rev()
            .find(|&n| content.ends_with(&CLOSE_CALL[..n]))
        {
            content.truncate(content.len() - partial);
        }
        self.take_tagged(&content);
        self.mode = Mode::Text;
        true
    }

    /// Parses what was inside `<tool_call>` tags; never speaks it.
    fn take_tagged(&mut self, content: &str) {
        self.gap = true;
        let start = content.find(['{', '[']);
        match start.and_then(|s| parse_calls(&content[s..], None)) {
            Some(calls) => self.calls.extend(calls),
            None if content.trim().is_empty() => {}
            None => tracing::warn!(
                chars = content.len(),
                "dropped a tagged tool call that is not JSON"
            ),
        }
    }

    fn step_response(&mut self, at_end: bool) -> bool {
        if let Some(i) = self.held.find(CLOSE_RESPONSE) {
            self.held.drain(..i + CLOSE_RESPONSE.len());
            self.gap = true;
            self.mode = Mode::Text;
            return true;
        }
        if at_end {
            self.held.clear();
            self.mode = Mode::Text;
            return true;
        }
        // Keep only what may be the start of the closing tag.
        let mut cut = self.held.len().saturating_sub(CLOSE_RESPONSE.len() - 1);
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        self.held.drain(..cut);
        false
    }
}

/// The first thing in plain text that may start a call.
enum Trigger {
    /// A `{` at this byte offset.
    Brace(usize),
    /// A whole marker at this offset.
    Marker(usize, &'static str),
    /// The text ends with what may become a marker, from this offset.
    Partial(usize),
    None,
}

fn find_trigger(s: &str, at_end: bool) -> Trigger {
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'{' => return Trigger::Brace(i),
            b'<' | b'`' => {
                let rest = &s[i..];
                if let Some(marker) = MARKERS.into_iter().find(|m| rest.starts_with(m)) {
                    return Trigger::Marker(i, marker);
                }
                if !at_end && MARKERS.iter().any(|m| m.starts_with(rest)) {
                    return Trigger::Partial(i);
                }
            }
            _ => {}
        }
    }
    Trigger::None
}

/// A Markdown fence's language tag (`json`, empty, …), or the start of one.
fn is_lang_tag(s: &str) -> bool {
    s.len() <= 16
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c))
}

/// How far a held `{…` has got.
enum Scan {
    /// The object ends at this byte offset (exclusive).
    Complete(usize),
    /// Not finished yet, and may still be a call.
    Incomplete,
    /// Its first key shows it is not a call.
    NotCall,
}

/// Follows a held object that starts with `{`: whether its first key can start a
/// call, and where it ends (strings in either quote style are skipped).
fn scan_object(s: &str, tools: &[String]) -> Scan {
    let after = s[1..].trim_start();
    let Some(first) = after.chars().next() else {
        return Scan::Incomplete;
    };
    let (key, key_end) = match first {
        '"' | '\'' => (&after[1..], after[1..].find(first)),
        // An unquoted key, as in `{name: "get_weather"}`.
        c if c.is_ascii_alphabetic() || c == '_' => (
            after,
            after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')),
        ),
        _ => return Scan::NotCall,
    };
    match key_end {
        Some(end) if !is_call_key(&key[..end], tools) => return Scan::NotCall,
        Some(_) => {}
        None if key.len() > MAX_KEY_LEN || !is_call_key_prefix(key, tools) => {
            return Scan::NotCall;
        }
        None => return Scan::Incomplete,
    }
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth -= 1;
                if depth <= 0 {
                    return Scan::Complete(i + 1);
                }
            }
            _ => {}
        }
    }
    Scan::Incomplete
}

fn is_call_key(key: &str, tools: &[String]) -> bool {
    CALL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
        || tools.iter().any(|t| t.eq_ignore_ascii_case(key))
}

fn is_call_key_prefix(partial: &str, tools: &[String]) -> bool {
    let starts = |k: &str| {
        k.len() >= partial.len()
            && k.is_char_boundary(partial.len())
            && k[..partial.len()].eq_ignore_ascii_case(partial)
    };
    CALL_KEYS.iter().any(|k| starts(k)) || tools.iter().any(|t| starts(t))
}

/// Whether unparsable held text names one of the tools in quotes, or has a call's
/// `name` and `arguments` keys: an attempted call that must not be read aloud.
fn looks_like_call(text: &str, tools: &[String]) -> bool {
    let quoted =
        |word: &str| text.contains(&format!("\"{word}\"")) || text.contains(&format!("'{word}'"));
    tools.iter().any(|t| quoted(t))
        || (quoted("name") && (quoted("arguments") || quoted("parameters")))
}

/// The calls in `text` (one call object, or an array of them), or `None` when it is
/// not calls. With `known`, each call must name one of those tools or have the full
/// shape of a call (a name and arguments).
pub fn parse_calls(text: &str, known: Option<&[String]>) -> Option<Vec<ParsedCall>> {
    let items = match parse_lenient(text)? {
        Value::Array(items) => items,
        other => vec![other],
    };
    if items.is_empty() {
        return None;
    }
    items
        .into_iter()
        .map(|item| call_from_value(item, known))
        .collect()
}

fn call_from_value(value: Value, known: Option<&[String]>) -> Option<ParsedCall> {
    let Value::Object(mut object) = value else {
        return None;
    };
    // OpenAI's shape: {"type": "function", "function": {"name": ..., "arguments": "..."}}
    if let Some(Value::Object(function)) = object.get("function")
        && function.contains_key("name")
    {
        return call_from_value(Value::Object(function.clone()), known);
    }
    // A tool's schema echoed back is not a call.
    if object.contains_key("description") {
        return None;
    }
    let named = ["name", "tool_name", "tool", "function"]
        .into_iter()
        .find_map(|k| object.get(k).and_then(Value::as_str).map(str::to_owned));
    let (name, arguments) = match named {
        Some(name) => {
            let arguments = ["arguments", "parameters", "args", "input"]
                .into_iter()
                .find_map(|k| object.remove(k));
            (name, arguments)
        }
        // {"get_weather": {"city": "Paris"}}
        None => {
            let known = known?;
            let (key, arguments) = object.into_iter().next().filter(|(_, v)| v.is_object())?;
            if !known.iter().any(|t| t.eq_ignore_ascii_case(&key)) {
                return None;
            }
            (key, Some(arguments))
        }
    };
    let known_name = known
        .unwrap_or_default()
        .iter()
        .find(|t| t.eq_ignore_ascii_case(name.trim()));
    let name = match known_name {
        Some(known_name) => known_name.clone(),
        // Untagged JSON with an unknown name is a call only if shaped like one.
        None if known.is_some()
            && !arguments
                .as_ref()
                .is_some_and(|a| a.is_object() || a.is_string()) =>
        {
            return None;
        }
        None if name.trim().is_empty() => return None,
        None => name.trim().to_owned(),
    };
    let arguments = match arguments {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => match parse_lenient(&s) {
            Some(object @ Value::Object(_)) => object,
            _ if s.trim().is_empty() => Value::Object(Map::new()),
            _ => Value::String(s),
        },
        Some(other) => other,
    };
    Some(ParsedCall { name, arguments })
}

/// The first JSON value in `text`, accepting what small models write: single quotes,
/// trailing commas, unquoted keys, Python's `True`/`False`/`None`, and missing closing
/// brackets at the end. Text after the value is ignored.
pub fn parse_lenient(text: &str) -> Option<Value> {
    let text = text.trim();
    first_value(text).or_else(|| {
        let relaxed = relax(text);
        first_value(&relaxed).or_else(|| close_open(&relaxed).and_then(|c| first_value(&c)))
    })
}

fn first_value(text: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// Rewrites near-JSON into JSON (see [`parse_lenient`]); valid JSON passes unchanged.
fn relax(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        i += 1;
        match c {
            '"' => {
                out.push(c);
                while let Some(&d) = chars.get(i) {
                    i += 1;
                    out.push(d);
                    if d == '\\' {
                        if let Some(&e) = chars.get(i) {
                            out.push(e);
                            i += 1;
                        }
                    } else if d == '"' {
                        break;
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(&d) = chars.get(i) {
                    i += 1;
                    match d {
                        '\\' => {
                            if let Some(&e) = chars.get(i) {
                                i += 1;
                                if e != '\'' {
                                    out.push('\\');
                                }
                                out.push(e);
                            }
                        }
                        '\'' => {
                            out.push('"');
                            break;
                        }
                        '"' => out.push_str("\\\""),
                        _ => out.push(d),
                    }
                }
            }
            ',' => {
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if !matches!(next, Some('}' | ']')) {
                    out.push(c);
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i - 1;
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                match word.as_str() {
                    "True" | "true" => out.push_str("true"),
                    "False" | "false" => out.push_str("false"),
                    "None" | "null" => out.push_str("null"),
                    _ if next == Some(&':') => {
                        out.push('"');
                        out.push_str(&word);
                        out.push('"');
                    }
                    _ => out.push_str(&word),
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Appends the closing brackets that `s` (JSON cut short) lacks; `None` when it ends
/// inside a string or nothing is open.
fn close_open(s: &str) -> Option<String> {
    let mut stack = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in s.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => stack.push('}'),
            '[' => stack.push(']'),
            '}' | ']' if stack.pop() != Some(c) => return None,
            _ => {}
        }
    }
    if in_string || stack.is_empty() {
        return None;
    }
    let mut out = s.trim_end().trim_end_matches(',').to_owned();
    while let Some(c) = stack.pop() {
        out.push(c);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<String> {
        vec!["get_weather".into(), "lookup_member".into()]
    }

    /// Runs `pieces` through a filter: (speech, calls, what each push returned).
    fn run(pieces: &[&str]) -> (String, Vec<ParsedCall>, Vec<String>) {
        let mut filter = ToolCallFilter::new(tools());
        let mut speech = String::new();
        let mut outs = Vec::new();
        for piece in pieces {
            let out = filter.push(piece);
            speech.push_str(&out);
            outs.push(out);
        }
        let (rest, calls) = filter.finish();
        speech.push_str(&rest);
        (speech, calls, outs)
    }

    /// Splits `text` into pieces of `size` chars (the last one shorter).
    fn chunks(text: &str, size: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(size).map(|c| c.iter().collect()).collect()
    }

    /// Splits `text` at pseudo-random char positions (a fixed LCG, so failures repeat).
    fn odd_chunks(text: &str, seed: u64) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut state = seed;
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let len = 1 + (state >> 33) as usize % 7;
            let end = (i + len).min(chars.len());
            pieces.push(chars[i..end].iter().collect());
            i = end;
        }
        pieces
    }

    /// Checks that `text`, however it is split, gives `speech` and `calls`.
    fn check(text: &str, speech: &str, calls: &[(&str, Value)]) {
        let expected: Vec<ParsedCall> = calls
            .iter()
            .map(|(n, a)| ParsedCall {
                name: (*n).into(),
                arguments: a.clone(),
            })
            .collect();
        let mut splits: Vec<Vec<String>> = (1..=9).map(|n| chunks(text, n)).collect();
        splits.push(vec![text.to_owned()]);
        splits.extend((0..20).map(|seed| odd_chunks(text, seed)));
        for pieces in splits {
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (got_speech, got_calls, _) = run(&refs);
            assert_eq!(got_speech, speech, "speech for {pieces:?}");
            assert_eq!(got_calls, expected, "calls for {pieces:?}");
        }
    }

    fn paris() -> Value {
        json!({"city": "Paris"})
    }

    #[test]
    fn plain_text_passes_through_promptly() {
        let (speech, calls, outs) = run(&["Hello", " there,", " how can", " I help?"]);
        assert_eq!(speech, "Hello there, how can I help?");
        assert!(calls.is_empty());
        // Every piece comes out as it goes in (its trailing space with the next one).
        assert_eq!(outs, ["Hello", " there,", " how can", " I help?"]);
        check(
            "Hello there, how can I help?\n",
            "Hello there, how can I help?",
            &[],
        );
    }

    #[test]
    fn tagged_call_is_not_spoken() {
        check(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "",
            &[("get_weather", paris())],
        );
    }

    #[test]
    fn text_before_a_tagged_call_is_spoken_first() {
        let (_, _, outs) = run(&[
            "Let me",
            " check.",
            " <tool",
            "_call>\n{\"name\"",
            ": \"get_weather\"}",
            "\n</tool_call>",
        ]);
        assert_eq!(outs[0], "Let me");
        assert_eq!(outs[1], " check.", "released before the call is complete");
        check(
            "Let me check. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "Let me check.",
            &[("get_weather", paris())],
        );
    }

    #[test]
    fn several_tagged_calls() {
        check(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"lookup_member\", \"arguments\": {\"member_id\": \"1001\"}}\n</tool_call>",
            "",
            &[
                ("get_weather", paris()),
                ("lookup_member", json!({"member_id": "1001"})),
            ],
        );
        // The second call opened without closing the first.
        check(
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\
             <tool_call>{\"name\": \"lookup_member\", \"arguments\": {}}</tool_call>",
            "",
            &[("get_weather", paris()), ("lookup_member", json!({}))],
        );
    }

    #[test]
    fn missing_closing_tag_at_the_end_is_tolerated() {
        check(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
            "",
            &[("get_weather", paris())],
        );
        check(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_",
            "",
            &[("get_weather", paris())],
        );
    }

    #[test]
    fn tagged_call_to_an_unknown_tool_is_still_a_call() {
        check(
            "<tool_call>{\"name\": \"book_flight\", \"arguments\": {\"to\": \"Oslo\"}}</tool_call>",
            "",
            &[("book_flight", json!({"to": "Oslo"}))],
        );
    }

    #[test]
    fn tagged_garbage_is_dropped_not_spoken() {
        check(
            "Sure. <tool_call>get the weather please</tool_call> Done.",
            "Sure. Done.",
            &[],
        );
    }

    #[test]
    fn untagged_json_call() {
        check(
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "",
            &[("get_weather", paris())],
        );
        check(
            "  \n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
            "",
            &[("get_weather", paris())],
        );
    }

    #[test]
    fn untagged_call_after_text_and_two_in_a_row() {
        check(
            "One moment. {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
             {\"name\": \"lookup_member\", \"arguments\": {\"member_id\": 1001}}",
            "One moment.",
            &[
                ("get_weather", paris()),
                ("lookup_member", json!({"member_id": 1001})),
            ],
        );
    }

    #[test]
    fn parameters_string_arguments_single_quotes_trailing_commas() {
        check(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            "",
            &[("get_weather", paris())],
        );
        check(
            "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}",
            "",
            &[("get_weather", paris())],
        );
        check(
            "{'name': 'get_weather', 'arguments': {'city': 'Paris',},}",
            "",
            &[("get_weather", paris())],
        );
        check(
            "{name: \"get_weather\", arguments: {city: \"Paris\", metric: True}}",
            "",
            &[("get_weather", json!({"city": "Paris", "metric": true}))],
        );
        check(
            "{\"name\": \"get_weather\", \"arguments\": \"Paris\"}",
            "",
            &[("get_weather", json!("Paris"))],
        );
        check(
            "{\"name\": \"lookup_member\"}",
            "",
            &[("lookup_member", json!({}))],
        );
    }

    #[test]
    fn other_call_shapes() {
        // OpenAI's, with the arguments as a string.
        check(
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}}",
            "",
            &[("get_weather", paris())],
        );
        // The tool's name as the key.
        check(
            "{\"get_weather\": {\"city\": \"Paris\"}}",
            "",
            &[("get_weather", paris())],
        );
        // Another case.
        check(
            "{\"name\": \"Get_Weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "",
            &[("get_weather", paris())],
        );
        // An array of calls inside tags.
        check(
            "<tool_call>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"lookup_member\", \"arguments\": {}}]</tool_call>",
            "",
            &[("get_weather", paris()), ("lookup_member", json!({}))],
        );
    }

    #[test]
    fn fenced_calls() {
        check(
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```",
            "",
            &[("get_weather", paris())],
        );
        check(
            "```\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```\nChecking now.",
            "\nChecking now.",
            &[("get_weather", paris())],
        );
        // Two in one fence, and a missing closing fence at the end.
        check(
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
             {\"name\": \"lookup_member\", \"arguments\": {}}\n",
            "",
            &[("get_weather", paris()), ("lookup_member", json!({}))],
        );
    }

    #[test]
    fn fenced_code_that_is_no_call_is_spoken() {
        check(
            "```python\nprint(1)\n```\nThat prints one.",
            "```python\nprint(1)\n```\nThat prints one.",
            &[],
        );
        check(
            "```json\n{\"city\": \"Paris\"}\n``` ok",
            "```json\n{\"city\": \"Paris\"}\n``` ok",
            &[],
        );
        check("Use `x` or ``y``.", "Use `x` or ``y``.", &[]);
    }

    #[test]
    fn call_shaped_json_naming_an_unknown_tool_is_a_call_not_speech() {
        // What the 0.5B model writes for "Say hello." with tools offered.
        check(
            "{\"name\": \"say_hello\", \"arguments\": {\"message\": \"Hello, world!\"}}",
            "",
            &[("say_hello", json!({"message": "Hello, world!"}))],
        );
        check(
            "{\"name\": \"book_flight\", \"parameters\": \"{\\\"to\\\": \\\"Oslo\\\"}\"}",
            "",
            &[("book_flight", json!({"to": "Oslo"}))],
        );
        // Cut short: not spoken either.
        check(
            "{\"name\": \"say_hello\", \"arguments\": {\"message\": \"Hel",
            "",
            &[],
        );
    }

    #[test]
    fn json_that_only_looks_like_a_record_is_released_as_speech() {
        for text in [
            "{\"name\": \"Bob\", \"age\": 3}",
            "{\"name\": \"Bob\"}",
            "{\"name\": \"Bob\", \"arguments\": 3}",
            "{\"type\": \"object\", \"properties\": {}}",
        ] {
            check(text, text, &[]);
        }
    }

    #[test]
    fn json_that_is_no_call_is_released_without_waiting_for_its_end() {
        let (_, _, outs) = run(&["{\"temperature_c\"", ": 21, \"sky\": ", "\"sunny\"}"]);
        assert_eq!(outs[0], "{\"temperature_c\"", "the first key settles it");
        let text = "The result is {\"temperature_c\": 21, \"sky\": \"sunny\"}.";
        check(text, text, &[]);
        // As soon as the key cannot be a call key any more.
        let (_, _, outs) = run(&["{\"temp", "erature"]);
        assert_eq!(outs[0], "{\"temp");
    }

    #[test]
    fn braces_and_angles_in_prose_are_spoken_promptly() {
        let (_, _, outs) = run(&["Sets like { 1, 2 }", " and a < b"]);
        assert_eq!(outs, ["Sets like { 1, 2 }", " and a < b"]);
        check(
            "Sets like {1, 2} and a < b <i>x</i>.",
            "Sets like {1, 2} and a < b <i>x</i>.",
            &[],
        );
        check("Ends with {", "Ends with {", &[]);
        check("Ends with <tool", "Ends with <tool", &[]);
    }

    #[test]
    fn json_call_attempt_cut_short_is_dropped_not_spoken() {
        // A missing final brace is repaired.
        check(
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}",
            "",
            &[("get_weather", paris())],
        );
        // Cut inside a string: no call, but it named a tool, so it is not read aloud.
        check(
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
            "",
            &[],
        );
    }

    #[test]
    fn stray_tags_and_invented_tool_responses_are_dropped() {
        check(
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "",
            &[("get_weather", paris())],
        );
        check(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_response>\n{\"temperature_c\": 30}\n</tool_response>\nIt is hot.",
            "\nIt is hot.",
            &[("get_weather", paris())],
        );
    }

    #[test]
    fn echoed_tool_schema_is_not_a_call() {
        let text = "{\"name\": \"get_weather\", \"description\": \"Weather\", \"parameters\": {\"type\": \"object\"}}";
        check(text, text, &[]);
    }

    #[test]
    fn non_ascii_text_around_calls() {
        check(
            "Café ☕ — un instant. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}</tool_call> Merci ✓",
            "Café ☕ — un instant. Merci ✓",
            &[("get_weather", json!({"city": "Zürich"}))],
        );
        check("{\"näme☕\": 1}", "{\"näme☕\": 1}", &[]);
    }

    #[test]
    fn take_calls_returns_only_finished_calls() {
        let mut filter = ToolCallFilter::new(tools());
        filter.push("<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>");
        filter.push("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par");
        assert!(filter.is_holding());
        let calls = filter.take_calls();
        assert_eq!(
            calls,
            [ParsedCall {
                name: "get_weather".into(),
                arguments: json!({})
            }]
        );
    }

    #[test]
    fn call_ids_are_unique_and_well_formed() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_call_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 21, "{id}");
            assert!(id.starts_with("call_"));
            assert!(id[5..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
    }

    #[test]
    fn lenient_parser_edge_cases() {
        assert_eq!(
            parse_lenient("{\"a\": [1, 2,], }"),
            Some(json!({"a": [1, 2]}))
        );
        assert_eq!(
            parse_lenient("{'a': 'it\\'s \"x\"'}"),
            Some(json!({"a": "it's \"x\""}))
        );
        assert_eq!(
            parse_lenient("{\"a\": {\"b\": null"),
            Some(json!({"a": {"b": null}}))
        );
        assert_eq!(parse_lenient("{\"a\": \"x"), None);
        assert_eq!(
            parse_lenient("{\"a\": 1} trailing words"),
            Some(json!({"a": 1}))
        );
        assert_eq!(parse_lenient("not json"), None);
        assert_eq!(parse_lenient(""), None);
    }
}
