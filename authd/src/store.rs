//! Every query authd makes, in one place.
//!
//! All tenant data is read and written inside a transaction whose first statement is
//! `set_config('ibex.org_id', <org>, true)` (= `SET LOCAL`), and every statement also filters on
//! `org_id` explicitly: RLS is the second wall, not the only one. The one query made before the
//! org is known is `ibex_core.token_lookup(id)` (SECURITY DEFINER; org and hash of one id only).

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::audit::{self, Actor};
pub use crate::pgtls::Database;

/// Connections in authd's pool.
pub const POOL_SIZE: usize = 16;
/// How long a request may wait for a pooled connection, or a new one may take to open.
pub const POOL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Invalid(&'static str),
    /// An org quota (IBEX_MAX_TOKENS_PER_ORG, IBEX_MAX_AGENTS_PER_ORG) is reached.
    #[error("{0}")]
    Quota(&'static str),
}

/// Serialises quota checks of one org (a transaction-scoped advisory lock: no UPDATE grant
/// needed, released at commit). `kind` keeps token and agent counts apart.
async fn lock_org_quota(tx: &Transaction<'_>, org: Uuid, kind: i32) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($2::int4, hashtext($1::uuid::text))",
        &[&org, &kind],
    )
    .await?;
    Ok(())
}

pub fn pool(database: &Database) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        database.config.clone(),
        database.connector.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()?)
}

/// `SET LOCAL ibex.org_id = org` for the rest of the transaction.
pub async fn set_org(tx: &Transaction<'_>, org: Uuid) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT set_config('ibex.org_id', $1, true)",
        &[&org.to_string()],
    )
    .await?;
    Ok(())
}

const MS: &str = "(extract(epoch FROM {}) * 1000)::bigint";

fn ms(col: &str) -> String {
    MS.replace("{}", col)
}

/// Org and PHC hash of one token id, before its org is known.
pub async fn lookup_token(pool: &Pool, id: Uuid) -> Result<Option<(Uuid, String)>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT org_id, secret_hash FROM ibex_core.token_lookup($1)")
        .await?;
    let row = client.query_opt(&stmt, &[&id]).await?;
    Ok(match row {
        Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
        None => None,
    })
}

/// A token row as read under RLS after its secret verified.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub secret_hash: String,
    pub permissions: u64,
    pub agent_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub rpm_limit: u32,
    pub allowed_models: Vec<String>,
    pub org_allowed_models: Vec<String>,
    pub limits: crate::limits::OrgTokenLimits,
}

pub async fn load_token(pool: &Pool, org: Uuid, id: Uuid) -> Result<Option<TokenRow>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let sql = format!(
        "SELECT t.secret_hash, t.permissions, t.agent_id, t.user_id, {}, {}, o.rpm_limit, \
         t.allowed_models, o.allowed_models, {} \
         FROM ibex_core.tokens t JOIN ibex_core.organizations o ON o.id = t.org_id \
         WHERE t.org_id = $1 AND t.id = $2 AND o.id = $1",
        ms("t.expires_at"),
        ms("t.revoked_at"),
        crate::limits::OrgTokenLimits::COLUMNS
    );
    let stmt = tx.prepare_cached(&sql).await?;
    let row = tx.query_opt(&stmt, &[&org, &id]).await?;
    tx.commit().await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(TokenRow {
        secret_hash: row.try_get(0)?,
        permissions: u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
        agent_id: row.try_get(2)?,
        user_id: row.try_get(3)?,
        expires_at_ms: row.try_get(4)?,
        revoked_at_ms: row.try_get(5)?,
        rpm_limit: u32::try_from(row.try_get::<_, i32>(6)?).unwrap_or(0),
        allowed_models: row.try_get(7)?,
        org_allowed_models: row.try_get(8)?,
        limits: crate::limits::OrgTokenLimits::from_row(&row, 9)?,
    }))
}

/// The agent's status, or `None` when it is unknown or of another org (indistinguishable).
pub async fn agent_status(
    pool: &Pool,
    org: Uuid,
    agent: Uuid,
) -> Result<Option<String>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let stmt = tx
        .prepare_cached("SELECT status FROM ibex_core.agents WHERE org_id = $1 AND id = $2")
        .await?;
    let row = tx.query_opt(&stmt, &[&org, &agent]).await?;
    tx.commit().await?;
    Ok(match row {
        Some(row) => Some(row.try_get(0)?),
        None => None,
    })
}

pub async fn create_org(
    pool: &Pool,
    name: &str,
    rpm_limit: u32,
    actor: &Actor,
) -> Result<Uuid, StoreError> {
    let id = Uuid::new_v4();
    let rpm = i32::try_from(rpm_limit).map_err(|_| StoreError::Invalid("rpm_limit too large"))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, id).await?;
    tx.execute(
        "INSERT INTO ibex_core.organizations (id, name, rpm_limit) VALUES ($1, $2, $3)",
        &[&id, &name, &rpm],
    )
    .await
    .map_err(check_violation)?;
    let details = serde_json::json!({ "name": name, "rpm_limit": rpm_limit });
    audit::append(&tx, id, actor, "org.create", &id.to_string(), details).await?;
    tx.commit().await?;
    Ok(id)
}

pub async fn create_agent(
    pool: &Pool,
    org: Uuid,
    name: &str,
    max_agents: u32,
    actor: &Actor,
) -> Result<Uuid, StoreError> {
    let id = Uuid::new_v4();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    lock_org_quota(&tx, org, QUOTA_AGENTS).await?;
    let agents: i64 = tx
        .query_one(
            "SELECT count(*) FROM ibex_core.agents WHERE org_id = $1",
            &[&org],
        )
        .await?
        .try_get(0)?;
    if agents >= i64::from(max_agents) {
        return Err(StoreError::Quota(
            "the org holds IBEX_MAX_AGENTS_PER_ORG agents already",
        ));
    }
    tx.execute(
        "INSERT INTO ibex_core.agents (id, org_id, name) VALUES ($1, $2, $3)",
        &[&id, &org, &name],
    )
    .await
    .map_err(check_violation)?;
    let details = serde_json::json!({ "name": name });
    audit::append(&tx, org, actor, "agent.create", &id.to_string(), details).await?;
    tx.commit().await?;
    Ok(id)
}

pub async fn set_agent_status(
    pool: &Pool,
    org: Uuid,
    agent: Uuid,
    status: &str,
    actor: &Actor,
) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let old: Option<String> = tx
        .query_opt(
            "SELECT status FROM ibex_core.agents WHERE org_id = $1 AND id = $2 FOR UPDATE",
            &[&org, &agent],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let Some(old) = old else {
        return Err(StoreError::NotFound);
    };
    tx.execute(
        "UPDATE ibex_core.agents SET status = $3, updated_at = now() \
         WHERE org_id = $1 AND id = $2",
        &[&org, &agent, &status],
    )
    .await
    .map_err(check_violation)?;
    let details = serde_json::json!({ "from": old, "to": status });
    audit::append(
        &tx,
        org,
        actor,
        "agent.set_status",
        &agent.to_string(),
        details,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

const QUOTA_TOKENS: i32 = 0x1be7_0002;
const QUOTA_AGENTS: i32 = 0x1be7_0003;

/// A token about to be stored; `secret_hash` is the Argon2id PHC string.
pub struct NewToken<'a> {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: &'a str,
    pub agent_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub permissions: u64,
    pub expires_in_ms: Option<i64>,
    /// Latest expiry allowed (the creating PAT's own, unix ms); the token gets the earlier one.
    pub expires_at_most_ms: Option<i64>,
    pub secret_hash: &'a str,
    /// Most unrevoked tokens the org may hold.
    pub max_tokens: u32,
    /// Normalised model allow-list (SPEC §12); empty = every model.
    pub allowed_models: &'a [String],
}

/// Stores the token and its audit row; returns (expires_at_ms, org rpm_limit, org token limits,
/// org allowed_models).
pub async fn create_token(
    pool: &Pool,
    token: &NewToken<'_>,
    actor: &Actor,
) -> Result<(Option<i64>, u32, crate::limits::OrgTokenLimits, Vec<String>), StoreError> {
    let perms = i64::try_from(token.permissions).map_err(|_| StoreError::Invalid("permissions"))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, token.org_id).await?;
    let org_row = tx
        .query_opt(
            &format!(
                "SELECT o.rpm_limit, o.allowed_models, {} FROM ibex_core.organizations o WHERE o.id = $1",
                crate::limits::OrgTokenLimits::COLUMNS
            ),
            &[&token.org_id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    let rpm: i32 = org_row.try_get(0)?;
    let org_models: Vec<String> = org_row.try_get(1)?;
    let limits = crate::limits::OrgTokenLimits::from_row(&org_row, 2)?;
    if let Some(user) = token.user_id {
        let found = tx
            .query_opt(
                "SELECT 1 FROM ibex_core.users WHERE org_id = $1 AND id = $2",
                &[&token.org_id, &user],
            )
            .await?;
        if found.is_none() {
            return Err(StoreError::Invalid("user_id is not a user of this org"));
        }
    }
    lock_org_quota(&tx, token.org_id, QUOTA_TOKENS).await?;
    let unrevoked: i64 = tx
        .query_one(
            "SELECT count(*) FROM ibex_core.tokens WHERE org_id = $1 AND revoked_at IS NULL",
            &[&token.org_id],
        )
        .await?
        .try_get(0)?;
    if unrevoked >= i64::from(token.max_tokens) {
        return Err(StoreError::Quota(
            "the org holds IBEX_MAX_TOKENS_PER_ORG unrevoked tokens already",
        ));
    }
    // LEAST ignores NULLs: no expiry asked and no cap → never; otherwise the earlier of the two.
    let sql = format!(
        "INSERT INTO ibex_core.tokens \
         (id, org_id, name, agent_id, user_id, permissions, secret_hash, expires_at, \
          allowed_models) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 LEAST(now() + $8::bigint * interval '1 millisecond', \
                       to_timestamp($9::bigint / 1000.0)), $10) \
         RETURNING {}",
        ms("expires_at")
    );
    let row = tx
        .query_one(
            &sql,
            &[
                &token.id,
                &token.org_id,
                &token.name,
                &token.agent_id,
                &token.user_id,
                &perms,
                &token.secret_hash,
                &token.expires_in_ms,
                &token.expires_at_most_ms,
                &token.allowed_models,
            ],
        )
        .await
        .map_err(check_violation)?;
    let expires_at_ms: Option<i64> = row.try_get(0)?;
    let details = serde_json::json!({
        "name": token.name,
        "permissions": token.permissions,
        "agent_id": token.agent_id,
        "user_id": token.user_id,
        "expires_at_ms": expires_at_ms,
        "allowed_models": token.allowed_models,
    });
    audit::append(
        &tx,
        token.org_id,
        actor,
        "token.create",
        &token.id.to_string(),
        details,
    )
    .await?;
    tx.commit().await?;
    Ok((
        expires_at_ms,
        u32::try_from(rpm).unwrap_or(0),
        limits,
        org_models,
    ))
}

/// Replaces an org's model allow-list (normalised by the caller) and audits it. The UPDATE fires
/// the org's invalidation (NOTIFY), so every proxy re-validates that org's tokens.
pub async fn set_org_models(
    pool: &Pool,
    org: Uuid,
    models: &[String],
    actor: &Actor,
) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let n = tx
        .execute(
            "UPDATE ibex_core.organizations SET allowed_models = $2 WHERE id = $1",
            &[&org, &models],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    let details = serde_json::json!({ "allowed_models": models });
    audit::append(&tx, org, actor, "org.set_models", &org.to_string(), details).await?;
    tx.commit().await?;
    Ok(())
}

/// Revokes (idempotently); returns when it was revoked.
pub async fn revoke_token(
    pool: &Pool,
    org: Uuid,
    id: Uuid,
    actor: &Actor,
) -> Result<i64, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let sql = format!(
        "UPDATE ibex_core.tokens SET revoked_at = coalesce(revoked_at, now()) \
         WHERE org_id = $1 AND id = $2 RETURNING {}",
        ms("revoked_at")
    );
    let row = tx
        .query_opt(&sql, &[&org, &id])
        .await?
        .ok_or(StoreError::NotFound)?;
    let revoked_at: i64 = row.try_get(0)?;
    audit::append(
        &tx,
        org,
        actor,
        "token.revoke",
        &id.to_string(),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(revoked_at)
}

/// One row of ListTokens: never the hash.
#[derive(Debug, Clone)]
pub struct TokenListing {
    pub id: Uuid,
    pub name: String,
    pub agent_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub permissions: u64,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

pub async fn list_tokens(pool: &Pool, org: Uuid) -> Result<Vec<TokenListing>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let sql = format!(
        "SELECT id, name, agent_id, user_id, permissions, {}, {}, {}, {} \
         FROM ibex_core.tokens WHERE org_id = $1 ORDER BY created_at, id",
        ms("created_at"),
        ms("expires_at"),
        ms("revoked_at"),
        ms("last_used_at")
    );
    let rows = tx.query(&sql, &[&org]).await?;
    tx.commit().await?;
    rows.into_iter()
        .map(|r| {
            Ok(TokenListing {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                agent_id: r.try_get(2)?,
                user_id: r.try_get(3)?,
                permissions: u64::try_from(r.try_get::<_, i64>(4)?).unwrap_or(0),
                created_at_ms: r.try_get(5)?,
                expires_at_ms: r.try_get(6)?,
                revoked_at_ms: r.try_get(7)?,
                last_used_at_ms: r.try_get(8)?,
            })
        })
        .collect()
}

/// Bookkeeping: `last_used_at = now()` for these tokens of one org.
pub async fn touch_last_used(pool: &Pool, org: Uuid, ids: &[Uuid]) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    tx.execute(
        "UPDATE ibex_core.tokens SET last_used_at = now() WHERE org_id = $1 AND id = ANY($2)",
        &[&org, &ids],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Constraint violations are the caller's mistake (unknown org, agent of another org, ...).
fn check_violation(err: tokio_postgres::Error) -> StoreError {
    match err.code() {
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound,
        Some(code) if *code == SqlState::CHECK_VIOLATION => {
            StoreError::Invalid("a value is out of range")
        }
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Invalid("already exists"),
        _ => StoreError::Db(err),
    }
}
