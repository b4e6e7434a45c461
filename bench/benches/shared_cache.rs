//! Per-core token caches vs one shared cache per proxy, on the hot path: a
//! lookup of a hot token that is cached, measured on the bench thread while
//! another thread hits the SAME token as fast as it can (the case a shared
//! cache is worst at: both cores on one shard). Decides issue 10 item 4:
//! keep per-core caches and share only the failure budget and the verified
//! set (touched off the hot path), or move to one shared map.
//!
//! Run (release profile):
//!
//! ```text
//! cargo bench -p ibex-bench --bench shared_cache
//! ```
//!
//! Cases (`<store>/<alone|both_cores>`):
//! - `per_core`: the proxy's own `TokenCache`, one per thread (today).
//! - `dashmap`: one `DashMap` shared by both threads (a shard read lock per
//!   lookup: an atomic read-modify-write on the shard's lock word).
//! - `papaya`: one `papaya::HashMap` (lock-free reads, an epoch guard per
//!   lookup).
//!
//! Results (2 vCPU VM, rustc 1.95, release, criterion median; details in
//! `perf/results/failure-budget.md`):
//!
//! | date                 | per_core alone | per_core both | dashmap alone | dashmap both | papaya alone | papaya both |
//! |----------------------|----------------|---------------|---------------|--------------|--------------|-------------|
//! | 2026-12-01 (load ~8) | 67.5 ns        | 200 ns        | 108.7 ns      | 327 ns       | 95.1 ns      | 236 ns      |

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;
use ibex_proxy::auth::cache::{CacheLimits, TokenCache, TokenLookup};
use ibex_proxy::auth::secret::TokenDigest;
use ibex_proxy::auth::ValidToken;
use uuid::Uuid;

fn token() -> ValidToken {
    ValidToken {
        org: Uuid::from_u128(1),
        token_id: Uuid::from_u128(4),
        permissions: 1,
        expires_at_ms: None,
        agent: None,
        rpm: 1_000_000,
        models: None,
        limits: Default::default(),
    }
}

const HOT: TokenDigest = TokenDigest([42; 32]);

/// A warmed per-core cache holding the hot token and 10k others.
fn per_core_cache(now: Instant) -> TokenCache {
    let mut cache = TokenCache::new(CacheLimits::TOKENS);
    for i in 0..10_000u32 {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        cache.insert_valid(TokenDigest(d), token(), now);
    }
    cache.insert_valid(HOT, token(), now);
    cache
}

fn hit_per_core(cache: &mut TokenCache, now: Instant) -> bool {
    matches!(cache.lookup(black_box(&HOT), now), TokenLookup::Positive(_))
}

/// What a shared map would hold: the same fields as the per-core entry.
#[derive(Clone)]
struct CachedToken {
    token: ValidToken,
    validated_at: Instant,
    ttl_end: Instant,
}

fn entry(now: Instant) -> CachedToken {
    CachedToken {
        token: token(),
        validated_at: now,
        ttl_end: now + Duration::from_secs(3600),
    }
}

/// Runs `work` on a second thread until the returned guard drops.
struct Busy(Arc<AtomicBool>, Option<thread::JoinHandle<()>>);

impl Busy {
    fn start(mut work: impl FnMut() + Send + 'static) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    work();
                }
            }
        });
        Busy(stop, Some(handle))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let mut g = c.benchmark_group("shared_cache");

    let mut mine = per_core_cache(now);
    g.bench_function("per_core/alone", |b| {
        b.iter(|| hit_per_core(&mut mine, now))
    });
    {
        let _other = Busy::start({
            let mut theirs = per_core_cache(now);
            move || {
                black_box(hit_per_core(&mut theirs, now));
            }
        });
        g.bench_function("per_core/both_cores", |b| {
            b.iter(|| hit_per_core(&mut mine, now))
        });
    }

    let dash: Arc<DashMap<TokenDigest, CachedToken>> = Arc::new(DashMap::new());
    for i in 0..10_000u32 {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        dash.insert(TokenDigest(d), entry(now));
    }
    dash.insert(HOT, entry(now));
    let dash_hit = move |m: &DashMap<TokenDigest, CachedToken>| {
        m.get(black_box(&HOT))
            .is_some_and(|e| now < e.ttl_end && e.validated_at <= now && e.token.permissions != 0)
    };
    g.bench_function("dashmap/alone", |b| b.iter(|| dash_hit(&dash)));
    {
        let shared = dash.clone();
        let _other = Busy::start(move || {
            black_box(dash_hit(&shared));
        });
        g.bench_function("dashmap/both_cores", |b| b.iter(|| dash_hit(&dash)));
    }

    let pap: Arc<papaya::HashMap<TokenDigest, CachedToken>> = Arc::new(papaya::HashMap::new());
    {
        let m = pap.pin();
        for i in 0..10_000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            m.insert(TokenDigest(d), entry(now));
        }
        m.insert(HOT, entry(now));
    }
    let pap_hit = move |m: &papaya::HashMap<TokenDigest, CachedToken>| {
        m.pin()
            .get(black_box(&HOT))
            .is_some_and(|e| now < e.ttl_end && e.validated_at <= now && e.token.permissions != 0)
    };
    g.bench_function("papaya/alone", |b| b.iter(|| pap_hit(&pap)));
    {
        let shared = pap.clone();
        let _other = Busy::start(move || {
            black_box(pap_hit(&shared));
        });
        g.bench_function("papaya/both_cores", |b| b.iter(|| pap_hit(&pap)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
