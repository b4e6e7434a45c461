//! Token limits (issue 14's "Measure"), two modes on the e2e harness (its own Postgres, Redis,
//! authd; release binaries):
//!
//! - `MODE=cost` (default): forwarding CPU per request with token limits off vs on, beside the
//!   nginx reverse proxy, same run. A fake upstream (nginx, perf/nginx-fake-upstream.conf, fixed
//!   JSON with usage) on LOAD_CPU; the nginx reverse proxy (perf/nginx-reverse-proxy.conf) and
//!   two single-worker ibex-proxies — `IBEX_DEFAULT_TPM=0` (off) and `IBEX_DEFAULT_TPM=10^9`
//!   (on: every request estimates, reserves and settles) — on the tool's own CPU (run it under
//!   `taskset -c SERVER_CPU`); `loadgen` on LOAD_CPU at RATE for SECS per row, ROUNDS rounds of
//!   the three rows alternating. Per row: server CPU µs/request (`/proc/<pid>/stat`: the nginx
//!   worker, the proxy process), Redis `EVALSHA`+`EVAL` calls per request (`INFO
//!   commandstats`, after the settles drained) and redis-server CPU µs/request.
//!   `BEFORE_PROXY=<path>`: a fourth row, another build's `ibex-proxy` (e.g. main's) with limits
//!   on, for a before/after in the same run.
//! - `MODE=overshoot`: one org at TPM (10,000) tokens per minute, two proxies, CLIENTS (64)
//!   concurrent clients split over them for SECS (60) seconds, each sending chat requests with a
//!   random `max_tokens` (16..=512) and a random prompt, backing off BACKOFF_MS (100) after a
//!   429. The fake upstream (in this process) holds each request 0-300 ms and reports realistic
//!   usage: prompt = a quarter of the proxy's own prompt bound (`estimate::worst_case`) + 1,
//!   completion uniform in 1..=max_tokens. Per minute window (the proxy's: the window a request
//!   was reserved in; attributed here by the time the fake received it, which the reservation
//!   precedes — a request sent in one window and received in the next is counted as
//!   `straddling`): requests admitted, tokens reserved (their worst cases, gross: settles give the
//!   unused part back, so more is admitted later in the window), tokens settled (what the fake
//!   reported), the peak of the org's minute counter in Redis (sampled every 20 ms: settled plus
//!   reservations in flight) and its final value. Asserts settled ≤ TPM, peak ≤ TPM and final ≤
//!   TPM in every window, no token 429 reached the upstream, and no fail-open; exits non-zero
//!   otherwise.
//!
//! ```text
//! cargo build --release -p ibex-proxy -p ibex-authd -p ibex-bench
//! flock /tmp/ibex-perf.lock perf/tokens.sh                 # cost; RATE=2000 SECS=10 ROUNDS=3
//! MODE=overshoot flock /tmp/ibex-perf.lock perf/tokens.sh  # TPM=10000 CLIENTS=64 SECS=60
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use ibex_bench::{clk_tck, env_or, redis_raw, redis_totals, ticks};
use ibex_e2e::http::{Conn, Request};
use ibex_e2e::{Proxy, Stack};
use ibex_proxy::tokens::estimate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    match std::env::var("MODE").as_deref() {
        Ok("overshoot") => overshoot().await,
        Ok("cost") | Err(_) => cost().await,
        Ok(other) => bail!("MODE={other}: cost or overshoot"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sends `req` until it answers 200 (a cold validation may take a few tries).
async fn warm(addr: SocketAddr, req: &Request) -> Result<()> {
    for _ in 0..100 {
        if let Ok(r) = req.send(addr).await {
            if r.status == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} never answered 200")
}

/// One org without a token limit of its own, an agent, a chat token: (org, agent, token).
async fn tenant(stack: &Stack, org_limits: &[&str]) -> Result<(String, String, String)> {
    let t = stack
        .authd
        .tenant("tokens-perf", 2_000_000_000, false, &["chat"])
        .await?;
    if !org_limits.is_empty() {
        let mut args = vec!["org", "set-limits", "--org", &t.org];
        args.extend_from_slice(org_limits);
        stack.authd.ibexctl_json(&args).await?;
    }
    Ok((t.org, t.agent, t.pats[0].clone()))
}

/// The first number on the line of `/metrics` starting with `name` (0 if absent).
async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let Ok(r) = Request::get("/metrics").send(proxy.admin).await else {
        return 0.0;
    };
    r.text()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// nginx under `taskset -c cpu` with `conf` (a perf/ template), in `dir`.
fn nginx(
    dir: &str,
    cpu: &str,
    template: &str,
    port: u16,
    upstream: &str,
) -> Result<std::process::Child> {
    let text = std::fs::read_to_string(template).with_context(|| template.to_owned())?;
    let text = text
        .replace("__DIR__", dir)
        .replace("__PORT__", &port.to_string())
        .replace("__UPSTREAM__", upstream);
    let name = format!("{dir}/{port}.conf");
    std::fs::write(&name, text)?;
    Ok(std::process::Command::new("taskset")
        .args(["-c", cpu, "nginx", "-c", &name, "-p", dir])
        .spawn()?)
}

/// Stops an nginx master and its workers: SIGTERM (its fast shutdown takes the workers down;
/// a SIGKILL of the master would orphan them, still holding the perf lock's descriptor).
fn stop_nginx(master: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &master.id().to_string()])
        .status();
    let _ = master.wait();
}

/// The first child of `pid` (an nginx master's worker).
fn worker_of(pid: u32) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

async fn wait_post(port: u16) -> Result<()> {
    for _ in 0..100 {
        if let Ok(r) = Request::post(CHAT, BODY)
            .send(([127, 0, 0, 1], port).into())
            .await
        {
            if r.status == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nginx on {port} never answered")
}

/// Polls the Redis calls until they stop moving (settles run after the responses).
async fn settled_calls(port: u16) -> (u64, u64) {
    let mut last = redis_totals(&[port]).await;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = redis_totals(&[port]).await;
        if now.0 == last.0 {
            return now;
        }
        last = now;
    }
    last
}

struct Row {
    name: &'static str,
    pid: u32,
    addr: SocketAddr,
    auth: bool,
}

async fn cost() -> Result<()> {
    let rate = env_or("RATE", 2000);
    let secs = env_or("SECS", 10);
    let rounds = env_or("ROUNDS", 3);
    let conns = env_or("CONNS", 32);
    let load_cpu = std::env::var("LOAD_CPU").unwrap_or_else(|_| "1".into());
    let server_cpu = std::env::var("SERVER_CPU").unwrap_or_else(|_| "0".into());
    let tck = clk_tck();

    let dir = std::env::temp_dir().join(format!("ibex-tokens-perf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let d = dir.to_string_lossy().into_owned();
    let fake_port = ibex_e2e::procs::free_port()?;
    let rp_port = ibex_e2e::procs::free_port()?;
    let mut fake = nginx(
        &d,
        &load_cpu,
        "perf/nginx-fake-upstream.conf",
        fake_port,
        "",
    )?;
    let mut rp = nginx(
        &d,
        &server_cpu,
        "perf/nginx-reverse-proxy.conf",
        rp_port,
        &format!("127.0.0.1:{fake_port}"),
    )?;
    let result = cost_rows(
        rate,
        secs,
        rounds,
        conns,
        &load_cpu,
        tck,
        fake_port,
        rp_port,
        rp.id(),
    )
    .await;
    stop_nginx(&mut fake);
    stop_nginx(&mut rp);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[expect(clippy::too_many_arguments, reason = "one run's knobs, passed once")]
async fn cost_rows(
    rate: u64,
    secs: u64,
    rounds: u64,
    conns: u64,
    load_cpu: &str,
    tck: f64,
    fake_port: u16,
    rp_port: u16,
    rp_pid: u32,
) -> Result<()> {
    wait_post(fake_port).await?;
    wait_post(rp_port).await?;
    let upstream = format!("http://127.0.0.1:{fake_port}/v1");
    let base = [
        ("IBEX_PROXY_THREADS", "1"),
        ("IBEX_LOG", "warn"),
        ("IBEX_UPSTREAM_URL", upstream.as_str()),
        ("IBEX_UPSTREAM_API_KEY", "sk-perf"),
    ];
    let stack = Stack::start_with(&[], &base).await?;
    let with = |tpm: &'static str| {
        let mut env = base.to_vec();
        env.push(("IBEX_DEFAULT_TPM", tpm));
        env
    };
    let off = Proxy::start(stack.authd.grpc_addr, &stack.redis.url(), &with("0")).await?;
    let on = Proxy::start(
        stack.authd.grpc_addr,
        &stack.redis.url(),
        &with("1000000000"),
    )
    .await?;
    // BEFORE_PROXY: another build's ibex-proxy (e.g. main's), limits on, as a fourth row.
    let before = match std::env::var_os("BEFORE_PROXY") {
        Some(bin) => {
            std::env::set_var("IBEX_E2E_BIN_IBEX_PROXY", &bin);
            let p = Proxy::start(
                stack.authd.grpc_addr,
                &stack.redis.url(),
                &with("1000000000"),
            )
            .await;
            std::env::remove_var("IBEX_E2E_BIN_IBEX_PROXY");
            Some(p?)
        }
        None => None,
    };
    let (_org, agent, token) = tenant(&stack, &[]).await?;
    let chat = Request::post(CHAT, BODY)
        .header("Content-Type", "application/json")
        .auth(&token, &agent);
    warm(off.addr, &chat).await?;
    warm(on.addr, &chat).await?;
    if let Some(b) = &before {
        warm(b.addr, &chat).await?;
    }
    let r = chat.send(on.addr).await?;
    ensure!(
        r.header("x-ratelimit-limit-tokens").is_some(),
        "the limits-on proxy sent no x-ratelimit-limit-tokens: token limits are not applied"
    );
    ensure!(
        chat.send(off.addr)
            .await?
            .header("x-ratelimit-limit-tokens")
            .is_none(),
        "the limits-off proxy applied a token limit"
    );
    let rp_worker = worker_of(rp_pid).context("no nginx worker")?;
    let mut rows = vec![
        Row {
            name: "nginx-rp",
            pid: rp_worker,
            addr: ([127, 0, 0, 1], rp_port).into(),
            auth: false,
        },
        Row {
            name: "ibex, token limits off",
            pid: off.pid().context("off")?,
            addr: off.addr,
            auth: true,
        },
        Row {
            name: "ibex, token limits on",
            pid: on.pid().context("on")?,
            addr: on.addr,
            auth: true,
        },
    ];
    if let Some(b) = &before {
        rows.push(Row {
            name: "ibex, token limits on, BEFORE_PROXY",
            pid: b.pid().context("before")?,
            addr: b.addr,
            auth: true,
        });
    }
    let loadgen = ibex_e2e::procs::bin_path("loadgen")?;
    let redis_port = stack.redis.port();
    println!("rate {rate}/s over {conns} connections, {secs} s per row, {rounds} rounds; CPU ticks 1/{tck} s");
    println!("| round | server | requests | non-200 | p50 µs | p99 µs | server CPU µs/req | Redis calls/req | Redis CPU µs/req |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for row in &rows {
            let stat = format!("/proc/{}/stat", row.pid);
            let (calls0, rcpu0) = settled_calls(redis_port).await;
            let cpu0 = ticks(&stat);
            let mut cmd = std::process::Command::new("taskset");
            cmd.args(["-c", load_cpu])
                .arg(&loadgen)
                .args([
                    "--addr",
                    &row.addr.to_string(),
                    "--path",
                    CHAT,
                    "--method",
                    "POST",
                ])
                .args(["--body", BODY, "-H", "Content-Type: application/json"])
                .args([
                    "--rate",
                    &rate.to_string(),
                    "--connections",
                    &conns.to_string(),
                ])
                .args(["--duration", &secs.to_string()]);
            if row.auth {
                cmd.args(["-H", &format!("Authorization: Bearer {token}")])
                    .args(["-H", &format!("X-IBEX-Agent-ID: {agent}")]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
            let cpu1 = ticks(&stat);
            let (calls1, rcpu1) = settled_calls(redis_port).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
            let reqs = v["requests"].as_u64().unwrap_or(0);
            let ok = v["statuses"]["200"].as_u64().unwrap_or(0);
            let n = reqs.max(1) as f64;
            println!(
                "| {round} | {} | {reqs} | {} | {} | {} | {:.2} | {:.3} | {:.2} |",
                row.name,
                reqs - ok,
                v["p50_us"],
                v["p99_us"],
                (cpu1 - cpu0) as f64 / tck * 1e6 / n,
                (calls1 - calls0) as f64 / n,
                (rcpu1 - rcpu0) as f64 / tck * 1e6 / n,
            );
        }
    }
    let checks = metric(&on, "ibex_proxy_tokens_checks_total").await;
    let calls = metric(&on, "ibex_proxy_tokens_redis_calls_total").await;
    println!(
        "limits-on proxy: {checks} token checks, {} settled, {} failed open, {} settle failures, \
         {calls} token script calls ({:.3} per check)",
        metric(&on, "ibex_proxy_tokens_settled_total").await,
        metric(&on, "ibex_proxy_tokens_failed_open_total").await,
        metric(&on, "ibex_proxy_tokens_settle_failures_total").await,
        calls / checks.max(1.0),
    );
    Ok(())
}

/// xorshift64*: enough randomness for request shapes.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(uuid::Uuid::new_v4().as_u64_pair().0 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Per minute window, as the fake upstream saw it.
#[derive(Default, Clone, Copy)]
struct Window {
    admitted: u64,
    reserved: u64,
    settled: u64,
    straddling: u64,
}

#[derive(Default)]
struct Seen {
    windows: Mutex<BTreeMap<u64, Window>>,
}

/// The fake upstream: realistic usage (≤ the proxy's bounds), held 0-300 ms.
async fn fake_upstream(listener: tokio::net::TcpListener, seen: Arc<Seen>) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(fake_conn(conn, seen.clone()));
    }
}

async fn fake_conn(mut conn: tokio::net::TcpStream, seen: Arc<Seen>) {
    let mut rng = Rng::new();
    let mut buf = Vec::new();
    loop {
        let (head_end, len) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len);
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let received = unix_ms();
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let worst = estimate::worst_case(&body);
        // The client puts its send time in `user`.
        let sent = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["user"].as_str()?.parse::<u64>().ok())
            .unwrap_or(received);
        let max = worst.output.unwrap_or(1).max(1);
        let prompt = worst.prompt / 4 + 1;
        let completion = rng.range(1, max);
        {
            let mut w = seen.windows.lock().unwrap_or_else(|e| e.into_inner());
            let e = w.entry(received / 60_000).or_default();
            e.admitted += 1;
            e.reserved += worst.prompt + max;
            e.settled += prompt + completion;
            if sent / 60_000 != received / 60_000 {
                e.straddling += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 300))).await;
        let out = format!(
            r#"{{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            prompt + completion
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{out}",
            out.len()
        );
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

const WORDS: [&str; 12] = [
    "deploy", "the", "service", "rollback", "latency", "budget", "agent", "queue", "token",
    "window", "retry", "report",
];

#[derive(Default)]
struct Client {
    ok: AtomicU64,
    token_429: AtomicU64,
    other: AtomicU64,
}

async fn client(
    addr: SocketAddr,
    token: String,
    agent: String,
    until: Instant,
    backoff: u64,
    stats: Arc<Client>,
) {
    let mut rng = Rng::new();
    let mut conn = None;
    while Instant::now() < until {
        let words = rng.range(4, 200);
        let text: Vec<&str> = (0..words)
            .map(|_| WORDS[(rng.next() % 12) as usize])
            .collect();
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text.join(" ")}],
            "max_tokens": rng.range(16, 512),
            "user": unix_ms().to_string(),
        })
        .to_string();
        let req = Request::post(CHAT, body)
            .header("Content-Type", "application/json")
            .auth(&token, &agent);
        if conn.is_none() {
            conn = Conn::connect(addr).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            stats.other.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            continue;
        };
        match c.send(&req, false).await {
            Ok(r) if r.status == 200 => {
                stats.ok.fetch_add(1, Relaxed);
            }
            Ok(r) if r.status == 429 && r.text().contains("token") => {
                stats.token_429.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(
                    rng.range(backoff / 2, backoff * 3 / 2),
                ))
                .await;
            }
            Ok(_) => {
                stats.other.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            Err(_) => {
                stats.other.fetch_add(1, Relaxed);
                conn = None;
            }
        }
    }
}

async fn overshoot() -> Result<()> {
    let tpm = env_or("TPM", 10_000);
    let clients = env_or("CLIENTS", 64);
    let secs = env_or("SECS", 60);
    let backoff = env_or("BACKOFF_MS", 100);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = format!("http://{}/v1", listener.local_addr()?);
    let seen = Arc::new(Seen::default());
    let fake = tokio::spawn(fake_upstream(listener, seen.clone()));
    let env = [
        ("IBEX_PROXY_THREADS", "1"),
        ("IBEX_LOG", "warn"),
        ("IBEX_UPSTREAM_URL", upstream.as_str()),
        ("IBEX_UPSTREAM_API_KEY", "sk-perf"),
        // A stall on the loaded box must not fail open (uncounted admissions).
        ("IBEX_REDIS_TIMEOUT", "2s"),
    ];
    let stack = Stack::start_with(&[], &env).await?;
    let second = Proxy::start(stack.authd.grpc_addr, &stack.redis.url(), &env).await?;
    let tpm_s = tpm.to_string();
    let (org, agent, token) = tenant(&stack, &["--tpm", &tpm_s]).await?;
    // Warm both proxies' caches (two small chats: counted like the rest).
    let probe = Request::post(
        CHAT,
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#,
    )
    .header("Content-Type", "application/json")
    .auth(&token, &agent);
    warm(stack.proxy.addr, &probe).await?;
    warm(second.addr, &probe).await?;
    const WARM: u64 = 2;

    // The org's minute counter in Redis, sampled: peak and last value per window.
    let redis_port = stack.redis.port();
    let peaks = Arc::new(Mutex::new(BTreeMap::<u64, (u64, u64)>::new()));
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let sampler = {
        let (peaks, org) = (peaks.clone(), org.clone());
        tokio::spawn(async move {
            loop {
                let minute = unix_ms() / 60_000;
                for m in [minute.saturating_sub(1), minute] {
                    let key = format!("ibex:tl:{{{org}}}:m:{m}");
                    let v = redis_raw(redis_port, &["GET", &key])
                        .await
                        .unwrap_or_default();
                    let n = v.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok());
                    if let Some(n) = n {
                        let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
                        let e = p.entry(m).or_default();
                        e.0 = e.0.max(n);
                        e.1 = n;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let stats = Arc::new(Client::default());
    let addrs = [stack.proxy.addr, second.addr];
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(client(
                addrs[(i % 2) as usize],
                token.clone(),
                agent.clone(),
                until,
                backoff,
                stats.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    // Let the last settles land, then one more sample.
    let proxies = [&stack.proxy, &second];
    for _ in 0..100 {
        let mut settled = 0.0;
        let mut checks = 0.0;
        for p in proxies {
            settled += metric(p, "ibex_proxy_tokens_settled_total").await;
            settled += metric(p, "ibex_proxy_tokens_settle_failures_total").await;
            checks += metric(p, "ibex_proxy_tokens_checks_total").await;
        }
        let limited: f64 = {
            let mut l = 0.0;
            for p in proxies {
                l += metric(p, "ibex_proxy_tokens_limited_total").await;
            }
            l
        };
        if settled >= checks - limited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    sampler.abort();
    fake.abort();
    let mut failed_open = 0.0;
    let mut settle_failures = 0.0;
    for p in proxies {
        failed_open += metric(p, "ibex_proxy_tokens_failed_open_total").await;
        settle_failures += metric(p, "ibex_proxy_tokens_settle_failures_total").await;
    }
    let mut final_values = BTreeMap::new();
    let minutes: Vec<u64> = peaks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .copied()
        .collect();
    for m in minutes {
        let key = format!("ibex:tl:{{{org}}}:m:{m}");
        let v = redis_raw(redis_port, &["GET", &key])
            .await
            .unwrap_or_default();
        if let Some(n) = v.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()) {
            final_values.insert(m, n);
        }
    }

    println!(
        "{clients} clients over two proxies, {secs} s, org at {tpm} TPM; responses: {} admitted, {} token 429s, {} other/errors; {failed_open} failed open, {settle_failures} settle failures",
        stats.ok.load(Relaxed),
        stats.token_429.load(Relaxed),
        stats.other.load(Relaxed),
    );
    println!("| minute (UTC) | admitted | reserved (gross) | settled (fake's usage) | Redis counter peak | Redis counter final | straddling | within limit |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let windows = seen
        .windows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let peaks = peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut ok = failed_open == 0.0;
    let mut upstream_seen = 0;
    for (m, w) in &windows {
        upstream_seen += w.admitted;
        let (peak, _) = peaks.get(m).copied().unwrap_or_default();
        let fin = final_values.get(m).copied().unwrap_or(0);
        let within = w.settled <= tpm && peak <= tpm && fin <= tpm;
        ok &= within;
        let hhmm = format!("{:02}:{:02}", m / 60 % 24, m % 60);
        println!(
            "| {hhmm} | {} | {} | {} | {peak} | {fin} | {} | {} |",
            w.admitted,
            w.reserved,
            w.settled,
            w.straddling,
            if within { "yes" } else { "NO" }
        );
    }
    let admitted = stats.ok.load(Relaxed);
    println!("the fake upstream saw {upstream_seen} requests; clients got {admitted} admitted (+{WARM} warm-up)");
    ok &= upstream_seen == admitted + WARM;
    if !ok {
        bail!("the ceiling did not hold (or a request failed open / a refused one reached the upstream)");
    }
    println!("ceiling held: every minute window's settled tokens and Redis counter ≤ {tpm}");
    Ok(())
}
