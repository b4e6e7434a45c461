//! SEC-1: token authentication — the matrix rows, revocation and expiry races, and the
//! answers an attacker probing for valid token ids would compare (identical, same time), plus
//! the per-address flood guard.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::{Request, Response};

use crate::common::*;
use crate::say;
use crate::support::*;

pub async fn sec_1_token_authentication(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    let a = t.agent.as_str();
    let pat = t.token.pat.as_str();
    let rows = [
        row(
            "SEC-1.1 no Authorization",
            agent_only(a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "SEC-1.1 no Authorization and no agent header: 401 before 400",
            Request::get(PROBE),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "SEC-1.2 `Bearer ` with an empty value",
            bearer(PROBE, "Bearer ", a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "SEC-1.2 `Bearer` and spaces only",
            bearer(PROBE, "Bearer    ", a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "SEC-1.2 empty Authorization",
            bearer(PROBE, "", a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "another scheme (Basic)",
            bearer(PROBE, "Basic dXNlcjpwYXNz", a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "a PAT without the Bearer scheme",
            bearer(PROBE, pat, a),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "SEC-1.3 malformed `not_a_token`",
            bearer(PROBE, "Bearer not_a_token", a),
            401,
            Some("INVALID_TOKEN"),
        ),
        row(
            "SEC-1.3 the old `ibex_sk_` shape",
            bearer(PROBE, "Bearer ibex_sk_unknowntoken", a),
            401,
            Some("INVALID_TOKEN"),
        ),
        row(
            "SEC-1.3 a PAT with a short secret",
            Request::get(PROBE).auth(&format!("ibex_pat_{}_abc", t.token.id), a),
            401,
            Some("INVALID_TOKEN"),
        ),
        row(
            "SEC-1.4 well-formed PAT, id in no database",
            Request::get(PROBE).auth(&unknown_pat(), a),
            401,
            Some("INVALID_TOKEN"),
        ),
        row(
            "SEC-1.4 the right id with a wrong secret",
            Request::get(PROBE).auth(&t.token.with_wrong_secret(), a),
            401,
            Some("INVALID_TOKEN"),
        ),
        row("SEC-1.7 active token", t.probe(), 200, None),
        row(
            "the scheme is case-insensitive",
            bearer(PROBE, &format!("bearer {pat}"), a),
            200,
            None,
        ),
    ];
    run_rows(&ctx, &rows).await?;

    // SEC-1.7: the request went past auth with the token's own identity.
    let body = ctx.expect(1, &t.probe(), 200, None).await?.json()?;
    ensure!(
        body["org_id"] == t.org.as_str()
            && body["agent_id"] == t.agent.as_str()
            && body["token_id"] == t.token.id.as_str()
            && body["permissions"] == READ,
        "probe body {body}"
    );
    Ok(())
}

pub async fn sec_1_5_revoked_token_refused_by_both_proxies_within_sla(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant_rpm(READ, UNLIMITED_RPM).await?;
    ctx.warm(&t.probe(), 6).await?;

    ctx.revoke(&t.org, &t.token.id).await?;
    let revoked = Instant::now();
    // Refusals: TOKEN_REVOKED; a 503 can only mean authd was momentarily too busy to re-verify
    // (four proxy workers re-validate at once) — still a refusal, so it counts as one.
    let results = race_after_change(
        &ctx,
        &t.probe(),
        revoked,
        sla + Duration::from_millis(300),
        &[(401, "TOKEN_REVOKED"), (503, "AUTH_UNAVAILABLE")],
    )
    .await?;
    for (p, r) in results.iter().enumerate() {
        say!(
            "   SEC-1.5 proxy {p}: last admitted request sent {} after the revocation committed, \
             first refusal at {:.1} ms (SLA {} ms), refusals {:?}",
            r.last_admitted
                .map_or("none".to_owned(), |d| format!("{:.1} ms", ms(d))),
            r.first_refused.map_or(f64::NAN, ms),
            sla.as_millis(),
            r.codes
        );
        ensure!(
            r.last_admitted.is_none_or(|d| d <= sla),
            "proxy {p} still admitted a revoked token {:?} after the revocation (SLA {sla:?})",
            r.last_admitted
        );
        ensure!(r.first_refused.is_some(), "proxy {p} never refused");
    }
    // Settled: every proxy says TOKEN_REVOKED (only after the secret verified) ...
    for p in 0..2 {
        poll(
            "TOKEN_REVOKED on both proxies",
            Duration::from_secs(5),
            async || {
                let r = ctx.send(p, &t.probe()).await?;
                Ok((r.error_code().as_deref() == Some("TOKEN_REVOKED")).then_some(()))
            },
        )
        .await?;
        // ... and the revoked id with a wrong secret is just an invalid token.
        ctx.expect(
            p,
            &Request::get(PROBE).auth(&t.token.with_wrong_secret(), &t.agent),
            401,
            Some("INVALID_TOKEN"),
        )
        .await?;
    }
    Ok(())
}

pub async fn sec_1_6_expired_token_is_refused_once_expired(ctx: Ctx) -> Result<()> {
    let org = ctx.org(0).await?;
    let agent = ctx.agent(&org).await?;
    let token = ctx
        .token_with(
            &org,
            TokenSpec {
                permissions: READ,
                expires_in_ms: 1500,
                ..TokenSpec::default()
            },
        )
        .await?;
    let exp = token.expires_at_ms;
    ensure!(exp > unix_ms(), "expiry {exp} already passed at creation");
    let probe = Request::get(PROBE).auth(&token.pat, &agent);
    // Valid (and cached by both proxies) until it expires: no answer may be 200 once the
    // expiry passed, nor 401 before.
    let mut expired_answers = [0u32; 2];
    let deadline = exp + 2000;
    while expired_answers.iter().any(|&n| n < 3) {
        ensure!(
            unix_ms() < deadline,
            "still not refused 2 s after expiry: {expired_answers:?}"
        );
        for (p, seen) in expired_answers.iter_mut().enumerate() {
            let sent = unix_ms();
            let r = ctx.send(p, &probe).await?;
            let got = unix_ms();
            match r.status {
                200 => ensure!(
                    sent < exp,
                    "proxy {p} admitted a token {} ms after it expired",
                    sent - exp
                ),
                401 => {
                    check(&r, 401, Some("TOKEN_EXPIRED"))?;
                    ensure!(
                        got >= exp,
                        "proxy {p} refused the token {} ms before expiry",
                        exp - got
                    );
                    *seen += 1;
                }
                _ => bail!("proxy {p}: {}", r.dump()),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An expired token with a wrong secret is just invalid (expiry only after the secret).
    for p in 0..2 {
        ctx.expect(
            p,
            &Request::get(PROBE).auth(&token.with_wrong_secret(), &agent),
            401,
            Some("INVALID_TOKEN"),
        )
        .await?;
    }
    // A token first seen after its expiry: refused by authd's answer, not only the cache.
    let cold = ctx
        .token_with(
            &org,
            TokenSpec {
                permissions: READ,
                expires_in_ms: 1,
                ..TokenSpec::default()
            },
        )
        .await?;
    poll(
        "the 1 ms token to expire",
        Duration::from_secs(2),
        async || Ok((unix_ms() > cold.expires_at_ms).then_some(())),
    )
    .await?;
    for p in 0..2 {
        ctx.expect(
            p,
            &Request::get(PROBE).auth(&cold.pat, &agent),
            401,
            Some("TOKEN_EXPIRED"),
        )
        .await?;
    }
    Ok(())
}

/// Beyond the matrix: an unknown token id and a wrong secret for a real id give the same
/// answer (byte for byte, given the same request id), and take the same time.
pub async fn unknown_token_id_and_wrong_secret_are_indistinguishable(ctx: Ctx) -> Result<()> {
    let org = ctx.org(0).await?;
    let agent = ctx.agent(&org).await?;
    // authd allows 5 failed cold validations per id in a burst: spread them over five ids.
    let mut real = Vec::new();
    for _ in 0..5 {
        real.push(ctx.token(&org, READ).await?);
    }
    // Cold validations on a shared 2-core box vary by tens of ms: 20 interleaved pairs keep the
    // medians' noise well under the bound.
    const PAIRS: usize = 20;
    let (mut unknown_ms, mut wrong_ms, mut deltas) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..PAIRS {
        let rid = format!("sec-indist-{i}");
        let unknown = Request::get(PROBE)
            .auth(&unknown_pat(), &agent)
            .header("X-Request-ID", &rid);
        let wrong = Request::get(PROBE)
            .auth(&real[i % real.len()].with_wrong_secret(), &agent)
            .header("X-Request-ID", &rid);
        let p = i % 2;
        let timed = async |req: &Request| -> Result<(Response, f64)> {
            let t0 = Instant::now();
            // A fresh address each time: these are deliberate failures.
            let r = ctx.send_from(p, ctx.env.fresh_ip(), req).await?;
            Ok((r, ms(t0.elapsed())))
        };
        let ((ru, tu), (rw, tw)) = if i % 2 == 0 {
            let u = timed(&unknown).await?;
            (u, timed(&wrong).await?)
        } else {
            let w = timed(&wrong).await?;
            (timed(&unknown).await?, w)
        };
        check(&ru, 401, Some("INVALID_TOKEN"))?;
        check(&rw, 401, Some("INVALID_TOKEN"))?;
        same_answer(&ru, &rw).context("unknown id vs wrong secret")?;
        unknown_ms.push(tu);
        wrong_ms.push(tw);
        deltas.push((tu - tw).abs());
    }
    // Malformed: the same answer too, through the same authd path (its timing is printed).
    let mut malformed_ms = Vec::new();
    for i in 0..4 {
        let rid = format!("sec-indist-m{i}");
        let req =
            bearer(PROBE, "Bearer ibex_pat_not-a-uuid_short", &agent).header("X-Request-ID", &rid);
        let t0 = Instant::now();
        let r = ctx.send_from(i % 2, ctx.env.fresh_ip(), &req).await?;
        malformed_ms.push(ms(t0.elapsed()));
        let twin = Request::get(PROBE)
            .auth(&unknown_pat(), &agent)
            .header("X-Request-ID", &rid);
        let u = ctx.send_from(i % 2, ctx.env.fresh_ip(), &twin).await?;
        same_answer(&r, &u).context("malformed vs unknown id")?;
    }
    let (mu, mw) = (percentile(&unknown_ms, 50.0), percentile(&wrong_ms, 50.0));
    say!(
        "   INVALID_TOKEN timing over {PAIRS} cold pairs: unknown id median {mu:.2} ms, wrong secret \
         median {mw:.2} ms, |Δ median| {:.2} ms, p95 |Δ| {:.2} ms (bound {TIMING_BOUND_MS} ms, \
         target {TIMING_TARGET_MS} ms); malformed median {:.2} ms",
        (mu - mw).abs(),
        percentile(&deltas, 95.0),
        percentile(&malformed_ms, 50.0)
    );
    ensure!(
        (mu - mw).abs() < TIMING_BOUND_MS,
        "unknown id and wrong secret differ by {:.2} ms in median",
        (mu - mw).abs()
    );
    Ok(())
}

/// Beyond the matrix: past 20 authentication failures in a minute, an address gets 429
/// RATE_LIMITED before any authd call; other addresses are unaffected.
pub async fn flood_guard_limits_failures_per_client_address(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    // Malformed tokens: counted as guesses like unknown ones; past the budget, no authd work.
    let guess = bearer(PROBE, "Bearer ibex_pat_guess", &t.agent);
    let (mut refused_401, mut limited) = (0u32, None);
    for i in 0..200 {
        let r = ctx.send(0, &guess).await?;
        match outcome(&r) {
            (401, Some(c)) if c == "INVALID_TOKEN" => refused_401 += 1,
            (429, Some(c)) if c == "RATE_LIMITED" => {
                limited.get_or_insert(i);
                if refused_401 >= 40 {
                    break;
                }
            }
            _ => bail!("guess {i}: {}", r.dump()),
        }
    }
    let first = limited.ok_or_else(|| anyhow!("200 failures from one address, never a 429"))?;
    ensure!(
        first >= 20,
        "limited after only {first} failures (the budget is 20 per worker)"
    );
    ensure!(
        refused_401 <= 40,
        "{refused_401} failures answered 401 (at most 20 per worker, 2 workers)"
    );
    // Another address is not affected.
    ctx.send_from(0, ctx.env.fresh_ip(), &guess)
        .await
        .and_then(|r| check(&r, 401, Some("INVALID_TOKEN")))?;
    ctx.send_from(0, ctx.env.fresh_ip(), &t.probe())
        .await
        .and_then(|r| check(&r, 200, None))?;
    say!("   flood guard: first 429 after {first} failures, {refused_401} answered 401 in all");
    Ok(())
}
