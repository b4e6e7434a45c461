//! What the server is started with: listener, workers, limits, timeouts.
//! Built from the process configuration ([`crate::config::Config::server`]).

use std::net::SocketAddr;
use std::time::Duration;

use crate::http::Limits;
use crate::tls::TlsFiles;

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
