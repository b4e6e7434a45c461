//! One usage record (SPEC §10) and its compact encoding: the codec lives in `ibex-proto`
//! ([`ibex_proto::usage`]) because authd decodes what the shipper sends as it is.

pub use ibex_proto::usage::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Spool bytes per record (perf/RESULTS.md): its entry (length + payload) in a batch frame,
    /// plus the frame's 16-byte header shared by the ≤ 64 KiB of records it holds (~570 of these).
    #[test]
    fn a_typical_chat_record_takes_113_spool_bytes() {
        let r = UsageRecord {
            request_id: uuid::Uuid::new_v4().to_string(),
            org_id: uuid::Uuid::new_v4(),
            agent_id: uuid::Uuid::new_v4(),
            token_id: uuid::Uuid::new_v4(),
            model: "gpt-4o-mini".into(),
            route: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: 12,
            completion_tokens: 9,
            total_tokens: 21,
            started_at_ms: 1_764_700_000_000,
            duration_ms: 3,
            cost_usd: Some(0.0002),
            provider: "openai".into(),
            attempts: 1,
            ..Default::default()
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        // 2 version/flags + 48 ids + 2 status + 5 × 1 counts + 6 started + 1 duration
        // + 1 attempts + 8 cost + 16 request id + (1 + 11) model + 1 route + (1 + 6) provider.
        assert_eq!(buf.len(), 109);
        assert_eq!(UsageRecord::decode(&buf), Some(r.clone()));
        let mut entries = Vec::new();
        for _ in 0..1000 {
            put_entry(&r.borrowed(), &mut entries);
        }
        let mut spool = Vec::new();
        super::super::segment::frame_entries(&[0; 32], &entries, &mut spool);
        assert_eq!(spool.len(), 1000 * 113 + 2 * super::super::segment::HEADER);
    }
}
