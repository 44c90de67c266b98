//! Reading the pharmacy tools' arguments the way a small model writes them: an id
//! as a number or a string, in any case, with stray spaces or dashes, under a
//! near-miss key (`memberId`, `id`), or the whole arguments as a JSON string. Each
//! tool takes exactly one id, which is what makes this leniency safe; the other
//! arguments (a date of birth, a confirmation) are found by their own names only.

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

    /// The id's shape as a JSON-schema `pattern`, for narrowing it to known ids.
    pub(super) fn pattern(self) -> &'static str {
        match self {
            IdKind::Member => "^[0-9]{3,10}$",
            IdKind::Order => "^ORD[0-9]{3,6}$",
            IdKind::Prescription => "^RX[0-9]{3,8}$",
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
        let raw = &digit_words(raw);
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

/// An id as a transcript may spell it ("one zero zero one", "O R D zero zero one",
/// "oh oh one") with its digit words made digits; other words are kept.
fn digit_words(raw: &str) -> String {
    const DIGITS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    raw.split(|c: char| c.is_whitespace() || c == '-' || c == ',')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            match DIGITS.iter().position(|d| *d == lower) {
                Some(d) => d.to_string(),
                None if lower == "oh" => "0".to_string(),
                None => w.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
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

/// The arguments as an object, also when the model sent them as a JSON string.
fn object(arguments: &Value) -> Option<Map<String, Value>> {
    match arguments {
        Value::Object(map) => Some(map.clone()),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        },
        _ => None,
    }
}

/// The value under one of `keys` (compared as [`squash_key`]s), if any.
fn named<'a>(map: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    map.iter().find(|(k, _)| keys.contains(&squash_key(k).as_str())).map(|(_, v)| v).filter(|v| !v.is_null())
}

/// The id of this kind when the model gave one under its name or an alias, `None`
/// when it left it out (a tool where the id is optional).
pub(super) fn optional_id(arguments: &Value, kind: IdKind) -> Result<Option<String>, ToolError> {
    let Some(map) = object(arguments) else { return Ok(None) };
    let mut keys = vec![squash_key(kind.key())];
    keys.extend(kind.aliases().iter().map(|a| a.to_string()));
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    match named(&map, &keys) {
        None => Ok(None),
        Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
        Some(value) => kind.normalize(&scalar_text(value, kind)?).map(Some),
    }
}

/// Keys a model uses for a date of birth, squashed.
pub(super) const BIRTH_DATE_KEYS: &[&str] = &["dateofbirth", "dob", "birthdate", "birthday", "born", "date"];

/// Keys a model uses for a confirmation, squashed.
pub(super) const CONFIRM_KEYS: &[&str] = &["confirm", "confirmed", "confirmation", "callerconfirmed"];

/// The text under one of `keys` (a number is taken as its digits).
pub(super) fn text_argument(arguments: &Value, keys: &[&str]) -> Option<String> {
    let map = object(arguments)?;
    match named(&map, keys)? {
        Value::String(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A yes/no flag under one of `keys`: `true`, `"true"`, `"yes"`, `1`; anything
/// else (or nothing) is no, so a refill is never placed on a doubtful value.
pub(super) fn flag_argument(arguments: &Value, keys: &[&str]) -> bool {
    let Some(map) = object(arguments) else { return false };
    match named(&map, keys) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        Some(Value::String(s)) => matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "yes" | "y" | "1" | "confirmed"),
        _ => false,
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
        // As a transcript spells them.
        assert_eq!(id(json!({"member_id": "one zero zero one"}), IdKind::Member), Ok("1001".to_string()));
        assert_eq!(id(json!({"order_id": "O R D zero zero one"}), IdKind::Order), Ok("ORD001".to_string()));
        assert_eq!(id(json!({"rx_id": "R X one oh oh two"}), IdKind::Prescription), Ok("RX1002".to_string()));
    }

    #[test]
    fn optional_ids_dates_and_flags() {
        assert_eq!(optional_id(&json!({}), IdKind::Member), Ok(None));
        assert_eq!(optional_id(&json!({"member_id": ""}), IdKind::Member), Ok(None));
        assert_eq!(optional_id(&json!({"memberId": 1002}), IdKind::Member), Ok(Some("1002".into())));
        assert!(optional_id(&json!({"member_id": "abc"}), IdKind::Member).is_err());
        let verify = json!({"member_id": "1001", "Date of Birth": "March 12, 1984"});
        assert_eq!(text_argument(&verify, BIRTH_DATE_KEYS).as_deref(), Some("March 12, 1984"));
        assert_eq!(text_argument(&json!("{\"dob\": \"1984-03-12\"}"), BIRTH_DATE_KEYS).as_deref(), Some("1984-03-12"));
        assert_eq!(text_argument(&json!({"member_id": "1001"}), BIRTH_DATE_KEYS), None);
        for yes in [json!({"confirm": true}), json!({"confirm": "yes"}), json!({"confirmed": "True"}), json!({"confirm": 1})] {
            assert!(flag_argument(&yes, CONFIRM_KEYS), "{yes}");
        }
        for no in [json!({}), json!({"confirm": false}), json!({"confirm": "maybe"}), json!({"confirm": null}), json!("x")] {
            assert!(!flag_argument(&no, CONFIRM_KEYS), "{no}");
        }
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
