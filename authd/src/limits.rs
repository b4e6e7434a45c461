//! Token limits and budgets (SPEC §11): the org's and agent's limits as stored, the two
//! management calls that change them and the month-to-date figures a proxy re-seeds its Redis
//! month counters from. Every query runs under the org's RLS setting and filters on `org_id`.
//!
//! Who may change what: an org's limits (`SetOrgLimits`, including `rpm_limit`) only the
//! operator key — an org must not raise its own ceiling; an agent's limits (`SetAgentLimits`)
//! the operator key or a PAT with `agents:manage` in the org — an agent's limits only narrow
//! the org's, which still apply. `GetMonthUsage` is internal (service key), like validation.
//!
//! A change is announced on the invalidation feed by the table triggers (0001, 0004) in the
//! same transaction, so every proxy drops the cached token or agent and re-reads the limits
//! with its next validation, within the revocation SLA.

use deadpool_postgres::{Pool, Transaction};
use ibex_proto::pb;
use tonic::Status;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::store::{set_org, StoreError};

/// An org's token limits as a validation carries them. USD in millionths (integers keep
/// [`crate::cache::VerifiedToken`] `Eq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrgTokenLimits {
    /// `None` = the proxy's `IBEX_DEFAULT_TPM`; 0 = no limit.
    pub tpm: Option<u64>,
    pub month_tokens: u64,
    pub month_usd_micros: u64,
}

impl OrgTokenLimits {
    /// The columns read with a token (`o` = organizations), in this order.
    pub const COLUMNS: &'static str =
        "o.tpm_limit, o.monthly_token_budget, (o.monthly_usd_budget * 1000000)::bigint";

    /// From the row's columns at `at..at + 3` (as [`Self::COLUMNS`]).
    pub fn from_row(row: &tokio_postgres::Row, at: usize) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            tpm: row
                .try_get::<_, Option<i64>>(at)?
                .map(|v| u64::try_from(v).unwrap_or(0)),
            month_tokens: u64::try_from(row.try_get::<_, i64>(at + 1)?).unwrap_or(0),
            month_usd_micros: u64::try_from(row.try_get::<_, i64>(at + 2)?).unwrap_or(0),
        })
    }

    pub fn usd(&self) -> f64 {
        self.month_usd_micros as f64 / 1e6
    }
}

/// An agent's token limits (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentTokenLimits {
    pub tpm: u64,
    pub month_tokens: u64,
}

fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(what))
}

/// What `SetOrgLimits` changes; `None` = unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct OrgChange {
    pub rpm: Option<u32>,
    /// `Some(None)` = back to the proxy's default.
    pub tpm: Option<Option<u64>>,
    pub month_tokens: Option<u64>,
    pub month_usd: Option<f64>,
}

async fn org_row(tx: &Transaction<'_>, org: Uuid) -> Result<(u32, OrgTokenLimits), StoreError> {
    let sql = format!(
        "SELECT o.rpm_limit, {} FROM ibex_core.organizations o WHERE o.id = $1",
        OrgTokenLimits::COLUMNS
    );
    let row = tx
        .query_opt(&sql, &[&org])
        .await?
        .ok_or(StoreError::NotFound)?;
    let rpm = u32::try_from(row.try_get::<_, i32>(0)?).unwrap_or(0);
    Ok((rpm, OrgTokenLimits::from_row(&row, 1)?))
}

/// Applies `change` and its audit row in one transaction; returns the limits now.
pub async fn set_org_limits(
    pool: &Pool,
    org: Uuid,
    change: OrgChange,
    actor: &Actor,
) -> Result<(u32, OrgTokenLimits), StoreError> {
    let rpm = change
        .rpm
        .map(|r| i32::try_from(r).map_err(|_| StoreError::Invalid("rpm_limit too large")))
        .transpose()?;
    if rpm == Some(0) {
        return Err(StoreError::Invalid("rpm_limit must be > 0"));
    }
    let tpm = match change.tpm {
        Some(Some(v)) => Some(Some(to_i64(v, "tpm_limit too large")?)),
        Some(None) => Some(None),
        None => None,
    };
    let month_tokens = change
        .month_tokens
        .map(|v| to_i64(v, "monthly_token_budget too large"))
        .transpose()?;
    if let Some(usd) = change.month_usd {
        if !usd.is_finite() || !(0.0..=1e12).contains(&usd) {
            return Err(StoreError::Invalid("monthly_usd_budget must be 0 to 1e12"));
        }
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let (old_rpm, old) = org_row(&tx, org).await?;
    let set_tpm = tpm.is_some();
    let tpm_value: Option<i64> = tpm.flatten();
    tx.execute(
        "UPDATE ibex_core.organizations SET \
           rpm_limit = COALESCE($2, rpm_limit), \
           tpm_limit = CASE WHEN $3 THEN $4 ELSE tpm_limit END, \
           monthly_token_budget = COALESCE($5, monthly_token_budget), \
           monthly_usd_budget = COALESCE($6::float8::numeric(20, 6), monthly_usd_budget) \
         WHERE id = $1",
        &[
            &org,
            &rpm,
            &set_tpm,
            &tpm_value,
            &month_tokens,
            &change.month_usd,
        ],
    )
    .await?;
    let (new_rpm, new) = org_row(&tx, org).await?;
    let details = serde_json::json!({
        "from": {"rpm_limit": old_rpm, "tpm_limit": old.tpm, "monthly_token_budget": old.month_tokens, "monthly_usd_budget": old.usd()},
        "to": {"rpm_limit": new_rpm, "tpm_limit": new.tpm, "monthly_token_budget": new.month_tokens, "monthly_usd_budget": new.usd()},
    });
    audit::append(&tx, org, actor, "org.set_limits", &org.to_string(), details).await?;
    tx.commit().await?;
    Ok((new_rpm, new))
}

async fn agent_row(
    tx: &Transaction<'_>,
    org: Uuid,
    agent: Uuid,
) -> Result<AgentTokenLimits, StoreError> {
    let row = tx
        .query_opt(
            "SELECT tpm_limit, monthly_token_budget FROM ibex_core.agents \
             WHERE org_id = $1 AND id = $2",
            &[&org, &agent],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(AgentTokenLimits {
        tpm: u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
        month_tokens: u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
    })
}

/// Applies an agent's new limits (`None` = unchanged) and its audit row in one transaction.
pub async fn set_agent_limits(
    pool: &Pool,
    org: Uuid,
    agent: Uuid,
    tpm: Option<u64>,
    month_tokens: Option<u64>,
    actor: &Actor,
) -> Result<AgentTokenLimits, StoreError> {
    let tpm = tpm.map(|v| to_i64(v, "tpm_limit too large")).transpose()?;
    let month = month_tokens
        .map(|v| to_i64(v, "monthly_token_budget too large"))
        .transpose()?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let old = agent_row(&tx, org, agent).await?;
    tx.execute(
        "UPDATE ibex_core.agents SET tpm_limit = COALESCE($3, tpm_limit), \
           monthly_token_budget = COALESCE($4, monthly_token_budget), updated_at = now() \
         WHERE org_id = $1 AND id = $2",
        &[&org, &agent, &tpm, &month],
    )
    .await?;
    let new = agent_row(&tx, org, agent).await?;
    let details = serde_json::json!({
        "from": {"tpm_limit": old.tpm, "monthly_token_budget": old.month_tokens},
        "to": {"tpm_limit": new.tpm, "monthly_token_budget": new.month_tokens},
    });
    audit::append(
        &tx,
        org,
        actor,
        "agent.set_limits",
        &agent.to_string(),
        details,
    )
    .await?;
    tx.commit().await?;
    Ok(new)
}

/// The agent's status and limits, or `None` when it is unknown or of another org.
pub async fn agent_status_limits(
    pool: &Pool,
    org: Uuid,
    agent: Uuid,
) -> Result<Option<(String, AgentTokenLimits)>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let stmt = tx
        .prepare_cached(
            "SELECT status, tpm_limit, monthly_token_budget FROM ibex_core.agents \
             WHERE org_id = $1 AND id = $2",
        )
        .await?;
    let row = tx.query_opt(&stmt, &[&org, &agent]).await?;
    tx.commit().await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some((
        row.try_get(0)?,
        AgentTokenLimits {
            tpm: u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
            month_tokens: u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0),
        },
    )))
}

/// Month-to-date totals from the ledger: the org's tokens and USD, and one agent's tokens.
pub async fn month_usage(
    pool: &Pool,
    org: Uuid,
    agent: Option<Uuid>,
    since_ms: i64,
) -> Result<pb::GetMonthUsageResponse, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let row = tx
        .query_one(
            "SELECT COALESCE(sum(total_tokens), 0)::bigint, \
                    COALESCE(sum(cost_usd), 0)::float8, \
                    COALESCE(sum(total_tokens) FILTER (WHERE agent_id = $3), 0)::bigint \
             FROM ibex_core.usage_records \
             WHERE org_id = $1 AND started_at >= to_timestamp($2::bigint / 1000.0)",
            &[&org, &since_ms, &agent],
        )
        .await?;
    tx.commit().await?;
    Ok(pb::GetMonthUsageResponse {
        org_tokens: u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
        org_usd: row.try_get(1)?,
        agent_tokens: u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0),
    })
}

/// `OrgLimits` as answered.
pub fn org_pb(org: Uuid, rpm: u32, l: OrgTokenLimits) -> pb::OrgLimits {
    pb::OrgLimits {
        org_id: org.to_string(),
        rpm_limit: rpm,
        tpm_limit: l.tpm,
        monthly_token_budget: l.month_tokens,
        monthly_usd_budget: l.usd(),
    }
}

/// The change a `SetOrgLimitsRequest` asks for.
pub fn org_change(req: &pb::SetOrgLimitsRequest) -> Result<OrgChange, Status> {
    if req.tpm_default && req.tpm_limit.is_some() {
        return Err(Status::invalid_argument(
            "tpm_default and tpm_limit exclude each other",
        ));
    }
    Ok(OrgChange {
        rpm: req.rpm_limit,
        tpm: if req.tpm_default {
            Some(None)
        } else {
            req.tpm_limit.map(Some)
        },
        month_tokens: req.monthly_token_budget,
        month_usd: req.monthly_usd_budget,
    })
}
