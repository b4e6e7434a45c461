//! The process-wide stop signal (SIGTERM, SIGINT or a [`ShutdownHandle`])
//! and each worker's local view of it.
//!
//! The cross-thread part is a `tokio::sync::watch` (runtime-agnostic; monoio's
//! `sync` feature lets another thread wake a monoio task). Inside a worker the
//! connections see a plain `Cell` plus a `Notify`, so the request path pays no
//! atomic to ask "are we draining?".

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use monoio::time::Instant;
use tokio::sync::{watch, Notify};

/// After the drain starts, how long a keep-alive connection with nothing of
/// its next request yet stays open (a constant, not a setting): a client
/// that was about to reuse it is still answered, with `Connection: close`,
/// instead of finding it closed under its request.
pub(crate) const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Stops a running [`super::Server`] like SIGTERM does. `Clone + Send`.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    pub(crate) fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Begins the drain: workers stop accepting (connections still queued
    /// on the listener go to the port's other listeners when
    /// `net.ipv4.tcp_migrate_req` is 1), requests on open connections are
    /// answered with `Connection: close`, connections idle past
    /// [`DRAIN_IDLE_GRACE`] close, in-flight requests and streams finish
    /// (all bounded by `drain_timeout`).
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_shutdown(&self) -> bool {
        *self.tx.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// One worker's drain state, shared by its accept loop and connections.
#[derive(Default)]
pub(crate) struct WorkerDrain {
    draining: Cell<bool>,
    /// When draining started.
    started_at: Cell<Option<Instant>>,
    /// Woken once when draining starts (idle connections, the accept loop).
    started: Notify,
    /// Set when the drain deadline passed: connections stop where they are.
    aborted: Cell<bool>,
    abort: Notify,
    /// Open connections on this worker.
    open: Cell<usize>,
    /// Woken when `open` drops to zero.
    all_closed: Notify,
}

impl WorkerDrain {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    pub(crate) fn start(&self) {
        if !self.draining.get() {
            self.started_at.set(Some(Instant::now()));
        }
        self.draining.set(true);
        self.started.notify_waiters();
    }

    /// Resolves once draining has started (immediately if it already has).
    pub(crate) async fn started(&self) {
        let notified = self.started.notified();
        if self.draining.get() {
            return;
        }
        notified.await;
    }

    /// Resolves [`DRAIN_IDLE_GRACE`] after draining started: an idle
    /// connection closes then.
    pub(crate) async fn idle_grace_over(&self) {
        self.started().await;
        let since = self.started_at.get().unwrap_or_else(Instant::now);
        monoio::time::sleep_until(since + DRAIN_IDLE_GRACE).await;
    }

    /// The drain deadline passed: every connection task ends now (their
    /// futures are dropped, which closes the sockets and releases streams).
    pub(crate) fn abort(&self) {
        self.aborted.set(true);
        self.abort.notify_waiters();
    }

    /// Resolves once [`abort`](Self::abort) was called.
    pub(crate) async fn aborted(&self) {
        let notified = self.abort.notified();
        if self.aborted.get() {
            return;
        }
        notified.await;
    }

    pub(crate) fn open(&self) -> usize {
        self.open.get()
    }

    pub(crate) fn conn_opened(&self) {
        self.open.set(self.open.get() + 1);
    }

    pub(crate) fn conn_closed(&self) {
        let n = self.open.get().saturating_sub(1);
        self.open.set(n);
        if n == 0 {
            self.all_closed.notify_one();
        }
    }

    /// Resolves when no connection is open.
    pub(crate) async fn all_closed(&self) {
        while self.open.get() > 0 {
            self.all_closed.notified().await;
        }
    }
}
