//! The rate limiter on a single Redis vs a 3-master Redis Cluster (3 replicas), same run:
//! limiter CPU µs per check (the worker thread, from `/proc/thread-self/stat`), Redis calls
//! per check (`EVALSHA` + `EVAL` summed over every node's `INFO commandstats`) and Redis CPU
//! µs per check (every redis-server process, replicas included), with 1 and with 1,000 orgs
//! sharing the offered rate.
//!
//! ```text
//! cargo build --release -p ibex-bench --bin rl_cluster
//! taskset -c 0 target/release/rl_cluster            # RATE=10000 SECS=5 ROUNDS=2
//! ```
//!
//! Checks are paced (RATE per second, spread over 1 ms ticks) with the real clock, so busy
//! orgs lease budget exactly as on a proxy worker; the limiter waits up to 1 s for Redis, so
//! no check fails open on a loaded machine (each row prints how many did).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ibex_bench::{clk_tck, env_or, redis_totals, ticks};
use ibex_e2e::{Redis, RedisCluster};
use ibex_proxy::ratelimit::{RateLimitConfig, RateLimiter};
use uuid::Uuid;

/// Every node of a backend: (port) for INFO.
struct Backend {
    name: &'static str,
    url: String,
    ports: Vec<u16>,
}

struct Row {
    checks: u64,
    worker_ticks: u64,
    failed_open: u64,
}

/// Paced checks over `orgs` for `secs` on a fresh worker thread.
fn run_worker(url: String, orgs: usize, rate: u64, secs: u64) -> Row {
    std::thread::spawn(move || {
        let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
        else {
            return Row {
                checks: 0,
                worker_ticks: 0,
                failed_open: 0,
            };
        };
        rt.block_on(async move {
            let config = Rc::new(RateLimitConfig::new(url, Duration::from_secs(1)));
            let limiter = Rc::new(RateLimiter::new(
                config,
                Rc::new(ibex_proxy::clock::SystemClock::new()),
            ));
            let start = Instant::now();
            while !limiter.healthy() && start.elapsed() < Duration::from_secs(10) {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            let ids: Rc<Vec<Uuid>> = Rc::new((0..orgs).map(|_| Uuid::new_v4()).collect());
            let next = Rc::new(Cell::new(0usize));
            let stats = limiter.stats();
            let (checks0, failed0) = (stats.checks.load(Relaxed), stats.failed_open.load(Relaxed));
            let t0 = ticks("/proc/thread-self/stat");
            let begin = monoio::time::Instant::now();
            let per_tick = rate / 1000;
            let mut tick = 0u64;
            while tick < secs * 1000 {
                for _ in 0..per_tick {
                    let (limiter, ids, next) = (limiter.clone(), ids.clone(), next.clone());
                    monoio::spawn(async move {
                        let i = next.get();
                        next.set((i + 1) % ids.len());
                        limiter.check(&ids[i], u32::MAX).await;
                    });
                }
                tick += 1;
                monoio::time::sleep_until(begin + Duration::from_millis(tick)).await;
            }
            // Let the last checks finish.
            monoio::time::sleep(Duration::from_millis(50)).await;
            Row {
                checks: stats.checks.load(Relaxed) - checks0,
                worker_ticks: ticks("/proc/thread-self/stat") - t0,
                failed_open: stats.failed_open.load(Relaxed) - failed0,
            }
        })
    })
    .join()
    .unwrap_or(Row {
        checks: 0,
        worker_ticks: 0,
        failed_open: 0,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let rate = env_or("RATE", 10_000);
    let secs = env_or("SECS", 5);
    let rounds = env_or("ROUNDS", 2);
    let tck = clk_tck();
    let single = Redis::start().await.context("single redis")?;
    let cluster = RedisCluster::start().await.context("cluster")?;
    let backends = [
        Backend {
            name: "single Redis",
            url: single.url(),
            ports: vec![single.port()],
        },
        Backend {
            name: "3-master cluster",
            url: cluster.seed_url(),
            ports: cluster.ports(),
        },
    ];
    println!("rate {rate}/s, {secs} s per row, {rounds} rounds; CPU ticks 1/{tck} s");
    println!("| round | backend | orgs | checks | limiter CPU µs/check | Redis calls/check | Redis CPU µs/check (all nodes) | failed open |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for orgs in [1usize, 1000] {
            for b in &backends {
                let (calls0, cpu0) = redis_totals(&b.ports).await;
                let url = b.url.clone();
                let row =
                    tokio::task::spawn_blocking(move || run_worker(url, orgs, rate, secs)).await?;
                let (calls1, cpu1) = redis_totals(&b.ports).await;
                let n = row.checks.max(1) as f64;
                println!(
                    "| {round} | {} | {orgs} | {} | {:.2} | {:.4} | {:.2} | {} |",
                    b.name,
                    row.checks,
                    row.worker_ticks as f64 / tck * 1e6 / n,
                    (calls1 - calls0) as f64 / n,
                    (cpu1 - cpu0) as f64 / tck * 1e6 / n,
                    row.failed_open
                );
            }
        }
    }
    Ok(())
}
