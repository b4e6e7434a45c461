//! Token limits and budgets through real proxies (issue 14, SPEC §11): Postgres, Redis (and a
//! Redis Cluster), authd, proxies with their own spools, and a fake upstream that counts what
//! it saw, can hold every response until released, and reports 7 tokens per request.
//!
//! - `concurrent_ceiling_holds_over_two_proxies`: 20 concurrent `max_tokens: 10` requests at
//!   100 TPM over two proxies, all in flight at once: the admitted ones' reservations fit in 100,
//!   the rest are 429 (naming tokens, `Retry-After`, `x-ratelimit-*-tokens`) before reaching the
//!   upstream; once they settle to 7 tokens each a request that would not have fit unsettled is
//!   admitted.
//! - `same_ceiling_on_a_redis_cluster`: the same on a three-master Redis Cluster.
//! - `month_budget_survives_a_redis_restart`: 30 tokens a month: requests until 429, the
//!   ledger's total never above 30; Redis restarted (every key lost): the month is re-seeded
//!   from the ledger and still spent.
//! - `agent_limit_leaves_its_neighbour_alone`: an agent at 20 TPM and its neighbour without a
//!   limit, two `max_tokens: 15` requests each at once: one and two get through.
//! - `redis_down_serves_and_records`: token limits fail open; the ledger records the request.
//! - `settles_ride_on_the_next_reservation`: under steady traffic on one org Redis runs one
//!   script call per request (the settle rides on the next reservation), and all are settled.
//! - `pending_settles_are_sent_when_the_proxy_stops`: SIGTERM sends a settle still waiting.
//!
//! Minute windows are wall-clock minutes: a scenario that must not straddle one starts early in
//! a minute and is run again (on a fresh org) if its minute changed anyway.
//!
//! Needs the binaries: `cargo build --workspace --bins`, then `cargo test -p ibex-e2e --test limits`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use ibex_e2e::http::{Request, Response};
use ibex_e2e::redis::RedisCluster;
use ibex_e2e::{Authd, Postgres, Proxy, Redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

const CHAT: &str = "/v1/chat/completions";
const WITHIN: Duration = Duration::from_secs(30);
/// Tokens the fake reports for every request.
const USED: u64 = 7;
/// `messages: []`: the prompt bound is the reply priming alone (3).
const PRIMING: u64 = 3;

fn body(max_tokens: u64) -> String {
    format!(r#"{{"model":"fake-model","messages":[],"max_tokens":{max_tokens}}}"#)
}

/// A fake OpenAI-compatible upstream: counts requests, holds responses while `hold` is on.
struct Fake {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(hold: bool) -> Result<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(if hold {
            0
        } else {
            Semaphore::MAX_PERMITS
        }));
        let (s, g) = (seen.clone(), gate.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, s.clone(), g.clone()));
            }
        });
        Ok(Fake {
            addr,
            seen,
            gate,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// Lets every held and future response go.
    fn release(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut conn: tokio::net::TcpStream, seen: Arc<AtomicUsize>, gate: Arc<Semaphore>) {
    let mut buf = Vec::new();
    loop {
        // One request: the head, then Content-Length bytes of body.
        let (head_end, len) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len);
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len);
        seen.fetch_add(1, Ordering::SeqCst);
        let Ok(permit) = gate.acquire().await else {
            return;
        };
        permit.forget();
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","model":"fake-model","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":{},"total_tokens":{USED}}}}}"#,
            USED - 3
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn poll<T>(what: &str, f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    ibex_e2e::wait::poll(what, WITHIN, f).await
}

async fn wait_ready(addr: SocketAddr) -> Result<()> {
    ibex_e2e::wait::ready(addr, WITHIN).await
}

struct Tenant {
    org: String,
    agent: String,
    pat: String,
}

impl Tenant {
    async fn new(authd: &Authd, org_limits: &[&str]) -> Result<Tenant> {
        let t = authd.tenant("limits", 1_000_000, false, &["chat"]).await?;
        if !org_limits.is_empty() {
            let mut args = vec!["org", "set-limits", "--org", &t.org];
            args.extend_from_slice(org_limits);
            authd.ibexctl_json(&args).await?;
        }
        Ok(Tenant {
            org: t.org,
            agent: t.agent,
            pat: t.pats[0].clone(),
        })
    }

    async fn add_agent(&self, authd: &Authd) -> Result<String> {
        let v = authd
            .ibexctl_json(&["agent", "create", "--org", &self.org, "--name", "n"])
            .await?;
        ibex_e2e::procs::json_str(&v, "id")
    }

    fn chat(&self, body: &str) -> Request {
        self.chat_as(&self.agent, body)
    }

    fn chat_as(&self, agent: &str, body: &str) -> Request {
        Request::post(CHAT, body)
            .header("Content-Type", "application/json")
            .auth(&self.pat, agent)
    }
}

fn minute_now() -> (u64, u64) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms / 60_000, ms % 60_000)
}

/// Waits, if needed, so that at least `need` of the current minute is left.
async fn early_in_a_minute(need: Duration) {
    let (_, into) = minute_now();
    let left = 60_000 - into;
    if left < need.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 50)).await;
    }
}

fn is_token_429(r: &Response) -> bool {
    r.status == 429
        && r.json()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .is_some_and(|m| m.contains("token"))
}

/// 20 requests of `max_tokens: 10` at once over `proxies` (alternating), all held at the fake
/// until every one was decided. Returns (admitted, refused responses) or `None` when the
/// scenario straddled a minute (to be run again).
async fn ceiling_round(
    authd: &Authd,
    fake: &Fake,
    proxies: &[SocketAddr],
) -> Result<Option<(Tenant, Vec<Response>)>> {
    early_in_a_minute(Duration::from_secs(25)).await;
    let (minute, _) = minute_now();
    let t = Tenant::new(authd, &["--tpm", "100"]).await?;
    let before = fake.seen();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let req = t.chat(&body(10));
        let addr = proxies[i % proxies.len()];
        let refused = refused.clone();
        tasks.push(tokio::spawn(async move {
            let r = req.send(addr).await;
            if r.as_ref().is_ok_and(|r| r.status != 200) {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            r
        }));
    }
    // Every request decided: the admitted ones are held at the fake, the others answered.
    poll("all 20 decided", async || {
        Ok((fake.seen() - before + refused.load(Ordering::SeqCst) == 20).then_some(()))
    })
    .await?;
    let admitted = fake.seen() - before;
    fake.release();
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await??);
    }
    if minute_now().0 != minute {
        return Ok(None);
    }
    let ok: Vec<_> = responses.iter().filter(|r| r.status == 200).collect();
    ensure!(
        ok.len() == admitted,
        "{} 200s, fake saw {admitted}",
        ok.len()
    );
    let reservation = PRIMING + 10;
    ensure!(
        admitted as u64 * reservation <= 100,
        "{admitted} admitted × {reservation} tokens is over 100"
    );
    // Exactly as many as fit: the ceiling is exact, not merely safe.
    ensure!(
        admitted as u64 == 100 / reservation,
        "{admitted} admitted, {} fit",
        100 / reservation
    );
    for r in &ok {
        ensure!(
            r.header("x-ratelimit-limit-tokens") == Some("100"),
            "{}",
            r.dump()
        );
        ensure!(
            r.header("x-ratelimit-remaining-tokens").is_some(),
            "{}",
            r.dump()
        );
        ensure!(
            r.header("x-ratelimit-reset-tokens")
                .is_some_and(|v| v.ends_with('s')),
            "{}",
            r.dump()
        );
    }
    let refused: Vec<Response> = responses.into_iter().filter(|r| r.status != 200).collect();
    ensure!(refused.len() == 20 - admitted);
    for r in &refused {
        ensure!(is_token_429(r), "{}", r.dump());
        ensure!(
            r.error_code().as_deref() == Some("RATE_LIMITED"),
            "{}",
            r.dump()
        );
        let retry: u64 = r.header("Retry-After").context("Retry-After")?.parse()?;
        ensure!((1..=60).contains(&retry), "Retry-After {retry}");
        ensure!(r.header("x-ratelimit-limit-tokens") == Some("100"));
    }
    Ok(Some((t, refused)))
}

async fn ceiling_scenario(authd: &Authd, fake: &Fake, proxies: &[&Proxy]) -> Result<()> {
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    for _ in 0..3 {
        let Some((t, _)) = ceiling_round(authd, fake, &addrs).await? else {
            continue;
        };
        // Settled to 7 each: 7 × 7 = 49 used. Unsettled, 7 × 13 = 91 would leave no room for
        // another 13; settled, it fits. A settle waits on its worker for the org's next
        // reservation (or its flush, a few ms): the proxies' own counters say when all are in.
        all_settled(proxies).await?;
        let (minute, _) = minute_now();
        let resp = poll("a request admitted after the settles", async || {
            let r = t.chat(&body(10)).send(addrs[0]).await?;
            Ok((r.status == 200).then_some(r))
        })
        .await;
        if minute_now().0 != minute {
            continue;
        }
        let resp = resp?;
        let remaining: u64 = resp
            .header("x-ratelimit-remaining-tokens")
            .context("remaining")?
            .parse()?;
        ensure!(
            remaining == 100 - 7 * USED - (PRIMING + 10),
            "remaining {remaining}: {}",
            resp.dump()
        );
        return Ok(());
    }
    Err(anyhow!("three rounds straddled a minute"))
}

async fn stack() -> Result<(Postgres, Redis, Authd)> {
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    ibex_e2e::procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    Ok((pg, redis, authd))
}

async fn two_proxies(authd: &Authd, redis_url: &str, fake: &Fake) -> Result<(Proxy, Proxy)> {
    let a = start_proxy(authd, redis_url, fake).await?;
    let b = start_proxy(authd, redis_url, fake).await?;
    wait_ready(a.addr).await?;
    wait_ready(b.addr).await?;
    Ok((a, b))
}

/// One proxy in front of `fake`, ready.
async fn one_proxy(authd: &Authd, redis_url: &str, fake: &Fake) -> Result<Proxy> {
    let proxy = start_proxy(authd, redis_url, fake).await?;
    wait_ready(proxy.addr).await?;
    Ok(proxy)
}

/// A proxy in front of `fake`, with the settings every proxy of these tests runs with.
async fn start_proxy(authd: &Authd, redis_url: &str, fake: &Fake) -> Result<Proxy> {
    let url = fake.url();
    let env = [
        ("IBEX_UPSTREAM_URL", url.as_str()),
        // A loaded CI box can stall Redis past the 25 ms default: that would fail open, which
        // these tests of the ceiling must not mistake for admissions it counted.
        ("IBEX_REDIS_TIMEOUT", "2s"),
    ];
    Proxy::start(authd.grpc_addr, redis_url, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ceiling_holds_over_two_proxies() -> Result<()> {
    let (_pg, redis, authd) = stack().await?;
    let fake = Fake::start(true).await?;
    let (a, b) = two_proxies(&authd, &redis.url(), &fake).await?;
    ceiling_scenario(&authd, &fake, &[&a, &b]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_ceiling_on_a_redis_cluster() -> Result<()> {
    let (pg, cluster) = tokio::join!(Postgres::start(), RedisCluster::start());
    let (pg, cluster) = (pg?, cluster?);
    ibex_e2e::procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    let fake = Fake::start(true).await?;
    let (a, b) = two_proxies(&authd, &cluster.seed_url(), &fake).await?;
    ceiling_scenario(&authd, &fake, &[&a, &b]).await
}

async fn ledger_total(pg: &Postgres, org: &str) -> Result<(i64, i64)> {
    let c = pg.admin_client().await?;
    let org: uuid::Uuid = org.parse()?;
    let row = c
        .query_one(
            "SELECT count(*), COALESCE(sum(total_tokens), 0)::bigint \
             FROM ibex_core.usage_records WHERE org_id = $1",
            &[&org],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn month_budget_survives_a_redis_restart() -> Result<()> {
    let (pg, mut redis, authd) = stack().await?;
    let fake = Fake::start(false).await?;
    let proxy = one_proxy(&authd, &redis.url(), &fake).await?;
    let t = Tenant::new(&authd, &["--monthly-tokens", "30"]).await?;

    // 13 reserved each, 7 used: 0+13, 7+13, 14+13 fit; 21+13 does not.
    let mut served = 0;
    let refusal = loop {
        let r = t.chat(&body(10)).send(proxy.addr).await?;
        if r.status != 200 {
            break r;
        }
        served += 1;
        ensure!(served <= 3, "a fourth request was served");
        // The next decision must see this request settled (it may wait on another worker).
        all_settled(&[&proxy]).await?;
        let (_, total) = ledger_total(&pg, &t.org).await?;
        ensure!(total <= 30, "ledger total {total}");
    };
    ensure!(served == 3, "{served} served");
    ensure!(is_token_429(&refusal), "{}", refusal.dump());
    let message = refusal.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(message.contains("monthly token budget"), "{message}");
    ensure!(refusal.header("Retry-After").is_some());
    ensure!(fake.seen() == 3, "the fake saw {}", fake.seen());

    // Every record in Postgres, then Redis loses every key.
    poll("three records", async || {
        Ok((ledger_total(&pg, &t.org).await? == (3, 21)).then_some(()))
    })
    .await?;
    redis.restart().await?;
    wait_ready(proxy.addr).await?;
    // Until the limiter has reconnected a request fails open (served without token headers:
    // the fail mode). The first one the limiter decides must be refused: the month was
    // re-seeded from the ledger (21 spent), not started afresh.
    let r = poll("a decision of the reconnected limiter", async || {
        let r = t.chat(&body(10)).send(proxy.addr).await?;
        let decided = r.status == 429 || r.header("x-ratelimit-limit-tokens").is_some();
        Ok(decided.then_some(r))
    })
    .await?;
    ensure!(
        is_token_429(&r),
        "a fresh month after the restart: {}",
        r.dump()
    );
    ensure!(
        r.header("x-ratelimit-limit-tokens") == Some("30"),
        "{}",
        r.dump()
    );
    ensure!(
        r.header("x-ratelimit-remaining-tokens") == Some("9"),
        "{}",
        r.dump()
    );
    let key = format!("ibex:tl:{{{}}}:M:*", t.org);
    let keys = redis.command(&["KEYS", &key]).await?;
    ensure!(keys.contains(":M:"), "month key re-seeded: {keys}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_limit_leaves_its_neighbour_alone() -> Result<()> {
    let (_pg, redis, authd) = stack().await?;
    let fake = Fake::start(true).await?;
    let proxy = one_proxy(&authd, &redis.url(), &fake).await?;
    for _ in 0..3 {
        early_in_a_minute(Duration::from_secs(25)).await;
        let (minute, _) = minute_now();
        let t = Tenant::new(&authd, &["--tpm", "1000"]).await?;
        let neighbour = t.add_agent(&authd).await?;
        authd
            .ibexctl_json(&[
                "agent",
                "set-limits",
                "--org",
                &t.org,
                "--agent",
                &t.agent,
                "--tpm",
                "20",
            ])
            .await?;
        let before = fake.seen();
        let mut tasks = Vec::new();
        for agent in [&t.agent, &t.agent, &neighbour, &neighbour] {
            let req = t.chat_as(agent, &body(15));
            let addr = proxy.addr;
            tasks.push(tokio::spawn(async move { req.send(addr).await }));
        }
        // Three reach the fake (held there); the limited agent's second is refused at once.
        poll("three at the fake", async || {
            Ok((fake.seen() - before == 3).then_some(()))
        })
        .await?;
        fake.release();
        let mut statuses = Vec::new();
        for task in tasks {
            let r = task.await??;
            ensure!(r.status == 200 || is_token_429(&r), "{}", r.dump());
            statuses.push(r.status);
        }
        if minute_now().0 != minute {
            continue;
        }
        let limited = statuses[..2].iter().filter(|s| **s == 200).count();
        let free = statuses[2..].iter().filter(|s| **s == 200).count();
        ensure!((limited, free) == (1, 2), "{statuses:?}");
        ensure!(fake.seen() - before == 3);
        return Ok(());
    }
    Err(anyhow!("three rounds straddled a minute"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_serves_and_records() -> Result<()> {
    let (pg, mut redis, authd) = stack().await?;
    let fake = Fake::start(false).await?;
    let proxy = one_proxy(&authd, &redis.url(), &fake).await?;
    let t = Tenant::new(&authd, &["--tpm", "100", "--monthly-tokens", "1000"]).await?;
    let r = t.chat(&body(10)).send(proxy.addr).await?;
    ensure!(r.status == 200, "{}", r.dump());
    ensure!(
        r.header("x-ratelimit-limit-tokens").is_some(),
        "{}",
        r.dump()
    );
    redis.stop().await?;
    for _ in 0..3 {
        let r = t.chat(&body(10)).send(proxy.addr).await?;
        ensure!(r.status == 200, "{}", r.dump());
        ensure!(
            r.header("x-ratelimit-limit-tokens").is_none(),
            "{}",
            r.dump()
        );
    }
    poll("four records", async || {
        Ok((ledger_total(&pg, &t.org).await? == (4, 4 * USED as i64)).then_some(()))
    })
    .await?;
    let metrics = reqwest_metrics(&proxy).await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("ibex_proxy_tokens_failed_open_total ") && !l.ends_with(" 0")),
        "no token fail-open counted:\n{metrics}"
    );
    Ok(())
}

async fn reqwest_metrics(proxy: &Proxy) -> Result<String> {
    Ok(Request::get("/metrics").send(proxy.admin).await?.text())
}

/// A counter of the proxy's `/metrics` text.
fn counter(metrics: &str, name: &str) -> Result<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("{name} in /metrics"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} in /metrics"))
}

/// Waits until every reservation `proxies` admitted has been settled in Redis: their own
/// counters, checked − refused − failed open = settled.
async fn all_settled(proxies: &[&Proxy]) -> Result<()> {
    poll("every admitted reservation settled", async || {
        let (mut admitted, mut settled) = (0, 0);
        for p in proxies {
            let m = reqwest_metrics(p).await?;
            admitted += counter(&m, "ibex_proxy_tokens_checks_total")?
                - counter(&m, "ibex_proxy_tokens_limited_total")?
                - counter(&m, "ibex_proxy_tokens_failed_open_total")?;
            settled += counter(&m, "ibex_proxy_tokens_settled_total")?;
        }
        Ok((settled == admitted).then_some(()))
    })
    .await
}

/// `calls=` of `INFO commandstats`'s `EVAL` and `EVALSHA` lines: every script call Redis ran.
fn script_calls(commandstats: &str) -> Result<u64> {
    let mut calls = 0;
    for line in commandstats.lines() {
        let Some(rest) = line
            .strip_prefix("cmdstat_evalsha:")
            .or_else(|| line.strip_prefix("cmdstat_eval:"))
        else {
            continue;
        };
        let n = rest
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .context("calls=")?;
        calls += n.trim().parse::<u64>()?;
    }
    Ok(calls)
}

/// Under steady traffic on one org a settle costs no round trip of its own: it rides on the
/// org's next reservation. 200 sequential requests on one connection (one worker), each
/// finds the previous request's settle pending — the flush delay is set far beyond the test,
/// so nothing else can send it — and Redis runs one script call per request, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_ride_on_the_next_reservation() -> Result<()> {
    const N: u64 = 200;
    let (_pg, redis, authd) = stack().await?;
    let fake = Fake::start(false).await?;
    let url = fake.url();
    let env = [
        ("IBEX_UPSTREAM_URL", url.as_str()),
        ("IBEX_REDIS_TIMEOUT", "2s"),
        ("IBEX_TOKEN_SETTLE_DELAY", "1h"),
    ];
    let proxy = Proxy::start(authd.grpc_addr, &redis.url(), &env).await?;
    wait_ready(proxy.addr).await?;
    let t = Tenant::new(
        &authd,
        &["--tpm", "100000000", "--monthly-tokens", "1000000000"],
    )
    .await?;
    let mut conn = ibex_e2e::http::Conn::connect(proxy.addr).await?;
    // Warm: the scripts loaded (EVALSHA, not NOSCRIPT then EVAL), the token cached.
    let r = conn.send(&t.chat(&body(10)), false).await?;
    ensure!(r.status == 200, "{}", r.dump());
    redis.command(&["CONFIG", "RESETSTAT"]).await?;
    let before = counter(
        &reqwest_metrics(&proxy).await?,
        "ibex_proxy_tokens_redis_calls_total",
    )?;
    for _ in 0..N {
        let r = conn.send(&t.chat(&body(10)), false).await?;
        ensure!(r.status == 200, "{}", r.dump());
        ensure!(
            r.header("x-ratelimit-limit-tokens").is_some(),
            "{}",
            r.dump()
        );
    }
    let calls = counter(
        &reqwest_metrics(&proxy).await?,
        "ibex_proxy_tokens_redis_calls_total",
    )? - before;
    // Reserve + settle would be 2 N.
    ensure!(
        (N..=N * 12 / 10).contains(&calls),
        "{calls} token script calls for {N} requests (not 1 to 1.2 per request)"
    );
    // Redis saw them (and the request limiter's own, at most one per request, besides).
    let seen = script_calls(&redis.command(&["INFO", "commandstats"]).await?)?;
    ensure!(
        (calls..=calls + N).contains(&seen),
        "Redis ran {seen} script calls, the token limiter sent {calls}"
    );
    // And they were settled: of N + 1 reservations at most the last two still stand.
    let pattern = format!("ibex:tl:{{{}}}:r:*", t.org);
    let keys = redis.command(&["KEYS", &pattern]).await?;
    let standing = keys.matches(":r:").count();
    ensure!(standing <= 2, "{standing} reservations unsettled: {keys}");
    Ok(())
}

/// A settle still pending when the proxy stops (SIGTERM) is sent before its workers exit: the
/// month keeps what was used (7), not the reservation's worst case (13). The flush delay is set
/// far beyond the test, so only the stop can send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_settles_are_sent_when_the_proxy_stops() -> Result<()> {
    let (_pg, redis, authd) = stack().await?;
    let fake = Fake::start(false).await?;
    let url = fake.url();
    let env = [
        ("IBEX_UPSTREAM_URL", url.as_str()),
        ("IBEX_REDIS_TIMEOUT", "2s"),
        ("IBEX_TOKEN_SETTLE_DELAY", "1h"),
    ];
    let mut proxy = Proxy::start(authd.grpc_addr, &redis.url(), &env).await?;
    wait_ready(proxy.addr).await?;
    let t = Tenant::new(&authd, &["--monthly-tokens", "1000"]).await?;
    let r = t.chat(&body(10)).send(proxy.addr).await?;
    ensure!(r.status == 200, "{}", r.dump());
    let month = async || -> Result<String> {
        let key = redis
            .command(&["KEYS", &format!("ibex:tl:{{{}}}:M:*", t.org)])
            .await?;
        let key = key
            .split("\r\n")
            .find(|l| l.starts_with("ibex:tl:"))
            .context("the month key")?
            .to_owned();
        Ok(ibex_e2e::redis::reply_text(&redis.command(&["GET", &key]).await?).to_owned())
    };
    ensure!(
        month().await? == (PRIMING + 10).to_string(),
        "the settle is pending"
    );
    proxy.signal(ibex_e2e::Signal::SIGTERM)?;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while proxy.is_running() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the proxy still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(month().await? == USED.to_string(), "settled at the stop");
    Ok(())
}

/// `set-limits` on an org and on an agent reaches a proxy that has the token and the agent
/// cached (the invalidation feed), without a restart: a limit below one request's worst case
/// (13) refuses it, naming the level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_changes_reach_a_warm_proxy() -> Result<()> {
    let (_pg, redis, authd) = stack().await?;
    let fake = Fake::start(false).await?;
    let proxy = one_proxy(&authd, &redis.url(), &fake).await?;
    let t = Tenant::new(&authd, &[]).await?;
    let r = t.chat(&body(10)).send(proxy.addr).await?;
    ensure!(r.status == 200, "{}", r.dump());
    ensure!(
        r.header("x-ratelimit-limit-tokens").is_none(),
        "no limit applies yet"
    );

    let refused_for = async |level: &str| {
        poll(&format!("a refusal naming the {level}"), async || {
            let r = t.chat(&body(10)).send(proxy.addr).await?;
            let message = r.json().ok().map(|v| v["error"]["message"].to_string());
            Ok((r.status == 429 && message.is_some_and(|m| m.contains(level))).then_some(()))
        })
        .await
    };
    authd
        .ibexctl_json(&[
            "agent",
            "set-limits",
            "--org",
            &t.org,
            "--agent",
            &t.agent,
            "--tpm",
            "5",
        ])
        .await?;
    refused_for("agent's").await?;
    authd
        .ibexctl_json(&[
            "agent",
            "set-limits",
            "--org",
            &t.org,
            "--agent",
            &t.agent,
            "--tpm",
            "0",
        ])
        .await?;
    let v = authd
        .ibexctl_json(&["org", "set-limits", "--org", &t.org, "--tpm", "5"])
        .await?;
    ensure!(v["tpm_limit"] == 5, "{v}");
    refused_for("org's").await?;
    // Back to the default (IBEX_DEFAULT_TPM, 0 here: none): served again.
    authd
        .ibexctl_json(&["org", "set-limits", "--org", &t.org, "--tpm", "default"])
        .await?;
    poll("served again", async || {
        Ok((t.chat(&body(10)).send(proxy.addr).await?.status == 200).then_some(()))
    })
    .await?;
    Ok(())
}
