//! Per-token-id failure throttle for cold validations.
//!
//! Each id has a small bucket of failed attempts ([`BURST`]) refilled at one per [`REFILL`].
//! A cold validation of an id whose bucket is empty is refused before any database or Argon2 work
//! (gRPC `RESOURCE_EXHAUSTED`: undecided, try later — never "invalid"). The real token is never
//! locked out: a cached digest is answered before this check, a refill arrives every second, and
//! a success empties the id's record. Unknown ids are throttled exactly like known ones, so the
//! throttle says nothing about which ids exist.
//!
//! Memory is bounded at [`MAX_TRACKED`] ids; when full, fully refilled records are dropped, and
//! if none are, new ids go untracked (the Argon2 pool's admission limit still bounds the cost).
//! Time is passed in, so tests control the clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

pub const BURST: u32 = 5;
pub const REFILL: Duration = Duration::from_secs(1);
pub const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: u32,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> Bucket {
        let elapsed = now.saturating_duration_since(self.at);
        let gained = (elapsed.as_millis() / REFILL.as_millis().max(1)) as u64;
        if gained == 0 {
            return self;
        }
        let tokens = (u64::from(self.tokens) + gained).min(u64::from(BURST)) as u32;
        // Keep the fractional progress towards the next refill.
        let used = REFILL.saturating_mul(u32::try_from(gained).unwrap_or(u32::MAX));
        Bucket {
            tokens,
            at: if tokens == BURST { now } else { self.at + used },
        }
    }
}

#[derive(Default)]
pub struct FailureThrottle {
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl FailureThrottle {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a cold validation of `id` run now?
    pub fn allows(&self, id: Uuid, now: Instant) -> bool {
        self.lock()
            .get(&id)
            .is_none_or(|b| b.refilled(now).tokens > 0)
    }

    /// A cold validation of `id` failed (unknown id or wrong secret).
    pub fn record_failure(&self, id: Uuid, now: Instant) {
        let mut buckets = self.lock();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&id) {
            buckets.retain(|_, b| b.refilled(now).tokens < BURST);
            if buckets.len() >= MAX_TRACKED {
                return;
            }
        }
        let bucket = buckets.entry(id).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let mut refilled = bucket.refilled(now);
        if refilled.tokens == BURST {
            refilled.at = now;
        }
        refilled.tokens = refilled.tokens.saturating_sub(1);
        *bucket = refilled;
    }

    /// The secret verified: forget the failures.
    pub fn record_success(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_attempt_per_refill() {
        let throttle = FailureThrottle::new();
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert!(throttle.allows(id, t0));
            throttle.record_failure(id, t0);
        }
        assert!(!throttle.allows(id, t0));
        assert!(!throttle.allows(id, t0 + REFILL / 2));
        assert!(throttle.allows(id, t0 + REFILL));
        throttle.record_failure(id, t0 + REFILL);
        assert!(!throttle.allows(id, t0 + REFILL + REFILL / 2));
        assert!(throttle.allows(id, t0 + REFILL * 2));
        // Other ids are unaffected.
        assert!(throttle.allows(Uuid::new_v4(), t0));
    }

    #[test]
    fn success_resets_and_full_buckets_are_reclaimed() {
        let throttle = FailureThrottle::new();
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        for _ in 0..BURST {
            throttle.record_failure(id, t0);
        }
        throttle.record_success(id);
        assert!(throttle.allows(id, t0));
        assert_eq!(throttle.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let throttle = FailureThrottle::new();
        let t0 = Instant::now();
        for _ in 0..MAX_TRACKED + 10 {
            throttle.record_failure(Uuid::new_v4(), t0);
        }
        assert!(throttle.tracked() <= MAX_TRACKED);
        // Once the old records have refilled, they make room.
        let later = t0 + REFILL * (BURST + 1);
        let fresh = Uuid::new_v4();
        throttle.record_failure(fresh, later);
        assert!(throttle.tracked() <= MAX_TRACKED);
        assert_eq!(throttle.tracked(), 1);
    }
}
