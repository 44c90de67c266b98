//! The call's conversation: items in order, and their rendering for the model.

use parley_llm::{ChatMessage, Role, ToolCall};

/// Who a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemRole {
    /// The caller (typed or spoken).
    User,
    /// The agent.
    Assistant,
}

impl ItemRole {
    /// The Realtime protocol's role name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// What an item holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemContent {
    /// Something said. `text` is `None` while a user audio item awaits its
    /// transcript; `interrupted` marks an agent reply cut to what the caller heard.
    Message { role: ItemRole, text: Option<String>, interrupted: bool },
    /// The agent called a tool.
    FunctionCall(ToolCall),
    /// A tool's result (from the server's own tools or from the client).
    FunctionOutput { call_id: String, output: String },
}

/// One entry of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Stable id the client can refer to.
    pub id: String,
    /// What it holds.
    pub content: ItemContent,
}

impl Item {
    /// A message item.
    pub fn message(id: String, role: ItemRole, text: Option<String>) -> Self {
        Self { id, content: ItemContent::Message { role, text, interrupted: false } }
    }
}

/// Appended after a tool result: the 0.5B model otherwise tends to echo the result's
/// JSON instead of speaking (MODELS.md: 6 of 6 trials without it).
/// (Tried in session 6: a first sentence asking for the next tool when the result
/// does not answer the caller's question. The eval lost 3 of its first 30
/// conversations and gained none: the model read tool descriptions back instead.)
pub const AFTER_TOOL_NUDGE: &str =
    "Now answer the caller in one to three short spoken sentences from the tool result (its \"say\" sentence, when it has one). Do not show JSON.";

/// How an interrupted reply is marked for the model. Models copy it into their next
/// reply; [`crate::reply_text::speakable`] takes it out again.
pub const INTERRUPTED_MARK: &str = "[interrupted by the caller]";

/// The ordered items of one call. Only the call's own task touches it.
#[derive(Debug, Default)]
pub struct Conversation {
    items: Vec<Item>,
}

impl Conversation {
    /// The id of the last item, for `previous_item_id` fields.
    pub fn last_id(&self) -> Option<String> {
        self.items.last().map(|i| i.id.clone())
    }

    /// Appends an item and returns the id of the one before it.
    pub fn push(&mut self, item: Item) -> Option<String> {
        let previous = self.last_id();
        self.items.push(item);
        previous
    }

    /// Sets the text of a message item (a transcript arriving, a reply finishing).
    pub fn set_text(&mut self, id: &str, new_text: String, was_interrupted: bool) -> bool {
        match self.items.iter_mut().find(|i| i.id == id) {
            Some(Item { content: ItemContent::Message { text, interrupted, .. }, .. }) => {
                *text = Some(new_text);
                *interrupted = was_interrupted;
                true
            }
            _ => false,
        }
    }

    /// True when a call with this id is already in the conversation.
    pub fn has_call(&self, call_id: &str) -> bool {
        self.items.iter().any(|i| matches!(&i.content, ItemContent::FunctionCall(c) if c.id == call_id))
    }

    /// True when the call with this id already has its result.
    pub fn has_output(&self, call_id: &str) -> bool {
        self.items.iter().any(|i| matches!(&i.content, ItemContent::FunctionOutput { call_id: c, .. } if c == call_id))
    }

    /// All items, oldest first.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The conversation as the model sees it: system prompt, then every item with
    /// content. Consecutive messages of one role are merged so the chat template
    /// stays well formed; tool calls join the assistant message they follow; an
    /// interrupted reply is marked so the model knows the caller did not hear the
    /// rest; a trailing tool result gets [`AFTER_TOOL_NUDGE`].
    ///
    /// A response's message item is added when the response starts, before the
    /// calls it makes, but what it says comes mostly from their results: its text
    /// is laid out after those calls and results, as it was spoken. (Laid out
    /// before them, a small model learns to say the answer first and call after,
    /// and repeats the earlier answer in the next turn instead of looking it up.)
    pub fn to_messages(&self, instructions: &str) -> Vec<ChatMessage> {
        let mut out = vec![ChatMessage::new(Role::System, instructions)];
        // A reply's text held back until its calls and results are laid out.
        let mut held: Option<String> = None;
        for (i, item) in self.items.iter().enumerate() {
            match &item.content {
                ItemContent::Message { role, text, interrupted } => {
                    if let Some(text) = held.take() {
                        push_text(&mut out, Role::Assistant, text);
                    }
                    let Some(text) = text.as_deref().map(str::trim).filter(|t| !t.is_empty()) else { continue };
                    let text = if *interrupted { format!("{text} {INTERRUPTED_MARK}") } else { text.to_string() };
                    let calls_follow = matches!(self.items.get(i + 1).map(|n| &n.content), Some(ItemContent::FunctionCall(_)));
                    match role {
                        ItemRole::Assistant if calls_follow => held = Some(text),
                        ItemRole::Assistant => push_text(&mut out, Role::Assistant, text),
                        ItemRole::User => push_text(&mut out, Role::User, text),
                    }
                }
                ItemContent::FunctionCall(call) => match out.last_mut() {
                    Some(last) if last.role == Role::Assistant => last.tool_calls.push(call.clone()),
                    _ => out.push(ChatMessage::tool_calls("", vec![call.clone()])),
                },
                ItemContent::FunctionOutput { call_id, output } => out.push(ChatMessage::tool_result(call_id.clone(), output.clone())),
            }
        }
        if let Some(text) = held {
            push_text(&mut out, Role::Assistant, text);
        }
        if out.last().is_some_and(|m| m.role == Role::Tool) {
            out.push(ChatMessage::new(Role::System, AFTER_TOOL_NUDGE));
        }
        out
    }
}

/// Appends a message, merged into the last one when it has the same role and no
/// tool calls (chat templates expect roles to alternate).
fn push_text(out: &mut Vec<ChatMessage>, role: Role, text: String) {
    match out.last_mut() {
        Some(last) if last.role == role && last.tool_calls.is_empty() => {
            last.content.push(' ');
            last.content.push_str(&text);
        }
        _ => out.push(ChatMessage::new(role, text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(id: &str, role: ItemRole, text: Option<&str>) -> Item {
        Item::message(id.into(), role, text.map(Into::into))
    }

    #[test]
    fn renders_system_then_items_and_merges_same_role() {
        let mut c = Conversation::default();
        assert_eq!(c.push(msg("a", ItemRole::User, Some("hello"))), None);
        assert_eq!(c.push(msg("b", ItemRole::User, Some("there"))), Some("a".into()));
        c.push(msg("c", ItemRole::User, None));
        c.push(msg("d", ItemRole::Assistant, Some("hi")));
        let m = c.to_messages("sys");
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], ChatMessage::new(Role::System, "sys"));
        assert_eq!(m[1], ChatMessage::new(Role::User, "hello there"));
        assert_eq!(m[2], ChatMessage::new(Role::Assistant, "hi"));
    }

    #[test]
    fn interrupted_reply_is_marked() {
        let mut c = Conversation::default();
        c.push(msg("a", ItemRole::Assistant, None));
        assert!(c.set_text("a", "The order is".into(), true));
        assert!(!c.set_text("zz", "x".into(), false));
        let m = c.to_messages("s");
        assert!(m[1].content.ends_with("[interrupted by the caller]"));
    }

    #[test]
    fn tool_calls_and_results_render_in_order_with_the_nudge_last() {
        let mut c = Conversation::default();
        c.push(msg("u", ItemRole::User, Some("where is my order")));
        c.push(msg("a", ItemRole::Assistant, Some("")));
        let call = ToolCall { id: "call_1".into(), name: "list_orders".into(), arguments: json!({"member_id": "1001"}) };
        c.push(Item { id: "f".into(), content: ItemContent::FunctionCall(call.clone()) });
        assert!(c.has_call("call_1") && !c.has_output("call_1"));
        c.push(Item { id: "o".into(), content: ItemContent::FunctionOutput { call_id: "call_1".into(), output: "{}".into() } });
        assert!(c.has_output("call_1"));
        let m = c.to_messages("s");
        assert_eq!(m[2], ChatMessage::tool_calls("", vec![call]));
        assert_eq!(m[3], ChatMessage::tool_result("call_1", "{}"));
        assert_eq!(m[4], ChatMessage::new(Role::System, AFTER_TOOL_NUDGE));
        c.push(msg("a2", ItemRole::Assistant, Some("It is processing.")));
        assert_eq!(c.to_messages("s").last().map(|m| m.role), Some(Role::Assistant));
    }

    #[test]
    fn a_replys_text_comes_after_its_calls_and_results() {
        let mut c = Conversation::default();
        c.push(msg("u", ItemRole::User, Some("my member ID is 1001, what about my order")));
        // The response's item is added first; its call and result follow; the text
        // (spoken from the result) is filled in last.
        c.push(msg("a", ItemRole::Assistant, None));
        let call = ToolCall { id: "call_1".into(), name: "verify_member".into(), arguments: json!({"member_id": "1001"}) };
        c.push(Item { id: "f".into(), content: ItemContent::FunctionCall(call.clone()) });
        c.push(Item { id: "o".into(), content: ItemContent::FunctionOutput { call_id: "call_1".into(), output: "{}".into() } });
        assert!(c.set_text("a", "You're verified.".into(), false));
        c.push(msg("u2", ItemRole::User, Some("and my order?")));
        let m = c.to_messages("s");
        assert_eq!(m[2], ChatMessage::tool_calls("", vec![call]));
        assert_eq!(m[3], ChatMessage::tool_result("call_1", "{}"));
        assert_eq!(m[4], ChatMessage::new(Role::Assistant, "You're verified."));
        assert_eq!(m[5], ChatMessage::new(Role::User, "and my order?"));
        assert_eq!(m.len(), 6);
    }
}
