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
mod respond;
mod runtime;
mod shutdown;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use shutdown::ShutdownHandle;

use crate::http::{Limits, Service};

/// Everything the server needs; `Default` gives the documented defaults on
/// `0.0.0.0:8080`.
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cpus: false,
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            legacy_driver: false,
        }
    }
}

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
        runtime::run_workers(self, Arc::new(make))
    }
}
