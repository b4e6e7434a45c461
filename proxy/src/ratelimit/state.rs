//! The limiter's per-worker state: what its checks share with the tasks
//! they spawn. The behaviour on it is in [`super::admit`] (the local step)
//! and [`super::call`] (the Redis call); [`super::RateLimiter`] is its face.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;
use uuid::Uuid;

use super::breaker::{Breaker, WarnThrottle};
use super::cluster::Client;
use super::config::RateLimitConfig;
use super::decision::{Failure, RateLimitStats};
use super::lease::Lease;
use crate::clock::Clock;

/// How an acquisition ended, told to the checks waiting for it.
pub(super) type Outcome = Result<(), Failure>;

/// One org's lease on this worker and the checks waiting for its
/// acquisition in flight.
pub(super) struct Entry {
    pub(super) lease: Lease,
    pub(super) waiters: Vec<oneshot::Sender<Outcome>>,
}

/// One worker's limiter state, shared by its checks and the tasks they
/// spawn (acquisitions, the connection's events).
pub(super) struct Shared {
    pub(super) config: Rc<RateLimitConfig>,
    pub(super) stats: Arc<RateLimitStats>,
    /// One server or a cluster; dropping it stops its connections.
    pub(super) redis: Client,
    pub(super) breaker: RefCell<Breaker>,
    pub(super) warn: RefCell<WarnThrottle>,
    /// Reused buffer for the key of the check being sent (taken out for
    /// the call; a concurrent call makes its own).
    pub(super) key: RefCell<String>,
    /// Leases by org, bounded by [`super::lease::MAX_ENTRIES`].
    pub(super) leases: RefCell<HashMap<Uuid, Entry>>,
    pub(super) sha: String,
    pub(super) ttl_arg: String,
    /// The worker's injected clock; its wall time (unix ms) decides the
    /// window and times the rate that sizes leases (a clock going back only
    /// restarts the measurement).
    pub(super) clock: Rc<dyn Clock>,
    /// Monotonic origin for the breaker, the throttle and queue ages: they
    /// pace I/O against the runtime's real timers, so they must not jump
    /// with (or be frozen by) the injected clock.
    pub(super) started: std::time::Instant,
}
