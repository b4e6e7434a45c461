//! Several authd behind one proxy (SPEC §6 "Several authd"): which one a
//! validation goes to, and which ones are taken out.
//!
//! Token validations go to the authd a rendezvous hash of the token's id
//! picks among the healthy ones, so one token is always verified by the same
//! authd while it is up: that authd's verified cache holds it, and after a
//! revocation it answers REVOKED from one row read instead of a fresh Argon2
//! verify on an authd that never saw the token (tens of ms: the difference
//! between a revocation in 2 ms and in 30). Tokens spread evenly over the
//! authd, and a proxy asks authd only on misses, so the load spreads too.
//! Agent validations (one row read) go to the least in flight, ties broken
//! round robin (an idle proxy alternates). An authd is preferred while its invalidation feed stream is open and it has
//! not failed a call within [`TAKEN_OUT_FOR`]; a failing one is taken out for
//! that long and then probed back by the next call that ranks it first (its
//! feed reconnecting with backoff is the other probe). When every authd is
//! out, the best of the rest is still tried: failing closed is authd's
//! answer to give, not a guess of ours.
//!
//! Not here: the calls themselves ([`super::validate`]) and the feeds
//! ([`super::feed`]); this is bookkeeping only, all atomics, read and written
//! on the bridge thread.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an authd that failed a call is skipped before it is tried again.
pub(super) const TAKEN_OUT_FOR: Duration = Duration::from_millis(500);

/// One listed authd's health, shared by its feed task and the validations.
#[derive(Debug)]
pub(super) struct Health {
    /// Its position in `IBEX_AUTHD_GRPC` (for logs and metrics).
    pub index: usize,
    feed_up: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds since the bridge started until which it is taken out.
    out_until_ms: AtomicU64,
}

impl Health {
    pub(super) fn feed_up(&self) -> bool {
        self.feed_up.load(Ordering::Relaxed)
    }

    pub(super) fn set_feed_up(&self, up: bool) {
        self.feed_up.store(up, Ordering::Relaxed);
    }
}

/// Every listed authd's [`Health`], in the listed order.
#[derive(Debug, Clone)]
pub(super) struct Balancer {
    backends: Arc<[Arc<Health>]>,
    started: Instant,
    next: Arc<AtomicUsize>,
}

/// A call in flight on one authd; dropping it ends the call's count.
pub(super) struct InFlight {
    health: Arc<Health>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub(super) fn new(count: usize) -> Self {
        let backends = (0..count.max(1))
            .map(|index| {
                Arc::new(Health {
                    index,
                    feed_up: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    out_until_ms: AtomicU64::new(0),
                })
            })
            .collect();
        Self {
            backends,
            started: Instant::now(),
            next: Arc::default(),
        }
    }

    pub(super) fn health(&self, index: usize) -> Arc<Health> {
        self.backends[index.min(self.backends.len() - 1)].clone()
    }

    /// How many feed streams are open.
    pub(super) fn feeds_up(&self) -> u64 {
        self.backends.iter().filter(|h| h.feed_up()).count() as u64
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The authd the next call goes to, skipping `tried` (a bit per index;
    /// listed beyond 64 are never skipped). `None` once every one was tried.
    /// With `affinity` (a hash of what is validated) the healthy authd with
    /// the highest rendezvous score for it; without, the least in flight.
    pub(super) fn pick(&self, tried: u64, affinity: Option<u64>) -> Option<(usize, InFlight)> {
        let now = self.now_ms();
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let rank = |h: &Health| {
            let load = match affinity {
                Some(key) => u64::MAX - rendezvous(key, h.index),
                None => h.in_flight.load(Ordering::Relaxed) as u64,
            };
            (
                h.out_until_ms.load(Ordering::Relaxed) > now,
                !h.feed_up(),
                load,
            )
        };
        let best = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| i >= 64 || tried & (1 << i) == 0)
            .min_by_key(|&i| rank(&self.backends[i]))?;
        let health = self.backends[best].clone();
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((best, InFlight { health }))
    }

    /// `index` failed a call: take it out for [`TAKEN_OUT_FOR`].
    pub(super) fn failed(&self, index: usize) {
        let until = self.now_ms() + u64::try_from(TAKEN_OUT_FOR.as_millis()).unwrap_or(0);
        let health = self.health(index);
        let was_in = health.out_until_ms.swap(until, Ordering::Relaxed) <= self.now_ms();
        if was_in {
            tracing::warn!(
                authd = index,
                "authd failed a validation; taken out, probed again in {} ms",
                TAKEN_OUT_FOR.as_millis()
            );
        }
    }

    /// `index` answered: it is back in at once.
    pub(super) fn answered(&self, index: usize) {
        self.health(index).out_until_ms.store(0, Ordering::Relaxed);
    }
}

/// Rendezvous (highest random weight) score of authd `index` for `key`: a
/// splitmix64 finaliser of the two, so each key ranks the authd in its own
/// stable order and losing one moves only the keys it was first for.
fn rendezvous(key: u64, index: usize) -> u64 {
    let mut z = key
        ^ (index as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The affinity key of a presented token: a hash of its public id (the part
/// of `ibex_pat_<id>_<secret>` before the secret), or of the whole string
/// when it has no such shape. Never logged.
pub(super) fn token_key(token: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let id = token
        .strip_prefix("ibex_pat_")
        .and_then(|rest| rest.get(..36))
        .unwrap_or(token);
    // Stable within the process, which is all affinity needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(b: &Balancer) {
        for i in 0..b.backends.len() {
            b.health(i).set_feed_up(true);
        }
    }

    #[test]
    fn idle_calls_alternate_and_busy_ones_spread() {
        let b = Balancer::new(2);
        up(&b);
        let (first, one) = b.pick(0, None).unwrap();
        // `first` has a call in flight: the next goes to the other one.
        let (second, two) = b.pick(0, None).unwrap();
        assert_ne!(first, second);
        drop((one, two));
        let picks: Vec<usize> = (0..4).map(|_| b.pick(0, None).unwrap().0).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn a_failed_or_feedless_authd_is_avoided_but_still_tried_last() {
        let b = Balancer::new(2);
        up(&b);
        b.failed(0);
        for _ in 0..4 {
            assert_eq!(b.pick(0, None).unwrap().0, 1);
        }
        // Skipping the one already tried leaves only the taken-out one.
        assert_eq!(b.pick(1 << 1, None).unwrap().0, 0);
        assert!(b.pick(0b11, None).is_none());
        b.answered(0);
        b.health(1).set_feed_up(false);
        for _ in 0..4 {
            assert_eq!(b.pick(0, None).unwrap().0, 0);
        }
    }

    #[test]
    fn a_token_sticks_to_one_authd_while_it_is_healthy() {
        let b = Balancer::new(3);
        up(&b);
        let keys: Vec<u64> = (0..300)
            .map(|i| token_key(&format!("ibex_pat_{:036}_secret{i}", i)))
            .collect();
        let first: Vec<usize> = keys
            .iter()
            .map(|&k| b.pick(0, Some(k)).unwrap().0)
            .collect();
        // Stable, whatever is in flight, and spread over all three.
        let (_, _busy) = b.pick(0, Some(keys[0])).unwrap();
        for (k, f) in keys.iter().zip(&first) {
            assert_eq!(b.pick(0, Some(*k)).unwrap().0, *f);
        }
        for i in 0..3 {
            let share = first.iter().filter(|&&f| f == i).count();
            assert!((60..=140).contains(&share), "authd {i}: {share} of 300");
        }
        // Authd 1 taken out: only its tokens move.
        b.failed(1);
        for (k, f) in keys.iter().zip(&first) {
            let now = b.pick(0, Some(*k)).unwrap().0;
            if *f == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, *f);
            }
        }
        // The secret is not part of the key.
        assert_eq!(
            token_key(&format!("ibex_pat_{:036}_aaaa", 7)),
            token_key(&format!("ibex_pat_{:036}_bbbb", 7))
        );
    }

    #[test]
    fn in_flight_is_released_on_drop() {
        let b = Balancer::new(1);
        let (_, call) = b.pick(0, None).unwrap();
        assert_eq!(b.health(0).in_flight.load(Ordering::Relaxed), 1);
        drop(call);
        assert_eq!(b.health(0).in_flight.load(Ordering::Relaxed), 0);
    }
}
