//! ValidateToken's decision: cache → throttle → Argon2 pool → database, in that order.
//!
//! Warm path (the overwhelmingly common one): parse, SHA-256, one cache lookup, an expiry check.
//! No database, no Argon2, no waiting behind cold work. If the invalidation feed is not healthy
//! the hit is not trusted blindly: the row is re-read (no Argon2) and the stored hash must be the
//! one that verified.
//!
//! Cold path: throttle check for the id, a place in the Argon2 pool (or [`ValidateError::Busy`]
//! at once), the SECURITY DEFINER lookup (org + hash of that one id), the verify — against the
//! dummy hash when the id is unknown, so unknown id and wrong secret cost and answer the same —
//! then the rest of the row under RLS with the org set. Revoked/expired are only ever answered
//! after the secret verified.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::cache::{Hit, VerifiedCache, VerifiedToken};
use crate::feed::Feed;
use crate::hasher::{Busy, HashPool};
use crate::pat;
use crate::store::{self, StoreError, TokenRow};
use crate::throttle::{ClientKey, GuessThrottle};
use crate::usage::UsageRecorder;

/// Verified-token cache size.
pub const CACHE_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Valid(VerifiedToken),
    /// Malformed, unknown id or wrong secret: one answer for all three.
    Invalid,
    Revoked,
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The Argon2 pool is saturated: undecided, retry later.
    #[error("busy: too many cold validations")]
    Busy,
    /// This (token id, client address) failed too often: undecided, retry later. Only the
    /// address that guessed is refused; the holder at another address is not.
    #[error("throttled: too many failed attempts for this id from this address")]
    Throttled,
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<Busy> for ValidateError {
    fn from(_: Busy) -> Self {
        ValidateError::Busy
    }
}

impl From<StoreError> for ValidateError {
    fn from(err: StoreError) -> Self {
        ValidateError::Unavailable(err.to_string())
    }
}

impl From<crate::hasher::HashError> for ValidateError {
    fn from(err: crate::hasher::HashError) -> Self {
        ValidateError::Unavailable(err.to_string())
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub fn fingerprint(phc: &str) -> [u8; 32] {
    Sha256::digest(phc.as_bytes()).into()
}

pub struct Validator {
    pub pool: Pool,
    pub hasher: HashPool,
    pub cache: Arc<VerifiedCache>,
    pub throttle: GuessThrottle,
    pub feed: Arc<Feed>,
    pub usage: UsageRecorder,
}

impl Validator {
    /// Validates `token` presented by `client` (the end client's address, for the throttle).
    pub async fn validate(&self, token: &str, client: ClientKey) -> Result<Outcome, ValidateError> {
        let Some(parsed) = pat::parse(token) else {
            // Same Argon2 cost as an unknown id; the format is public, the cost is not a tell.
            let admission = self.hasher.admit()?;
            admission
                .verify(SecretString::from("malformed"), None)
                .await?;
            return Ok(Outcome::Invalid);
        };
        let digest = pat::digest(token);
        if let Some(hit) = self.cache.get(parsed.id, &digest) {
            if self.feed.is_healthy() && !hit.stale {
                return Ok(self.answer(hit.token));
            }
            if let Some(outcome) = self.recheck(parsed.id, digest, &hit).await? {
                return Ok(outcome);
            }
        }
        self.cold(parsed, digest, client).await
    }

    fn answer(&self, token: VerifiedToken) -> Outcome {
        if token.is_expired(now_ms()) {
            return Outcome::Expired;
        }
        self.usage.record(token.org_id, token.token_id);
        Outcome::Valid(token)
    }

    /// A cache hit while the feed is down, or a stale one (its row changed since it verified):
    /// re-read the row (no Argon2). The presented token's digest is the one that verified, and
    /// the stored hash is still the one it verified against, so the row's state may be told
    /// (REVOKED included). `None` = the stored hash changed (rotated) or the row is gone: verify
    /// again from scratch.
    async fn recheck(
        &self,
        id: Uuid,
        digest: pat::TokenDigest,
        hit: &Hit,
    ) -> Result<Option<Outcome>, ValidateError> {
        let epoch = self.cache.epoch();
        match store::load_token(&self.pool, hit.token.org_id, id).await? {
            Some(row) if fingerprint(&row.secret_hash) == hit.hash_fp => {
                let (outcome, token) = self.decide(id, hit.token.org_id, row);
                if matches!(outcome, Outcome::Valid(_)) {
                    // Refreshed from the row, in case an event was missed.
                    self.cache
                        .insert_if_current(epoch, digest, hit.hash_fp, token);
                } else if !hit.stale {
                    // Revoked or expired: the entry stays, stale, so the next ask is one more
                    // row read, not an Argon2 verify.
                    self.cache.mark_stale(id);
                }
                Ok(Some(outcome))
            }
            _ => {
                self.cache.invalidate_token(id);
                Ok(None)
            }
        }
    }

    async fn cold(
        &self,
        parsed: pat::ParsedPat<'_>,
        digest: pat::TokenDigest,
        client: ClientKey,
    ) -> Result<Outcome, ValidateError> {
        let id = parsed.id;
        let key = (id, client);
        if !self.throttle.allows(key, Instant::now()) {
            return Err(ValidateError::Throttled);
        }
        let admission = self.hasher.admit()?;
        let epoch = self.cache.epoch();
        let found = store::lookup_token(&self.pool, id).await?;
        let (org, phc) = match found {
            Some((org, phc)) => (Some(org), Some(phc)),
            None => (None, None),
        };
        let hash_fp = phc.as_deref().map(fingerprint);
        let verified = admission
            .verify(SecretString::from(parsed.secret.to_owned()), phc)
            .await?;
        let (Some(org), Some(hash_fp), true) = (org, hash_fp, verified) else {
            self.throttle.record_failure(key, Instant::now());
            return Ok(Outcome::Invalid);
        };
        self.throttle.record_success(key);
        let Some(row) = store::load_token(&self.pool, org, id).await? else {
            return Ok(Outcome::Invalid);
        };
        if fingerprint(&row.secret_hash) != hash_fp {
            // Rotated between the lookup and now: what verified is no longer the secret.
            return Ok(Outcome::Invalid);
        }
        let (outcome, token) = self.decide(id, org, row);
        let stale = !matches!(outcome, Outcome::Valid(_));
        // Revoked or expired is cached too, stale: the next ask re-reads the row, no Argon2.
        self.cache
            .insert_checked(epoch, digest, hash_fp, token, stale);
        Ok(outcome)
    }

    /// Status from a row whose secret verified, and the token the row describes (cached fresh
    /// when valid, stale otherwise).
    fn decide(&self, id: Uuid, org: Uuid, row: TokenRow) -> (Outcome, VerifiedToken) {
        let token = VerifiedToken {
            token_id: id,
            org_id: org,
            permissions: row.permissions,
            agent_id: row.agent_id,
            user_id: row.user_id,
            expires_at_ms: row.expires_at_ms,
            rpm_limit: row.rpm_limit,
            allowed_models: row.allowed_models,
            org_allowed_models: row.org_allowed_models,
            limits: row.limits,
        };
        if row.revoked_at_ms.is_some() {
            return (Outcome::Revoked, token);
        }
        (self.answer(token.clone()), token)
    }

    /// Warms the cache with a token just created (its digest is known without Argon2).
    pub fn warm(&self, epoch: u64, digest: pat::TokenDigest, phc: &str, token: VerifiedToken) {
        self.cache
            .insert_if_current(epoch, digest, fingerprint(phc), token);
    }
}
