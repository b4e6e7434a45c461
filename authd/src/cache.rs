//! The verified-token cache: keeps Argon2 off every repeated validation.
//!
//! An entry is stored under the token's id and holds the SHA-256 of the whole token string that
//! verified; a lookup succeeds only when the presented token's digest matches it, compared in
//! constant time. So the id alone never unlocks anything, and one id holds one entry.
//!
//! Entries are bounded (two generations of at most `capacity / 2` each: when the young one fills,
//! the old one is dropped — a cheap approximation of LRU with O(1) work per call) and are removed
//! by the invalidation feed: a token change, an org change (its rpm budget) or a feed reconnect
//! (events may have been missed). Every removal bumps an epoch; a cold validation inserts only if
//! the epoch is unchanged since it read the database, so an invalidation that raced with it can
//! never be undone by a stale insert. Expiry is re-checked by the caller on every hit.

use std::collections::HashMap;
use std::sync::Mutex;

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
}

/// A cache hit: the token, plus the fingerprint of the hash it verified against.
#[derive(Debug, Clone)]
pub struct Hit {
    pub token: VerifiedToken,
    pub hash_fp: [u8; 32],
}

#[derive(Default)]
struct Inner {
    young: HashMap<Uuid, Entry>,
    old: HashMap<Uuid, Entry>,
    epoch: u64,
}

pub struct VerifiedCache {
    inner: Mutex<Inner>,
    generation_cap: usize,
}

impl VerifiedCache {
    /// A cache holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        VerifiedCache {
            inner: Mutex::new(Inner::default()),
            generation_cap: (capacity / 2).max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that grants
        // access (every mutation is a single insert/remove), so recover from poisoning.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `id` if `digest` is the digest that verified.
    pub fn get(&self, id: Uuid, digest: &TokenDigest) -> Option<Hit> {
        let mut inner = self.lock();
        let entry = match inner.young.get(&id) {
            Some(entry) => entry.clone(),
            None => {
                let entry = inner.old.remove(&id)?;
                inner.promote(id, entry.clone(), self.generation_cap);
                entry
            }
        };
        bool::from(entry.digest.ct_eq(digest)).then_some(Hit {
            token: entry.token,
            hash_fp: entry.hash_fp,
        })
    }

    /// The current invalidation epoch; pass it to [`VerifiedCache::insert_if_current`].
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Inserts unless an invalidation happened since `epoch` was read. Returns whether it did.
    pub fn insert_if_current(
        &self,
        epoch: u64,
        digest: TokenDigest,
        hash_fp: [u8; 32],
        token: VerifiedToken,
    ) -> bool {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return false;
        }
        let id = token.token_id;
        inner.old.remove(&id);
        let entry = Entry {
            digest,
            hash_fp,
            token,
        };
        inner.promote(id, entry, self.generation_cap);
        true
    }

    pub fn invalidate_token(&self, id: Uuid) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.young.remove(&id);
        inner.old.remove(&id);
    }

    pub fn invalidate_org(&self, org_id: Uuid) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.young.retain(|_, e| e.token.org_id != org_id);
        inner.old.retain(|_, e| e.token.org_id != org_id);
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.young.clear();
        inner.old.clear();
    }

    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.young.len() + inner.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn promote(&mut self, id: Uuid, entry: Entry, cap: usize) {
        if self.young.len() >= cap && !self.young.contains_key(&id) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, entry);
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
        }
    }

    #[test]
    fn hit_needs_the_matching_digest() {
        let cache = VerifiedCache::new(16);
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
        let cache = VerifiedCache::new(16);
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
    fn bounded_and_recently_used_entries_survive() {
        let cache = VerifiedCache::new(100);
        let keep = token(Uuid::new_v4());
        cache.insert_if_current(cache.epoch(), [7; 32], [0; 32], keep.clone());
        for i in 0..10_000u32 {
            let mut t = token(Uuid::new_v4());
            t.rpm_limit = i;
            cache.insert_if_current(cache.epoch(), [0; 32], [0; 32], t);
            if i % 10 == 0 {
                assert!(
                    cache.get(keep.token_id, &[7; 32]).is_some(),
                    "evicted at {i}"
                );
            }
            assert!(cache.len() <= 100);
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
