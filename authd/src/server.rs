//! Wiring: builds the parts, binds both listeners, runs until told to stop, drains.
//!
//! Used by the `ibex-authd` binary and, in-process, by the integration tests and the bench.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use ibex_proto::pb::auth_service_server::AuthServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::authz::{AdminKeyDigest, KeyDigest, Refusals};
use crate::cache::VerifiedCache;
use crate::config::AuthdConfig;
use crate::feed::Feed;
use crate::hasher::HashPool;
use crate::service::{Limits, Service};
use crate::store;
use crate::throttle::FailureThrottle;
use crate::usage::UsageRecorder;
use crate::validator::{Validator, CACHE_ENTRIES};

/// How long in-flight calls may take to finish after a stop request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per gRPC connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Concurrent gRPC connections; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// gRPC over TLS: PEM files (`IBEX_AUTHD_TLS_CERT_FILE`, `IBEX_AUTHD_TLS_KEY_FILE`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Settings {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub database: store::Database,
    pub admin: Option<AdminKeyDigest>,
    pub service_key: KeyDigest,
    pub tls: Option<TlsFiles>,
    pub limits: Limits,
    /// Longest a verified token stays in authd's cache (`IBEX_AUTHD_CACHE_MAX_AGE`).
    pub cache_max_age: Duration,
    pub default_rpm: u32,
    /// Concurrent Argon2 verifies (default: the cores).
    pub hash_workers: usize,
}

impl Settings {
    /// Defaults for in-process use (tests, benches): both listeners on 127.0.0.1:0, no operator
    /// key, plaintext gRPC, default quotas and cache age, one Argon2 worker per core.
    pub fn local(database: store::Database, service_key: KeyDigest) -> Settings {
        Settings {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database,
            admin: None,
            service_key,
            tls: None,
            limits: Limits {
                max_tokens_per_org: 10_000,
                max_agents_per_org: 10_000,
            },
            cache_max_age: Duration::from_secs(600),
            default_rpm: 600,
            hash_workers: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }

    /// Checks every variable and reports all problems at once.
    pub fn from_config(config: &AuthdConfig) -> anyhow::Result<Settings> {
        let mut problems = Vec::new();
        let database = store::Database::from_url(&config.database_url)
            .map_err(|e| problems.push(format!("IBEX_DATABASE_URL: {e:#}")))
            .ok();
        if config.default_rpm == 0 {
            problems.push("IBEX_DEFAULT_RPM must be > 0".to_owned());
        }
        let service_key = match &config.service_key {
            None => {
                problems.push(format!(
                    "IBEX_SERVICE_KEY is required (at least {} characters; the proxies present it)",
                    crate::authz::MIN_KEY_LEN
                ));
                None
            }
            Some(key) => KeyDigest::new("IBEX_SERVICE_KEY", key)
                .map_err(|e| problems.push(e))
                .ok(),
        };
        let admin = match &config.admin_key {
            None => None,
            Some(key) => KeyDigest::new("IBEX_ADMIN_KEY", key)
                .map_err(|e| problems.push(e))
                .ok(),
        };
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                problems.push(
                    "IBEX_AUTHD_TLS_CERT_FILE and IBEX_AUTHD_TLS_KEY_FILE go together".to_owned(),
                );
                None
            }
        };
        if config.cache_max_age.is_zero() {
            problems.push("IBEX_AUTHD_CACHE_MAX_AGE must be > 0".to_owned());
        }
        if config.max_tokens_per_org == 0 || config.max_agents_per_org == 0 {
            problems
                .push("IBEX_MAX_TOKENS_PER_ORG and IBEX_MAX_AGENTS_PER_ORG must be > 0".to_owned());
        }
        let (Some(database), Some(service_key), true) =
            (database, service_key, problems.is_empty())
        else {
            anyhow::bail!("bad configuration: {}", problems.join("; "));
        };
        Ok(Settings {
            grpc_listen: config.grpc_listen,
            http_listen: config.http_listen,
            database,
            admin,
            service_key,
            tls,
            limits: Limits {
                max_tokens_per_org: config.max_tokens_per_org,
                max_agents_per_org: config.max_agents_per_org,
            },
            cache_max_age: config.cache_max_age,
            default_rpm: config.default_rpm,
            hash_workers: std::thread::available_parallelism().map_or(1, usize::from),
        })
    }
}

/// An accepted gRPC connection holding one of [`MAX_CONNECTIONS`] places until it closes.
struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepted connections, at most [`MAX_CONNECTIONS`] open at once (the rest are closed at once).
fn limited_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = Result<Limited, std::io::Error>> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    futures::stream::unfold((listener, limit), |(listener, limit)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "grpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                tracing::warn!("gRPC connection limit reached; closing a new connection");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Limited {
                stream,
                _permit: permit,
            };
            return Some((Ok(conn), (listener, limit)));
        }
    })
}

async fn server_tls(files: &TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let cert = tokio::fs::read(&files.cert)
        .await
        .with_context(|| format!("IBEX_AUTHD_TLS_CERT_FILE {}", files.cert.display()))?;
    let key = tokio::fs::read(&files.key)
        .await
        .with_context(|| format!("IBEX_AUTHD_TLS_KEY_FILE {}", files.key.display()))?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key)))
}

/// A started authd; [`Running::stop`] drains it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub validator: Arc<Validator>,
    pub refusals: Arc<Refusals>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let pool = store::pool(&settings.database)?;
    let tls = match &settings.tls {
        Some(files) => Some(server_tls(files).await?),
        None => None,
    };
    let workers = settings.hash_workers;
    let hasher = tokio::task::spawn_blocking(move || HashPool::new(workers)).await??;
    let cache = Arc::new(VerifiedCache::new(CACHE_ENTRIES, settings.cache_max_age));
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
    let refusals = Arc::new(Refusals::default());

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
            Arc::clone(&refusals),
            shutdown_rx.clone(),
        )),
    ];

    warm_up(&pool, &validator.hasher, &feed).await;

    let service = Service {
        validator: Arc::clone(&validator),
        admin: settings.admin,
        service_key: settings.service_key,
        refusals: Arc::clone(&refusals),
        admin_throttle: FailureThrottle::new(),
        limits: settings.limits,
        default_rpm: settings.default_rpm,
        shutdown: shutdown_rx.clone(),
    };
    let incoming = limited_incoming(grpc_listener);
    let mut stop = shutdown_rx;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("IBEX_AUTHD_TLS_CERT_FILE / IBEX_AUTHD_TLS_KEY_FILE")?;
    }
    let grpc = tokio::spawn(
        builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // A RecordUsage batch is ~1.5 MB: with h2's 64 KiB default windows the shipper
            // sends it in ~25 window-sized steps, each a wake-up on both sides. The messages
            // stay bounded by the decoding limit whatever the window.
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(4 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(AuthServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }),
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        validator,
        refusals,
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
