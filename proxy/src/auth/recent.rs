//! Ids named by recent invalidation events, so a *valid* answer about one of
//! them is not cached until every authd has surely seen the change.
//!
//! Why: authd evicts its own verified cache before it publishes an event, so
//! a proxy whose feed and validations reach the same authd can re-validate
//! right away. But SPEC §1 allows many authd instances behind one address,
//! and the feed and the validations use separate connections: the event may
//! come from authd A while the re-validation lands on authd B, which has not
//! yet processed the NOTIFY and answers VALID from its own cache. Caching that
//! answer would keep a revoked token working until the next event about it.
//! Within the settle window such answers are still *used* (the request was
//! sent within the revocation SLA of the change) but not cached, so the next
//! request asks again.
//!
//! Bounded: past `cap` ids the stale ones are dropped; if that is not enough
//! the whole map is cleared and nothing valid is cached for one window
//! (conservative, never unsafe).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

pub struct RecentEvents {
    settle: Duration,
    cap: usize,
    tokens: HashMap<Uuid, Instant>,
    agents: HashMap<(Uuid, Uuid), Instant>,
    orgs: HashMap<Uuid, Instant>,
    /// After an overflow: nothing is settled before this instant.
    overflow_until: Option<Instant>,
}

impl RecentEvents {
    pub fn new(settle: Duration, cap: usize) -> Self {
        Self {
            settle,
            cap: cap.max(1),
            tokens: HashMap::new(),
            agents: HashMap::new(),
            orgs: HashMap::new(),
            overflow_until: None,
        }
    }

    pub fn note_token(&mut self, token_id: Uuid, now: Instant) {
        self.tokens.insert(token_id, now);
        self.bound(now);
    }

    pub fn note_agent(&mut self, org: Uuid, agent: Uuid, now: Instant) {
        self.agents.insert((org, agent), now);
        self.bound(now);
    }

    pub fn note_org(&mut self, org: Uuid, now: Instant) {
        self.orgs.insert(org, now);
        self.bound(now);
    }

    /// Whether a valid answer about this token may be cached at `now`.
    pub fn token_settled(&self, org: Uuid, token_id: Uuid, now: Instant) -> bool {
        self.quiet(now)
            && self.settled(self.tokens.get(&token_id), now)
            && self.settled(self.orgs.get(&org), now)
    }

    /// Whether an "active" answer about this agent may be cached at `now`.
    pub fn agent_settled(&self, org: Uuid, agent: Uuid, now: Instant) -> bool {
        self.quiet(now)
            && self.settled(self.agents.get(&(org, agent)), now)
            && self.settled(self.orgs.get(&org), now)
    }

    fn quiet(&self, now: Instant) -> bool {
        self.overflow_until.is_none_or(|until| now >= until)
    }

    fn settled(&self, noted: Option<&Instant>, now: Instant) -> bool {
        noted.is_none_or(|&at| now.saturating_duration_since(at) >= self.settle)
    }

    fn len(&self) -> usize {
        self.tokens.len() + self.agents.len() + self.orgs.len()
    }

    fn bound(&mut self, now: Instant) {
        if self.len() <= self.cap {
            return;
        }
        let settle = self.settle;
        let fresh = |at: &mut Instant| now.saturating_duration_since(*at) < settle;
        self.tokens.retain(|_, at| fresh(at));
        self.agents.retain(|_, at| fresh(at));
        self.orgs.retain(|_, at| fresh(at));
        if self.len() > self.cap {
            self.tokens.clear();
            self.agents.clear();
            self.orgs.clear();
            self.overflow_until = Some(now + settle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(300);

    fn ids() -> (Uuid, Uuid) {
        (Uuid::new_v4(), Uuid::new_v4())
    }

    #[test]
    fn a_noted_token_is_unsettled_for_the_window_only() {
        let t0 = Instant::now();
        let mut r = RecentEvents::new(SETTLE, 16);
        let (org, tok) = ids();
        assert!(r.token_settled(org, tok, t0));
        r.note_token(tok, t0);
        assert!(!r.token_settled(org, tok, t0 + Duration::from_millis(299)));
        assert!(r.token_settled(org, tok, t0 + SETTLE));
        // Other tokens are unaffected.
        assert!(r.token_settled(org, Uuid::new_v4(), t0));
    }

    #[test]
    fn agents_and_orgs() {
        let t0 = Instant::now();
        let mut r = RecentEvents::new(SETTLE, 16);
        let (org, agent) = ids();
        r.note_agent(org, agent, t0);
        assert!(!r.agent_settled(org, agent, t0));
        assert!(
            r.agent_settled(Uuid::new_v4(), agent, t0),
            "keyed by (org, agent)"
        );
        let tok = Uuid::new_v4();
        r.note_org(org, t0);
        assert!(
            !r.token_settled(org, tok, t0),
            "an org event covers its tokens"
        );
        assert!(!r.agent_settled(org, Uuid::new_v4(), t0), "and its agents");
        assert!(r.token_settled(org, tok, t0 + SETTLE));
    }

    #[test]
    fn bounded_and_conservative_on_overflow() {
        let t0 = Instant::now();
        let mut r = RecentEvents::new(SETTLE, 4);
        // Stale entries are dropped first.
        for _ in 0..4 {
            r.note_token(Uuid::new_v4(), t0);
        }
        let later = t0 + SETTLE;
        r.note_token(Uuid::new_v4(), later);
        assert_eq!(r.len(), 1);
        assert!(r.quiet(later));
        // Too many fresh ones (the 5th over a cap of 4): everything is
        // unsettled for one window.
        for _ in 0..4 {
            r.note_token(Uuid::new_v4(), later);
        }
        assert_eq!(r.len(), 0);
        let (org, tok) = ids();
        assert!(!r.token_settled(org, tok, later + Duration::from_millis(1)));
        assert!(r.token_settled(org, tok, later + SETTLE));
    }
}
