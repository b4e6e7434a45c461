//! What the usage ledger adds to a forwarded request on the worker (SPEC §10): the parts the
//! request path runs, with the spool's writer thread draining in the background as in the proxy.
//!
//! Run (release profile):
//!
//! ```text
//! cargo bench -p ibex-bench --bench ledger
//! ```
//!
//! Cases:
//! - `ledger/record`: [`Recorder::record`] of a typical chat record (encode into the worker's
//!   buffer under its own lock).
//! - `ledger/meter`: a whole request's share: `Meter::start` (ids, request body kept by
//!   reference) and `Pending::finish` (model, provider usage, price look-up, record).
//! - `ledger/ask_for_usage_plain`: the stream check on a 1 KiB non-streamed chat body (skipped
//!   without a parse).
//! - `ledger/ask_for_usage_stream`: adding `include_usage` to a 1 KiB streamed chat body.
//!
//! Off the request path (the spool's threads; per record):
//! - `ledger/frame_batch_1000`: the writer framing a worker buffer of 1,000 records into batch
//!   frames at the cuts the worker noted (keyed BLAKE3 over ≤ 64 KiB each); divide by 1,000.
//! - `ledger/frame_siphash` / `ledger/frame_sha256`: one record in a frame of the second
//!   (SipHash-2-4) and the first (SHA-256) format, as the writer made them before.
//! - `ledger/ship_1000`: the shipper turning the batch frames of 1,000 records of its own
//!   process into one `ShipUsage` body (scan + each frame's payload copied); divide by 1,000.
//! - `ledger/ship_1000_single_frames`: the same from 1,000 one-record frames.
//! - `ledger/ship_1000_pb`: 1,000 one-record frames into a `RecordUsage` body (scan + protobuf
//!   encode: the shipper before `ShipUsage`, and its fallback for an older authd).
//!
//! Results (wall time per call, criterion's mean; 2 vCPU VM, release, thin LTO; ±15 %):
//!
//! | date       | record | meter | ask_for_usage_plain | ask_for_usage_stream |
//! |------------|--------|-------|---------------------|----------------------|
//! | 2026-12-01 | 283–381 ns | 0.75–1.37 µs | 142 ns | 775–823 ns |
//! | 2026-12-02 | 2.6 µs (load 8.5: noise, see perf/RESULTS.md §12) | 1.6–2.2 µs (same) | 145–152 ns | 727–800 ns |
//! | 2026-12-02 07:10, pinned, load 1.25 | 1.26 µs [0.60–2.22] (bimodal: buffer growth) | 651 ns | 93 ns | 366 ns |
//!
//! | 2026-12-02 17:32, pinned, load 0.4 | 0.99 µs [0.38–1.92] (bimodal) | 1.03 µs [0.30–2.70] (bimodal) | 49 ns | 289 ns |
//!
//! Same run as 07:10: `frame_siphash` 111 ns, `frame_sha256` 227 ns, `ship_1000` (then the
//! protobuf path) 152.7 µs (0.153 µs per record). At 17:32: `frame_batch_1000` 56.3 µs,
//! `frame_siphash` 87 ns, `ship_1000` 8.9 µs, `ship_1000_single_frames` 62.8 µs, `ship_1000_pb`
//! 121 µs (perf/RESULTS.md §15).

#![expect(
    clippy::expect_used,
    reason = "a bench's setup failing should stop it loudly"
)]

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use ibex_proxy::ledger::meter::MeterFactory;
use ibex_proxy::ledger::prices::{PriceBook, Prices};
use ibex_proxy::ledger::stream_usage::ask_for_usage;
use ibex_proxy::ledger::{segment, shipper, Ledger, LedgerConfig, UsageRecord};
use uuid::Uuid;

// The proxy's allocator (proxy/src/main.rs), so allocations cost here what they cost there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn body(stream: bool) -> Bytes {
    let content = "x".repeat(900);
    let s = if stream { r#""stream":true,"# } else { "" };
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini",{s}"messages":[{{"role":"user","content":"{content}"}}]}}"#
    ))
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ibex-bench-spool-{}", Uuid::new_v4()));
    let ledger = Ledger::open(&LedgerConfig {
        dir: dir.clone(),
        max_bytes: 1 << 40,
    })
    .expect("spool");
    let recorder = ledger.recorder();
    let record = UsageRecord {
        request_id: Uuid::new_v4().to_string(),
        org_id: Uuid::new_v4(),
        agent_id: Uuid::new_v4(),
        token_id: Uuid::new_v4(),
        model: "gpt-4o-mini".into(),
        route: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: 120,
        completion_tokens: 300,
        total_tokens: 420,
        started_at_ms: 1_764_547_200_000,
        duration_ms: 850,
        cost_usd: Some(0.000_198),
        ..Default::default()
    };
    let mut g = c.benchmark_group("ledger");
    g.bench_function("record", |b| b.iter(|| recorder.record(black_box(&record))));
    // The encoding alone (a UUID request id, as the proxy's own ids are), into a reused buffer.
    let mut encoded = Vec::with_capacity(512);
    g.bench_function("encode", |b| {
        b.iter(|| {
            encoded.clear();
            black_box(&record).borrowed().encode(&mut encoded);
            encoded.len()
        })
    });

    let prices =
        Prices::parse(r#"{"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}"#)
            .expect("prices");
    let meter = MeterFactory {
        ledger: ledger.shared().clone(),
        prices: Arc::new(PriceBook::new(prices)),
    }
    .meter();
    let (org, agent, token) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let plain = body(false);
    g.bench_function("meter", |b| {
        b.iter(|| {
            let mut p = meter.start(
                "6f1c2a9e-3b7d-4e0f-9a51-0c2d8e7f6a10",
                org,
                agent,
                token,
                "/v1/chat/completions",
                plain.clone(),
            );
            p.seen.status = 200;
            p.seen.usage = Some((120, 300, 420));
            p.model = Some("gpt-4o-mini".into());
            p.finish();
        })
    });
    g.bench_function("ask_for_usage_plain", |b| {
        b.iter(|| ask_for_usage(black_box(&plain)))
    });
    let streamed = body(true);
    g.bench_function("ask_for_usage_stream", |b| {
        b.iter(|| ask_for_usage(black_box(&streamed)))
    });
    let mut payload = Vec::new();
    record.encode(&mut payload);
    let key = [7u8; 32];
    let mut framed = Vec::with_capacity(1 << 20);
    g.bench_function("frame_siphash", |b| {
        b.iter(|| {
            framed.clear();
            segment::frame(&key, black_box(&payload), &mut framed);
        })
    });
    g.bench_function("frame_sha256", |b| {
        b.iter(|| {
            framed.clear();
            segment::frame_sha256(&key, black_box(&payload), &mut framed);
        })
    });
    // The writer now: one worker buffer of 1,000 records into batch frames (divide by 1,000).
    let mut entries_in = Vec::new();
    for _ in 0..1000 {
        ibex_proxy::ledger::record::put_entry(&record.borrowed(), &mut entries_in);
    }
    let mut buffered = ibex_proxy::ledger::Buffered::default();
    for _ in 0..1000 {
        buffered.push(&record.borrowed());
    }
    g.bench_function("frame_batch_1000", |b| {
        b.iter(|| {
            framed.clear();
            segment::frame_cut(
                &key,
                black_box(&buffered.bytes),
                &buffered.cuts,
                &mut framed,
            );
        })
    });
    framed.clear();
    for _ in 0..1000 {
        segment::frame(&key, &payload, &mut framed);
    }
    let mut body = Vec::with_capacity(1 << 20);
    let mut one = Vec::with_capacity(512);
    // Before ShipUsage: each record decoded and re-encoded as protobuf for RecordUsage.
    g.bench_function("ship_1000_pb", |b| {
        b.iter(|| {
            body.clear();
            for item in segment::Scan::trusted(&key, black_box(&framed), 0) {
                if let segment::Item::Record(r, _, _) = item {
                    one.clear();
                    r.encode_pb(&mut one);
                    prost::encoding::encode_key(
                        1,
                        prost::encoding::WireType::LengthDelimited,
                        &mut body,
                    );
                    prost::encoding::encode_varint(one.len() as u64, &mut body);
                    body.extend_from_slice(&one);
                }
            }
            body.len()
        })
    });
    // ShipUsage from one-record frames (the second format): each payload copied after its length.
    let mut entries = bytes::BytesMut::with_capacity(1 << 20);
    g.bench_function("ship_1000_single_frames", |b| {
        b.iter(|| {
            entries.clear();
            let scan = segment::Scan::trusted(&key, black_box(&framed), 0);
            shipper::fill(scan, 0, &mut entries, true).records
        })
    });
    // ShipUsage from the writer's batch frames of a previous process: each record decoded.
    framed.clear();
    segment::frame_entries(&key, &entries_in, &mut framed);
    g.bench_function("ship_1000_checked", |b| {
        b.iter(|| {
            entries.clear();
            let scan = segment::Scan::new(&key, black_box(&framed), 0);
            shipper::fill(scan, 0, &mut entries, true).records
        })
    });
    // … and of this process: a frame's payload copied as it is.
    g.bench_function("ship_1000", |b| {
        b.iter(|| {
            entries.clear();
            let scan = segment::Scan::trusted(&key, black_box(&framed), 0);
            shipper::fill(scan, 0, &mut entries, false).records
        })
    });
    g.finish();
    ledger.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
