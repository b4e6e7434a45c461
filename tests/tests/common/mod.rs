//! The environment of the security suite (`tests/tests/security.rs`).
//!
//! One stack per test binary — a throwaway Postgres (migrated) and Redis, ONE `ibex-authd` and
//! TWO `ibex-proxy` processes sharing them — and, per case, a [`Ctx`]: its own client address
//! (a distinct `127.x.y.z`, so the proxy's per-address flood guard never couples two cases),
//! its own orgs, agents and tokens made through authd's gRPC API with the operator key, and a
//! client that records every response it receives (for the SEC-6.x envelope checks over the
//! whole run) and every credential it sends (for the log check at the end).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::{Conn, Request, Response, ResponseHead};
use ibex_e2e::{procs, Authd, Postgres, Proxy, Redis};
use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

/// Permission bits (SPEC §2).
pub const READ: u64 = 1;
pub const CHAT: u64 = 2;
pub const TOKENS_MANAGE: u64 = 4;
pub const AGENTS_MANAGE: u64 = 8;
pub const ALL: u64 = READ | CHAT | TOKENS_MANAGE | AGENTS_MANAGE;

pub const PROBE: &str = "/v1/internal/auth-probe";
pub const CHAT_PATH: &str = "/v1/chat/completions";
pub const CHAT_BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// Writes straight to the process's stderr: the test harness captures `println!`/`eprintln!`
/// of passing tests, and the suite's measurements must show in every run (`make test` too).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Milliseconds since the unix epoch, as authd and the proxies count them.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A secret of the PAT alphabet and length (SPEC §2): 64 alphanumerics.
pub fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `ibex_pat_<id>_<secret>`.
pub fn pat(id: &str, secret: &str) -> String {
    format!("ibex_pat_{id}_{secret}")
}

/// A well-formed PAT whose id exists nowhere.
pub fn unknown_pat() -> String {
    pat(&uuid::Uuid::new_v4().to_string(), &random_secret())
}

/// One response the suite received, with what was asked.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub case: &'static str,
    pub what: String,
    /// The `X-Request-ID` the client sent, if any.
    pub sent_request_id: Option<String>,
    pub resp: Response,
}

#[derive(Default)]
struct Record {
    exchanges: Vec<Exchange>,
    /// Every credential the suite created or sent (full PAT strings and bare secrets).
    secrets: BTreeSet<String>,
}

/// The shared stack. Drop order = field order: proxies, authd, Redis, Postgres.
pub struct Env {
    pub proxies: Vec<Proxy>,
    authd: tokio::sync::Mutex<Authd>,
    redis: tokio::sync::Mutex<Redis>,
    _pg: Postgres,
    admin_key: String,
    grpc: AuthServiceClient<Channel>,
    /// `IBEX_REVOCATION_SLA_MS` the proxies run with (default 300 ms).
    pub sla: Duration,
    record: Mutex<Record>,
    next_ip: AtomicU32,
}

impl Env {
    /// Postgres and Redis in parallel, migrations, authd, then two proxies against them.
    pub async fn start() -> Result<Arc<Env>> {
        let sla_ms: u64 = match std::env::var("IBEX_REVOCATION_SLA_MS") {
            Ok(v) => v.parse().context("IBEX_REVOCATION_SLA_MS")?,
            Err(_) => 300,
        };
        let sla_env = sla_ms.to_string();
        let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
        let (pg, redis) = (pg?, redis?);
        procs::migrate(&pg).await?;
        let authd = Authd::start(&pg, &[]).await?;
        let proxy_env = [("IBEX_REVOCATION_SLA_MS", sla_env.as_str())];
        let redis_url = redis.url();
        let (p0, p1) = tokio::join!(
            Proxy::start(authd.grpc_addr, &redis_url, &proxy_env),
            Proxy::start(authd.grpc_addr, &redis_url, &proxy_env),
        );
        let grpc = AuthServiceClient::new(Channel::from_shared(authd.grpc_url())?.connect_lazy());
        let env = Env {
            proxies: vec![p0?, p1?],
            admin_key: authd.admin_key.clone(),
            authd: tokio::sync::Mutex::new(authd),
            redis: tokio::sync::Mutex::new(redis),
            _pg: pg,
            grpc,
            sla: Duration::from_millis(sla_ms),
            record: Mutex::default(),
            next_ip: AtomicU32::new(0),
        };
        env.remember_secret(&env.admin_key.clone());
        env.remember_secret(ibex_e2e::procs::service_key());
        let env = Arc::new(env);
        // Both proxies ready: invalidation feed and Redis up.
        for p in 0..env.proxies.len() {
            env.wait_ready(p, true, Duration::from_secs(15)).await?;
        }
        Ok(env)
    }

    pub fn addr(&self, proxy: usize) -> SocketAddr {
        self.proxies[proxy % self.proxies.len()].addr
    }

    /// A client address no other case uses: 127.20.0.1, 127.20.0.2, ...
    pub fn fresh_ip(&self) -> IpAddr {
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed) + 1;
        let [_, b, c, d] = n.to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(127, 20 + b, c, d))
    }

    pub fn ctx(self: &Arc<Env>, case: &'static str) -> Ctx {
        Ctx {
            env: self.clone(),
            case,
            ip: self.fresh_ip(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a credential so no response and no log may contain it. A PAT is remembered
    /// whole and by its secret part.
    pub fn remember_secret(&self, value: &str) {
        let mut record = self.lock();
        if value.len() >= 16 {
            record.secrets.insert(value.to_owned());
        }
        if let Some(secret) = value
            .strip_prefix("ibex_pat_")
            .and_then(|rest| rest.rsplit_once('_'))
            .map(|(_, secret)| secret)
        {
            if secret.len() >= 16 {
                record.secrets.insert(secret.to_owned());
            }
        }
    }

    pub fn secrets(&self) -> Vec<String> {
        self.lock().secrets.iter().cloned().collect()
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.lock().exchanges.clone()
    }

    fn record(&self, exchange: Exchange) {
        self.lock().exchanges.push(exchange);
    }

    /// Polls `/ready` on one proxy until it answers 200 (`up`) or 503 (`!up`).
    pub async fn wait_ready(&self, proxy: usize, up: bool, within: Duration) -> Result<Response> {
        let deadline = Instant::now() + within;
        let want = if up { 200 } else { 503 };
        loop {
            let r = Request::get("/ready").send(self.addr(proxy)).await?;
            if r.status == want {
                return Ok(r);
            }
            ensure!(
                Instant::now() < deadline,
                "proxy {proxy} /ready never answered {want} within {within:?}:\n{}",
                r.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every log the services wrote so far: (name, text).
    pub async fn logs(&self) -> Vec<(String, String)> {
        let mut logs = vec![(
            "ibex-authd".to_owned(),
            self.authd.lock().await.log_contents(),
        )];
        for (i, p) in self.proxies.iter().enumerate() {
            logs.push((format!("ibex-proxy #{i}"), p.log_contents()));
        }
        logs
    }

    pub async fn stop_redis(&self) -> Result<()> {
        self.redis.lock().await.stop().await
    }

    pub async fn restart_redis(&self) -> Result<()> {
        self.redis.lock().await.restart().await
    }

    pub async fn kill_authd(&self) {
        self.authd.lock().await.kill();
    }

    pub async fn restart_authd(&self) -> Result<()> {
        self.authd.lock().await.restart().await
    }

    fn admin<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("x-ibex-admin-key", self.admin_key.parse()?);
        req.set_timeout(Duration::from_secs(20));
        Ok(req)
    }
}

/// A freshly created token.
#[derive(Debug, Clone)]
pub struct Token {
    pub id: String,
    /// The whole plaintext PAT.
    pub pat: String,
    pub expires_at_ms: i64,
}

impl Token {
    /// The same id with another (wrong) secret.
    pub fn with_wrong_secret(&self) -> String {
        pat(&self.id, &random_secret())
    }
}

/// An org with one active agent and one token.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub org: String,
    pub agent: String,
    pub token: Token,
}

impl Tenant {
    /// GET of the internal auth probe with this tenant's token and agent.
    pub fn probe(&self) -> Request {
        Request::get(PROBE).auth(&self.token.pat, &self.agent)
    }
}

/// What to create a token with.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub permissions: u64,
    pub agent: Option<String>,
    pub expires_in_ms: i64,
}

/// One case's handle: the shared stack, its name (for the record) and its client address.
#[derive(Clone)]
pub struct Ctx {
    pub env: Arc<Env>,
    pub case: &'static str,
    pub ip: IpAddr,
}

impl Ctx {
    /// Sends `req` to proxy `p` on a fresh connection from this case's address and records it.
    pub async fn send(&self, p: usize, req: &Request) -> Result<Response> {
        self.send_from(p, self.ip, req).await
    }

    pub async fn send_from(&self, p: usize, ip: IpAddr, req: &Request) -> Result<Response> {
        self.before(req);
        let resp = req
            .send_from(self.env.addr(p), ip)
            .await
            .with_context(|| format!("{} {} to proxy {p}", req.method, req.path))?;
        self.after(req, &resp);
        Ok(resp)
    }

    /// Sends and checks status and `error.code` (`None`: a success without envelope check).
    pub async fn expect(
        &self,
        p: usize,
        req: &Request,
        status: u16,
        code: Option<&str>,
    ) -> Result<Response> {
        let resp = self.send(p, req).await?;
        check(&resp, status, code)
            .with_context(|| format!("{} {} on proxy {p}", req.method, req.path))?;
        Ok(resp)
    }

    /// A keep-alive connection to proxy `p` from client address `ip` (deliberate refusals spend
    /// an address's failure budget: 20 a minute, SPEC §3); its exchanges are recorded too.
    pub async fn keep_alive_from(&self, p: usize, ip: IpAddr) -> Result<KeepAlive> {
        Ok(KeepAlive {
            ctx: self.clone(),
            conn: Conn::connect_from(self.env.addr(p), ip).await?,
        })
    }

    /// Records a response obtained some other way (raw sockets).
    pub fn record_raw(&self, what: &str, resp: &Response) {
        self.env.record(Exchange {
            case: self.case,
            what: what.to_owned(),
            sent_request_id: None,
            resp: resp.clone(),
        });
    }

    fn before(&self, req: &Request) {
        for (k, v) in &req.headers {
            if k.eq_ignore_ascii_case("authorization") {
                let value = v.strip_prefix("Bearer ").unwrap_or(v).trim();
                self.env.remember_secret(value);
            }
        }
    }

    fn after(&self, req: &Request, resp: &Response) {
        let sent_request_id = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, v)| v.clone());
        self.env.record(Exchange {
            case: self.case,
            what: format!("{} {}", req.method, req.path),
            sent_request_id,
            resp: resp.clone(),
        });
    }

    async fn grpc<T>(
        &self,
        call: impl AsyncFnOnce(
            AuthServiceClient<Channel>,
        ) -> std::result::Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T> {
        let resp = call(self.env.grpc.clone())
            .await
            .map_err(|s| anyhow!("authd: {:?}: {}", s.code(), s.message()))?;
        Ok(resp.into_inner())
    }

    /// A new org; `rpm` 0 = the default budget.
    pub async fn org(&self, rpm: u32) -> Result<String> {
        let req = self.env.admin(pb::CreateOrgRequest {
            name: format!("sec-{}-{}", self.case, uuid::Uuid::new_v4().simple()),
            rpm_limit: rpm,
        })?;
        Ok(self
            .grpc(async |mut c| c.create_org(req).await)
            .await?
            .org_id)
    }

    /// A new active agent of `org`.
    pub async fn agent(&self, org: &str) -> Result<String> {
        let req = self.env.admin(pb::CreateAgentRequest {
            org_id: org.to_owned(),
            name: format!("agent-{}", uuid::Uuid::new_v4().simple()),
        })?;
        Ok(self
            .grpc(async |mut c| c.create_agent(req).await)
            .await?
            .agent_id)
    }

    pub async fn set_agent_status(
        &self,
        org: &str,
        agent: &str,
        status: AgentStatus,
    ) -> Result<()> {
        let req = self.env.admin(pb::SetAgentStatusRequest {
            org_id: org.to_owned(),
            agent_id: agent.to_owned(),
            status: status as i32,
        })?;
        self.grpc(async |mut c| c.set_agent_status(req).await)
            .await?;
        Ok(())
    }

    pub async fn token(&self, org: &str, permissions: u64) -> Result<Token> {
        self.token_with(
            org,
            TokenSpec {
                permissions,
                ..TokenSpec::default()
            },
        )
        .await
    }

    pub async fn token_with(&self, org: &str, spec: TokenSpec) -> Result<Token> {
        let req = self.env.admin(pb::CreateTokenRequest {
            org_id: org.to_owned(),
            name: format!("tok-{}", self.case),
            agent_id: spec.agent.unwrap_or_default(),
            user_id: String::new(),
            permissions: spec.permissions,
            expires_in_ms: spec.expires_in_ms,
            ..Default::default()
        })?;
        let resp = self.grpc(async |mut c| c.create_token(req).await).await?;
        self.env.remember_secret(&resp.token);
        ensure!(resp.permissions == spec.permissions, "permissions changed");
        Ok(Token {
            id: resp.token_id,
            pat: resp.token,
            expires_at_ms: resp.expires_at_unix_ms,
        })
    }

    /// Revokes; returns when authd has committed it.
    pub async fn revoke(&self, org: &str, token_id: &str) -> Result<()> {
        let req = self.env.admin(pb::RevokeTokenRequest {
            org_id: org.to_owned(),
            token_id: token_id.to_owned(),
        })?;
        self.grpc(async |mut c| c.revoke_token(req).await).await?;
        Ok(())
    }

    /// An org (default budget) with one active agent and a token with `permissions`.
    pub async fn tenant(&self, permissions: u64) -> Result<Tenant> {
        self.tenant_rpm(permissions, 0).await
    }

    pub async fn tenant_rpm(&self, permissions: u64, rpm: u32) -> Result<Tenant> {
        let org = self.org(rpm).await?;
        let agent = self.agent(&org).await?;
        let token = self.token(&org, permissions).await?;
        Ok(Tenant { org, agent, token })
    }

    /// Uses the tenant's credentials until every worker of both proxies has most likely seen
    /// them (fresh connections spread over the SO_REUSEPORT workers). The first request makes
    /// authd verify the secret; the rest are answered from authd's cache, so warming never
    /// queues more than one Argon2 verify. Each request spends one unit of the org's budget.
    pub async fn warm(&self, req: &Request, per_proxy: usize) -> Result<()> {
        for i in 0..per_proxy * self.env.proxies.len() {
            let p = i % self.env.proxies.len();
            self.expect(p, req, 200, None)
                .await
                .context("warming the caches")?;
        }
        Ok(())
    }
}

pub use pb::AgentStatus;

/// A recorded keep-alive connection.
pub struct KeepAlive {
    ctx: Ctx,
    conn: Conn,
}

impl KeepAlive {
    pub async fn send(&mut self, req: &Request) -> Result<Response> {
        self.ctx.before(req);
        let resp = self.conn.send(req, false).await?;
        self.ctx.after(req, &resp);
        Ok(resp)
    }
}

/// Status and, for errors, `error.code`.
pub fn check(resp: &Response, status: u16, code: Option<&str>) -> Result<()> {
    ensure!(
        resp.status == status && (code.is_none() || resp.error_code().as_deref() == code),
        "expected {status} {}, got:\n{}",
        code.unwrap_or(""),
        resp.dump()
    );
    Ok(())
}

/// `(status, code)` of a response, for compact comparisons.
pub fn outcome(resp: &Response) -> (u16, Option<String>) {
    (resp.status, resp.error_code())
}

/// Headers that legitimately differ between two identical refusals: the clock, the request id
/// (and the length it gives the body), and the org's remaining budget.
const VARYING_HEADERS: [&str; 7] = [
    "date",
    "x-request-id",
    "content-length",
    "x-ratelimit-remaining",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
];

/// Two refusals are the same answer: status, headers (in order) and body equal once what
/// varies by itself ([`VARYING_HEADERS`], the envelope's `request_id`) is taken out.
pub fn same_answer(a: &Response, b: &Response) -> Result<()> {
    type Normalised = (u16, Vec<(String, String)>, serde_json::Value);
    let normalise = |r: &Response| -> Result<Normalised> {
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .filter(|(k, _)| !VARYING_HEADERS.contains(&k.as_str()))
            .collect();
        let mut body = r.json()?;
        if let Some(e) = body.get_mut("error").and_then(|e| e.as_object_mut()) {
            e.remove("request_id");
        }
        Ok((r.status, headers, body))
    };
    let (na, nb) = (normalise(a)?, normalise(b)?);
    ensure!(
        na == nb,
        "answers differ:\n--- first\n{}\n--- second\n{}",
        a.dump(),
        b.dump()
    );
    Ok(())
}

/// SEC-6.1–6.4 for one error response: `Content-Type: application/json`, exactly the
/// envelope `{"error":{"code","message","request_id"}}`, and `request_id` equal to the
/// `X-Request-ID` header (which must be there, and be the client's own when it sent a valid one).
pub fn check_envelope(x: &Exchange) -> Result<()> {
    let r = &x.resp;
    // SEC-6.4: the header is there.
    let rid = r
        .header("x-request-id")
        .ok_or_else(|| anyhow!("SEC-6.4: no X-Request-ID"))?;
    // SEC-6.1: JSON.
    ensure!(
        r.header("content-type")
            .is_some_and(|ct| ct.split(';').next().unwrap_or("").trim() == "application/json"),
        "SEC-6.1: Content-Type is {:?}",
        r.header("content-type")
    );
    // SEC-6.2: the body matches the ErrorResponse schema exactly — one top-level `error`
    // object with exactly `code` (UPPER_SNAKE), `message` (non-empty) and `request_id`.
    let body = r.json()?;
    let top = body
        .as_object()
        .ok_or_else(|| anyhow!("body is not an object"))?;
    ensure!(
        top.len() == 1,
        "SEC-6.2: envelope has other top-level keys: {body}"
    );
    let err = top
        .get("error")
        .and_then(|e| e.as_object())
        .ok_or_else(|| anyhow!("SEC-6.2: no error object: {body}"))?;
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    ensure!(
        keys == ["code", "message", "request_id"],
        "SEC-6.2: error keys are {keys:?}"
    );
    let code = err["code"].as_str().unwrap_or("");
    ensure!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
        "SEC-6.2: code {code:?} is not an UPPER_SNAKE code"
    );
    ensure!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "SEC-6.2: message missing"
    );
    // SEC-6.3: request_id populated and equal to the header.
    ensure!(
        err["request_id"].as_str() == Some(rid),
        "SEC-6.3: request_id {} != X-Request-ID {rid}",
        err["request_id"]
    );
    if let Some(sent) = &x.sent_request_id {
        if valid_request_id(sent) {
            ensure!(
                rid == sent,
                "client's X-Request-ID {sent} replaced by {rid}"
            );
        }
    }
    Ok(())
}

/// SPEC §3: 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn valid_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Which of `secrets` occur in `text`.
pub fn leaked<'a>(text: &str, secrets: &'a [String]) -> Vec<&'a str> {
    secrets
        .iter()
        .filter(|s| text.contains(s.as_str()))
        .map(String::as_str)
        .collect()
}

/// p-th percentile (0..=100) of `values` (nearest rank).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `f` until it returns `Some`, at most until `within` has passed.
pub async fn poll<T>(
    what: &str,
    within: Duration,
    mut f: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What came back for hand-written bytes.
#[derive(Debug)]
pub struct RawOutcome {
    /// The first response, if a complete one arrived.
    pub resp: Option<Response>,
    /// Bytes after the first response (a second response would show here).
    pub extra: Vec<u8>,
    /// The server closed the connection (EOF or reset) after answering.
    pub closed: bool,
}

/// Writes `bytes` to proxy `p` from `ip` (in a task of its own, so a server that stops reading
/// cannot block the test), reads one response and then whatever follows until the server closes
/// or `linger` passes. Write errors are expected (the server may close first) and ignored.
pub async fn raw_exchange(
    addr: SocketAddr,
    ip: IpAddr,
    chunks: Vec<Vec<u8>>,
    pace: Duration,
    within: Duration,
    linger: Duration,
) -> Result<RawOutcome> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for chunk in chunks {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        // Keep the write side open: a half-close could read as "client done".
        std::future::pending::<()>().await;
    });
    let result = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + within;
        let mut closed = false;
        let resp = loop {
            if let Some((resp, used)) = parse_response(&buf)? {
                buf.drain(..used);
                break Some(resp);
            }
            match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
                Err(_) => bail!(
                    "no complete response within {within:?} ({} bytes)",
                    buf.len()
                ),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break None;
                }
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if resp.is_some() {
            let until = tokio::time::Instant::now() + linger;
            loop {
                match tokio::time::timeout_at(until, rd.read(&mut chunk)).await {
                    Err(_) => break,
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed = true;
                        break;
                    }
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
        Ok(RawOutcome {
            resp,
            extra: buf,
            closed,
        })
    }
    .await;
    writer.abort();
    result
}

/// One response with a `Content-Length` body (every proxy error is one) from the start of
/// `buf`: `(response, bytes used)`, or `None` while incomplete.
fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>> {
    let Some(head) = ResponseHead::parse(buf)? else {
        return Ok(None);
    };
    let len = head.content_length()?.unwrap_or(0);
    let head_len = head.len;
    if buf.len() < head_len + len {
        return Ok(None);
    }
    let resp = Response {
        status: head.status,
        headers: head.headers,
        body: buf[head_len..head_len + len].to_vec(),
    };
    Ok(Some((resp, head_len + len)))
}
