//! The proxy's public edge through real processes (issue 10): the first request of a fresh stack,
//! the Host rule from raw bytes, the per-address connection cap, the failure budget shared by the
//! workers of one proxy, and TLS on the public listener (1.3 by default, 1.2 on request, plain
//! HTTP not served, SIGHUP reload, a missing certificate refusing to start).
//!
//! One stack (Postgres, Redis, authd), extra proxies per case; the cases run in order, each
//! from its own loopback addresses, so their per-address counts never meet.
//!
//! ```text
//! cargo build --workspace --bins && cargo test -p ibex-e2e --test edge
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ibex_e2e::certs::{Leaf, TestCa};
use ibex_e2e::http::{Conn, Request};
use ibex_e2e::{Proxy, Signal, Stack};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const PROBE: &str = "/v1/internal/auth-probe";
/// How long a condition that must become true is polled for.
const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_end_to_end() -> Result<()> {
    let started = Instant::now();
    let stack = Stack::start().await?;
    first_request_of_a_fresh_stack(&stack)
        .await
        .context("first request of a fresh stack")?;
    eprintln!("edge: stack up in {:.1} s", started.elapsed().as_secs_f64());

    missing_host_is_400_before_the_body(&stack)
        .await
        .context("Host rule")?;
    per_address_connection_cap(&stack)
        .await
        .context("IBEX_MAX_CONNS_PER_IP")?;
    failure_budget_is_per_proxy(&stack)
        .await
        .context("failure budget")?;
    tls_on_the_public_listener(&stack).await.context("TLS")?;
    eprintln!(
        "edge: all cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// README's curl on a stack that has never served: 200, not 503 AUTH_UNAVAILABLE. What used to
/// make it slow is checked directly, before the request: authd opened its pool (and ran its
/// queries once) and its LISTEN connection before its ready line. The request's latency is
/// printed against the production budget (50 ms) but not asserted: on a loaded 2-core box a
/// cold Argon2 verify alone can take longer (SPEC §5 then answers 503, correctly).
async fn first_request_of_a_fresh_stack(stack: &Stack) -> Result<()> {
    let pg = stack.pg.admin_client().await?;
    let rows = pg
        .query(
            "SELECT count(*) FILTER (WHERE application_name <> 'ibex-authd-listen'), \
                    count(*) FILTER (WHERE application_name = 'ibex-authd-listen') \
             FROM pg_stat_activity WHERE usename = 'ibex_app'",
            &[],
        )
        .await?;
    let (pool, listen): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    ensure!(
        pool >= 2 && listen >= 1,
        "authd's connections before the first request: {pool} pooled, {listen} LISTEN"
    );
    let t0 = Instant::now();
    let resp = Request::get(PROBE)
        .auth(&stack.seed.token, &stack.seed.agent_id)
        .send(stack.proxy.addr)
        .await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "edge: first request of a fresh stack answered {} in {ms:.1} ms (production budget 50 ms{})",
        resp.status,
        if ms < 50.0 { ", met" } else { ", NOT met on this box now" }
    );
    ensure!(resp.status == 200, "first request:\n{}", resp.dump());
    Ok(())
}

/// SPEC §3.3 from raw bytes: no Host and a claimed body that never comes → 400 at once (the
/// body timeout is 30 s), and the connection closed.
async fn missing_host_is_400_before_the_body(stack: &Stack) -> Result<()> {
    let mut conn = Conn::connect(stack.proxy.addr).await?;
    let t0 = Instant::now();
    conn.write_raw(b"GET /health HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
        .await?;
    let resp = conn.read_response(false).await?;
    ensure!(
        resp.status == 400 && resp.error_code().as_deref() == Some("BAD_REQUEST"),
        "{}",
        resp.dump()
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(5),
        "answered only after {:?}: the proxy waited for the body",
        t0.elapsed()
    );
    ensure!(conn.is_closed(Duration::from_secs(5)).await, "not closed");
    Ok(())
}

/// `IBEX_MAX_CONNS_PER_IP=4`: a fifth connection from one address is closed at accept (and
/// counted on the admin listener); another address is unaffected; closing one frees a slot.
async fn per_address_connection_cap(stack: &Stack) -> Result<()> {
    let proxy = proxy(stack, &[("IBEX_MAX_CONNS_PER_IP", "4")]).await?;
    let (a, b) = (ip(40, 1), ip(40, 2));
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut conn = Conn::connect_from(proxy.addr, a).await?;
        let r = conn.send(&Request::get("/health"), false).await?;
        ensure!(r.status == 200, "{}", r.dump());
        open.push(conn);
    }
    let mut fifth = Conn::connect_from(proxy.addr, a).await?;
    ensure!(
        fifth.is_closed(Duration::from_secs(5)).await,
        "a fifth connection from {a} was kept open"
    );
    let r = Request::get("/health").send_from(proxy.addr, b).await?;
    ensure!(r.status == 200, "another address: {}", r.dump());
    drop(open.pop());
    // The proxy frees the slot when it sees the close: poll for it.
    poll("a slot freed by a closed connection", async || {
        let mut conn = Conn::connect_from(proxy.addr, a).await?;
        Ok(conn
            .send(&Request::get("/health"), true)
            .await
            .ok()
            .filter(|r| r.status == 200))
    })
    .await?;
    let metrics = Request::get("/metrics").send(proxy.admin).await?.text();
    let refused = metric(&metrics, "ibex_proxy_conns_per_ip_refused_total")?;
    ensure!(refused >= 1.0, "refusals counted: {refused}");
    Ok(())
}

/// SPEC §3's failure budget with `IBEX_PROXY_THREADS=2`, every request on a new connection
/// (so both workers see the address): random agent ids are cut off after 20 refusals; a token
/// and agent verified once pass on every worker, also after a flood of random tokens; a real
/// token this proxy never verified is refused 429 without an authd call.
async fn failure_budget_is_per_proxy(stack: &Stack) -> Result<()> {
    let proxy = proxy(stack, &[("IBEX_PROXY_THREADS", "2")]).await?;
    // Two tokens of one org and agent; the second is never sent before the flood.
    let t = stack
        .authd
        .tenant("edge", 1_000_000, false, &["read", "read"])
        .await?;
    let (pat, unused_pat) = (t.pats[0].clone(), t.pats[1].clone());
    let (a, b) = (ip(41, 1), ip(41, 2));
    let verified = Request::get(PROBE).auth(&pat, &t.agent);
    let r = verified.send_from(proxy.addr, a).await?;
    ensure!(r.status == 200, "verifying request: {}", r.dump());

    let mut statuses = Vec::new();
    for _ in 0..30 {
        let random_agent = uuid::Uuid::new_v4().to_string();
        let r = Request::get(PROBE)
            .auth(&pat, &random_agent)
            .send_from(proxy.addr, a)
            .await?;
        statuses.push(r.status);
    }
    let expected: Vec<u16> = [403; 20].into_iter().chain([429; 10]).collect();
    ensure!(
        statuses == expected,
        "random agent ids from one address: {statuses:?}"
    );
    for i in 0..10 {
        let r = verified.send_from(proxy.addr, a).await?;
        ensure!(
            r.status == 200,
            "verified credentials after the agent flood ({i}): {}",
            r.dump()
        );
    }

    let mut statuses = Vec::new();
    for _ in 0..25 {
        let random_token = format!(
            "ibex_pat_{}_{}",
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4().simple().to_string().repeat(2)
        );
        let r = Request::get(PROBE)
            .auth(&random_token, &t.agent)
            .send_from(proxy.addr, b)
            .await?;
        statuses.push(r.status);
    }
    let expected: Vec<u16> = [401; 20].into_iter().chain([429; 5]).collect();
    ensure!(
        statuses == expected,
        "random tokens from one address: {statuses:?}"
    );
    for i in 0..10 {
        let r = verified.send_from(proxy.addr, b).await?;
        ensure!(
            r.status == 200,
            "verified credentials after the token flood ({i}): {}",
            r.dump()
        );
    }
    let r = Request::get(PROBE)
        .auth(&unused_pat, &t.agent)
        .send_from(proxy.addr, b)
        .await?;
    ensure!(
        r.status == 429 && r.error_code().as_deref() == Some("RATE_LIMITED"),
        "a token this proxy never verified, past the budget: {}",
        r.dump()
    );
    Ok(())
}

async fn tls_on_the_public_listener(stack: &Stack) -> Result<()> {
    let ca = TestCa::new("ibex edge test CA")?;
    let first = ca.issue("proxy-1", &["localhost", "127.0.0.1"])?;
    let second = ca.issue("proxy-2", &["localhost", "127.0.0.1"])?;
    // The proxy reads copies, so the test can replace them for the reload.
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    install(&first, &cert, &key)?;
    let tls_env = [
        ("IBEX_TLS_CERT_FILE", cert.to_str().context("path")?),
        ("IBEX_TLS_KEY_FILE", key.to_str().context("path")?),
    ];
    let mut env13 = tls_env.to_vec();
    env13.push(("IBEX_HEADER_TIMEOUT", "1s"));
    let tls13 = proxy(stack, &env13).await?;
    ensure!(tls13.tls, "the ready line says https");
    let roots = ca_roots(&ca)?;

    // A TLS 1.3 handshake (ALPN http/1.1) and an authenticated probe over it.
    let mut conn = tls_connect(tls13.addr, &roots, &[&rustls::version::TLS13]).await?;
    let (_, session) = conn.stream().get_ref();
    ensure!(
        session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
        "negotiated {:?}",
        session.protocol_version()
    );
    ensure!(
        session.alpn_protocol() == Some(b"http/1.1"),
        "ALPN {:?}",
        session.alpn_protocol()
    );
    let before = leaf_of(&conn)?;
    let r = conn
        .send(
            &Request::get(PROBE).auth(&stack.seed.token, &stack.seed.agent_id),
            false,
        )
        .await?;
    ensure!(r.status == 200, "probe over TLS: {}", r.dump());

    // A client that speaks only TLS 1.2 is refused by default…
    let refused = tls_connect(tls13.addr, &roots, &[&rustls::version::TLS12]).await;
    ensure!(
        refused.is_err(),
        "a TLS 1.2-only client was accepted by default"
    );
    // …and plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(tls13.addr).await?;
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    ensure!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP was served on the TLS port: {:?}",
        String::from_utf8_lossy(&got)
    );

    // The header timeout covers the handshake: a client that connects and never starts it is
    // closed (IBEX_HEADER_TIMEOUT=1s here), not held for ever.
    let mut silent = TcpStream::connect(tls13.addr).await?;
    let t0 = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut byte)).await;
    ensure!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS client was not closed: {read:?}"
    );
    eprintln!(
        "edge: a silent TLS client closed after {:.2} s (IBEX_HEADER_TIMEOUT=1s)",
        t0.elapsed().as_secs_f64()
    );

    // SIGHUP: new connections get the new certificate, the open one carries on.
    install(&second, &cert, &key)?;
    tls13.signal(Signal::SIGHUP)?;
    let new_leaf = pem_leaf(&second)?;
    poll(
        "a new connection with the reloaded certificate",
        async || {
            let c = tls_connect(tls13.addr, &roots, &[&rustls::version::TLS13]).await?;
            Ok((leaf_of(&c)? == new_leaf).then_some(()))
        },
    )
    .await?;
    ensure!(before != new_leaf, "the two leaves differ");
    let r = conn.send(&Request::get("/health"), false).await?;
    ensure!(
        r.status == 200 && leaf_of(&conn)? == before,
        "the connection opened before the reload: {}",
        r.dump()
    );
    // A bad pair on reload keeps the current one.
    std::fs::write(&key, "not a key")?;
    tls13.signal(Signal::SIGHUP)?;
    poll("the failed reload counted", async || {
        let m = Request::get("/metrics").send(tls13.admin).await?.text();
        Ok((metric(&m, "ibex_proxy_tls_reload_failures_total")? >= 1.0).then_some(()))
    })
    .await?;
    let c = tls_connect(tls13.addr, &roots, &[&rustls::version::TLS13]).await?;
    ensure!(leaf_of(&c)? == new_leaf, "a bad reload replaced the pair");

    // IBEX_TLS_MIN_VERSION=1.2 accepts the 1.2-only client.
    install(&first, &cert, &key)?;
    let mut env12 = tls_env.to_vec();
    env12.push(("IBEX_TLS_MIN_VERSION", "1.2"));
    let tls12 = proxy(stack, &env12).await?;
    let mut c12 = tls_connect(tls12.addr, &roots, &[&rustls::version::TLS12]).await?;
    let r = c12.send(&Request::get("/health"), false).await?;
    ensure!(
        r.status == 200,
        "TLS 1.2 with IBEX_TLS_MIN_VERSION=1.2: {}",
        r.dump()
    );

    // A missing certificate file refuses to start, naming the variable.
    let missing = dir.path().join("missing.pem");
    let bad = [
        ("IBEX_TLS_CERT_FILE", missing.to_str().context("path")?),
        ("IBEX_TLS_KEY_FILE", key.to_str().context("path")?),
    ];
    let err = match proxy(stack, &bad).await {
        Ok(_) => return Err(anyhow!("started with a missing IBEX_TLS_CERT_FILE")),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("IBEX_TLS_CERT_FILE") && err.contains("missing.pem"),
        "the refusal does not name the variable and file:\n{err}"
    );
    Ok(())
}

async fn proxy(stack: &Stack, env: &[(&str, &str)]) -> Result<Proxy> {
    Proxy::start(stack.authd.grpc_addr, &stack.redis.url(), env).await
}

fn ip(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 60, c, d))
}

fn install(leaf: &Leaf, cert: &Path, key: &Path) -> Result<()> {
    std::fs::copy(&leaf.cert_file, cert)?;
    std::fs::copy(&leaf.key_file, key)?;
    Ok(())
}

fn ca_roots(ca: &TestCa) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca.ca_file())?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    Ok(Arc::new(roots))
}

fn pem_leaf(leaf: &Leaf) -> Result<CertificateDer<'static>> {
    let pem = std::fs::read(&leaf.cert_file)?;
    let mut reader = pem.as_slice();
    let cert = rustls_pemfile::certs(&mut reader)
        .next()
        .context("no certificate")??;
    Ok(cert)
}

fn leaf_of(conn: &Conn<TlsStream<TcpStream>>) -> Result<CertificateDer<'static>> {
    let (_, session) = conn.stream().get_ref();
    session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .context("no peer certificate")
}

async fn tls_connect(
    addr: SocketAddr,
    roots: &Arc<rustls::RootCertStore>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Conn<TlsStream<TcpStream>>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake timed out"))??;
    Ok(Conn::over(stream, addr))
}

/// The value of an unlabelled metric.
fn metric(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name} in /metrics"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

/// Runs `f` until it returns `Some`, at most [`WITHIN`].
async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + WITHIN;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None) => return Err(anyhow!("{what}: not within {WITHIN:?}")),
            Err(e) => return Err(e.context(format!("{what}: not within {WITHIN:?}"))),
        }
    }
}
