//! Identifiers for items, responses and events, in the OpenAI Realtime style.

/// A new identifier such as `item_3f2a…`: a prefix plus 20 hex digits.
pub fn new_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &u[..20])
}
