//! SEC-4: per-org rate limits shared by both proxies, under concurrency, and failing open
//! while Redis is down.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::Request;

use crate::common::*;
use crate::say;
use crate::support::*;

pub async fn sec_4_rate_limit_shared_by_both_proxies(ctx: Ctx) -> Result<()> {
    retry_disturbed(&ctx, "SEC-4.1–4.5", rate_limit_scenario).await
}

pub async fn rate_limit_scenario(ctx: &Ctx) -> Result<Scenario> {
    const LIMIT: u64 = 60;
    let a = ctx.tenant_rpm(READ, 60).await?;
    let b = ctx.tenant_rpm(READ, 60).await?;
    // Refused before the rate limiter: these spend none of the budget.
    for p in 0..2 {
        ctx.expect(
            p,
            &chat(&a.token.pat, &a.agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        )
        .await?;
        ctx.expect(
            p,
            &Request::get("/v1/nope").auth(&a.token.pat, &a.agent),
            404,
            Some("NOT_FOUND"),
        )
        .await?;
        ctx.expect(
            p,
            &Request::get(PROBE).auth(&a.token.pat, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        )
        .await?;
    }
    // SEC-4.1: 60 requests alternating between the proxies, Remaining counting down exactly.
    let mut window = None;
    for i in 1..=LIMIT {
        let p = usize::try_from(i % 2)?;
        let r = ctx.expect(p, &a.probe(), 200, None).await?;
        let (limit, remaining, reset) = rate_headers(&r)?;
        ensure!(limit == LIMIT, "X-RateLimit-Limit {limit}");
        if *window.get_or_insert(reset) != reset {
            return Ok(Scenario::Disturbed("the minute window changed".into()));
        }
        let Some(remaining) = remaining else {
            return Ok(Scenario::Disturbed(format!(
                "request {i} failed open (no Remaining)"
            )));
        };
        ensure!(
            remaining == LIMIT - i,
            "SEC-4.1 request {i} on proxy {p}: X-RateLimit-Remaining {remaining}, expected {}",
            LIMIT - i
        );
    }
    // SEC-4.2: the 61st is refused, whichever proxy it reaches.
    let r = ctx.send(1, &a.probe()).await?;
    let (_, remaining, reset) = rate_headers(&r)?;
    if Some(reset) != window {
        return Ok(Scenario::Disturbed("the minute window changed".into()));
    }
    check(&r, 429, Some("RATE_LIMITED")).context("SEC-4.2 61st request with limit 60")?;
    ensure!(remaining == Some(0), "Remaining on the 429: {remaining:?}");
    // SEC-4.3: Retry-After in whole seconds, 1..=60, and retry-after-ms agreeing with it.
    let retry = header_u64(&r, "Retry-After").ok_or_else(|| anyhow!("SEC-4.3 no Retry-After"))?;
    ensure!((1..=60).contains(&retry), "SEC-4.3 Retry-After {retry}");
    let retry_ms = header_u64(&r, "retry-after-ms").ok_or_else(|| anyhow!("no retry-after-ms"))?;
    ensure!(
        (1..=60_000).contains(&retry_ms) && retry_ms.div_ceil(1000) == retry,
        "retry-after-ms {retry_ms} vs Retry-After {retry}"
    );
    // SEC-4.4 is checked by rate_headers on every response, the 429 included.
    // The other proxy refuses too: one budget.
    let r0 = ctx.send(0, &a.probe()).await?;
    if rate_headers(&r0)?.2 != reset {
        return Ok(Scenario::Disturbed("the minute window changed".into()));
    }
    check(&r0, 429, Some("RATE_LIMITED"))?;
    // SEC-4.5: org B is untouched by A's exhaustion.
    for (p, want) in [(0usize, LIMIT - 1), (1, LIMIT - 2)] {
        let r = ctx
            .expect(p, &b.probe(), 200, None)
            .await
            .context("SEC-4.5")?;
        let (_, remaining, _) = rate_headers(&r)?;
        let Some(remaining) = remaining else {
            return Ok(Scenario::Disturbed("org B failed open".into()));
        };
        ensure!(
            remaining == want,
            "SEC-4.5 org B Remaining {remaining}, expected {want}"
        );
    }
    say!("   SEC-4: 60 admitted with exact countdown over both proxies, 61st 429 (Retry-After {retry} s), org B unaffected");
    Ok(Scenario::Done)
}

pub async fn rate_limit_holds_under_concurrency_across_proxies(ctx: Ctx) -> Result<()> {
    retry_disturbed(&ctx, "concurrent rate limit", async |ctx: &Ctx| -> Result<Scenario> {
        const LIMIT: usize = 60;
        const REQUESTS: usize = 80;
        const CLIENTS: usize = 8;
        let t = ctx.tenant_rpm(READ, 60).await?;
        // Verified once by authd (a refusal that spends no budget), so the burst below finds
        // the token in authd's cache.
        ctx.expect(0, &chat(&t.token.pat, &t.agent), 403, Some("INSUFFICIENT_PERMISSIONS"))
            .await?;
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (ctx, req) = (ctx.clone(), t.probe());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (c..REQUESTS).step_by(CLIENTS) {
                    out.push(ctx.send(i % 2, &req).await?);
                }
                Ok::<_, anyhow::Error>(out)
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        let mut resets = std::collections::BTreeSet::new();
        let (mut counted, mut failed_open, mut limited) = (Vec::new(), 0, 0);
        for r in &all {
            let (_, remaining, reset) = rate_headers(r)?;
            resets.insert(reset);
            match (outcome(r), remaining) {
                ((200, _), Some(remaining)) => counted.push(remaining),
                ((200, _), None) => failed_open += 1,
                ((429, Some(c)), _) if c == "RATE_LIMITED" => limited += 1,
                _ => bail!("unexpected answer:\n{}", r.dump()),
            }
        }
        if resets.len() > 1 {
            return Ok(Scenario::Disturbed("the minute window changed".into()));
        }
        // Whatever else happened: Redis never counted more than the limit, and every admitted
        // request got a count of its own (one atomic counter shared by both proxies).
        counted.sort_unstable();
        let distinct = counted.windows(2).all(|w| w[0] != w[1]);
        ensure!(
            counted.len() <= LIMIT && distinct,
            "{} counted admissions (limit {LIMIT}), Remaining values {counted:?}",
            counted.len()
        );
        if failed_open > 0 {
            return Ok(Scenario::Disturbed(format!(
                "{failed_open} checks failed open (Redis slower than the limiter's timeout)"
            )));
        }
        let admitted = counted.len();
        say!("   concurrent: {REQUESTS} requests from {CLIENTS} clients over both proxies → {admitted} admitted, {limited} refused (limit {LIMIT})");
        ensure!(
            admitted == LIMIT && limited == REQUESTS - LIMIT,
            "{admitted} admitted and {limited} refused; expected exactly {LIMIT} admitted"
        );
        Ok(Scenario::Done)
    })
    .await
}

pub async fn sec_4_6_redis_down_fails_open_and_recovers(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant_rpm(READ, 3).await?;
    ctx.warm(&t.probe(), 1).await?;
    ctx.env.stop_redis().await?;
    // Fail open: admitted on both proxies, beyond the org's 3 rpm, without a counter.
    for i in 0..8 {
        ctx.expect(i % 2, &t.probe(), 200, None)
            .await
            .with_context(|| format!("SEC-4.6 request {i} with Redis down"))?;
    }
    for p in 0..2 {
        let ready = ctx.env.wait_ready(p, false, Duration::from_secs(5)).await?;
        ctx.record_raw("GET /ready (Redis down)", &ready);
        ensure!(
            ready.text().to_ascii_lowercase().contains("redis"),
            "/ready does not name Redis:\n{}",
            ready.dump()
        );
    }
    ctx.env.restart_redis().await?;
    let restarted = Instant::now();
    // Recovered: both proxies count again.
    limiter_counting(&ctx, Duration::from_secs(15)).await?;
    for p in 0..2 {
        ctx.env.wait_ready(p, true, Duration::from_secs(10)).await?;
    }
    say!(
        "   SEC-4.6 Redis down: 8/8 admitted (limit 3); counting again {:.0} ms after its restart",
        ms(restarted.elapsed())
    );
    // ... and limiting again.
    retry_disturbed(
        &ctx,
        "SEC-4.6 recovery",
        async |ctx: &Ctx| -> Result<Scenario> {
            let c = ctx.tenant_rpm(READ, 3).await?;
            let mut resets = std::collections::BTreeSet::new();
            for i in 1..=3u64 {
                let r = ctx
                    .expect(usize::try_from(i % 2)?, &c.probe(), 200, None)
                    .await?;
                let (_, remaining, reset) = rate_headers(&r)?;
                resets.insert(reset);
                let Some(remaining) = remaining else {
                    return Ok(Scenario::Disturbed("failed open".into()));
                };
                ensure!(remaining == 3 - i, "Remaining {remaining} after {i}");
            }
            let r = ctx.send(0, &c.probe()).await?;
            resets.insert(rate_headers(&r)?.2);
            if resets.len() > 1 {
                return Ok(Scenario::Disturbed("the minute window changed".into()));
            }
            check(&r, 429, Some("RATE_LIMITED"))?;
            Ok(Scenario::Done)
        },
    )
    .await
}
