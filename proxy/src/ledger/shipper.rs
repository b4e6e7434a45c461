//! The shipper thread: reads durable frames back from the spool, oldest segment first, sends
//! them to authd in batches of at most [`MAX_BATCH`] (`RecordUsage`, which answers only after
//! COMMIT), and deletes a segment once it is sealed and every record in it was acknowledged.
//! A failed call is retried with the same records (authd stores a record once whatever happens),
//! backing off up to [`MAX_BACKOFF`]. It runs on its own thread with a current-thread tokio
//! runtime, far from the request path.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ibex_proto::pb;

use super::segment::{self, Item};
use super::stats::WARN_AGE_MS;
use super::Shared;

pub const MAX_BATCH: usize = 5_000;
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_millis(50);

/// Where batches go: authd's `RecordUsage` in production ([`AuthdSink`]).
pub trait Sink {
    /// `Ok` only once every record is committed (stored now or before).
    fn send(&mut self, records: Vec<pb::UsageRecord>) -> impl Future<Output = Result<(), String>>;
}

/// `RecordUsage` over tonic, with the service key when one is configured.
pub struct AuthdSink {
    endpoints: Vec<tonic::transport::Endpoint>,
    /// Made on first use, inside the shipper's runtime (tonic's balancer spawns on it).
    client: Option<pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>>,
    metadata: Vec<(
        &'static str,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )>,
}

impl AuthdSink {
    /// `urls`: authd gRPC addresses (several are balanced). `metadata`: headers sent with every
    /// call (the service key once authd requires one).
    pub fn new(
        endpoints: Vec<tonic::transport::Endpoint>,
        metadata: Vec<(
            &'static str,
            tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        )>,
    ) -> anyhow::Result<Self> {
        let endpoints: Vec<_> = endpoints
            .into_iter()
            .map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(30))
            })
            .collect();
        anyhow::ensure!(
            !endpoints.is_empty(),
            "no authd address for the usage shipper"
        );
        Ok(AuthdSink {
            endpoints,
            client: None,
            metadata,
        })
    }
}

impl Sink for AuthdSink {
    async fn send(&mut self, records: Vec<pb::UsageRecord>) -> Result<(), String> {
        let mut request = tonic::Request::new(pb::RecordUsageRequest { records });
        for (k, v) in &self.metadata {
            request.metadata_mut().insert(*k, v.clone());
        }
        let client = self.client.get_or_insert_with(|| {
            let channel =
                tonic::transport::Channel::balance_list(self.endpoints.clone().into_iter());
            pb::auth_service_client::AuthServiceClient::new(channel)
                .max_decoding_message_size(1 << 20)
        });
        client
            .record_usage(request)
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }
}

pub fn spawn<S: Sink + Send + 'static>(
    shared: Arc<Shared>,
    sink: S,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(std::thread::Builder::new()
        .name("ibex-ledger-shipper".into())
        .spawn(move || rt.block_on(run(shared, sink)))?)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Ships until [`Shared::stop`]; public so tests can drive it on their own runtime.
pub async fn run<S: Sink>(shared: Arc<Shared>, mut sink: S) {
    // Position: segment id and the offset up to which everything was acknowledged.
    let mut cursor: Option<(u64, u64)> = None;
    let mut last_warn = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let next = {
            let segments = shared.segments();
            let from = cursor.map_or(0, |(id, _)| id);
            segments
                .range(from..)
                .next()
                .map(|(id, state)| (*id, *state))
        };
        let Some((id, state)) = next else {
            wait(&shared).await;
            continue;
        };
        let offset = match cursor {
            Some((cid, off)) if cid == id => off,
            _ => 0,
        };
        if offset >= state.durable {
            if state.sealed {
                delete(&shared, id, state.durable);
                cursor = Some((id + 1, 0));
            } else {
                shared.stats.oldest_unshipped_ms.store(0, Ordering::Relaxed);
                wait(&shared).await;
            }
            continue;
        }
        let bytes = match segment::read_range(&shared.dir, id, offset, state.durable) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(segment = id, error = %err, "cannot read a usage spool segment");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        let base = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut batch = Vec::new();
        let mut end = offset;
        let mut torn = 0;
        for item in segment::scan(&shared.key, &bytes, base) {
            if batch.len() == MAX_BATCH {
                break;
            }
            match item {
                Item::Record(r, e) => {
                    batch.push(*r);
                    end = e as u64;
                }
                Item::Skipped(e) => {
                    torn += 1;
                    end = e as u64;
                }
            }
        }
        if torn > 0 {
            tracing::warn!(
                segment = id,
                stretches = torn,
                "usage spool: skipped torn or corrupted frames"
            );
            shared.stats.torn_skipped.fetch_add(torn, Ordering::Relaxed);
        }
        if let Some(first) = batch.first() {
            let oldest = u64::try_from(first.started_at_ms).unwrap_or(0).max(1);
            shared
                .stats
                .oldest_unshipped_ms
                .store(oldest, Ordering::Relaxed);
            let n = batch.len() as u64;
            let records: Vec<_> = batch.iter().map(|r| r.to_pb()).collect();
            let mut backoff = Duration::from_millis(50);
            loop {
                match sink.send(records.clone()).await {
                    Ok(()) => break,
                    Err(err) => {
                        shared.stats.ship_errors.fetch_add(1, Ordering::Relaxed);
                        let now = now_ms();
                        let age = shared.stats.oldest_age_ms(now);
                        if age > WARN_AGE_MS && now.saturating_sub(last_warn) >= WARN_AGE_MS {
                            last_warn = now;
                            tracing::warn!(age_s = age / 1000, error = %err, "usage records wait unshipped for over a minute");
                        } else {
                            tracing::debug!(error = %err, "RecordUsage failed; retrying");
                        }
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            shared.stats.shipped.fetch_add(n, Ordering::Relaxed);
        }
        cursor = Some((id, end));
    }
}

/// Until the writer made something durable, or a short idle time.
async fn wait(shared: &Shared) {
    let _ = tokio::time::timeout(IDLE, shared.durable.notified()).await;
}

fn delete(shared: &Shared, id: u64, len: u64) {
    let path = segment::segment_path(&shared.dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            let _ = segment::sync_dir(&shared.dir);
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::error!(segment = id, error = %err, "cannot delete a shipped usage segment");
            return;
        }
    }
    shared.segments().remove(&id);
    let _ = shared
        .disk_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_sub(len))
        });
}
