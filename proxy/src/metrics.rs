//! Prometheus text rendering of per-worker counters.
