//! Ten rolling restarts of a proxy under 1,000 req/s on 16 keep-alive connections, a streamed
//! response in flight across every SIGTERM (issue 12 item 4's target): prints one JSON object
//! with the load generator's result (errors, statuses, reconnects) and how many streams
//! completed on their old process.
//!
//! ```text
//! cargo build --release -p ibex-proxy -p ibex-authd -p ibex-bench
//! flock /tmp/ibex-perf.lock perf/rolling-restart.sh          # RESTARTS=10 RATE=1000 CONNS=16
//! ```
//!
//! Starts its own Postgres, Redis and authd (the e2e harness), a slow streaming fake upstream
//! (`perf/fake_sse_upstream.py`: 20 events 100 ms apart, 2 s a stream) and the first proxy; then
//! `loadgen` sends auth probes at RATE over CONNS connections while, RESTARTS times: a stream is
//! opened on the current proxy (the port's only listener) and its first event read, a new proxy
//! is started on the same port (SO_REUSEPORT), the old one gets SIGTERM, the stream is read to
//! its end (`data: [DONE]` and the last chunk) and the old process must exit. Needs
//! `net.ipv4.tcp_migrate_req = 1` (set when root).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ibex_bench::env_or;
use ibex_e2e::procs::{bin_path, free_port};
use ibex_e2e::{Proxy, Signal, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
const WITHIN: Duration = Duration::from_secs(30);

/// Kills the child when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One streamed chat request read as it arrives.
struct Stream {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Stream {
    async fn open(addr: SocketAddr, token: &str, agent: &str) -> Result<Stream> {
        let body =
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             X-IBEX-Agent-ID: {agent}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        sock.write_all(req.as_bytes()).await?;
        Ok(Stream {
            sock,
            buf: Vec::new(),
        })
    }

    /// Reads until `done` holds for what arrived, or fails on close or after [`WITHIN`].
    async fn read_until(&mut self, done: impl Fn(&[u8]) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WITHIN;
        while !done(&self.buf) {
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.sock.read(&mut chunk))
                .await
                .context("stream: no progress")??;
            if n == 0 {
                bail!(
                    "stream closed early after {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

fn complete(buf: &[u8]) -> bool {
    buf.ends_with(b"0\r\n\r\n") && buf.windows(12).any(|w| w == b"data: [DONE]")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let restarts = env_or("RESTARTS", 10) as usize;
    let rate = env_or("RATE", 1000);
    let conns = env_or("CONNS", 16);
    let load_cpu = std::env::var("LOAD_CPU").unwrap_or_else(|_| "1".into());
    let on = || std::fs::read_to_string(MIGRATE_REQ).is_ok_and(|v| v.trim() == "1");
    ensure!(
        on() || (std::fs::write(MIGRATE_REQ, "1").is_ok() && on()),
        "{MIGRATE_REQ} is 0 and cannot be set (run as root)"
    );

    let up_port = free_port()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../perf/fake_sse_upstream.py");
    let _upstream = Child(
        Command::new("python3")
            .args([script, &up_port.to_string(), "20", "100"])
            .stdout(Stdio::null())
            .spawn()
            .context("python3 perf/fake_sse_upstream.py")?,
    );
    let up_url = format!("http://127.0.0.1:{up_port}/v1");
    let deadline = Instant::now() + WITHIN;
    while std::net::TcpStream::connect(("127.0.0.1", up_port)).is_err() {
        ensure!(Instant::now() < deadline, "the fake upstream did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let env = [
        ("IBEX_UPSTREAM_URL", up_url.as_str()),
        ("IBEX_UPSTREAM_API_KEY", "sk-perf"),
        ("IBEX_LOG", "warn"),
    ];
    let stack = Stack::start_with(&[], &env).await?;
    let t = stack
        .authd
        .tenant("rolling", 2_000_000_000, false, &["read,chat"])
        .await?;
    let (token, agent) = (t.pats[0].clone(), t.agent.clone());
    let addr = stack.proxy.addr;
    let listen = addr.to_string();
    let redis_url = stack.redis.url();
    let start_next = || {
        let mut env = env.to_vec();
        env.extend([
            ("IBEX_PROXY_LISTEN", listen.as_str()),
            ("IBEX_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
        ]);
        let (grpc, redis) = (stack.authd.grpc_addr, redis_url.clone());
        async move { Proxy::start(grpc, &redis, &env).await }
    };
    // Warm the first proxy's caches.
    let mut warm = Stream::open(addr, &token, &agent).await?;
    warm.read_until(complete).await?;

    // Long enough for every round (a stream is 2 s, plus start-up and drain).
    let secs = env_or("DURATION", 8 + 5 * restarts as u64);
    let mut loadgen = Command::new("taskset");
    loadgen
        .args(["-c", &load_cpu])
        .arg(bin_path("loadgen")?)
        .args(["--addr", &listen, "--path", "/v1/internal/auth-probe"])
        .args([
            "--rate",
            &rate.to_string(),
            "--connections",
            &conns.to_string(),
        ])
        .args(["--duration", &secs.to_string()])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", &format!("X-IBEX-Agent-ID: {agent}")])
        .stdout(Stdio::piped());
    let loadgen = loadgen.spawn().context("loadgen")?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut old = stack.proxy;
    let (mut streams_ok, mut rounds) = (0, Vec::new());
    for round in 0..restarts {
        let t0 = Instant::now();
        let mut stream = Stream::open(addr, &token, &agent).await?;
        stream
            .read_until(|b| b.windows(5).any(|w| w == b"data:"))
            .await?;
        let new = start_next().await.context("the new proxy")?;
        old.signal(Signal::SIGTERM)?;
        let read = stream.read_until(complete).await;
        let deadline = Instant::now() + WITHIN;
        while old.is_running() {
            ensure!(
                Instant::now() < deadline,
                "round {round}: old proxy still runs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match read {
            Ok(()) => streams_ok += 1,
            Err(e) => eprintln!("rolling-restart: round {round}: stream failed: {e:#}"),
        }
        rounds.push(t0.elapsed().as_millis());
        old = new;
    }
    let restarts_done = started.elapsed();
    let out = tokio::task::spawn_blocking(move || loadgen.wait_with_output()).await??;
    let load: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    ensure!(
        restarts_done.as_secs() < secs,
        "the restarts took {restarts_done:?}, longer than the {secs} s load run"
    );
    let summary = serde_json::json!({
        "restarts": restarts,
        "rate": rate,
        "connections": conns,
        "streams_in_flight": restarts,
        "streams_complete": streams_ok,
        "round_ms": rounds,
        "loadgen": load,
    });
    println!("{summary}");
    drop(old);
    Ok(())
}
