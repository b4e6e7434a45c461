//! The verified-token cache: keeps Argon2 off every repeated validation.
//!
//! An entry is stored under the token's id and holds the SHA-256 of the whole token string that
//! verified; a lookup succeeds only when the presented token's digest matches it, compared in
//! constant time. So the id alone never unlocks anything, and one id holds one entry.
//!
//! Entries are bounded by `moka`'s TinyLFU policy: a newcomer is admitted over an existing entry
//! only if it has been asked for more often, so one org churning through thousands of new tokens
//! (each validated once or twice) cannot flush the tokens every other org validates all the time
//! (`cache_resists_one_orgs_churn` measures it). Each entry lives at most `max_age`
//! (`IBEX_AUTHD_CACHE_MAX_AGE`), so a change made without the NOTIFY triggers is seen within it.
//! A token change (an UPDATE or DELETE of its row: revoked, rotated, deleted) does not remove the
//! entry but marks it *stale*: the next hit re-reads the row (no Argon2) and answers from it if
//! the stored hash is still the one that verified. So a revoked token is answered REVOKED in one
//! row read instead of a full verify (tens of ms: most of the time a revocation took to reach
//! the proxies), and only for a presented token whose digest matches one that verified (SPEC §3:
//! REVOKED is never told before the secret verified). A stale entry whose row says anything but
//! valid stays stale; a valid re-read clears the mark.
//! Entries are removed by the invalidation feed: an org change (its rpm budget) or
//! a feed reconnect (events may have been missed). Every removal bumps an epoch under a write
//! lock; a cold validation inserts only if the epoch is unchanged since it read the database
//! (checked and inserted under the read lock), so an invalidation that raced with it can never be
//! undone by a stale insert. Lookups take no lock of ours. Expiry is re-checked by the caller on
//! every hit.

use std::sync::RwLock;
use std::time::Duration;

use moka::sync::Cache;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::pat::TokenDigest;

/// What a verified token grants; what `ValidateToken` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub token_id: Uuid,
    pub org_id: Uuid,
    pub permissions: u64,
    pub agent_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// Unix milliseconds; `None` = never.
    pub expires_at_ms: Option<i64>,
    pub rpm_limit: u32,
    /// The token's model allow-list (normalised; empty = every model), SPEC §12.
    pub allowed_models: Vec<String>,
    /// The org's model allow-list (normalised; empty = every model).
    pub org_allowed_models: Vec<String>,
    /// The org's token limits (SPEC §11).
    pub limits: crate::limits::OrgTokenLimits,
}

impl VerifiedToken {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

#[derive(Clone)]
struct Entry {
    digest: TokenDigest,
    /// SHA-256 of the stored PHC string that verified; lets a re-check without Argon2 tell
    /// whether the secret was rotated since.
    hash_fp: [u8; 32],
    token: VerifiedToken,
    /// The row changed since it verified: re-read it before answering.
    stale: bool,
}

/// A cache hit: the token, plus the fingerprint of the hash it verified against.
#[derive(Debug, Clone)]
pub struct Hit {
    pub token: VerifiedToken,
    pub hash_fp: [u8; 32],
    /// The row changed since: answer only from a fresh read of it.
    pub stale: bool,
}

pub struct VerifiedCache {
    entries: Cache<Uuid, Entry>,
    /// Invalidation epoch; write-locked by removals, read-locked by checked inserts.
    epoch: RwLock<u64>,
}

impl VerifiedCache {
    /// A cache holding at most `capacity` entries, each for at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        VerifiedCache {
            entries: Cache::builder()
                .max_capacity(u64::try_from(capacity).unwrap_or(u64::MAX))
                .time_to_live(max_age)
                .support_invalidation_closures()
                .build(),
            epoch: RwLock::new(0),
        }
    }

    /// The entry for `id` if `digest` is the digest that verified.
    pub fn get(&self, id: Uuid, digest: &TokenDigest) -> Option<Hit> {
        let entry = self.entries.get(&id)?;
        bool::from(entry.digest.ct_eq(digest)).then_some(Hit {
            token: entry.token,
            hash_fp: entry.hash_fp,
            stale: entry.stale,
        })
    }

    /// The current invalidation epoch; pass it to [`VerifiedCache::insert_if_current`].
    pub fn epoch(&self) -> u64 {
        // A panic while holding the lock leaves nothing half-done (the epoch is one integer).
        *self.epoch.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts unless an invalidation happened since `epoch` was read. Returns whether it did.
    pub fn insert_if_current(
        &self,
        epoch: u64,
        digest: TokenDigest,
        hash_fp: [u8; 32],
        token: VerifiedToken,
    ) -> bool {
        self.insert_checked(epoch, digest, hash_fp, token, false)
    }

    /// [`VerifiedCache::insert_if_current`], the entry marked stale when `stale` (a token that
    /// verified but is revoked or expired: answered from a re-read of its row next time).
    pub fn insert_checked(
        &self,
        epoch: u64,
        digest: TokenDigest,
        hash_fp: [u8; 32],
        token: VerifiedToken,
        stale: bool,
    ) -> bool {
        let current = self.epoch.read().unwrap_or_else(|e| e.into_inner());
        if *current != epoch {
            return false;
        }
        let entry = Entry {
            digest,
            hash_fp,
            token,
            stale,
        };
        self.entries.insert(entry.token.token_id, entry);
        true
    }

    fn removal(&self) -> std::sync::RwLockWriteGuard<'_, u64> {
        let mut epoch = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        *epoch += 1;
        epoch
    }

    pub fn invalidate_token(&self, id: Uuid) {
        let _epoch = self.removal();
        self.entries.invalidate(&id);
    }

    /// The token's row changed: its entry (if any) answers only after a re-read of the row from
    /// now on. Bumps the epoch like a removal, so a validation that read the row before cannot
    /// put a fresh entry back.
    pub fn mark_stale(&self, id: Uuid) {
        let _epoch = self.removal();
        if let Some(mut entry) = self.entries.get(&id) {
            entry.stale = true;
            self.entries.insert(id, entry);
        }
    }

    pub fn invalidate_org(&self, org_id: Uuid) {
        let _epoch = self.removal();
        // Entries inserted before this call that match are never returned again.
        if self
            .entries
            .invalidate_entries_if(move |_, e| e.token.org_id == org_id)
            .is_err()
        {
            self.entries.invalidate_all();
        }
    }

    pub fn clear(&self) {
        let _epoch = self.removal();
        self.entries.invalidate_all();
    }

    /// Entries held (after pending maintenance; for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries.run_pending_tasks();
        usize::try_from(self.entries.entry_count()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(org: Uuid) -> VerifiedToken {
        VerifiedToken {
            token_id: Uuid::new_v4(),
            org_id: org,
            permissions: 3,
            agent_id: None,
            user_id: None,
            expires_at_ms: None,
            rpm_limit: 600,
            allowed_models: Vec::new(),
            org_allowed_models: Vec::new(),
            limits: Default::default(),
        }
    }

    #[test]
    fn hit_needs_the_matching_digest() {
        let cache = VerifiedCache::new(16, Duration::from_secs(600));
        let t = token(Uuid::new_v4());
        assert!(cache.insert_if_current(cache.epoch(), [1; 32], [9; 32], t.clone()));
        let hit = cache.get(t.token_id, &[1; 32]).expect("hit");
        assert_eq!(hit.token, t);
        assert_eq!(hit.hash_fp, [9; 32]);
        assert!(
            cache.get(t.token_id, &[2; 32]).is_none(),
            "same id, other secret"
        );
        assert!(cache.get(Uuid::new_v4(), &[1; 32]).is_none());
    }

    #[test]
    fn invalidation_removes_and_blocks_racing_inserts() {
        let cache = VerifiedCache::new(16, Duration::from_secs(600));
        let org = Uuid::new_v4();
        let (a, b) = (token(org), token(Uuid::new_v4()));
        let epoch = cache.epoch();
        cache.insert_if_current(epoch, [1; 32], [0; 32], a.clone());
        cache.insert_if_current(epoch, [2; 32], [0; 32], b.clone());
        cache.invalidate_token(a.token_id);
        assert!(cache.get(a.token_id, &[1; 32]).is_none());
        assert!(cache.get(b.token_id, &[2; 32]).is_some());
        // A validation that read the row before the invalidation must not re-insert it.
        assert!(!cache.insert_if_current(epoch, [1; 32], [0; 32], a.clone()));
        assert!(cache.get(a.token_id, &[1; 32]).is_none());

        let epoch = cache.epoch();
        cache.insert_if_current(epoch, [1; 32], [0; 32], a.clone());
        cache.invalidate_org(org);
        assert!(cache.get(a.token_id, &[1; 32]).is_none());
        assert!(cache.get(b.token_id, &[2; 32]).is_some());
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_changed_token_stays_cached_but_stale() {
        let cache = VerifiedCache::new(16, Duration::from_secs(600));
        let t = token(Uuid::new_v4());
        let epoch = cache.epoch();
        cache.insert_if_current(epoch, [1; 32], [9; 32], t.clone());
        assert!(!cache.get(t.token_id, &[1; 32]).unwrap().stale);
        cache.mark_stale(t.token_id);
        let hit = cache.get(t.token_id, &[1; 32]).expect("kept");
        assert!(hit.stale);
        assert_eq!(hit.hash_fp, [9; 32]);
        assert!(
            cache.get(t.token_id, &[2; 32]).is_none(),
            "still needs the digest"
        );
        // A validation that read the row before the change cannot make it fresh again…
        assert!(!cache.insert_if_current(epoch, [1; 32], [9; 32], t.clone()));
        assert!(cache.get(t.token_id, &[1; 32]).unwrap().stale);
        // …one that read it after can.
        assert!(cache.insert_if_current(cache.epoch(), [1; 32], [9; 32], t.clone()));
        assert!(!cache.get(t.token_id, &[1; 32]).unwrap().stale);
        // Marking an id not cached adds nothing.
        cache.mark_stale(Uuid::new_v4());
        assert_eq!(cache.len(), 1);
    }

    /// Active tokens validated a few times, then one org creates and validates `churn` new
    /// tokens once each; returns how many of the 500 active entries are still cached.
    fn survivors(capacity: usize, churn: usize) -> usize {
        let cache = VerifiedCache::new(capacity, Duration::from_secs(600));
        let active: Vec<VerifiedToken> = (0..500).map(|_| token(Uuid::new_v4())).collect();
        for t in &active {
            cache.insert_if_current(cache.epoch(), [7; 32], [0; 32], t.clone());
        }
        for _ in 0..4 {
            for t in &active {
                assert!(cache.get(t.token_id, &[7; 32]).is_some());
            }
        }
        let churner = Uuid::new_v4();
        for _ in 0..churn {
            let t = token(churner);
            cache.insert_if_current(cache.epoch(), [1; 32], [0; 32], t.clone());
            let _ = cache.get(t.token_id, &[1; 32]);
        }
        assert!(cache.len() <= capacity);
        active
            .iter()
            .filter(|t| cache.get(t.token_id, &[7; 32]).is_some())
            .count()
    }

    #[test]
    fn cache_resists_one_orgs_churn() {
        // The case scaled down: 50k new tokens against a 100k cache is churn of half the
        // capacity; the old two-generation cache lost every entry not touched during it. Twice the
        // capacity must still leave the active entries; far more ages the frequency sketch.
        let capacity = 1_000;
        for churn in [capacity / 2, capacity * 2, capacity * 5, capacity * 20] {
            println!(
                "capacity {capacity}: {} of 500 active entries kept after {churn} churn inserts",
                survivors(capacity, churn)
            );
        }
        let kept = survivors(capacity, capacity * 2);
        assert!(
            kept >= 450,
            "only {kept}/500 active entries survived the churn"
        );
    }

    #[test]
    fn entries_expire_after_the_max_age() {
        let cache = VerifiedCache::new(16, Duration::from_millis(50));
        let t = token(Uuid::new_v4());
        cache.insert_if_current(cache.epoch(), [1; 32], [0; 32], t.clone());
        assert!(cache.get(t.token_id, &[1; 32]).is_some());
        let start = std::time::Instant::now();
        while cache.get(t.token_id, &[1; 32]).is_some() {
            assert!(start.elapsed() < Duration::from_secs(10), "never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn expiry_is_checked_against_the_given_clock() {
        let mut t = token(Uuid::new_v4());
        assert!(!t.is_expired(i64::MAX));
        t.expires_at_ms = Some(1_000);
        assert!(!t.is_expired(999));
        assert!(t.is_expired(1_000));
    }
}
