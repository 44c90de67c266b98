//! Ids a tool call may use: the ones the conversation already holds.
//!
//! A small model asked about "my order" invents an order id, or takes another
//! member's. A tool can forbid that for a string parameter by declaring
//! `"x-parley-known": true` with a `pattern` (a regular expression for the id's
//! shape, e.g. `^ORD[0-9]{3,}$`): the parameter may then only take a value the
//! caller said (spelled out or in digits: "O R D zero zero one" counts) or an earlier
//! tool result or call holds. [`narrow`] turns such parameters into an `enum` of
//! those values for this generation; a tool whose required id has no known value is
//! left out of what the model may call (the prompt still shows it, so the KV cache
//! of the system prompt stays shared). The embedded engine enforces the narrowed
//! schemas with its grammar; remote replicas get them as their tools' parameters.
//!
//! A tool can also wait for another: `"x-parley-after": "verify_member"` on its
//! parameters makes it callable only once the conversation holds a result of that
//! tool that is not an error (a JSON object without an `error` key). With it, a
//! desk's look-ups cannot be the first call of a caller who has not proved who they
//! are: the check is the only call the model can make.
//!
//! A free-text parameter can be held to what the caller said:
//! `"x-parley-heard": "date"` narrows it to the dates the caller's own messages hold,
//! as they wrote them ("March 12, 1984", "11/02/1971"), so a date of birth cannot
//! be invented (the 0.5B model copied the prompt example's date when the caller had
//! given none); with none said, a tool that requires it cannot be called, and the
//! model asks.
//!
//! A tool can be a gate: `"x-parley-gate": true` on its parameters (an identity
//! check) makes it callable until it succeeds, then never again in the call (the
//! 0.5B model re-ran a passed check on the caller's next question instead of
//! answering it). What the agent does when a gate opens is up to the agent
//! ([`is_gate`]).

use regex::RegexBuilder;
use serde_json::{Map, Value};

use crate::{ChatMessage, GenerateOptions, Role, ToolCall, ToolChoice, ToolSpec};

/// The annotation that asks for a parameter to be narrowed to known values.
pub const KNOWN: &str = "x-parley-known";

/// The annotation (on a tool's parameters) that names the tool whose successful
/// result must come first.
pub const AFTER: &str = "x-parley-after";

/// The annotation (on a tool's parameters) that marks a check the other tools wait
/// for: callable until it succeeds, then not again.
pub const GATE: &str = "x-parley-gate";

/// The annotation that narrows a parameter to values of a kind the caller said
/// (`"date"`), kept as they said them.
pub const HEARD: &str = "x-parley-heard";

/// The annotation (on a tool's parameters) with a pattern of the caller's words that
/// ask for this tool's action ("refill"): asked for with no id, and with one record
/// the call knows, the call is made on that record ([`asked_call`]).
pub const ASKED: &str = "x-parley-asked";

/// True when `tool` is a gate ([`GATE`]).
pub fn is_gate(tool: &ToolSpec) -> bool {
    tool.parameters.get(GATE) == Some(&Value::Bool(true))
}

/// The tools as they may be called after `messages`: each known-id parameter an
/// `enum` of the values the conversation holds, in the order they appeared; tools
/// whose required ids have none are dropped. Tools without annotations are kept as
/// they are (minus our annotations).
pub fn narrow(tools: &[ToolSpec], messages: &[ChatMessage]) -> Vec<ToolSpec> {
    narrow_to(tools, messages, messages)
}

/// [`narrow`], with the known ids taken from `ids_from` only (the gates and the
/// heard values still from all of `messages`).
fn narrow_to(tools: &[ToolSpec], messages: &[ChatMessage], ids_from: &[ChatMessage]) -> Vec<ToolSpec> {
    let mut heard: Option<Vec<String>> = None;
    let mut succeeded: Option<Vec<String>> = None;
    let mut out = Vec::with_capacity(tools.len());
    'tools: for tool in tools {
        if let Some(first) = tool.parameters.get(AFTER).and_then(Value::as_str)
            && !succeeded.get_or_insert_with(|| succeeded_tools(messages)).iter().any(|t| t == first)
        {
            continue;
        }
        if is_gate(tool) && succeeded.get_or_insert_with(|| succeeded_tools(messages)).iter().any(|t| t == &tool.name) {
            continue;
        }
        let mut parameters = tool.parameters.clone();
        if let Some(Value::Object(properties)) = parameters.get_mut("properties") {
            let required: Vec<String> = tool
                .parameters
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default();
            let names: Vec<String> = properties.keys().cloned().collect();
            for name in names {
                let values = if heard_kind(&properties[&name]) == Some("date") {
                    dates_said(messages.iter().filter(|m| m.role == Role::User).map(|m| m.content.as_str()))
                } else {
                    let Some(pattern) = known_pattern(&properties[&name]) else { continue };
                    let texts = heard.get_or_insert_with(|| conversation_texts(ids_from));
                    find_ids(&pattern, texts)
                };
                if values.is_empty() {
                    if required.contains(&name) {
                        continue 'tools;
                    }
                    properties.remove(&name);
                    continue;
                }
                let mut narrowed = Map::new();
                narrowed.insert("type".into(), Value::String("string".into()));
                if let Some(description) = properties[&name].get("description") {
                    narrowed.insert("description".into(), description.clone());
                }
                narrowed.insert("enum".into(), Value::Array(values.into_iter().map(Value::String).collect()));
                properties[&name] = Value::Object(narrowed);
            }
        }
        crate::grammar::strip_annotations(&mut parameters);
        out.push(ToolSpec { name: tool.name.clone(), description: tool.description.clone(), parameters });
    }
    out
}

/// The call of a gate the caller's last message gave values for: a gate tool
/// ([`GATE`]) that has not passed, offered with `tool_choice` auto, one of whose
/// known-id ([`KNOWN`]) or heard ([`HEARD`]) parameters has a value in the last user
/// message, and all of whose required known ids have a value. Its arguments are
/// those values, each the one the caller said last; a heard value not said yet is
/// left out, for the gate to ask for (a member ID said without the date of birth).
///
/// A check of who the caller is needs no judgement: what the caller said goes to it
/// as said, before anything else (the 0.5B model answered "Sorry, I meant January
/// 30, 1958." by reading it back, invented a birth date from the prompt's example
/// when the caller gave none, and sometimes answered before checking; eval).
pub fn gate_call(options: &GenerateOptions, messages: &[ChatMessage]) -> Option<ToolCall> {
    if options.tool_choice != ToolChoice::Auto {
        return None;
    }
    open_gates(options, messages).filter(|gate| !called_since_caller(messages, &gate.name)).find_map(|gate| {
        let said = gate_arguments(gate, messages)?;
        (said.new_value && !said.missing_known).then(|| ToolCall { id: crate::toolcall::new_call_id(), name: gate.name.clone(), arguments: Value::Object(said.arguments) })
    })
}

/// The call the caller's last message asks for ([`ASKED`]) without naming its
/// record, when the call knows just one record it could be about: "I would like a
/// refill of my prescription." from a member with one prescription is
/// `request_refill` of that one. With `tool_choice` auto, a tool callable now
/// ([`callable`]) whose every required parameter is a known id with exactly one
/// value, none of them said in that message (then the model has the id and
/// [`names_record`] asks for the look-up), and not called since. The 0.5B model
/// answered such a request from the check's result ("you can request a refill of
/// prescription R X one zero zero two …") and made no call (e2e).
pub fn asked_call(options: &GenerateOptions, messages: &[ChatMessage]) -> Option<ToolCall> {
    if options.tool_choice != ToolChoice::Auto {
        return None;
    }
    let last_user = messages.iter().rposition(|m| m.role == Role::User)?;
    let said = &messages[last_user].content;
    let now = callable(options, messages);
    options.tools.iter().find_map(|tool| {
        let pattern = tool.parameters.get(ASKED)?.as_str()?;
        let asks = RegexBuilder::new(pattern).case_insensitive(true).build().ok()?.is_match(said);
        if !asks || called_since_caller(messages, &tool.name) {
            return None;
        }
        let narrowed = now.iter().find(|t| t.name == tool.name)?;
        let properties = tool.parameters.get("properties")?.as_object()?;
        let required: Vec<&str> = tool.parameters.get("required")?.as_array()?.iter().filter_map(Value::as_str).collect();
        let said_texts = conversation_texts(&messages[last_user..=last_user]);
        let mut arguments = Map::new();
        for name in required {
            let pattern = known_pattern(properties.get(name)?)?;
            if !find_ids(&pattern, &said_texts).is_empty() {
                return None;
            }
            match narrowed.parameters["properties"][name]["enum"].as_array()?.as_slice() {
                [only] => arguments.insert(name.to_string(), only.clone()),
                _ => return None,
            };
        }
        Some(ToolCall { id: crate::toolcall::new_call_id(), name: tool.name.clone(), arguments: Value::Object(arguments) })
    })
}

/// True when the caller's last message names an id (of a known-id parameter of a
/// tool callable now): the answer about that record must come from a look-up in
/// this turn, not from memory. For a record not looked up yet, the 0.5B model
/// answered "Can you also tell me about order ORD002?" with the earlier order's
/// facts under the new id; for one looked up turns before, the 1.5B model answered
/// "Could you refill RX1003 for me, please?" with a question of its own and no call
/// (eval). A record can also have changed since (a refill placed).
///
/// A member-id-shaped number that is the tail of a record id the call already
/// knows is that record, not a member: tiny.en heard "order O R D zero zero two" as
/// "order of RD-002", and a look-up required from "002" listed member 002's orders
/// (e2e). "My husband is member 1002" still names a record (his orders: refused).
pub fn names_record(options: &GenerateOptions, messages: &[ChatMessage]) -> bool {
    let Some(last_user) = messages.iter().rposition(|m| m.role == Role::User) else { return false };
    let said = conversation_texts(&messages[last_user..=last_user]);
    let identity = gate_parameters(&options.tools);
    let mut records: Option<Vec<String>> = None;
    callable(options, messages).iter().filter(|t| !is_gate(t)).any(|tool| {
        let Some(properties) = options.tools.iter().find(|t| t.name == tool.name).and_then(|t| t.parameters.get("properties")?.as_object()) else {
            return false;
        };
        properties.iter().filter_map(|(name, schema)| Some((name, known_pattern(schema)?))).any(|(name, pattern)| {
            let found = find_ids(&pattern, &said);
            if !identity.contains(name) {
                return !found.is_empty();
            }
            let records = records.get_or_insert_with(|| record_ids(options, messages, &identity));
            found.iter().any(|id| !records.iter().any(|r| r.len() > id.len() && r.ends_with(id.as_str())))
        })
    })
}

/// The ids of records (not of the caller: [`gate_parameters`]) the call has seen.
fn record_ids(options: &GenerateOptions, messages: &[ChatMessage], identity: &[String]) -> Vec<String> {
    let texts = conversation_texts(messages);
    let mut ids = Vec::new();
    for tool in &options.tools {
        let Some(properties) = tool.parameters.get("properties").and_then(Value::as_object) else { continue };
        for (name, schema) in properties {
            if identity.contains(name) {
                continue;
            }
            if let Some(pattern) = known_pattern(schema) {
                ids.extend(find_ids(&pattern, &texts));
            }
        }
    }
    ids
}

/// The names of the gates' parameters: who the caller is, not what they ask about.
fn gate_parameters(tools: &[ToolSpec]) -> Vec<String> {
    tools
        .iter()
        .filter(|t| is_gate(t))
        .filter_map(|t| t.parameters.get("properties")?.as_object())
        .flat_map(|p| p.keys().cloned())
        .collect()
}

/// The call of a gate that has not passed, with whatever values the conversation
/// holds for it (maybe none): when the model had nothing to say to a caller who has
/// not passed the check, the gate's own answer says what it needs ("Please tell me
/// your member ID and your date of birth."), rather than "say it again".
pub fn gate_ask(options: &GenerateOptions, messages: &[ChatMessage]) -> Option<ToolCall> {
    if options.tool_choice == ToolChoice::None {
        return None;
    }
    open_gates(options, messages).filter(|gate| !called_since_caller(messages, &gate.name)).find_map(|gate| {
        let said = gate_arguments(gate, messages)?;
        Some(ToolCall { id: crate::toolcall::new_call_id(), name: gate.name.clone(), arguments: Value::Object(said.arguments) })
    })
}

/// True when a gate is offered and has not passed in `messages`: the caller has not
/// passed the check yet, so nothing from the records can have been told.
pub fn gate_pending(options: &GenerateOptions, messages: &[ChatMessage]) -> bool {
    open_gates(options, messages).next().is_some()
}

/// The gates offered that have not passed.
fn open_gates<'a>(options: &'a GenerateOptions, messages: &[ChatMessage]) -> impl Iterator<Item = &'a ToolSpec> {
    let passed = succeeded_tools(messages);
    options.tools.iter().filter(move |t| is_gate(t) && !passed.contains(&t.name))
}

/// What the conversation holds for a gate's known and heard parameters.
struct GateArguments {
    /// Each parameter's value the caller said last (the latest message first).
    arguments: Map<String, Value>,
    /// The last user message gave one of them.
    new_value: bool,
    /// A required known id has no value.
    missing_known: bool,
}

/// True when `tool` was called after the caller's last message: its answer to what
/// the caller said is in the conversation already, and a second call in the same
/// turn (a reply cancelled and asked for again, e2e `turns`) would only repeat it.
fn called_since_caller(messages: &[ChatMessage], tool: &str) -> bool {
    let after = messages.iter().rposition(|m| m.role == Role::User).map_or(0, |i| i + 1);
    messages[after..].iter().flat_map(|m| &m.tool_calls).any(|c| c.name == tool)
}

fn gate_arguments(gate: &ToolSpec, messages: &[ChatMessage]) -> Option<GateArguments> {
    let last_user = messages.iter().rposition(|m| m.role == Role::User)?;
    let properties = gate.parameters.get("properties")?.as_object()?;
    let required: Vec<&str> = gate.parameters.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut said = GateArguments { arguments: Map::new(), new_value: false, missing_known: false };
    for (name, schema) in properties {
        if heard_kind(schema).is_none() && known_pattern(schema).is_none() {
            continue;
        }
        // What the caller said, only: a gate checks the caller's own words.
        let latest = |m: &[ChatMessage]| -> Option<String> {
            let m = m.first().filter(|m| m.role == Role::User)?;
            if heard_kind(schema) == Some("date") {
                dates_said(std::iter::once(m.content.as_str())).pop()
            } else {
                // The first id of the message: an id leads ("Member 1003, born …"), and
                // a year the date pattern missed follows ("Orange lie 25th, 1990", as
                // the ASR heard "July twenty-fifth, nineteen ninety"; eval).
                find_ids(&known_pattern(schema)?, &conversation_texts(std::slice::from_ref(m))).into_iter().next()
            }
        };
        let said_now = latest(&messages[last_user..=last_user]);
        said.new_value |= said_now.is_some();
        // The caller's latest words first, then the latest earlier message that has one.
        match said_now.or_else(|| (0..last_user).rev().find_map(|i| latest(&messages[i..=i]))) {
            Some(value) => {
                said.arguments.insert(name.clone(), Value::String(value));
            }
            None => said.missing_known |= required.contains(&name.as_str()) && known_pattern(schema).is_some(),
        }
    }
    Some(said)
}

/// The tools the model may call in a generation with `options`: [`narrow`]ed, then
/// cut to what [`ToolChoice`] allows.
pub fn callable(options: &GenerateOptions, messages: &[ChatMessage]) -> Vec<ToolSpec> {
    match &options.tool_choice {
        ToolChoice::None => Vec::new(),
        ToolChoice::Auto | ToolChoice::Required => narrow(&options.tools, messages),
        ToolChoice::RequiredNamed => {
            let said: &[ChatMessage] = match messages.iter().rposition(|m| m.role == Role::User) {
                Some(i) => &messages[i..=i],
                None => &[],
            };
            narrow_to(&options.tools, messages, said)
        }
        ToolChoice::Function(name) => {
            let named: Vec<ToolSpec> = options.tools.iter().filter(|t| &t.name == name).cloned().collect();
            narrow(&named, messages)
        }
    }
}

/// True when a tool's `output` is a success: a JSON object without an `error` key.
pub fn succeeded(output: &str) -> bool {
    serde_json::from_str::<Value>(output).is_ok_and(|v| v.is_object() && v.get("error").is_none())
}

/// Names of the tools whose calls in `messages` have a result that is not an error.
fn succeeded_tools(messages: &[ChatMessage]) -> Vec<String> {
    let ok_results: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::Tool)
        .filter(|m| succeeded(&m.content))
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    messages.iter().flat_map(|m| &m.tool_calls).filter(|c| ok_results.contains(&c.id.as_str())).map(|c| c.name.clone()).collect()
}

/// The tools as the prompt shows them: our annotations removed.
pub fn for_prompt(tool: &ToolSpec) -> ToolSpec {
    let mut parameters = tool.parameters.clone();
    crate::grammar::strip_annotations(&mut parameters);
    ToolSpec { name: tool.name.clone(), description: tool.description.clone(), parameters }
}

/// The id pattern of a parameter that asks to be narrowed, without its anchors.
fn known_pattern(schema: &Value) -> Option<String> {
    if schema.get(KNOWN) != Some(&Value::Bool(true)) {
        return None;
    }
    let pattern = schema.get("pattern")?.as_str()?;
    Some(pattern.trim_start_matches('^').trim_end_matches('$').to_string())
}

/// The kind of value a parameter is held to ([`HEARD`]), if any.
fn heard_kind(schema: &Value) -> Option<&str> {
    schema.get(HEARD)?.as_str()
}

/// Dates in `texts` (the caller's messages) as written, each once, in order: a
/// month by name with a day and a four-digit year ("March 12th, 1984", "the 2nd of
/// November 1971"), or all digits ("11/02/1971", "1958-01-30").
fn dates_said<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for text in texts {
        for m in date_pattern().find_iter(text) {
            let date = m.as_str().to_string();
            if !found.contains(&date) {
                found.push(date);
            }
        }
    }
    found
}

/// `text` with the dates in it blanked out.
fn without_dates(text: &str) -> String {
    date_pattern().replace_all(text, " ").into_owned()
}

/// A date as [`dates_said`] finds it.
fn date_pattern() -> &'static regex::Regex {
    static DATE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    DATE.get_or_init(|| {
        let month = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?";
        let day = r"\d{1,2}(?:st|nd|rd|th)?";
        RegexBuilder::new(&format!(
            r"\b(?:{month}\s+{day},?\s+\d{{4}}|(?:the\s+)?{day}\s+(?:of\s+)?{month},?\s+\d{{4}}|\d{{4}}[-/]\d{{1,2}}[-/]\d{{1,2}}|\d{{1,2}}[-/]\d{{1,2}}[-/]\d{{4}})\b"
        ))
        .case_insensitive(true)
        .build()
        .expect("the date pattern is a regular expression")
    })
}

/// Every text an id may come from: what the caller said (also with spelled-out
/// letters and digits joined), tool results, and the arguments of earlier calls.
fn conversation_texts(messages: &[ChatMessage]) -> Vec<String> {
    let mut texts = Vec::new();
    for m in messages {
        match m.role {
            Role::User => {
                // A year is not a member number: the caller's dates are taken out first.
                let content = without_dates(&m.content);
                texts.push(spelled_out_joined(&content));
                texts.push(content);
            }
            Role::Tool => texts.push(m.content.clone()),
            Role::Assistant => texts.extend(m.tool_calls.iter().map(|c| without_dates(&c.arguments.to_string()))),
            Role::System => {}
        }
    }
    texts
}

/// Matches of `pattern` (as a whole word, any case) in `texts`, upper-cased,
/// each once, in order of appearance.
fn find_ids(pattern: &str, texts: &[String]) -> Vec<String> {
    let Ok(re) = RegexBuilder::new(&format!(r"\b(?:{pattern})\b")).case_insensitive(true).build() else {
        tracing::warn!(pattern, "a known-id pattern is not a regular expression; the parameter is not narrowed");
        return Vec::new();
    };
    let mut found: Vec<String> = Vec::new();
    for text in texts {
        for m in re.find_iter(text) {
            let id = m.as_str().to_ascii_uppercase();
            if !found.contains(&id) {
                found.push(id);
            }
        }
    }
    found
}

/// `text` with digit words made digits and runs of single letters or digits joined:
/// "member one zero zero one" → "member 1001", "O R D 0 0 1" → "ORD001",
/// "oh oh one" → "001".
fn spelled_out_joined(text: &str) -> String {
    const DIGITS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    let mut out: Vec<String> = Vec::new();
    let mut run = String::new();
    let words = text.split(|c: char| c.is_whitespace() || matches!(c, '-' | ',' | '.' | '?' | '!'));
    for word in words.filter(|w| !w.is_empty()) {
        let lower = word.to_ascii_lowercase();
        let piece = match DIGITS.iter().position(|d| *d == lower) {
            Some(d) => Some(d.to_string()),
            None if lower == "oh" && !run.is_empty() => Some("0".into()),
            None if word.chars().count() == 1 && word.chars().all(|c| c.is_ascii_alphanumeric()) => Some(word.to_string()),
            None if word.chars().all(|c| c.is_ascii_digit()) => Some(word.to_string()),
            None => None,
        };
        match piece {
            Some(p) => run.push_str(&p),
            None => {
                if !run.is_empty() {
                    out.push(std::mem::take(&mut run));
                }
                out.push(word.to_string());
            }
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ToolCall;
    use serde_json::json;

    fn order_tool() -> ToolSpec {
        ToolSpec {
            name: "get_order_details".into(),
            description: "One order".into(),
            parameters: json!({
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^ORD[0-9]{3,}$", "x-parley-known": true, "description": "the order"}},
                "required": ["order_id"]
            }),
        }
    }

    #[test]
    fn a_tool_that_waits_for_another_is_callable_only_after_its_success() {
        let verify = ToolSpec { name: "verify_member".into(), description: String::new(), parameters: json!({"type": "object", "properties": {}}) };
        let orders = ToolSpec {
            name: "list_orders".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {}, "x-parley-after": "verify_member"}),
        };
        let tools = [verify, orders];
        let names = |m: &[ChatMessage]| narrow(&tools, m).into_iter().map(|t| t.name).collect::<Vec<_>>();
        let call = |id: &str| ChatMessage::tool_calls("", vec![ToolCall { id: id.into(), name: "verify_member".into(), arguments: json!({}) }]);
        let mut messages = vec![ChatMessage::new(Role::User, "my member ID is 1001")];
        assert_eq!(names(&messages), ["verify_member"]);
        // A failed check does not open it.
        messages.extend([call("c1"), ChatMessage::tool_result("c1", r#"{"error": "no match"}"#)]);
        assert_eq!(names(&messages), ["verify_member"]);
        messages.extend([call("c2"), ChatMessage::tool_result("c2", r#"{"verified": true}"#)]);
        assert_eq!(names(&messages), ["verify_member", "list_orders"]);
        // The annotation is not shown to the model.
        assert!(narrow(&tools, &messages)[1].parameters.get("x-parley-after").is_none());
    }

    #[test]
    fn a_gate_is_callable_until_it_succeeds() {
        let verify = ToolSpec {
            name: "verify_member".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {}, "x-parley-gate": true}),
        };
        assert!(is_gate(&verify) && !is_gate(&order_tool()));
        let tools = [verify];
        let call = |id: &str| ChatMessage::tool_calls("", vec![ToolCall { id: id.into(), name: "verify_member".into(), arguments: json!({}) }]);
        let mut messages = vec![ChatMessage::new(Role::User, "my member ID is 1001")];
        assert_eq!(narrow(&tools, &messages).len(), 1);
        assert!(narrow(&tools, &messages)[0].parameters.get(GATE).is_none(), "the annotation is not shown to the model");
        // A failed check may be tried again.
        messages.extend([call("c1"), ChatMessage::tool_result("c1", r#"{"error": "no match"}"#)]);
        assert_eq!(narrow(&tools, &messages).len(), 1);
        messages.extend([call("c2"), ChatMessage::tool_result("c2", r#"{"verified": true}"#)]);
        assert!(narrow(&tools, &messages).is_empty(), "a passed check is not run again");
    }

    fn verify_tool() -> ToolSpec {
        ToolSpec {
            name: "verify_member".into(),
            description: String::new(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "member_id": {"type": "string", "pattern": "^[0-9]{4,}$", "x-parley-known": true},
                    "date_of_birth": {"type": "string", "x-parley-heard": "date"}
                },
                "required": ["member_id", "date_of_birth"],
                "x-parley-gate": true
            }),
        }
    }

    #[test]
    fn a_date_must_be_one_the_caller_said() {
        let tools = [verify_tool()];
        // A member ID but no date: the check cannot be called (the model asks).
        let said = [ChatMessage::new(Role::User, "My member ID is 1003. Where is my order?")];
        assert!(narrow(&tools, &said).is_empty());
        let said = [
            ChatMessage::new(Role::User, "Member 1004, born January 13, 1958."),
            ChatMessage::new(Role::Assistant, "Could you check them? For example January 31, 1970."),
            ChatMessage::new(Role::User, "Sorry, I meant the 30th of Jan. 1958, or 1958-01-30, or 01/30/1958."),
        ];
        let narrowed = narrow(&tools, &said);
        assert_eq!(
            narrowed[0].parameters["properties"]["date_of_birth"]["enum"],
            json!(["January 13, 1958", "the 30th of Jan. 1958", "1958-01-30", "01/30/1958"]),
            "as said, only the caller's"
        );
    }

    #[test]
    fn a_gate_is_called_with_what_the_caller_said_last() {
        let options = GenerateOptions { tools: vec![verify_tool(), order_tool()], ..GenerateOptions::default() };
        let gate = |m: &[ChatMessage]| gate_call(&options, m).map(|c| (c.name, c.arguments));
        let user = |t: &str| ChatMessage::new(Role::User, t);
        assert_eq!(
            gate(&[user("Member 1001, born March 12, 1984. Is my order ready?")]),
            Some(("verify_member".into(), json!({"member_id": "1001", "date_of_birth": "March 12, 1984"})))
        );
        // A member ID without the date: the gate is asked, and says what it needs.
        assert_eq!(gate(&[user("My member ID is 1003. Where is my order?")]), Some(("verify_member".into(), json!({"member_id": "1003"}))));
        // The year of a birth date is not a member ID.
        assert_eq!(
            gate(&[user("Member one zero zero two, born 11/02/1971, or November 2nd, 1971.")]).map(|(_, a)| a["member_id"].clone()),
            Some(json!("1002"))
        );
        // A date the ASR garbled leaves its year; the member ID comes first.
        assert_eq!(
            gate(&[user("Hi, number 1003, Orange lie 25th, 1990. How many refills?")]),
            Some(("verify_member".into(), json!({"member_id": "1003"})))
        );
        // No member ID: not called (the model asks).
        assert_eq!(gate(&[user("Hi, what's the status of my order?")]), None);
        assert_eq!(gate(&[user("I was born March 12th, 1984.")]), None);
        // A correction: the date said last, the member ID from before.
        let retry = [user("Member 1004, born January 13, 1958."), user("Sorry, I meant January 30, 1958.")];
        assert_eq!(gate(&retry), Some(("verify_member".into(), json!({"member_id": "1004", "date_of_birth": "January 30, 1958"}))));
        // The failed check's arguments (a year among them) are not the caller's words.
        let failed_call = ChatMessage::tool_calls(
            "",
            vec![ToolCall { id: "c0".into(), name: "verify_member".into(), arguments: json!({"member_id": "1004", "date_of_birth": "January 13, 1958"}) }],
        );
        let retried = [retry[0].clone(), failed_call, ChatMessage::tool_result("c0", r#"{"error": "no match"}"#), retry[1].clone()];
        assert_eq!(gate(&retried), Some(("verify_member".into(), json!({"member_id": "1004", "date_of_birth": "January 30, 1958"}))));
        let mut messages = retry.to_vec();
        messages.push(user("How are you?"));
        assert_eq!(gate(&messages), None, "nothing new for the check in the last message");
        let call = ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "verify_member".into(), arguments: json!({}) }]);
        let passed = [call, ChatMessage::tool_result("c1", r#"{"verified": true}"#), user("I'm 1001, born March 12, 1984.")];
        assert_eq!(gate(&passed), None, "a passed gate is not called again");
        let none = GenerateOptions { tool_choice: ToolChoice::None, ..options.clone() };
        assert!(gate_call(&none, &[user("Member 1001, born March 12, 1984.")]).is_none());
        // Called already since the caller spoke (a cancelled reply asked for again):
        // its answer stands, neither call nor question comes again.
        let asked = ChatMessage::tool_calls("", vec![ToolCall { id: "c2".into(), name: "verify_member".into(), arguments: json!({"member_id": "1001"}) }]);
        let this_turn = [user("My member ID is 1001. What is the status of my order?"), asked, ChatMessage::tool_result("c2", r#"{"error": "date of birth needed"}"#)];
        assert_eq!(gate(&this_turn), None, "the gate is not called twice in one turn");
        assert!(gate_ask(&options, &this_turn).is_none());
    }

    #[test]
    fn a_record_named_by_the_caller_asks_for_a_look_up() {
        let options = GenerateOptions { tools: vec![order_tool()], ..GenerateOptions::default() };
        let user = |t: &str| ChatMessage::new(Role::User, t);
        let looked_up = [
            user("Is order ORD001 ready?"),
            ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "get_order_details".into(), arguments: json!({"order_id": "ORD001"}) }]),
            ChatMessage::tool_result("c1", r#"{"order_id": "ORD001", "status": "processing"}"#),
        ];
        let mut messages = looked_up.to_vec();
        messages.push(user("And what about order O R D zero zero two?"));
        assert!(names_record(&options, &messages), "a new record");
        let mut messages = looked_up.to_vec();
        messages.push(user("When can I pick up ORD001?"));
        assert!(names_record(&options, &messages), "one looked up before: looked up again");
        let mut messages = looked_up.to_vec();
        messages.push(user("When can I pick it up?"));
        assert!(!names_record(&options, &messages), "no id named");
        assert!(!names_record(&options, &[user("How are you?")]));
    }

    #[test]
    fn the_tail_of_a_known_record_id_is_not_a_member_id() {
        let list_orders = ToolSpec {
            name: "list_orders".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"member_id": {"type": "string", "pattern": "^[0-9]{3,10}$", KNOWN: true}}}),
        };
        let options = GenerateOptions { tools: vec![verify_tool(), list_orders, order_tool()], ..GenerateOptions::default() };
        let user = |t: &str| ChatMessage::new(Role::User, t);
        let mut messages = vec![
            user("Member 1002, born November 2, 1971."),
            ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "verify_member".into(), arguments: json!({"member_id": "1002", "date_of_birth": "November 2, 1971"}) }]),
            ChatMessage::tool_result("c1", r#"{"verified": true, "member_id": "1002"}"#),
            user("What is the status of order of RD-002?"),
        ];
        assert!(names_record(&options, &messages), "002 could be a member");
        // Once ORD002 is known (the check listed it), "002" is that order's tail.
        messages.insert(3, ChatMessage::tool_result("c1", r#"{"orders": [{"order_id": "ORD002"}]}"#));
        assert!(!names_record(&options, &messages), "only the tail of a known order id was said");
        messages.push(user("My husband is member 1005. What are his orders?"));
        assert!(names_record(&options, &messages), "another member's number names his records");
    }

    #[test]
    fn an_action_asked_for_without_an_id_is_made_on_the_one_record_known() {
        let refill = ToolSpec {
            name: "request_refill".into(),
            description: String::new(),
            parameters: json!({
                "type": "object",
                "properties": {"rx_id": {"type": "string", "pattern": "^RX[0-9]{3,8}$", KNOWN: true}, "confirm": {"type": "boolean"}},
                "required": ["rx_id"],
                ASKED: "\\b(?:refill|renew)\\b"
            }),
        };
        let options = GenerateOptions { tools: vec![refill], ..GenerateOptions::default() };
        let user = |t: &str| ChatMessage::new(Role::User, t);
        let known = |ids: &str| vec![user("Member 1002, born November 2, 1971."), ChatMessage::tool_result("c1", format!(r#"{{"prescriptions": [{ids}]}}"#))];
        let mut one = known(r#""RX1002""#);
        one.push(user("I would like a refill of my prescription."));
        let call = asked_call(&options, &one).expect("a refill of the one prescription");
        assert_eq!((call.name.as_str(), &call.arguments), ("request_refill", &json!({"rx_id": "RX1002"})));
        // Two prescriptions: the model asks which.
        let mut two = known(r#""RX1004", "RX1005""#);
        two.push(user("Can you refill my prescription?"));
        assert!(asked_call(&options, &two).is_none());
        // A question about refills is not a request; an id said is the model's to use.
        for words in ["How many refills do I have left?", "Please refill RX1002."] {
            let mut asked = known(r#""RX1002""#);
            asked.push(user(words));
            assert!(asked_call(&options, &asked).is_none(), "{words}");
        }
        // Made once: not again after the call in this turn.
        one.push(ChatMessage::tool_calls("", vec![call]));
        assert!(asked_call(&options, &one).is_none());
    }

    #[test]
    fn a_call_required_about_a_named_record_takes_only_its_ids() {
        let rx_tool = ToolSpec {
            name: "get_prescription".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"rx_id": {"type": "string", "pattern": "^RX\\d{4}$", KNOWN: true}}, "required": ["rx_id"]}),
        };
        let options = GenerateOptions { tools: vec![order_tool(), rx_tool], tool_choice: ToolChoice::RequiredNamed, ..GenerateOptions::default() };
        let user = |t: &str| ChatMessage::new(Role::User, t);
        let messages = [
            user("Is order ORD001 ready? And RX1004?"),
            ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "get_order_details".into(), arguments: json!({"order_id": "ORD001"}) }]),
            ChatMessage::tool_result("c1", r#"{"order_id": "ORD001", "rx_id": "RX1004"}"#),
            user("Which medication is in order ORD006?"),
        ];
        let tools = callable(&options, &messages);
        assert_eq!(tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["get_order_details"], "no prescription was named");
        assert_eq!(tools[0].parameters["properties"]["order_id"]["enum"], json!(["ORD006"]));
        // Required alone keeps every record the call has seen.
        let any = GenerateOptions { tool_choice: ToolChoice::Required, ..options.clone() };
        assert_eq!(callable(&any, &messages).len(), 2);
        assert!(callable(&options, &[]).is_empty());
    }

    #[test]
    fn spelled_out_ids_are_joined() {
        assert_eq!(spelled_out_joined("my member ID is one zero zero one."), "my member ID is 1001");
        assert_eq!(spelled_out_joined("order O R D zero zero four please"), "order ORD004 please");
        assert_eq!(spelled_out_joined("it's 1 0 0 2"), "it's 1002");
    }

    #[test]
    fn an_id_nobody_said_cannot_be_offered() {
        let said = [ChatMessage::new(Role::User, "Where is my order?")];
        assert!(narrow(&[order_tool()], &said).is_empty(), "no order id known: the tool cannot be called");

        let said = [
            ChatMessage::new(Role::User, "Is order O R D zero zero four ready?"),
            ChatMessage::tool_calls("", vec![ToolCall { id: "c1".into(), name: "x".into(), arguments: json!({"order_id": "ord002"}) }]),
            ChatMessage::tool_result("c1", r#"{"orders": ["ORD002", "ORD004", "ORD9"]}"#),
        ];
        let narrowed = narrow(&[order_tool()], &said);
        assert_eq!(narrowed.len(), 1);
        let schema = &narrowed[0].parameters["properties"]["order_id"];
        assert_eq!(schema["enum"], json!(["ORD004", "ORD002"]), "{schema}");
        assert_eq!(schema["description"], "the order");
        assert!(schema.get(KNOWN).is_none() && schema.get("pattern").is_none());
    }

    #[test]
    fn an_optional_unknown_id_is_left_out_and_plain_tools_kept() {
        let tool = ToolSpec {
            name: "find".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"q": {"type": "string"}, "rx_id": {"type": "string", "pattern": "RX[0-9]+", "x-parley-known": true}}}),
        };
        let narrowed = narrow(std::slice::from_ref(&tool), &[ChatMessage::new(Role::User, "hello")]);
        assert_eq!(narrowed[0].parameters["properties"], json!({"q": {"type": "string"}}));
        assert_eq!(for_prompt(&tool).parameters["properties"]["rx_id"], json!({"type": "string", "pattern": "RX[0-9]+"}));
    }
}
