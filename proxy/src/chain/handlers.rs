//! What each route answers once the chain let the request through. Public
//! handlers take no principal; protected ones take the [`Principal`] only the
//! auth steps can build.

use bytes::Bytes;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{render, ApiError};
use crate::http::ascii::push_decimal;
use crate::http::{Body, HeaderValue, Request, Response};
use crate::tokens::{estimate, Refusal, TokenDecision, TokenLimiter};
use crate::upstream::router::{ModelPolicy, Prepared, Router};
use crate::upstream::{ForwardCtx, UpstreamRoute};

fn json(status: u16, body: impl Into<Bytes>) -> Response {
    Response {
        status,
        headers: vec![("Content-Type", HeaderValue::Static("application/json"))],
        body: Body::Full(body.into()),
        close: false,
    }
}

/// `GET /health`: the process serves.
pub fn health() -> Response {
    json(200, Bytes::from_static(br#"{"status":"ok"}"#))
}

/// `GET /ready`: authd (its invalidation feed is live) and Redis answer.
pub fn ready(authd_up: bool, redis_up: bool, request_id: &str) -> Response {
    let down = match (authd_up, redis_up) {
        (true, true) => return json(200, Bytes::from_static(br#"{"status":"ready"}"#)),
        (false, true) => "not ready: authd is unavailable",
        (true, false) => "not ready: redis is unavailable",
        (false, false) => "not ready: authd and redis are unavailable",
    };
    render(ApiError::NotReady(down), request_id)
}

/// `GET /metrics`: Prometheus text exposition.
pub fn metrics(text: String) -> Response {
    Response {
        status: 200,
        headers: vec![(
            "Content-Type",
            HeaderValue::Static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body: Body::Full(Bytes::from(text)),
        close: false,
    }
}

/// `GET /v1/internal/auth-probe`: who the proxy thinks the caller is.
pub fn auth_probe(p: &Principal) -> Response {
    // Every field is a UUID or an integer: nothing to escape. Written by
    // hand (no `fmt`): this is the route the hot-path figures are taken on.
    let mut out = Vec::with_capacity(160);
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    for (key, id) in [
        (&br#"{"org_id":""#[..], p.org()),
        (br#"","agent_id":""#, p.agent()),
        (br#"","token_id":""#, p.token_id()),
    ] {
        out.extend_from_slice(key);
        out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid).as_bytes());
    }
    out.extend_from_slice(br#"","permissions":"#);
    push_decimal(&mut out, p.permissions());
    out.push(b'}');
    json(200, out)
}

/// `GET /v1/orgs/{org_id}/auth-probe`: the path's org must be the token's.
/// Another org, or something that is not an org id at all, is 403 — never
/// 404, so the answer says nothing about what exists.
pub fn org_auth_probe(p: &Principal, org_segment: &[u8]) -> Result<Response, ApiError> {
    match Uuid::try_parse_ascii(org_segment) {
        Ok(org) if org == p.org() => Ok(auth_probe(p)),
        _ => Err(ApiError::PermissionDenied),
    }
}

/// `GET /v1/models` and the forwarded `POST` routes (SPEC §12): by the model's route to its
/// providers, which get none of the client's credentials ([`crate::upstream::request`]).
/// The route, allow-lists and alias are decided first ([`Router::prepare`]); then a forwarded
/// request reserves its worst case with the token limiter (SPEC §11) once — never per
/// fallback attempt — and the reservation goes with the request's one ledger record, which
/// settles it.
pub async fn forward(
    upstream: Option<&Router>,
    tokens: Option<&TokenLimiter>,
    req: Request,
    target: UpstreamRoute,
    p: &Principal,
    request_id: &str,
) -> Result<Response, ApiError> {
    let Some(upstream) = upstream else {
        return Err(ApiError::ProviderNotConfigured);
    };
    // A request that would go unmetered is refused (SPEC §10); `/v1/models` always answers.
    if target != UpstreamRoute::Models && !upstream.admits() {
        return Err(ApiError::UsageUnavailable);
    }
    // Under a token limit the body is read once: the estimate's pass also finds the model.
    let limiter = tokens.filter(|_| target != UpstreamRoute::Models);
    let limited = limiter.and_then(|l| Some((l, l.limits(p)?)));
    let worst = limited.map(|_| estimate::worst_case(&req.body));
    let prepared = match &worst {
        Some(w) => {
            let found = w.model.as_deref().zip(w.model_span.clone());
            upstream.prepare_with(&req, target, &Allowed(p), found)
        }
        None => upstream.prepare(&req, target, &Allowed(p)),
    };
    let routed = match prepared? {
        Prepared::Answer(resp) => return Ok(resp),
        Prepared::Forward(routed) => routed,
    };
    let (mut reservation, mut headers) = (None, None);
    if let (Some((limiter, limits)), Some(worst)) = (limited, &worst) {
        match limiter.reserve_worst(p, &limits, worst).await {
            TokenDecision::Skip | TokenDecision::FailOpen => {}
            TokenDecision::Admit(r, h) => (reservation, headers) = (Some(r), h),
            TokenDecision::Refuse(refusal) => return Ok(token_refusal(&refusal, request_id)),
        }
    }
    let (org, agent, token) = (p.org(), p.agent(), p.token_id());
    let ctx = ForwardCtx {
        request_id,
        org_id: &org,
        agent_id: &agent,
        token_id: &token,
    };
    let result = upstream.send(routed, &req, ctx, reservation).await;
    match (result, headers) {
        (Ok(mut resp), Some(h)) => {
            h.push(&mut resp.headers);
            Ok(resp)
        }
        (result, _) => result,
    }
}

/// The principal's model allow-lists as the router checks them.
struct Allowed<'a>(&'a Principal);

impl ModelPolicy for Allowed<'_> {
    fn allows(&self, model: &str) -> bool {
        self.0.allows_model(model)
    }

    fn exact_names(&self) -> Vec<String> {
        self.0.allowed_model_names()
    }
}

/// The 429 of a token limit: the envelope naming tokens, the level's
/// `x-ratelimit-*-tokens`, `Retry-After` (whole seconds) and `retry-after-ms`.
fn token_refusal(refusal: &Refusal, request_id: &str) -> Response {
    let mut resp = render(ApiError::TokensLimited(refusal.level.message()), request_id);
    refusal.headers.push(&mut resp.headers);
    let ms = refusal.retry_after_ms.max(1);
    let mut secs = Vec::new();
    push_decimal(&mut secs, ms.div_ceil(1000));
    let mut millis = Vec::new();
    push_decimal(&mut millis, ms);
    resp.headers
        .push(("Retry-After", HeaderValue::Owned(secs.into())));
    resp.headers
        .push(("retry-after-ms", HeaderValue::Owned(millis.into())));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_names_what_is_down() {
        assert_eq!(ready(true, true, "r").status, 200);
        for (a, r, word) in [
            (false, true, "authd"),
            (true, false, "redis"),
            (false, false, "authd and redis"),
        ] {
            let resp = ready(a, r, "r");
            assert_eq!(resp.status, 503);
            let Body::Full(b) = resp.body else { panic!() };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains(word));
        }
    }
}
