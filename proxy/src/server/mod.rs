//! Worker threads, listeners, the connection loop and draining.
//!
//! One OS thread per worker, each with its own monoio runtime (io_uring with
//! the flags MEASURED.md found cheapest, the legacy epoll driver otherwise)
//! and its own SO_REUSEPORT listener, so the kernel spreads connections and
//! nothing is shared between workers on the request path. The service is
//! built per worker, on its thread, by the caller's `make`.
//!
//! Not here: request parsing ([`crate::http`]) and everything about what a
//! request means ([`crate::chain`]).

mod accept;
mod conn;
pub mod per_ip;
mod respond;
mod runtime;
mod shutdown;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use shutdown::ShutdownHandle;

use crate::http::{Limits, Service};
use crate::metrics::ListenerStats;
use crate::tls::{TlsFiles, TlsState};
use per_ip::PerIpLimit;

/// Everything the server needs. Built from the configuration
/// ([`crate::config::Config::server`]), which states every default once.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `IBEX_PROXY_LISTEN`; port 0 picks a free port (see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// `IBEX_PROXY_THREADS`: worker threads (default: cores).
    pub threads: usize,
    /// Pin worker i to the i-th CPU of the process affinity mask.
    pub pin_cpus: bool,
    /// Header bytes (16 KiB), header count (100), body bytes
    /// (`IBEX_MAX_BODY_BYTES`, 4 MiB).
    pub limits: Limits,
    /// From the first byte of a request's head until its end (408 after).
    pub header_timeout: Duration,
    /// For the whole body once the head is read (408 after).
    pub body_timeout: Duration,
    /// Keep-alive idle time between requests, and the longest a response
    /// write may stall; the connection is closed after it.
    pub idle_timeout: Duration,
    /// After SIGTERM: how long in-flight requests get to finish.
    pub drain_timeout: Duration,
    /// Open connections per worker; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Use the legacy (epoll) driver even where io_uring works: for tests of
    /// the fallback path and for comparisons.
    pub legacy_driver: bool,
    /// `IBEX_PROXY_ADMIN_LISTEN`: plain-HTTP listener for `/metrics`,
    /// `/health`, `/ready` (served by worker 0); `None`: no admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// `IBEX_TLS_CERT_FILE` / `IBEX_TLS_KEY_FILE` / `IBEX_TLS_MIN_VERSION`:
    /// the public listener speaks TLS only when set.
    pub tls: Option<TlsFiles>,
    /// `IBEX_MAX_CONNS_PER_IP`: open connections per client address (IPv4,
    /// IPv6 /64) across all workers; 0 = no cap.
    pub max_conns_per_ip: u32,
}

impl ServerConfig {
    /// Open connections per worker (not configurable).
    pub const MAX_CONNECTIONS: usize = 10_000;
}

/// What every worker of one server shares outside the request path: the TLS
/// configuration, the per-address connection counts and their counters.
#[derive(Clone)]
pub(crate) struct Edge {
    pub(crate) tls: Option<Arc<TlsState>>,
    pub(crate) per_ip: Arc<PerIpLimit>,
    pub(crate) stats: Arc<ListenerStats>,
}

impl Edge {
    fn tls_handshake_failed(&self) {
        self.stats
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `SIGHUP`: re-read the TLS pair; on error keep the old one and say why.
    fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload() {
            Ok(()) => {
                self.stats.tls_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    generation = tls.generation(),
                    "SIGHUP: TLS certificate reloaded"
                );
            }
            Err(e) => {
                self.stats
                    .tls_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: TLS reload failed; keeping the previous certificate"
                );
            }
        }
    }
}

/// What `SIGHUP` runs, besides the TLS reload.
pub type ReloadHook = Box<dyn Fn() + Send + Sync>;

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    cfg: ServerConfig,
    first: std::net::TcpListener,
    local: SocketAddr,
    admin: Option<(std::net::TcpListener, SocketAddr)>,
    edge: Edge,
    reload: Vec<ReloadHook>,
    shutdown: ShutdownHandle,
}

impl Server {
    /// Binds the first SO_REUSEPORT listener on the calling thread so
    /// `local_addr` is known (port 0 resolved); workers then bind the same
    /// concrete address with SO_REUSEPORT. Binds the admin listener and loads
    /// the TLS pair too: an unusable certificate or key refuses to start, with
    /// an error naming the variable and the file.
    pub fn bind(cfg: ServerConfig) -> std::io::Result<Server> {
        let tls = match &cfg.tls {
            Some(files) => Some(
                TlsState::load(files.clone())
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))?,
            ),
            None => None,
        };
        let first = runtime::bind_reuseport(cfg.listen)?;
        let local = first.local_addr()?;
        let admin = match cfg.admin_listen {
            Some(addr) => {
                let listener = runtime::bind_plain(addr)?;
                let bound = listener.local_addr()?;
                Some((listener, bound))
            }
            None => None,
        };
        let stats = Arc::new(ListenerStats::default());
        let per_ip = PerIpLimit::new(cfg.max_conns_per_ip, stats.clone());
        Ok(Server {
            cfg,
            first,
            local,
            admin,
            edge: Edge { tls, per_ip, stats },
            reload: Vec::new(),
            shutdown: ShutdownHandle::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The admin listener's bound address, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// Whether the public listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.edge.tls.is_some()
    }

    /// The listeners' own counters (TLS, per-address cap), for `/metrics`.
    pub fn listener_stats(&self) -> Arc<ListenerStats> {
        self.edge.stats.clone()
    }

    /// Runs `hook` on every `SIGHUP`, after the TLS pair is re-read.
    pub fn on_reload(&mut self, hook: ReloadHook) {
        self.reload.push(hook);
    }

    /// For tests and embedding: stops the server like SIGTERM does.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Runs the workers; blocks until SIGTERM/SIGINT or
    /// [`ShutdownHandle::shutdown`], then stops accepting, lets in-flight
    /// requests finish (keep-alive connections close after their current
    /// response) and returns once every worker finished or `drain_timeout`
    /// passed. `make(worker_id)` runs on the worker's thread inside its
    /// runtime, so it may `monoio::spawn` background tasks.
    pub fn run<S, F>(self, make: F) -> std::io::Result<()>
    where
        F: Fn(usize) -> S + Send + Sync + 'static,
        S: Service + 'static,
    {
        runtime::run_workers(self, Arc::new(make))
    }
}
