//! The usage ledger through the real proxy (issue 13, SPEC §10): Postgres, Redis, authd, a fake
//! OpenAI-compatible upstream (`forwarding/fake_upstream.rs`) and proxies with their own spools.
//!
//! `one_record_per_forwarded_request`: a plain chat, a stream that asked for usage and one that
//! did not (usage added upstream, the usage-only chunk kept from the client; both client streams
//! checked event by event), a stream the client abandons after the first event, an
//! upstream 400 and an upstream timeout each leave exactly one record with the fields they
//! should (ids, tokens, `usage_source`, cost from `IBEX_PRICES_FILE`).
//!
//! `spool_survives_a_stall_and_a_kill`: shipping stalled by `LOCK TABLE … ACCESS EXCLUSIVE`
//! from another session; the proxy SIGKILLed with records spooled; the lock released and the
//! proxy restarted on the same spool: every record arrives, none twice. Then a tiny
//! `IBEX_USAGE_SPOOL_MAX_BYTES` with shipping stalled: 503 `USAGE_UNAVAILABLE` on chat while
//! the probe and `/v1/models` still answer, and after the stall every served request recorded.
//!
//! Needs the binaries: `cargo build --workspace --bins`, then
//! `cargo test -p ibex-e2e --test ledger_proxy`.

#[path = "forwarding/fake_upstream.rs"]
#[expect(
    dead_code,
    reason = "shared with the forwarding suite, which uses all of it"
)]
mod fake_upstream;
#[path = "forwarding/streamed.rs"]
mod streamed;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use fake_upstream::{Fake, Mode, STREAM_FIRST, STREAM_REST};
use ibex_e2e::http::Request;
use ibex_e2e::{Authd, Postgres, Proxy, Redis};
use streamed::Streamed;

const CHAT: &str = "/v1/chat/completions";
const WITHIN: Duration = Duration::from_secs(20);
const PLAIN: &str = r#"{"model":"fake-model-1","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_WITH_USAGE: &str = r#"{"model":"fake-model-stream","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
const STREAM_NO_USAGE: &str = r#"{"model":"fake-model-stream", "stream":true,"messages":[]}"#;
const ENDLESS: &str = r#"{"model":"fake-endless","stream":true,"messages":[]}"#;
const BAD: &str = r#"{"model":"fake-400","messages":[]}"#;
const PRICES: &str = r#"{"fake-model-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}"#;

struct Tenant {
    org: String,
    agent: String,
    token_id: String,
    pat: String,
}

fn field(v: &serde_json::Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

async fn tenant(authd: &Authd) -> Result<Tenant> {
    let name = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let org = field(
        &authd
            .ibexctl_json(&["org", "create", "--name", &name, "--rpm", "1000000"])
            .await?,
        "id",
    )?;
    let agent = field(
        &authd
            .ibexctl_json(&["agent", "create", "--org", &org, "--name", "a"])
            .await?,
        "id",
    )?;
    let token = authd
        .ibexctl_json(&[
            "token",
            "create",
            "--org",
            &org,
            "--permissions",
            "read,chat",
        ])
        .await?;
    Ok(Tenant {
        org,
        agent,
        token_id: field(&token, "id")?,
        pat: field(&token, "token")?,
    })
}

impl Tenant {
    fn chat(&self, body: &str, rid: &str) -> Request {
        Request::post(CHAT, body)
            .header("Content-Type", "application/json")
            .auth(&self.pat, &self.agent)
            .header("X-Request-ID", rid)
    }
}

async fn poll<T>(what: &str, f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    ibex_e2e::wait::poll(what, WITHIN, f).await
}

async fn wait_ready(addr: SocketAddr) -> Result<()> {
    ibex_e2e::wait::ready(addr, WITHIN).await
}

/// One stored record, as text, by request id.
#[derive(Debug, PartialEq)]
struct Row {
    model: String,
    status: i32,
    prompt: i64,
    completion: i64,
    total: i64,
    source: String,
    streamed: bool,
    cost: Option<String>,
    agent: String,
    token: String,
}

async fn row(pg: &Postgres, rid: &str) -> Result<Option<Row>> {
    let c = pg.admin_client().await?;
    let rows = c
        .query(
            "SELECT model, status, prompt_tokens, completion_tokens, total_tokens, usage_source, \
             streamed, cost_usd::text, agent_id::text, token_id::text \
             FROM ibex_core.usage_records WHERE request_id = $1",
            &[&rid],
        )
        .await?;
    ensure!(rows.len() <= 1, "{} rows for {rid}", rows.len());
    rows.first()
        .map(|r| {
            Ok(Row {
                model: r.try_get(0)?,
                status: r.try_get(1)?,
                prompt: r.try_get(2)?,
                completion: r.try_get(3)?,
                total: r.try_get(4)?,
                source: r.try_get(5)?,
                streamed: r.try_get(6)?,
                cost: r.try_get(7)?,
                agent: r.try_get(8)?,
                token: r.try_get(9)?,
            })
        })
        .transpose()
}

async fn recorded(pg: &Postgres, rid: &str) -> Result<Row> {
    poll(&format!("the record of {rid}"), async || row(pg, rid).await).await
}

async fn org_rows(pg: &Postgres, org: &str) -> Result<i64> {
    let c = pg.admin_client().await?;
    let org: uuid::Uuid = org.parse()?;
    Ok(c.query_one(
        "SELECT count(*) FROM ibex_core.usage_records WHERE org_id = $1",
        &[&org],
    )
    .await?
    .try_get(0)?)
}

async fn migrated() -> Result<(Postgres, Redis, Authd)> {
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    ibex_e2e::procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    Ok((pg, redis, authd))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_forwarded_request() -> Result<()> {
    let (pg, redis, authd) = migrated().await?;
    let (fake, silent) = (
        Fake::start(Mode::OpenAi).await?,
        Fake::start(Mode::Silent).await?,
    );
    let prices = tempfile::NamedTempFile::new()?;
    std::fs::write(prices.path(), PRICES)?;
    let prices_path = prices.path().to_string_lossy().into_owned();
    let proxy = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[
            ("IBEX_UPSTREAM_URL", &fake.url()),
            ("IBEX_PRICES_FILE", &prices_path),
        ],
    )
    .await?;
    let slow = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[
            ("IBEX_UPSTREAM_URL", &silent.url()),
            ("IBEX_UPSTREAM_TIMEOUT", "300ms"),
            ("IBEX_PRICES_FILE", &prices_path),
        ],
    )
    .await?;
    wait_ready(proxy.addr).await?;
    wait_ready(slow.addr).await?;
    let t = tenant(&authd).await?;

    // A plain chat: the provider's numbers, priced.
    let resp = t.chat(PLAIN, "led-plain").send(proxy.addr).await?;
    ensure!(resp.status == 200, "{}", resp.dump());
    let r = recorded(&pg, "led-plain").await?;
    ensure!(
        r == Row {
            model: "fake-model-1".into(),
            status: 200,
            prompt: 11,
            completion: 7,
            total: 18,
            source: "provider".into(),
            streamed: false,
            cost: Some("0.0000250000".into()),
            agent: t.agent.clone(),
            token: t.token_id.clone(),
        },
        "{r:?}"
    );

    // A stream that asked for usage: it gets every event, usage chunk included.
    let mut client = Streamed::send(proxy.addr, &t.chat(STREAM_WITH_USAGE, "led-stream")).await?;
    client
        .read_until(|p| p.body.starts_with(STREAM_FIRST.as_bytes()))
        .await
        .context("first event")?;
    fake.release();
    let done = client.read_until(|p| p.complete).await?;
    let expected: String = std::iter::once(STREAM_FIRST).chain(STREAM_REST).collect();
    ensure!(
        done.body == expected.as_bytes(),
        "{}",
        String::from_utf8_lossy(&done.body)
    );
    let r = recorded(&pg, "led-stream").await?;
    ensure!(
        (
            r.model.as_str(),
            r.prompt,
            r.completion,
            r.total,
            r.source.as_str(),
            r.streamed,
            &r.cost
        ) == ("fake-model-stream", 5, 2, 7, "provider", true, &None),
        "{r:?}"
    );

    // A stream that did not ask: usage asked for upstream (only that field written), the
    // usage-only chunk kept from the client, the provider's numbers in the record.
    let mut client = Streamed::send(proxy.addr, &t.chat(STREAM_NO_USAGE, "led-stream-2")).await?;
    client
        .read_until(|p| p.body.starts_with(STREAM_FIRST.as_bytes()))
        .await
        .context("first event")?;
    let sent = fake
        .seen()
        .last()
        .map(|s| s.body.clone())
        .unwrap_or_default();
    let want = STREAM_NO_USAGE.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
    ensure!(
        sent == want.as_bytes(),
        "{}",
        String::from_utf8_lossy(&sent)
    );
    fake.release();
    let done = client.read_until(|p| p.complete).await?;
    let expected: String = [STREAM_FIRST, STREAM_REST[0], STREAM_REST[2]].concat();
    ensure!(
        done.body == expected.as_bytes(),
        "{}",
        String::from_utf8_lossy(&done.body)
    );
    let r = recorded(&pg, "led-stream-2").await?;
    ensure!(
        (r.prompt, r.completion, r.source.as_str(), r.streamed) == (5, 2, "provider", true),
        "{r:?}"
    );

    // A stream abandoned after its first event: what was seen, estimated.
    let mut client = Streamed::send(proxy.addr, &t.chat(ENDLESS, "led-gone")).await?;
    client
        .read_until(|p| p.status == 200 && !p.body.is_empty())
        .await
        .context("first endless event")?;
    drop(client);
    let r = recorded(&pg, "led-gone").await?;
    ensure!(
        r.status == 200 && r.source == "estimated" && r.streamed && r.completion >= 1,
        "{r:?}"
    );
    ensure!(r.prompt == ENDLESS.len().div_ceil(4) as i64, "{r:?}");

    // An upstream 400: recorded with the status the client got, nothing generated.
    let resp = t.chat(BAD, "led-400").send(proxy.addr).await?;
    ensure!(resp.status == 400, "{}", resp.dump());
    let r = recorded(&pg, "led-400").await?;
    ensure!(
        (
            r.status,
            r.prompt,
            r.completion,
            r.source.as_str(),
            r.model.as_str()
        ) == (400, 0, 0, "estimated", "fake-400"),
        "{r:?}"
    );

    // An upstream timeout: 504, recorded.
    let resp = t.chat(PLAIN, "led-timeout").send(slow.addr).await?;
    ensure!(resp.status == 504, "{}", resp.dump());
    let r = recorded(&pg, "led-timeout").await?;
    let got = (
        r.status,
        r.prompt,
        r.source.as_str(),
        r.model.as_str(),
        r.cost.as_deref(),
    );
    ensure!(
        got == (504, 0, "estimated", "fake-model-1", Some("0.0000000000")),
        "{r:?}"
    );

    // Exactly these six, once each (the unique key makes "once" structural; the count
    // shows nothing else was recorded for the org).
    ensure!(org_rows(&pg, &t.org).await? == 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_stall_and_a_kill() -> Result<()> {
    let (pg, redis, authd) = migrated().await?;
    let fake = Fake::start(Mode::OpenAi).await?;
    let mut proxy = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[("IBEX_UPSTREAM_URL", &fake.url())],
    )
    .await?;
    wait_ready(proxy.addr).await?;
    let t = tenant(&authd).await?;

    // Stall shipping: a second session holds the table.
    let mut locker = pg.admin_client().await?;
    let lock = locker.transaction().await?;
    lock.batch_execute("LOCK TABLE ibex_core.usage_records IN ACCESS EXCLUSIVE MODE")
        .await?;
    let n = 30;
    for i in 0..n {
        let resp = t.chat(PLAIN, &format!("dur-{i}")).send(proxy.addr).await?;
        ensure!(resp.status == 200, "{}", resp.dump());
    }
    // Every record is in the spool (written and fsynced) before the kill.
    poll("30 records spooled", async || {
        let m = Request::get("/metrics").send(proxy.admin).await?.text();
        Ok(m.lines()
            .any(|l| l == format!("ibex_usage_records_spooled_total {n}"))
            .then_some(()))
    })
    .await?;
    proxy.kill();
    lock.rollback().await?;
    drop(locker);
    ensure!(
        org_rows(&pg, &t.org).await? == 0,
        "shipped through the lock?"
    );
    proxy.restart().await?;
    poll("every record shipped after the restart", async || {
        Ok((org_rows(&pg, &t.org).await? == n).then_some(()))
    })
    .await?;
    for i in 0..n {
        ensure!(
            row(&pg, &format!("dur-{i}")).await?.is_some(),
            "dur-{i} missing"
        );
    }
    drop(proxy);

    // A tiny spool with shipping stalled: chat refused, probe and models still answer.
    let tiny = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[
            ("IBEX_UPSTREAM_URL", &fake.url()),
            ("IBEX_USAGE_SPOOL_MAX_BYTES", "2000"),
        ],
    )
    .await?;
    wait_ready(tiny.addr).await?;
    let mut locker = pg.admin_client().await?;
    let lock = locker.transaction().await?;
    lock.batch_execute("LOCK TABLE ibex_core.usage_records IN ACCESS EXCLUSIVE MODE")
        .await?;
    let mut served = Vec::new();
    let refused = poll("503 USAGE_UNAVAILABLE", async || {
        let rid = format!("tiny-{}", served.len());
        let resp = t.chat(PLAIN, &rid).send(tiny.addr).await?;
        match resp.status {
            200 => {
                served.push(rid);
                Ok(None)
            }
            503 => Ok(Some(resp)),
            other => Err(anyhow!("unexpected {other}: {}", resp.dump())),
        }
    })
    .await?;
    ensure!(
        refused.error_code().as_deref() == Some("USAGE_UNAVAILABLE"),
        "{}",
        refused.dump()
    );
    ensure!(!served.is_empty(), "refused before anything was served");
    let probe = Request::get("/v1/internal/auth-probe")
        .auth(&t.pat, &t.agent)
        .send(tiny.addr)
        .await?;
    ensure!(probe.status == 200, "probe: {}", probe.dump());
    let models = Request::get("/v1/models")
        .auth(&t.pat, &t.agent)
        .send(tiny.addr)
        .await?;
    ensure!(models.status == 200, "models: {}", models.dump());
    lock.rollback().await?;
    drop(locker);
    for rid in &served {
        recorded(&pg, rid).await?;
    }
    poll("chat admitted again once drained", async || {
        let resp = t.chat(PLAIN, "tiny-after").send(tiny.addr).await?;
        Ok((resp.status == 200).then_some(()))
    })
    .await?;
    recorded(&pg, "tiny-after").await?;
    Ok(())
}
