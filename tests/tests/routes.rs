//! Routes and providers end to end (issue 15, SPEC §12): the real `ibex-proxy` behind a real
//! `ibex-authd`, Postgres and Redis, forwarding by an `IBEX_PROVIDERS_FILE` to fake OpenAI- and
//! Anthropic-shaped providers (`routes/fake_provider.rs`) and to a port nothing listens on.
//!
//! One stack, the cases in order: every route plain and streamed (event by event: the first
//! event reaches the client while the provider still holds the last), the provider's key sent
//! and the client's never, the PAT as `x-api-key` on `/v1/messages` only, the `embeddings`
//! permission, unknown models, kind mismatches and aliases, `/v1/models`, fallback on a 503, a
//! refused connection and a timeout (`x-ibex-provider`, `attempts` in the usage record), no
//! fallback once the client has bytes, a circuit-broken provider skipped then probed back,
//! `SIGHUP` reload of the providers file under load without a failed request (and a bad file
//! kept out), and the usage records per shape, Anthropic cache tokens apart.
//!
//! The proxy runs one worker (`IBEX_PROXY_THREADS=1`) so the breaker it has per worker is the
//! one the test drives.
//!
//! Needs the binaries: `cargo build --workspace --bins`, then
//! `cargo test -p ibex-e2e --test routes`.

#[path = "routes/fake_provider.rs"]
mod fake_provider;
#[path = "forwarding/fake_upstream.rs"]
#[expect(dead_code, reason = "only its request reader and Seen are used here")]
mod fake_upstream;
#[path = "forwarding/streamed.rs"]
mod streamed;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use fake_provider::{Behaviour, Provider, Shape};
use ibex_e2e::http::{Conn, Request, Response};
use ibex_e2e::{Authd, Postgres, Proxy, Redis};
use streamed::{Progress, Streamed};

/// How long any awaited effect may take.
const WITHIN: Duration = Duration::from_secs(20);
const KEY_OA1: &str = "sk-routes-oa1-0123456789";
const KEY_OA2: &str = "sk-routes-oa2-0123456789";
const KEY_ANT: &str = "sk-ant-routes-0123456789";
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The `organization` / `project` of the provider `oa-1` in the file (`oa-2` has none).
const ORG_OA1: &str = "org-routes-oa1";
const PROJECT_OA1: &str = "proj_routes_oa1";

struct Fx {
    proxy: Proxy,
    pg: Postgres,
    oa1: Provider,
    oa2: Provider,
    ant: Provider,
    agent: String,
    /// `read,chat`.
    chat_pat: String,
    /// `read,chat,embeddings`.
    emb_pat: String,
    file: std::path::PathBuf,
    dead_url: String,
    seq: AtomicUsize,
}

impl Fx {
    fn rid(&self, what: &str) -> String {
        format!("routes-{what}-{}", self.seq.fetch_add(1, Ordering::SeqCst))
    }

    fn post(&self, path: &str, pat: &str, body: &str, rid: &str) -> Request {
        Request::post(path, body)
            .header("Content-Type", "application/json")
            .header("anthropic-version", ANTHROPIC_VERSION)
            .auth(pat, &self.agent)
            .header("X-Request-ID", rid)
    }
}

fn providers_file(oa1: &str, oa2: &str, ant: &str, dead: &str, extra: &str) -> String {
    format!(
        r#"
[[provider]]
name = "oa-1"
kind = "openai"
base_url = "{oa1}"
api_key_env = "ROUTES_KEY_OA1"
timeout = "1s"
organization = "{ORG_OA1}"
project = "{PROJECT_OA1}"

[[provider]]
name = "oa-2"
kind = "openai"
base_url = "{oa2}"
api_key_env = "ROUTES_KEY_OA2"

[[provider]]
name = "ant"
kind = "anthropic"
base_url = "{ant}"
api_key_env = "ROUTES_KEY_ANT"

[[provider]]
name = "dead"
kind = "openai"
base_url = "{dead}"
api_key_env = "ROUTES_KEY_OA2"

[[route]]
model = "gpt-*"
providers = ["oa-1", "oa-2"]

[[route]]
model = "text-embedding-*"
providers = ["oa-1"]

[[route]]
model = "fast"
target_model = "gpt-4o-mini"
providers = ["oa-1"]

[[route]]
model = "claude-*"
providers = ["ant"]

[[route]]
model = "refused-first"
providers = ["dead", "oa-2"]
{extra}"#
    )
}

async fn poll<T>(what: &str, f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    ibex_e2e::wait::poll(what, WITHIN, f).await
}

/// A record's `(prompt, completion, total, cache_read, cache_creation)` tokens.
type Tokens = (i64, i64, i64, i64, i64);

#[derive(Debug, PartialEq, Eq)]
struct Row {
    route: String,
    model: String,
    status: i32,
    prompt: i64,
    completion: i64,
    total: i64,
    cache_read: i64,
    cache_creation: i64,
    source: String,
    streamed: bool,
    provider: Option<String>,
    attempts: Option<i32>,
}

async fn row(pg: &Postgres, rid: &str) -> Result<Option<Row>> {
    let c = pg.admin_client().await?;
    let rows = c
        .query(
            "SELECT route, model, status, prompt_tokens, completion_tokens, total_tokens, \
             cache_read_tokens, cache_creation_tokens, usage_source, streamed, provider, attempts \
             FROM ibex_core.usage_records WHERE request_id = $1",
            &[&rid],
        )
        .await?;
    ensure!(rows.len() <= 1, "{} rows for {rid}", rows.len());
    rows.first()
        .map(|r| {
            Ok(Row {
                route: r.try_get(0)?,
                model: r.try_get(1)?,
                status: r.try_get(2)?,
                prompt: r.try_get(3)?,
                completion: r.try_get(4)?,
                total: r.try_get(5)?,
                cache_read: r.try_get(6)?,
                cache_creation: r.try_get(7)?,
                source: r.try_get(8)?,
                streamed: r.try_get(9)?,
                provider: r.try_get(10)?,
                attempts: r.try_get(11)?,
            })
        })
        .transpose()
}

async fn recorded(pg: &Postgres, rid: &str) -> Result<Row> {
    poll(&format!("the record of {rid}"), async || row(pg, rid).await).await
}

/// Checks a record's provider, attempts and token numbers `(prompt, completion, total,
/// cache_read, cache_creation)`.
async fn expect_record(
    fx: &Fx,
    rid: &str,
    route: &str,
    provider: &str,
    attempts: i32,
    tokens: Tokens,
    streamed: bool,
) -> Result<()> {
    let r = recorded(&fx.pg, rid).await?;
    let got = (
        r.prompt,
        r.completion,
        r.total,
        r.cache_read,
        r.cache_creation,
    );
    ensure!(
        r.route == route
            && r.provider.as_deref() == Some(provider)
            && r.attempts == Some(attempts)
            && got == tokens
            && r.source == "provider"
            && r.streamed == streamed
            && r.status == 200,
        "record of {rid}: {r:?}; expected {route} {provider} attempts {attempts} tokens {tokens:?} streamed {streamed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_end_to_end() -> Result<()> {
    let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
    let (pg, redis) = (pg?, redis?);
    ibex_e2e::procs::migrate(&pg).await?;
    let authd = Authd::start(&pg, &[]).await?;
    let (oa1, oa2, ant) = (
        Provider::start(Shape::OpenAi).await?,
        Provider::start(Shape::OpenAi).await?,
        Provider::start(Shape::Anthropic).await?,
    );
    // A port nothing listens on: connections to it are refused.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dead_url = format!("http://127.0.0.1:{dead_port}/v1");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("providers.toml");
    std::fs::write(
        &file,
        providers_file(&oa1.url(), &oa2.url(), &ant.url(), &dead_url, ""),
    )?;
    let file_s = file.to_string_lossy().into_owned();
    let proxy = Proxy::start(
        authd.grpc_addr,
        &redis.url(),
        &[
            ("IBEX_PROVIDERS_FILE", &file_s),
            ("IBEX_PROXY_THREADS", "1"),
            ("ROUTES_KEY_OA1", KEY_OA1),
            ("ROUTES_KEY_OA2", KEY_OA2),
            ("ROUTES_KEY_ANT", KEY_ANT),
        ],
    )
    .await?;
    poll("/ready 200", async || {
        Ok((Request::get("/ready").send(proxy.addr).await?.status == 200).then_some(()))
    })
    .await?;
    let t = authd
        .tenant(
            "routes",
            1_000_000,
            true,
            &["read,chat", "read,chat,embeddings"],
        )
        .await?;
    let org = t.org.clone();
    let [chat_pat, emb_pat]: [String; 2] = t.pats.try_into().map_err(|_| anyhow!("two tokens"))?;
    let fx = Fx {
        proxy,
        pg,
        oa1,
        oa2,
        ant,
        agent: t.agent,
        chat_pat,
        emb_pat,
        file,
        dead_url,
        seq: AtomicUsize::new(0),
    };

    every_route_plain(&fx).await.context("plain routes")?;
    every_route_streamed(&fx).await.context("streamed routes")?;
    stream_usage_both_ways(&fx)
        .await
        .context("include_usage on chat and completions streams")?;
    pat_as_x_api_key(&fx).await.context("x-api-key")?;
    organization_and_project(&fx)
        .await
        .context("OpenAI-Organization / OpenAI-Project")?;
    embeddings_permission(&fx)
        .await
        .context("embeddings permission")?;
    model_routing(&fx).await.context("model routing")?;
    fallback(&fx).await.context("fallback")?;
    no_fallback_after_the_first_byte(&fx)
        .await
        .context("no fallback mid-stream")?;
    breaker(&fx).await.context("circuit breaker")?;
    reload_under_load(&fx).await.context("SIGHUP reload")?;
    allow_lists(&fx, &authd, &org)
        .await
        .context("model allow-lists")?;
    inherited_lists(&fx, &authd, &org)
        .await
        .context("a token inherits its org's and its creator's lists")?;
    official_sdks(&fx).await.context("the official SDKs")?;
    let logs = fx.proxy.log_contents() + &authd.log_contents();
    for secret in [KEY_OA1, KEY_OA2, KEY_ANT, &fx.chat_pat, &fx.emb_pat] {
        ensure!(!logs.contains(secret), "a key or PAT is in the logs");
    }
    Ok(())
}

/// The provider's key reached it, the client's credentials did not.
fn keys_ok(seen: &fake_upstream::Seen, fx: &Fx, anthropic: bool, key: &str) -> Result<()> {
    let all = format!("{:?}", seen.headers);
    ensure!(
        !all.contains(&fx.chat_pat) && !all.contains(&fx.emb_pat) && !all.contains("ibex_pat_"),
        "a PAT reached the provider: {all}"
    );
    if anthropic {
        ensure!(seen.header("x-api-key") == Some(key), "x-api-key: {all}");
        ensure!(
            seen.header("authorization").is_none(),
            "Authorization sent: {all}"
        );
        ensure!(
            seen.header("anthropic-version") == Some(ANTHROPIC_VERSION),
            "anthropic-version not passed: {all}"
        );
    } else {
        ensure!(
            seen.header("authorization") == Some(&format!("Bearer {key}")),
            "Authorization: {all}"
        );
        ensure!(seen.header("x-api-key").is_none(), "x-api-key sent: {all}");
        ensure!(
            seen.header("anthropic-version").is_none(),
            "anthropic-version sent to openai: {all}"
        );
    }
    Ok(())
}

fn expect_ok(resp: &Response, provider: &str) -> Result<()> {
    ensure!(resp.status == 200, "expected 200:\n{}", resp.dump());
    ensure!(
        resp.header("x-ibex-provider") == Some(provider),
        "expected x-ibex-provider {provider}:\n{}",
        resp.dump()
    );
    Ok(())
}

async fn every_route_plain(fx: &Fx) -> Result<()> {
    let cases: [(&str, &str, &str, Tokens); 5] = [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            "chat.completion",
            (11, 7, 18, 0, 0),
        ),
        (
            "/v1/completions",
            r#"{"model":"gpt-4o","prompt":"hi"}"#,
            "text_completion",
            (3, 2, 5, 0, 0),
        ),
        (
            "/v1/responses",
            r#"{"model":"gpt-4o","input":"hi"}"#,
            "\"object\":\"response\"",
            (9, 4, 13, 0, 0),
        ),
        (
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"hi"}"#,
            "embedding",
            (6, 0, 6, 0, 0),
        ),
        (
            "/v1/messages",
            r#"{"model":"claude-3-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
            "\"type\":\"message\"",
            (21, 4, 25, 100, 7),
        ),
    ];
    for (path, body, marker, tokens) in cases {
        let anthropic = path == "/v1/messages";
        let (prov, name, key) = if anthropic {
            (&fx.ant, "ant", KEY_ANT)
        } else {
            (&fx.oa1, "oa-1", KEY_OA1)
        };
        let before = prov.seen_count();
        let rid = fx.rid("plain");
        let resp = fx
            .post(path, &fx.emb_pat, body, &rid)
            .send(fx.proxy.addr)
            .await?;
        expect_ok(&resp, name).with_context(|| path.to_owned())?;
        ensure!(resp.text().contains(marker), "{path}: {}", resp.dump());
        let seen = prov.seen();
        ensure!(
            seen.len() == before + 1,
            "{path}: provider saw {}",
            seen.len() - before
        );
        let last = seen.last().ok_or_else(|| anyhow!("nothing seen"))?;
        ensure!(
            last.path == path && last.body == body.as_bytes(),
            "{path}: {last:?}"
        );
        keys_ok(last, fx, anthropic, key)?;
        expect_record(fx, &rid, path, name, 1, tokens, false).await?;
    }
    Ok(())
}

/// Reads a stream to its end, or until the proxy closes it.
async fn read_to_end(s: &mut Streamed) -> Option<Progress> {
    s.read_until(|p| p.complete).await.ok()
}

fn in_order(body: &str, names: &[&str]) -> Result<()> {
    let mut at = 0;
    for n in names {
        let pos = body[at..]
            .find(n)
            .ok_or_else(|| anyhow!("{n} missing or out of order in {body}"))?;
        at += pos + n.len();
    }
    Ok(())
}

async fn every_route_streamed(fx: &Fx) -> Result<()> {
    let cases: [(&str, &str, &[&str], Tokens); 4] = [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-pause","stream":true,"messages":[]}"#,
            &["first", " last", "[DONE]"],
            (5, 2, 7, 0, 0),
        ),
        (
            "/v1/completions",
            r#"{"model":"gpt-pause","stream":true,"prompt":"x"}"#,
            &["first", " last", "[DONE]"],
            (3, 2, 5, 0, 0),
        ),
        (
            "/v1/responses",
            r#"{"model":"gpt-pause","stream":true,"input":"x"}"#,
            &[
                "event: response.created",
                "event: response.output_text.delta",
                "event: response.output_text.delta",
                "event: response.completed",
            ],
            (5, 2, 7, 0, 0),
        ),
        (
            "/v1/messages",
            r#"{"model":"claude-pause","stream":true,"max_tokens":9,"messages":[]}"#,
            &[
                "event: message_start",
                "event: content_block_delta",
                "event: content_block_delta",
                "event: message_delta",
                "event: message_stop",
            ],
            (25, 15, 40, 100, 7),
        ),
    ];
    for (path, body, names, tokens) in cases {
        let (prov, name) = if path == "/v1/messages" {
            (&fx.ant, "ant")
        } else {
            (&fx.oa1, "oa-1")
        };
        let last_before = prov.last_sent();
        let rid = fx.rid("stream");
        let mut s = Streamed::send(fx.proxy.addr, &fx.post(path, &fx.chat_pat, body, &rid)).await?;
        let first = s
            .read_until(|p| String::from_utf8_lossy(&p.body).contains("first"))
            .await
            .with_context(|| format!("{path}: the first event"))?;
        ensure!(first.status == 200, "{path}: {first:?}");
        ensure!(
            streamed::header_of(&first, "x-ibex-provider") == Some(name.to_owned()),
            "{path}: provider header {:?}",
            first.headers
        );
        // The first event is at the client while the provider still holds the last.
        ensure!(
            prov.last_sent() == last_before,
            "{path}: the provider already sent the rest"
        );
        prov.release();
        let done = s
            .read_until(|p| p.complete)
            .await
            .with_context(|| format!("{path}: the end"))?;
        let text = String::from_utf8_lossy(&done.body).into_owned();
        in_order(&text, names).with_context(|| path.to_owned())?;
        if path == "/v1/chat/completions" {
            ensure!(
                !text.contains("\"usage\""),
                "the usage-only chunk reached a client that did not ask: {text}"
            );
        }
        expect_record(fx, &rid, path, name, 1, tokens, true).await?;
    }
    Ok(())
}

/// The events of an SSE body, each with its blank line.
fn events(body: &str) -> Vec<String> {
    body.split_inclusive("\n\n").map(str::to_owned).collect()
}

/// Streamed chat and completions meter the provider's usage whether or not the client asked:
/// without `stream_options.include_usage` the proxy adds it (only that field) and removes the
/// provider's usage-only chunk from the client's stream; with it, the body and the stream pass
/// as they are. Compared event by event with what the provider sent.
async fn stream_usage_both_ways(fx: &Fx) -> Result<()> {
    for (path, tokens, extra) in [
        ("/v1/completions", (3, 2, 5, 0, 0), r#","prompt":"x"}"#),
        (
            "/v1/chat/completions",
            (5, 2, 7, 0, 0),
            r#","messages":[]}"#,
        ),
    ] {
        for asked in [false, true] {
            let options = if asked {
                r#","stream_options":{"include_usage":true}"#
            } else {
                ""
            };
            let body = format!(r#"{{"model":"gpt-4o","stream":true{options}{extra}"#);
            let rid = fx.rid("usage");
            let mut s =
                Streamed::send(fx.proxy.addr, &fx.post(path, &fx.chat_pat, &body, &rid)).await?;
            let done = s
                .read_until(|p| p.complete)
                .await
                .with_context(|| format!("{path} asked={asked}"))?;
            ensure!(done.status == 200, "{path}: {done:?}");
            let seen = fx.oa1.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
            let sent_body = String::from_utf8_lossy(&seen.body).into_owned();
            let want_body = if asked {
                body.clone()
            } else {
                format!(
                    r#"{{"stream_options":{{"include_usage":true}},{}"#,
                    &body[1..]
                )
            };
            ensure!(
                sent_body == want_body,
                "{path} asked={asked}: the provider got {sent_body}, expected {want_body}"
            );
            // The provider sent its usage-only chunk (it was asked either way).
            let (first, rest) = fake_provider::stream_events(Shape::OpenAi, path, "gpt-4o", true);
            let provider_sent: Vec<String> = first.into_iter().chain(rest).collect();
            ensure!(
                provider_sent
                    .iter()
                    .any(|e| e.contains("\"choices\":[]") && e.contains("\"usage\"")),
                "the fake sent no usage-only chunk: {provider_sent:?}"
            );
            let want: Vec<String> = if asked {
                provider_sent
            } else {
                provider_sent
                    .into_iter()
                    .filter(|e| !e.contains("\"choices\":[]"))
                    .collect()
            };
            let got = events(&String::from_utf8_lossy(&done.body));
            ensure!(
                got == want,
                "{path} asked={asked}: the client's events\n{got:#?}\nexpected\n{want:#?}"
            );
            expect_record(fx, &rid, path, "oa-1", 1, tokens, true)
                .await
                .with_context(|| format!("{path} asked={asked}"))?;
        }
    }
    Ok(())
}

/// `OpenAI-Organization` / `OpenAI-Project`: the provider's from the file, exactly, and never
/// the client's; a provider without them (and an anthropic one) gets none.
async fn organization_and_project(fx: &Fx) -> Result<()> {
    let send = async |model: &str, path: &str| -> Result<Response> {
        let body = format!(r#"{{"model":"{model}","max_tokens":1,"messages":[]}}"#);
        fx.post(path, &fx.chat_pat, &body, &fx.rid("orgproj"))
            .header("OpenAI-Organization", "org-client-spoof")
            .header("OpenAI-Project", "proj-client-spoof")
            .header("openai-organization", "org-client-lower")
            .send(fx.proxy.addr)
            .await
    };
    let expect = |seen: &fake_upstream::Seen, org: &[&str], project: &[&str]| -> Result<()> {
        ensure!(
            seen.all("openai-organization") == org && seen.all("openai-project") == project,
            "expected organization {org:?} project {project:?}: {:?}",
            seen.headers
        );
        let all = format!("{:?}", seen.headers);
        ensure!(!all.contains("client-"), "a client's header passed: {all}");
        Ok(())
    };
    expect_ok(&send("gpt-4o", "/v1/chat/completions").await?, "oa-1")?;
    let seen = fx.oa1.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    expect(&seen, &[ORG_OA1], &[PROJECT_OA1]).context("oa-1")?;
    // `refused-first` is answered by oa-2, which has neither key.
    expect_ok(
        &send("refused-first", "/v1/chat/completions").await?,
        "oa-2",
    )?;
    let seen = fx.oa2.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    expect(&seen, &[], &[]).context("oa-2")?;
    expect_ok(&send("claude-3-5", "/v1/messages").await?, "ant")?;
    let seen = fx.ant.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    expect(&seen, &[], &[]).context("ant")?;
    Ok(())
}

async fn pat_as_x_api_key(fx: &Fx) -> Result<()> {
    let body = r#"{"model":"claude-3-5","max_tokens":16,"messages":[]}"#;
    let resp = Request::post("/v1/messages", body)
        .header("Content-Type", "application/json")
        .header("x-api-key", &fx.chat_pat)
        .header("anthropic-version", ANTHROPIC_VERSION)
        .header("X-IBEX-Agent-ID", &fx.agent)
        .send(fx.proxy.addr)
        .await?;
    expect_ok(&resp, "ant")?;
    let last = fx.ant.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    keys_ok(&last, fx, true, KEY_ANT)?;
    // Anywhere else the PAT as x-api-key is no credential at all.
    let resp = Request::post(
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[]}"#,
    )
    .header("x-api-key", &fx.chat_pat)
    .header("X-IBEX-Agent-ID", &fx.agent)
    .send(fx.proxy.addr)
    .await?;
    ensure!(
        resp.status == 401 && resp.error_code().as_deref() == Some("MISSING_TOKEN"),
        "x-api-key on chat:\n{}",
        resp.dump()
    );
    Ok(())
}

async fn embeddings_permission(fx: &Fx) -> Result<()> {
    let before = fx.oa1.seen_count();
    let body = r#"{"model":"text-embedding-3-small","input":"hi"}"#;
    let rid = fx.rid("emb");
    let resp = fx
        .post("/v1/embeddings", &fx.chat_pat, body, &rid)
        .send(fx.proxy.addr)
        .await?;
    ensure!(
        resp.status == 403 && resp.error_code().as_deref() == Some("INSUFFICIENT_PERMISSIONS"),
        "a token without embeddings:\n{}",
        resp.dump()
    );
    ensure!(
        fx.oa1.seen_count() == before,
        "the refused request reached a provider"
    );
    Ok(())
}

async fn model_routing(fx: &Fx) -> Result<()> {
    let addr = fx.proxy.addr;
    for (path, body, status, code) in [
        (
            "/v1/chat/completions",
            r#"{"model":"llama-3","messages":[]}"#,
            404,
            "MODEL_NOT_FOUND",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[]}"#,
            404,
            "MODEL_NOT_FOUND",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"claude-3-5","messages":[]}"#,
            400,
            "MODEL_ROUTE_MISMATCH",
        ),
        (
            "/v1/messages",
            r#"{"model":"gpt-4o","max_tokens":1,"messages":[]}"#,
            400,
            "MODEL_ROUTE_MISMATCH",
        ),
    ] {
        let resp = fx
            .post(path, &fx.chat_pat, body, &fx.rid("model"))
            .send(addr)
            .await?;
        ensure!(
            resp.status == status && resp.error_code().as_deref() == Some(code),
            "{path} {body}: expected {status} {code}:\n{}",
            resp.dump()
        );
    }
    // An alias: the provider gets the target's name, the rest of the body byte for byte.
    let body = r#"{"model": "fast", "messages": [{"role":"user","content":"a \"model\": x"}]}"#;
    let resp = fx
        .post("/v1/chat/completions", &fx.chat_pat, body, &fx.rid("alias"))
        .send(addr)
        .await?;
    expect_ok(&resp, "oa-1")?;
    let last = fx.oa1.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    let want =
        r#"{"model": "gpt-4o-mini", "messages": [{"role":"user","content":"a \"model\": x"}]}"#;
    ensure!(
        last.body == want.as_bytes(),
        "alias body: {}",
        String::from_utf8_lossy(&last.body)
    );
    // /v1/models: the routes, OpenAI's list shape.
    let resp = Request::get("/v1/models")
        .auth(&fx.chat_pat, &fx.agent)
        .send(addr)
        .await?;
    ensure!(resp.status == 200, "{}", resp.dump());
    let ids: Vec<String> = resp.json()?["data"]
        .as_array()
        .ok_or_else(|| anyhow!("no data"))?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        ids == [
            "gpt-*",
            "text-embedding-*",
            "fast",
            "claude-*",
            "refused-first"
        ],
        "models: {ids:?}"
    );
    Ok(())
}

async fn chat(fx: &Fx, model: &str, what: &str) -> Result<(String, Response)> {
    let rid = fx.rid(what);
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    let resp = fx
        .post("/v1/chat/completions", &fx.chat_pat, &body, &rid)
        .send(fx.proxy.addr)
        .await?;
    Ok((rid, resp))
}

/// The `ibex_provider_*` lines of `/metrics`, by series (`name{labels}`).
async fn provider_metrics(fx: &Fx) -> Result<std::collections::HashMap<String, u64>> {
    let resp = Request::get("/metrics").send(fx.proxy.admin).await?;
    ensure!(resp.status == 200, "{}", resp.dump());
    let mut out = std::collections::HashMap::new();
    for line in resp.text().lines() {
        if !line.starts_with("ibex_provider_") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("bad metric line {line}"))?;
        out.insert(series.to_owned(), value.parse()?);
    }
    Ok(out)
}

/// `after - before` of every series named in `want`, which must equal the wanted numbers.
fn metric_deltas(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    want: &[(&str, u64)],
) -> Result<()> {
    for (series, n) in want {
        let got = after
            .get(*series)
            .ok_or_else(|| anyhow!("no {series} in /metrics: {after:?}"))?
            - before.get(*series).copied().unwrap_or(0);
        ensure!(got == *n, "{series}: +{got}, expected +{n}");
    }
    Ok(())
}

async fn fallback(fx: &Fx) -> Result<()> {
    let metrics_before = provider_metrics(fx).await?;
    let tokens = (11, 7, 18, 0, 0);
    // 503 from the first provider: the second answers.
    fx.oa1.set(Behaviour::Status(503));
    let (b1, b2) = (fx.oa1.seen_count(), fx.oa2.seen_count());
    let (rid, resp) = chat(fx, "gpt-4o", "f503").await?;
    expect_ok(&resp, "oa-2")?;
    ensure!(
        fx.oa1.seen_count() == b1 + 1 && fx.oa2.seen_count() == b2 + 1,
        "each provider once"
    );
    let last = fx.oa2.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    keys_ok(&last, fx, false, KEY_OA2)?;
    expect_record(fx, &rid, "/v1/chat/completions", "oa-2", 2, tokens, false).await?;
    // 429 likewise.
    fx.oa1.set(Behaviour::Status(429));
    let (rid, resp) = chat(fx, "gpt-4o", "f429").await?;
    expect_ok(&resp, "oa-2")?;
    expect_record(fx, &rid, "/v1/chat/completions", "oa-2", 2, tokens, false).await?;
    // A 4xx other than 429 is the client's answer: no fallback.
    fx.oa1.set(Behaviour::Status(400));
    let (_, resp) = chat(fx, "gpt-4o", "f400").await?;
    ensure!(
        resp.status == 400 && resp.header("x-ibex-provider") == Some("oa-1"),
        "{}",
        resp.dump()
    );
    // A timeout before the response head (oa-1 has timeout = "1s").
    fx.oa1.set(Behaviour::Silent);
    let (rid, resp) = chat(fx, "gpt-4o", "ftimeout").await?;
    expect_ok(&resp, "oa-2")?;
    expect_record(fx, &rid, "/v1/chat/completions", "oa-2", 2, tokens, false).await?;
    fx.oa1.set(Behaviour::Normal);
    // A refused connection.
    let (rid, resp) = chat(fx, "refused-first", "frefused").await?;
    expect_ok(&resp, "oa-2")?;
    expect_record(fx, &rid, "/v1/chat/completions", "oa-2", 2, tokens, false).await?;
    ensure!(fx.dead_url.starts_with("http://127.0.0.1:"), "dead url");
    // Back to the first provider (this also closes its breaker's count).
    let (_, resp) = chat(fx, "gpt-4o", "fback").await?;
    expect_ok(&resp, "oa-1")?;
    // /metrics per provider: oa-1 answered the 400 and the last one and failed once of each
    // kind but refused, each time falling back to oa-2; `dead` refused once.
    let after = provider_metrics(fx).await?;
    metric_deltas(
        &metrics_before,
        &after,
        &[
            ("ibex_provider_requests_total{provider=\"oa-1\"}", 2),
            ("ibex_provider_requests_total{provider=\"oa-2\"}", 4),
            ("ibex_provider_requests_total{provider=\"dead\"}", 0),
            ("ibex_provider_fallbacks_total{provider=\"oa-1\"}", 3),
            ("ibex_provider_fallbacks_total{provider=\"oa-2\"}", 0),
            ("ibex_provider_fallbacks_total{provider=\"dead\"}", 1),
            (
                "ibex_provider_failures_total{provider=\"oa-1\",kind=\"5xx\"}",
                1,
            ),
            (
                "ibex_provider_failures_total{provider=\"oa-1\",kind=\"429\"}",
                1,
            ),
            (
                "ibex_provider_failures_total{provider=\"oa-1\",kind=\"timeout\"}",
                1,
            ),
            (
                "ibex_provider_failures_total{provider=\"oa-1\",kind=\"refused\"}",
                0,
            ),
            (
                "ibex_provider_failures_total{provider=\"dead\",kind=\"refused\"}",
                1,
            ),
            (
                "ibex_provider_failures_total{provider=\"oa-2\",kind=\"5xx\"}",
                0,
            ),
        ],
    )
    .context("provider metrics after the fallbacks")?;
    ensure!(
        after.get("ibex_provider_breaker_state{provider=\"oa-1\",worker=\"0\"}") == Some(&0),
        "oa-1's breaker not closed: {after:?}"
    );
    Ok(())
}

async fn no_fallback_after_the_first_byte(fx: &Fx) -> Result<()> {
    fx.oa1.set(Behaviour::CutMidStream);
    let b2 = fx.oa2.seen_count();
    let rid = fx.rid("cut");
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let mut s = Streamed::send(
        fx.proxy.addr,
        &fx.post("/v1/chat/completions", &fx.chat_pat, body, &rid),
    )
    .await?;
    let first = s
        .read_until(|p| String::from_utf8_lossy(&p.body).contains("first"))
        .await?;
    ensure!(
        streamed::header_of(&first, "x-ibex-provider") == Some("oa-1".to_owned()),
        "{first:?}"
    );
    let end = read_to_end(&mut s).await;
    if let Some(p) = end {
        let text = String::from_utf8_lossy(&p.body).into_owned();
        ensure!(
            !text.contains(" last") && text.matches("first").count() == 1,
            "replayed: {text}"
        );
    }
    fx.oa1.set(Behaviour::Normal);
    ensure!(
        fx.oa2.seen_count() == b2,
        "the stream was replayed on another provider"
    );
    let r = recorded(&fx.pg, &rid).await?;
    ensure!(
        r.provider.as_deref() == Some("oa-1") && r.attempts == Some(1),
        "record: {r:?}"
    );
    Ok(())
}

async fn breaker(fx: &Fx) -> Result<()> {
    fx.oa1.set(Behaviour::Status(503));
    // Enough failures in a row to open oa-1's breaker; each request still succeeds on oa-2.
    for _ in 0..5 {
        let (_, resp) = chat(fx, "gpt-4o", "brk").await?;
        expect_ok(&resp, "oa-2")?;
    }
    let b1 = fx.oa1.seen_count();
    let (rid, resp) = chat(fx, "gpt-4o", "brk-open").await?;
    expect_ok(&resp, "oa-2")?;
    ensure!(
        fx.oa1.seen_count() == b1,
        "an open breaker's provider was still tried"
    );
    let open = provider_metrics(fx).await?;
    ensure!(
        open.get("ibex_provider_breaker_state{provider=\"oa-1\",worker=\"0\"}") == Some(&1)
            && open.get("ibex_provider_breaker_state{provider=\"oa-2\",worker=\"0\"}") == Some(&0),
        "breaker states while oa-1 is open: {open:?}"
    );
    expect_record(
        fx,
        &rid,
        "/v1/chat/completions",
        "oa-2",
        1,
        (11, 7, 18, 0, 0),
        false,
    )
    .await?;
    // Healthy again: after the open period one request probes it and it is used again.
    fx.oa1.set(Behaviour::Normal);
    poll("oa-1 probed back", async || {
        let (_, resp) = chat(fx, "gpt-4o", "brk-probe").await?;
        ensure!(resp.status == 200, "{}", resp.dump());
        Ok((resp.header("x-ibex-provider") == Some("oa-1")).then_some(()))
    })
    .await?;
    let closed = provider_metrics(fx).await?;
    ensure!(
        closed.get("ibex_provider_breaker_state{provider=\"oa-1\",worker=\"0\"}") == Some(&0),
        "oa-1's breaker not closed after its probe: {closed:?}"
    );
    Ok(())
}

async fn reload_under_load(fx: &Fx) -> Result<()> {
    let (_, resp) = chat(fx, "newmodel", "before").await?;
    ensure!(
        resp.status == 404,
        "newmodel before the reload:\n{}",
        resp.dump()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 0..4 {
        let (stop, addr) = (stop.clone(), fx.proxy.addr);
        let req = fx.post(
            "/v1/chat/completions",
            &fx.chat_pat,
            r#"{"model":"gpt-4o","messages":[]}"#,
            &format!("routes-load-{n}"),
        );
        tasks.push(tokio::spawn(async move {
            let mut served = 0usize;
            let mut conn = Conn::connect(addr).await?;
            while !stop.load(Ordering::SeqCst) {
                let resp = conn.send(&req, false).await?;
                if resp.status != 200 {
                    bail!("a request failed during the reload:\n{}", resp.dump());
                }
                served += 1;
            }
            Ok::<usize, anyhow::Error>(served)
        }));
    }
    let extra = "\n[[route]]\nmodel = \"newmodel\"\nproviders = [\"oa-2\"]\n";
    std::fs::write(
        &fx.file,
        providers_file(
            &fx.oa1.url(),
            &fx.oa2.url(),
            &fx.ant.url(),
            &fx.dead_url,
            extra,
        ),
    )?;
    fx.proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    poll("newmodel routed after SIGHUP", async || {
        let (_, resp) = chat(fx, "newmodel", "after").await?;
        Ok((resp.status == 200 && resp.header("x-ibex-provider") == Some("oa-2")).then_some(()))
    })
    .await?;
    // A bad file keeps the table in use.
    std::fs::write(&fx.file, "[[provider]]\nname = 1\n")?;
    fx.proxy.signal(nix::sys::signal::Signal::SIGHUP)?;
    poll("the bad file refused in the log", async || {
        Ok(fx
            .proxy
            .log_contents()
            .contains("providers not reloaded; keeping the old ones")
            .then_some(()))
    })
    .await?;
    let (_, resp) = chat(fx, "newmodel", "kept").await?;
    expect_ok(&resp, "oa-2")?;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    ensure!(total > 0, "no request served under load");
    eprintln!("routes: {total} requests served across two reloads, none failed");
    Ok(())
}

/// A token (operator key) bound to the fixture's agent: `read,chat`, with `--models` if given.
async fn token_with_models(
    fx: &Fx,
    authd: &Authd,
    org: &str,
    models: Option<&str>,
) -> Result<String> {
    operator_token(fx, authd, org, "read,chat", models).await
}

/// A token made with the operator key, bound to the fixture's agent.
async fn operator_token(
    fx: &Fx,
    authd: &Authd,
    org: &str,
    permissions: &str,
    models: Option<&str>,
) -> Result<String> {
    let mut args = vec![
        "token",
        "create",
        "--org",
        org,
        "--agent",
        &fx.agent,
        "--permissions",
        permissions,
    ];
    if let Some(m) = models {
        args.extend(["--models", m]);
    }
    let v = authd.ibexctl_json(&args).await?;
    ibex_e2e::procs::json_str(&v, "token")
}

async fn chat_as(fx: &Fx, pat: &str, model: &str) -> Result<Response> {
    let body = format!(
        r#"{{"model":{},"messages":[]}}"#,
        serde_json::to_string(model)?
    );
    fx.post("/v1/chat/completions", pat, &body, &fx.rid("allow"))
        .send(fx.proxy.addr)
        .await
}

fn refused(resp: &Response, what: &str) -> Result<()> {
    ensure!(
        resp.status == 403 && resp.error_code().as_deref() == Some("MODEL_NOT_ALLOWED"),
        "{what}: expected 403 MODEL_NOT_ALLOWED:\n{}",
        resp.dump()
    );
    Ok(())
}

async fn models_of(fx: &Fx, pat: &str) -> Result<Vec<String>> {
    let resp = Request::get("/v1/models")
        .auth(pat, &fx.agent)
        .send(fx.proxy.addr)
        .await?;
    ensure!(resp.status == 200, "{}", resp.dump());
    Ok(resp.json()?["data"]
        .as_array()
        .ok_or_else(|| anyhow!("no data"))?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect())
}

async fn allow_lists(fx: &Fx, authd: &Authd, org: &str) -> Result<()> {
    // An allowed alias to an allowed target passes; the provider gets the target.
    let both = token_with_models(fx, authd, org, Some("fast, GPT-4o-mini")).await?;
    let resp = chat_as(fx, &both, "fast").await?;
    expect_ok(&resp, "oa-1")?;
    let last = fx.oa1.seen().pop().ok_or_else(|| anyhow!("nothing seen"))?;
    ensure!(
        String::from_utf8_lossy(&last.body).contains("\"gpt-4o-mini\""),
        "alias target not sent"
    );
    // An allowed alias to a refused target is refused: the alias cannot bypass the list.
    let alias_only = token_with_models(fx, authd, org, Some("fast")).await?;
    let before = fx.oa1.seen_count();
    refused(
        &chat_as(fx, &alias_only, "fast").await?,
        "alias to a refused target",
    )?;
    // Case and whitespace variants of a refused name, routed or not.
    for name in [
        "gpt-4o", "GPT-4o", " gpt-4o", "gpt-4o\t", "Gpt-4O ", "llama-3",
    ] {
        refused(&chat_as(fx, &both, name).await?, name)?;
    }
    ensure!(
        fx.oa1.seen_count() == before,
        "a refused model reached a provider"
    );
    // /v1/models lists only what the token may call.
    let ids = models_of(fx, &both).await?;
    ensure!(
        ids == ["gpt-4o-mini", "fast"],
        "models of a fast,gpt-4o-mini token: {ids:?}"
    );
    // The org's list applies to every token of the org, and its change lands within the
    // revocation SLA (the org invalidation every proxy receives).
    let set = authd
        .ibexctl_json(&[
            "org",
            "set-models",
            "--org",
            org,
            "--allow",
            "gpt-4o-mini, fast",
        ])
        .await?;
    ensure!(
        set["allowed_models"] == serde_json::json!(["gpt-4o-mini", "fast"]),
        "{set}"
    );
    poll("the org list applied", async || {
        Ok((chat_as(fx, &fx.chat_pat, "gpt-4o").await?.status == 403).then_some(()))
    })
    .await?;
    refused(
        &chat_as(fx, &fx.chat_pat, "GPT-4O").await?,
        "org list, case variant",
    )?;
    expect_ok(&chat_as(fx, &fx.chat_pat, "fast").await?, "oa-1")?;
    let ids = models_of(fx, &fx.chat_pat).await?;
    ensure!(
        ids == ["gpt-4o-mini", "fast"],
        "models under the org list: {ids:?}"
    );
    authd
        .ibexctl_json(&["org", "set-models", "--org", org, "--allow", ""])
        .await?;
    poll("the org list lifted", async || {
        Ok((chat_as(fx, &fx.chat_pat, "gpt-4o").await?.status == 200).then_some(()))
    })
    .await
}

/// The proxy's `IBEX_REVOCATION_SLA_MS` (the harness leaves the default).
const REVOCATION_SLA: Duration = Duration::from_millis(300);

/// `ibexctl token create` authorised by the PAT `manager` (not the operator key).
async fn token_by_pat(
    authd: &Authd,
    manager: &str,
    org: &str,
    agent: &str,
    models: Option<&str>,
) -> Result<ibex_e2e::procs::CtlOutput> {
    let mut env: Vec<(String, String)> = authd
        .ibexctl_env()
        .into_iter()
        .filter(|(k, _)| k != "IBEX_ADMIN_KEY")
        .collect();
    env.push(("IBEX_TOKEN".to_owned(), manager.to_owned()));
    let mut args = vec![
        "token",
        "create",
        "--org",
        org,
        "--agent",
        agent,
        "--permissions",
        "read,chat",
    ];
    if let Some(m) = models {
        args.extend(["--models", m]);
    }
    ibex_e2e::procs::ibexctl(&env, &args).await
}

/// `org set-models`, then the first request sent later than the revocation SLA after it
/// returned must see the change (`changed` true), polled without sleeping.
async fn set_org_models_within_sla(
    fx: &Fx,
    authd: &Authd,
    org: &str,
    allow: &str,
    pat: &str,
    model: &str,
    want_status: u16,
) -> Result<()> {
    authd
        .ibexctl_json(&["org", "set-models", "--org", org, "--allow", allow])
        .await?;
    let committed = std::time::Instant::now();
    loop {
        let sent = std::time::Instant::now();
        let resp = chat_as(fx, pat, model).await?;
        if resp.status == want_status {
            eprintln!(
                "routes: org list {allow:?} seen by a request sent {:?} after set-models returned",
                sent - committed
            );
            return Ok(());
        }
        ensure!(
            sent <= committed + REVOCATION_SLA,
            "org list {allow:?}: {model} still answered {} by a request sent {:?} after \
             set-models returned (SLA {REVOCATION_SLA:?})",
            resp.status,
            sent - committed
        );
    }
}

/// The lists against the real authd and Postgres: a token created without `--models` under an
/// org with a list is held to the org's list (read with each validation, not copied at
/// creation); a token with its own list is held to both; a token made with a PAT and no
/// `--models` inherits that PAT's list, and cannot be given more; an org change reaches the
/// proxy within the revocation SLA.
async fn inherited_lists(fx: &Fx, authd: &Authd, org: &str) -> Result<()> {
    authd
        .ibexctl_json(&[
            "org",
            "set-models",
            "--org",
            org,
            "--allow",
            "gpt-4o*, fast",
        ])
        .await?;
    let plain = token_with_models(fx, authd, org, None).await?;
    // The token was made after the list: the first validation already carries it.
    let before = fx.oa1.seen_count() + fx.oa2.seen_count();
    refused(
        &chat_as(fx, &plain, "gpt-3.5").await?,
        "outside the org list",
    )?;
    refused(
        &chat_as(fx, &plain, "GPT-3.5 ").await?,
        "outside, a variant",
    )?;
    ensure!(
        fx.oa1.seen_count() + fx.oa2.seen_count() == before,
        "a refused model reached a provider"
    );
    expect_ok(&chat_as(fx, &plain, "gpt-4o").await?, "oa-1")?;
    expect_ok(&chat_as(fx, &plain, "gpt-4o-mini").await?, "oa-1")?;

    // Its own list and the org's: only what both allow.
    let own = token_with_models(fx, authd, org, Some("gpt-4o-mini, gpt-3.5")).await?;
    expect_ok(&chat_as(fx, &own, "gpt-4o-mini").await?, "oa-1")?;
    refused(&chat_as(fx, &own, "gpt-3.5").await?, "own list only")?;
    refused(&chat_as(fx, &own, "gpt-4o").await?, "org list only")?;
    let ids = models_of(fx, &own).await?;
    ensure!(
        ids == ["gpt-4o-mini"],
        "models of the own-list token: {ids:?}"
    );

    // A token made with a PAT: no --models is the PAT's list, not "every model".
    let manager = operator_token(
        fx,
        authd,
        org,
        "read,chat,tokens:manage",
        Some("gpt-4o-mini,fast"),
    )
    .await?;
    let child = token_by_pat(authd, &manager, org, &fx.agent, None)
        .await?
        .json()?;
    let child = ibex_e2e::procs::json_str(&child, "token")?;
    expect_ok(&chat_as(fx, &child, "gpt-4o-mini").await?, "oa-1")?;
    expect_ok(&chat_as(fx, &child, "fast").await?, "oa-1")?;
    refused(
        &chat_as(fx, &child, "gpt-4o").await?,
        "the org allows it, the creator's list does not",
    )?;
    let wider = token_by_pat(authd, &manager, org, &fx.agent, Some("gpt-4o")).await?;
    ensure!(
        !wider.status.success() && wider.stderr.to_lowercase().contains("permission"),
        "a PAT gave a token a model outside its own list: {wider:?}"
    );

    // An org change reaches the proxy within the SLA, both ways.
    set_org_models_within_sla(
        fx,
        authd,
        org,
        "gpt-4o*, fast, gpt-3.5",
        &own,
        "gpt-3.5",
        200,
    )
    .await
    .context("widened")?;
    set_org_models_within_sla(fx, authd, org, "fast", &plain, "gpt-4o", 403)
        .await
        .context("narrowed")?;
    set_org_models_within_sla(fx, authd, org, "", &plain, "gpt-3.5", 200)
        .await
        .context("lifted")?;
    Ok(())
}

/// A virtualenv with the official `openai` and `anthropic` SDKs from PyPI, made once per target
/// directory. No skipping: without python3 and its venv module the suite fails and says how to
/// get them (`scripts/ensure-deps.sh`).
async fn sdk_python() -> Result<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let py = dir.join("bin").join("python");
    let ready = py.exists()
        && tokio::process::Command::new(&py)
            .args(["-c", "import openai, anthropic"])
            .status()
            .await
            .is_ok_and(|s| s.success());
    if ready {
        return Ok(py);
    }
    let made = tokio::process::Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg("--clear")
        .arg(&dir)
        .status()
        .await
        .context(
            "python3 is required (scripts/ensure-deps.sh installs python3 and python3-venv)",
        )?;
    ensure!(
        made.success(),
        "python3 -m venv failed (install python3-venv: scripts/ensure-deps.sh)"
    );
    let pip = tokio::process::Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
            "anthropic",
        ])
        .status()
        .await?;
    ensure!(pip.success(), "pip install openai anthropic failed");
    Ok(py)
}

async fn official_sdks(fx: &Fx) -> Result<()> {
    let py = sdk_python().await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/routes/sdk_check.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&py)
            .arg(script)
            .env("IBEX_BASE", format!("http://{}", fx.proxy.addr))
            .env("IBEX_PAT", &fx.emb_pat)
            .env("IBEX_AGENT", &fx.agent)
            .output(),
    )
    .await
    .context("the SDK script did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    ensure!(
        out.status.success() && stdout.contains("sdk: all checks passed"),
        "the SDK checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
