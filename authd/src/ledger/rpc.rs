//! The ledger's RPCs, decoded and authorised; `service.rs` only delegates here.
//!
//! `ShipUsage` and `RecordUsage` are internal calls (the proxies' shippers): `service.rs` checks the service
//! key first, as for `ValidateToken`.
//! `GetUsage` and `ExportUsage` need a PAT with `read` in the org asked for (another org:
//! PERMISSION_DENIED) or the operator key.

use std::pin::Pin;

use deadpool_postgres::Pool;
use futures::Stream;
use ibex_proto::pb;
use ibex_proto::usage::{Entries, RecordRef};
use tonic::{Response, Status};
use uuid::Uuid;

use super::{Record, MAX_BATCH};
use crate::authz::Caller;
use crate::perms;
use crate::store::StoreError;

pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::UsageRecord, Status>> + Send>>;

fn db_status(err: StoreError) -> Status {
    match err {
        StoreError::Invalid(what) => Status::invalid_argument(what),
        other => {
            tracing::error!(error = %other, "usage ledger database error");
            Status::unavailable("database unavailable")
        }
    }
}

fn org_arg(value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument("org_id must be a UUID"))
}

fn range_arg(since: i64, until: i64) -> Result<(), Status> {
    if since < 0 || until < 0 {
        return Err(Status::invalid_argument("times must be ≥ 0"));
    }
    Ok(())
}

pub async fn record_usage(
    pool: &Pool,
    req: pb::RecordUsageRequest,
) -> Result<Response<pb::RecordUsageResponse>, Status> {
    if req.records.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH} records per call"
        )));
    }
    let records = req
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Record::from_pb(r).map_err(|e| Status::invalid_argument(format!("record {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if records.is_empty() {
        return Ok(Response::new(pb::RecordUsageResponse::default()));
    }
    let (stored, duplicates) = super::record(pool, records).await.map_err(db_status)?;
    Ok(Response::new(pb::RecordUsageResponse {
        stored,
        duplicates,
    }))
}

/// A batch in the spool's compact encoding. Every entry must decode and `count` must match:
/// otherwise the whole call is refused and nothing is stored (the proxy keeps the records).
pub async fn ship_usage(
    pool: &Pool,
    req: pb::ShipUsageRequest,
) -> Result<Response<pb::RecordUsageResponse>, Status> {
    let count = usize::try_from(req.count).unwrap_or(usize::MAX);
    if count > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH} records per call"
        )));
    }
    let mut records = Vec::with_capacity(count);
    let mut entries = Entries::new(&req.records);
    for (i, entry) in entries.by_ref().enumerate() {
        if i == count {
            return Err(Status::invalid_argument("more records than count"));
        }
        let record = RecordRef::decode(entry)
            .ok_or_else(|| Status::invalid_argument(format!("record {i} does not decode")))
            .and_then(|r| {
                Record::from_ref(&r)
                    .map_err(|e| Status::invalid_argument(format!("record {i}: {e}")))
            })?;
        records.push(record);
    }
    if !entries.rest().is_empty() || records.len() != count {
        return Err(Status::invalid_argument(
            "records end in a partial entry or hold fewer than count",
        ));
    }
    if records.is_empty() {
        return Ok(Response::new(pb::RecordUsageResponse::default()));
    }
    let (stored, duplicates) = super::record(pool, records).await.map_err(db_status)?;
    Ok(Response::new(pb::RecordUsageResponse {
        stored,
        duplicates,
    }))
}

pub async fn get_usage(
    pool: &Pool,
    caller: &Caller,
    req: pb::GetUsageRequest,
) -> Result<Response<pb::GetUsageResponse>, Status> {
    let org = org_arg(&req.org_id)?;
    caller.require(org, perms::READ)?;
    range_arg(req.since_unix_ms, req.until_unix_ms)?;
    let by = pb::UsageGroupBy::try_from(req.by)
        .map_err(|_| Status::invalid_argument("by must be model, agent, token or day"))?;
    let rows = super::totals(pool, org, req.since_unix_ms, req.until_unix_ms, by)
        .await
        .map_err(db_status)?;
    Ok(Response::new(pb::GetUsageResponse {
        org_id: org.to_string(),
        rows,
    }))
}

/// Records flow through a small channel: export holds one page and a few messages in memory.
pub async fn export_usage(
    pool: &Pool,
    caller: &Caller,
    req: pb::ExportUsageRequest,
) -> Result<Response<ExportStream>, Status> {
    let org = org_arg(&req.org_id)?;
    caller.require(org, perms::READ)?;
    range_arg(req.since_unix_ms, req.until_unix_ms)?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (err_tx, err_rx) = tokio::sync::oneshot::channel();
    let pool = pool.clone();
    tokio::spawn(async move {
        let result = super::export(&pool, org, req.since_unix_ms, req.until_unix_ms, tx).await;
        let _ = err_tx.send(result);
    });
    use futures::StreamExt;
    let records = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
    // After the last record: an error if the export failed part-way (never a silent short file).
    let tail = futures::stream::once(async move {
        match err_rx.await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(Err(db_status(err))),
            Err(_) => Some(Err(Status::internal("export ended unexpectedly"))),
        }
    })
    .filter_map(futures::future::ready);
    Ok(Response::new(Box::pin(records.chain(tail))))
}
