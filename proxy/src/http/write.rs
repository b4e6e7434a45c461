//! Serialising a response head. Pure: writes into a caller-owned buffer that
//! the server loop reuses for every response on a connection.
//!
//! The server owns the framing headers (`Content-Length`,
//! `Transfer-Encoding`, `Connection`, `Date`): copies of them in
//! `Response::headers` are dropped so a handler or a forwarded upstream
//! response can never produce two conflicting framings.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use super::ascii::push_decimal;
use super::message::HeaderValue;

/// How the body after this head is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body and no length header (1xx, 204, 304).
    NoBody,
    /// `Content-Length: n` (for HEAD: the length a GET would have sent).
    Length(u64),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 streams).
    Chunked,
    /// A stream to an HTTP/1.0 client: raw bytes, ended by closing.
    UntilClose,
}

/// Appends `HTTP/1.1 <status> <reason>`, the response's own headers, `Date`,
/// the framing header and `Connection` to `out`, ending with the blank line.
/// `close`: this response ends the connection. `http10_keep_alive`: the
/// client is HTTP/1.0 and asked to keep the connection (it must be told yes).
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&'static str, HeaderValue)],
    body: BodyKind,
    close: bool,
    http10_keep_alive: bool,
    date: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if is_framing_header(name) || !is_safe_value(value.as_bytes()) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
    match body {
        BodyKind::NoBody | BodyKind::UntilClose => {}
        BodyKind::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if close || body == BodyKind::UntilClose {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A value that cannot split the response: no CR, LF or NUL (a forwarded or
/// echoed value carrying one is dropped rather than written).
fn is_safe_value(value: &[u8]) -> bool {
    !value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
}

fn is_framing_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "connection", "date"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// Appends the size line of one chunk: `<hex>\r\n`.
pub(crate) fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n as u64;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Whether a response with this status carries a body at all.
pub(crate) fn status_has_body(status: u16) -> bool {
    !(status < 200 || status == 204 || status == 304)
}

/// The `Date` header value, formatted at most once a second per worker.
#[derive(Debug, Default)]
pub struct DateCache {
    second: Cell<u64>,
    value: Cell<[u8; 29]>,
}

impl DateCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// IMF-fixdate of now, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub fn now(&self) -> [u8; 29] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second.get() || second == 0 {
            let text = httpdate::fmt_http_date(now);
            let mut value = [b' '; 29];
            let n = text.len().min(29);
            value[..n].copy_from_slice(&text.as_bytes()[..n]);
            self.value.set(value);
            self.second.set(second);
        }
        self.value.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(
        status: u16,
        headers: &[(&'static str, HeaderValue)],
        body: BodyKind,
        close: bool,
    ) -> String {
        let mut out = Vec::new();
        write_head(&mut out, status, headers, body, close, false, b"DATE");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_status_headers_and_length() {
        let h = head(
            200,
            &[("Content-Type", HeaderValue::Static("application/json"))],
            BodyKind::Length(15),
            false,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: DATE\r\nContent-Length: 15\r\n\r\n"
        );
    }

    #[test]
    fn server_owns_framing_headers() {
        let h = head(
            200,
            &[
                ("content-length", HeaderValue::Static("99")),
                ("Transfer-Encoding", HeaderValue::Static("gzip")),
                ("Connection", HeaderValue::Static("keep-alive")),
            ],
            BodyKind::Chunked,
            true,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nDate: DATE\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn values_that_could_split_the_response_are_dropped() {
        let h = head(
            200,
            &[
                (
                    "X-Evil",
                    HeaderValue::Owned(bytes::Bytes::from_static(b"a\r\nSet-Cookie: x=1")),
                ),
                (
                    "X-Nul",
                    HeaderValue::Owned(bytes::Bytes::from_static(b"a\0b")),
                ),
                ("X-Fine", HeaderValue::Static("a\tb")),
            ],
            BodyKind::Length(0),
            false,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nX-Fine: a\tb\r\nDate: DATE\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn http10_keep_alive_is_confirmed() {
        let mut out = Vec::new();
        write_head(&mut out, 404, &[], BodyKind::Length(0), false, true, b"D");
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut out = Vec::new();
        push_chunk_size(&mut out, 0x1a2b);
        assert_eq!(out, b"1a2b\r\n");
        out.clear();
        push_chunk_size(&mut out, 0);
        assert_eq!(out, b"0\r\n");
    }

    #[test]
    fn date_is_imf_fixdate() {
        let d = DateCache::new().now();
        let s = std::str::from_utf8(&d).unwrap();
        assert!(s.ends_with(" GMT"), "{s}");
        assert_eq!(s.len(), 29);
    }
}
