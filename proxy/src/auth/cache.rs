//! The per-worker token and agent caches: bounded, TTL'd, with separate
//! (smaller, shorter-lived) maps for refusals so a flood of bad credentials
//! can only evict other refusals, never the valid entries real clients use.
//!
//! Whether a positive entry may be *trusted* (feed freshness, resets) is
//! decided by [`super::core::AuthCore`]; these types only store.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::backend::{AgentAnswer, ValidToken};
use super::bounded::{BoundedMap, Expiring};
use super::secret::{DigestBuildHasher, TokenDigest};
use crate::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub positive_entries: usize,
    pub negative_entries: usize,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
}

impl CacheLimits {
    pub const TOKENS: CacheLimits = CacheLimits {
        positive_entries: 100_000,
        negative_entries: 10_000,
        positive_ttl: Duration::from_secs(300),
        negative_ttl: Duration::from_secs(2),
    };
    pub const AGENTS: CacheLimits = CacheLimits {
        positive_entries: 100_000,
        negative_entries: 10_000,
        positive_ttl: Duration::from_secs(300),
        negative_ttl: Duration::from_secs(2),
    };
}

/// A token authd vouched for, and when.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub token: ValidToken,
    /// When the validation that produced it *started* (conservative).
    pub validated_at: Instant,
    ttl_end: Instant,
}

impl Expiring for CachedToken {
    fn deadline(&self) -> Instant {
        self.ttl_end
    }
}

#[derive(Debug, Clone, Copy)]
struct Refusal {
    err: ApiError,
    until: Instant,
}

impl Expiring for Refusal {
    fn deadline(&self) -> Instant {
        self.until
    }
}

#[derive(Debug, Clone)]
pub enum TokenLookup {
    Positive(CachedToken),
    /// A refusal answered recently: INVALID_TOKEN, TOKEN_REVOKED or TOKEN_EXPIRED.
    Negative(ApiError),
    Miss,
}

pub struct TokenCache {
    limits: CacheLimits,
    positive: BoundedMap<TokenDigest, CachedToken, DigestBuildHasher>,
    negative: BoundedMap<TokenDigest, Refusal, DigestBuildHasher>,
    /// token id → digests of its cached bearer strings, for eviction by id.
    by_id: HashMap<Uuid, Vec<TokenDigest>, RandomState>,
}

impl TokenCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            positive: BoundedMap::new(limits.positive_entries),
            negative: BoundedMap::new(limits.negative_entries),
            by_id: HashMap::default(),
        }
    }

    pub fn lookup(&mut self, key: &TokenDigest, now: Instant) -> TokenLookup {
        if let Some(e) = self.positive.get(key) {
            if now < e.ttl_end {
                // A clone: an `Arc` increment at most (tokens without model lists carry none).
                return TokenLookup::Positive(e.clone());
            }
            self.remove_positive(key);
        }
        if let Some(r) = self.negative.get(key) {
            if now < r.until {
                return TokenLookup::Negative(r.err);
            }
            self.negative.remove(key);
        }
        TokenLookup::Miss
    }

    pub fn insert_valid(&mut self, key: TokenDigest, token: ValidToken, validated_at: Instant) {
        self.negative.remove(&key);
        let token_id = token.token_id;
        let entry = CachedToken {
            token,
            validated_at,
            ttl_end: validated_at + self.limits.positive_ttl,
        };
        if let Some(old) = self.positive.get(&key) {
            let old_id = old.token.token_id;
            if old_id != token_id {
                self.unindex(old_id, &key);
            }
        }
        if let Some((gone_key, gone)) = self.positive.insert(key, entry) {
            self.unindex(gone.token.token_id, &gone_key);
        }
        let digests = self.by_id.entry(token_id).or_default();
        if !digests.contains(&key) {
            digests.push(key);
        }
    }

    pub fn insert_refused(&mut self, key: TokenDigest, err: ApiError, now: Instant) {
        self.remove_positive(&key);
        self.negative.insert(
            key,
            Refusal {
                err,
                until: now + self.limits.negative_ttl,
            },
        );
    }

    /// Drops every cached bearer string of `token_id`; returns how many.
    pub fn evict_token(&mut self, token_id: &Uuid) -> usize {
        let digests = self.by_id.remove(token_id).unwrap_or_default();
        for d in &digests {
            self.positive.remove(d);
        }
        digests.len()
    }

    /// Drops every token of `org` (its limits or standing changed).
    pub fn evict_org(&mut self, org: &Uuid) -> usize {
        let gone = self.positive.retain(|_, e| e.token.org != *org);
        if !gone.is_empty() {
            // One pass over the index: keep only digests still cached.
            let positive = &self.positive;
            self.by_id.retain(|_, ds| {
                ds.retain(|d| positive.get(d).is_some());
                !ds.is_empty()
            });
        }
        gone.len()
    }

    pub fn len(&self) -> (usize, usize) {
        (self.positive.len(), self.negative.len())
    }

    fn remove_positive(&mut self, key: &TokenDigest) {
        if let Some(e) = self.positive.remove(key) {
            self.unindex(e.token.token_id, key);
        }
    }

    fn unindex(&mut self, token_id: Uuid, key: &TokenDigest) {
        if let Some(ds) = self.by_id.get_mut(&token_id) {
            ds.retain(|d| d != key);
            if ds.is_empty() {
                self.by_id.remove(&token_id);
            }
        }
    }

    #[cfg(test)]
    fn index_len(&self) -> usize {
        self.by_id.values().map(Vec::len).sum()
    }
}

/// An agent's standing, and when it was learned.
#[derive(Debug, Clone, Copy)]
pub struct CachedAgent {
    pub answer: AgentAnswer,
    pub validated_at: Instant,
    until: Instant,
}

impl Expiring for CachedAgent {
    fn deadline(&self) -> Instant {
        self.until
    }
}

type AgentKey = (Uuid, Uuid);

pub struct AgentCache {
    limits: CacheLimits,
    active: BoundedMap<AgentKey, CachedAgent, RandomState>,
    /// Not found, paused, archived, suspended: short-lived.
    inactive: BoundedMap<AgentKey, CachedAgent, RandomState>,
}

impl AgentCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            active: BoundedMap::new(limits.positive_entries),
            inactive: BoundedMap::new(limits.negative_entries),
        }
    }

    pub fn lookup(&mut self, org: Uuid, agent: Uuid, now: Instant) -> Option<CachedAgent> {
        let key = (org, agent);
        for map in [&mut self.active, &mut self.inactive] {
            if let Some(e) = map.get(&key) {
                if now < e.until {
                    return Some(*e);
                }
                map.remove(&key);
            }
        }
        None
    }

    pub fn insert(&mut self, org: Uuid, agent: Uuid, answer: AgentAnswer, validated_at: Instant) {
        let key = (org, agent);
        let (ttl, into, other) = match answer {
            AgentAnswer::Active(_) => (
                self.limits.positive_ttl,
                &mut self.active,
                &mut self.inactive,
            ),
            AgentAnswer::Inactive | AgentAnswer::NotFound => (
                self.limits.negative_ttl,
                &mut self.inactive,
                &mut self.active,
            ),
        };
        other.remove(&key);
        into.insert(
            key,
            CachedAgent {
                answer,
                validated_at,
                until: validated_at + ttl,
            },
        );
    }

    pub fn evict(&mut self, org: Uuid, agent: Uuid) -> bool {
        let a = self.active.remove(&(org, agent)).is_some();
        let b = self.inactive.remove(&(org, agent)).is_some();
        a || b
    }

    pub fn evict_org(&mut self, org: &Uuid) -> usize {
        self.active.retain(|k, _| k.0 != *org).len()
            + self.inactive.retain(|k, _| k.0 != *org).len()
    }

    pub fn len(&self) -> (usize, usize) {
        (self.active.len(), self.inactive.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> TokenDigest {
        TokenDigest([n; 32])
    }

    fn valid(org: u128, id: u128) -> ValidToken {
        ValidToken {
            org: Uuid::from_u128(org),
            token_id: Uuid::from_u128(id),
            permissions: 3,
            expires_at_ms: None,
            agent: None,
            rpm: 0,
            models: None,
            limits: Default::default(),
        }
    }

    fn small() -> CacheLimits {
        CacheLimits {
            positive_entries: 8,
            negative_entries: 4,
            positive_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(2),
        }
    }

    #[test]
    fn hit_miss_and_ttl() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        assert!(matches!(c.lookup(&digest(1), t0), TokenLookup::Miss));
        c.insert_valid(digest(1), valid(1, 10), t0);
        assert!(
            matches!(c.lookup(&digest(1), t0), TokenLookup::Positive(e) if e.token.token_id == Uuid::from_u128(10))
        );
        assert!(matches!(c.lookup(&digest(2), t0), TokenLookup::Miss));
        assert!(matches!(
            c.lookup(&digest(1), t0 + Duration::from_secs(300)),
            TokenLookup::Miss
        ));
        assert_eq!(c.index_len(), 0);
    }

    #[test]
    fn negative_entries_expire_quickly() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        c.insert_refused(digest(1), ApiError::InvalidToken, t0);
        assert!(matches!(
            c.lookup(&digest(1), t0 + Duration::from_millis(1999)),
            TokenLookup::Negative(ApiError::InvalidToken)
        ));
        assert!(matches!(
            c.lookup(&digest(1), t0 + Duration::from_secs(2)),
            TokenLookup::Miss
        ));
    }

    #[test]
    fn refusal_flood_cannot_evict_valid_entries() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        for i in 0..8 {
            c.insert_valid(digest(i), valid(1, u128::from(i)), t0);
        }
        for i in 100..=255 {
            c.insert_refused(digest(i), ApiError::InvalidToken, t0);
        }
        assert_eq!(c.len(), (8, 4));
        for i in 0..8 {
            assert!(matches!(c.lookup(&digest(i), t0), TokenLookup::Positive(_)));
        }
    }

    #[test]
    fn bounded_and_index_follows_evictions() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        for i in 0..100u8 {
            c.insert_valid(digest(i), valid(1, u128::from(i)), t0);
            assert!(c.len().0 <= 8);
        }
        assert_eq!(c.index_len(), 8);
    }

    #[test]
    fn evict_by_token_id_drops_every_digest() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        c.insert_valid(digest(1), valid(1, 10), t0);
        c.insert_valid(digest(2), valid(1, 10), t0);
        c.insert_valid(digest(3), valid(1, 11), t0);
        assert_eq!(c.evict_token(&Uuid::from_u128(10)), 2);
        assert!(matches!(c.lookup(&digest(1), t0), TokenLookup::Miss));
        assert!(matches!(c.lookup(&digest(2), t0), TokenLookup::Miss));
        assert!(matches!(c.lookup(&digest(3), t0), TokenLookup::Positive(_)));
    }

    #[test]
    fn evict_org() {
        let t0 = Instant::now();
        let mut c = TokenCache::new(small());
        c.insert_valid(digest(1), valid(1, 10), t0);
        c.insert_valid(digest(2), valid(2, 20), t0);
        assert_eq!(c.evict_org(&Uuid::from_u128(1)), 1);
        assert!(matches!(c.lookup(&digest(1), t0), TokenLookup::Miss));
        assert!(matches!(c.lookup(&digest(2), t0), TokenLookup::Positive(_)));
        assert_eq!(c.index_len(), 1);
    }

    #[test]
    fn agents_active_and_inactive() {
        let t0 = Instant::now();
        let (o, a, b) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut c = AgentCache::new(small());
        c.insert(o, a, AgentAnswer::Active(Default::default()), t0);
        c.insert(o, b, AgentAnswer::NotFound, t0);
        assert_eq!(
            c.lookup(o, a, t0).map(|e| e.answer),
            Some(AgentAnswer::Active(Default::default()))
        );
        assert_eq!(
            c.lookup(o, b, t0).map(|e| e.answer),
            Some(AgentAnswer::NotFound)
        );
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            c.lookup(o, a, later).map(|e| e.answer),
            Some(AgentAnswer::Active(Default::default()))
        );
        assert!(c.lookup(o, b, later).is_none());
        // A status change replaces the other map's entry.
        c.insert(o, a, AgentAnswer::Inactive, later);
        assert_eq!(
            c.lookup(o, a, later).map(|e| e.answer),
            Some(AgentAnswer::Inactive)
        );
        assert!(c.evict(o, a));
        assert!(c.lookup(o, a, later).is_none());
    }
}
