//! The evaluation set file: scripted conversations and what each turn must (and
//! must not) do, in TOML so people can read and extend it (`bench/eval/*.toml`).
//!
//! ```toml
//! private = ["amoxicillin"]   # never said before the caller is verified
//!
//! [[conversation]]
//! name = "order-status"
//! category = "status"         # rates are reported per category
//! about = "a member asks about their order"
//! spoken = "piper"            # turns synthesized and heard through the ASR
//! calls = []   # calls that must happen in any turn
//!
//! [[conversation.turn]]
//! user = "Hi, my member ID is 1001. What's the status of my order?"
//! calls = [{ tool = "list_orders|get_order_details", args = { member_id = "1001" } }]
//! forbid = ["request_refill"]
//! say = ["processing", "amoxicillin"]
//! not_say = ["ready for pickup"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// A whole evaluation set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSet {
    /// Case-insensitive regexes of member facts that no reply may contain before
    /// the caller passed the identity check (a tool result with `"verified": true`)
    /// in that conversation.
    #[serde(default)]
    pub private: Vec<String>,
    /// The conversations, run in file order.
    #[serde(rename = "conversation")]
    pub conversations: Vec<Conversation>,
}

/// How a spoken conversation's turns are synthesized before the ASR hears them.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Voice {
    /// The server's own Piper voice.
    Piper,
    /// `espeak-ng` (a robotic voice, harder for the ASR).
    Espeak,
}

/// One scripted call: user turns sent as text, one response each.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Conversation {
    /// Unique short name, shown in the report and matched by `--only`.
    pub name: String,
    /// What it tests, for people reading the set.
    #[serde(default)]
    pub about: String,
    /// The kind of task, for the per-category rates.
    #[serde(default = "uncategorized")]
    pub category: String,
    /// When set, the caller's turns are synthesized with this voice and sent as
    /// audio, so the ASR's transcript is what the agent answers.
    #[serde(default)]
    pub spoken: Option<Voice>,
    /// Tool calls that must happen in some turn, whichever: for facts a later turn
    /// needs that an earlier one may already have looked up.
    #[serde(default)]
    pub calls: Vec<ExpectedCall>,
    #[serde(rename = "turn")]
    pub turns: Vec<Turn>,
}

/// One user turn and the expectations on the agent's response to it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    /// What the caller says.
    pub user: String,
    /// Tool calls that must happen in this response (each matched by some call).
    #[serde(default)]
    pub calls: Vec<ExpectedCall>,
    /// Tools that must not be called in this response; `"*"` forbids every tool.
    #[serde(default)]
    pub forbid: Vec<String>,
    /// Case-insensitive regexes the spoken reply must each match.
    #[serde(default)]
    pub say: Vec<String>,
    /// Case-insensitive regexes the spoken reply must not match (invented facts).
    #[serde(default)]
    pub not_say: Vec<String>,
}

/// A tool call that must happen.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExpectedCall {
    /// The tool's name; `a|b` accepts either.
    pub tool: String,
    /// Arguments that must be present with these values (others may be there too).
    /// Ids compare leniently: case, spaces, dashes and number-vs-string do not matter.
    #[serde(default)]
    pub args: BTreeMap<String, toml::Value>,
}

fn uncategorized() -> String {
    "other".to_string()
}

impl EvalSet {
    /// Reads and checks a set file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the evaluation set {}", path.display()))?;
        let set: EvalSet = toml::from_str(&text).with_context(|| format!("{} is not a valid evaluation set", path.display()))?;
        set.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(set)
    }

    /// Names must be unique and every conversation must have a turn.
    pub fn validate(&self) -> Result<()> {
        if self.conversations.is_empty() {
            bail!("no [[conversation]] in the set");
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.conversations {
            if c.name.trim().is_empty() {
                bail!("a conversation has no name");
            }
            if !seen.insert(c.name.as_str()) {
                bail!("two conversations are called `{}`", c.name);
            }
            if c.turns.is_empty() {
                bail!("conversation `{}` has no [[conversation.turn]]", c.name);
            }
            if let Some(i) = c.turns.iter().position(|t| t.user.trim().is_empty()) {
                bail!("conversation `{}` turn {} has no user text", c.name, i + 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form_and_rejects_typos() {
        let text = r#"
[[conversation]]
name = "order-status"
[[conversation.turn]]
user = "Hi, my member ID is 1001."
calls = [{ tool = "list_orders", args = { member_id = 1001 } }]
say = ["processing"]
"#;
        let set: EvalSet = toml::from_str(text).expect("parse");
        set.validate().expect("valid");
        assert_eq!(set.conversations[0].turns[0].calls[0].args["member_id"], toml::Value::Integer(1001));
        let typo = text.replace("say =", "sya =");
        assert!(toml::from_str::<EvalSet>(&typo).is_err());
    }

    #[test]
    fn the_shipped_pharmacy_set_is_valid() {
        let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../bench/eval/pharmacy.toml");
        let set = EvalSet::load(&path).expect("bench/eval/pharmacy.toml");
        assert!(set.conversations.len() >= 40, "issue 9: at least 40 conversations");
        assert!(set.conversations.iter().filter(|c| c.spoken.is_some()).count() >= 10, "at least 10 spoken");
        let categories: std::collections::BTreeSet<&str> = set.conversations.iter().map(|c| c.category.as_str()).collect();
        for wanted in ["status", "contents", "pickup", "refills", "refill-request", "prescriber", "unknown", "other-member", "identity", "follow-up", "small-talk"] {
            assert!(categories.contains(wanted), "no conversation of category {wanted}");
        }
        for member in ["1001", "1002", "1003", "1004", "1005"] {
            assert!(set.conversations.iter().any(|c| c.turns.iter().any(|t| t.user.contains(member))), "member {member} never calls");
        }
        for c in &set.conversations {
            crate::eval::check::ConversationCheck::new(c, &set.private).expect("regexes compile");
        }
    }
}
