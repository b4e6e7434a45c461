//! One usage record (SPEC §10) and its compact encoding: the codec lives in `ibex-proto`
//! ([`ibex_proto::usage`]) because authd decodes what the shipper sends as it is.

pub use ibex_proto::usage::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Spool bytes per record (perf/RESULTS.md): its entry (length + payload) in a batch frame,
    /// plus the frame's 16-byte header shared by the ≤ 64 KiB of records it holds (~330 of these).
    #[test]
    fn a_typical_chat_record_takes_199_spool_bytes() {
        let r = UsageRecord {
            request_id: uuid::Uuid::new_v4().to_string(),
            model: "gpt-4o-mini".into(),
            route: "/v1/chat/completions".into(),
            cost_usd: Some(0.0002),
            ..Default::default()
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        // 2 version/flags + 48 ids + 2 status + 40 counts + 16 times + 8 cost + 4 attempts
        // + 4 × 2 length prefixes + 36 + 11 + 20 string bytes.
        assert_eq!(buf.len(), 195);
        let mut entries = Vec::new();
        for _ in 0..1000 {
            put_entry(&r.borrowed(), &mut entries);
        }
        let mut spool = Vec::new();
        super::super::segment::frame_entries(&[0; 32], &entries, &mut spool);
        assert_eq!(spool.len(), 1000 * 199 + 4 * super::super::segment::HEADER);
    }
}
