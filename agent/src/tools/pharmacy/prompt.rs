//! The desk's wording, per model family, from files (`agent/prompts/pharmacy/*.toml`)
//! rather than code: the system prompt added while the desk is offered, a short
//! example or two, and the tool and parameter descriptions. A family is picked from
//! the engine's name; families without a file get `default.toml`. The files are
//! compiled in, and a test checks each one parses and covers every tool.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// The families with a file of their own, matched in the engine's name (lower case),
/// and the file's text; the first that matches is taken, so a model with a file of
/// its own comes before its family.
const FAMILIES: &[(&str, &str)] = &[
    ("qwen2.5-coder-1.5b", include_str!("../../../prompts/pharmacy/qwen2.5-1.5b.toml")),
    ("qwen2", include_str!("../../../prompts/pharmacy/qwen2.5.toml")),
];

/// The family of the server's default model (an empty engine name).
const DEFAULT_FAMILY: &str = "qwen2";

/// For every other model.
const DEFAULT: &str = include_str!("../../../prompts/pharmacy/default.toml");

/// One family's wording.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PromptPack {
    /// Added to the call's instructions while the desk's tools are offered.
    system: String,
    /// Short examples, shown after the rules.
    #[serde(default, rename = "example")]
    examples: Vec<Example>,
    /// Tool name → description.
    tools: BTreeMap<String, String>,
    /// Parameter name → description.
    parameters: BTreeMap<String, String>,
}

/// A caller's line and what the agent does with it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    caller: String,
    agent: String,
}

impl PromptPack {
    /// The system prompt's desk part, examples included.
    pub(super) fn system_text(&self) -> String {
        let mut text = self.system.trim().to_string();
        if !self.examples.is_empty() {
            text.push_str("\nExamples:");
            for e in &self.examples {
                text.push_str(&format!("\nCaller: {}\nYou: {}", e.caller.trim(), e.agent.trim()));
            }
        }
        text
    }

    /// A tool's description; its name in words if the file has none.
    pub(super) fn tool(&self, name: &str) -> String {
        self.tools.get(name).cloned().unwrap_or_else(|| name.replace('_', " "))
    }

    /// A parameter's description; its name in words if the file has none.
    pub(super) fn parameter(&self, name: &str) -> String {
        self.parameters.get(name).cloned().unwrap_or_else(|| name.replace('_', " "))
    }
}

/// The file's family for an engine name such as `candle:qwen2.5-coder-0.5b-instruct-q4_k_m`.
fn family_text(model: &str) -> (&'static str, &'static str) {
    let model = model.to_ascii_lowercase();
    FAMILIES
        .iter()
        .find(|(family, _)| model.contains(*family))
        .map(|&(family, text)| (family, text))
        .unwrap_or(("default", DEFAULT))
}

fn parse(family: &str, text: &str) -> PromptPack {
    toml::from_str(text).unwrap_or_else(|error| {
        // The files are compiled in and tested; this guards a bad edit only.
        tracing::error!(family, %error, "the pharmacy desk's prompt file does not parse; using bare descriptions");
        PromptPack::default()
    })
}

/// The wording for `model` (the engine's name; empty: the default model's family,
/// Qwen2.5, which the server ships).
pub(super) fn for_model(model: &str) -> &'static PromptPack {
    static PACKS: OnceLock<BTreeMap<&'static str, PromptPack>> = OnceLock::new();
    let packs = PACKS.get_or_init(|| {
        let mut packs: BTreeMap<&'static str, PromptPack> = FAMILIES.iter().map(|&(f, t)| (f, parse(f, t))).collect();
        packs.insert("default", parse("default", DEFAULT));
        packs
    });
    let (family, _) = if model.is_empty() { (DEFAULT_FAMILY, "") } else { family_text(model) };
    static EMPTY: OnceLock<PromptPack> = OnceLock::new();
    packs.get(family).unwrap_or_else(|| EMPTY.get_or_init(PromptPack::default))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOOLS: [&str; 6] = ["verify_member", "list_orders", "get_order_details", "get_pickup_time", "get_prescription", "request_refill"];
    const PARAMETERS: [&str; 5] = ["member_id", "date_of_birth", "order_id", "rx_id", "confirm"];

    #[test]
    fn every_prompt_file_parses_and_covers_every_tool() {
        for (family, text) in FAMILIES.iter().copied().chain([("default", DEFAULT)]) {
            let pack: PromptPack = toml::from_str(text).unwrap_or_else(|e| panic!("{family}: {e}"));
            assert!(pack.system.contains("verify_member"), "{family}");
            for tool in TOOLS {
                assert!(pack.tools.get(tool).is_some_and(|d| !d.trim().is_empty()), "{family}: {tool}");
            }
            assert_eq!(pack.tools.len(), TOOLS.len(), "{family}: a description for a tool that does not exist");
            for parameter in PARAMETERS {
                assert!(pack.parameters.contains_key(parameter), "{family}: {parameter}");
            }
            // Examples must not use ids of the demo records, or a model copying one
            // would reach a real member's data.
            for id in ["1001", "1002", "1003", "1004", "1005", "ORD00", "RX100"] {
                assert!(!text.contains(id), "{family} uses the demo id {id}");
            }
        }
    }

    #[test]
    fn families_are_picked_from_the_engine_name() {
        assert!(std::ptr::eq(for_model("candle:qwen2.5-coder-0.5b-instruct-q4_k_m"), for_model("")));
        assert!(std::ptr::eq(for_model("remote:Qwen2.5-7B-Instruct"), for_model("")));
        let other = for_model("remote:llama-3.1-8b");
        assert!(!std::ptr::eq(other, for_model("")));
        assert!(other.system_text().contains("Identity first"));
        assert!(for_model("").system_text().contains("Examples:\nCaller: "));
    }
}
