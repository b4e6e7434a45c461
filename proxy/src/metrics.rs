//! Prometheus text rendering of per-worker counters.
//!
//! Each worker owns one [`WorkerMetrics`] and is its only writer: counters are
//! relaxed atomics bumped with a plain load + store (no locked instruction, no
//! cross-core traffic on the hot path). `/metrics` reads every worker's block
//! through the [`Registry`] and sums them; a scrape may see a count one
//! increment old, never a torn value.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::ratelimit::RateLimitStats;
use crate::routes::RouteId;
use crate::upstream::{render_prometheus as render_upstream, UpstreamStats};

/// A single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 5_000_000, 30_000_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// One per bound, plus +Inf.
    buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    sum_us: Counter,
}

impl Histogram {
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].inc();
        self.sum_us.add(us);
    }
}

/// Statuses the proxy itself answers; anything else an upstream sends is
/// counted as `other`.
const STATUSES: [u16; 18] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 422, 429, 431, 500, 501, 502, 503, 504,
];
const N_STATUS: usize = STATUSES.len() + 1;

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len())
}

#[derive(Debug, Default)]
pub struct WorkerMetrics {
    requests: [[Counter; N_STATUS]; RouteId::COUNT],
    pub latency: Histogram,
    pub token_cache_hits: Counter,
    pub token_cache_misses: Counter,
    pub token_negative_hits: Counter,
    pub agent_cache_hits: Counter,
    pub agent_cache_misses: Counter,
    pub authd_token_calls: Counter,
    pub authd_agent_calls: Counter,
    pub authd_errors: Counter,
    pub authd_latency: Histogram,
    pub flood_guard_refusals: Counter,
    pub rate_limited: Counter,
    pub feed_events: Counter,
    pub feed_resets: Counter,
}

impl WorkerMetrics {
    #[inline]
    pub fn request(&self, route: RouteId, status: u16, latency_us: u64) {
        self.requests[route as usize][status_index(status)].inc();
        self.latency.observe_us(latency_us);
    }
}

/// Facts the authd bridge thread publishes (it is their only writer).
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub feed_connected: AtomicBool,
    pub feed_reconnects: AtomicU64,
    pub queue_full: AtomicU64,
}

struct Worker {
    metrics: Arc<WorkerMetrics>,
    ratelimit: Option<Arc<RateLimitStats>>,
    upstream: Option<Arc<UpstreamStats>>,
}

/// Every worker's counters, for the scrape. Locked only to register a worker
/// and to render.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<Vec<Worker>>,
    bridge: Mutex<Option<Arc<BridgeStats>>>,
}

impl Registry {
    pub fn register_worker(
        &self,
        metrics: Arc<WorkerMetrics>,
        ratelimit: Option<Arc<RateLimitStats>>,
        upstream: Option<Arc<UpstreamStats>>,
    ) {
        if let Ok(mut w) = self.workers.lock() {
            w.push(Worker {
                metrics,
                ratelimit,
                upstream,
            });
        }
    }

    pub fn register_bridge(&self, stats: Arc<BridgeStats>) {
        if let Ok(mut b) = self.bridge.lock() {
            *b = Some(stats);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let Ok(workers) = self.workers.lock() else {
            return out;
        };
        let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| -> u64 {
            workers.iter().map(|w| f(&w.metrics)).sum()
        };

        header(
            &mut out,
            "ibex_proxy_requests_total",
            "counter",
            "Requests answered, by route template and status.",
        );
        for route in RouteId::ALL {
            for (si, label) in STATUSES
                .iter()
                .map(|s| s.to_string())
                .chain(["other".to_string()])
                .enumerate()
            {
                let n = sum(&|m| m.requests[route as usize][si].get());
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "ibex_proxy_requests_total{{route=\"{}\",status=\"{label}\"}} {n}",
                        route.template()
                    );
                }
            }
        }
        histogram(
            &mut out,
            "ibex_proxy_request_duration_seconds",
            "Time from parsed request to response head.",
            &workers,
            |m| &m.latency,
        );

        for (name, help, get) in [
            (
                "ibex_proxy_token_cache_hits_total",
                "Token cache hits (valid, trusted entries).",
                (|m: &WorkerMetrics| m.token_cache_hits.get()) as fn(&WorkerMetrics) -> u64,
            ),
            (
                "ibex_proxy_token_cache_misses_total",
                "Token lookups that needed authd.",
                |m| m.token_cache_misses.get(),
            ),
            (
                "ibex_proxy_token_negative_hits_total",
                "Refused tokens answered from the negative cache.",
                |m| m.token_negative_hits.get(),
            ),
            (
                "ibex_proxy_agent_cache_hits_total",
                "Agent cache hits.",
                |m| m.agent_cache_hits.get(),
            ),
            (
                "ibex_proxy_agent_cache_misses_total",
                "Agent lookups that needed authd.",
                |m| m.agent_cache_misses.get(),
            ),
            (
                "ibex_proxy_authd_token_calls_total",
                "ValidateToken calls made.",
                |m| m.authd_token_calls.get(),
            ),
            (
                "ibex_proxy_authd_agent_calls_total",
                "ValidateAgent calls made.",
                |m| m.authd_agent_calls.get(),
            ),
            (
                "ibex_proxy_authd_errors_total",
                "authd calls that failed or timed out (answered 503).",
                |m| m.authd_errors.get(),
            ),
            (
                "ibex_proxy_auth_flood_refusals_total",
                "Requests refused by the per-address authentication-failure guard.",
                |m| m.flood_guard_refusals.get(),
            ),
            (
                "ibex_proxy_rate_limited_total",
                "Requests refused with 429 by the org rate limiter.",
                |m| m.rate_limited.get(),
            ),
            (
                "ibex_proxy_invalidation_events_total",
                "Invalidation feed events applied (summed over workers).",
                |m| m.feed_events.get(),
            ),
            (
                "ibex_proxy_invalidation_resets_total",
                "Cache trust resets (feed reconnects or overflow), summed over workers.",
                |m| m.feed_resets.get(),
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", sum(&get));
        }
        histogram(
            &mut out,
            "ibex_proxy_authd_call_duration_seconds",
            "authd validation round trip, as a worker sees it.",
            &workers,
            |m| &m.authd_latency,
        );

        let rl: Vec<&Arc<RateLimitStats>> = workers
            .iter()
            .filter_map(|w| w.ratelimit.as_ref())
            .collect();
        for (name, help, get) in [
            (
                "ibex_proxy_ratelimit_checks_total",
                "Rate-limit checks made.",
                (|s: &RateLimitStats| s.checks.load(Relaxed)) as fn(&RateLimitStats) -> u64,
            ),
            (
                "ibex_proxy_ratelimit_limited_total",
                "Rate-limit checks that refused.",
                |s| s.limited.load(Relaxed),
            ),
            (
                "ibex_proxy_redis_errors_total",
                "Redis errors seen by the rate limiter.",
                |s| s.redis_errors.load(Relaxed),
            ),
            (
                "ibex_proxy_ratelimit_failed_open_total",
                "Requests admitted without counting because Redis was unavailable.",
                |s| s.failed_open.load(Relaxed),
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", rl.iter().map(|s| get(s)).sum::<u64>());
        }
        header(
            &mut out,
            "ibex_proxy_redis_breaker_state",
            "gauge",
            "Redis circuit breaker per worker: 0 closed, 1 open, 2 half-open.",
        );
        for (i, s) in rl.iter().enumerate() {
            let _ = writeln!(
                out,
                "ibex_proxy_redis_breaker_state{{worker=\"{i}\"}} {}",
                s.breaker_state.load(Relaxed)
            );
        }

        let upstream: Vec<Arc<UpstreamStats>> =
            workers.iter().filter_map(|w| w.upstream.clone()).collect();
        if !upstream.is_empty() {
            render_upstream(&upstream, &mut out);
        }

        if let Ok(bridge) = self.bridge.lock() {
            if let Some(b) = bridge.as_ref() {
                header(
                    &mut out,
                    "ibex_proxy_authd_feed_connected",
                    "gauge",
                    "1 while the invalidation feed stream is open.",
                );
                let _ = writeln!(
                    out,
                    "ibex_proxy_authd_feed_connected {}",
                    u8::from(b.feed_connected.load(Relaxed))
                );
                header(
                    &mut out,
                    "ibex_proxy_authd_feed_reconnects_total",
                    "counter",
                    "Invalidation feed (re)connection attempts.",
                );
                let _ = writeln!(
                    out,
                    "ibex_proxy_authd_feed_reconnects_total {}",
                    b.feed_reconnects.load(Relaxed)
                );
                header(
                    &mut out,
                    "ibex_proxy_authd_queue_full_total",
                    "counter",
                    "Validations refused because the bridge queue was full.",
                );
                let _ = writeln!(
                    out,
                    "ibex_proxy_authd_queue_full_total {}",
                    b.queue_full.load(Relaxed)
                );
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    workers: &[Worker],
    get: impl Fn(&WorkerMetrics) -> &Histogram,
) {
    header(out, name, "histogram", help);
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
        cumulative += workers
            .iter()
            .map(|w| get(&w.metrics).buckets[i].get())
            .sum::<u64>();
        let le = *bound as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    cumulative += workers
        .iter()
        .map(|w| get(&w.metrics).buckets[LATENCY_BOUNDS_US.len()].get())
        .sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum_us: u64 = workers.iter().map(|w| get(&w.metrics).sum_us.get()).sum();
    let _ = writeln!(out, "{name}_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_over_workers() {
        let reg = Registry::default();
        let a = Arc::new(WorkerMetrics::default());
        let b = Arc::new(WorkerMetrics::default());
        reg.register_worker(a.clone(), Some(Arc::new(RateLimitStats::default())), None);
        reg.register_worker(b.clone(), None, None);
        a.request(RouteId::InternalProbe, 200, 40);
        b.request(RouteId::InternalProbe, 200, 4_000);
        b.request(RouteId::Unmatched, 401, 10);
        a.token_cache_hits.add(3);
        b.token_cache_hits.add(4);
        let text = reg.render();
        assert!(text.contains(
            "ibex_proxy_requests_total{route=\"/v1/internal/auth-probe\",status=\"200\"} 2"
        ));
        assert!(text.contains("ibex_proxy_requests_total{route=\"unmatched\",status=\"401\"} 1"));
        assert!(text.contains("ibex_proxy_token_cache_hits_total 7"));
        assert!(text.contains("ibex_proxy_request_duration_seconds_bucket{le=\"0.00005\"} 2"));
        assert!(text.contains("ibex_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("ibex_proxy_request_duration_seconds_count 3"));
        assert!(text.contains("ibex_proxy_redis_breaker_state{worker=\"0\"} 0"));
    }

    #[test]
    fn unknown_status_is_other() {
        let m = WorkerMetrics::default();
        m.request(RouteId::Chat, 418, 1);
        assert_eq!(m.requests[RouteId::Chat as usize][STATUSES.len()].get(), 1);
    }
}
