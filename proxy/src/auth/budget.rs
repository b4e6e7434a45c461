//! The failure budget of SPEC §3, shared by every worker of one proxy: the
//! per-address failure windows ([`FailureBudget`]) and the credentials this
//! proxy has verified on any worker ([`Verified`]), which pass even from an
//! address whose budget is spent.
//!
//! Both are touched only off the hot path — when a credential was refused,
//! when a cache miss is about to cost an authd call, and when authd said a
//! credential is valid — so a few mutex-guarded shards are enough: a request
//! whose token and agent are cached on its worker never reads them (measured
//! against one shared cache in `bench/benches/shared_cache.rs`, see
//! `perf/results/failure-budget.md`).
//!
//! Not here: what counts as a failure (the auth steps decide) and the
//! per-worker caches that answer cached requests.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::bounded::{BoundedMap, Expiring};
use super::guard::FailureGuard;
use super::secret::TokenDigest;
use crate::addr::bucket;

/// Shards per table: more than the cores a proxy runs on, so two workers
/// failing at once rarely meet on one lock.
const SHARDS: usize = 16;
/// How long "this proxy verified it" lasts after the last valid answer.
pub const VERIFIED_FOR: Duration = Duration::from_secs(24 * 60 * 60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a map update that cannot panic halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `N` mutex-guarded shards, picked by the key's hash.
struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
    hasher: RandomState,
}

impl<T> Sharded<T> {
    fn new(make: impl Fn() -> T) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(make())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &impl Hash) -> MutexGuard<'_, T> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        lock(&self.shards[i])
    }

    fn sum(&self, f: impl Fn(&T) -> usize) -> usize {
        self.shards.iter().map(|s| f(&lock(s))).sum()
    }
}

/// Failures per client address (IPv4, IPv6 /64), across all workers.
pub struct FailureBudget {
    windows: Sharded<FailureGuard>,
}

impl FailureBudget {
    /// `cap`: addresses tracked in all (a flood from more evicts the windows
    /// closest to ending).
    pub fn new(cap: usize) -> Arc<Self> {
        let per_shard = cap.div_ceil(SHARDS).max(1);
        Arc::new(Self {
            windows: Sharded::new(|| FailureGuard::new(per_shard)),
        })
    }

    /// Whether `peer` has spent its budget in the current window.
    pub fn is_spent(&self, peer: IpAddr, now: Instant) -> bool {
        self.windows.shard(&bucket(peer)).is_blocked(peer, now)
    }

    /// Counts one refused request from `peer`; true when the budget was
    /// already spent (the request is answered 429 instead).
    pub fn spend(&self, peer: IpAddr, now: Instant) -> bool {
        let mut windows = self.windows.shard(&bucket(peer));
        if windows.is_blocked(peer, now) {
            return true;
        }
        windows.record_failure(peer, now);
        false
    }

    pub fn tracked(&self) -> usize {
        self.windows.sum(FailureGuard::tracked)
    }
}

#[derive(Clone, Copy)]
struct Seen(Instant);

impl Expiring for Seen {
    fn deadline(&self) -> Instant {
        self.0
    }
}

type SeenMap<K> = BoundedMap<K, Seen, RandomState>;

/// Tokens (by digest of the whole token) and `(org, agent)` pairs authd
/// answered valid to any worker of this proxy within [`VERIFIED_FOR`].
/// Membership only lets a request past a spent failure budget to authd or
/// the cache; it never admits anything by itself.
pub struct Verified {
    tokens: Sharded<SeenMap<TokenDigest>>,
    agents: Sharded<SeenMap<(Uuid, Uuid)>>,
}

impl Verified {
    pub fn new(cap: usize) -> Arc<Self> {
        let per_shard = cap.div_ceil(SHARDS).max(1);
        Arc::new(Self {
            tokens: Sharded::new(|| BoundedMap::new(per_shard)),
            agents: Sharded::new(|| BoundedMap::new(per_shard)),
        })
    }

    pub fn add_token(&self, key: TokenDigest, now: Instant) {
        self.tokens
            .shard(&key)
            .insert(key, Seen(now + VERIFIED_FOR));
    }

    pub fn has_token(&self, key: &TokenDigest, now: Instant) -> bool {
        self.tokens
            .shard(key)
            .get(key)
            .is_some_and(|seen| now < seen.0)
    }

    pub fn add_agent(&self, org: Uuid, agent: Uuid, now: Instant) {
        let key = (org, agent);
        self.agents
            .shard(&key)
            .insert(key, Seen(now + VERIFIED_FOR));
    }

    pub fn has_agent(&self, org: Uuid, agent: Uuid, now: Instant) -> bool {
        let key = (org, agent);
        self.agents
            .shard(&key)
            .get(&key)
            .is_some_and(|seen| now < seen.0)
    }

    /// `(tokens, agents)` remembered.
    pub fn len(&self) -> (usize, usize) {
        (
            self.tokens.sum(BoundedMap::len),
            self.agents.sum(BoundedMap::len),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::guard::FAILURE_LIMIT;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_budget_for_every_worker() {
        let budget = FailureBudget::new(1000);
        let t0 = Instant::now();
        let a = ip("10.1.0.1");
        // Two "workers" share one Arc: their failures add up.
        let (w1, w2) = (budget.clone(), budget.clone());
        for i in 0..FAILURE_LIMIT {
            let worker = if i % 2 == 0 { &w1 } else { &w2 };
            assert!(!worker.spend(a, t0), "refused after {i}");
        }
        assert!(w1.is_spent(a, t0) && w2.is_spent(a, t0));
        assert!(w2.spend(a, t0), "past the budget: 429");
        assert!(!budget.is_spent(ip("10.1.0.2"), t0));
        // IPv6 per /64 lands in one shard.
        for i in 0..FAILURE_LIMIT {
            budget.spend(ip(&format!("2001:db8:9:9::{:x}", i + 1)), t0);
        }
        assert!(budget.is_spent(ip("2001:db8:9:9::abcd"), t0));
    }

    #[test]
    fn spent_budget_ends_with_its_window() {
        let budget = FailureBudget::new(1000);
        let t0 = Instant::now();
        let a = ip("10.1.0.3");
        for _ in 0..FAILURE_LIMIT {
            budget.spend(a, t0);
        }
        assert!(budget.is_spent(a, t0 + Duration::from_secs(59)));
        assert!(!budget.is_spent(a, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn verified_credentials_are_remembered_across_workers_and_bounded() {
        let verified = Verified::new(64);
        let t0 = Instant::now();
        let key = TokenDigest([7; 32]);
        let (org, agent) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(!verified.has_token(&key, t0));
        verified.clone().add_token(key, t0);
        verified.clone().add_agent(org, agent, t0);
        assert!(verified.has_token(&key, t0 + Duration::from_secs(3600)));
        assert!(verified.has_agent(org, agent, t0));
        assert!(
            !verified.has_agent(agent, org, t0),
            "the pair, not either id"
        );
        assert!(!verified.has_token(&key, t0 + VERIFIED_FOR));
        for i in 0..10_000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            verified.add_token(TokenDigest(d), t0);
        }
        let (tokens, _) = verified.len();
        assert!(tokens <= 64 + SHARDS, "bounded: {tokens}");
    }
}
