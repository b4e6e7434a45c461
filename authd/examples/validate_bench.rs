//! ValidateToken over loopback gRPC: warm (cached digest) and cold (Argon2id) latency, and warm
//! throughput, over plaintext and over TLS (both with the service-key check, which every call now
//! makes; its own cost is timed separately), plus the creation-flood figure (a cold validation
//! while 150 CreateToken calls are in flight). Starts a throwaway Postgres (`ibex_e2e::Postgres`),
//! migrates it and runs authd instances in-process on 127.0.0.1:0 (A plaintext and A' TLS create
//! or have seen the tokens and so have them cached; B has never seen them, so its first validation
//! of each is cold). The client shares the machine's cores with authd and Postgres, so figures are
//! end-to-end, not server-only.
//!
//! Run (release; results go to perf/results/authd.md by hand):
//!   cargo run --release -p ibex-authd --example validate_bench
//! Options via env: BENCH_WARM_SECS (default 5), BENCH_COLD (default 200), BENCH_CONC (default 32).
//!
//! 2026-11-23, 2 vCPU shared with other builds (load ≈ 7), release: warm 1 caller p50 45 µs /
//! p99 0.58 ms; warm 32 callers 13.4k/s, 23.5 µs CPU per validation (client + server); cold valid
//! p50 40 ms / p99 125 ms; cold unknown id p50 24 ms / p99 48 ms. Details: perf/results/authd.md.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ibex_authd::authz::{KeyDigest, ADMIN_KEY_HEADER, SERVICE_KEY_HEADER};
use ibex_authd::server::{self, Settings};
use ibex_e2e::Postgres;
use ibex_proto::pb::{self, auth_service_client::AuthServiceClient};
use secrecy::SecretString;
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-admin-key-0123456789abcdef0123";
const SERVICE_KEY: &str = "bench-service-key-0123456789abcdef0";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's user+system CPU time (from /proc/self/stat, in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<u64> = after_comm
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm field.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(label: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{label}: n={} p50={:?} p99={:?} max={:?}",
        times.len(),
        pct(&times, 0.50),
        pct(&times, 0.99),
        times[times.len() - 1]
    );
}

async fn start(pg: &Postgres, tls: Option<ibex_authd::server::TlsFiles>) -> server::Running {
    let mut settings = Settings::local(
        ibex_authd::store::Database::from_url(&pg.app_url()).unwrap(),
        KeyDigest::new("IBEX_SERVICE_KEY", &SecretString::from(SERVICE_KEY)).unwrap(),
    );
    settings.admin = Some(KeyDigest::new("IBEX_ADMIN_KEY", &SecretString::from(KEY)).unwrap());
    settings.tls = tls;
    server::start(settings).await.expect("authd")
}

async fn connect(addr: std::net::SocketAddr) -> AuthServiceClient<Channel> {
    AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

async fn connect_tls(
    addr: std::net::SocketAddr,
    ca: &ibex_e2e::certs::TestCa,
) -> AuthServiceClient<Channel> {
    let pem = std::fs::read(ca.ca_file()).unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .unwrap()
            .connect()
            .await
            .expect("connect tls");
    AuthServiceClient::new(channel)
}

/// Warm latency (one caller) and throughput (`conc` callers over `clients`) of one token.
async fn warm(
    label: &str,
    clients: Vec<AuthServiceClient<Channel>>,
    hot: &str,
    conc: usize,
    secs: u64,
) {
    let mut one = clients[0].clone();
    for _ in 0..1000 {
        validate(&mut one, hot).await;
    }
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        assert_eq!(validate(&mut one, hot).await, 1);
        times.push(t.elapsed());
    }
    summary(&format!("{label}: warm sequential (1 caller)"), times);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let cpu_before = cpu_time();
    let tasks: Vec<_> = (0..conc)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let hot = hot.to_owned();
            tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    assert_eq!(validate(&mut client, &hot).await, 1);
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before);
    println!(
        "{label}: warm throughput ({conc} callers, {} connections): {:.0} validations/s, \
         {:.1} µs CPU per validation (client + server, this process)",
        clients.len(),
        all.len() as f64 / secs,
        cpu.as_secs_f64() * 1e6 / all.len() as f64
    );
    summary(&format!("{label}: warm under load ({conc} callers)"), all);
}

fn admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(ADMIN_KEY_HEADER, KEY.parse().unwrap());
    request
}

async fn validate(client: &mut AuthServiceClient<Channel>, token: &str) -> i32 {
    let mut request = tonic::Request::new(pb::ValidateTokenRequest {
        token: token.to_owned(),
        client_addr: "127.0.0.1".to_owned(),
    });
    request
        .metadata_mut()
        .insert(SERVICE_KEY_HEADER, SERVICE_KEY.parse().unwrap());
    client
        .validate_token(request)
        .await
        .expect("validate")
        .into_inner()
        .status
}

#[tokio::main]
async fn main() {
    let warm_secs = env_or("BENCH_WARM_SECS", 5);
    let cold_n = env_or("BENCH_COLD", 200) as usize;
    let conc = env_or("BENCH_CONC", 32) as usize;

    let pg = Postgres::start().await.expect("postgres");
    let mut owner = pg.admin_client().await.expect("owner");
    ibex_authd::ctl::migrate::apply(&mut owner, None)
        .await
        .expect("migrate");
    let a = start(&pg, None).await;
    let ca = ibex_e2e::certs::TestCa::new("bench CA").unwrap();
    let leaf = ca.issue("authd", &["localhost"]).unwrap();
    let a_tls = start(
        &pg,
        Some(ibex_authd::server::TlsFiles {
            cert: leaf.cert_file.clone(),
            key: leaf.key_file.clone(),
        }),
    )
    .await;
    let b = start(&pg, None).await;
    let mut client_a = connect(a.grpc_addr).await;
    let mut client_b = connect(b.grpc_addr).await;
    while !b.validator.feed.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let org = client_a
        .create_org(admin(pb::CreateOrgRequest {
            name: "bench".into(),
            rpm_limit: 0,
        }))
        .await
        .expect("org")
        .into_inner()
        .org_id;
    let mut tokens = Vec::with_capacity(cold_n);
    for _ in 0..cold_n.max(1) {
        let t = client_a
            .create_token(admin(pb::CreateTokenRequest {
                org_id: org.clone(),
                permissions: 3,
                ..Default::default()
            }))
            .await
            .expect("token")
            .into_inner()
            .token;
        tokens.push(t);
    }
    let hot = tokens[0].clone();

    // The service-key check alone: what each internal call pays for it.
    let key = KeyDigest::new("IBEX_SERVICE_KEY", &SecretString::from(SERVICE_KEY)).unwrap();
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut ok = 0u32;
    for _ in 0..n {
        ok += u32::from(key.matches(std::hint::black_box(SERVICE_KEY.as_bytes())));
    }
    assert_eq!(ok, n);
    println!(
        "service-key check (SHA-256 + constant-time compare): {:?} each",
        t.elapsed() / n
    );

    let mut plain = Vec::new();
    for _ in 0..4 {
        plain.push(connect(a.grpc_addr).await);
    }
    warm("plaintext + key check", plain, &hot, conc, warm_secs).await;
    let mut tls = Vec::new();
    for _ in 0..4 {
        tls.push(connect_tls(a_tls.grpc_addr, &ca).await);
    }
    warm("TLS + key check", tls, &hot, conc, warm_secs).await;

    // Cold: authd B has never verified these tokens; sequential, one Argon2id each.
    let mut cold = Vec::with_capacity(cold_n);
    for token in &tokens {
        let t = Instant::now();
        assert_eq!(validate(&mut client_b, token).await, 1);
        cold.push(t.elapsed());
    }
    summary("cold valid token (Argon2id verify + 2 queries)", cold);
    let mut unknown = Vec::with_capacity(cold_n);
    for _ in 0..cold_n {
        let token = format!("ibex_pat_{}_{}", uuid::Uuid::new_v4(), "x".repeat(48));
        let t = Instant::now();
        assert_eq!(validate(&mut client_b, &token).await, 2);
        unknown.push(t.elapsed());
    }
    summary("cold unknown id (dummy Argon2id verify)", unknown);

    flood(&a, &org).await;

    b.stop().await.expect("stop b");
    a_tls.stop().await.expect("stop a tls");
    a.stop().await.expect("stop a");
}

/// A cold validation while 150 CreateToken calls are in flight, five times.
async fn flood(authd: &server::Running, org: &str) {
    let mut client = connect(authd.grpc_addr).await;
    for round in 0..5 {
        let token = client
            .create_token(admin(pb::CreateTokenRequest {
                org_id: org.to_owned(),
                permissions: 1,
                ..Default::default()
            }))
            .await
            .expect("token")
            .into_inner()
            .token;
        authd.validator.cache.clear();
        let creators: Vec<_> = (0..150)
            .map(|_| {
                let mut client = client.clone();
                let org = org.to_owned();
                tokio::spawn(async move {
                    client
                        .create_token(admin(pb::CreateTokenRequest {
                            org_id: org,
                            permissions: 1,
                            ..Default::default()
                        }))
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        assert_eq!(validate(&mut client, &token).await, 1);
        let took = t.elapsed();
        let mut created = 0;
        for c in creators {
            created += usize::from(c.await.unwrap());
        }
        println!(
            "creation flood round {round}: cold validation answered in {took:?} \
             beside 150 concurrent CreateToken ({created} created, {} refused at once)",
            150 - created
        );
    }
}
