//! The audit log's hash chain: appending (in the caller's transaction) and verifying.
//!
//! The chain itself is built by the `audit_chain` trigger in Postgres (so rows written by any
//! client are chained and the append is serialised on the `audit_head` row). Here: the writer
//! helper, and [`verify`], which recomputes every hash in Rust from the stored fields — the same
//! length-prefixed bytes as `ibex_core.audit_canonical` — and names the first row that breaks it.

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Who did it: the operator key, a PAT, or an ibexctl command run with the owner DSN.
#[derive(Debug, Clone)]
pub enum Actor {
    Admin,
    Token(Uuid),
    Cli(&'static str),
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Admin => f.write_str("admin-key"),
            Actor::Token(id) => write!(f, "token:{id}"),
            Actor::Cli(cmd) => write!(f, "ibexctl:{cmd}"),
        }
    }
}

/// Appends one row in the caller's transaction (its org setting must match `org_id` under RLS).
/// `details` must never contain a secret or a hash.
pub async fn append(
    client: &tokio_postgres::Transaction<'_>,
    org_id: Uuid,
    actor: &Actor,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO ibex_core.audit_log (org_id, at, actor, action, target, details, \
             prev_hash, row_hash) VALUES ($1, now(), $2, $3, $4, $5::text::jsonb, '', '')",
            &[
                &org_id,
                &actor.to_string(),
                &action,
                &target,
                &details.to_string(),
            ],
        )
        .await?;
    Ok(())
}

/// One stored row, as read back for verification.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub org_id: Option<Uuid>,
    pub at_us: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: String,
    pub prev_hash: Vec<u8>,
    pub row_hash: Vec<u8>,
}

/// The bytes `ibex_core.audit_canonical` hashes.
pub fn canonical(row: &Row) -> Vec<u8> {
    let org = row.org_id.map(|o| o.to_string()).unwrap_or_default();
    let fields = [
        "ibex-audit-v1".to_owned(),
        row.id.to_string(),
        org,
        row.at_us.to_string(),
        row.actor.clone(),
        row.action.clone(),
        row.target.clone(),
        row.details.clone(),
        hex::encode(&row.prev_hash),
    ];
    let mut out = Vec::new();
    for field in fields {
        out.extend_from_slice(field.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(field.as_bytes());
    }
    out
}

pub fn row_hash(row: &Row) -> [u8; 32] {
    Sha256::digest(canonical(row)).into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub ok: bool,
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("audit_log row {id}: content does not match its hash (tampered)")]
    Content { id: i64 },
    #[error("audit_log row {id}: prev_hash does not match row {prev}'s hash (chain broken)")]
    Link { id: i64, prev: i64 },
    #[error("audit_log row {id}: expected id {expected} (rows missing before it)")]
    Gap { id: i64, expected: i64 },
    #[error("audit_log head says {head_id} rows but the log ends at {last_id} (rows missing at the end)")]
    Head { head_id: i64, last_id: i64 },
}

/// Checks a chain in id order, starting from the all-zero genesis hash; `head` is the
/// `audit_head` row (last id and hash) when known.
pub fn check_chain(
    rows: impl IntoIterator<Item = Row>,
    head: Option<(i64, Vec<u8>)>,
) -> Result<u64, ChainError> {
    let mut prev_hash = vec![0u8; 32];
    let mut expected = 1i64;
    let mut count = 0u64;
    for row in rows {
        if row.id != expected {
            return Err(ChainError::Gap {
                id: row.id,
                expected,
            });
        }
        if row.prev_hash != prev_hash {
            return Err(ChainError::Link {
                id: row.id,
                prev: row.id - 1,
            });
        }
        if row_hash(&row).as_slice() != row.row_hash.as_slice() {
            return Err(ChainError::Content { id: row.id });
        }
        prev_hash = row.row_hash;
        expected += 1;
        count += 1;
    }
    if let Some((head_id, head_hash)) = head {
        let last_id = expected - 1;
        if head_id != last_id || (last_id > 0 && head_hash != prev_hash) {
            return Err(ChainError::Head { head_id, last_id });
        }
    }
    Ok(count)
}

/// Reads the whole log (owner connection) and checks it.
pub async fn verify(client: &impl GenericClient) -> anyhow::Result<Result<u64, ChainError>> {
    let rows = client
        .query(
            "SELECT id, org_id, (extract(epoch FROM at) * 1000000)::bigint, actor, action, \
             target, details::text, prev_hash, row_hash FROM ibex_core.audit_log ORDER BY id",
            &[],
        )
        .await?;
    let head = client
        .query_opt(
            "SELECT last_id, last_hash FROM ibex_core.audit_head WHERE singleton",
            &[],
        )
        .await?
        .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    let rows = rows
        .into_iter()
        .map(|r| {
            Ok(Row {
                id: r.try_get(0)?,
                org_id: r.try_get(1)?,
                at_us: r.try_get(2)?,
                actor: r.try_get(3)?,
                action: r.try_get(4)?,
                target: r.try_get(5)?,
                details: r.try_get(6)?,
                prev_hash: r.try_get(7)?,
                row_hash: r.try_get(8)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(check_chain(rows, head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<Row> {
        let mut prev = vec![0u8; 32];
        (1..=n)
            .map(|id| {
                let mut row = Row {
                    id,
                    org_id: Some(Uuid::nil()),
                    at_us: 1_700_000_000_000_000 + id,
                    actor: "admin-key".into(),
                    action: "token.create".into(),
                    target: format!("t{id}"),
                    details: r#"{"permissions": 3}"#.into(),
                    prev_hash: prev.clone(),
                    row_hash: vec![],
                };
                row.row_hash = row_hash(&row).to_vec();
                prev = row.row_hash.clone();
                row
            })
            .collect()
    }

    #[test]
    fn canonical_form_is_length_prefixed() {
        let row = Row {
            id: 7,
            org_id: None,
            at_us: 5,
            actor: "a|b".into(),
            action: "x".into(),
            target: String::new(),
            details: "{}".into(),
            prev_hash: vec![0xab],
            row_hash: vec![],
        };
        assert_eq!(
            String::from_utf8(canonical(&row)).expect("utf8"),
            "13:ibex-audit-v11:70:1:53:a|b1:x0:2:{}2:ab"
        );
    }

    #[test]
    fn intact_chain_verifies_and_each_kind_of_tampering_is_named() {
        let rows = chain(5);
        let head = Some((5, rows[4].row_hash.clone()));
        assert_eq!(check_chain(rows.clone(), head.clone()), Ok(5));

        let mut edited = rows.clone();
        edited[2].action = "token.revoke".into();
        assert_eq!(
            check_chain(edited, head.clone()),
            Err(ChainError::Content { id: 3 })
        );

        let mut rehashed = rows.clone();
        rehashed[2].target = "other".into();
        rehashed[2].row_hash = row_hash(&rehashed[2]).to_vec();
        assert_eq!(
            check_chain(rehashed, head.clone()),
            Err(ChainError::Link { id: 4, prev: 3 })
        );

        let mut deleted = rows.clone();
        deleted.remove(1);
        assert_eq!(
            check_chain(deleted, head.clone()),
            Err(ChainError::Gap { id: 3, expected: 2 })
        );

        let truncated = rows[..4].to_vec();
        assert_eq!(
            check_chain(truncated, head),
            Err(ChainError::Head {
                head_id: 5,
                last_id: 4
            })
        );
        assert_eq!(check_chain(Vec::new(), Some((0, vec![0; 32]))), Ok(0));
    }
}
