//! One memory budget for the KV caches of all the sessions of an engine.
//!
//! Each call keeps its conversation's KV cache between turns, so a turn only prefills
//! the tokens that are new since the last one. With many calls those caches would
//! grow without bound (about 24 KB per token for the 0.5B model, up to 100 MB per call
//! at 4096 tokens), so they live in a [`KvBudget`]: a byte limit shared by every
//! session of one engine, enforced by dropping the least recently used *idle* caches.
//!
//! A session checks its cache out for a generation ([`KvBudget::checkout`]), which
//! makes it busy: a busy cache is not in the budget's hands and is never evicted, it
//! is only counted. After the generation the session checks it back in
//! ([`KvBudget::checkin`]) with its new size and the budget evicts idle caches, oldest
//! use first, until it is under its limit again. A session whose cache was evicted
//! gets nothing at its next checkout and simply prefills its whole prompt again.
//!
//! When only busy caches are left, the budget can be over its limit for as long as
//! they generate: stopping a generation to save memory would fail a call instead.
//!
//! Shared prefixes (the engine's system-prompt caches) count against the same limit
//! ([`KvBudget::set_prefix_bytes`]) but are not evicted by it: their owner keeps them
//! within their own, smaller bound, [`KvBudget::prefix_limit`].
//!
//! The budget only does the accounting; it is generic over what it holds so that the
//! accounting is tested without a model.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Identifies a session within one budget.
pub type SessionId = u64;

/// Shared prefixes may use at most this fraction (1/N) of the budget.
const PREFIX_SHARE: usize = 8;

/// What a budget holds now, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCacheStats {
    /// The limit, in bytes.
    pub budget_bytes: usize,
    /// Bytes held by the sessions' caches (idle and busy) and the shared prefixes.
    pub bytes_in_use: usize,
    /// Of those, the shared prefixes' (system-prompt caches).
    pub prefix_bytes: usize,
    /// Sessions holding a cache, idle or generating.
    pub sessions_cached: usize,
    /// Of those, the ones generating now, which are never evicted.
    pub sessions_busy: usize,
    /// Idle caches dropped to stay under the limit, since the engine started.
    pub evictions: u64,
}

/// Idle KV caches of many sessions under one byte limit, evicted least recently used
/// first. `T` is a session's cache; the budget never looks inside it, the caller
/// tells it the size.
pub struct KvBudget<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    limit: usize,
    /// Increases on every checkout and checkin: the order of last use.
    clock: u64,
    next_id: SessionId,
    entries: HashMap<SessionId, Entry<T>>,
    session_bytes: usize,
    prefix_bytes: usize,
    evictions: u64,
}

/// A session that holds a cache.
struct Entry<T> {
    bytes: usize,
    last_used: u64,
    /// The cache while idle; `None` while its session has it checked out.
    idle: Option<T>,
}

impl<T> KvBudget<T> {
    /// An empty budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                limit,
                clock: 0,
                next_id: 0,
                entries: HashMap::new(),
                session_bytes: 0,
                prefix_bytes: 0,
                evictions: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every update leaves the state consistent, so a panicked holder is harmless.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh id for a new session.
    pub fn register(&self) -> SessionId {
        let mut state = self.lock();
        state.next_id += 1;
        state.next_id
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// How many bytes the shared prefixes may take: an eighth of the limit, so they
    /// never crowd out the calls' own caches.
    pub fn prefix_limit(&self) -> usize {
        self.limit() / PREFIX_SHARE
    }

    /// Marks session `id` busy for a generation and hands over its cache: `None` for a
    /// session with no cache yet, or whose cache was evicted. Until the matching
    /// [`KvBudget::checkin`] the session is never evicted; its last known size stays
    /// counted.
    pub fn checkout(&self, id: SessionId) -> Option<T> {
        let mut state = self.lock();
        let now = state.tick();
        let entry = state.entries.entry(id).or_insert(Entry {
            bytes: 0,
            last_used: now,
            idle: None,
        });
        entry.last_used = now;
        entry.idle.take()
    }

    /// Records that busy session `id`'s cache now takes `bytes` (it grew during the
    /// prefill), and evicts idle caches to make room.
    pub fn resize(&self, id: SessionId, bytes: usize) {
        let victims = {
            let mut state = self.lock();
            state.set_bytes(id, bytes);
            state.evict()
        };
        drop(victims);
    }

    /// Hands session `id`'s cache back after a generation, at `bytes`, and evicts idle
    /// caches, least recently used first, until the budget is under its limit (this
    /// one too, last, if it alone is larger than the limit). An empty cache
    /// (`bytes == 0`) is not kept.
    pub fn checkin(&self, id: SessionId, cache: T, bytes: usize) {
        let victims = {
            let mut state = self.lock();
            if bytes == 0 {
                state.remove(id);
                Vec::new()
            } else {
                let now = state.tick();
                state.set_bytes(id, bytes);
                if let Some(entry) = state.entries.get_mut(&id) {
                    entry.last_used = now;
                    entry.idle = Some(cache);
                }
                state.evict()
            }
        };
        // Free the memory outside the lock.
        drop(victims);
    }

    /// Forgets session `id` (it ended, or was reset) and frees its cache.
    pub fn remove(&self, id: SessionId) {
        let cache = self.lock().remove(id);
        drop(cache);
    }

    /// Tells the budget how many bytes the shared prefixes take now, and evicts idle
    /// caches if that pushed it over its limit.
    pub fn set_prefix_bytes(&self, bytes: usize) {
        let victims = {
            let mut state = self.lock();
            state.prefix_bytes = bytes;
            state.evict()
        };
        drop(victims);
    }

    /// Runs `f` on session `id`'s cache if it is idle in the budget.
    pub fn peek<R>(&self, id: SessionId, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.lock()
            .entries
            .get(&id)
            .and_then(|e| e.idle.as_ref())
            .map(f)
    }

    /// What the budget holds now.
    pub fn stats(&self) -> KvCacheStats {
        let state = self.lock();
        KvCacheStats {
            budget_bytes: state.limit,
            bytes_in_use: state.session_bytes + state.prefix_bytes,
            prefix_bytes: state.prefix_bytes,
            sessions_cached: state.entries.values().filter(|e| e.bytes > 0).count(),
            sessions_busy: state.entries.values().filter(|e| e.idle.is_none()).count(),
            evictions: state.evictions,
        }
    }
}

impl<T> State<T> {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Sets a known session's size (a checked-out one always has an entry).
    fn set_bytes(&mut self, id: SessionId, bytes: usize) {
        let now = self.clock;
        let entry = self.entries.entry(id).or_insert(Entry {
            bytes: 0,
            last_used: now,
            idle: None,
        });
        self.session_bytes = self.session_bytes - entry.bytes + bytes;
        entry.bytes = bytes;
    }

    fn remove(&mut self, id: SessionId) -> Option<T> {
        let entry = self.entries.remove(&id)?;
        self.session_bytes -= entry.bytes;
        entry.idle
    }

    /// Drops idle caches, least recently used first, until under the limit or none is
    /// left; returns them so the caller frees them outside the lock.
    fn evict(&mut self) -> Vec<T> {
        let mut victims = Vec::new();
        while self.session_bytes + self.prefix_bytes > self.limit {
            let Some(id) = self
                .entries
                .iter()
                .filter(|(_, e)| e.idle.is_some())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| *id)
            else {
                tracing::debug!(
                    bytes = self.session_bytes + self.prefix_bytes,
                    limit = self.limit,
                    "KV caches over budget, but every cached session is generating"
                );
                break;
            };
            let bytes = self.entries.get(&id).map_or(0, |e| e.bytes);
            if let Some(cache) = self.remove(id) {
                victims.push(cache);
            }
            self.evictions += 1;
            tracing::debug!(
                session = id,
                bytes,
                in_use = self.session_bytes + self.prefix_bytes,
                limit = self.limit,
                "evicted an idle session's KV cache"
            );
        }
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one generation of `id` whose cache ends at `bytes`; the cache is a label.
    fn turn(budget: &KvBudget<&'static str>, id: SessionId, label: &'static str, bytes: usize) {
        let _ = budget.checkout(id);
        budget.checkin(id, label, bytes);
    }

    #[test]
    fn least_recently_used_idle_cache_goes_first() {
        let budget = KvBudget::new(100);
        let (a, b, c, d) = (
            budget.register(),
            budget.register(),
            budget.register(),
            budget.register(),
        );
        turn(&budget, a, "a", 40);
        turn(&budget, b, "b", 40);
        turn(&budget, a, "a2", 40); // a is now more recent than b
        assert_eq!(budget.stats().evictions, 0);
        turn(&budget, c, "c", 40); // 120 > 100: b goes
        assert_eq!(budget.peek(b, |s| *s), None);
        assert_eq!(budget.peek(a, |s| *s), Some("a2"));
        assert_eq!(budget.peek(c, |s| *s), Some("c"));
        turn(&budget, d, "d", 40); // a is the oldest now
        assert_eq!(budget.peek(a, |s| *s), None);
        let stats = budget.stats();
        assert_eq!(
            stats,
            KvCacheStats {
                budget_bytes: 100,
                bytes_in_use: 80,
                prefix_bytes: 0,
                sessions_cached: 2,
                sessions_busy: 0,
                evictions: 2,
            }
        );
    }

    #[test]
    fn a_busy_session_is_never_evicted() {
        let budget = KvBudget::new(100);
        let (a, b, c) = (budget.register(), budget.register(), budget.register());
        turn(&budget, a, "a", 40);
        turn(&budget, b, "b", 40);
        // a is the least recently used, but generating.
        assert_eq!(budget.checkout(a), Some("a"));
        turn(&budget, c, "c", 40);
        assert_eq!(budget.peek(b, |s| *s), None, "b was the oldest idle one");
        assert_eq!(budget.stats().sessions_busy, 1);
        // a grows during its prefill: c makes room.
        budget.resize(a, 90);
        assert_eq!(budget.peek(c, |s| *s), None);
        // Only busy caches left: over the limit, nothing to evict, nothing breaks.
        budget.resize(a, 150);
        let stats = budget.stats();
        assert_eq!((stats.bytes_in_use, stats.sessions_cached, stats.evictions), (150, 1, 2));
        // Checked in while larger than the whole budget: it is the one evicted.
        budget.checkin(a, "a2", 150);
        assert_eq!(budget.peek(a, |s| *s), None);
        assert_eq!(budget.stats().bytes_in_use, 0);
    }

    #[test]
    fn an_evicted_session_starts_over_and_is_cached_again() {
        let budget = KvBudget::new(50);
        let (a, b) = (budget.register(), budget.register());
        turn(&budget, a, "a", 40);
        turn(&budget, b, "b", 40);
        assert_eq!(budget.checkout(a), None, "a was evicted");
        budget.checkin(a, "a rebuilt", 40);
        assert_eq!(budget.checkout(a), Some("a rebuilt"));
        budget.checkin(a, "a again", 45);
        let stats = budget.stats();
        assert_eq!((stats.bytes_in_use, stats.sessions_cached, stats.evictions), (45, 1, 2));
    }

    #[test]
    fn prefixes_count_against_the_limit_and_empty_or_removed_caches_free_bytes() {
        let budget = KvBudget::new(100);
        assert_eq!(budget.prefix_limit(), 12);
        let (a, b) = (budget.register(), budget.register());
        turn(&budget, a, "a", 45);
        turn(&budget, b, "b", 45);
        budget.set_prefix_bytes(12);
        assert_eq!(budget.peek(a, |s| *s), None, "the prefix pushed the oldest out");
        assert_eq!(budget.stats().bytes_in_use, 57);
        // A generation that ends with an empty cache keeps nothing.
        turn(&budget, b, "b cleared", 0);
        assert_eq!(budget.peek(b, |s| *s), None);
        turn(&budget, a, "a", 30);
        budget.remove(a);
        let stats = budget.stats();
        assert_eq!((stats.bytes_in_use, stats.sessions_cached, stats.evictions), (12, 0, 1));
    }
}
