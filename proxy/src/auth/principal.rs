//! Proof that a request passed the auth steps. Only this module's parent can
//! build these types, so a handler that takes a [`Principal`] cannot be
//! reached without the token and agent checks having run, in order.

use uuid::Uuid;

use super::backend::{AgentLimits, OrgLimits, ValidToken};
use crate::error::ApiError;

/// The token step's result: a verified, unexpired token. Input to the agent step.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub(super) token: ValidToken,
}

impl TokenGrant {
    pub fn org(&self) -> Uuid {
        self.token.org
    }
}

/// An authenticated caller: token verified, agent active and allowed.
#[derive(Debug, Clone)]
pub struct Principal {
    org: Uuid,
    token_id: Uuid,
    permissions: u64,
    agent: Uuid,
    rpm: u32,
    models: Option<std::sync::Arc<super::backend::ModelLists>>,
    org_limits: OrgLimits,
    agent_limits: AgentLimits,
}

impl Principal {
    pub(super) fn new(token: &ValidToken, agent: Uuid, agent_limits: AgentLimits) -> Self {
        Self {
            org: token.org,
            token_id: token.token_id,
            permissions: token.permissions,
            agent,
            rpm: token.rpm,
            models: token.models.clone(),
            org_limits: token.limits,
            agent_limits,
        }
    }

    /// The exact model names the allow-lists name (empty without lists).
    pub fn allowed_model_names(&self) -> Vec<String> {
        self.models
            .as_ref()
            .map(|m| m.exact_names())
            .unwrap_or_default()
    }

    /// Whether the token's and the org's model allow-lists both allow `model` (SPEC §12).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.allows(model))
    }

    pub fn org(&self) -> Uuid {
        self.org
    }

    pub fn token_id(&self) -> Uuid {
        self.token_id
    }

    pub fn permissions(&self) -> u64 {
        self.permissions
    }

    pub fn agent(&self) -> Uuid {
        self.agent
    }

    /// The org's requests per minute as authd reported it (0 = use the default).
    pub fn rpm(&self) -> u32 {
        self.rpm
    }

    /// The org's token limits (SPEC §11) as authd reported them.
    pub fn org_limits(&self) -> OrgLimits {
        self.org_limits
    }

    /// The agent's own token limits.
    pub fn agent_limits(&self) -> AgentLimits {
        self.agent_limits
    }

    /// The permission step: every bit of `needed` must be granted.
    pub fn require(&self, needed: u64) -> Result<(), ApiError> {
        if self.permissions & needed == needed {
            Ok(())
        } else {
            Err(ApiError::InsufficientPermissions)
        }
    }
}
