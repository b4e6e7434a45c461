//! The invalidation door: the bridge thread holds authd's
//! `WatchInvalidations` stream and fans every event out to each worker's own
//! bounded queue; a worker whose queue overflowed resets its trust. Each
//! worker applies its events with [`FeedReceiver::run`], on its own thread.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::auth::core::{AuthCore, FeedEvent};
use crate::metrics::BridgeStats;

/// Feed events buffered per worker; overflow resets that worker's trust.
const FEED_DEPTH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Reconnect when the feed is silent this long (or 3 heartbeat intervals).
const FEED_SILENCE_MIN: Duration = Duration::from_secs(1);

pub(super) struct Subscriber {
    tx: mpsc::Sender<FeedEvent>,
    overflow: Arc<AtomicBool>,
}

pub(super) type Subscribers = Arc<Mutex<Vec<Subscriber>>>;

/// Registers a new worker's queue.
pub(super) fn subscribe(subscribers: &Subscribers) -> FeedReceiver {
    let (tx, rx) = mpsc::channel(FEED_DEPTH);
    let overflow = Arc::new(AtomicBool::new(false));
    if let Ok(mut subs) = subscribers.lock() {
        subs.push(Subscriber {
            tx,
            overflow: overflow.clone(),
        });
    }
    FeedReceiver { rx, overflow }
}

/// One worker's end of the invalidation feed.
pub struct FeedReceiver {
    rx: mpsc::Receiver<FeedEvent>,
    overflow: Arc<AtomicBool>,
}

impl FeedReceiver {
    /// Applies events to this worker's caches until the bridge goes away.
    pub async fn run(mut self, core: Rc<AuthCore>) {
        while let Some(event) = self.rx.recv().await {
            if self.overflow.swap(false, Ordering::AcqRel) {
                core.apply(FeedEvent::Reset);
            }
            core.apply(event);
        }
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

/// Holds the feed of one listed authd (`balancer.health(index)`), reconnecting
/// with backoff. Each feed resets every worker's trust when it (re)connects:
/// what this stream missed while it was away is unknown, and a heartbeat on
/// it after the gap must not vouch for that gap. (Another feed that stayed
/// live did deliver those events; the reset only costs re-validations.)
pub(super) async fn watch(
    channel: Channel,
    key: super::ServiceKey,
    subscriber: String,
    subscribers: Subscribers,
    stats: Arc<BridgeStats>,
    balancer: super::balance::Balancer,
    index: usize,
) {
    let health = balancer.health(index);
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
                health.set_feed_up(true);
                stats.feed_connected.store(true, Ordering::Relaxed);
                stats
                    .feeds_connected
                    .store(balancer.feeds_up(), Ordering::Relaxed);
                tracing::info!(authd = index, "authd invalidation feed connected");
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
                            tracing::warn!(authd = index, code = ?status.code(), "authd invalidation feed broke");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(
                                authd = index,
                                "authd invalidation feed silent; reconnecting"
                            );
                            break;
                        }
                    }
                }
                health.set_feed_up(false);
                stats
                    .feed_connected
                    .store(balancer.feeds_up() > 0, Ordering::Relaxed);
                stats
                    .feeds_connected
                    .store(balancer.feeds_up(), Ordering::Relaxed);
            }
            Err(status) => {
                if was_up {
                    tracing::warn!(authd = index, code = ?status.code(), "authd invalidation feed unavailable; retrying");
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
