//! The security chain, built in one place: [`Chain::call`] runs every step of
//! SPEC §3 in order, with the reason each sits where it does written above
//! it. Each step hands the next a typed proof (`TokenGrant` → `Principal`),
//! so a handler cannot run without the steps before it, and every refusal is
//! rendered by [`crate::error::render`].
//!
//! Not here: how credentials are cached or validated ([`crate::auth`]), how
//! Redis counts ([`crate::ratelimit`]), how bytes are parsed
//! ([`crate::http`]). Per-worker construction from the config lives in
//! [`wiring`].

pub mod access_log;
pub mod handlers;
pub mod limiter;
#[cfg(test)]
mod tests;
pub mod wiring;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::Instrument;
use uuid::Uuid;

pub use limiter::{Limiter, NoLimit};

use crate::auth::step::agent_header;
use crate::auth::{AuthBackend, Authenticator, Principal};
use crate::ctx::WorkerCtx;
use crate::error::{render, ApiError};
use crate::http::ascii::Decimal;
use crate::http::{ConnInfo, HeaderValue, Method, Request, Response, Service};
use crate::metrics::Registry;
use crate::ratelimit::RateDecision;
use crate::request_id::{self, RequestId};
use crate::routes::{self, Matched, RouteError, RouteId};
use crate::upstream::router::Router;
use crate::upstream::UpstreamRoute;

/// One worker's chain. Everything in it is per worker; the only shared
/// pieces are the metrics registry (read on scrape) and the bridge queue
/// (used on misses).
pub struct Chain<B, L> {
    /// The worker's clock and counters (the auth core holds the same).
    ctx: WorkerCtx,
    auth: Authenticator<B>,
    limiter: L,
    upstream: Option<Router>,
    registry: Arc<Registry>,
    /// `IBEX_DEFAULT_RPM`, for orgs whose own limit is 0.
    default_rpm: u32,
    /// Token limits and budgets (SPEC §11), when Redis is configured.
    tokens: Option<crate::tokens::TokenLimiter>,
}

impl<B: AuthBackend, L: Limiter> Chain<B, L> {
    pub fn new(
        ctx: WorkerCtx,
        auth: Authenticator<B>,
        limiter: L,
        upstream: Option<Router>,
        registry: Arc<Registry>,
        default_rpm: u32,
    ) -> Self {
        Self {
            ctx,
            auth,
            limiter,
            upstream,
            registry,
            default_rpm,
            tokens: None,
        }
    }

    /// Chat requests reserve and settle tokens with `tokens` (SPEC §11).
    pub fn with_tokens(mut self, tokens: crate::tokens::TokenLimiter) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// The steps after the request id and the route match, in SPEC order.
    /// `org` is filled in as soon as it is known, for the access log.
    async fn protected(
        &self,
        req: Request,
        conn: &ConnInfo,
        rid: &RequestId,
        route: Result<RouteId, (RouteId, RouteError)>,
        started: Instant,
        org: &mut Option<Uuid>,
    ) -> Result<Response, ApiError> {
        // Token first: nothing about a protected path — not even whether it
        // exists — is told to a caller who has not proved who they are.
        // Refused guesses are counted per address by the flood guard.
        // On `/v1/messages` only, the PAT may come as `x-api-key` (the Anthropic SDKs', SPEC §12).
        let x_api_key = route == Ok(RouteId::Messages);
        let grant = self
            .auth
            .token(&req.headers, x_api_key, conn.peer.ip(), started)
            .await?;
        *org = Some(grant.org());

        // The agent header is checked only once the token is good, so an
        // anonymous caller cannot tell a bad header from a bad token.
        let agent = agent_header(&req.headers)?;

        // The agent must be active in the token's org (and the bound agent of
        // a bound token). Tenant isolation happens here: the org comes from
        // the token, never from the request.
        let principal = self
            .auth
            .agent(grant, agent, conn.peer.ip(), started)
            .await?;

        // Only an authenticated caller learns that a route does not exist or
        // does not take this method (SPEC: 401 before 404).
        let route = route.map_err(|(_, e)| match e {
            RouteError::NotFound => ApiError::NotFound,
            RouteError::MethodNotAllowed => ApiError::MethodNotAllowed,
        })?;

        // Permission before the rate limiter: a request refused here must not
        // spend the org's budget.
        principal.require(route.permission())?;

        // Rate limit last among the checks: only requests that would be
        // served count against the org. Redis trouble fails open inside.
        let rpm = match principal.rpm() {
            0 => self.default_rpm,
            n => n,
        };
        let decision = self.limiter.check(&principal.org(), rpm).await;
        let now_unix = u64::try_from(self.ctx.clock.unix_ms_at(started) / 1000).unwrap_or(0);
        if !decision.admitted {
            self.ctx.metrics.rate_limited.inc();
            let mut resp = render(ApiError::RateLimited, rid.as_str());
            rate_headers(&mut resp, &decision, now_unix);
            retry_headers(&mut resp, &decision);
            return Ok(resp);
        }

        // The handler, with the principal as proof that every check ran.
        let mut resp = match self.handle(req, route, &principal, rid).await {
            Ok(resp) => resp,
            Err(e) => render(e, rid.as_str()),
        };
        rate_headers(&mut resp, &decision, now_unix);
        Ok(resp)
    }

    async fn handle(
        &self,
        req: Request,
        route: RouteId,
        p: &Principal,
        rid: &RequestId,
    ) -> Result<Response, ApiError> {
        match route {
            RouteId::InternalProbe => Ok(handlers::auth_probe(p)),
            RouteId::OrgProbe => handlers::org_auth_probe(p, routes::org_segment(&req.path)),
            // Boxed: the forwarding future is large, and keeping it inline
            // would make every request's future (moved on each call) as big.
            RouteId::Models => Box::pin(self.forward(req, UpstreamRoute::Models, p, rid)).await,
            RouteId::Chat => {
                Box::pin(self.forward(req, UpstreamRoute::ChatCompletions, p, rid)).await
            }
            RouteId::Completions => {
                Box::pin(self.forward(req, UpstreamRoute::Completions, p, rid)).await
            }
            RouteId::Responses => {
                Box::pin(self.forward(req, UpstreamRoute::Responses, p, rid)).await
            }
            RouteId::Embeddings => {
                Box::pin(self.forward(req, UpstreamRoute::Embeddings, p, rid)).await
            }
            RouteId::Messages => Box::pin(self.forward(req, UpstreamRoute::Messages, p, rid)).await,
            // Public routes never get here; answer as if unknown.
            RouteId::Health | RouteId::Ready | RouteId::Metrics | RouteId::Unmatched => {
                Err(ApiError::NotFound)
            }
        }
    }

    async fn forward(
        &self,
        req: Request,
        target: UpstreamRoute,
        p: &Principal,
        rid: &RequestId,
    ) -> Result<Response, ApiError> {
        handlers::forward(
            self.upstream.as_ref(),
            self.tokens.as_ref(),
            req,
            target,
            p,
            rid.as_str(),
        )
        .await
    }

    fn public(&self, route: RouteId, rid: &RequestId) -> Response {
        match route {
            RouteId::Health => handlers::health(),
            RouteId::Ready => {
                let authd_up = self.auth.core().feed_fresh(self.ctx.clock.now());
                handlers::ready(authd_up, self.limiter.healthy(), rid.as_str())
            }
            RouteId::Metrics => handlers::metrics(self.registry.render()),
            _ => render(ApiError::NotFound, rid.as_str()),
        }
    }
}

/// The worker is done with its chain (drained): write out its batched
/// access lines before the thread reports that it exited.
impl<B, L> Drop for Chain<B, L> {
    fn drop(&mut self) {
        access_log::flush_this_thread();
    }
}

impl<B: AuthBackend, L: Limiter> Service for Chain<B, L> {
    async fn call(&self, req: Request, conn: &ConnInfo) -> Response {
        let clock = &*self.ctx.clock;
        let started = clock.now();

        // Request id before anything can fail, so every answer — refusals
        // included — carries it, in its header and in the envelope.
        let rid = RequestId::from_headers(&req.headers);
        let method = req.method;

        // Route match decides only public vs protected here; 404/405 for
        // protected paths are held back until the caller is authenticated.
        let matched = routes::match_route(conn.listener, req.method, &req.path);

        let span = tracing::info_span!("request", request_id = rid.as_str());
        let mut org = None;
        let mut resp = async {
            match matched {
                Matched::Public(route) => self.public(route, &rid),
                Matched::PublicWrongMethod(_) => render(ApiError::MethodNotAllowed, rid.as_str()),
                Matched::NotServed => render(ApiError::NotFound, rid.as_str()),
                Matched::Protected(route) => self
                    .protected(req, conn, &rid, route, started, &mut org)
                    .await
                    .unwrap_or_else(|e| render(e, rid.as_str())),
            }
        }
        .instrument(span.clone())
        .await;
        resp.headers.push((request_id::HEADER, rid.header_value()));

        let latency_us = u64::try_from(clock.now().saturating_duration_since(started).as_micros())
            .unwrap_or(u64::MAX);
        self.ctx
            .metrics
            .request(matched.id(), resp.status, latency_us);
        span.in_scope(|| {
            tracing::info!(
                target: access_log::TARGET,
                request_id = rid.as_str(),
                method = method_str(method),
                route = matched.id().template(),
                status = resp.status,
                latency_us,
                org = org.map(tracing::field::display),
                "request"
            )
        });
        resp
    }

    async fn drained(&self) {
        if let Some(tokens) = &self.tokens {
            tokens.flush_settles().await;
        }
    }
}

fn method_str(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Patch => "PATCH",
        Method::Options => "OPTIONS",
        Method::Other => "OTHER",
    }
}

/// A decimal header value without the `fmt` machinery (hot path).
fn num(n: impl Into<u64>) -> HeaderValue {
    HeaderValue::Owned(Bytes::copy_from_slice(Decimal::new(n.into()).as_bytes()))
}

/// SPEC §4 headers, under both our names and OpenAI's. `remaining` is absent
/// when Redis could not be asked (failed open).
fn rate_headers(resp: &mut Response, d: &RateDecision, now_unix: u64) {
    let h = &mut resp.headers;
    h.push(("X-RateLimit-Limit", num(d.limit)));
    h.push(("x-ratelimit-limit-requests", num(d.limit)));
    if let Some(rem) = d.remaining {
        h.push(("X-RateLimit-Remaining", num(rem)));
        h.push(("x-ratelimit-remaining-requests", num(rem)));
    }
    if d.reset_unix > 0 {
        h.push(("X-RateLimit-Reset", num(d.reset_unix)));
        let secs = d.reset_unix.saturating_sub(now_unix);
        let mut reset = num(secs).as_bytes().to_vec();
        reset.push(b's');
        h.push((
            "x-ratelimit-reset-requests",
            HeaderValue::Owned(reset.into()),
        ));
    }
}

/// On a 429: `Retry-After` in whole seconds (1–60) and `retry-after-ms`.
fn retry_headers(resp: &mut Response, d: &RateDecision) {
    let ms = d.retry_after_ms.clamp(1, 60_000);
    resp.headers
        .push(("Retry-After", num(ms.div_ceil(1000).clamp(1, 60))));
    resp.headers.push(("retry-after-ms", num(ms)));
}
