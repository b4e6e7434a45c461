//! What one worker's parts share: built once per worker by
//! [`crate::chain::wiring`] and handed to the chain and the auth core (the
//! limiter and upstream take its clock), so every part reads the same
//! injected time and writes the same per-worker counters.
//!
//! Not here: anything shared between workers (the metrics registry, the
//! authd bridge), which the wiring holds.

use std::rc::Rc;
use std::sync::Arc;

use crate::clock::Clock;
use crate::metrics::WorkerMetrics;

/// One worker's clock and counters; cheap to clone (two reference counts).
#[derive(Clone)]
pub struct WorkerCtx {
    /// The worker's index, for logs.
    pub worker: usize,
    pub clock: Rc<dyn Clock>,
    /// Written only by this worker; read by the scrape.
    pub metrics: Arc<WorkerMetrics>,
}

impl WorkerCtx {
    pub fn new(worker: usize, clock: Rc<dyn Clock>) -> Self {
        Self {
            worker,
            clock,
            metrics: Arc::new(WorkerMetrics::default()),
        }
    }
}
