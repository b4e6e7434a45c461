//! The usage ledger end to end (issue 13, SPEC §10, §7 `ibexctl usage`): a real Postgres
//! (migrated) and `ibex-authd`; records sent with `ShipUsage` as a proxy's shipper sends them
//! (and with `RecordUsage`, its fallback for an older authd).
//!
//! Cases, in order on one stack: a batch stored once however often it is sent (both calls);
//! a `ShipUsage` body with a record that does not decode, a cut entry or a wrong count refused
//! whole; RLS between two
//! orgs and the runtime role's append-only grants; `GetUsage` for a tenant `read` PAT (own org:
//! totals; other org: PERMISSION_DENIED); `ibexctl usage` (json, csv), `usage export` (JSONL)
//! and `usage verify` (intact, then one row edited with maintenance on: named).
//!
//! Needs the binaries: `cargo build --workspace --bins`, then `cargo test -p ibex-e2e --test ledger`.

use anyhow::{ensure, Context, Result};
use ibex_e2e::procs::{self, Authd};
use ibex_e2e::Postgres;
use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

struct Org {
    id: String,
    agent: String,
    token_id: String,
    /// A `read`-only PAT of this org.
    read_pat: String,
}

async fn org(authd: &Authd, name: &str) -> Result<Org> {
    let id = authd
        .ibexctl_json(&["org", "create", "--name", name])
        .await?["id"]
        .as_str()
        .context("org id")?
        .to_owned();
    let agent = authd
        .ibexctl_json(&["agent", "create", "--org", &id, "--name", "a"])
        .await?["id"]
        .as_str()
        .context("agent id")?
        .to_owned();
    let token = authd
        .ibexctl_json(&["token", "create", "--org", &id, "--permissions", "read"])
        .await?;
    Ok(Org {
        id,
        agent,
        token_id: token["id"].as_str().context("token id")?.to_owned(),
        read_pat: token["token"].as_str().context("token")?.to_owned(),
    })
}

fn record(
    org: &Org,
    request_id: &str,
    model: &str,
    prompt: u64,
    completion: u64,
) -> pb::UsageRecord {
    pb::UsageRecord {
        request_id: request_id.to_owned(),
        org_id: org.id.clone(),
        agent_id: org.agent.clone(),
        token_id: org.token_id.clone(),
        model: model.to_owned(),
        route: "/v1/chat/completions".to_owned(),
        status: 200,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        usage_source: pb::UsageSource::Provider as i32,
        streamed: false,
        started_at_unix_ms: 1_764_547_200_000, // 2025-12-01T00:00:00Z
        duration_ms: 12,
        cost_usd: (model == "priced").then_some(0.25),
        ..Default::default()
    }
}

/// `records` as a `ShipUsage` body: each in the spool's compact encoding after its length.
fn ship(records: &[pb::UsageRecord]) -> Result<pb::ShipUsageRequest> {
    use ibex_proto::usage::{put_entry, UsageRecord};
    let mut body = Vec::new();
    for r in records {
        let r = UsageRecord {
            request_id: r.request_id.clone(),
            org_id: r.org_id.parse()?,
            agent_id: r.agent_id.parse()?,
            token_id: r.token_id.parse()?,
            model: r.model.clone(),
            route: r.route.clone(),
            status: u16::try_from(r.status)?,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cache_creation_tokens: r.cache_creation_tokens,
            estimated: r.usage_source == pb::UsageSource::Estimated as i32,
            streamed: r.streamed,
            started_at_ms: r.started_at_unix_ms,
            duration_ms: r.duration_ms,
            cost_usd: r.cost_usd,
            provider: r.provider.clone(),
            attempts: r.attempts,
        };
        put_entry(&r.borrowed(), &mut body);
    }
    Ok(pb::ShipUsageRequest {
        records: body,
        count: u32::try_from(records.len())?,
    })
}

async fn client(authd: &Authd) -> Result<AuthServiceClient<Channel>> {
    Ok(AuthServiceClient::connect(authd.grpc_url()).await?)
}

/// An internal call: with the service key, as the proxies' shippers send it.
fn internal<T>(message: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("x-ibex-service-key", procs::service_key().parse()?);
    Ok(r)
}

fn with_pat<T>(message: T, pat: &str) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {pat}").parse()?);
    Ok(r)
}

async fn count(pg: &Postgres, org: &str) -> Result<i64> {
    let c = pg.admin_client().await?;
    let org: uuid::Uuid = org.parse()?;
    Ok(c.query_one(
        "SELECT count(*) FROM ibex_core.usage_records WHERE org_id = $1",
        &[&org],
    )
    .await?
    .try_get(0)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_store_read_and_verify() -> Result<()> {
    let pg = Postgres::start().await?;
    procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    let (a, b) = (
        org(&authd, "ledger-a").await?,
        org(&authd, "ledger-b").await?,
    );
    let mut grpc = client(&authd).await?;

    // --- RecordUsage is internal: no service key, no write ---
    let denied = grpc
        .record_usage(pb::RecordUsageRequest {
            records: vec![record(&a, "no-key", "free", 1, 1)],
        })
        .await
        .expect_err("no service key");
    ensure!(denied.code() == tonic::Code::Unauthenticated, "{denied:?}");

    // --- stored once, however often sent; one batch may span orgs ---
    let mut batch: Vec<_> = (0..300)
        .map(|i| {
            record(
                &a,
                &format!("a-{i}"),
                if i % 3 == 0 { "priced" } else { "free" },
                10,
                5,
            )
        })
        .collect();
    batch.extend((0..20).map(|i| record(&b, &format!("b-{i}"), "free", 1, 1)));
    // The same request id twice in one batch: stored once.
    batch.push(record(&a, "a-0", "priced", 10, 5));
    let first = grpc
        .record_usage(internal(pb::RecordUsageRequest {
            records: batch.clone(),
        })?)
        .await?
        .into_inner();
    ensure!(
        first.stored == 320 && first.duplicates == 1,
        "first send: {first:?}"
    );
    let again = grpc
        .record_usage(internal(pb::RecordUsageRequest {
            records: batch.clone(),
        })?)
        .await?
        .into_inner();
    ensure!(
        again.stored == 0 && again.duplicates == 321,
        "second send: {again:?}"
    );
    ensure!(count(&pg, &a.id).await? == 300 && count(&pg, &b.id).await? == 20);
    // Half stored before, half new (authd's slow path: its plain insert hits the unique key and
    // is redone `ON CONFLICT DO NOTHING`): only the new half is stored, and the org's chain
    // over both batches (and the ShipUsage one below) verifies below.
    let c = org(&authd, "ledger-c").await?;
    let half: Vec<_> = (0..10)
        .map(|i| record(&c, &format!("c-{i}"), "free", 10, 5))
        .collect();
    for (records, stored, duplicates) in [(half[..5].to_vec(), 5, 0), (half.clone(), 5, 5)] {
        let got = grpc
            .record_usage(internal(pb::RecordUsageRequest { records })?)
            .await?
            .into_inner();
        ensure!(
            got.stored == stored && got.duplicates == duplicates,
            "mixed send: {got:?}"
        );
    }
    ensure!(count(&pg, &c.id).await? == 10);
    // A record that cannot be stored (no UUID) fails the call: nothing half-stored.
    let mut bad = vec![record(&a, "a-new", "free", 1, 1)];
    bad.push(pb::UsageRecord {
        org_id: "nope".into(),
        ..record(&a, "x", "free", 1, 1)
    });
    let err = grpc
        .record_usage(internal(pb::RecordUsageRequest { records: bad })?)
        .await
        .expect_err("invalid record");
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    ensure!(count(&pg, &a.id).await? == 300);

    // --- ShipUsage (the shipper's call): internal, stored once, refused whole when malformed ---
    let more: Vec<_> = (0..15)
        .map(|i| record(&c, &format!("c-{i}"), "priced", 10, 5))
        .collect();
    let denied = grpc
        .ship_usage(ship(&more)?)
        .await
        .expect_err("no service key");
    ensure!(denied.code() == tonic::Code::Unauthenticated, "{denied:?}");
    let body = ship(&more)?;
    let mut malformed = Vec::new();
    let mut wrong_count = body.clone();
    wrong_count.count += 1;
    malformed.push(("a count one too many", wrong_count));
    let mut fewer = body.clone();
    fewer.count -= 1;
    malformed.push(("a count one too few", fewer));
    let mut cut = body.clone();
    cut.records.pop();
    malformed.push(("the last entry cut", cut));
    let mut undecodable = body.clone();
    undecodable.records[4] ^= 0xff; // the first record's version byte
    malformed.push(("a record that does not decode", undecodable));
    for (what, req) in malformed {
        let err = grpc.ship_usage(internal(req)?).await.expect_err(what);
        ensure!(
            err.code() == tonic::Code::InvalidArgument,
            "{what}: {err:?}"
        );
    }
    ensure!(
        count(&pg, &c.id).await? == 10,
        "nothing stored by a refused call"
    );
    let got = grpc.ship_usage(internal(body.clone())?).await?.into_inner();
    ensure!(
        got.stored == 5 && got.duplicates == 10,
        "ShipUsage: {got:?}"
    );
    let again = grpc.ship_usage(internal(body)?).await?.into_inner();
    ensure!(
        again.stored == 0 && again.duplicates == 15,
        "ShipUsage again: {again:?}"
    );
    ensure!(count(&pg, &c.id).await? == 15);
    // Stored as RecordUsage stores the same record: the fields the shipper's encoding carries.
    let row = pg
        .admin_client()
        .await?
        .query_one(
            "SELECT prompt_tokens, completion_tokens, cost_usd::text, usage_source, status \
             FROM ibex_core.usage_records WHERE org_id = $1 AND request_id = 'c-12'",
            &[&c.id.parse::<uuid::Uuid>()?],
        )
        .await?;
    let fields: (i64, i64, String, String, i32) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
    );
    ensure!(
        fields == (10, 5, "0.2500000000".into(), "provider".into(), 200),
        "{fields:?}"
    );

    // --- RLS and append-only for the runtime role ---
    let app = pg.app_client().await?;
    let none: i64 = app
        .query_one("SELECT count(*) FROM ibex_core.usage_records", &[])
        .await?
        .try_get(0)?;
    ensure!(none == 0, "no org set: {none} rows visible");
    app.batch_execute(&format!("BEGIN; SET LOCAL ibex.org_id = '{}'", b.id))
        .await?;
    let seen: i64 = app
        .query_one("SELECT count(*) FROM ibex_core.usage_records", &[])
        .await?
        .try_get(0)?;
    ensure!(seen == 20, "org b sees {seen} rows");
    let update = app
        .execute("UPDATE ibex_core.usage_records SET prompt_tokens = 0", &[])
        .await;
    ensure!(update.is_err(), "ibex_app could UPDATE usage_records");
    app.batch_execute("ROLLBACK").await?;
    app.batch_execute(&format!("BEGIN; SET LOCAL ibex.org_id = '{}'", b.id))
        .await?;
    ensure!(
        app.execute("DELETE FROM ibex_core.usage_records", &[])
            .await
            .is_err(),
        "ibex_app could DELETE usage_records"
    );
    app.batch_execute("ROLLBACK").await?;
    let admin = pg.admin_client().await?;
    ensure!(
        admin
            .execute("DELETE FROM ibex_core.usage_records", &[])
            .await
            .is_err(),
        "even the owner may not delete without maintenance"
    );

    // --- GetUsage: a tenant read PAT for its own org only ---
    let own = grpc
        .get_usage(with_pat(
            pb::GetUsageRequest {
                org_id: a.id.clone(),
                by: pb::UsageGroupBy::Model as i32,
                ..Default::default()
            },
            &a.read_pat,
        )?)
        .await?
        .into_inner();
    let rows: Vec<_> = own
        .rows
        .iter()
        .map(|r| (r.key.as_str(), r.requests, r.total_tokens, r.cost_usd))
        .collect();
    ensure!(
        rows == vec![("free", 200, 3000, None), ("priced", 100, 1500, Some(25.0))],
        "{rows:?}"
    );
    let other = grpc
        .get_usage(with_pat(
            pb::GetUsageRequest {
                org_id: b.id.clone(),
                ..Default::default()
            },
            &a.read_pat,
        )?)
        .await
        .expect_err("another org");
    ensure!(other.code() == tonic::Code::PermissionDenied, "{other:?}");
    let anonymous = grpc
        .get_usage(pb::GetUsageRequest {
            org_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no credential");
    ensure!(
        anonymous.code() == tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );

    // --- ibexctl usage, export, verify ---
    let by_day = authd
        .ibexctl_json(&[
            "usage",
            "--org",
            &a.id,
            "--by",
            "day",
            "--since",
            "2025-11-30T00:00:00Z",
        ])
        .await?;
    ensure!(
        by_day["rows"]
            == serde_json::json!([{"day": "2025-12-01", "requests": 300, "prompt_tokens": 3000,
            "completion_tokens": 1500, "total_tokens": 4500, "cost_usd": 25.0}]),
        "{by_day}"
    );
    let empty = authd
        .ibexctl_json(&["usage", "--org", &a.id, "--until", "2025-11-30T00:00:00Z"])
        .await?;
    ensure!(empty["rows"] == serde_json::json!([]), "{empty}");
    let csv = procs::ibexctl(
        &authd.ibexctl_env(),
        &["usage", "--org", &b.id, "--by", "agent", "--format", "csv"],
    )
    .await?
    .success()?;
    ensure!(
        csv.stdout.trim() == format!("agent_id,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd\n{},20,20,20,40,", b.agent),
        "{}",
        csv.stdout
    );
    let tenant_env = vec![("IBEX_AUTHD_GRPC".to_owned(), authd.grpc_url())];
    let export = procs::ibexctl(
        &tenant_env,
        &["usage", "export", "--org", &b.id, "--token", &b.read_pat],
    )
    .await?
    .success()?;
    let lines: Vec<serde_json::Value> = export
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| export.stdout.clone())?;
    ensure!(lines.len() == 20, "{} lines", lines.len());
    ensure!(lines
        .iter()
        .all(|l| l["org_id"] == b.id.as_str() && l["usage_source"] == "provider"));
    let db_env = vec![("IBEX_DATABASE_ADMIN_URL".to_owned(), pg.admin_url())];
    let ok = procs::ibexctl(&db_env, &["usage", "verify", "--org", &a.id])
        .await?
        .json()?;
    ensure!(ok["ok"] == true && ok["records"] == 300, "{ok}");

    admin
        .batch_execute(&format!(
            "SET ibex.audit_maintenance = 'on'; UPDATE ibex_core.usage_records SET completion_tokens = 1 \
             WHERE org_id = '{}' AND request_id = 'a-42'; RESET ibex.audit_maintenance",
            a.id
        ))
        .await?;
    let broken = procs::ibexctl(&db_env, &["usage", "verify", "--org", &a.id]).await?;
    ensure!(!broken.status.success(), "verify passed an edited row");
    ensure!(broken.stderr.contains("record a-42 "), "{}", broken.stderr);
    let still = procs::ibexctl(&db_env, &["usage", "verify", "--org", &b.id])
        .await?
        .json()?;
    ensure!(still["records"] == 20, "{still}");
    // The org whose second batch was half duplicates: its chain holds exactly the new rows.
    let mixed = procs::ibexctl(&db_env, &["usage", "verify", "--org", &c.id])
        .await?
        .json()?;
    ensure!(mixed["ok"] == true && mixed["records"] == 15, "{mixed}");
    Ok(())
}

/// CPU ticks (utime + stime) of this test's Postgres (the postmaster on `pg_port` and its
/// backends) and of the authd using it, read from /proc.
fn stack_ticks(pg_port: u16) -> (u64, u64) {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state ppid ... utime (14th) stime (15th).
        let Some((comm, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        procs.push((
            pid,
            num(1),
            num(11) + num(12),
            comm.ends_with("(postgres"),
            comm.ends_with("(ibex-authd"),
            cmdline,
            environ,
        ));
    }
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let port = format!("-p\0{pg_port}\0");
    let postmaster = procs
        .iter()
        .find(|p| p.3 && has(&p.5, port.as_bytes()))
        .map(|p| p.0);
    let db = format!("127.0.0.1:{pg_port}/");
    let (mut pg, mut authd) = (0, 0);
    for p in &procs {
        if postmaster.is_some_and(|m| p.0 == m || p.1 == m) {
            pg += p.2;
        } else if p.4 && has(&p.6, db.as_bytes()) {
            authd += p.2;
        }
    }
    (pg, authd)
}

/// Sustained records per second into Postgres through `ShipUsage` (batches of 5,000, the
/// proxy shipper's size), and the CPU each record cost Postgres and authd (from /proc: on a
/// shared machine the rate follows the load, the CPU per record much less). Measurement, not a
/// check: run it alone, in release,
/// `cargo build --release --workspace --bins && cargo test --release -p ibex-e2e --test ledger
/// -- --ignored --nocapture throughput`; figures go to perf/RESULTS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn throughput() -> Result<()> {
    let pg = Postgres::start().await?;
    procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    let orgs = [
        org(&authd, "tp-1").await?,
        org(&authd, "tp-2").await?,
        org(&authd, "tp-3").await?,
        org(&authd, "tp-4").await?,
    ];
    const BATCH: usize = 5_000;
    const SECS: u64 = 3;
    for (label, n_orgs, senders) in [
        ("1 org, 1 sender", 1, 1),
        ("1 org, 2 senders", 1, 2),
        ("4 orgs, 2 senders", 4, 2),
    ] {
        let ticks_before = stack_ticks(pg.port());
        let start = std::time::Instant::now();
        let deadline = start + std::time::Duration::from_secs(SECS);
        let mut tasks = Vec::new();
        for s in 0..senders {
            let mut grpc = client(&authd).await?;
            let batches: Vec<Vec<pb::UsageRecord>> = (0..4)
                .map(|b| {
                    (0..BATCH)
                        .map(|i| {
                            let o = &orgs[i % n_orgs];
                            record(o, &format!("{label}-{s}-{b}-{i}"), "priced", 100, 50)
                        })
                        .collect()
                })
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut stored = 0u64;
                let mut round = 0u64;
                while std::time::Instant::now() < deadline {
                    let mut batch = batches[(round % 4) as usize].clone();
                    for r in &mut batch {
                        r.request_id = format!("{}-{round}", r.request_id);
                    }
                    round += 1;
                    let resp = grpc
                        .ship_usage(internal(ship(&batch)?)?)
                        .await?
                        .into_inner();
                    stored += u64::from(resp.stored);
                }
                anyhow::Ok(stored)
            }));
        }
        let mut stored = 0;
        for t in tasks {
            stored += t.await?.map_err(|e| {
                let log = pg.log_contents();
                let tail: Vec<_> = log.lines().rev().take(5).collect();
                anyhow::anyhow!("{e}; authd log tail: {tail:?}")
            })?;
        }
        let secs = start.elapsed().as_secs_f64();
        let ticks_after = stack_ticks(pg.port());
        // Ticks are 1/100 s (USER_HZ on Linux).
        let us = |before: u64, after: u64| {
            (after.saturating_sub(before)) as f64 * 1e4 / (stored.max(1)) as f64
        };
        eprintln!(
            "ledger throughput, {label}: {stored} records in {secs:.1} s = {:.0} records/s; \
             CPU per record: Postgres {:.1} µs, authd {:.1} µs",
            stored as f64 / secs,
            us(ticks_before.0, ticks_after.0),
            us(ticks_before.1, ticks_after.1),
        );
    }
    Ok(())
}
