//! The call's conversation: items in order, and their rendering for the model.

use parley_llm::{ChatMessage, Role};

/// Who an item belongs to.
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

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Stable id the client can refer to.
    pub id: String,
    /// Who said it.
    pub role: ItemRole,
    /// The text; `None` while a user audio item awaits its transcript.
    pub text: Option<String>,
    /// The assistant was cut off: `text` holds only what the caller heard.
    pub interrupted: bool,
}

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

    /// Sets the text of an item (a transcript arriving, a reply finishing).
    pub fn set_text(&mut self, id: &str, text: String, interrupted: bool) -> bool {
        match self.items.iter_mut().find(|i| i.id == id) {
            Some(item) => {
                item.text = Some(text);
                item.interrupted = interrupted;
                true
            }
            None => false,
        }
    }

    /// All items, oldest first.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The conversation as the model sees it: system prompt, then every item with
    /// text. Consecutive messages of one role are merged so the chat template stays
    /// well formed; an interrupted reply is marked so the model knows the caller did
    /// not hear the rest.
    pub fn to_messages(&self, instructions: &str) -> Vec<ChatMessage> {
        let mut out = vec![ChatMessage::new(Role::System, instructions)];
        for item in &self.items {
            let Some(text) = item.text.as_deref() else { continue };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let role = match item.role {
                ItemRole::User => Role::User,
                ItemRole::Assistant => Role::Assistant,
            };
            let text = if item.interrupted { format!("{text} [interrupted by the caller]") } else { text.to_string() };
            match out.last_mut() {
                Some(last) if last.role == role => {
                    last.content.push(' ');
                    last.content.push_str(&text);
                }
                _ => out.push(ChatMessage::new(role, text)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, role: ItemRole, text: Option<&str>) -> Item {
        Item { id: id.into(), role, text: text.map(Into::into), interrupted: false }
    }

    #[test]
    fn renders_system_then_items_and_merges_same_role() {
        let mut c = Conversation::default();
        assert_eq!(c.push(item("a", ItemRole::User, Some("hello"))), None);
        assert_eq!(c.push(item("b", ItemRole::User, Some("there"))), Some("a".into()));
        c.push(item("c", ItemRole::User, None));
        c.push(item("d", ItemRole::Assistant, Some("hi")));
        let m = c.to_messages("sys");
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], ChatMessage::new(Role::System, "sys"));
        assert_eq!(m[1], ChatMessage::new(Role::User, "hello there"));
        assert_eq!(m[2], ChatMessage::new(Role::Assistant, "hi"));
    }

    #[test]
    fn interrupted_reply_is_marked() {
        let mut c = Conversation::default();
        c.push(item("a", ItemRole::Assistant, None));
        assert!(c.set_text("a", "The order is".into(), true));
        assert!(!c.set_text("zz", "x".into(), false));
        let m = c.to_messages("s");
        assert!(m[1].content.ends_with("[interrupted by the caller]"));
    }
}
