//! Parsing the upstream's response head with the same strictness the server
//! applies to clients (RFC 9112 §6): a response the proxy cannot frame
//! without guessing is refused (502), never passed on. Also decides which
//! upstream headers reach the client.
//!
//! Not here: the body framing itself ([`super::body`]).

use bytes::Bytes;

use crate::http::ascii::starts_with_ignore_case;
use crate::http::HeaderValue;

/// Response head bytes the proxy will buffer before refusing (431-like).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header lines per response head.
pub const MAX_HEADERS: usize = 100;

/// How the body that follows the head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes (no length, no chunking).
    Close,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Upstream headers allowed through to the client (see [`passed_name`]).
    pub headers: Vec<(&'static str, HeaderValue)>,
    pub framing: Framing,
    /// The connection may carry another request after this body.
    pub keep_alive: bool,
    /// `Content-Type: text/event-stream`.
    pub event_stream: bool,
}

/// Why a response head was refused; all of them are 502 to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// httparse refused it (bad syntax, obs-fold, bad status line...).
    Malformed,
    TooLarge,
    /// Content-Length not a plain decimal, or several that disagree.
    BadContentLength,
    /// Both Content-Length and Transfer-Encoding (a smuggling shape).
    LengthAndChunked,
    /// Transfer-Encoding other than exactly `chunked`, or on HTTP/1.0.
    BadTransferEncoding,
    /// 101 Switching Protocols: never asked for.
    UnexpectedUpgrade,
}

/// Upstream headers the client sees. An allow-list, not a deny-list: the
/// provider's `Set-Cookie`, its own request id and rate-limit figures (they
/// describe the operator's account, shared by every tenant, and would clash
/// with the proxy's own `x-ratelimit-*`) stay behind. `Retry-After` passes so
/// SDKs back off on an upstream 429/503.
fn passed_name(name: &str) -> Option<&'static str> {
    const PASSED: &[&str] = &[
        "Content-Type",
        "Content-Encoding",
        "Cache-Control",
        "Retry-After",
        "retry-after-ms",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
    ];
    PASSED
        .iter()
        .copied()
        .find(|p| p.eq_ignore_ascii_case(name))
}

/// Parses a head from the start of `buf`. `Ok(None)`: need more bytes.
/// `Ok(Some((head, n)))`: the head used `n` bytes; interim 1xx heads are
/// returned too (`framing == Empty`, status < 200) and the caller skips them.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    // httparse's defaults refuse obs-fold and whitespace before the colon
    // in responses: the strict setting, kept on purpose.
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if n > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let status = resp.code.ok_or(HeadError::Malformed)?;
    let http11 = resp.version == Some(1);

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut saw_te = false;
    let mut close = !http11;
    let mut event_stream = false;
    let mut headers = Vec::new();
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = parse_content_length(h.value).ok_or(HeadError::BadContentLength)?;
            if content_length.is_some_and(|cl| cl != v) {
                return Err(HeadError::BadContentLength);
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, once: anything else (gzip, chunked twice, a
            // coding after chunked) would need guessing.
            for coding in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::BadTransferEncoding);
                }
                chunked = true;
            }
            saw_te = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                }
            }
        } else if let Some(passed) = passed_name(name) {
            if passed == "Content-Type" {
                event_stream = starts_with_ignore_case(h.value, b"text/event-stream");
            }
            headers.push((passed, HeaderValue::Owned(Bytes::copy_from_slice(h.value))));
        }
    }
    if saw_te && !chunked {
        return Err(HeadError::BadTransferEncoding);
    }
    if chunked && !http11 {
        return Err(HeadError::BadTransferEncoding);
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::LengthAndChunked);
    }
    if status == 101 {
        return Err(HeadError::UnexpectedUpgrade);
    }
    let framing = if status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(cl) = content_length {
        Framing::Length(cl)
    } else {
        close = true;
        Framing::Close
    };
    Ok(Some((
        ResponseHead {
            status,
            headers,
            framing,
            keep_alive: !close,
            event_stream,
        },
        n,
    )))
}

/// A Content-Length value: 1–19 ASCII digits, nothing else (no sign, no
/// list, no spaces; httparse already trimmed the field's outer whitespace).
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_head(raw)
    }

    fn head(raw: &[u8]) -> ResponseHead {
        parse(raw).unwrap().unwrap().0
    }

    #[test]
    fn frames_by_length_chunked_or_close() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
        );
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (200, Framing::Length(12), true)
        );
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.event_stream);
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!((h.status, h.framing), (100, Framing::Empty));
    }

    #[test]
    fn partial_until_the_blank_line() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Len").unwrap().is_none());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        let (_, n) = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"hi");
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let cases: &[(&[u8], HeadError)] = &[
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::LengthAndChunked),
            (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", HeadError::BadContentLength),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", HeadError::BadContentLength),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", HeadError::BadContentLength),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", HeadError::BadContentLength),
            (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", HeadError::BadContentLength),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", HeadError::BadTransferEncoding),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", HeadError::BadTransferEncoding),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::BadTransferEncoding),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n", HeadError::BadTransferEncoding),
            (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::BadTransferEncoding),
            (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", HeadError::Malformed),
            (b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", HeadError::Malformed),
            (b"HTTP/1.1 2000 OK\r\n\r\n", HeadError::Malformed),
            (b"HTTP/2 200 OK\r\n\r\n", HeadError::Malformed),
            (b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\n\r\n", HeadError::UnexpectedUpgrade),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse(raw).err(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn head_size_and_count_are_bounded() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 1));
        assert_eq!(parse(&raw).err(), Some(HeadError::TooLarge));
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse(&raw).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn passes_only_allowed_headers() {
        let h = head(
            b"HTTP/1.1 429 Too Many\r\nContent-Type: application/json\r\nSet-Cookie: s=1\r\n\
              x-request-id: up-1\r\nx-ratelimit-remaining-tokens: 5\r\nRetry-After: 3\r\n\
              openai-processing-ms: 12\r\nopenai-organization: operator-org\r\nContent-Length: 0\r\n\r\n",
        );
        let names: Vec<&str> = h.headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["Content-Type", "Retry-After", "openai-processing-ms"]
        );
    }
}
