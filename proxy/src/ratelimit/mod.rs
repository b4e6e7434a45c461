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
//! ([`breaker`]) turn a dead or slow Redis into an immediate fail-open.
//! Window arithmetic is in [`window`], the wire format in [`resp`].
//!
//! Needs a monoio runtime with the timer enabled (`enable_timer()`).

pub mod breaker;
pub mod cluster;
pub mod cluster_map;
pub mod conn;
pub mod lease;
pub mod resp;
pub mod window;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use self::breaker::{Breaker, Permit, WarnThrottle};
use self::cluster::{CallError, Client};
use self::conn::{DriveTiming, Event};
use self::lease::{Lease, MAX_ENTRIES};
use self::resp::Frame;
use self::window::{Window, KEY_TTL_MS};

/// The counter script. `KEYS[1]` the window's key, `ARGV[1]` its expiry in
/// ms, `ARGV[2]` how many units to add (1 when absent). Returns
/// `{count, pttl}`. The expiry is set when the key is created, and re-set if
/// a key somehow has none, so no counter outlives its window by more than
/// the grace second.
pub const SCRIPT: &str = "\
local n = tonumber(ARGV[2]) or 1
local c = redis.call('INCRBY', KEYS[1], n)
if c == n then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local t = redis.call('PTTL', KEYS[1])
if t < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); t = tonumber(ARGV[1]) end
return {c, t}
";

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
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5);

    /// Defaults for everything but the URL.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            timeout: Self::DEFAULT_TIMEOUT,
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

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self::new("redis://127.0.0.1:6379/0")
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
    pub checks: std::sync::atomic::AtomicU64,
    pub limited: std::sync::atomic::AtomicU64,
    pub redis_errors: std::sync::atomic::AtomicU64,
    pub failed_open: std::sync::atomic::AtomicU64,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: std::sync::atomic::AtomicU64,
}

/// Why a check could not use Redis (for the throttled warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
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
    fn as_str(self) -> &'static str {
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

    /// Failures that concern one slot or one master of a cluster and cost
    /// no wait: they must not open the breaker for every other slot.
    fn is_local(self) -> bool {
        matches!(
            self,
            Failure::NotConnected | Failure::ConnectionLost | Failure::SlotDown
        )
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

type Clock = Rc<dyn Fn() -> u64>;

/// How an acquisition ended, told to the checks waiting for it.
type Outcome = Result<(), Failure>;

/// One org's lease on this worker and the checks waiting for its
/// acquisition in flight.
struct Entry {
    lease: Lease,
    waiters: Vec<futures::channel::oneshot::Sender<Outcome>>,
}

/// What a check does next, decided without awaiting.
enum Step {
    /// Admitted from the lease, with this remaining.
    Admit(u32),
    /// The budget is spent in this window.
    Refuse,
    /// Count this check alone in Redis (no lease).
    Direct,
    /// Wait for the acquisition in flight, then decide again.
    Wait(futures::channel::oneshot::Receiver<Outcome>),
    FailOpen(Failure),
}

struct Shared {
    config: Rc<RateLimitConfig>,
    stats: Arc<RateLimitStats>,
    /// One server or a cluster; dropping it stops its connections.
    redis: Client,
    breaker: RefCell<Breaker>,
    warn: RefCell<WarnThrottle>,
    /// Reused buffer for the key of the check being sent (taken out for
    /// the call; a concurrent call makes its own).
    key: RefCell<String>,
    /// Leases by org, bounded by [`MAX_ENTRIES`].
    leases: RefCell<HashMap<Uuid, Entry>>,
    sha: String,
    ttl_arg: String,
    /// Wall clock (unix ms): decides the window and times the rate that
    /// sizes leases (a clock going back only restarts the measurement).
    clock: Clock,
    /// Monotonic origin for the breaker, the throttle and queue ages, which
    /// must not jump with (or be frozen by) the wall clock.
    started: std::time::Instant,
}

pub struct RateLimiter {
    config: Rc<RateLimitConfig>,
    stats: Arc<RateLimitStats>,
    shared: Rc<Shared>,
}

impl RateLimiter {
    /// Called on the worker thread, inside its monoio runtime.
    pub fn new(config: Rc<RateLimitConfig>) -> Self {
        Self::with_clock(config, Rc::new(unix_now_ms))
    }

    /// Like [`RateLimiter::new`] with the wall clock replaced (tests):
    /// `clock()` returns unix milliseconds and decides the window and the
    /// rate measurement behind lease sizes (a frozen clock never leases);
    /// timeouts and the breaker run on monotonic time.
    pub fn with_clock(config: Rc<RateLimitConfig>, clock: Rc<dyn Fn() -> u64>) -> Self {
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
        let shared = Rc::new_cyclic(|me: &std::rc::Weak<Shared>| {
            let events = me.clone();
            let redis = Client::start(
                seeds,
                Rc::from(SCRIPT),
                timing,
                config.max_pending,
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
                breaker: RefCell::new(Breaker::new(
                    config.breaker_failures,
                    u64::try_from(config.breaker_open.as_millis()).unwrap_or(u64::MAX),
                    timeout_ms.saturating_mul(2).max(10),
                )),
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
        let wall = (s.clock)();
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
    /// cluster: every slot has a master, each connected) and the breaker
    /// closed.
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

impl Shared {
    /// The local part of a check: use the lease, or say what to wait for.
    /// Never awaits, so no borrow is held across a suspension point.
    fn step(
        self: &Rc<Self>,
        org: &Uuid,
        window: &Window,
        wall: u64,
        limit: u32,
        first: bool,
    ) -> Step {
        let mut map = self.leases.borrow_mut();
        if !map.contains_key(org) {
            lease::make_room(
                &mut map,
                MAX_ENTRIES,
                window.number,
                |e: &Entry| e.lease.window(),
                |e: &Entry| e.lease.in_flight(),
            );
        }
        let entry = map.entry(*org).or_insert_with(|| Entry {
            lease: Lease::new(window.number, wall),
            waiters: Vec::new(),
        });
        if entry.lease.window() != window.number {
            // Waiters of the old window's acquisition decide again.
            entry.lease.roll(window.number);
            entry.waiters.clear();
        }
        if first {
            entry.lease.observe(wall);
        }
        if entry.lease.take() {
            let remaining = entry.lease.remaining(limit);
            if let Some(n) = entry.lease.prefetch(limit) {
                if self.breaker.borrow_mut().permit(self.mono_ms()) != Permit::Reject {
                    entry.lease.begin();
                    monoio::spawn(self.clone().acquire(*org, *window, n, limit));
                }
                self.publish_breaker();
            }
            return Step::Admit(remaining);
        }
        if entry.lease.size() > 1 && entry.lease.exhausted(limit) {
            return Step::Refuse;
        }
        if entry.lease.in_flight() {
            let (tx, rx) = futures::channel::oneshot::channel();
            entry.waiters.push(tx);
            return Step::Wait(rx);
        }
        let n = entry.lease.want(limit);
        if n <= 1 {
            return Step::Direct;
        }
        let permit = self.breaker.borrow_mut().permit(self.mono_ms());
        self.publish_breaker();
        if permit == Permit::Reject {
            return Step::FailOpen(Failure::BreakerOpen);
        }
        entry.lease.begin();
        let (tx, rx) = futures::channel::oneshot::channel();
        entry.waiters.push(tx);
        // In its own task, so a check whose future is dropped cannot leave
        // the acquisition (and its waiters) hanging.
        monoio::spawn(self.clone().acquire(*org, *window, n, limit));
        Step::Wait(rx)
    }

    /// Leases `n` units of `org`'s `window` and wakes the checks waiting.
    async fn acquire(self: Rc<Self>, org: Uuid, window: Window, n: u64, limit: u32) {
        let outcome = self.call(&org, &window, n, self.mono_ms()).await;
        let waiters = {
            let mut map = self.leases.borrow_mut();
            match map.get_mut(&org) {
                Some(entry) if entry.lease.window() == window.number => {
                    match outcome {
                        Ok(count) => {
                            entry.lease.apply(window.number, count, n, limit);
                        }
                        Err(_) => entry.lease.abort(window.number),
                    }
                    std::mem::take(&mut entry.waiters)
                }
                // Evicted or rolled over: the units are lost (conservative).
                _ => Vec::new(),
            }
        };
        let outcome = outcome.map(|_| ());
        for waiter in waiters {
            let _ = waiter.send(outcome);
        }
    }

    /// Adds `n` to the window's count in Redis and returns the count,
    /// feeding the breaker and the error counter.
    async fn call(&self, org: &Uuid, window: &Window, n: u64, now: u64) -> Result<u64, Failure> {
        match self.count(org, window, n, now).await {
            Ok(count) => {
                self.breaker.borrow_mut().on_success();
                self.publish_breaker();
                Ok(count)
            }
            Err(failure) => {
                let now = self.mono_ms();
                self.stats.redis_errors.fetch_add(1, Relaxed);
                if !(failure.is_local() && self.redis.is_cluster()) {
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
        let units = itoa_u64(n);
        let deadline = monoio::time::Instant::now() + self.config.timeout;
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

    fn fail_open(&self, window: Window, limit: u32, why: Failure, now: u64) -> RateDecision {
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

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn publish_breaker(&self) {
        let state = self.breaker.borrow().state().as_metric();
        self.stats.breaker_state.store(state, Relaxed);
    }

    fn on_connection_event(&self, event: Event<'_>) {
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

/// `n` in decimal without allocating.
fn itoa_u64(mut n: u64) -> ItoaBuf {
    let mut buf = ItoaBuf {
        bytes: [0; 20],
        start: 20,
    };
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return buf;
        }
    }
}

struct ItoaBuf {
    bytes: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_config_hides_a_password_in_the_url() {
        let cfg = RateLimitConfig::new("redis://:hunter2@127.0.0.1:6379/0");
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(format!("{:?}", RateLimitConfig::new("redis://127.0.0.1:1/2")).contains(":1/2"));
        assert!(cfg.validate().is_ok());
        assert!(RateLimitConfig::new("http://x").validate().is_err());
    }

    #[test]
    fn units_are_written_in_decimal() {
        for n in [0u64, 1, 9, 10, 64, 1234, u64::MAX] {
            assert_eq!(itoa_u64(n).as_bytes(), n.to_string().as_bytes());
        }
    }

    #[test]
    fn script_hash_is_stable_sha1() {
        let sha = redis::Script::new(SCRIPT).get_hash().to_string();
        assert_eq!(sha.len(), 40);
        assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
