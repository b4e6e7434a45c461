//! One usage record (SPEC §10) and its compact binary encoding in the spool.
//!
//! Layout (little-endian), version 1: `1u8`, flags (`1` estimated, `2` streamed, `4` has cost),
//! org, agent, token (16 bytes each), status `u16`, prompt, completion, total, cache read, cache
//! creation tokens (`u64` each), started at (unix ms, `i64`), duration ms `u64`, cost `f64` (only
//! with the flag), attempts `u32`, then request id, model, route, provider as `u16` length +
//! UTF-8. [`UsageRecord::decode`] is total: any byte string gives a record or `None`, never a
//! panic, and never reads past its input. Framing and checksums are the spool's business.

use ibex_proto::pb;
use uuid::Uuid;

pub const MAX_REQUEST_ID: usize = 128;
pub const MAX_MODEL: usize = 256;
pub const MAX_ROUTE: usize = 128;
pub const MAX_PROVIDER: usize = 128;

const VERSION: u8 = 1;
const ESTIMATED: u8 = 1;
const STREAMED: u8 = 2;
const HAS_COST: u8 = 4;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageRecord {
    pub request_id: String,
    pub org_id: Uuid,
    pub agent_id: Uuid,
    pub token_id: Uuid,
    pub model: String,
    pub route: String,
    /// The status the client got (0: none was sent).
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_creation_tokens: u64,
    /// `usage_source = estimated`: the provider's numbers never came.
    pub estimated: bool,
    pub streamed: bool,
    pub started_at_ms: i64,
    pub duration_ms: u64,
    pub cost_usd: Option<f64>,
    /// "" = not known.
    pub provider: String,
    /// 0 = not known.
    pub attempts: u32,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    fn uuid(&mut self) -> Option<Uuid> {
        Some(Uuid::from_bytes(self.array()?))
    }
    fn string(&mut self, max: usize) -> Option<String> {
        let len = usize::from(self.u16()?);
        if len > max {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = clip(s, max);
    // `max` ≤ u16::MAX, so the clipped length fits.
    out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A record made of borrowed parts: what the request path encodes, with no allocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordRef<'a> {
    pub request_id: &'a str,
    pub org_id: Uuid,
    pub agent_id: Uuid,
    pub token_id: Uuid,
    pub model: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_creation_tokens: u64,
    pub estimated: bool,
    pub streamed: bool,
    pub started_at_ms: i64,
    pub duration_ms: u64,
    pub cost_usd: Option<f64>,
    pub provider: &'a str,
    pub attempts: u32,
}

impl RecordRef<'_> {
    /// Appends the encoding to `out` (strings clipped to their maxima).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let cost = self.cost_usd.filter(|c| c.is_finite() && *c >= 0.0);
        let mut flags = 0;
        if self.estimated {
            flags |= ESTIMATED;
        }
        if self.streamed {
            flags |= STREAMED;
        }
        if cost.is_some() {
            flags |= HAS_COST;
        }
        out.reserve(
            FIXED
                + 8
                + self.request_id.len()
                + self.model.len()
                + self.route.len()
                + self.provider.len(),
        );
        out.push(VERSION);
        out.push(flags);
        out.extend_from_slice(self.org_id.as_bytes());
        out.extend_from_slice(self.agent_id.as_bytes());
        out.extend_from_slice(self.token_id.as_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        for n in [
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cache_read_tokens,
            self.cache_creation_tokens,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.started_at_ms.to_le_bytes());
        out.extend_from_slice(&self.duration_ms.to_le_bytes());
        if let Some(cost) = cost {
            out.extend_from_slice(&cost.to_le_bytes());
        }
        out.extend_from_slice(&self.attempts.to_le_bytes());
        put_str(out, self.request_id, MAX_REQUEST_ID);
        put_str(out, self.model, MAX_MODEL);
        put_str(out, self.route, MAX_ROUTE);
        put_str(out, self.provider, MAX_PROVIDER);
    }
}

/// Bytes of the fixed part: version, flags, ids, status, counts, times, cost, attempts.
const FIXED: usize = 2 + 48 + 2 + 40 + 16 + 8 + 4;

impl UsageRecord {
    /// The record's fields, borrowed.
    pub fn borrowed(&self) -> RecordRef<'_> {
        RecordRef {
            request_id: &self.request_id,
            org_id: self.org_id,
            agent_id: self.agent_id,
            token_id: self.token_id,
            model: &self.model,
            route: &self.route,
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
            estimated: self.estimated,
            streamed: self.streamed,
            started_at_ms: self.started_at_ms,
            duration_ms: self.duration_ms,
            cost_usd: self.cost_usd,
            provider: &self.provider,
            attempts: self.attempts,
        }
    }

    /// Appends the encoding to `out` (strings clipped to their maxima).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.borrowed().encode(out);
    }

    /// The record encoded in exactly `bytes`, or `None`.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let flags = r.u8()?;
        if flags & !(ESTIMATED | STREAMED | HAS_COST) != 0 {
            return None;
        }
        let org_id = r.uuid()?;
        let agent_id = r.uuid()?;
        let token_id = r.uuid()?;
        let status = r.u16()?;
        let (prompt_tokens, completion_tokens, total_tokens) = (r.u64()?, r.u64()?, r.u64()?);
        let (cache_read_tokens, cache_creation_tokens) = (r.u64()?, r.u64()?);
        let started_at_ms = i64::from_le_bytes(r.array()?);
        let duration_ms = r.u64()?;
        let cost_usd = if flags & HAS_COST != 0 {
            Some(f64::from_le_bytes(r.array()?))
        } else {
            None
        };
        let attempts = r.u32()?;
        let record = UsageRecord {
            request_id: r.string(MAX_REQUEST_ID)?,
            org_id,
            agent_id,
            token_id,
            model: r.string(MAX_MODEL)?,
            route: r.string(MAX_ROUTE)?,
            status,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cache_read_tokens,
            cache_creation_tokens,
            estimated: flags & ESTIMATED != 0,
            streamed: flags & STREAMED != 0,
            started_at_ms,
            duration_ms,
            cost_usd,
            provider: r.string(MAX_PROVIDER)?,
            attempts,
        };
        (r.0.is_empty() && !record.request_id.is_empty()).then_some(record)
    }

    pub fn to_pb(&self) -> pb::UsageRecord {
        let source = if self.estimated {
            pb::UsageSource::Estimated
        } else {
            pb::UsageSource::Provider
        };
        pb::UsageRecord {
            request_id: self.request_id.clone(),
            org_id: self.org_id.to_string(),
            agent_id: self.agent_id.to_string(),
            token_id: self.token_id.to_string(),
            model: self.model.clone(),
            route: self.route.clone(),
            status: u32::from(self.status),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            usage_source: source as i32,
            streamed: self.streamed,
            started_at_unix_ms: self.started_at_ms,
            duration_ms: self.duration_ms,
            cost_usd: self.cost_usd,
            provider: self.provider.clone(),
            attempts: self.attempts,
            cache_read_tokens: self.cache_read_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample(i: u64) -> UsageRecord {
        UsageRecord {
            request_id: format!("req-{i}"),
            org_id: Uuid::from_u128(u128::from(i) + 1),
            agent_id: Uuid::from_u128(2),
            token_id: Uuid::from_u128(3),
            model: "gpt-4o-mini".into(),
            route: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: 12,
            completion_tokens: 30,
            total_tokens: 42,
            cache_read_tokens: 0,
            cache_creation_tokens: 0,
            estimated: i.is_multiple_of(2),
            streamed: i.is_multiple_of(3),
            started_at_ms: 1_700_000_000_000 + i64::try_from(i).unwrap_or(0),
            duration_ms: 17,
            cost_usd: (!i.is_multiple_of(4)).then_some(0.000_025),
            provider: String::new(),
            attempts: 1,
        }
    }

    #[test]
    fn round_trips_and_is_compact() {
        for i in 0..8 {
            let r = sample(i);
            let mut buf = Vec::new();
            r.encode(&mut buf);
            assert!(buf.len() < 200, "{} bytes", buf.len());
            assert_eq!(UsageRecord::decode(&buf), Some(r));
        }
    }

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

    #[test]
    fn long_strings_are_clipped_on_char_boundaries() {
        let mut r = sample(1);
        r.model = "é".repeat(200);
        let mut buf = Vec::new();
        r.encode(&mut buf);
        let back = UsageRecord::decode(&buf).expect("decodes");
        assert_eq!(back.model, "é".repeat(128));
    }

    #[test]
    fn every_prefix_and_extension_is_refused() {
        let mut buf = Vec::new();
        sample(3).encode(&mut buf);
        for n in 0..buf.len() {
            assert_eq!(UsageRecord::decode(&buf[..n]), None, "prefix {n}");
        }
        buf.push(0);
        assert_eq!(UsageRecord::decode(&buf), None);
    }
}
