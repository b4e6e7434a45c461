//! Permission bits of a PAT (SPEC §2) and their textual forms.
//!
//! The bitmap is a `u64`; only the bits defined here exist. Anything else is rejected when a token
//! is created, so a future bit can never be granted by accident before it means something.

use std::fmt;

/// `GET` probes and `GET /v1/models`.
pub const READ: u64 = 1;
/// `POST /v1/chat/completions`.
pub const CHAT: u64 = 2;
/// Create, revoke and list tokens of the token's own org.
pub const TOKENS_MANAGE: u64 = 4;
/// Create agents and change their status in the token's own org.
pub const AGENTS_MANAGE: u64 = 8;
/// `POST /v1/embeddings` (SPEC §12). Tokens made before this bit existed keep their bits: an old
/// `all` token does not gain it.
pub const EMBEDDINGS: u64 = 16;
/// Every defined bit.
pub const ALL: u64 = READ | CHAT | TOKENS_MANAGE | AGENTS_MANAGE | EMBEDDINGS;

const NAMES: [(&str, u64); 5] = [
    ("read", READ),
    ("chat", CHAT),
    ("tokens:manage", TOKENS_MANAGE),
    ("agents:manage", AGENTS_MANAGE),
    ("embeddings", EMBEDDINGS),
];

/// Why a permission request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermError {
    #[error("unknown permission bits {0:#x}")]
    UnknownBits(u64),
    #[error("unknown permission name {0:?} (expected read, chat, tokens:manage, agents:manage, embeddings, all, none or an integer)")]
    UnknownName(String),
}

/// Rejects any bit that is not defined.
pub fn check_known(bits: u64) -> Result<u64, PermError> {
    match bits & !ALL {
        0 => Ok(bits),
        unknown => Err(PermError::UnknownBits(unknown)),
    }
}

/// True when `held` contains every bit of `wanted`.
pub fn covers(held: u64, wanted: u64) -> bool {
    wanted & !held == 0
}

/// Parses `read,chat,tokens:manage`, `all`, `none` or a decimal integer.
pub fn parse(text: &str) -> Result<u64, PermError> {
    let text = text.trim();
    match text {
        "all" => return Ok(ALL),
        "none" | "" => return Ok(0),
        _ => {}
    }
    if let Ok(bits) = text.parse::<u64>() {
        return check_known(bits);
    }
    text.split(',').try_fold(0u64, |acc, name| {
        let name = name.trim();
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bit)| acc | bit)
            .ok_or_else(|| PermError::UnknownName(name.to_owned()))
    })
}

/// The names of the bits set, for humans (`read,chat`).
pub struct Names(pub u64);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, bit) in NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_keywords_and_integers() {
        assert_eq!(parse("read,chat"), Ok(3));
        assert_eq!(parse("tokens:manage, agents:manage"), Ok(12));
        assert_eq!(parse("all"), Ok(31));
        assert_eq!(parse("read,embeddings"), Ok(17));
        assert_eq!(parse("none"), Ok(0));
        assert_eq!(parse("5"), Ok(5));
        assert_eq!(parse("32"), Err(PermError::UnknownBits(32)));
        assert!(matches!(
            parse("read,admin"),
            Err(PermError::UnknownName(_))
        ));
    }

    #[test]
    fn unknown_bits_are_rejected_and_coverage_is_a_subset_test() {
        assert_eq!(check_known(ALL), Ok(ALL));
        assert_eq!(
            check_known(1 << 40 | 1),
            Err(PermError::UnknownBits(1 << 40))
        );
        assert!(covers(READ | CHAT | TOKENS_MANAGE, READ | TOKENS_MANAGE));
        assert!(!covers(READ | TOKENS_MANAGE, CHAT));
        assert!(covers(0, 0));
    }

    #[test]
    fn names_render() {
        assert_eq!(
            Names(ALL).to_string(),
            "read,chat,tokens:manage,agents:manage,embeddings"
        );
        assert_eq!(Names(0).to_string(), "none");
    }
}
