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
