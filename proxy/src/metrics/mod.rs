//! Per-worker counters and their Prometheus rendering.
//!
//! [`counters`]: what the hot path writes, one block per worker with a single
//! writer. [`render`]: the [`Registry`] that `/metrics` reads every worker's
//! block through, summing them.

mod counters;
mod render;

pub use counters::{
    BridgeStats, Counter, Histogram, ListenerStats, WorkerMetrics, LATENCY_BOUNDS_US,
};
pub use render::Registry;
