//! The shipper thread: reads durable frames back from the spool, oldest segment first, sends
//! them to authd in batches of at most [`MAX_BATCH`] (`RecordUsage`, which answers only after
//! COMMIT), and deletes a segment once it is sealed and every record in it was acknowledged.
//! A failed call is retried with the same records (authd stores a record once whatever happens),
//! backing off up to [`MAX_BACKOFF`]. It runs on its own thread with a current-thread tokio
//! runtime, far from the request path.
//!
//! A batch goes from spool bytes to the `RecordUsageRequest` body directly
//! ([`RecordRef::encode_pb`](super::record::RecordRef::encode_pb) per frame, into one buffer):
//! no message is built and nothing is allocated per record, and a retry resends the same bytes
//! ([`RawCodec`]). On the wire it is the generated client's call, byte for byte.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use ibex_proto::pb;
use prost::encoding::{encode_key, encode_varint, WireType};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::segment::{self, Item};
use super::stats::WARN_AGE_MS;
use super::Shared;

pub const MAX_BATCH: usize = 5_000;
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_millis(50);
/// A batch smaller than [`FULL_BATCH_BYTES`] of the active segment waits until this long after
/// the last call: fewer, larger calls (each costs the proxy a few hundred µs of gRPC and
/// wake-ups, whatever its size), for records reaching Postgres ≤ this much later.
pub const SHIP_EVERY: Duration = Duration::from_millis(250);
/// Spool bytes of about [`MAX_BATCH`] records: that much ready ships at once.
const FULL_BATCH_BYTES: u64 = MAX_BATCH as u64 * 200;

/// One `RecordUsage` call: the encoded `RecordUsageRequest` and how many records it holds.
#[derive(Debug, Clone)]
pub struct Batch {
    pub body: Bytes,
    pub records: u64,
}

impl Batch {
    /// The request it encodes (tests and sinks that look inside).
    pub fn decode(&self) -> Result<pb::RecordUsageRequest, prost::DecodeError> {
        prost::Message::decode(self.body.clone())
    }
}

/// Where batches go: authd's `RecordUsage` in production ([`AuthdSink`]).
pub trait Sink {
    /// `Ok` only once every record is committed (stored now or before).
    fn send(&mut self, batch: &Batch) -> impl Future<Output = Result<(), String>>;
}

const RECORD_USAGE: &str = "/ibex.auth.v1.AuthService/RecordUsage";

/// `RecordUsage` with a body already encoded: sends [`Bytes`] as they are, decodes the reply
/// as the generated client does.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplyDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = pb::RecordUsageResponse;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for ReplyDecoder {
    type Item = pb::RecordUsageResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<pb::RecordUsageResponse>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// `RecordUsage` over tonic, with the service key when one is configured.
pub struct AuthdSink {
    endpoints: Vec<tonic::transport::Endpoint>,
    /// Made on first use, inside the shipper's runtime (tonic's balancer spawns on it).
    client: Option<tonic::client::Grpc<tonic::transport::Channel>>,
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
    async fn send(&mut self, batch: &Batch) -> Result<(), String> {
        let mut request = tonic::Request::new(batch.body.clone());
        for (k, v) in &self.metadata {
            request.metadata_mut().insert(*k, v.clone());
        }
        let client = self.client.get_or_insert_with(|| {
            let channel =
                tonic::transport::Channel::balance_list(self.endpoints.clone().into_iter());
            tonic::client::Grpc::new(channel).max_decoding_message_size(1 << 20)
        });
        client
            .ready()
            .await
            .map_err(|e| format!("authd not ready: {e}"))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(RECORD_USAGE);
        client
            .unary::<Bytes, pb::RecordUsageResponse, _>(request, path, RawCodec)
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
    // Reused from batch to batch (no fresh pages to fault in and zero for every batch).
    let mut bytes = Vec::new();
    let mut body = BytesMut::new();
    let mut one = Vec::with_capacity(512);
    let mut last_call: Option<tokio::time::Instant> = None;
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
        if let Some(last) = last_call {
            let since = last.elapsed();
            if !state.sealed && state.durable - offset < FULL_BATCH_BYTES && since < SHIP_EVERY {
                tokio::time::sleep(SHIP_EVERY - since).await;
                continue;
            }
        }
        match segment::read_range_into(&shared.dir, id, offset, state.durable, &mut bytes) {
            Ok(()) => {}
            Err(err) => {
                tracing::error!(segment = id, error = %err, "cannot read a usage spool segment");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        let base = usize::try_from(offset).unwrap_or(usize::MAX);
        // pb records run ~1.3× the spool's (ids as text).
        body.reserve(bytes.len().min(MAX_BATCH * 512) * 3 / 2);
        let mut n = 0u64;
        let mut oldest = None;
        let mut end = offset;
        let mut torn = 0;
        let scan = if state.ours {
            segment::Scan::trusted(&shared.key, &bytes, base)
        } else {
            segment::Scan::new(&shared.key, &bytes, base)
        };
        for item in scan {
            if n == MAX_BATCH as u64 {
                break;
            }
            match item {
                Item::Record(r, e) => {
                    oldest.get_or_insert(r.started_at_ms);
                    one.clear();
                    r.encode_pb(&mut one);
                    encode_key(1, WireType::LengthDelimited, &mut body);
                    encode_varint(one.len() as u64, &mut body);
                    body.extend_from_slice(&one);
                    n += 1;
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
        if let Some(oldest) = oldest {
            let oldest = u64::try_from(oldest).unwrap_or(0).max(1);
            shared
                .stats
                .oldest_unshipped_ms
                .store(oldest, Ordering::Relaxed);
            let batch = Batch {
                body: body.split().freeze(),
                records: n,
            };
            let mut backoff = Duration::from_millis(50);
            last_call = Some(tokio::time::Instant::now());
            loop {
                match sink.send(&batch).await {
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
