//! One count in Redis and what guards it: the `EVALSHA` (with `EVAL` on
//! `NOSCRIPT`) over the worker's pipelined connection to the key's master,
//! the per-call timeout, the circuit breaker fed by every outcome (on a
//! cluster, not by failures local to one master), and the throttled
//! fail-open warning.

use std::sync::atomic::Ordering::Relaxed;

use uuid::Uuid;

use super::cluster_map;
use super::conn::Event;
use super::decision::{Failure, RateDecision};
use super::resp::Frame;
use super::script::SCRIPT;
use super::state::Shared;
use super::window::Window;
use crate::http::ascii::Decimal;

impl Shared {
    /// Adds `n` to the window's count in Redis and returns the count,
    /// feeding the breaker and the error counter.
    pub(super) async fn call(
        &self,
        org: &Uuid,
        window: &Window,
        n: u64,
        now: u64,
    ) -> Result<u64, Failure> {
        match self.count(org, window, n, now).await {
            Ok(count) => {
                self.breaker.borrow_mut().on_success();
                self.publish_breaker();
                Ok(count)
            }
            Err(failure) => {
                let now = self.mono_ms();
                self.stats.redis_errors.fetch_add(1, Relaxed);
                // On a cluster each master has its own breaker (in the
                // client): one master's failures must not fail open the
                // slots of the others.
                if !self.redis.is_cluster() {
                    self.breaker.borrow_mut().on_failure(now);
                    self.publish_breaker();
                }
                if failure == Failure::Timeout {
                    // Redis kept the socket but stopped answering: start over.
                    self.redis
                        .reset_stalled(now, self.config.breaker_open.as_millis() as u64);
                }
                Err(failure)
            }
        }
    }

    /// Runs the script adding `n` and returns the window's count.
    async fn count(&self, org: &Uuid, window: &Window, n: u64, now: u64) -> Result<u64, Failure> {
        let units = Decimal::new(n);
        let deadline = monoio::time::Instant::now() + self.config.timeout;
        // The reused key buffer is taken out for the call (a concurrent
        // call makes its own) and put back after.
        let mut key = std::mem::take(&mut *self.key.borrow_mut());
        key.clear();
        window.write_key(org, &mut key);
        let slot = cluster_map::key_slot(key.as_bytes());
        let mut args: [&[u8]; 6] = [
            b"EVALSHA",
            self.sha.as_bytes(),
            b"1",
            key.as_bytes(),
            self.ttl_arg.as_bytes(),
            units.as_bytes(),
        ];
        let mut reply = self.redis.request(slot, &args, now, deadline).await;
        if reply.as_ref().is_ok_and(Frame::is_noscript) {
            // Redis restarted, its script cache was flushed, or a replica
            // was promoted: send the body, which also caches it for the
            // next EVALSHA.
            args[0] = b"EVAL";
            args[1] = SCRIPT.as_bytes();
            reply = self.redis.request(slot, &args, now, deadline).await;
        }
        *self.key.borrow_mut() = key;
        match reply? {
            Frame::Array(Some(items)) => match items.first() {
                Some(&Frame::Integer(count)) if count >= 1 => Ok(count as u64),
                _ => Err(Failure::BadReply),
            },
            Frame::Error(_) => Err(Failure::ErrorReply),
            _ => Err(Failure::BadReply),
        }
    }

    pub(super) fn fail_open(
        &self,
        window: Window,
        limit: u32,
        why: Failure,
        now: u64,
    ) -> RateDecision {
        self.stats.failed_open.fetch_add(1, Relaxed);
        if let Some(count) = self.warn.borrow_mut().note(now) {
            tracing::warn!(
                failed_open = count,
                reason = why.as_str(),
                "Redis unavailable: rate limiting is failing open"
            );
        }
        window.fail_open(limit)
    }

    pub(super) fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn publish_breaker(&self) {
        let state = self.breaker.borrow().state().as_metric();
        self.stats.breaker_state.store(state, Relaxed);
    }

    pub(super) fn on_connection_event(&self, event: Event<'_>) {
        match event {
            Event::Connected => tracing::info!("rate limiter connected to Redis"),
            Event::ConnectFailed(err) | Event::Lost(err) => {
                self.stats.redis_errors.fetch_add(1, Relaxed);
                // Shares the throttle with fail-open warnings: one line per
                // interval whatever the mix of causes.
                if let Some(count) = self.warn.borrow_mut().note(self.mono_ms()) {
                    tracing::warn!(events = count, error = %err, "Redis connection failed; rate limiting fails open until it is back");
                }
            }
        }
    }
}
