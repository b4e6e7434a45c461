//! The usage ledger's store (SPEC §10, migration 0003): `ShipUsage`/`RecordUsage` batches in, `GetUsage`
//! totals and `ExportUsage` records out, and the per-org, per-batch hash chain that
//! `ibexctl usage verify` recomputes ([`check`]).
//!
//! A batch is stored in ONE transaction: per org (in org order, so two authd never deadlock) it
//! locks the org's chain head, binary-`COPY`s the records into the session's temp stage, moves
//! them with one `INSERT … SELECT` (redone `ON CONFLICT (org_id, request_id) DO NOTHING` when the
//! batch holds a record stored before), and appends one
//! `usage_batches` row over the records that were new. [`record`] returns only after `COMMIT`.
//! Not here: the proxy's spool and shipper (`proxy/src/ledger`), and who may call (`service.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use ibex_proto::pb;
use ibex_proto::usage::RecordRef;
use sha2::{Digest, Sha256};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::store::{set_org, StoreError};

/// Records per `ShipUsage`/`RecordUsage` call; the proxy ships at most this many at once.
pub const MAX_BATCH: usize = 10_000;
/// Groups one `GetUsage` answer may hold.
pub const MAX_GROUPS: usize = 100_000;
/// Rows fetched per round trip by export and verify (never the whole table in memory).
pub const PAGE: i32 = 1_000;

const ZERO: [u8; 32] = [0; 32];
const MAX_MODEL: usize = 256;
const MAX_ROUTE: usize = 128;
const MAX_PROVIDER: usize = 128;
/// numeric(20, 10) holds < 10^10.
const MAX_COST: f64 = 9_999_999_999.0;

/// One record as stored (validated and clamped from the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub org_id: Uuid,
    pub request_id: String,
    pub agent_id: Uuid,
    pub token_id: Uuid,
    pub model: String,
    pub route: String,
    pub status: i32,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    /// `provider` or `estimated`.
    pub usage_source: &'static str,
    pub streamed: bool,
    pub started_at_ms: i64,
    pub duration_ms: i64,
    /// Exactly as stored: 10 decimal places (`numeric(20, 10)`'s text form), `None` = unpriced.
    pub cost_usd: Option<String>,
    pub provider: Option<String>,
    pub attempts: Option<i32>,
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// `cost` as the 10-decimal text Postgres stores for `numeric(20, 10)`.
pub fn cost_text(cost: f64) -> Option<String> {
    (cost.is_finite() && cost >= 0.0).then(|| format!("{:.10}", cost.min(MAX_COST)))
}

pub fn usage_source_name(source: i32) -> &'static str {
    match pb::UsageSource::try_from(source) {
        Ok(pb::UsageSource::Provider) => "provider",
        _ => "estimated",
    }
}

impl Record {
    /// Only the ids and the request id can make a record unusable; everything else is clamped
    /// so that one odd record never blocks a spool.
    pub fn from_pb(r: &pb::UsageRecord) -> Result<Self, String> {
        let id = |field: &str, v: &str| {
            Uuid::try_parse(v).map_err(|_| format!("{field} must be a UUID"))
        };
        Self::from_ref(&RecordRef {
            request_id: r.request_id.as_str().into(),
            org_id: id("org_id", &r.org_id)?,
            agent_id: id("agent_id", &r.agent_id)?,
            token_id: id("token_id", &r.token_id)?,
            model: &r.model,
            route: &r.route,
            status: u16::try_from(r.status.min(999)).unwrap_or(999),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cache_creation_tokens: r.cache_creation_tokens,
            estimated: usage_source_name(r.usage_source) == "estimated",
            streamed: r.streamed,
            started_at_ms: r.started_at_unix_ms,
            duration_ms: r.duration_ms,
            cost_usd: r.cost_usd,
            provider: &r.provider,
            attempts: r.attempts,
        })
    }

    /// A record in the compact encoding (`ShipUsage`; [`Record::from_pb`] comes here with its
    /// ids parsed): the request id must be 1–128 bytes; strings are cut to their maxima,
    /// numbers clamped to what Postgres holds.
    pub fn from_ref(r: &RecordRef<'_>) -> Result<Self, String> {
        if r.request_id.is_empty() || r.request_id.len() > 128 {
            return Err("request_id must be 1-128 bytes".into());
        }
        Ok(Record {
            org_id: r.org_id,
            request_id: r.request_id.to_string(),
            agent_id: r.agent_id,
            token_id: r.token_id,
            model: truncate(r.model, MAX_MODEL),
            route: truncate(r.route, MAX_ROUTE),
            status: i32::from(r.status.min(999)),
            prompt_tokens: clamp_i64(r.prompt_tokens),
            completion_tokens: clamp_i64(r.completion_tokens),
            total_tokens: clamp_i64(r.total_tokens),
            cache_read_tokens: clamp_i64(r.cache_read_tokens),
            cache_creation_tokens: clamp_i64(r.cache_creation_tokens),
            usage_source: if r.estimated { "estimated" } else { "provider" },
            streamed: r.streamed,
            started_at_ms: r.started_at_ms.max(0),
            duration_ms: clamp_i64(r.duration_ms),
            cost_usd: r.cost_usd.and_then(cost_text),
            provider: (!r.provider.is_empty()).then(|| truncate(r.provider, MAX_PROVIDER)),
            attempts: (r.attempts > 0).then(|| i32::try_from(r.attempts).unwrap_or(i32::MAX)),
        })
    }

    pub fn to_pb(&self) -> pb::UsageRecord {
        let source = if self.usage_source == "provider" {
            pb::UsageSource::Provider
        } else {
            pb::UsageSource::Estimated
        };
        pb::UsageRecord {
            request_id: self.request_id.clone(),
            org_id: self.org_id.to_string(),
            agent_id: self.agent_id.to_string(),
            token_id: self.token_id.to_string(),
            model: self.model.clone(),
            route: self.route.clone(),
            status: u32::try_from(self.status).unwrap_or(0),
            prompt_tokens: u64::try_from(self.prompt_tokens).unwrap_or(0),
            completion_tokens: u64::try_from(self.completion_tokens).unwrap_or(0),
            total_tokens: u64::try_from(self.total_tokens).unwrap_or(0),
            usage_source: source as i32,
            streamed: self.streamed,
            started_at_unix_ms: self.started_at_ms,
            duration_ms: u64::try_from(self.duration_ms).unwrap_or(0),
            cost_usd: self.cost_usd.as_deref().and_then(|c| c.parse().ok()),
            provider: self.provider.clone().unwrap_or_default(),
            attempts: self
                .attempts
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
            cache_read_tokens: u64::try_from(self.cache_read_tokens).unwrap_or(0),
            cache_creation_tokens: u64::try_from(self.cache_creation_tokens).unwrap_or(0),
        }
    }
}

/// The bytes hashed for a record: each field length-prefixed (`<octets>:<text>`) so no value
/// can forge a field boundary; NULL is the empty string (stored text fields are never empty).
pub fn canonical(r: &Record, batch_seq: i64) -> Vec<u8> {
    let fields: [&str; 3] = ["ibex-usage-v1", &r.request_id, &r.model];
    let owned = [
        r.org_id.to_string(),
        r.agent_id.to_string(),
        r.token_id.to_string(),
        r.route.clone(),
        r.status.to_string(),
        r.prompt_tokens.to_string(),
        r.completion_tokens.to_string(),
        r.total_tokens.to_string(),
        r.cache_read_tokens.to_string(),
        r.cache_creation_tokens.to_string(),
        r.usage_source.to_owned(),
        r.streamed.to_string(),
        r.started_at_ms.to_string(),
        r.duration_ms.to_string(),
        r.cost_usd.clone().unwrap_or_default(),
        r.provider.clone().unwrap_or_default(),
        r.attempts.map(|a| a.to_string()).unwrap_or_default(),
        batch_seq.to_string(),
    ];
    let mut out = Vec::with_capacity(256);
    for f in fields
        .iter()
        .copied()
        .chain(owned.iter().map(String::as_str))
    {
        out.extend_from_slice(f.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(f.as_bytes());
    }
    out
}

pub fn row_hash(r: &Record, batch_seq: i64) -> [u8; 32] {
    Sha256::digest(canonical(r, batch_seq)).into()
}

/// SHA-256 of the batch's new rows' hashes, in `request_id` order.
pub fn content_hash<'a>(hashes: impl Iterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for x in hashes {
        h.update(x);
    }
    h.finalize().into()
}

pub fn batch_hash(org: Uuid, seq: i64, records: i32, content: &[u8], prev: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ibex-usage-batch-v1");
    h.update(org.as_bytes());
    h.update(seq.to_be_bytes());
    h.update(records.to_be_bytes());
    h.update(content);
    h.update(prev);
    h.finalize().into()
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
}

/// The session's staging table for one batch: a temp table (no WAL, no RLS, visible only to this
/// connection; `ON COMMIT DELETE ROWS` empties it at every commit, so no batch ever sees another
/// one's rows). Created once per pooled connection (`IF NOT EXISTS`); `ibex_app` needs only the
/// database's default `TEMPORARY` privilege.
const STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS usage_stage (org_id uuid, request_id text, \
    agent_id uuid, token_id uuid, model text, route text, status int4, pt int8, ct int8, \
    tt int8, crt int8, cct int8, src text, streamed bool, started_at timestamptz, dur int8, \
    cost text, provider text, attempts int4, row_hash bytea) ON COMMIT DELETE ROWS";

const COPY: &str = "COPY pg_temp.usage_stage (org_id, request_id, agent_id, token_id, model, \
    route, status, pt, ct, tt, crt, cct, src, streamed, started_at, dur, cost, provider, \
    attempts, row_hash) FROM STDIN (FORMAT binary)";

/// The column types of [`COPY`], in its order.
const STAGE_TYPES: [Type; 20] = [
    Type::UUID,
    Type::TEXT,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::BOOL,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::BYTEA,
];

/// From the stage into the ledger, under RLS (`WITH CHECK` holds each row to the org set for the
/// transaction). First tried as a plain insert (no speculative insertion: one index descent and
/// one WAL record less per row) inside a savepoint; only a batch holding a record stored before
/// fails it (unique violation) and is redone with [`INSERT_NEW`].
macro_rules! insert_from_stage {
    ($tail:literal) => {
        concat!(
            "INSERT INTO ibex_core.usage_records (org_id, request_id, agent_id, token_id, model, \
             route, status, prompt_tokens, completion_tokens, total_tokens, cache_read_tokens, \
             cache_creation_tokens, usage_source, streamed, started_at, duration_ms, cost_usd, \
             provider, attempts, batch_seq, row_hash) \
             SELECT org_id, request_id, agent_id, token_id, model, route, status, pt, ct, tt, \
             crt, cct, src, streamed, started_at, dur, cost::numeric, provider, attempts, \
             $2::bigint, row_hash FROM pg_temp.usage_stage WHERE org_id = $1",
            $tail
        )
    };
}
const INSERT_ALL: &str = insert_from_stage!("");
/// The slow path: only the records not stored before; the row count says how many were new.
const INSERT_NEW: &str = insert_from_stage!(" ON CONFLICT (org_id, request_id) DO NOTHING");

/// The rows a batch stored (only asked when some of its records were duplicates).
const NEW_ROWS: &str = "SELECT request_id, row_hash FROM ibex_core.usage_records \
    WHERE org_id = $1 AND batch_seq = $2";

/// Stores a batch in one transaction; returns (stored, duplicates) after COMMIT.
///
/// Per org: lock its chain head, hash the records with the batch's seq, binary-`COPY` them into
/// the session's stage, `INSERT … SELECT` them into the ledger (in a savepoint; redone `ON CONFLICT
/// DO NOTHING` if some were stored before), and append the
/// batch row over the records that were new (all of them unless the batch was sent before).
pub async fn record(pool: &Pool, records: Vec<Record>) -> Result<(u32, u32), StoreError> {
    let total = records.len();
    // Per org, each request id once (the first wins), in a fixed order.
    let mut by_org: BTreeMap<Uuid, BTreeMap<String, Record>> = BTreeMap::new();
    for r in records {
        let org = by_org.entry(r.org_id).or_default();
        if !org.contains_key(&r.request_id) {
            org.insert(r.request_id.clone(), r);
        }
    }
    let mut client = pool.get().await?;
    client.batch_execute(STAGE).await?;
    let tx = client.transaction().await?;
    let insert_all = tx.prepare_cached(INSERT_ALL).await?;
    let copy = tx.prepare_cached(COPY).await?;
    let mut stored = 0usize;
    for (org, recs) in by_org {
        set_org(&tx, org).await?;
        tx.execute(
            "INSERT INTO ibex_core.usage_chain_head (org_id, last_seq, last_hash) \
             VALUES ($1, 0, $2) ON CONFLICT (org_id) DO NOTHING",
            &[&org, &ZERO.as_slice()],
        )
        .await?;
        let head = tx
            .query_one(
                "SELECT last_seq, last_hash FROM ibex_core.usage_chain_head \
                 WHERE org_id = $1 FOR UPDATE",
                &[&org],
            )
            .await?;
        let (last_seq, last_hash): (i64, Vec<u8>) = (head.try_get(0)?, head.try_get(1)?);
        let seq = last_seq + 1;
        // In request-id byte order (the map's), as `content_hash` wants them.
        let hashed: Vec<(Record, [u8; 32])> = recs
            .into_values()
            .map(|r| {
                let h = row_hash(&r, seq);
                (r, h)
            })
            .collect();
        stage(&tx, &copy, &hashed).await?;
        tx.batch_execute("SAVEPOINT usage_insert").await?;
        let inserted = match tx.execute(&insert_all, &[&org, &seq]).await {
            Ok(n) => {
                tx.batch_execute("RELEASE SAVEPOINT usage_insert").await?;
                n
            }
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT usage_insert")
                    .await?;
                tx.execute(INSERT_NEW, &[&org, &seq]).await?
            }
            Err(e) => return Err(e.into()),
        };
        if inserted == 0 {
            continue;
        }
        let (count, content) = if usize::try_from(inserted).ok() == Some(hashed.len()) {
            (
                hashed.len(),
                content_hash(hashed.iter().map(|(_, h)| h.as_slice())),
            )
        } else {
            // Some were stored before: the new rows are exactly those carrying this seq.
            let rows = tx.query(NEW_ROWS, &[&org, &seq]).await?;
            let mut new: Vec<(String, Vec<u8>)> = rows
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?;
            new.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            (
                new.len(),
                content_hash(new.iter().map(|(_, h)| h.as_slice())),
            )
        };
        let n = i32::try_from(count).unwrap_or(i32::MAX);
        let hash = batch_hash(org, seq, n, &content, &last_hash);
        tx.execute(
            "INSERT INTO ibex_core.usage_batches (org_id, seq, records, content_hash, \
             prev_hash, batch_hash) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &org,
                &seq,
                &n,
                &content.as_slice(),
                &last_hash,
                &hash.as_slice(),
            ],
        )
        .await?;
        tx.execute(
            "UPDATE ibex_core.usage_chain_head SET last_seq = $2, last_hash = $3 \
             WHERE org_id = $1",
            &[&org, &seq, &hash.as_slice()],
        )
        .await?;
        stored += count;
    }
    tx.commit().await?;
    let dup = total - stored;
    Ok((
        u32::try_from(stored).unwrap_or(u32::MAX),
        u32::try_from(dup).unwrap_or(u32::MAX),
    ))
}

/// One org's hashed records into the stage, in binary COPY format (no text parsing, no arrays).
async fn stage(
    tx: &deadpool_postgres::Transaction<'_>,
    copy: &tokio_postgres::Statement,
    hashed: &[(Record, [u8; 32])],
) -> Result<(), StoreError> {
    let sink = tx.copy_in(copy).await?;
    let writer = BinaryCopyInWriter::new(sink, &STAGE_TYPES);
    futures::pin_mut!(writer);
    for (r, h) in hashed {
        writer
            .as_mut()
            .write(&[
                &r.org_id,
                &r.request_id,
                &r.agent_id,
                &r.token_id,
                &r.model,
                &r.route,
                &r.status,
                &r.prompt_tokens,
                &r.completion_tokens,
                &r.total_tokens,
                &r.cache_read_tokens,
                &r.cache_creation_tokens,
                &r.usage_source,
                &r.streamed,
                &at(r.started_at_ms),
                &r.duration_ms,
                &r.cost_usd,
                &r.provider,
                &r.attempts,
                &h.as_slice(),
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}

/// The columns of [`Record`] in its field order, for SELECTs.
pub const COLUMNS: &str = "org_id, request_id, agent_id, token_id, model, route, status, \
    prompt_tokens, completion_tokens, total_tokens, cache_read_tokens, cache_creation_tokens, \
    usage_source, streamed, (extract(epoch FROM started_at) * 1000)::bigint, duration_ms, \
    cost_usd::text, provider, attempts";

/// Reads a row selected with [`COLUMNS`] first.
pub fn from_row(row: &tokio_postgres::Row) -> Result<Record, tokio_postgres::Error> {
    let source: String = row.try_get(12)?;
    Ok(Record {
        org_id: row.try_get(0)?,
        request_id: row.try_get(1)?,
        agent_id: row.try_get(2)?,
        token_id: row.try_get(3)?,
        model: row.try_get(4)?,
        route: row.try_get(5)?,
        status: row.try_get(6)?,
        prompt_tokens: row.try_get(7)?,
        completion_tokens: row.try_get(8)?,
        total_tokens: row.try_get(9)?,
        cache_read_tokens: row.try_get(10)?,
        cache_creation_tokens: row.try_get(11)?,
        usage_source: if source == "provider" {
            "provider"
        } else {
            "estimated"
        },
        streamed: row.try_get(13)?,
        started_at_ms: row.try_get(14)?,
        duration_ms: row.try_get(15)?,
        cost_usd: row.try_get(16)?,
        provider: row.try_get(17)?,
        attempts: row.try_get(18)?,
    })
}

/// `[since, until)` as optional timestamps (0 = open).
fn range(since_ms: i64, until_ms: i64) -> (Option<SystemTime>, Option<SystemTime>) {
    (
        (since_ms > 0).then(|| at(since_ms)),
        (until_ms > 0).then(|| at(until_ms)),
    )
}

const IN_RANGE: &str = "org_id = $1 AND ($2::timestamptz IS NULL OR started_at >= $2) \
    AND ($3::timestamptz IS NULL OR started_at < $3)";

/// Totals of one org under RLS, grouped by `by`, ordered by key.
pub async fn totals(
    pool: &Pool,
    org: Uuid,
    since_ms: i64,
    until_ms: i64,
    by: pb::UsageGroupBy,
) -> Result<Vec<pb::UsageTotals>, StoreError> {
    let key = match by {
        pb::UsageGroupBy::Agent => "agent_id::text",
        pb::UsageGroupBy::Token => "token_id::text",
        pb::UsageGroupBy::Day => "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        pb::UsageGroupBy::Model | pb::UsageGroupBy::Unspecified => "model",
    };
    let sql = format!(
        "SELECT {key}, count(*), sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, \
         sum(total_tokens)::bigint, sum(cost_usd)::float8 FROM ibex_core.usage_records \
         WHERE {IN_RANGE} GROUP BY 1 ORDER BY 1 LIMIT {}",
        MAX_GROUPS + 1
    );
    let (since, until) = range(since_ms, until_ms);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let rows = tx.query(&sql, &[&org, &since, &until]).await?;
    tx.commit().await?;
    if rows.len() > MAX_GROUPS {
        return Err(StoreError::Invalid(
            "too many groups; narrow the time range",
        ));
    }
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    rows.iter()
        .map(|r| {
            Ok(pb::UsageTotals {
                key: r.try_get(0)?,
                requests: n(r.try_get(1)?),
                prompt_tokens: n(r.try_get(2)?),
                completion_tokens: n(r.try_get(3)?),
                total_tokens: n(r.try_get(4)?),
                cost_usd: r.try_get(5)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(StoreError::from)
}

/// Streams one org's records in `[since, until)` into `out`, a page at a time, under RLS.
/// Stops early when the receiver goes away.
pub async fn export(
    pool: &Pool,
    org: Uuid,
    since_ms: i64,
    until_ms: i64,
    out: tokio::sync::mpsc::Sender<pb::UsageRecord>,
) -> Result<(), StoreError> {
    let (since, until) = range(since_ms, until_ms);
    let sql = format!(
        "SELECT {COLUMNS} FROM ibex_core.usage_records WHERE {IN_RANGE} \
         ORDER BY started_at, request_id"
    );
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    set_org(&tx, org).await?;
    let stmt = tx.prepare(&sql).await?;
    let portal = tx.bind(&stmt, &[&org, &since, &until]).await?;
    loop {
        let rows = tx.query_portal(&portal, PAGE).await?;
        for row in &rows {
            if out.send(from_row(row)?.to_pb()).await.is_err() {
                return Ok(());
            }
        }
        if rows.len() < usize::try_from(PAGE).unwrap_or(usize::MAX) {
            break;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// A stored batch row, for [`check`].
#[derive(Debug, Clone)]
pub struct Batch {
    pub seq: i64,
    pub records: i32,
    pub content_hash: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub batch_hash: Vec<u8>,
}

/// A stored record row, for [`check`].
#[derive(Debug, Clone)]
pub struct Stored {
    pub record: Record,
    pub batch_seq: i64,
    pub row_hash: Vec<u8>,
}

/// Incremental chain check over an org's batches (by seq) and records (by batch_seq,
/// request_id), fed a page at a time so verify never holds the table in memory.
pub struct Checker {
    org: Uuid,
    prev: Vec<u8>,
    expected_seq: i64,
    records: u64,
    current: Option<(Batch, Vec<Vec<u8>>, Option<String>)>,
}

impl Checker {
    pub fn new(org: Uuid) -> Self {
        Checker {
            org,
            prev: ZERO.to_vec(),
            expected_seq: 1,
            records: 0,
            current: None,
        }
    }

    pub fn expected_seq(&self) -> i64 {
        self.expected_seq
    }

    /// Starts the next batch (closing the one before).
    pub fn batch(&mut self, b: Batch) -> Result<(), String> {
        self.close()?;
        if b.seq != self.expected_seq {
            return Err(format!(
                "batch {} is missing (found batch {} next)",
                self.expected_seq, b.seq
            ));
        }
        if b.prev_hash != self.prev {
            return Err(format!(
                "batch {} does not link to batch {}",
                b.seq,
                b.seq - 1
            ));
        }
        self.current = Some((b, Vec::new(), None));
        Ok(())
    }

    /// A record of the current batch (its `batch_seq` must be the current batch's).
    pub fn record(&mut self, s: &Stored) -> Result<(), String> {
        let name = || format!("record {} (batch {})", s.record.request_id, s.batch_seq);
        let Some((b, hashes, first)) = self.current.as_mut() else {
            return Err(format!("{}: belongs to no batch", name()));
        };
        if s.batch_seq != b.seq {
            return Err(format!("{}: belongs to no batch", name()));
        }
        if row_hash(&s.record, s.batch_seq).as_slice() != s.row_hash.as_slice() {
            return Err(format!("{}: content does not match its hash", name()));
        }
        first.get_or_insert_with(|| s.record.request_id.clone());
        hashes.push(s.row_hash.clone());
        self.records += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<(), String> {
        let Some((b, hashes, first)) = self.current.take() else {
            return Ok(());
        };
        let count = i32::try_from(hashes.len()).unwrap_or(i32::MAX);
        let content = content_hash(hashes.iter().map(Vec::as_slice));
        if count != b.records || content.as_slice() != b.content_hash.as_slice() {
            return Err(format!(
                "batch {} (first record {}): records added or removed ({} stored, {} committed)",
                b.seq,
                first.unwrap_or_else(|| "none".into()),
                count,
                b.records
            ));
        }
        let hash = batch_hash(self.org, b.seq, b.records, &b.content_hash, &b.prev_hash);
        if hash.as_slice() != b.batch_hash.as_slice() {
            return Err(format!("batch {}: its hash does not match", b.seq));
        }
        self.prev = b.batch_hash;
        self.expected_seq = b.seq + 1;
        Ok(())
    }

    /// Ends the check against the org's head; returns the number of records.
    pub fn finish(mut self, head: Option<(i64, Vec<u8>)>) -> Result<u64, String> {
        self.close()?;
        let (seq, hash) = head.unwrap_or((0, ZERO.to_vec()));
        if seq != self.expected_seq - 1 || hash != self.prev {
            return Err(format!(
                "the chain head is at batch {seq} but the batches end at {}",
                self.expected_seq - 1
            ));
        }
        Ok(self.records)
    }
}

pub mod rpc;

#[cfg(test)]
mod tests;
