//! Personal access tokens: `ibex_pat_<uuid>_<secret>` (SPEC §2).
//!
//! Strict parsing (anything else is "invalid", never an error message that says why), fresh
//! secrets, and the SHA-256 digest of the whole string that keys the verified-token cache. No
//! hashing for storage here: that is [`crate::hasher`].

use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const PREFIX: &str = "ibex_pat_";
/// Minimum secret length: 43 characters of `[A-Za-z0-9]` carry ≥ 256 bits.
pub const MIN_SECRET_LEN: usize = 43;
/// Length of the secrets we issue (≈ 285 bits).
pub const ISSUED_SECRET_LEN: usize = 48;
/// Upper bound on the whole token, so nothing unbounded is hashed or compared.
pub const MAX_TOKEN_LEN: usize = 256;
const UUID_LEN: usize = 36;

/// SHA-256 of a whole token string: the verified-cache key. Not a storage hash.
pub type TokenDigest = [u8; 32];

/// A syntactically valid token, borrowed from the caller's string.
#[derive(Clone, Copy)]
pub struct ParsedPat<'a> {
    pub id: Uuid,
    pub secret: &'a str,
}

impl std::fmt::Debug for ParsedPat<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedPat")
            .field("id", &self.id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// Parses `ibex_pat_<36-char lowercase hyphenated uuid>_<secret ≥ 43 [A-Za-z0-9]>`.
/// Returns `None` for anything else; callers answer "invalid" without saying why.
pub fn parse(token: &str) -> Option<ParsedPat<'_>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let rest = token.strip_prefix(PREFIX)?;
    let (id, rest) = (rest.get(..UUID_LEN)?, rest.get(UUID_LEN..)?);
    let secret = rest.strip_prefix('_')?;
    if !is_canonical_uuid(id)
        || secret.len() < MIN_SECRET_LEN
        || !secret.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    let id = Uuid::try_parse(id).ok()?;
    Some(ParsedPat { id, secret })
}

/// Exactly the form `Uuid`'s `Display` writes: 8-4-4-4-12 lowercase hex.
fn is_canonical_uuid(text: &str) -> bool {
    text.len() == UUID_LEN
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// SHA-256 of the whole token string.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// A freshly issued token: its id and the plaintext, which redacts itself in `Debug`.
#[derive(Debug)]
pub struct IssuedPat {
    pub id: Uuid,
    pub secret: SecretString,
    pub token: SecretString,
}

/// Makes a new secret for token `id` from the OS RNG.
pub fn issue(id: Uuid) -> IssuedPat {
    let secret = Alphanumeric.sample_string(&mut rand::rngs::OsRng, ISSUED_SECRET_LEN);
    let token = format!("{PREFIX}{id}_{secret}");
    IssuedPat {
        id,
        secret: SecretString::from(secret),
        token: SecretString::from(token),
    }
}

impl IssuedPat {
    pub fn digest(&self) -> TokenDigest {
        digest(self.token.expose_secret())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "00000000-0000-0000-0000-000000000004";
    const SECRET: &str = "abcdefghijABCDEFGHIJ0123456789abcdefghijKLM"; // 43 chars

    #[test]
    fn accepts_the_canonical_form() {
        let token = format!("ibex_pat_{ID}_{SECRET}");
        let parsed = parse(&token).expect("valid");
        assert_eq!(parsed.id.to_string(), ID);
        assert_eq!(parsed.secret, SECRET);
    }

    #[test]
    fn rejects_everything_else() {
        let upper = "0000000A-0000-0000-0000-00000000000B";
        let cases = [
            String::new(),
            "ibex_pat_".to_owned(),
            format!("ibex_pat_{ID}"),
            format!("ibex_pat_{ID}_"),
            format!("ibex_pat_{ID}_{}", &SECRET[..42]),
            format!("ibex_pat_{ID}-{SECRET}"),
            format!("ibex_pat_{upper}_{SECRET}"),
            format!("ibex_pat_{}_{SECRET}", ID.replace('-', "")),
            format!("ibex_pat_{{{ID}}}_{SECRET}"),
            format!("ibex_pat_{ID}_{SECRET}!"),
            format!("ibex_pat_{ID}_{SECRET} "),
            format!("ibex_pat_{ID}_{SECRET}_x"),
            format!("IBEX_PAT_{ID}_{SECRET}"),
            format!("Bearer ibex_pat_{ID}_{SECRET}"),
            format!("ibex_pat_{ID}_{}", "é".repeat(43)),
            format!("ibex_pat_{ID}_{}", "a".repeat(MAX_TOKEN_LEN)),
            format!("ibex_pat_0000000g-0000-0000-0000-000000000004_{SECRET}"),
        ];
        for case in cases {
            assert!(parse(&case).is_none(), "accepted {case:?}");
        }
    }

    #[test]
    fn issued_tokens_parse_and_redact() {
        let id = Uuid::new_v4();
        let issued = issue(id);
        let text = issued.token.expose_secret();
        let parsed = parse(text).expect("issued token parses");
        assert_eq!(parsed.id, id);
        assert_eq!(parsed.secret, issued.secret.expose_secret());
        assert_eq!(issued.digest(), digest(text));
        let debug = format!("{issued:?} {parsed:?}");
        assert!(!debug.contains(issued.secret.expose_secret()), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
        assert_ne!(
            issue(id).secret.expose_secret(),
            issued.secret.expose_secret()
        );
    }
}
