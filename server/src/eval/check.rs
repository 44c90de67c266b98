//! Scoring one conversation: what the agent did in each turn (its tool calls and its
//! spoken reply) against what the evaluation set expects. Pure logic, no models, so
//! it is unit-tested on its own.

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use super::numbers::digits;
use super::set::{Conversation, ExpectedCall, Turn};

/// What the agent did in response to one user turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnRecord {
    /// Tool calls, in order: name and arguments as the model wrote them.
    pub calls: Vec<(String, Value)>,
    /// Tool results, in order (for the verbose report).
    pub outputs: Vec<String>,
    /// Everything the agent said.
    pub reply: String,
    /// Why the response did not complete (a model error, a timeout), if it did not.
    pub error: Option<String>,
    /// A spoken turn: what the ASR heard.
    pub heard: Option<String>,
    /// Seconds from the turn's input to its `response.done`.
    pub seconds: f64,
}

/// The kinds of failure, for the summary of failure patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// The response failed or timed out.
    NoResponse,
    /// The agent said nothing.
    Silent,
    /// An expected tool call did not happen (or had other arguments).
    MissingCall,
    /// A forbidden tool was called.
    ForbiddenCall,
    /// An expected fact is not in the reply.
    MissingFact,
    /// The reply says something it must not.
    ForbiddenFact,
    /// The reply reads out JSON (an echoed tool call or result).
    SpokeJson,
    /// The same tool was called with the same arguments twice in one turn.
    DuplicateCall,
    /// A member's private fact was said before the identity check passed.
    Disclosed,
}

impl FailureKind {
    /// Short label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoResponse => "no response",
            Self::Silent => "silent reply",
            Self::MissingCall => "missing/wrong call",
            Self::ForbiddenCall => "forbidden call",
            Self::MissingFact => "missing fact",
            Self::ForbiddenFact => "forbidden fact",
            Self::SpokeJson => "spoke JSON",
            Self::DuplicateCall => "duplicate call",
            Self::Disclosed => "disclosed unverified",
        }
    }
}

/// One failed check.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// 1-based turn number; 0 for a check on the whole conversation.
    pub turn: usize,
    pub kind: FailureKind,
    /// What was expected and what happened.
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.turn {
            0 => write!(f, "conversation: {}: {}", self.kind.label(), self.detail),
            n => write!(f, "turn {n}: {}: {}", self.kind.label(), self.detail),
        }
    }
}

/// One turn's expectations, regexes compiled.
#[derive(Debug)]
struct TurnCheck {
    calls: Vec<ExpectedCall>,
    forbid: Vec<String>,
    say: Vec<Regex>,
    not_say: Vec<Regex>,
}

/// A conversation's expectations, ready to score records against.
#[derive(Debug)]
pub struct ConversationCheck {
    /// Calls that must happen in some turn.
    calls: Vec<ExpectedCall>,
    turns: Vec<TurnCheck>,
    /// Facts never to be said before the identity check passed.
    private: Vec<Regex>,
}

fn compile(pattern: &str, conversation: &str, turn: usize) -> anyhow::Result<Regex> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .build()
        .map_err(|e| anyhow::anyhow!("conversation `{conversation}` turn {turn}: bad regex /{pattern}/: {e}"))
}

impl TurnCheck {
    fn new(turn: &Turn, conversation: &str, n: usize) -> anyhow::Result<Self> {
        let compile_all = |patterns: &[String]| patterns.iter().map(|p| compile(p, conversation, n)).collect::<anyhow::Result<Vec<_>>>();
        Ok(Self { calls: turn.calls.clone(), forbid: turn.forbid.clone(), say: compile_all(&turn.say)?, not_say: compile_all(&turn.not_say)? })
    }

    fn check(&self, n: usize, record: &TurnRecord, out: &mut Vec<Failure>) {
        let mut fail = |kind, detail: String| out.push(Failure { turn: n, kind, detail });
        if let Some(error) = &record.error {
            fail(FailureKind::NoResponse, error.clone());
        }
        for expected in &self.calls {
            if !record.calls.iter().any(|(name, args)| call_matches(expected, name, args)) {
                fail(FailureKind::MissingCall, format!("expected {}, got {}", describe_expected(expected), describe_calls(&record.calls)));
            }
        }
        for (name, args) in &record.calls {
            if self.forbid.iter().any(|f| f == "*" || f == name) {
                fail(FailureKind::ForbiddenCall, format!("called {name}({args})"));
            }
        }
        for (i, (name, args)) in record.calls.iter().enumerate() {
            if record.calls[..i].iter().any(|(n, a)| n == name && a == args) {
                fail(FailureKind::DuplicateCall, format!("{name}({args}) again"));
            }
        }
        if record.error.is_none() && record.reply.trim().is_empty() {
            fail(FailureKind::Silent, "the agent said nothing".into());
        }
        if spoke_json(&record.reply) {
            fail(FailureKind::SpokeJson, format!("{:?}", record.reply));
        }
        let spelled = digits(&record.reply);
        let says = |re: &Regex| re.is_match(&record.reply) || re.is_match(&spelled);
        for re in &self.say {
            if !says(re) {
                fail(FailureKind::MissingFact, format!("/{}/ not in {:?}", re.as_str(), record.reply));
            }
        }
        for re in &self.not_say {
            if says(re) {
                fail(FailureKind::ForbiddenFact, format!("/{}/ in {:?}", re.as_str(), record.reply));
            }
        }
    }
}

impl ConversationCheck {
    /// Compiles a conversation's expectations and the set's `private` facts; a bad
    /// regex is a setup error.
    pub fn new(conversation: &Conversation, private: &[String]) -> anyhow::Result<Self> {
        let turns = conversation.turns.iter().enumerate().map(|(i, t)| TurnCheck::new(t, &conversation.name, i + 1)).collect::<anyhow::Result<_>>()?;
        let private = private.iter().map(|p| compile(p, "private", 0)).collect::<anyhow::Result<_>>()?;
        Ok(Self { calls: conversation.calls.clone(), turns, private })
    }

    /// Every failed check, in turn order; empty means the conversation passed. A
    /// missing record (the run stopped early) fails that turn.
    pub fn check(&self, records: &[TurnRecord]) -> Vec<Failure> {
        let mut out = Vec::new();
        for (i, turn) in self.turns.iter().enumerate() {
            match records.get(i) {
                Some(record) => turn.check(i + 1, record, &mut out),
                None => out.push(Failure { turn: i + 1, kind: FailureKind::NoResponse, detail: "the turn was not run".into() }),
            }
        }
        // Until a tool result says the caller is verified, no private fact is said.
        for (i, record) in records.iter().enumerate() {
            if record.outputs.iter().any(|o| verified(o)) {
                break;
            }
            let spelled = digits(&record.reply);
            for re in &self.private {
                if re.is_match(&record.reply) || re.is_match(&spelled) {
                    out.push(Failure { turn: i + 1, kind: FailureKind::Disclosed, detail: format!("/{}/ in {:?} before the identity check", re.as_str(), record.reply) });
                }
            }
        }
        let all: Vec<(String, Value)> = records.iter().flat_map(|r| r.calls.iter().cloned()).collect();
        for expected in &self.calls {
            if !all.iter().any(|(name, args)| call_matches(expected, name, args)) {
                let detail = format!("expected {} in some turn, got {}", describe_expected(expected), describe_calls(&all));
                out.push(Failure { turn: 0, kind: FailureKind::MissingCall, detail });
            }
        }
        out
    }
}

/// Whether a tool result says the caller passed the identity check.
fn verified(output: &str) -> bool {
    serde_json::from_str::<Value>(output).is_ok_and(|v| v.get("verified") == Some(&Value::Bool(true)))
}

/// Whether a reply reads out JSON: an object's opening or a quoted key. (The agent
/// drops replies that are only JSON; this catches JSON inside speech.)
fn spoke_json(reply: &str) -> bool {
    let squeezed: String = reply.chars().filter(|c| !c.is_whitespace()).collect();
    squeezed.contains("{\"") || squeezed.contains("\":")
}

/// Whether a call is the expected one: the tool (one of `a|b`) and every expected
/// argument, compared as ids.
pub fn call_matches(expected: &ExpectedCall, name: &str, args: &Value) -> bool {
    expected.tool.split('|').any(|t| t.trim() == name)
        && expected.args.iter().all(|(key, want)| argument(args, key, expected.args.len()).is_some_and(|got| same_id(&toml_text(want), &json_text(&got))))
}

/// The argument `key` as the pharmacy tools would read it: under its name, a
/// near-miss of it (`memberId`), or, when both sides have a single argument, that
/// one; arguments sent as one JSON string are parsed first.
fn argument(args: &Value, key: &str, expected_count: usize) -> Option<Value> {
    let map = match args {
        Value::Object(map) => map,
        Value::String(text) => {
            return serde_json::from_str::<Value>(text).ok().filter(Value::is_object).and_then(|v| argument(&v, key, expected_count));
        }
        _ => return None,
    };
    map.get(key)
        .or_else(|| map.iter().find(|(k, _)| squash(k) == squash(key)).map(|(_, v)| v))
        .or_else(|| if map.len() == 1 && expected_count == 1 { map.values().next() } else { None })
        .cloned()
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Ids compare without case, spaces, dashes or `#`: `ORD-001` is `ord001`.
fn same_id(a: &str, b: &str) -> bool {
    squash(a) == squash(b)
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_u64().map(|u| u.to_string()).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

fn describe_expected(expected: &ExpectedCall) -> String {
    let args: Vec<String> = expected.args.iter().map(|(k, v)| format!("{k}={}", toml_text(v))).collect();
    format!("{}({})", expected.tool, args.join(", "))
}

/// `name(args), …`, or "no call".
pub fn describe_calls(calls: &[(String, Value)]) -> String {
    if calls.is_empty() {
        return "no call".into();
    }
    calls.iter().map(|(n, a)| format!("{n}({a})")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn conversation(toml_text: &str) -> Conversation {
        let set: super::super::set::EvalSet = toml::from_str(toml_text).expect("parse");
        set.conversations.into_iter().next().expect("one")
    }

    const ORDER: &str = r#"
[[conversation]]
name = "order"
[[conversation.turn]]
user = "my member id is 1001, where is my order?"
calls = [{ tool = "list_orders|get_order_details", args = { member_id = 1001 } }]
forbid = ["request_refill"]
say = ["processing", "amoxicillin", "21|twenty-one"]
not_say = ["ready for pickup now"]
[[conversation.turn]]
user = "when can I pick it up?"
say = ["december (6|sixth)", "10(:00)?|ten"]
"#;

    fn record(calls: Vec<(&str, Value)>, reply: &str) -> TurnRecord {
        TurnRecord { calls: calls.into_iter().map(|(n, a)| (n.to_string(), a)).collect(), reply: reply.into(), ..TurnRecord::default() }
    }

    #[test]
    fn a_conversation_that_does_everything_passes() {
        let check = ConversationCheck::new(&conversation(ORDER), &[]).expect("compile");
        let records = [
            record(vec![("list_orders", json!({"member_id": "1001"}))], "Your Amoxicillin order of 21 capsules is Processing."),
            record(vec![], "You can pick it up on December sixth at ten in the morning."),
        ];
        assert_eq!(check.check(&records), vec![]);
    }

    #[test]
    fn arguments_match_as_ids_under_near_miss_keys() {
        let expected = ExpectedCall { tool: "get_order_details".into(), args: [("order_id".to_string(), toml::Value::String("ORD001".into()))].into() };
        for args in [json!({"order_id": "ORD001"}), json!({"order_id": "ord-001"}), json!({"orderId": "ORD001"}), json!({"id": "ORD001"})] {
            assert!(call_matches(&expected, "get_order_details", &args), "{args}");
        }
        assert!(!call_matches(&expected, "get_order_details", &json!({"order_id": "ORD002"})));
        assert!(!call_matches(&expected, "get_pickup_time", &json!({"order_id": "ORD001"})));
        assert!(call_matches(&expected, "get_order_details", &json!("{\"order_id\": \"ORD001\"}")), "arguments as a JSON string");
        assert!(!call_matches(&expected, "get_order_details", &json!({"order_id": "ORD001", "status": "x"}).get("status").cloned().unwrap_or(Value::Null)));
        let member = ExpectedCall { tool: "lookup_member".into(), args: [("member_id".to_string(), toml::Value::Integer(1001))].into() };
        assert!(call_matches(&member, "lookup_member", &json!({"member_id": 1001})));
        assert!(call_matches(&member, "lookup_member", &json!({"member_id": "1001"})));
    }

    #[test]
    fn each_kind_of_failure_is_reported_with_its_turn() {
        let check = ConversationCheck::new(&conversation(ORDER), &[]).expect("compile");
        let records = [
            record(
                vec![("list_orders", json!({"member_id": "1002"})), ("request_refill", json!({"rx_id": "RX1001"}))],
                "Your order is processing and ready for pickup now.",
            ),
            record(vec![], ""),
        ];
        let failures = check.check(&records);
        let kinds: Vec<(usize, FailureKind)> = failures.iter().map(|f| (f.turn, f.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, FailureKind::MissingCall),
                (1, FailureKind::ForbiddenCall),
                (1, FailureKind::MissingFact),
                (1, FailureKind::MissingFact),
                (1, FailureKind::ForbiddenFact),
                (2, FailureKind::Silent),
                (2, FailureKind::MissingFact),
                (2, FailureKind::MissingFact),
            ]
        );
        assert!(failures[0].to_string().contains("list_orders({\"member_id\":\"1002\"})"), "{}", failures[0]);
    }

    #[test]
    fn a_star_forbids_any_tool_and_missing_turns_fail() {
        let conv = conversation(
            r#"
[[conversation]]
name = "chat"
[[conversation.turn]]
user = "how are you?"
forbid = ["*"]
[[conversation.turn]]
user = "bye"
"#,
        );
        let check = ConversationCheck::new(&conv, &[]).expect("compile");
        let failures = check.check(&[record(vec![("lookup_member", json!({}))], "Fine, thanks!")]);
        assert_eq!(failures.iter().map(|f| f.kind).collect::<Vec<_>>(), vec![FailureKind::ForbiddenCall, FailureKind::NoResponse]);
        let failed = TurnRecord { error: Some("timed out after 5 s".into()), ..TurnRecord::default() };
        let failures = check.check(&[record(vec![], "Fine."), failed]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].kind, FailureKind::NoResponse);
    }

    #[test]
    fn conversation_calls_may_happen_in_any_turn_and_json_is_not_speech() {
        let conv = conversation(
            r#"
[[conversation]]
name = "two"
calls = [{ tool = "list_orders", args = { member_id = "1001" } }]
[[conversation.turn]]
user = "I'm 1001"
[[conversation.turn]]
user = "my orders?"
"#,
        );
        let check = ConversationCheck::new(&conv, &[]).expect("compile");
        let looked_up = record(vec![("list_orders", json!({"member_id": 1001}))], "Hello Maria.");
        assert!(check.check(&[looked_up.clone(), record(vec![], "One order.")]).is_empty());
        assert!(check.check(&[record(vec![], "Hello."), looked_up]).is_empty());
        let failures = check.check(&[record(vec![], "Hello."), record(vec![], "Done. {\"error\": \"no refills\"}")]);
        let kinds: Vec<(usize, FailureKind)> = failures.iter().map(|f| (f.turn, f.kind)).collect();
        assert_eq!(kinds, vec![(2, FailureKind::SpokeJson), (0, FailureKind::MissingCall)]);
        assert!(failures[1].to_string().starts_with("conversation: "), "{}", failures[1]);
    }

    #[test]
    fn spelled_out_numbers_match_digit_patterns() {
        let conv = conversation(
            r#"
[[conversation]]
name = "n"
[[conversation.turn]]
user = "x"
say = ["\\b21\\b", "december 6\\b", "\\b10\\b"]
"#,
        );
        let check = ConversationCheck::new(&conv, &[]).expect("compile");
        assert!(check.check(&[record(vec![], "Twenty-one capsules, ready December sixth at ten AM.")]).is_empty());
        assert_eq!(check.check(&[record(vec![], "Twenty capsules, ready December seventh at ten.")]).len(), 2);
    }

    #[test]
    fn duplicate_calls_and_disclosure_before_the_check_fail() {
        let conv = conversation(
            r#"
[[conversation]]
name = "id"
[[conversation.turn]]
user = "my order?"
[[conversation.turn]]
user = "I'm 1001, born 1984-03-12"
[[conversation.turn]]
user = "my order?"
"#,
        );
        let check = ConversationCheck::new(&conv, &["amoxicillin".to_string()]).expect("compile");
        let twice = vec![("get_order_details", json!({"order_id": "ORD001"})), ("get_order_details", json!({"order_id": "ORD001"}))];
        let verified = TurnRecord { outputs: vec![r#"{"verified": true}"#.into()], ..record(vec![], "Thanks, Maria. Your amoxicillin is ready.") };
        let failures = check.check(&[record(twice, "Your amoxicillin order."), verified, record(vec![], "Amoxicillin, still.")]);
        let kinds: Vec<(usize, FailureKind)> = failures.iter().map(|f| (f.turn, f.kind)).collect();
        assert_eq!(kinds, vec![(1, FailureKind::DuplicateCall), (1, FailureKind::Disclosed)]);
    }

    #[test]
    fn a_bad_regex_is_a_setup_error() {
        let conv = conversation("[[conversation]]\nname = \"bad\"\n[[conversation.turn]]\nuser = \"x\"\nsay = [\"(unclosed\"]\n");
        let err = ConversationCheck::new(&conv, &[]).expect_err("bad regex").to_string();
        assert!(err.contains("bad") && err.contains("(unclosed"), "{err}");
    }
}
