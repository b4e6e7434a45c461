//! Rolling restarts lose nothing (issue 12 item 4), through real processes: ten times, a new proxy is
//! started on the old one's port (SO_REUSEPORT), then the old one gets SIGTERM, while clients
//! keep sending on keep-alive connections (reconnecting when told `Connection: close`). Every
//! request must be answered 200: the draining proxy answers what arrives on its open
//! connections, and the connections still queued on its listener migrate to the new process
//! (`net.ipv4.tcp_migrate_req = 1`, set here when it can be).
//!
//! Each round also has a streamed chat response in flight across the SIGTERM: it is opened on the
//! old proxy (the only listener then), its first event read, and the fake upstream
//! (`forwarding/fake_upstream.rs`) holds the rest back until the old proxy has drained its
//! keep-alive connections; then the rest is released and the stream must complete, event for
//! event, on the old process, which exits only after it.
//!
//! ```text
//! cargo build --workspace --bins && cargo test -p ibex-e2e --test restart
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "forwarding/fake_upstream.rs"]
#[expect(
    dead_code,
    reason = "shared with the forwarding suite, which uses all of it"
)]
mod fake_upstream;
#[path = "forwarding/streamed.rs"]
mod streamed;

use anyhow::{anyhow, ensure, Context, Result};
use fake_upstream::{Fake, Mode, STREAM_FIRST, STREAM_REST};
use ibex_e2e::http::{Conn, Request};
use ibex_e2e::{Proxy, Signal, Stack};
use streamed::Streamed;

const PROBE: &str = "/v1/internal/auth-probe";
const CHAT: &str = "/v1/chat/completions";
/// A stream the fake pauses after its first event until released.
const STREAM_BODY: &str = r#"{"model":"fake-model-stream","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"count"}]}"#;
/// The drain deadline of every proxy here: far above what a round needs, so a loaded machine
/// cannot make the old proxy give up on the stream the test holds open.
const DRAIN_TIMEOUT: &str = "60s";
/// Clients sending at once, each on its own keep-alive connection.
const CLIENTS: usize = 8;
/// Old proxies replaced one after the other.
const RESTARTS: usize = 10;
/// How long a condition that must become true is polled for.
const WITHIN: Duration = Duration::from_secs(30);
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on the kernel's migration of queued connections between the listeners of a reuseport
/// group (per network namespace). False when it is off and cannot be set (not root).
fn migrate_req_on() -> bool {
    let on = || std::fs::read_to_string(MIGRATE_REQ).is_ok_and(|v| v.trim() == "1");
    on() || (std::fs::write(MIGRATE_REQ, "1").is_ok() && on())
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    closed_by_server: AtomicU64,
    failed: AtomicU64,
}

/// Sends probes on one keep-alive connection until `stop`, opening a new connection whenever
/// a response says `Connection: close`. Any error or non-200 is counted as failed.
async fn client(
    addr: std::net::SocketAddr,
    req: Request,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if counts.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("restart: connect failed: {e:#}");
                    }
                    errors.push(format!("connect: {e:#}"));
                    continue;
                }
            },
        };
        match c.send(&req, false).await {
            Ok(r) if r.status == 200 => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                if r.header("connection") == Some("close") {
                    counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            Ok(r) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                errors.push(format!("status {}: {}", r.status, r.text()));
                conn = None;
            }
            Err(e) => {
                if counts.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("restart: request failed: {e:#}");
                }
                errors.push(format!("request: {e:#}"));
                conn = None;
            }
        }
    }
    errors
}

/// Polls until the counter has grown by `by` (the clients are making progress).
async fn progress(counts: &Counts, by: u64) -> Result<()> {
    let from = counts.ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + WITHIN;
    while counts.ok.load(Ordering::Relaxed) < from + by {
        ensure!(Instant::now() < deadline, "clients made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_lose_nothing() -> Result<()> {
    if !migrate_req_on() {
        eprintln!(
            "restart: SKIPPED: {MIGRATE_REQ} is 0 and cannot be set here (needs root); \
             without it a closing listener resets its queued connections"
        );
        return Ok(());
    }
    let fake = Fake::start(Mode::OpenAi).await?;
    let upstream = fake.url();
    let upstream_env = [
        ("IBEX_UPSTREAM_URL", upstream.as_str()),
        ("IBEX_UPSTREAM_API_KEY", "sk-restart-upstream"),
        ("IBEX_DRAIN_TIMEOUT", DRAIN_TIMEOUT),
    ];
    let Stack {
        proxy: first,
        authd,
        redis,
        seed: _seed,
        pg: _pg,
    } = Stack::start_with(&[], &upstream_env).await?;
    let addr = first.addr;
    // An org whose limit the test never reaches, an agent and a token that may chat.
    let t = authd
        .tenant("restart", 100_000_000, false, &["read,chat"])
        .await?;
    let (token, agent) = (t.pats[0].clone(), t.agent);
    let req = Request::get(PROBE).auth(&token, &agent);
    let chat = Request::post(CHAT, STREAM_BODY)
        .header("Content-Type", "application/json")
        .auth(&token, &agent);
    let listen = addr.to_string();
    let redis_url = redis.url();
    let start_next = || async {
        let mut env = vec![
            ("IBEX_PROXY_LISTEN", listen.as_str()),
            ("IBEX_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
        ];
        env.extend(upstream_env);
        Proxy::start(authd.grpc_addr, &redis_url, &env).await
    };
    let expected: String = std::iter::once(STREAM_FIRST).chain(STREAM_REST).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(addr, req.clone(), stop.clone(), counts.clone())))
        .collect();

    let result = async {
        let mut old = first;
        progress(&counts, 200).await?;
        for round in 0..RESTARTS {
            // Opened while the old proxy is the port's only listener, so it is served there.
            let mut stream = Streamed::send(addr, &chat).await?;
            stream
                .read_until(|p| {
                    p.body
                        .windows(STREAM_FIRST.len())
                        .any(|w| w == STREAM_FIRST.as_bytes())
                })
                .await
                .with_context(|| format!("round {round}: the stream's first event"))?;
            let new = start_next()
                .await
                .with_context(|| format!("round {round}: the new proxy"))?;
            progress(&counts, 100).await?;
            let closed_before = counts.closed_by_server.load(Ordering::Relaxed);
            old.signal(Signal::SIGTERM)?;
            // The old proxy is draining (it told a client `Connection: close`) and, with the
            // stream held open, must still be running.
            let deadline = Instant::now() + WITHIN;
            while counts.closed_by_server.load(Ordering::Relaxed) == closed_before {
                ensure!(
                    Instant::now() < deadline,
                    "round {round}: no response said Connection: close after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ensure!(
                old.is_running(),
                "round {round}: the old proxy exited with a stream in flight"
            );
            fake.release();
            let done = stream
                .read_until(|p| p.complete)
                .await
                .with_context(|| format!("round {round}: the rest of the stream"))?;
            ensure!(
                done.status == 200 && done.body == expected.as_bytes(),
                "round {round}: stream status {} body {:?}",
                done.status,
                String::from_utf8_lossy(&done.body)
            );
            while old.is_running() {
                ensure!(
                    Instant::now() < deadline,
                    "round {round}: the old proxy still runs {WITHIN:?} after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let closed = counts.closed_by_server.load(Ordering::Relaxed) - closed_before;
            ensure!(
                closed > 0,
                "round {round}: no response said Connection: close while draining"
            );
            // The clients carry on against the new process alone.
            progress(&counts, 100).await?;
            eprintln!(
                "restart: round {round}: stream complete on the old proxy; {closed} connections \
                 closed by the draining proxy after a response, {} answered so far, {} failed",
                counts.ok.load(Ordering::Relaxed),
                counts.failed.load(Ordering::Relaxed)
            );
            old = new;
        }
        // Still serving: the clients stop before it does.
        Ok::<_, anyhow::Error>(old)
    }
    .await;

    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.map_err(|e| anyhow!("client task: {e}"))?);
    }
    for e in errors.iter().take(5) {
        eprintln!("restart: failed: {e}");
    }
    // The last proxy stops (dropped) only after the clients did.
    let _last = result?;
    let failed = counts.failed.load(Ordering::Relaxed);
    eprintln!(
        "restart: {RESTARTS} rolling restarts, {CLIENTS} keep-alive clients: {} answered 200, \
         {failed} failed; {RESTARTS} streams in flight across a SIGTERM, all complete",
        counts.ok.load(Ordering::Relaxed)
    );
    ensure!(
        failed == 0,
        "{failed} requests failed during rolling restarts; first: {:?}",
        errors.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}
