//! The bearer credential as the proxy holds it: never printed, hashed once
//! per request into the cache key. Its shape is *not* checked here: SPEC §3
//! wants a malformed token answered like an unknown one, in answer and in
//! timing, so every bearer value short enough goes the way an unknown PAT
//! does (negative cache → flood guard → authd, which spends the same Argon2
//! on malformed input).

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest bearer value sent to authd; longer ones are refused locally as
/// INVALID_TOKEN. A PAT is 9 + 36 + 1 + a secret of 43 characters (48 as
/// issued), about 100 bytes, and authd refuses anything over 256: no valid
/// token comes near this, so answering faster for these reveals nothing
/// about any token, and garbage cannot make authd hash megabytes.
pub const MAX_FORWARDED_LEN: usize = 512;

/// The raw bearer value (a zero-copy slice of the request). `Debug` redacts
/// it and there is no `Display`: it cannot reach a log line by accident.
#[derive(Clone)]
pub struct BearerToken(Bytes);

impl BearerToken {
    pub fn new(raw: Bytes) -> Self {
        Self(raw)
    }

    /// SHA-256 of the whole bearer string: the cache key.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest(Sha256::digest(&self.0).into())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a value from [`crate::auth::step::bearer`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The plaintext, only for the one place that sends it to authd.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([REDACTED])")
    }
}

/// SHA-256 of a bearer string. Equality is constant-time; the hash used by
/// the cache maps is the digest's first eight bytes (already uniform, and an
/// attacker cannot choose them without a preimage).
#[derive(Clone, Copy, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl PartialEq for TokenDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenDigest([REDACTED])")
    }
}

/// Passes a digest's first eight bytes through as the hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `TokenDigest` is hashed with it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type DigestBuildHasher = BuildHasherDefault<DigestHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    pub const GOOD: &str =
        "ibex_pat_00000000-0000-0000-0000-000000000004_abcdefghijABCDEFGHIJ0123456789abcdefghijKLM";

    fn tok(s: &str) -> BearerToken {
        BearerToken::new(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn debug_is_redacted() {
        let t = tok(GOOD);
        let shown = format!("{t:?} {:?}", t.digest());
        assert!(shown.contains("[REDACTED]"));
        assert!(!shown.contains("abcdefghij"));
    }

    #[test]
    fn the_forwarding_cap_is_far_above_any_pat() {
        assert!(GOOD.len() * 4 < MAX_FORWARDED_LEN);
        assert_eq!(tok(GOOD).len(), GOOD.len());
    }

    #[test]
    fn digest_equality() {
        assert_eq!(tok(GOOD).digest(), tok(GOOD).digest());
        assert_ne!(tok(GOOD).digest(), tok(&format!("{GOOD}x")).digest());
    }
}
