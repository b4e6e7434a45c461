//! The proxy's one notion of time, injected through [`crate::ctx::WorkerCtx`]
//! so TTLs, expiry, heartbeat staleness, the flood-guard window, rate-limit
//! windows and upstream timings are tested without sleeping.
//! On the hot path a request reads the clock once (when it starts) and every
//! step uses that instant.
//!
//! Not here: the runtime's timers (`monoio::time`), which bound I/O waits in
//! real time and cannot be faked; time that decides an outcome comes from
//! here.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock {
    /// Monotonic time for TTLs and windows.
    fn now(&self) -> Instant;
    /// Wall time in unix milliseconds at monotonic instant `at` (token
    /// expiry set by authd, rate-limit reset headers). Lets a request read
    /// the clock once and derive both.
    fn unix_ms_at(&self, at: Instant) -> i64;

    /// Wall time now, in unix milliseconds. For a decision that needs the
    /// wall clock itself (the rate limiter's windows, shared with other
    /// proxies through Redis) rather than a request's start.
    fn unix_ms(&self) -> i64 {
        self.unix_ms_at(self.now())
    }
}

fn system_unix_ms() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(unix.as_millis()).unwrap_or(i64::MAX)
}

fn offset_ms(base: Instant, at: Instant) -> i64 {
    i64::try_from(at.saturating_duration_since(base).as_millis()).unwrap_or(i64::MAX)
}

/// The real clock. Wall time at an instant is derived from one monotonic
/// reading plus the wall time at construction, so a request costs one clock
/// read, not two; [`Clock::unix_ms`] reads the wall clock itself.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    base: Instant,
    base_unix_ms: i64,
    /// Added to the real wall clock: 0 but for [`SystemClock::starting_at`].
    shift_ms: i64,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            base_unix_ms: system_unix_ms(),
            shift_ms: 0,
        }
    }

    /// A real, moving clock whose wall time reads `unix_ms` now (tests that
    /// need real time inside a chosen rate-limit window).
    pub fn starting_at(unix_ms: i64) -> Self {
        Self {
            base: Instant::now(),
            base_unix_ms: unix_ms,
            shift_ms: unix_ms.saturating_sub(system_unix_ms()),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms_at(&self, at: Instant) -> i64 {
        self.base_unix_ms.saturating_add(offset_ms(self.base, at))
    }

    fn unix_ms(&self) -> i64 {
        system_unix_ms().saturating_add(self.shift_ms)
    }
}

/// A clock that moves only when told to (tests and benches).
#[derive(Debug)]
pub struct FakeClock {
    base: Instant,
    base_unix_ms: i64,
    offset: Cell<Duration>,
}

impl FakeClock {
    pub fn new(unix_ms: i64) -> Self {
        Self {
            base: Instant::now(),
            base_unix_ms: unix_ms,
            offset: Cell::new(Duration::ZERO),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.offset.set(self.offset.get() + by);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.base + self.offset.get()
    }

    fn unix_ms_at(&self, at: Instant) -> i64 {
        self.base_unix_ms.saturating_add(offset_ms(self.base, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_told() {
        let c = FakeClock::new(1_000);
        let t0 = c.now();
        assert_eq!(c.unix_ms(), 1_000);
        c.advance(Duration::from_millis(60_000));
        assert_eq!(c.now() - t0, Duration::from_millis(60_000));
        assert_eq!(c.unix_ms(), 61_000);
        assert_eq!(c.unix_ms_at(t0), 1_000);
    }

    #[test]
    fn system_clock_starting_at_reads_the_chosen_wall_time() {
        let c = SystemClock::starting_at(5_000);
        let ms = c.unix_ms();
        assert!((5_000..5_000 + 60_000).contains(&ms), "{ms}");
        assert!((SystemClock::new().unix_ms() - system_unix_ms()).abs() < 60_000);
    }
}
