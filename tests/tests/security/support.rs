//! Request builders, row tables and measurement helpers shared by the security cases.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::{Request, Response};

use crate::common::*;
use crate::say;

pub const AGENT_HEADER: &str = "X-IBEX-Agent-ID";
/// The generous CI bound for timing differences, and the target on a quiet machine.
pub const TIMING_BOUND_MS: f64 = 50.0;
pub const TIMING_TARGET_MS: f64 = 5.0;
/// The proxy's fixed header deadline (`ServerConfig::header_timeout`; no env variable).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A rate-limit count spoiled by a minute boundary or by a Redis check that failed open (the
/// limiter gives Redis 5 ms; a loaded 2-core box misses that now and then) is run again.
pub const DISTURBED_ATTEMPTS: u32 = 5;

pub fn agent_only(agent: &str) -> Request {
    Request::get(PROBE).header(AGENT_HEADER, agent)
}

pub fn bearer(path: &str, authorization: &str, agent: &str) -> Request {
    Request::get(path)
        .header("Authorization", authorization)
        .header(AGENT_HEADER, agent)
}

pub fn chat(token: &str, agent: &str) -> Request {
    Request::post(CHAT_PATH, CHAT_BODY)
        .header("Content-Type", "application/json")
        .auth(token, agent)
}

pub fn header_u64(resp: &Response, name: &str) -> Option<u64> {
    resp.header(name)?.trim().parse().ok()
}

pub fn now_unix_s() -> u64 {
    u64::try_from(unix_ms() / 1000).unwrap_or(0)
}

/// One row of a table: what, the request, the proxy, expected status and code.
pub struct Row {
    what: &'static str,
    req: Request,
    status: u16,
    code: Option<&'static str>,
}

pub fn row(what: &'static str, req: Request, status: u16, code: Option<&'static str>) -> Row {
    Row {
        what,
        req,
        status,
        code,
    }
}

/// Runs every row against both proxies.
pub async fn run_rows(ctx: &Ctx, rows: &[Row]) -> Result<()> {
    for p in 0..2 {
        for r in rows {
            ctx.expect(p, &r.req, r.status, r.code)
                .await
                .with_context(|| format!("{} (proxy {p})", r.what))?;
        }
    }
    Ok(())
}

/// Between two requests of a race poll: fine enough for a 300 ms SLA, light on a 2-core box.
const POLL_PACE: Duration = Duration::from_millis(2);

/// An org budget no polling loop can spend (races must never run into a 429).
pub const UNLIMITED_RPM: u32 = 1_000_000;

/// Polls both proxies with `req` from the moment `changed` (a committed change) until
/// `until` after it; every answer must be 200 or one of `refusals`, and no request sent later
/// than the SLA after the change may be admitted (checked as it happens). Returns, per proxy, the
/// send time (since `changed`) of the last request that was still admitted, the time of the
/// first refusal and how many refusals carried each code.
pub async fn race_after_change(
    ctx: &Ctx,
    req: &Request,
    changed: Instant,
    until: Duration,
    refusals: &[(u16, &str)],
) -> Result<Vec<RaceResult>> {
    let mut tasks = Vec::new();
    for p in 0..2 {
        let (ctx, req, refusals) = (ctx.clone(), req.clone(), refusals.to_vec());
        let refusals: Vec<(u16, String)> = refusals
            .into_iter()
            .map(|(s, c)| (s, c.to_owned()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = RaceResult::default();
            while changed.elapsed() < until {
                let sent = changed.elapsed();
                let resp = ctx.send(p, &req).await?;
                let got = changed.elapsed();
                if resp.status == 200 {
                    ensure!(
                        sent <= ctx.env.sla,
                        "proxy {p} admitted a request sent {:.1} ms after the change (SLA {} ms)",
                        ms(sent),
                        ctx.env.sla.as_millis()
                    );
                    out.last_admitted = Some(sent);
                } else if refusals
                    .iter()
                    .any(|(s, c)| *s == resp.status && resp.error_code().as_deref() == Some(c))
                {
                    out.first_refused.get_or_insert(got);
                    *out.codes
                        .entry(resp.error_code().unwrap_or_default())
                        .or_default() += 1;
                } else {
                    bail!("proxy {p}: unexpected answer:\n{}", resp.dump());
                }
                tokio::time::sleep(POLL_PACE).await;
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    Ok(results)
}

#[derive(Debug, Default)]
pub struct RaceResult {
    /// Send time (after the change) of the last request still admitted.
    pub last_admitted: Option<Duration>,
    /// Receive time of the first refusal.
    pub first_refused: Option<Duration>,
    /// Refusals by code.
    pub codes: std::collections::BTreeMap<String, u32>,
}

pub enum Scenario {
    Done,
    /// Something outside the proxy's control (a minute boundary, a Redis check that failed
    /// open) spoiled the count: run it again with fresh orgs.
    Disturbed(String),
}

pub async fn retry_disturbed<F>(ctx: &Ctx, what: &str, scenario: F) -> Result<()>
where
    F: AsyncFn(&Ctx) -> Result<Scenario>,
{
    for attempt in 1..=DISTURBED_ATTEMPTS {
        // After a disturbance the limiter's breaker may be open for a second: start each
        // attempt once every worker counts again.
        limiter_counting(ctx, Duration::from_secs(15)).await?;
        match scenario(ctx).await? {
            Scenario::Done => return Ok(()),
            Scenario::Disturbed(why) => {
                say!("   {what}: attempt {attempt} disturbed ({why}); again with fresh orgs");
            }
        }
    }
    bail!("{what}: disturbed {DISTURBED_ATTEMPTS} times in a row")
}

/// Waits until both proxies' rate limiters count again: a run of answers in a row carrying
/// `X-RateLimit-Remaining` on each proxy (fresh connections, so every worker is reached).
/// Uses an org of its own with a budget nothing can spend.
pub async fn limiter_counting(ctx: &Ctx, within: Duration) -> Result<()> {
    let t = ctx.tenant_rpm(READ, UNLIMITED_RPM).await?;
    for p in 0..2 {
        let mut in_a_row = 0;
        poll("the rate limiter counting", within, async || {
            let r = ctx.expect(p, &t.probe(), 200, None).await?;
            in_a_row = if r.header("X-RateLimit-Remaining").is_some() {
                in_a_row + 1
            } else {
                0
            };
            Ok((in_a_row >= 8).then_some(()))
        })
        .await?;
    }
    Ok(())
}

pub fn rate_headers(r: &Response) -> Result<(u64, Option<u64>, u64)> {
    let limit = header_u64(r, "X-RateLimit-Limit")
        .ok_or_else(|| anyhow!("no X-RateLimit-Limit:\n{}", r.dump()))?;
    let reset = header_u64(r, "X-RateLimit-Reset")
        .ok_or_else(|| anyhow!("no X-RateLimit-Reset:\n{}", r.dump()))?;
    let remaining = header_u64(r, "X-RateLimit-Remaining");
    // The OpenAI-named copies carry the same figures.
    ensure!(
        header_u64(r, "x-ratelimit-limit-requests") == Some(limit)
            && header_u64(r, "x-ratelimit-remaining-requests") == remaining,
        "OpenAI-named headers disagree:\n{}",
        r.dump()
    );
    let reset_in = r
        .header("x-ratelimit-reset-requests")
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("x-ratelimit-reset-requests is not `<n>s`:\n{}", r.dump()))?;
    ensure!(reset_in <= 60, "x-ratelimit-reset-requests {reset_in}s");
    let now = now_unix_s();
    ensure!(
        reset + 1 >= now && reset <= now + 60,
        "SEC-4.4 X-RateLimit-Reset {reset} not within 60 s of now ({now})"
    );
    Ok((limit, remaining, reset))
}
