//! Parser tests from raw bytes: every limit, every smuggling case, keep-alive
//! rules, pipelined heads, and arbitrary input.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::error::ApiError;

const GET: &[u8] = b"GET /v1/internal/auth-probe?x=1&y=2 HTTP/1.1\r\n\
Host: proxy.local\r\n\
Authorization: Bearer ibex_pat_00000000-0000-0000-0000-000000000004_secret\r\n\
X-IBEX-Agent-ID: 00000000-0000-0000-0000-000000000003\r\n\
Accept: */*\r\n\r\n";

fn parse(raw: &[u8]) -> Result<Option<Head>, ParseError> {
    parse_head(&mut BytesMut::from(raw), &Limits::default())
}

fn parse_ok(raw: &[u8]) -> Head {
    match parse(raw) {
        Ok(Some(h)) => h,
        other => panic!(
            "expected a head from {:?}, got {other:?}",
            String::from_utf8_lossy(raw)
        ),
    }
}

#[test]
fn parses_a_typical_request_zero_copy() {
    let mut buf = BytesMut::from(GET);
    buf.extend_from_slice(b"NEXT");
    let head = parse_head(&mut buf, &Limits::default()).unwrap().unwrap();
    assert_eq!(head.method, Method::Get);
    assert_eq!(&head.path[..], b"/v1/internal/auth-probe");
    assert_eq!(head.query.as_deref(), Some(&b"x=1&y=2"[..]));
    assert_eq!(head.version, Version::Http11);
    assert!(head.keep_alive);
    assert_eq!(head.framing, BodyFraming::Empty);
    assert_eq!(head.headers.0.len(), 4);
    assert_eq!(
        head.headers.get("x-ibex-agent-id").map(|v| &v[..]),
        Some(&b"00000000-0000-0000-0000-000000000003"[..])
    );
    assert_eq!(
        head.headers.get("HOST").map(|v| &v[..]),
        Some(&b"proxy.local"[..])
    );
    // The rest of the buffer is the next message, untouched.
    assert_eq!(&buf[..], b"NEXT");
    // Values are slices of one shared head buffer, not copies.
    let host = head.headers.get("host").unwrap();
    let path = &head.path;
    let distance = (host.as_ptr() as usize).abs_diff(path.as_ptr() as usize);
    assert!(distance < GET.len());
}

#[test]
fn every_prefix_is_incomplete_and_left_in_place() {
    for n in 0..GET.len() {
        let mut buf = BytesMut::from(&GET[..n]);
        assert!(
            matches!(parse_head(&mut buf, &Limits::default()), Ok(None)),
            "prefix {n}"
        );
        assert_eq!(&buf[..], &GET[..n], "prefix {n} must stay buffered");
    }
}

#[test]
fn methods_and_empty_values() {
    for (m, want) in [
        ("GET", Method::Get),
        ("HEAD", Method::Head),
        ("POST", Method::Post),
        ("PUT", Method::Put),
        ("DELETE", Method::Delete),
        ("PATCH", Method::Patch),
        ("OPTIONS", Method::Options),
        ("BREW", Method::Other),
        ("get", Method::Other),
    ] {
        let raw = format!("{m} / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Spaces:   \r\n\r\n");
        let head = parse_ok(raw.as_bytes());
        assert_eq!(head.method, want);
        assert_eq!(head.query, None);
        assert_eq!(head.headers.get("x-empty").map(|v| v.len()), Some(0));
        assert_eq!(head.headers.get("x-spaces").map(|v| v.len()), Some(0));
    }
}

#[test]
fn leading_empty_lines_are_ignored() {
    let head = parse_ok(b"\r\n\r\nGET /a HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(&head.path[..], b"/a");
    // Only newlines so far: nothing to parse yet, nothing kept.
    let mut buf = BytesMut::from(&b"\r\n\r\n"[..]);
    assert!(matches!(parse_head(&mut buf, &Limits::default()), Ok(None)));
    assert!(buf.is_empty());
}

#[test]
fn body_framing() {
    let cases: &[(&[u8], BodyFraming)] = &[
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
            BodyFraming::Empty,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n",
            BodyFraming::Length(12),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length:7\r\n\r\n",
            BodyFraming::Length(7),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 00012\r\n\r\n",
            BodyFraming::Length(12),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            BodyFraming::Chunked,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
            BodyFraming::Chunked,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  chunked \r\n\r\n",
            BodyFraming::Chunked,
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n",
            BodyFraming::Length(3),
        ),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", BodyFraming::Empty),
    ];
    for (raw, want) in cases {
        assert_eq!(
            parse_ok(raw).framing,
            *want,
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

/// Each of these must be refused with 400 and the connection closed: they
/// are the inputs on which two HTTP parsers can disagree about where a
/// request ends (request smuggling) or plain syntax errors.
const MALFORMED: &[(&str, &[u8])] = &[
    (
        "TE and CL",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    ),
    (
        "CL and TE",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "CL 0 and TE",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "duplicate CL, same value",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    ),
    (
        "conflicting CL",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ),
    (
        "CL list",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
    ),
    (
        "CL plus sign",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
    ),
    (
        "CL minus sign",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n",
    ),
    (
        "CL inner space",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 5\r\n\r\n",
    ),
    ("CL hex", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n"),
    (
        "CL underscore",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1_0\r\n\r\n",
    ),
    ("CL empty", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n"),
    (
        "CL decimal",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5.0\r\n\r\n",
    ),
    (
        "CL overflow",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551616\r\n\r\n",
    ),
    (
        "CL 20 digits",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 00000000000000000001\r\n\r\n",
    ),
    (
        "CL space before colon",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\n",
    ),
    (
        "TE on HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "TE gzip only",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    ),
    (
        "TE identity",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n",
    ),
    (
        "TE chunked not last",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    ),
    (
        "TE gzip then chunked",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ),
    (
        "TE chunked twice",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    ),
    (
        "TE in two headers",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "TE look-alike",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
    ),
    ("TE empty", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n"),
    (
        "TE trailing comma",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\n\r\n",
    ),
    (
        "TE space before colon",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
    ),
    ("obs-fold SP", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2\r\n\r\n"),
    ("obs-fold HT", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\t2\r\n\r\n"),
    (
        "obs-fold of CL",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n 5\r\n\r\n",
    ),
    (
        "space before first header",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    ),
    (
        "duplicate Host",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ),
    ("HTTP/2.0 version", b"GET / HTTP/2.0\r\n\r\n"),
    ("HTTP/0.9 style", b"GET /\r\n\r\n"),
    ("lowercase version", b"GET / http/1.1\r\n\r\n"),
    ("no target", b"GET  HTTP/1.1\r\nHost: h\r\n\r\n"),
    (
        "NUL in header value",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    ),
    (
        "bare CR in header value",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    ),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: h\r\nX-A\r\n\r\n"),
    (
        "control char in name",
        b"GET / HTTP/1.1\r\nHost: h\r\nX\x01A: 1\r\n\r\n",
    ),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n"),
    (
        "binary garbage",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ),
];

#[test]
fn smuggling_and_syntax_cases_are_400() {
    for (name, raw) in MALFORMED {
        assert_eq!(
            parse(raw).map(|h| h.map(|h| h.framing)),
            Err(ParseError::Malformed),
            "{name}"
        );
        assert_eq!(ApiError::from(ParseError::Malformed).status(), 400);
        assert!(ApiError::from(ParseError::Malformed).closes_connection());
    }
}

#[test]
fn header_bytes_limit_is_431() {
    let limits = Limits {
        header_bytes: 128,
        ..Limits::default()
    };
    let head_of = |len: usize| {
        let base = "GET / HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n".len();
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(len - base)
        )
    };
    // Exactly at the limit: accepted.
    let raw = head_of(128);
    assert_eq!(raw.len(), 128);
    assert!(parse_head(&mut BytesMut::from(raw.as_bytes()), &limits)
        .unwrap()
        .is_some());
    // One byte over, complete: refused.
    let raw = head_of(129);
    assert_eq!(
        parse_head(&mut BytesMut::from(raw.as_bytes()), &limits).err(),
        Some(ParseError::HeadersTooLarge)
    );
    // Over the limit and still incomplete: refused without waiting for more.
    let raw = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Pad: {}", "a".repeat(200));
    assert_eq!(
        parse_head(&mut BytesMut::from(raw.as_bytes()), &limits).err(),
        Some(ParseError::HeadersTooLarge)
    );
    // Under the limit and incomplete: wait.
    let raw = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Pad: {}", "a".repeat(50));
    assert!(parse_head(&mut BytesMut::from(raw.as_bytes()), &limits)
        .unwrap()
        .is_none());
    assert_eq!(ApiError::from(ParseError::HeadersTooLarge).status(), 431);
}

#[test]
fn http11_needs_exactly_one_host() {
    // RFC 9112 §3.2; the head alone decides, so a claimed body is never read.
    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    ] {
        assert_eq!(
            parse_head(&mut BytesMut::from(raw), &Limits::default()).err(),
            Some(ParseError::Malformed),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    // HTTP/1.0 may omit it.
    assert!(parse_head(
        &mut BytesMut::from(&b"GET / HTTP/1.0\r\n\r\n"[..]),
        &Limits::default()
    )
    .unwrap()
    .is_some());
}

#[test]
fn header_count_limit_is_431() {
    let limits = Limits {
        header_count: 10,
        ..Limits::default()
    };
    // `n` headers in all, Host one of them.
    let with_headers = |n: usize| {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        for i in 1..n {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        raw
    };
    let ok = with_headers(10);
    assert_eq!(
        parse_head(&mut BytesMut::from(ok.as_bytes()), &limits)
            .unwrap()
            .unwrap()
            .headers
            .0
            .len(),
        10
    );
    let over = with_headers(11);
    assert_eq!(
        parse_head(&mut BytesMut::from(over.as_bytes()), &limits).err(),
        Some(ParseError::HeadersTooLarge)
    );
    // The default: 100 headers fit, 101 do not.
    let d = Limits::default();
    assert!(parse_head(&mut BytesMut::from(with_headers(100).as_bytes()), &d).is_ok());
    assert_eq!(
        parse_head(&mut BytesMut::from(with_headers(101).as_bytes()), &d).err(),
        Some(ParseError::HeadersTooLarge)
    );
}

#[test]
fn declared_body_over_limit_is_413() {
    let limits = Limits {
        body_bytes: 1000,
        ..Limits::default()
    };
    let at = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n";
    assert_eq!(
        parse_head(&mut BytesMut::from(&at[..]), &limits)
            .unwrap()
            .unwrap()
            .framing,
        BodyFraming::Length(1000)
    );
    let over = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n";
    assert_eq!(
        parse_head(&mut BytesMut::from(&over[..]), &limits).err(),
        Some(ParseError::BodyTooLarge)
    );
    let huge = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9999999999999999999\r\n\r\n";
    assert_eq!(
        parse_head(&mut BytesMut::from(&huge[..]), &limits).err(),
        Some(ParseError::BodyTooLarge)
    );
    assert_eq!(ApiError::from(ParseError::BodyTooLarge).status(), 413);
}

#[test]
fn keep_alive_rules() {
    let cases: &[(&[u8], bool)] = &[
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nConnection: close\r\n\r\n",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
            true,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n",
            true,
        ),
        (b"GET / HTTP/1.0\r\n\r\n", false),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        (
            b"GET / HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n",
            true,
        ),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(
            parse_ok(raw).keep_alive,
            *want,
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn expect_continue_only_on_http11() {
    let h = parse_ok(
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    );
    assert!(h.expect_continue);
    let h = parse_ok(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    assert!(!h.expect_continue);
    let h = parse_ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    assert!(!h.expect_continue);
}

/// Splits pipelined requests the way the server loop does: head, then
/// exactly the framed body, then the next head.
fn drain_requests(buf: &mut BytesMut) -> Vec<Request> {
    let mut out = Vec::new();
    while let Some(head) = parse_head(buf, &Limits::default()).unwrap() {
        let body = match head.framing {
            BodyFraming::Empty => Bytes::new(),
            BodyFraming::Length(n) => buf.split_to(n as usize).freeze(),
            BodyFraming::Chunked => {
                let (body, used) = chunked::decode_all(buf).unwrap().unwrap();
                let _ = buf.split_to(used);
                Bytes::from(body)
            }
        };
        out.push(head.into_request(body));
    }
    out
}

#[test]
fn pipelined_requests_in_one_buffer() {
    let mut buf = BytesMut::from(
        &b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\
POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
POST /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /four HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /fi"[..],
    );
    let reqs = drain_requests(&mut buf);
    let paths: Vec<&[u8]> = reqs.iter().map(|r| &r.path[..]).collect();
    assert_eq!(paths, [&b"/one"[..], b"/two", b"/three", b"/four"]);
    assert_eq!(&reqs[1].body[..], b"hello");
    assert_eq!(&reqs[2].body[..], b"abc");
    assert!(!reqs[3].keep_alive);
    assert_eq!(&buf[..], b"GET /fi");
}

#[test]
fn two_requests_in_one_buffer() {
    let mut buf = BytesMut::from(
        &b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"[..],
    );
    let reqs = drain_requests(&mut buf);
    assert_eq!(reqs.len(), 2);
    assert_eq!(&reqs[1].path[..], b"/b");
    assert!(buf.is_empty());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&raw[..]);
        let _ = parse_head(&mut buf, &Limits { header_bytes: 1024, header_count: 8, body_bytes: 64 });
    }

    #[test]
    fn mutated_requests_never_panic(
        pos in 0usize..GET.len(),
        byte in any::<u8>(),
        cut in 0usize..GET.len() + 1,
    ) {
        let mut raw = GET.to_vec();
        raw[pos] = byte;
        raw.truncate(cut.max(pos + 1));
        let mut buf = BytesMut::from(&raw[..]);
        if let Ok(Some(head)) = parse_head(&mut buf, &Limits::default()) {
            // Whatever parsed must be consistent with the bytes given.
            prop_assert!(head.headers.0.len() <= 4);
        }
    }

    #[test]
    fn header_lines_from_token_soup_never_panic(
        lines in proptest::collection::vec("[ -~\t]{0,40}", 0..12)
    ) {
        let mut raw = b"POST / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for l in &lines {
            raw.extend_from_slice(l.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        let _ = parse_head(&mut BytesMut::from(&raw[..]), &Limits::default());
    }
}
