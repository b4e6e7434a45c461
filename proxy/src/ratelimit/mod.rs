//! Per-org fixed-window rate limiting shared by every proxy through Redis
//! (SPEC §4). One [`RateLimiter`] per worker; it never hops threads on the
//! hot path and fails open when Redis is down or slow.
//!
//! INTERFACE (the chain relies on exactly this; the implementation behind it
//! is free): construct inside the worker's runtime, call `check` once per
//! request that reached the limiter.
//!
//! How: Redis counts each org's window in `ibex:rl:{<org>}:<unix secs / 60>`
//! with one Lua script (`EVALSHA`, `EVAL` on `NOSCRIPT`) that adds `n` to the
//! key (`INCRBY`), gives a new key a 61 s expiry and returns the count.
//! Redis' count is atomic, so any number of proxies sharing it never admit
//! more than the limit in a window.
//!
//! While an org is slow on this worker (under 200 req/s) every check adds 1
//! and waits for the count: admitted while it is at most the limit, and
//! `remaining` decrements exactly. When the org is busier, the worker leases
//! budget instead ([`lease`]): one call adds `n` (up to 64, never more than
//! 1/64 of the budget left) and the units Redis grants, never past the
//! limit, admit the next checks locally without a round trip; the next
//! lease is fetched in the background when a quarter is left, one
//! acquisition per org in flight (concurrent checks wait for it). Unused
//! units are lost at the window's end (conservative), and once Redis has
//! counted the whole budget a busy org is refused locally until the window
//! changes.
//!
//! The commands go over the worker's own pipelined connection ([`conn`]),
//! one per master on a Redis Cluster ([`cluster`]: found out by itself,
//! slot map, `MOVED`/`ASK`); a per-call timeout and a circuit breaker
//! ([`breaker`]; one per master on a cluster) turn a dead or slow Redis
//! into an immediate fail-open. Window arithmetic is in [`window`], the
//! wire format in [`resp`].
//!
//! Needs a monoio runtime with the timer enabled (`enable_timer()`).

pub mod breaker;
pub mod cluster;
pub mod cluster_map;
pub mod conn;
pub mod eval;
pub mod lease;
pub mod resp;
pub mod window;

mod admit;
mod call;
mod config;
mod decision;
mod script;
mod state;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use uuid::Uuid;

use self::admit::Step;
use self::breaker::{Breaker, Permit, WarnThrottle};
use self::cluster::Client;
use self::conn::DriveTiming;
use self::decision::Failure;
use self::state::Shared;
use self::window::{Window, KEY_TTL_MS};
use crate::clock::Clock;
pub use config::RateLimitConfig;
pub use decision::{RateDecision, RateLimitStats};
pub use script::SCRIPT;

pub struct RateLimiter {
    config: Rc<RateLimitConfig>,
    stats: Arc<RateLimitStats>,
    shared: Rc<Shared>,
}

impl RateLimiter {
    /// Called on the worker thread, inside its monoio runtime, with the
    /// worker's clock ([`crate::ctx::WorkerCtx`]). Its wall time decides the
    /// window and the rate measurement behind lease sizes (a frozen
    /// [`crate::clock::FakeClock`] never leases); timeouts and the breaker
    /// run on the runtime's monotonic time.
    pub fn new(config: Rc<RateLimitConfig>, clock: Rc<dyn Clock>) -> Self {
        let stats = Arc::new(RateLimitStats::default());
        let timeout_ms = u64::try_from(config.timeout.as_millis()).unwrap_or(u64::MAX);
        let seeds = cluster::parse_seeds(&config.redis_url).unwrap_or_else(|msg| {
            // Never connects: every check fails open, `healthy()` stays false.
            tracing::error!(error = %msg, "rate limiter disabled: bad Redis URL");
            Vec::new()
        });
        let timing = DriveTiming {
            connect_timeout: config.connect_timeout,
            backoff_min: config.reconnect_min,
            backoff_max: config.reconnect_max.max(config.reconnect_min),
        };
        let breaker = Breaker::new(
            config.breaker_failures,
            u64::try_from(config.breaker_open.as_millis()).unwrap_or(u64::MAX),
            timeout_ms.saturating_mul(2).max(10),
        );
        let shared = Rc::new_cyclic(|me: &std::rc::Weak<Shared>| {
            let events = me.clone();
            let redis = Client::start(
                seeds,
                Rc::from(SCRIPT),
                timing,
                config.max_pending,
                // One per master on a cluster; on a single Redis the
                // limiter's own (below) is the breaker.
                breaker.clone(),
                move |event| {
                    if let Some(shared) = events.upgrade() {
                        shared.on_connection_event(event);
                    }
                },
            );
            Shared {
                config: config.clone(),
                stats: stats.clone(),
                redis,
                breaker: RefCell::new(breaker),
                warn: RefCell::new(WarnThrottle::new(
                    u64::try_from(config.warn_interval.as_millis()).unwrap_or(u64::MAX),
                )),
                key: RefCell::new(String::with_capacity(64)),
                leases: RefCell::new(HashMap::new()),
                sha: redis::Script::new(SCRIPT).get_hash().to_string(),
                ttl_arg: KEY_TTL_MS.to_string(),
                clock,
                started: std::time::Instant::now(),
            }
        });
        Self {
            config,
            stats,
            shared,
        }
    }

    pub fn stats(&self) -> Arc<RateLimitStats> {
        self.stats.clone()
    }

    /// Count one request of `org` against `limit` per minute.
    pub async fn check(&self, org: &Uuid, limit: u32) -> RateDecision {
        let s = &self.shared;
        s.stats.checks.fetch_add(1, Relaxed);
        let wall = u64::try_from(s.clock.unix_ms()).unwrap_or(0);
        let window = Window::at(wall);
        if limit == 0 {
            s.stats.limited.fetch_add(1, Relaxed);
            return window.refuse_all(limit);
        }
        let deadline = monoio::time::Instant::now() + self.config.timeout;
        let mut first = true;
        loop {
            let step = s.step(org, &window, wall, limit, first);
            first = false;
            match step {
                Step::Admit(remaining) => return window.admit(limit, remaining),
                Step::Refuse => {
                    s.stats.limited.fetch_add(1, Relaxed);
                    return window.decide(u64::from(limit) + 1, limit);
                }
                Step::Direct => return self.direct(org, window, limit).await,
                Step::FailOpen(failure) => return s.fail_open(window, limit, failure, s.mono_ms()),
                Step::Wait(rx) => match monoio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(()))) | Ok(Err(_)) => {} // decide again
                    Ok(Ok(Err(failure))) => {
                        return s.fail_open(window, limit, failure, s.mono_ms())
                    }
                    Err(_) => return s.fail_open(window, limit, Failure::Timeout, s.mono_ms()),
                },
            }
        }
    }

    /// One check counted alone in Redis: exactly what every check did before
    /// leases, and still what a slow org's checks do.
    async fn direct(&self, org: &Uuid, window: Window, limit: u32) -> RateDecision {
        let s = &self.shared;
        let now = s.mono_ms();
        let permit = s.breaker.borrow_mut().permit(now);
        s.publish_breaker();
        if permit == Permit::Reject {
            return s.fail_open(window, limit, Failure::BreakerOpen, now);
        }
        match s.call(org, &window, 1, now).await {
            Ok(count) => {
                if let Some(entry) = s.leases.borrow_mut().get_mut(org) {
                    if entry.lease.window() == window.number {
                        entry.lease.note_count(count);
                    }
                }
                let decision = window.decide(count, limit);
                if !decision.admitted {
                    s.stats.limited.fetch_add(1, Relaxed);
                }
                decision
            }
            Err(failure) => s.fail_open(window, limit, failure, s.mono_ms()),
        }
    }

    /// Whether Redis answered recently (for `/ready`): connected (on a
    /// cluster: at least one master, see [`cluster::Client::healthy`]) and
    /// the breaker closed.
    pub fn healthy(&self) -> bool {
        self.shared.redis.healthy()
            && self.shared.breaker.borrow().state() == breaker::State::Closed
    }

    /// Whether the limiter found a Redis Cluster (tests, logs).
    pub fn is_cluster(&self) -> bool {
        self.shared.redis.is_cluster()
    }

    /// How many times the client read the cluster's slot map (tests).
    pub fn map_refreshes(&self) -> u64 {
        self.shared.redis.refreshes()
    }
}
