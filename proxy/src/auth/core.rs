//! One worker's auth state: caches, flood guard, single-flight tables and
//! what the invalidation feed has told this worker. Shared by the chain and
//! the worker's feed task through an `Rc`; nothing here is touched by another
//! thread, so a cache hit costs no lock and no atomic.
//!
//! Trust rule for a cached *positive* entry (valid token, active agent):
//! it was learned (its validation started) after the last reset (feed reconnect/overflow), and either
//! the feed is fresh (a heartbeat within `IBEX_REVOCATION_SLA_MS`) or the
//! entry itself is younger than the SLA. An untrusted entry is re-validated
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
use super::cache::{AgentCache, CacheLimits, TokenCache};
use super::clock::Clock;
use super::flight::SingleFlight;
use super::guard::FailureGuard;
use super::secret::{DigestBuildHasher, TokenDigest};
use crate::error::ApiError;
use crate::metrics::WorkerMetrics;

#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// `IBEX_REVOCATION_SLA_MS`.
    pub revocation_sla: Duration,
    /// `IBEX_AUTH_VALIDATE_TIMEOUT`.
    pub validate_timeout: Duration,
    pub tokens: CacheLimits,
    pub agents: CacheLimits,
    /// Client addresses tracked by the flood guard.
    pub guard_entries: usize,
}

impl AuthSettings {
    pub fn new(revocation_sla: Duration, validate_timeout: Duration) -> Self {
        Self {
            revocation_sla,
            validate_timeout,
            tokens: CacheLimits::TOKENS,
            agents: CacheLimits::AGENTS,
            guard_entries: 65_536,
        }
    }
}

/// What the invalidation feed delivers to each worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedEvent {
    Heartbeat,
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
    pub(super) guard: RefCell<FailureGuard>,
    pub(super) token_flights: SingleFlight<TokenDigest, Answer<TokenAnswer>, DigestBuildHasher>,
    pub(super) agent_flights: SingleFlight<(Uuid, Uuid), Answer<AgentAnswer>, RandomState>,
    pub(super) metrics: Arc<WorkerMetrics>,
    last_heartbeat: Cell<Option<Instant>>,
    /// The last reset; entries validated before (or at) it are not trusted.
    trusted_since: Cell<Option<Instant>>,
    /// Bumped by every eviction or reset; a validation that started under an
    /// older epoch is used for its own request but not cached.
    epoch: Cell<u64>,
}

impl AuthCore {
    pub fn new(
        clock: Rc<dyn Clock>,
        settings: AuthSettings,
        metrics: Arc<WorkerMetrics>,
    ) -> Rc<Self> {
        Rc::new(Self {
            clock,
            settings,
            tokens: RefCell::new(TokenCache::new(settings.tokens)),
            agents: RefCell::new(AgentCache::new(settings.agents)),
            guard: RefCell::new(FailureGuard::new(settings.guard_entries)),
            token_flights: SingleFlight::new(),
            agent_flights: SingleFlight::new(),
            metrics,
            last_heartbeat: Cell::new(None),
            trusted_since: Cell::new(None),
            epoch: Cell::new(0),
        })
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
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
        if event != FeedEvent::Heartbeat {
            self.epoch.set(self.epoch.get() + 1);
            self.metrics.feed_events.inc();
        }
        match event {
            FeedEvent::Heartbeat => self.last_heartbeat.set(Some(now)),
            FeedEvent::Reset => {
                self.trusted_since.set(Some(now));
                self.metrics.feed_resets.inc();
            }
            FeedEvent::Token { token_id, .. } => {
                self.tokens.borrow_mut().evict_token(&token_id);
            }
            FeedEvent::Agent { org, agent } => {
                self.agents.borrow_mut().evict(org, agent);
            }
            FeedEvent::Org { org } => {
                self.tokens.borrow_mut().evict_org(&org);
                self.agents.borrow_mut().evict_org(&org);
            }
        }
    }

    /// The answer for a bad credential guess from `peer`: 429 once the
    /// address is over its failure budget, else 401 INVALID_TOKEN (counted).
    pub(super) fn refuse_guess(&self, peer: IpAddr, now: Instant) -> ApiError {
        let mut guard = self.guard.borrow_mut();
        if guard.is_blocked(peer, now) {
            self.metrics.flood_guard_refusals.inc();
            return ApiError::RateLimited;
        }
        guard.record_failure(peer, now);
        ApiError::InvalidToken
    }

    /// Whether `peer` may spend an authd call on an unknown credential.
    pub(super) fn guard_blocks(&self, peer: IpAddr, now: Instant) -> bool {
        let blocked = self.guard.borrow().is_blocked(peer, now);
        if blocked {
            self.metrics.flood_guard_refusals.inc();
        }
        blocked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::clock::FakeClock;

    const SLA: Duration = Duration::from_millis(300);

    fn core() -> (Rc<AuthCore>, Rc<FakeClock>) {
        let clock = Rc::new(FakeClock::new(0));
        let core = AuthCore::new(
            clock.clone(),
            AuthSettings::new(SLA, Duration::from_millis(50)),
            Arc::new(WorkerMetrics::default()),
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
        core.apply(FeedEvent::Heartbeat);
        assert!(core.trusts(validated, clock.now()));
        // …until the feed has been silent for longer than the SLA.
        clock.advance(SLA);
        assert!(core.trusts(validated, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(!core.feed_fresh(clock.now()));
        assert!(!core.trusts(validated, clock.now()));
    }

    #[test]
    fn reset_distrusts_everything_learned_before_it() {
        let (core, clock) = core();
        core.apply(FeedEvent::Heartbeat);
        let before = clock.now();
        clock.advance(Duration::from_millis(1));
        core.apply(FeedEvent::Reset);
        core.apply(FeedEvent::Heartbeat);
        assert!(!core.trusts(before, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(core.trusts(clock.now(), clock.now()));
    }

    #[test]
    fn every_invalidation_bumps_the_epoch_heartbeats_do_not() {
        let (core, _clock) = core();
        let e0 = core.epoch();
        core.apply(FeedEvent::Heartbeat);
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
