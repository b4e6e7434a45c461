//! `ibexctl usage` (SPEC §7, §10): totals and export through authd's `GetUsage` / `ExportUsage`
//! (a tenant PAT with `read` or the operator key), and `usage verify`, which reads Postgres
//! directly with the owner DSN.
//!
//! Why verify bypasses authd: it must check the bytes Postgres holds, not what the process that
//! wrote the hashes says about them (a compromised authd could serve a clean copy), exactly as
//! `audit verify` does; and it walks every record of an org, a page at a time, without loading
//! authd. It is an operator command; tenants check their bill with `GetUsage`/export.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ibex_proto::pb;
use serde_json::{json, Value};
use uuid::Uuid;

use super::remote::{client, request, rpc_error};
use super::{connect_admin, time_json, Global};
use crate::ledger::{self, Batch, Checker, Stored, PAGE};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UsageArgs {
    #[command(subcommand)]
    pub command: Option<UsageCommand>,
    #[command(flatten)]
    pub totals: TotalsArgs,
}

#[derive(Args)]
pub struct TotalsArgs {
    #[arg(long)]
    pub org: Option<String>,
    /// RFC 3339 (UTC) or a duration back from now (24h, 30d).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// model, agent, token or day.
    #[arg(long, default_value = "model")]
    pub by: String,
    /// json or csv.
    #[arg(long, default_value = "json")]
    pub format: String,
}

#[derive(Subcommand)]
pub enum UsageCommand {
    /// One JSON object per usage record per line (JSONL), oldest first, streamed.
    Export {
        #[arg(long)]
        org: String,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
    /// Recompute the org's hash chain (owner DSN); fails naming the first bad record.
    Verify {
        #[arg(long)]
        org: String,
    },
}

/// RFC 3339 or a duration back from `now`, as unix ms; `None` → 0 (open).
pub fn parse_time(text: Option<&str>, now: SystemTime) -> anyhow::Result<i64> {
    let Some(text) = text else { return Ok(0) };
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let back = humantime::parse_duration(text)
                .with_context(|| format!("{text:?} is neither RFC 3339 nor a duration"))?;
            now.checked_sub(back).unwrap_or(UNIX_EPOCH)
        }
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX).max(1))
}

fn group_by(by: &str) -> anyhow::Result<(pb::UsageGroupBy, &'static str)> {
    Ok(match by {
        "model" => (pb::UsageGroupBy::Model, "model"),
        "agent" => (pb::UsageGroupBy::Agent, "agent_id"),
        "token" => (pb::UsageGroupBy::Token, "token_id"),
        "day" => (pb::UsageGroupBy::Day, "day"),
        other => bail!("--by must be model, agent, token or day, not {other:?}"),
    })
}

pub async fn run(global: &Global, args: UsageArgs) -> anyhow::Result<String> {
    match args.command {
        Some(UsageCommand::Export { org, since, until }) => {
            export(global, org, since.as_deref(), until.as_deref()).await
        }
        Some(UsageCommand::Verify { org }) => verify(global, &org).await,
        None => totals(global, args.totals).await,
    }
}

async fn totals(global: &Global, args: TotalsArgs) -> anyhow::Result<String> {
    let org = args.org.context("--org is required")?;
    let (by, key) = group_by(&args.by)?;
    let csv = match args.format.as_str() {
        "json" => false,
        "csv" => true,
        other => bail!("--format must be json or csv, not {other:?}"),
    };
    let now = SystemTime::now();
    let message = pb::GetUsageRequest {
        org_id: org,
        since_unix_ms: parse_time(args.since.as_deref(), now)?,
        until_unix_ms: parse_time(args.until.as_deref(), now)?,
        by: by as i32,
    };
    let response = client(global)
        .await?
        .get_usage(request(global, message)?)
        .await
        .map_err(rpc_error)?
        .into_inner();
    Ok(if csv {
        render_csv(key, &response.rows)
    } else {
        render_json(key, &response)
    })
}

fn render_json(key: &str, response: &pb::GetUsageResponse) -> String {
    let rows: Vec<Value> = response
        .rows
        .iter()
        .map(|r| {
            json!({
                key: r.key,
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.total_tokens,
                "cost_usd": r.cost_usd,
            })
        })
        .collect();
    json!({ "org_id": response.org_id, "by": key, "rows": rows }).to_string()
}

/// Keys are UUIDs, dates or model names; a model name is quoted (RFC 4180) when it needs it.
fn render_csv(key: &str, rows: &[pb::UsageTotals]) -> String {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    let mut out = format!("{key},requests,prompt_tokens,completion_tokens,total_tokens,cost_usd");
    for r in rows {
        out.push_str(&format!(
            "\n{},{},{},{},{},{}",
            quote(&r.key),
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cost_usd.map(|c| c.to_string()).unwrap_or_default()
        ));
    }
    out
}

pub fn record_json(r: &pb::UsageRecord) -> Value {
    let source = if r.usage_source == pb::UsageSource::Provider as i32 {
        "provider"
    } else {
        "estimated"
    };
    json!({
        "request_id": r.request_id,
        "org_id": r.org_id,
        "agent_id": r.agent_id,
        "token_id": r.token_id,
        "model": r.model,
        "route": r.route,
        "status": r.status,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens,
        "cache_read_tokens": r.cache_read_tokens,
        "cache_creation_tokens": r.cache_creation_tokens,
        "usage_source": source,
        "streamed": r.streamed,
        "started_at": time_json(r.started_at_unix_ms),
        "duration_ms": r.duration_ms,
        "cost_usd": r.cost_usd,
        "provider": (!r.provider.is_empty()).then_some(&r.provider),
        "attempts": (r.attempts > 0).then_some(r.attempts),
    })
}

/// Writes each record as it arrives (never the whole export in memory); prints nothing else.
async fn export(
    global: &Global,
    org: String,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<String> {
    let now = SystemTime::now();
    let message = pb::ExportUsageRequest {
        org_id: org,
        since_unix_ms: parse_time(since, now)?,
        until_unix_ms: parse_time(until, now)?,
    };
    let mut stream = client(global)
        .await?
        .export_usage(request(global, message)?)
        .await
        .map_err(rpc_error)?
        .into_inner();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Some(record) = stream.message().await.map_err(rpc_error)? {
        serde_json::to_writer(&mut out, &record_json(&record))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(String::new())
}

const BATCHES: &str = "SELECT seq, records, content_hash, prev_hash, batch_hash \
    FROM ibex_core.usage_batches WHERE org_id = $1 ORDER BY seq";

async fn verify(global: &Global, org: &str) -> anyhow::Result<String> {
    let org = Uuid::try_parse(org).context("--org must be a UUID")?;
    let mut client = connect_admin(&global.database_admin_url).await?;
    // One snapshot for batches, records and head: a batch committing meanwhile is not half-seen.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let records_sql = format!(
        "SELECT {}, batch_seq, row_hash FROM ibex_core.usage_records WHERE org_id = $1 \
         ORDER BY batch_seq, request_id",
        ledger::COLUMNS
    );
    let records = tx.bind(records_sql.as_str(), &[&org]).await?;
    let batches = tx.bind(BATCHES, &[&org]).await?;
    let head = tx
        .query_opt(
            "SELECT last_seq, last_hash FROM ibex_core.usage_chain_head WHERE org_id = $1",
            &[&org],
        )
        .await?
        .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;

    let mut checker = Checker::new(org);
    let mut pending: std::collections::VecDeque<Batch> = Default::default();
    let mut batches_done = false;
    let mut current = 0i64;
    let page = usize::try_from(PAGE).unwrap_or(1000);
    let broken = |e: String| anyhow::anyhow!("usage chain of org {org} broken: {e}");
    loop {
        let rows = tx.query_portal(&records, PAGE).await?;
        for row in &rows {
            let stored = Stored {
                record: ledger::from_row(row)?,
                batch_seq: row.try_get(19)?,
                row_hash: row.try_get(20)?,
            };
            while current < stored.batch_seq {
                if pending.is_empty() && !batches_done {
                    let more = tx.query_portal(&batches, PAGE).await?;
                    batches_done = more.len() < page;
                    for b in &more {
                        pending.push_back(batch_row(b)?);
                    }
                }
                let Some(b) = pending.pop_front() else { break };
                current = b.seq;
                checker.batch(b).map_err(broken)?;
            }
            checker.record(&stored).map_err(broken)?;
        }
        if rows.len() < page {
            break;
        }
    }
    loop {
        for b in pending.drain(..) {
            checker.batch(b).map_err(broken)?;
        }
        if batches_done {
            break;
        }
        let more = tx.query_portal(&batches, PAGE).await?;
        batches_done = more.len() < page;
        for b in &more {
            pending.push_back(batch_row(b)?);
        }
    }
    let records = checker.finish(head).map_err(broken)?;
    tx.commit().await?;
    Ok(json!({ "ok": true, "org_id": org.to_string(), "records": records }).to_string())
}

fn batch_row(row: &tokio_postgres::Row) -> Result<Batch, tokio_postgres::Error> {
    Ok(Batch {
        seq: row.try_get(0)?,
        records: row.try_get(1)?,
        content_hash: row.try_get(2)?,
        prev_hash: row.try_get(3)?,
        batch_hash: row.try_get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_back() {
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(parse_time(None, now).ok(), Some(0));
        assert_eq!(parse_time(Some("1h"), now).ok(), Some(96_400_000));
        assert_eq!(
            parse_time(Some("2023-11-14T22:13:20Z"), now).ok(),
            Some(1_700_000_000_000)
        );
        assert!(parse_time(Some("yesterday"), now).is_err());
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let rows = vec![pb::UsageTotals {
            key: "a,\"b\"".into(),
            requests: 2,
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
            cost_usd: None,
        }];
        assert_eq!(
            render_csv("model", &rows),
            "model,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd\n\
             \"a,\"\"b\"\"\",2,3,4,7,"
        );
    }
}
