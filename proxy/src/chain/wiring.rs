//! Builds one worker's chain from the process-wide pieces. Called by the
//! server on each worker thread, inside its monoio runtime, so the per-worker
//! parts (caches, Redis connection, upstream pool, feed task) are created
//! where they will live and never cross threads.

use std::rc::Rc;
use std::sync::Arc;

use secrecy::SecretString;

use super::Chain;
use crate::auth::bridge::{Bridge, BridgeClient};
use crate::auth::{AuthCore, AuthSettings, AuthShared, Authenticator};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::ctx::WorkerCtx;
use crate::metrics::Registry;
use crate::providers::{Kind, ProviderBook, ProviderSpec, Table};
use crate::ratelimit::RateLimiter;
use crate::upstream::request::OperatorHeaders;
use crate::upstream::router::{Router, RouterSettings};

pub type WorkerChain = Chain<BridgeClient, RateLimiter>;

/// Everything the workers share; `Send + Sync`, built once in `main`.
pub struct Wiring {
    config: Arc<Config>,
    bridge: Bridge,
    registry: Arc<Registry>,
    auth_shared: AuthShared,
    meters: Option<crate::ledger::meter::MeterFactory>,
    providers: Option<Arc<ProviderBook>>,
}

impl Wiring {
    pub fn new(config: Config, bridge: Bridge) -> Self {
        let registry = Arc::new(Registry::default());
        registry.register_bridge(bridge.stats());
        let auth_shared = AuthShared::new(&AuthSettings::new(
            config.revocation_sla(),
            config.auth_validate_timeout,
        ));
        Self {
            config: Arc::new(config),
            bridge,
            registry,
            auth_shared,
            meters: None,
            providers: None,
        }
    }

    /// Every worker's upstream records its requests in the usage ledger.
    pub fn with_ledger(mut self, meters: crate::ledger::meter::MeterFactory) -> Self {
        self.registry.register_ledger(meters.ledger.clone());
        self.meters = Some(meters);
        self
    }

    /// The process's metrics registry (the listeners register their counters).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Worker threads configured.
    pub fn threads(&self) -> u16 {
        self.config.threads
    }

    /// Every worker forwards by these providers and routes (SPEC §12).
    pub fn with_providers(mut self, book: Option<Arc<ProviderBook>>) -> Self {
        self.providers = book;
        self
    }

    /// The providers and routes: `IBEX_PROVIDERS_FILE`, else the one openai provider of
    /// `IBEX_UPSTREAM_URL` serving every model, else none.
    pub fn provider_table(config: &Config) -> anyhow::Result<Option<Table>> {
        if let Some(path) = &config.providers_file {
            return Table::load(path, config.upstream_timeout).map(Some);
        }
        let Some(url) = config.upstream_url.clone() else {
            return Ok(None);
        };
        Ok(Some(Table::legacy(ProviderSpec {
            name: "default".to_owned(),
            kind: Kind::Openai,
            base_url: url,
            api_key: config
                .upstream_api_key
                .clone()
                .unwrap_or_else(|| SecretString::from(String::new())),
            timeout: config.upstream_timeout,
            retries: 0,
            operator: OperatorHeaders {
                organization: config.upstream_organization.clone(),
                project: config.upstream_project.clone(),
            },
        })))
    }

    /// What every worker's router shares beside the table.
    pub fn router_settings(config: &Config) -> RouterSettings {
        RouterSettings {
            ca_file: config.upstream_ca_file.clone(),
            idle_timeout: config.upstream_idle_timeout,
        }
    }

    /// One worker's chain. Must run on that worker's thread, in its runtime.
    pub fn build_worker(&self, worker: usize) -> anyhow::Result<WorkerChain> {
        let cfg = &*self.config;
        // The worker's clock and counters, shared by every part below.
        let ctx = WorkerCtx::new(worker, Rc::new(SystemClock::new()));
        let settings = AuthSettings::new(cfg.revocation_sla(), cfg.auth_validate_timeout);
        // The failure budget and the verified set are the proxy's, not the worker's.
        let core = AuthCore::with_shared(&ctx, settings, self.auth_shared.clone());

        // This worker's end of the invalidation feed, applied by a task on
        // this worker so the caches stay single-threaded.
        monoio::spawn(self.bridge.subscribe().run(core.clone()));
        // Access lines are batched per worker, off the request's path.
        super::access_log::batch_this_thread();
        monoio::spawn(super::access_log::flush_periodically());

        let limiter = RateLimiter::new(Rc::new(cfg.rate_limit()), ctx.clock.clone());
        let meter = self.meters.as_ref().map(|m| m.meter());
        let upstream = match &self.providers {
            Some(book) => Some(Router::new(
                book.clone(),
                Self::router_settings(cfg),
                ctx.clock.clone(),
                meter.clone(),
            )?),
            None => None,
        };
        // Token limits share the request limiter's Redis connection; month
        // re-seeds ask authd through the bridge, as a validation miss does.
        let tokens = crate::tokens::TokenLimiter::new(
            limiter.runner(),
            cfg.tokens(),
            Some(Rc::new(self.bridge.client())),
            meter,
            ctx.clock.clone(),
        );
        self.registry.register_tokens(tokens.stats());
        self.registry.register_worker(
            ctx.metrics.clone(),
            Some(limiter.stats()),
            upstream.as_ref().map(Router::stats),
        );
        tracing::debug!(worker, "worker chain built");
        Ok(Chain::new(
            ctx,
            Authenticator::new(core, self.bridge.client()),
            limiter,
            upstream,
            self.registry.clone(),
            cfg.default_rpm,
        )
        .with_tokens(tokens))
    }
}
