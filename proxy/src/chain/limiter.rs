//! The rate-limit step's view of a limiter, so the chain can run with the
//! Redis limiter in production and a fake (or none) in tests and benches.

use std::future::Future;

use uuid::Uuid;

use crate::ratelimit::{RateDecision, RateLimiter};

pub trait Limiter {
    fn check(&self, org: &Uuid, limit: u32) -> impl Future<Output = RateDecision>;
    /// For `/ready`.
    fn healthy(&self) -> bool;
}

impl Limiter for RateLimiter {
    fn check(&self, org: &Uuid, limit: u32) -> impl Future<Output = RateDecision> {
        RateLimiter::check(self, org, limit)
    }

    fn healthy(&self) -> bool {
        RateLimiter::healthy(self)
    }
}

/// Admits everything, reporting a full budget: for benches of the chain
/// itself.
pub struct NoLimit;

impl Limiter for NoLimit {
    async fn check(&self, _org: &Uuid, limit: u32) -> RateDecision {
        RateDecision {
            admitted: true,
            limit,
            remaining: Some(limit),
            reset_unix: 0,
            retry_after_ms: 0,
            failed_open: false,
        }
    }

    fn healthy(&self) -> bool {
        true
    }
}
