//! What a token limit (SPEC §11) adds to a chat request on the worker, besides its one Redis
//! round trip (the reserve before the upstream call, which carries the org's pending settles):
//! the CPU the request path spends before and after it.
//!
//! Run (release profile):
//!
//! ```text
//! cargo bench -p ibex-bench --bench tokens
//! ```
//!
//! Cases (`*_before`: the code this replaced, kept here for the comparison):
//! - `tokens/estimate_{small,typical,large}`: [`estimate::worst_case`] — the prompt's upper
//!   bound, the output asked for and the model with its span, in one borrowed pass — on a
//!   one-message body, a typical agent turn (system prompt, six turns, a tool, `max_tokens`;
//!   1.6 KiB) and a 32 KiB conversation. `tokens/before_*`: what it replaced, the router's
//!   `model` pass plus a `serde_json::Value` parse and walk.
//! - `tokens/reserve_call`: the reserve script's call as `TokenLimiter::reserve_worst` builds
//!   it ([`CallBuf`]: six keys and thirteen decimal arguments in one buffer) encoded as one RESP
//!   `EVALSHA` ([`resp::push_command`]); `tokens/reserve_call_before`: six `format!` keys, a
//!   UUID v4 and thirteen `to_string`. `tokens/reserve_call_carrying_1`: the same call carrying
//!   one pending settle (what replaced the separate settle call).
//! - `tokens/settle_call`: a flushed multi-settle call of one settle.
//! - `tokens/limits_off`: [`Limits::any`] on a principal with no limit — all an org without a
//!   token limit pays (no estimate, no Redis call).
//!
//! Results: perf/RESULTS.md §13.

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibex_proxy::ratelimit::resp;
use ibex_proxy::ratelimit::window::KEY_TTL_MS;
use ibex_proxy::tokens::call::{CallBuf, KeySet, Rid};
use ibex_proxy::tokens::estimate;
use ibex_proxy::tokens::settle::Settle;
use ibex_proxy::tokens::Limits;
use serde_json::Value;
use uuid::Uuid;

const SMALL: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}"#;

/// A typical agent turn: a system prompt, six turns (one tool call and its result), a tool.
fn typical_body() -> String {
    let system = "You are a careful assistant working for an operations team. Answer briefly, cite the \
                  runbook section you rely on, and never run a command without saying what it does. "
        .repeat(3);
    let turns = [
        ("user", "The nightly export to the data warehouse failed again. Can you see why?"),
        ("assistant", "I will look at the job's last log lines first."),
        ("user", "Go ahead; the job is called export-nightly and runs in the batch cluster."),
        ("assistant", "The log shows the job ran out of disk while writing the staging file; the volume is 98% full."),
        ("user", "What do you suggest? Keep it to the steps, and say which ones need approval."),
    ];
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    for (role, content) in turns {
        messages.push(serde_json::json!({"role": role, "content": content}));
    }
    messages.push(serde_json::json!({
        "role": "assistant", "content": null,
        "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "disk_usage", "arguments": "{\"volume\":\"/staging\",\"depth\":2}"}}]
    }));
    messages.push(serde_json::json!({
        "role": "tool", "tool_call_id": "call_1",
        "content": "/staging 98% (tmp 61%, exports 30%, logs 7%)"
    }));
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "disk_usage",
            "description": "Disk usage of a volume, by directory",
            "parameters": {"type": "object", "properties": {
                "volume": {"type": "string"}, "depth": {"type": "integer"}},
                "required": ["volume"]}}}],
        "max_tokens": 512,
        "temperature": 0.2
    })
    .to_string()
}

/// A long conversation: 64 turns of ~500 bytes.
fn large_body() -> String {
    let text = "The quick brown fox jumps over the lazy dog while the operator reads the runbook. "
        .repeat(6);
    let messages: Vec<_> = (0..64)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": text}))
        .collect();
    serde_json::json!({"model": "gpt-4o", "messages": messages, "max_completion_tokens": 1024})
        .to_string()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The estimate before the one pass: the router's `model` read, then a `serde_json::Value`
/// parse and walk (as `proxy/src/tokens/estimate.rs` did).
fn estimate_before(body: &[u8]) -> (u64, Option<u64>, Option<String>) {
    fn string_bytes(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(items) => items.iter().map(string_bytes).sum(),
            Value::Object(map) => map.values().map(string_bytes).sum(),
            _ => 0,
        }
    }
    fn content_bytes(content: &Value) -> u64 {
        match content {
            Value::Array(parts) => parts
                .iter()
                .map(|part| match part.get("type").and_then(Value::as_str) {
                    Some("image_url" | "input_image" | "input_audio" | "image" | "file") => 1_445,
                    _ => string_bytes(part),
                })
                .sum(),
            other => string_bytes(other),
        }
    }
    fn message_bound(m: &Value) -> u64 {
        let Value::Object(map) = m else {
            return 3 + string_bytes(m);
        };
        let mut n = 3;
        for (key, value) in map {
            if key == "name" {
                n += 1;
            }
            n += if key == "content" {
                content_bytes(value)
            } else {
                string_bytes(value)
            };
        }
        n
    }
    let routed = ibex_proxy::upstream::router::request_model(body);
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (body.len() as u64 + 3, None, None);
    };
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return (body.len() as u64 + 3, None, None);
    };
    let mut prompt = 3 + messages.iter().map(message_bound).sum::<u64>();
    for key in ["tools", "functions", "response_format", "tool_choice"] {
        if let Some(t) = v.get(key) {
            prompt += t.to_string().len() as u64;
        }
    }
    let count = |k: &str| v.get(k).and_then(Value::as_u64);
    let choices = count("n").unwrap_or(1).clamp(1, 128);
    let output = count("max_completion_tokens")
        .or_else(|| count("max_tokens"))
        .map(|o| o * choices);
    (prompt, output, routed.map(|(m, _)| m))
}

const RESERVE_ARGS: [u64; 13] = [
    790,
    512,
    4096,
    KEY_TTL_MS,
    2_600_000_000,
    10_000,
    0,
    0,
    0,
    0,
    0,
    0,
    86_400_000,
];

/// The reserve call as `TokenLimiter::reserve_worst` builds it, carrying `carried`, encoded.
fn reserve_call(out: &mut Vec<u8>, sha: &[u8], org: &[u8; 36], keys: &KeySet, carried: &[Settle]) {
    let mut call = CallBuf::new(1 + carried.len(), 13 + 3 * carried.len());
    call.keys(org, keys);
    for s in carried {
        s.push_keys(&mut call, org);
    }
    for arg in RESERVE_ARGS {
        call.num(black_box(arg));
    }
    for s in carried {
        s.push_args(&mut call);
    }
    let parts = call.parts();
    let nkeys = ibex_proxy::http::ascii::Decimal::new(call.key_count() as u64);
    let mut cmd: Vec<&[u8]> = Vec::with_capacity(3 + parts.len());
    cmd.extend([b"EVALSHA".as_slice(), sha, nkeys.as_bytes()]);
    cmd.extend_from_slice(&parts);
    resp::push_command(out, &cmd);
}

/// The reserve call as it was built before `CallBuf`, encoded.
fn reserve_call_before(out: &mut Vec<u8>, sha: &[u8], org: Uuid, agent: Uuid, now: u64) {
    let minute = now / 60_000;
    let month = 671u64;
    let (org, agent) = (org.hyphenated(), agent.hyphenated());
    let keys = [
        format!("ibex:tl:{{{org}}}:m:{minute}"),
        format!("ibex:tl:{{{org}}}:am:{agent}:{minute}"),
        format!("ibex:tl:{{{org}}}:M:{month}"),
        format!("ibex:tl:{{{org}}}:aM:{agent}:{month}"),
        format!("ibex:tl:{{{org}}}:U:{month}"),
        format!("ibex:tl:{{{org}}}:r:{}", Uuid::new_v4().simple()),
    ];
    let args: Vec<String> = RESERVE_ARGS
        .iter()
        .map(|a| black_box(*a).to_string())
        .collect();
    let nkeys = keys.len().to_string();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    parts.extend([b"EVALSHA".as_slice(), sha, nkeys.as_bytes()]);
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.extend(args.iter().map(|a| a.as_bytes()));
    resp::push_command(out, &parts);
    black_box(keys);
}

/// A flushed multi-settle call of `batch`, encoded.
fn settle_call(out: &mut Vec<u8>, sha: &[u8], org: &[u8; 36], batch: &[Settle]) {
    let mut call = CallBuf::new(batch.len(), 3 * batch.len());
    for s in batch {
        s.push_keys(&mut call, org);
    }
    for s in batch {
        s.push_args(&mut call);
    }
    let parts = call.parts();
    let nkeys = ibex_proxy::http::ascii::Decimal::new(call.key_count() as u64);
    let mut cmd: Vec<&[u8]> = Vec::with_capacity(3 + parts.len());
    cmd.extend([b"EVALSHA".as_slice(), sha, nkeys.as_bytes()]);
    cmd.extend_from_slice(&parts);
    resp::push_command(out, &cmd);
}

fn bench(c: &mut Criterion) {
    let typical = typical_body();
    let large = large_body();
    let mut g = c.benchmark_group("tokens");
    for (name, body) in [
        ("small", SMALL),
        ("typical", typical.as_str()),
        ("large", large.as_str()),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("estimate_{name}"), |b| {
            b.iter(|| estimate::worst_case(black_box(body.as_bytes())))
        });
        g.bench_function(format!("before_{name}"), |b| {
            b.iter(|| estimate_before(black_box(body.as_bytes())))
        });
    }
    g.throughput(Throughput::Elements(1));
    let sha = [b'a'; 40];
    let (org, agent) = (Uuid::new_v4(), Uuid::new_v4());
    let mut org_text = [0u8; 36];
    org.hyphenated().encode_lower(&mut org_text);
    let mut out = Vec::with_capacity(2048);
    let mut n = 0u64;
    let mut keys = move || {
        n += 1;
        KeySet {
            agent,
            minute: unix_ms() / 60_000,
            month: 202_612,
            rid: Rid {
                prefix: 0x9e37_79b9_7f4a_7c15,
                n,
            },
        }
    };
    let pending = Settle {
        keys: keys(),
        mask: 3,
        delta: -662,
        delta_usd: 0,
    };
    g.bench_function("reserve_call", |b| {
        b.iter(|| {
            out.clear();
            reserve_call(&mut out, &sha, &org_text, &keys(), &[]);
            black_box(out.len())
        })
    });
    g.bench_function("reserve_call_before", |b| {
        b.iter(|| {
            out.clear();
            reserve_call_before(&mut out, &sha, org, agent, unix_ms());
            black_box(out.len())
        })
    });
    g.bench_function("reserve_call_carrying_1", |b| {
        b.iter(|| {
            out.clear();
            reserve_call(&mut out, &sha, &org_text, &keys(), &[black_box(pending)]);
            black_box(out.len())
        })
    });
    g.bench_function("settle_call", |b| {
        b.iter(|| {
            out.clear();
            settle_call(&mut out, &sha, &org_text, &[black_box(pending)]);
            black_box(out.len())
        })
    });
    let none = Limits {
        org_tpm: 0,
        agent_tpm: 0,
        org_month: 0,
        agent_month: 0,
        org_usd_micros: 0,
    };
    g.bench_function("limits_off", |b| {
        b.iter(|| black_box(black_box(none).any()))
    });
    g.finish();
    eprintln!(
        "bodies: small {} B, typical {} B, large {} B; typical worst case {:?}",
        SMALL.len(),
        typical.len(),
        large.len(),
        estimate::worst_case(typical.as_bytes())
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
