//! The circuit breaker that makes a dead Redis cost nothing per request, and
//! the throttle that keeps its warning to one log line per interval.
//!
//! Pure state machines on a `now_ms` the caller passes in; no I/O, no clock.

/// What the breaker lets a check do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Ask Redis.
    Call,
    /// Ask Redis as the single half-open probe: its outcome closes or
    /// re-opens the breaker.
    Probe,
    /// Do not ask: fail open at once.
    Reject,
}

/// Numbers exported as `RateLimitStats::breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_metric(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// Closed → (N consecutive failures) → open for `open_ms` → half-open: one
/// probe; success closes, failure re-opens. A probe whose caller vanished
/// (its future dropped) frees the slot after `probe_timeout_ms`.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_ms: u64,
    probe_timeout_ms: u64,
    inner: Inner,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { failures: u32 },
    Open { until_ms: u64 },
    HalfOpen { probe_started_ms: u64 },
}

impl Breaker {
    pub fn new(threshold: u32, open_ms: u64, probe_timeout_ms: u64) -> Self {
        Self {
            threshold: threshold.max(1),
            open_ms,
            probe_timeout_ms,
            inner: Inner::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    pub fn permit(&mut self, now_ms: u64) -> Permit {
        match self.inner {
            Inner::Closed { .. } => Permit::Call,
            Inner::Open { until_ms } if now_ms < until_ms => Permit::Reject,
            Inner::Open { .. } => {
                self.inner = Inner::HalfOpen {
                    probe_started_ms: now_ms,
                };
                Permit::Probe
            }
            Inner::HalfOpen { probe_started_ms }
                if now_ms >= probe_started_ms.saturating_add(self.probe_timeout_ms) =>
            {
                self.inner = Inner::HalfOpen {
                    probe_started_ms: now_ms,
                };
                Permit::Probe
            }
            Inner::HalfOpen { .. } => Permit::Reject,
        }
    }

    /// Redis answered.
    pub fn on_success(&mut self) {
        self.inner = Inner::Closed { failures: 0 };
    }

    /// Redis failed (down, timed out, or answered with an error).
    pub fn on_failure(&mut self, now_ms: u64) {
        self.inner = match self.inner {
            Inner::Closed { failures } if failures + 1 < self.threshold => Inner::Closed {
                failures: failures + 1,
            },
            Inner::Closed { .. } | Inner::HalfOpen { .. } => Inner::Open {
                until_ms: now_ms.saturating_add(self.open_ms),
            },
            // A late failure of a call admitted before the breaker opened
            // does not extend the open period.
            open @ Inner::Open { .. } => open,
        };
    }
}

/// Counts events and says when to log them: at most once per `interval_ms`,
/// carrying how many happened since the last line.
#[derive(Debug, Clone)]
pub struct WarnThrottle {
    interval_ms: u64,
    last_ms: Option<u64>,
    count: u64,
}

impl WarnThrottle {
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            last_ms: None,
            count: 0,
        }
    }

    /// Records one event; `Some(n)` when a line is due now, `n` being the
    /// events since the previous line (this one included).
    pub fn note(&mut self, now_ms: u64) -> Option<u64> {
        self.count += 1;
        let due = match self.last_ms {
            None => true,
            Some(last) => now_ms >= last.saturating_add(self.interval_ms),
        };
        if !due {
            return None;
        }
        self.last_ms = Some(now_ms);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_opens_after_threshold_consecutive_failures() {
        let mut b = Breaker::new(3, 1_000, 50);
        assert_eq!(b.permit(0), Permit::Call);
        b.on_failure(0);
        b.on_failure(1);
        assert_eq!(b.state(), State::Closed);
        b.on_success();
        b.on_failure(2);
        b.on_failure(3);
        assert_eq!(b.state(), State::Closed, "a success resets the count");
        b.on_failure(4);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.permit(5), Permit::Reject);
        assert_eq!(b.permit(1_003), Permit::Reject);
    }

    #[test]
    fn open_turns_half_open_with_one_probe_then_closes_on_success() {
        let mut b = Breaker::new(1, 1_000, 50);
        b.on_failure(100);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.permit(1_099), Permit::Reject);
        assert_eq!(b.permit(1_100), Permit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.permit(1_101), Permit::Reject, "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.permit(1_102), Permit::Call);
    }

    #[test]
    fn failed_probe_reopens_for_a_full_period() {
        let mut b = Breaker::new(1, 1_000, 50);
        b.on_failure(0);
        assert_eq!(b.permit(1_000), Permit::Probe);
        b.on_failure(1_010);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.permit(2_009), Permit::Reject);
        assert_eq!(b.permit(2_010), Permit::Probe);
    }

    #[test]
    fn abandoned_probe_frees_the_slot_after_probe_timeout() {
        let mut b = Breaker::new(1, 1_000, 50);
        b.on_failure(0);
        assert_eq!(b.permit(1_000), Permit::Probe);
        assert_eq!(b.permit(1_049), Permit::Reject);
        assert_eq!(b.permit(1_050), Permit::Probe);
    }

    #[test]
    fn late_failures_do_not_extend_an_open_breaker() {
        let mut b = Breaker::new(1, 1_000, 50);
        b.on_failure(0);
        b.on_failure(900);
        assert_eq!(b.permit(1_000), Permit::Probe);
    }

    #[test]
    fn metric_numbers_match_the_stats_doc() {
        assert_eq!(State::Closed.as_metric(), 0);
        assert_eq!(State::Open.as_metric(), 1);
        assert_eq!(State::HalfOpen.as_metric(), 2);
    }

    #[test]
    fn warn_throttle_logs_first_event_then_once_per_interval_with_count() {
        let mut t = WarnThrottle::new(10_000);
        assert_eq!(t.note(0), Some(1));
        for ms in 1..=9_999 {
            assert_eq!(t.note(ms), None);
        }
        assert_eq!(t.note(10_000), Some(10_000));
        assert_eq!(t.note(10_001), None);
        assert_eq!(t.note(25_000), Some(2));
    }
}
