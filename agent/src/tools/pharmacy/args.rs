//! Reading the pharmacy tools' arguments the way a small model writes them: an id
//! as a number or a string, in any case, with stray spaces or dashes, under a
//! near-miss key (`memberId`, `id`), or the whole arguments as a JSON string. Each
//! tool takes exactly one id, which is what makes this leniency safe.

use serde_json::{Map, Value};

use crate::tools::ToolError;

/// Longest id accepted; anything longer is not an id the desk could hold.
const MAX_ID_LEN: usize = 32;

/// Which id a tool takes: its parameter name, the keys a model may use instead, and
/// how to normalize and check the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdKind {
    Member,
    Order,
    Prescription,
}

impl IdKind {
    /// The parameter's name in the tool's schema.
    pub(super) fn key(self) -> &'static str {
        match self {
            IdKind::Member => "member_id",
            IdKind::Order => "order_id",
            IdKind::Prescription => "rx_id",
        }
    }

    /// Other keys a model writes for the same thing, compared after [`squash_key`].
    fn aliases(self) -> &'static [&'static str] {
        match self {
            IdKind::Member => &["member", "membernumber", "memberno", "id"],
            IdKind::Order => &["order", "ordernumber", "orderno", "id"],
            IdKind::Prescription => &["rx", "rxnumber", "prescription", "prescriptionid", "prescriptionnumber", "id"],
        }
    }

    /// An example for error messages, in the form the model should copy.
    fn example(self) -> &'static str {
        match self {
            IdKind::Member => "1001",
            IdKind::Order => "ORD001",
            IdKind::Prescription => "RX1001",
        }
    }

    /// Cleans a raw id: member ids are digits; order and prescription ids are upper
    /// case with their prefix, which is added when the model gave only the number.
    fn normalize(self, raw: &str) -> Result<String, ToolError> {
        let cleaned: String = raw.chars().filter(|c| !c.is_whitespace() && !matches!(c, '-' | '_' | '#')).collect();
        let cleaned = cleaned.to_ascii_uppercase();
        let key = self.key();
        let example = self.example();
        if cleaned.is_empty() {
            return Err(ToolError::InvalidArguments(format!(
                "{key} is empty; ask the caller for it (it looks like {example})"
            )));
        }
        if cleaned.len() > MAX_ID_LEN || !cleaned.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ToolError::InvalidArguments(format!("{key} \"{}\" is not an id; it looks like {example}", raw.trim())));
        }
        let digits_only = cleaned.chars().all(|c| c.is_ascii_digit());
        match self {
            IdKind::Member if digits_only => Ok(cleaned),
            IdKind::Member => Err(ToolError::InvalidArguments(format!(
                "member_id must be the member's number, like {example}; got \"{}\"",
                raw.trim()
            ))),
            IdKind::Order if digits_only => Ok(format!("ORD{cleaned:0>3}")),
            IdKind::Prescription if digits_only => Ok(format!("RX{cleaned}")),
            IdKind::Order | IdKind::Prescription => Ok(cleaned),
        }
    }
}

/// The id a tool of this kind was given, normalized, or an error telling the model
/// what to send instead.
pub(super) fn id_argument(arguments: &Value, kind: IdKind) -> Result<String, ToolError> {
    let raw = match arguments {
        Value::Object(map) => find(map, kind).ok_or_else(|| missing(kind))?,
        // The whole arguments as a JSON string: `"{\"member_id\": \"1001\"}"`.
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => return id_argument(&Value::Object(map), kind),
            // Or just the id itself: `"1001"`.
            _ => arguments,
        },
        Value::Null => return Err(missing(kind)),
        _ => arguments,
    };
    kind.normalize(&scalar_text(raw, kind)?)
}

/// The value under the tool's key, a near-miss of it, an alias, or, when the model
/// sent a single argument of any name, that one.
fn find(map: &Map<String, Value>, kind: IdKind) -> Option<&Value> {
    if let Some(value) = map.get(kind.key()) {
        return Some(value);
    }
    let wanted = squash_key(kind.key());
    let by_squashed = map.iter().find(|(k, _)| squash_key(k) == wanted).map(|(_, v)| v);
    let by_alias = || map.iter().find(|(k, _)| kind.aliases().contains(&squash_key(k).as_str())).map(|(_, v)| v);
    let only_one = || if map.len() == 1 { map.values().next() } else { None };
    by_squashed.or_else(by_alias).or_else(only_one)
}

/// `memberId`, `Member-ID`, `member id` all become `memberid`.
fn squash_key(key: &str) -> String {
    key.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// A string as it is, or a whole number written as digits (`1001`, `1001.0`).
fn scalar_text(value: &Value, kind: IdKind) -> Result<String, ToolError> {
    let key = kind.key();
    let example = kind.example();
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Number(number) => {
            if let Some(n) = number.as_u64() {
                Ok(n.to_string())
            } else if let Some(f) = number.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0 && *f >= 0.0 && *f < 1e15) {
                Ok(format!("{f:.0}"))
            } else {
                Err(ToolError::InvalidArguments(format!("{key} {number} is not an id; it looks like {example}")))
            }
        }
        Value::Null => Err(missing(kind)),
        _ => Err(ToolError::InvalidArguments(format!(
            "{key} must be a string like \"{example}\", not {value}"
        ))),
    }
}

fn missing(kind: IdKind) -> ToolError {
    let key = kind.key();
    ToolError::InvalidArguments(format!(
        "missing {key}; ask the caller for it and call again with {{\"{key}\": \"{}\"}}",
        kind.example()
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id(arguments: Value, kind: IdKind) -> Result<String, ToolError> {
        id_argument(&arguments, kind)
    }

    #[test]
    fn member_id_as_number_string_or_padded_string() {
        for arguments in [
            json!({"member_id": 1001}),
            json!({"member_id": "1001"}),
            json!({"member_id": " 1001 "}),
            json!({"member_id": 1001.0}),
            json!({"memberId": "1001"}),
            json!({"Member ID": "1001"}),
            json!({"id": 1001}),
            json!({"whatever": "1001"}),
            json!("{\"member_id\": 1001}"),
            json!("1001"),
            json!(1001),
        ] {
            assert_eq!(id(arguments.clone(), IdKind::Member), Ok("1001".to_string()), "{arguments}");
        }
    }

    #[test]
    fn order_and_rx_ids_in_any_case_and_shape() {
        for raw in ["ORD001", "ord001", " Ord001 ", "ORD-001", "ord 001", "1", "001"] {
            assert_eq!(id(json!({"order_id": raw}), IdKind::Order), Ok("ORD001".to_string()), "{raw}");
        }
        assert_eq!(id(json!({"order_id": 1}), IdKind::Order), Ok("ORD001".to_string()));
        for raw in ["RX1001", "rx1001", "Rx-1001", "1001"] {
            assert_eq!(id(json!({"rx_id": raw}), IdKind::Prescription), Ok("RX1001".to_string()), "{raw}");
        }
        assert_eq!(id(json!({"prescription_id": "rx1002"}), IdKind::Prescription), Ok("RX1002".to_string()));
    }

    #[test]
    fn missing_or_malformed_ids_say_what_to_send() {
        let cases = [
            (json!({}), IdKind::Member, "missing member_id"),
            (json!(null), IdKind::Order, "missing order_id"),
            (json!({"member_id": null}), IdKind::Member, "missing member_id"),
            (json!({"member_id": ""}), IdKind::Member, "member_id is empty"),
            (json!({"member_id": "abc"}), IdKind::Member, "member's number"),
            (json!({"member_id": -5}), IdKind::Member, "not an id"),
            (json!({"member_id": 10.5}), IdKind::Member, "not an id"),
            (json!({"member_id": true}), IdKind::Member, "must be a string"),
            (json!({"order_id": "ORD/001;"}), IdKind::Order, "not an id"),
            (json!({"a": "1", "b": "2"}), IdKind::Prescription, "missing rx_id"),
            (json!([1001]), IdKind::Member, "must be a string"),
        ];
        for (arguments, kind, expected) in cases {
            match id(arguments.clone(), kind) {
                Err(ToolError::InvalidArguments(message)) => {
                    assert!(message.contains(expected), "{arguments}: {message}");
                }
                other => panic!("{arguments}: expected InvalidArguments, got {other:?}"),
            }
        }
    }
}
