//! The `/metrics` scrape: the [`Registry`] of every worker's counters, summed
//! into the Prometheus text exposition, one function per metric family. A
//! scrape may see a count one increment old, never a torn value.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use super::counters::{
    BridgeStats, Histogram, ListenerStats, WorkerMetrics, LATENCY_BOUNDS_US, STATUSES,
};
use crate::ratelimit::RateLimitStats;
use crate::routes::RouteId;
use crate::upstream::{render_prometheus as render_upstream, UpstreamStats};

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
    ledger: Mutex<Option<Arc<crate::ledger::Shared>>>,
    listeners: Mutex<Option<Arc<ListenerStats>>>,
    /// Every worker's token limiter (SPEC §11).
    tokens: Mutex<Vec<Arc<crate::tokens::TokenStats>>>,
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

    pub fn register_ledger(&self, ledger: Arc<crate::ledger::Shared>) {
        if let Ok(mut l) = self.ledger.lock() {
            *l = Some(ledger);
        }
    }

    pub fn register_tokens(&self, stats: Arc<crate::tokens::TokenStats>) {
        if let Ok(mut t) = self.tokens.lock() {
            t.push(stats);
        }
    }

    pub fn register_listeners(&self, stats: Arc<ListenerStats>) {
        if let Ok(mut l) = self.listeners.lock() {
            *l = Some(stats);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let Ok(workers) = self.workers.lock() else {
            return out;
        };
        requests(&mut out, &workers);
        histogram(
            &mut out,
            "ibex_proxy_request_duration_seconds",
            "Time from parsed request to response head.",
            &workers,
            |m| &m.latency,
        );
        auth_counters(&mut out, &workers);
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
        ratelimit(&mut out, &rl);
        breaker_state(&mut out, &rl);
        if let Ok(tokens) = self.tokens.lock() {
            token_counters(&mut out, &tokens);
        }
        let upstream: Vec<Arc<UpstreamStats>> =
            workers.iter().filter_map(|w| w.upstream.clone()).collect();
        if !upstream.is_empty() {
            render_upstream(&upstream, &mut out);
        }
        if let Ok(bridge) = self.bridge.lock() {
            if let Some(b) = bridge.as_ref() {
                bridge_stats(&mut out, b);
            }
        }
        if let Ok(ledger) = self.ledger.lock() {
            if let Some(l) = ledger.as_ref() {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                l.stats.render(now_ms, &mut out);
            }
        }
        if let Ok(listeners) = self.listeners.lock() {
            if let Some(l) = listeners.as_ref() {
                listener_stats(&mut out, l);
            }
        }
        out
    }
}

fn sum(workers: &[Worker], f: impl Fn(&WorkerMetrics) -> u64) -> u64 {
    workers.iter().map(|w| f(&w.metrics)).sum()
}

/// `ibex_proxy_requests_total{route,status}`: only the pairs seen.
fn requests(out: &mut String, workers: &[Worker]) {
    header(
        out,
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
            let n = sum(workers, |m| m.requests[route as usize][si].get());
            if n > 0 {
                let _ = writeln!(
                    out,
                    "ibex_proxy_requests_total{{route=\"{}\",status=\"{label}\"}} {n}",
                    route.template()
                );
            }
        }
    }
}

/// The auth step's caches, authd calls, flood guard, 429s and feed.
fn auth_counters(out: &mut String, workers: &[Worker]) {
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
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", sum(workers, get));
    }
}

/// The rate limiter's checks, refusals, Redis errors and fail-opens.
fn ratelimit(out: &mut String, rl: &[&Arc<RateLimitStats>]) {
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
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", rl.iter().map(|s| get(s)).sum::<u64>());
    }
}

fn token_counters(out: &mut String, stats: &[Arc<crate::tokens::TokenStats>]) {
    use crate::tokens::TokenStats;
    for (name, help, get) in [
        (
            "ibex_proxy_tokens_checks_total",
            "Chat requests checked against a token limit or budget.",
            (|s: &TokenStats| s.checks.load(Relaxed)) as fn(&TokenStats) -> u64,
        ),
        (
            "ibex_proxy_tokens_limited_total",
            "Chat requests refused by a token limit or budget.",
            |s| s.limited.load(Relaxed),
        ),
        (
            "ibex_proxy_tokens_failed_open_total",
            "Chat requests admitted without a token reservation (Redis or a month seed unavailable).",
            |s| s.failed_open.load(Relaxed),
        ),
        (
            "ibex_proxy_tokens_month_seeds_total",
            "Month counters re-seeded from the ledger.",
            |s| s.seeds.load(Relaxed),
        ),
        (
            "ibex_proxy_tokens_settled_total",
            "Token reservations settled to the recorded usage.",
            |s| s.settled.load(Relaxed),
        ),
        (
            "ibex_proxy_tokens_settle_failures_total",
            "Token reservations whose settle failed every retry (left to their window).",
            |s| s.settle_failures.load(Relaxed),
        ),
        (
            "ibex_proxy_tokens_redis_calls_total",
            "Script calls the token limiter sent to Redis (reservations carrying settles, month seeds, settle flushes).",
            |s| s.calls.load(Relaxed),
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", stats.iter().map(|s| get(s)).sum::<u64>());
    }
}

/// `ibex_proxy_redis_breaker_state{worker}`: a gauge per worker.
fn breaker_state(out: &mut String, rl: &[&Arc<RateLimitStats>]) {
    header(
        out,
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
}

/// The authd bridge thread's feed state and queue refusals.
fn bridge_stats(out: &mut String, b: &BridgeStats) {
    header(
        out,
        "ibex_proxy_authd_feed_connected",
        "gauge",
        "1 while at least one invalidation feed stream is open.",
    );
    let _ = writeln!(
        out,
        "ibex_proxy_authd_feed_connected {}",
        u8::from(b.feed_connected.load(Relaxed))
    );
    header(
        out,
        "ibex_proxy_authd_feeds_connected",
        "gauge",
        "Invalidation feed streams open (one per IBEX_AUTHD_GRPC address at most).",
    );
    let _ = writeln!(
        out,
        "ibex_proxy_authd_feeds_connected {}",
        b.feeds_connected.load(Relaxed)
    );
    header(
        out,
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
        out,
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

/// The listeners' counters: TLS handshakes and reloads, the per-address cap.
fn listener_stats(out: &mut String, l: &ListenerStats) {
    for (name, help, value) in [
        (
            "ibex_proxy_tls_handshake_failures_total",
            "TLS handshakes on the public listener that failed or timed out.",
            &l.tls_handshake_failures,
        ),
        (
            "ibex_proxy_tls_reloads_total",
            "SIGHUP reloads of the TLS certificate and key that succeeded.",
            &l.tls_reloads,
        ),
        (
            "ibex_proxy_tls_reload_failures_total",
            "SIGHUP reloads refused (the previous certificate stays in use).",
            &l.tls_reload_failures,
        ),
        (
            "ibex_proxy_conns_per_ip_refused_total",
            "Connections closed at accept by IBEX_MAX_CONNS_PER_IP.",
            &l.per_ip_refused,
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", value.load(Relaxed));
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
}
