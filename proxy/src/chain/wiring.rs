//! Builds one worker's chain from the process-wide pieces. Called by the
//! server on each worker thread, inside its monoio runtime, so the per-worker
//! parts (caches, Redis connection, upstream pool, feed task) are created
//! where they will live and never cross threads.

use std::rc::Rc;
use std::sync::Arc;

use secrecy::SecretString;

use super::Chain;
use crate::auth::bridge::{Bridge, BridgeClient};
use crate::auth::{AuthCore, AuthSettings, Authenticator, SystemClock};
use crate::config::Config;
use crate::metrics::{Registry, WorkerMetrics};
use crate::ratelimit::RateLimiter;
use crate::upstream::{Upstream, UpstreamConfig};

pub type WorkerChain = Chain<BridgeClient, RateLimiter>;

/// Everything the workers share; `Send + Sync`, built once in `main`.
pub struct Wiring {
    config: Arc<Config>,
    bridge: Bridge,
    registry: Arc<Registry>,
    meters: Option<crate::ledger::meter::MeterFactory>,
}

impl Wiring {
    pub fn new(config: Config, bridge: Bridge) -> Self {
        let registry = Arc::new(Registry::default());
        registry.register_bridge(bridge.stats());
        Self {
            config: Arc::new(config),
            bridge,
            registry,
            meters: None,
        }
    }

    /// Every worker's upstream records its requests in the usage ledger.
    pub fn with_ledger(mut self, meters: crate::ledger::meter::MeterFactory) -> Self {
        self.registry.register_ledger(meters.ledger.clone());
        self.meters = Some(meters);
        self
    }

    /// The upstream settings, if one is configured.
    pub fn upstream_config(config: &Config) -> Option<UpstreamConfig> {
        let url = config.upstream_url.clone()?;
        Some(UpstreamConfig {
            url,
            api_key: config
                .upstream_api_key
                .clone()
                .unwrap_or_else(|| SecretString::from(String::new())),
            ca_file: config.upstream_ca_file.clone(),
            timeout: config.upstream_timeout,
            idle_timeout: config.upstream_idle_timeout,
        })
    }

    /// One worker's chain. Must run on that worker's thread, in its runtime.
    pub fn build_worker(&self, worker: usize) -> anyhow::Result<WorkerChain> {
        let cfg = &*self.config;
        let metrics = Arc::new(WorkerMetrics::default());
        let settings = AuthSettings::new(cfg.revocation_sla(), cfg.auth_validate_timeout);
        let core = AuthCore::new(Rc::new(SystemClock::new()), settings, metrics.clone());

        // This worker's end of the invalidation feed, applied by a task on
        // this worker so the caches stay single-threaded.
        monoio::spawn(self.bridge.subscribe().run(core.clone()));
        // Access lines are batched per worker, off the request's path.
        super::access_log::batch_this_thread();
        monoio::spawn(super::access_log::flush_periodically());

        let limiter = RateLimiter::new(Rc::new(cfg.rate_limit()));
        let mut upstream = match Self::upstream_config(cfg) {
            Some(u) => Some(Upstream::new(Rc::new(u))?),
            None => None,
        };
        if let (Some(u), Some(m)) = (upstream.as_mut(), self.meters.as_ref()) {
            u.set_meter(m.meter());
        }
        self.registry.register_worker(
            metrics,
            Some(limiter.stats()),
            upstream.as_ref().map(Upstream::stats),
        );
        tracing::debug!(worker, "worker chain built");
        Ok(Chain::new(
            Authenticator::new(core, self.bridge.client()),
            limiter,
            upstream,
            self.registry.clone(),
            cfg.default_rpm,
        ))
    }
}
