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

fn records(items: &[Item]) -> Vec<UsageRecord> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Record(r, _, _) => Some(r.to_record()),
            Item::Skipped(_) => None,
        })
        .collect()
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
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..12),
        zero_run in prop::option::of((any::<prop::sample::Index>(), 1usize..300)),
    ) {
        let rs: Vec<_> = (0..n).map(|i| record(i, &format!("model-{}", i % 3))).collect();
        let mut bytes = segment(&rs);
        let cut = cut.index(bytes.len() + 1);
        bytes.truncate(cut);
        if !bytes.is_empty() {
            for (at, x) in &flips {
                let at = at.index(bytes.len());
                bytes[at] ^= x;
            }
            if let Some((at, len)) = zero_run {
                let at = at.index(bytes.len());
                let end = (at + len).min(bytes.len());
                bytes[at..end].fill(0);
            }
        }
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
            let end = match i { Item::Record(_, _, e) | Item::Skipped(e) => *e };
            prop_assert!(end > last);
            last = end;
        }
        prop_assert_eq!(last, bytes.len());
        // Untouched input loses nothing.
        if flips.is_empty() && zero_run.is_none() && cut == segment(&rs).len() {
            prop_assert_eq!(got, rs);
        }
    }

    /// The shipper reads a segment a batch's bytes at a time: read in pieces that way, a
    /// corrupted segment gives exactly the records one whole read gives, each once.
    #[test]
    fn reading_in_pieces_reads_what_one_read_does(
        n in 400usize..1200,
        cap in (HEADER + MAX_PAYLOAD + 1)..140_000,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..12),
        zero_run in prop::option::of((any::<prop::sample::Index>(), 1usize..70_000)),
    ) {
        let rs: Vec<_> = (0..n).map(|i| record(i, &format!("model-{}", i % 3))).collect();
        let mut bytes = segment(&rs);
        for (at, x) in &flips {
            let at = at.index(bytes.len());
            bytes[at] ^= x;
        }
        if let Some((at, len)) = zero_run {
            let at = at.index(bytes.len());
            let end = (at + len).min(bytes.len());
            bytes[at..end].fill(0);
        }
        let whole = records(&scan(&KEY, &bytes, 0));
        let mut pieces = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let end = bytes.len().min(offset + cap);
            let mut piece = Scan::new(&KEY, &bytes[offset..end], offset);
            if end < bytes.len() {
                piece = piece.read_short();
            }
            let items: Vec<_> = piece.collect();
            let last = items.last().map(|i| match i { Item::Record(_, _, e) | Item::Skipped(e) => *e });
            pieces.extend(records(&items));
            let last = last.expect("every read makes progress");
            prop_assert!(last > offset);
            offset = last;
        }
        prop_assert_eq!(pieces, whole);
    }
}
