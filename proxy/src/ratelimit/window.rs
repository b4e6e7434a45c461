//! Fixed one-minute windows: which window a moment falls in, the Redis key
//! that counts it, and the decision from Redis' atomic count (SPEC §4).
//!
//! Pure arithmetic on a `now_ms` the caller passes in (unix milliseconds), so
//! every boundary is unit-tested without a clock. No I/O here.

use std::fmt::Write as _;

use uuid::Uuid;

use super::decision::RateDecision;

/// Length of a window.
pub const WINDOW_MS: u64 = 60_000;

/// Expiry set on a counter when it is created: the window plus a second of
/// grace for clock skew between proxies, so a late proxy still finds the
/// count of the window it thinks it is in.
pub const KEY_TTL_MS: u64 = WINDOW_MS + 1_000;

/// The window that contains one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Unix seconds / 60: the last part of the Redis key.
    pub number: u64,
    /// Unix seconds when the window ends (`X-RateLimit-Reset`).
    pub reset_unix: u64,
    /// Milliseconds from `now_ms` to the end of the window: 1..=60 000.
    pub ms_to_end: u64,
}

impl Window {
    pub fn at(now_ms: u64) -> Self {
        let number = now_ms / WINDOW_MS;
        let end_ms = (number + 1) * WINDOW_MS;
        Self {
            number,
            reset_unix: end_ms / 1000,
            // `now_ms < end_ms` always, and `end_ms - now_ms <= WINDOW_MS`:
            // the clamp only documents the range the headers rely on.
            ms_to_end: (end_ms - now_ms).clamp(1, WINDOW_MS),
        }
    }

    /// Appends the counter key, `ibex:rl:{<org>}:<window>`, to `out`. The
    /// braces are a Redis Cluster hash tag: all of one org's windows live on
    /// one shard.
    pub fn write_key(&self, org: &Uuid, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(out, "ibex:rl:{{{}}}:{}", org.hyphenated(), self.number);
    }

    pub fn key(&self, org: &Uuid) -> String {
        let mut key = String::with_capacity(64);
        self.write_key(org, &mut key);
        key
    }

    /// The decision once Redis has counted this request as number `count`
    /// of the window: admitted while `count <= limit`.
    pub fn decide(&self, count: u64, limit: u32) -> RateDecision {
        let admitted = count <= u64::from(limit);
        let remaining = u64::from(limit).saturating_sub(count);
        RateDecision {
            admitted,
            limit,
            // `remaining <= limit`, so it fits in u32.
            remaining: Some(u32::try_from(remaining).unwrap_or(limit)),
            reset_unix: self.reset_unix,
            retry_after_ms: self.ms_to_end,
            failed_open: false,
        }
    }

    /// Admitted from a lease Redis already counted, with this worker's view
    /// of the budget left.
    pub fn admit(&self, limit: u32, remaining: u32) -> RateDecision {
        RateDecision {
            admitted: true,
            limit,
            remaining: Some(remaining.min(limit)),
            reset_unix: self.reset_unix,
            retry_after_ms: self.ms_to_end,
            failed_open: false,
        }
    }

    /// A refusal that needs no Redis: a limit of zero admits nothing.
    pub fn refuse_all(&self, limit: u32) -> RateDecision {
        RateDecision {
            admitted: false,
            limit,
            remaining: Some(0),
            reset_unix: self.reset_unix,
            retry_after_ms: self.ms_to_end,
            failed_open: false,
        }
    }

    /// Redis could not be asked: admit without counting (SPEC §4 fails open).
    pub fn fail_open(&self, limit: u32) -> RateDecision {
        RateDecision {
            admitted: true,
            limit,
            remaining: None,
            reset_unix: self.reset_unix,
            retry_after_ms: self.ms_to_end,
            failed_open: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23T20:00:00Z, a whole minute.
    const MINUTE: u64 = 1_795_464_000_000;

    #[test]
    fn exact_minute_starts_a_window_with_a_full_minute_left() {
        let w = Window::at(MINUTE);
        assert_eq!(w.number, MINUTE / 60_000);
        assert_eq!(w.reset_unix, MINUTE / 1000 + 60);
        assert_eq!(w.ms_to_end, 60_000);
    }

    #[test]
    fn last_millisecond_of_a_window_has_one_ms_left() {
        let w = Window::at(MINUTE + 59_999);
        assert_eq!(w.number, MINUTE / 60_000);
        assert_eq!(w.reset_unix, MINUTE / 1000 + 60);
        assert_eq!(w.ms_to_end, 1);
        let next = Window::at(MINUTE + 60_000);
        assert_eq!(next.number, w.number + 1);
        assert_eq!(next.ms_to_end, 60_000);
    }

    #[test]
    fn unix_epoch_is_window_zero() {
        let w = Window::at(0);
        assert_eq!((w.number, w.reset_unix, w.ms_to_end), (0, 60, 60_000));
        let w = Window::at(59_999);
        assert_eq!((w.number, w.reset_unix, w.ms_to_end), (0, 60, 1));
    }

    #[test]
    fn retry_after_stays_within_one_to_sixty_thousand() {
        for offset in [0, 1, 999, 1_000, 30_000, 59_000, 59_998, 59_999] {
            let w = Window::at(MINUTE + offset);
            assert!((1..=60_000).contains(&w.ms_to_end), "{offset}");
            assert_eq!(w.ms_to_end, 60_000 - offset);
        }
    }

    #[test]
    fn key_is_hash_tagged_by_org_and_numbered_by_window() {
        let org = Uuid::parse_str("6f1c1a4e-2b7d-4c9a-9d1e-0a1b2c3d4e5f").unwrap();
        let w = Window::at(MINUTE + 12_345);
        assert_eq!(
            w.key(&org),
            format!(
                "ibex:rl:{{6f1c1a4e-2b7d-4c9a-9d1e-0a1b2c3d4e5f}}:{}",
                MINUTE / 60_000
            )
        );
    }

    #[test]
    fn counts_up_to_the_limit_are_admitted_and_remaining_decrements() {
        let w = Window::at(MINUTE);
        let d = w.decide(1, 60);
        assert!(d.admitted && !d.failed_open);
        assert_eq!(d.remaining, Some(59));
        assert_eq!(w.decide(59, 60).remaining, Some(1));
        let last = w.decide(60, 60);
        assert!(last.admitted);
        assert_eq!(last.remaining, Some(0));
        let over = w.decide(61, 60);
        assert!(!over.admitted);
        assert_eq!(over.remaining, Some(0));
        assert_eq!(over.retry_after_ms, 60_000);
        assert_eq!(over.reset_unix, MINUTE / 1000 + 60);
    }

    #[test]
    fn zero_limit_refuses_and_fail_open_admits_without_remaining() {
        let w = Window::at(MINUTE + 59_999);
        let d = w.refuse_all(0);
        assert!(!d.admitted);
        assert_eq!(d.retry_after_ms, 1);
        let open = w.fail_open(10);
        assert!(open.admitted && open.failed_open);
        assert_eq!(open.remaining, None);
        assert_eq!(open.reset_unix, MINUTE / 1000 + 60);
    }
}
