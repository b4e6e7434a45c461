//! Writer + shipper over a real directory, shipping to an in-memory sink that can be stalled
//! (the end-to-end tests in `tests/tests/ledger.rs` ship to a real authd and Postgres).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibex_proto::pb;
use uuid::Uuid;

use super::shipper::{Batch, SendError, Sink};
use super::*;

#[derive(Clone, Default)]
struct Memory {
    got: Arc<Mutex<Vec<pb::UsageRecord>>>,
    stalled: Arc<AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

/// Like authd: refuses a whole batch holding a record that does not decode.
impl Sink for Memory {
    async fn send(&mut self, batch: &Batch) -> Result<(), SendError> {
        if self.stalled.load(Ordering::SeqCst) {
            return Err(SendError::Failed("stalled".into()));
        }
        let (request, bad) = batch
            .decode()
            .map_err(|e| SendError::Failed(e.to_string()))?;
        if bad > 0 {
            assert!(
                !batch.checked,
                "a checked batch holds only records that decode"
            );
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(SendError::Refused(format!("{bad} records do not decode")));
        }
        let records = request.records;
        assert_eq!(records.len() as u64, batch.records, "the batch's count");
        self.got.lock().expect("lock").extend(records);
        Ok(())
    }
}

impl Memory {
    /// Request id → times received.
    fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.got.lock().expect("lock").iter() {
            *m.entry(r.request_id.clone()).or_default() += 1;
        }
        m
    }
}

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ibex-spool-test-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn rec(i: usize) -> UsageRecord {
    UsageRecord {
        request_id: format!("r-{i}"),
        org_id: Uuid::from_u128(1),
        agent_id: Uuid::from_u128(2),
        token_id: Uuid::from_u128(3),
        model: "m".into(),
        route: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: 1,
        completion_tokens: 2,
        total_tokens: 3,
        started_at_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A ledger on a fresh 1 MiB spool, shipping to a [`Memory`] sink.
fn shipping_to_memory() -> (std::path::PathBuf, Ledger, Memory) {
    let d = dir();
    let mut ledger = Ledger::open(&LedgerConfig {
        dir: d.clone(),
        max_bytes: 1 << 20,
    })
    .expect("open");
    let sink = Memory::default();
    ledger.ship(sink.clone()).expect("ship");
    (d, ledger, sink)
}

fn seg_files(d: &std::path::Path) -> usize {
    segment::list(d).expect("list").len()
}

#[test]
fn every_record_is_shipped_once_and_shipped_segments_are_deleted() {
    let d = dir();
    let config = LedgerConfig {
        dir: d.clone(),
        max_bytes: 64 << 10,
    };
    let mut ledger = Ledger::open(&config).expect("open");
    let sink = Memory::default();
    ledger.ship(sink.clone()).expect("ship");
    let (a, b) = (ledger.recorder(), ledger.recorder());
    let n = 2_000;
    let t = std::thread::spawn(move || (0..n).step_by(2).for_each(|i| a.record(&rec(i))));
    (1..n).step_by(2).for_each(|i| b.record(&rec(i)));
    t.join().expect("thread");
    poll("all shipped", || sink.counts().len() == n);
    assert!(sink.counts().values().all(|&c| c == 1));
    // 2000 records of ~100 bytes rotate 4 KiB segments many times; all but the active one go.
    poll("segments deleted", || seg_files(&d) == 1);
    let stats = &ledger.shared().stats;
    assert_eq!(stats.spooled.load(Ordering::Relaxed), n as u64);
    // (Counted once the call returned, just after the sink took the records.)
    poll("counted as shipped", || {
        stats.shipped.load(Ordering::Relaxed) == n as u64
    });
    assert_eq!(stats.torn_skipped.load(Ordering::Relaxed), 0);
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// This process's frames are shipped without decoding each record. Should one ever hold a
/// record authd cannot read (an empty request id encodes but does not decode; no request makes
/// one), authd refuses the batch, and the shipper sends it again with each record checked: the
/// bad record is left out and counted, every other arrives once, shipping goes on.
#[test]
fn a_batch_authd_refuses_is_sent_again_checked_and_only_the_bad_record_is_left_out() {
    let (d, ledger, sink) = shipping_to_memory();
    let r = ledger.recorder();
    for i in 0..20 {
        r.record(&rec(i));
        if i == 9 {
            r.record(&UsageRecord {
                request_id: String::new(),
                ..rec(99)
            });
        }
    }
    let stats = &ledger.shared().stats;
    poll("the good records shipped", || {
        stats.shipped.load(Ordering::Relaxed) == 20
    });
    assert_eq!(sink.counts().len(), 20);
    assert!(sink.counts().values().all(|&c| c == 1));
    assert_eq!(stats.torn_skipped.load(Ordering::Relaxed), 1);
    assert!(
        sink.refused.load(Ordering::SeqCst) >= 1,
        "sent unchecked first"
    );
    assert_eq!(stats.spooled.load(Ordering::Relaxed), 21);
    // And the next records go as usual.
    r.record(&rec(20));
    poll("one more shipped", || {
        stats.shipped.load(Ordering::Relaxed) == 21
    });
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn full_spool_refuses_until_shipping_resumes_and_nothing_is_lost() {
    let d = dir();
    let config = LedgerConfig {
        dir: d.clone(),
        max_bytes: 8 << 10,
    };
    let mut ledger = Ledger::open(&config).expect("open");
    let sink = Memory::default();
    sink.stalled.store(true, Ordering::SeqCst);
    ledger.ship(sink.clone()).expect("ship");
    let r = ledger.recorder();
    assert!(r.admit());
    let mut written = 0;
    while r.admit() {
        r.record(&rec(written));
        written += 1;
        if written % 10 == 0 {
            std::thread::sleep(writer::TICK);
        }
        assert!(written < 10_000, "the spool never filled");
    }
    poll("oldest unshipped age known", || {
        ledger
            .shared()
            .stats
            .oldest_unshipped_ms
            .load(Ordering::Relaxed)
            > 0
    });
    sink.stalled.store(false, Ordering::SeqCst);
    poll("drained", || sink.counts().len() == written);
    poll("admits again", || r.admit());
    assert!(sink.counts().values().all(|&c| c == 1));
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn a_restart_ships_what_is_left_and_skips_a_torn_tail() {
    let d = dir();
    let config = LedgerConfig {
        dir: d.clone(),
        max_bytes: 1 << 20,
    };
    {
        let ledger = Ledger::open(&config).expect("open");
        let r = ledger.recorder();
        (0..100).for_each(|i| r.record(&rec(i)));
        ledger.shutdown(); // writes and fsyncs; nothing shipped
    }
    // A crash mid-write: half a frame at the end of the last segment.
    let (last, _) = *segment::list(&d).expect("list").last().expect("a segment");
    let mut half = Vec::new();
    let mut payload = Vec::new();
    rec(999).encode(&mut payload);
    segment::frame(&segment::load_key(&d).expect("key"), &payload, &mut half);
    half.truncate(half.len() / 2);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(segment::segment_path(&d, last))
        .expect("open")
        .write_all(&half)
        .expect("write");

    let mut ledger = Ledger::open(&config).expect("reopen");
    let sink = Memory::default();
    ledger.ship(sink.clone()).expect("ship");
    poll("shipped", || sink.counts().len() == 100);
    poll("torn counted", || {
        ledger.shared().stats.torn_skipped.load(Ordering::Relaxed) == 1
    });
    assert!(!sink.counts().contains_key("r-999"));
    assert!(sink.counts().values().all(|&c| c == 1));
    poll("old segments deleted", || seg_files(&d) == 1);
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// The request path's record (`Meter::start` + `Pending::finish`, encoded from borrowed parts)
/// says what was seen; the worker's last-model price follows a model change and a reload.
#[test]
fn a_metered_request_is_recorded_once_with_its_price_across_model_changes_and_reloads() {
    use super::meter::MeterFactory;
    use super::prices::{PriceBook, Prices};

    let (d, ledger, sink) = shipping_to_memory();
    let price = |a: f64, b: f64| {
        Prices::parse(&format!(
            r#"{{"m1": {{"input_per_mtok": {a}, "output_per_mtok": {b}}}}}"#
        ))
        .expect("prices")
    };
    let book = Arc::new(PriceBook::new(price(1.0, 2.0)));
    let meter = MeterFactory {
        ledger: ledger.shared().clone(),
        prices: book.clone(),
    }
    .meter();
    let (org, agent, token) = (Uuid::from_u128(7), Uuid::from_u128(8), Uuid::from_u128(9));
    let long_id = "é".repeat(100); // 200 bytes: clipped to 128 on a char boundary
    let send = |id: &str, model: Option<&str>, usage: Option<(u64, u64, u64)>| {
        let mut p = meter.start(
            id,
            org,
            agent,
            token,
            "/v1/chat/completions",
            bytes::Bytes::from_static(br#"{"model":"from-body","messages":[]}"#),
        );
        p.seen.status = 200;
        p.seen.usage = usage;
        p.seen.body_bytes = 40;
        p.model = model.map(str::to_owned);
        p.finish();
        p.finish(); // a second finish (and the drop) records nothing more
    };
    send("a", Some("m1"), Some((1_000_000, 500_000, 0)));
    send("b", Some("m2"), Some((10, 20, 30)));
    send("c", Some("m1"), Some((1_000_000, 0, 1_000_000)));
    book.replace(price(3.0, 0.0));
    send("d", Some("m1"), Some((1_000_000, 0, 0)));
    send(&long_id, None, None);
    poll("five shipped", || sink.counts().len() == 5);
    let got: HashMap<String, pb::UsageRecord> = sink
        .got
        .lock()
        .expect("lock")
        .iter()
        .map(|r| (r.request_id.clone(), r.clone()))
        .collect();
    assert!(sink.counts().values().all(|&c| c == 1));
    let a = &got["a"];
    assert_eq!(
        (a.prompt_tokens, a.completion_tokens, a.total_tokens),
        (1_000_000, 500_000, 1_500_000)
    );
    assert_eq!(a.cost_usd, Some(2.0));
    assert_eq!(
        (a.org_id.as_str(), a.agent_id.as_str(), a.token_id.as_str()),
        (
            org.to_string().as_str(),
            agent.to_string().as_str(),
            token.to_string().as_str()
        )
    );
    assert_eq!(
        (a.route.as_str(), a.status, a.model.as_str()),
        ("/v1/chat/completions", 200, "m1")
    );
    assert_eq!(a.usage_source, pb::UsageSource::Provider as i32);
    assert_eq!(got["b"].cost_usd, None, "m2 is not priced");
    assert_eq!(got["b"].total_tokens, 30);
    assert_eq!(got["c"].cost_usd, Some(1.0), "back to m1 after m2");
    assert_eq!(got["d"].cost_usd, Some(3.0), "the reloaded price");
    let clipped = "é".repeat(64);
    let e = &got[&clipped];
    assert_eq!(e.model, "from-body");
    assert_eq!(e.usage_source, pb::UsageSource::Estimated as i32);
    // Estimated: request body bytes / 4 (35 → 9), body bytes / 4 (40 → 10).
    assert_eq!(
        (e.prompt_tokens, e.completion_tokens, e.total_tokens),
        (9, 10, 19)
    );
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn a_segment_larger_than_one_read_ships_every_record_once() {
    // Records of ~370 bytes (a long model name): a batch of MAX_BATCH is more than READ_CAP, so
    // the shipper reads the segment in pieces cut inside frames.
    let d = dir();
    let config = LedgerConfig {
        dir: d.clone(),
        max_bytes: 256 << 20,
    };
    let mut ledger = Ledger::open(&config).expect("open");
    let sink = Memory::default();
    sink.stalled.store(true, Ordering::SeqCst);
    ledger.ship(sink.clone()).expect("ship");
    let r = ledger.recorder();
    let n = 12_000;
    let model = "m".repeat(250);
    for i in 0..n {
        r.record(&UsageRecord {
            model: model.clone(),
            ..rec(i)
        });
    }
    poll("all durable", || {
        ledger.shared().stats.spooled.load(Ordering::Relaxed) == n as u64
    });
    let bytes = ledger.shared().disk_bytes.load(Ordering::Relaxed);
    assert!(
        bytes > 2 * shipper::READ_CAP,
        "{bytes} bytes: not enough for pieces"
    );
    assert_eq!(seg_files(&d), 1, "one segment, read in pieces");
    sink.stalled.store(false, Ordering::SeqCst);
    poll("all shipped", || sink.counts().len() == n);
    assert!(sink.counts().values().all(|&c| c == 1));
    let stats = &ledger.shared().stats;
    // (Counted once the call returned, just after the sink took the records.)
    poll("counted as shipped", || {
        stats.shipped.load(Ordering::Relaxed) == n as u64
    });
    assert_eq!(
        stats.torn_skipped.load(Ordering::Relaxed),
        0,
        "a cut frame is not torn"
    );
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}

/// authd before `ShipUsage`: only `RecordUsage`; any other method UNIMPLEMENTED, as tonic
/// answers a method it does not know. With `v1_only`, an authd between the two: `ShipUsage`
/// that reads only version 1 records and refuses a call holding any other (INVALID_ARGUMENT,
/// as its `ship_usage` did).
#[derive(Clone, Default)]
struct OldAuthd {
    got: Arc<Mutex<Vec<pb::UsageRecord>>>,
    others: Arc<std::sync::atomic::AtomicUsize>,
    v1_only: bool,
}

struct V1ShipUsage(OldAuthd);

impl tonic::server::UnaryService<pb::ShipUsageRequest> for V1ShipUsage {
    type Response = pb::RecordUsageResponse;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::ShipUsageRequest>) -> Self::Future {
        let got = self.0.got.clone();
        Box::pin(async move {
            let body = request.into_inner();
            let mut records = Vec::new();
            for (i, entry) in ibex_proto::usage::Entries::new(&body.records).enumerate() {
                if entry.first() != Some(&1) {
                    return Err(tonic::Status::invalid_argument(format!(
                        "record {i} does not decode"
                    )));
                }
                let r = UsageRecord::decode(entry).expect("a v1 record");
                records.push(r.to_pb());
            }
            let stored = u32::try_from(records.len()).unwrap_or(u32::MAX);
            got.lock().expect("lock").extend(records);
            Ok(tonic::Response::new(pb::RecordUsageResponse {
                stored,
                duplicates: 0,
            }))
        })
    }
}

impl tonic::server::NamedService for OldAuthd {
    const NAME: &'static str = "ibex.auth.v1.AuthService";
}

struct OldRecordUsage(OldAuthd);

impl tonic::server::UnaryService<pb::RecordUsageRequest> for OldRecordUsage {
    type Response = pb::RecordUsageResponse;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::RecordUsageRequest>) -> Self::Future {
        let got = self.0.got.clone();
        Box::pin(async move {
            let records = request.into_inner().records;
            let stored = u32::try_from(records.len()).unwrap_or(u32::MAX);
            got.lock().expect("lock").extend(records);
            Ok(tonic::Response::new(pb::RecordUsageResponse {
                stored,
                duplicates: 0,
            }))
        })
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for OldAuthd
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            if req.uri().path() == "/ibex.auth.v1.AuthService/RecordUsage" {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                return Ok(grpc.unary(OldRecordUsage(me), req).await);
            }
            me.others.fetch_add(1, Ordering::SeqCst);
            if me.v1_only && req.uri().path() == "/ibex.auth.v1.AuthService/ShipUsage" {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                return Ok(grpc.unary(V1ShipUsage(me), req).await);
            }
            Ok(tonic::Status::unimplemented("").into_http())
        })
    }
}

#[test]
fn an_authd_without_ship_usage_gets_record_usage_and_nothing_is_lost() {
    falls_back_to_record_usage(OldAuthd::default());
}

/// An authd that has `ShipUsage` but reads only version 1 records refuses this proxy's calls;
/// the shipper then sends the same records by `RecordUsage`, request ids as the text they were.
#[test]
fn an_authd_that_reads_only_version_1_records_gets_record_usage_and_nothing_is_lost() {
    falls_back_to_record_usage(OldAuthd {
        v1_only: true,
        ..OldAuthd::default()
    });
}

fn falls_back_to_record_usage(old: OldAuthd) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let incoming = rt
        .block_on(async {
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().expect("addr"))
        })
        .expect("bind");
    let addr = incoming.local_addr().expect("addr");
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(old.clone())
            .serve_with_incoming(incoming),
    );
    let d = dir();
    let mut ledger = Ledger::open(&LedgerConfig {
        dir: d.clone(),
        max_bytes: 1 << 20,
    })
    .expect("open");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("url");
    ledger
        .ship(shipper::AuthdSink::new(vec![endpoint], Vec::new()).expect("sink"))
        .expect("ship");
    let r = ledger.recorder();
    // Half the ids are UUIDs, which the spool holds as 16 bytes.
    let id = |i: usize| match i % 2 {
        0 => format!("r-{i}"),
        _ => Uuid::from_u128(0xabc << 64 | i as u128).to_string(),
    };
    for i in 0..300 {
        r.record(&UsageRecord {
            request_id: id(i),
            ..rec(i)
        });
    }
    let ids = |got: &Mutex<Vec<pb::UsageRecord>>| {
        let mut ids: Vec<_> = got
            .lock()
            .expect("lock")
            .iter()
            .map(|r| r.request_id.clone())
            .collect();
        ids.sort();
        ids
    };
    poll("shipped to the old authd", || ids(&old.got).len() >= 300);
    let mut want: Vec<_> = (0..300).map(id).collect();
    want.sort();
    assert_eq!(ids(&old.got), want, "every record once, by RecordUsage");
    assert!(
        old.others.load(Ordering::SeqCst) >= 1,
        "ShipUsage was tried first"
    );
    // (Counted once the call returned, just after the old authd stored them.)
    poll("counted as shipped", || {
        ledger.shared().stats.shipped.load(Ordering::Relaxed) == 300
    });
    ledger.shutdown();
    std::fs::remove_dir_all(&d).expect("cleanup");
}
