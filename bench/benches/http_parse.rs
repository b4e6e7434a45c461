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
//!   `Accept`, `Authorization: Bearer <PAT>`, `X-IBEX-Agent-ID`), 287 bytes.
//! - `parse/post_1k`: a chat POST with a 1 KiB JSON body (head + body split off).
//! - `parse/post_1k_chunked`: the same body sent chunked (4 × 256 B), de-chunked.
//! - `write/response_head`: a 200 JSON head with `X-Request-ID` and a date.
//!
//! Results (thread CPU time per request, criterion's mean estimate; 2 vCPU
//! cloud VM, Debian 12, kernel 6.18, rustc 1.95, release profile with thin
//! LTO; ±15 % between runs on this machine — details in perf/results/http.md):
//!
//! | date       | auth_get | post_1k | post_1k_chunked | response_head |
//! |------------|----------|---------|-----------------|---------------|
//! | 2026-11-23 | 341 ns   | 427 ns  | 544 ns          | 32 ns         |

use std::hint::black_box;

use bytes::BytesMut;
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
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

/// Parse one request the way the server loop does: the bytes land in the
/// connection's reused read buffer (here a copy, there the kernel's), the
/// head and body are split off it, the request is built and dropped.
/// Returns a count so nothing is optimised away.
fn parse_request(buf: &mut BytesMut, raw: &[u8], limits: &Limits) -> usize {
    buf.clear();
    buf.reserve(raw.len().max(8192));
    buf.extend_from_slice(raw);
    let head = match parse_head(buf, limits) {
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
                let Ok(step) = dec.decode(buf) else { return 0 };
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

/// CPU time of the benchmarking thread (`/proc/thread-self/schedstat`, ns),
/// not wall time: this 2-vCPU machine is shared with builds, and time spent
/// waiting for a CPU is not cost of the code. The kernel updates the figure
/// at scheduler ticks and switches (a few ms apart), so samples are long
/// (flat sampling, 200 ms each) and the tick error averages out.
struct ThreadCpu;

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuNs
    }
}

struct CpuNs;

impl ValueFormatter for CpuNs {
    fn scale_values(&self, _typical: f64, _values: &mut [f64]) -> &'static str {
        "ns cpu"
    }
    fn scale_throughputs(
        &self,
        _typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per = match *throughput {
            Throughput::Elements(n) => n as f64,
            _ => 1.0,
        };
        for v in values {
            *v = per * 1e9 / *v;
        }
        "elem/s cpu"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn bench(c: &mut Criterion<ThreadCpu>) {
    let limits = Limits::default();
    let mut buf = BytesMut::new();
    assert_eq!(parse_request(&mut buf, AUTH_GET, &limits), 5);
    let post = post_1k(false);
    let post_chunked = post_1k(true);
    assert_eq!(parse_request(&mut buf, &post, &limits), 7 + 1024);
    assert_eq!(parse_request(&mut buf, &post_chunked, &limits), 7 + 1024);

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("auth_get", |b| {
        b.iter(|| parse_request(&mut buf, black_box(AUTH_GET), &limits))
    });
    g.bench_function("post_1k", |b| {
        b.iter(|| parse_request(&mut buf, black_box(&post), &limits))
    });
    g.bench_function("post_1k_chunked", |b| {
        b.iter(|| parse_request(&mut buf, black_box(&post_chunked), &limits))
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
    let mut g = c.benchmark_group("write");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("response_head", |b| {
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
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpu)
        .sample_size(50)
        .measurement_time(std::time::Duration::from_secs(10));
    targets = bench
}
criterion_main!(benches);
