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
//!   and cost, returning what was not used: queued on the worker, the settle
//!   rides on the org's next reservation there (the same script call), or is
//!   flushed within `IBEX_TOKEN_SETTLE_DELAY` ([`settle`]) — one Redis round
//!   trip per request under a token limit, not two. Dropped unsettled (never
//!   forwarded with a meter) it keeps its worst case: the minute expires
//!   with its window, a month keeps the over-count (conservative).
//! - [`TokenHeaders`] — `x-ratelimit-*-tokens` on every response that passed.
//!
//! **Exact, no leases.** The request limiter leases budget per worker when
//! an org is busy; tokens do not: a lease held by one worker is budget
//! another proxy cannot use, and a request's cost is only known at the end,
//! so a per-worker lease either over-admits (the ceiling breaks) or strands
//! tokens (concurrent agents starve). Every reservation (with the settles it
//! carries) is one script call in Redis, which is atomic: however many
//! proxies run, the reservations admitted in a window never exceed its
//! limit. A settle that waits a few ms for a reservation to carry it only
//! keeps its worst case counted that much longer: conservative, the ceiling
//! stays exact.
//!
//! **CPU**: the body is read once, borrowed ([`estimate`]: the same pass gives
//! the router its `model`); a call's keys and arguments are written into one
//! buffer ([`call`]); a reservation id is the worker's random prefix and a
//! counter, not a fresh UUID.
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

pub mod call;
pub mod estimate;
pub mod month;
pub mod script;
pub mod settle;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use call::{CallBuf, KeySet, Rid};
use futures::future::LocalBoxFuture;
use uuid::Uuid;

use crate::auth::Principal;
use crate::clock::Clock;
use crate::ledger::meter::Meter;
use crate::ratelimit::eval::{Frame, Runner, Script};
use month::Month;
use settle::{Settle, Settles};

/// `IBEX_DEFAULT_TPM` and `IBEX_DEFAULT_OUTPUT_RESERVE`.
#[derive(Debug, Clone, Copy)]
pub struct TokenConfig {
    /// Tokens per minute of an org without its own (0 = no limit).
    pub default_tpm: u64,
    /// Output reserved for a request without `max_tokens` (or what
    /// remains, whichever is smaller).
    pub default_output: u64,
    /// `IBEX_TOKEN_SETTLE_DELAY`: longest a settle waits to ride along.
    pub settle_delay: Duration,
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
    /// Script calls sent to Redis (reserve, seed, settle flush; retries too).
    pub calls: AtomicU64,
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

/// One worker's token limiter.
pub struct TokenLimiter {
    runner: Runner,
    config: TokenConfig,
    months: Option<Rc<dyn MonthSource>>,
    prices: Option<Rc<Meter>>,
    clock: Rc<dyn Clock>,
    stats: Arc<TokenStats>,
    reserve: Script,
    seed: Script,
    settles: Rc<Settles>,
    /// This worker's reservation ids: a random prefix and a counter.
    rid_prefix: u64,
    rid_next: Cell<u64>,
}

fn int(f: Option<&Frame>) -> i64 {
    f.and_then(Frame::as_int).unwrap_or(-1)
}

/// An org's or agent's id as key text.
fn hyphenated(id: Uuid) -> [u8; 36] {
    let mut text = [0u8; 36];
    id.hyphenated().encode_lower(&mut text);
    text
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
        let stats = Arc::new(TokenStats::default());
        let settles = Settles::new(Rc::new(runner.clone()), stats.clone(), config.settle_delay);
        Self {
            runner,
            config,
            months,
            prices,
            clock,
            stats,
            reserve: Script::new(script::RESERVE),
            seed: Script::new(script::SEED),
            settles,
            rid_prefix: rand::random(),
            rid_next: Cell::new(0),
        }
    }

    pub fn stats(&self) -> Arc<TokenStats> {
        self.stats.clone()
    }

    /// Sends this worker's pending settles now (the worker is about to exit).
    pub async fn flush_settles(&self) {
        self.settles.clone().flush().await;
    }

    /// The limits that apply to `p`, if any (else no Redis call, no estimate).
    pub fn limits(&self, p: &Principal) -> Option<Limits> {
        Some(Limits::of(p, self.config.default_tpm)).filter(Limits::any)
    }

    /// Checks and reserves the worst case of the chat request `body` for
    /// `p`'s org and agent (see the module's HOOKS).
    pub async fn reserve(&self, p: &Principal, body: &[u8]) -> TokenDecision {
        let Some(limits) = self.limits(p) else {
            return TokenDecision::Skip;
        };
        self.reserve_worst(p, &limits, &estimate::worst_case(body))
            .await
    }

    /// [`TokenLimiter::reserve`] of a body already estimated (the chat
    /// handler's one parse, which also gave the router its model).
    pub async fn reserve_worst(
        &self,
        p: &Principal,
        limits: &Limits,
        worst: &estimate::Worst,
    ) -> TokenDecision {
        self.stats.checks.fetch_add(1, Relaxed);
        let now = self.clock.unix_ms();
        let month = Month::at(now);
        let now_u = u64::try_from(now).unwrap_or(0);
        let minute_end_ms = 60_000 - now_u % 60_000;
        let month_end_ms = u64::try_from(month.end_ms - now).unwrap_or(1).max(1);
        let n = self.rid_next.get();
        self.rid_next.set(n.wrapping_add(1));
        let (org, org_text) = (p.org(), hyphenated(p.org()));
        let keys = KeySet {
            agent: p.agent(),
            minute: now_u / 60_000,
            month: month.number,
            rid: Rid {
                prefix: self.rid_prefix,
                n,
            },
        };
        let (pin, pout) = match (&self.prices, worst.model.as_deref()) {
            (Some(m), Some(model)) if limits.org_usd_micros > 0 => {
                m.micro_usd_per_mtok(model).unwrap_or((0, 0))
            }
            _ => (0, 0),
        };
        let month_ttl = (month.end_ms - now + MONTH_GRACE_MS).max(1);
        // The org's pending settles ride along, applied before the decision.
        let carried = self.settles.take(org);
        let mut call = CallBuf::new(1 + carried.len(), 13 + 3 * carried.len());
        call.keys(&org_text, &keys);
        for s in &carried {
            s.push_keys(&mut call, &org_text);
        }
        for arg in [
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
        ] {
            call.num(arg);
        }
        for s in &carried {
            s.push_args(&mut call);
        }
        let parts = call.parts();
        let (key_refs, arg_refs) = parts.split_at(call.key_count());
        let mut carried = Some(carried);
        // The carried settles were applied by a call that ran (whatever it
        // decided); a call that failed leaves them to be retried.
        let mut ran = |ok: bool| {
            if let Some(batch) = carried.take().filter(|b| !b.is_empty()) {
                if ok {
                    self.settles.applied(batch.len());
                } else {
                    self.settles.retry(org, batch);
                }
            }
        };
        for attempt in 0..2 {
            self.stats.calls.fetch_add(1, Relaxed);
            let frame = match self.runner.eval(&self.reserve, key_refs, arg_refs).await {
                Ok(Frame::Array(Some(items))) => {
                    ran(true);
                    items
                }
                Ok(_) => {
                    ran(false);
                    return self.fail_open("unexpected reply");
                }
                Err(why) => {
                    ran(false);
                    return self.fail_open(why);
                }
            };
            match int(frame.first()) {
                // A retried call carries the same settles again: no-ops now.
                -1 if attempt == 0 => {
                    if !self
                        .seed(p, &month, &org_text, &keys, limits, month_ttl)
                        .await
                    {
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
                    let mask = u8::try_from(int(frame.get(7))).unwrap_or(0);
                    let reservation = Reservation {
                        held: Some(Held {
                            settles: self.settles.clone(),
                            org,
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
        org_text: &[u8],
        keys: &KeySet,
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
        let mut call = CallBuf::new(1, 4);
        call.keys(org_text, keys);
        for (on, v) in [
            (limits.org_month > 0, usage.org_tokens),
            (limits.agent_month > 0, usage.agent_tokens),
            (limits.org_usd_micros > 0, usage.org_usd_micros),
        ] {
            if on {
                call.num(v);
            } else {
                call.int(-1);
            }
        }
        call.int(ttl_ms);
        let parts = call.parts();
        // The month keys (3–5 of the six), then the four arguments.
        let (key_refs, arg_refs) = (&parts[2..5], &parts[6..]);
        tracing::info!(org = %p.org(), month = month.number, "token month re-seeded from the ledger");
        self.stats.calls.fetch_add(1, Relaxed);
        self.runner
            .eval(&self.seed, key_refs, arg_refs)
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
    settles: Rc<Settles>,
    org: Uuid,
    keys: KeySet,
    mask: u8,
    tokens: u64,
    usd_micros: u64,
}

impl Reservation {
    /// What was reserved (tokens), for tests and logs.
    pub fn tokens(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.tokens)
    }

    /// Settles to `used` tokens and `cost_usd` (recorded figures): queued on
    /// this worker for the org's next reservation to carry, or flushed
    /// within `IBEX_TOKEN_SETTLE_DELAY` ([`settle`]); retried with backoff,
    /// idempotent in Redis.
    pub fn settle(mut self, used: u64, cost_usd: Option<f64>) {
        let Some(held) = self.held.take() else { return };
        let used_usd = cost_usd
            .filter(|c| c.is_finite() && *c > 0.0)
            .map_or(0, |c| (c * 1e6).ceil() as u64);
        let delta = |used: u64, held: u64| {
            i64::try_from(i128::from(used) - i128::from(held)).unwrap_or(i64::MAX)
        };
        held.settles.push(
            held.org,
            Settle {
                keys: held.keys,
                mask: held.mask,
                delta: delta(used, held.tokens),
                delta_usd: delta(used_usd, held.usd_micros),
            },
        );
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
