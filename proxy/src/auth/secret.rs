//! The bearer credential as the proxy holds it: never printed, hashed once
//! per request into the cache key, checked for the PAT shape (SPEC §2) before
//! anything is spent on it.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest bearer value considered at all; longer ones are malformed.
pub const MAX_TOKEN_LEN: usize = 256;
const PREFIX: &[u8] = b"ibex_pat_";
const MIN_SECRET_LEN: usize = 43;

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

    /// `ibex_pat_<lowercase hyphenated uuid>_<43+ alphanumerics>`. Anything
    /// else cannot be a token and is refused without asking authd.
    pub fn is_well_formed(&self) -> bool {
        let b = &self.0[..];
        if b.len() > MAX_TOKEN_LEN || !b.starts_with(PREFIX) {
            return false;
        }
        let rest = &b[PREFIX.len()..];
        if rest.len() < 36 + 1 + MIN_SECRET_LEN || rest[36] != b'_' {
            return false;
        }
        let id_ok = rest[..36].iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        });
        id_ok && rest[37..].iter().all(u8::is_ascii_alphanumeric)
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
    fn pat_shape() {
        assert!(tok(GOOD).is_well_formed());
        let bad = [
            "",
            "ibex_pat_",
            "Ibex_pat_00000000-0000-0000-0000-000000000004_abcdefghijABCDEFGHIJ0123456789abcdefghijKLM",
            // uppercase uuid
            "ibex_pat_0000000A-0000-0000-0000-000000000004_abcdefghijABCDEFGHIJ0123456789abcdefghijKLM",
            // secret too short (42)
            "ibex_pat_00000000-0000-0000-0000-000000000004_abcdefghijABCDEFGHIJ0123456789abcdefghijKL",
            // non-alphanumeric secret
            "ibex_pat_00000000-0000-0000-0000-000000000004_abcdefghijABCDEFGHIJ0123456789abcdefghij-LM",
            // missing separator
            "ibex_pat_00000000-0000-0000-0000-000000000004Xabcdefghij ABCDEFGHIJ0123456789abcdefghijKLM",
        ];
        for b in bad {
            assert!(!tok(b).is_well_formed(), "{b}");
        }
        let long = format!("{GOOD}{}", "a".repeat(MAX_TOKEN_LEN));
        assert!(!tok(&long).is_well_formed());
    }

    #[test]
    fn digest_equality() {
        assert_eq!(tok(GOOD).digest(), tok(GOOD).digest());
        assert_ne!(tok(GOOD).digest(), tok(&format!("{GOOD}x")).digest());
    }
}
