//! Cost of one rate-limit check against a local Redis, two designs side by
//! side in one run:
//!
//! - `pipelined_monoio`: the proxy's [`RateLimiter`], which speaks RESP to
//!   Redis over one pipelined connection from the worker's own monoio
//!   runtime (no thread hop).
//! - `tokio_bridge`: the `redis` crate's `MultiplexedConnection` on a tokio
//!   thread, reached from a monoio task through a channel and a oneshot (the
//!   usual way to use a tokio-only client from monoio).
//!
//! Both run the same Lua script on the same key; each is measured serial
//! (one check in flight) and with 8 and 64 checks in flight from as many
//! tasks; a figure is time per check. `resp_parse` compares the limiter's
//! reply parser with `redis::parse_redis_value`. After criterion, unless
//! `IBEX_BENCH_CPU=0`, a paired report runs the two designs in alternating
//! blocks (so the machine's other load weighs on both alike) and prints wall
//! time, serial latency percentiles and CPU µs per check of this process
//! (all threads) and of redis-server, from `/proc/<pid>/stat`.
//!
//! The bench starts its own redis-server on a free port (ibex_e2e::Redis).
//! Run (bench on CPU 0, redis-server moved to CPU 1):
//!
//! ```text
//! cargo bench -p ibex-bench --bench ratelimit --no-run
//! IBEX_BENCH_REDIS_CPU=1 taskset -c 0 cargo bench -p ibex-bench --bench ratelimit
//! ```
//!
//! `IBEX_BENCH_DRIVER=legacy` uses monoio's epoll driver instead of
//! io_uring (default ring flags).
//!
//! Results, 2026-11-23 ~20:50 UTC, 2 vCPU AMD EPYC VM (Debian 12, kernel
//! 6.18), release, redis 7.0, io_uring driver, load average 3-4 from other
//! work; criterion medians, µs per check (more in perf/results/ratelimit.md):
//!
//! ```text
//!                          Redis on the same core     Redis on the other core
//!                          pipelined   tokio_bridge   pipelined   tokio_bridge
//! serial                     17.5        28.3           79.4        69.4
//! in_flight_8                 4.21        8.66          13.9        15.7
//! in_flight_64                2.55        4.96           4.9        31.1 (noisy)
//! CPU µs/check, serial        9.7        18.3           37.3        54.0
//! CPU µs/check, 64 in flight  0.60        2.87           0.97        4.20
//! resp_parse: limiter 48 ns, redis::parse_redis_value 365 ns
//! ```
//!
//! Other core + io_uring: ~2 % of pipelined serial checks wait ~3 ms (p99
//! 3.3 ms); on the epoll driver the same code has p99 81 µs (bridge 96 µs).

use std::cell::Cell;
use std::future::Future;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion};
use ibex_e2e::Redis;
use ibex_proxy::clock::SystemClock;
use ibex_proxy::ratelimit::resp;
use ibex_proxy::ratelimit::window::{Window, KEY_TTL_MS};
use ibex_proxy::ratelimit::{RateLimitConfig, RateLimiter, SCRIPT};
use monoio::time::TimeDriver;
use uuid::Uuid;

/// Never reached: every check is admitted, so both designs do the same work.
const LIMIT: u32 = u32::MAX;
const IN_FLIGHT: [usize; 2] = [8, 64];
/// Far above the 5 ms default: on a loaded machine a check that fails open
/// (or a breaker that opens) would be measured as a free check, so the
/// bench waits instead and reports any fail-open.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The comparison design: a tokio thread owning a `MultiplexedConnection`.
struct Bridge {
    tx: tokio::sync::mpsc::UnboundedSender<Request>,
    timeout: Duration,
    /// Checks that got no count (they would fail open).
    failures: Cell<u64>,
}

struct Request {
    key: String,
    reply: tokio::sync::oneshot::Sender<redis::RedisResult<(i64, i64)>>,
}

impl Bridge {
    fn start(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("redis-bridge".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let conn = match client.get_multiplexed_async_connection().await {
                        Ok(conn) => conn,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let script = Arc::new(redis::Script::new(SCRIPT));
                    while let Some(req) = rx.recv().await {
                        let (mut conn, script) = (conn.clone(), script.clone());
                        // One task per request so requests from many callers
                        // share the multiplexed connection concurrently.
                        tokio::spawn(async move {
                            let r = script
                                .key(req.key)
                                .arg(KEY_TTL_MS)
                                .invoke_async(&mut conn)
                                .await;
                            let _ = req.reply.send(r);
                        });
                    }
                });
            })?;
        ready_rx.recv()??;
        Ok(Self {
            tx,
            timeout: CHECK_TIMEOUT,
            failures: Cell::new(0),
        })
    }

    /// The same decision the limiter makes, through the bridge.
    async fn check(&self, org: &Uuid, limit: u32) -> bool {
        let window = Window::at(unix_ms());
        let (reply, rx) = tokio::sync::oneshot::channel();
        let key = window.key(org);
        if self.tx.send(Request { key, reply }).is_err() {
            self.failures.set(self.failures.get() + 1);
            return true;
        }
        match monoio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok((count, _pttl)))) => window.decide(count as u64, limit).admitted,
            _ => {
                self.failures.set(self.failures.get() + 1);
                true
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `iters` calls of `one` as `n` tasks in parallel on the current
/// runtime; returns the time scaled to exactly `iters` calls.
async fn concurrent<F, Fut>(iters: u64, n: usize, one: F) -> Duration
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let per_task = iters.div_ceil(n as u64).max(1);
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let one = one.clone();
            monoio::spawn(async move {
                for _ in 0..per_task {
                    one().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
    let done = per_task * n as u64;
    start.elapsed().mul_f64(iters as f64 / done as f64)
}

fn bench_parse(c: &mut Criterion) {
    let reply = b"*2\r\n:17\r\n:60998\r\n";
    let mut g = c.benchmark_group("resp_parse");
    g.bench_function("limiter_parser", |b| {
        b.iter(|| resp::parse(black_box(reply)))
    });
    g.bench_function("redis_parse_redis_value", |b| {
        b.iter(|| redis::parse_redis_value(black_box(reply)))
    });
    g.finish();
}

fn bench_checks<D: monoio::Driver>(
    c: &mut Criterion,
    rt: &mut monoio::Runtime<D>,
    limiter: &Rc<RateLimiter>,
    bridge: &Rc<Bridge>,
    driver: &str,
) {
    let org = Uuid::new_v4();
    let mut g = c.benchmark_group(format!("ratelimit_check/{driver}"));
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));

    g.bench_function(BenchmarkId::new("pipelined_monoio", "serial"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(limiter.check(&org, LIMIT).await);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function(BenchmarkId::new("tokio_bridge", "serial"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(bridge.check(&org, LIMIT).await);
                }
                start.elapsed()
            })
        })
    });
    for n in IN_FLIGHT {
        let label = format!("in_flight_{n}");
        g.bench_function(BenchmarkId::new("pipelined_monoio", &label), |b| {
            b.iter_custom(|iters| {
                let limiter = limiter.clone();
                rt.block_on(concurrent(iters, n, move || {
                    let limiter = limiter.clone();
                    async move {
                        black_box(limiter.check(&org, LIMIT).await);
                    }
                }))
            })
        });
        g.bench_function(BenchmarkId::new("tokio_bridge", &label), |b| {
            b.iter_custom(|iters| {
                let bridge = bridge.clone();
                rt.block_on(concurrent(iters, n, move || {
                    let bridge = bridge.clone();
                    async move {
                        black_box(bridge.check(&org, LIMIT).await);
                    }
                }))
            })
        });
    }
    g.finish();
}

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str, ticks_per_sec: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // Fields 14 and 15 of stat(5); 11 and 12 after "pid (comm)".
    match (field(11), field(12)) {
        (Some(u), Some(s)) => (u + s) / ticks_per_sec,
        _ => f64::NAN,
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Totals for one design across the interleaved rounds of [`paired_report`].
#[derive(Default)]
struct Tally {
    checks: u64,
    wall: Duration,
    cpu: f64,
    redis_cpu: f64,
    failed: u64,
    /// Per-check latency in ns (serial rounds only).
    latencies: Vec<u64>,
}

impl Tally {
    fn percentile_us(&mut self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i] as f64 / 1e3
    }
}

/// One block of `checks` checks of one design with `n` in flight.
async fn block(
    design: usize,
    limiter: Rc<RateLimiter>,
    bridge: Rc<Bridge>,
    checks: u64,
    n: usize,
    latencies: &mut Vec<u64>,
) -> Duration {
    let org = Uuid::new_v4();
    if n == 1 {
        // Serial: time every check for the latency percentiles.
        let start = Instant::now();
        for _ in 0..checks {
            let t = Instant::now();
            if design == 0 {
                black_box(limiter.check(&org, LIMIT).await);
            } else {
                black_box(bridge.check(&org, LIMIT).await);
            }
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        return start.elapsed();
    }
    if design == 0 {
        concurrent(checks, n, move || {
            let limiter = limiter.clone();
            async move {
                black_box(limiter.check(&org, LIMIT).await);
            }
        })
        .await
    } else {
        concurrent(checks, n, move || {
            let bridge = bridge.clone();
            async move {
                black_box(bridge.check(&org, LIMIT).await);
            }
        })
        .await
    }
}

/// Wall, latency and CPU per check, this process (all threads) and
/// redis-server, with the two designs interleaved in alternating blocks so
/// that the other load on the machine weighs on both alike.
fn paired_report<D: monoio::Driver>(
    rt: &mut monoio::Runtime<D>,
    limiter: &Rc<RateLimiter>,
    bridge: &Rc<Bridge>,
    redis_pid: &str,
) {
    const ROUNDS: u64 = 10;
    const DESIGNS: [&str; 2] = ["pipelined_monoio", "tokio_bridge"];
    let ticks = clock_ticks();
    println!("\nPaired report: {ROUNDS} alternating rounds per row; CPU from /proc/<pid>/stat (1/{ticks} s)");
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6}",
        "design", "wall µs", "p50 µs", "p90 µs", "p99 µs", "CPU µs", "redis µs", "failed"
    );
    for (n, per_block) in [(1usize, 3_000u64), (64, 30_000)] {
        let mut tallies = [Tally::default(), Tally::default()];
        for round in 0..ROUNDS {
            // Alternate which design goes first, too.
            for k in 0..2 {
                let design = (k + round as usize) % 2;
                let t = &mut tallies[design];
                let (cpu0, redis0) = (cpu_seconds("self", ticks), cpu_seconds(redis_pid, ticks));
                let failed0 = limiter.stats().failed_open.load(Relaxed) + bridge.failures.get();
                let wall = rt.block_on(block(
                    design,
                    limiter.clone(),
                    bridge.clone(),
                    per_block,
                    n,
                    &mut t.latencies,
                ));
                t.cpu += cpu_seconds("self", ticks) - cpu0;
                t.redis_cpu += cpu_seconds(redis_pid, ticks) - redis0;
                t.failed +=
                    limiter.stats().failed_open.load(Relaxed) + bridge.failures.get() - failed0;
                t.wall += wall;
                t.checks += per_block;
            }
        }
        for (design, t) in DESIGNS.iter().zip(tallies.iter_mut()) {
            let per = |s: f64| s * 1e6 / t.checks as f64;
            let (wall, cpu, redis) = (per(t.wall.as_secs_f64()), per(t.cpu), per(t.redis_cpu));
            println!(
                "{:<34} {:>8.2} {:>8.1} {:>8.1} {:>8.1} {:>10.2} {:>10.2} {:>6}",
                format!("{design} (in flight {n})"),
                wall,
                t.percentile_us(0.5),
                t.percentile_us(0.9),
                t.percentile_us(0.99),
                cpu,
                redis,
                t.failed
            );
        }
    }
}

/// Moves redis-server to `IBEX_BENCH_REDIS_CPU` if set; returns its pid.
fn redis_pid(harness: &tokio::runtime::Runtime, redis: &Redis) -> anyhow::Result<String> {
    let info = harness.block_on(redis.command(&["INFO", "server"]))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| anyhow::anyhow!("no process_id in INFO"))?;
    if let Ok(cpu) = std::env::var("IBEX_BENCH_REDIS_CPU") {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu, &pid])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "taskset failed");
    }
    Ok(pid)
}

fn run<D: monoio::Driver>(mut rt: monoio::Runtime<D>, driver: &str, url: &str, redis_pid: &str) {
    let limiter = rt.block_on(async {
        let config = RateLimitConfig::new(url, CHECK_TIMEOUT);
        let limiter = Rc::new(RateLimiter::new(
            Rc::new(config),
            Rc::new(SystemClock::new()),
        ));
        let start = Instant::now();
        while !limiter.healthy() {
            assert!(start.elapsed() < Duration::from_secs(10), "no Redis");
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        limiter
    });
    let bridge = match Bridge::start(url) {
        Ok(bridge) => Rc::new(bridge),
        Err(e) => panic!("bridge: {e}"),
    };
    let mut c = Criterion::default().configure_from_args();
    bench_parse(&mut c);
    bench_checks(&mut c, &mut rt, &limiter, &bridge, driver);
    let (open, bridge_failed) = (
        limiter.stats().failed_open.load(Relaxed),
        bridge.failures.get(),
    );
    if open + bridge_failed > 0 {
        eprintln!(
            "WARNING: {open} limiter / {bridge_failed} bridge checks failed: figures not valid"
        );
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    if measuring && std::env::var("IBEX_BENCH_CPU").as_deref() != Ok("0") {
        paired_report(&mut rt, &limiter, &bridge, redis_pid);
    }
    c.final_summary();
}

fn main() -> anyhow::Result<()> {
    let harness = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut redis = harness.block_on(Redis::start())?;
    let pid = redis_pid(&harness, &redis)?;
    let url = redis.url();
    if std::env::var("IBEX_BENCH_DRIVER").as_deref() == Ok("legacy") {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?;
        run::<TimeDriver<monoio::LegacyDriver>>(rt, "legacy", &url, &pid);
    } else {
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()?;
        run::<TimeDriver<monoio::IoUringDriver>>(rt, "io_uring", &url, &pid);
    }
    harness.block_on(redis.stop())?;
    Ok(())
}
