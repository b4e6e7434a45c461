//! One usage record (SPEC §10) and its compact binary encoding: what a proxy's spool holds and
//! what `ShipUsage` carries to authd as it is (so the proxy ships without re-encoding, and
//! authd decodes with this same code).
//!
//! Layout (little-endian), version 1: `1u8`, flags (`1` estimated, `2` streamed, `4` has cost),
//! org, agent, token (16 bytes each), status `u16`, prompt, completion, total, cache read, cache
//! creation tokens (`u64` each), started at (unix ms, `i64`), duration ms `u64`, cost `f64` (only
//! with the flag), attempts `u32`, then request id, model, route, provider as `u16` length +
//! UTF-8. [`UsageRecord::decode`] is total: any byte string gives a record or `None`, never a
//! panic, and never reads past its input. Framing and checksums are the spool's business.
//!
//! A `ShipUsage` body's `records` are such encodings back to back, each after its length
//! (`u32` LE): [`Records`] walks them.

use crate::pb;
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
pub fn clip(s: &str, max: usize) -> &str {
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
    fn str(&mut self, max: usize) -> Option<&'a str> {
        let len = usize::from(self.u16()?);
        if len > max {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = clip(s, max);
    // `max` ≤ u16::MAX, so the clipped length fits.
    out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A record made of borrowed parts: what the request path encodes, and what the shipper reads
/// back from the spool, with no allocation either way.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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

impl<'a> RecordRef<'a> {
    /// The record encoded in exactly `bytes`, or `None`.
    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
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
        let record = RecordRef {
            request_id: r.str(MAX_REQUEST_ID)?,
            org_id,
            agent_id,
            token_id,
            model: r.str(MAX_MODEL)?,
            route: r.str(MAX_ROUTE)?,
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
            provider: r.str(MAX_PROVIDER)?,
            attempts,
        };
        (r.0.is_empty() && !record.request_id.is_empty()).then_some(record)
    }

    /// The owned record.
    pub fn to_record(&self) -> UsageRecord {
        UsageRecord {
            request_id: self.request_id.to_owned(),
            org_id: self.org_id,
            agent_id: self.agent_id,
            token_id: self.token_id,
            model: self.model.to_owned(),
            route: self.route.to_owned(),
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
            provider: self.provider.to_owned(),
            attempts: self.attempts,
        }
    }

    /// Appends the record as a protobuf `ibex.auth.v1.UsageRecord` — byte for byte what
    /// `prost` makes of [`UsageRecord::to_pb`] — without building the message: the shipper's
    /// path from spool bytes to a `RecordUsage` body, no allocation per record.
    pub fn encode_pb(&self, out: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        fn text(tag: u32, s: &str, out: &mut Vec<u8>) {
            if !s.is_empty() {
                encode_key(tag, WireType::LengthDelimited, out);
                encode_varint(s.len() as u64, out);
                out.extend_from_slice(s.as_bytes());
            }
        }
        fn uuid(tag: u32, id: &Uuid, out: &mut Vec<u8>) {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            text(tag, id.as_hyphenated().encode_lower(&mut buf), out);
        }
        fn varint(tag: u32, n: u64, out: &mut Vec<u8>) {
            if n != 0 {
                encode_key(tag, WireType::Varint, out);
                encode_varint(n, out);
            }
        }
        text(1, self.request_id, out);
        uuid(2, &self.org_id, out);
        uuid(3, &self.agent_id, out);
        uuid(4, &self.token_id, out);
        text(5, self.model, out);
        text(6, self.route, out);
        varint(7, u64::from(self.status), out);
        varint(8, self.prompt_tokens, out);
        varint(9, self.completion_tokens, out);
        varint(10, self.total_tokens, out);
        let source = if self.estimated {
            pb::UsageSource::Estimated
        } else {
            pb::UsageSource::Provider
        };
        varint(11, source as u64, out);
        varint(12, u64::from(self.streamed), out);
        // int64 is the two's complement as a varint (a negative one takes ten bytes).
        varint(13, self.started_at_ms as u64, out);
        varint(14, self.duration_ms, out);
        if let Some(cost) = self.cost_usd {
            encode_key(15, WireType::SixtyFourBit, out);
            out.extend_from_slice(&cost.to_le_bytes());
        }
        text(16, self.provider, out);
        varint(17, u64::from(self.attempts), out);
        varint(18, self.cache_read_tokens, out);
        varint(19, self.cache_creation_tokens, out);
    }

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

/// Appends one entry of a `ShipUsage` body (and of a proxy worker's buffer): the record's
/// length (`u32` LE), then its encoding.
pub fn put_entry(record: &RecordRef<'_>, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    record.encode(out);
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// The entries of a `ShipUsage` body in order, as the bytes each length covers (decode each
/// with [`RecordRef::decode`]). Stops at a tail too short for its length: [`Entries::rest`] is
/// then not empty.
pub struct Entries<'a>(&'a [u8]);

impl<'a> Entries<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Entries(bytes)
    }

    /// What is left unread (empty after a well-formed body was walked to its end).
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len: [u8; 4] = self.0.get(..4)?.try_into().ok()?;
        let len = usize::try_from(u32::from_le_bytes(len)).ok()?;
        let entry = self.0.get(4..4usize.checked_add(len)?)?;
        self.0 = &self.0[4 + len..];
        Some(entry)
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
        RecordRef::decode(bytes).map(|r| r.to_record())
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

    #[test]
    fn long_strings_are_clipped_on_char_boundaries() {
        let mut r = sample(1);
        r.model = "é".repeat(200);
        let mut buf = Vec::new();
        r.encode(&mut buf);
        let back = UsageRecord::decode(&buf).expect("decodes");
        assert_eq!(back.model, "é".repeat(128));
    }

    proptest::proptest! {
        /// The shipper's direct encoding is exactly prost's encoding of the message, for any
        /// record the spool can hold (empty strings, zeros, negative times, no cost, odd UTF-8).
        #[test]
        fn encode_pb_is_prosts_encoding_of_to_pb(
            request_id in "\\PC{1,40}", model in "\\PC{0,40}", provider in "\\PC{0,12}",
            ids in proptest::array::uniform3(proptest::prelude::any::<u128>()),
            status in proptest::prelude::any::<u16>(),
            counts in proptest::array::uniform5(proptest::prelude::any::<u64>()),
            started in proptest::prelude::any::<i64>(), duration in proptest::prelude::any::<u64>(),
            cost in proptest::option::of(0.0f64..10.0), attempts in proptest::prelude::any::<u32>(),
            estimated in proptest::prelude::any::<bool>(), streamed in proptest::prelude::any::<bool>(),
        ) {
            use prost::Message;
            let r = UsageRecord {
                request_id, model, provider,
                org_id: Uuid::from_u128(ids[0]),
                agent_id: Uuid::from_u128(ids[1]),
                token_id: Uuid::from_u128(ids[2]),
                route: "/v1/messages".into(),
                status,
                prompt_tokens: counts[0],
                completion_tokens: counts[1],
                total_tokens: counts[2],
                cache_read_tokens: counts[3],
                cache_creation_tokens: counts[4],
                estimated, streamed,
                started_at_ms: started,
                duration_ms: duration,
                cost_usd: cost,
                attempts,
            };
            let mut spool = Vec::new();
            r.encode(&mut spool);
            let back = RecordRef::decode(&spool).expect("decodes");
            let mut direct = Vec::new();
            back.encode_pb(&mut direct);
            proptest::prop_assert_eq!(direct, back.to_record().to_pb().encode_to_vec());
        }
    }

    #[test]
    fn entries_walk_a_body_and_stop_at_a_short_tail() {
        let mut body = Vec::new();
        for i in 0..3 {
            put_entry(&sample(i).borrowed(), &mut body);
        }
        let mut entries = Entries::new(&body);
        let back: Vec<_> = entries.by_ref().filter_map(UsageRecord::decode).collect();
        assert_eq!(back, (0..3).map(sample).collect::<Vec<_>>());
        assert!(entries.rest().is_empty());
        let mut one = Vec::new();
        put_entry(&sample(2).borrowed(), &mut one);
        let last = one.len();
        for cut in [1, 4, 5, last - 4, last - 1] {
            let mut entries = Entries::new(&body[..body.len() - cut]);
            assert_eq!(entries.by_ref().count(), 2, "cut {cut}");
            assert!(!entries.rest().is_empty(), "cut {cut}");
        }
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
