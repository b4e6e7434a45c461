//! Token limits and budgets (SPEC §11): a hard ceiling on tokens per minute
//! and per month, shared by every proxy through Redis.
//!
//! HOOKS (the whole surface the rest of the proxy uses):
//! - [`TokenLimiter::reserve`] — in the chat handler, after the usage spool
//!   admitted the request and before the upstream is called: the request's
//!   worst case ([`estimate`]) is checked against, and reserved in, every
//!   level that applies (org minute, agent minute, org month, agent month,
//!   org month in USD) by one Lua script in one round trip ([`script`]).
//!   Refused → 429 `RATE_LIMITED` naming tokens, `Retry-After`; no upstream call.
//! - [`Reservation`] — handed to the request's ledger record
//!   ([`crate::ledger::meter::Pending`]); when the record is made (the one
//!   point where the usage is final) it is settled to the recorded tokens
//!   and cost, returning what was not used. Dropped unsettled (never
//!   forwarded with a meter) it keeps its worst case: the minute expires
//!   with its window, a month keeps the over-count (conservative).
//! - [`TokenHeaders`] — `x-ratelimit-*-tokens` on every response that passed.
//!
//! **Exact, no leases.** The request limiter leases budget per worker when
//! an org is busy; tokens do not: a lease held by one worker is budget
//! another proxy cannot use, and a request's cost is only known at the end,
//! so a per-worker lease either over-admits (the ceiling breaks) or strands
//! tokens (concurrent agents starve). Every reservation and settle is one
//! script call in Redis, which is atomic: however many proxies run, the
//! reservations admitted in a window never exceed its limit.
//!
//! **Months** live in Redis for speed, the ledger is the truth: a month key
//! missing while its budget applies (Redis restarted, failed over, flushed)
//! is seeded from `usage_records` (`GetMonthUsage` through the bridge
//! thread, as a validation miss) before the decision. Records still in some
//! proxy's spool — not yet in Postgres — are not in the seed: after a Redis
//! loss a tenant can overshoot its month by at most the tokens of requests
//! that ended within the spool's shipping delay before the loss plus the
//! reservations in flight at that moment.
//!
//! **Fail mode**: Redis down or slow (the request limiter's timeout and
//! breaker, shared) → the request is admitted without headers, logged and
//! counted (`failed_open`); the ledger still records it. authd unable to
//! answer a seed → the same (the month stays unseeded, so the next request
//! tries again).

pub mod estimate;
pub mod month;
pub mod script;

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use uuid::Uuid;

use crate::auth::Principal;
use crate::clock::Clock;
use crate::ledger::meter::Meter;
use crate::ratelimit::eval::{Frame, Runner, Script};
use month::Month;

/// `IBEX_DEFAULT_TPM` and `IBEX_DEFAULT_OUTPUT_RESERVE`.
#[derive(Debug, Clone, Copy)]
pub struct TokenConfig {
    /// Tokens per minute of an org without its own (0 = no limit).
    pub default_tpm: u64,
    /// Output reserved for a request without `max_tokens` (or what
    /// remains, whichever is smaller).
    pub default_output: u64,
}

/// Month-to-date figures from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MonthUsage {
    pub org_tokens: u64,
    pub org_usd_micros: u64,
    pub agent_tokens: u64,
}

/// Where a month re-seed reads the ledger (the bridge to authd).
pub trait MonthSource {
    fn month_usage(
        &self,
        org: Uuid,
        agent: Uuid,
        since_ms: i64,
    ) -> LocalBoxFuture<'static, Option<MonthUsage>>;
}

/// `/metrics` counters (one worker's; relaxed atomics).
#[derive(Debug, Default)]
pub struct TokenStats {
    pub checks: AtomicU64,
    pub limited: AtomicU64,
    pub failed_open: AtomicU64,
    pub seeds: AtomicU64,
    pub settled: AtomicU64,
    pub settle_failures: AtomicU64,
}

/// The limits that apply to one request (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub org_tpm: u64,
    pub agent_tpm: u64,
    pub org_month: u64,
    pub agent_month: u64,
    pub org_usd_micros: u64,
}

impl Limits {
    pub fn of(p: &Principal, default_tpm: u64) -> Self {
        let (o, a) = (p.org_limits(), p.agent_limits());
        Self {
            org_tpm: o.tpm.unwrap_or(default_tpm),
            agent_tpm: a.tpm,
            org_month: o.month_tokens,
            agent_month: a.month_tokens,
            org_usd_micros: o.month_usd_micros,
        }
    }

    pub fn any(&self) -> bool {
        self.org_tpm | self.agent_tpm | self.org_month | self.agent_month | self.org_usd_micros != 0
    }
}

/// The figures of the tightest level, for `x-ratelimit-*-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Until the level's window (minute or month) ends.
    pub reset_ms: u64,
}

impl TokenHeaders {
    /// Appends the three headers.
    pub fn push(&self, headers: &mut Vec<(&'static str, crate::http::HeaderValue)>) {
        use crate::http::HeaderValue;
        let num = |n: u64| {
            HeaderValue::Owned(bytes::Bytes::copy_from_slice(
                crate::http::ascii::Decimal::new(n).as_bytes(),
            ))
        };
        headers.push(("x-ratelimit-limit-tokens", num(self.limit)));
        headers.push(("x-ratelimit-remaining-tokens", num(self.remaining)));
        headers.push((
            "x-ratelimit-reset-tokens",
            HeaderValue::Owned(duration_text(self.reset_ms).into()),
        ));
    }
}

/// OpenAI's duration format: `420ms`, `7s`, `6m0s`, `412h3m2s`.
pub fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Which level refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    OrgMinute,
    AgentMinute,
    OrgMonth,
    AgentMonth,
    OrgMonthUsd,
}

impl Level {
    fn from_index(i: i64) -> Option<Self> {
        Some(match i {
            1 => Level::OrgMinute,
            2 => Level::AgentMinute,
            3 => Level::OrgMonth,
            4 => Level::AgentMonth,
            5 => Level::OrgMonthUsd,
            _ => return None,
        })
    }

    fn is_minute(self) -> bool {
        matches!(self, Level::OrgMinute | Level::AgentMinute)
    }

    /// The 429's message (SPEC §11: it names tokens).
    pub fn message(self) -> &'static str {
        match self {
            Level::OrgMinute => "token limit exceeded: the request's worst case (prompt estimate plus max_tokens) does not fit the org's tokens left this minute",
            Level::AgentMinute => "token limit exceeded: the request's worst case (prompt estimate plus max_tokens) does not fit the agent's tokens left this minute",
            Level::OrgMonth => "token budget exceeded: the request's worst case (prompt estimate plus max_tokens) does not fit the org's monthly token budget",
            Level::AgentMonth => "token budget exceeded: the request's worst case (prompt estimate plus max_tokens) does not fit the agent's monthly token budget",
            Level::OrgMonthUsd => "spend budget exceeded: the request's worst-case cost in tokens does not fit the org's monthly USD budget",
        }
    }
}

/// A refusal: the level, its figures, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub level: Level,
    pub headers: TokenHeaders,
    pub retry_after_ms: u64,
}

pub enum TokenDecision {
    /// No token limit applies to this request: no Redis call, no headers.
    Skip,
    Admit(Reservation, Option<TokenHeaders>),
    Refuse(Refusal),
    /// Redis (or a needed seed) could not answer: admitted, not counted.
    FailOpen,
}

/// Longest a reservation waits for its settle (a stream may run long); a
/// crashed proxy's reservation key goes with it.
const RESERVATION_TTL_MS: u64 = 86_400_000;
/// A month key outlives its month by this (clock skew between proxies).
const MONTH_GRACE_MS: i64 = 3_600_000;
/// Settle attempts before the reservation is left to its TTL / the ledger.
const SETTLE_ATTEMPTS: u32 = 5;

/// One worker's token limiter.
pub struct TokenLimiter {
    runner: Runner,
    config: TokenConfig,
    months: Option<Rc<dyn MonthSource>>,
    prices: Option<Rc<Meter>>,
    clock: Rc<dyn Clock>,
    stats: Arc<TokenStats>,
    scripts: Rc<Scripts>,
}

struct Scripts {
    reserve: Script,
    seed: Script,
    settle: Script,
}

fn int(f: Option<&Frame>) -> i64 {
    f.and_then(Frame::as_int).unwrap_or(-1)
}

impl TokenLimiter {
    /// On the worker's thread, sharing `runner`'s connection (the request
    /// limiter's). `months` re-seeds month keys; `prices` prices the USD
    /// budget's reservations (an unpriced model reserves no USD).
    pub fn new(
        runner: Runner,
        config: TokenConfig,
        months: Option<Rc<dyn MonthSource>>,
        prices: Option<Rc<Meter>>,
        clock: Rc<dyn Clock>,
    ) -> Self {
        Self {
            runner,
            config,
            months,
            prices,
            clock,
            stats: Arc::new(TokenStats::default()),
            scripts: Rc::new(Scripts {
                reserve: Script::new(script::RESERVE),
                seed: Script::new(script::SEED),
                settle: Script::new(script::SETTLE),
            }),
        }
    }

    pub fn stats(&self) -> Arc<TokenStats> {
        self.stats.clone()
    }

    /// Checks and reserves the worst case of the chat request `body` for
    /// `p`'s org and agent (see the module's HOOKS).
    pub async fn reserve(&self, p: &Principal, body: &[u8]) -> TokenDecision {
        let limits = Limits::of(p, self.config.default_tpm);
        if !limits.any() {
            return TokenDecision::Skip;
        }
        self.stats.checks.fetch_add(1, Relaxed);
        let worst = estimate::worst_case(body);
        let now = self.clock.unix_ms();
        let month = Month::at(now);
        let now_u = u64::try_from(now).unwrap_or(0);
        let minute = now_u / 60_000;
        let minute_end_ms = 60_000 - now_u % 60_000;
        let month_end_ms = u64::try_from(month.end_ms - now).unwrap_or(1).max(1);
        let (org, agent) = (p.org().hyphenated(), p.agent().hyphenated());
        let keys = [
            format!("ibex:tl:{{{org}}}:m:{minute}"),
            format!("ibex:tl:{{{org}}}:am:{agent}:{minute}"),
            format!("ibex:tl:{{{org}}}:M:{}", month.number),
            format!("ibex:tl:{{{org}}}:aM:{agent}:{}", month.number),
            format!("ibex:tl:{{{org}}}:U:{}", month.number),
            format!("ibex:tl:{{{org}}}:r:{}", Uuid::new_v4().simple()),
        ];
        let (pin, pout) = match (&self.prices, worst.model.as_deref()) {
            (Some(m), Some(model)) if limits.org_usd_micros > 0 => {
                m.micro_usd_per_mtok(model).unwrap_or((0, 0))
            }
            _ => (0, 0),
        };
        let month_ttl = (month.end_ms - now + MONTH_GRACE_MS).max(1);
        let args: Vec<String> = [
            worst.prompt,
            worst.output.unwrap_or(0),
            self.config
                .default_output
                .saturating_mul(worst.choices)
                .max(1),
            crate::ratelimit::window::KEY_TTL_MS,
            u64::try_from(month_ttl).unwrap_or(1),
            limits.org_tpm,
            limits.agent_tpm,
            limits.org_month,
            limits.agent_month,
            limits.org_usd_micros,
            pin,
            pout,
            RESERVATION_TTL_MS,
        ]
        .iter()
        .map(u64::to_string)
        .collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let arg_refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        for attempt in 0..2 {
            let frame = match self
                .runner
                .eval(&self.scripts.reserve, &key_refs, &arg_refs)
                .await
            {
                Ok(Frame::Array(Some(items))) => items,
                Ok(_) => return self.fail_open("unexpected reply"),
                Err(why) => return self.fail_open(why),
            };
            match int(frame.first()) {
                -1 if attempt == 0 => {
                    if !self.seed(p, &month, &keys, &limits, month_ttl).await {
                        return self.fail_open("month budget could not be seeded from the ledger");
                    }
                }
                0 => {
                    let Some(level) = Level::from_index(int(frame.get(1))) else {
                        return self.fail_open("unexpected reply");
                    };
                    let count = u64::try_from(int(frame.get(2))).unwrap_or(0);
                    let limit = u64::try_from(int(frame.get(3))).unwrap_or(0);
                    let reset_ms = if level.is_minute() {
                        minute_end_ms
                    } else {
                        month_end_ms
                    };
                    self.stats.limited.fetch_add(1, Relaxed);
                    return TokenDecision::Refuse(Refusal {
                        level,
                        headers: TokenHeaders {
                            limit,
                            remaining: limit.saturating_sub(count),
                            reset_ms,
                        },
                        retry_after_ms: reset_ms,
                    });
                }
                1 => {
                    let output = u64::try_from(int(frame.get(1))).unwrap_or(0);
                    let usd = u64::try_from(int(frame.get(2))).unwrap_or(0);
                    let headers = Level::from_index(int(frame.get(3))).map(|level| TokenHeaders {
                        limit: u64::try_from(int(frame.get(5))).unwrap_or(0),
                        remaining: u64::try_from(int(frame.get(4))).unwrap_or(0),
                        reset_ms: if level.is_minute() {
                            minute_end_ms
                        } else {
                            month_end_ms
                        },
                    });
                    let mask = u64::try_from(int(frame.get(7))).unwrap_or(0);
                    let reservation = Reservation {
                        held: Some(Held {
                            runner: self.runner.clone(),
                            scripts: self.scripts.clone(),
                            stats: self.stats.clone(),
                            keys,
                            mask,
                            tokens: worst.prompt + output,
                            usd_micros: usd,
                        }),
                    };
                    return TokenDecision::Admit(reservation, headers);
                }
                _ => return self.fail_open("unexpected reply"),
            }
        }
        self.fail_open("month budget could not be seeded")
    }

    /// Seeds the month keys that apply from the ledger (`SET NX`).
    async fn seed(
        &self,
        p: &Principal,
        month: &Month,
        keys: &[String; 6],
        limits: &Limits,
        ttl_ms: i64,
    ) -> bool {
        let Some(source) = &self.months else {
            return false;
        };
        let Some(usage) = source.month_usage(p.org(), p.agent(), month.start_ms).await else {
            return false;
        };
        self.stats.seeds.fetch_add(1, Relaxed);
        let value = |on: bool, v: u64| if on { v.to_string() } else { "-1".to_owned() };
        let args = [
            value(limits.org_month > 0, usage.org_tokens),
            value(limits.agent_month > 0, usage.agent_tokens),
            value(limits.org_usd_micros > 0, usage.org_usd_micros),
            ttl_ms.to_string(),
        ];
        let key_refs = [keys[2].as_bytes(), keys[3].as_bytes(), keys[4].as_bytes()];
        let arg_refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        tracing::info!(org = %p.org(), month = month.number, "token month re-seeded from the ledger");
        self.runner
            .eval(&self.scripts.seed, &key_refs, &arg_refs)
            .await
            .is_ok()
    }

    fn fail_open(&self, why: &'static str) -> TokenDecision {
        self.stats.failed_open.fetch_add(1, Relaxed);
        self.runner.note_fail_open(why);
        TokenDecision::FailOpen
    }
}

/// An admitted request's reservation, settled once to what its ledger
/// record says (see the module's HOOKS).
pub struct Reservation {
    held: Option<Held>,
}

struct Held {
    runner: Runner,
    scripts: Rc<Scripts>,
    stats: Arc<TokenStats>,
    keys: [String; 6],
    mask: u64,
    tokens: u64,
    usd_micros: u64,
}

impl Reservation {
    /// What was reserved (tokens), for tests and logs.
    pub fn tokens(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.tokens)
    }

    /// Settles to `used` tokens and `cost_usd` (recorded figures), in a task
    /// on this worker: retried with backoff, idempotent in Redis.
    pub fn settle(mut self, used: u64, cost_usd: Option<f64>) {
        let Some(held) = self.held.take() else { return };
        let used_usd = cost_usd
            .filter(|c| c.is_finite() && *c > 0.0)
            .map_or(0, |c| (c * 1e6).ceil() as u64);
        monoio::spawn(held.run(used, used_usd));
    }
}

impl Held {
    async fn run(self, used: u64, used_usd: u64) {
        let delta = i128::from(used) - i128::from(self.tokens);
        let delta_usd = i128::from(used_usd) - i128::from(self.usd_micros);
        let args = [
            delta.to_string(),
            delta_usd.to_string(),
            "0".to_owned(),
            self.mask.to_string(),
        ];
        let keys: Vec<&[u8]> = self.keys.iter().map(|k| k.as_bytes()).collect();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=SETTLE_ATTEMPTS {
            match self.runner.eval(&self.scripts.settle, &keys, &args).await {
                Ok(_) => {
                    self.stats.settled.fetch_add(1, Relaxed);
                    return;
                }
                Err(why) if attempt == SETTLE_ATTEMPTS => {
                    self.stats.settle_failures.fetch_add(1, Relaxed);
                    tracing::warn!(
                        reason = why,
                        "token settle failed; the reservation stands until its window ends"
                    );
                }
                Err(_) => {
                    monoio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_openai_format() {
        assert_eq!(duration_text(420), "420ms");
        assert_eq!(duration_text(7_000), "7s");
        assert_eq!(duration_text(6_999), "7s");
        assert_eq!(duration_text(360_000), "6m0s");
        assert_eq!(duration_text(3_600_000 * 412 + 182_000), "412h3m2s");
    }
}
