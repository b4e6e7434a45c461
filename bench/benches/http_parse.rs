//! Cost of the proxy's HTTP/1.1 codec, no I/O: parse a request head into
//! owned `Bytes` (zero-copy header values, limits and smuggling checks
//! included), read its body, and serialise a response head.
//!
//! Run (release profile; takes ~1 min after the build):
//!
//! ```text
//! cargo bench -p ibex-bench --bench http_parse
//! ```
//!
//! Cases:
//! - `parse/auth_get`: a typical authenticated GET (`Host`, `User-Agent`,
//!   `Accept`, `Authorization: Bearer <PAT>`, `X-IBEX-Agent-ID`), 312 bytes.
//! - `parse/post_1k`: a chat POST with a 1 KiB JSON body (head + body split off).
//! - `parse/post_1k_chunked`: the same body sent chunked (4 × 256 B), de-chunked.
//! - `write/response_head`: a 200 JSON head with `X-Request-ID` and a date.
//!
//! Results (2 vCPU cloud VM, rustc 1.95, release; median of criterion's
//! estimate; ±15 % between runs on this machine — see perf/results/http.md):
//!
//! | date       | auth_get | post_1k | post_1k_chunked | response_head |
//! |------------|----------|---------|-----------------|---------------|
//! | 2026-11-23 | see perf/results/http.md                                |

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibex_proxy::http::chunked::{ChunkedDecoder, Event};
use ibex_proxy::http::{parse_head, write_head, BodyFraming, BodyKind, HeaderValue, Limits};

const AUTH_GET: &[u8] = b"GET /v1/internal/auth-probe HTTP/1.1\r\n\
Host: 127.0.0.1:8080\r\n\
User-Agent: ibex-loadgen/0.1\r\n\
Accept: application/json\r\n\
Authorization: Bearer ibex_pat_00000000-0000-0000-0000-000000000004_Q2hhbmdlTWVQbGVhc2VBbmRLZWVwSXRTZWNyZXQxMjM0\r\n\
X-IBEX-Agent-ID: 00000000-0000-0000-0000-000000000003\r\n\r\n";

fn post_1k(chunked: bool) -> Vec<u8> {
    let content = "x".repeat(1024 - 64);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    let body = &body.as_bytes()[..1024];
    let mut raw = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: 127.0.0.1:8080\r\n\
User-Agent: openai-python/1.40\r\n\
Accept: application/json\r\n\
Content-Type: application/json\r\n\
Authorization: Bearer ibex_pat_00000000-0000-0000-0000-000000000004_Q2hhbmdlTWVQbGVhc2VBbmRLZWVwSXRTZWNyZXQxMjM0\r\n\
X-IBEX-Agent-ID: 00000000-0000-0000-0000-000000000003\r\n"
        .to_vec();
    if chunked {
        raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for part in body.chunks(256) {
            raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            raw.extend_from_slice(part);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
    } else {
        raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        raw.extend_from_slice(body);
    }
    raw
}

/// Parse one request the way the server loop does, from a buffer already
/// holding all of it. Returns the body length so nothing is optimised away.
fn parse_request(raw: &[u8], limits: &Limits) -> usize {
    let mut buf = BytesMut::from(raw);
    let head = match parse_head(&mut buf, limits) {
        Ok(Some(head)) => head,
        _ => return 0,
    };
    let body = match head.framing {
        BodyFraming::Empty => bytes::Bytes::new(),
        BodyFraming::Length(n) => buf.split_to(n as usize).freeze(),
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut body = BytesMut::with_capacity(buf.len());
            loop {
                let Ok(step) = dec.decode(&buf) else { return 0 };
                if let Event::Data(r) = &step.event {
                    body.extend_from_slice(&buf[r.clone()]);
                }
                let _ = buf.split_to(step.consumed);
                match step.event {
                    Event::Done => break body.freeze(),
                    Event::NeedMore => return 0,
                    Event::Data(_) => {}
                }
            }
        }
    };
    let req = head.into_request(body);
    req.headers.0.len() + req.body.len()
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    assert_eq!(parse_request(AUTH_GET, &limits), 5);
    let post = post_1k(false);
    let post_chunked = post_1k(true);
    assert_eq!(parse_request(&post, &limits), 7 + 1024);
    assert_eq!(parse_request(&post_chunked, &limits), 7 + 1024);

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("auth_get", |b| {
        b.iter(|| parse_request(black_box(AUTH_GET), &limits))
    });
    g.bench_function("post_1k", |b| {
        b.iter(|| parse_request(black_box(&post), &limits))
    });
    g.bench_function("post_1k_chunked", |b| {
        b.iter(|| parse_request(black_box(&post_chunked), &limits))
    });
    g.finish();

    let headers = [
        ("Content-Type", HeaderValue::Static("application/json")),
        (
            "X-Request-ID",
            HeaderValue::Owned(bytes::Bytes::from_static(
                b"6f1c1f36-2a4b-4e53-9d1e-7f2b1f0c9a10",
            )),
        ),
    ];
    let date = *b"Mon, 23 Nov 2026 20:00:00 GMT";
    let mut out = Vec::with_capacity(512);
    c.bench_function("write/response_head", |b| {
        b.iter(|| {
            out.clear();
            write_head(
                &mut out,
                200,
                black_box(&headers),
                BodyKind::Length(96),
                false,
                false,
                &date,
            );
            out.len()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
