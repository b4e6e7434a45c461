//! One usage record (SPEC §10) and its compact encoding: the codec lives in `ibex-proto`
//! ([`ibex_proto::usage`]) because authd decodes what the shipper sends as it is.

pub use ibex_proto::usage::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Spool bytes per record (perf/RESULTS.md): payload + the 16-byte frame header.
    #[test]
    fn a_typical_chat_record_takes_211_spool_bytes() {
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
        assert_eq!(buf.len() + super::super::segment::HEADER, 211);
    }
}
