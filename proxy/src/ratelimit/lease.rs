//! Budget leases: the arithmetic that lets a worker admit most of a busy
//! org's requests without a Redis round trip, and never lets the fleet admit
//! more than the limit in a window.
//!
//! A worker asks Redis for `n` units at once (`INCRBY key n` in the counter
//! script). Redis' count after the call is `count`; the units this call may
//! use are [`grant`] = `clamp(limit - (count - n), 0, n)`: whatever lies
//! beyond the limit is never granted, so the sum of every worker's grants in
//! a window is at most the limit. Units granted but never used (the window
//! ends, the entry is evicted) are lost: conservative.
//!
//! The lease size follows this worker's observed rate for the org, measured
//! over epochs of [`EPOCH_MS`] (shorter for a burst of [`EARLY_CHECKS`];
//! never within one millisecond): 1 below [`LEASE_MIN_RATE`] req/s (every
//! request counted in Redis, exactly as without leases), else about the
//! requests of one epoch, at most [`MAX_LEASE`], and never more than
//! 1/[`BUDGET_SHARE`] of the budget left, so a small limit or the tail of a
//! window is counted one request at a time.
//!
//! Pure state on a `now_ms` the caller passes in; no I/O, no clock.

use std::collections::HashMap;
use std::hash::Hash;

/// Length of one rate-measurement epoch.
pub const EPOCH_MS: u64 = 50;
/// An epoch that holds this many checks ends early (once at least a
/// millisecond has passed): the rate is then already known to be far above
/// [`LEASE_MIN_RATE`], and a busy org starts leasing within milliseconds.
pub const EARLY_CHECKS: u64 = 32;
/// Below this many requests per second (for one org on one worker) every
/// request is counted in Redis on its own.
pub const LEASE_MIN_RATE: u64 = 200;
/// Largest lease.
pub const MAX_LEASE: u64 = 64;
/// A lease is at most this fraction (1/n) of the budget left in the window:
/// with 64, limits under 128 are never leased in blocks.
pub const BUDGET_SHARE: u64 = 64;
/// Orgs with a lease entry per worker, at most.
pub const MAX_ENTRIES: usize = 10_000;

/// Units of an `INCRBY n` that returned `count` which the caller may admit.
pub fn grant(limit: u32, count: u64, n: u64) -> u64 {
    let before = count.saturating_sub(n);
    u64::from(limit).saturating_sub(before).min(n)
}

/// One org's lease on one worker, for one window.
#[derive(Debug, Clone)]
pub struct Lease {
    window: u64,
    /// Pre-counted units not yet used.
    units: u64,
    /// The highest count Redis reported in this window.
    count: u64,
    /// Current lease size (1 = no leasing).
    size: u64,
    epoch_start_ms: u64,
    epoch_checks: u64,
    /// The window an acquisition in flight was started for.
    inflight: Option<u64>,
}

impl Lease {
    pub fn new(window: u64, now_ms: u64) -> Self {
        Self {
            window,
            units: 0,
            count: 0,
            size: 1,
            epoch_start_ms: now_ms,
            epoch_checks: 0,
            inflight: None,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    pub fn units(&self) -> u64 {
        self.units
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Moves to another window: the old lease and count are discarded (the
    /// rate measurement is kept). An acquisition still in flight concerns
    /// the old window and no longer blocks a new one.
    pub fn roll(&mut self, window: u64) {
        self.window = window;
        self.units = 0;
        self.count = 0;
        self.inflight = None;
    }

    /// Records one check at `now_ms` and, at the end of an epoch, resizes
    /// the lease from the rate seen during it.
    pub fn observe(&mut self, now_ms: u64) {
        if now_ms < self.epoch_start_ms {
            // The wall clock went back: start measuring again.
            self.epoch_start_ms = now_ms;
            self.epoch_checks = 0;
        } else {
            let elapsed = now_ms - self.epoch_start_ms;
            if elapsed >= EPOCH_MS || (elapsed > 0 && self.epoch_checks >= EARLY_CHECKS) {
                let per_sec = self.epoch_checks.saturating_mul(1000) / elapsed;
                self.size = if per_sec < LEASE_MIN_RATE {
                    1
                } else {
                    (per_sec * EPOCH_MS / 1000).clamp(2, MAX_LEASE)
                };
                self.epoch_start_ms = now_ms;
                self.epoch_checks = 0;
            }
        }
        self.epoch_checks += 1;
    }

    /// The size of the next acquisition: the adapted size, capped by the
    /// share of the budget this worker believes is left; at least 1.
    pub fn want(&self, limit: u32) -> u64 {
        let left = u64::from(limit).saturating_sub(self.count);
        self.size.min(left / BUDGET_SHARE).max(1)
    }

    /// Uses one pre-counted unit if there is one.
    pub fn take(&mut self) -> bool {
        if self.units > 0 {
            self.units -= 1;
            true
        } else {
            false
        }
    }

    /// `limit - (count - units left)`: this worker's (conservative) view.
    pub fn remaining(&self, limit: u32) -> u32 {
        let used = self.count.min(u64::from(limit)).saturating_sub(self.units);
        // `used <= limit`, so the difference fits.
        u32::try_from(u64::from(limit) - used).unwrap_or(limit)
    }

    /// Nothing left here and Redis already counted the whole budget: counts
    /// never go down within a window, so every further check is refused.
    pub fn exhausted(&self, limit: u32) -> bool {
        self.units == 0 && self.count >= u64::from(limit)
    }

    /// Whether an acquisition for the current window is in flight.
    pub fn in_flight(&self) -> bool {
        self.inflight == Some(self.window)
    }

    /// After a unit was taken: `Some(n)` when the lease ran below a quarter
    /// of its size and the next one should be fetched in the background.
    pub fn prefetch(&self, limit: u32) -> Option<u64> {
        let n = self.want(limit);
        (self.size > 1
            && n > 1
            && !self.in_flight()
            && self.units * 4 < self.size
            && self.count < u64::from(limit))
        .then_some(n)
    }

    /// An acquisition for the current window starts (single-flight: the
    /// caller checked [`Lease::in_flight`]).
    pub fn begin(&mut self) {
        self.inflight = Some(self.window);
    }

    /// Redis answered `count` to an `INCRBY n` sent for `window`: adds the
    /// granted units if that is still the current window and returns them.
    pub fn apply(&mut self, window: u64, count: u64, n: u64, limit: u32) -> Option<u64> {
        if window != self.window {
            return None;
        }
        if self.inflight == Some(window) {
            self.inflight = None;
        }
        let granted = grant(limit, count, n);
        self.units += granted;
        self.count = self.count.max(count);
        Some(granted)
    }

    /// The acquisition sent for `window` failed.
    pub fn abort(&mut self, window: u64) {
        if self.inflight == Some(window) {
            self.inflight = None;
        }
    }

    /// A single check was counted by Redis as `count` (no lease).
    pub fn note_count(&mut self, count: u64) {
        self.count = self.count.max(count);
    }
}

/// Makes room for one more entry when `map` holds `cap`: drops entries of
/// other windows (their leases are worthless), then, if still full, idle
/// entries (losing their units: conservative) until a quarter is free.
/// Entries for which `busy` holds (an acquisition in flight) are kept.
pub fn make_room<K: Copy + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    window: u64,
    window_of: impl Fn(&V) -> u64,
    busy: impl Fn(&V) -> bool,
) {
    if map.len() < cap {
        return;
    }
    map.retain(|_, v| window_of(v) == window || busy(v));
    if map.len() < cap {
        return;
    }
    let target = cap - cap / 4;
    let excess = map.len().saturating_sub(target);
    let victims: Vec<K> = map
        .iter()
        .filter(|(_, v)| !busy(v))
        .map(|(k, _)| *k)
        .take(excess)
        .collect();
    for k in victims {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_464_000_000;

    /// Drives `checks` evenly spread over `ms` through `lease.observe`.
    fn run_rate(lease: &mut Lease, from: u64, checks: u64, ms: u64) -> u64 {
        for i in 0..checks {
            lease.observe(from + i * ms / checks);
        }
        from + ms
    }

    #[test]
    fn grant_never_exceeds_the_limit() {
        assert_eq!(grant(100, 16, 16), 16);
        assert_eq!(grant(100, 100, 16), 16);
        assert_eq!(grant(100, 110, 16), 6);
        assert_eq!(grant(100, 116, 16), 0);
        assert_eq!(grant(100, 500, 16), 0);
        assert_eq!(grant(0, 1, 1), 0);
        // Any interleaving of acquisitions on one counter: their grants sum
        // to at most the limit.
        for limit in [1u32, 7, 60, 100, 3000] {
            for sizes in [[1u64, 64, 3, 17], [64, 64, 64, 64], [5, 1, 1, 2]] {
                let (mut count, mut total) = (0u64, 0u64);
                for _ in 0..200 {
                    for n in sizes {
                        count += n;
                        let g = grant(limit, count, n);
                        assert!(g <= n);
                        total += g;
                    }
                }
                assert_eq!(total, u64::from(limit).min(count), "{limit} {sizes:?}");
            }
        }
    }

    #[test]
    fn lease_stays_one_at_a_low_rate() {
        let mut l = Lease::new(1, T0);
        // 100 req/s for two seconds.
        let end = run_rate(&mut l, T0, 200, 2_000);
        l.observe(end);
        assert_eq!(l.size(), 1);
        assert_eq!(l.want(10_000), 1);
        assert_eq!(l.prefetch(10_000), None);
    }

    #[test]
    fn lease_grows_with_the_rate_and_shrinks_when_it_drops() {
        let mut l = Lease::new(1, T0);
        // A burst inside one millisecond is still counted one by one.
        for _ in 0..500 {
            l.observe(T0);
        }
        assert_eq!(l.size(), 1);
        // Once time passes, a burst ends its epoch early and leases.
        l.observe(T0 + 2);
        assert_eq!(l.size(), MAX_LEASE);
        // 1 000 req/s: about 50 per epoch.
        let t = run_rate(&mut l, T0 + 50, 100, 100);
        assert!((40..=MAX_LEASE).contains(&l.size()), "{}", l.size());
        // 10 000 req/s: capped.
        let t = run_rate(&mut l, t, 1_000, 100);
        assert_eq!(l.size(), MAX_LEASE);
        assert_eq!(l.want(100_000), MAX_LEASE);
        // Quiet again: back to one.
        let t = run_rate(&mut l, t + 1_000, 2, 100);
        l.observe(t + 100);
        assert_eq!(l.size(), 1);
        // The clock going back does not divide by zero or grow the lease.
        l.observe(T0);
        l.observe(T0 + 1);
        assert_eq!(l.size(), 1);
    }

    #[test]
    fn lease_is_capped_by_the_budget_left() {
        let mut l = Lease::new(1, T0);
        run_rate(&mut l, T0, 2_000, 200);
        assert_eq!(l.size(), MAX_LEASE);
        // A limit under 2 * BUDGET_SHARE is never leased in blocks.
        assert_eq!(l.want(60), 1);
        assert_eq!(l.want(127), 1);
        assert_eq!(l.want(128), 2);
        assert_eq!(l.want(3_000), 46);
        // Near the end of the budget: one at a time again.
        l.apply(1, 2_900, 46, 3_000);
        assert_eq!(l.want(3_000), 1);
        assert_eq!(l.prefetch(3_000), None);
    }

    #[test]
    fn units_are_used_locally_and_remaining_is_exact_on_one_worker() {
        let mut l = Lease::new(1, T0);
        assert!(!l.take());
        l.begin();
        assert_eq!(l.apply(1, 16, 16, 100), Some(16));
        assert!(!l.in_flight());
        for i in 1..=16u32 {
            assert!(l.take());
            assert_eq!(l.remaining(100), 100 - i);
        }
        assert!(!l.take());
        // Another worker took the next 80: the last grant is partial.
        assert_eq!(l.apply(1, 112, 16, 100), Some(4));
        assert!(l.take());
        assert_eq!(l.remaining(100), 3);
        for _ in 0..3 {
            assert!(l.take());
        }
        assert_eq!(l.remaining(100), 0);
        assert!(l.exhausted(100));
        assert!(!l.exhausted(200), "a raised limit is not exhausted");
        assert_eq!(l.apply(1, 128, 16, 100), Some(0));
    }

    #[test]
    fn a_new_window_discards_the_lease_and_late_replies() {
        let mut l = Lease::new(7, T0);
        l.begin();
        l.apply(7, 64, 64, 1_000);
        l.note_count(70);
        assert!(l.take());
        l.begin();
        assert!(l.in_flight());
        l.roll(8);
        assert_eq!(l.units(), 0);
        assert!(
            !l.in_flight(),
            "the old acquisition does not block the new window"
        );
        assert_eq!(l.remaining(1_000), 1_000);
        // The old window's reply arrives: ignored.
        assert_eq!(l.apply(7, 128, 64, 1_000), None);
        assert_eq!(l.units(), 0);
        l.begin();
        l.abort(7);
        assert!(l.in_flight(), "an old failure does not end the new flight");
        l.abort(8);
        assert!(!l.in_flight());
    }

    #[test]
    fn prefetch_starts_below_a_quarter_and_only_once() {
        let mut l = Lease::new(1, T0);
        run_rate(&mut l, T0, 2_000, 200);
        let size = l.size();
        assert_eq!(size, MAX_LEASE);
        l.begin();
        l.apply(1, size, size, 100_000);
        let mut started = 0;
        while l.take() {
            if let Some(n) = l.prefetch(100_000) {
                assert!(l.units() * 4 < size);
                assert_eq!(n, size);
                l.begin();
                started += 1;
            }
        }
        assert_eq!(
            started, 1,
            "single flight: one acquisition in flight at a time"
        );
        assert!(l.in_flight());
        assert_eq!(l.prefetch(100_000), None);
        l.apply(1, 2 * size, size, 100_000);
        assert_eq!(l.units(), size);
        assert_eq!(l.prefetch(100_000), None, "a full lease needs nothing");
    }

    #[test]
    fn make_room_evicts_old_windows_then_idle_entries() {
        let mut map: HashMap<u32, (u64, bool)> = HashMap::new();
        for k in 0..8 {
            map.insert(k, (if k < 2 { 4 } else { 5 }, k == 7));
        }
        make_room(&mut map, 10, 5, |v| v.0, |v| v.1);
        assert_eq!(map.len(), 8, "not full: untouched");
        make_room(&mut map, 8, 5, |v| v.0, |v| v.1);
        assert_eq!(map.len(), 6, "old windows dropped first");
        make_room(&mut map, 6, 5, |v| v.0, |v| v.1);
        assert!(map.len() < 6);
        assert!(map.contains_key(&7), "an entry in flight is kept");
    }
}
