//! Per-key and per-address limits (`[server.limits]`): how fast one API key may start
//! calls, how many calls it may hold at once, and how many connections one client
//! address may keep open.
//!
//! The rate is a GCRA bucket per key from [`governor`] (a well-kept crate with exact
//! "retry after" times; a hand-written token bucket would get the refill edge cases
//! wrong). Concurrency is a plain count per key and per address: a permit is taken at
//! admission and given back when dropped, so a call that ends any way at all (the
//! client leaves, a write times out, the task is aborted) frees its place.
//!
//! A refusal says when to come back: 429 with `Retry-After` from the bucket for the
//! rate, 503 with `Retry-After: server.limits.retry_after_s` for capacity.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::keys::KeyId;

/// `[server.limits]`. Per-key limits apply to callers that present an API key (or a
/// client secret minted with one); with no keys configured there is nobody to count
/// by and only `server.max_calls` and the per-address cap apply.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls one API key may start per minute, sustained; 0 means no rate limit.
    pub call_starts_per_minute: u32,
    /// Calls one key may start at once above that rate (the bucket's size); at
    /// least 1.
    pub call_start_burst: u32,
    /// Calls one API key may hold open at once; 0 means only `server.max_calls`.
    pub calls_per_key: usize,
    /// Connections one client address may hold open at once; 0 means no limit.
    /// Behind a proxy or load balancer every connection comes from its address:
    /// raise this or set 0 there.
    pub connections_per_ip: usize,
    /// `Retry-After` (seconds) sent with refusals for capacity (503): the server or
    /// the key is at its limit of calls, or the server is draining.
    pub retry_after_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { call_starts_per_minute: 120, call_start_burst: 20, calls_per_key: 0, connections_per_ip: 256, retry_after_s: 5 }
    }
}

impl LimitsConfig {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.call_starts_per_minute > 0 && self.call_start_burst == 0 {
            return Err("server.limits.call_start_burst must be at least 1 (or call_starts_per_minute 0 for no rate limit)".into());
        }
        if self.retry_after_s == 0 {
            return Err("server.limits.retry_after_s must be at least 1".into());
        }
        Ok(())
    }
}

/// Why a call start was refused by a per-key limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The key started calls faster than `call_starts_per_minute` allows.
    #[error("this API key is starting calls faster than server.limits.call_starts_per_minute allows; retry in {} s", retry_after.as_secs().max(1))]
    Rate {
        /// When the next start will be allowed.
        retry_after: Duration,
    },
    /// The key holds `calls_per_key` calls already.
    #[error("this API key already holds its limit of {0} calls (server.limits.calls_per_key); retry when one ends")]
    Busy(usize),
}

/// Counts of things held at once, by key; a [`Held`] gives its place back on drop.
struct Counts<K> {
    max: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new(max: usize) -> Self {
        Self { max, held: Mutex::new(HashMap::new()) }
    }

    /// Takes a place for `key` unless it holds `max` already (0: no maximum).
    fn take(self: &Arc<Self>, key: K) -> Option<Held<K>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held { counts: self.clone(), key })
    }

    fn count(&self, key: &K) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

/// One place held in a [`Counts`]; dropping it gives it back.
pub struct Held<K: Hash + Eq + Clone> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Held<K> {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Idle keys and addresses take no memory.
                held.remove(&self.key);
            }
        }
    }
}

/// A call's place in its key's limits, given back when the call ends.
pub type KeyPermit = Held<KeyId>;
/// A connection's place in its address's limit, given back when it closes.
pub type ConnectionPermit = Held<IpAddr>;

type KeyedLimiter<C> = RateLimiter<KeyId, HashMapStateStore<KeyId>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The server's limits, shared by every request.
pub struct Limiter<C: Clock + Clone = DefaultClock> {
    rate: Option<KeyedLimiter<C>>,
    calls: Arc<Counts<KeyId>>,
    connections: Arc<Counts<IpAddr>>,
    clock: C,
}

impl Limiter {
    /// Limits as configured, on the real clock.
    pub fn new(config: &LimitsConfig) -> Self {
        Self::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// Limits on `clock` (tests use governor's fake clock).
    pub fn with_clock(config: &LimitsConfig, clock: C) -> Self {
        let rate = NonZeroU32::new(config.call_starts_per_minute).map(|per_minute| {
            let burst = NonZeroU32::new(config.call_start_burst).unwrap_or(NonZeroU32::MIN);
            let period = Duration::from_secs(60) / per_minute.get();
            let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_minute(per_minute)).allow_burst(burst);
            RateLimiter::hashmap_with_clock(quota, clock.clone())
        });
        Self { rate, calls: Arc::new(Counts::new(config.calls_per_key)), connections: Arc::new(Counts::new(config.connections_per_ip)), clock }
    }

    /// Admits one call start for `key`: a place in its concurrent calls first (a
    /// refusal for capacity spends none of the key's rate), then one start from its
    /// rate.
    pub fn start_call(&self, key: KeyId) -> Result<KeyPermit, LimitError> {
        let permit = self.calls.take(key).ok_or(LimitError::Busy(self.calls.max))?;
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check_key(&key)
        {
            // Rounded up: a client that waits exactly this long is admitted.
            let wait = not_until.wait_time_from(self.clock.now());
            let retry_after = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
            return Err(LimitError::Rate { retry_after });
        }
        if let Some(rate) = &self.rate {
            // Forget keys whose buckets are full again (bounded memory).
            rate.retain_recent();
        }
        Ok(permit)
    }

    /// A place for one more connection from `ip`; `None` when it holds
    /// `connections_per_ip` already.
    pub fn connect(&self, ip: IpAddr) -> Option<ConnectionPermit> {
        self.connections.take(ip)
    }

    /// Calls `key` holds now.
    pub fn calls_held(&self, key: KeyId) -> usize {
        self.calls.count(&key)
    }

    /// Connections `ip` holds now.
    pub fn connections_held(&self, ip: IpAddr) -> usize {
        self.connections.count(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(per_minute: u32, burst: u32, calls: usize, conns: usize) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = LimitsConfig { call_starts_per_minute: per_minute, call_start_burst: burst, calls_per_key: calls, connections_per_ip: conns, retry_after_s: 5 };
        (Limiter::with_clock(&config, clock.clone()), clock)
    }

    #[test]
    fn a_key_starts_its_burst_then_waits_for_the_rate() {
        let (l, clock) = limiter(6, 2, 0, 0);
        let a = KeyId(0);
        let _p1 = l.start_call(a).expect("first");
        let _p2 = l.start_call(a).expect("second, within the burst");
        let Err(LimitError::Rate { retry_after }) = l.start_call(a) else { panic!("the third start is over the rate") };
        // 6 a minute: one every 10 s.
        assert_eq!(retry_after, Duration::from_secs(10));
        // Another key has its own bucket.
        l.start_call(KeyId(1)).expect("another key");
        clock.advance(Duration::from_millis(9_500));
        let Err(LimitError::Rate { retry_after }) = l.start_call(a) else { panic!("still early") };
        assert_eq!(retry_after, Duration::from_secs(1), "rounded up");
        clock.advance(Duration::from_millis(500));
        l.start_call(a).expect("admitted after waiting as told");
    }

    #[test]
    fn concurrent_calls_per_key_are_capped_and_freed_on_drop() {
        let (l, _clock) = limiter(0, 1, 2, 0);
        let a = KeyId(3);
        let p1 = l.start_call(a).expect("first");
        let _p2 = l.start_call(a).expect("second");
        assert!(matches!(l.start_call(a), Err(LimitError::Busy(2))));
        assert_eq!(l.calls_held(a), 2);
        l.start_call(KeyId(4)).expect("another key is not held back");
        drop(p1);
        assert_eq!(l.calls_held(a), 1);
        l.start_call(a).expect("a place came free");
    }

    #[test]
    fn a_refusal_for_capacity_spends_no_rate() {
        let (l, _clock) = limiter(60, 1, 1, 0);
        let a = KeyId(0);
        let held = l.start_call(a).expect("first");
        for _ in 0..5 {
            assert!(matches!(l.start_call(a), Err(LimitError::Busy(1))));
        }
        drop(held);
        // The bucket (burst 1) was spent by the first start only: the refusals for
        // capacity did not spend it, so the next start waits for the rate alone.
        assert!(matches!(l.start_call(a), Err(LimitError::Rate { .. })));
        assert_eq!(l.calls_held(a), 0, "a refused start holds no place");
    }

    #[test]
    fn connections_per_address_are_capped_and_zero_means_no_cap() {
        let (l, _clock) = limiter(0, 1, 0, 2);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "2001:db8::1".parse().expect("ip");
        let c1 = l.connect(ip).expect("first");
        let _c2 = l.connect(ip).expect("second");
        assert!(l.connect(ip).is_none());
        assert!(l.connect(other).is_some());
        drop(c1);
        assert_eq!(l.connections_held(ip), 1);
        assert!(l.connect(ip).is_some());
        let (open, _clock) = limiter(0, 1, 0, 0);
        let held: Vec<_> = (0..1000).map(|_| open.connect(ip).expect("no cap")).collect();
        assert_eq!(open.connections_held(ip), 1000);
        drop(held);
        assert_eq!(open.connections_held(ip), 0, "idle addresses are forgotten");
    }

    #[test]
    fn no_rate_means_starts_are_only_capped_by_concurrency() {
        let (l, _clock) = limiter(0, 1, 0, 0);
        for _ in 0..10_000 {
            drop(l.start_call(KeyId(0)).expect("no limits"));
        }
    }

    #[test]
    fn config_defaults_are_valid_and_a_zero_burst_is_refused() {
        LimitsConfig::default().validate().expect("defaults");
        let bad = LimitsConfig { call_start_burst: 0, ..LimitsConfig::default() };
        assert!(bad.validate().expect_err("zero burst").contains("call_start_burst"));
        let off = LimitsConfig { call_starts_per_minute: 0, call_start_burst: 0, ..LimitsConfig::default() };
        off.validate().expect("no rate needs no burst");
    }
}
