//! What the limiter tells the outside: a check's [`RateDecision`] (for the
//! chain's answer and headers), its counters ([`RateLimitStats`], for
//! `/metrics`), and why Redis could not be used ([`Failure`], for the
//! throttled warning).

use std::sync::atomic::AtomicU64;

use super::cluster::CallError;

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
    /// Milliseconds until the current window ends, 1..=60 000, on every
    /// decision; the chain sends it (`Retry-After`, `retry-after-ms`) when
    /// `admitted` is false.
    pub retry_after_ms: u64,
    /// True when Redis was down/slow/breaker-open and the request was
    /// admitted without counting.
    pub failed_open: bool,
}

/// Counters the `/metrics` renderer reads (written by one worker, read by the
/// scrape: relaxed atomics on a per-worker struct, never contended).
#[derive(Debug, Default)]
pub struct RateLimitStats {
    pub checks: AtomicU64,
    pub limited: AtomicU64,
    pub redis_errors: AtomicU64,
    pub failed_open: AtomicU64,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: AtomicU64,
}

/// Why a check could not use Redis (for the throttled warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    BreakerOpen,
    NotConnected,
    QueueFull,
    Timeout,
    ConnectionLost,
    ErrorReply,
    BadReply,
    /// Redis Cluster: the key's slot has no answering master right now.
    SlotDown,
}

impl Failure {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Failure::BreakerOpen => "circuit breaker open",
            Failure::NotConnected => "not connected",
            Failure::QueueFull => "too many checks in flight",
            Failure::Timeout => "timed out",
            Failure::ConnectionLost => "connection lost",
            Failure::ErrorReply => "Redis returned an error",
            Failure::BadReply => "unexpected reply",
            Failure::SlotDown => "no answering Redis Cluster master for the slot",
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotConnected => Failure::NotConnected,
            CallError::QueueFull => Failure::QueueFull,
            CallError::Timeout => Failure::Timeout,
            CallError::ConnectionLost => Failure::ConnectionLost,
            CallError::SlotDown => Failure::SlotDown,
            CallError::Redirects => Failure::ErrorReply,
        }
    }
}
