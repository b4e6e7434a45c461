//! Who is calling: the service key on the internal RPCs; the operator key or a PAT on the
//! management RPCs (SPEC §6).
//!
//! Both keys are kept only as their SHA-256 and compared in constant time; both must be at least
//! [`MIN_KEY_LEN`] characters. Failed operator-key attempts are throttled per caller address. A
//! PAT is validated exactly like `ValidateToken` (cache first), and must then be VALID — revoked,
//! expired or unknown callers are all just "unauthenticated"; a PAT bound to an agent manages
//! nothing while that agent is not `active`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::Status;
use uuid::Uuid;

use crate::cache::VerifiedToken;
use crate::perms;
use crate::store;
use crate::throttle::{AdminThrottle, ClientKey};
use crate::validator::{Outcome, ValidateError, Validator};

pub const ADMIN_KEY_HEADER: &str = "x-ibex-admin-key";
pub const SERVICE_KEY_HEADER: &str = "x-ibex-service-key";
/// Shortest operator or service key accepted (`IBEX_ADMIN_KEY`, `IBEX_SERVICE_KEY`).
pub const MIN_KEY_LEN: usize = 32;

/// SHA-256 of a key (`IBEX_ADMIN_KEY`, `IBEX_SERVICE_KEY`); the key itself is not kept.
#[derive(Clone)]
pub struct KeyDigest([u8; 32]);

/// The operator key's digest.
pub type AdminKeyDigest = KeyDigest;

impl KeyDigest {
    /// Refuses a key shorter than [`MIN_KEY_LEN`] characters, naming `var`.
    pub fn new(var: &str, key: &SecretString) -> Result<Self, String> {
        let key = key.expose_secret();
        if key.chars().count() < MIN_KEY_LEN {
            return Err(format!(
                "{var} must be at least {MIN_KEY_LEN} characters (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(KeyDigest(Sha256::digest(key.as_bytes()).into()))
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.0.ct_eq(&digest).into()
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest([REDACTED])")
    }
}

/// Refusals counted for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Internal calls without the right service key.
    pub service_key: AtomicU64,
    /// Management calls with a wrong operator key.
    pub admin_key: AtomicU64,
    /// Operator-key attempts refused by the per-address throttle.
    pub admin_throttled: AtomicU64,
}

/// The internal RPCs' gate: the right `x-ibex-service-key`, or UNAUTHENTICATED (one answer for
/// a missing and a wrong key; nothing else is learnt).
pub fn require_service_key(
    metadata: &MetadataMap,
    key: &KeyDigest,
    refusals: &Refusals,
) -> Result<(), Status> {
    match metadata.get(SERVICE_KEY_HEADER) {
        Some(presented) if key.matches(presented.as_bytes()) => Ok(()),
        _ => {
            refusals.service_key.fetch_add(1, Ordering::Relaxed);
            Err(Status::unauthenticated("missing or invalid service key"))
        }
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

/// What [`caller`] needs besides the request.
pub struct Gate<'a> {
    pub admin: Option<&'a AdminKeyDigest>,
    pub admin_throttle: &'a AdminThrottle,
    pub refusals: &'a Refusals,
    pub validator: &'a Validator,
}

/// Identifies the caller from request metadata; `client` is the peer's address.
pub async fn caller(
    metadata: &MetadataMap,
    client: ClientKey,
    gate: &Gate<'_>,
) -> Result<Caller, Status> {
    if let Some(key) = metadata.get(ADMIN_KEY_HEADER) {
        let Some(admin) = gate.admin else {
            return Err(Status::unauthenticated(
                "admin calls are disabled: IBEX_ADMIN_KEY is not set",
            ));
        };
        if !gate.admin_throttle.allows(client, Instant::now()) {
            gate.refusals
                .admin_throttled
                .fetch_add(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(
                "too many failed admin-key attempts from this address; retry later",
            ));
        }
        if admin.matches(key.as_bytes()) {
            return Ok(Caller::Admin);
        }
        gate.admin_throttle.record_failure(client, Instant::now());
        gate.refusals.admin_key.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?client, "management call with a wrong admin key");
        return Err(Status::unauthenticated("invalid admin key"));
    }
    let validator = gate.validator;
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
    let token = match validator.validate(token, client).await {
        Ok(Outcome::Valid(t)) => t,
        Ok(_) => return Err(Status::unauthenticated("invalid, revoked or expired token")),
        Err(ValidateError::Busy | ValidateError::Throttled) => {
            return Err(Status::resource_exhausted("busy, retry later"))
        }
        Err(ValidateError::Unavailable(err)) => {
            tracing::error!(error = %err, "caller validation failed");
            return Err(Status::unavailable("database unavailable"));
        }
    };
    // A suspended agent's own credentials cannot undo its suspension (SPEC §6): read the agent's
    // status now, never from a cache.
    if let Some(agent) = token.agent_id {
        let status = store::agent_status(&validator.pool, token.org_id, agent)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "caller agent lookup failed");
                Status::unavailable("database unavailable")
            })?;
        if status.as_deref() != Some("active") {
            return Err(Status::permission_denied(
                "the caller's token is bound to an agent that is not active",
            ));
        }
    }
    Ok(Caller::Pat(token))
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
            allowed_models: Vec::new(),
            org_allowed_models: Vec::new(),
            limits: Default::default(),
        })
    }

    #[test]
    fn admin_key_matches_only_itself_and_redacts() {
        let key = "k3y-0123456789abcdef0123456789abcdef";
        let digest = AdminKeyDigest::new("IBEX_ADMIN_KEY", &SecretString::from(key)).expect("set");
        assert!(digest.matches(key.as_bytes()));
        assert!(!digest.matches(format!("{key} ").as_bytes()));
        assert!(!format!("{digest:?}").contains("k3y"));
        for short in ["", "k3y", &key[..MIN_KEY_LEN - 1]] {
            let err = KeyDigest::new("IBEX_SERVICE_KEY", &SecretString::from(short))
                .expect_err("too short");
            assert!(
                err.contains("IBEX_SERVICE_KEY") && err.contains("32"),
                "{err}"
            );
        }
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
