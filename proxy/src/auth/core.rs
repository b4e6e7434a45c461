//! One worker's auth state: caches, single-flight tables and what the
//! invalidation feed has told this worker. Shared by the chain and the
//! worker's feed task through an `Rc`; nothing a cache hit touches is seen by
//! another thread, so a hit costs no lock and no atomic. The failure budget
//! and the verified set ([`super::budget`]) are the proxy's, shared by every
//! worker, and touched only when a request is refused or must ask authd.
//!
//! Trust rule for a cached *positive* entry (valid token, active agent):
//! it was learned (its validation started) after the last reset (feed reconnect/overflow), and either
//! the feed is fresh (a heartbeat *sent* within `IBEX_REVOCATION_SLA_MS`,
//! dated by the earlier of its receipt and authd's own timestamp) or the
//! entry itself is younger than the SLA. With several authd (SPEC §6) each
//! feed sends its own heartbeats and the newest one counts: *at least one*
//! feed fresh is enough, because every authd LISTENs to the same NOTIFY, so
//! any one feed that is complete up to a heartbeat carries every revocation
//! committed before it. A feed that reconnects resets (a gap in that stream
//! must not be vouched for by its next heartbeat). An untrusted entry is re-validated
//! with authd; if authd cannot answer the request fails closed with 503.
//! Refusals are always trusted: they only ever fail closed.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::backend::{AgentAnswer, Answer, TokenAnswer};
use super::budget::{FailureBudget, Verified};
use super::cache::{AgentCache, CacheLimits, TokenCache};
use super::flight::SingleFlight;
use super::recent::RecentEvents;
use super::secret::{DigestBuildHasher, TokenDigest};
use crate::clock::Clock;
use crate::ctx::WorkerCtx;
use crate::error::ApiError;
use crate::metrics::WorkerMetrics;

/// Ids remembered by [`RecentEvents`] per worker (then stale ones are dropped).
const RECENT_EVENTS_CAP: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// `IBEX_REVOCATION_SLA_MS`.
    pub revocation_sla: Duration,
    /// `IBEX_AUTH_VALIDATE_TIMEOUT`.
    pub validate_timeout: Duration,
    pub tokens: CacheLimits,
    pub agents: CacheLimits,
    /// Client addresses tracked by the failure budget (the whole proxy).
    pub guard_entries: usize,
    /// Credentials (tokens, `(org, agent)` pairs) remembered as verified.
    pub verified_entries: usize,
}

impl AuthSettings {
    pub fn new(revocation_sla: Duration, validate_timeout: Duration) -> Self {
        Self {
            revocation_sla,
            validate_timeout,
            tokens: CacheLimits::TOKENS,
            agents: CacheLimits::AGENTS,
            guard_entries: 65_536,
            verified_entries: 65_536,
        }
    }
}

/// What every worker of one proxy shares for the failure budget of SPEC §3.
#[derive(Clone)]
pub struct AuthShared {
    pub budget: Arc<FailureBudget>,
    pub verified: Arc<Verified>,
}

impl AuthShared {
    pub fn new(settings: &AuthSettings) -> Self {
        Self {
            budget: FailureBudget::new(settings.guard_entries),
            verified: Verified::new(settings.verified_entries),
        }
    }
}

/// What the invalidation feed delivers to each worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedEvent {
    /// Every invalidation authd committed before `sent_at_unix_ms` (authd's
    /// wall clock; 0 = undated) has been delivered ahead of this event.
    Heartbeat {
        sent_at_unix_ms: i64,
    },
    /// Events may have been missed (stream (re)opened, a queue overflowed):
    /// nothing learned before now is trusted any more.
    Reset,
    Token {
        org: Uuid,
        token_id: Uuid,
    },
    Agent {
        org: Uuid,
        agent: Uuid,
    },
    Org {
        org: Uuid,
    },
}

pub struct AuthCore {
    pub(super) clock: Rc<dyn Clock>,
    pub(super) settings: AuthSettings,
    pub(super) tokens: RefCell<TokenCache>,
    pub(super) agents: RefCell<AgentCache>,
    pub(super) shared: AuthShared,
    pub(super) token_flights: SingleFlight<TokenDigest, Answer<TokenAnswer>, DigestBuildHasher>,
    pub(super) agent_flights: SingleFlight<(Uuid, Uuid), Answer<AgentAnswer>, RandomState>,
    pub(super) metrics: Arc<WorkerMetrics>,
    /// Ids named by recent events: valid answers about them are not cached
    /// until every authd has surely applied the change (see `recent`).
    pub(super) recent: RefCell<RecentEvents>,
    /// The freshness instant of the newest heartbeat (see [`Self::apply`]).
    last_heartbeat: Cell<Option<Instant>>,
    /// Last "heartbeat arrived late" warning (at most one a minute).
    late_warned: Cell<Option<Instant>>,
    /// The last reset; entries validated before (or at) it are not trusted.
    trusted_since: Cell<Option<Instant>>,
    /// Bumped by every eviction or reset; a validation that started under an
    /// older epoch is used for its own request but not cached.
    epoch: Cell<u64>,
}

impl AuthCore {
    /// Takes the worker's clock and counters from `ctx`; a failure budget of
    /// its own (one worker alone, as in tests and benches).
    pub fn new(ctx: &WorkerCtx, settings: AuthSettings) -> Rc<Self> {
        Self::with_shared(ctx, settings, AuthShared::new(&settings))
    }

    /// One worker of a proxy whose workers share `shared`.
    pub fn with_shared(ctx: &WorkerCtx, settings: AuthSettings, shared: AuthShared) -> Rc<Self> {
        Rc::new(Self {
            clock: ctx.clock.clone(),
            settings,
            tokens: RefCell::new(TokenCache::new(settings.tokens)),
            agents: RefCell::new(AgentCache::new(settings.agents)),
            shared,
            token_flights: SingleFlight::new(),
            agent_flights: SingleFlight::new(),
            metrics: ctx.metrics.clone(),
            recent: RefCell::new(RecentEvents::new(
                settings.revocation_sla,
                RECENT_EVENTS_CAP,
            )),
            last_heartbeat: Cell::new(None),
            late_warned: Cell::new(None),
            trusted_since: Cell::new(None),
            epoch: Cell::new(0),
        })
    }

    /// The proxy-wide failure budget and verified set this worker uses.
    pub fn shared(&self) -> &AuthShared {
        &self.shared
    }

    /// A heartbeat arrived within the SLA: every invalidation committed
    /// before it has reached this worker.
    pub fn feed_fresh(&self, now: Instant) -> bool {
        self.last_heartbeat
            .get()
            .is_some_and(|t| now.saturating_duration_since(t) <= self.settings.revocation_sla)
    }

    pub(super) fn trusts(&self, validated_at: Instant, now: Instant) -> bool {
        self.trusted_since
            .get()
            .is_none_or(|reset| validated_at > reset)
            && (self.feed_fresh(now)
                || now.saturating_duration_since(validated_at) < self.settings.revocation_sla)
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// Applies one feed event to this worker's caches.
    pub fn apply(&self, event: FeedEvent) {
        let now = self.clock.now();
        if !matches!(event, FeedEvent::Heartbeat { .. }) {
            self.epoch.set(self.epoch.get() + 1);
            self.metrics.feed_events.inc();
        }
        match event {
            FeedEvent::Heartbeat { sent_at_unix_ms } => {
                let Some(at) = self.heartbeat_instant(sent_at_unix_ms, now) else {
                    return;
                };
                if self.last_heartbeat.get().is_none_or(|last| at > last) {
                    self.last_heartbeat.set(Some(at));
                }
            }
            FeedEvent::Reset => {
                self.trusted_since.set(Some(now));
                self.metrics.feed_resets.inc();
            }
            FeedEvent::Token { token_id, .. } => {
                self.tokens.borrow_mut().evict_token(&token_id);
                self.recent.borrow_mut().note_token(token_id, now);
            }
            FeedEvent::Agent { org, agent } => {
                self.agents.borrow_mut().evict(org, agent);
                self.recent.borrow_mut().note_agent(org, agent, now);
            }
            FeedEvent::Org { org } => {
                self.tokens.borrow_mut().evict_org(&org);
                self.agents.borrow_mut().evict_org(&org);
                self.recent.borrow_mut().note_org(org, now);
            }
        }
    }

    /// When a heartbeat proves the feed complete up to, on this worker's
    /// monotonic clock: the earlier of its receipt (`now`) and its sending
    /// (authd's `sent_at` mapped through `now_wall - sent_at`). Dating it at
    /// receipt alone would let a late-delivered heartbeat (a queue backlog,
    /// a stalled stream) stretch trust past the SLA after authd died.
    /// A `sent_at` in our future (clock skew) or undated (0) falls back to
    /// receipt. `None`: sent too long ago to be represented — ignored.
    fn heartbeat_instant(&self, sent_at_unix_ms: i64, now: Instant) -> Option<Instant> {
        let age_ms = self.clock.unix_ms_at(now).saturating_sub(sent_at_unix_ms);
        if sent_at_unix_ms <= 0 || age_ms <= 0 {
            return Some(now);
        }
        let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(u64::MAX));
        if age > self.settings.revocation_sla && self.should_warn_late(now) {
            tracing::warn!(
                age_ms,
                sla_ms =
                    u64::try_from(self.settings.revocation_sla.as_millis()).unwrap_or(u64::MAX),
                "authd heartbeat arrived older than IBEX_REVOCATION_SLA_MS \
                 (delivery backlog, or this host's clock ahead of authd's); \
                 cached credentials are re-validated"
            );
        }
        now.checked_sub(age)
    }

    fn should_warn_late(&self, now: Instant) -> bool {
        const EVERY: Duration = Duration::from_secs(60);
        let due = self
            .late_warned
            .get()
            .is_none_or(|t| now.saturating_duration_since(t) >= EVERY);
        if due {
            self.late_warned.set(Some(now));
        }
        due
    }

    /// The answer for a bad credential guess from `peer`: 429 once the
    /// address is over its failure budget, else 401 INVALID_TOKEN (counted).
    pub(super) fn refuse_guess(&self, peer: IpAddr, now: Instant) -> ApiError {
        self.refuse_counted(peer, now, ApiError::InvalidToken)
    }

    /// The answer for an agent refused as AGENT_NOT_AUTHORIZED (unknown, of
    /// another org, not the bound one): counted like a token guess (SPEC §3).
    pub(super) fn refuse_agent(&self, peer: IpAddr, now: Instant) -> ApiError {
        self.refuse_counted(peer, now, ApiError::AgentNotAuthorized)
    }

    fn refuse_counted(&self, peer: IpAddr, now: Instant, err: ApiError) -> ApiError {
        if self.shared.budget.spend(peer, now) {
            self.metrics.flood_guard_refusals.inc();
            return ApiError::RateLimited;
        }
        err
    }

    /// An unknown credential authd declined to decide (saturated by cold
    /// validations, or the id throttled): 503, and counted against `peer`'s
    /// failure budget. Without the count, a flood of fresh random tokens that
    /// saturates authd would only ever see 503s, never be throttled, and keep
    /// authd's Argon2 pool busy for every other tenant. authd unreachable is
    /// not counted: that is an outage, not a guess.
    pub(super) fn refuse_undecided(&self, peer: IpAddr, now: Instant) -> ApiError {
        self.shared.budget.spend(peer, now);
        ApiError::AuthUnavailable
    }

    /// Whether `peer` has spent its failure budget (counted as a refusal).
    pub(super) fn guard_blocks(&self, peer: IpAddr, now: Instant) -> bool {
        let blocked = self.shared.budget.is_spent(peer, now);
        if blocked {
            self.metrics.flood_guard_refusals.inc();
        }
        blocked
    }

    /// Whether an unknown token from `peer` may cost an authd call: yes
    /// unless the address spent its budget and no worker of this proxy has
    /// verified this very token.
    pub(super) fn may_ask_for_token(&self, peer: IpAddr, key: &TokenDigest, now: Instant) -> bool {
        if !self.shared.budget.is_spent(peer, now) || self.shared.verified.has_token(key, now) {
            return true;
        }
        self.metrics.flood_guard_refusals.inc();
        false
    }

    /// The same for an agent lookup: an agent verified for this org passes.
    pub(super) fn may_ask_for_agent(
        &self,
        peer: IpAddr,
        org: Uuid,
        agent: Uuid,
        now: Instant,
    ) -> bool {
        if !self.shared.budget.is_spent(peer, now)
            || self.shared.verified.has_agent(org, agent, now)
        {
            return true;
        }
        self.metrics.flood_guard_refusals.inc();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    const SLA: Duration = Duration::from_millis(300);

    /// A heartbeat authd sent just now.
    fn hb(clock: &FakeClock) -> FeedEvent {
        FeedEvent::Heartbeat {
            sent_at_unix_ms: clock.unix_ms(),
        }
    }

    fn core() -> (Rc<AuthCore>, Rc<FakeClock>) {
        let clock = Rc::new(FakeClock::new(0));
        let core = AuthCore::new(
            &WorkerCtx::new(0, clock.clone()),
            AuthSettings::new(SLA, Duration::from_millis(50)),
        );
        (core, clock)
    }

    #[test]
    fn heartbeat_freshness_decides_trust_in_old_entries() {
        let (core, clock) = core();
        let validated = clock.now();
        // No heartbeat yet: only entries younger than the SLA are trusted.
        assert!(!core.feed_fresh(clock.now()));
        assert!(core.trusts(validated, clock.now()));
        clock.advance(SLA);
        assert!(!core.trusts(validated, clock.now()));
        // A heartbeat makes every entry trusted again…
        core.apply(hb(&clock));
        assert!(core.trusts(validated, clock.now()));
        // …until the feed has been silent for longer than the SLA.
        clock.advance(SLA);
        assert!(core.trusts(validated, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(!core.feed_fresh(clock.now()));
        assert!(!core.trusts(validated, clock.now()));
    }

    #[test]
    fn one_live_feed_of_two_keeps_trust() {
        let (core, clock) = core();
        let validated = clock.now();
        // Two feeds heartbeat every 100 ms; then feed B's authd dies and
        // only A's heartbeats arrive. Trust never lapses.
        for _ in 0..3 {
            core.apply(hb(&clock)); // A
            core.apply(hb(&clock)); // B
            clock.advance(Duration::from_millis(100));
        }
        for _ in 0..10 {
            core.apply(hb(&clock)); // A only
            clock.advance(Duration::from_millis(100));
            assert!(core.feed_fresh(clock.now()));
            assert!(core.trusts(validated, clock.now()));
        }
        // Both silent: trust lapses after the SLA, as with one feed.
        clock.advance(SLA);
        assert!(!core.trusts(validated, clock.now()));
        // B reconnecting resets: what was learned before is re-validated
        // even though A's heartbeats are fresh again.
        core.apply(hb(&clock));
        assert!(core.trusts(validated, clock.now()));
        clock.advance(Duration::from_millis(1));
        core.apply(FeedEvent::Reset);
        core.apply(hb(&clock));
        assert!(!core.trusts(validated, clock.now()));
    }

    #[test]
    fn a_late_heartbeat_is_dated_when_authd_sent_it() {
        let (core, clock) = core();
        let validated = clock.now();
        clock.advance(SLA);
        // Sent 200 ms ago (authd's clock), delivered only now: the feed is
        // known complete up to 200 ms ago, so fresh for 100 ms more.
        let sent = clock.unix_ms() - 200;
        core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: sent,
        });
        assert!(core.feed_fresh(clock.now()));
        clock.advance(Duration::from_millis(100));
        assert!(core.feed_fresh(clock.now()));
        assert!(core.trusts(validated, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(!core.feed_fresh(clock.now()));
        assert!(!core.trusts(validated, clock.now()));
        // One sent longer ago than the SLA proves nothing fresh at all.
        core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: clock.unix_ms() - 301,
        });
        assert!(!core.feed_fresh(clock.now()));
    }

    #[test]
    fn a_heartbeat_from_the_future_or_undated_counts_from_receipt() {
        let (core, clock) = core();
        // authd's clock 5 s ahead of ours: never later than receipt.
        core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: clock.unix_ms() + 5_000,
        });
        clock.advance(SLA);
        assert!(core.feed_fresh(clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(!core.feed_fresh(clock.now()));
        core.apply(FeedEvent::Heartbeat { sent_at_unix_ms: 0 });
        clock.advance(SLA);
        assert!(core.feed_fresh(clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(!core.feed_fresh(clock.now()));
    }

    #[test]
    fn an_older_heartbeat_does_not_move_freshness_back() {
        let (core, clock) = core();
        core.apply(hb(&clock));
        core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: clock.unix_ms() - 250,
        });
        clock.advance(SLA);
        assert!(core.feed_fresh(clock.now()));
    }

    #[test]
    fn reset_distrusts_everything_learned_before_it() {
        let (core, clock) = core();
        core.apply(hb(&clock));
        let before = clock.now();
        clock.advance(Duration::from_millis(1));
        core.apply(FeedEvent::Reset);
        core.apply(hb(&clock));
        assert!(!core.trusts(before, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(core.trusts(clock.now(), clock.now()));
    }

    #[test]
    fn every_invalidation_bumps_the_epoch_heartbeats_do_not() {
        let (core, clock) = core();
        let e0 = core.epoch();
        core.apply(hb(&clock));
        assert_eq!(core.epoch(), e0);
        let (org, id) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for ev in [
            FeedEvent::Token { org, token_id: id },
            FeedEvent::Agent { org, agent: id },
            FeedEvent::Org { org },
            FeedEvent::Reset,
        ] {
            let before = core.epoch();
            core.apply(ev);
            assert_eq!(core.epoch(), before + 1, "{ev:?}");
        }
    }
}
