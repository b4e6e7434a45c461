//! The upstream client's CPU work per forwarded request, without I/O:
//! rendering the request head (header hygiene included), parsing the
//! upstream's response head, and scanning bodies for `usage` (a whole JSON
//! completion, and an SSE stream fed as it would arrive).
//!
//! Run (release profile; takes ~1 min after the build):
//!
//! ```text
//! cargo bench -p ibex-bench --bench upstream
//! ```
//!
//! Results, 2026-11-23, 2 vCPU box of MEASURED.md, criterion median. The box
//! was shared with other builds; the 20:48 UTC run (load average ~4) is the
//! better one, the 20:25 run (load ~10) shows how far noise moves it:
//!
//! | bench | 20:48 (load ~4) | 20:25 (load ~10) |
//! |---|---|---|
//! | `upstream/render_head` (10 client headers in, 8 out) | 0.115 µs | 0.27 µs |
//! | `upstream/parse_head` (OpenAI-like head, 16 headers) | 0.49 µs | 1.03 µs |
//! | `upstream/scan_json` (1.2 KiB completion) | 1.18 µs (1.0 GiB/s) | 2.6 µs |
//! | `upstream/scan_sse` (64 events, 16 KiB, fed per event) | 36 µs (435 MiB/s, 0.56 µs/event) | 63.5 µs |
//!
//! See `perf/results/upstream.md` for context.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibex_proxy::http::{Method, Request};
use ibex_proxy::upstream::request::{render_head, HeadPrefix, OperatorHeaders};
use ibex_proxy::upstream::response::parse_head;
use ibex_proxy::upstream::usage::{JsonScanner, SseScanner};

fn client_request() -> Request {
    let headers = [
        ("Host", "proxy.internal:8080"),
        ("Authorization", "Bearer ibex_pat_3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefg"),
        ("X-IBEX-Agent-ID", "0b0b0b0b-0000-4000-8000-000000000000"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "OpenAI/Python 1.51.0"),
        ("X-Stainless-Lang", "python"),
        ("X-Stainless-Retry-Count", "0"),
        ("Connection", "keep-alive"),
        ("Content-Length", "182"),
    ];
    Request::new(
        Method::Post,
        "/v1/chat/completions",
        &headers,
        Bytes::from_static(&[b'x'; 182]),
    )
}

const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Mon, 23 Nov 2026 20:00:00 GMT\r\n\
Content-Type: application/json\r\n\
Transfer-Encoding: chunked\r\n\
Connection: keep-alive\r\n\
access-control-expose-headers: X-Request-ID\r\n\
openai-organization: operator-org\r\n\
openai-processing-ms: 412\r\n\
openai-version: 2020-10-01\r\n\
x-ratelimit-limit-requests: 10000\r\n\
x-ratelimit-limit-tokens: 30000000\r\n\
x-ratelimit-remaining-requests: 9999\r\n\
x-ratelimit-remaining-tokens: 29999950\r\n\
x-ratelimit-reset-requests: 6ms\r\n\
x-ratelimit-reset-tokens: 0s\r\n\
x-request-id: req_0123456789abcdef0123456789abcdef\r\n\
Set-Cookie: __cf_bm=abcdefghijklmnopqrstuvwxyz; path=/; HttpOnly; Secure\r\n\r\n";

fn completion() -> String {
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    format!(
        r#"{{"id":"chatcmpl-abc123","object":"chat.completion","created":1732392000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":25,"completion_tokens":180,"total_tokens":205,"prompt_tokens_details":{{"cached_tokens":0}}}},"system_fingerprint":"fp_0ba0d124f1"}}"#
    )
}

fn sse_chunks() -> Vec<Vec<u8>> {
    let mut chunks: Vec<Vec<u8>> = (0..62)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"created\":1732392000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
            .into_bytes()
        })
        .collect();
    chunks.push(b"data: {\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"created\":1732392000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":25,\"completion_tokens\":62,\"total_tokens\":87}}\n\n".to_vec());
    chunks.push(b"data: [DONE]\n\n".to_vec());
    chunks
}

fn bench_upstream(c: &mut Criterion) {
    let mut g = c.benchmark_group("upstream");

    let prefix = HeadPrefix::new(
        "POST",
        "/v1/chat/completions",
        "api.openai.com",
        "sk-proj-0123456789abcdefghijklmnopqrstuvwxyz0123456789",
        &OperatorHeaders::default(),
    );
    let req = client_request();
    let mut out = Vec::with_capacity(1024);
    g.bench_function("render_head", |b| {
        b.iter(|| {
            render_head(
                &mut out,
                &prefix,
                black_box(&req),
                "9f0c1b2a-3d4e-4f50-8a6b-7c8d9e0f1a2b",
                Some(req.body.len()),
            );
            black_box(out.len())
        })
    });

    g.bench_function("parse_head", |b| {
        b.iter(|| {
            let parsed = parse_head(black_box(RESPONSE_HEAD));
            black_box(parsed.ok().flatten().map(|(h, n)| (h.status, n)))
        })
    });

    let body = completion();
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("scan_json", |b| {
        b.iter(|| {
            let mut s = JsonScanner::new();
            s.feed(black_box(body.as_bytes()));
            black_box(s.found.usage)
        })
    });

    let chunks = sse_chunks();
    let total: usize = chunks.iter().map(Vec::len).sum();
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("scan_sse", |b| {
        b.iter(|| {
            let mut s = SseScanner::new();
            for chunk in &chunks {
                s.feed(black_box(chunk));
            }
            black_box(s.found().usage)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_upstream);
criterion_main!(benches);
