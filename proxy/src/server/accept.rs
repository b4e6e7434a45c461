//! One worker's accept loop and its drain: accept while not draining (up to
//! `max_connections`), spawn a task per connection, and on shutdown stop
//! accepting, wait up to `drain_timeout`, then abort what is left.
//!
//! Not here: what happens on a connection ([`super::conn`]).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use monoio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::conn::{Close, Conn, READ_CHUNK};
use super::shutdown::WorkerDrain;
use super::ServerConfig;
use crate::http::{ConnInfo, DateCache, Service};

/// How long aborted connections get to unwind after the drain deadline.
const ABORT_GRACE: Duration = Duration::from_millis(200);
/// Pause after an accept error (EMFILE...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What one worker's connections share. Lives on one thread.
pub(super) struct Shared<S> {
    pub(super) worker: usize,
    pub(super) cfg: ServerConfig,
    pub(super) service: S,
    pub(super) drain: WorkerDrain,
    pub(super) date: DateCache,
}

/// The worker's accept loop; returns when drained (or `drain_timeout`).
pub(super) async fn serve<S: Service + 'static>(
    worker: usize,
    cfg: ServerConfig,
    listener: TcpListener,
    service: S,
    mut stop: watch::Receiver<bool>,
) {
    let drain_timeout = cfg.drain_timeout;
    let max_connections = cfg.max_connections;
    let shared = Rc::new(Shared {
        worker,
        cfg,
        service,
        drain: WorkerDrain::default(),
        date: DateCache::new(),
    });

    let watcher = shared.clone();
    monoio::spawn(async move {
        // An Err means the handle is gone: stop too.
        let _ = stop.wait_for(|stopped| *stopped).await;
        watcher.drain.start();
    });

    loop {
        monoio::select! {
            _ = shared.drain.started() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if shared.drain.open() >= max_connections {
                        tracing::debug!(worker, "connection limit reached: refusing");
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    shared.drain.conn_opened();
                    monoio::spawn(connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(worker, error = %e, "accept failed");
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
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
}

/// Decrements the worker's open-connection count however the task ends.
struct OpenGuard<S>(Rc<Shared<S>>);

impl<S> Drop for OpenGuard<S> {
    fn drop(&mut self) {
        self.0.drain.conn_closed();
    }
}

async fn connection<S: Service + 'static>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Rc<Shared<S>>,
) {
    let _open = OpenGuard(shared.clone());
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(1024),
        info: ConnInfo {
            peer,
            worker: shared.worker,
        },
    };
    let work = async {
        match conn.run(&shared).await {
            Ok(()) | Err(Close::Silently) => {}
            Err(Close::Refuse(err)) => conn.refuse(&shared, err).await,
        }
    };
    // Past the drain deadline the connection is dropped wherever it is, so
    // the worker can close its socket and release whatever it streams from.
    monoio::select! {
        _ = work => {}
        _ = shared.drain.aborted() => {}
    }
}
