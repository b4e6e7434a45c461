//! The rate limiter against a real Redis (SPEC §4): exact counting, the
//! limit shared by several workers (as by several proxies), per-org
//! isolation, the key and its expiry, and failing open when Redis is down
//! or stalled.
//!
//! Each limiter runs on its own thread with its own monoio runtime, as on a
//! proxy worker; the test thread (tokio) owns the throwaway Redis. The
//! limiters use a fixed or hand-moved clock so no test straddles a minute.

use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use ibex_e2e::{Redis, RedisCluster};
use ibex_proxy::clock::{FakeClock, SystemClock};
use ibex_proxy::ratelimit::{RateDecision, RateLimitConfig, RateLimiter};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f` on a new thread inside its own monoio runtime (timer on, like a
/// proxy worker) and returns its output.
#[expect(
    clippy::expect_used,
    reason = "a test helper: setup failure fails the test"
)]
async fn on_worker<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let thread = std::thread::spawn(move || {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("monoio runtime");
        rt.block_on(f())
    });
    tokio::task::spawn_blocking(move || thread.join().expect("worker panicked"))
        .await
        .expect("join")
}

/// Test settings: a generous timeout so a loaded debug build never fails
/// open by accident, quick reconnects.
fn config(url: &str) -> Rc<RateLimitConfig> {
    Rc::new(RateLimitConfig {
        breaker_open: Duration::from_millis(200),
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(100),
        ..RateLimitConfig::new(url, Duration::from_secs(2))
    })
}

/// Half a minute into the current minute: a whole window either side.
fn mid_minute_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now / 60_000 * 60_000 + 30_000
}

fn limiter_at(url: &str, clock: Rc<FakeClock>) -> RateLimiter {
    RateLimiter::new(config(url), clock)
}

async fn until_healthy(limiter: &RateLimiter) {
    let start = Instant::now();
    while !limiter.healthy() {
        assert!(start.elapsed() < DEADLINE, "limiter never connected");
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks until `done` holds for a decision, or panics at the deadline.
async fn check_until(
    limiter: &RateLimiter,
    org: &Uuid,
    limit: u32,
    done: impl Fn(&RateDecision) -> bool,
) -> RateDecision {
    let start = Instant::now();
    loop {
        let d = limiter.check(org, limit).await;
        if done(&d) {
            return d;
        }
        assert!(start.elapsed() < DEADLINE, "never reached: last {d:?}");
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn remaining_decrements_exactly_and_the_61st_is_refused() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let now = mid_minute_ms();
    let (decisions, stats) = on_worker(move || async move {
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(now as i64)));
        until_healthy(&limiter).await;
        let org = Uuid::new_v4();
        let mut out = Vec::new();
        for _ in 0..61 {
            out.push(limiter.check(&org, 60).await);
        }
        let zero = limiter.check(&Uuid::new_v4(), 0).await;
        assert!(!zero.admitted, "a limit of 0 admits nothing");
        let s = limiter.stats();
        let counts = (
            s.checks.load(std::sync::atomic::Ordering::Relaxed),
            s.limited.load(std::sync::atomic::Ordering::Relaxed),
            s.failed_open.load(std::sync::atomic::Ordering::Relaxed),
        );
        (out, counts)
    })
    .await;

    let reset = now / 60_000 * 60 + 60;
    for (i, d) in decisions[..60].iter().enumerate() {
        assert!(d.admitted && !d.failed_open, "check {}: {d:?}", i + 1);
        assert_eq!(d.remaining, Some(59 - i as u32), "check {}", i + 1);
        assert_eq!((d.limit, d.reset_unix), (60, reset));
    }
    let last = decisions[60];
    assert!(!last.admitted && !last.failed_open, "{last:?}");
    assert_eq!(last.remaining, Some(0));
    assert_eq!(last.retry_after_ms, 30_000);
    assert_eq!(last.reset_unix, reset);
    assert_eq!(stats, (62, 2, 0));
}

#[tokio::test]
async fn key_is_hash_tagged_per_org_and_window_and_expires_after_61s() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let now = mid_minute_ms();
    let org = Uuid::new_v4();
    on_worker(move || async move {
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(now as i64)));
        until_healthy(&limiter).await;
        for _ in 0..3 {
            assert!(!limiter.check(&org, 10).await.failed_open);
        }
    })
    .await;

    let key = format!("ibex:rl:{{{org}}}:{}", now / 60_000);
    assert_eq!(redis.command(&["GET", &key]).await.unwrap(), "$1\r\n3\r\n");
    let keys = redis.command(&["KEYS", "ibex:rl:*"]).await.unwrap();
    assert_eq!(keys, format!("*1\r\n${}\r\n{key}\r\n", key.len()));
    let pttl = redis.command(&["PTTL", &key]).await.unwrap();
    let pttl: u64 = pttl.trim_start_matches(':').trim_end().parse().unwrap();
    assert!(
        (50_000..=61_000).contains(&pttl),
        "expiry {pttl} ms, want about 61 s"
    );
}

#[tokio::test]
async fn an_exhausted_org_does_not_affect_another_and_a_new_window_starts_fresh() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    on_worker(move || async move {
        let clock = Rc::new(FakeClock::new(mid_minute_ms() as i64));
        let limiter = limiter_at(&url, clock.clone());
        until_healthy(&limiter).await;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        for _ in 0..5 {
            assert!(limiter.check(&a, 5).await.admitted);
        }
        assert!(!limiter.check(&a, 5).await.admitted);
        let other = limiter.check(&b, 5).await;
        assert!(other.admitted && !other.failed_open);
        assert_eq!(other.remaining, Some(4));
        assert!(!limiter.check(&a, 5).await.admitted, "still refused");

        clock.advance(Duration::from_secs(60));
        let next = limiter.check(&a, 5).await;
        assert!(next.admitted && !next.failed_open, "{next:?}");
        assert_eq!(next.remaining, Some(4));
    })
    .await;
}

#[tokio::test]
async fn two_workers_sharing_redis_never_admit_more_than_the_limit() {
    const LIMIT: u32 = 150;
    const PER_WORKER: usize = 200;
    let redis = Redis::start().await.unwrap();
    let org = Uuid::new_v4();
    let now = mid_minute_ms();
    let start = Arc::new(Barrier::new(2));
    let worker = |url: String, start: Arc<Barrier>| {
        on_worker(move || async move {
            let limiter = Rc::new(limiter_at(&url, Rc::new(FakeClock::new(now as i64))));
            until_healthy(&limiter).await;
            start.wait();
            // Every check in flight at once on this worker's one connection.
            let tasks: Vec<_> = (0..PER_WORKER)
                .map(|_| {
                    let limiter = limiter.clone();
                    monoio::spawn(async move { limiter.check(&org, LIMIT).await })
                })
                .collect();
            let decisions = futures::future::join_all(tasks).await;
            assert!(
                decisions.iter().all(|d| !d.failed_open),
                "no check may fail open here"
            );
            decisions.iter().filter(|d| d.admitted).count()
        })
    };
    let (a, b) = tokio::join!(
        worker(redis.url(), start.clone()),
        worker(redis.url(), start)
    );
    assert_eq!(a + b, LIMIT as usize, "admitted {a} + {b}");
    let key = format!("ibex:rl:{{{org}}}:{}", now / 60_000);
    let counted = redis.command(&["GET", &key]).await.unwrap();
    assert_eq!(counted, format!("$3\r\n{}\r\n", 2 * PER_WORKER));
}

/// How many times Redis ran `cmd` (from `INFO commandstats`).
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: a failed query fails the test"
)]
async fn calls(redis: &Redis, cmd: &str) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]).await.unwrap();
    let tag = format!("cmdstat_{cmd}:calls=");
    info.split(&tag)
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn a_busy_org_leases_budget_yet_two_workers_never_exceed_the_limit() {
    const LIMIT: u32 = 3_000;
    const TASKS: usize = 50;
    const PER_TASK: usize = 100;
    let redis = Redis::start().await.unwrap();
    let org = Uuid::new_v4();
    let base = mid_minute_ms();
    let start = Arc::new(Barrier::new(2));
    let before = calls(&redis, "evalsha").await + calls(&redis, "eval").await;
    let worker = |url: String, start: Arc<Barrier>| {
        on_worker(move || async move {
            // A clock that moves (the lease size follows the rate it sees)
            // but stays inside one window: the run takes far less than 30 s.
            let clock = SystemClock::starting_at(base as i64);
            let limiter = Rc::new(RateLimiter::new(config(&url), Rc::new(clock)));
            until_healthy(&limiter).await;
            start.wait();
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let limiter = limiter.clone();
                    monoio::spawn(async move {
                        let mut admitted = Vec::new();
                        for _ in 0..PER_TASK {
                            let d = limiter.check(&org, LIMIT).await;
                            assert!(!d.failed_open, "no check may fail open here: {d:?}");
                            assert_eq!(d.limit, LIMIT);
                            if d.admitted {
                                admitted.push(d.remaining);
                            } else {
                                assert_eq!(d.remaining, Some(0));
                            }
                        }
                        admitted
                    })
                })
                .collect();
            let admitted: Vec<_> = futures::future::join_all(tasks)
                .await
                .into_iter()
                .flatten()
                .collect();
            assert!(admitted.iter().all(|r| r.is_some_and(|r| r < LIMIT)));
            admitted.len()
        })
    };
    let (a, b) = tokio::join!(
        worker(redis.url(), start.clone()),
        worker(redis.url(), start)
    );
    let checks = (2 * TASKS * PER_TASK) as u64;
    assert!(
        a + b <= LIMIT as usize,
        "admitted {a} + {b} > limit {LIMIT}"
    );
    assert!(
        a + b >= 2_800,
        "admitted {a} + {b}: leases may lose budget only at the tail"
    );
    let scripts = calls(&redis, "evalsha").await + calls(&redis, "eval").await - before;
    eprintln!("admitted {a} + {b} of {checks} checks (limit {LIMIT}); {scripts} Redis calls");
    assert!(
        scripts > 0 && scripts * 4 < checks,
        "{scripts} Redis calls for {checks} checks: leases should batch them"
    );
}

#[tokio::test]
async fn a_flushed_script_cache_falls_back_to_eval() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let (to_test, mut from_worker) = mpsc::channel::<()>(1);
    let (mut to_worker, from_test) = mpsc::channel::<()>(1);
    let worker = on_worker(move || async move {
        let (mut to_test, mut from_test) = (to_test, from_test);
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(mid_minute_ms() as i64)));
        until_healthy(&limiter).await;
        let org = Uuid::new_v4();
        assert_eq!(limiter.check(&org, 10).await.remaining, Some(9));
        to_test.send(()).await.unwrap();
        from_test.next().await.unwrap();
        let d = limiter.check(&org, 10).await;
        assert!(!d.failed_open, "NOSCRIPT must be retried with EVAL: {d:?}");
        assert_eq!(d.remaining, Some(8));
        assert_eq!(limiter.check(&org, 10).await.remaining, Some(7));
    });
    let driver = async {
        from_worker.next().await.unwrap();
        assert_eq!(
            redis.command(&["SCRIPT", "FLUSH"]).await.unwrap(),
            "+OK\r\n"
        );
        to_worker.send(()).await.unwrap();
    };
    tokio::join!(worker, driver);
}

#[tokio::test]
async fn fails_open_while_redis_is_down_and_recovers_after_restart() {
    let mut redis = Redis::start().await.unwrap();
    let url = redis.url();
    let (to_test, mut from_worker) = mpsc::channel::<&'static str>(1);
    let (mut to_worker, from_test) = mpsc::channel::<()>(1);
    let worker = on_worker(move || async move {
        let (mut to_test, mut from_test) = (to_test, from_test);
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(mid_minute_ms() as i64)));
        until_healthy(&limiter).await;
        let org = Uuid::new_v4();
        assert_eq!(limiter.check(&org, 100).await.remaining, Some(99));

        to_test.send("stop").await.unwrap();
        from_test.next().await.unwrap();
        let open = check_until(&limiter, &org, 100, |d| d.failed_open).await;
        assert!(open.admitted, "Redis down must admit");
        assert_eq!(open.remaining, None);
        assert_eq!(open.limit, 100);
        for _ in 0..50 {
            let d = limiter.check(&org, 100).await;
            assert!(d.admitted && d.failed_open, "{d:?}");
        }
        assert!(!limiter.healthy());
        let stats = limiter.stats();
        assert!(stats.failed_open.load(std::sync::atomic::Ordering::Relaxed) >= 51);
        assert!(
            stats
                .redis_errors
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        assert_eq!(
            stats
                .breaker_state
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "consecutive failures open the breaker"
        );

        to_test.send("restart").await.unwrap();
        from_test.next().await.unwrap();
        // The restarted Redis is empty: counting starts again from 1.
        let back = check_until(&limiter, &org, 100, |d| !d.failed_open).await;
        assert!(back.admitted);
        assert_eq!(back.remaining, Some(99));
        until_healthy(&limiter).await;
        assert_eq!(limiter.check(&org, 100).await.remaining, Some(98));
    });
    let driver = async {
        assert_eq!(from_worker.next().await, Some("stop"));
        redis.stop().await.unwrap();
        to_worker.send(()).await.unwrap();
        assert_eq!(from_worker.next().await, Some("restart"));
        redis.restart().await.unwrap();
        to_worker.send(()).await.unwrap();
    };
    tokio::join!(worker, driver);
}

#[tokio::test]
async fn a_stalled_redis_times_out_trips_the_breaker_and_closes_it_again() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let (to_test, mut from_worker) = mpsc::channel::<()>(1);
    let worker = on_worker(move || async move {
        let mut to_test = to_test;
        let limiter = RateLimiter::new(
            Rc::new(RateLimitConfig {
                timeout: Duration::from_millis(50),
                breaker_failures: 3,
                ..(*config(&url)).clone()
            }),
            Rc::new(FakeClock::new(mid_minute_ms() as i64)),
        );
        until_healthy(&limiter).await;
        let org = Uuid::new_v4();
        assert!(!limiter.check(&org, 1000).await.failed_open);
        to_test.send(()).await.unwrap();
        // Redis is now busy in a script for ~1.5 s: checks time out.
        let open = check_until(&limiter, &org, 1000, |d| d.failed_open).await;
        assert!(open.admitted && open.remaining.is_none());
        let stats = limiter.stats();
        let start = Instant::now();
        while stats
            .breaker_state
            .load(std::sync::atomic::Ordering::Relaxed)
            != 1
        {
            assert!(start.elapsed() < DEADLINE, "breaker never opened");
            limiter.check(&org, 1000).await;
        }
        assert!(!limiter.healthy());
        // Once the script ends, a half-open probe closes the breaker.
        check_until(&limiter, &org, 1000, |d| !d.failed_open).await;
        until_healthy(&limiter).await;
    });
    let stall = async {
        from_worker.next().await.unwrap();
        let busy = "local s = redis.call('TIME') \
                    while true do \
                      local n = redis.call('TIME') \
                      if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 1500000 then break end \
                    end \
                    return 1";
        assert_eq!(redis.command(&["EVAL", busy, "0"]).await.unwrap(), ":1\r\n");
    };
    tokio::join!(worker, stall);
}

#[tokio::test]
async fn the_url_selects_the_database_and_authenticates_with_its_password() {
    let redis = Redis::start().await.unwrap();
    let port = redis.port();
    let org = Uuid::new_v4();
    let now = mid_minute_ms();
    on_worker(move || async move {
        let limiter = limiter_at(
            &format!("redis://127.0.0.1:{port}/3"),
            Rc::new(FakeClock::new(now as i64)),
        );
        until_healthy(&limiter).await;
        assert_eq!(limiter.check(&org, 10).await.remaining, Some(9));
    })
    .await;
    let key = format!("ibex:rl:{{{org}}}:{}", now / 60_000);
    let in_db = |db: &'static str| {
        let script = format!("redis.call('SELECT', '{db}') return redis.call('EXISTS', KEYS[1])");
        let key = key.clone();
        let redis = &redis;
        async move { redis.command(&["EVAL", &script, "1", &key]).await.unwrap() }
    };
    assert_eq!(in_db("3").await, ":1\r\n");
    assert_eq!(in_db("0").await, ":0\r\n");

    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "requirepass", "s3cret"])
            .await
            .unwrap(),
        "+OK\r\n"
    );
    on_worker(move || async move {
        let good = limiter_at(
            &format!("redis://:s3cret@127.0.0.1:{port}/0"),
            Rc::new(FakeClock::new(now as i64)),
        );
        until_healthy(&good).await;
        let d = good.check(&org, 10).await;
        assert!(!d.failed_open && d.remaining == Some(9), "{d:?}");

        let bad = limiter_at(
            &format!("redis://:wrong@127.0.0.1:{port}/0"),
            Rc::new(FakeClock::new(now as i64)),
        );
        let d = check_until(&bad, &org, 10, |d| d.failed_open).await;
        assert!(d.admitted);
        assert!(!bad.healthy());
    })
    .await;
}

// ---- Redis Cluster (SPEC §4): a real six-node cluster, 3 masters + 3 replicas ----

/// `n` new orgs whose keys live on the master at `port` (slot found with `CLUSTER KEYSLOT`).
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: a failed query fails the test"
)]
async fn orgs_on(cluster: &RedisCluster, port: u16, n: usize) -> Vec<Uuid> {
    let masters = cluster.masters().await.unwrap();
    let master = masters.iter().find(|m| m.port == port).unwrap();
    let mut orgs = Vec::new();
    while orgs.len() < n {
        let org = Uuid::new_v4();
        let slot = cluster.keyslot(&format!("{{{org}}}")).await.unwrap();
        if master.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)) {
            orgs.push(org);
        }
    }
    orgs
}

fn key_of(org: &Uuid, now_ms: u64) -> String {
    format!("ibex:rl:{{{org}}}:{}", now_ms / 60_000)
}

#[tokio::test]
async fn cluster_orgs_on_every_master_get_exactly_their_limit_from_one_node_and_a_seed_list() {
    const LIMIT: u32 = 12;
    const PER_WORKER: usize = 10;
    let cluster = RedisCluster::start().await.unwrap();
    let masters = cluster.masters().await.unwrap();
    assert_eq!(masters.len(), 3);
    let mut orgs = Vec::new();
    for m in &masters {
        orgs.extend(orgs_on(&cluster, m.port, 2).await);
    }
    // One worker knows a single node (a replica: it must find the masters itself), the other
    // the whole seed list.
    let nodes = cluster.nodes().await.unwrap();
    let replica = nodes.iter().find(|n| !n.master).unwrap().port;
    let now = mid_minute_ms();
    let start = Arc::new(Barrier::new(2));
    let worker = |url: String, start: Arc<Barrier>, orgs: Vec<Uuid>| {
        on_worker(move || async move {
            let limiter = Rc::new(limiter_at(&url, Rc::new(FakeClock::new(now as i64))));
            until_healthy(&limiter).await;
            assert!(limiter.is_cluster(), "{url} is a cluster node");
            start.wait();
            let tasks: Vec<_> = orgs
                .iter()
                .flat_map(|&org| std::iter::repeat_n(org, PER_WORKER))
                .map(|org| {
                    let limiter = limiter.clone();
                    monoio::spawn(async move { (org, limiter.check(&org, LIMIT).await) })
                })
                .collect();
            futures::future::join_all(tasks).await
        })
    };
    let (a, b) = tokio::join!(
        worker(cluster.node_url(replica), start.clone(), orgs.clone()),
        worker(cluster.seed_url(), start, orgs.clone())
    );
    for org in &orgs {
        let decisions: Vec<_> = a.iter().chain(&b).filter(|(o, _)| o == org).collect();
        assert!(
            decisions.iter().all(|(_, d)| !d.failed_open),
            "{org}: failed open"
        );
        let admitted = decisions.iter().filter(|(_, d)| d.admitted).count();
        assert_eq!(admitted, LIMIT as usize, "org {org}");
        // The count lives on the master that owns the org's slot.
        let slot = cluster.keyslot(&format!("{{{org}}}")).await.unwrap();
        let owner = cluster.master_of(slot).await.unwrap();
        let got = cluster
            .command(owner, &["GET", &key_of(org, now)])
            .await
            .unwrap();
        assert_eq!(got, format!("$2\r\n{}\r\n", 2 * PER_WORKER), "org {org}");
    }
}

#[tokio::test]
async fn cluster_master_killed_fails_open_only_its_slots_until_the_replica_is_promoted() {
    // Bound on "counting again" after the cluster itself has promoted the replica: one map
    // refresh, which a lost master connection asks for within the reconnect backoff (100 ms
    // here), far under the periodic refresh; generous for a loaded 2-core box.
    const RECOVERY_BOUND: Duration = Duration::from_secs(10);
    let mut cluster = RedisCluster::start().await.unwrap();
    let masters = cluster.masters().await.unwrap();
    let victim = masters[0].port;
    let victim_slot = masters[0].slots[0].0;
    let mut others = Vec::new();
    for m in &masters[1..] {
        others.extend(orgs_on(&cluster, m.port, 2).await);
    }
    let probe = orgs_on(&cluster, victim, 2).await;
    let (probe, fresh) = (probe[0], probe[1]);
    let url = cluster.seed_url();
    let now = mid_minute_ms();
    let (to_test, mut from_worker) = mpsc::unbounded::<&'static str>();
    let (mut to_worker, mut from_test) = mpsc::unbounded::<Instant>();
    let worker = on_worker(move || async move {
        // A frozen clock: no leases, every check asks Redis.
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(now as i64)));
        until_healthy(&limiter).await;
        let mut to_test = to_test;
        to_test.send("ready").await.unwrap();
        let mut killed_at: Option<Instant> = None;
        let (mut others_failed, mut probe_failed) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(90);
        let recovered = loop {
            assert!(
                Instant::now() < deadline,
                "the victim's slots never counted again"
            );
            if killed_at.is_none() {
                if let Ok(at) = from_test.try_recv() {
                    killed_at = Some(at);
                }
            }
            for org in &others {
                if limiter.check(org, 1_000_000).await.failed_open {
                    others_failed += 1;
                }
            }
            let d = limiter.check(&probe, 1_000_000).await;
            if killed_at.is_none() && d.failed_open {
                // The kill is announced before it happens: it must be here by now.
                killed_at = from_test.try_recv().ok();
            }
            match killed_at {
                Some(at) if !d.failed_open => break at.elapsed(),
                Some(_) => probe_failed += 1,
                None => assert!(!d.failed_open, "failed open before the kill"),
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        };
        // A fresh org on the promoted master's slots: exactly its limit again, once the
        // cluster has converged (every node `cluster_state:ok` with the new master). Before
        // that, a map refresh may read a node that has not yet learned of the promotion and
        // point the slot back at the dead master: a fail-open SPEC §4 allows (no answering
        // master for that slot, in that node's view).
        let converged = from_test.next().await;
        assert!(converged.is_some(), "the killer reports the promotion");
        let decisions: Vec<_> = {
            let mut out = Vec::new();
            for _ in 0..6 {
                out.push(limiter.check(&fresh, 5).await);
            }
            out
        };
        (recovered, others_failed, probe_failed, decisions)
    });
    let killer = async {
        assert_eq!(from_worker.next().await, Some("ready"));
        // Counting on every master first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Announced first, so a check that fails because of the kill finds it announced.
        let killed = Instant::now();
        to_worker.send(killed).await.unwrap();
        cluster.kill(victim).await.unwrap();
        let promoted = cluster.wait_failover(victim_slot, victim).await.unwrap();
        to_worker.send(Instant::now()).await.unwrap();
        (killed, promoted)
    };
    let ((recovered, others_failed, probe_failed, decisions), (_, promoted)) =
        tokio::join!(worker, killer);
    eprintln!(
        "cluster failover: replica promoted {promoted:?} after SIGKILL; limiter counting the \
         victim's slots again {recovered:?} after the SIGKILL ({probe_failed} probe checks failed open \
         meanwhile); bound: promotion + {RECOVERY_BOUND:?}"
    );
    assert_eq!(others_failed, 0, "checks on the other masters failed open");
    assert!(
        recovered <= promoted + RECOVERY_BOUND,
        "counting again after {recovered:?}, promotion took {promoted:?}"
    );
    for (i, d) in decisions.iter().enumerate() {
        assert!(!d.failed_open, "fresh org check {}: {d:?}", i + 1);
        assert_eq!(d.admitted, i < 5, "fresh org check {}: {d:?}", i + 1);
    }
}

#[tokio::test]
async fn cluster_slot_migrated_mid_run_follows_ask_then_moved_and_never_fails_open() {
    const LIMIT: u32 = 40;
    let cluster = RedisCluster::start().await.unwrap();
    let masters = cluster.masters().await.unwrap();
    let (from, to) = (masters[0].port, masters[1].port);
    let org = orgs_on(&cluster, from, 1).await[0];
    let slot = cluster.keyslot(&format!("{{{org}}}")).await.unwrap();
    // A second org on the same slot, first seen while the slot is migrating (its key is new:
    // the source answers ASK and the target creates it).
    let late = loop {
        let o = Uuid::new_v4();
        if ibex_proxy::ratelimit::cluster_map::key_slot(o.to_string().as_bytes()) == slot {
            assert_eq!(cluster.keyslot(&format!("{{{o}}}")).await.unwrap(), slot);
            break o;
        }
    };
    let url = cluster.seed_url();
    let now = mid_minute_ms();
    let (to_test, mut from_worker) = mpsc::unbounded::<Vec<RateDecision>>();
    let (mut to_worker, mut from_test) = mpsc::unbounded::<u32>();
    let worker = on_worker(move || async move {
        let limiter = limiter_at(&url, Rc::new(FakeClock::new(now as i64)));
        until_healthy(&limiter).await;
        let mut to_test = to_test;
        // Each step: `n` checks of `org` (and one of `late` during the migration).
        while let Some(n) = from_test.next().await {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(limiter.check(&org, LIMIT).await);
            }
            out.push(limiter.check(&late, LIMIT).await);
            to_test.send(out).await.unwrap();
        }
    });
    let driver = async {
        let mut all = Vec::new();
        let mut late_seen = Vec::new();
        let mut step = async |n: u32| {
            to_worker.send(n).await.unwrap();
            let mut out = from_worker.next().await.unwrap();
            late_seen.push(out.pop().unwrap());
            all.extend(out);
        };
        step(10).await; // before: on the source
        cluster.begin_migration(slot, from, to).await.unwrap();
        step(5).await; // MIGRATING: the org's key is still on the source; `late` gets ASK
        let moved = cluster.migrate_keys(slot, from, to).await.unwrap();
        assert!(moved >= 1, "the org's key was migrated");
        step(5).await; // the key is on the target now: ASK for it too
        cluster.finish_migration(slot, from, to).await.unwrap();
        step(25).await; // the source answers MOVED: the map follows
        drop(to_worker);
        (all, late_seen)
    };
    let ((), (decisions, late_seen)) = tokio::join!(worker, driver);
    assert!(
        decisions.iter().chain(&late_seen).all(|d| !d.failed_open),
        "a check failed open"
    );
    let admitted = decisions.iter().filter(|d| d.admitted).count();
    assert_eq!(admitted, LIMIT as usize, "one count through the migration");
    for (i, d) in decisions.iter().take(LIMIT as usize).enumerate() {
        assert_eq!(d.remaining, Some(LIMIT - 1 - i as u32), "check {}", i + 1);
    }
    let asking = cluster
        .command(to, &["INFO", "commandstats"])
        .await
        .unwrap();
    assert!(
        asking.contains("cmdstat_asking:calls="),
        "ASK was never followed"
    );
    let count = cluster
        .command(to, &["GET", &key_of(&org, now)])
        .await
        .unwrap();
    assert_eq!(count, "$2\r\n45\r\n", "the count lives on the target");
    assert_eq!(late_seen.iter().filter(|d| d.admitted).count(), 4);
    assert_eq!(cluster.master_of(slot).await.unwrap(), to);
}

#[tokio::test]
async fn cluster_master_that_stops_answering_trips_only_its_own_breaker() {
    let cluster = RedisCluster::start().await.unwrap();
    let masters = cluster.masters().await.unwrap();
    let victim = masters[0].port;
    let mut others = Vec::new();
    for m in &masters[1..] {
        others.extend(orgs_on(&cluster, m.port, 2).await);
    }
    let probe = orgs_on(&cluster, victim, 1).await[0];
    let url = cluster.seed_url();
    let now = mid_minute_ms();
    let (to_test, mut from_worker) = mpsc::unbounded::<&'static str>();
    let (mut to_worker, mut from_test) = mpsc::unbounded::<&'static str>();
    let worker = on_worker(move || async move {
        let limiter = Rc::new(RateLimiter::new(
            Rc::new(RateLimitConfig {
                // Long enough that a loaded box never times out a live master, short
                // enough that the stopped one trips its breaker well inside the pause.
                breaker_open: Duration::from_millis(200),
                reconnect_min: Duration::from_millis(10),
                reconnect_max: Duration::from_millis(100),
                ..RateLimitConfig::new(url, Duration::from_secs(1))
            }),
            Rc::new(FakeClock::new(now as i64)),
        ));
        until_healthy(&limiter).await;
        let mut to_test = to_test;
        to_test.send("ready").await.unwrap();
        assert_eq!(from_test.next().await, Some("stopped"));
        // A burst on the stopped master: every one times out, which opens its breaker.
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let limiter = limiter.clone();
                monoio::spawn(async move { limiter.check(&probe, 1_000_000).await })
            })
            .collect();
        // Meanwhile, and after, the other masters' orgs are counted.
        let mut others_failed = 0;
        let mut rounds = 0;
        let resumed = loop {
            for org in &others {
                if limiter.check(org, 1_000_000).await.failed_open {
                    others_failed += 1;
                }
            }
            rounds += 1;
            if rounds == 150 {
                to_test.send("resume").await.unwrap();
            }
            if rounds > 150 {
                let d = limiter.check(&probe, 1_000_000).await;
                if !d.failed_open {
                    break rounds;
                }
                assert!(rounds < 5_000, "the victim never counted again");
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        };
        let burst = futures::future::join_all(burst).await;
        assert!(
            burst.iter().all(|d| d.failed_open),
            "a stopped master answered"
        );
        (others_failed, resumed)
    });
    let driver = async {
        assert_eq!(from_worker.next().await, Some("ready"));
        cluster.pause(victim, true).unwrap();
        to_worker.send("stopped").await.unwrap();
        assert_eq!(from_worker.next().await, Some("resume"));
        cluster.pause(victim, false).unwrap();
    };
    let ((others_failed, resumed), ()) = tokio::join!(worker, driver);
    eprintln!("stopped master: counting its slots again {resumed} rounds in (resumed at 150)");
    assert_eq!(others_failed, 0, "the other masters' orgs failed open");
}
