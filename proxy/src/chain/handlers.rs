//! What each route answers once the chain let the request through. Public
//! handlers take no principal; protected ones take the [`Principal`] only the
//! auth steps can build.

use bytes::Bytes;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{render, ApiError};
use crate::http::ascii::push_decimal;
use crate::http::{Body, HeaderValue, Request, Response};
use crate::upstream::router::{ModelPolicy, Router};
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
pub async fn forward(
    upstream: Option<&Router>,
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
    let (org, agent, token) = (p.org(), p.agent(), p.token_id());
    let ctx = ForwardCtx {
        request_id,
        org_id: &org,
        agent_id: &agent,
        token_id: &token,
    };
    upstream.forward(&req, target, ctx, &Allowed(p)).await
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
