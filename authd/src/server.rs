//! Wiring: builds the parts, binds both listeners, runs until told to stop, drains.
//!
//! Used by the `ibex-authd` binary and, in-process, by the integration tests and the bench.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ibex_proto::pb::auth_service_server::AuthServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::authz::AdminKeyDigest;
use crate::cache::VerifiedCache;
use crate::config::AuthdConfig;
use crate::feed::Feed;
use crate::hasher::HashPool;
use crate::service::Service;
use crate::store;
use crate::throttle::FailureThrottle;
use crate::usage::UsageRecorder;
use crate::validator::{Validator, CACHE_ENTRIES};

/// How long in-flight calls may take to finish after a stop request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per gRPC connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

pub struct Settings {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub database: tokio_postgres::Config,
    pub admin: Option<AdminKeyDigest>,
    pub default_rpm: u32,
    /// Concurrent Argon2 verifies (default: the cores).
    pub hash_workers: usize,
}

impl Settings {
    pub fn from_config(config: &AuthdConfig) -> anyhow::Result<Settings> {
        let database: tokio_postgres::Config = config
            .database_url
            .parse()
            .context("IBEX_DATABASE_URL is not a valid Postgres DSN")?;
        anyhow::ensure!(config.default_rpm > 0, "IBEX_DEFAULT_RPM must be > 0");
        Ok(Settings {
            grpc_listen: config.grpc_listen,
            http_listen: config.http_listen,
            database,
            admin: config.admin_key.as_ref().and_then(AdminKeyDigest::new),
            default_rpm: config.default_rpm,
            hash_workers: std::thread::available_parallelism().map_or(1, usize::from),
        })
    }
}

/// A started authd; [`Running::stop`] drains it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub validator: Arc<Validator>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let pool = store::pool(settings.database.clone())?;
    let workers = settings.hash_workers;
    let hasher = tokio::task::spawn_blocking(move || HashPool::new(workers)).await??;
    let cache = Arc::new(VerifiedCache::new(CACHE_ENTRIES));
    let feed = Feed::new();
    let usage = UsageRecorder::new();
    let validator = Arc::new(Validator {
        pool: pool.clone(),
        hasher,
        cache: Arc::clone(&cache),
        throttle: FailureThrottle::new(),
        feed: Arc::clone(&feed),
        usage: usage.clone(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);

    let grpc_listener = TcpListener::bind(settings.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", settings.grpc_listen))?;
    let http_listener = TcpListener::bind(settings.http_listen)
        .await
        .with_context(|| format!("binding HTTP on {}", settings.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let background = vec![
        tokio::spawn(Arc::clone(&feed).run(
            settings.database.clone(),
            Arc::clone(&cache),
            shutdown_rx.clone(),
        )),
        tokio::spawn(usage.run(pool.clone(), shutdown_rx.clone())),
        tokio::spawn(crate::http::serve(
            http_listener,
            pool.clone(),
            shutdown_rx.clone(),
        )),
    ];

    warm_up(&pool, &validator.hasher, &feed).await;

    let service = Service {
        validator: Arc::clone(&validator),
        admin: settings.admin,
        default_rpm: settings.default_rpm,
        shutdown: shutdown_rx.clone(),
    };
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let mut stop = shutdown_rx;
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(AuthServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }),
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        validator,
        shutdown,
        grpc,
        background,
    })
}

/// Longest `start` waits for Postgres and the `LISTEN` feed before it returns anyway.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);

/// Opens the pool's first connections, runs each validation query once on them (a fresh
/// backend's first use of the RLS policies and of `token_lookup` costs ~100 ms of catalog
/// loading, measured), verifies one dummy Argon2 hash, and waits for the invalidation feed to
/// listen — so the first validation after the ready line pays for none of it (a fresh stack's
/// first request must fit the proxy's 50 ms budget). Postgres down is not fatal here: authd
/// still starts, and answers UNAVAILABLE until it is back (proxies fail closed).
async fn warm_up(pool: &deadpool_postgres::Pool, hasher: &HashPool, feed: &Feed) {
    let ready = tokio::time::timeout(WARM_UP_LIMIT, async {
        let nil = uuid::Uuid::nil();
        let touch = || async {
            // Unknown ids: nothing is found, every statement is prepared and planned.
            let _ = store::lookup_token(pool, nil).await;
            let _ = store::load_token(pool, nil, nil).await;
            let _ = store::agent_status(pool, nil, nil).await;
        };
        // Two at once, so two connections are warm (one request validates token and agent).
        tokio::join!(touch(), touch());
        if let Ok(admission) = hasher.admit() {
            let _ = admission
                .verify(secrecy::SecretString::from("ibex-warm-up".to_owned()), None)
                .await;
        }
        while !feed.is_healthy() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if ready.is_err() {
        tracing::warn!(
            waited_ms = WARM_UP_LIMIT.as_millis() as u64,
            "Postgres or the invalidation feed not ready at start; serving anyway"
        );
    }
}

impl Running {
    /// Stops accepting, ends subscriber streams, lets in-flight calls finish (up to
    /// [`DRAIN_DEADLINE`]), flushes bookkeeping.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            let grpc = self.grpc.await;
            for task in self.background {
                let _ = task.await;
            }
            grpc
        })
        .await;
        match drained {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(err))) => Err(err.into()),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => anyhow::bail!("drain deadline passed; stopping anyway"),
        }
    }

    /// Signals stop without waiting (for Drop-style teardown in tests).
    pub fn signal_stop(&self) {
        let _ = self.shutdown.send(true);
    }
}
