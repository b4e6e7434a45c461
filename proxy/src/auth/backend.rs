//! What the auth step asks authd on a cache miss, as a trait so the chain can
//! be driven in tests (and benches) without a network. The production
//! implementation is [`crate::auth::bridge::BridgeClient`].

use std::net::IpAddr;

use futures::future::LocalBoxFuture;
use uuid::Uuid;

use super::secret::BearerToken;

/// A token's and its org's model allow-lists (SPEC §12), normalised; a model must pass both.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelLists {
    pub token: Vec<String>,
    pub org: Vec<String>,
}

impl ModelLists {
    pub fn allows(&self, model: &str) -> bool {
        ibex_proto::models::allows(&self.token, model)
            && ibex_proto::models::allows(&self.org, model)
    }

    /// The exact names (no `*`) either list holds that both allow, for `/v1/models`.
    pub fn exact_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.token.iter().chain(self.org.iter()) {
            if !e.ends_with('*') && self.allows(e) && !out.contains(e) {
                out.push(e.clone());
            }
        }
        out
    }
}

/// A token authd vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidToken {
    pub org: Uuid,
    pub token_id: Uuid,
    pub permissions: u64,
    /// Unix ms; `None` = never expires.
    pub expires_at_ms: Option<i64>,
    /// The agent the token is bound to; `None` = any agent of the org.
    pub agent: Option<Uuid>,
    /// The org's requests per minute; 0 = the proxy's default.
    pub rpm: u32,
    /// The model allow-lists; `None` when neither the token nor the org has one.
    pub models: Option<std::sync::Arc<ModelLists>>,
    /// The org's token limits (SPEC §11).
    pub limits: OrgLimits,
}

/// An org's token limits as authd reported them (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrgLimits {
    /// Tokens per minute; `None` = the proxy's `IBEX_DEFAULT_TPM`, 0 = no limit.
    pub tpm: Option<u64>,
    /// Tokens per calendar month (UTC); 0 = none.
    pub month_tokens: u64,
    /// USD per calendar month in millionths; 0 = none.
    pub month_usd_micros: u64,
}

/// An agent's own token limits (0 = none); the org's still apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentLimits {
    pub tpm: u64,
    pub month_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAnswer {
    Valid(ValidToken),
    /// Malformed, unknown id or wrong secret (indistinguishable by design).
    Invalid,
    Revoked,
    Expired,
    /// authd is up but declined to decide now (gRPC RESOURCE_EXHAUSTED: its
    /// Argon2 pool is saturated). Answered 503 like `Unavailable`, never
    /// cached; for an unknown credential it also spends the address's
    /// failure budget.
    Busy,
    /// authd's guess throttle refused this (token id, client address): 503,
    /// never cached, and not charged to the address's failure budget — the
    /// failures that led here were charged already, and a holder sharing an
    /// address with a guesser must not be locked out of the proxy by them.
    Throttled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAnswer {
    /// Active, with the agent's token limits.
    Active(AgentLimits),
    /// Paused, archived or suspended.
    Inactive,
    /// Unknown, or of another org (indistinguishable by design).
    NotFound,
}

impl AgentAnswer {
    pub fn is_active(&self) -> bool {
        matches!(self, AgentAnswer::Active(_))
    }
}

/// authd could not answer (down, overloaded, timed out, nonsense reply).
/// Always fails closed: 503 AUTH_UNAVAILABLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

pub type Answer<T> = Result<T, Unavailable>;

pub trait AuthBackend {
    /// `client` is the end client's address: authd throttles guesses per (token id, address).
    fn validate_token(
        &self,
        token: &BearerToken,
        client: IpAddr,
    ) -> LocalBoxFuture<'static, Answer<TokenAnswer>>;
    fn validate_agent(
        &self,
        org: Uuid,
        agent: Uuid,
    ) -> LocalBoxFuture<'static, Answer<AgentAnswer>>;
}

/// A backend that refuses to be asked: for benches of the hit path, where a
/// call would mean the cache was not warm.
pub struct NoBackend;

impl AuthBackend for NoBackend {
    fn validate_token(
        &self,
        _: &BearerToken,
        _: IpAddr,
    ) -> LocalBoxFuture<'static, Answer<TokenAnswer>> {
        Box::pin(async { Err(Unavailable) })
    }

    fn validate_agent(&self, _: Uuid, _: Uuid) -> LocalBoxFuture<'static, Answer<AgentAnswer>> {
        Box::pin(async { Err(Unavailable) })
    }
}
