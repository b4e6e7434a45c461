//! Connections to the upstream: plain TCP or rustls over TCP, opened by a
//! [`Connector`] and kept by a per-worker [`Pool`] of idle keep-alive
//! connections (a small LIFO `Vec`; nothing is shared across cores).
//!
//! TLS: the platform's roots by default, or only the PEM bundle of
//! `IBEX_UPSTREAM_CA_FILE`; SNI and host-name verification always on (there
//! is no switch to turn them off).

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::pki_types::ServerName;

use super::dns::Resolver;
use super::stats::UpstreamStats;
use super::target::{Scheme, Target};
use crate::clock::Clock;

/// Idle connections kept per worker.
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed rather than reused:
/// providers close idle keep-alive connections after about a minute, and a
/// request on a connection they are closing costs a retry.
const MAX_IDLE_AGE: Duration = Duration::from_secs(30);

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl Conn {
    pub async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
        }
    }

    pub async fn write_all<T: IoBuf + 'static>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.write_all(buf).await,
            Conn::Tls(s) => s.write_all(buf).await,
        }
    }
}

/// Builds the rustls client configuration: ring provider, TLS 1.2+.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("IBEX_UPSTREAM_CA_FILE {}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.context("IBEX_UPSTREAM_CA_FILE: bad PEM")?;
                roots
                    .add(cert)
                    .context("IBEX_UPSTREAM_CA_FILE: bad certificate")?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::warn!(error = %err, "could not load some platform root certificates");
            }
            let (_, ignored) = roots.add_parsable_certificates(native.certs);
            if ignored > 0 {
                tracing::warn!(ignored, "unparsable platform root certificates skipped");
            }
        }
    }
    if roots.is_empty() {
        bail!("no trusted root certificates for the upstream (set IBEX_UPSTREAM_CA_FILE)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Say what we speak, so a server that defaults to h2 never picks it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

pub struct Connector {
    tls: Option<(TlsConnector, ServerName<'static>)>,
    dns: Resolver,
}

impl Connector {
    pub fn new(
        target: Target,
        tls: Option<Arc<rustls::ClientConfig>>,
        clock: Rc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let tls = match (target.scheme, tls) {
            (Scheme::Http, _) => None,
            (Scheme::Https, Some(config)) => {
                let name = ServerName::try_from(target.host.clone())
                    .context("IBEX_UPSTREAM_URL host is not a valid TLS server name")?;
                Some((TlsConnector::from(config), name))
            }
            (Scheme::Https, None) => bail!("https upstream without a TLS configuration"),
        };
        Ok(Self {
            tls,
            dns: Resolver::new(target.host, target.port, clock),
        })
    }

    /// Opens a fresh connection (TCP, then the TLS handshake if https).
    pub async fn connect(&self) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for &addr in self.dns.addrs().await?.iter() {
            match TcpStream::connect_addr(addr).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    return match &self.tls {
                        None => Ok(Conn::Plain(tcp)),
                        Some((connector, name)) => connector
                            .connect(name.clone(), tcp)
                            .await
                            .map(|s| Conn::Tls(Box::new(s)))
                            .map_err(io::Error::other),
                    };
                }
                Err(e) => last = e,
            }
        }
        // A stale DNS answer may be why: refresh it (off the worker).
        self.dns.mark_stale();
        Err(last)
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// This worker's idle keep-alive connections, newest last.
pub struct Pool {
    idle: RefCell<Vec<Idle>>,
    stats: Arc<UpstreamStats>,
    clock: Rc<dyn Clock>,
}

impl Pool {
    pub fn new(stats: Arc<UpstreamStats>, clock: Rc<dyn Clock>) -> Self {
        Self {
            idle: RefCell::new(Vec::new()),
            stats,
            clock,
        }
    }

    /// The most recently used idle connection that is young enough.
    pub fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let found = match idle.pop() {
            Some(entry)
                if self.clock.now().saturating_duration_since(entry.since) < MAX_IDLE_AGE =>
            {
                Some(entry.conn)
            }
            Some(_) => {
                // Older ones sit below it: all of them are stale.
                idle.clear();
                None
            }
            None => None,
        };
        self.stats.set_idle(idle.len());
        found
    }

    /// Returns a connection whose last response was read completely.
    pub fn put(&self, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle {
            conn,
            since: self.clock.now(),
        });
        self.stats.set_idle(idle.len());
    }
}
