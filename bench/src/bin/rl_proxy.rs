//! The whole proxy's auth probe with its rate limiter on a single Redis vs a 3-master Redis
//! Cluster (3 replicas), same run (issue 12's "Measure"): proxy CPU µs per request (the proxy
//! process, one worker, from `/proc/<pid>/stat`), Redis calls per request (`EVALSHA` + `EVAL`
//! over every node's `INFO commandstats`; the proxy's `/metrics` counts checks, not calls) and
//! Redis CPU µs per request (every redis-server, replicas included), with the load on 1 org and
//! spread over ORGS orgs (one token each, `loadgen --auth-file`).
//!
//! ```text
//! cargo build --release -p ibex-proxy -p ibex-authd -p ibex-bench
//! flock /tmp/ibex-perf.lock perf/rl-proxy.sh        # RATE=5000 SECS=8 ROUNDS=3 ORGS=1000
//! ```
//!
//! Starts its own Postgres, authd, single Redis and cluster (the e2e harness), one proxy per
//! backend (`IBEX_PROXY_THREADS=1`), makes the orgs through `ibexctl`, warms both proxies'
//! caches with every token, then alternates rows: backend × org set × round, `loadgen` pinned
//! to LOAD_CPU. Run the whole thing under `taskset -c SERVER_CPU` so the proxies and Redis
//! share the other core.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ibex_bench::{clk_tck, env_or, redis_totals, ticks};
use ibex_e2e::http::{Conn, Request};
use ibex_e2e::procs::{bin_path, ibexctl, json_str};
use ibex_e2e::{Proxy, RedisCluster, Stack};

const PROBE: &str = "/v1/internal/auth-probe";

struct Backend {
    name: &'static str,
    proxy: Proxy,
    ports: Vec<u16>,
}

/// Sends the probe with every credential until each answers 200 (cold validations included).
async fn warm(proxy: &Proxy, creds: &[(String, String)]) -> Result<()> {
    let mut conn = Conn::connect(proxy.addr).await?;
    for (token, agent) in creds {
        let req = Request::get(PROBE).auth(token, agent);
        let mut tries = 0;
        loop {
            tries += 1;
            match conn.send(&req, false).await {
                Ok(r) if r.status == 200 => break,
                Ok(_) => {}
                Err(_) => conn = Conn::connect(proxy.addr).await?,
            }
            ensure!(tries < 50, "a token never validated on {}", proxy.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rate = env_or("RATE", 5000);
    let secs = env_or("SECS", 8);
    let rounds = env_or("ROUNDS", 3);
    let orgs = env_or("ORGS", 1000) as usize;
    let conns = env_or("CONNS", 32);
    let load_cpu = std::env::var("LOAD_CPU").unwrap_or_else(|_| "1".into());
    let tck = clk_tck();

    let env = [("IBEX_PROXY_THREADS", "1"), ("IBEX_LOG", "warn")];
    let stack = Stack::start_with(&[], &env).await?;
    let cluster = RedisCluster::start().await.context("cluster")?;
    let on_cluster = Proxy::start(stack.authd.grpc_addr, &cluster.seed_url(), &env).await?;

    // One busy org, and `orgs` orgs of one token each.
    let mut creds = Vec::with_capacity(orgs + 1);
    let mut made = 0;
    while made < orgs + 1 {
        let batch = (orgs + 1 - made).min(8);
        let ts = futures_join(&stack, batch).await?;
        creds.extend(ts);
        made += batch;
    }
    let dir = tempfile_dir()?;
    let write = |name: &str, lines: &[(String, String)]| -> Result<String> {
        let path = format!("{dir}/{name}");
        let mut f = std::fs::File::create(&path)?;
        for (t, a) in lines {
            writeln!(f, "{t} {a}")?;
        }
        Ok(path)
    };
    let one = write("one.txt", &creds[..1])?;
    let many = write("many.txt", &creds[1..])?;

    let ports = vec![stack.redis.port()];
    let backends = [
        Backend {
            name: "single Redis",
            proxy: stack.proxy,
            ports,
        },
        Backend {
            name: "3-master cluster",
            proxy: on_cluster,
            ports: cluster.ports(),
        },
    ];
    for b in &backends {
        warm(&b.proxy, &creds).await?;
    }
    let loadgen = bin_path("loadgen")?;
    println!(
        "rate {rate}/s over {conns} connections, {secs} s per row, {rounds} rounds, one proxy \
         worker each; CPU ticks 1/{tck} s"
    );
    println!(
        "| round | backend | orgs | requests | errors | non-200 | proxy CPU µs/req | Redis calls/req | Redis CPU µs/req (all nodes) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for (n, file) in [(1usize, &one), (orgs, &many)] {
            for b in &backends {
                let pid = b.proxy.pid().context("proxy not running")?;
                let stat = format!("/proc/{pid}/stat");
                let (calls0, rcpu0) = redis_totals(&b.ports).await;
                let cpu0 = ticks(&stat);
                let mut cmd = std::process::Command::new("taskset");
                cmd.args(["-c", &load_cpu])
                    .arg(&loadgen)
                    .args(["--addr", &b.proxy.addr.to_string(), "--path", PROBE])
                    .args([
                        "--rate",
                        &rate.to_string(),
                        "--connections",
                        &conns.to_string(),
                    ])
                    .args([
                        "--duration",
                        &secs.to_string(),
                        "--auth-file",
                        file.as_str(),
                    ]);
                let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
                let cpu1 = ticks(&stat);
                let (calls1, rcpu1) = redis_totals(&b.ports).await;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
                let reqs = v["requests"].as_u64().unwrap_or(0);
                let ok = v["statuses"]["200"].as_u64().unwrap_or(0);
                let d = reqs.max(1) as f64;
                println!(
                    "| {round} | {} | {n} | {reqs} | {} | {} | {:.2} | {:.4} | {:.2} |",
                    b.name,
                    v["errors"],
                    reqs - ok,
                    (cpu1 - cpu0) as f64 / tck * 1e6 / d,
                    (calls1 - calls0) as f64 / d,
                    (rcpu1 - rcpu0) as f64 / tck * 1e6 / d,
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `batch` fresh orgs at once (concurrent `ibexctl` runs), each with an agent and one `read`
/// token: (token, agent).
async fn futures_join(stack: &Stack, batch: usize) -> Result<Vec<(String, String)>> {
    let env = Arc::new(stack.authd.ibexctl_env());
    let mut tasks = Vec::new();
    for _ in 0..batch {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("rlp-{}", uuid::Uuid::new_v4().simple());
            let org = ibexctl(
                &env,
                &["org", "create", "--name", &name, "--rpm", "2000000000"],
            )
            .await?
            .json()?;
            let org = json_str(&org, "id")?;
            let agent = ibexctl(&env, &["agent", "create", "--org", &org, "--name", "rlp"])
                .await?
                .json()?;
            let agent = json_str(&agent, "id")?;
            let args = [
                "token",
                "create",
                "--org",
                &org,
                "--name",
                "rlp",
                "--permissions",
                "read",
            ];
            let token = json_str(&ibexctl(&env, &args).await?.json()?, "token")?;
            anyhow::Ok((token, agent))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

fn tempfile_dir() -> Result<String> {
    let dir = std::env::temp_dir().join(format!("ibex-rl-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.to_string_lossy().into_owned())
}
