//! One worker's accept loops and its drain: accept while not draining (up to
//! `max_connections` per worker and `IBEX_MAX_CONNS_PER_IP` per client
//! address across the proxy), complete the TLS handshake on the public
//! listener when TLS is on (within the header timeout), spawn a task per
//! connection, and on shutdown stop accepting, wait up to `drain_timeout`,
//! then abort what is left. Worker 0 also serves the admin listener.
//!
//! Not here: what happens on a connection ([`super::conn`]), which is the
//! same code over TLS or plain TCP.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::ServerConfig;
use super::conn::{Close, Conn, Shared, READ_CHUNK};
use super::edge::Edge;
use super::per_ip::Slot;
use super::shutdown::WorkerDrain;
use crate::http::{ConnInfo, DateCache, Listener, Service};
use crate::tls::WorkerTls;

/// How long aborted connections get to unwind after the drain deadline.
const ABORT_GRACE: Duration = Duration::from_millis(200);
/// After the listener is shut down, how long its last accept may take to
/// come back (it normally fails at once).
const STOP_ACCEPT_BOUND: Duration = Duration::from_millis(500);
/// Pause after an accept error (EMFILE...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listener as the worker's runtime sees it, and a second descriptor of
/// the same socket to shut it down by ([`stop_listening`]).
pub(super) struct Bound {
    pub(super) listener: TcpListener,
    pub(super) control: std::net::TcpListener,
}

impl Bound {
    pub(super) fn new(std: std::net::TcpListener) -> std::io::Result<Self> {
        let control = std.try_clone()?;
        Ok(Self {
            listener: TcpListener::from_std(std)?,
            control,
        })
    }
}

/// The worker's accept loops; returns when drained (or `drain_timeout`).
pub(super) async fn serve<S: Service + 'static>(
    worker: usize,
    cfg: ServerConfig,
    edge: Edge,
    listener: Bound,
    admin: Option<Bound>,
    service: S,
    mut stop: watch::Receiver<bool>,
) {
    let drain_timeout = cfg.drain_timeout;
    let tls = edge.tls.clone().map(WorkerTls::new);
    let shared = Rc::new(Shared {
        worker,
        cfg,
        service,
        drain: WorkerDrain::default(),
        date: DateCache::new(),
        edge,
        tls,
    });

    let watcher = shared.clone();
    monoio::spawn(async move {
        // An Err means the handle is gone: stop too.
        let _ = stop.wait_for(|stopped| *stopped).await;
        watcher.drain.start();
    });

    if let Some(admin) = admin {
        monoio::spawn(accept_loop(shared.clone(), admin, Listener::Admin));
    }
    accept_loop(shared.clone(), listener, Listener::Public).await;
    tracing::debug!(
        worker,
        open = shared.drain.open(),
        "stopped accepting; draining"
    );
    if monoio::time::timeout(drain_timeout, shared.drain.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            worker,
            open = shared.drain.open(),
            "drain timeout: closing remaining connections"
        );
        shared.drain.abort();
        // The aborted tasks run once more to drop their state.
        let _ = monoio::time::timeout(ABORT_GRACE, shared.drain.all_closed()).await;
    }
    let _ = monoio::time::timeout(ABORT_GRACE, shared.service.drained()).await;
}

/// Accepts on one listener until the drain starts, then closes it without
/// losing what it queued ([`stop_listening`]).
async fn accept_loop<S: Service + 'static>(shared: Rc<Shared<S>>, bound: Bound, kind: Listener) {
    let Bound { listener, control } = bound;
    let worker = shared.worker;
    let mut stopped = false;
    loop {
        let accepted = if stopped {
            // Shut down already: what is still queued (or raced in) comes
            // out now, then the accept fails. Bounded in case it never does.
            match monoio::time::timeout(STOP_ACCEPT_BOUND, listener.accept()).await {
                Ok(Ok(accepted)) => Ok(accepted),
                Ok(Err(_)) | Err(_) => break,
            }
        } else {
            monoio::select! {
                _ = shared.drain.started() => {
                    stop_listening(worker, &control);
                    stopped = true;
                    continue;
                }
                accepted = listener.accept() => accepted,
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                if shared.drain.open() >= shared.cfg.max_connections {
                    tracing::debug!(worker, "connection limit reached: refusing");
                    drop(stream);
                    continue;
                }
                // The admin listener is the operator's: no per-address cap.
                let slot = match kind {
                    Listener::Admin => None,
                    Listener::Public => match shared.edge.per_ip.acquire(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            tracing::debug!(worker, "per-address connection cap: refusing");
                            drop(stream);
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                shared.drain.conn_opened();
                let info = ConnInfo {
                    peer,
                    worker,
                    listener: kind,
                };
                monoio::spawn(connection(stream, info, slot, shared.clone()));
            }
            Err(e) => {
                tracing::warn!(worker, error = %e, "accept failed");
                monoio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Takes the listener out of the port: `shutdown(SHUT_RD)` on a listening
/// socket unhashes it first (no new connection is routed to it, they go to
/// the other SO_REUSEPORT listeners of the port), then empties its queues:
/// with `net.ipv4.tcp_migrate_req = 1` the kernel moves the connections
/// still queued to another listener of the port (a process started on the
/// same address), else it resets them. The accept that is pending wakes
/// with an error, so no accepted socket is left inside a cancelled accept.
fn stop_listening(worker: usize, listener: &std::net::TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).shutdown(std::net::Shutdown::Read) {
        tracing::debug!(worker, error = %e, "listener shutdown failed; closing it");
    }
}

/// Decrements the worker's open-connection count however the task ends.
struct OpenGuard<S>(Rc<Shared<S>>);

impl<S> Drop for OpenGuard<S> {
    fn drop(&mut self) {
        self.0.drain.conn_closed();
    }
}

/// One accepted connection, start to end: on the public listener with TLS
/// on, the handshake first, bounded by the header timeout (a client that
/// never finishes it is closed like one that never sends a head); then the
/// same connection loop over TLS or plain TCP.
async fn connection<S: Service + 'static>(
    stream: TcpStream,
    info: ConnInfo,
    slot: Option<Slot>,
    shared: Rc<Shared<S>>,
) {
    let _open = OpenGuard(shared.clone());
    let _slot = slot;
    let tls = match (&shared.tls, info.listener) {
        (Some(tls), Listener::Public) => tls.acceptor(),
        _ => return serve_stream(stream, info, &shared).await,
    };
    let handshake = monoio::time::timeout(shared.cfg.header_timeout, tls.accept(stream));
    let stream = monoio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                shared.edge.tls_handshake_failed();
                tracing::debug!(worker = info.worker, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                shared.edge.tls_handshake_failed();
                tracing::debug!(worker = info.worker, "TLS handshake timed out");
                return;
            }
        },
        _ = shared.drain.aborted() => return,
    };
    serve_stream(stream, info, &shared).await;
}

async fn serve_stream<S: Service + 'static, IO: AsyncReadRent + AsyncWriteRent>(
    stream: IO,
    info: ConnInfo,
    shared: &Rc<Shared<S>>,
) {
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(1024),
        info,
    };
    let work = async {
        match conn.run(shared).await {
            Ok(()) | Err(Close::Silently) => {}
            Err(Close::Refuse(err)) => conn.refuse(shared, err).await,
        }
    };
    // Past the drain deadline the connection is dropped wherever it is, so
    // the worker can close its socket and release whatever it streams from.
    monoio::select! {
        _ = work => {}
        _ = shared.drain.aborted() => {}
    }
}
