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

#[path = "security/agents.rs"]
mod agents;
#[path = "security/boundary.rs"]
mod boundary;
mod common;
#[path = "security/envelope.rs"]
mod envelope;
#[path = "security/rate_limits.rs"]
mod rate_limits;
#[path = "security/support.rs"]
mod support;
#[path = "security/tenants.rs"]
mod tenants;
#[path = "security/tokens.rs"]
mod tokens;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agents::*;
use anyhow::{anyhow, bail, Result};
use boundary::*;
use common::*;
use envelope::*;
use rate_limits::*;
use tenants::*;
use tokens::*;
use tokio::sync::Semaphore;

/// Cases of the `Parallel` phase running at once.
const PARALLEL_CASES: usize = 3;
/// No case may take longer than this.
const CASE_TIMEOUT: Duration = Duration::from_secs(45);

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
