//! Forwarding end to end (issue 6, SPEC §3 and §9): the real `ibex-proxy` binary, behind the
//! whole security chain (a real `ibex-authd`, Postgres and Redis), forwarding to a fake
//! OpenAI-compatible upstream the test starts (`forwarding/fake_upstream.rs`).
//!
//! One stack per run: Postgres, Redis, authd, a proxy pointed at the fake, and a second proxy
//! (`IBEX_UPSTREAM_TIMEOUT=300ms`) pointed at a fake that never answers. One org with an agent,
//! a `read,chat` token and a `read` token, made through authd with `ibexctl` and the operator
//! key. The cases run in order (the last one stops the fake), then the logs are checked for
//! the upstream key and the PATs.
//!
//! Needs the binaries: `cargo build --workspace --bins`, then
//! `cargo test -p ibex-e2e --test forwarding`.

#[path = "forwarding/fake_upstream.rs"]
mod fake_upstream;
#[path = "forwarding/streamed.rs"]
mod streamed;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fake_upstream::*;
use ibex_e2e::http::{header, Request, Response};
use ibex_e2e::{Authd, Proxy, Stack};
use streamed::Streamed;

const CHAT: &str = "/v1/chat/completions";
/// A client body not in serde_json's formatting: the upstream must get these exact bytes.
const CHAT_BODY: &str = "{\"model\": \"fake-model-1\",  \"messages\": [{\"role\": \"user\", \"content\": \"h\u{e9}llo, w\\u00f6rld\"}],\n \"temperature\": 0.5 }\n";
const STREAM_BODY: &str = "{\"model\":\"fake-model-stream\",\"stream\":true,\"stream_options\":{\"include_usage\":true},\"messages\":[{\"role\":\"user\",\"content\":\"count\"}]}";
/// How long any awaited effect may take.
const WITHIN: Duration = Duration::from_secs(10);

/// What every case needs.
struct Fx {
    /// The proxy forwarding to `fake`.
    addr: SocketAddr,
    /// Its admin listener (`/metrics`).
    admin: SocketAddr,
    fake: Fake,
    upstream_key: String,
    org: String,
    agent: String,
    /// `read,chat`.
    chat_pat: String,
    /// `read` only.
    read_pat: String,
}

impl Fx {
    fn chat(&self, pat: &str, body: &str, request_id: &str) -> Request {
        Request::post(CHAT, body)
            .header("Content-Type", "application/json")
            .auth(pat, &self.agent)
            .header("X-Request-ID", request_id)
            .header("X-IBEX-Trace", "client-side-only")
    }

    /// The request the fake received last, which must be the only one since `before`.
    fn one_seen_since(&self, before: usize) -> Result<Seen> {
        let seen = self.fake.seen();
        ensure!(
            seen.len() == before + 1,
            "the fake saw {} requests, expected exactly one",
            seen.len() - before
        );
        seen.last()
            .cloned()
            .ok_or_else(|| anyhow!("the fake saw nothing"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_end_to_end() -> Result<()> {
    let started = Instant::now();
    let fake = Fake::start(Mode::OpenAi).await?;
    let silent = Fake::start(Mode::Silent).await?;
    let upstream_key = format!("sk-fwd-{}", uuid::Uuid::new_v4().simple());
    let (url, silent_url) = (fake.url(), silent.url());
    let upstream_env = |url: &str| {
        vec![
            ("IBEX_UPSTREAM_URL".to_owned(), url.to_owned()),
            ("IBEX_UPSTREAM_API_KEY".to_owned(), upstream_key.clone()),
        ]
    };
    let mut env = upstream_env(&url);
    // The operator's billing choice (SPEC §3.1); a tenant's own headers never replace it.
    env.push((
        "IBEX_UPSTREAM_ORGANIZATION".to_owned(),
        OPERATOR_ORG.to_owned(),
    ));
    env.push((
        "IBEX_UPSTREAM_PROJECT".to_owned(),
        OPERATOR_PROJECT.to_owned(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start_with(&[], &env).await?;
    let mut slow_env = upstream_env(&silent_url);
    slow_env.push(("IBEX_UPSTREAM_TIMEOUT".to_owned(), "300ms".to_owned()));
    let slow_env: Vec<(&str, &str)> = slow_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let slow = Proxy::start(stack.authd.grpc_addr, &stack.redis.url(), &slow_env).await?;
    wait_ready(stack.proxy.addr).await?;
    wait_ready(slow.addr).await?;
    // A fresh org (a budget no test can spend), an agent, a `read,chat` and a `read` token.
    let t = stack
        .authd
        .tenant("fwd", 1_000_000, true, &["read,chat", "read"])
        .await?;
    let (org, agent) = (t.org, t.agent);
    let [chat_pat, read_pat]: [String; 2] = t.pats.try_into().map_err(|_| anyhow!("two tokens"))?;
    let mut fx = Fx {
        addr: stack.proxy.addr,
        admin: stack.proxy.admin,
        fake,
        upstream_key,
        org,
        agent,
        chat_pat,
        read_pat,
    };
    eprintln!(
        "forwarding: stack up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    non_streaming_round_trip(&fx)
        .await
        .context("non-streaming chat")?;
    metrics_only_on_the_admin_listener(&fx)
        .await
        .context("/metrics on the admin listener only")?;
    only_allow_listed_headers_reach_the_upstream(&fx)
        .await
        .context("upstream header allow-list")?;
    streaming_arrives_event_by_event(&fx)
        .await
        .context("streaming chat")?;
    read_token_lists_models_but_cannot_chat(&fx)
        .await
        .context("read-only token")?;
    upstream_4xx_is_passed_through(&fx)
        .await
        .context("upstream 400")?;
    client_disconnect_closes_the_upstream(&fx)
        .await
        .context("client disconnect mid-stream")?;
    silent_upstream_is_504(&fx, slow.addr, &silent)
        .await
        .context("upstream timeout")?;
    stopped_upstream_is_502(&mut fx)
        .await
        .context("upstream down")?;
    no_credential_in_logs(&fx, &[&stack.proxy, &slow], &stack.authd)?;

    eprintln!(
        "forwarding: all cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until the proxy answers `/ready` with 200 (invalidation feed and Redis up).
async fn wait_ready(addr: SocketAddr) -> Result<()> {
    ibex_e2e::wait::ready(addr, WITHIN).await
}

async fn non_streaming_round_trip(fx: &Fx) -> Result<()> {
    let before = fx.fake.seen_count();
    let rid = "fwd-plain-1";
    let resp = fx.chat(&fx.chat_pat, CHAT_BODY, rid).send(fx.addr).await?;
    ensure!(resp.status == 200, "expected 200:\n{}", resp.dump());
    ensure!(
        resp.body == COMPLETION_BODY.as_bytes(),
        "body changed on the way:\n{}",
        resp.dump()
    );
    ensure!(
        resp.header("content-type") == Some(COMPLETION_CONTENT_TYPE),
        "Content-Type not passed:\n{}",
        resp.dump()
    );
    only_request_id(&resp, rid)?;
    ensure!(
        resp.header("set-cookie").is_none(),
        "the provider's Set-Cookie reached the client:\n{}",
        resp.dump()
    );

    let seen = fx.one_seen_since(before)?;
    ensure!(
        seen.method == "POST" && seen.path == CHAT,
        "upstream got {} {}",
        seen.method,
        seen.path
    );
    ensure!(
        seen.body == CHAT_BODY.as_bytes(),
        "the upstream got another body: {:?}",
        String::from_utf8_lossy(&seen.body)
    );
    hygiene(fx, &seen, &[&fx.chat_pat])?;
    ensure!(
        seen.all("x-request-id") == [rid],
        "upstream X-Request-ID: {:?}",
        seen.all("x-request-id")
    );

    // Metered per org and model (proxy/src/upstream/stats.rs).
    let line = format!(
        "ibex_upstream_usage_tokens_total{{org=\"{}\",model=\"{COMPLETION_MODEL}\",kind=\"total\"}} {COMPLETION_TOTAL_TOKENS}",
        fx.org
    );
    metric_line(fx.admin, &line).await
}

const OPERATOR_ORG: &str = "org-operator-billing";
const OPERATOR_PROJECT: &str = "proj_operator_billing";

/// SPEC §3.1 both ways: the allow-listed client headers arrive unchanged, every other header
/// (the tenant's `OpenAI-Organization`/`OpenAI-Project`, forwarding headers, cookies, custom
/// ones) is dropped, and the operator's organisation and project are sent exactly once.
async fn only_allow_listed_headers_reach_the_upstream(fx: &Fx) -> Result<()> {
    let before = fx.fake.seen_count();
    let allowed = [
        ("User-Agent", "OpenAI/Python 1.99.0"),
        ("Accept", "application/json"),
        ("OpenAI-Beta", "assistants=v2"),
        ("Idempotency-Key", "idem-fwd-1"),
        ("X-Stainless-Lang", "python"),
        ("X-Stainless-Retry-Count", "0"),
    ];
    let dropped = [
        ("OpenAI-Organization", "org-tenant-steering"),
        ("OpenAI-Project", "proj_tenant_steering"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7"),
        ("Cookie", "session=tenant-cookie"),
        ("X-Custom-Tenant", "tenant-custom-value"),
        ("Proxy-Authorization", "Basic dGVuYW50"),
    ];
    let mut req = fx.chat(&fx.chat_pat, CHAT_BODY, "fwd-allow-list-1");
    for (k, v) in allowed.iter().chain(dropped.iter()) {
        req = req.header(k, v);
    }
    let resp = req.send(fx.addr).await?;
    ensure!(resp.status == 200, "expected 200:\n{}", resp.dump());
    let seen = fx.one_seen_since(before)?;
    for (k, v) in allowed {
        ensure!(
            seen.all(k) == [v],
            "{k} not forwarded as sent: {:?}",
            seen.all(k)
        );
    }
    for (k, v) in dropped {
        ensure!(
            !seen.headers.iter().any(|(_, sv)| sv.contains(v)),
            "{k} reached the upstream"
        );
    }
    ensure!(
        seen.all("openai-organization") == [OPERATOR_ORG]
            && seen.all("openai-project") == [OPERATOR_PROJECT],
        "operator organisation/project: {:?} {:?}",
        seen.all("openai-organization"),
        seen.all("openai-project")
    );
    hygiene(fx, &seen, &[&fx.chat_pat])
}

/// SPEC §3: `/metrics` (whose labels carry org ids) is served on the admin listener only; on
/// the public one it is an unknown route — 401 to an anonymous caller, 404 once authenticated —
/// and no answer there names the org.
async fn metrics_only_on_the_admin_listener(fx: &Fx) -> Result<()> {
    let anonymous = Request::get("/metrics").send(fx.addr).await?;
    ensure!(
        anonymous.status == 401 && anonymous.error_code().as_deref() == Some("MISSING_TOKEN"),
        "anonymous public /metrics: {}",
        anonymous.dump()
    );
    let authenticated = Request::get("/metrics")
        .auth(&fx.read_pat, &fx.agent)
        .send(fx.addr)
        .await?;
    ensure!(
        authenticated.status == 404 && authenticated.error_code().as_deref() == Some("NOT_FOUND"),
        "authenticated public /metrics: {}",
        authenticated.dump()
    );
    for resp in [&anonymous, &authenticated] {
        ensure!(
            !resp.text().contains(&fx.org) && !resp.text().contains("ibex_upstream_usage"),
            "the public listener leaked metrics: {}",
            resp.dump()
        );
    }
    let admin = Request::get("/metrics").send(fx.admin).await?;
    ensure!(
        admin.status == 200 && admin.text().contains("ibex_upstream_usage_tokens_total"),
        "admin /metrics: {}",
        admin.status
    );
    let probe = Request::get("/v1/internal/auth-probe")
        .auth(&fx.read_pat, &fx.agent)
        .send(fx.admin)
        .await?;
    ensure!(
        probe.status == 404,
        "the admin listener serves only /metrics, /health, /ready: {}",
        probe.dump()
    );
    Ok(())
}

/// The upstream got the proxy's key, once, and nothing of the client's credentials.
fn hygiene(fx: &Fx, seen: &Seen, pats: &[&str]) -> Result<()> {
    let expected = format!("Bearer {}", fx.upstream_key);
    ensure!(
        seen.all("authorization") == [expected.as_str()],
        "upstream Authorization headers: {} (expected exactly the upstream key)",
        seen.all("authorization").len()
    );
    let ibex: Vec<&str> = seen
        .headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.to_ascii_lowercase().starts_with("x-ibex-"))
        .collect();
    ensure!(
        ibex.is_empty(),
        "X-IBEX-* headers reached the upstream: {ibex:?}"
    );
    for pat in pats {
        ensure!(
            !seen.headers.iter().any(|(_, v)| v.contains(pat)),
            "the client's PAT reached the upstream"
        );
    }
    Ok(())
}

/// Exactly one `X-Request-ID`, the client's.
fn only_request_id(resp: &Response, rid: &str) -> Result<()> {
    let ids: Vec<&str> = resp
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, v)| v.as_str())
        .collect();
    ensure!(ids == [rid], "X-Request-ID {ids:?}, expected [{rid}]");
    Ok(())
}

async fn streaming_arrives_event_by_event(fx: &Fx) -> Result<()> {
    let before = fx.fake.seen_count();
    let (first_before, last_before) = (fx.fake.first_sent(), fx.fake.last_sent());
    let rid = "fwd-stream-1";
    let req = fx.chat(&fx.chat_pat, STREAM_BODY, rid);
    let mut client = Streamed::send(fx.addr, &req).await?;

    // The first event reaches the client while the fake still holds back the rest.
    client
        .read_until(|p| {
            p.body
                .windows(STREAM_FIRST.len())
                .any(|w| w == STREAM_FIRST.as_bytes())
        })
        .await
        .context("the first event")?;
    ensure!(
        fx.fake.first_sent() == first_before + 1 && fx.fake.last_sent() == last_before,
        "the fake sent its last event before the client saw the first"
    );
    fx.fake.release();
    let done = client
        .read_until(|p| p.complete)
        .await
        .context("the rest")?;

    ensure!(done.status == 200, "status {}", done.status);
    ensure!(
        header(&done.headers, "content-type") == Some("text/event-stream"),
        "Content-Type {:?}",
        header(&done.headers, "content-type")
    );
    ensure!(
        header(&done.headers, "transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked")),
        "not chunked: {:?}",
        done.headers
    );
    ensure!(
        header(&done.headers, "x-request-id") == Some(rid),
        "X-Request-ID {:?}",
        header(&done.headers, "x-request-id")
    );
    let expected: String = std::iter::once(STREAM_FIRST).chain(STREAM_REST).collect();
    ensure!(
        done.body == expected.as_bytes(),
        "streamed body differs:\n{}",
        String::from_utf8_lossy(&done.body)
    );

    let seen = fx.one_seen_since(before)?;
    ensure!(
        seen.body == STREAM_BODY.as_bytes(),
        "stream request body changed"
    );
    hygiene(fx, &seen, &[&fx.chat_pat])?;

    // The final chunk's usage is metered too.
    let line = format!(
        "ibex_upstream_usage_tokens_total{{org=\"{}\",model=\"{STREAM_MODEL}\",kind=\"total\"}} {STREAM_TOTAL_TOKENS}",
        fx.org
    );
    metric_line(fx.admin, &line).await
}

async fn read_token_lists_models_but_cannot_chat(fx: &Fx) -> Result<()> {
    let before = fx.fake.seen_count();
    // No client X-Request-ID: the proxy's own goes both ways.
    let resp = Request::get("/v1/models")
        .auth(&fx.read_pat, &fx.agent)
        .send(fx.addr)
        .await?;
    ensure!(resp.status == 200, "models:\n{}", resp.dump());
    ensure!(
        resp.body == MODELS_BODY.as_bytes(),
        "models body:\n{}",
        resp.dump()
    );
    let rid = resp
        .header("x-request-id")
        .ok_or_else(|| anyhow!("no X-Request-ID:\n{}", resp.dump()))?;
    ensure!(rid != "upstream-own-id", "the upstream's request id leaked");
    let seen = fx.one_seen_since(before)?;
    ensure!(
        seen.method == "GET" && seen.path == "/v1/models",
        "upstream got {} {}",
        seen.method,
        seen.path
    );
    ensure!(
        seen.all("x-request-id") == [rid],
        "upstream X-Request-ID {:?} != {rid}",
        seen.all("x-request-id")
    );
    hygiene(fx, &seen, &[&fx.read_pat])?;

    let before = fx.fake.seen_count();
    let resp = fx
        .chat(&fx.read_pat, CHAT_BODY, "fwd-read-chat")
        .send(fx.addr)
        .await?;
    envelope(
        &resp,
        403,
        "INSUFFICIENT_PERMISSIONS",
        Some("fwd-read-chat"),
    )?;
    ensure!(
        fx.fake.seen_count() == before,
        "a refused request reached the upstream"
    );
    Ok(())
}

async fn upstream_4xx_is_passed_through(fx: &Fx) -> Result<()> {
    let rid = "fwd-400";
    let body = format!("{{\"model\":\"{BAD_REQUEST_MODEL}\",\"messages\":[]}}");
    let resp = fx.chat(&fx.chat_pat, &body, rid).send(fx.addr).await?;
    ensure!(resp.status == 400, "expected 400:\n{}", resp.dump());
    ensure!(
        resp.body == BAD_REQUEST_BODY.as_bytes(),
        "the upstream's error body changed:\n{}",
        resp.dump()
    );
    ensure!(
        resp.header("content-type") == Some("application/json"),
        "Content-Type:\n{}",
        resp.dump()
    );
    only_request_id(&resp, rid)
}

async fn client_disconnect_closes_the_upstream(fx: &Fx) -> Result<()> {
    let closed_before = fx.fake.endless_closed();
    let started_before = fx.fake.endless_started();
    let body = format!("{{\"model\":\"{ENDLESS_MODEL}\",\"stream\":true,\"messages\":[]}}");
    let req = fx.chat(&fx.chat_pat, &body, "fwd-gone");
    let mut client = Streamed::send(fx.addr, &req).await?;
    client
        .read_until(|p| p.status == 200 && !p.body.is_empty())
        .await
        .context("the first event")?;
    ensure!(
        fx.fake.endless_started() == started_before + 1,
        "no endless stream started"
    );
    drop(client);
    poll("the fake seeing its connection closed", async || {
        Ok((fx.fake.endless_closed() > closed_before).then_some(()))
    })
    .await?;
    // And the proxy goes on forwarding.
    let resp = fx
        .chat(&fx.chat_pat, CHAT_BODY, "fwd-after-gone")
        .send(fx.addr)
        .await?;
    ensure!(resp.status == 200, "after a disconnect:\n{}", resp.dump());
    Ok(())
}

async fn silent_upstream_is_504(fx: &Fx, slow: SocketAddr, silent: &Fake) -> Result<()> {
    let rid = "fwd-timeout";
    let resp = fx.chat(&fx.chat_pat, CHAT_BODY, rid).send(slow).await?;
    envelope(&resp, 504, "UPSTREAM_TIMEOUT", Some(rid))?;
    ensure!(
        silent.seen_count() >= 1,
        "the request never reached the silent upstream"
    );
    Ok(())
}

async fn stopped_upstream_is_502(fx: &mut Fx) -> Result<()> {
    // Its pooled connections close too: the proxy must find them dead and then be refused.
    fx.fake.stop().await;
    let rid = "fwd-down";
    let resp = fx.chat(&fx.chat_pat, CHAT_BODY, rid).send(fx.addr).await?;
    envelope(&resp, 502, "UPSTREAM_UNAVAILABLE", Some(rid))?;
    let resp = Request::get("/v1/models")
        .auth(&fx.read_pat, &fx.agent)
        .send(fx.addr)
        .await?;
    envelope(&resp, 502, "UPSTREAM_UNAVAILABLE", None)
}

fn no_credential_in_logs(fx: &Fx, proxies: &[&Proxy], authd: &Authd) -> Result<()> {
    let mut secrets = vec![fx.upstream_key.clone()];
    for pat in [&fx.chat_pat, &fx.read_pat] {
        secrets.push(pat.clone());
        if let Some((_, secret)) = pat.rsplit_once('_') {
            secrets.push(secret.to_owned());
        }
    }
    let mut logs: Vec<(String, String)> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("proxy #{i}"), p.log_contents()))
        .collect();
    logs.push(("authd".to_owned(), authd.log_contents()));
    for (name, log) in &logs {
        ensure!(!log.is_empty(), "{name} wrote no log at all");
        for (i, secret) in secrets.iter().enumerate() {
            ensure!(
                !log.contains(secret.as_str()),
                "{name}'s log contains credential #{i} (0 = the upstream key)"
            );
        }
    }
    Ok(())
}

/// A proxy error: status, `Content-Type: application/json`, the envelope's code, its
/// `request_id` equal to `X-Request-ID` (and to `rid` when given).
fn envelope(resp: &Response, status: u16, code: &str, rid: Option<&str>) -> Result<()> {
    ensure!(
        resp.status == status && resp.error_code().as_deref() == Some(code),
        "expected {status} {code}:\n{}",
        resp.dump()
    );
    ensure!(
        resp.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "not JSON:\n{}",
        resp.dump()
    );
    let header_rid = resp
        .header("x-request-id")
        .ok_or_else(|| anyhow!("no X-Request-ID:\n{}", resp.dump()))?;
    ensure!(
        resp.json()?["error"]["request_id"].as_str() == Some(header_rid),
        "envelope request_id differs from X-Request-ID:\n{}",
        resp.dump()
    );
    if let Some(rid) = rid {
        only_request_id(resp, rid)?;
    }
    Ok(())
}

/// Polls `/metrics` until it has exactly `line`.
async fn metric_line(addr: SocketAddr, line: &str) -> Result<()> {
    poll(&format!("/metrics showing `{line}`"), async || {
        let metrics = Request::get("/metrics").send(addr).await?.text();
        Ok(metrics.lines().any(|l| l == line).then_some(()))
    })
    .await
}

/// Runs `f` until it returns `Some`, at most [`WITHIN`].
async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
