//! Per-org fixed-window rate limiting shared by every proxy through Redis
//! (SPEC §4). One [`RateLimiter`] per worker; it never hops threads on the
//! hot path and fails open when Redis is down or slow.
//!
//! INTERFACE (the chain relies on exactly this; the implementation behind it
//! is free): construct inside the worker's runtime, call `check` once per
//! request that reached the limiter.

use std::rc::Rc;
use std::sync::Arc;

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// `IBEX_REDIS_URL`, e.g. `redis://127.0.0.1:6379/0`.
    pub redis_url: String,
}

/// What the chain needs to answer and to set the `X-RateLimit-*`,
/// `x-ratelimit-*-requests`, `Retry-After` and `retry-after-ms` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub admitted: bool,
    pub limit: u32,
    /// `None` when Redis could not be asked (fail open): the chain then sends
    /// only `X-RateLimit-Limit` and `X-RateLimit-Reset`.
    pub remaining: Option<u32>,
    /// Unix seconds when the current window ends.
    pub reset_unix: u64,
    /// Set when `admitted` is false: 1..=60 000.
    pub retry_after_ms: u64,
    /// True when Redis was down/slow/breaker-open and the request was
    /// admitted without counting.
    pub failed_open: bool,
}

/// Counters the `/metrics` renderer reads (written by one worker, read by the
/// scrape: relaxed atomics on a per-worker struct, never contended).
#[derive(Debug, Default)]
pub struct RateLimitStats {
    pub checks: std::sync::atomic::AtomicU64,
    pub limited: std::sync::atomic::AtomicU64,
    pub redis_errors: std::sync::atomic::AtomicU64,
    pub failed_open: std::sync::atomic::AtomicU64,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: std::sync::atomic::AtomicU64,
}

pub struct RateLimiter {
    #[allow(dead_code)]
    config: Rc<RateLimitConfig>,
    stats: Arc<RateLimitStats>,
}

impl RateLimiter {
    /// Called on the worker thread, inside its monoio runtime.
    pub fn new(config: Rc<RateLimitConfig>) -> Self {
        Self {
            config,
            stats: Arc::new(RateLimitStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<RateLimitStats> {
        self.stats.clone()
    }

    /// Count one request of `org` against `limit` per minute.
    /// PLACEHOLDER until the Redis implementation lands: admits everything.
    pub async fn check(&self, org: &Uuid, limit: u32) -> RateDecision {
        let _ = org;
        RateDecision {
            admitted: true,
            limit,
            remaining: None,
            reset_unix: 0,
            retry_after_ms: 0,
            failed_open: true,
        }
    }

    /// Whether Redis answered recently (for `/ready`).
    pub fn healthy(&self) -> bool {
        false
    }
}
