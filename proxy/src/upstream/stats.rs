//! Upstream counters for `/metrics`: one [`UpstreamStats`] per worker,
//! written by that worker with relaxed atomics and read by the scrape, which
//! sums them in [`render_prometheus`]. Usage per org and model is a small
//! locked map touched once per metered response; its size is capped, so a
//! flood of distinct model names cannot grow it without bound.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::usage::Usage;

/// Upper bounds (seconds) of the time-to-response-headers histogram.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// (org, model) series kept per worker; later ones count under `model="other"`.
const MAX_USAGE_SERIES: usize = 1000;

#[derive(Debug, Default, Clone, Copy)]
struct UsageTotals {
    responses: u64,
    prompt: u64,
    completion: u64,
    total: u64,
}

pub struct UpstreamStats {
    /// Cumulative counts per bucket are computed at render time; these are
    /// per-bucket (the last slot is +Inf).
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Index: status - 100.
    statuses: Box<[AtomicU64]>,
    unavailable: AtomicU64,
    timeouts: AtomicU64,
    idle: AtomicU64,
    opened: AtomicU64,
    reused: AtomicU64,
    retries: AtomicU64,
    usage: Mutex<HashMap<(uuid::Uuid, Box<str>), UsageTotals>>,
    /// Per provider, by name (SPEC §12). Locked only when a worker builds its providers (start,
    /// reload) and at scrape time; requests touch the [`ProviderCounters`] they were handed.
    providers: Mutex<Vec<(Box<str>, Arc<ProviderCounters>)>>,
}

/// Why an attempt on a provider failed (`ibex_provider_failures_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connection refused or reset, TLS failure, a malformed response head.
    Refused,
    /// No response head within the provider's timeout.
    Timeout,
    /// Answered 429.
    TooMany,
    /// Answered 5xx.
    Server,
}

impl FailureKind {
    const ALL: [FailureKind; 4] = [Self::Refused, Self::Timeout, Self::TooMany, Self::Server];

    fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::TooMany => "429",
            Self::Server => "5xx",
        }
    }
}

/// One provider's counters on one worker: relaxed atomics written by that worker only, summed
/// over the workers at scrape time.
#[derive(Debug, Default)]
pub struct ProviderCounters {
    /// Responses handed to the client (any status), i.e. requests this provider answered.
    answered: AtomicU64,
    /// Failed attempts after which the request went on to another provider.
    fallbacks: AtomicU64,
    /// Failed attempts, by [`FailureKind`] (its index in `FailureKind::ALL`).
    failures: [AtomicU64; 4],
    /// This worker's breaker for the provider: 0 closed, 1 open, 2 half-open.
    breaker: AtomicU64,
}

impl ProviderCounters {
    pub fn answered(&self) {
        self.answered.fetch_add(1, Relaxed);
    }

    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Relaxed);
    }

    pub fn failure(&self, kind: FailureKind) {
        let i = FailureKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.failures[i].fetch_add(1, Relaxed);
    }

    pub fn set_breaker(&self, state: u64) {
        self.breaker.store(state, Relaxed);
    }
}

impl Default for UpstreamStats {
    fn default() -> Self {
        Self {
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
            statuses: (100..600).map(|_| AtomicU64::new(0)).collect(),
            unavailable: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            usage: Mutex::new(HashMap::new()),
            providers: Mutex::new(Vec::new()),
        }
    }
}

impl UpstreamStats {
    pub fn response(&self, status: u16, to_headers: Duration) {
        let secs = to_headers.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.latency[slot].fetch_add(1, Relaxed);
        let us = u64::try_from(to_headers.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Relaxed);
        if let Some(c) = self.statuses.get(usize::from(status).wrapping_sub(100)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn unavailable(&self) {
        self.unavailable.fetch_add(1, Relaxed);
    }

    pub fn timeout(&self) {
        self.timeouts.fetch_add(1, Relaxed);
    }

    pub fn set_idle(&self, n: usize) {
        self.idle.store(n as u64, Relaxed);
    }

    pub fn opened(&self) {
        self.opened.fetch_add(1, Relaxed);
    }

    pub fn reused(&self) {
        self.reused.fetch_add(1, Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Idle pooled connections right now.
    pub fn idle_connections(&self) -> u64 {
        self.idle.load(Relaxed)
    }

    /// Connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// The counters of the provider `name` on this worker, made on first use. Called when the
    /// worker builds its providers, not per request; a provider's counters outlive a reload that
    /// keeps its name (they are cumulative).
    pub fn provider(&self, name: &str) -> Arc<ProviderCounters> {
        let mut list = self
            .providers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = list.iter().find(|(n, _)| &**n == name) {
            return c.clone();
        }
        let c = Arc::new(ProviderCounters::default());
        list.push((name.into(), c.clone()));
        c
    }

    pub fn usage(&self, org: uuid::Uuid, model: &str, usage: Usage) {
        let Ok(mut map) = self.usage.lock() else {
            return;
        };
        let key = (org, Box::<str>::from(model));
        let key = if map.contains_key(&key) || map.len() < MAX_USAGE_SERIES {
            key
        } else {
            (org, Box::<str>::from("other"))
        };
        let t = map.entry(key).or_default();
        t.responses += 1;
        t.prompt += usage.prompt_tokens;
        t.completion += usage.completion_tokens;
        t.total += usage.total_tokens;
    }
}

/// Appends the upstream metrics of every worker (index = worker) to `out`.
pub fn render_prometheus(all: &[Arc<UpstreamStats>], out: &mut String) {
    let sum = |f: &dyn Fn(&UpstreamStats) -> u64| all.iter().map(|s| f(s)).sum::<u64>();

    out.push_str("# HELP ibex_upstream_response_header_seconds Time from forwarding to the upstream's response headers.\n");
    out.push_str("# TYPE ibex_upstream_response_header_seconds histogram\n");
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += sum(&|s| s.latency[i].load(Relaxed));
        let _ = writeln!(
            out,
            "ibex_upstream_response_header_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += sum(&|s| s.latency[BUCKETS.len()].load(Relaxed));
    let _ = writeln!(
        out,
        "ibex_upstream_response_header_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let sum_us = sum(&|s| s.latency_sum_us.load(Relaxed));
    let _ = writeln!(
        out,
        "ibex_upstream_response_header_seconds_sum {}",
        sum_us as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "ibex_upstream_response_header_seconds_count {cumulative}"
    );

    out.push_str("# HELP ibex_upstream_responses_total Upstream responses by status.\n");
    out.push_str("# TYPE ibex_upstream_responses_total counter\n");
    for (i, status) in (100u16..600).enumerate() {
        let n = sum(&|s| s.statuses[i].load(Relaxed));
        if n > 0 {
            let _ = writeln!(
                out,
                "ibex_upstream_responses_total{{status=\"{status}\"}} {n}"
            );
        }
    }

    out.push_str(
        "# HELP ibex_upstream_errors_total Forwarding failures answered by the proxy (502/504).\n",
    );
    out.push_str("# TYPE ibex_upstream_errors_total counter\n");
    let unavailable = sum(&|s| s.unavailable.load(Relaxed));
    let timeouts = sum(&|s| s.timeouts.load(Relaxed));
    let _ = writeln!(
        out,
        "ibex_upstream_errors_total{{kind=\"unavailable\"}} {unavailable}"
    );
    let _ = writeln!(
        out,
        "ibex_upstream_errors_total{{kind=\"timeout\"}} {timeouts}"
    );

    out.push_str(
        "# HELP ibex_upstream_pool_idle_connections Idle keep-alive connections per worker.\n",
    );
    out.push_str("# TYPE ibex_upstream_pool_idle_connections gauge\n");
    for (worker, s) in all.iter().enumerate() {
        let _ = writeln!(
            out,
            "ibex_upstream_pool_idle_connections{{worker=\"{worker}\"}} {}",
            s.idle.load(Relaxed)
        );
    }
    for (name, help, get) in [
        (
            "ibex_upstream_connections_opened_total",
            "Upstream connections opened.",
            &(|s: &UpstreamStats| s.opened.load(Relaxed)) as &dyn Fn(&UpstreamStats) -> u64,
        ),
        (
            "ibex_upstream_connections_reused_total",
            "Requests sent on a pooled connection.",
            &|s: &UpstreamStats| s.reused.load(Relaxed),
        ),
        (
            "ibex_upstream_retries_total",
            "Requests retried on a fresh connection after a pooled one was found closed.",
            &|s: &UpstreamStats| s.retries.load(Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            sum(get)
        );
    }

    render_providers(all, out);

    let mut usage: HashMap<(uuid::Uuid, Box<str>), UsageTotals> = HashMap::new();
    for s in all {
        if let Ok(map) = s.usage.lock() {
            for (k, v) in map.iter() {
                let t = usage.entry(k.clone()).or_default();
                t.responses += v.responses;
                t.prompt += v.prompt;
                t.completion += v.completion;
                t.total += v.total;
            }
        }
    }
    let mut rows: Vec<_> = usage.into_iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    out.push_str("# HELP ibex_upstream_usage_tokens_total Tokens reported by the upstream, per org and model.\n");
    out.push_str("# TYPE ibex_upstream_usage_tokens_total counter\n");
    for ((org, model), t) in &rows {
        let model = escape_label(model);
        for (kind, n) in [
            ("prompt", t.prompt),
            ("completion", t.completion),
            ("total", t.total),
        ] {
            let _ = writeln!(
                out,
                "ibex_upstream_usage_tokens_total{{org=\"{org}\",model=\"{model}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    out.push_str("# HELP ibex_upstream_metered_responses_total Responses that reported usage, per org and model.\n");
    out.push_str("# TYPE ibex_upstream_metered_responses_total counter\n");
    for ((org, model), t) in &rows {
        let _ = writeln!(
            out,
            "ibex_upstream_metered_responses_total{{org=\"{org}\",model=\"{}\"}} {}",
            escape_label(model),
            t.responses
        );
    }
}

/// `ibex_provider_*`: per provider name, summed over the workers (the breaker per worker).
fn render_providers(all: &[Arc<UpstreamStats>], out: &mut String) {
    // (worker, name, counters), in the order the providers were first seen.
    let mut rows: Vec<(usize, Box<str>, Arc<ProviderCounters>)> = Vec::new();
    let mut names: Vec<Box<str>> = Vec::new();
    for (worker, s) in all.iter().enumerate() {
        let list = s
            .providers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, c) in list.iter() {
            if !names.contains(name) {
                names.push(name.clone());
            }
            rows.push((worker, name.clone(), c.clone()));
        }
    }
    let total = |name: &str, f: &dyn Fn(&ProviderCounters) -> u64| -> u64 {
        rows.iter()
            .filter(|(_, n, _)| &**n == name)
            .map(|(_, _, c)| f(c))
            .sum()
    };
    out.push_str("# HELP ibex_provider_requests_total Requests a provider answered (its response went to the client, any status).\n");
    out.push_str("# TYPE ibex_provider_requests_total counter\n");
    for name in &names {
        let _ = writeln!(
            out,
            "ibex_provider_requests_total{{provider=\"{}\"}} {}",
            escape_label(name),
            total(name, &|c| c.answered.load(Relaxed))
        );
    }
    out.push_str("# HELP ibex_provider_fallbacks_total Failed attempts on a provider after which the request went to the next provider.\n");
    out.push_str("# TYPE ibex_provider_fallbacks_total counter\n");
    for name in &names {
        let _ = writeln!(
            out,
            "ibex_provider_fallbacks_total{{provider=\"{}\"}} {}",
            escape_label(name),
            total(name, &|c| c.fallbacks.load(Relaxed))
        );
    }
    out.push_str("# HELP ibex_provider_failures_total Failed attempts on a provider, by kind (refused: connection refused/reset, TLS or a bad response head).\n");
    out.push_str("# TYPE ibex_provider_failures_total counter\n");
    for name in &names {
        for (i, kind) in FailureKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "ibex_provider_failures_total{{provider=\"{}\",kind=\"{}\"}} {}",
                escape_label(name),
                kind.label(),
                total(name, &|c| c.failures[i].load(Relaxed))
            );
        }
    }
    out.push_str("# HELP ibex_provider_breaker_state A provider's circuit breaker per worker: 0 closed, 1 open, 2 half-open.\n");
    out.push_str("# TYPE ibex_provider_breaker_state gauge\n");
    for (worker, name, c) in &rows {
        let _ = writeln!(
            out,
            "ibex_provider_breaker_state{{provider=\"{}\",worker=\"{worker}\"}} {}",
            escape_label(name),
            c.breaker.load(Relaxed)
        );
    }
}

/// Prometheus label escaping: backslash, double quote, newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_workers_and_renders_usage() {
        let a = Arc::new(UpstreamStats::default());
        let b = Arc::new(UpstreamStats::default());
        let org = uuid::Uuid::nil();
        a.response(200, Duration::from_millis(3));
        b.response(200, Duration::from_secs(100));
        b.response(502, Duration::from_millis(1));
        a.usage(
            org,
            "m\"x",
            Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
                ..Default::default()
            },
        );
        b.usage(
            org,
            "m\"x",
            Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
                ..Default::default()
            },
        );
        b.set_idle(4);
        let mut out = String::new();
        render_prometheus(&[a, b], &mut out);
        for line in [
            "ibex_upstream_response_header_seconds_bucket{le=\"0.005\"} 2",
            "ibex_upstream_response_header_seconds_bucket{le=\"60\"} 2",
            "ibex_upstream_response_header_seconds_bucket{le=\"+Inf\"} 3",
            "ibex_upstream_response_header_seconds_count 3",
            "ibex_upstream_responses_total{status=\"200\"} 2",
            "ibex_upstream_responses_total{status=\"502\"} 1",
            "ibex_upstream_pool_idle_connections{worker=\"1\"} 4",
            "ibex_upstream_usage_tokens_total{org=\"00000000-0000-0000-0000-000000000000\",model=\"m\\\"x\",kind=\"total\"} 6",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
    }

    #[test]
    fn provider_counters_are_summed_by_name() {
        let a = Arc::new(UpstreamStats::default());
        let b = Arc::new(UpstreamStats::default());
        let (a1, b1) = (a.provider("oa-1"), b.provider("oa-1"));
        assert!(Arc::ptr_eq(&a1, &a.provider("oa-1")), "one set per name");
        a.provider("ant").answered();
        a1.answered();
        b1.answered();
        a1.fallback();
        a1.failure(FailureKind::Server);
        b1.failure(FailureKind::Server);
        b1.failure(FailureKind::Timeout);
        b1.set_breaker(1);
        let mut out = String::new();
        render_prometheus(&[a, b], &mut out);
        for line in [
            "ibex_provider_requests_total{provider=\"oa-1\"} 2",
            "ibex_provider_requests_total{provider=\"ant\"} 1",
            "ibex_provider_fallbacks_total{provider=\"oa-1\"} 1",
            "ibex_provider_fallbacks_total{provider=\"ant\"} 0",
            "ibex_provider_failures_total{provider=\"oa-1\",kind=\"5xx\"} 2",
            "ibex_provider_failures_total{provider=\"oa-1\",kind=\"timeout\"} 1",
            "ibex_provider_failures_total{provider=\"oa-1\",kind=\"refused\"} 0",
            "ibex_provider_failures_total{provider=\"oa-1\",kind=\"429\"} 0",
            "ibex_provider_breaker_state{provider=\"oa-1\",worker=\"0\"} 0",
            "ibex_provider_breaker_state{provider=\"oa-1\",worker=\"1\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
    }

    #[test]
    fn usage_series_are_capped() {
        let s = UpstreamStats::default();
        let org = uuid::Uuid::nil();
        let u = Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
            total_tokens: 1,
            ..Default::default()
        };
        for i in 0..MAX_USAGE_SERIES + 10 {
            s.usage(org, &format!("model-{i}"), u);
        }
        let map = s.usage.lock().unwrap();
        assert_eq!(map.len(), MAX_USAGE_SERIES + 1);
        assert_eq!(map[&(org, Box::from("other"))].responses, 10);
    }
}
