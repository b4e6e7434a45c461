//! The `ibex.auth.v1.AuthService` gRPC service (SPEC §6): request decoding, authorisation and
//! status codes. Decisions live in [`crate::validator`], queries in [`crate::store`].

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ibex_proto::pb::{self, auth_service_server::AuthService};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::authz::{self, AdminKeyDigest, Caller, KeyDigest, Refusals};
use crate::cache::VerifiedToken;
use crate::feed::Feed;
use crate::hasher;
use crate::ledger;
use crate::pat;
use crate::perms;
use crate::store::{self, NewToken, StoreError};
use crate::throttle::{AdminThrottle, ClientKey};
use crate::validator::{Outcome, ValidateError, Validator};

/// Names are bounded so no input grows memory or rows without limit.
pub const MAX_NAME_LEN: usize = 200;
/// Concurrent WatchInvalidations streams; past this, RESOURCE_EXHAUSTED.
pub const MAX_SUBSCRIBERS: usize = 256;
/// Metadata on a RESOURCE_EXHAUSTED from ValidateToken saying why: `throttled` (this address
/// failed too often on this id: its own doing) or `busy` (authd is saturated).
pub const REFUSAL_HEADER: &str = "x-ibex-refusal";

/// Per-org quotas (SPEC §6).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tokens_per_org: u32,
    pub max_agents_per_org: u32,
}

pub struct Service {
    pub validator: Arc<Validator>,
    pub admin: Option<AdminKeyDigest>,
    pub service_key: KeyDigest,
    pub refusals: Arc<Refusals>,
    pub admin_throttle: AdminThrottle,
    pub limits: Limits,
    pub default_rpm: u32,
    pub shutdown: watch::Receiver<bool>,
}

/// The gRPC peer's address as a throttle key.
fn peer<T>(request: &Request<T>) -> ClientKey {
    request
        .remote_addr()
        .map_or(ClientKey::Unknown, |addr| ClientKey::from_ip(addr.ip()))
}

fn refused(message: &'static str, reason: &'static str) -> Status {
    let mut status = Status::resource_exhausted(message);
    status.metadata_mut().insert(
        REFUSAL_HEADER,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

fn uuid_arg(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument(format!("{field} must be a UUID")))
}

fn optional_uuid(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        uuid_arg(field, value).map(Some)
    }
}

fn name_arg(field: &str, value: &str, required: bool) -> Result<String, Status> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.chars().count() > MAX_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    Ok(value.to_owned())
}

fn store_status(err: StoreError, not_found: &str) -> Status {
    match err {
        StoreError::NotFound => Status::not_found(not_found.to_owned()),
        StoreError::Invalid(what) => Status::invalid_argument(what),
        StoreError::Quota(what) => Status::resource_exhausted(what),
        other => {
            tracing::error!(error = %other, "database error");
            Status::unavailable("database unavailable")
        }
    }
}

/// A PAT caller gets PERMISSION_DENIED for anything outside its org, including ids that do not
/// exist in it (it must not learn which ids exist elsewhere); the operator gets NOT_FOUND.
fn scoped_not_found(caller: &Caller, err: StoreError, what: &str) -> Status {
    match (caller, err) {
        (Caller::Pat(_), StoreError::NotFound) => {
            Status::permission_denied(format!("{what} is not in the caller's org"))
        }
        (_, err) => store_status(err, &format!("{what} not found")),
    }
}

pub fn agent_status_name(status: pb::AgentStatus) -> Option<&'static str> {
    match status {
        pb::AgentStatus::Active => Some("active"),
        pb::AgentStatus::Paused => Some("paused"),
        pb::AgentStatus::Archived => Some("archived"),
        pb::AgentStatus::Suspended => Some("suspended"),
        pb::AgentStatus::Unspecified | pb::AgentStatus::NotFound => None,
    }
}

pub fn agent_status_from_name(name: &str) -> pb::AgentStatus {
    match name {
        "active" => pb::AgentStatus::Active,
        "paused" => pb::AgentStatus::Paused,
        "archived" => pb::AgentStatus::Archived,
        "suspended" => pb::AgentStatus::Suspended,
        _ => pb::AgentStatus::NotFound,
    }
}

fn opt_ms(value: Option<i64>) -> i64 {
    value.unwrap_or(0)
}

fn opt_id(value: Option<Uuid>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

impl Service {
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let gate = authz::Gate {
            admin: self.admin.as_ref(),
            admin_throttle: &self.admin_throttle,
            refusals: &self.refusals,
            validator: &self.validator,
        };
        authz::caller(request.metadata(), peer(request), &gate).await
    }

    fn internal<T>(&self, request: &Request<T>) -> Result<(), Status> {
        authz::require_service_key(request.metadata(), &self.service_key, &self.refusals)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::InvalidationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AuthService for Service {
    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        self.internal(&request)?;
        let from_peer = peer(&request);
        let req = request.into_inner();
        let client = ClientKey::parse(&req.client_addr).unwrap_or(from_peer);
        let outcome = match self.validator.validate(&req.token, client).await {
            Ok(outcome) => outcome,
            Err(ValidateError::Busy) => {
                return Err(refused("argon2 pool saturated; retry later", "busy"))
            }
            Err(ValidateError::Throttled) => {
                return Err(refused(
                    "too many failed attempts for this token from this address; retry later",
                    "throttled",
                ))
            }
            Err(ValidateError::Unavailable(err)) => {
                tracing::error!(error = %err, "token validation failed");
                return Err(Status::unavailable("database unavailable"));
            }
        };
        let status = |status: pb::TokenStatus| pb::ValidateTokenResponse {
            status: status as i32,
            ..Default::default()
        };
        Ok(Response::new(match outcome {
            Outcome::Valid(t) => pb::ValidateTokenResponse {
                status: pb::TokenStatus::Valid as i32,
                org_id: t.org_id.to_string(),
                token_id: t.token_id.to_string(),
                permissions: t.permissions,
                expires_at_unix_ms: opt_ms(t.expires_at_ms),
                agent_id: opt_id(t.agent_id),
                user_id: opt_id(t.user_id),
                org_rpm_limit: t.rpm_limit,
                token_allowed_models: t.allowed_models,
                org_allowed_models: t.org_allowed_models,
                org_tpm_limit: t.limits.tpm,
                org_monthly_token_budget: t.limits.month_tokens,
                org_monthly_usd_budget: t.limits.usd(),
            },
            Outcome::Invalid => status(pb::TokenStatus::Invalid),
            Outcome::Revoked => status(pb::TokenStatus::Revoked),
            Outcome::Expired => status(pb::TokenStatus::Expired),
        }))
    }

    async fn validate_agent(
        &self,
        request: Request<pb::ValidateAgentRequest>,
    ) -> Result<Response<pb::ValidateAgentResponse>, Status> {
        self.internal(&request)?;
        let req = request.into_inner();
        let not_found = || {
            Response::new(pb::ValidateAgentResponse {
                status: pb::AgentStatus::NotFound as i32,
                ..Default::default()
            })
        };
        let (Ok(org), Ok(agent)) = (Uuid::try_parse(&req.org_id), Uuid::try_parse(&req.agent_id))
        else {
            return Ok(not_found());
        };
        match crate::limits::agent_status_limits(&self.validator.pool, org, agent).await {
            Ok(Some((status, limits))) => Ok(Response::new(pb::ValidateAgentResponse {
                status: agent_status_from_name(&status) as i32,
                tpm_limit: limits.tpm,
                monthly_token_budget: limits.month_tokens,
            })),
            Ok(None) => Ok(not_found()),
            Err(err) => Err(store_status(err, "agent not found")),
        }
    }

    async fn create_org(
        &self,
        request: Request<pb::CreateOrgRequest>,
    ) -> Result<Response<pb::CreateOrgResponse>, Status> {
        let caller = self.caller(&request).await?;
        if !caller.is_admin() {
            return Err(Status::permission_denied(
                "CreateOrg needs the operator key",
            ));
        }
        let req = request.into_inner();
        let name = name_arg("name", &req.name, true)?;
        let rpm = if req.rpm_limit == 0 {
            self.default_rpm
        } else {
            req.rpm_limit
        };
        let id = store::create_org(&self.validator.pool, &name, rpm, &caller.actor())
            .await
            .map_err(|e| store_status(e, "org not found"))?;
        tracing::info!(org = %id, rpm, "org created");
        Ok(Response::new(pb::CreateOrgResponse {
            org_id: id.to_string(),
            rpm_limit: rpm,
        }))
    }

    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::CreateAgentResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        caller.require(org, perms::AGENTS_MANAGE)?;
        let name = name_arg("name", &req.name, true)?;
        let id = store::create_agent(
            &self.validator.pool,
            org,
            &name,
            self.limits.max_agents_per_org,
            &caller.actor(),
        )
        .await
        .map_err(|e| store_status(e, "org not found"))?;
        tracing::info!(%org, agent = %id, "agent created");
        Ok(Response::new(pb::CreateAgentResponse {
            agent_id: id.to_string(),
            status: pb::AgentStatus::Active as i32,
        }))
    }

    async fn set_agent_status(
        &self,
        request: Request<pb::SetAgentStatusRequest>,
    ) -> Result<Response<pb::SetAgentStatusResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        caller.require(org, perms::AGENTS_MANAGE)?;
        let agent = uuid_arg("agent_id", &req.agent_id)?;
        let status = pb::AgentStatus::try_from(req.status)
            .ok()
            .and_then(agent_status_name)
            .ok_or_else(|| {
                Status::invalid_argument("status must be active, paused, archived or suspended")
            })?;
        store::set_agent_status(&self.validator.pool, org, agent, status, &caller.actor())
            .await
            .map_err(|e| scoped_not_found(&caller, e, "agent"))?;
        tracing::info!(%org, %agent, status, "agent status changed");
        Ok(Response::new(pb::SetAgentStatusResponse {
            agent_id: agent.to_string(),
            status: req.status,
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        caller.require(org, perms::TOKENS_MANAGE)?;
        // Held for the whole creation: hashing and the insert never crowd out validations.
        let creation = self.validator.hasher.admit_creation().map_err(|_| {
            Status::resource_exhausted("too many token creations in progress; retry later")
        })?;
        let permissions = perms::check_known(req.permissions)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let agent_id = optional_uuid("agent_id", &req.agent_id)?;
        let user_id = optional_uuid("user_id", &req.user_id)?;
        if let Caller::Pat(manager) = &caller {
            // Never beyond the manager's own grant.
            if !perms::covers(manager.permissions, permissions) {
                return Err(Status::permission_denied(
                    "a token cannot grant permissions its creator lacks",
                ));
            }
            if manager.agent_id.is_some() && manager.agent_id != agent_id {
                return Err(Status::permission_denied(
                    "a token bound to an agent can only create tokens bound to that agent",
                ));
            }
        }
        let mut allowed_models = ibex_proto::models::normalize(&req.allowed_models)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Caller::Pat(manager) = &caller {
            // A token made with a PAT never reaches a model that PAT could not: no list means
            // the PAT's own; a list must stay inside it.
            if allowed_models.is_empty() {
                allowed_models = manager.allowed_models.clone();
            } else if !ibex_proto::models::covers(&manager.allowed_models, &allowed_models) {
                return Err(Status::permission_denied(
                    "a token cannot allow models its creator's token does not",
                ));
            }
        }
        if req.expires_in_ms < 0 {
            return Err(Status::invalid_argument("expires_in_ms must be ≥ 0"));
        }
        let expires_in_ms = (req.expires_in_ms > 0).then_some(req.expires_in_ms);
        // A token created with a PAT never outlives it.
        let expires_at_most_ms = match &caller {
            Caller::Pat(manager) => manager.expires_at_ms,
            Caller::Admin => None,
        };
        let name = name_arg("name", &req.name, false)?;

        let issued = pat::issue(Uuid::new_v4());
        let phc = creation
            .hash(issued.secret.clone())
            .await
            .map_err(|e: hasher::HashError| {
                tracing::error!(error = %e, "hashing failed");
                Status::internal("hashing failed")
            })?;
        let epoch = self.validator.cache.epoch();
        let new = NewToken {
            id: issued.id,
            org_id: org,
            name: &name,
            agent_id,
            user_id,
            permissions,
            expires_in_ms,
            expires_at_most_ms,
            secret_hash: &phc,
            max_tokens: self.limits.max_tokens_per_org,
            allowed_models: &allowed_models,
        };
        let (expires_at_ms, rpm_limit, limits, org_allowed_models) =
            store::create_token(&self.validator.pool, &new, &caller.actor())
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => {
                        Status::not_found("org not found, or the agent/user is not in that org")
                    }
                    other => store_status(other, "org not found"),
                })?;
        self.validator.warm(
            epoch,
            issued.digest(),
            &phc,
            VerifiedToken {
                token_id: issued.id,
                org_id: org,
                permissions,
                agent_id,
                user_id,
                expires_at_ms,
                rpm_limit,
                allowed_models: allowed_models.clone(),
                org_allowed_models,
                limits,
            },
        );
        tracing::info!(%org, token = %issued.id, permissions, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token_id: issued.id.to_string(),
            token: issued.token.expose_secret().to_owned(),
            permissions,
            expires_at_unix_ms: opt_ms(expires_at_ms),
        }))
    }

    async fn set_org_models(
        &self,
        request: Request<pb::SetOrgModelsRequest>,
    ) -> Result<Response<pb::SetOrgModelsResponse>, Status> {
        let caller = self.caller(&request).await?;
        // The operator's control over a tenant: a tenant's own token cannot lift it.
        if !caller.is_admin() {
            return Err(Status::permission_denied(
                "SetOrgModels needs the operator key",
            ));
        }
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        let models = ibex_proto::models::normalize(&req.allowed_models)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        store::set_org_models(&self.validator.pool, org, &models, &caller.actor())
            .await
            .map_err(|e| store_status(e, "org not found"))?;
        // Our own cache at once; the proxies and other instances through the NOTIFY feed.
        self.validator.cache.invalidate_org(org);
        tracing::info!(%org, models = models.len(), "org model allow-list set");
        Ok(Response::new(pb::SetOrgModelsResponse {
            org_id: org.to_string(),
            allowed_models: models,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        caller.require(org, perms::TOKENS_MANAGE)?;
        let id = uuid_arg("token_id", &req.token_id)?;
        let revoked_at = store::revoke_token(&self.validator.pool, org, id, &caller.actor())
            .await
            .map_err(|e| scoped_not_found(&caller, e, "token"))?;
        // Our own cache at once (stale: the next ask re-reads the row, no Argon2); other
        // instances through the NOTIFY feed.
        self.validator.cache.mark_stale(id);
        tracing::info!(%org, token = %id, "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {
            token_id: id.to_string(),
            revoked_at_unix_ms: revoked_at,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let caller = self.caller(&request).await?;
        let org = uuid_arg("org_id", &request.get_ref().org_id)?;
        caller.require(org, perms::TOKENS_MANAGE)?;
        let rows = store::list_tokens(&self.validator.pool, org)
            .await
            .map_err(|e| store_status(e, "org not found"))?;
        let tokens = rows
            .into_iter()
            .map(|t| pb::TokenInfo {
                id: t.id.to_string(),
                org_id: org.to_string(),
                name: t.name,
                agent_id: opt_id(t.agent_id),
                user_id: opt_id(t.user_id),
                permissions: t.permissions,
                created_at_unix_ms: t.created_at_ms,
                expires_at_unix_ms: opt_ms(t.expires_at_ms),
                revoked_at_unix_ms: opt_ms(t.revoked_at_ms),
                last_used_at_unix_ms: opt_ms(t.last_used_at_ms),
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn record_usage(
        &self,
        request: Request<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::RecordUsageResponse>, Status> {
        // Internal: the proxies' shippers, with the service key (SPEC §6).
        self.internal(&request)?;
        ledger::rpc::record_usage(&self.validator.pool, request.into_inner()).await
    }

    async fn ship_usage(
        &self,
        request: Request<pb::ShipUsageRequest>,
    ) -> Result<Response<pb::RecordUsageResponse>, Status> {
        // Internal: the proxies' shippers, with the service key (SPEC §6).
        self.internal(&request)?;
        ledger::rpc::ship_usage(&self.validator.pool, request.into_inner()).await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = self.caller(&request).await?;
        ledger::rpc::get_usage(&self.validator.pool, &caller, request.into_inner()).await
    }

    type ExportUsageStream = ledger::rpc::ExportStream;

    async fn set_org_limits(
        &self,
        request: Request<pb::SetOrgLimitsRequest>,
    ) -> Result<Response<pb::OrgLimits>, Status> {
        let caller = self.caller(&request).await?;
        if !caller.is_admin() {
            return Err(Status::permission_denied(
                "SetOrgLimits needs the operator key",
            ));
        }
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        let change = crate::limits::org_change(req)?;
        let (rpm, limits) =
            crate::limits::set_org_limits(&self.validator.pool, org, change, &caller.actor())
                .await
                .map_err(|e| store_status(e, "org not found"))?;
        // The NOTIFY reaches this authd's cache too, but a validation racing it must not
        // answer the old limits after this call returned.
        self.validator.cache.invalidate_org(org);
        tracing::info!(%org, rpm, tpm = ?limits.tpm, month_tokens = limits.month_tokens, "org limits changed");
        Ok(Response::new(crate::limits::org_pb(org, rpm, limits)))
    }

    async fn set_agent_limits(
        &self,
        request: Request<pb::SetAgentLimitsRequest>,
    ) -> Result<Response<pb::AgentLimits>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let org = uuid_arg("org_id", &req.org_id)?;
        caller.require(org, perms::AGENTS_MANAGE)?;
        let agent = uuid_arg("agent_id", &req.agent_id)?;
        let limits = crate::limits::set_agent_limits(
            &self.validator.pool,
            org,
            agent,
            req.tpm_limit,
            req.monthly_token_budget,
            &caller.actor(),
        )
        .await
        .map_err(|e| scoped_not_found(&caller, e, "agent"))?;
        tracing::info!(%org, %agent, tpm = limits.tpm, month_tokens = limits.month_tokens, "agent limits changed");
        Ok(Response::new(pb::AgentLimits {
            org_id: org.to_string(),
            agent_id: agent.to_string(),
            tpm_limit: limits.tpm,
            monthly_token_budget: limits.month_tokens,
        }))
    }

    async fn get_month_usage(
        &self,
        request: Request<pb::GetMonthUsageRequest>,
    ) -> Result<Response<pb::GetMonthUsageResponse>, Status> {
        // Internal: a proxy re-seeding its month counters (service key, SPEC §6).
        self.internal(&request)?;
        let req = request.into_inner();
        let org = uuid_arg("org_id", &req.org_id)?;
        let agent = optional_uuid("agent_id", &req.agent_id)?;
        if req.since_unix_ms < 0 {
            return Err(Status::invalid_argument("since_unix_ms must be ≥ 0"));
        }
        crate::limits::month_usage(&self.validator.pool, org, agent, req.since_unix_ms)
            .await
            .map(Response::new)
            .map_err(|e| store_status(e, "org not found"))
    }

    async fn export_usage(
        &self,
        request: Request<pb::ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        let caller = self.caller(&request).await?;
        ledger::rpc::export_usage(&self.validator.pool, &caller, request.into_inner()).await
    }

    type WatchInvalidationsStream = EventStream;

    async fn watch_invalidations(
        &self,
        request: Request<pb::WatchInvalidationsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.internal(&request)?;
        if self.validator.feed.subscribers() >= MAX_SUBSCRIBERS {
            return Err(Status::resource_exhausted(
                "too many invalidation subscribers; retry later",
            ));
        }
        let subscriber: String = request
            .get_ref()
            .subscriber
            .chars()
            .take(MAX_NAME_LEN)
            .collect();
        let feed: &Arc<Feed> = &self.validator.feed;
        // First event: a heartbeat, if the LISTEN connection is healthy right now; otherwise the
        // stream stays silent until the listener reconnects and heartbeats again.
        let (rx, first) = feed.subscribe_with_heartbeat();
        let first = first.map(Ok);
        tracing::info!(%subscriber, subscribers = feed.subscribers(), "invalidation subscriber joined");
        let events = BroadcastStream::new(rx).map(|event| {
            event.map_err(|BroadcastStreamRecvError::Lagged(n)| {
                Status::data_loss(format!("subscriber fell {n} events behind; resubscribe"))
            })
        });
        // An error ends the stream (the subscriber must resubscribe and flush); so does shutdown.
        let mut failed = false;
        let events = events.take_while(move |event| {
            let go = !failed;
            failed |= event.is_err();
            futures::future::ready(go)
        });
        let mut shutdown = self.shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let stream = futures::stream::iter(first).chain(events).take_until(stop);
        Ok(Response::new(Box::pin(stream)))
    }
}
