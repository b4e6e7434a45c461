//! Who is calling a management RPC: the operator key or a PAT (SPEC §6).
//!
//! The operator key is kept only as its SHA-256 and compared in constant time. A PAT is
//! validated exactly like `ValidateToken` (cache first), and must then be VALID — revoked,
//! expired or unknown callers are all just "unauthenticated".

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::Status;
use uuid::Uuid;

use crate::cache::VerifiedToken;
use crate::perms;
use crate::validator::{Outcome, ValidateError, Validator};

pub const ADMIN_KEY_HEADER: &str = "x-ibex-admin-key";

/// SHA-256 of `IBEX_ADMIN_KEY`; the key itself is not kept.
#[derive(Clone)]
pub struct AdminKeyDigest([u8; 32]);

impl AdminKeyDigest {
    pub fn new(key: &SecretString) -> Option<Self> {
        let key = key.expose_secret();
        (!key.is_empty()).then(|| AdminKeyDigest(Sha256::digest(key.as_bytes()).into()))
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.0.ct_eq(&digest).into()
    }
}

impl std::fmt::Debug for AdminKeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKeyDigest([REDACTED])")
    }
}

#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Pat(VerifiedToken),
}

impl Caller {
    pub fn actor(&self) -> crate::audit::Actor {
        match self {
            Caller::Admin => crate::audit::Actor::Admin,
            Caller::Pat(t) => crate::audit::Actor::Token(t.token_id),
        }
    }

    /// May act on `org` with `bit`: the admin anywhere; a PAT only in its own org with the bit.
    /// Another org is PERMISSION_DENIED, never NOT_FOUND.
    pub fn require(&self, org: Uuid, bit: u64) -> Result<(), Status> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Pat(t) if t.org_id != org => Err(Status::permission_denied(
                "the caller's token belongs to another org",
            )),
            Caller::Pat(t) if !perms::covers(t.permissions, bit) => {
                Err(Status::permission_denied(format!(
                    "the caller's token lacks the {} permission",
                    perms::Names(bit)
                )))
            }
            Caller::Pat(_) => Ok(()),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }
}

/// Identifies the caller from request metadata.
pub async fn caller(
    metadata: &MetadataMap,
    admin: Option<&AdminKeyDigest>,
    validator: &Validator,
) -> Result<Caller, Status> {
    if let Some(key) = metadata.get(ADMIN_KEY_HEADER) {
        return match admin {
            Some(admin) if admin.matches(key.as_bytes()) => Ok(Caller::Admin),
            Some(_) => Err(Status::unauthenticated("invalid admin key")),
            None => Err(Status::unauthenticated(
                "admin calls are disabled: IBEX_ADMIN_KEY is not set",
            )),
        };
    }
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "missing credentials: authorization: Bearer <PAT> or x-ibex-admin-key",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <PAT>`"))?;
    match validator.validate(token).await {
        Ok(Outcome::Valid(t)) => Ok(Caller::Pat(t)),
        Ok(_) => Err(Status::unauthenticated("invalid, revoked or expired token")),
        Err(ValidateError::Busy) => Err(Status::resource_exhausted("busy, retry later")),
        Err(ValidateError::Unavailable(err)) => {
            tracing::error!(error = %err, "caller validation failed");
            Err(Status::unavailable("database unavailable"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(org: Uuid, permissions: u64) -> Caller {
        Caller::Pat(VerifiedToken {
            token_id: Uuid::new_v4(),
            org_id: org,
            permissions,
            agent_id: None,
            user_id: None,
            expires_at_ms: None,
            rpm_limit: 1,
        })
    }

    #[test]
    fn admin_key_matches_only_itself_and_redacts() {
        let digest = AdminKeyDigest::new(&SecretString::from("k3y")).expect("set");
        assert!(digest.matches(b"k3y"));
        assert!(!digest.matches(b"k3y "));
        assert!(AdminKeyDigest::new(&SecretString::from("")).is_none());
        assert!(!format!("{digest:?}").contains("k3y"));
    }

    #[test]
    fn permission_rules() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let manager = pat(a, perms::READ | perms::TOKENS_MANAGE);
        assert!(manager.require(a, perms::TOKENS_MANAGE).is_ok());
        let err = manager
            .require(b, perms::TOKENS_MANAGE)
            .expect_err("cross-org");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = manager
            .require(a, perms::AGENTS_MANAGE)
            .expect_err("lacks bit");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(Caller::Admin.require(b, perms::ALL).is_ok());
    }
}
