use super::*;
use crate::ledger::record::UsageRecord;
use proptest::prelude::*;
use uuid::Uuid;

const KEY: Key = [7; 32];

fn record(i: usize, model: &str) -> UsageRecord {
    UsageRecord {
        request_id: format!("req-{i}"),
        org_id: Uuid::from_u128(1),
        agent_id: Uuid::from_u128(2),
        token_id: Uuid::from_u128(3),
        model: model.into(),
        route: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: i as u64,
        completion_tokens: 2,
        total_tokens: i as u64 + 2,
        started_at_ms: 1_700_000_000_000,
        duration_ms: 3,
        cost_usd: Some(0.5),
        attempts: 1,
        ..Default::default()
    }
}

fn segment(records: &[UsageRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut payload = Vec::new();
    for r in records {
        payload.clear();
        r.encode(&mut payload);
        frame(&KEY, &payload, &mut out);
    }
    out
}

/// `records` in batch frames of `per` records each (what the writer makes, in smaller frames);
/// `per == 0`: one-record frames of the second format.
fn batched(records: &[UsageRecord], per: usize) -> Vec<u8> {
    if per == 0 {
        return segment(records);
    }
    let mut out = Vec::new();
    for group in records.chunks(per) {
        let mut entries = Vec::new();
        for r in group {
            crate::ledger::record::put_entry(&r.borrowed(), &mut entries);
        }
        assert_eq!(frame_entries(&KEY, &entries, &mut out), group.len() as u64);
    }
    out
}

fn records(items: &[Item]) -> Vec<UsageRecord> {
    let mut out = Vec::new();
    for i in items {
        match i {
            Item::Record(r, _, _) => out.push(r.to_record()),
            Item::Batch(b, _) => {
                assert_eq!(b.records().count() as u64, b.count, "all decode here");
                out.extend(b.records().map(|r| r.to_record()));
            }
            Item::Skipped(_) => {}
        }
    }
    out
}

/// Flips the bytes `flips` names and zeroes the run `zero_run` names (indexes into `bytes`).
fn corrupt(
    bytes: &mut [u8],
    flips: &[(prop::sample::Index, u8)],
    zero_run: Option<(prop::sample::Index, usize)>,
) {
    if bytes.is_empty() {
        return;
    }
    for (at, x) in flips {
        let at = at.index(bytes.len());
        bytes[at] ^= x;
    }
    if let Some((at, len)) = zero_run {
        let at = at.index(bytes.len());
        let end = (at + len).min(bytes.len());
        bytes[at..end].fill(0);
    }
}

fn end(item: &Item) -> usize {
    match item {
        Item::Record(_, _, e) | Item::Batch(_, e) | Item::Skipped(e) => *e,
    }
}

#[test]
fn batch_frames_scan_back_exactly_and_a_torn_one_is_lost_whole() {
    let rs: Vec<_> = (0..50).map(|i| record(i, "m")).collect();
    let bytes = batched(&rs, 10);
    assert_eq!(&bytes[..4], &MAGIC_BATCH);
    let items = scan(&KEY, &bytes, 10);
    assert_eq!(items.len(), 5);
    assert_eq!(records(&items), rs);
    assert_eq!(items.last().map(end), Some(bytes.len() + 10));
    // Torn inside the last frame: its ten records are gone, the forty before it are not.
    let cut = bytes.len() - 100;
    let items = scan(&KEY, &bytes[..cut], 0);
    assert_eq!(records(&items), rs[..40].to_vec());
    assert_eq!(items.last(), Some(&Item::Skipped(cut)));
    // What the trusted scan (this process's own frames) reads is the same.
    let trusted: Vec<_> = Scan::trusted(&KEY, &bytes, 0).collect();
    assert_eq!(records(&trusted), rs);
}

#[test]
fn a_worker_buffer_is_cut_into_frames_of_at_most_64_kib_at_record_boundaries() {
    let rs: Vec<_> = (0..1000).map(|i| record(i, &"m".repeat(250))).collect();
    let mut entries = Vec::new();
    for r in &rs {
        crate::ledger::record::put_entry(&r.borrowed(), &mut entries);
    }
    let mut bytes = Vec::new();
    assert_eq!(frame_entries(&KEY, &entries, &mut bytes), 1000);
    let items = scan(&KEY, &bytes, 0);
    assert!(items.len() >= 6, "{} frames for ~370 KB", items.len());
    let mut last = 0;
    for i in &items {
        assert!(matches!(i, Item::Batch(..)), "{i:?}");
        assert!(end(i) - last <= HEADER + MAX_PAYLOAD);
        last = end(i);
    }
    assert_eq!(records(&items), rs);
    // A cut entry at the end of a buffer is left out, never framed half.
    let mut out = Vec::new();
    assert_eq!(
        frame_entries(&KEY, &entries[..entries.len() - 3], &mut out),
        999
    );
}

#[test]
fn intact_segment_scans_back_exactly() {
    let rs: Vec<_> = (0..50).map(|i| record(i, "m")).collect();
    let bytes = segment(&rs);
    let items = scan(&KEY, &bytes, 10);
    assert_eq!(records(&items), rs);
    assert!(matches!(items.last(), Some(Item::Record(_, _, end)) if *end == bytes.len() + 10));
}

#[test]
fn torn_tail_is_skipped_once_and_earlier_records_survive() {
    let rs: Vec<_> = (0..5).map(|i| record(i, "m")).collect();
    let bytes = segment(&rs);
    let cut = bytes.len() - 7;
    let items = scan(&KEY, &bytes[..cut], 0);
    assert_eq!(records(&items), rs[..4].to_vec());
    assert_eq!(items.last(), Some(&Item::Skipped(cut)));
    assert_eq!(
        items
            .iter()
            .filter(|i| matches!(i, Item::Skipped(_)))
            .count(),
        1
    );
}

#[test]
fn another_spool_key_reads_nothing() {
    let bytes = segment(&[record(1, "m")]);
    assert!(records(&scan(&[8; 32], &bytes, 0)).is_empty());
}

#[test]
fn a_frame_smuggled_in_a_model_name_is_never_read_as_a_record() {
    // A client-chosen model holding a whole frame (made with some other key: it cannot know ours).
    let mut inner = Vec::new();
    let mut forged = Vec::new();
    record(999, "x").encode(&mut inner);
    frame(&[0; 32], &inner, &mut forged);
    let model: String = forged.iter().map(|&b| char::from(b & 0x7f)).collect();
    let rs = vec![record(1, &model), record(2, "m")];
    let mut bytes = segment(&rs);
    bytes[5] ^= 0xff; // break the outer frame's length
    let got = records(&scan(&KEY, &bytes, 0));
    assert_eq!(got, vec![rs[1].clone()]);
}

#[test]
fn the_cuts_a_worker_notes_are_the_frames_a_walk_would_make() {
    // Records of many sizes: the worker's noted cuts frame the buffer exactly as walking it does.
    let mut buffered = crate::ledger::Buffered::default();
    let rs: Vec<_> = (0..3000).map(|i| record(i, &"m".repeat(i % 250))).collect();
    for r in &rs {
        buffered.push(&r.borrowed());
    }
    assert_eq!(buffered.records, 3000);
    assert!(buffered.cuts.len() >= 5, "{} cuts", buffered.cuts.len());
    let (mut walked, mut cut) = (Vec::new(), Vec::new());
    assert_eq!(frame_entries(&KEY, &buffered.bytes, &mut walked), 3000);
    frame_cut(&KEY, &buffered.bytes, &buffered.cuts, &mut cut);
    assert_eq!(cut, walked);
    assert_eq!(records(&scan(&KEY, &cut, 0)), rs);
}

#[test]
fn a_record_that_does_not_decode_is_skipped_alone_never_shipped() {
    // An empty request id encodes but does not decode (authd would refuse the whole call).
    let rs: Vec<_> = (0..5).map(|i| record(i, "m")).collect();
    let mut entries = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        crate::ledger::record::put_entry(&r.borrowed(), &mut entries);
        if i == 2 {
            let bad = UsageRecord {
                request_id: String::new(),
                ..record(99, "m")
            };
            crate::ledger::record::put_entry(&bad.borrowed(), &mut entries);
        }
    }
    let mut bytes = Vec::new();
    frame_entries(&KEY, &entries, &mut bytes);
    for trusted in [false, true] {
        let scan = if trusted {
            Scan::trusted(&KEY, &bytes, 0)
        } else {
            Scan::new(&KEY, &bytes, 0)
        };
        let mut body = bytes::BytesMut::new();
        let filled = crate::ledger::shipper::fill(scan, 0, &mut body, true);
        assert_eq!((filled.records, filled.torn), (5, 1));
        assert_eq!(filled.end, bytes.len() as u64);
        let shipped: Vec<_> = crate::ledger::record::Entries::new(&body)
            .map(|e| UsageRecord::decode(e).expect("every shipped entry decodes"))
            .collect();
        assert_eq!(shipped, rs);
    }
    // Unchecked (this process's own frames), the frame goes whole, the bad record in it: what
    // authd then refuses, and the shipper sends again checked (ledger/tests.rs).
    let mut body = bytes::BytesMut::new();
    let filled = crate::ledger::shipper::fill(Scan::trusted(&KEY, &bytes, 0), 0, &mut body, false);
    assert_eq!((filled.records, filled.torn), (6, 0));
    assert_eq!(filled.end, bytes.len() as u64);
    assert_eq!(&body[..], &entries[..], "the frame's payload as it is");
}

#[test]
fn a_batch_frame_smuggled_in_a_model_name_is_never_read() {
    // Whatever bytes a client gets into the spool (a model name is written as it came), a batch
    // frame it made cannot carry our key: placed whole between two real frames, it is skipped.
    let mut forged_entries = Vec::new();
    crate::ledger::record::put_entry(&record(999, "x").borrowed(), &mut forged_entries);
    let rs = [record(1, "m"), record(2, "m")];
    for (key, read) in [([0; 32], false), (KEY, true)] {
        let mut bytes = batched(&rs[..1], 1);
        frame_entries(&key, &forged_entries, &mut bytes);
        bytes.extend(batched(&rs[1..], 1));
        let items = scan(&KEY, &bytes, 0);
        let got = records(&items);
        if read {
            // The same frame under the spool's key is read: the key is all that kept it out.
            assert_eq!(got.len(), 3);
        } else {
            assert_eq!(got, rs.to_vec());
            assert!(items.iter().any(|i| matches!(i, Item::Skipped(_))));
        }
    }
}

#[test]
fn frames_of_the_first_format_are_still_read_beside_the_new_ones() {
    // A spool written before the upgrade (SHA-256 checks), then appended to by the new writer.
    let rs: Vec<_> = (0..6).map(|i| record(i, "m")).collect();
    let mut bytes = Vec::new();
    let mut payload = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        payload.clear();
        r.encode(&mut payload);
        if i < 3 {
            frame_sha256(&KEY, &payload, &mut bytes);
        } else {
            frame(&KEY, &payload, &mut bytes);
        }
    }
    assert_eq!(&bytes[..4], &MAGIC_SHA256);
    assert_eq!(records(&scan(&KEY, &bytes, 0)), rs);
    // And the writer's batch frames after both.
    let more: Vec<_> = (6..12).map(|i| record(i, "m")).collect();
    bytes.extend(batched(&more, 4));
    let all: Vec<_> = rs.iter().chain(&more).cloned().collect();
    assert_eq!(records(&scan(&KEY, &bytes, 0)), all);
    // Either format under another key: nothing.
    assert!(records(&scan(&[8; 32], &bytes, 0)).is_empty());
}

#[test]
fn key_is_made_once_and_kept() {
    let dir = std::env::temp_dir().join(format!("ibex-spool-key-{}", Uuid::new_v4()));
    fs::create_dir_all(&dir).expect("dir");
    let a = load_key(&dir).expect("made");
    let b = load_key(&dir).expect("read");
    assert_eq!(a, b);
    fs::write(dir.join(KEY_FILE), b"short").expect("write");
    assert!(load_key(&dir).is_err());
    fs::remove_dir_all(&dir).expect("cleanup");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A segment truncated and corrupted at random: every record read back is one that was
    /// written, whole, at most once, in the order written.
    #[test]
    fn corruption_never_duplicates_invents_or_halves(
        n in 1usize..40,
        per in 0usize..6,
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..12),
        zero_run in prop::option::of((any::<prop::sample::Index>(), 1usize..300)),
    ) {
        let rs: Vec<_> = (0..n).map(|i| record(i, &format!("model-{}", i % 3))).collect();
        let mut bytes = batched(&rs, per);
        let cut = cut.index(bytes.len() + 1);
        bytes.truncate(cut);
        corrupt(&mut bytes, &flips, zero_run);
        let items = scan(&KEY, &bytes, 0);
        let got = records(&items);
        // In order and each at most once: `got` is a subsequence of `rs`.
        let mut it = rs.iter();
        for r in &got {
            prop_assert!(it.any(|w| w == r), "{r:?} was not written (or came twice / out of order)");
        }
        // Offsets only move forward and end at the end.
        let mut last = 0;
        for i in &items {
            prop_assert!(end(i) > last);
            last = end(i);
        }
        prop_assert_eq!(last, bytes.len());
        // Untouched input loses nothing.
        if flips.is_empty() && zero_run.is_none() && cut == batched(&rs, per).len() {
            prop_assert_eq!(got, rs);
        }
    }

    /// The shipper reads a segment a batch's bytes at a time: read in pieces that way, a
    /// corrupted segment gives exactly the records one whole read gives, each once.
    #[test]
    fn reading_in_pieces_reads_what_one_read_does(
        n in 400usize..1200,
        per in prop::sample::select(vec![0usize, 1, 7, 300]),
        cap in (HEADER + MAX_PAYLOAD + 1)..140_000,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..12),
        zero_run in prop::option::of((any::<prop::sample::Index>(), 1usize..70_000)),
    ) {
        let rs: Vec<_> = (0..n).map(|i| record(i, &format!("model-{}", i % 3))).collect();
        let mut bytes = batched(&rs, per);
        corrupt(&mut bytes, &flips, zero_run);
        let whole = records(&scan(&KEY, &bytes, 0));
        let mut pieces = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let stop = bytes.len().min(offset + cap);
            let mut piece = Scan::new(&KEY, &bytes[offset..stop], offset);
            if stop < bytes.len() {
                piece = piece.read_short();
            }
            let items: Vec<_> = piece.collect();
            let last = items.last().map(end);
            pieces.extend(records(&items));
            let last = last.expect("every read makes progress");
            prop_assert!(last > offset);
            offset = last;
        }
        prop_assert_eq!(pieces, whole);
    }
}
