//! Other scripts over the limiter's own Redis client (the token limiter's,
//! [`crate::tokens`]): the same per-worker pipelined connection (one per
//! master on a cluster), the same per-call timeout and circuit breaker, so a
//! dead Redis fails token limits open exactly as it fails request limits.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use super::breaker::Permit;
use super::cluster_map;
use super::decision::Failure;
pub use super::resp::Frame;
use super::state::Shared;
use super::RateLimiter;

/// A Lua script and its SHA-1 (for `EVALSHA`).
pub struct Script {
    pub body: &'static str,
    pub sha: String,
}

impl Script {
    pub fn new(body: &'static str) -> Self {
        Self {
            body,
            sha: redis::Script::new(body).get_hash().to_string(),
        }
    }
}

/// A handle on the worker's limiter connection for other scripts.
#[derive(Clone)]
pub struct Runner {
    shared: Rc<Shared>,
}

impl RateLimiter {
    /// A handle sharing this limiter's connection, timeout and breaker.
    pub fn runner(&self) -> Runner {
        Runner {
            shared: self.shared.clone(),
        }
    }
}

impl Runner {
    /// Runs `script` (`EVALSHA`, `EVAL` on `NOSCRIPT`) on `keys` — all of one
    /// hash slot, that of `keys[0]` — with `args`. `Err` names why Redis
    /// could not answer (the caller fails open); counted in the limiter's
    /// `redis_errors` and fed to its breaker.
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Frame, &'static str> {
        let s = &self.shared;
        let now = s.mono_ms();
        if !s.redis.is_cluster() {
            let permit = s.breaker.borrow_mut().permit(now);
            s.publish_breaker();
            if permit == Permit::Reject {
                return Err(Failure::BreakerOpen.as_str());
            }
        }
        let Some(first) = keys.first() else {
            return Err(Failure::BadReply.as_str());
        };
        let slot = cluster_map::key_slot(first);
        let nkeys = crate::http::ascii::Decimal::new(keys.len() as u64);
        let mut cmd: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        cmd.extend_from_slice(&[b"EVALSHA", script.sha.as_bytes(), nkeys.as_bytes()]);
        cmd.extend_from_slice(keys);
        cmd.extend_from_slice(args);
        let deadline = monoio::time::Instant::now() + s.config.timeout;
        let mut reply = s.redis.request(slot, &cmd, now, deadline).await;
        if reply.as_ref().is_ok_and(Frame::is_noscript) {
            cmd[0] = b"EVAL";
            cmd[1] = script.body.as_bytes();
            reply = s.redis.request(slot, &cmd, now, deadline).await;
        }
        let failure = match reply {
            Ok(Frame::Error(_)) => Failure::ErrorReply,
            Ok(frame) => {
                s.breaker.borrow_mut().on_success();
                s.publish_breaker();
                return Ok(frame);
            }
            Err(e) => Failure::from(e),
        };
        let now = s.mono_ms();
        s.stats.redis_errors.fetch_add(1, Relaxed);
        if !s.redis.is_cluster() {
            s.breaker.borrow_mut().on_failure(now);
            s.publish_breaker();
        }
        if failure == Failure::Timeout {
            s.redis
                .reset_stalled(now, s.config.breaker_open.as_millis() as u64);
        }
        Err(failure.as_str())
    }

    /// The limiter's throttled "failing open" warning and counter, shared.
    pub fn note_fail_open(&self, why: &'static str) {
        let s = &self.shared;
        s.stats.failed_open.fetch_add(1, Relaxed);
        if let Some(count) = s.warn.borrow_mut().note(s.mono_ms()) {
            tracing::warn!(
                failed_open = count,
                reason = why,
                "Redis unavailable: token limits are failing open"
            );
        }
    }
}
