//! The counters the hot path writes: one [`WorkerMetrics`] per worker, its
//! only writer, bumped with a relaxed load + store (no locked instruction,
//! no cross-core traffic). [`BridgeStats`] is the authd bridge thread's.
//! Read only by [`super::render`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::routes::RouteId;

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
    pub(super) buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    pub(super) sum_us: Counter,
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
pub(super) const STATUSES: [u16; 18] = [
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
    pub(super) requests: [[Counter; N_STATUS]; RouteId::COUNT],
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
    /// Feed streams open (one per listed authd at most).
    pub feeds_connected: AtomicU64,
    pub feed_reconnects: AtomicU64,
    pub queue_full: AtomicU64,
}

/// Facts of the listeners themselves (written by the accept loops, the TLS
/// handshakes and the `SIGHUP` reload; never per request).
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub tls_handshake_failures: AtomicU64,
    pub tls_reloads: AtomicU64,
    pub tls_reload_failures: AtomicU64,
    /// Connections closed at accept by `IBEX_MAX_CONNS_PER_IP`.
    pub per_ip_refused: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_status_is_other() {
        let m = WorkerMetrics::default();
        m.request(RouteId::Chat, 418, 1);
        assert_eq!(m.requests[RouteId::Chat as usize][STATUSES.len()].get(), 1);
    }
}
