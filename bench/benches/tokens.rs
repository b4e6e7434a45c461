//! What a token limit (SPEC §11) adds to a chat request on the worker, besides its two Redis
//! round trips (reserve before the upstream call, settle after the record): the CPU the
//! request path spends before and after them.
//!
//! Run (release profile):
//!
//! ```text
//! cargo bench -p ibex-bench --bench tokens
//! ```
//!
//! Cases:
//! - `tokens/estimate_{small,typical,large}`: [`estimate::worst_case`] (the prompt's upper
//!   bound and the output asked for) on a one-message body, a typical agent turn (system prompt,
//!   six turns, a tool, `max_tokens`; 1.6 KiB) and a 32 KiB conversation.
//! - `tokens/reserve_call`: building the reserve script's call the way
//!   `TokenLimiter::reserve` does (six hash-tagged keys, thirteen decimal arguments) and
//!   encoding it as one RESP `EVALSHA` ([`resp::push_command`]).
//! - `tokens/settle_call`: the same for the settle script (four arguments, the six keys).
//! - `tokens/limits_off`: [`Limits::any`] on a principal with no limit — all an org without a
//!   token limit pays (no estimate, no Redis call).
//!
//! The two `*_call` cases mirror the key and argument building of `proxy/src/tokens/mod.rs`
//! (inline there, not a separate function); keep them in step when the script's call changes.
//!
//! Results: perf/RESULTS.md §13.

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibex_proxy::ratelimit::resp;
use ibex_proxy::ratelimit::window::KEY_TTL_MS;
use ibex_proxy::tokens::estimate;
use ibex_proxy::tokens::Limits;
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

/// The reserve call as `TokenLimiter::reserve` builds it, encoded.
fn reserve_call(out: &mut Vec<u8>, sha: &[u8], org: Uuid, agent: Uuid, prompt: u64, now: u64) {
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
    let args: Vec<String> = [
        prompt,
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
    ]
    .iter()
    .map(u64::to_string)
    .collect();
    let nkeys = keys.len().to_string();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    parts.extend([b"EVALSHA".as_slice(), sha, nkeys.as_bytes()]);
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.extend(args.iter().map(|a| a.as_bytes()));
    resp::push_command(out, &parts);
    black_box(keys);
}

/// The settle call as `Held::run` builds it (the keys are the reservation's, already built).
fn settle_call(out: &mut Vec<u8>, sha: &[u8], keys: &[String; 6], reserved: u64, used: u64) {
    let delta = i128::from(used) - i128::from(reserved);
    let args = [
        delta.to_string(),
        "0".to_owned(),
        "0".to_owned(),
        "3".to_owned(),
    ];
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    parts.extend([b"EVALSHA".as_slice(), sha, b"6".as_slice()]);
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.extend(args.iter().map(|a| a.as_bytes()));
    resp::push_command(out, &parts);
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
    }
    g.throughput(Throughput::Elements(1));
    let sha = [b'a'; 40];
    let (org, agent) = (Uuid::new_v4(), Uuid::new_v4());
    let mut out = Vec::with_capacity(1024);
    g.bench_function("reserve_call", |b| {
        b.iter(|| {
            out.clear();
            reserve_call(&mut out, &sha, org, agent, black_box(790), unix_ms());
            black_box(out.len())
        })
    });
    let keys: [String; 6] =
        std::array::from_fn(|i| format!("ibex:tl:{{{org}}}:k{i}:{agent}:29456789"));
    g.bench_function("settle_call", |b| {
        b.iter(|| {
            out.clear();
            settle_call(&mut out, &sha, &keys, black_box(1302), black_box(640));
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
