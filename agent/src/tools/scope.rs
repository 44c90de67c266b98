//! Memory that lasts for one call and that the call's tools share: the pharmacy desk
//! keeps who the caller proved to be there. Tools are shared by every call, so state
//! that belongs to one caller cannot live in the tool; it lives here, one per call.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// One call's tool memory: a value of each type a tool keeps, created on first use,
/// and the number of the response in progress (so a tool can tell "this turn" from
/// "an earlier turn", as a refill's confirmation must). Cloning shares it.
#[derive(Clone, Default)]
pub struct CallScope {
    values: Arc<Mutex<HashMap<TypeId, Box<dyn Any + Send>>>>,
    response: Arc<AtomicU64>,
    /// How the caller's last turn answered a yes/no question: 0 not an answer,
    /// 1 a plain yes, 2 a no.
    answer: Arc<AtomicU8>,
}

impl std::fmt::Debug for CallScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallScope").field("response", &self.response()).finish_non_exhaustive()
    }
}

impl CallScope {
    /// Runs `f` on this call's `T` (its default if no tool made one yet). Keep `f`
    /// short: it holds the call's lock.
    pub fn with<T: Default + Send + 'static, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = values.entry(TypeId::of::<T>()).or_insert_with(|| Box::new(T::default()));
        // The key is T's own TypeId, so the value is a T; were it not, a fresh one
        // serves rather than a panic.
        match entry.as_mut().downcast_mut::<T>() {
            Some(value) => f(value),
            None => f(&mut T::default()),
        }
    }

    /// Called by the call when a new response starts: what the caller said since
    /// the last one is a new turn.
    pub fn next_response(&self) -> u64 {
        self.response.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number of the response in progress (0 before the first).
    pub fn response(&self) -> u64 {
        self.response.load(Ordering::SeqCst)
    }

    /// Called by the call as a response starts: how the caller's turn before it
    /// answered a yes/no question ([`crate::turn_rules::confirmation_answer`]), so a
    /// tool can act on an offer only when the caller plainly said yes to it.
    pub fn set_caller_answer(&self, answer: Option<bool>) {
        let code = match answer {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.answer.store(code, Ordering::SeqCst);
    }

    /// True when the caller's turn before this response was a plain yes.
    pub fn caller_said_yes(&self) -> bool {
        self.answer.load(Ordering::SeqCst) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter(u32);

    #[test]
    fn values_live_per_scope_and_are_shared_by_clones() {
        let scope = CallScope::default();
        let clone = scope.clone();
        scope.with(|c: &mut Counter| c.0 += 1);
        assert_eq!(clone.with(|c: &mut Counter| c.0), 1);
        let other = CallScope::default();
        assert_eq!(other.with(|c: &mut Counter| c.0), 0);
        assert_eq!(scope.response(), 0);
        assert_eq!(clone.next_response(), 1);
        assert_eq!(scope.response(), 1);
    }
}
