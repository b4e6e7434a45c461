//! The shipper thread: reads durable frames back from the spool, oldest segment first, sends
//! them to authd in batches of at most [`MAX_BATCH`] (`ShipUsage`, which answers only after
//! COMMIT), and deletes a segment once it is sealed and every record in it was acknowledged.
//! A failed call is retried with the same records (authd stores a record once whatever happens),
//! backing off up to [`MAX_BACKOFF`]. It runs on its own thread with a current-thread tokio
//! runtime, far from the request path.
//!
//! A batch is the spool's record encodings copied as they are, each after its length (the
//! `ShipUsage` body, [`ibex_proto::usage::Entries`]): nothing is re-encoded or allocated per
//! record, and a retry resends the same bytes. It reads at most [`READ_CAP`] bytes of a segment
//! per batch. Records of a previous process's segment are each decoded before they are sent (one
//! that does not decode is skipped and counted, so authd never refuses a call for it); this
//! process's own batch frames go whole, their records made by this process's encoder — should
//! authd refuse such a batch (INVALID_ARGUMENT), it is rebuilt with every record decoded and sent
//! again ([`SendError::Refused`]). An authd older than `ShipUsage` answers UNIMPLEMENTED, and
//! one older than the version 2 record encoding INVALID_ARGUMENT to a batch whose every record
//! decoded here: the same batch then goes as a `RecordUsage` (protobuf records,
//! [`RecordRef::encode_pb`](super::record::RecordRef::encode_pb)) and `ShipUsage` is tried
//! again a minute later.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use ibex_proto::pb;
use ibex_proto::usage::Entries;
use prost::encoding::{encode_key, encode_varint, WireType};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::record::RecordRef;
use super::segment::{self, Item};
use super::stats::WARN_AGE_MS;
use super::Shared;

pub const MAX_BATCH: usize = 5_000;
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait for the writer's word (`Shared::durable`) when caught up: a safety net only,
/// as the writer notifies after every fsync, rotation and stop. Each wake-up of an idle thread
/// costs ≈ 0.1 ms of CPU on these VMs (perf/RESULTS.md §15.2): at 50 ms (until 2026-12-03) an
/// idle shipper burnt ≈ 4 ms a second.
const IDLE: Duration = Duration::from_secs(1);
/// A batch smaller than [`FULL_BATCH_BYTES`] of the active segment waits until this long after
/// the last call: fewer, larger calls (each costs the proxy a few hundred µs of gRPC and
/// wake-ups, whatever its size), for records reaching Postgres ≤ this much later.
pub const SHIP_EVERY: Duration = Duration::from_millis(250);
/// Spool bytes of about [`MAX_BATCH`] records: that much ready ships at once.
const FULL_BATCH_BYTES: u64 = MAX_BATCH as u64 * 113;
/// Most bytes read from a segment for one batch: [`MAX_BATCH`] typical records (113 bytes,
/// perf/RESULTS.md) with room to spare; a read never copies much more than a batch needs.
pub const READ_CAP: u64 = MAX_BATCH as u64 * 160;
/// How long to keep to `RecordUsage` after an authd answered `ShipUsage` UNIMPLEMENTED or
/// INVALID_ARGUMENT.
const LEGACY_FOR: Duration = Duration::from_secs(60);

/// One call's records: their entries (length + compact encoding, back to back) and how many.
#[derive(Debug, Clone)]
pub struct Batch {
    pub entries: Bytes,
    pub records: u64,
    /// Every record was decoded here before it was put in (so authd can refuse none of them).
    pub checked: bool,
}

impl Batch {
    /// The `ShipUsageRequest` fields before the entries (the entries follow as they are).
    fn head(&self) -> Bytes {
        let mut head = BytesMut::with_capacity(24);
        encode_key(2, WireType::Varint, &mut head);
        encode_varint(self.records, &mut head);
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(self.entries.len() as u64, &mut head);
        head.freeze()
    }

    /// The same records as a `RecordUsageRequest` body (for an authd without `ShipUsage`), and
    /// how many did not decode and were left out (none in a [`Batch::checked`] one).
    pub fn record_usage_body(&self) -> (Bytes, u64) {
        let mut body = BytesMut::with_capacity(self.entries.len() * 3 / 2);
        let mut one = Vec::with_capacity(512);
        let mut bad = 0;
        for entry in Entries::new(&self.entries) {
            match RecordRef::decode(entry) {
                Some(r) => {
                    one.clear();
                    r.encode_pb(&mut one);
                    encode_key(1, WireType::LengthDelimited, &mut body);
                    encode_varint(one.len() as u64, &mut body);
                    body.extend_from_slice(&one);
                }
                None => bad += 1,
            }
        }
        (body.freeze(), bad)
    }

    /// The records it holds, as a `RecordUsageRequest` (tests and sinks that look inside), and
    /// how many did not decode.
    pub fn decode(&self) -> Result<(pb::RecordUsageRequest, u64), prost::DecodeError> {
        let (body, bad) = self.record_usage_body();
        Ok((prost::Message::decode(body)?, bad))
    }
}

/// Where batches go: authd's `ShipUsage` in production ([`AuthdSink`]).
pub trait Sink {
    /// `Ok` only once every record is committed (stored now or before).
    fn send(&mut self, batch: &Batch) -> impl Future<Output = Result<(), SendError>>;
}

/// Why a batch is not committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// authd refused a batch whose records were not each decoded here (INVALID_ARGUMENT): the
    /// shipper rebuilds it with every record decoded, skipping any that does not.
    Refused(String),
    /// Anything else (authd down, Postgres stalled, …): the same batch is sent again.
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Refused(e) => write!(f, "refused: {e}"),
            SendError::Failed(e) => f.write_str(e),
        }
    }
}

const SHIP_USAGE: &str = "/ibex.auth.v1.AuthService/ShipUsage";
const RECORD_USAGE: &str = "/ibex.auth.v1.AuthService/RecordUsage";

/// A request body already encoded, in pieces sent one after the other (the `ShipUsage` head,
/// then the entries as the spool held them); the reply decoded as the generated client does.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplyDecoder;

impl Codec for RawCodec {
    type Encode = [Bytes; 2];
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
    type Item = [Bytes; 2];
    type Error = tonic::Status;

    fn encode(&mut self, item: [Bytes; 2], dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        let [head, rest] = item;
        dst.put(head);
        dst.put(rest);
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
    /// Until when to call `RecordUsage` (an authd answered `ShipUsage` UNIMPLEMENTED).
    legacy_until: Option<tokio::time::Instant>,
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
            legacy_until: None,
        })
    }
}

impl Sink for AuthdSink {
    async fn send(&mut self, batch: &Batch) -> Result<(), SendError> {
        let failed =
            |s: tonic::Status| SendError::Failed(format!("{:?}: {}", s.code(), s.message()));
        let legacy = self
            .legacy_until
            .is_some_and(|t| tokio::time::Instant::now() < t);
        if !legacy {
            match self
                .call(SHIP_USAGE, [batch.head(), batch.entries.clone()])
                .await
            {
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!("authd has no ShipUsage (older than this proxy); shipping usage with RecordUsage");
                    self.legacy_until = Some(tokio::time::Instant::now() + LEGACY_FOR);
                }
                // A batch of this process's frames, sent unchecked: check it first.
                Err(status) if status.code() == tonic::Code::InvalidArgument && !batch.checked => {
                    return Err(SendError::Refused(status.message().to_owned()));
                }
                // Every record in the batch decoded here (`fill`): an authd that cannot read one
                // is older than its encoding (version 2 came after `ShipUsage`).
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    tracing::warn!(error = %status.message(), "authd refused this proxy's usage records (older than this proxy?); shipping usage with RecordUsage");
                    self.legacy_until = Some(tokio::time::Instant::now() + LEGACY_FOR);
                }
                other => return other.map_err(failed),
            }
        }
        let (body, bad) = batch.record_usage_body();
        if bad > 0 {
            // Only an unchecked batch has such records: never leave one out uncounted.
            return Err(SendError::Refused(format!("{bad} records do not decode")));
        }
        self.call(RECORD_USAGE, [body, Bytes::new()])
            .await
            .map_err(failed)
    }
}

impl AuthdSink {
    async fn call(&mut self, method: &'static str, body: [Bytes; 2]) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(body);
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
            .map_err(|e| tonic::Status::unavailable(format!("authd not ready: {e}")))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        client
            .unary::<[Bytes; 2], pb::RecordUsageResponse, _>(request, path, RawCodec)
            .await
            .map(|_| ())
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
        let short = match segment::read_capped_into(
            &shared.dir,
            id,
            offset,
            state.durable,
            READ_CAP,
            &mut bytes,
        ) {
            Ok(short) => short,
            Err(err) => {
                tracing::error!(segment = id, error = %err, "cannot read a usage spool segment");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        let base = usize::try_from(offset).unwrap_or(usize::MAX);
        // This process's frames go whole; a previous process's records are decoded one by one,
        // and so are this process's once authd refused a batch of them.
        let mut check = !state.ours;
        let mut counted = 0;
        let end = loop {
            body.reserve(bytes.len());
            let mut scan = if state.ours {
                segment::Scan::trusted(&shared.key, &bytes, base)
            } else {
                segment::Scan::new(&shared.key, &bytes, base)
            };
            if short {
                scan = scan.read_short();
            }
            let Filled {
                records: n,
                oldest,
                end,
                torn,
            } = fill(scan, offset, &mut body, check);
            // (A second pass over the same bytes finds what the first did, and more.)
            if torn > counted {
                tracing::warn!(
                    segment = id,
                    stretches = torn - counted,
                    "usage spool: skipped torn or corrupted frames"
                );
                shared
                    .stats
                    .torn_skipped
                    .fetch_add(torn - counted, Ordering::Relaxed);
                counted = torn;
            }
            let Some(oldest) = oldest else {
                break end;
            };
            let oldest = u64::try_from(oldest).unwrap_or(0).max(1);
            shared
                .stats
                .oldest_unshipped_ms
                .store(oldest, Ordering::Relaxed);
            let batch = Batch {
                entries: body.split().freeze(),
                records: n,
                checked: check,
            };
            let mut backoff = Duration::from_millis(50);
            last_call = Some(tokio::time::Instant::now());
            let sent = loop {
                match sink.send(&batch).await {
                    Ok(()) => break true,
                    Err(SendError::Refused(err)) if !batch.checked => {
                        tracing::warn!(segment = id, error = %err, "authd refused a batch of usage records; checking each record and sending again");
                        break false;
                    }
                    Err(err) => {
                        shared.stats.ship_errors.fetch_add(1, Ordering::Relaxed);
                        let now = now_ms();
                        let age = shared.stats.oldest_age_ms(now);
                        if age > WARN_AGE_MS && now.saturating_sub(last_warn) >= WARN_AGE_MS {
                            last_warn = now;
                            tracing::warn!(age_s = age / 1000, error = %err, "usage records wait unshipped for over a minute");
                        } else {
                            tracing::debug!(error = %err, "ShipUsage failed; retrying");
                        }
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            if sent {
                shared.stats.shipped.fetch_add(n, Ordering::Relaxed);
                break end;
            }
            check = true;
        };
        cursor = Some((id, end));
    }
}

/// What [`fill`] put in a batch.
pub struct Filled {
    pub records: u64,
    /// The first record's start (unix ms).
    pub oldest: Option<i64>,
    /// Segment offset just past the last item taken.
    pub end: u64,
    /// Torn or corrupted stretches skipped.
    pub torn: u64,
}

/// Appends the entries of up to [`MAX_BATCH`] records from `scan` to `entries` (the spool's
/// encodings copied as they are, each after its length). `check`: decode each record once and
/// leave out (and count) one that does not, so authd never gets one it would refuse; without it
/// a batch frame's payload goes whole, its first record decoded for its time (for this
/// process's own frames: their records came from this process's encoder).
/// `from`: the scan's start offset.
pub fn fill(scan: segment::Scan<'_, '_>, from: u64, entries: &mut BytesMut, check: bool) -> Filled {
    let mut filled = Filled {
        records: 0,
        oldest: None,
        end: from,
        torn: 0,
    };
    for item in scan {
        if filled.records == MAX_BATCH as u64 {
            break;
        }
        match item {
            Item::Record(r, payload, e) => {
                filled.oldest.get_or_insert(r.started_at_ms);
                entries.put_u32_le(u32::try_from(payload.len()).unwrap_or(u32::MAX));
                entries.extend_from_slice(payload);
                filled.records += 1;
                filled.end = e as u64;
            }
            Item::Batch(b, e) => {
                // Whole frames only: the next batch starts at a frame boundary.
                if filled.records + b.count > MAX_BATCH as u64 {
                    break;
                }
                filled.end = e as u64;
                let first = || Entries::new(b.entries).next().and_then(RecordRef::decode);
                if let Some(first) = (!check).then(first).flatten() {
                    filled.oldest.get_or_insert(first.started_at_ms);
                    entries.extend_from_slice(b.entries);
                    filled.records += b.count;
                    continue;
                }
                for entry in Entries::new(b.entries) {
                    match RecordRef::decode(entry) {
                        Some(r) => {
                            filled.oldest.get_or_insert(r.started_at_ms);
                            entries.put_u32_le(u32::try_from(entry.len()).unwrap_or(u32::MAX));
                            entries.extend_from_slice(entry);
                            filled.records += 1;
                        }
                        None => filled.torn += 1,
                    }
                }
            }
            Item::Skipped(e) => {
                filled.torn += 1;
                filled.end = e as u64;
            }
        }
    }
    filled
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
