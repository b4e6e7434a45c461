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
mod respond;
mod runtime;
mod shutdown;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::ServerConfig;
pub use shutdown::ShutdownHandle;

use crate::http::Service;

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    cfg: ServerConfig,
    first: std::net::TcpListener,
    local: SocketAddr,
    shutdown: ShutdownHandle,
}

impl Server {
    /// Binds the first SO_REUSEPORT listener on the calling thread so
    /// `local_addr` is known (port 0 resolved); workers then bind the same
    /// concrete address with SO_REUSEPORT.
    pub fn bind(cfg: ServerConfig) -> std::io::Result<Server> {
        let first = runtime::bind_reuseport(cfg.listen)?;
        let local = first.local_addr()?;
        Ok(Server {
            cfg,
            first,
            local,
            shutdown: ShutdownHandle::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
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
            shutdown,
        } = self;
        runtime::run_workers(cfg, first, local, shutdown, Arc::new(make))
    }
}
