//! SEC-2: agent identity — the matrix rows, an agent leaving `active` reaching both proxies,
//! and authd going away (fail closed) and coming back.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ibex_e2e::http::Request;

use crate::common::*;
use crate::say;
use crate::support::*;

pub async fn sec_2_agent_identity(ctx: Ctx) -> Result<()> {
    let a = ctx.tenant(READ).await?;
    let b = ctx.tenant(READ).await?;
    let mut inactive = Vec::new();
    for status in [
        AgentStatus::Paused,
        AgentStatus::Archived,
        AgentStatus::Suspended,
    ] {
        let agent = ctx.agent(&a.org).await?;
        ctx.set_agent_status(&a.org, &agent, status).await?;
        inactive.push(agent);
    }
    let other_active = ctx.agent(&a.org).await?;
    let bound = ctx
        .token_with(
            &a.org,
            TokenSpec {
                permissions: READ,
                agent: Some(a.agent.clone()),
                ..TokenSpec::default()
            },
        )
        .await?;
    let pat = a.token.pat.as_str();
    let random_agent = uuid::Uuid::new_v4().to_string();
    let rows = [
        row(
            "SEC-2.1 no X-IBEX-Agent-ID",
            Request::get(PROBE).header("Authorization", &format!("Bearer {pat}")),
            400,
            Some("MISSING_AGENT_ID"),
        ),
        row(
            "SEC-2.1 empty X-IBEX-Agent-ID",
            Request::get(PROBE).auth(pat, ""),
            400,
            Some("MISSING_AGENT_ID"),
        ),
        row(
            "SEC-2.2 not a UUID",
            Request::get(PROBE).auth(pat, "not-a-uuid"),
            400,
            Some("INVALID_AGENT_ID"),
        ),
        row(
            "SEC-2.3 unknown agent",
            Request::get(PROBE).auth(pat, &random_agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-2.4 agent of another org",
            Request::get(PROBE).auth(pat, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-2.5 paused agent",
            Request::get(PROBE).auth(pat, &inactive[0]),
            403,
            Some("AGENT_SUSPENDED"),
        ),
        row(
            "SEC-2.6 archived agent",
            Request::get(PROBE).auth(pat, &inactive[1]),
            403,
            Some("AGENT_SUSPENDED"),
        ),
        row(
            "SEC-2.6b suspended agent",
            Request::get(PROBE).auth(pat, &inactive[2]),
            403,
            Some("AGENT_SUSPENDED"),
        ),
        row("SEC-2.7 token and agent of one org", a.probe(), 200, None),
        row(
            "another active agent of the org",
            Request::get(PROBE).auth(pat, &other_active),
            200,
            None,
        ),
        row(
            "agent-bound token with its agent",
            Request::get(PROBE).auth(&bound.pat, &a.agent),
            200,
            None,
        ),
        row(
            "agent-bound token with another active agent of its org",
            Request::get(PROBE).auth(&bound.pat, &other_active),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "bad token and bad agent header: the token is checked first",
            bearer(PROBE, "Bearer not_a_token", "not-a-uuid"),
            401,
            Some("INVALID_TOKEN"),
        ),
    ];
    run_rows(&ctx, &rows).await?;

    // Unknown, another org's and not-the-bound agent: one indistinguishable answer.
    let rid = "sec-2-same-answer";
    let probes = [
        Request::get(PROBE).auth(pat, &uuid::Uuid::new_v4().to_string()),
        Request::get(PROBE).auth(pat, &b.agent),
        Request::get(PROBE).auth(&bound.pat, &other_active),
    ];
    let mut answers = Vec::new();
    for req in probes {
        answers.push(ctx.send(0, &req.header("X-Request-ID", rid)).await?);
    }
    for other in &answers[1..] {
        same_answer(&answers[0], other).context("AGENT_NOT_AUTHORIZED answers")?;
    }
    Ok(())
}

/// Beyond the matrix: an agent leaving `active` is refused by both proxies within the SLA.
pub async fn agent_status_change_reaches_both_proxies_within_sla(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant_rpm(READ, UNLIMITED_RPM).await?;
    ctx.warm(&t.probe(), 6).await?;
    ctx.set_agent_status(&t.org, &t.agent, AgentStatus::Paused)
        .await?;
    let changed = Instant::now();
    let results = race_after_change(
        &ctx,
        &t.probe(),
        changed,
        sla + Duration::from_millis(300),
        &[(403, "AGENT_SUSPENDED")],
    )
    .await?;
    for (p, r) in results.iter().enumerate() {
        say!(
            "   agent paused, proxy {p}: last admitted request sent {} after the change, first \
             refusal at {:.1} ms (SLA {} ms)",
            r.last_admitted
                .map_or("none".to_owned(), |d| format!("{:.1} ms", ms(d))),
            r.first_refused.map_or(f64::NAN, ms),
            sla.as_millis()
        );
        ensure!(
            r.last_admitted.is_none_or(|d| d <= sla),
            "proxy {p} still admitted a paused agent {:?} after the change",
            r.last_admitted
        );
        ensure!(r.first_refused.is_some(), "proxy {p} never refused");
    }
    Ok(())
}

pub async fn sec_2_8_authd_down_fails_closed_and_recovers(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant_rpm(READ, UNLIMITED_RPM).await?;
    let unused = ctx.token(&t.org, READ).await?;
    ctx.warm(&t.probe(), 6).await?;

    ctx.env.kill_authd().await;
    let killed = Instant::now();
    // An uncached credential cannot be decided: 503 AUTH_UNAVAILABLE with the envelope.
    for p in 0..2 {
        ctx.expect(
            p,
            &Request::get(PROBE).auth(&unused.pat, &t.agent),
            503,
            Some("AUTH_UNAVAILABLE"),
        )
        .await
        .context("SEC-2.8 uncached token with authd down")?;
    }
    // A cached one is trusted only while the invalidation feed could have told otherwise.
    let results = race_after_change(
        &ctx,
        &t.probe(),
        killed,
        sla + Duration::from_millis(400),
        &[(503, "AUTH_UNAVAILABLE")],
    )
    .await?;
    for (p, r) in results.iter().enumerate() {
        say!(
            "   SEC-2.8 proxy {p}: cached token last admitted {} after authd died, 503 from {:.1} ms \
             (SLA {} ms)",
            r.last_admitted
                .map_or("never".to_owned(), |d| format!("{:.1} ms", ms(d))),
            r.first_refused.map_or(f64::NAN, ms),
            sla.as_millis()
        );
        ensure!(
            r.last_admitted.is_none_or(|d| d <= sla),
            "proxy {p} kept trusting its cache {:?} after the feed died",
            r.last_admitted
        );
        ensure!(r.first_refused.is_some(), "proxy {p} never answered 503");
    }
    // What needs no authd is still answered; a malformed token is not: it takes the
    // same path as an unknown one (SPEC §3: identical answers and timing), so with
    // authd down it fails closed like any undecidable credential. /ready says what is down.
    for p in 0..2 {
        ctx.expect(p, &agent_only(&t.agent), 401, Some("MISSING_TOKEN"))
            .await?;
        ctx.expect(
            p,
            &bearer(PROBE, "Bearer not_a_token", &t.agent),
            503,
            Some("AUTH_UNAVAILABLE"),
        )
        .await?;
        let ready = ctx.env.wait_ready(p, false, Duration::from_secs(5)).await?;
        ctx.record_raw("GET /ready (authd down)", &ready);
    }

    ctx.env.restart_authd().await?;
    let restarted = Instant::now();
    for p in 0..2 {
        poll(
            "a cached token admitted again after authd restarted",
            Duration::from_secs(20),
            async || {
                let r = ctx.send(p, &t.probe()).await?;
                match r.status {
                    200 => Ok(Some(())),
                    503 => Ok(None),
                    _ => bail!("{}", r.dump()),
                }
            },
        )
        .await?;
        ctx.env.wait_ready(p, true, Duration::from_secs(10)).await?;
    }
    say!(
        "   SEC-2.8 authd back: both proxies admit again {:.0} ms after its restart",
        ms(restarted.elapsed())
    );
    Ok(())
}
