//! The slow path: the proxy's only tokio code. One tokio thread owns the
//! tonic channels to authd; the monoio workers reach it through two doors,
//! both bounded and both used only off the hot path:
//!
//! - [`BridgeClient`] ([`validate`]): a cache miss sends a validation into a
//!   bounded queue (full → 503 AUTH_UNAVAILABLE at once) and awaits its
//!   oneshot reply.
//! - [`FeedReceiver`] ([`feed`]): the same thread holds the
//!   `WatchInvalidations` stream and fans every event out to every worker's
//!   own queue, reconnecting with backoff (50 ms doubling to 1 s).
//!
//! With several authd listed in `IBEX_AUTHD_GRPC` (SPEC §6) the thread holds
//! one validation channel and one feed per authd: validations go to the
//! least busy healthy one ([`balance`]), and every feed is fanned out to the
//! workers, whose trust rule needs only one of them fresh (a revocation is
//! NOTIFYed to every authd, so any one live feed carries it).
//!
//! Not here: caching and deadlines (the workers' [`super::step`] apply
//! `IBEX_AUTH_VALIDATE_TIMEOUT` themselves), and any decision on what an
//! answer means for a request.

mod authd;
mod balance;
mod feed;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use ibex_proto::pb::auth_service_client::AuthServiceClient;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use authd::ServiceKey;

use crate::metrics::BridgeStats;
/// The usage shipper reaches authd the same way (TLS, CA file).
pub use authd::endpoint as authd_endpoint;
pub use feed::FeedReceiver;
use feed::Subscribers;
pub use validate::BridgeClient;
use validate::Call;

/// Validations waiting for the bridge thread; past this, workers answer 503.
const QUEUE_DEPTH: usize = 4096;
/// How long [`Bridge::start`] waits for the validation channel to authd to
/// connect, so the first request of a fresh stack does not pay for it (a
/// refused connection returns at once; authd down only delays the start).
const CONNECT_AT_START: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// `IBEX_AUTHD_GRPC`: one or more authd addresses.
    pub authd_urls: Vec<String>,
    /// Name sent to authd's logs with the feed subscription.
    pub subscriber: String,
    /// `IBEX_SERVICE_KEY`, sent as `x-ibex-service-key` on every call.
    pub service_key: SecretString,
    /// `IBEX_AUTHD_CA_FILE`: the CA to trust for an `https://` authd (else
    /// the system roots).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Handle to the bridge thread; cheap to clone, shared by every worker.
#[derive(Clone)]
pub struct Bridge {
    calls: mpsc::Sender<Call>,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
}

impl Bridge {
    /// Starts the bridge thread and waits (up to [`CONNECT_AT_START`]) for
    /// its channel to authd. Fails on an unusable authd URL; authd being down
    /// is not an error (logged; calls answer 503 until it is up).
    pub fn start(config: BridgeConfig) -> anyhow::Result<Bridge> {
        let key = ServiceKey::new(&config.service_key)?;
        anyhow::ensure!(!config.authd_urls.is_empty(), "no authd address");
        let endpoints = config
            .authd_urls
            .iter()
            .map(|url| {
                Ok(authd::endpoint(url, config.ca_file.as_deref())?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (calls, rx) = mpsc::channel(QUEUE_DEPTH);
        let subscribers: Subscribers = Arc::default();
        let stats = Arc::new(BridgeStats::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("ibex-authd-bridge")
            .build()?;
        let (subs, st) = (subscribers.clone(), stats.clone());
        let (connected_tx, connected) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ibex-authd-bridge".into())
            .spawn(move || {
                runtime.block_on(serve(endpoints, key, config, rx, subs, st, connected_tx))
            })?;
        match connected.recv_timeout(CONNECT_AT_START + Duration::from_secs(1)) {
            Ok(true) => tracing::debug!("authd channel connected"),
            _ => tracing::warn!(
                "authd not reachable at start; serving anyway (uncached credentials answer 503 \
                 AUTH_UNAVAILABLE until it is)"
            ),
        }
        Ok(Bridge {
            calls,
            subscribers,
            stats,
        })
    }

    /// The backend a worker's auth step calls on misses.
    pub fn client(&self) -> BridgeClient {
        BridgeClient::new(self.calls.clone(), self.stats.clone())
    }

    /// A new worker's feed; run it with [`FeedReceiver::run`] on that worker.
    pub fn subscribe(&self) -> FeedReceiver {
        feed::subscribe(&self.subscribers)
    }

    pub fn stats(&self) -> Arc<BridgeStats> {
        self.stats.clone()
    }
}

/// The bridge thread: each feed on its own task, the validation loop here.
/// The validation channels are connected first (`connected` reports whether
/// at least one did).
async fn serve(
    endpoints: Vec<Endpoint>,
    key: ServiceKey,
    config: BridgeConfig,
    calls: mpsc::Receiver<Call>,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
    connected: std::sync::mpsc::Sender<bool>,
) {
    let balancer = balance::Balancer::new(endpoints.len());
    // Each feed gets its own connection so a slow validation can never delay
    // an invalidation (and vice versa).
    for (index, endpoint) in endpoints.iter().enumerate() {
        tokio::spawn(feed::watch(
            endpoint.connect_lazy(),
            key.clone(),
            config.subscriber.clone(),
            subscribers.clone(),
            stats.clone(),
            balancer.clone(),
            index,
        ));
    }
    let connects = endpoints.into_iter().map(|endpoint| async move {
        let endpoint = validate::endpoint(endpoint);
        match tokio::time::timeout(CONNECT_AT_START, endpoint.connect()).await {
            Ok(Ok(channel)) => (true, channel),
            _ => (false, endpoint.connect_lazy()),
        }
    });
    let channels = futures::future::join_all(connects).await;
    let _ = connected.send(channels.iter().any(|(up, _)| *up));
    let clients = channels
        .into_iter()
        .map(|(_, channel)| AuthServiceClient::new(channel))
        .collect();
    validate::run(clients, balancer, key, calls).await;
}
