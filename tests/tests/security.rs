//! The end-to-end security suite (issue 5): the SEC matrix (SEC-1.1 … SEC-6.5) and the
//! boundary checks beyond it, through real `ibex-proxy` processes backed by a real
//! `ibex-authd`, Postgres and Redis. `docs/SECURITY.md` maps each security claim to the case
//! here that proves it.
//!
//! One stack per run (see `common::Env`): Postgres, Redis, ONE authd, TWO proxies. Every case
//! makes its own orgs, agents and tokens through authd's gRPC API and uses its own client
//! address, so cases are isolated and run concurrently. The run has three phases:
//!
//! 1. `Parallel` cases, a few at a time (authd verifies at most 2×cores cold secrets at once
//!    and answers "busy" beyond that, which the proxy must turn into 503 — so the suite keeps
//!    its own cold validations under that bound);
//! 2. `Alone` cases, one by one with nothing else running: the timing measurements, the
//!    revocation race and the rate-limit counts, which load from other cases would blur;
//! 3. `Disruptive` cases, in order: Redis stopped and restarted, then authd killed and
//!    restarted;
//!
//! and then two checks over the whole run: SEC-6.x over every error response any case
//! received, and no credential in any service log.
//!
//! Adding a case: write `async fn name(ctx: Ctx) -> Result<()>` (or add a row to a table
//! inside one) and list it in [`cases`]. `IBEX_SEC_CASES=substr,substr` runs a subset.
//!
//! Needs the binaries: `cargo build --workspace --bins`, then
//! `cargo test -p ibex-e2e --test security`.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::*;
use ibex_e2e::http::{Request, Response};
use tokio::sync::Semaphore;

const AGENT_HEADER: &str = "X-IBEX-Agent-ID";
/// Cases of the `Parallel` phase running at once.
const PARALLEL_CASES: usize = 3;
/// No case may take longer than this.
const CASE_TIMEOUT: Duration = Duration::from_secs(45);
/// The generous CI bound for timing differences, and the target on a quiet machine.
const TIMING_BOUND_MS: f64 = 50.0;
const TIMING_TARGET_MS: f64 = 5.0;
/// The proxy's fixed header deadline (`ServerConfig::header_timeout`; no env variable).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A rate-limit count spoiled by a minute boundary or by a Redis check that failed open (the
/// limiter gives Redis 5 ms; a loaded 2-core box misses that now and then) is run again.
const DISTURBED_ATTEMPTS: u32 = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Parallel,
    Alone,
    Disruptive,
}

// Cases run on one thread (a `LocalSet`): they are I/O-bound clients, and not needing `Send`
// lets them use async closures freely.
type CaseFn = fn(Ctx) -> Pin<Box<dyn Future<Output = Result<()>>>>;

struct Case {
    name: &'static str,
    phase: Phase,
    run: CaseFn,
}

macro_rules! cases {
    ($($phase:ident $f:ident),* $(,)?) => {
        vec![$(Case { name: stringify!($f), phase: Phase::$phase, run: |ctx| Box::pin($f(ctx)) }),*]
    };
}

/// Every case, in the order it starts (longest first within `Parallel`).
fn cases() -> Vec<Case> {
    cases![
        Parallel slow_header_clients_are_cut_off_without_blocking_others,
        Parallel sec_1_6_expired_token_is_refused_once_expired,
        Parallel agent_status_change_reaches_both_proxies_within_sla,
        Parallel sec_1_token_authentication,
        Parallel sec_2_agent_identity,
        Parallel sec_3_cross_tenant_isolation,
        Parallel sec_5_permission_bitmap,
        Parallel org_probe_of_another_org_is_permission_denied,
        Parallel unknown_v1_route_is_401_without_token_and_404_with_one,
        Parallel request_smuggling_is_refused_and_the_connection_closed,
        Parallel oversized_body_is_413_and_the_proxy_keeps_serving,
        Parallel oversized_headers_are_431,
        Parallel request_id_is_echoed_or_replaced,
        Parallel flood_guard_limits_failures_per_client_address,
        Alone sec_1_5_revoked_token_refused_by_both_proxies_within_sla,
        Alone sec_3_4_cross_tenant_denials_take_the_same_time,
        Alone unknown_token_id_and_wrong_secret_are_indistinguishable,
        Alone sec_4_rate_limit_shared_by_both_proxies,
        Alone rate_limit_holds_under_concurrency_across_proxies,
        Disruptive sec_4_6_redis_down_fails_open_and_recovers,
        Disruptive sec_2_8_authd_down_fails_closed_and_recovers,
    ]
}

#[tokio::test]
async fn security_suite() -> Result<()> {
    tokio::task::LocalSet::new().run_until(suite()).await
}

async fn suite() -> Result<()> {
    let started = Instant::now();
    let env = Env::start().await?;
    say!(
        "\n== security suite: stack up in {:.1} s (Postgres, Redis, authd, proxies {} and {}; SLA {} ms)",
        started.elapsed().as_secs_f64(),
        env.addr(0),
        env.addr(1),
        env.sla.as_millis()
    );
    let filter: Vec<String> = std::env::var("IBEX_SEC_CASES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
        .collect();

    let mut failures = Vec::new();
    for phase in [Phase::Parallel, Phase::Alone, Phase::Disruptive] {
        let phase_start = Instant::now();
        let width = if phase == Phase::Parallel {
            PARALLEL_CASES
        } else {
            1
        };
        let slots = Arc::new(Semaphore::new(width));
        let mut running = Vec::new();
        for case in selected.iter().filter(|c| c.phase == phase) {
            let slot = slots.clone().acquire_owned().await?;
            let ctx = env.ctx(case.name);
            let (name, run) = (case.name, case.run);
            running.push(tokio::task::spawn_local(async move {
                let t0 = Instant::now();
                let result = match tokio::time::timeout(CASE_TIMEOUT, run(ctx)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow!("did not finish within {CASE_TIMEOUT:?}")),
                };
                drop(slot);
                report(name, t0.elapsed(), &result);
                (name, result)
            }));
        }
        for handle in running {
            match handle.await {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => failures.push(format!("{name}: {e:#}")),
                Err(join) => failures.push(format!("a case panicked: {join}")),
            }
        }
        say!(
            "   -- {phase:?} phase: {:.1} s",
            phase_start.elapsed().as_secs_f64()
        );
    }

    for (name, result) in [
        (
            "sec_6_envelope_on_every_response",
            sec_6_envelope_on_every_response(&env),
        ),
        (
            "logs_contain_no_credential",
            logs_contain_no_credential(&env).await,
        ),
    ] {
        report(name, Duration::ZERO, &result);
        if let Err(e) = result {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    say!(
        "== security suite: {} cases in {:.1} s (limit 60 s), {} failed\n",
        selected.len() + 2,
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    if !failures.is_empty() {
        bail!(
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

fn report(name: &str, took: Duration, result: &Result<()>) {
    match result {
        Ok(()) => say!("   ok   {name} ({:.0} ms)", ms(took)),
        Err(e) => say!("   FAIL {name} ({:.0} ms): {e:#}", ms(took)),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn agent_only(agent: &str) -> Request {
    Request::get(PROBE).header(AGENT_HEADER, agent)
}

fn bearer(path: &str, authorization: &str, agent: &str) -> Request {
    Request::get(path)
        .header("Authorization", authorization)
        .header(AGENT_HEADER, agent)
}

fn chat(token: &str, agent: &str) -> Request {
    Request::post(CHAT_PATH, CHAT_BODY)
        .header("Content-Type", "application/json")
        .auth(token, agent)
}

fn header_u64(resp: &Response, name: &str) -> Option<u64> {
    resp.header(name)?.trim().parse().ok()
}

fn now_unix_s() -> u64 {
    u64::try_from(unix_ms() / 1000).unwrap_or(0)
}

/// One row of a table: what, the request, the proxy, expected status and code.
struct Row {
    what: &'static str,
    req: Request,
    status: u16,
    code: Option<&'static str>,
}

fn row(what: &'static str, req: Request, status: u16, code: Option<&'static str>) -> Row {
    Row {
        what,
        req,
        status,
        code,
    }
}

/// Runs every row against both proxies.
async fn run_rows(ctx: &Ctx, rows: &[Row]) -> Result<()> {
    for p in 0..2 {
        for r in rows {
            ctx.expect(p, &r.req, r.status, r.code)
                .await
                .with_context(|| format!("{} (proxy {p})", r.what))?;
        }
    }
    Ok(())
}

/// Polls both proxies with `req` from the moment `changed` (a committed change) until
/// `until` after it; every answer must be 200 or one of `refusals`. Returns, per proxy, the
/// send time (since `changed`) of the last request that was still admitted, the time of the
/// first refusal and how many refusals carried each code.
async fn race_after_change(
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
                    out.last_admitted = Some(sent);
                } else if refusals
                    .iter()
                    .any(|(s, c)| *s == resp.status && resp.error_code().as_deref() == Some(c))
                {
                    out.first_refused.get_or_insert(got);
                    out.last_code = resp.error_code();
                    *out.codes
                        .entry(resp.error_code().unwrap_or_default())
                        .or_default() += 1;
                } else {
                    bail!("proxy {p}: unexpected answer:\n{}", resp.dump());
                }
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
struct RaceResult {
    last_admitted: Option<Duration>,
    first_refused: Option<Duration>,
    last_code: Option<String>,
    codes: std::collections::BTreeMap<String, u32>,
}

// ---------------------------------------------------------------------------------------------
// SEC-1: token authentication

async fn sec_1_token_authentication(ctx: Ctx) -> Result<()> {
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

async fn sec_1_5_revoked_token_refused_by_both_proxies_within_sla(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant(READ).await?;
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

async fn sec_1_6_expired_token_is_refused_once_expired(ctx: Ctx) -> Result<()> {
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
async fn unknown_token_id_and_wrong_secret_are_indistinguishable(ctx: Ctx) -> Result<()> {
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
    // Malformed: the same answer too (its timing is printed only: the proxy decides it locally).
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
         target {TIMING_TARGET_MS} ms); malformed median {:.2} ms (decided in the proxy)",
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
async fn flood_guard_limits_failures_per_client_address(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    // Malformed tokens: refused in the proxy, counted as guesses, no authd work.
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

// ---------------------------------------------------------------------------------------------
// SEC-2: agent identity

async fn sec_2_agent_identity(ctx: Ctx) -> Result<()> {
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
async fn agent_status_change_reaches_both_proxies_within_sla(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant(READ).await?;
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

async fn sec_2_8_authd_down_fails_closed_and_recovers(ctx: Ctx) -> Result<()> {
    let sla = ctx.env.sla;
    let t = ctx.tenant(READ).await?;
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
    // What needs no authd is still answered; /ready says what is down.
    for p in 0..2 {
        ctx.expect(p, &agent_only(&t.agent), 401, Some("MISSING_TOKEN"))
            .await?;
        ctx.expect(
            p,
            &bearer(PROBE, "Bearer not_a_token", &t.agent),
            401,
            Some("INVALID_TOKEN"),
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

// ---------------------------------------------------------------------------------------------
// SEC-3: cross-tenant isolation

async fn sec_3_cross_tenant_isolation(ctx: Ctx) -> Result<()> {
    let a = ctx.tenant(ALL).await?;
    let b = ctx.tenant(ALL).await?;
    let (ta, tb) = (a.token.pat.as_str(), b.token.pat.as_str());
    let rows = [
        row("SEC-3.1 A token + A agent", a.probe(), 200, None),
        row("SEC-3.1 B token + B agent", b.probe(), 200, None),
        row(
            "SEC-3.1 A token + A agent on chat: past auth (no provider)",
            chat(ta, &a.agent),
            501,
            Some("PROVIDER_NOT_CONFIGURED"),
        ),
        row(
            "SEC-3.2 A token + B agent",
            Request::get(PROBE).auth(ta, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-3.3 B token + A agent",
            Request::get(PROBE).auth(tb, &a.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-3.2 on chat",
            chat(ta, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-3.3 on chat",
            chat(tb, &a.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-3.2 on models",
            Request::get("/v1/models").auth(ta, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
        row(
            "SEC-3.2 on B's org probe",
            Request::get(&format!("/v1/orgs/{}/auth-probe", b.org)).auth(ta, &b.agent),
            403,
            Some("AGENT_NOT_AUTHORIZED"),
        ),
    ];
    run_rows(&ctx, &rows).await?;
    Ok(())
}

async fn sec_3_4_cross_tenant_denials_take_the_same_time(ctx: Ctx) -> Result<()> {
    let a = ctx.tenant(READ).await?;
    let b = ctx.tenant(READ).await?;
    let r32 = Request::get(PROBE)
        .auth(&a.token.pat, &b.agent)
        .header("X-Request-ID", "sec-3-4");
    let r33 = Request::get(PROBE)
        .auth(&b.token.pat, &a.agent)
        .header("X-Request-ID", "sec-3-4");
    for p in 0..2 {
        let mut conn = ctx.keep_alive(p).await?;
        for _ in 0..3 {
            check(&conn.send(&r32).await?, 403, Some("AGENT_NOT_AUTHORIZED"))?;
            check(&conn.send(&r33).await?, 403, Some("AGENT_NOT_AUTHORIZED"))?;
        }
        let (mut t32, mut t33, mut deltas) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..100 {
            let mut one = async |req: &Request| -> Result<(Response, f64)> {
                let t0 = Instant::now();
                let r = conn.send(req).await?;
                Ok((r, ms(t0.elapsed())))
            };
            let ((x, dx), (y, dy)) = if i % 2 == 0 {
                let x = one(&r32).await?;
                (x, one(&r33).await?)
            } else {
                let y = one(&r33).await?;
                (one(&r32).await?, y)
            };
            check(&x, 403, Some("AGENT_NOT_AUTHORIZED"))?;
            check(&y, 403, Some("AGENT_NOT_AUTHORIZED"))?;
            same_answer(&x, &y).context("SEC-3.2 vs SEC-3.3")?;
            t32.push(dx);
            t33.push(dy);
            deltas.push((dx - dy).abs());
        }
        let p95 = percentile(&deltas, 95.0);
        say!(
            "   SEC-3.4 proxy {p}: p95 |Δ| = {p95:.3} ms over 100 alternating pairs (medians: 3.2 \
             {:.3} ms, 3.3 {:.3} ms); CI bound {TIMING_BOUND_MS} ms, local target \
             {TIMING_TARGET_MS} ms{}",
            percentile(&t32, 50.0),
            percentile(&t33, 50.0),
            if p95 < TIMING_TARGET_MS {
                " — met"
            } else {
                " — NOT met here"
            }
        );
        ensure!(
            p95 < TIMING_BOUND_MS,
            "SEC-3.4 p95 |Δ| {p95:.3} ms on proxy {p}"
        );
    }
    Ok(())
}

async fn org_probe_of_another_org_is_permission_denied(ctx: Ctx) -> Result<()> {
    let a = ctx.tenant(READ).await?;
    let b = ctx.tenant(READ).await?;
    let probe = |org: &str| {
        Request::get(&format!("/v1/orgs/{org}/auth-probe"))
            .auth(&a.token.pat, &a.agent)
            .header("X-Request-ID", "sec-org-probe")
    };
    let nowhere = uuid::Uuid::new_v4().to_string();
    let rows = [
        row("own org", probe(&a.org), 200, None),
        row(
            "another existing org",
            probe(&b.org),
            403,
            Some("PERMISSION_DENIED"),
        ),
        row(
            "an org that does not exist",
            probe(&nowhere),
            403,
            Some("PERMISSION_DENIED"),
        ),
        row(
            "another org, anonymous: 401 first",
            Request::get(&format!("/v1/orgs/{}/auth-probe", b.org)),
            401,
            Some("MISSING_TOKEN"),
        ),
    ];
    run_rows(&ctx, &rows).await?;
    // Existing or not, another org's resource gets the same answer (no existence oracle).
    let x = ctx.send(0, &probe(&b.org)).await?;
    let y = ctx.send(0, &probe(&nowhere)).await?;
    same_answer(&x, &y).context("PERMISSION_DENIED for an existing vs a made-up org")?;
    Ok(())
}

async fn unknown_v1_route_is_401_without_token_and_404_with_one(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    let (pat, agent) = (t.token.pat.as_str(), t.agent.as_str());
    let mut rows = Vec::new();
    for path in [
        "/v1/does-not-exist",
        "/v1/",
        "/v1/internal/auth-probe/x",
        "/v1/orgs",
    ] {
        rows.push(row(
            "unknown /v1 route, anonymous",
            Request::get(path),
            401,
            Some("MISSING_TOKEN"),
        ));
        rows.push(row(
            "unknown /v1 route, invalid token",
            bearer(path, "Bearer not_a_token", agent),
            401,
            Some("INVALID_TOKEN"),
        ));
        rows.push(row(
            "unknown /v1 route, authenticated",
            Request::get(path).auth(pat, agent),
            404,
            Some("NOT_FOUND"),
        ));
    }
    rows.extend([
        row(
            "wrong method on a protected route, anonymous",
            Request::new("DELETE", PROBE),
            401,
            Some("MISSING_TOKEN"),
        ),
        row(
            "wrong method on a protected route, authenticated",
            Request::new("DELETE", PROBE).auth(pat, agent),
            405,
            Some("METHOD_NOT_ALLOWED"),
        ),
        row(
            "GET on chat, authenticated",
            Request::get(CHAT_PATH).auth(pat, agent),
            405,
            Some("METHOD_NOT_ALLOWED"),
        ),
        row("public route", Request::get("/health"), 200, None),
        row(
            "wrong method on a public route",
            Request::post("/health", ""),
            405,
            Some("METHOD_NOT_ALLOWED"),
        ),
    ]);
    run_rows(&ctx, &rows).await
}

// ---------------------------------------------------------------------------------------------
// SEC-4: rate limits

enum Scenario {
    Done,
    /// Something outside the proxy's control (a minute boundary, a Redis check that failed
    /// open) spoiled the count: run it again with fresh orgs.
    Disturbed(String),
}

async fn sec_4_rate_limit_shared_by_both_proxies(ctx: Ctx) -> Result<()> {
    retry_disturbed(&ctx, "SEC-4.1–4.5", rate_limit_scenario).await
}

async fn retry_disturbed<F>(ctx: &Ctx, what: &str, scenario: F) -> Result<()>
where
    F: AsyncFn(&Ctx) -> Result<Scenario>,
{
    for attempt in 1..=DISTURBED_ATTEMPTS {
        match scenario(ctx).await? {
            Scenario::Done => return Ok(()),
            Scenario::Disturbed(why) => {
                say!("   {what}: attempt {attempt} disturbed ({why}); again with fresh orgs");
            }
        }
    }
    bail!("{what}: disturbed {DISTURBED_ATTEMPTS} times in a row")
}

fn rate_headers(r: &Response) -> Result<(u64, Option<u64>, u64)> {
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

async fn rate_limit_scenario(ctx: &Ctx) -> Result<Scenario> {
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

async fn rate_limit_holds_under_concurrency_across_proxies(ctx: Ctx) -> Result<()> {
    retry_disturbed(&ctx, "concurrent rate limit", async |ctx: &Ctx| -> Result<Scenario> {
        const LIMIT: usize = 60;
        const REQUESTS: usize = 80;
        const CLIENTS: usize = 16;
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

async fn sec_4_6_redis_down_fails_open_and_recovers(ctx: Ctx) -> Result<()> {
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
    // Recovered: both proxies count again (every worker: a run of counted answers in a row).
    let probe_org = ctx.tenant_rpm(READ, 1000).await?;
    for p in 0..2 {
        let mut in_a_row = 0;
        poll(
            "the rate limiter counting again",
            Duration::from_secs(15),
            async || {
                let r = ctx.expect(p, &probe_org.probe(), 200, None).await?;
                in_a_row = if r.header("X-RateLimit-Remaining").is_some() {
                    in_a_row + 1
                } else {
                    0
                };
                Ok((in_a_row >= 8).then_some(()))
            },
        )
        .await?;
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

// ---------------------------------------------------------------------------------------------
// SEC-5: permission bitmap

async fn sec_5_permission_bitmap(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    let (org, agent) = (t.org.as_str(), t.agent.as_str());
    let none = ctx.token(org, 0).await?;
    let chat_only = ctx.token(org, CHAT).await?;
    let manage_only = ctx.token(org, TOKENS_MANAGE | AGENTS_MANAGE).await?;
    let all = ctx.token(org, ALL).await?;
    let models = |tok: &str| Request::get("/v1/models").auth(tok, agent);
    let rows = [
        row(
            "SEC-5.1 no bits on the probe",
            Request::get(PROBE).auth(&none.pat, agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row(
            "SEC-5.1 no bits on chat",
            chat(&none.pat, agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row(
            "SEC-5.2 read on chat",
            chat(&t.token.pat, agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row(
            "SEC-5.2 chat on the probe",
            Request::get(PROBE).auth(&chat_only.pat, agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row(
            "SEC-5.2 chat on models",
            models(&chat_only.pat),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row(
            "manage bits grant no read",
            Request::get(PROBE).auth(&manage_only.pat, agent),
            403,
            Some("INSUFFICIENT_PERMISSIONS"),
        ),
        row("read on the probe", t.probe(), 200, None),
        row(
            "read on models: past auth (no provider)",
            models(&t.token.pat),
            501,
            Some("PROVIDER_NOT_CONFIGURED"),
        ),
        row(
            "chat on chat: past auth (no provider)",
            chat(&chat_only.pat, agent),
            501,
            Some("PROVIDER_NOT_CONFIGURED"),
        ),
        row(
            "SEC-5.3 all bits on the probe",
            Request::get(PROBE).auth(&all.pat, agent),
            200,
            None,
        ),
        row(
            "SEC-5.3 all bits on chat",
            chat(&all.pat, agent),
            501,
            Some("PROVIDER_NOT_CONFIGURED"),
        ),
    ];
    run_rows(&ctx, &rows).await?;
    // Unknown bits are refused when the token is made.
    ensure!(
        ctx.token(org, 16).await.is_err(),
        "authd issued a token with an unknown permission bit"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP boundary: smuggling, sizes, slow clients

const RAW_WITHIN: Duration = Duration::from_secs(10);

async fn raw(ctx: &Ctx, p: usize, what: &str, bytes: Vec<u8>) -> Result<RawOutcome> {
    let out = raw_exchange(
        ctx.env.addr(p),
        ctx.ip,
        vec![bytes],
        Duration::ZERO,
        RAW_WITHIN,
        Duration::from_secs(3),
    )
    .await
    .with_context(|| what.to_owned())?;
    if let Some(r) = &out.resp {
        ctx.record_raw(what, r);
    }
    Ok(out)
}

async fn request_smuggling_is_refused_and_the_connection_closed(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(ALL).await?;
    let auth = format!(
        "Authorization: Bearer {}\r\nX-IBEX-Agent-ID: {}\r\n",
        t.token.pat, t.agent
    );
    let smuggled = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let post = |headers: &str, body: &str| {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}{headers}\r\n{body}")
    };
    let rows: Vec<(&str, String)> = vec![
        ("CL + TE", post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE + CL", post("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("two different Content-Length", post("Content-Length: 5\r\nContent-Length: 40\r\n", &format!("hello{smuggled}"))),
        ("two equal Content-Length", post("Content-Length: 5\r\nContent-Length: 5\r\n", &format!("hello{smuggled}"))),
        ("Content-Length list", post("Content-Length: 5, 5\r\n", &format!("hello{smuggled}"))),
        ("signed Content-Length", post("Content-Length: +5\r\n", &format!("hello{smuggled}"))),
        ("TE other than chunked", post("Transfer-Encoding: xchunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE chunked twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("space before the colon", post("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", &format!("hello{smuggled}"))),
        (
            "TE on HTTP/1.0",
            format!("POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        ("two Host headers", format!("GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n{smuggled}")),
        ("bad chunk size", post("Transfer-Encoding: chunked\r\n", &format!("zz\r\nhello\r\n0\r\n\r\n{smuggled}"))),
    ];
    for p in 0..2 {
        for (what, bytes) in &rows {
            let out = raw(&ctx, p, what, bytes.clone().into_bytes()).await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            check(&resp, 400, Some("BAD_REQUEST"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.extra.is_empty(),
                "{what} (proxy {p}): more followed the 400 — the smuggled request was served: {:?}",
                String::from_utf8_lossy(&out.extra)
            );
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 400"
            );
        }
        // Still serving, and a well-framed keep-alive pair is answered twice.
        let pair = "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let out = raw(
            &ctx,
            p,
            "a well-framed pipelined pair",
            pair.as_bytes().to_vec(),
        )
        .await?;
        let first = out
            .resp
            .ok_or_else(|| anyhow!("no answer to a valid request"))?;
        check(&first, 200, None)?;
        ensure!(
            String::from_utf8_lossy(&out.extra).starts_with("HTTP/1.1 200"),
            "the second pipelined request got no answer"
        );
    }
    Ok(())
}

async fn oversized_body_is_413_and_the_proxy_keeps_serving(ctx: Ctx) -> Result<()> {
    const SIZE: usize = 20 * 1024 * 1024;
    let t = ctx.tenant(ALL).await?;
    let head = |framing: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             X-IBEX-Agent-ID: {}\r\nContent-Type: application/json\r\n{framing}\r\n",
            t.token.pat, t.agent
        )
        .into_bytes()
    };
    let piece = vec![b'a'; 64 * 1024];
    for p in 0..2 {
        // Declared up front.
        let mut chunks = vec![head(&format!("Content-Length: {SIZE}\r\n"))];
        chunks.extend(std::iter::repeat_n(piece.clone(), SIZE / piece.len()));
        // Streamed in chunks, no length declared.
        let mut chunked = vec![head("Transfer-Encoding: chunked\r\n")];
        for _ in 0..SIZE / piece.len() {
            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
            c.extend_from_slice(&piece);
            c.extend_from_slice(b"\r\n");
            chunked.push(c);
        }
        chunked.push(b"0\r\n\r\n".to_vec());
        for (what, chunks) in [
            ("20 MiB Content-Length body", chunks),
            ("20 MiB chunked body", chunked),
        ] {
            let out = raw_exchange(
                ctx.env.addr(p),
                ctx.ip,
                chunks,
                Duration::ZERO,
                RAW_WITHIN,
                Duration::from_secs(5),
            )
            .await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            ctx.record_raw(what, &resp);
            check(&resp, 413, Some("PAYLOAD_TOO_LARGE"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 413"
            );
            // The proxy keeps serving.
            ctx.expect(p, &Request::get("/health"), 200, None).await?;
            ctx.expect(p, &t.probe(), 200, None).await?;
        }
    }
    Ok(())
}

async fn oversized_headers_are_431(ctx: Ctx) -> Result<()> {
    let big = "a".repeat(64 * 1024);
    let many: String = (0..150).map(|i| format!("X-Many-{i}: v\r\n")).collect();
    let rows = [
        (
            "one 64 KiB header",
            format!("GET /v1/internal/auth-probe HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "150 headers",
            format!("GET /v1/internal/auth-probe HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
        ),
    ];
    for p in 0..2 {
        for (what, bytes) in &rows {
            let out = raw(&ctx, p, what, bytes.clone().into_bytes()).await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            check(&resp, 431, Some("HEADERS_TOO_LARGE"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 431"
            );
        }
        ctx.expect(p, &Request::get("/health"), 200, None).await?;
    }
    Ok(())
}

/// Beyond the matrix: clients that send their headers a few bytes at a time get 408 and are
/// disconnected after the header deadline; meanwhile everyone else is served as usual.
async fn slow_header_clients_are_cut_off_without_blocking_others(ctx: Ctx) -> Result<()> {
    const SLOW_CLIENTS: usize = 10;
    let t = ctx.tenant(READ).await?;
    ctx.warm(&t.probe(), 2).await?;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..SLOW_CLIENTS {
        let addr = ctx.env.addr(i);
        let ip = ctx.env.fresh_ip();
        // A request line, then one header line every 500 ms, never the blank line.
        let mut drip = vec![b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec()];
        drip.extend((0..100).map(|n| format!("X-Drip-{n}: 1\r\n").into_bytes()));
        slow.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let out = raw_exchange(
                addr,
                ip,
                drip,
                Duration::from_millis(500),
                HEADER_TIMEOUT + Duration::from_secs(10),
                Duration::from_secs(3),
            )
            .await?;
            Ok::<_, anyhow::Error>((i % 2, t0.elapsed(), out))
        }));
    }
    // An idle connection that never sends a byte is closed too (silently).
    let idle = tokio::spawn(raw_exchange(
        ctx.env.addr(0),
        ctx.env.fresh_ip(),
        Vec::new(),
        Duration::ZERO,
        HEADER_TIMEOUT + Duration::from_secs(10),
        Duration::ZERO,
    ));
    // Others are served normally while the slow clients hang on.
    let (mut served, mut worst) = (0u32, Duration::ZERO);
    while !slow.iter().all(|h| h.is_finished()) {
        ensure!(
            started.elapsed() < HEADER_TIMEOUT + Duration::from_secs(15),
            "slow clients still connected"
        );
        for p in 0..2 {
            let t0 = Instant::now();
            ctx.expect(p, &Request::get("/health"), 200, None).await?;
            ctx.expect(p, &t.probe(), 200, None).await?;
            worst = worst.max(t0.elapsed());
            served += 2;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut cut = Vec::new();
    for h in slow {
        let (p, took, out) = h.await??;
        let resp = out
            .resp
            .ok_or_else(|| anyhow!("slow client on proxy {p}: closed without a 408"))?;
        ctx.record_raw("slow headers", &resp);
        check(&resp, 408, Some("REQUEST_TIMEOUT"))
            .with_context(|| format!("slow client on proxy {p}"))?;
        ensure!(
            out.closed,
            "slow client on proxy {p}: left connected after the 408"
        );
        ensure!(
            took >= HEADER_TIMEOUT - Duration::from_millis(500),
            "slow client cut off after only {took:?}"
        );
        cut.push(took);
    }
    let idle = idle.await??;
    ensure!(
        idle.resp.is_none() && idle.closed,
        "idle connection: {:?}",
        idle.resp.map(|r| r.dump())
    );
    ensure!(served >= 20, "only {served} requests served meanwhile");
    say!(
        "   slow headers: {SLOW_CLIENTS} clients cut off with 408 after {:.1}–{:.1} s; {served} other \
         requests served meanwhile (slowest pair {:.1} ms)",
        cut.iter().min().map_or(0.0, Duration::as_secs_f64),
        cut.iter().max().map_or(0.0, Duration::as_secs_f64),
        ms(worst)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SEC-6: request ids and the envelope over the whole run

async fn request_id_is_echoed_or_replaced(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    let long_ok = "a".repeat(128);
    let too_long = "a".repeat(129);
    let ids: [(&str, bool); 6] = [
        ("sec-6.3:abc_DEF.1", true),
        (long_ok.as_str(), true),
        (too_long.as_str(), false),
        ("has space", false),
        ("a/b", false),
        ("ünïcode", false),
    ];
    for p in 0..2 {
        for (id, kept) in ids {
            for req in [agent_only(&t.agent), t.probe()] {
                let r = ctx.send(p, &req.header("X-Request-ID", id)).await?;
                let got = r
                    .header("X-Request-ID")
                    .ok_or_else(|| anyhow!("SEC-6.4 no X-Request-ID:\n{}", r.dump()))?;
                if kept {
                    ensure!(got == id, "valid X-Request-ID {id:?} replaced by {got:?}");
                } else {
                    ensure!(
                        got != id && uuid::Uuid::parse_str(got).is_ok(),
                        "invalid X-Request-ID {id:?} answered with {got:?}"
                    );
                }
            }
        }
        // Without one, every response gets its own.
        let a = ctx.send(p, &agent_only(&t.agent)).await?;
        let b = ctx.send(p, &agent_only(&t.agent)).await?;
        ensure!(
            a.header("X-Request-ID").is_some()
                && a.header("X-Request-ID") != b.header("X-Request-ID"),
            "request ids not fresh per response"
        );
    }
    Ok(())
}

/// SEC-6.1–6.5 over every response the suite received.
fn sec_6_envelope_on_every_response(env: &Env) -> Result<()> {
    let exchanges = env.exchanges();
    let secrets = env.secrets();
    let mut problems = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    let mut errors = 0;
    for x in &exchanges {
        let r = &x.resp;
        let text = r.dump();
        let found = leaked(&text, &secrets);
        if !found.is_empty() || text.contains("$argon2") {
            problems.push(format!(
                "[{}] {}: SEC-6.5 a credential in the response:\n{text}",
                x.case, x.what
            ));
        }
        if r.header("x-request-id").is_none() {
            problems.push(format!(
                "[{}] {}: SEC-6.4 no X-Request-ID:\n{text}",
                x.case, x.what
            ));
        }
        if r.status >= 400 {
            errors += 1;
            *codes
                .entry(format!(
                    "{} {}",
                    r.status,
                    r.error_code().unwrap_or_default()
                ))
                .or_default() += 1;
            if let Err(e) = check_envelope(x) {
                problems.push(format!("[{}] {}: {e:#}\n{text}", x.case, x.what));
            }
        }
    }
    say!(
        "   SEC-6: {errors} error responses (of {} in all) checked against {} credentials: {codes:?}",
        exchanges.len(),
        secrets.len()
    );
    ensure!(errors > 0, "no error responses were collected");
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(10).collect();
        bail!(
            "{} responses fail SEC-6:\n{}",
            problems.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// S2: none of the credentials the run created or sent is in any service's log.
async fn logs_contain_no_credential(env: &Env) -> Result<()> {
    let secrets = env.secrets();
    let mut bytes = 0;
    let mut problems = Vec::new();
    for (name, log) in env.logs().await {
        bytes += log.len();
        ensure!(!log.is_empty(), "{name} wrote no log at all");
        for s in leaked(&log, &secrets) {
            let line = log.lines().find(|l| l.contains(s)).unwrap_or_default();
            problems.push(format!(
                "{name}: a credential ({} chars) in: {line}",
                s.len()
            ));
        }
        if log.contains("$argon2") {
            problems.push(format!("{name}: an Argon2 hash in the log"));
        }
    }
    say!(
        "   logs: {} KiB of authd and proxy logs searched for {} credentials",
        bytes / 1024,
        secrets.len()
    );
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}
