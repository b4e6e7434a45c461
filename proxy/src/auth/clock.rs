//! Time as the auth caches see it, injectable so TTLs, expiry, heartbeat
//! staleness and the flood-guard window are tested without sleeping.
//! On the hot path a request reads the clock once (when it starts) and every
//! step uses that instant.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock {
    /// Monotonic time for TTLs and windows.
    fn now(&self) -> Instant;
    /// Wall time in unix milliseconds at monotonic instant `at` (token
    /// expiry set by authd, rate-limit reset headers). Lets a request read
    /// the clock once and derive both.
    fn unix_ms_at(&self, at: Instant) -> i64;

    fn unix_ms(&self) -> i64 {
        self.unix_ms_at(self.now())
    }
}

fn offset_ms(base: Instant, at: Instant) -> i64 {
    i64::try_from(at.saturating_duration_since(base).as_millis()).unwrap_or(i64::MAX)
}

/// The real clock. Wall time is derived from one monotonic reading plus the
/// wall time at construction, so a request costs one clock read, not two.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    base: Instant,
    base_unix_ms: i64,
}

impl SystemClock {
    pub fn new() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            base: Instant::now(),
            base_unix_ms: i64::try_from(unix.as_millis()).unwrap_or(i64::MAX),
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
