//! The authd client: one tokio thread owns the tonic channels; workers reach
//! it only on cache misses, through a bounded queue (full → 503
//! AUTH_UNAVAILABLE at once) and a oneshot reply each. The same thread holds
//! the `WatchInvalidations` stream and fans every event out to every worker's
//! own queue, reconnecting with backoff (50 ms doubling to 1 s).
//!
//! Not here: caching and deadlines (the workers' [`super::step`] apply
//! `IBEX_AUTH_VALIDATE_TIMEOUT` themselves), and any decision on what an
//! answer means for a request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::LocalBoxFuture;
use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use super::backend::{AgentAnswer, Answer, AuthBackend, TokenAnswer, Unavailable, ValidToken};
use super::core::{AuthCore, FeedEvent};
use super::secret::BearerToken;
use crate::metrics::BridgeStats;

/// Validations waiting for the bridge thread; past this, workers answer 503.
const QUEUE_DEPTH: usize = 4096;
/// Concurrent authd calls the bridge makes.
const MAX_IN_FLIGHT: usize = 512;
/// Feed events buffered per worker; overflow resets that worker's trust.
const FEED_DEPTH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Reconnect when the feed is silent this long (or 3 heartbeat intervals).
const FEED_SILENCE_MIN: Duration = Duration::from_secs(1);
/// Longest the bridge keeps one validation call open.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// `IBEX_AUTHD_GRPC`.
    pub authd_url: String,
    /// Name sent to authd's logs with the feed subscription.
    pub subscriber: String,
    /// `IBEX_SERVICE_KEY`, sent as `x-ibex-service-key` on every call.
    pub service_key: SecretString,
    /// `IBEX_AUTHD_CA_FILE`: the CA to trust for an `https://` authd (else the system roots).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Metadata name of the service key (SPEC §6).
const SERVICE_KEY_HEADER: &str = "x-ibex-service-key";

/// authd's reason on a RESOURCE_EXHAUSTED ValidateToken: `throttled` = this client address
/// failed too often on this token id (its own doing); anything else = authd is saturated.
const REFUSAL_HEADER: &str = "x-ibex-refusal";

/// The service key as a metadata value, parsed once; cheap to clone into each request.
#[derive(Clone)]
struct ServiceKey(tonic::metadata::AsciiMetadataValue);

impl ServiceKey {
    fn new(key: &SecretString) -> anyhow::Result<ServiceKey> {
        let mut value = tonic::metadata::AsciiMetadataValue::try_from(key.expose_secret())
            .map_err(|_| anyhow::anyhow!("IBEX_SERVICE_KEY must be printable ASCII"))?;
        value.set_sensitive(true);
        Ok(ServiceKey(value))
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(SERVICE_KEY_HEADER, self.0.clone());
        request
    }
}

/// `http://` as is; `https://` with TLS trusting `ca_file` or the system roots.
fn endpoint(url: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = tonic::transport::ClientTlsConfig::new();
    let tls = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("IBEX_AUTHD_CA_FILE {}: {e}", path.display()))?;
            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    Ok(endpoint.tls_config(tls)?)
}

enum Call {
    Token {
        token: SecretString,
        client: std::net::IpAddr,
        reply: oneshot::Sender<Answer<TokenAnswer>>,
    },
    Agent {
        org: Uuid,
        agent: Uuid,
        reply: oneshot::Sender<Answer<AgentAnswer>>,
    },
}

struct Subscriber {
    tx: mpsc::Sender<FeedEvent>,
    overflow: Arc<AtomicBool>,
}

type Subscribers = Arc<Mutex<Vec<Subscriber>>>;

/// Handle to the bridge thread; cheap to clone, shared by every worker.
#[derive(Clone)]
pub struct Bridge {
    calls: mpsc::Sender<Call>,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
}

impl Bridge {
    /// Starts the bridge thread. Fails on an unusable authd URL; authd being
    /// down is not an error (calls answer 503 until it is up).
    pub fn start(config: BridgeConfig) -> anyhow::Result<Bridge> {
        let key = ServiceKey::new(&config.service_key)?;
        let endpoint = endpoint(&config.authd_url, config.ca_file.as_deref())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let (calls, rx) = mpsc::channel(QUEUE_DEPTH);
        let subscribers: Subscribers = Arc::default();
        let stats = Arc::new(BridgeStats::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("ibex-authd-bridge")
            .build()?;
        let (subs, st) = (subscribers.clone(), stats.clone());
        std::thread::Builder::new()
            .name("ibex-authd-bridge".into())
            .spawn(move || runtime.block_on(serve(endpoint, key, config, rx, subs, st)))?;
        Ok(Bridge {
            calls,
            subscribers,
            stats,
        })
    }

    /// The backend a worker's auth step calls on misses.
    pub fn client(&self) -> BridgeClient {
        BridgeClient {
            calls: self.calls.clone(),
            stats: self.stats.clone(),
        }
    }

    /// A new worker's feed; run it with [`FeedReceiver::run`] on that worker.
    pub fn subscribe(&self) -> FeedReceiver {
        let (tx, rx) = mpsc::channel(FEED_DEPTH);
        let overflow = Arc::new(AtomicBool::new(false));
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(Subscriber {
                tx,
                overflow: overflow.clone(),
            });
        }
        FeedReceiver { rx, overflow }
    }

    pub fn stats(&self) -> Arc<BridgeStats> {
        self.stats.clone()
    }
}

/// One worker's end of the invalidation feed.
pub struct FeedReceiver {
    rx: mpsc::Receiver<FeedEvent>,
    overflow: Arc<AtomicBool>,
}

impl FeedReceiver {
    /// Applies events to this worker's caches until the bridge goes away.
    pub async fn run(mut self, core: std::rc::Rc<AuthCore>) {
        while let Some(event) = self.rx.recv().await {
            if self.overflow.swap(false, Ordering::AcqRel) {
                core.apply(FeedEvent::Reset);
            }
            core.apply(event);
        }
    }
}

/// A worker's handle for validations.
#[derive(Clone)]
pub struct BridgeClient {
    calls: mpsc::Sender<Call>,
    stats: Arc<BridgeStats>,
}

impl BridgeClient {
    fn submit<T: 'static>(
        &self,
        call: Call,
        rx: oneshot::Receiver<Answer<T>>,
    ) -> LocalBoxFuture<'static, Answer<T>> {
        if self.calls.try_send(call).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async { Err(Unavailable) });
        }
        Box::pin(async move { rx.await.unwrap_or(Err(Unavailable)) })
    }
}

impl AuthBackend for BridgeClient {
    fn validate_token(
        &self,
        token: &BearerToken,
        client: std::net::IpAddr,
    ) -> LocalBoxFuture<'static, Answer<TokenAnswer>> {
        let (reply, rx) = oneshot::channel();
        // A malformed value may not be UTF-8 (obs-text). The lossy form can
        // never be a PAT (U+FFFD is not alphanumeric), so authd refuses it
        // like any other malformed token, after the same dummy Argon2.
        let token = SecretString::from(String::from_utf8_lossy(token.expose()).into_owned());
        self.submit(
            Call::Token {
                token,
                client,
                reply,
            },
            rx,
        )
    }

    fn validate_agent(
        &self,
        org: Uuid,
        agent: Uuid,
    ) -> LocalBoxFuture<'static, Answer<AgentAnswer>> {
        let (reply, rx) = oneshot::channel();
        self.submit(Call::Agent { org, agent, reply }, rx)
    }
}

async fn serve(
    endpoint: Endpoint,
    key: ServiceKey,
    config: BridgeConfig,
    mut calls: mpsc::Receiver<Call>,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
) {
    // The feed gets its own connection so a slow validation can never delay
    // an invalidation (and vice versa).
    tokio::spawn(watch(
        endpoint.connect_lazy(),
        key.clone(),
        config.subscriber,
        subscribers,
        stats,
    ));
    // Workers give up after IBEX_AUTH_VALIDATE_TIMEOUT; this bound only makes
    // sure a call authd never answers cannot hold its permit forever.
    let client = AuthServiceClient::new(endpoint.timeout(CALL_TIMEOUT).connect_lazy());
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(call) = calls.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut client = client.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match call {
                Call::Token {
                    token,
                    client: addr,
                    reply,
                } => {
                    if reply.is_closed() {
                        return; // the worker gave up already
                    }
                    let req = pb::ValidateTokenRequest {
                        token: token.expose_secret().to_owned(),
                        client_addr: addr.to_string(),
                    };
                    let answer = match client.validate_token(key.request(req)).await {
                        Ok(r) => token_answer(r.into_inner()),
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                            Ok(refusal(&status))
                        }
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), "authd ValidateToken failed");
                            Err(Unavailable)
                        }
                    };
                    let _ = reply.send(answer);
                }
                Call::Agent { org, agent, reply } => {
                    if reply.is_closed() {
                        return;
                    }
                    let req = pb::ValidateAgentRequest {
                        org_id: org.to_string(),
                        agent_id: agent.to_string(),
                    };
                    let answer = match client.validate_agent(key.request(req)).await {
                        Ok(r) => agent_answer(r.into_inner()),
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), "authd ValidateAgent failed");
                            Err(Unavailable)
                        }
                    };
                    let _ = reply.send(answer);
                }
            }
        });
    }
}

/// Why authd declined to decide: its guess throttle, or saturation.
fn refusal(status: &tonic::Status) -> TokenAnswer {
    match status.metadata().get(REFUSAL_HEADER).map(|v| v.as_bytes()) {
        Some(b"throttled") => TokenAnswer::Throttled,
        _ => TokenAnswer::Busy,
    }
}

/// Maps authd's reply; anything unexpected fails closed.
fn token_answer(r: pb::ValidateTokenResponse) -> Answer<TokenAnswer> {
    match pb::TokenStatus::try_from(r.status) {
        Ok(pb::TokenStatus::Valid) => {
            let org = Uuid::parse_str(&r.org_id).map_err(|_| Unavailable)?;
            let token_id = Uuid::parse_str(&r.token_id).map_err(|_| Unavailable)?;
            let agent = match r.agent_id.as_str() {
                "" => None,
                a => Some(Uuid::parse_str(a).map_err(|_| Unavailable)?),
            };
            Ok(TokenAnswer::Valid(ValidToken {
                org,
                token_id,
                permissions: r.permissions,
                expires_at_ms: (r.expires_at_unix_ms != 0).then_some(r.expires_at_unix_ms),
                agent,
                rpm: r.org_rpm_limit,
            }))
        }
        Ok(pb::TokenStatus::Invalid) => Ok(TokenAnswer::Invalid),
        Ok(pb::TokenStatus::Revoked) => Ok(TokenAnswer::Revoked),
        Ok(pb::TokenStatus::Expired) => Ok(TokenAnswer::Expired),
        Ok(pb::TokenStatus::Unspecified) | Err(_) => Err(Unavailable),
    }
}

fn agent_answer(r: pb::ValidateAgentResponse) -> Answer<AgentAnswer> {
    match pb::AgentStatus::try_from(r.status) {
        Ok(pb::AgentStatus::Active) => Ok(AgentAnswer::Active),
        Ok(pb::AgentStatus::Paused | pb::AgentStatus::Archived | pb::AgentStatus::Suspended) => {
            Ok(AgentAnswer::Inactive)
        }
        Ok(pb::AgentStatus::NotFound) => Ok(AgentAnswer::NotFound),
        Ok(pb::AgentStatus::Unspecified) | Err(_) => Err(Unavailable),
    }
}

/// Maps one feed message. Something unparseable means an invalidation may
/// have been missed: reset.
fn feed_event(ev: pb::InvalidationEvent) -> FeedEvent {
    use pb::invalidation_event::Kind;
    let parse = |s: &str| Uuid::parse_str(s).ok();
    match ev.kind {
        Some(Kind::Heartbeat(_)) => FeedEvent::Heartbeat {
            sent_at_unix_ms: ev.sent_at_unix_ms,
        },
        Some(Kind::Token(t)) => match (parse(&t.org_id), parse(&t.token_id)) {
            (Some(org), Some(token_id)) => FeedEvent::Token { org, token_id },
            _ => FeedEvent::Reset,
        },
        Some(Kind::Agent(a)) => match (parse(&a.org_id), parse(&a.agent_id)) {
            (Some(org), Some(agent)) => FeedEvent::Agent { org, agent },
            _ => FeedEvent::Reset,
        },
        Some(Kind::Org(o)) => {
            parse(&o.org_id).map_or(FeedEvent::Reset, |org| FeedEvent::Org { org })
        }
        None => FeedEvent::Reset,
    }
}

fn broadcast(subscribers: &Subscribers, event: FeedEvent) {
    let Ok(mut subs) = subscribers.lock() else {
        return;
    };
    subs.retain(|s| match s.tx.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            s.overflow.store(true, Ordering::Release);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
}

async fn watch(
    channel: Channel,
    key: ServiceKey,
    subscriber: String,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
) {
    let mut client = AuthServiceClient::new(channel);
    let mut backoff = BACKOFF_MIN;
    let mut was_up = true; // log the first failure
    loop {
        stats.feed_reconnects.fetch_add(1, Ordering::Relaxed);
        let req = pb::WatchInvalidationsRequest {
            subscriber: subscriber.clone(),
        };
        match client.watch_invalidations(key.request(req)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                // Whatever happened while we were away is unknown.
                broadcast(&subscribers, FeedEvent::Reset);
                stats.feed_connected.store(true, Ordering::Relaxed);
                tracing::info!("authd invalidation feed connected");
                was_up = true;
                let mut silence = FEED_SILENCE_MIN;
                let mut last_seq = 0u64;
                loop {
                    match tokio::time::timeout(silence, stream.message()).await {
                        Ok(Ok(Some(ev))) => {
                            backoff = BACKOFF_MIN;
                            if let Some(pb::invalidation_event::Kind::Heartbeat(hb)) = &ev.kind {
                                silence = FEED_SILENCE_MIN
                                    .max(Duration::from_millis(u64::from(hb.interval_ms) * 3));
                            }
                            let out_of_order = ev.seq != 0 && ev.seq <= last_seq;
                            last_seq = last_seq.max(ev.seq);
                            let event = if out_of_order {
                                FeedEvent::Reset
                            } else {
                                feed_event(ev)
                            };
                            broadcast(&subscribers, event);
                        }
                        Ok(Ok(None)) => break,
                        Ok(Err(status)) => {
                            tracing::warn!(code = ?status.code(), "authd invalidation feed broke");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!("authd invalidation feed silent; reconnecting");
                            break;
                        }
                    }
                }
                stats.feed_connected.store(false, Ordering::Relaxed);
            }
            Err(status) => {
                if was_up {
                    tracing::warn!(code = ?status.code(), "authd invalidation feed unavailable; retrying");
                    was_up = false;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_replies_fail_closed_on_nonsense() {
        let ok = pb::ValidateTokenResponse {
            status: pb::TokenStatus::Valid as i32,
            org_id: Uuid::from_u128(1).to_string(),
            token_id: Uuid::from_u128(2).to_string(),
            permissions: 3,
            expires_at_unix_ms: 0,
            agent_id: String::new(),
            user_id: String::new(),
            org_rpm_limit: 60,
        };
        let Ok(TokenAnswer::Valid(v)) = token_answer(ok.clone()) else {
            panic!("valid")
        };
        assert_eq!((v.expires_at_ms, v.agent, v.rpm), (None, None, 60));
        let bad_org = pb::ValidateTokenResponse {
            org_id: "x".into(),
            ..ok.clone()
        };
        assert_eq!(token_answer(bad_org), Err(Unavailable));
        let unspecified = pb::ValidateTokenResponse {
            status: 0,
            ..ok.clone()
        };
        assert_eq!(token_answer(unspecified), Err(Unavailable));
        let unknown = pb::ValidateTokenResponse { status: 99, ..ok };
        assert_eq!(token_answer(unknown), Err(Unavailable));
    }

    #[test]
    fn agent_statuses() {
        let a = |s: pb::AgentStatus| agent_answer(pb::ValidateAgentResponse { status: s as i32 });
        assert_eq!(a(pb::AgentStatus::Active), Ok(AgentAnswer::Active));
        assert_eq!(a(pb::AgentStatus::Paused), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::Archived), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::Suspended), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::NotFound), Ok(AgentAnswer::NotFound));
        assert_eq!(a(pb::AgentStatus::Unspecified), Err(Unavailable));
    }

    #[test]
    fn feed_events_parse_or_reset() {
        use pb::invalidation_event::Kind;
        let ev = |kind| pb::InvalidationEvent {
            seq: 1,
            sent_at_unix_ms: 1_800_000_000_123,
            kind: Some(kind),
        };
        let org = Uuid::from_u128(1);
        assert_eq!(
            feed_event(ev(Kind::Heartbeat(pb::Heartbeat { interval_ms: 100 }))),
            FeedEvent::Heartbeat {
                sent_at_unix_ms: 1_800_000_000_123
            }
        );
        assert_eq!(
            feed_event(ev(Kind::Token(pb::TokenInvalidated {
                org_id: org.to_string(),
                token_id: Uuid::from_u128(2).to_string()
            }))),
            FeedEvent::Token {
                org,
                token_id: Uuid::from_u128(2)
            }
        );
        assert_eq!(
            feed_event(ev(Kind::Agent(pb::AgentInvalidated {
                org_id: org.to_string(),
                agent_id: "junk".into()
            }))),
            FeedEvent::Reset
        );
        assert_eq!(
            feed_event(ev(Kind::Org(pb::OrgInvalidated {
                org_id: org.to_string()
            }))),
            FeedEvent::Org { org }
        );
    }
}
