//! Rate limits on a real Redis Cluster (SPEC §4, issue 12): six `redis-server
//! --cluster-enabled yes` (3 masters, 3 replicas), Postgres, one authd and two real proxies,
//! one given a single cluster node in `IBEX_REDIS_URL`, the other the whole seed list.
//!
//! A response that was counted carries `X-RateLimit-Remaining`; one that failed open does not
//! (SPEC §4), which is how these tests tell the two apart from outside.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::{Request, Response};
use ibex_e2e::{procs, Authd, Postgres, Proxy, RedisCluster};
use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

const PROBE: &str = "/v1/internal/auth-probe";
const READ: u64 = 1;

/// Writes straight to stderr: the harness captures the output of passing tests, and the
/// measured failover window must show in every run.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Drop order = field order: proxies, authd, the cluster, Postgres.
struct Env {
    proxies: Vec<Proxy>,
    _authd: Authd,
    cluster: RedisCluster,
    _pg: Postgres,
    admin_key: String,
    grpc: AuthServiceClient<Channel>,
}

/// An org with an agent and a READ token, and the master its keys live on.
struct Tenant {
    org: String,
    agent: String,
    pat: String,
    master: u16,
}

impl Tenant {
    fn probe(&self) -> Request {
        Request::get(PROBE).auth(&self.pat, &self.agent)
    }
}

impl Env {
    async fn start() -> Result<Env> {
        let (pg, cluster) = tokio::join!(Postgres::start(), RedisCluster::start());
        let (pg, cluster) = (pg?, cluster?);
        procs::migrate(&pg).await?;
        let authd = Authd::start(&pg, &[]).await?;
        let replica = cluster
            .nodes()
            .await?
            .iter()
            .find(|n| !n.master)
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("the cluster has no replica"))?;
        let (one, seeds) = (cluster.node_url(replica), cluster.seed_url());
        // A loaded 2-core box misses the 25 ms production Redis timeout now and then; these
        // tests must see every check counted unless a master is really gone.
        let env = [("IBEX_REDIS_TIMEOUT", "2s")];
        let (p0, p1) = tokio::join!(
            Proxy::start(authd.grpc_addr, &one, &env),
            Proxy::start(authd.grpc_addr, &seeds, &env),
        );
        let grpc = AuthServiceClient::new(Channel::from_shared(authd.grpc_url())?.connect_lazy());
        let env = Env {
            proxies: vec![p0?, p1?],
            admin_key: authd.admin_key.clone(),
            _authd: authd,
            cluster,
            _pg: pg,
            grpc,
        };
        for p in 0..env.proxies.len() {
            env.wait_ready(p).await?;
        }
        Ok(env)
    }

    async fn wait_ready(&self, p: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = Request::get("/ready").send(self.proxies[p].addr).await?;
            if r.status == 200 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "proxy {p} never ready:\n{}\n{}",
                r.dump(),
                self.proxies[p].log_contents()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn admin<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("x-ibex-admin-key", self.admin_key.parse()?);
        req.set_timeout(Duration::from_secs(20));
        Ok(req)
    }

    /// A new tenant with `rpm` whose org's slot is served by the master at `master`.
    async fn tenant_on(&self, master: u16, rpm: u32) -> Result<Tenant> {
        let mut grpc = self.grpc.clone();
        for _ in 0..100 {
            let org = grpc
                .create_org(self.admin(pb::CreateOrgRequest {
                    name: format!("cluster-{}", uuid::Uuid::new_v4().simple()),
                    rpm_limit: rpm,
                })?)
                .await?
                .into_inner()
                .org_id;
            let slot = self.cluster.keyslot(&format!("{{{org}}}")).await?;
            if self.cluster.master_of(slot).await? != master {
                continue;
            }
            let agent = grpc
                .create_agent(self.admin(pb::CreateAgentRequest {
                    org_id: org.clone(),
                    name: "agent".into(),
                })?)
                .await?
                .into_inner()
                .agent_id;
            let pat = grpc
                .create_token(self.admin(pb::CreateTokenRequest {
                    org_id: org.clone(),
                    name: "tok".into(),
                    agent_id: String::new(),
                    user_id: String::new(),
                    permissions: READ,
                    expires_in_ms: 0,
                    ..Default::default()
                })?)
                .await?
                .into_inner()
                .token;
            return Ok(Tenant {
                org,
                agent,
                pat,
                master,
            });
        }
        bail!("no org landed on the master at port {master} in 100 tries")
    }

    async fn send(&self, p: usize, req: &Request) -> Result<Response> {
        req.send(self.proxies[p].addr).await
    }
}

fn header_u64(r: &Response, name: &str) -> Option<u64> {
    r.header(name)?.trim().parse().ok()
}

/// What one request told: its status, `Remaining` (absent when it failed open) and the
/// window's reset.
fn outcome(r: &Response) -> Result<(u16, Option<u64>, u64)> {
    let reset = header_u64(r, "X-RateLimit-Reset")
        .ok_or_else(|| anyhow!("no X-RateLimit-Reset:\n{}", r.dump()))?;
    Ok((r.status, header_u64(r, "X-RateLimit-Remaining"), reset))
}

enum Run {
    Done,
    /// A minute boundary fell inside the count: try again with a new org.
    Disturbed,
}

/// `limit` requests alternating between the proxies, each counted with `Remaining` exactly
/// one less, then one refusal on each proxy.
async fn exact_limit(env: &Env, t: &Tenant, limit: u64) -> Result<Run> {
    let mut window = None;
    for i in 1..=limit {
        let p = usize::try_from(i % 2)?;
        let r = env.send(p, &t.probe()).await?;
        let (status, remaining, reset) = outcome(&r)?;
        if *window.get_or_insert(reset) != reset {
            return Ok(Run::Disturbed);
        }
        ensure!(status == 200, "org {} request {i}: {}", t.org, r.dump());
        ensure!(
            remaining == Some(limit - i),
            "org {} (master {}) request {i} on proxy {p}: Remaining {remaining:?}, want {} \
             (None = failed open)",
            t.org,
            t.master,
            limit - i
        );
    }
    for p in 0..2 {
        let r = env.send(p, &t.probe()).await?;
        let (status, remaining, reset) = outcome(&r)?;
        if Some(reset) != window {
            return Ok(Run::Disturbed);
        }
        ensure!(
            status == 429 && remaining == Some(0),
            "org {} over its limit on proxy {p}: {}",
            t.org,
            r.dump()
        );
    }
    Ok(Run::Done)
}

async fn exact_limit_on(env: &Env, master: u16, limit: u32) -> Result<()> {
    for _ in 0..3 {
        let t = env.tenant_on(master, limit).await?;
        if let Run::Done = exact_limit(env, &t, u64::from(limit)).await? {
            return Ok(());
        }
    }
    bail!("three minute boundaries in a row spoiled the count")
}

#[tokio::test]
async fn two_proxies_a_node_and_a_seed_list_hold_every_orgs_limit_on_every_master() -> Result<()> {
    let env = Env::start().await?;
    let masters = env.cluster.masters().await?;
    ensure!(masters.len() == 3, "{masters:?}");
    for m in &masters {
        exact_limit_on(&env, m.port, 8)
            .await
            .with_context(|| format!("orgs on the master at port {}", m.port))?;
    }
    say!("   cluster: orgs on all 3 masters got exactly 8 of 8 across a one-node proxy and a seed-list proxy");
    Ok(())
}

#[tokio::test]
async fn a_killed_master_fails_open_only_its_orgs_until_its_replica_is_promoted() -> Result<()> {
    const BOUND: Duration = Duration::from_secs(10);
    let mut env = Env::start().await?;
    let masters = env.cluster.masters().await?;
    let (victim, victim_slot) = (masters[0].port, masters[0].slots[0].0);
    // Big budgets: counted requests must never run into a 429 here.
    let mut others = Vec::new();
    for m in &masters[1..] {
        others.push(env.tenant_on(m.port, 1_000_000).await?);
    }
    let probe = env.tenant_on(victim, 1_000_000).await?;
    // Every tenant counted on both proxies first (this also warms authd's and the proxies'
    // caches).
    for t in others.iter().chain([&probe]) {
        for p in 0..2 {
            let r = env.send(p, &t.probe()).await?;
            ensure!(
                outcome(&r)?.1.is_some(),
                "not counted before the kill: {}",
                r.dump()
            );
        }
    }
    let killed = Instant::now();
    env.cluster.kill(victim).await?;
    let mut promoted = None;
    let mut recovered = [None, None];
    let mut probe_failed_open = 0;
    while recovered.iter().any(Option::is_none) {
        ensure!(
            killed.elapsed() < Duration::from_secs(90),
            "the victim's org never counted again"
        );
        for (p, recovered) in recovered.iter_mut().enumerate() {
            for t in &others {
                let r = env.send(p, &t.probe()).await?;
                ensure!(
                    r.status == 200 && outcome(&r)?.1.is_some(),
                    "an org on a live master (port {}) failed open on proxy {p}: {}",
                    t.master,
                    r.dump()
                );
            }
            let r = env.send(p, &probe.probe()).await?;
            ensure!(r.status == 200, "{}", r.dump());
            // One master's failover does not make a proxy unready.
            let ready = Request::get("/ready").send(env.proxies[p].addr).await?;
            ensure!(
                ready.status == 200,
                "proxy {p} /ready during the failover:\n{}",
                ready.dump()
            );
            match outcome(&r)?.1 {
                None => probe_failed_open += 1,
                Some(_) if recovered.is_none() => *recovered = Some(killed.elapsed()),
                Some(_) => {}
            }
        }
        if promoted.is_none() {
            if let Ok(port) = env.cluster.master_of(victim_slot).await {
                if port != victim {
                    promoted = Some(killed.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let promoted = match promoted {
        Some(at) => at,
        None => env.cluster.wait_failover(victim_slot, victim).await?,
    };
    let latest = recovered
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default();
    say!(
        "   cluster failover: replica promoted {promoted:?} after SIGKILL; proxies counting its \
         org again after {:?} / {:?} ({probe_failed_open} of its requests failed open); other \
         masters' orgs counted and /ready 200 throughout; bound: promotion + {BOUND:?}",
        recovered[0].unwrap_or_default(),
        recovered[1].unwrap_or_default()
    );
    ensure!(
        latest <= promoted + BOUND,
        "counting again after {latest:?}, promotion after {promoted:?}"
    );
    // The promoted master's slots hold a limit exactly again, across both proxies.
    let new_master = env.cluster.master_of(victim_slot).await?;
    exact_limit_on(&env, new_master, 6).await?;
    for p in 0..2 {
        env.wait_ready(p).await?;
    }
    Ok(())
}

/// One org counted through a migration of its slot: `limit` requests alternating between the
/// proxies with the slot moved from `from` to `to` in three steps along the way; every
/// response must be counted with `Remaining` exactly one less (nothing fails open).
async fn count_through_migration(env: &Env, from: u16, to: u16, limit: u64) -> Result<Run> {
    let t = env.tenant_on(from, u32::try_from(limit)?).await?;
    let slot = env.cluster.keyslot(&format!("{{{}}}", t.org)).await?;
    let mut window = None;
    for i in 1..=limit + 2 {
        match i {
            6 => env.cluster.begin_migration(slot, from, to).await?,
            10 => {
                let moved = env.cluster.migrate_keys(slot, from, to).await?;
                ensure!(moved >= 1, "the org's key was not on the source");
            }
            14 => env.cluster.finish_migration(slot, from, to).await?,
            _ => {}
        }
        let p = usize::try_from(i % 2)?;
        let r = env.send(p, &t.probe()).await?;
        let (status, remaining, reset) = outcome(&r)?;
        if *window.get_or_insert(reset) != reset {
            return Ok(Run::Disturbed);
        }
        let (want_status, want) = if i <= limit {
            (200, limit - i)
        } else {
            (429, 0)
        };
        ensure!(
            status == want_status && remaining == Some(want),
            "request {i} on proxy {p} (slot {slot} moving {from} -> {to}): status {status}, \
             Remaining {remaining:?} (None = failed open), want {want_status} / {want}"
        );
    }
    ensure!(
        env.cluster.master_of(slot).await? == to,
        "slot {slot} did not end on the target"
    );
    Ok(Run::Done)
}

#[tokio::test]
async fn a_slot_migrated_mid_run_is_followed_through_ask_and_moved_without_failing_open(
) -> Result<()> {
    let env = Env::start().await?;
    let masters = env.cluster.masters().await?;
    let (from, to) = (masters[0].port, masters[1].port);
    let asking = async || -> Result<u64> {
        let info = env.cluster.command(to, &["INFO", "commandstats"]).await?;
        Ok(info
            .split("cmdstat_asking:calls=")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    };
    let before = asking().await?;
    for _ in 0..3 {
        if let Run::Done = count_through_migration(&env, from, to, 24).await? {
            let asked = asking().await? - before;
            ensure!(
                asked >= 1,
                "no ASKING reached the target: ASK was not followed"
            );
            say!("   cluster: a slot migrated mid-run (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE): 24 of 24 counted exactly over both proxies, {asked} ASKING on the target, nothing failed open");
            return Ok(());
        }
    }
    bail!("three minute boundaries in a row spoiled the count")
}
