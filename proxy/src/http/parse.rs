//! The request-head parser: bytes in, a [`Head`] with its body framing out.
//!
//! A pure function over the connection's read buffer (no I/O, no clock), so
//! every limit and smuggling defence is unit-tested from raw bytes. httparse
//! does the tokenising; this module adds the byte and count caps and decides
//! the body framing the way RFC 9112 §6 asks, refusing every ambiguity a
//! front/back parser pair could disagree on. It does not read bodies: see
//! [`super::chunked`] and the server loop.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use super::message::{Header, Headers, Method, Request, Version};

/// Request size limits. One copy per worker; cheap to clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of request line plus headers (431 beyond).
    pub header_bytes: usize,
    /// Number of header lines (431 beyond). At most [`MAX_HEADER_COUNT`].
    pub header_count: usize,
    /// Bytes of body after de-chunking, `IBEX_MAX_BODY_BYTES` (413 beyond).
    pub body_bytes: usize,
}

/// Hard cap on `Limits::header_count` (the parser's stack array).
pub const MAX_HEADER_COUNT: usize = 256;

impl Limits {
    /// `IBEX_MAX_BODY_BYTES`'s default (the config's `--help` states it from here).
    pub const DEFAULT_BODY_BYTES: usize = 4 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_bytes: 16 * 1024,
            header_count: 100,
            body_bytes: Self::DEFAULT_BODY_BYTES,
        }
    }
}

/// Why a request head was refused. Every variant closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// 400: malformed syntax or ambiguous framing (smuggling defences).
    Malformed,
    /// 431: head over `header_bytes` or more than `header_count` headers.
    HeadersTooLarge,
    /// 413: declared `Content-Length` over `body_bytes`.
    BodyTooLarge,
}

/// How the body that follows a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no `Content-Length`, or `Content-Length: 0`).
    Empty,
    /// Exactly this many bytes (already checked against `body_bytes`).
    Length(u64),
    /// `Transfer-Encoding: chunked`; de-chunk with [`super::chunked`].
    Chunked,
}

/// A parsed request head; the body is still on the wire (or in the buffer).
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Method,
    pub path: Bytes,
    pub query: Option<Bytes>,
    pub version: Version,
    pub headers: Headers,
    pub keep_alive: bool,
    pub framing: BodyFraming,
    /// `Expect: 100-continue` on HTTP/1.1.
    pub expect_continue: bool,
}

impl Head {
    pub fn into_request(self, body: Bytes) -> Request {
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            version: self.version,
            headers: self.headers,
            body,
            keep_alive: self.keep_alive,
        }
    }
}

/// Parses one request head from the front of `buf`. On success the head's
/// bytes are split off `buf` (header values become zero-copy slices of them)
/// and `buf` starts at the body. `Ok(None)`: the head is incomplete and still
/// within limits; read more and call again.
///
/// Empty lines before the request line (RFC 9112 §2.2) are dropped from `buf`.
pub fn parse_head(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Head>, ParseError> {
    skip_leading_newlines(buf);
    if !may_contain_head_end(buf) {
        return if buf.len() > limits.header_bytes {
            Err(ParseError::HeadersTooLarge)
        } else {
            Ok(None)
        };
    }

    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADER_COUNT];
    let count_cap = limits.header_count.min(MAX_HEADER_COUNT);
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut slots[..count_cap]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.header_bytes {
                Err(ParseError::HeadersTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::HeadersTooLarge),
        // Includes obs-fold (a header line starting with SP/HT is an invalid
        // header name for requests) and whitespace before the colon.
        Err(_) => return Err(ParseError::Malformed),
    };
    if head_len > limits.header_bytes {
        return Err(ParseError::HeadersTooLarge);
    }

    let version = match req.version {
        Some(1) => Version::Http11,
        Some(0) => Version::Http10,
        _ => return Err(ParseError::Malformed),
    };
    let method = method_from(req.method.unwrap_or(""));
    let target = req.path.unwrap_or("");
    if target.is_empty() {
        return Err(ParseError::Malformed);
    }

    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let target_start = offset(target.as_bytes());
    let target_end = target_start + target.len();
    let query_at = target.bytes().position(|b| b == b'?');

    let mut framing = FramingScan::default();
    let mut spans = Spans::new();
    for h in req.headers.iter() {
        framing.observe(h.name.as_bytes(), h.value)?;
        let name_start = offset(h.name.as_bytes());
        // httparse may give an empty value slice that points anywhere;
        // anchor empty values to the name so the slice stays in bounds.
        let value_start = if h.value.is_empty() {
            name_start
        } else {
            offset(h.value)
        };
        spans.push((name_start, h.name.len(), value_start, h.value.len()));
    }
    let body_framing = framing.framing(version, limits)?;
    let keep_alive = match version {
        Version::Http11 => !framing.conn_close,
        Version::Http10 => framing.conn_keep_alive && !framing.conn_close,
    };
    let expect_continue = version == Version::Http11 && framing.expect_continue;

    let head = buf.split_to(head_len).freeze();
    let headers = spans
        .iter()
        .map(|&(ns, nl, vs, vl)| Header {
            name: well_known_name(&head[ns..ns + nl])
                .map_or_else(|| head.slice(ns..ns + nl), Bytes::from_static),
            value: head.slice(vs..vs + vl),
        })
        .collect();
    let (path, query) = match query_at {
        Some(q) => (
            head.slice(target_start..target_start + q),
            Some(head.slice(target_start + q + 1..target_end)),
        ),
        None => (head.slice(target_start..target_end), None),
    };
    Ok(Some(Head {
        method,
        path,
        query,
        version,
        headers: Headers(headers),
        keep_alive,
        framing: body_framing,
        expect_continue,
    }))
}

/// Header offsets (name start, name len, value start, value len) into the
/// head, kept while httparse's borrow of the buffer is alive. On the stack
/// for the usual handful of headers, so a typical request makes no extra
/// allocation for them.
struct Spans {
    inline: [Span; INLINE_SPANS],
    len: usize,
    more: Vec<Span>,
}

type Span = (usize, usize, usize, usize);

const INLINE_SPANS: usize = 24;

impl Spans {
    fn new() -> Self {
        Spans {
            inline: [(0, 0, 0, 0); INLINE_SPANS],
            len: 0,
            more: Vec::new(),
        }
    }

    fn push(&mut self, span: Span) {
        if self.len < INLINE_SPANS {
            self.inline[self.len] = span;
            self.len += 1;
        } else {
            self.more.push(span);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Span> {
        self.inline[..self.len].iter().chain(self.more.iter())
    }
}

/// The static copy of a common header name when the client spelled it
/// exactly so (the bytes stay the client's): a static `Bytes` costs no
/// reference count, a slice of the head costs two atomic operations.
fn well_known_name(name: &[u8]) -> Option<&'static [u8]> {
    Some(match name {
        b"Host" => b"Host",
        b"host" => b"host",
        b"User-Agent" => b"User-Agent",
        b"user-agent" => b"user-agent",
        b"Accept" => b"Accept",
        b"accept" => b"accept",
        b"Authorization" => b"Authorization",
        b"authorization" => b"authorization",
        b"X-IBEX-Agent-ID" => b"X-IBEX-Agent-ID",
        b"x-ibex-agent-id" => b"x-ibex-agent-id",
        b"Content-Type" => b"Content-Type",
        b"content-type" => b"content-type",
        b"Content-Length" => b"Content-Length",
        b"content-length" => b"content-length",
        b"Accept-Encoding" => b"Accept-Encoding",
        b"accept-encoding" => b"accept-encoding",
        b"Connection" => b"Connection",
        b"connection" => b"connection",
        b"X-Request-ID" => b"X-Request-ID",
        b"x-request-id" => b"x-request-id",
        _ => return None,
    })
}

fn method_from(m: &str) -> Method {
    match m {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    }
}

fn skip_leading_newlines(buf: &mut BytesMut) {
    let n = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    if n > 0 {
        let _ = buf.split_to(n);
    }
}

/// Cheap pre-check so a head trickling in byte by byte is not re-parsed by
/// httparse on every read: true if `buf` holds `\n\n` or `\n\r\n`.
fn may_contain_head_end(buf: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + p;
        match buf.get(at + 1) {
            Some(b'\n') => return true,
            Some(b'\r') if buf.get(at + 2) == Some(&b'\n') => return true,
            None => return false,
            _ => i = at + 1,
        }
    }
    false
}

/// What the framing-relevant headers said, gathered in one pass.
#[derive(Default)]
struct FramingScan {
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// Every coding listed so far is `chunked`, and exactly one was listed.
    te_codings: u32,
    te_only_chunked: bool,
    host_seen: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    expect_continue: bool,
}

impl FramingScan {
    fn observe(&mut self, name: &[u8], value: &[u8]) -> Result<(), ParseError> {
        if name.eq_ignore_ascii_case(b"content-length") {
            // RFC 9112 §6.3: a repeated Content-Length (even with the same
            // value) or a list is refused rather than reconciled.
            if self.content_length.is_some() {
                return Err(ParseError::Malformed);
            }
            self.content_length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !self.transfer_encoding {
                self.te_only_chunked = true;
            }
            self.transfer_encoding = true;
            for coding in value.split(|&b| b == b',') {
                let coding = trim_ows(coding);
                self.te_codings += 1;
                if !coding.eq_ignore_ascii_case(b"chunked") {
                    self.te_only_chunked = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim_ows(token);
                if token.eq_ignore_ascii_case(b"close") {
                    self.conn_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.conn_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            // RFC 9112 §3.2: more than one Host is a 400.
            if self.host_seen {
                return Err(ParseError::Malformed);
            }
            self.host_seen = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            self.expect_continue = trim_ows(value).eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }

    fn framing(&self, version: Version, limits: &Limits) -> Result<BodyFraming, ParseError> {
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400 — decided
        // here, from the head alone, before any body is read.
        if version == Version::Http11 && !self.host_seen {
            return Err(ParseError::Malformed);
        }
        if self.transfer_encoding {
            // RFC 9112 §6.1: TE on HTTP/1.0 is a framing fault; TE together
            // with CL is the classic smuggling vector — refuse, don't pick one.
            if version == Version::Http10 || self.content_length.is_some() {
                return Err(ParseError::Malformed);
            }
            // Only `chunked`, exactly once: any other coding (or chunked not
            // last) leaves the length undecidable for a request.
            if !self.te_only_chunked || self.te_codings != 1 {
                return Err(ParseError::Malformed);
            }
            return Ok(BodyFraming::Chunked);
        }
        match self.content_length {
            None | Some(0) => Ok(BodyFraming::Empty),
            Some(n) if n > limits.body_bytes as u64 => Err(ParseError::BodyTooLarge),
            Some(n) => Ok(BodyFraming::Length(n)),
        }
    }
}

/// `1*DIGIT` and nothing else: no sign, no spaces, no list, no overflow
/// (RFC 9110 §8.6; unlike `str::parse`, which accepts `+5`).
fn parse_content_length(value: &[u8]) -> Result<u64, ParseError> {
    if value.is_empty() || value.len() > 19 {
        return Err(ParseError::Malformed);
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return Err(ParseError::Malformed);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(ParseError::Malformed)?;
    }
    Ok(n)
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |p| p + 1);
    &s[start..end]
}
