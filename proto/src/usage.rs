//! One usage record (SPEC §10) and its compact binary encoding: what a proxy's spool holds and
//! what `ShipUsage` carries to authd as it is (so the proxy ships without re-encoding, and
//! authd decodes with this same code).
//!
//! Layout, version 2 (what [`RecordRef::encode`] writes): `2u8`, flags (`1` estimated,
//! `2` streamed, `4` has cost, `8` UUID request id, `16` known route), org, agent, token
//! (16 bytes each); then LEB128 varints: status, prompt, completion, total, cache read, cache
//! creation tokens, started at (unix ms, zigzag), duration ms, attempts; cost (`f64` LE, only
//! with its flag); the request id as its 16 bytes when it is a lowercase hyphenated UUID (the
//! proxy's own ids; the text comes back exactly) else varint length + UTF-8; model (varint
//! length + UTF-8); the route as one byte of [`ROUTES`] when it is one of them, else varint
//! length + UTF-8; provider (varint length + UTF-8). A typical chat record takes ~105 bytes
//! (version 1: 195). [`ROUTES`] never changes: a new route goes as text, so an authd never meets
//! a code it does not know.
//!
//! Version 1 (`1u8`, flags, the ids, status `u16`, the five counts, started at, duration
//! (`u64`/`i64` LE), cost, attempts `u32`, then request id, model, route, provider as `u16`
//! length + UTF-8) is still read: a spool written by an older proxy, or its `ShipUsage` calls.
//!
//! [`RecordRef::decode`] is total: any byte string gives a record or `None`, never a panic, and
//! never reads past its input; a varint must be minimal and in range, so a record has one
//! encoding. Framing and checksums are the spool's business.
//!
//! A `ShipUsage` body's `records` are such encodings back to back, each after its length
//! (`u32` LE): [`Entries`] walks them.

use crate::pb;
use uuid::Uuid;

pub const MAX_REQUEST_ID: usize = 128;
pub const MAX_MODEL: usize = 256;
pub const MAX_ROUTE: usize = 128;
pub const MAX_PROVIDER: usize = 128;

const V1: u8 = 1;
const V2: u8 = 2;
const ESTIMATED: u8 = 1;
const STREAMED: u8 = 2;
const HAS_COST: u8 = 4;
/// Version 2: the request id is a UUID's 16 bytes.
const UUID_ID: u8 = 8;
/// Version 2: the route is one byte, its place in [`ROUTES`] plus one.
const KNOWN_ROUTE: u8 = 16;

/// The routes version 2 writes as one byte (code = index + 1). Fixed for good: a decoder of
/// any age knows every code; a route added later is written as text.
pub const ROUTES: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/models",
];

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

/// Each byte's value as a lowercase hex digit; `0xFF` for any other byte.
static HEX: [u8; 256] = {
    let mut t = [0xFF; 256];
    let mut i = 0;
    while i < 16 {
        t[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Where the two hex digits of each of a UUID's 16 bytes start in its hyphenated form.
const HEX_AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// The UUID whose lowercase hyphenated form is exactly `s` (so it gives `s` back), or `None`.
/// (Every record the proxy makes takes this path with its own request id: a table look-up per
/// digit and one test at the end, no branch per character.)
fn canonical_uuid(s: &str) -> Option<Uuid> {
    let b: &[u8; uuid::fmt::Hyphenated::LENGTH] = s.as_bytes().try_into().ok()?;
    if [b[8], b[13], b[18], b[23]] != [b'-'; 4] {
        return None;
    }
    let mut out = [0u8; 16];
    let mut bad = 0u8;
    for (o, &at) in out.iter_mut().zip(&HEX_AT) {
        let (high, low) = (HEX[usize::from(b[at])], HEX[usize::from(b[at + 1])]);
        bad |= high | low;
        *o = high << 4 | low;
    }
    // A digit that was none has its high bits set.
    (bad < 16).then(|| Uuid::from_bytes(out))
}

/// A record's request id: borrowed text, or a UUID (what version 2 decodes the proxy's own ids
/// to; its text is the lowercase hyphenated form). Two are equal when their texts are.
#[derive(Debug, Clone, Copy)]
pub enum RequestIdRef<'a> {
    Text(&'a str),
    Uuid(Uuid),
}

impl Default for RequestIdRef<'_> {
    fn default() -> Self {
        RequestIdRef::Text("")
    }
}

impl<'a> From<&'a str> for RequestIdRef<'a> {
    fn from(s: &'a str) -> Self {
        RequestIdRef::Text(s)
    }
}

impl<'a> RequestIdRef<'a> {
    /// The text, written into `buf` for a UUID.
    pub fn as_str<'b>(&'b self, buf: &'b mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'b str {
        match self {
            RequestIdRef::Text(s) => s,
            RequestIdRef::Uuid(id) => id.as_hyphenated().encode_lower(buf),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            RequestIdRef::Text(s) => s.len(),
            RequestIdRef::Uuid(_) => uuid::fmt::Hyphenated::LENGTH,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As a UUID when the text is one's lowercase hyphenated form.
    fn as_uuid(&self) -> Option<Uuid> {
        match self {
            RequestIdRef::Text(s) => canonical_uuid(s),
            RequestIdRef::Uuid(id) => Some(*id),
        }
    }
}

impl std::fmt::Display for RequestIdRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str(&mut [0; uuid::fmt::Hyphenated::LENGTH]))
    }
}

impl PartialEq for RequestIdRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        let (mut a, mut b) = ([0; 36], [0; 36]);
        self.as_str(&mut a) == other.as_str(&mut b)
    }
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
        self.text(len, max)
    }
    fn text(&mut self, len: usize, max: usize) -> Option<&'a str> {
        if len > max {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    /// A minimal LEB128 varint of at most 64 bits.
    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return None;
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                // A zero last byte after the first would be a longer encoding of the same n.
                return (b != 0 || shift == 0).then_some(n);
            }
        }
        None
    }
    fn varint_str(&mut self, max: usize) -> Option<&'a str> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.text(len, max)
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_varint_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = clip(s, max);
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// A record made of borrowed parts: what the request path encodes, and what the shipper reads
/// back from the spool, with no allocation either way.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecordRef<'a> {
    pub request_id: RequestIdRef<'a>,
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
    /// The record encoded in exactly `bytes` (either version), or `None`.
    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let record = match r.u8()? {
            V1 => Self::decode_v1(&mut r)?,
            V2 => Self::decode_v2(&mut r)?,
            _ => return None,
        };
        (r.0.is_empty() && !record.request_id.is_empty()).then_some(record)
    }

    fn decode_v2(r: &mut Reader<'a>) -> Option<Self> {
        let flags = r.u8()?;
        if flags & !(ESTIMATED | STREAMED | HAS_COST | UUID_ID | KNOWN_ROUTE) != 0 {
            return None;
        }
        let (org_id, agent_id, token_id) = (r.uuid()?, r.uuid()?, r.uuid()?);
        let status = u16::try_from(r.varint()?).ok()?;
        let (prompt_tokens, completion_tokens, total_tokens) =
            (r.varint()?, r.varint()?, r.varint()?);
        let (cache_read_tokens, cache_creation_tokens) = (r.varint()?, r.varint()?);
        let started_at_ms = unzigzag(r.varint()?);
        let duration_ms = r.varint()?;
        let attempts = u32::try_from(r.varint()?).ok()?;
        let cost_usd = if flags & HAS_COST != 0 {
            Some(f64::from_le_bytes(r.array()?))
        } else {
            None
        };
        let request_id = if flags & UUID_ID != 0 {
            RequestIdRef::Uuid(r.uuid()?)
        } else {
            let text = r.varint_str(MAX_REQUEST_ID)?;
            // The UUID form is the only encoding of a UUID id.
            if canonical_uuid(text).is_some() {
                return None;
            }
            RequestIdRef::Text(text)
        };
        let model = r.varint_str(MAX_MODEL)?;
        let route = if flags & KNOWN_ROUTE != 0 {
            *ROUTES.get(usize::from(r.u8()?).checked_sub(1)?)?
        } else {
            let text = r.varint_str(MAX_ROUTE)?;
            if ROUTES.contains(&text) {
                return None;
            }
            text
        };
        Some(RecordRef {
            request_id,
            org_id,
            agent_id,
            token_id,
            model,
            route,
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
            provider: r.varint_str(MAX_PROVIDER)?,
            attempts,
        })
    }

    fn decode_v1(r: &mut Reader<'a>) -> Option<Self> {
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
        Some(RecordRef {
            request_id: RequestIdRef::Text(r.str(MAX_REQUEST_ID)?),
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
        })
    }

    /// The owned record.
    pub fn to_record(&self) -> UsageRecord {
        UsageRecord {
            request_id: self.request_id.to_string(),
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
        text(1, self.request_id.as_str(&mut [0; 36]), out);
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

    /// Appends the version 2 encoding to `out` (strings clipped to their maxima).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let cost = self.cost_usd.filter(|c| c.is_finite() && *c >= 0.0);
        let uuid_id = self.request_id.as_uuid();
        let route = ROUTES.iter().position(|r| *r == self.route);
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
        if uuid_id.is_some() {
            flags |= UUID_ID;
        }
        if route.is_some() {
            flags |= KNOWN_ROUTE;
        }
        // Fixed part and varints at their longest, then the strings.
        out.reserve(2 + 48 + 9 * 10 + 8 + 4 * 2 + MAX_REQUEST_ID + self.model.len() + 1);
        out.push(V2);
        out.push(flags);
        out.extend_from_slice(self.org_id.as_bytes());
        out.extend_from_slice(self.agent_id.as_bytes());
        out.extend_from_slice(self.token_id.as_bytes());
        for n in [
            u64::from(self.status),
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cache_read_tokens,
            self.cache_creation_tokens,
            zigzag(self.started_at_ms),
            self.duration_ms,
            u64::from(self.attempts),
        ] {
            put_varint(out, n);
        }
        if let Some(cost) = cost {
            out.extend_from_slice(&cost.to_le_bytes());
        }
        match (uuid_id, self.request_id) {
            (Some(id), _) => out.extend_from_slice(id.as_bytes()),
            // (A `Uuid` id always took the branch above.)
            (None, id) => put_varint_str(out, id.as_str(&mut [0; 36]), MAX_REQUEST_ID),
        }
        put_varint_str(out, self.model, MAX_MODEL);
        match route {
            // ROUTES has six entries: the code fits a byte.
            Some(i) => out.push(i as u8 + 1),
            None => put_varint_str(out, self.route, MAX_ROUTE),
        }
        put_varint_str(out, self.provider, MAX_PROVIDER);
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

impl UsageRecord {
    /// The record's fields, borrowed.
    pub fn borrowed(&self) -> RecordRef<'_> {
        RecordRef {
            request_id: RequestIdRef::Text(&self.request_id),
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
            request_id in request_ids(), route in routes(),
            model in "\\PC{0,40}", provider in "\\PC{0,12}",
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
                route,
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
        let mut with_uuid = sample(3);
        with_uuid.request_id = Uuid::from_u128(7).to_string();
        for r in [sample(3), with_uuid] {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            for n in 0..buf.len() {
                assert_eq!(UsageRecord::decode(&buf[..n]), None, "prefix {n}");
            }
            buf.push(0);
            assert_eq!(UsageRecord::decode(&buf), None);
        }
    }

    /// The version 1 encoding, as proxies before version 2 wrote it.
    fn encode_v1(r: &UsageRecord, out: &mut Vec<u8>) {
        let flags =
            u8::from(r.estimated) | u8::from(r.streamed) << 1 | u8::from(r.cost_usd.is_some()) << 2;
        out.extend_from_slice(&[1, flags]);
        for id in [r.org_id, r.agent_id, r.token_id] {
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&r.status.to_le_bytes());
        for n in [
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cache_read_tokens,
            r.cache_creation_tokens,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&r.started_at_ms.to_le_bytes());
        out.extend_from_slice(&r.duration_ms.to_le_bytes());
        if let Some(c) = r.cost_usd {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&r.attempts.to_le_bytes());
        for s in [&r.request_id, &r.model, &r.route, &r.provider] {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }

    #[test]
    fn version_1_records_still_decode() {
        for i in 0..8 {
            let mut r = sample(i);
            if i % 2 == 1 {
                r.request_id = Uuid::from_u128(u128::from(i)).to_string();
            }
            let mut v1 = Vec::new();
            encode_v1(&r, &mut v1);
            assert_eq!(UsageRecord::decode(&v1), Some(r.clone()), "record {i}");
            let mut v2 = Vec::new();
            r.encode(&mut v2);
            assert!(v2.len() < v1.len(), "{} < {}", v2.len(), v1.len());
        }
    }

    proptest::proptest! {
        /// A request id is taken as a UUID exactly when it is one's lowercase hyphenated form
        /// (which it then gives back), whatever else it is: uppercase, simple, hex and hyphens
        /// in the wrong places, a digit replaced by any other byte.
        #[test]
        fn only_a_canonical_id_is_taken_as_a_uuid(
            id in request_ids(),
            n in proptest::prelude::any::<u128>(),
            at in 0usize..36, byte in proptest::prelude::any::<u8>(),
        ) {
            let canonical = |s: &str| Uuid::try_parse(s).is_ok_and(|u| u.to_string() == s);
            proptest::prop_assert_eq!(canonical_uuid(&id).map(|u| u.to_string()), canonical(&id).then(|| id.clone()));
            let mut one = Uuid::from_u128(n).to_string().into_bytes();
            one[at] = byte;
            if let Ok(one) = std::str::from_utf8(&one) {
                proptest::prop_assert_eq!(canonical_uuid(one).map(|u| u.to_string()), canonical(one).then(|| one.to_owned()));
            }
        }
    }

    /// Each record has one encoding: the longer spellings of a UUID id, a known route or a
    /// number are refused, as is a route code past the table.
    #[test]
    fn only_the_shortest_spelling_decodes() {
        let mut r = sample(1);
        r.request_id = Uuid::from_u128(0xdead_beef << 64 | 9).to_string();
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert_eq!(buf[1] & (UUID_ID | KNOWN_ROUTE), UUID_ID | KNOWN_ROUTE);
        let fixed = 2 + 48;

        // The UUID id as text.
        let mut text_id = buf.clone();
        text_id[1] &= !UUID_ID;
        let at = buf.len() - 16 - 12 - 1 - 1;
        text_id.splice(at..at + 16, {
            let mut t = vec![36u8];
            t.extend_from_slice(r.request_id.as_bytes());
            t
        });
        assert_eq!(UsageRecord::decode(&text_id), None, "UUID id as text");
        // Uppercase is not the UUID's form: it stays text and comes back as it was.
        let mut upper = r.clone();
        upper.request_id = r.request_id.to_uppercase();
        let mut up = Vec::new();
        upper.encode(&mut up);
        assert_eq!(up[1] & UUID_ID, 0);
        assert_eq!(UsageRecord::decode(&up), Some(upper));

        // A known route as text.
        let mut route_text = buf.clone();
        route_text[1] &= !KNOWN_ROUTE;
        let at = buf.len() - 2;
        route_text.splice(at..at + 1, {
            let mut t = vec![20u8];
            t.extend_from_slice(b"/v1/chat/completions");
            t
        });
        assert_eq!(
            UsageRecord::decode(&route_text),
            None,
            "known route as text"
        );
        for code in [0u8, 7, 255] {
            let mut bad = buf.clone();
            bad[at] = code;
            assert_eq!(UsageRecord::decode(&bad), None, "route code {code}");
        }

        // The status (200 = c8 01) spelled with a needless zero byte: c8 81 00.
        assert_eq!(&buf[fixed..fixed + 2], &[0xc8, 0x01]);
        let mut long = buf.clone();
        long.splice(fixed..fixed + 2, [0xc8, 0x81, 0x00]);
        assert_eq!(UsageRecord::decode(&long), None, "overlong varint");
        // A status past u16.
        let mut big = buf.clone();
        big.splice(fixed..fixed + 2, [0x80, 0x80, 0x04]);
        assert_eq!(UsageRecord::decode(&big), None, "status > 65535");
    }

    fn request_ids() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "\\PC{1,40}",
            any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
            any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().to_uppercase()),
            any::<u128>().prop_map(|n| Uuid::from_u128(n).simple().to_string()),
            "[0-9a-f-]{36}",
        ]
    }

    fn routes() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(&ROUTES[..]).prop_map(str::to_owned),
            "/v1/[a-z/]{0,30}",
        ]
    }

    proptest::proptest! {
        /// Any record the spool can hold comes back exactly, in either version.
        #[test]
        fn every_record_round_trips(
            request_id in request_ids(), route in routes(),
            model in "\\PC{0,40}", provider in "\\PC{0,12}",
            ids in proptest::array::uniform3(proptest::prelude::any::<u128>()),
            status in proptest::prelude::any::<u16>(),
            counts in proptest::array::uniform5(proptest::prelude::any::<u64>()),
            started in proptest::prelude::any::<i64>(), duration in proptest::prelude::any::<u64>(),
            cost in proptest::option::of(0.0f64..10.0), attempts in proptest::prelude::any::<u32>(),
            estimated in proptest::prelude::any::<bool>(), streamed in proptest::prelude::any::<bool>(),
        ) {
            let r = UsageRecord {
                request_id, model, provider, route,
                org_id: Uuid::from_u128(ids[0]),
                agent_id: Uuid::from_u128(ids[1]),
                token_id: Uuid::from_u128(ids[2]),
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
            let mut v2 = Vec::new();
            r.encode(&mut v2);
            proptest::prop_assert_eq!(UsageRecord::decode(&v2), Some(r.clone()));
            let mut v1 = Vec::new();
            encode_v1(&r, &mut v1);
            proptest::prop_assert_eq!(UsageRecord::decode(&v1), Some(r));
        }
    }
}
