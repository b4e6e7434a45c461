//! Brute-force and flood guard: authentication failures counted per client
//! address on this worker. Past [`FAILURE_LIMIT`] failures in a window the
//! address is refused with 429 RATE_LIMITED before any authd call, until the
//! window ends — except for credentials already cached as valid (the chain
//! checks the cache first).
//!
//! IPv6 clients are counted per /64: one host usually owns a whole /64, so
//! rotating addresses inside it must not reset the count.
//! Bounded: at most `cap` addresses per worker; a flood from more addresses
//! than that evicts the windows closest to ending.

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::bounded::{BoundedMap, Expiring};
use crate::addr::bucket;

pub const FAILURE_LIMIT: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);

struct Window {
    ends: Instant,
    failures: u32,
}

impl Expiring for Window {
    fn deadline(&self) -> Instant {
        self.ends
    }
}

pub struct FailureGuard {
    windows: BoundedMap<IpAddr, Window, RandomState>,
}

impl FailureGuard {
    pub fn new(cap: usize) -> Self {
        Self {
            windows: BoundedMap::new(cap),
        }
    }

    /// True when `ip` used up its failures in the current window.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        match self.windows.get(&bucket(ip)) {
            Some(w) => now < w.ends && w.failures >= FAILURE_LIMIT,
            None => false,
        }
    }

    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        let key = bucket(ip);
        let failures = match self.windows.get(&key) {
            Some(w) if now < w.ends => {
                let failures = w.failures.saturating_add(1);
                let ends = w.ends;
                self.windows.insert(key, Window { ends, failures });
                return;
            }
            _ => 1,
        };
        self.windows.insert(
            key,
            Window {
                ends: now + WINDOW,
                failures,
            },
        );
    }

    pub fn tracked(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_past_the_limit_until_the_window_ends() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(1000);
        let a = ip("10.0.0.1");
        for i in 0..FAILURE_LIMIT {
            assert!(!g.is_blocked(a, t0), "blocked after {i}");
            g.record_failure(a, t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(g.is_blocked(a, t0 + Duration::from_secs(1)));
        // Another address is unaffected.
        assert!(!g.is_blocked(ip("10.0.0.2"), t0));
        // The window is fixed from the first failure.
        assert!(g.is_blocked(a, t0 + WINDOW - Duration::from_millis(1)));
        assert!(!g.is_blocked(a, t0 + WINDOW));
        // A failure after the window starts a new count.
        g.record_failure(a, t0 + WINDOW);
        assert!(!g.is_blocked(a, t0 + WINDOW));
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(1000);
        for i in 0..FAILURE_LIMIT {
            g.record_failure(ip(&format!("2001:db8:1:2::{:x}", i + 1)), t0);
        }
        assert!(g.is_blocked(ip("2001:db8:1:2::ffff"), t0));
        assert!(!g.is_blocked(ip("2001:db8:1:3::1"), t0));
        // v4-mapped counts as the v4 address.
        for _ in 0..FAILURE_LIMIT {
            g.record_failure(ip("::ffff:10.1.1.1"), t0);
        }
        assert!(g.is_blocked(ip("10.1.1.1"), t0));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(64);
        for i in 0..10_000u32 {
            g.record_failure(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(g.tracked() <= 64);
    }
}
