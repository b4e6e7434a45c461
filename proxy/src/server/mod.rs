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
mod config;
mod conn;
mod edge;
pub mod per_ip;
mod respond;
mod runtime;
mod shutdown;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::ServerConfig;
pub use shutdown::ShutdownHandle;

pub use edge::ReloadHook;

use crate::http::Service;
use crate::metrics::ListenerStats;
use crate::tls::TlsState;
use edge::Edge;
use per_ip::PerIpLimit;

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
        let Server {
            cfg,
            first,
            local,
            admin,
            edge,
            reload,
            shutdown,
        } = self;
        let listeners = runtime::Listeners {
            first,
            local,
            admin: admin.map(|(listener, _)| listener),
        };
        runtime::run_workers(cfg, listeners, edge, reload, shutdown, Arc::new(make))
    }
}
