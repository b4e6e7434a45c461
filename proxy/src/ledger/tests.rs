//! Writer + shipper over a real directory, shipping to an in-memory sink that can be stalled
//! (the end-to-end tests in `tests/tests/ledger.rs` ship to a real authd and Postgres).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibex_proto::pb;
use uuid::Uuid;

use super::shipper::Sink;
use super::*;

#[derive(Clone, Default)]
struct Memory {
    got: Arc<Mutex<Vec<pb::UsageRecord>>>,
    stalled: Arc<AtomicBool>,
}

impl Sink for Memory {
    async fn send(&mut self, records: Vec<pb::UsageRecord>) -> Result<(), String> {
        if self.stalled.load(Ordering::SeqCst) {
            return Err("stalled".into());
        }
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
    assert_eq!(stats.shipped.load(Ordering::Relaxed), n as u64);
    assert_eq!(stats.torn_skipped.load(Ordering::Relaxed), 0);
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
