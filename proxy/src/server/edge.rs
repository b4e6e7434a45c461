//! What every worker of one server shares outside the request path — the
//! TLS configuration, the per-address connection counts, the listeners'
//! counters — and the `SIGHUP` reload of the TLS pair.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::per_ip::PerIpLimit;
use crate::metrics::ListenerStats;
use crate::tls::TlsState;

/// What every worker of one server shares outside the request path: the TLS
/// configuration, the per-address connection counts and their counters.
#[derive(Clone)]
pub(crate) struct Edge {
    pub(crate) tls: Option<Arc<TlsState>>,
    pub(crate) per_ip: Arc<PerIpLimit>,
    pub(crate) stats: Arc<ListenerStats>,
}

impl Edge {
    pub(super) fn tls_handshake_failed(&self) {
        self.stats
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `SIGHUP`: re-read the TLS pair; on error keep the old one and say why.
    pub(super) fn reload_tls(&self) {
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
