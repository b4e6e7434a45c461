//! The ledger's counters and their Prometheus text (SPEC §10, issue 13 metrics): records
//! spooled and shipped, spool bytes, age of the oldest unshipped record, torn stretches skipped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The oldest unshipped record waits this long before a warning (logged once a minute).
pub const WARN_AGE_MS: u64 = 60_000;

#[derive(Debug, Default)]
pub struct Stats {
    /// Records written (and fsynced) to the spool.
    pub spooled: AtomicU64,
    /// Records authd answered for as committed (stored or already there).
    pub shipped: AtomicU64,
    /// Stretches of a segment that held no valid frame (torn tail, corruption), skipped.
    pub torn_skipped: AtomicU64,
    /// `started_at` (unix ms) of the oldest record read but not yet acknowledged; 0 = none.
    pub oldest_unshipped_ms: AtomicU64,
    /// Bytes on disk plus bytes buffered in workers.
    pub spool_bytes: AtomicU64,
    /// Shipping attempts that failed (authd or Postgres unavailable).
    pub ship_errors: AtomicU64,
    /// Requests refused because the spool was full.
    pub refused: AtomicU64,
}

impl Stats {
    /// Seconds the oldest unshipped record has waited at `now_ms` (0 when none waits).
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        match self.oldest_unshipped_ms.load(Ordering::Relaxed) {
            0 => 0,
            at => now_ms.saturating_sub(at),
        }
    }

    /// Appends the Prometheus text exposition of the counters.
    pub fn render(&self, now_ms: u64, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 7] = [
            (
                "ibex_usage_records_spooled_total",
                "counter",
                "Usage records written to the spool.",
                get(&self.spooled),
            ),
            (
                "ibex_usage_records_shipped_total",
                "counter",
                "Usage records authd committed.",
                get(&self.shipped),
            ),
            (
                "ibex_usage_torn_skipped_total",
                "counter",
                "Torn or corrupted spool stretches skipped.",
                get(&self.torn_skipped),
            ),
            (
                "ibex_usage_ship_errors_total",
                "counter",
                "Failed RecordUsage attempts.",
                get(&self.ship_errors),
            ),
            (
                "ibex_usage_refused_total",
                "counter",
                "Requests refused 503 USAGE_UNAVAILABLE (spool full).",
                get(&self.refused),
            ),
            (
                "ibex_usage_spool_bytes",
                "gauge",
                "Bytes in the usage spool (disk and buffers).",
                get(&self.spool_bytes),
            ),
            (
                "ibex_usage_oldest_unshipped_seconds",
                "gauge",
                "Age of the oldest unshipped usage record.",
                self.oldest_age_ms(now_ms) / 1000,
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_once() {
        let stats = Stats::default();
        stats.spooled.store(5, Ordering::Relaxed);
        stats.oldest_unshipped_ms.store(1_000, Ordering::Relaxed);
        let mut out = String::new();
        stats.render(62_000, &mut out);
        assert!(
            out.contains("\nibex_usage_records_spooled_total 5\n"),
            "{out}"
        );
        assert!(
            out.contains("\nibex_usage_oldest_unshipped_seconds 61\n"),
            "{out}"
        );
        assert_eq!(out.matches("# TYPE").count(), 7);
        assert_eq!(Stats::default().oldest_age_ms(5), 0);
    }
}
