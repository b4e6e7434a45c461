//! The proxy's side of the control plane (issue 11, SPEC §6), through real
//! processes: it refuses to start without a service key, talks to authd over
//! TLS trusting `IBEX_AUTHD_CA_FILE` (and not without it), a token's holder
//! at one address is served while another address guesses at the same id
//! (after an authd restart: nothing cached), and an agent moved to another
//! org is refused in its old one.
//!
//! Needs the binaries: `cargo build --workspace --bins` first (as `make test` does).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ibex_e2e::certs::TestCa;
use ibex_e2e::http::Request;
use ibex_e2e::procs::{bin_path, migrate};
use ibex_e2e::{Authd, Postgres, Proxy, Redis};

const DEADLINE: Duration = Duration::from_secs(15);

async fn org_agent_token(authd: &Authd, name: &str) -> anyhow::Result<(String, String, String)> {
    let org = authd
        .ibexctl_json(&["org", "create", "--name", name])
        .await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let agent = authd
        .ibexctl_json(&["agent", "create", "--org", &org, "--name", "a"])
        .await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let token = authd
        .ibexctl_json(&["token", "create", "--org", &org, "--permissions", "read"])
        .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((org, agent, token))
}

async fn wait_ready(proxy: &Proxy) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let r = Request::get("/ready").send(proxy.addr).await?;
        if r.status == 200 {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < DEADLINE, "never ready: {}", r.dump());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn proxy_refuses_to_start_without_a_long_enough_service_key() -> anyhow::Result<()> {
    let bin = bin_path("ibex-proxy")?;
    for key in [None, Some("short-service-key")] {
        let mut cmd = tokio::process::Command::new(&bin);
        for (name, _) in std::env::vars() {
            if name.starts_with("IBEX_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("IBEX_PROXY_LISTEN", "127.0.0.1:0")
            .env("IBEX_PROXY_ADMIN_LISTEN", "127.0.0.1:0");
        if let Some(key) = key {
            cmd.env("IBEX_SERVICE_KEY", key);
        }
        let out = tokio::time::timeout(DEADLINE, cmd.output()).await??;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "started with key {key:?}: {text}");
        assert!(text.contains("IBEX_SERVICE_KEY"), "{text}");
        assert!(!text.contains("IBEX_READY") && !text.contains("short-service-key"));
    }
    Ok(())
}

#[tokio::test]
async fn proxy_to_authd_over_tls_trusts_only_the_configured_ca() -> anyhow::Result<()> {
    let ca = TestCa::new("ibex authd CA")?;
    let leaf = ca.issue("authd", &["localhost"])?;
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    migrate(&pg).await?;
    let (cert, key) = (
        leaf.cert_file.display().to_string(),
        leaf.key_file.display().to_string(),
    );
    let authd = Authd::start(
        &pg,
        &[
            ("IBEX_AUTHD_TLS_CERT_FILE", cert.as_str()),
            ("IBEX_AUTHD_TLS_KEY_FILE", key.as_str()),
        ],
    )
    .await?;
    let https = format!("https://localhost:{}", authd.grpc_addr.port());
    let ca_file = ca.ca_file().display().to_string();
    let ctl_env = vec![
        ("IBEX_AUTHD_GRPC".to_owned(), https.clone()),
        ("IBEX_AUTHD_CA_FILE".to_owned(), ca_file.clone()),
        ("IBEX_ADMIN_KEY".to_owned(), authd.admin_key.clone()),
    ];
    let org = ibex_e2e::procs::ibexctl(&ctl_env, &["org", "create", "--name", "tls"])
        .await?
        .json()?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let agent =
        ibex_e2e::procs::ibexctl(&ctl_env, &["agent", "create", "--org", &org, "--name", "a"])
            .await?
            .json()?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    let token = ibex_e2e::procs::ibexctl(&ctl_env, &["token", "create", "--org", &org])
        .await?
        .json()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let trusting = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[
            ("IBEX_AUTHD_GRPC", https.as_str()),
            ("IBEX_AUTHD_CA_FILE", ca_file.as_str()),
        ],
    )
    .await?;
    wait_ready(&trusting).await?;
    let probe = Request::get("/v1/internal/auth-probe").auth(&token, &agent);
    let r = probe.send(trusting.addr).await?;
    assert_eq!(r.status, 200, "{}", r.dump());

    // The system roots do not know the test CA: nothing validates.
    let untrusting = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[("IBEX_AUTHD_GRPC", https.as_str())],
    )
    .await?;
    let r = probe.send(untrusting.addr).await?;
    assert_eq!(r.status, 503, "{}", r.dump());
    let ready = Request::get("/ready").send(untrusting.addr).await?;
    assert_eq!(ready.status, 503, "{}", ready.dump());
    Ok(())
}

#[tokio::test]
async fn the_holder_is_served_while_another_address_guesses_at_its_id() -> anyhow::Result<()> {
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    migrate(&pg).await?;
    let mut authd = Authd::start(&pg, &[]).await?;
    let (_, agent, token) = org_agent_token(&authd, "guess").await?;
    // A cold authd: the creation warmed its cache, a restart empties it.
    authd.restart().await?;
    let proxy = Proxy::start(authd.grpc_addr, &redis.url(), &[]).await?;
    wait_ready(&proxy).await?;

    // `ibex_pat_<id>_<secret>`: the same id, 30 different wrong secrets.
    let id = token
        .strip_prefix("ibex_pat_")
        .and_then(|rest| rest.get(..36))
        .ok_or_else(|| anyhow::anyhow!("unexpected token shape"))?;
    let guesser: IpAddr = "127.0.0.2".parse()?;
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..30 {
        let wrong = format!("ibex_pat_{id}_{:0>48}", i);
        let r = Request::get("/v1/internal/auth-probe")
            .auth(&wrong, &agent)
            .send_from(proxy.addr, guesser)
            .await?;
        assert_ne!(r.status, 200, "{}", r.dump());
        *answers.entry(r.status).or_insert(0) += 1;
    }
    println!("30 guesses from 127.0.0.2 answered {answers:?}");
    assert!(
        answers.keys().any(|s| *s == 503 || *s == 429),
        "the guesser was never slowed down: {answers:?}"
    );

    let holder: IpAddr = "127.0.0.3".parse()?;
    let r = Request::get("/v1/internal/auth-probe")
        .auth(&token, &agent)
        .send_from(proxy.addr, holder)
        .await?;
    assert_eq!(r.status, 200, "the holder was refused: {}", r.dump());
    Ok(())
}

#[tokio::test]
async fn an_agent_moved_to_another_org_is_refused_in_its_old_one() -> anyhow::Result<()> {
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    let (_, agent, token) = org_agent_token(&authd, "from").await?;
    let to = authd
        .ibexctl_json(&["org", "create", "--name", "to"])
        .await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let proxy = Proxy::start(authd.grpc_addr, &redis.url(), &[]).await?;
    wait_ready(&proxy).await?;
    let probe = Request::get("/v1/internal/auth-probe").auth(&token, &agent);
    // Served (and so cached) before the move.
    for _ in 0..3 {
        let r = probe.send(proxy.addr).await?;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    let owner = pg.admin_client().await?;
    let (to, agent_id): (uuid::Uuid, uuid::Uuid) = (to.parse()?, agent.parse()?);
    owner
        .execute(
            "UPDATE ibex_core.agents SET org_id = $1 WHERE id = $2",
            &[&to, &agent_id],
        )
        .await?;
    let moved = Instant::now();
    loop {
        let r = probe.send(proxy.addr).await?;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.dump());
        assert!(
            moved.elapsed() < DEADLINE,
            "the old org still accepts the moved agent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "moved agent refused in its old org {:?} after the commit",
        moved.elapsed()
    );
    Ok(())
}
