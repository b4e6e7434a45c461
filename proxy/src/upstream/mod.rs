//! Forwarding to the OpenAI-compatible upstream (SPEC §3, §9): per-worker
//! keep-alive pools over HTTP or HTTPS (rustls), streaming responses,
//! usage metering.
//!
//! INTERFACE (the chain relies on exactly this): one [`Upstream`] per worker,
//! built inside its runtime (with the timer enabled); `forward` is called
//! only after the whole security chain passed.
//!
//! Layout: [`target`] parses the base URL; [`request`] renders the request
//! head and strips what must not leave the proxy; [`conn`] opens and pools
//! connections, with addresses from [`dns`] (looked up off the worker); [`response`] parses the response head strictly; [`body`]
//! frames the body (chunked with [`crate::http::chunked`]) and streams it; [`usage`] meters it on
//! the way; [`stats`] renders `/metrics`.
//!
//! Not here: authentication, rate limiting, `X-Request-ID` on the response
//! and the error envelope (the chain's).

mod body;
mod conn;
mod dns;
pub mod request;
pub mod response;
pub mod router;
mod stats;
mod target;
pub mod usage;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use secrecy::ExposeSecret;

use crate::clock::Clock;
use crate::http::{Body, Request, Response};
use crate::ledger::meter::{Meter, Pending};
use body::{BodyError, BodyReader, Decoder, Record};
use conn::{Conn, Connector, Pool};
use request::HeadPrefix;
use response::{Framing, ResponseHead};
pub use stats::{render_prometheus, UpstreamStats};
pub use target::UpstreamRoute;
use usage::Scanner;

/// Largest non-streamed body held in memory; a bigger one is refused (502).
pub const MAX_FULL_BODY: usize = 32 * 1024 * 1024;
/// Bodies up to this size are sent in the same write as the head.
const COALESCE_BODY: usize = 16 * 1024;

/// Checks a provider's base URL the way [`Upstream::new`] will read it.
pub fn check_base_url(url: &str) -> anyhow::Result<()> {
    target::Target::parse(url).map(drop)
}

#[derive(Clone)]
pub struct UpstreamConfig {
    /// The provider's name (`x-ibex-provider`, the usage record); `default` for `IBEX_UPSTREAM_URL`.
    pub name: String,
    pub kind: crate::providers::Kind,
    /// `IBEX_UPSTREAM_URL` or the provider's `base_url`: base with version path, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// `IBEX_UPSTREAM_API_KEY`; never logged, never echoed.
    pub api_key: secrecy::SecretString,
    /// `IBEX_UPSTREAM_CA_FILE`: PEM bundle replacing the platform roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// `IBEX_UPSTREAM_TIMEOUT`: until response headers.
    pub timeout: Duration,
    /// `IBEX_UPSTREAM_IDLE_TIMEOUT`: between body chunks.
    pub idle_timeout: Duration,
    /// Extra attempts on this provider before the next one (SPEC §12).
    pub retries: u32,
    /// `IBEX_UPSTREAM_ORGANIZATION` / `IBEX_UPSTREAM_PROJECT`.
    pub operator: request::OperatorHeaders,
}

/// Facts about the caller the upstream module needs for headers, metering
/// and logs. The org always comes from the token.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx<'a> {
    pub request_id: &'a str,
    pub org_id: &'a uuid::Uuid,
    pub agent_id: &'a uuid::Uuid,
    pub token_id: &'a uuid::Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connect refused/reset, TLS failure, malformed upstream response → 502.
    Unavailable,
    /// No response headers within the timeout → 504.
    Timeout,
}

/// Why a send on one connection failed.
enum SendError {
    /// The connection was dead before any response byte: the request may
    /// be sent again on a fresh one. Carries the head back for the retry.
    Stale(Vec<u8>),
    Failed,
}

/// A provider's response head, received, with its connection: nothing sent to the client yet.
pub struct Exchanged {
    conn: Conn,
    head: ResponseHead,
    rest: BytesMut,
}

impl Exchanged {
    pub fn status(&self) -> u16 {
        self.head.status
    }
}

pub struct Upstream {
    config: Rc<UpstreamConfig>,
    /// The worker's clock: request timings for the log and the histograms.
    clock: Rc<dyn Clock>,
    connector: Connector,
    pool: Rc<Pool>,
    stats: Arc<UpstreamStats>,
    /// One request head per [`UpstreamRoute`], by its index in [`UpstreamRoute::ALL`].
    heads: Vec<HeadPrefix>,
    /// The usage ledger (SPEC §10): one record per forwarded request.
    meter: Option<Rc<Meter>>,
    /// `config.name`, shared with the usage records that name this provider.
    name: Rc<str>,
}

impl Upstream {
    /// Called on the worker thread, inside its monoio runtime, with the
    /// worker's clock ([`crate::ctx::WorkerCtx`]). Fails on a bad URL, a key
    /// that cannot go in a header, or unusable TLS roots.
    pub fn new(config: Rc<UpstreamConfig>, clock: Rc<dyn Clock>) -> anyhow::Result<Self> {
        Self::with_stats(config, clock, Arc::new(UpstreamStats::default()))
    }

    /// [`Upstream::new`] counting into `stats` (a worker's providers share one set).
    pub fn with_stats(
        config: Rc<UpstreamConfig>,
        clock: Rc<dyn Clock>,
        stats: Arc<UpstreamStats>,
    ) -> anyhow::Result<Self> {
        let target = target::Target::parse(&config.url)?;
        let key = config.api_key.expose_secret();
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("IBEX_UPSTREAM_API_KEY must be printable ASCII without spaces");
        }
        config.operator.check()?;
        let heads = UpstreamRoute::ALL
            .iter()
            .map(|&route| {
                let method = if route == UpstreamRoute::Models {
                    "GET"
                } else {
                    "POST"
                };
                let path = target.path_for(route);
                match config.kind {
                    crate::providers::Kind::Openai => {
                        HeadPrefix::new(method, &path, &target.authority, key, &config.operator)
                    }
                    crate::providers::Kind::Anthropic => {
                        HeadPrefix::anthropic(method, &path, &target.authority, key)
                    }
                }
            })
            .collect();
        let tls = match target.scheme {
            target::Scheme::Https => Some(Arc::new(conn::tls_config(config.ca_file.as_deref())?)),
            target::Scheme::Http => None,
        };
        Ok(Self {
            connector: Connector::new(target, tls, clock.clone())?,
            pool: Rc::new(Pool::new(stats.clone(), clock.clone())),
            stats,
            heads,
            name: Rc::from(config.name.as_str()),
            config,
            meter: None,
            clock,
        })
    }

    /// Records every forwarded request in the usage ledger from now on.
    pub fn set_meter(&mut self, meter: Rc<Meter>) {
        self.meter = Some(meter);
    }

    /// False while the usage spool is full: a metered route must answer 503.
    pub fn admits(&self) -> bool {
        self.meter.as_ref().is_none_or(|m| m.admits())
    }

    /// This worker's counters, for `/metrics` ([`render_prometheus`]).
    pub fn stats(&self) -> Arc<UpstreamStats> {
        self.stats.clone()
    }

    /// Forward `req` (already authorised) to this provider alone, with no fallback: one
    /// attempt, its response passed through (streaming as chunks arrive) or an error the chain
    /// renders as 502/504. The response never carries the upstream key.
    pub async fn forward(
        &self,
        req: &Request,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
    ) -> Result<Response, UpstreamError> {
        self.forward_reserved(req, route, ctx, None).await
    }

    /// [`Upstream::forward`] with the request's token reservation (SPEC
    /// §11), handed to its ledger record, which settles it when it is made
    /// ([`crate::tokens`]'s hook; without a meter it keeps its worst case).
    pub async fn forward_reserved(
        &self,
        req: &Request,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        tokens: Option<crate::tokens::Reservation>,
    ) -> Result<Response, UpstreamError> {
        let started = self.clock.now();
        let mut body = req.body.clone();
        let mut pending = self.start_meter(route, ctx, &body);
        if let Some(p) = pending.as_mut() {
            p.tokens = tokens;
        }
        if let Some(p) = pending.as_mut() {
            p.provider = Some(self.name.clone());
            p.attempts = 1;
            if route.asks_for_usage() {
                if let Some(asked) = crate::ledger::stream_usage::ask_for_usage(&body) {
                    body = asked;
                    p.strip_usage = true;
                }
            }
        }
        match self.attempt(req, route, &body, ctx.request_id).await {
            Ok(x) => self.deliver(x, route, ctx, started, pending).await,
            Err(e) => Err(self.failed_metered(pending, e, route, ctx, started)),
        }
    }

    /// The provider's name (`x-ibex-provider`, the usage record).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`Upstream::name`] for a usage record to hold (no copy).
    pub fn provider(&self) -> Rc<str> {
        self.name.clone()
    }

    /// Extra attempts on this provider before the next one.
    pub fn retries(&self) -> u32 {
        self.config.retries
    }

    /// Starts the usage record of a forwarded request (none without a ledger).
    pub fn start_meter(
        &self,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        body: &Bytes,
    ) -> Option<Pending> {
        self.meter.as_ref().map(|m| {
            m.start(
                ctx.request_id,
                *ctx.org_id,
                *ctx.agent_id,
                *ctx.token_id,
                route.client_path(),
                body.clone(),
            )
        })
    }

    /// One attempt on this provider: the head for it, the body, and its response head within
    /// the provider's timeout. Nothing has reached the client yet whatever this returns.
    pub async fn attempt(
        &self,
        req: &Request,
        route: UpstreamRoute,
        body: &Bytes,
        request_id: &str,
    ) -> Result<Exchanged, UpstreamError> {
        let prefix = &self.heads[route as usize];
        let mut head = Vec::with_capacity(512 + body.len().min(COALESCE_BODY));
        let content_length = (route != UpstreamRoute::Models).then_some(body.len());
        request::render_head(&mut head, prefix, req, request_id, content_length);
        let body = if route == UpstreamRoute::Models {
            Bytes::new()
        } else {
            body.clone()
        };
        match monoio::time::timeout(self.config.timeout, self.exchange(head, body)).await {
            Ok(Ok((conn, head, rest))) => Ok(Exchanged { conn, head, rest }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// Hands the response of a successful [`Upstream::attempt`] to the client: status and body
    /// passed through, streaming as chunks arrive, metered into `pending`.
    pub async fn deliver(
        &self,
        x: Exchanged,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        started: Instant,
        mut pending: Option<Pending>,
    ) -> Result<Response, UpstreamError> {
        let ttfb = self.elapsed(started);
        self.stats.response(x.head.status, ttfb);
        if let Some(p) = pending.as_mut() {
            p.seen.status = x.head.status;
        }
        self.respond(x.conn, x.head, x.rest, route, ctx, started, ttfb, pending)
            .await
    }

    /// Counts and logs a failed attempt (the client may still get another provider's answer).
    pub fn attempt_failed(
        &self,
        err: UpstreamError,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        started: Instant,
    ) {
        self.failed(err, route, ctx, started);
    }

    /// [`Upstream::failed`], recording the request with the status the client gets.
    pub fn failed_metered(
        &self,
        pending: Option<Pending>,
        err: UpstreamError,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        started: Instant,
    ) -> UpstreamError {
        if let Some(mut p) = pending {
            p.seen.status = crate::error::ApiError::from(err).status();
            p.finish();
        }
        self.failed(err, route, ctx, started)
    }

    fn failed(
        &self,
        err: UpstreamError,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        started: Instant,
    ) -> UpstreamError {
        match err {
            UpstreamError::Unavailable => self.stats.unavailable(),
            UpstreamError::Timeout => self.stats.timeout(),
        }
        tracing::warn!(
            target: "ibex::upstream",
            request_id = ctx.request_id,
            org = %ctx.org_id,
            route = ?route,
            error = ?err,
            total_ms = self.elapsed(started).as_secs_f64() * 1e3,
            "upstream failed"
        );
        err
    }

    fn elapsed(&self, since: Instant) -> Duration {
        self.clock.now().saturating_duration_since(since)
    }

    /// Sends the request on a pooled connection, or a fresh one; a pooled
    /// connection found dead before any response byte is replaced once.
    async fn exchange(
        &self,
        mut head: Vec<u8>,
        body: Bytes,
    ) -> Result<(Conn, ResponseHead, BytesMut), UpstreamError> {
        if let Some(conn) = self.pool.take() {
            self.stats.reused();
            match send(conn, head, &body).await {
                Ok(x) => return Ok(x),
                Err(SendError::Stale(h)) => head = h,
                Err(SendError::Failed) => return Err(UpstreamError::Unavailable),
            }
            self.stats.retried();
        }
        let conn = self.connector.connect().await.map_err(|e| {
            tracing::debug!(target: "ibex::upstream", error = %e, "connect failed");
            UpstreamError::Unavailable
        })?;
        self.stats.opened();
        send(conn, head, &body)
            .await
            .map_err(|_| UpstreamError::Unavailable)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one exchange's parts and timings, passed once from forward"
    )]
    async fn respond(
        &self,
        conn: Conn,
        head: ResponseHead,
        rest: BytesMut,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        started: Instant,
        ttfb: Duration,
        pending: Option<Pending>,
    ) -> Result<Response, UpstreamError> {
        let strip_usage = pending.as_ref().is_some_and(|p| p.strip_usage);
        let scanner = match route {
            UpstreamRoute::Models => Scanner::Off,
            _ if head.event_stream => Scanner::Sse(Box::default()),
            _ => Scanner::Json(Box::default()),
        };
        let record = Record {
            stats: self.stats.clone(),
            request_id: ctx.request_id.into(),
            org: *ctx.org_id,
            route,
            status: head.status,
            started,
            clock: self.clock.clone(),
            ttfb,
            streamed: false,
            bytes: 0,
            scanner,
            outcome: "client_gone",
            ledger: pending,
        };
        let (decoder, stream) = match head.framing {
            Framing::Empty => (Decoder::Length(0), false),
            Framing::Length(n) => (Decoder::Length(n), head.event_stream),
            Framing::Chunked => (Decoder::Chunked(Default::default()), true),
            Framing::Close => (Decoder::Close, true),
        };
        let too_large = matches!(head.framing, Framing::Length(n) if n > MAX_FULL_BODY as u64);
        let mut reader = BodyReader::new(
            conn,
            rest,
            decoder,
            head.keep_alive,
            self.config.idle_timeout,
            self.pool.clone(),
            record,
        );
        let body = if head.framing == Framing::Empty {
            reader.next().await.ok();
            Body::Empty
        } else if stream && strip_usage && head.event_stream {
            Body::Stream(crate::ledger::stream_usage::strip_usage_chunk(
                reader.into_stream(),
            ))
        } else if stream {
            Body::Stream(reader.into_stream())
        } else if too_large {
            reader.record.client_status(UpstreamError::Unavailable);
            drop(reader);
            return Err(self.failed(UpstreamError::Unavailable, route, ctx, started));
        } else {
            match reader.read_full(MAX_FULL_BODY).await {
                Ok(b) => Body::Full(b),
                Err(e) => {
                    let err = match e {
                        BodyError::IdleTimeout => UpstreamError::Timeout,
                        _ => UpstreamError::Unavailable,
                    };
                    reader.record.client_status(err);
                    drop(reader);
                    return Err(self.failed(err, route, ctx, started));
                }
            }
        };
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
            close: false,
        })
    }
}

/// Writes the request and reads up to the end of the final response head.
/// Returns the connection, the head and any body bytes read after it.
async fn send(
    mut conn: Conn,
    mut head: Vec<u8>,
    body: &Bytes,
) -> Result<(Conn, ResponseHead, BytesMut), SendError> {
    let head_len = head.len();
    let separate_body = body.len() > COALESCE_BODY;
    if !separate_body {
        head.extend_from_slice(body);
    }
    let (res, mut head) = conn.write_all(head).await;
    head.truncate(head_len);
    if res.is_err() {
        return Err(SendError::Stale(head));
    }
    if separate_body {
        let (res, _) = conn.write_all(body.clone()).await;
        if res.is_err() {
            return Err(SendError::Stale(head));
        }
    }

    let mut buf = BytesMut::with_capacity(body::READ_SIZE);
    let mut got_any = false;
    loop {
        buf.reserve(body::READ_SIZE);
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = conn.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(n) if n > 0 => {}
            // Closed or reset before a single response byte: the pooled
            // connection was already dead when we picked it.
            _ if !got_any => return Err(SendError::Stale(head)),
            _ => return Err(SendError::Failed),
        }
        got_any = true;
        // Skip interim 1xx heads; stop at the final one.
        loop {
            match response::parse_head(&buf) {
                Ok(None) => break,
                Ok(Some((h, n))) => {
                    buf.advance(n);
                    if h.status >= 200 {
                        return Ok((conn, h, buf));
                    }
                }
                Err(e) => {
                    tracing::debug!(target: "ibex::upstream", error = ?e, "bad upstream response head");
                    return Err(SendError::Failed);
                }
            }
        }
    }
}
