//! The invalidation feed: Postgres `LISTEN ibex_invalidation` → every `WatchInvalidations`
//! subscriber, plus authd's own verified-token cache.
//!
//! One dedicated connection (not from the pool) LISTENs; its `Connection` is driven here with
//! `poll_message` so notifications arrive as they are sent. Every [`HEARTBEAT`] the listener runs
//! `SELECT 1` on that same connection, forwards any notification that arrived before its answer,
//! and only then broadcasts a heartbeat: a heartbeat means "the LISTEN connection answered within
//! the last interval and everything it delivered is already out". When the connection is lost,
//! heartbeats stop (subscribers see silence and fail closed), authd's own cache is distrusted
//! (hits are re-checked against the database), and the listener reconnects with backoff; after
//! re-LISTENing it clears the cache, since events may have been missed in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ibex_proto::pb::{self, invalidation_event::Kind};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use crate::cache::VerifiedCache;

pub const CHANNEL: &str = "ibex_invalidation";
/// `application_name` of the LISTEN connection (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "ibex-authd-listen";
/// Heartbeat interval announced to subscribers (`Heartbeat.interval_ms`).
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// The LISTEN connection counts as healthy this long after its last successful `SELECT 1`.
pub const HEALTHY_FOR: Duration = Duration::from_millis(250);
/// A `SELECT 1` slower than this drops the connection.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Events buffered per subscriber; a subscriber that falls further behind is disconnected.
pub const SUBSCRIBER_BUFFER: usize = 4096;
/// Notifications buffered between the connection driver and the dispatcher.
const NOTIFY_BUFFER: usize = 8192;

/// The fan-out point and the listener's health.
pub struct Feed {
    tx: broadcast::Sender<pb::InvalidationEvent>,
    /// Held while a seq is assigned and its event sent, and while a subscriber joins, so every
    /// subscriber sees strictly increasing seqs (proxies treat a step back as a reset).
    order: std::sync::Mutex<()>,
    seq: AtomicU64,
    started: Instant,
    /// Milliseconds since `started` until which the LISTEN connection counts as healthy.
    healthy_until_ms: AtomicU64,
}

/// The JSON the `notify_invalidation` trigger sends.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Notice {
    pub kind: String,
    pub op: String,
    pub org_id: Uuid,
    pub id: Uuid,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Feed {
    pub fn new() -> Arc<Feed> {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Arc::new(Feed {
            tx,
            order: std::sync::Mutex::new(()),
            seq: AtomicU64::new(0),
            started: Instant::now(),
            healthy_until_ms: AtomicU64::new(0),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the LISTEN connection answered recently: cached credentials may be trusted.
    pub fn is_healthy(&self) -> bool {
        self.elapsed_ms() < self.healthy_until_ms.load(Ordering::Acquire)
    }

    fn mark_healthy(&self) {
        let until = self.elapsed_ms() + u64::try_from(HEALTHY_FOR.as_millis()).unwrap_or(0);
        self.healthy_until_ms.store(until, Ordering::Release);
    }

    fn mark_unhealthy(&self) {
        self.healthy_until_ms.store(0, Ordering::Release);
    }

    pub fn event(&self, kind: Kind) -> pb::InvalidationEvent {
        pb::InvalidationEvent {
            seq: self.seq.fetch_add(1, Ordering::AcqRel) + 1,
            sent_at_unix_ms: unix_ms(),
            kind: Some(kind),
        }
    }

    pub fn heartbeat_kind() -> Kind {
        Kind::Heartbeat(pb::Heartbeat {
            interval_ms: u32::try_from(HEARTBEAT.as_millis()).unwrap_or(u32::MAX),
        })
    }

    fn publish(&self, kind: Kind) {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        // No subscribers is fine.
        let _ = self.tx.send(self.event(kind));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::InvalidationEvent> {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.tx.subscribe()
    }

    /// Subscribes, with a first heartbeat if the LISTEN connection is healthy right now. Every
    /// event the receiver will get has a higher seq than that heartbeat.
    pub fn subscribe_with_heartbeat(
        &self,
    ) -> (
        broadcast::Receiver<pb::InvalidationEvent>,
        Option<pb::InvalidationEvent>,
    ) {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let first = self
            .is_healthy()
            .then(|| self.event(Self::heartbeat_kind()));
        (rx, first)
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Applies one notification to authd's cache and fans it out.
    pub fn dispatch(&self, payload: &str, cache: &VerifiedCache) {
        let notice: Notice = match serde_json::from_str(payload) {
            Ok(notice) => notice,
            Err(err) => {
                // Unknown shape: flush everything rather than miss something.
                tracing::warn!(error = %err, "unparseable invalidation payload; clearing the cache");
                cache.clear();
                return;
            }
        };
        let kind = match notice.kind.as_str() {
            "token" => {
                // A new token cannot make a cached entry stale; everything else can. Stale, not
                // removed: the next validation re-reads the row instead of re-hashing (cache.rs).
                if notice.op != "INSERT" {
                    cache.mark_stale(notice.id);
                }
                Kind::Token(pb::TokenInvalidated {
                    org_id: notice.org_id.to_string(),
                    token_id: notice.id.to_string(),
                })
            }
            "agent" => Kind::Agent(pb::AgentInvalidated {
                org_id: notice.org_id.to_string(),
                agent_id: notice.id.to_string(),
            }),
            _ => {
                cache.invalidate_org(notice.org_id);
                Kind::Org(pb::OrgInvalidated {
                    org_id: notice.org_id.to_string(),
                })
            }
        };
        tracing::debug!(kind = %notice.kind, op = %notice.op, id = %notice.id, "invalidation");
        self.publish(kind);
    }

    /// Runs the listener until shutdown: connect, LISTEN, heartbeat, reconnect on loss.
    pub async fn run(
        self: Arc<Self>,
        database: crate::store::Database,
        cache: Arc<VerifiedCache>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut database = database;
        database.config.application_name(APPLICATION_NAME);
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match self.listen_once(&database, &cache, &mut shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "invalidation LISTEN connection lost; heartbeats stopped")
                }
            }
            self.mark_unhealthy();
            if started.elapsed() > BACKOFF_MAX * 2 {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn listen_once(
        &self,
        database: &crate::store::Database,
        cache: &VerifiedCache,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (client, mut connection) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            database.config.connect(database.connector.clone()),
        )
        .await??;
        let (notify_tx, mut notify_rx) = mpsc::channel::<String>(NOTIFY_BUFFER);
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if notify_tx.try_send(n.payload().to_owned()).is_err() {
                            return "notification buffer overflow".to_owned();
                        }
                    }
                    Ok(_) => {}
                    Err(err) => return err.to_string(),
                }
            }
            "connection closed".to_owned()
        });
        let mut driver = AbortOnDrop(driver);

        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        // Anything cached before this point may have missed events while we were not listening.
        cache.clear();
        self.ping(&client).await?;
        tracing::info!("invalidation feed listening");

        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                payload = notify_rx.recv() => match payload {
                    Some(payload) => self.dispatch(&payload, cache),
                    None => {
                        let reason = (&mut driver.0).await.unwrap_or_else(|e| e.to_string());
                        anyhow::bail!("LISTEN connection ended: {reason}");
                    }
                },
                _ = tick.tick() => {
                    self.ping(&client).await?;
                    while let Ok(payload) = notify_rx.try_recv() {
                        self.dispatch(&payload, cache);
                    }
                    self.publish(Self::heartbeat_kind());
                }
            }
        }
    }

    async fn ping(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1")).await??;
        self.mark_healthy();
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<String>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::VerifiedToken;

    #[test]
    fn dispatch_updates_the_cache_and_fans_out() {
        let feed = Feed::new();
        let cache = VerifiedCache::new(8, Duration::from_secs(600));
        let mut rx = feed.subscribe();
        let (org, token) = (Uuid::new_v4(), Uuid::new_v4());
        cache.insert_if_current(
            cache.epoch(),
            [1; 32],
            [0; 32],
            VerifiedToken {
                token_id: token,
                org_id: org,
                permissions: 1,
                agent_id: None,
                user_id: None,
                expires_at_ms: None,
                rpm_limit: 1,
                allowed_models: Vec::new(),
                org_allowed_models: Vec::new(),
                limits: Default::default(),
            },
        );
        let payload =
            |op: &str| format!(r#"{{"kind":"token","op":"{op}","org_id":"{org}","id":"{token}"}}"#);
        feed.dispatch(&payload("INSERT"), &cache);
        assert_eq!(cache.len(), 1, "an insert does not flush");
        feed.dispatch(&payload("UPDATE"), &cache);
        assert!(cache.get(token, &[1; 32]).expect("kept").stale);
        let first = rx.try_recv().expect("event");
        let second = rx.try_recv().expect("event");
        assert!(second.seq > first.seq);
        assert_eq!(
            second.kind,
            Some(Kind::Token(pb::TokenInvalidated {
                org_id: org.to_string(),
                token_id: token.to_string()
            }))
        );
        feed.dispatch("not json", &cache);
        assert!(!feed.is_healthy());
    }
}
