//! The limiter's settings: the URL and timeout as configured (their
//! defaults are stated once, in [`crate::config`]), fixed constants for the
//! rest.

use std::fmt;
use std::time::Duration;

use super::cluster;

#[derive(Clone)]
pub struct RateLimitConfig {
    /// `IBEX_REDIS_URL`, e.g. `redis://127.0.0.1:6379/0`. A password in it
    /// (`redis://:pw@host`) is sent with AUTH and never logged.
    pub redis_url: String,
    /// Longest a check waits for Redis before failing open.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker fails every check open without asking Redis
    /// before letting one probe through.
    pub breaker_open: Duration,
    /// Checks in flight on one worker's connection beyond which new checks
    /// fail open at once.
    pub max_pending: usize,
    /// Longest a (re)connect plus handshake may take.
    pub connect_timeout: Duration,
    /// Reconnect backoff: first delay, doubled up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// At most one "failing open" warning per interval, with a count.
    pub warn_interval: Duration,
}

impl RateLimitConfig {
    /// The URL and timeout as configured (`IBEX_REDIS_URL`,
    /// `IBEX_REDIS_TIMEOUT`, whose defaults [`crate::config`] states); the
    /// limiter's fixed constants for the rest.
    pub fn new(redis_url: impl Into<String>, timeout: Duration) -> Self {
        Self {
            redis_url: redis_url.into(),
            timeout,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(1),
            max_pending: 4096,
            connect_timeout: Duration::from_millis(500),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            warn_interval: Duration::from_secs(10),
        }
    }

    /// Checks the URL so a bad one stops the process at startup instead of
    /// failing every request open. The message never contains the URL.
    pub fn validate(&self) -> Result<(), String> {
        cluster::parse_seeds(&self.redis_url).map(|_| ())
    }
}

impl fmt::Debug for RateLimitConfig {
    /// The URL may hold a password: print it only without one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = if self.redis_url.contains('@') {
            "redis://[REDACTED]"
        } else {
            &self.redis_url
        };
        f.debug_struct("RateLimitConfig")
            .field("redis_url", &url)
            .field("timeout", &self.timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_open", &self.breaker_open)
            .field("max_pending", &self.max_pending)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_config_hides_a_password_in_the_url() {
        let t = Duration::from_millis(25);
        let cfg = RateLimitConfig::new("redis://:hunter2@127.0.0.1:6379/0", t);
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(format!("{:?}", RateLimitConfig::new("redis://127.0.0.1:1/2", t)).contains(":1/2"));
        assert!(cfg.validate().is_ok());
        assert!(RateLimitConfig::new("http://x", t).validate().is_err());
    }
}
